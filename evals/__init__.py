"""The measuring instruments: the synthetic shapes benchmark, benchmark loaders, scoring and the eval report.

`DATA_COMMANDS` and `EVAL_COMMANDS` are what the CLI reads (arguments here, torch-free; code loaded lazily).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from engine.commands import Command, add_overrides_argument, add_ray_arguments


def _synth_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", type=Path, required=True, help="directory for rows.jsonl and the images")
    parser.add_argument("--n", type=int, default=100, help="number of rows (one image each)")
    parser.add_argument("--seed", type=int, default=0, help="the same seed writes the same bytes")
    parser.add_argument(
        "--sizes",
        default="1024,2048,4096",
        help="image sizes to cycle through: N (square) or WxH, comma-separated, each side 32..4096",
    )
    parser.add_argument(
        "--objects", default="3-8", help="objects per image: N or MIN-MAX, 1..200 (the target included)"
    )
    parser.add_argument(
        "--object-size",
        default="0.01-0.03",
        help="object side as a fraction of the image's longest side: F or MIN-MAX",
    )
    parser.add_argument(
        "--questions",
        choices=("both", "shape", "color"),
        default="both",
        help="'What shape is the {color} object?', 'What color is the {shape}?', or alternating",
    )


def _eval_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("specs", type=Path, nargs="+", metavar="SPEC", help="pipeline specs to compare")
    parser.add_argument(
        "--dataset", type=Path, required=True, metavar="IN.jsonl", help="rows with ground-truth answers"
    )
    parser.add_argument("--out", type=Path, required=True, help="report directory; a rerun resumes")
    add_overrides_argument(parser, "override a value in every spec, e.g. --set model.runtime=torch_ref")
    parser.add_argument(
        "--by",
        default="category,long_side",
        help="row fields to break accuracy down by (fields a dataset lacks are skipped)",
    )
    parser.add_argument("--limit", type=int, help="score only the first N rows")
    add_ray_arguments(parser)


def _load_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("format", choices=("vstar", "hrbench"), help="the benchmark's published layout")
    parser.add_argument(
        "--src", type=Path, required=True, help="local copy (folder, or the TSV/parquet file)"
    )
    parser.add_argument("--out", type=Path, required=True, help="directory for rows.jsonl (and images)")


DATA_COMMANDS: dict[str, Command] = {
    "synth": Command(
        "write the synthetic high-resolution shapes benchmark: images + rows.jsonl",
        _synth_arguments,
        "evals.synth:synth_command",
        extra="eval",
    ),
    "convert": Command(
        "convert a local copy of V*Bench or HR-Bench to rows.jsonl (multiple choice)",
        _load_arguments,
        "evals.loaders:convert_command",
        extra="eval",
    ),
}

EVAL_COMMANDS: dict[str, Command] = {
    "eval": Command(
        "score specs on a dataset: accuracy, region recall/IoU, targets in a crop, visual tokens, crops, "
        "latency; report.json, report.md and pareto.png",
        _eval_arguments,
        "evals.runner:eval_command",
        extra="eval",
    ),
}
