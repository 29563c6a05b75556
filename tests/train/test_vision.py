"""train/vision.py: stage 0's dense token labels say what covers each token, and the tower learns them."""

from __future__ import annotations

import numpy as np
import torch
from transformers import AutoModelForImageTextToText

from evals.synth import COLORS, SHAPES, Scene, SynthObject, render
from train.demo import VISION_CROPS_PER_SCENE, VISION_SCENES, VISION_VIEW_EVERY, DemoData
from train.vision import IGNORE, NONE, DenseLabels, token_labels, view, vision_batch


def _scene() -> Scene:
    red_star = SynthObject("star", "red", (0, 0, 64, 64))  # the top-left token of a 256-px view, exactly
    blue_cross = SynthObject("cross", "blue", (160, 96, 224, 160))  # half of two tokens across, one down
    return Scene(
        256, 256, "shape", (red_star, blue_cross), "What shape is the red object?", "star", "red object"
    )


def test_labels_name_the_object_covering_each_token(demo_data: DemoData) -> None:
    scene = _scene()
    seen = view(demo_data.family, scene, render(scene), 256)
    labels = token_labels(seen, demo_data.family.image_config.merge_size).reshape(8, 8, 8)
    colours, shapes = list(COLORS), list(SHAPES)
    assert tuple(labels[0, 0, :2]) == (1 + colours.index("red"), 1 + shapes.index("star"))
    for row, column in ((1, 0), (0, 1), (1, 1)):
        assert tuple(labels[row, column, :2]) == (1 + colours.index("red"), 1 + shapes.index("star"))
    for row, column in ((3, 5), (3, 6), (4, 5), (4, 6)):
        assert tuple(labels[row, column, :2]) == (1 + colours.index("blue"), 1 + shapes.index("cross"))
    assert (labels[..., :2] != NONE).sum() == 8 * 2
    np.testing.assert_array_equal(labels[0, :, 2], [0, 1, 3, 4, 5, 6, 8, 9])  # tenths of each centre
    np.testing.assert_array_equal(labels[:, 0, 3], [0, 1, 3, 4, 5, 6, 8, 9])
    np.testing.assert_array_equal(labels[1, 1, 4:], [0, 0, 2, 2])  # the star's box, in tenths of the view
    np.testing.assert_array_equal(labels[4, 6, 4:], [6, 3, 8, 6])  # the cross's
    assert (labels[..., 4:] == IGNORE).all(axis=-1).sum() == 64 - 8


def test_a_vision_step_is_crops_with_views_every_few_steps_and_deterministic(demo_data: DemoData) -> None:
    with_views, again = demo_data.vision_step(VISION_VIEW_EVERY), demo_data.vision_step(VISION_VIEW_EVERY)
    assert len(with_views) == VISION_SCENES * (1 + VISION_CROPS_PER_SCENE)
    assert [s.image.key for s in with_views] == [s.image.key for s in again]
    crops = VISION_SCENES * VISION_CROPS_PER_SCENE
    assert sum(s.image.key.startswith("crop") for s in with_views) == crops
    crops_only = demo_data.vision_step(VISION_VIEW_EVERY + 1)
    assert len(crops_only) == crops and all(s.image.key.startswith("crop") for s in crops_only)
    heldout = [s.image.key for s in demo_data.vision_heldout()]
    assert len(heldout) == len(with_views) and heldout != [s.image.key for s in with_views]


def test_the_tower_learns_the_labels(demo_data: DemoData, tiny_qwen3vl) -> None:
    torch.manual_seed(0)
    model = AutoModelForImageTextToText.from_pretrained(tiny_qwen3vl, dtype=torch.float32)
    merge_size = demo_data.family.image_config.merge_size
    batch = vision_batch(demo_data.vision_step(0), merge_size)
    assert len(batch["labels"]) == sum(s.image.n_tokens for s in demo_data.vision_step(0))
    dense = DenseLabels(model.model.visual, model.config.text_config.hidden_size)
    optimizer = torch.optim.AdamW(dense.parameters(), lr=1e-2)
    before = dense.accuracy(batch)
    losses = []
    for _ in range(40):
        loss = dense(**batch).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    after = dense.accuracy(batch)
    assert losses[-1] < 0.9 * losses[0]
    assert set(after) == {"colour", "shape", "x", "y", "box"}
    # 40 steps move the box corners and colour first; position as a whole (x and y) must rise too
    assert after["x"] + after["y"] > before["x"] + before["y"] + 0.02
    assert after["box"] > before["box"] + 0.1
