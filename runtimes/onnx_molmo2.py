"""Molmo2 in the ONNX runtime: the token layout of runtimes/molmo2_layout.py, 1-D RoPE, pooled image features
ADDED to the <im_patch> embeddings, and the decoder's `token_types` input (1 = image token).

The decoder graph (export/onnx/molmo2.py) lets the image tokens of a chunk attend to every image token of
the whole sequence so far, in both directions, reading `token_types` over past + chunk - what transformers
does with `mm_token_type_ids` by absolute position (runtimes/torch_molmo2.py). So a chunk holding several
images (a global view prefilled together with the reason stage's crops) is one bidirectional block, and a
chunk on top of a cached prefix sees the cached image tokens as the reference runtime does.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import onnxruntime as ort

from runtimes import molmo2_layout
from runtimes.base import ImageConfig, ImageInput, Segment
from runtimes.mrope import TokenizedPrompt
from runtimes.onnx_families import OnnxRuntimeFamily, check_feature_count


class Molmo2OnnxFamily(OnnxRuntimeFamily):
    architectures = ("Molmo2ForConditionalGeneration",)

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.vocab = molmo2_layout.image_vocab(self.tokenizer)
        # the checkpoint's processor_config.json switches, as the exporter copied them
        self.layout = molmo2_layout.Layout.from_processor_config(self.sizes.get("processor") or {})

    def image_config(self) -> ImageConfig:
        """What the reference runtime reads from the checkpoint (runtimes/torch_molmo2.py): the export
        driver's generic `image` section has Qwen-style defaults (temporal_patch_size) Molmo2 lacks."""
        pre = self.sizes.get("preprocessing") or {}
        return ImageConfig(
            patch_size=pre.get("patch_size", 14),
            merge_size=(pre.get("pooling_size") or [2, 2])[0],  # patches per LLM token side
            temporal_patch_size=1,
            mean=tuple(pre.get("image_mean") or self.manifest_image.mean),
            std=tuple(pre.get("image_std") or self.manifest_image.std),
        )

    def tokenize(self, segments: Sequence[Segment], start_position: int) -> TokenizedPrompt:
        return molmo2_layout.tokenize(self.tokenizer, segments, self.vocab, start_position, self.layout)

    def vision(self, session: ort.InferenceSession, images: Sequence[ImageInput]) -> np.ndarray:
        """Images -> one feature per <im_patch> token (tokens, H), in prompt order.

        One run for all images: the ViT attends within a 378 px crop only, so stacking the crops of
        several images changes nothing but the batch size.
        """
        pixels, pooling, _ = molmo2_layout.stack_images(images)
        (features,) = session.run(
            None, {"pixel_values": pixels.astype(self.dtype, copy=False), "image_token_pooling": pooling}
        )
        return features

    def chunk_inputs(
        self,
        vision: ort.InferenceSession,
        prompt: TokenizedPrompt,
        embeds: np.ndarray,
        history: Sequence[int],
    ) -> dict[str, np.ndarray]:
        if prompt.images:
            features = self.vision(vision, prompt.images)
            check_feature_count(prompt, len(features))
            embeds[0, prompt.image_mask] += features
        types = molmo2_layout.token_types([*history, *prompt.token_ids], self.vocab)  # (past + S,)
        return {"position_ids": prompt.positions, "token_types": types[None]}  # (1, S), (1, past + S)

    def step_inputs(self, n: int, length: int, next_position: int) -> dict[str, np.ndarray]:
        # a decoding step's query is text: the image block cannot apply, so the types may all be 0
        return {
            "position_ids": np.full((n, 1), next_position, np.int64),
            "token_types": np.zeros((n, length + 1), np.int64),
        }
