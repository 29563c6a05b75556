"""train/loop.py: the prefetch both trainers use hands out every step's data once, in order."""

from __future__ import annotations

from train.loop import prefetched


def test_prefetched_gives_each_step_once_and_runs_one_ahead() -> None:
    produced: list[int] = []

    def produce(step: int) -> str:
        produced.append(step)
        return f"data {step}"

    with prefetched(produce, 3) as take:
        assert take(0) == "data 0"
        assert take(1) == "data 1"
        assert take(2) == "data 2"
    assert produced == [0, 1, 2]  # nothing past the last step is produced
