"""Image loading and Qwen3-VL pixel preparation, torch-free (numpy + Pillow only).

Units, since several appear side by side:
  pixels  - image coordinates, what PIL and `fit_to_grid` work in;
  patches - patch_size x patch_size pixel squares, the vision encoder's sequence (grid_thw counts these);
  tokens  - merge_size x merge_size patches, one LLM token each (Qwen3-VL: one token per 32x32 pixels).

`prepare_qwen_image` reproduces transformers' Qwen2VLImageProcessor (PIL backend) bit for bit once both
resize to the same size. The vision encoder's position tables live in runtimes/qwen3vl_vision.py (the
runtimes need them and may not import engine/).
"""

from __future__ import annotations

import hashlib
import io
import math
import os
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

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


class ImageTooLargeError(ImageError):
    """More pixels than allowed (a decompression bomb, or over the caller's limit): refused before decoding."""


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
    with handle:
        return _decode(handle, str(path), max_pixels)


def decode_image(data: bytes, name: str, *, max_pixels: int = DEFAULT_MAX_LOAD_PIXELS) -> Image.Image:
    """An image file's bytes (an upload) as RGB, checked and decoded as load_image does; `name` starts
    every error message."""
    return _decode(io.BytesIO(data), name, max_pixels)


def _decode(handle: BinaryIO, name: str, max_pixels: int) -> Image.Image:
    with warnings.catch_warnings():
        # Pillow warns between 1x and 2x its limit; our own max_pixels check below is the one that decides.
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        try:
            image = Image.open(handle)  # lazy: reads the header only
        except Image.DecompressionBombError as err:
            raise ImageTooLargeError(f"{name}: too many pixels ({_one_line(err)})") from err
        except UnidentifiedImageError as err:
            raise ImageError(f"{name}: not an image file Pillow can read") from err
        except OSError as err:
            raise ImageError(f"{name}: cannot read ({_one_line(err)})") from err

        width, height = image.size
        if width * height > max_pixels:
            raise ImageTooLargeError(
                f"{name}: {width}x{height} = {width * height:,} pixels exceeds {max_pixels:,}"
            )
        try:
            # Decode everything now: a truncated or corrupt file must fail here, not later mid-pipeline.
            # Pillow's decoders raise many types on bad data (OSError, SyntaxError, ValueError, EOFError...).
            image.load()
            image = ImageOps.exif_transpose(image)
        except Exception as err:
            raise ImageError(f"{name}: corrupt or truncated image ({_one_line(err)})") from err
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


def _one_line(err: BaseException) -> str:
    return " ".join(str(err).split()) or type(err).__name__
