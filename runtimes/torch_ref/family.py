"""The per-architecture pieces of the transformers reference runtime, and their registry.

The runtime itself (runtimes/torch_ref/runtime.py) owns what every family shares: the KV cache, prefix forks,
batched decoding. A `TorchFamily` owns what differs between Hugging Face architectures: how a prompt of
segments becomes token ids and rope positions, which keyword arguments carry the pixels into the HF
forward, and the position ids of a decoding step. A family registers itself for the HF `architectures`
names it serves; the runtime picks one by `config.json`'s `architectures[0]`.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from pathlib import Path
from typing import Any, ClassVar

import torch
from tokenizers import Tokenizer

from runtimes.mrope import TokenizedPrompt
from runtimes.protocol import ImageConfig, Segment
from runtimes.registry import Registered, Registry, architecture_of


class TorchFamily(Registered, ABC):
    registry = Registry("torch_ref runtime")
    image_token_id: int  # the placeholder token whose embedding image features fill (or add to)

    def __init__(self, config: dict, tokenizer: Tokenizer, model_dir: Path) -> None:
        self.config = config
        self.tokenizer = tokenizer
        self.model_dir = model_dir

    @classmethod
    @abstractmethod
    def read_image_config(cls, model_dir: Path, config: dict) -> ImageConfig:
        """Preprocessing constants the engine's family needs, from the checkpoint's files (see checkpoint.py)."""

    def image_config(self) -> ImageConfig:
        return self.read_image_config(self.model_dir, self.config)

    @abstractmethod
    def tokenize(self, segments: Sequence[Segment], start_position: int) -> TokenizedPrompt:
        """Token ids and rope positions of a prompt continuing at rope position `start_position`."""

    @abstractmethod
    def forward_inputs(self, prompt: TokenizedPrompt, past: int, history: Sequence[int]) -> dict[str, Any]:
        """HF forward kwargs (besides input_ids and the cache) for `prompt` run after `past` cached tokens.

        `history` holds the token ids already in the cache (len == past), for masks that look back.
        Tensors are on the CPU; the runtime moves them.
        """

    @abstractmethod
    def decode_position_ids(self, length: int, next_position: int, n: int) -> torch.Tensor:
        """position_ids of one decoding step for n sequences of `length` tokens (rope at next_position)."""

    def batch_inputs(self, prompts: Sequence[TokenizedPrompt]) -> dict[str, Any]:
        """HF forward kwargs for whole sequences at once, input_ids and attention_mask included (training).

        One sequence is any family's forward_inputs; a family that can pad several into one batch overrides
        this (and sets `batches_sequences`), the others are trained one sequence per forward.
        """
        if len(prompts) != 1:
            raise ValueError(f"{type(self).__name__} trains one sequence per forward, got {len(prompts)}")
        (prompt,) = prompts
        ids = torch.tensor([prompt.token_ids])
        return {
            "input_ids": ids,
            "attention_mask": torch.ones_like(ids),
            **self.forward_inputs(prompt, 0, ()),
        }

    batches_sequences: ClassVar[bool] = False  # batch_inputs takes several sequences


def torch_family_for(config: dict, tokenizer: Tokenizer, model_dir: Path) -> TorchFamily:
    return TorchFamily.registry.lookup(architecture_of(config))(config, tokenizer, model_dir)
