"""The optimization loop both trainers share: AdamW, warmup then cosine decay, clipped gradients."""

from __future__ import annotations

import math
import sys
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, TypeVar

import torch
from tqdm import tqdm

Batch = dict[str, Any]  # HF forward kwargs with labels
Data = TypeVar("Data")


@dataclass(frozen=True)
class Schedule:
    steps: int
    lr: float
    warmup: int = 50  # steps of linear warmup: from-scratch training diverges without it
    min_lr_ratio: float = 0.05  # cosine decays to this fraction of lr
    weight_decay: float = 0.01
    clip: float = 1.0  # max gradient norm

    def lr_at(self, step: int) -> float:
        if step < self.warmup:
            return self.lr * (step + 1) / self.warmup
        progress = (step - self.warmup) / max(1, self.steps - self.warmup)
        return self.lr * (
            self.min_lr_ratio + (1 - self.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
        )


@dataclass
class Curve:
    losses: list[float] = field(default_factory=list)  # mean target-token loss per step

    def smoothed(self, window: int = 50) -> list[float]:
        return [
            sum(self.losses[max(0, i - window + 1) : i + 1]) / (i + 1 - max(0, i - window + 1))
            for i in range(len(self.losses))
        ]


@contextmanager
def prefetched(produce: Callable[[int], Data], steps: int) -> Iterator[Callable[[int], Data]]:
    """`produce(step)` for steps 0, 1, ... in order, step + 1 already running in a thread while step trains
    (rendering scenes costs a good part of a step; torch releases the GIL while it computes)."""
    with ThreadPoolExecutor(1) as pool:
        upcoming = {0: pool.submit(produce, 0)}

        def take(step: int) -> Data:
            data = upcoming.pop(step).result()
            if step + 1 < steps:
                upcoming[step + 1] = pool.submit(produce, step + 1)
            return data

        yield take


def on_device(batch: Batch, device: str) -> Batch:
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def fit(
    model: torch.nn.Module,
    batches: Callable[[int], Iterable[Batch]],
    schedule: Schedule,
    *,
    parameters: Iterable[torch.nn.Parameter] | None = None,
    loss_of: Callable[[torch.nn.Module, Batch], torch.Tensor] = lambda model, batch: model(**batch).loss,
    description: str = "train",
) -> Curve:
    """Run `schedule.steps` steps; `batches(step)` gives the micro-batches of that step (gradients add up,
    each weighted by its share of target tokens, so a step's loss is the mean over all its target tokens).
    `loss_of` is a micro-batch's loss (train/guide.py adds to the model's own)."""
    params = [p for p in (parameters if parameters is not None else model.parameters()) if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=schedule.lr, weight_decay=schedule.weight_decay)
    curve = Curve()
    model.train()
    bar = tqdm(range(schedule.steps), desc=description, unit="step", file=sys.stderr)
    for step in bar:
        for group in optimizer.param_groups:
            group["lr"] = schedule.lr_at(step)
        micro = list(batches(step))
        weights = [int((b["labels"][:, 1:] != -100).sum()) for b in micro]  # HF shifts labels by one
        total = sum(weights)
        loss_value = 0.0
        for batch, weight in zip(micro, weights):
            loss = loss_of(model, batch) * (weight / total)
            loss.backward()
            loss_value += loss.item()  # float(loss) warns on a tensor that requires grad
        torch.nn.utils.clip_grad_norm_(params, schedule.clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        curve.losses.append(loss_value)
        if step % 10 == 0:
            bar.set_postfix(loss=f"{curve.smoothed(20)[-1]:.3f}")
    model.eval()
    return curve
