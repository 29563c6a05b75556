"""ONNX weight quantization: size, speed and logit drift of every --quant scheme against fp32, one run.

    python benchmarks/quant.py                        # the tiny test model, built offline
    python benchmarks/quant.py --shape 65m            # a ~65M random Qwen3-VL of the real architecture
    python benchmarks/quant.py --model models/qwen3vl-2b --resolution 512
    python benchmarks/quant.py --model demo/qwen3vl --image examples/shapes.png \
        --question "What shape is the green object?"       # the trained demo model

Exports the checkpoint once per VARIANTS entry (`sparc-engine export onnx`, then with each `--quant`;
needs the export extra) and runs each bundle on the same prompts (image + question, --resolution px):

- size: the graph files of the base variant;
- prefill: the whole prompt, ms (median of --repeats); decode: ms per token of one greedy sequence;
- drift: last-token logits of the prompt against fp32's, max and mean absolute difference (over --images
  pictures of different sizes), and how many of the first --tokens greedy tokens match fp32's.

Speed figures are also given as ratios to fp32, measured in the same run. Writes OUT/quant.json and
OUT/quant.md and prints the markdown. Not a test: the times depend on the machine and its load.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # a plain script: run from a checkout without installing

import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402

from benchmarks.shapes import SHAPES, sizes  # noqa: E402
from benchmarks.workload import write_report  # noqa: E402
from engine.cli import main as cli  # noqa: E402
from engine.families import family_for  # noqa: E402
from export import ONNX_QUANTS  # noqa: E402
from export.tiny import build_tiny_qwen3vl_cached  # noqa: E402
from runtimes.onnx import OnnxRuntime  # noqa: E402
from runtimes.protocol import Sampling  # noqa: E402

VARIANTS = ("fp32", *ONNX_QUANTS)
ASPECTS = [(1, 1), (4, 3), (3, 4), (16, 9)]  # the prompts' images: crops of --image


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", type=Path, help="Hugging Face checkpoint (default: build --shape)")
    parser.add_argument(
        "--shape",
        choices=[n for n, s in SHAPES.items() if not s.gpu],
        default="tiny",
        help="random checkpoint to build",
    )
    parser.add_argument("--out", type=Path, default=ROOT / "out/quant", help="bundles and reports")
    parser.add_argument("--resolution", type=int, default=256, help="image view, longest side in pixels")
    parser.add_argument(
        "--image", type=Path, default=ROOT / "examples/street.png", help="the prompts' picture"
    )
    parser.add_argument("--question", default="What colour is the car?")
    parser.add_argument("--images", type=int, default=4, choices=range(1, len(ASPECTS) + 1), help="prompts")
    parser.add_argument("--tokens", type=int, default=32, help="greedy tokens decoded per prompt")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per figure (median reported)")
    return parser.parse_args()


def export_bundles(model: Path, out: Path) -> dict[str, Path]:
    bundles = {}
    for name in VARIANTS:
        bundle = out / f"bundle-{name}"
        quant = [] if name == "fp32" else ["--quant", name]
        with contextlib.redirect_stdout(io.StringIO()):  # the CLI prints the bundle's path
            code = cli(["export", "onnx", "--model", str(model), "--out", str(bundle), *quant])
        if code != 0:
            raise SystemExit(f"export {name} failed")
        bundles[name] = bundle
    return bundles


def prompts(runtime: OnnxRuntime, args: argparse.Namespace) -> list[list]:
    """One image prompt per aspect ratio: a crop of --image at --resolution, and --question."""
    family = family_for(runtime.info.architecture, runtime.info.image)
    picture = Image.open(args.image).convert("RGB")
    found = []
    for index, (w, h) in enumerate(ASPECTS[: args.images]):
        scale = min(picture.width / w, picture.height / h)
        image = family.prepare_image(
            picture.crop((0, 0, int(w * scale), int(h * scale))), args.resolution, f"q{index}"
        )
        found.append([*family.image_prefix(image), *family.question_suffix(args.question)])
    return found


def measure(bundles: dict[str, Path], args: argparse.Namespace) -> dict[str, dict]:
    """Every figure of every bundle; the bundles take turns on each prompt and repeat, so a change in the
    machine's load (other jobs on the same cores) shifts them all alike."""
    runtimes = {name: OnnxRuntime(bundle, device="cpu") for name, bundle in bundles.items()}
    rows = {name: {"prefill_ms": [], "decode_ms": [], "logits": [], "tokens": []} for name in bundles}
    for prompt in prompts(runtimes["fp32"], args):
        for runtime in runtimes.values():
            runtime.prefill(prompt)  # warm-up: sessions, allocators
        timings = {name: ([], []) for name in bundles}  # prefill ms, decode ms per token
        outputs = {}  # name -> (logits, greedy tokens): the same on every repeat
        for _ in range(args.repeats):
            for name, runtime in runtimes.items():
                start = time.perf_counter()
                prefix = runtime.prefill(prompt)
                prefilled = time.perf_counter()
                (generation,) = runtime.generate(prefix, [], 1, Sampling(args.tokens))
                decode_ms = (time.perf_counter() - prefilled) * 1000
                prefill_ms = (prefilled - start) * 1000
                timings[name][0].append(prefill_ms)
                timings[name][1].append(decode_ms / max(generation.generated_tokens, 1))
                outputs[name] = (prefix.state[1], generation.token_ids)
        for name, row in rows.items():
            row["prefill_ms"].append(statistics.median(timings[name][0]))
            row["decode_ms"].append(statistics.median(timings[name][1]))
            row["logits"].append(outputs[name][0])
            row["tokens"].append(outputs[name][1])
    figures = {}
    for name, runtime in runtimes.items():
        files = runtime.manifest.variants["base"].values()
        figures[name] = {
            "graph_mb": sum((bundles[name] / relative).stat().st_size for relative in files) / 1e6,
            "prefill_ms": statistics.median(rows[name]["prefill_ms"]),
            "decode_ms_per_token": statistics.median(rows[name]["decode_ms"]),
            "logits": rows[name]["logits"],
            "tokens": rows[name]["tokens"],
        }
        runtime.close()
    return figures


