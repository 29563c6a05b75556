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

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from runtimes.families import molmo2 as image_layout
from runtimes.mrope import TokenizedPrompt
from runtimes.protocol import ImageConfig, RuntimeInputError, Segment
from runtimes.torch_ref.family import TorchFamily

# Preprocessing the engine implements (engine/families/molmo2/pixels.py); a checkpoint asking for other values
# is refused rather than fed pixels it was not trained on.
SUPPORTED_PREPROCESSING = {
    "size": {"height": 378, "width": 378},
    "patch_size": 14,
    "overlap_margins": [4, 4],
    "pooling_size": [2, 2],
}


def checkpoint_json(model_dir: Path, name: str) -> dict:
    """A processor file of the checkpoint ({} when it has none: transformers' defaults apply)."""
    path = model_dir / name
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}


def checked_preprocessor_config(model_dir: Path) -> dict:
    """The checkpoint's preprocessor_config.json, refused if it asks for other preprocessing than the engine's."""
    preprocessor = checkpoint_json(model_dir, "preprocessor_config.json")
    problems = [
        f"{key}={preprocessor[key]!r} (supported: {value!r})"
        for key, value in SUPPORTED_PREPROCESSING.items()
        if key in preprocessor and preprocessor[key] != value
    ]
    if problems:
        raise RuntimeInputError(f"{model_dir}: unsupported Molmo2 preprocessing: {'; '.join(problems)}")
    return preprocessor


def molmo2_image_config(preprocessor: dict) -> ImageConfig:
    """The engine's ImageConfig of a Molmo2 checkpoint (the ONNX export writes the same into its manifest)."""
    return ImageConfig(
        patch_size=preprocessor.get("patch_size", 14),
        merge_size=preprocessor.get("pooling_size", [2, 2])[0],  # patches per LLM token side
        temporal_patch_size=1,
        mean=tuple(preprocessor.get("image_mean", (0.5, 0.5, 0.5))),
        std=tuple(preprocessor.get("image_std", (0.5, 0.5, 0.5))),
    )


class Molmo2Torch(TorchFamily):
    architectures = ("Molmo2ForConditionalGeneration",)

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.image_token_id = self.config["image_patch_id"]  # <im_patch>: features are added to it
        self.preprocessor = checked_preprocessor_config(self.model_dir)
        processor = checkpoint_json(self.model_dir, "processor_config.json")
        self.layout = image_layout.Layout.from_processor_config(processor)
        self.vocab = image_layout.image_vocab(self.tokenizer)

    def image_config(self) -> ImageConfig:
        return molmo2_image_config(self.preprocessor)

    def tokenize(self, segments: Sequence[Segment], start_position: int) -> TokenizedPrompt:
        return image_layout.tokenize(self.tokenizer, segments, self.vocab, start_position, self.layout)

    def forward_inputs(self, prompt: TokenizedPrompt, past: int, history: Sequence[int]) -> dict[str, Any]:
        kwargs: dict[str, Any] = {"position_ids": torch.from_numpy(prompt.positions)}
        if not prompt.images:
            return kwargs
        pixels, pooling, grids = image_layout.stack_images(prompt.images)
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
