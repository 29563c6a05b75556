"""Perception with N rollouts, with prefix reuse vs without, on one machine in one run.

    python benchmarks/prefix_reuse.py                       # the demo's tiny ONNX bundle (make demo)
    python benchmarks/prefix_reuse.py --bundle models/qwen3vl-4b-onnx --resolution 512 --rollouts 8

With reuse (the engine's default) the `[header][image]` prefix is prefilled once, the question suffix once,
and the KV is forked into the N rollouts decoded as one batch. Without it (spec `reuse_prefix: false`, the
naive baseline) every rollout prefills the whole prompt itself and decodes alone. The figures are the
perceive stage's own trace: prompt tokens run through the model and its wall time, as ratios baseline/reuse.
Not a test: the numbers depend on the machine; both modes run on the same runtime and warmed-up sessions.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # a plain script: run from a checkout without installing

from benchmarks.workload import run_benchmark, workload_parser  # noqa: E402
from engine.imaging import load_image  # noqa: E402
from engine.pipeline import Pipeline  # noqa: E402
from engine.spec import Spec, validate  # noqa: E402
from runtimes import open_runtime  # noqa: E402


def parse_args() -> argparse.Namespace:
    parser = workload_parser(__doc__, "models/tiny-qwen3vl-onnx")
    parser.add_argument("--runtime", default="onnx", help="runtime name (onnx, torch_ref, ...)")
    parser.add_argument("--variant", default="base", help="weights variant of the perceive stage")
    return parser.parse_args()


def spec(args: argparse.Namespace, reuse: bool) -> Spec:
    perceive = {
        "resolution": args.resolution,
        "rollouts": args.rollouts,
        "temperature": args.temperature,
        "max_new_tokens": args.max_new_tokens,
        "variant": args.variant,
    }
    return validate(
        {
            "model": {"bundle": args.bundle, "runtime": args.runtime, "device": args.device},
            "reuse_prefix": reuse,
            "stages": [{"perceive": perceive}, {"fuse": {}}, {"reason": {"max_new_tokens": 1}}],
        }
    )


def measure(runtime, args: argparse.Namespace, image, reuse: bool) -> dict:
    """Median perceive-stage figures over `repeats` queries, each on a fresh pipeline (empty prefix cache)."""
    runs = []
    for _ in range(args.repeats):
        trace = Pipeline(spec(args, reuse), runtime).run(image, args.question).stages[0]
        runs.append(trace)
    return {
        "prompt_tokens": runs[0].prompt_tokens,
        "reused_tokens": runs[0].reused_tokens,
        "generated_tokens": runs[0].generated_tokens,
        "ms": statistics.median(t.ms for t in runs),
    }


def main() -> int:
    args = parse_args()
    first = spec(args, True).model
    runtime = open_runtime(first.runtime, first.bundle, first.device)
    image = load_image(args.image)
    Pipeline(spec(args, True), runtime).run(image, args.question)  # warm-up: sessions, allocators, caches
    reuse, naive = measure(runtime, args, image, True), measure(runtime, args, image, False)
    report = {
        "runtime": args.runtime,
        "bundle": args.bundle,
        "rollouts": args.rollouts,
        "resolution": args.resolution,
        "reuse": reuse,
        "no_reuse": naive,
        "prompt_tokens_ratio": naive["prompt_tokens"] / max(reuse["prompt_tokens"], 1),
        "time_ratio": naive["ms"] / reuse["ms"],
    }
    if args.json:
        print(json.dumps(report))
        return 0
    print(f"perceive, N={args.rollouts} rollouts at {args.resolution}px, {args.runtime} on {args.device}")
    print(f"{'mode':<12}{'prompt tok':>12}{'reused tok':>12}{'generated':>11}{'ms (median)':>13}")
    for name, row in (("reuse", reuse), ("no reuse", naive)):
        print(
            f"{name:<12}{row['prompt_tokens']:>12}{row['reused_tokens']:>12}"
            f"{row['generated_tokens']:>11}{row['ms']:>13.1f}"
        )
    print(f"prompt tokens computed: {report['prompt_tokens_ratio']:.2f}x more without reuse")
    print(f"wall time:              {report['time_ratio']:.2f}x longer without reuse")
    return 0


if __name__ == "__main__":
    run_benchmark(main)
