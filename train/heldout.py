"""What the demo model has learned so far, measured on fixed held-out sequences while it trains.

The mean target loss hides it: a model that writes the JSON punctuation perfectly and guesses every
coordinate still scores low. So each held-out task is scored on the one token whose value depends on the
image: the first answer token of a reason or view sequence, the first digit of the first coordinate of a
perceive sequence. Its loss is compared with chance (uniform over the values that token can take), so a
curve that stays at chance says the model does not look at the pixels, however low the mean loss is.
"""

from __future__ import annotations

import math
import re
import sys
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from tokenizers import Tokenizer
from tqdm import tqdm

from train.examples import TrainingSequence, by_length

# a digit that starts a number: not the "2" of the key "bbox_2d" nor the "1" of Molmo2's "x1"
_NUMBER_START = re.compile(r"(?<!\w)\d")
DIGITS = 10


@dataclass(frozen=True)
class Probe:
    """One task's held-out sequences and, in each, the index of the token that carries the answer."""

    name: str
    sequences: tuple[TrainingSequence, ...]
    positions: tuple[int, ...]
    chance: float  # nats: the scored token's entropy when the answer is uniform, mean over the sequences


def informative_position(sequence: TrainingSequence, tokenizer: Tokenizer, *, grounding: bool) -> int:
    """Index in the sequence of the first answer token, or for a grounding target its first coordinate's
    first digit."""
    ids = sequence.prompt.token_ids
    start = len(ids) - sequence.n_target
    if not grounding:
        return start
    text = tokenizer.decode(ids[start:], skip_special_tokens=False)
    encoding = tokenizer.encode(text, add_special_tokens=False)
    match = _NUMBER_START.search(text)
    if match is None:
        raise ValueError("a grounding target without a coordinate")
    for index, (begin, _) in enumerate(encoding.offsets):
        if begin == match.start():
            return start + index
    raise ValueError("the first coordinate digit is not a token of its own")


def make_probe(
    name: str,
    sequences: Sequence[TrainingSequence],
    tokenizer: Tokenizer,
    *,
    grounding: bool,
    answers: Sequence[Sequence[str]] = (),
) -> Probe:
    """answers: per sequence, the answers its question allows (not needed for grounding: ten digits)."""
    positions = tuple(informative_position(s, tokenizer, grounding=grounding) for s in sequences)
    chances = (
        [math.log(DIGITS)] * len(sequences)
        if grounding
        else [first_token_entropy(tokenizer, a) for a in answers]
    )
    return Probe(name, tuple(sequences), positions, sum(chances) / len(chances))


def first_token_entropy(tokenizer: Tokenizer, answers: Sequence[str]) -> float:
    """Entropy (nats) of an answer's first token when the answer is uniform over `answers`: less than
    log(len(answers)) where answers share a first token ("circle" and "cross" both start with "c")."""
    counts = Counter(tokenizer.encode(answer, add_special_tokens=False).ids[0] for answer in answers)
    return -sum(c / len(answers) * math.log(c / len(answers)) for c in counts.values())


@torch.no_grad()
def probe_losses(
    model: torch.nn.Module,
    probes: Sequence[Probe],
    collate: Callable[[list[TrainingSequence]], dict],
    max_tokens: int,
) -> dict[str, float]:
    """Mean cross-entropy (nats) of each probe's scored tokens; leaves the model in the mode it found."""
    was_training = model.training
    model.eval()
    losses = {}
    for probe in probes:
        index_of = {id(s): p for s, p in zip(probe.sequences, probe.positions)}
        total = 0.0
        for group in by_length(probe.sequences, max_tokens):
            batch = collate(group)
            batch.pop("labels", None)
            logits = model(**batch).logits
            for row, sequence in enumerate(group):
                position = index_of[id(sequence)]
                target = torch.tensor([sequence.prompt.token_ids[position]], device=logits.device)
                total += float(torch.nn.functional.cross_entropy(logits[row, position - 1][None], target))
        losses[probe.name] = round(total / len(probe.sequences), 4)
    model.train(was_training)
    return losses


@dataclass
class Heldout:
    """The probes' losses at some steps, and chance for each probe."""

    chance: dict[str, float]
    steps: list[int] = field(default_factory=list)
    losses: list[dict[str, float]] = field(default_factory=list)

    def record(self, step: int, losses: dict[str, float]) -> None:
        self.steps.append(step)
        self.losses.append(losses)
        # above the progress bar, so a long run shows whether it is learning while it goes
        scores = ", ".join(f"{name} {loss:.2f} ({self.chance[name]:.2f})" for name, loss in losses.items())
        tqdm.write(f"held-out at step {step}, loss (chance): {scores}", file=sys.stderr)
