"""Model families: what the engine must know of a model's prompt format, grounding output and pixels.

A family is one class registered by the Hugging Face `architectures` names it serves; adding a family is
adding a module here. Nothing else in the engine branches on the family.
"""

from __future__ import annotations

from engine.families import molmo2, qwen3vl  # noqa: F401  (each registers itself)
from engine.families.base import FAMILIES, Family, family_for

__all__ = ["FAMILIES", "Family", "family_for"]
