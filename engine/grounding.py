"""What a grounding parser returns, and the contract every family's parser runs under.

Parsers (engine/families/<family>/parser.py) turn model text into boxes normalized to [0, 1] of the image.
They never raise on model text (DESIGN.md, "Coordinates"): whatever can be recovered becomes a box;
everything that was malformed, clipped, skipped or recovered is described in `Grounding.notes` for the trace.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from engine.boxes import Box


@dataclass(frozen=True)
class Grounding:
    boxes: tuple[Box, ...]  # normalized to [0, 1] of the image, in the order the model wrote them
    notes: tuple[str, ...]  # human-readable: what was malformed, clipped, skipped or recovered


def never_raising(
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
