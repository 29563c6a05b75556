"""An image path of the llama.cpp runtime for an architecture libmtmd cannot run, and their registry.

libmtmd encodes Qwen3-VL's images itself, so Qwen3-VL needs nothing here. A family whose vision tower
libmtmd lacks registers an `ImagePath`: it opens the variant's own image state (Molmo2: ONNX vision and
embed graphs) and decodes prompt chunks with their image embeddings; sequences, forks and batched rollouts
stay in the runtime.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from runtimes.protocol import Segment
from runtimes.registry import Registered, Registry

if TYPE_CHECKING:
    from runtimes.llamacpp.runtime import LlamaCppRuntime, _VariantModel


class ImagePath(Registered, ABC):
    registry = Registry("llama.cpp image path")

    def __init__(self, runtime: LlamaCppRuntime, device: str) -> None:
        self.runtime = runtime

    @abstractmethod
    def open(self, variant: str) -> Any:
        """The variant's image state, kept on its model as `images`."""

    @abstractmethod
    def eval(
        self, model: _VariantModel, segments: Sequence[Segment], seq_id: int, position: int
    ) -> tuple[list[int], int, np.ndarray | None]:
        """Decode a chunk on `seq_id` from `position`: (token ids, next position, last logits or None)."""
