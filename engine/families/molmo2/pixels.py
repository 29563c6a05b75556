"""Molmo2 pixel preparation, torch-free (numpy + Pillow only).

Molmo2 never sees an image at its own aspect ratio. It sees two views, both cut into square crops
(`CropScheme`, read from the checkpoint: 378x378 px crops of 27x27 patches of 14 px in the released ones,
whose numbers this text uses):
  global view - the whole image squashed to one 378x378 crop;
  high-res    - the image stretched onto a canvas of (tiling_h x tiling_w) overlapping crops. Neighbouring
                crops overlap by 8 patches (4-patch margins on each side), so the canvas side is
                tiling * 266 px + 112 px (266 = (27 - 8) * 14 px, the stride between crops).
The tiling is the smallest one (at most `max_crops` crops) that holds the image without shrinking it,
or, if none does, the one that shrinks it least. The LLM gets one token per 2x2 patches ("pooling"):
each token's `image_token_pooling` row lists the 4 patch indices it averages (-1 = padding); patches in
the overlap margins of inner crop edges are dropped, so every canvas patch is pooled exactly once.

Units: pixels (image, canvas, crop), patches (14x14 px), tokens (2x2 patches after pooling).

`prepare_molmo2_image` equals transformers' Molmo2ImageProcessor (torchvision backend) on the same
image and max_crops: the resize is bilinear WITHOUT antialiasing in float32 (half-pixel centres), rounded
back to uint8, then normalized with mean and std scaled by 255, exactly the steps transformers takes.

Resolution rule (`molmo2_crop_budget`): the engine's `resolution` R (longest side in pixels) sets the crop
budget, not a resize: max_crops = n * n with n = floor((R - 112) / 266), at least 1 and at most the
checkpoint's max_crops. In words: the high-res canvas has at most the pixel area of an R x R square
made of whole crops (R=378 or 512 -> 1 crop, 644 -> 4, 910 or more -> the checkpoint's 8). An elongated
image spends the same budget along its long side. `full` uses the checkpoint's max_crops (what the HF
processor does by default). The image is never resized by the engine before that, so the model only ever
gets what the HF processor would make of the same image with that max_crops. A canvas is made of whole
crops, so an image smaller than one crop IS enlarged to 378 px: the vision tower only takes 378x378 crops.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from PIL import Image

from engine.imaging import to_rgb
from runtimes.protocol import ImageConfig


@dataclass(frozen=True)
class CropScheme:
    """How a checkpoint cuts images into crops; the defaults are the released checkpoints' (and
    transformers' Molmo2ImageProcessor's). runtimes/torch_ref/molmo2.py reads them from a checkpoint."""

    crop_size: int = 378  # pixels per crop side (the ViT's fixed input)
    patch_size: int = 14  # pixels per patch side
    overlap_margins: tuple[int, int] = (4, 4)  # patches of overlap on the (left/top, right/bottom) side
    pooling: int = 2  # patches per LLM token along each side
    max_crops: int = 8  # high-res crops at most

    @classmethod
    def of(cls, config: ImageConfig) -> CropScheme:
        return cls(
            config.crop_size, config.patch_size, config.overlap_margins, config.merge_size, config.max_crops
        )

    @property
    def crop_patches(self) -> int:
        """Patches per crop side."""
        return self.crop_size // self.patch_size

    @property
    def window_px(self) -> int:
        """The stride between neighbouring crops, in pixels (266 for the released scheme)."""
        return (self.crop_patches - sum(self.overlap_margins)) * self.patch_size

    @property
    def margin_px(self) -> int:
        """The total overlap of a crop, in pixels (112 for the released scheme)."""
        return sum(self.overlap_margins) * self.patch_size


RELEASED = CropScheme()


@dataclass(frozen=True)
class Molmo2Geometry:
    """Where an image's pixels go, in the units named on each field."""

    tiling: tuple[int, int]  # (rows, cols) of high-res crops
    canvas: tuple[int, int]  # (height, width) in pixels the image is stretched to before cropping
    low_res_grid: tuple[int, int]  # (rows, cols) of LLM tokens of the global view
    high_res_grid: tuple[int, int]  # (rows, cols) of LLM tokens of the high-res canvas

    @property
    def n_crops(self) -> int:
        """Crops through the vision tower: the global view plus the high-res tiles."""
        return 1 + self.tiling[0] * self.tiling[1]

    @property
    def n_image_tokens(self) -> int:
        """Image features the LLM receives (one per <im_patch> placeholder)."""
        return int(np.prod(self.low_res_grid) + np.prod(self.high_res_grid))

    @property
    def image_grid(self) -> np.ndarray:
        """(4,) int64 [low_res_rows, low_res_cols, high_res_rows, high_res_cols]: HF's `image_grids` row."""
        return np.array([*self.low_res_grid, *self.high_res_grid], dtype=np.int64)


