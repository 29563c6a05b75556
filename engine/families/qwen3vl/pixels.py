"""Qwen3-VL pixel preparation, torch-free (numpy + Pillow only).

Units, since several appear side by side:
  pixels  - image coordinates, what PIL and `fit_to_grid` work in;
  patches - patch_size x patch_size pixel squares, the vision encoder's sequence (grid_thw counts these);
  tokens  - merge_size x merge_size patches, one LLM token each (Qwen3-VL: one token per 32x32 pixels).

`prepare_qwen_image` reproduces transformers' Qwen2VLImageProcessor (PIL backend) bit for bit once both
resize to the same size. The vision encoder's position tables live in runtimes/families/qwen3vl.py (the
runtimes need them and may not import engine/).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from PIL import Image

from engine.imaging import to_rgb


def fit_to_grid(
    width: int, height: int, resolution: int | None, *, factor: int = 32, max_pixels: int = 16_777_216
) -> tuple[int, int]:
    """The (width, height) in pixels the model sees for a width x height pixel image.

    resolution is the target longest side in pixels (None: native size). Images are only ever shrunk to
    it, never enlarged. Each side is then rounded to the nearest multiple of `factor` (Python's
    round-half-even, as transformers' smart_resize does), so a side can grow by at most factor/2 pixels,
    and a side shorter than factor/2 grows to one grid cell (factor pixels): the only real upscale.
    Unlike Qwen2VLImageProcessor there is no min_pixels, so small images are never upscaled to a minimum
    area. If the result has more than max_pixels pixels, both sides shrink by the same ratio and round
    down to multiples of factor (smart_resize's rule, so resolution=None matches it exactly).
    """
    if width < 1 or height < 1:
        raise ValueError(f"image size must be positive, got {width}x{height}")
    if resolution is not None and resolution < 1:
        raise ValueError(f"resolution must be positive or None, got {resolution}")
    if max_pixels < factor * factor:
        raise ValueError(f"max_pixels={max_pixels} is smaller than one {factor}x{factor} grid cell")

    longest = max(width, height)
    if resolution is None or longest <= resolution:
        target_w, target_h = float(width), float(height)
    else:
        target_w, target_h = width * resolution / longest, height * resolution / longest

    grid_w = max(factor, round(target_w / factor) * factor)
    grid_h = max(factor, round(target_h / factor) * factor)
    if grid_w * grid_h > max_pixels:
        shrink = math.sqrt(target_w * target_h / max_pixels)
        grid_w = max(factor, math.floor(target_w / shrink / factor) * factor)
        grid_h = max(factor, math.floor(target_h / shrink / factor) * factor)
    if grid_w * grid_h > max_pixels:
        # Only at extreme aspect ratios, where the short side is pinned at one cell: cap the long side.
        if grid_w < grid_h:
            grid_h = max(factor, max_pixels // grid_w // factor * factor)
        else:
            grid_w = max(factor, max_pixels // grid_h // factor * factor)
    return grid_w, grid_h


# eq=False on the dataclasses below: fields are numpy arrays, which have no single truth value for ==.
@dataclass(frozen=True, eq=False)
class QwenPixels:
    """One image ready for the Qwen3-VL vision encoder."""

    pixel_values: np.ndarray  # (n_patches, 3 * temporal * patch * patch) float32, normalized
    grid_thw: tuple[int, int, int]  # (t, h, w) in patches
    size: tuple[int, int]  # (width, height) in pixels after resize
    merge_size: int  # patches per token along each side

    @property
    def n_tokens(self) -> int:
        """LLM tokens (<|image_pad|> count) this image occupies."""
        t, h, w = self.grid_thw
        return t * h * w // self.merge_size**2


def prepare_qwen_image(
    image: Image.Image,
    resolution: int | None,
    *,
    patch_size: int = 16,
    merge_size: int = 2,
    temporal_patch_size: int = 2,
    mean: Sequence[float] = (0.5, 0.5, 0.5),
    std: Sequence[float] = (0.5, 0.5, 0.5),
    max_pixels: int = 16_777_216,
) -> QwenPixels:
    """Resize to fit_to_grid(...), scale to [0, 1], normalize and patchify as Qwen2VLImageProcessor does."""
    image = to_rgb(image)
    width, height = fit_to_grid(
        image.width, image.height, resolution, factor=patch_size * merge_size, max_pixels=max_pixels
    )
    # Pillow's bicubic (antialiased when shrinking) on uint8, as transformers' PIL path does.
    pixels = np.asarray(image.resize((width, height), Image.Resampling.BICUBIC))  # (H, W, 3) uint8
    # Same float steps as transformers: x * (1/255) in float64, cast to float32, then (x - mean) / std.
    scaled = (pixels.astype(np.float64) * (1 / 255)).astype(np.float32)
    normalized = (scaled - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)

    grid_h, grid_w = height // patch_size, width // patch_size  # in patches
    blocks = normalized.reshape(
        grid_h // merge_size, merge_size, patch_size, grid_w // merge_size, merge_size, patch_size, 3
    )  # (block_row, row_in_block, y, block_col, col_in_block, x, channel)
    # Patches are ordered block by block (each merge_size x merge_size block is one token, raster order
    # inside it); each patch is flattened channel-first as (channel, time, y, x).
    blocks = blocks.transpose(0, 3, 1, 4, 6, 2, 5)  # (block_row, block_col, row_in, col_in, channel, y, x)
    # A still image is one temporal patch: the frame repeated temporal_patch_size times.
    frames = np.broadcast_to(
        blocks[:, :, :, :, :, None], (*blocks.shape[:5], temporal_patch_size, *blocks.shape[5:])
    )
    pixel_values = frames.reshape(grid_h * grid_w, 3 * temporal_patch_size * patch_size * patch_size)
    return QwenPixels(
        pixel_values=np.ascontiguousarray(pixel_values),
        grid_thw=(1, grid_h, grid_w),
        size=(width, height),
        merge_size=merge_size,
    )
