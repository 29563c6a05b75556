"""Batch runs over a JSONL dataset: results appended as they finish, a rerun resumes.

Each input row is {"id", "image", "question", ...}; extra fields are copied to the output row. An output
line is written and fsynced per finished row, so a killed run loses nothing already written; a rerun
skips the ids already in the output (and drops a half-written last line left by the kill). A row the
engine refuses (missing image, prompt over the model's context, ...) is reported and counted as failed,
and the run goes on. Rows are answered by an `Answerer`: in this process, or on Ray (engine/batch_ray.py);
either way only this process writes the output.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from tqdm import tqdm

from engine.errors import UserError
from engine.spec import Spec

if TYPE_CHECKING:  # the pipeline (and its runtimes) load only when rows are answered
    from engine.pipeline import Pipeline


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


@dataclass(frozen=True)
class Outcome:
    """One row answered: its result (the `--json` object), or the one-line reason it failed."""

    row: Row
    result: dict | None = None
    error: str | None = None


# answers rows in any order, yielding one Outcome per row as each finishes; opens its model only if called
Answerer = Callable[[Sequence[Row]], Iterator[Outcome]]


def answer_locally(spec: Spec) -> Answerer:
    """Rows answered one after another by one pipeline in this process."""

    def answer(rows: Sequence[Row]) -> Iterator[Outcome]:
        from engine.pipeline import open_pipeline

        pipeline = open_pipeline(spec)
        try:
            for row in rows:
                yield answer_row(pipeline, row)
        finally:
            pipeline.runtime.close()

    return answer


def answer_row(pipeline: Pipeline, row: Row) -> Outcome:
    """A row that the engine refuses (missing image, prompt over the context, ...) fails alone."""
    from engine.imaging import load_image

    try:
        return Outcome(row, result=pipeline.run(load_image(row.image), row.question).to_dict())
    except UserError as error:
        return Outcome(row, error=str(error))


def answerer(spec: Spec, ray: str | None = None, workers: int = 2) -> Answerer:
    """Local, or on Ray when `ray` is given: a cluster's address, or "" for Ray's default (ray.init())."""
    if ray is None:
        return answer_locally(spec)
    try:
        from engine.batch_ray import answer_on_ray
    except ImportError as error:
        raise UserError(f"--ray needs {error.name}: pip install 'sparc-engine[ray]'") from error
    return answer_on_ray(spec, ray or None, workers)


@dataclass(frozen=True)
class Counts:
    done: int  # answered and written by this run
    skipped: int  # already in the output
    failed: int  # reported, and retried by the next run


def run_dataset(
    dataset: Path, out: Path, answer: Answerer, *, limit: int | None = None, desc: str = "sparc-engine"
) -> Counts:
    """Answer the first `limit` rows (all by default) that `out` lacks, appending each result as it comes;
    `desc` labels the progress bar."""
    rows = read_rows(dataset)[:limit]
    done_before = finished_ids(out)
    todo = [row for row in rows if row.id not in done_before]
    out.parent.mkdir(parents=True, exist_ok=True)
    done = failed = 0
    with out.open("a", encoding="utf-8") as handle:
        outcomes = answer(todo) if todo else iter(())
        for outcome in tqdm(
            outcomes, desc=desc, unit="row", total=len(todo), file=sys.stderr, disable=not todo
        ):
            if outcome.row.id in done_before:  # a retried row delivered twice is written once
                continue
            if outcome.error is not None:
                failed += 1
                tqdm.write(f"row {outcome.row.id}: {outcome.error}", file=sys.stderr)
                continue
            row = outcome.row
            record = {"id": row.id, "question": row.question, **row.extra, **outcome.result}
            handle.write(json.dumps(record) + "\n")
            handle.flush()
            os.fsync(handle.fileno())  # a kill (or a power cut) loses no row already counted as done
            done_before.add(row.id)
            done += 1
    return Counts(done, len(rows) - len(todo), failed)
