"""Qwen3-VL in the reference runtime: its M-RoPE positions are transformers' rope index."""

import numpy as np
import pytest
import torch

from engine.families import family_for
from runtimes.torch_ref import TorchRefRuntime
from tests.support import picture


@pytest.fixture(scope="module")
def runtime(tiny_qwen3vl):
    return TorchRefRuntime(tiny_qwen3vl, device="cpu")


@pytest.mark.parametrize("size", [(64, 64), (96, 160), (200, 72)])
def test_positions_match_transformers_rope_index(runtime, size):
    family = family_for(runtime.info.architecture, runtime.info.image)
    image = family.prepare_image(picture(*size), None, "k")
    crop = family.prepare_image(picture(50, 90, seed=1), None, "c")
    prompt = runtime._tokenize(
        family.image_prefix(image) + family.question_suffix("where is the cat?", [crop]), 0
    )
    ids = torch.tensor([prompt.token_ids])
    grids = torch.tensor([i.grid_thw for i in prompt.images])
    types = (ids == runtime.image_token_id).int()
    positions, delta = runtime.model("base").model.get_rope_index(ids, types, image_grid_thw=grids)
    assert np.array_equal(prompt.positions, positions[:, 0].numpy())
    assert prompt.next_position == len(prompt.token_ids) + int(delta)
