"""Random-weight Qwen3-VL shapes of the real architecture that the benchmarks build, by name.

Torch-free, so the CLI can offer the names without importing the builder: `sizes(name)` makes the
export.tiny.TinyQwen3VLSizes (which needs torch) when a shape is built.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from export.tiny import TinyQwen3VLSizes

# The vision tower of Qwen3-VL-2B and -4B (both the same) and their 151,936-row vocabulary
_REAL_VISION = {
    "vision_depth": 24,
    "vision_hidden": 1024,
    "vision_heads": 16,
    "vision_intermediate": 4096,
    "num_position_embeddings": 2304,
    "deepstack_visual_indexes": (5, 11, 17),
    "mrope_section": (24, 20, 20),
    "head_dim": 128,
    "max_position_embeddings": 32768,
    # the tokenizer stays the tiny one; rounding its size up to this gives the real embedding tables
    "vocab_multiple": 151_936,
    # 36 random layers at the tiny models' 0.08 overflow fp16; 0.02 is the usual initializer range
    "init_std": 0.02,
}


@dataclass(frozen=True)
class Shape:
    overrides: dict[str, Any] = field(default_factory=dict)  # TinyQwen3VLSizes fields that differ
    gpu: bool = False  # needs a CUDA GPU (fp16 bundles); skipped without one
    about: str = ""


SHAPES: dict[str, Shape] = {
    "tiny": Shape(about="about 1M parameters: the CI smoke test"),
    "65m": Shape(
        {
            "vision_depth": 4,
            "vision_hidden": 256,
            "vision_heads": 4,
            "vision_intermediate": 1024,
            "text_layers": 10,
            "text_hidden": 640,
            "text_heads": 10,
            "text_kv_heads": 5,
            "head_dim": 64,
            "text_intermediate": 2560,
            "mrope_section": (12, 10, 10),
        },
        about="about 65M: 10 text layers of hidden 640 (61M), a 4-block vision tower of hidden 256",
    ),
    "2b": Shape(
        {
            **_REAL_VISION,
            "text_layers": 28,
            "text_hidden": 2048,
            "text_heads": 16,
            "text_kv_heads": 8,
            "text_intermediate": 6144,
        },
        gpu=True,
        about="Qwen3-VL-2B's sizes (untied output embedding), random weights",
    ),
    "4b": Shape(
        {
            **_REAL_VISION,
            "text_layers": 36,
            "text_hidden": 2560,
            "text_heads": 32,  # 32 x 128 = 4096 query width on a 2560 hidden state, as in the real model
            "text_kv_heads": 8,
            "text_intermediate": 9728,
        },
        gpu=True,
        about="Qwen3-VL-4B's sizes (untied output embedding), random weights",
    ),
}


def sizes(name: str) -> TinyQwen3VLSizes:
    from export.tiny import TinyQwen3VLSizes

    return TinyQwen3VLSizes(**SHAPES[name].overrides)
