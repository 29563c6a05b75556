"""The runtime protocol and the types that cross the engine/runtime boundary.

The engine renders a prompt as segments (text with the family's special tokens, and prepared images);
a runtime turns them into tokens, computes KV, and decodes. A prefix (`[chat header][image]`) is prefilled
once and then shared: `generate` runs the suffix once on the parent sequence and only then forks it into
`n` sequences decoded together in one batch.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

import numpy as np


class RuntimeInputError(Exception):
    """A runtime refused its input (bad bundle, missing variant, prompt over the context): one-line message."""


@dataclass(frozen=True, eq=False)
class ImageInput:
    """An image prepared for the model: the pixels the vision tower eats and the tokens it occupies."""

    key: str  # content hash of the source pixels + prepared size: part of every KV cache key
    n_tokens: int  # placeholder tokens the image occupies in the prompt
    pixel_values: np.ndarray  # family-specific layout; Qwen3-VL: (n_patches, 3*T*P*P) float32
    grid_thw: tuple[int, int, int]  # (t, h, w) in patches before merging
    extras: dict[str, np.ndarray] = field(
        default_factory=dict
    )  # family-specific tables (e.g. Molmo2 pooling)


@dataclass(frozen=True)
class Text:
    text: str  # may contain the family's special tokens, e.g. "<|vision_start|>"


@dataclass(frozen=True)
class Image:
    image: ImageInput


Segment = Text | Image


def segments_key(segments: Sequence[Segment]) -> tuple[str, ...]:
    """A hashable identity of a prompt: its texts and its images' content keys."""
    return tuple(s.text if isinstance(s, Text) else f"<image:{s.image.key}>" for s in segments)


@dataclass(frozen=True)
class Sampling:
    max_new_tokens: int
    temperature: float = 0.0  # 0 = greedy
    top_p: float = 1.0
    seeds: tuple[int, ...] = ()  # one random stream per sequence; len == n when temperature > 0
    # decode max_new_tokens every time, end-of-sequence or not: benchmarks give every pipeline the same work
    ignore_eos: bool = False


@dataclass
class Prefix:
    """KV of a prompt prefix, owned by the runtime that computed it. Never mutated by `generate`."""

    variant: str
    token_ids: list[int]
    next_position: int  # rope position of the next token (M-RoPE: an image takes fewer positions than tokens)
    computed_tokens: int  # tokens run through the model to build this prefix
    state: Any = None  # runtime-specific KV handle
    images: tuple[ImageInput, ...] = ()

    @property
    def n_tokens(self) -> int:
        return len(self.token_ids)


@dataclass
class Generation:
    text: str
    token_ids: list[int]
    prompt_tokens: int  # prompt tokens this sequence computed itself (the suffix, for the first of a fork)
    reused_tokens: int  # prompt tokens it took from KV computed by someone else (prefix, forked suffix)
    generated_tokens: int
    ms: float  # wall time of the whole generate call (shared by the sequences of one batch)
    first_token_ms: float = 0.0  # from the start of the generate call to its first sampled token
    finish_reason: str = "stop"  # stop | length


@dataclass(frozen=True)
class ImageConfig:
    """Preprocessing constants of a model, read from its checkpoint or bundle manifest."""

    patch_size: int = 16
    merge_size: int = 2
    temporal_patch_size: int = 2
    mean: tuple[float, float, float] = (0.5, 0.5, 0.5)
    std: tuple[float, float, float] = (0.5, 0.5, 0.5)
    max_pixels: int = 16_777_216  # pixel area the model accepts at most
    # Towers that take fixed square crops (Molmo2): the crop side in pixels, the overlap of neighbouring
    # crops in patches (left/top, right/bottom) and the crops per image at most; 0 for the others
    crop_size: int = 0
    overlap_margins: tuple[int, int] = (0, 0)
    max_crops: int = 0


@dataclass(frozen=True)
class ModelInfo:
    architecture: str  # HF `architectures[0]`: picks the engine's family class
    image: ImageConfig
    variants: tuple[str, ...] = ("base",)
    max_context: int = 32768


@runtime_checkable
class Runtime(Protocol):
    info: ModelInfo

    def prefill(self, segments: Sequence[Segment], variant: str) -> Prefix: ...

    def generate(
        self, prefix: Prefix, suffix: Sequence[Segment], n: int, sampling: Sampling
    ) -> list[Generation]: ...

    def close(self) -> None: ...
