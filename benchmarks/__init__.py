"""Benchmarks: `sparc-engine bench` (bench.py; the pipelines it compares in pipelines.py), the shapes it
builds (shapes.py) and the scripts beside it (quant.py, decode_floor.py, footprint.py).

The CLI imports this module at start for the bench's arguments only, so it stays torch-free; what a
benchmark runs (torch, transformers, onnxruntime, llama-cpp-python) is imported when it runs.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from benchmarks.shapes import SHAPES
from engine.commands import Command
from export import GGUF_QUANTS, ONNX_QUANTS

ROOT = Path(__file__).resolve().parents[1]
# the pipelines, the baseline first: every figure is also given as a ratio to it
PIPELINES = ("naive", "torch_ref", "onnx", "llamacpp", "chat_handler")


def _bench_arguments(parser: argparse.ArgumentParser) -> None:
    shapes = ", ".join(f"{name} ({shape.about})" for name, shape in SHAPES.items())
    parser.add_argument(
        "--shape", choices=SHAPES, default="tiny", help=f"random checkpoint to build: {shapes}"
    )
    parser.add_argument("--model", type=Path, help="a Qwen3-VL checkpoint instead of building --shape")
    parser.add_argument("--onnx", type=Path, help="its ONNX bundle (default: exported into --out)")
    parser.add_argument("--gguf", type=Path, help="its GGUF bundle (default: exported into --out)")
    parser.add_argument(
        "--onnx-quant",
        metavar="LIST",
        help="ONNX bundles to export and run, each a row of its own: of "
        f"{','.join(('fp32', 'fp16', *ONNX_QUANTS))} (default: fp32 on a CPU, fp16 on a GPU; ignored with --onnx)",
    )
    parser.add_argument(
        "--gguf-quant",
        metavar="LIST",
        help=f"GGUF bundles for llamacpp and chat_handler, each a row of its own: of {','.join(GGUF_QUANTS)} "
        "(default: f32 on a CPU, f16 on a GPU; ignored with --gguf)",
    )
    parser.add_argument(
        "--device", choices=("cpu", "cuda"), help="default: cuda for the GPU shapes (fp16 bundles), else cpu"
    )
    parser.add_argument("--out", type=Path, default=ROOT / "out/bench", help="models, bundles, reports")
    parser.add_argument("--pipelines", default=",".join(PIPELINES), help="comma-separated, of the default")
    parser.add_argument("--image", type=Path, default=ROOT / "examples/street.png", help="image file")
    parser.add_argument("--question", default="What colour is the car parked next to the tree?")
    parser.add_argument(
        "--resolutions", default="256,full", help="perception views: longest sides in pixels, 'full' = native"
    )
    parser.add_argument("--rollouts", default="1,8", help="comma-separated N")
    parser.add_argument("--max-new-tokens", type=int, default=32, help="tokens per rollout, exactly")
    parser.add_argument("--temperature", type=float, default=0.7)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--repeats", type=int, default=3, help="timed queries per figure (median reported)")
    parser.add_argument("--threads", type=int, help="CPU threads of every pipeline (default: all cores)")
    parser.add_argument(
        "--bandwidth",
        type=float,
        metavar="GB/s",
        help="GPU memory bandwidth (default: a table of known GPUs)",
    )
    parser.add_argument("--timeout", type=float, default=3600, help="seconds one pipeline may take")
    parser.add_argument(
        "--footprint",
        metavar="EXTRAS",
        help="also install each extra (e.g. core,onnx,llama) into a fresh environment and report its size "
        "and CLI start (benchmarks/footprint.py)",
    )


BENCH = Command(
    "time the engine against the pipelines a user would write, same queries, fixed lengths, ratios",
    _bench_arguments,
    "benchmarks.bench:bench_command",
)
