"""Qwen3-VL: prompts and grounding target (`family.py`), the bbox_2d JSON parser (`parser.py`) and the
numpy pixel preparation (`pixels.py`)."""

from engine.families.qwen3vl.family import Qwen3VLFamily

__all__ = ["Qwen3VLFamily"]
