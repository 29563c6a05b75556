"""Qwen3-VL's grounding output: JSON boxes and points in 0-1000 coordinates of the image it saw.

Qwen3-VL grounds as a JSON list of `{"bbox_2d": [x1, y1, x2, y2], "label": ...}` or
`{"point_2d": [x, y], "label": ...}`, in 0-1000 relative coordinates of the image it saw. Because the
coordinates are relative, they are the same fractions of the original image: divide by 1000.
"""

from __future__ import annotations

import json
import math
import re
from typing import Any

from engine.boxes import Box
from engine.grounding import Grounding, never_raising

QWEN_SCALE = 1000.0  # Qwen3-VL coordinates run 0-1000 over the image the model saw

# Content of the first ``` fence (any language tag); an unclosed fence runs to the end (truncated output).
_FENCE = re.compile(r"```[\w-]*[ \t]*\n?(.*?)(?:```|\Z)", re.DOTALL)
_JSON_START = re.compile(r"[\[{]")
_JSON_WHITESPACE = re.compile(r"[ \t\n\r]*")
_OPENER_RUN = re.compile(r"[\[{ \t\n\r]+")
_DECODER = json.JSONDecoder()


def parse_qwen_grounding(text: str, *, point_box_size: float = 0.1) -> Grounding:
    """Boxes from Qwen3-VL output: fenced or bare JSON, a list or one object, truncated, or wrapped in prose.

    A point becomes a square of side `point_box_size` (normalized) centred on it, clipped to the image.
    Out-of-range coordinates are clipped, swapped corners ordered; zero-area and non-numeric entries skipped.
    """
    return never_raising(_qwen_boxes, text, point_box_size)


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
