"""Parsers of model grounding text into normalized boxes.

Qwen3-VL grounds as a JSON list of `{"bbox_2d": [x1, y1, x2, y2], "label": ...}` or
`{"point_2d": [x, y], "label": ...}`, in 0-1000 relative coordinates of the image it saw. Because the
coordinates are relative, they are the same fractions of the original image: divide by 1000.

Parsers never raise on model text (DESIGN.md, "Coordinates"). Whatever can be recovered becomes a box;
everything that was malformed, clipped, skipped or recovered is described in `Grounding.notes` for the trace.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import Any

from engine.boxes import Box

QWEN_SCALE = 1000.0  # Qwen3-VL coordinates run 0-1000 over the image the model saw

# Content of the first ``` fence (any language tag); an unclosed fence runs to the end (truncated output).
_FENCE = re.compile(r"```[\w-]*[ \t]*\n?(.*?)(?:```|\Z)", re.DOTALL)
_JSON_START = re.compile(r"[\[{]")
_JSON_WHITESPACE = re.compile(r"[ \t\n\r]*")
_OPENER_RUN = re.compile(r"[\[{ \t\n\r]+")
_DECODER = json.JSONDecoder()


@dataclass(frozen=True)
class Grounding:
    boxes: tuple[Box, ...]  # normalized to [0, 1] of the image, in the order the model wrote them
    notes: tuple[str, ...]  # human-readable: what was malformed, clipped, skipped or recovered


def parse_qwen_grounding(text: str, *, point_box_size: float = 0.1) -> Grounding:
    """Boxes from Qwen3-VL output: fenced or bare JSON, a list or one object, truncated, or wrapped in prose.

    A point becomes a square of side `point_box_size` (normalized) centred on it, clipped to the image.
    Out-of-range coordinates are clipped, swapped corners ordered; zero-area and non-numeric entries skipped.
    """
    return _never_raising(_qwen_boxes, text, point_box_size)


def _never_raising(
    parse: Callable[[str, float, list[str]], list[Box]], text: str, point_box_size: float
) -> Grounding:
    """Run a parser under the contract "never raise on model text": a bug must not kill a request."""
    if not 0.0 < point_box_size <= 1.0:
        raise ValueError(f"point_box_size must be in (0, 1], got {point_box_size}")
    if not isinstance(text, str):
        return Grounding((), (f"expected text, got {type(text).__name__}: no boxes",))
    notes: list[str] = []
    try:
        boxes = parse(text, point_box_size, notes)
    except Exception as exc:
        return Grounding((), (*notes, f"internal parser error ({type(exc).__name__}): no boxes"))
    return Grounding(tuple(boxes), tuple(notes))


def _qwen_boxes(text: str, point_box_size: float, notes: list[str]) -> list[Box]:
    entries = _find_entries(text, notes)
    boxes = [_entry_to_box(entry, i, point_box_size, notes) for i, entry in enumerate(entries)]
    return [b for b in boxes if b is not None]


def _find_entries(text: str, notes: list[str]) -> list[dict]:
    """The grounding objects (dicts with bbox_2d or point_2d) in document order."""
    fence = _FENCE.search(text)
    candidate = fence.group(1) if fence else text
    try:
        value = json.loads(candidate)
    except (ValueError, RecursionError):  # deeply nested input raises RecursionError, not ValueError
        pass
    else:
        entries = _grounding_dicts(value)
        if not entries:
            notes.append("JSON has no bbox_2d or point_2d entries")
        return entries

    # Not one clean JSON value: prose around it, several values, or output cut mid-list.
    entries = _scan(text)
    if entries:
        notes.append(f"malformed or truncated JSON: recovered {len(entries)} grounding object(s) by scanning")
    else:
        notes.append("no grounding JSON found")
    return entries


def _scan(text: str) -> list[dict]:
    """Decode every JSON value starting at a '{' or '['; of a list cut short, keep its complete items.

    An object with a key cannot start inside a JSON string (its quote would be escaped there), so labels
    containing brackets do not produce phantom boxes.
    """
    found: list[dict] = []
    pos = 0
    while match := _JSON_START.search(text, pos):
        start = match.start()
        try:
            value, pos = _DECODER.raw_decode(text, start)
        except RecursionError:
            # Nested deeper than the decoder allows. Jump to the last opener of this run ("[[[ [{"): an
            # object with a key cannot start earlier in it, and degenerate output ("[[[[...") stays linear.
            run = _OPENER_RUN.match(text, start).group().rstrip(" \t\n\r")
            value, pos = None, max(start + 1, start + len(run) - 1)
        except ValueError:
            items, end = _decode_list_prefix(text, start) if text[start] == "[" else ([], start)
            value, pos = items, (end if items else start + 1)
        found.extend(_grounding_dicts(value))
    return found


def _decode_list_prefix(text: str, start: int) -> tuple[list[Any], int]:
    """Complete items of the (possibly truncated) JSON list at text[start] == '[', and where they end."""
    items: list[Any] = []
    pos = _JSON_WHITESPACE.match(text, start + 1).end()
    while pos < len(text) and text[pos] != "]":
        try:
            item, pos = _DECODER.raw_decode(text, pos)
        except (ValueError, RecursionError):
            break
        items.append(item)
        pos = _JSON_WHITESPACE.match(text, pos).end()
        if not text.startswith(",", pos):
            break
        pos = _JSON_WHITESPACE.match(text, pos + 1).end()
    return items, pos


def _grounding_dicts(value: Any) -> list[dict]:
    """Dicts with bbox_2d or point_2d anywhere in a decoded JSON value, in document order.

    Looks inside wrappers such as {"objects": [...]}, but not inside a grounding dict itself.
    Iterative, because decoded JSON can be nested deeper than Python's recursion limit allows.
    """
    found: list[dict] = []
    stack = [value]
    while stack:
        node = stack.pop()
        if isinstance(node, dict):
            if "bbox_2d" in node or "point_2d" in node:
                found.append(node)
            else:
                stack.extend(reversed(list(node.values())))
        elif isinstance(node, list):
            stack.extend(reversed(node))
    return found


def _entry_to_box(entry: dict, index: int, point_box_size: float, notes: list[str]) -> Box | None:
    label = _label(entry.get("label"))
    where = f"entry {index}" + (f" ({label[:40]!r})" if label else "")
    if "bbox_2d" in entry:
        coords = _finite_numbers(entry["bbox_2d"], 4)
        if coords is None:
            notes.append(f"{where}: bbox_2d is not 4 finite numbers, skipped")
            return None
        x1, y1, x2, y2 = (c / QWEN_SCALE for c in coords)
        if x1 > x2 or y1 > y2:
            notes.append(f"{where}: swapped corners ordered")
        if not all(0.0 <= c <= 1.0 for c in (x1, y1, x2, y2)):
            notes.append(f"{where}: coordinates outside 0-1000 clipped")
    else:
        point = _finite_numbers(entry["point_2d"], 2)
        if point is None:
            notes.append(f"{where}: point_2d is not 2 finite numbers, skipped")
            return None
        # A point just outside the image is most likely meant at its edge: clip it before making the square.
        cx, cy = (c / QWEN_SCALE for c in point)
        if not (0.0 <= cx <= 1.0 and 0.0 <= cy <= 1.0):
            notes.append(f"{where}: point outside 0-1000 clipped")
            cx, cy = min(1.0, max(0.0, cx)), min(1.0, max(0.0, cy))
        half = point_box_size / 2
        x1, y1, x2, y2 = cx - half, cy - half, cx + half, cy + half
    box = Box.from_corners(x1, y1, x2, y2, label)
    if box.area == 0.0:
        notes.append(f"{where}: zero-area box skipped")
        return None
    return box


def _finite_numbers(value: Any, count: int) -> tuple[float, ...] | None:
    """`count` finite numbers from a JSON list, or None. Booleans and numeric strings are not numbers here."""
    if not isinstance(value, list) or len(value) != count:
        return None
    if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value):
        return None
    try:
        numbers = tuple(float(v) for v in value)
    except OverflowError:  # an integer literal too large for a float
        return None
    return numbers if all(math.isfinite(v) for v in numbers) else None


def _label(value: Any) -> str:
    if value is None:
        return ""
    return value if isinstance(value, str) else str(value)


# --- Molmo / Molmo2 points ---------------------------------------------------------------------------
#
# Molmo2 points with `<points coords="IMG ID X Y ID X Y ...">label</points>` (also `<tracks ...>` and a
# self-closing `<points coords="..."/>`): IMG is the 1-based index of the image the points are on (a time
# in seconds for video frames), each point is (ID, X, Y) with ID counting 1, 2, ... and X, Y in 0-1000
# of that image's width and height, usually zero-padded to three digits ("073"). Groups for several
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
    return _never_raising(partial(_molmo_boxes, image_index=image_index), text, point_box_size)


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
