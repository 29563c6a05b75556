"""Image loading, torch-free (numpy + Pillow only): files to RGB, safely, and a content hash for the KV cache.

Each family's pixel preparation is in its package (engine/families/<family>/pixels.py).
"""

from __future__ import annotations

import hashlib
import io
import os
import warnings
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


def _one_line(err: BaseException) -> str:
    return " ".join(str(err).split()) or type(err).__name__
