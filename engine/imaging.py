"""Image loading and Qwen3-VL pixel preparation, torch-free (numpy + Pillow only).

Units, since several appear side by side:
  pixels  - image coordinates, what PIL and `fit_to_grid` work in;
  patches - patch_size x patch_size pixel squares, the vision encoder's sequence (grid_thw counts these);
  tokens  - merge_size x merge_size patches, one LLM token each (Qwen3-VL: one token per 32x32 pixels).

`prepare_qwen_image` reproduces transformers' Qwen2VLImageProcessor (PIL backend) bit for bit once both
resize to the same size; `qwen_vision_tables` reproduces the position tables Qwen3VLVisionModel builds
internally, so an exported vision graph can take them as inputs instead of computing them.
"""

from __future__ import annotations

import hashlib
import math
import os
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from engine.errors import UserError

# Pillow's own decompression-bomb error threshold (2 x Image.MAX_IMAGE_PIXELS); ~13400 x 13400 pixels.
DEFAULT_MAX_LOAD_PIXELS = 178_956_970

# 16-bit integer modes: Pillow's convert("RGB") clips these at 255 instead of scaling, so we scale ourselves.
# ("I" is 32-bit storage, but image files put 16-bit samples in it; anything above 65535 saturates.)
_SIXTEEN_BIT_MODES = {"I", "I;16", "I;16B", "I;16L", "I;16N"}


class ImageError(UserError, ValueError):
    """An image the engine cannot use; the message is one line, names the file, and is meant for users."""


def load_image(path: str | Path, *, max_pixels: int = DEFAULT_MAX_LOAD_PIXELS) -> Image.Image:
    """Read an image file as RGB with its EXIF orientation applied.

    The pixel count is checked from the header before anything is decoded, so a decompression bomb never
    allocates. Pillow refuses on its own above DEFAULT_MAX_LOAD_PIXELS (reported the same way), so a larger
    max_pixels only helps if Image.MAX_IMAGE_PIXELS is raised too.
    """
    path = Path(path)
    try:
        handle = path.open("rb")
    except FileNotFoundError as err:
        raise ImageError(f"{path}: no such file") from err
    except OSError as err:  # a directory, no permission, ...
        if os.path.isdir(path):  # os.path, not Path: it answers False instead of raising on EACCES
            raise ImageError(f"{path}: is a directory, not an image file") from err
        raise ImageError(f"{path}: cannot read ({err.strerror or err})") from err

    with handle, warnings.catch_warnings():
        # Pillow warns between 1x and 2x its limit; our own max_pixels check below is the one that decides.
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        try:
            image = Image.open(handle)  # lazy: reads the header only
        except Image.DecompressionBombError as err:
            raise ImageError(f"{path}: too many pixels ({_one_line(err)})") from err
        except UnidentifiedImageError as err:
            raise ImageError(f"{path}: not an image file Pillow can read") from err
        except OSError as err:
            raise ImageError(f"{path}: cannot read ({_one_line(err)})") from err

        width, height = image.size
        if width * height > max_pixels:
            raise ImageError(f"{path}: {width}x{height} = {width * height:,} pixels exceeds {max_pixels:,}")
        try:
            # Decode everything now: a truncated or corrupt file must fail here, not later mid-pipeline.
            # Pillow's decoders raise many types on bad data (OSError, SyntaxError, ValueError, EOFError...).
            image.load()
            image = ImageOps.exif_transpose(image)
        except Exception as err:
            raise ImageError(f"{path}: corrupt or truncated image ({_one_line(err)})") from err
    return to_rgb(image)


def to_rgb(image: Image.Image) -> Image.Image:
    """Any Pillow mode to 8-bit RGB; transparency is composited onto white (what a viewer shows)."""
    if image.mode == "RGB":
        return image
    if image.mode in _SIXTEEN_BIT_MODES:
        levels = np.asarray(image).astype(np.float64) / 257.0  # 0..65535 -> 0..255
        gray = np.clip(np.rint(levels), 0, 255).astype(np.uint8)
        return Image.fromarray(gray).convert("RGB")
    if image.has_transparency_data:  # RGBA, LA, PA, palette or L with a transparent colour
        white = Image.new("RGBA", image.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, image.convert("RGBA")).convert("RGB")
    return image.convert("RGB")


def image_content_hash(image: Image.Image) -> str:
    """sha256 of mode, size and raw pixels: a KV-cache key that changes whenever the pixels do."""
    digest = hashlib.sha256(f"{image.mode}:{image.width}x{image.height}:".encode())
    digest.update(image.tobytes())
    return digest.hexdigest()


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


