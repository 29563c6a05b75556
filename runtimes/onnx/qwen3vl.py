"""Qwen3-VL in the ONNX runtime: M-RoPE positions (runtimes/mrope.py), a vision graph fed with host-computed
position tables (runtimes/families/qwen3vl.py) whose embeddings REPLACE the placeholders, and DeepStack
features handed to the decoder (zeros off the image tokens and on decoding steps)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import onnxruntime as ort

from runtimes import mrope
from runtimes.families.qwen3vl import qwen_vision_tables
from runtimes.mrope import TokenizedPrompt
from runtimes.onnx.family import OnnxRuntimeFamily
from runtimes.protocol import ImageInput, Segment


class Qwen3VLOnnxFamily(OnnxRuntimeFamily):
    architectures = ("Qwen3VLForConditionalGeneration",)

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.layout = mrope.Layout(int(self.tokens["image_token_id"]), int(self.sizes["spatial_merge_size"]))
        self.n_deep = int(self.sizes["num_deepstack"])

    def tokenize(self, segments: Sequence[Segment], start_position: int) -> TokenizedPrompt:
        return self.layout.tokenize(self.tokenizer, segments, start_position)

    def vision(
        self, session: ort.InferenceSession, images: Sequence[ImageInput]
    ) -> tuple[np.ndarray, np.ndarray]:
        """Images -> embeddings (tokens, H) and DeepStack features (n_deep, tokens, H), in prompt order.

        One run per image: a run of one frame takes the graph's fused attention, with no mask and memory
        linear in its patches (export/onnx/attention.py); several images in one run would take its
        block-masked path, (sum n_i)² large.
        """
        runs = [self._vision_one(session, image) for image in images]
        return np.concatenate([e for e, _ in runs]), np.concatenate([d for _, d in runs], axis=1)

    def _vision_one(self, session: ort.InferenceSession, image: ImageInput) -> tuple[np.ndarray, np.ndarray]:
        tables = qwen_vision_tables(
            image.grid_thw,
            num_grid_per_side=int(self.sizes["num_grid_per_side"]),
            merge_size=self.layout.merge_size,
        )
        frame_lengths = np.diff(tables.cu_seqlens)  # an image is one frame; a video's frames stay apart
        embeds, deepstack = session.run(
            None,
            {
                "pixel_values": image.pixel_values.astype(self.dtype, copy=False),
                "interp_indices": tables.interp_indices,
                "interp_weights": tables.interp_weights.astype(self.dtype, copy=False),
                "rotary_pos_ids": tables.rotary_pos_ids,
                "frame_ids": np.repeat(np.arange(len(frame_lengths), dtype=np.int64), frame_lengths),
            },
        )
        return embeds, deepstack

    def prompt_inputs(
        self,
        prompt: TokenizedPrompt,
        embeds: np.ndarray,
        images: tuple | None,
        history: Sequence[int],
        keys: int,
    ) -> dict[str, np.ndarray]:
        deepstack = np.zeros((self.n_deep, *embeds.shape), self.dtype)  # (n_deep, 1, S, H): zeros off images
        if images:
            image_embeds, image_deepstack = images
            embeds[0, prompt.image_mask] = image_embeds  # replace the placeholders
            deepstack[:, 0, prompt.image_mask] = image_deepstack
        return {"position_ids": prompt.positions[:, None, :], "deepstack_embeds": deepstack}  # (3, 1, S)

    def step_inputs(self, n: int, keys: int, next_position: int) -> dict[str, np.ndarray]:
        positions = np.broadcast_to(mrope.decode_positions(next_position, 1)[:, None, :], (3, n, 1))
        hidden = int(self.sizes["hidden_size"])
        return {
            "position_ids": np.ascontiguousarray(positions),
            "deepstack_embeds": np.zeros((self.n_deep, n, 1, hidden), self.dtype),
        }
