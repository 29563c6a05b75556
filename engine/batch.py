"""Batch runs over a JSONL dataset: results appended as they finish, a rerun resumes.

Each input row is {"id", "image", "question", ...}; extra fields are copied to the output row. An output
line is written and flushed per finished row, so a killed run loses nothing already written; a rerun
skips the ids already in the output (and drops a half-written last line left by the kill).
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

from engine.errors import UserError
from engine.results import Result


@dataclass(frozen=True)
class Row:
    id: str
    image: Path
    question: str
    extra: dict


def read_rows(path: Path) -> list[Row]:
    if not path.is_file():
        raise UserError(f"{path}: no such dataset file")
    rows, seen = [], set()
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as error:
            raise UserError(f"{path}:{number}: not a JSON object ({error.msg})") from None
        missing = [k for k in ("id", "image", "question") if not isinstance(record, dict) or k not in record]
        if missing:
            raise UserError(f"{path}:{number}: row lacks {', '.join(missing)}")
        row_id = str(record.pop("id"))
        if row_id in seen:
            raise UserError(f"{path}:{number}: duplicate id {row_id!r}")
        seen.add(row_id)
        image = Path(str(record.pop("image")))
        rows.append(
            Row(
                row_id,
                image if image.is_absolute() else path.parent / image,
                str(record.pop("question")),
                record,
            )
        )
    return rows


def finished_ids(out: Path) -> set[str]:
    """Ids already written; truncates a partial last line a killed run may have left."""
    if not out.is_file():
        return set()
    data = out.read_bytes()
    complete = data[: data.rfind(b"\n") + 1]
    if len(complete) != len(data):
        with out.open("r+b") as handle:
            handle.truncate(len(complete))
    ids = set()
    for line in complete.decode("utf-8", errors="replace").splitlines():
        try:
            ids.add(str(json.loads(line)["id"]))
        except (json.JSONDecodeError, KeyError, TypeError):
            continue
    return ids


def run_dataset(
    dataset: Path,
    out: Path,
    answer: Callable[[Row], Result],
    *,
    limit: int | None = None,
    desc: str = "sparc-engine",
) -> tuple[int, int, int]:
    """Returns (done now, skipped as already done, failed) over the first `limit` rows (all by default).
    A failed row is reported and retried next run; `desc` labels the progress bar."""
    rows = read_rows(dataset)[:limit]
    done_before = finished_ids(out)
    todo = [row for row in rows if row.id not in done_before]
    out.parent.mkdir(parents=True, exist_ok=True)
    done = failed = 0
    with out.open("a", encoding="utf-8") as handle:
        for row in tqdm(todo, desc=desc, unit="row", file=sys.stderr, disable=not todo):
            try:
                result = answer(row)
            except UserError as error:
                failed += 1
                tqdm.write(f"row {row.id}: {error}", file=sys.stderr)
                continue
            record = {"id": row.id, "question": row.question, **row.extra, **result.to_dict()}
            handle.write(json.dumps(record) + "\n")
            handle.flush()
            os.fsync(handle.fileno())
            done += 1
    return done, len(rows) - len(todo), failed
