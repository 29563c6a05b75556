"""What the reference runtime and the exporters read from a checkpoint directory's JSON files."""

from __future__ import annotations

import json
from pathlib import Path

from runtimes.protocol import ImageConfig


def read_json(path: Path) -> dict:
    return json.loads(path.read_text()) if path.is_file() else {}


def checkpoint_image_config(model_dir: Path) -> ImageConfig:
    pre = read_json(model_dir / "preprocessor_config.json")
    size = pre.get("size") or {}
    return ImageConfig(
        patch_size=pre.get("patch_size", 16),
        merge_size=pre.get("merge_size", 2),
        temporal_patch_size=pre.get("temporal_patch_size", 2),
        mean=tuple(pre.get("image_mean", (0.5, 0.5, 0.5))),
        std=tuple(pre.get("image_std", (0.5, 0.5, 0.5))),
        max_pixels=size.get("longest_edge", pre.get("max_pixels", 16_777_216)),
    )
