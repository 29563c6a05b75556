"""The parity suite's axes, (model family x runtime x weights variant x image size), and what each
runtime needs to show its logits.

Every runtime is compared with `torch_ref` (itself compared with transformers in test_reference.py). A
model is a tiny random checkpoint of a family's real architecture; its bundles are exported once per
session (tests/conftest.py). Tolerances are per runtime and model, measured on these models and stated
where they are set.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from unittest import mock

import numpy as np

from runtimes.protocol import Prefix, Sampling, Segment


@dataclass(frozen=True)
class Tolerance:
    """Max abs difference of last-token logits from torch_ref, on text-only prompts and on image prompts."""

    text: float
    image: float


@dataclass(frozen=True)
class Bundle:
    fixture: str  # the session fixture that exports it
    variants: tuple[str, ...]
    tolerance: Tolerance


# ONNX fp32: ~5e-6 measured (Qwen3-VL), ~3e-6 (Molmo2). llama.cpp f32 GGUF, f32 KV, flash attention off:
# Qwen3-VL text within ~2.5e-6, with images ~1.5e-3 (libmtmd's vision tower: most likely ggml's CPU GELU,
# which rounds its input to f16 for a table lookup; greedy winners lead by >= 0.17 on these prompts);
# Molmo2 (ONNX vision + Qwen3 text GGUF) ~2e-6.
FP32 = Tolerance(text=2e-5, image=2e-5)


@dataclass(frozen=True)
class Model:
    name: str
    checkpoint: str  # the session fixture that builds the tiny checkpoint
    lora: str | None  # the session fixture of its random perception LoRA
    bundles: dict[str, Bundle]  # runtime -> its bundle
    views: tuple[tuple[tuple[int, int], int | None], ...]  # (image width x height, resolution)
    question: str
    new_tokens: int  # greedy tokens compared per sequence (the tiny model makes that many before any eos)
    # pipeline resolutions: the view both stages share, another for the perceive stage, the crops'
    pipeline: tuple[int, int, int]


MODELS = (
    Model(
        "qwen3vl",
        "tiny_qwen3vl",
        "tiny_qwen3vl_lora",
        {
            "onnx": Bundle("tiny_qwen3vl_onnx", ("base", "perception"), FP32),
            "llamacpp": Bundle("tiny_qwen3vl_gguf", ("base", "perception"), Tolerance(1e-4, 5e-3)),
        },
        (((64, 64), None), ((96, 160), None), ((200, 72), None)),
        "where is the dog?",
        24,
        (128, 96, 96),
    ),
    Model(
        "molmo2",
        "tiny_molmo2",
        "tiny_molmo2_lora",
        {
            "onnx": Bundle("tiny_molmo2_onnx", ("base", "perception"), FP32),
            # the hybrid GGUF export refuses a LoRA (export/gguf/molmo2.py)
            "llamacpp": Bundle("tiny_molmo2_gguf", ("base",), FP32),
        },
        (((64, 64), 512), ((300, 500), 644)),
        "Point to the dog.",
        16,
        (512, 378, 378),
    ),
    Model(
        # 84 px crops of 14 px patches (36 position embeddings), constants from the vision config alone
        "molmo2-crop84",
        "tiny_molmo2_crop84",
        None,
        {"onnx": Bundle("tiny_molmo2_crop84_onnx", ("base",), FP32)},
        (((200, 120), None), ((90, 260), 170)),
        "Point to the dog.",
        16,
        (170, 84, 84),
    ),
)


@dataclass(frozen=True)
class Case:
    model: Model
    runtime: str
    variant: str = "base"
    view: tuple[tuple[int, int], int | None] | None = None

    def __str__(self) -> str:
        parts = [self.model.name, self.runtime, self.variant]
        if self.view is not None:
            (width, height), resolution = self.view
            parts.append(f"{width}x{height}@{resolution or 'full'}")
        return "-".join(parts)

    @property
    def bundle(self) -> Bundle:
        return self.model.bundles[self.runtime]


def cases(*, variants: bool = False, views: bool = False) -> list[Case]:
    """Every (model, runtime), times its variants and its views where asked."""
    found = []
    for model in MODELS:
        for runtime, bundle in model.bundles.items():
            for variant in bundle.variants if variants else ("base",):
                for view in model.views if views else (None,):
                    found.append(Case(model, runtime, variant, view))
    return found


def family_of(runtime):
    from engine.families import family_for

    return family_for(runtime.info.architecture, runtime.info.image)


def last_logits(prefix: Prefix) -> np.ndarray:
    """Logits after a prefix's last token (every runtime keeps them in the prefix state)."""
    state = prefix.state
    return state.logits if hasattr(state, "logits") else state[1]


