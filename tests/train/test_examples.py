"""Training sequences: the tokens inference sees, labels on the target only, batching that changes no loss."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from transformers import AutoModelForImageTextToText

from engine.boxes import Box
from runtimes.torch_ref.runtime import TorchRefRuntime
from tests.support import picture
from train.examples import END_OF_TURN, IGNORE, collate, encode, perceive_segments
from train.lora import checkpoint_families

QUESTION = "where is the cup?"
CUP = Box(0.25, 0.25, 0.75, 0.5, "cup")


def perceive_sequence(families, size: tuple[int, int], box: Box, question: str = QUESTION):
    """A perceive-stage training sequence on a picture of `size` with `box` as its target; also returns the
    target text and the view."""
    family, torch_family = families
    view = family.prepare_image(picture(*size, seed=size[0]), 64, f"picture{size}")
    target = family.grounding_target([box])
    return (
        encode(torch_family, perceive_segments(family, family.perceive_prompt, question, view), target),
        target,
        view,
    )


def two_sequences(families):
    """Different image shapes and targets: different lengths, so a batch of them pads one."""
    a, _, _ = perceive_sequence(families, (64, 96), Box(0.1, 0.2, 0.5, 0.6, "cat"), "the cat?")
    b, _, _ = perceive_sequence(families, (96, 64), Box(0.0, 0.0, 1.0, 0.25, "a long label"), "the sky?")
    assert len(a.prompt.token_ids) != len(b.prompt.token_ids)
    return a, b


def test_a_batch_of_two_has_the_token_weighted_mean_loss(tiny_qwen3vl):
    families = checkpoint_families(tiny_qwen3vl)
    a, b = two_sequences(families)
    model = AutoModelForImageTextToText.from_pretrained(tiny_qwen3vl, dtype=torch.float32).eval()
    with torch.no_grad():
        alone = [float(model(**collate(families[1], [s])).loss) for s in (a, b)]
        together = float(model(**collate(families[1], [a, b])).loss)
    weighted = (alone[0] * a.n_target + alone[1] * b.n_target) / (a.n_target + b.n_target)
    assert together == pytest.approx(weighted, rel=1e-5)


@pytest.mark.parametrize("model", ["tiny_qwen3vl", "tiny_molmo2"])
def test_labels_cover_exactly_the_target_and_end_of_turn(model, request):
    families = checkpoint_families(request.getfixturevalue(model))
    sequence, target, _ = perceive_sequence(families, (64, 80), CUP)
    labels = collate(families[1], [sequence])["labels"][0]
    covered = np.flatnonzero((labels != IGNORE).numpy())
    n = len(sequence.prompt.token_ids)
    assert covered.tolist() == list(range(n - sequence.n_target, n))
    decoded = families[1].tokenizer.decode(labels[covered].tolist(), skip_special_tokens=False)
    assert decoded == target + END_OF_TURN


def test_padding_is_not_labelled(tiny_qwen3vl):
    families = checkpoint_families(tiny_qwen3vl)
    a, b = two_sequences(families)
    labels = collate(families[1], [a, b])["labels"]
    for row, sequence in enumerate((a, b)):
        labelled = labels[row] != IGNORE
        assert (
            int(labelled.sum()) == sequence.n_target and not labelled[len(sequence.prompt.token_ids) :].any()
        )


@pytest.mark.parametrize("model", ["tiny_qwen3vl", "tiny_molmo2"])
def test_the_prompt_is_what_the_runtime_tokenizes(model, request):
    model_dir = request.getfixturevalue(model)
    families = checkpoint_families(model_dir)
    family = families[0]
    sequence, _, view = perceive_sequence(families, (64, 80), CUP)
    runtime = TorchRefRuntime(model_dir, device="cpu")
    # what the perceive stage sends: the shared prefix, then the question suffix after it
    prefix_segments = family.image_prefix(view)
    prefix = runtime.prefill(prefix_segments)
    suffix_segments = family.question_suffix(family.perceive_prompt.format(question=QUESTION))
    suffix = runtime._tokenize(suffix_segments, prefix.next_position)
    n_prompt = len(sequence.prompt.token_ids) - sequence.n_target
    assert sequence.prompt.token_ids[:n_prompt] == prefix.token_ids + suffix.token_ids
    positions = np.concatenate([runtime._tokenize(prefix_segments, 0).positions, suffix.positions], axis=1)
    np.testing.assert_array_equal(sequence.prompt.positions[:, :n_prompt], positions)
