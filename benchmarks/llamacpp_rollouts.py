"""N perception rollouts on a GGUF bundle: llama-cpp-python's own chat handler vs the llamacpp runtime.

    sparc-engine export gguf --model models/tiny-qwen3vl --out models/tiny-qwen3vl-gguf
    python benchmarks/llamacpp_rollouts.py                   # that bundle, N=8 at 256 px
    python benchmarks/llamacpp_rollouts.py --bundle models/qwen3vl-4b-gguf --resolution 512

Baseline: `Llama` with llama-cpp-python's generic `MTMDChatHandler` (0.3.36 has no Qwen3-VL handler),
`create_chat_completion` called once per rollout: the handler clears the KV cache on every call, so each
rollout encodes the image and prefills the whole prompt again, then decodes alone.
This runtime: the image encoded and `[header][image]` prefilled once, the question once, the KV forked
into N sequences decoded together in one batch per step.

Both get the same picture (already resized to the engine's grid, so libmtmd makes the same number of
image tokens), the same prompt text, temperature and token budget, and the same thread count. Reported:
prompt tokens computed (the handler's usage.prompt_tokens per call vs the runtime's computed tokens) and
wall time, as ratios baseline / runtime, medians over --repeats after one warm-up each. Generated token
counts are printed too: rollouts stop at their own EOS, so they differ a little between the two modes.
Not a test: the figures depend on the machine.
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import os
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # a plain script: run from a checkout without installing

from PIL import Image as PILImage  # noqa: E402

from benchmarks.workload import run_benchmark, workload_parser  # noqa: E402
from engine.families import family_for  # noqa: E402
from engine.imaging import load_image  # noqa: E402
from runtimes.bundle import read_manifest  # noqa: E402
from runtimes.llamacpp import LlamaCppRuntime, image_rgb  # noqa: E402
from runtimes.protocol import Sampling  # noqa: E402


def parse_args() -> argparse.Namespace:
    parser = workload_parser(__doc__, "models/tiny-qwen3vl-gguf")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="CPU threads for both")
    return parser.parse_args()


def run_runtime(runtime: LlamaCppRuntime, family, image, prompt: str, args: argparse.Namespace) -> dict:
    start = time.perf_counter()
    prefix = runtime.prefill(family.image_prefix(image), "base")
    seeds = tuple(range(args.rollouts))
    sampling = Sampling(args.max_new_tokens, args.temperature, seeds=seeds)
    generations = runtime.generate(prefix, family.question_suffix(prompt), args.rollouts, sampling)
    ms = (time.perf_counter() - start) * 1000
    prefix.state.release()
    return {
        "prompt_tokens": prefix.computed_tokens + sum(g.prompt_tokens for g in generations),
        "generated_tokens": sum(g.generated_tokens for g in generations),
        "ms": ms,
    }


def run_chat_handler(llm, data_uri: str, prompt: str, image, merge: int, args: argparse.Namespace) -> dict:
    # The handler's usage.prompt_tokens is its n_past, which counts an M-RoPE image as the positions it
    # spans (max(h, w) / merge), not the tokens it computed: add the difference back per call.
    _, grid_h, grid_w = image.grid_thw
    uncounted = image.n_tokens - max(grid_h, grid_w) // merge
    start = time.perf_counter()
    prompt_tokens = generated = 0
    for seed in range(args.rollouts):  # one call per rollout: the handler resets the KV cache each time
        content = [{"type": "image_url", "image_url": {"url": data_uri}}, {"type": "text", "text": prompt}]
        response = llm.create_chat_completion(
            messages=[{"role": "user", "content": content}],
            max_tokens=args.max_new_tokens,
            temperature=args.temperature,
            seed=seed,
        )
        prompt_tokens += response["usage"]["prompt_tokens"] + uncounted
        generated += response["usage"]["completion_tokens"]
    return {
        "prompt_tokens": prompt_tokens,
        "generated_tokens": generated,
        "ms": (time.perf_counter() - start) * 1000,
    }


def median_of(runs: list[dict]) -> dict:
    return {**runs[0], "ms": statistics.median(r["ms"] for r in runs)}


def main() -> int:
    args = parse_args()
    from llama_cpp import Llama
    from llama_cpp.llama_chat_format import MTMDChatHandler

    bundle = Path(args.bundle)
    manifest = read_manifest(bundle)
    runtime = LlamaCppRuntime(bundle, device=args.device, n_threads=args.threads, max_rollouts=args.rollouts)
    family = family_for(runtime.info.architecture, runtime.info.image)
    image = family.prepare_image(load_image(args.image), args.resolution, "bench")
    prompt = family.perceive_prompt.format(question=args.question)
    png = io.BytesIO()
    PILImage.fromarray(image_rgb(image, runtime.info.image)).save(png, format="PNG")
    data_uri = "data:image/png;base64," + base64.b64encode(png.getvalue()).decode()

    llm = Llama(
        model_path=str(bundle / manifest.file("base", "text")),
        chat_handler=MTMDChatHandler(
            clip_model_path=str(bundle / manifest.file("base", "mmproj")), verbose=False
        ),
        n_ctx=4096,
        n_threads=args.threads,
        n_gpu_layers=0 if args.device == "cpu" else -1,
        verbose=False,
    )
    results = {}
    for name, run in (
        ("runtime", lambda: run_runtime(runtime, family, image, prompt, args)),
        (
            "chat_handler",
            lambda: run_chat_handler(llm, data_uri, prompt, image, runtime.info.image.merge_size, args),
        ),
    ):
        run()  # warm-up
        results[name] = median_of([run() for _ in range(args.repeats)])
    ours, theirs = results["runtime"], results["chat_handler"]
    report = {
        "bundle": str(bundle),
        "dtype": manifest.dtype,
        "rollouts": args.rollouts,
        "resolution": args.resolution,
        "image_tokens": image.n_tokens,
        **results,
        "prompt_tokens_ratio": theirs["prompt_tokens"] / max(ours["prompt_tokens"], 1),
        "time_ratio": theirs["ms"] / ours["ms"],
    }
    if args.json:
        print(json.dumps(report))
        return 0
    print(
        f"N={args.rollouts} rollouts at {args.resolution}px ({image.n_tokens} image tokens), "
        f"{manifest.dtype} GGUF, {args.threads} threads, {args.device}"
    )
    print(f"{'mode':<28}{'prompt tok':>12}{'generated':>11}{'ms (median)':>13}")
    for name, row in (("llamacpp runtime (fork)", ours), ("MTMDChatHandler x N", theirs)):
        print(f"{name:<28}{row['prompt_tokens']:>12}{row['generated_tokens']:>11}{row['ms']:>13.1f}")
    print(f"prompt tokens computed: {report['prompt_tokens_ratio']:.2f}x more with the chat handler")
    print(f"wall time:              {report['time_ratio']:.2f}x longer with the chat handler")
    return 0


if __name__ == "__main__":
    run_benchmark(main)
