"""The box type shared by parsers, fusion and cropping.

Every `Box` is normalized to [0, 1] of the ORIGINAL image (DESIGN.md, "Coordinates"); pixels only
appear in `engine.cropping`. The constructor enforces that invariant, so a `Box` that exists is valid:
build one from untrusted numbers with `Box.from_corners`, which orders and clips.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Box:
    """Axis-aligned box, normalized to [0, 1] of the image, with x1 <= x2 and y1 <= y2 (may be empty)."""

    x1: float
    y1: float
    x2: float
    y2: float
    label: str = ""

    def __post_init__(self) -> None:
        # Coerce ints so that Box(0, 0, 1, 1) == Box(0.0, 0.0, 1.0, 1.0) serializes the same way.
        for name in ("x1", "y1", "x2", "y2"):
            object.__setattr__(self, name, float(getattr(self, name)))
        if not all(math.isfinite(v) for v in self.as_list()):
            raise ValueError(f"Box coordinates must be finite, got {self.as_list()}")
        if not (0.0 <= self.x1 <= self.x2 <= 1.0 and 0.0 <= self.y1 <= self.y2 <= 1.0):
            raise ValueError(
                f"Box must satisfy 0 <= x1 <= x2 <= 1 and 0 <= y1 <= y2 <= 1, got {self.as_list()}; "
                "use Box.from_corners to order and clip"
            )

    @classmethod
    def from_corners(cls, x1: float, y1: float, x2: float, y2: float, label: str = "") -> Box:
        """Box from two corners (normalized, not NaN): swapped corners are ordered, then clipped to [0, 1]."""
        xs = sorted((_clip01(x1), _clip01(x2)))
        ys = sorted((_clip01(y1), _clip01(y2)))
        return cls(xs[0], ys[0], xs[1], ys[1], label)

    @property
    def width(self) -> float:
        return self.x2 - self.x1

    @property
    def height(self) -> float:
        return self.y2 - self.y1

    @property
    def area(self) -> float:
        return self.width * self.height

    @property
    def center(self) -> tuple[float, float]:
        return ((self.x1 + self.x2) / 2, (self.y1 + self.y2) / 2)

    def as_list(self) -> list[float]:
        return [self.x1, self.y1, self.x2, self.y2]

    def iou(self, other: Box) -> float:
        """Intersection over union; 0.0 when both boxes are empty."""
        inter_w = max(0.0, min(self.x2, other.x2) - max(self.x1, other.x1))
        inter_h = max(0.0, min(self.y2, other.y2) - max(self.y1, other.y1))
        inter = inter_w * inter_h
        union = self.area + other.area - inter
        return inter / union if union > 0 else 0.0


def _clip01(value: float) -> float:
    value = float(value)
    if math.isnan(value):
        raise ValueError("Box coordinate is NaN")
    return min(1.0, max(0.0, value))


def boxes_to_array(boxes: Sequence[Box]) -> np.ndarray:
    """(N, 4) float64 array of [x1, y1, x2, y2], normalized."""
    return np.array([b.as_list() for b in boxes], dtype=np.float64).reshape(-1, 4)


def pairwise_iou(a: Sequence[Box], b: Sequence[Box]) -> np.ndarray:
    """(len(a), len(b)) IoU matrix; pairs whose union is empty get 0."""
    return iou_matrix(boxes_to_array(a), boxes_to_array(b))


def iou_matrix(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """(A, B) IoU of (A, 4) and (B, 4) arrays of [x1, y1, x2, y2]; pairs whose union is empty get 0."""
    ax1, ay1, ax2, ay2 = a.T[:, :, None]  # each (A, 1)
    bx1, by1, bx2, by2 = b.T[:, None, :]  # each (1, B)
    inter_w = np.clip(np.minimum(ax2, bx2) - np.maximum(ax1, bx1), 0, None)  # (A, B)
    inter_h = np.clip(np.minimum(ay2, by2) - np.maximum(ay1, by1), 0, None)
    inter = inter_w * inter_h
    union = (ax2 - ax1) * (ay2 - ay1) + (bx2 - bx1) * (by2 - by1) - inter
    return np.divide(inter, union, out=np.zeros_like(inter), where=union > 0)
