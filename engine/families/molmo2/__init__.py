"""Molmo2: prompts and grounding target (`family.py`), the points parser (`parser.py`) and the numpy
crops, pooling and pixels (`pixels.py`); the image-token layout every runtime shares is in
runtimes/families/molmo2.py."""

from engine.families.molmo2.family import Molmo2Family

__all__ = ["Molmo2Family"]
