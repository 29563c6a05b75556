"""Model families: what the engine must know of a model's prompt format, grounding output and pixels.

A family is one package here (`qwen3vl/`, `molmo2/`) whose `Family` subclass is registered by the Hugging
Face `architectures` names it serves (runtimes/registry.py); nothing else in the engine branches on the
family.
"""

from __future__ import annotations

from engine.families import molmo2, qwen3vl  # noqa: F401  (each registers itself)
from engine.families.base import Family, family_for

__all__ = ["Family", "family_for"]
