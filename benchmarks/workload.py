"""What the benchmarks share: one report writer."""

from __future__ import annotations

import json
from pathlib import Path


def write_report(out: Path, stem: str, report: dict, table: str) -> None:
    """OUT/<stem>.json and OUT/<stem>.md, and the markdown table on stdout."""
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{stem}.json").write_text(json.dumps(report, indent=1) + "\n")
    (out / f"{stem}.md").write_text(table)
    print(table, end="")