@dataclass(frozen=True, eq=False)
class QwenVisionTables:
    """Host-side position inputs of the Qwen3-VL vision encoder, for all images of a batch concatenated.

    Rows follow the encoder's patch order (the order of QwenPixels.pixel_values: merge blocks, raster
    inside each block, frames one after another). Each equals what transformers 5.x computes inside
    Qwen3VLVisionModel.forward, which also accepts them as precomputed kwargs (see as_hf_kwargs).
    """

    # (n_patches, 4) int64: rows of the flattened learned (side x side) position-embedding table to mix,
    # the bilinear (align_corners=True) taps in order (top-left, top-right, bottom-left, bottom-right).
    interp_indices: np.ndarray
    interp_weights: np.ndarray  # (n_patches, 4) float32: the matching bilinear weights, summing to 1
    rotary_pos_ids: np.ndarray  # (n_patches, 2) int64: (row, col) in patches, for the 2-D rotary embedding
    cu_seqlens: np.ndarray  # (n_frames + 1,) int32: patch offsets of each frame; attention stays inside one

    def as_hf_kwargs(self) -> dict[str, np.ndarray]:
        """Under the keyword names Qwen3VLVisionModel.forward takes them (convert to tensors first)."""
        return {
            "interp_indices": self.interp_indices,
            "interp_weights": self.interp_weights,
            "position_ids": self.rotary_pos_ids,
            "cu_seqlens": self.cu_seqlens,
        }


def qwen_vision_tables(
    grid_thw: tuple[int, int, int] | Sequence[tuple[int, int, int]],
    *,
    num_grid_per_side: int,
    merge_size: int,
) -> QwenVisionTables:
    """Position tables for one grid (t, h, w) in patches, or a sequence of them (images in batch order).

    num_grid_per_side = sqrt(vision_config.num_position_embeddings); merge_size = spatial_merge_size.
    """
    grids = np.asarray(grid_thw, dtype=np.int64).reshape(-1, 3)
    indices, weights, positions, frame_lengths = [], [], [], []
    for t, h, w in grids.tolist():
        if h % merge_size or w % merge_size:
            raise ValueError(f"grid {h}x{w} patches is not a multiple of merge_size={merge_size}")
        # (row, col) of every patch of one frame, in merge-block order, then repeated for each frame.
        rows, cols = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
        block_shape = (h // merge_size, merge_size, w // merge_size, merge_size)
        rows = np.tile(rows.reshape(block_shape).transpose(0, 2, 1, 3).ravel(), t)
        cols = np.tile(cols.reshape(block_shape).transpose(0, 2, 1, 3).ravel(), t)

        row_taps, row_weights = _bilinear_taps(h, num_grid_per_side)
        col_taps, col_weights = _bilinear_taps(w, num_grid_per_side)
        # 2-D bilinear = outer product of the per-axis taps: (row tap, col tap) pairs, row-major.
        flat = row_taps[rows][:, :, None] * num_grid_per_side + col_taps[cols][:, None, :]
        indices.append(flat.reshape(-1, 4))
        weights.append((row_weights[rows][:, :, None] * col_weights[cols][:, None, :]).reshape(-1, 4))
        positions.append(np.stack([rows, cols], axis=-1))
        frame_lengths += [h * w] * t

    return QwenVisionTables(
        interp_indices=np.concatenate(indices).astype(np.int64),
        interp_weights=np.concatenate(weights).astype(np.float32),
        rotary_pos_ids=np.concatenate(positions).astype(np.int64),
        cu_seqlens=np.concatenate([[0], np.cumsum(frame_lengths)]).astype(np.int32),
    )


def _bilinear_taps(size: int, side: int) -> tuple[np.ndarray, np.ndarray]:
    """Source taps (size, 2) and weights (size, 2) resampling a side-long axis to size positions.

    align_corners=True: the first and last positions land exactly on the first and last table entries.
    Computed in float32 with the same operation order as transformers, so weights match bit for bit.
    """
    index = np.arange(size, dtype=np.float32)
    source = index * np.float32(side - 1) / np.float32(max(size - 1, 1))  # fractional table position
    floor = np.floor(source)
    offsets = np.arange(2)  # the tap at floor and the one after it
    taps = np.clip(floor.astype(np.int64)[:, None] + offsets, 0, side - 1)
    distance = np.abs(source[:, None] - floor[:, None] - offsets.astype(np.float32))
    return taps, np.clip(np.float32(1) - distance, 0, None)


def _one_line(err: BaseException) -> str:
    return " ".join(str(err).split()) or type(err).__name__