def step_logits(
    runtime, prefix: Prefix, suffix: Sequence[Segment], steps: int, forced: Sequence[int] | None = None
) -> tuple[list[int], np.ndarray]:
    """One greedy sequence through the runtime's own decode loop: its tokens and the logits each step
    chose from, (steps, vocab), the first after the prompt. With `forced`, those tokens are fed instead of
    the winners (teacher forcing), so that two runtimes are compared on the same context at every step."""
    from runtimes.decoding import Sampler

    seen: list[np.ndarray] = []
    choose = Sampler.__call__

    def recorded(sampler: Sampler, logits: np.ndarray) -> np.ndarray:
        seen.append(logits[0].copy())
        return np.array([forced[len(seen) - 1]]) if forced is not None else choose(sampler, logits)

    with mock.patch.object(Sampler, "__call__", recorded):
        (generation,) = runtime.generate(prefix, suffix, 1, Sampling(steps, ignore_eos=True))
    return generation.token_ids, np.stack(seen)


def teacher_forced_drift(
    ours, reference, prefix_segments: Sequence[Segment], suffix: Sequence[Segment], steps: int
) -> tuple[np.ndarray, list[int]]:
    """|logits of `ours` - the reference's| at every decode step, (steps, vocab), both fed the reference's
    greedy tokens (base variant); and those tokens."""
    tokens, expected = step_logits(reference, reference.prefill(prefix_segments, "base"), suffix, steps)
    _, got = step_logits(ours, ours.prefill(prefix_segments, "base"), suffix, steps, forced=tokens)
    return np.abs(got - expected), tokens


def open_once(opened: dict, runtime: str, bundle, **options: object):
    """A runtime on a bundle (CPU) with these options, opened once per session in tests/conftest.py's
    `opened`."""
    from runtimes import open_runtime

    key = (runtime, bundle, *sorted(options.items()))
    if key not in opened:
        opened[key] = open_runtime(runtime, bundle, "cpu", **options)
    return opened[key]


def _torch_ref_suffix(runtime, prefix: Prefix, suffix: Sequence[Segment]) -> np.ndarray:
    prompt = runtime._tokenize(suffix, prefix.next_position)
    cache = copy.deepcopy(prefix.state[0])
    return runtime._forward(prefix.variant, prompt, cache, prefix.n_tokens, prefix.token_ids)


def _onnx_suffix(runtime, prefix: Prefix, suffix: Sequence[Segment]) -> np.ndarray:
    prompt = runtime._tokenize(suffix, prefix.next_position)
    graphs = runtime.graphs(prefix.variant)
    kv = graphs.decoder.start(prefix.state[0], prefix.n_tokens, room=len(prompt.token_ids))
    return runtime._forward(graphs, prompt, kv, prefix.token_ids)[0]


def _llamacpp_suffix(runtime, prefix: Prefix, suffix: Sequence[Segment]) -> np.ndarray:
    """Decoded on a copy of the prefix's sequence (a working slot), which is cleared afterwards."""
    import llama_cpp

    model = runtime.model(prefix.variant)
    work = model.working[0]
    llama_cpp.llama_memory_seq_cp(model.memory, prefix.state.lease.seq_id, work, -1, -1)
    try:
        return runtime._eval(model, suffix, work, prefix.next_position)[2]
    finally:
        model.clear(work)


# runtime -> last-token logits of a suffix run on top of a prefix, the prefix left as it was
SUFFIX_LOGITS: dict[str, Callable[..., np.ndarray]] = {
    "torch_ref": _torch_ref_suffix,
    "onnx": _onnx_suffix,
    "llamacpp": _llamacpp_suffix,
}


def open_reference(request, opened: dict, model: Model):
    """torch_ref on a model's checkpoint with its perception LoRA, opened once per session."""
    from runtimes.torch_ref import TorchRefRuntime

    checkpoint = request.getfixturevalue(model.checkpoint)
    lora = request.getfixturevalue(model.lora) if model.lora else None
    if ("torch_ref", checkpoint) not in opened:
        opened["torch_ref", checkpoint] = TorchRefRuntime(checkpoint, device="cpu", perception_lora=lora)
    return opened["torch_ref", checkpoint]
