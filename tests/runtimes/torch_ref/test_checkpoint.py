"""Preprocessing constants come from the checkpoint's own files, and files that contradict each other are refused."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from runtimes.protocol import RuntimeInputError
from runtimes.registry import UnregisteredArchitecture
from runtimes.torch_ref.checkpoint import checkpoint_image_config

MOLMO2, QWEN3VL = "Molmo2ForConditionalGeneration", "Qwen3VLForConditionalGeneration"


def checkpoint(tmp_path: Path, architecture: str, vision: dict, preprocessor: dict | None = None) -> Path:
    (tmp_path / "config.json").write_text(
        json.dumps({"architectures": [architecture], "vision_config": vision})
    )
    if preprocessor is not None:
        (tmp_path / "preprocessor_config.json").write_text(json.dumps(preprocessor))
    return tmp_path


def test_molmo2_without_a_preprocessor_config_takes_the_vision_config(tmp_path: Path) -> None:
    image = checkpoint_image_config(checkpoint(tmp_path, MOLMO2, {"image_size": [84, 84], "patch_size": 14}))
    # 6 patches per crop side; the overlap keeps the released share (4 of 27 patches) and leaves a window
    assert (image.crop_size, image.patch_size, image.overlap_margins) == (84, 14, (1, 1))
    assert (image.merge_size, image.max_crops, image.temporal_patch_size) == (2, 8, 1)


def test_molmo2_reads_every_constant_from_the_preprocessor_config(tmp_path: Path) -> None:
    preprocessor = {
        "size": {"height": 224, "width": 224},
        "patch_size": 14,
        "overlap_margins": [2, 3],
        "pooling_size": [4, 4],
        "max_crops": 6,
        "image_mean": [0.1, 0.2, 0.3],
        "image_std": [0.4, 0.5, 0.6],
    }
    vision = {"image_size": 224, "patch_size": 14}
    image = checkpoint_image_config(checkpoint(tmp_path, MOLMO2, vision, preprocessor))
    assert (image.crop_size, image.overlap_margins, image.merge_size, image.max_crops) == (224, (2, 3), 4, 6)
    assert image.mean == (0.1, 0.2, 0.3) and image.std == (0.4, 0.5, 0.6)


def test_molmo2_defaults_are_the_released_checkpoints(tmp_path: Path) -> None:
    image = checkpoint_image_config(checkpoint(tmp_path, MOLMO2, {}))
    assert (image.crop_size, image.patch_size, image.overlap_margins, image.merge_size, image.max_crops) == (
        378,
        14,
        (4, 4),
        2,
        8,
    )


@pytest.mark.parametrize(
    ("vision", "preprocessor", "message"),
    [
        (
            {"image_size": [84, 84], "patch_size": 14},
            {"size": {"height": 378, "width": 378}},
            "preprocessor_config.json size=378 contradicts config.json vision_config.image_size=84",
        ),
        (
            {},  # transformers' vision default (378 px) sizes the position table
            {"size": {"height": 84, "width": 84}},
            "preprocessor_config.json size=84 contradicts config.json vision_config.image_size=378",
        ),
        (
            {"patch_size": 14},
            {"patch_size": 16},
            "preprocessor_config.json patch_size=16 contradicts config.json vision_config.patch_size=14",
        ),
        (
            {"image_size": 90, "patch_size": 14},
            None,
            "the crop size 90 px is not a multiple of the patch size 14 px",
        ),
        (
            {"image_size": 84, "patch_size": 14},
            {"overlap_margins": [4, 4]},
            "overlap_margins [4, 4] leave no window in a crop of 6 patches (size 84 px, patch_size 14 px)",
        ),
        (
            {"image_size": [84, 98]},
            None,
            "config.json vision_config.image_size [84, 98] is not one square side",
        ),
        ({}, {"pooling_size": [2, 3]}, "pooling_size [2, 3] is not square"),
    ],
)
def test_molmo2_contradictions_are_refused_naming_both_values(
    tmp_path: Path, vision: dict, preprocessor: dict | None, message: str
) -> None:
    with pytest.raises(RuntimeInputError, match=re.escape(message)):
        checkpoint_image_config(checkpoint(tmp_path, MOLMO2, vision, preprocessor))


def test_qwen3vl_takes_patch_and_merge_from_the_vision_config_or_the_processor(tmp_path: Path) -> None:
    vision = {"patch_size": 14, "spatial_merge_size": 4, "temporal_patch_size": 2}
    image = checkpoint_image_config(checkpoint(tmp_path, QWEN3VL, vision, {"size": {"longest_edge": 65536}}))
    assert (image.patch_size, image.merge_size, image.max_pixels) == (14, 4, 65536)


def test_qwen3vl_contradiction_is_refused(tmp_path: Path) -> None:
    path = checkpoint(tmp_path, QWEN3VL, {"patch_size": 16, "spatial_merge_size": 2}, {"merge_size": 4})
    with pytest.raises(
        RuntimeInputError, match="merge_size=4 contradicts config.json vision_config.spatial_merge_size=2"
    ):
        checkpoint_image_config(path)


def test_an_unregistered_architecture_names_what_is_registered(tmp_path: Path) -> None:
    with pytest.raises(
        UnregisteredArchitecture,
        match=r"'LlavaForConditionalGeneration' is not registered \(registered: Molmo2",
    ):
        checkpoint_image_config(checkpoint(tmp_path, "LlavaForConditionalGeneration", {}))
