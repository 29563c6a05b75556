"""What the benchmarks share: the perception workload's command-line arguments, one-line errors, reports."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import NoReturn

ROOT = Path(__file__).resolve().parents[1]


def workload_parser(doc: str, default_bundle: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bundle", default=str(ROOT / default_bundle), help="bundle directory")
    parser.add_argument("--device", default="cpu", choices=("auto", "cpu", "cuda"))
    parser.add_argument("--image", default=str(ROOT / "examples/street.png"), help="image file")
    parser.add_argument("--question", default="What colour is the car parked next to the tree?")
    parser.add_argument("--rollouts", type=int, default=8, help="N sampled localizations")
    parser.add_argument("--resolution", type=int, default=256, help="perception view, longest side in pixels")
    parser.add_argument("--max-new-tokens", type=int, default=32, help="tokens per rollout")
    parser.add_argument("--temperature", type=float, default=0.7)
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per mode (median reported)")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    return parser


def run_benchmark(main: Callable[[], int]) -> NoReturn:
    """Run a benchmark's main; a missing bundle or image is one line and exit 1, as in the CLI."""
    from engine.errors import UserError
    from runtimes.protocol import RuntimeInputError

    try:
        sys.exit(main())
    except (UserError, RuntimeInputError) as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(1)


def write_report(out: Path, stem: str, report: dict, table: str) -> None:
    """OUT/<stem>.json and OUT/<stem>.md, and the markdown table on stdout."""
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{stem}.json").write_text(json.dumps(report, indent=1) + "\n")
    (out / f"{stem}.md").write_text(table)
    print(table, end="")
