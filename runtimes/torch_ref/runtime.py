"""The transformers reference runtime: the correctness oracle every other runtime is compared against.

It runs a Hugging Face checkpoint directory with transformers' own modeling code, but drives it the way
the engine wants: positions and tokens are computed host-side, a prefix's KV is computed once, and
`generate` forks it into n sequences decoded as one batch. What differs between architectures (token
layout, rope positions, pixel kwargs) sits in a `TorchFamily` picked by config.json's architectures[0].
"""

from __future__ import annotations

import copy
import functools
import inspect
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from tokenizers import Tokenizer
from transformers import AutoModelForImageTextToText, DynamicCache
from transformers.utils import logging as transformers_logging

from runtimes.decoding import decode
from runtimes.mrope import TokenizedPrompt
from runtimes.protocol import Generation, ModelInfo, Prefix, RuntimeInputError, Sampling, Segment
from runtimes.torch_ref.checkpoint import read_json
from runtimes.torch_ref.family import torch_family_for

# a CLI user wants the answer, not weight-loading progress bars and fallback notices
transformers_logging.set_verbosity_error()
transformers_logging.disable_progress_bar()


@functools.cache
def cache_keyword(model_class: type) -> str:
    """The forward's name for the KV cache: transformers 5.25 renamed `past_key_values` to `cache` (the
    old name is refused from 5.40); earlier versions know only `past_key_values`."""
    return "cache" if "cache" in inspect.signature(model_class.forward).parameters else "past_key_values"


def pick_device(device: str) -> str:
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise RuntimeInputError("device: cuda was asked for but torch sees no CUDA device")
    return device


class TorchRefRuntime:
    def __init__(
        self, model_dir: str | Path, device: str = "auto", perception_lora: str | Path | None = None
    ):
        self.model_dir = Path(model_dir)
        config = read_json(self.model_dir / "config.json")
        if not config:
            raise RuntimeInputError(f"{self.model_dir}: not a Hugging Face checkpoint (no config.json)")
        self.device = pick_device(device)
        self.tokenizer = Tokenizer.from_file(str(self.model_dir / "tokenizer.json"))
        self.family = torch_family_for(config, self.tokenizer, self.model_dir)
        self.image_token_id = self.family.image_token_id
        self.eos_ids = self._eos_ids(config)
        self.perception_lora = Path(perception_lora) if perception_lora else None
        variants = ("base", "perception") if self.perception_lora else ("base",)
        self.info = ModelInfo(
            architecture=config["architectures"][0],
            image=self.family.image_config(),
            variants=variants,
            max_context=config.get("text_config", {}).get("max_position_embeddings", 32768),
        )
        self._models: dict[str, torch.nn.Module] = {}

    def _eos_ids(self, config: dict) -> list[int]:
        eos = read_json(self.model_dir / "generation_config.json").get("eos_token_id")
        eos = eos if eos is not None else config.get("text_config", {}).get("eos_token_id")
        return sorted(set(eos if isinstance(eos, list) else [eos]) - {None})

    def model(self, variant: str) -> torch.nn.Module:
        if variant not in self.info.variants:
            raise RuntimeInputError(
                f"variant {variant!r} is not available here (have: {', '.join(self.info.variants)})"
            )
        if variant not in self._models:
            model = AutoModelForImageTextToText.from_pretrained(self.model_dir, dtype=torch.float32)
            if variant == "perception":
                from peft import PeftModel

                model = PeftModel.from_pretrained(model, self.perception_lora).merge_and_unload()
            self._models[variant] = model.to(self.device).eval()
        return self._models[variant]

    @torch.inference_mode()
    def _forward(
        self,
        variant: str,
        prompt: TokenizedPrompt,
        cache: DynamicCache,
        past: int,
        history: Sequence[int] = (),
    ) -> np.ndarray:
        """Run prompt tokens on top of `cache` (past tokens already in it, `history` their ids);
        returns last-token logits (vocab,)."""
        ids = torch.tensor([prompt.token_ids], device=self.device)
        kwargs = {k: v.to(self.device) for k, v in self.family.forward_inputs(prompt, past, history).items()}
        model = self.model(variant)
        out = model(input_ids=ids, use_cache=True, **{cache_keyword(type(model)): cache}, **kwargs)
        return out.logits[0, -1].float().cpu().numpy()

    def _tokenize(self, segments: Sequence[Segment], start_position: int) -> TokenizedPrompt:
        return self.family.tokenize(segments, start_position)

    def prefill(self, segments: Sequence[Segment], variant: str = "base") -> Prefix:
        self.model(variant)  # refuse an unknown variant before any work
        prompt = self._tokenize(segments, 0)
        cache = DynamicCache()
        logits = self._forward(variant, prompt, cache, 0) if prompt.token_ids else None
        return prompt.prefix(variant, (cache, logits))

    @torch.inference_mode()
    def generate(
        self, prefix: Prefix, suffix: Sequence[Segment], n: int, sampling: Sampling
    ) -> list[Generation]:
        start = time.perf_counter()
        parent_cache, logits = prefix.state
        cache = copy.deepcopy(parent_cache)  # the prefix stays intact for the next stage or query
        prompt = self._tokenize(suffix, prefix.next_position)
        if prompt.token_ids:
            logits = self._forward(prefix.variant, prompt, cache, prefix.n_tokens, prefix.token_ids)
        if logits is None:
            raise RuntimeInputError("generate needs a non-empty prompt")
        if n > 1:
            cache.batch_repeat_interleave(n)
        model = self.model(prefix.variant)
        keyword = cache_keyword(type(model))
        length = prefix.n_tokens + len(prompt.token_ids)
        next_position = prompt.next_position

        def step(tokens: np.ndarray) -> np.ndarray:
            nonlocal length, next_position
            positions = self.family.decode_position_ids(length, next_position, n).to(self.device)
            ids = torch.from_numpy(tokens.astype(np.int64))[:, None].to(self.device)
            out = model(input_ids=ids, position_ids=positions, use_cache=True, **{keyword: cache})
            length += 1
            next_position += 1
            return out.logits[:, -1].float().cpu().numpy()

        result = decode(np.repeat(logits[None], n, axis=0), step, sampling, self.eos_ids)
        return result.generations(self.tokenizer, prefix.n_tokens, len(prompt.token_ids), start)

    def close(self) -> None:
        self._models.clear()
