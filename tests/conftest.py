"""Shared fixtures: a tiny random Qwen3-VL checkpoint (built once per session) and a scripted runtime."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import pytest
from hypothesis import settings

from export import ONNX_QUANTS
from runtimes.protocol import Generation, Image, ImageConfig, ModelInfo, Prefix, Sampling, Segment, Text

# CI explores the same examples on every run, so a result never depends on the draw; locally they vary.
settings.register_profile("ci", derandomize=True)
if os.environ.get("CI"):
    settings.load_profile("ci")


@pytest.fixture(scope="session")
def tiny_qwen3vl(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from export.tiny import build_tiny_qwen3vl

    return build_tiny_qwen3vl(tmp_path_factory.mktemp("tiny") / "qwen3vl", seed=0)


@pytest.fixture(scope="session")
def tiny_molmo2(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from export.tiny_molmo2 import build_tiny_molmo2

    return build_tiny_molmo2(tmp_path_factory.mktemp("tiny") / "molmo2", seed=0)


@pytest.fixture(scope="session")
def tiny_qwen3vl_lora(tiny_qwen3vl: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random perception LoRA for the tiny Qwen3-VL: the bundles merge it, torch_ref applies it."""
    from export.tiny_lora import build_tiny_lora

    return build_tiny_lora(tiny_qwen3vl, tmp_path_factory.mktemp("lora") / "qwen3vl", seed=0)


@pytest.fixture(scope="session")
def tiny_molmo2_lora(tiny_molmo2: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random perception LoRA for the tiny Molmo2 (its q/v projections, vision tower's included)."""
    from export.tiny_lora import build_tiny_lora

    return build_tiny_lora(tiny_molmo2, tmp_path_factory.mktemp("lora") / "molmo2", seed=0)


def _export_onnx(model: Path, lora: Path, out: Path, *options: str) -> Path:
    from engine.cli import main

    args = ["export", "onnx", "--model", str(model), "--out", str(out), "--perception-lora", str(lora)]
    assert main([*args, *options]) == 0
    return out


@pytest.fixture(scope="session")
def tiny_qwen3vl_onnx(
    tiny_qwen3vl: Path, tiny_qwen3vl_lora: Path, tmp_path_factory: pytest.TempPathFactory
) -> Path:
    """The tiny model exported once to an fp32 ONNX bundle, with a 'perception' variant merged from its LoRA."""
    return _export_onnx(tiny_qwen3vl, tiny_qwen3vl_lora, tmp_path_factory.mktemp("onnx") / "bundle")


@pytest.fixture(scope="session")
def tiny_molmo2_onnx(
    tiny_molmo2: Path, tiny_molmo2_lora: Path, tmp_path_factory: pytest.TempPathFactory
) -> Path:
    """The tiny Molmo2 exported once to an fp32 ONNX bundle, with a 'perception' variant merged from its LoRA."""
    return _export_onnx(tiny_molmo2, tiny_molmo2_lora, tmp_path_factory.mktemp("molmo2-onnx") / "bundle")


@pytest.fixture(scope="session")
def tiny_qwen3vl_onnx_as(
    tiny_qwen3vl: Path, tiny_qwen3vl_lora: Path, tmp_path_factory: pytest.TempPathFactory
) -> Callable[[str], Path]:
    """fp16 or a --quant scheme -> the tiny model's ONNX bundle in that precision (`--dtype fp16`, `--quant
    int8|int4|int8-a8|int4-a8`), perception variant included, each exported once per session on first use."""
    options = {"fp16": ("--dtype", "fp16"), **{quant: ("--quant", quant) for quant in ONNX_QUANTS}}
    found: dict[str, Path] = {}

    def bundle(kind: str) -> Path:
        if kind not in found:
            out = tmp_path_factory.mktemp(f"onnx-{kind}") / "bundle"
            found[kind] = _export_onnx(tiny_qwen3vl, tiny_qwen3vl_lora, out, *options[kind])
        return found[kind]

    return bundle


def _export_gguf(model: Path, out: Path, quant: str, lora: Path | None = None) -> Path:
    """`sparc-engine export gguf` as a user types it; skips without llama-cpp-python."""
    pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed (pip install '.[llama]')")
    from engine.cli import main

    args = ["export", "gguf", "--model", str(model), "--out", str(out), "--quant", quant]
    assert main([*args, *(["--perception-lora", str(lora)] if lora else [])]) == 0
    return out


@pytest.fixture(scope="session")
def tiny_qwen3vl_gguf(
    tiny_qwen3vl: Path, tiny_qwen3vl_lora: Path, tmp_path_factory: pytest.TempPathFactory
) -> Path:
    """The tiny model exported once to an f32 GGUF bundle (+ a 'perception' variant merged from its
    LoRA); skips without llama-cpp-python."""
    return _export_gguf(tiny_qwen3vl, tmp_path_factory.mktemp("gguf") / "bundle", "f32", tiny_qwen3vl_lora)


@pytest.fixture(scope="session")
def tiny_molmo2_gguf(tiny_molmo2: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny Molmo2 exported once to an f32 hybrid GGUF bundle (text GGUF + ONNX vision and embed
    graphs); skips without llama-cpp-python."""
    return _export_gguf(tiny_molmo2, tmp_path_factory.mktemp("molmo2-gguf") / "bundle", "f32")


@pytest.fixture(scope="session")
def gguf_as(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Callable[..., Path]:
    """(checkpoint fixture, quant) -> that tiny checkpoint's GGUF bundle in that quant (base variant only),
    each exported once per session on first use; skips without llama-cpp-python."""
    found: dict[tuple[str, str], Path] = {}

    def bundle(checkpoint: str, quant: str) -> Path:
        if (checkpoint, quant) not in found:
            out = tmp_path_factory.mktemp(f"{checkpoint}-{quant}") / "bundle"
            found[checkpoint, quant] = _export_gguf(request.getfixturevalue(checkpoint), out, quant)
        return found[checkpoint, quant]

    return bundle


@pytest.fixture(scope="session")
def opened() -> Iterator[dict]:
    """Runtimes opened once per session, by (runtime, bundle): opening one costs more than a test."""
    runtimes: dict = {}
    yield runtimes
    for runtime in runtimes.values():
        runtime.close()


@pytest.fixture(scope="session")
def ray_address() -> Iterator[str]:
    """One local Ray for every test that needs it (starting one takes seconds): its GCS address, which
    `--ray ADDRESS` in another process joins. 4 logical CPUs leave room for 2 actors beside Ray Data."""
    ray = pytest.importorskip("ray", reason="ray is not installed (pip install '.[ray]')")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")  # nothing leaves the machine
    ray.init(num_cpus=4, include_dashboard=False, object_store_memory=200 * 2**20)
    yield ray.get_runtime_context().gcs_address
    ray.shutdown()


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
