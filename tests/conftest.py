"""Shared fixtures: a tiny random Qwen3-VL checkpoint (built once per session) and a scripted runtime."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import pytest

from runtimes.base import Generation, Image, ImageConfig, ModelInfo, Prefix, Sampling, Segment, Text


@pytest.fixture(scope="session")
def tiny_qwen3vl(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from export.tiny import build_tiny_qwen3vl

    return build_tiny_qwen3vl(tmp_path_factory.mktemp("tiny") / "qwen3vl", seed=0)


class ScriptedRuntime:
    """Answers from a script instead of a model, and counts tokens like a real runtime would.

    A text segment counts one token per character, an image its n_tokens. For interpreter tests only.
    """

    def __init__(self, perceive_texts: Sequence[str], answer: str = "an answer", variants=("base",)) -> None:
        self.info = ModelInfo("Qwen3VLForConditionalGeneration", ImageConfig(), variants=tuple(variants))
        self.perceive_texts = list(perceive_texts)
        self.answer = answer
        self.prefills: list[tuple[str, ...]] = []
        self.calls: list[tuple[int, Sampling]] = []

    @staticmethod
    def count(segments: Sequence[Segment]) -> int:
        return sum(len(s.text) if isinstance(s, Text) else s.image.n_tokens for s in segments)

    def prefill(self, segments: Sequence[Segment], variant: str) -> Prefix:
        self.prefills.append(tuple(s.image.key for s in segments if isinstance(s, Image)))
        n = self.count(segments)
        return Prefix(variant=variant, token_ids=[0] * n, next_position=n, computed_tokens=n)

    def generate(
        self, prefix: Prefix, suffix: Sequence[Segment], n: int, sampling: Sampling
    ) -> list[Generation]:
        self.calls.append((n, sampling))
        # the family's localization prompt asks for bbox_2d JSON; anything else is the reason stage
        is_perceive = any("bbox_2d" in s.text for s in suffix if isinstance(s, Text))
        texts = [self.perceive_texts.pop(0) for _ in range(n)] if is_perceive else [self.answer] * n
        k = self.count(suffix)
        return [
            Generation(t, [1] * 3, k if i == 0 else 0, prefix.n_tokens + (k if i else 0), 3, 1.0)
            for i, t in enumerate(texts)
        ]

    def close(self) -> None:
        pass


@pytest.fixture
def scripted_runtime():
    return ScriptedRuntime
