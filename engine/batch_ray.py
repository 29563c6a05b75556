"""Batch rows answered on Ray Data (the [ray] extra): an actor pool in which each actor opens the pipeline
once and answers one row per call.

Results stream back to the driver as they finish, and only the driver writes the output
(engine.batch.run_dataset), so the file is the same as a local run's: appended, fsynced, resumable. A
killed actor is restarted and its row retried; a row the engine
refuses comes back as a failed Outcome, as in a local run. Image and bundle paths must resolve on every
node (a shared filesystem, or the same copy at the same path).
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import ray
import ray.data  # here, so a Ray without its Data libraries fails as --ray needs [ray]

from engine.batch import Answerer, Outcome, Row, answer_row
from engine.pipeline import open_pipeline
from engine.spec import Spec


class RowActor:
    """One pipeline per actor, opened when Ray starts (or restarts) the actor."""

    def __init__(self, spec: Spec) -> None:
        self.pipeline = open_pipeline(spec)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, list[str]]:
        outcomes = [
            answer_row(self.pipeline, Row(str(row_id), Path(str(image)), str(question), {}))
            for row_id, image, question in zip(batch["id"], batch["image"], batch["question"])
        ]
        # one JSON column: a result and an error share no schema Arrow could infer per block
        return {
            "id": [outcome.row.id for outcome in outcomes],
            "outcome": [json.dumps({"result": o.result, "error": o.error}) for o in outcomes],
        }


def answer_on_ray(spec: Spec, address: str | None, workers: int) -> Answerer:
    """Rows answered by `workers` actors on the Ray cluster at `address` (None: ray.init()'s default,
    $RAY_ADDRESS or a cluster started on this machine, else a local Ray for this run). A Ray that this
    process already joined is used as it is."""

    def answer(rows: Sequence[Row]) -> Iterator[Outcome]:
        joined = not ray.is_initialized()
        if joined:
            ray.init(address=address)
        try:
            context = ray.data.DataContext.get_current()
            context.enable_progress_bars = False  # the driver's own bar counts rows as they are written
            context.print_on_execution_start = False
            by_id = {row.id: row for row in rows}
            items = [{"id": r.id, "image": str(r.image.resolve()), "question": r.question} for r in rows]
            # a block per row: idle actors take the next row, a retry repeats one row only
            results = ray.data.from_items(items, override_num_blocks=len(items)).map_batches(
                RowActor,
                fn_constructor_kwargs={"spec": spec},
                batch_size=1,
                # Ray Data gives a pool's actors max_restarts=-1 and max_task_retries=-1: a dead actor
                # comes back (opening its pipeline again) and the row it held is retried on it
                compute=ray.data.ActorPoolStrategy(size=workers),
            )
            for record in results.iter_rows():
                yield Outcome(by_id[record["id"]], **json.loads(record["outcome"]))
        finally:
            if joined:
                ray.shutdown()

    return answer
