"""The perception workload both benchmarks measure, as command-line arguments they share."""

from __future__ import annotations

import argparse
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
