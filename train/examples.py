"""Training sequences rendered exactly as the engine renders its prompts, and batches of them.

A sequence is the stage's prompt (the family's `[header][image]` prefix and question suffix, the pixels
from the family's numpy preparation) followed by the target text and the end-of-turn token; the loss
covers the target only. Tokens and rope positions come from the reference runtime's family, the code the
engine itself runs, so training sees the tokens inference sees.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from engine.families import Family
from runtimes.mrope import TokenizedPrompt
from runtimes.protocol import ImageInput, Segment, Text
from runtimes.torch_ref.family import TorchFamily

IGNORE = -100  # label of tokens the loss skips (the prompt, the padding)
END_OF_TURN = "<|im_end|>"  # what the assistant's turn ends with: generation stops there


@dataclass(frozen=True)
class TrainingSequence:
    prompt: TokenizedPrompt  # the whole sequence: prompt + target + end of turn
    n_target: int  # trailing tokens the loss covers
    look_at: tuple[int, ...] = ()  # token indices the target covers, for train/guide.py (empty: unguided)
    # leading target tokens written before anything says where the target is: through the first coordinate's
    # first digit, the target must be found by what the question names it by (train/guide.py's find term)
    find_through: int = 0


def perceive_segments(family: Family, prompt: str, question: str, view: ImageInput) -> list[Segment]:
    """What the perceive stage sends: [header][view] + the localization instruction."""
    return [*family.image_prefix(view), *family.question_suffix(prompt.format(question=question))]


def reason_segments(
    family: Family, prompt: str, question: str, view: ImageInput, crops: Sequence[ImageInput] = ()
) -> list[Segment]:
    """What the reason stage sends: [header][view] + crops (if any) + the question."""
    return [*family.image_prefix(view), *family.question_suffix(prompt.format(question=question), crops)]


def encode(
    torch_family: TorchFamily, segments: Sequence[Segment], target: str, look_at: Sequence[bool] = ()
) -> TrainingSequence:
    """`look_at`: for each visual token of the first image, whether the guide should attend to it."""
    target_ids = torch_family.tokenizer.encode(target + END_OF_TURN, add_special_tokens=False).ids
    prompt = torch_family.tokenize([*segments, Text(target + END_OF_TURN)], 0)
    first_image = np.flatnonzero(prompt.image_mask)[: len(look_at)]
    return TrainingSequence(
        prompt, len(target_ids), tuple(int(i) for i in first_image[np.asarray(look_at, bool)])
    )


def collate(torch_family: TorchFamily, sequences: Sequence[TrainingSequence]) -> dict[str, Any]:
    """HF forward kwargs with `labels`: the target tokens, IGNORE elsewhere (prompt and padding)."""
    kwargs = torch_family.batch_inputs([s.prompt for s in sequences])
    labels = torch.full_like(kwargs["input_ids"], IGNORE)
    for row, sequence in enumerate(sequences):
        end = len(sequence.prompt.token_ids)
        labels[row, end - sequence.n_target : end] = kwargs["input_ids"][row, end - sequence.n_target : end]
    return {**kwargs, "labels": labels}


def by_length(sequences: Sequence[TrainingSequence], max_tokens: int) -> list[list[TrainingSequence]]:
    """Micro-batches of similar lengths, each padding to at most max_tokens (one long sequence, e.g. a
    full-resolution view, would otherwise pad every short one to its length)."""
    groups: list[list[TrainingSequence]] = []
    for sequence in sorted(sequences, key=lambda s: len(s.prompt.token_ids)):
        length = len(sequence.prompt.token_ids)  # the longest so far: the list is sorted
        if groups and length * (len(groups[-1]) + 1) <= max_tokens:
            groups[-1].append(sequence)
        else:
            groups.append([sequence])
    return groups
