"""Molmo2's (and Molmo v1's) pointing output: `<points coords=...>` in 0-1000 of the image it saw."""

from __future__ import annotations

import math
import re
from functools import partial

from engine.boxes import Box
from engine.grounding import Grounding, never_raising

# images are separated by ';' (also '\t', ',' or ':' in the released decoder's pattern). Examples:
#   <points coords="1 1 073 160 2 173 600" alt="boats">the boats</points>
#   <points coords="1 1 452 321;2 1 485 350">red car</points>
# Molmo (v1) wrote percentages, 0-100:
#   <point x="61.5" y="40.6" alt="cat">cat</point>
#   <points x1="9.1" y1="11.7" x2="17.2" y2="41.3" alt="boats">boats</points>

MOLMO2_SCALE = 1000.0  # Molmo2 `coords` run 0-1000 over the image the model saw
MOLMO1_SCALE = 100.0  # Molmo (v1) x/y attributes are percentages

# An opening tag, possibly cut off by the end of the output; its label runs to the closing tag.
_MOLMO_TAG = re.compile(r"<(points|point|tracks)\b([^<>]*)(>|\Z)", re.IGNORECASE)
_MOLMO_ATTR = re.compile(r"([A-Za-z_][\w-]*)\s*=\s*\"([^\"]*)(\"|\Z)")
_MOLMO_GROUPS = re.compile(r"[;\t,:]")
_TRAILING_WORD = re.compile(r"\S+\Z")


def parse_molmo_points(text: str, *, point_box_size: float = 0.1, image_index: int = 1) -> Grounding:
    """Boxes from Molmo2 (or Molmo v1) pointing output; never raises on model text.

    Point -> box rule: each point becomes a square of side `point_box_size` (normalized to the image, so
    0.1 = a tenth of the width by a tenth of the height) centred on it and clipped to the image; a point
    outside the image is first clipped to its edge. Only points on image `image_index` (1-based, the
    image of the prompt whose points are wanted) are kept; others are noted and skipped.
    """
    return never_raising(partial(_molmo_boxes, image_index=image_index), text, point_box_size)


def _molmo_boxes(text: str, size: float, notes: list[str], *, image_index: int) -> list[Box]:
    boxes: list[Box] = []
    tags = list(_MOLMO_TAG.finditer(text))
    if not tags:
        notes.append("no <points> or <point> tag found")
    for number, tag in enumerate(tags):
        attributes = {}
        for attr in _MOLMO_ATTR.finditer(tag.group(2)):
            name, value = attr.group(1).lower(), attr.group(2)
            if not attr.group(3):
                notes.append(f"tag {number}: attribute {attr.group(1)!r} is cut off")
                # The output stopped inside the value: its last number may be cut short ("45" of "450").
                value = _TRAILING_WORD.sub("", value)
            attributes[name] = value
        closed = tag.group(3) == ">"
        self_closing = tag.group(2).rstrip().endswith("/")
        label = _molmo_label(text, tag.end()) if closed and not self_closing else ""
        label = label or attributes.get("alt", "")
        where = f"tag {number}" + (f" ({label[:40]!r})" if label else "")
        if not closed:
            notes.append(f"{where}: tag is cut off")
        if "coords" in attributes:
            points = _molmo2_points(attributes["coords"], image_index, where, notes)
            scale = MOLMO2_SCALE
        else:
            points = _molmo1_points(attributes, where, notes)
            scale = MOLMO1_SCALE
        boxes += [_point_square(x / scale, y / scale, size, label, where, scale, notes) for x, y in points]
    return boxes


def _molmo_label(text: str, start: int) -> str:
    """Text after an opening tag up to the next tag (its closing tag, normally), stripped."""
    end = text.find("<", start)
    return (text[start:] if end < 0 else text[start:end]).strip()[:200]


def _molmo2_points(coords: str, image_index: int, where: str, notes: list[str]) -> list[tuple[float, float]]:
    """(x, y) pairs in 0-1000 from a `coords` value: groups of `IMG (ID X Y)*`."""
    points: list[tuple[float, float]] = []
    for group in _MOLMO_GROUPS.split(coords):
        numbers = group.split()
        if not numbers:
            continue
        values = [_finite(n) for n in numbers]
        if any(v is None for v in values):
            notes.append(f"{where}: non-numeric coords group {group.strip()[:40]!r} skipped")
            continue
        image, triples = values[0], values[1:]
        if image != image_index:
            notes.append(f"{where}: points on image {numbers[0]} skipped (want image {image_index})")
            continue
        if len(triples) % 3:
            notes.append(f"{where}: incomplete point at the end of coords dropped")
        points += [(triples[i + 1], triples[i + 2]) for i in range(0, len(triples) - 2, 3)]
    if not points:
        notes.append(f"{where}: no complete point in coords")
    return points


def _molmo1_points(attributes: dict[str, str], where: str, notes: list[str]) -> list[tuple[float, float]]:
    """(x, y) pairs in 0-100 from `x`/`y` or `x1`/`y1`/`x2`/`y2`/... attributes."""
    keys = [("x", "y")] if "x" in attributes else []
    index = 1
    while f"x{index}" in attributes or f"y{index}" in attributes:
        keys.append((f"x{index}", f"y{index}"))
        index += 1
    points = []
    for x_key, y_key in keys:
        x, y = _finite(attributes.get(x_key, "")), _finite(attributes.get(y_key, ""))
        if x is None or y is None:
            notes.append(f"{where}: {x_key}/{y_key} is not a pair of numbers, skipped")
            continue
        points.append((x, y))
    if not keys:
        notes.append(f"{where}: no coords, x/y or x1/y1 attributes")
    return points


def _point_square(
    cx: float, cy: float, size: float, label: str, where: str, scale: float, notes: list[str]
) -> Box:
    """The `size` x `size` (normalized) square around a normalized point, clipped to the image."""
    if not (0.0 <= cx <= 1.0 and 0.0 <= cy <= 1.0):
        notes.append(f"{where}: point outside 0-{scale:g} clipped")
        cx, cy = min(1.0, max(0.0, cx)), min(1.0, max(0.0, cy))
    half = size / 2
    return Box.from_corners(cx - half, cy - half, cx + half, cy + half, label)


def _finite(token: str) -> float | None:
    try:
        value = float(token)
    except (ValueError, OverflowError):
        return None
    return value if math.isfinite(value) else None
