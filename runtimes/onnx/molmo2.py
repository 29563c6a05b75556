"""Molmo2 in the ONNX runtime: the token layout of runtimes/families/molmo2.py, 1-D RoPE, pooled image features
ADDED to the <im_patch> embeddings, and the decoder's `token_types` input (1 = image token).

The decoder graph (export/onnx/molmo2.py) lets the image tokens of a chunk attend to every image token of
the whole sequence so far, in both directions, reading `token_types` over past + chunk - what transformers
does with `mm_token_type_ids` by absolute position (runtimes/torch_ref/molmo2.py). So a chunk holding several
images (a global view prefilled together with the reason stage's crops) is one bidirectional block, and a
chunk on top of a cached prefix sees the cached image tokens as the reference runtime does.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import onnxruntime as ort

from runtimes.families import molmo2 as image_layout
from runtimes.mrope import TokenizedPrompt
from runtimes.onnx.family import OnnxRuntimeFamily
from runtimes.protocol import ImageInput, Segment


class Molmo2OnnxFamily(OnnxRuntimeFamily):
    architectures = ("Molmo2ForConditionalGeneration",)

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.vocab = image_layout.image_vocab(self.tokenizer)
        # the checkpoint's processor_config.json switches, as the exporter copied them
        self.layout = image_layout.Layout.from_processor_config(self.sizes.get("processor") or {})

    def tokenize(self, segments: Sequence[Segment], start_position: int) -> TokenizedPrompt:
        return image_layout.tokenize(self.tokenizer, segments, self.vocab, start_position, self.layout)

    def vision(self, session: ort.InferenceSession, images: Sequence[ImageInput]) -> tuple[np.ndarray]:
        """Images -> (one feature per <im_patch> token (tokens, H),), in prompt order.

        One run for all images: the ViT attends within a 378 px crop only, so stacking the crops of
        several images changes nothing but the batch size.
        """
        pixels, pooling, _ = image_layout.stack_images(images)
        (features,) = session.run(
            None, {"pixel_values": pixels.astype(self.dtype, copy=False), "image_token_pooling": pooling}
        )
        return (features,)

    def prompt_inputs(
        self,
        prompt: TokenizedPrompt,
        embeds: np.ndarray,
        images: tuple | None,
        history: Sequence[int],
        keys: int,
    ) -> dict[str, np.ndarray]:
        if images:
            (features,) = images
            embeds[0, prompt.image_mask] += features  # ADDED to the <im_patch> embeddings
        types = np.zeros(keys, np.int64)  # slots not written yet are no image tokens
        written = image_layout.token_types([*history, *prompt.token_ids], self.vocab)  # (past + S,)
        types[: len(written)] = written
        return {"position_ids": prompt.positions, "token_types": types[None]}  # (1, S), (1, keys)

    def step_inputs(self, n: int, keys: int, next_position: int) -> dict[str, np.ndarray]:
        # a decoding step's query is text: the image block cannot apply, so the types may all be 0
        return {
            "position_ids": np.full((n, 1), next_position, np.int64),
            "token_types": np.zeros((n, keys), np.int64),
        }
