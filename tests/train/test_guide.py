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
from train.guide import LOOK_AT, AttentionGuide, guided_batch

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
    for slot, count in ((perceive, 5), (perceive, 2), (reason, 4)):  # two lengths: the batch pads
        scene = sample_scene(rng, 1024, 768, count, kind="shape")
        sequences.append(demo_data.sequence(slot, scene, render(scene), rng))
    return model, AttentionGuide(model, LAYER, HEADS), guided_batch(demo_data.torch_family, sequences)


def test_the_mass_is_the_layers_attention_on_the_look_at_tokens(guided) -> None:
    model, guide, batch = guided
    look_at = batch[LOOK_AT]
    assert [bool(tokens) for tokens in look_at] == [True, True, False]  # reason sequences are not guided
    inputs = {k: v for k, v in batch.items() if k != LOOK_AT}
    with torch.no_grad():
        attentions = model(**inputs, output_attentions=True).attentions[LAYER]
        masses = guide.masses(batch["labels"], look_at, [0, 1])
    for row, mass in zip((0, 1), masses):
        positions = (batch["labels"][row, 1:] != IGNORE).nonzero().squeeze(1)
        expected = attentions[row, :HEADS][:, positions][:, :, list(look_at[row])].sum(-1)
        assert mass.shape == (HEADS, len(positions))
        torch.testing.assert_close(mass, expected, atol=1e-5, rtol=1e-4)
        assert float(mass.min()) > 0 and float(mass.max()) < 1


def test_the_loss_adds_the_weighted_guide_and_trains_the_guided_layer(guided) -> None:
    model, guide, batch = guided
    model.zero_grad()
    loss = guide.loss(model, batch)
    masses = guide.masses(batch["labels"], batch[LOOK_AT], [0, 1])
    with torch.no_grad():
        plain = model(**{k: v for k, v in batch.items() if k != LOOK_AT}).loss
    expected = plain + guide.weight * torch.cat([-torch.log(m).flatten() for m in masses]).mean()
    torch.testing.assert_close(loss.detach(), expected.detach(), atol=1e-4, rtol=1e-4)
    loss.backward()
    assert model.model.language_model.layers[LAYER].self_attn.q_proj.weight.grad.abs().sum() > 0
    unguided = {**batch, LOOK_AT: [(), (), ()]}
    with torch.no_grad():
        torch.testing.assert_close(guide.loss(model, unguided), plain)
