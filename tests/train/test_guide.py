"""train/guide.py: the guided mass is the attention the model's own layer puts on the target's tokens."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import AutoModelForImageTextToText

from evals.synth import render, sample_scene
from train.demo import STEP_SLOTS, DemoData
from train.examples import IGNORE
from train.guide import GUIDE_KEYS, LOOK_AT, AttentionGuide, GuideWeights, guided_batch

LAYER, HEADS = 2, 3  # the tiny model's last layer; heads 0-1 share KV head 0, head 2 reads KV head 1


@pytest.fixture(scope="module")
def guided(demo_data: DemoData, tiny_qwen3vl: Path) -> tuple[torch.nn.Module, AttentionGuide, dict]:
    torch.manual_seed(0)
    model = AutoModelForImageTextToText.from_pretrained(
        tiny_qwen3vl, dtype=torch.float32, attn_implementation="eager"
    )
    rng = np.random.default_rng(3)
    perceive, reason = STEP_SLOTS[0]
    sequences = []
    for slot, count, kind in ((perceive, 5, "shape"), (perceive, 2, "color"), (reason, 4, "shape")):
        scene = sample_scene(rng, 1024, 768, count, kind=kind)  # two lengths: the batch pads
        sequences.append(demo_data.sequence(slot, scene, render(scene), rng))
    return model, AttentionGuide(model, LAYER, HEADS), guided_batch(demo_data.torch_family, sequences)


def test_the_mass_is_the_layers_attention_on_the_look_at_tokens(guided) -> None:
    model, guide, batch = guided
    look_at = batch[LOOK_AT]
    assert [bool(tokens) for tokens in look_at] == [True, True, False]  # reason sequences are not guided
    inputs = {k: v for k, v in batch.items() if k not in GUIDE_KEYS}
    with torch.no_grad():
        attentions = model(**inputs, output_attentions=True).attentions[LAYER]
        masses = guide.masses(batch["labels"], look_at, [0, 1])
    for row, mass in zip((0, 1), masses):
        positions = (batch["labels"][row, 1:] != IGNORE).nonzero().squeeze(1)
        expected = attentions[row, :HEADS][:, positions][:, :, list(look_at[row])].sum(-1)
        assert mass.shape == (HEADS, len(positions))
        torch.testing.assert_close(mass, expected, atol=1e-5, rtol=1e-4)
        assert float(mass.min()) > 0 and float(mass.max()) < 1


def _plain_loss(model: torch.nn.Module, batch: dict) -> torch.Tensor:
    with torch.no_grad():
        return model(**{k: v for k, v in batch.items() if k not in GUIDE_KEYS}).loss


def test_the_loss_adds_the_weighted_guide_and_trains_the_guided_layer(guided) -> None:
    model, guide, batch = guided
    model.zero_grad()
    weights = GuideWeights(everywhere=0.5)
    loss = guide.loss(model, batch, weights)
    masses = guide.masses(batch["labels"], batch[LOOK_AT], [0, 1])
    plain = _plain_loss(model, batch)
    expected = plain + weights.everywhere * torch.cat([-torch.log(m).flatten() for m in masses]).mean()
    torch.testing.assert_close(loss.detach(), expected.detach(), atol=1e-4, rtol=1e-4)
    loss.backward()
    assert model.model.language_model.layers[LAYER].self_attn.q_proj.weight.grad.abs().sum() > 0
    unguided = {**batch, LOOK_AT: [(), (), ()]}
    torch.testing.assert_close(guide.loss(model, unguided, weights).detach(), plain)


def test_the_find_term_weighs_the_positions_before_the_first_digit_alone(guided) -> None:
    model, guide, batch = guided
    find_through = batch["find_through"]
    assert find_through[0] > 0 and find_through[1:] == [0, 0]  # a shape question; a colour one; an answer
    weights = GuideWeights(everywhere=0.0, find=2.0)
    with torch.no_grad():
        loss = guide.loss(model, batch, weights)
        (mass,) = guide.masses(batch["labels"], batch[LOOK_AT], [0])
    expected = _plain_loss(model, batch) + 2.0 * -torch.log(mass[:, : find_through[0]]).mean()
    torch.testing.assert_close(loss, expected, atol=1e-4, rtol=1e-4)
    both = GuideWeights(everywhere=0.5, find=2.0)
    with torch.no_grad():
        everywhere = guide.loss(model, batch, GuideWeights(everywhere=0.5))
        torch.testing.assert_close(
            guide.loss(model, batch, both), everywhere + loss - _plain_loss(model, batch)
        )