@dataclass(frozen=True, eq=False)  # eq=False: numpy fields have no single truth value for ==
class Molmo2Pixels:
    """One image ready for Molmo2ForConditionalGeneration (what its processor returns for one image)."""

    pixel_values: np.ndarray  # (n_crops, 729, 588) float32: crops x patches x (14*14 px * 3 channels)
    image_token_pooling: np.ndarray  # (n_image_tokens, 4) int64: patch indices into the flattened crops
    geometry: Molmo2Geometry


def molmo2_crop_budget(resolution: int | None, scheme: CropScheme = RELEASED) -> int:
    """Crop budget for the engine's `resolution` (pixels, longest side; None = full). See the module doc."""
    if resolution is None:
        return scheme.max_crops
    per_side = max(1, (resolution - scheme.margin_px) // scheme.window_px)
    return max(1, min(scheme.max_crops, per_side * per_side))


def select_tiling(height: float, width: float, window_px: int, max_crops: int) -> tuple[int, int]:
    """(rows, cols) of windows covering height x width pixels; float32 arithmetic, ties as transformers.

    Candidates are ordered by crop count, then rows. The first one that needs no shrinking wins if any
    (the least enlargement); otherwise the first of those that shrink least.
    """
    tilings = [(h, w) for h, w in itertools.product(range(1, max_crops + 1), repeat=2) if h * w <= max_crops]
    tilings.sort(key=lambda t: (t[0] * t[1], t[0]))
    candidates = np.array(tilings, dtype=np.int32) * window_px  # (n, 2) pixels
    with np.errstate(divide="ignore", invalid="ignore"):  # images under the margin give 0 or < 0 sizes
        scales = candidates.astype(np.float32) / np.array([height, width], dtype=np.float32)
    scale = scales.min(axis=1)  # the binding side of each candidate
    if np.all(scale < 1):
        return tilings[int(np.argmax(scale))]
    return tilings[int(np.argmin(np.where(scale < 1.0, np.float32(10e9), scale)))]


def molmo2_geometry(width: int, height: int, max_crops: int, scheme: CropScheme = RELEASED) -> Molmo2Geometry:
    """Tiling, canvas and token grids of a width x height pixel image, with at most max_crops crops."""
    window, margin, pool, patch = scheme.window_px, scheme.margin_px, scheme.pooling, scheme.patch_size
    rows, cols = select_tiling(height - margin, width - margin, window, max_crops)
    canvas = (rows * window + margin, cols * window + margin)
    low_res = -(-scheme.crop_patches // pool)  # ceil
    return Molmo2Geometry(
        tiling=(rows, cols),
        canvas=canvas,
        low_res_grid=(low_res, low_res),
        high_res_grid=(-(-canvas[0] // patch // pool), -(-canvas[1] // patch // pool)),
    )


def prepare_molmo2_image(
    image: Image.Image,
    resolution: int | None = None,
    *,
    scheme: CropScheme = RELEASED,
    mean: Sequence[float] = (0.5, 0.5, 0.5),
    std: Sequence[float] = (0.5, 0.5, 0.5),
    rescale_factor: float = 1 / 255,
) -> Molmo2Pixels:
    """Crops, patches and pooling indices of one image; the crop budget comes from `molmo2_crop_budget`."""
    pixels = np.asarray(to_rgb(image))  # (H, W, 3) uint8
    height, width = pixels.shape[:2]
    geometry = molmo2_geometry(width, height, molmo2_crop_budget(resolution, scheme), scheme)
    mean255, std255 = _scaled_mean_std(mean, std, rescale_factor)

    def normalized(size: tuple[int, int]) -> np.ndarray:  # (h, w, 3) float32
        return (resize_bilinear_uint8(pixels, size).astype(np.float32) - mean255) / std255

    canvas = normalized(geometry.canvas)
    window, size = scheme.window_px, scheme.crop_size
    rows, cols = geometry.tiling
    tiles = [
        canvas[r * window : r * window + size, c * window : c * window + size]
        for r in range(rows)
        for c in range(cols)
    ]
    crops = np.stack([normalized((size, size)), *tiles])  # (n_crops, 378, 378, 3), global first
    return Molmo2Pixels(
        pixel_values=_patchify(crops, scheme.patch_size),
        image_token_pooling=molmo2_pooling(geometry, scheme),
        geometry=geometry,
    )


def molmo2_pooling(geometry: Molmo2Geometry, scheme: CropScheme = RELEASED) -> np.ndarray:
    """(n_image_tokens, 4) int64 pooling rows: global-view tokens first, then high-res, raster order.

    Indices count patches over all crops of the image in order (the global view is crop 0); -1 pads.
    """
    crop_patches = scheme.crop_patches
    low_res = _pool(
        np.arange(crop_patches * crop_patches).reshape(crop_patches, crop_patches), scheme.pooling
    )
    high_res = _pool(_canvas_patch_indices(geometry.tiling, scheme), scheme.pooling)
    high_res = np.where(high_res >= 0, high_res + crop_patches * crop_patches, -1)  # after the global crop
    return np.concatenate([low_res, high_res]).astype(np.int64)


def _canvas_patch_indices(tiling: tuple[int, int], scheme: CropScheme) -> np.ndarray:
    """(canvas rows, canvas cols) in patches: which crop patch shows each canvas patch.

    Crops overlap; of two crops sharing an edge, each keeps its own half of the overlap, so the margin
    rows/columns of every inner crop edge are dropped and each canvas patch appears once.
    """
    rows, cols = tiling
    n = scheme.crop_patches
    first, last = scheme.overlap_margins
    index = np.arange(rows * cols * n * n).reshape(rows, cols, n, n)  # (crop row, crop col, y, x)
    keep = np.ones(index.shape, dtype=bool)
    if first:
        keep[1:, :, :first, :] = False  # top margin of every crop below another
        keep[:, 1:, :, :first] = False  # left margin of every crop right of another
    if last:
        keep[:-1, :, -last:, :] = False
        keep[:, :-1, :, -last:] = False
    # Canvas raster order: crop row, patch row, crop col, patch col.
    index, keep = (a.transpose(0, 2, 1, 3).reshape(-1) for a in (index, keep))
    window_patches = n - first - last
    return index[keep].reshape(rows * window_patches + first + last, cols * window_patches + first + last)


def _pool(grid: np.ndarray, pool: int) -> np.ndarray:
    """Group a (h, w) patch-index grid into pool x pool windows: (tokens, pool * pool), -1 padded.

    A side not divisible by the pool is padded with -1, the odd row/column going to the far side.
    """
    pool_h = pool_w = pool
    pad_h, pad_w = -grid.shape[0] % pool_h, -grid.shape[1] % pool_w
    grid = np.pad(grid, ((pad_h // 2, (pad_h + 1) // 2), (pad_w // 2, (pad_w + 1) // 2)), constant_values=-1)
    rows, cols = grid.shape[0] // pool_h, grid.shape[1] // pool_w
    return (
        grid.reshape(rows, pool_h, cols, pool_w).transpose(0, 2, 1, 3).reshape(rows * cols, pool_h * pool_w)
    )


def _patchify(crops: np.ndarray, patch: int) -> np.ndarray:
    """(n, 378, 378, 3) -> (n, 729, 588): patches in raster order, each flattened as (y, x, channel)."""
    n, size, _, channels = crops.shape
    side = size // patch
    patches = crops.reshape(n, side, patch, side, patch, channels).transpose(0, 1, 3, 2, 4, 5)
    return np.ascontiguousarray(patches.reshape(n, side * side, patch * patch * channels))


def resize_bilinear_uint8(pixels: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """(H, W, C) uint8 -> (h, w, C) uint8 by bilinear interpolation without antialiasing.

    Half-pixel centres (align_corners=False), in float32 rounded exactly as torch's CPU kernel rounds
    (checked bit for bit against torch.nn.functional.interpolate in tests), then rounded half-to-even and
    clamped: what transformers' Molmo2 processor does through torchvision.
    """
    out_h, out_w = size
    rows, row_weights = _linear_taps(pixels.shape[0], out_h)
    cols, col_weights = _linear_taps(pixels.shape[1], out_w)
    source = pixels.astype(np.float32)
    # Interpolate along x inside each of the two source rows, then between the rows.
    wx0, wx1 = col_weights[None, :, 0, None], col_weights[None, :, 1, None]
    top = _mix(wx0, source[rows[:, 0]][:, cols[:, 0]], wx1, source[rows[:, 0]][:, cols[:, 1]])
    bottom = _mix(wx0, source[rows[:, 1]][:, cols[:, 0]], wx1, source[rows[:, 1]][:, cols[:, 1]])
    mixed = _mix(row_weights[:, 0, None, None], top, row_weights[:, 1, None, None], bottom)
    return np.clip(np.round(mixed), 0, 255).astype(np.uint8)


def _mix(w0: np.ndarray, x0: np.ndarray, w1: np.ndarray, x1: np.ndarray) -> np.ndarray:
    """w0 * x0 + w1 * x1 in float32 the way torch's kernel rounds it: fused multiply-add of the first
    product onto the rounded second one (float64 holds the float32 product exactly, so one rounding)."""
    second = w1 * x1  # float32, rounded
    return (w0.astype(np.float64) * x0.astype(np.float64) + second).astype(np.float32)


def _linear_taps(in_size: int, out_size: int) -> tuple[np.ndarray, np.ndarray]:
    """(out, 2) source indices and (out, 2) float32 weights of 1-D linear interpolation (torch's rule)."""
    scale = np.float32(in_size) / np.float32(out_size)  # float32 division
    # scale * (i + 0.5) - 0.5 with one rounding (a fused multiply-add in torch), clamped at the first pixel
    centre = np.arange(out_size, dtype=np.float64) + 0.5
    source = np.maximum((np.float64(scale) * centre - 0.5).astype(np.float32), np.float32(0))
    low = np.minimum(np.floor(source).astype(np.int64), in_size - 1)
    frac = np.clip(source - low.astype(np.float32), np.float32(0), np.float32(1))
    high = low + (low < in_size - 1)  # the last pixel pairs with itself
    return np.stack([low, high], 1), np.stack([np.float32(1) - frac, frac], 1)


def _scaled_mean_std(
    mean: Sequence[float], std: Sequence[float], rescale_factor: float
) -> tuple[np.ndarray, np.ndarray]:
    """Mean and std on the 0-255 scale, float32, as transformers fuses rescale into normalize."""
    factor = 1.0 / rescale_factor
    return (
        np.asarray(mean, np.float32) * np.float32(factor),
        np.asarray(std, np.float32) * np.float32(factor),
    )
