"""Qwen3-VL in the reference runtime: M-RoPE positions (runtimes/mrope.py), pixels as patch rows + grids."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from runtimes import mrope
from runtimes.mrope import TokenizedPrompt
from runtimes.protocol import ImageConfig, Segment
from runtimes.torch_ref.checkpoint import agreed, read_json
from runtimes.torch_ref.family import TorchFamily


class Qwen3VLTorch(TorchFamily):
    architectures = ("Qwen3VLForConditionalGeneration",)
    batches_sequences = True

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.image_token_id = self.config["image_token_id"]
        self.layout = mrope.Layout(self.image_token_id, self.config["vision_config"]["spatial_merge_size"])

    @classmethod
    def read_image_config(cls, model_dir: Path, config: dict) -> ImageConfig:
        pre, vision = read_json(model_dir / "preprocessor_config.json"), config.get("vision_config") or {}
        size = pre.get("size") or {}
        return ImageConfig(
            patch_size=agreed(
                model_dir,
                ("patch_size", pre.get("patch_size")),
                ("vision_config.patch_size", vision.get("patch_size")),
                16,
            ),
            merge_size=agreed(
                model_dir,
                ("merge_size", pre.get("merge_size")),
                ("vision_config.spatial_merge_size", vision.get("spatial_merge_size")),
                2,
            ),
            temporal_patch_size=agreed(
                model_dir,
                ("temporal_patch_size", pre.get("temporal_patch_size")),
                ("vision_config.temporal_patch_size", vision.get("temporal_patch_size")),
                2,
            ),
            mean=tuple(pre.get("image_mean", (0.5, 0.5, 0.5))),
            std=tuple(pre.get("image_std", (0.5, 0.5, 0.5))),
            max_pixels=size.get("longest_edge", pre.get("max_pixels", 16_777_216)),
        )

    def tokenize(self, segments: Sequence[Segment], start_position: int) -> TokenizedPrompt:
        return self.layout.tokenize(self.tokenizer, segments, start_position)

    def forward_inputs(self, prompt: TokenizedPrompt, past: int, history: Sequence[int]) -> dict[str, Any]:
        seq = torch.arange(past, past + len(prompt.token_ids))[None]
        # [4, 1, S]: the first row is the plain sequence index transformers uses for the causal mask
        kwargs: dict[str, Any] = {
            "position_ids": torch.cat([seq, torch.from_numpy(prompt.positions)], dim=0)[:, None, :]
        }
        if prompt.images:
            kwargs["pixel_values"] = torch.from_numpy(
                np.concatenate([im.pixel_values for im in prompt.images])
            )
            kwargs["image_grid_thw"] = torch.tensor([im.grid_thw for im in prompt.images])
        return kwargs

    def decode_position_ids(self, length: int, next_position: int, n: int) -> torch.Tensor:
        rope = torch.from_numpy(mrope.decode_positions(next_position, 1))[:, None, :].expand(3, n, 1)
        return torch.cat([torch.full((1, n, 1), length), rope], dim=0)  # [4, n, 1]

    def batch_inputs(self, prompts: Sequence[TokenizedPrompt]) -> dict[str, Any]:
        """Sequences padded on the right to one length; every image's patches concatenated in order."""
        length = max(len(p.token_ids) for p in prompts)
        ids = torch.zeros((len(prompts), length), dtype=torch.long)
        mask = torch.zeros_like(ids)
        positions = torch.zeros((4, len(prompts), length), dtype=torch.long)
        for row, prompt in enumerate(prompts):
            n = len(prompt.token_ids)
            ids[row, :n] = torch.tensor(prompt.token_ids)
            mask[row, :n] = 1
            positions[0, row, :n] = torch.arange(n)
            positions[1:, row, :n] = torch.from_numpy(prompt.positions)
        images = [image for prompt in prompts for image in prompt.images]
        kwargs: dict[str, Any] = {"input_ids": ids, "attention_mask": mask, "position_ids": positions}
        if images:
            kwargs["pixel_values"] = torch.from_numpy(np.concatenate([im.pixel_values for im in images]))
            kwargs["image_grid_thw"] = torch.tensor([im.grid_thw for im in images])
        return kwargs
