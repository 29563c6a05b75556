"""Molmo2 in the reference runtime: 1-D RoPE, an image expanded to its token layout, and the image tokens
of a prefill chunk attending to each other in both directions.

transformers builds that bidirectional block from `mm_token_type_ids` (1 on every image token, see
runtimes/families/molmo2.py) whenever a forward adds image features, reading it by ABSOLUTE position: a
chunk run on top of a cache gets the types of the whole sequence so far. So a prefix holding the image
is exactly what a one-shot forward computes. Images in a later chunk (the crops of the reason stage)
attend to each other and to the cached image, but the cached image cannot attend to them: prefix reuse
is exact for one image per chunk; a one-shot HF forward over image + crops would differ there.
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from transformers.models.molmo2.modeling_molmo2 import Molmo2Model

from runtimes.families import molmo2 as image_layout
from runtimes.mrope import TokenizedPrompt
from runtimes.protocol import ImageConfig, RuntimeInputError, Segment
from runtimes.torch_ref.checkpoint import agreed, read_json
from runtimes.torch_ref.family import TorchFamily

# transformers 5.25 changed what several images' pooling rows index: before, the concatenated crops of
# all images (as Molmo2Processor returned them); since, each image's own crops, with `image_num_crops`
# saying how many each image has. Both are supported: the signature says which one is installed.
POOLING_PER_IMAGE = "image_num_crops" in inspect.signature(Molmo2Model.get_image_features).parameters

# transformers' Molmo2 defaults: what a checkpoint that leaves a constant unstated gets
CROP_SIZE, PATCH_SIZE, OVERLAP_MARGINS, POOLING, MAX_CROPS = 378, 14, (4, 4), (2, 2), 8


def molmo2_image_config(model_dir: Path, config: dict) -> ImageConfig:
    """Crop size, patch size, overlap margins, pooling and max crops of a Molmo2 checkpoint.

    From preprocessor_config.json; the crop and patch sizes also from the vision config, which sizes the
    ViT's position table and so must agree. Without stated margins the overlap keeps the released
    checkpoints' share of a crop (4 of 27 patches per side), which still leaves a window in small crops.
    """
    pre, vision = read_json(model_dir / "preprocessor_config.json"), config.get("vision_config") or {}
    crop = agreed(
        model_dir,
        ("size", _side(model_dir, "preprocessor_config.json size", pre.get("size"))),
        (
            "vision_config.image_size",
            _side(model_dir, "config.json vision_config.image_size", vision.get("image_size", CROP_SIZE)),
        ),
        CROP_SIZE,
    )
    patch = agreed(
        model_dir,
        ("patch_size", pre.get("patch_size")),
        ("vision_config.patch_size", vision.get("patch_size", PATCH_SIZE)),
        PATCH_SIZE,
    )
    if crop % patch:
        raise RuntimeInputError(
            f"{model_dir}: the crop size {crop} px is not a multiple of the patch size {patch} px"
        )
    patches = crop // patch
    share = OVERLAP_MARGINS[0] / (CROP_SIZE // PATCH_SIZE)
    margins = tuple(int(m) for m in pre.get("overlap_margins") or (round(share * patches),) * 2)
    if len(margins) != 2 or min(margins) < 0 or patches - sum(margins) < 1:
        raise RuntimeInputError(
            f"{model_dir}: overlap_margins {list(margins)} leave no window in a crop of {patches} patches "
            f"(size {crop} px, patch_size {patch} px)"
        )
    pooling = tuple(pre.get("pooling_size") or POOLING)
    if len(pooling) != 2 or pooling[0] != pooling[1]:
        raise RuntimeInputError(f"{model_dir}: pooling_size {list(pooling)} is not square (rows = cols)")
    return ImageConfig(
        patch_size=patch,
        merge_size=int(pooling[0]),  # patches per LLM token side
        temporal_patch_size=1,
        mean=tuple(pre.get("image_mean", (0.5, 0.5, 0.5))),
        std=tuple(pre.get("image_std", (0.5, 0.5, 0.5))),
        crop_size=crop,
        overlap_margins=margins,
        max_crops=int(pre.get("max_crops", MAX_CROPS)),
    )


def _side(model_dir: Path, where: str, size: object) -> int | None:
    """A square size as one number, from {height, width}, [height, width] or a number (None: unstated)."""
    if size is None:
        return None
    sides = [size.get("height"), size.get("width")] if isinstance(size, dict) else size
    sides = sides if isinstance(sides, list | tuple) else [sides]
    if len(set(sides)) != 1 or not isinstance(sides[0], int):
        raise RuntimeInputError(f"{model_dir}: {where} {size!r} is not one square side in pixels")
    return sides[0]


class Molmo2Torch(TorchFamily):
    architectures = ("Molmo2ForConditionalGeneration",)

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.image_token_id = self.config["image_patch_id"]  # <im_patch>: features are added to it
        processor = read_json(self.model_dir / "processor_config.json")
        self.layout = image_layout.Layout.from_processor_config(processor)
        self.vocab = image_layout.image_vocab(self.tokenizer)

    @classmethod
    def read_image_config(cls, model_dir: Path, config: dict) -> ImageConfig:
        return molmo2_image_config(model_dir, config)

    def tokenize(self, segments: Sequence[Segment], start_position: int) -> TokenizedPrompt:
        return image_layout.tokenize(self.tokenizer, segments, self.vocab, start_position, self.layout)

    def forward_inputs(self, prompt: TokenizedPrompt, past: int, history: Sequence[int]) -> dict[str, Any]:
        kwargs: dict[str, Any] = {"position_ids": torch.from_numpy(prompt.positions)}
        if not prompt.images:
            return kwargs
        pixels, pooling, grids = image_layout.stack_images(prompt.images)
        if POOLING_PER_IMAGE:
            pooling = np.concatenate(image_layout.own_pooling(prompt.images)).astype(np.int64)
            crops = [image.pixel_values.shape[0] for image in prompt.images]
            kwargs["image_num_crops"] = torch.tensor(crops, dtype=torch.int64)
        # whole sequence, not just this chunk: transformers indexes it by absolute position
        types = image_layout.token_types([*history, *prompt.token_ids], self.vocab)
        kwargs.update(
            pixel_values=torch.from_numpy(pixels),
            image_token_pooling=torch.from_numpy(pooling),
            image_grids=torch.from_numpy(grids),
            mm_token_type_ids=torch.from_numpy(types)[None],
        )
        return kwargs

    def decode_position_ids(self, length: int, next_position: int, n: int) -> torch.Tensor:
        return torch.full((n, 1), next_position)  # 1-D rope: the position is the sequence index
