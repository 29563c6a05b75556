"""Exporters: Hugging Face checkpoint (+ optional perception LoRA) -> self-describing bundle.

`EXPORTERS` is the one registry the CLI reads: each entry names a format, its help line, a function that
adds its arguments (kept here, torch-free, so `--help` works anywhere) and the module:function that runs
it (imported only when the format is asked for; exporters need the `export` extra: torch, transformers).
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Exporter:
    help: str
    add_arguments: Callable[[argparse.ArgumentParser], None]
    run: str  # "module:function", called with the parsed arguments; returns the output path


def _tiny_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", type=Path, required=True, help="output checkpoint directory")
    parser.add_argument("--seed", type=int, default=0, help="weights seed (same seed, same bytes)")


def _onnx_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", type=Path, required=True, help="Hugging Face checkpoint directory")
    parser.add_argument("--out", type=Path, required=True, help="bundle directory to write")
    parser.add_argument(
        "--perception-lora", type=Path, help="PEFT adapter directory, merged into a 'perception' variant"
    )
    parser.add_argument(
        "--dtype", choices=("fp32", "fp16"), default="fp32", help="dtype of the graphs (fp16: not yet)"
    )


EXPORTERS: dict[str, Exporter] = {
    "tiny": Exporter(
        "build a tiny random Qwen3-VL checkpoint of the real architecture (tests, demo; answers meaningless)",
        _tiny_arguments,
        "export.tiny:export_tiny",
    ),
    "onnx": Exporter(
        "export a checkpoint (+ perception LoRA) to an ONNX bundle: vision, embed and decoder graphs",
        _onnx_arguments,
        "export.onnx:export_onnx",
    ),
}
