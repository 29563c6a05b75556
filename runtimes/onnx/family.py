"""The per-architecture pieces of the ONNX runtime, and their registry (torch-free, like runtimes/onnx/runtime.py).

The runtime (runtimes/onnx/runtime.py) owns what every family shares: sessions, the embed graph, the KV cache,
prefix forks and batched decoding. An `OnnxRuntimeFamily` owns what differs between the bundles of two
architectures: how segments become token ids and rope positions, how the vision graph is fed and where its
features go, and the decoder inputs besides `inputs_embeds`, `attention_mask` and the KV (M-RoPE and
DeepStack for Qwen3-VL, 1-D positions and image-token types for Molmo2). A family registers itself for the
HF `architectures` names it serves; the runtime picks one by the manifest's architecture.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence

import numpy as np
import onnxruntime as ort
from tokenizers import Tokenizer

from runtimes.bundle import Manifest
from runtimes.mrope import TokenizedPrompt
from runtimes.protocol import ImageInput, RuntimeInputError, Segment
from runtimes.registry import Registered, Registry


class OnnxRuntimeFamily(Registered, ABC):
    registry = Registry("onnx runtime")

    def __init__(self, manifest: Manifest, tokenizer: Tokenizer, dtype: type[np.floating]) -> None:
        self.sizes = manifest.model  # what the exporter's family wrote (layers, heads, layout switches)
        self.tokens = manifest.tokens
        self.tokenizer = tokenizer
        self.dtype = dtype  # float type of the graphs' float inputs and outputs

    @abstractmethod
    def tokenize(self, segments: Sequence[Segment], start_position: int) -> TokenizedPrompt:
        """Token ids and rope positions of a prompt continuing at rope position `start_position`."""

    @abstractmethod
    def vision(self, session: ort.InferenceSession, images: Sequence[ImageInput]) -> tuple[np.ndarray, ...]:
        """The vision graph's outputs for `images`, in prompt order; the first holds one feature row per
        image token (tokens, H), the others are the family's own (Qwen3-VL's DeepStack features)."""

    def chunk_inputs(
        self,
        vision: ort.InferenceSession,
        prompt: TokenizedPrompt,
        embeds: np.ndarray,
        history: Sequence[int],
        keys: int,
    ) -> dict[str, np.ndarray]:
        """Decoder inputs of one prefill chunk besides inputs_embeds, attention_mask and the KV.

        Runs the chunk's images through the vision graph; `prompt_inputs` writes their features into
        `embeds` (1, S, H) in place. `history` holds the token ids already in the KV, for masks that look
        back; `keys` is how many keys the chunk attends over (history, the chunk and any unwritten room).
        """
        outputs = None
        if prompt.images:
            outputs = self.vision(vision, prompt.images)
            slots, features = int(prompt.image_mask.sum()), len(outputs[0])
            if features != slots:  # a stale or foreign image
                raise RuntimeInputError(
                    f"the prompt has {slots} image tokens but its images give {features} embeddings"
                )
        return self.prompt_inputs(prompt, embeds, outputs, history, keys)

    @abstractmethod
    def prompt_inputs(
        self,
        prompt: TokenizedPrompt,
        embeds: np.ndarray,
        images: tuple | None,
        history: Sequence[int],
        keys: int,
    ) -> dict[str, np.ndarray]:
        """chunk_inputs' family part: the extra decoder inputs of `prompt`, with the vision outputs of its
        images (None without images, else as many feature rows as image tokens) written into `embeds`."""

    @abstractmethod
    def step_inputs(self, n: int, keys: int, next_position: int) -> dict[str, np.ndarray]:
        """The same extra inputs for one decoding step of n sequences attending over `keys` keys."""


def onnx_family_for(manifest: Manifest, tokenizer: Tokenizer, dtype: type[np.floating]) -> OnnxRuntimeFamily:
    return OnnxRuntimeFamily.registry.lookup(manifest.architecture)(manifest, tokenizer, dtype)
