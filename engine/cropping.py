"""Fused regions (normalized) -> crop rectangles in PIXELS of the ORIGINAL image.

Crop rule, per box, each axis on its own:
  1. padding: add `padding` x the box's own width (height) on EACH side;
  2. grow to at least `min_side` pixels and `min_fraction` of the image's longest side (and at least 1),
     centred, but never beyond the image side;
  3. shift, never shrink, to lie inside the image; clamp only if still larger than the image.
Then crops with IoU >= `merge_iou`, or one inside the other, are replaced by their union until none are left,
and the list is cut to `max_crops`. Input order is priority order: a merged crop takes the earlier position.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from PIL import Image

from engine.boxes import Box

# Normalized x pixels can miss an integer by float error (0.7 * 1000 = 700.0000000000001);
# round first so that exact boundaries do not grow a pixel.
_PIXEL_DECIMALS = 6


@dataclass(frozen=True)
class PixelBox:
    """Pixels of the original image, half-open: columns [x1, x2), rows [y1, y2)."""

    x1: int
    y1: int
    x2: int
    y2: int

    @property
    def width(self) -> int:
        return self.x2 - self.x1

    @property
    def height(self) -> int:
        return self.y2 - self.y1

    @property
    def area(self) -> int:
        return self.width * self.height

    def as_list(self) -> list[int]:
        return [self.x1, self.y1, self.x2, self.y2]

    def contains(self, other: PixelBox) -> bool:
        return self.x1 <= other.x1 and self.y1 <= other.y1 and other.x2 <= self.x2 and other.y2 <= self.y2

    def union(self, other: PixelBox) -> PixelBox:
        """Smallest box containing both."""
        x1, y1 = min(self.x1, other.x1), min(self.y1, other.y1)
        return PixelBox(x1, y1, max(self.x2, other.x2), max(self.y2, other.y2))

    def iou(self, other: PixelBox) -> float:
        inter_w = max(0, min(self.x2, other.x2) - max(self.x1, other.x1))
        inter_h = max(0, min(self.y2, other.y2) - max(self.y1, other.y1))
        inter = inter_w * inter_h
        union = self.area + other.area - inter
        return inter / union if union > 0 else 0.0


def to_pixels(box: Box, width: int, height: int) -> PixelBox:
    """The pixels a normalized box covers (outward rounding), at least 1x1, inside the image."""
    _check_image_size(width, height)
    x1, x2 = _fit_span(box.x1 * width, box.x2 * width, 1, width)
    y1, y2 = _fit_span(box.y1 * height, box.y2 * height, 1, height)
    return PixelBox(x1, y1, x2, y2)


def plan_crops(
    boxes: Sequence[Box],
    width: int,
    height: int,
    *,
    padding: float = 0.15,
    min_side: int = 0,
    min_fraction: float = 0.0,
    max_crops: int | None = None,
    merge_iou: float = 0.7,
) -> list[PixelBox]:
    """Crop rectangles for normalized boxes on a width x height image, by the rule in the module docstring."""
    _check_image_size(width, height)
    if padding < 0 or min_side < 0 or min_fraction < 0:
        raise ValueError(
            f"padding, min_side and min_fraction must be >= 0, got {padding}, {min_side}, {min_fraction}"
        )
    if max_crops is not None and max_crops < 0:
        raise ValueError(f"max_crops must be >= 0 or None, got {max_crops}")

    min_side = max(min_side, round(min_fraction * max(width, height)))
    crops = []
    for box in boxes:
        pad_x, pad_y = padding * box.width * width, padding * box.height * height  # pixels
        x1, x2 = _fit_span(box.x1 * width - pad_x, box.x2 * width + pad_x, max(1, min_side), width)
        y1, y2 = _fit_span(box.y1 * height - pad_y, box.y2 * height + pad_y, max(1, min_side), height)
        crops.append(PixelBox(x1, y1, x2, y2))
    crops = _merge_duplicates(crops, merge_iou)
    return crops if max_crops is None else crops[:max_crops]


def crop_image(image: Image.Image, box: PixelBox) -> Image.Image:
    """The pixels of `box` as a new image of size (box.width, box.height)."""
    if not (0 <= box.x1 < box.x2 <= image.width and 0 <= box.y1 < box.y2 <= image.height):
        raise ValueError(f"crop {box.as_list()} is empty or outside the {image.width}x{image.height} image")
    return image.crop((box.x1, box.y1, box.x2, box.y2))


def _fit_span(lo: float, hi: float, min_len: int, limit: int) -> tuple[int, int]:
    """Integer span [start, end) over [lo, hi] (pixels), inside [0, limit], >= min(min_len, limit) long."""
    start = math.floor(round(lo, _PIXEL_DECIMALS))
    end = math.ceil(round(hi, _PIXEL_DECIMALS))
    target = min(min_len, limit)
    if end - start < target:  # grow around the centre; an odd extra pixel goes to the end
        extra = target - (end - start)
        start -= extra // 2
        end += extra - extra // 2
    if start < 0:  # shift, keeping the length
        start, end = 0, end - start
    if end > limit:
        start, end = start - (end - limit), limit
    return max(0, start), end  # clamp: only when the span is longer than the image


def _merge_duplicates(crops: list[PixelBox], merge_iou: float) -> list[PixelBox]:
    """Replace near-duplicate or nested pairs by their union until no pair qualifies (N is small)."""
    crops = list(crops)
    merged = True
    while merged:
        merged = False
        for i in range(len(crops)):
            for j in range(i + 1, len(crops)):
                a, b = crops[i], crops[j]
                if a.iou(b) >= merge_iou or a.contains(b) or b.contains(a):
                    crops[i] = a.union(b)
                    del crops[j]
                    merged = True
                    break
            if merged:
                break
    return crops


def _check_image_size(width: int, height: int) -> None:
    if width < 1 or height < 1:
        raise ValueError(f"image size must be at least 1x1, got {width}x{height}")