def matching_prefix(a: list[int], b: list[int]) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


def compare(row: dict, fp32: dict) -> dict:
    diffs = [np.abs(a - b) for a, b in zip(row.pop("logits"), fp32["logits"])]
    greedy = [matching_prefix(a, b) for a, b in zip(row.pop("tokens"), fp32["tokens"])]
    return {
        **{key: round(value, 3) for key, value in row.items()},
        "size_ratio": round(row["graph_mb"] / fp32["graph_mb"], 3),
        "prefill_ratio": round(row["prefill_ms"] / fp32["prefill_ms"], 2),
        "decode_ratio": round(row["decode_ms_per_token"] / fp32["decode_ms_per_token"], 2),
        "drift_max": round(float(max(d.max() for d in diffs)), 4),
        "drift_mean": round(float(np.mean([d.mean() for d in diffs])), 4),
        "logit_span": round(float(np.mean([np.ptp(x) for x in fp32["logits"]])), 2),
        "greedy_tokens_matching": greedy,  # per prompt: leading greedy tokens equal to fp32's
        "greedy_tokens_fp32": [len(tokens) for tokens in fp32["tokens"]],  # fewer than --tokens at an end
    }


def markdown(rows: dict[str, dict], args: argparse.Namespace) -> str:
    lines = [
        f"{args.model.name if args.model else args.shape}, {args.resolution}px prompts, "
        f"{args.images} images, {args.tokens} greedy tokens, CPU:\n",
        "| bundle | graph files | prefill | decode | logit drift max / mean (span) | greedy tokens = fp32 |",
        "|---|---|---|---|---|---|",
    ]
    for name, row in rows.items():
        matches = ", ".join(
            f"{n} of {total}" for n, total in zip(row["greedy_tokens_matching"], row["greedy_tokens_fp32"])
        )
        lines.append(
            f"| {name} | {row['graph_mb']:.1f} MB ({row['size_ratio']:.2f}x) | {row['prefill_ms']:.0f} ms "
            f"({row['prefill_ratio']:.2f}x) | {row['decode_ms_per_token']:.1f} ms/token "
            f"({row['decode_ratio']:.2f}x) | {row['drift_max']:.3f} / {row['drift_mean']:.3f} "
            f"({row['logit_span']:.1f}) | {matches} |"
        )
    return "\n".join(lines) + "\n"


def main() -> int:
    args = parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    model = args.model or build_tiny_qwen3vl_cached(args.out / args.shape, sizes=sizes(args.shape))
    bundles = export_bundles(model, args.out)
    measured = measure(bundles, args)
    fp32 = {**measured["fp32"]}
    rows = {name: compare(row, fp32) for name, row in measured.items()}
    report = {"model": str(model), "resolution": args.resolution, "tokens": args.tokens, "bundles": rows}
    write_report(args.out, "quant", report, markdown(rows, args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
