"""train/heldout.py: the probes score the token that depends on the image, against the right chance."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from transformers import AutoModelForImageTextToText

from evals.synth import render, sample_scene
from train.demo import HELDOUT_SLOTS, STEP_SLOTS, DemoData, Slot
from train.examples import collate
from train.heldout import first_token_entropy, informative_position, make_probe, probe_losses


def _scene_sequence(demo_data: DemoData, slot: Slot, kind: str, seed: int):
    rng = np.random.default_rng(seed)
    scene = sample_scene(rng, 1024, 768, 4, kind=kind)
    return scene, demo_data.sequence(slot, scene, render(scene), rng)


@pytest.mark.parametrize("seed", range(6))
def test_a_perceive_sequence_is_scored_on_its_first_coordinates_first_digit(demo_data: DemoData, seed: int):
    scene, sequence = _scene_sequence(demo_data, Slot("perceive", 256), "shape", seed)
    tokenizer = demo_data.torch_family.tokenizer
    position = informative_position(sequence, tokenizer, grounding=True)
    x1 = round(1000 * scene.objects[0].box[0] / scene.width)
    assert tokenizer.decode([sequence.prompt.token_ids[position]]) == str(x1)[0]
    assert position >= len(sequence.prompt.token_ids) - sequence.n_target  # inside the target


def test_an_answer_sequence_is_scored_on_its_first_answer_token(demo_data: DemoData):
    scene, sequence = _scene_sequence(demo_data, Slot("reason", 256), "color", 1)
    tokenizer = demo_data.torch_family.tokenizer
    position = informative_position(sequence, tokenizer, grounding=False)
    assert tokenizer.decode(sequence.prompt.token_ids[position:]).startswith(
        tokenizer.decode([sequence.prompt.token_ids[position]])
    )
    assert tokenizer.decode(sequence.prompt.token_ids[position:-1]) == scene.answer


def test_chance_is_uniform_over_what_the_token_can_take(demo_data: DemoData):
    tokenizer = demo_data.torch_family.tokenizer
    _, perceive = _scene_sequence(demo_data, Slot("perceive", 256), "shape", 2)
    assert make_probe("p", [perceive], tokenizer, grounding=True).chance == pytest.approx(math.log(10))
    # one-character answers are one token each
    assert first_token_entropy(tokenizer, ["x", "y"]) == pytest.approx(math.log(2))
    # answers sharing a first token ("circle" and "cross" both start with "c") lower chance
    assert first_token_entropy(tokenizer, ["x", "x"]) == 0.0
    assert first_token_entropy(tokenizer, ["x", "x", "y", "z"]) == pytest.approx(1.5 * math.log(2))
    sequences = [_scene_sequence(demo_data, Slot("view", 256), kind, 3)[1] for kind in ("shape", "color")]
    probe = make_probe("v", sequences, tokenizer, grounding=False, answers=[["x", "y"], ["x", "x", "y", "z"]])
    assert probe.chance == pytest.approx((math.log(2) + 1.5 * math.log(2)) / 2)


def test_probe_losses_are_the_cross_entropy_of_the_scored_tokens(demo_data: DemoData, tiny_qwen3vl):
    model = AutoModelForImageTextToText.from_pretrained(tiny_qwen3vl, dtype=torch.float32).train()
    probes = demo_data.probes(per_task=2)
    assert [p.name for p in probes] == [slot.name for slot in HELDOUT_SLOTS]
    assert [p.positions for p in probes] == [p.positions for p in demo_data.probes(per_task=2)]  # fixed
    # micro-batches of one sequence and of all together give the same losses (padding is not scored)
    losses = probe_losses(model, probes, lambda group: collate(demo_data.torch_family, group), 1)
    together = probe_losses(model, probes, lambda group: collate(demo_data.torch_family, group), 10**6)
    assert losses == pytest.approx(together, abs=1e-3)
    assert model.training  # left as found
    first = probes[0]
    with torch.no_grad():
        batch = collate(demo_data.torch_family, [first.sequences[0]])
        logits = model.eval()(**{k: v for k, v in batch.items() if k != "labels"}).logits[0]
    position = first.positions[0]
    expected = torch.nn.functional.cross_entropy(
        logits[position - 1][None], torch.tensor([first.sequences[0].prompt.token_ids[position]])
    )
    one = probe_losses(model, [type(first)(first.name, first.sequences[:1], first.positions[:1], 0.0)],
                       lambda group: collate(demo_data.torch_family, group), 10**6)  # fmt: skip
    assert one[first.name] == pytest.approx(float(expected), abs=1e-4)


def _views(sequences) -> set[bytes]:
    return {s.prompt.images[0].pixel_values.tobytes() for s in sequences}


def test_probes_never_repeat_a_training_step(demo_data: DemoData):
    held = _views(s for probe in demo_data.probes(per_task=4) for s in probe.sequences)
    trained = _views(s for step in range(3) for s in demo_data.step(step))
    assert len(trained) > len(STEP_SLOTS)  # the views differ from scene to scene
    assert not held & trained
