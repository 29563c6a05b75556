"""The llama.cpp runtime on the GGUF bundles users deploy (`export gguf --quant f16|q8_0|q4_k_m`), which it
runs with an f16 KV cache, and flash attention off on the CPU (the engine's choice) or on (llama.cpp's
choice on a GPU, or asked for): both are tested. Each one against the f32 bundle of the same tiny
checkpoint (f32 KV, no flash attention): the logits of the prompt and of every decode step, and the greedy
SPARC pipeline on it.

Drift: |logits - the f32 bundle's| over a text prompt and the model's views (tests/parity/models.py), each
decoded DECODE_STEPS steps fed the f32 bundle's greedy tokens, so that both see the same context. The f32
logits span 5.2-7.0 at every step (Qwen3-VL). Measured here, max / mean, flash attention on | off:

    Qwen3-VL  f16 0.0083 / 0.0013 | 0.0080 / 0.0009   q8_0 0.24 / 0.025 | 0.19 / 0.025
              q4_k_m 0.95 / 0.14 | 0.92 / 0.14
    Molmo2    f16 0.0138 / 0.0015 | 0.0048 / 0.0006   q8_0 0.16 / 0.019 | 0.17 / 0.019
              q4_k_m 0.75 / 0.12 | 0.76 / 0.12

The bounds (BOUNDS) are the larger of each pair x about 1.5. Checked once on Qwen3-VL: weights of another
random checkpoint drift 6.0-6.4 / 1.0 in every quant; every weight scale off by 1% (f16) or 5% (q8_0 block
scales) gives 0.073 / 0.011 and 0.43 / 0.063, over both bounds; q4_k_m is caught from about 25% (1.55 / 0.27;
10% gives 1.13 / 0.17, inside its own rounding). The tiny model's rows are 128 or 256 values wide, and a
K-quant needs whole 256-value super-blocks: of the Qwen3-VL q4_k_m's 23 matrices only two ffn_down are Q4_K
(the last one Q6_K, as q4_k_m keeps some layers finer); llama.cpp's quantizer falls back to Q5_0 for 18 (and
Q8_0 for the output and one attn_v), so the tiny q4_k_m is mostly Q5_0.

On an AMX-INT8 Xeon (this machine) q8_0 and q4_k_m crashed llama.cpp until the runtime kept their weights
out of ggml's AMX buffers (runtimes/llamacpp/runtime.py): these tests are what found it.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pytest

pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed (pip install '.[llama]')")

from runtimes.protocol import Text  # noqa: E402
from tests.parity.models import MODELS, Case, Model, family_of, open_once, teacher_forced_drift  # noqa: E402
from tests.parity.pipelines import assert_reuse_changes_only_the_accounting, pipeline_spec  # noqa: E402
from tests.support import FixedGrounding, picture, timeless_result, without_texts  # noqa: E402


@dataclass(frozen=True)
class Drift:
    max: float  # max |logit - f32 logit| over every prompt and step
    mean: float  # its mean over the vocabulary, prompts and steps


DECODE_STEPS = 8
BOUNDS = {  # measured here (max, mean) x about 1.5
    ("qwen3vl", "f16"): Drift(0.0125, 0.002),  # 0.0083, 0.0013
    ("qwen3vl", "q8_0"): Drift(0.36, 0.0375),  # 0.24, 0.025
    ("qwen3vl", "q4_k_m"): Drift(1.4, 0.21),  # 0.95, 0.14
    ("molmo2", "f16"): Drift(0.02, 0.0022),  # 0.0138, 0.00145
    ("molmo2", "q8_0"): Drift(0.24, 0.029),  # 0.16, 0.019
    ("molmo2", "q4_k_m"): Drift(1.1, 0.175),  # 0.75, 0.117
}
GGUF_MODELS = {model.name: model for model in MODELS if "llamacpp" in model.bundles}
CASES = [pytest.param(GGUF_MODELS[name], quant, id=f"{name}-{quant}") for name, quant in BOUNDS]
FLASH_ATTENTION = [pytest.param(None, id="engine-choice"), pytest.param(True, id="flash-attention")]


@pytest.fixture
def flash_attention() -> bool | None:
    return None  # the engine's choice (off here, on the CPU); the drift test also runs it on


@pytest.fixture
def runtimes(request, gguf_as, opened, model: Model, quant: str, flash_attention: bool | None):
    """(the quantized bundle's runtime, the f32 bundle's), each opened once per session."""
    f32 = request.getfixturevalue(model.bundles["llamacpp"].fixture)
    ours = open_once(opened, "llamacpp", gguf_as(model.checkpoint, quant), flash_attention=flash_attention)
    return ours, open_once(opened, "llamacpp", f32)


@pytest.mark.parametrize("flash_attention", FLASH_ATTENTION)
@pytest.mark.parametrize(("model", "quant"), CASES)
def test_logit_drift_from_the_f32_bundle_is_within_the_quants_bound(runtimes, model: Model, quant: str):
    ours, f32 = runtimes
    assert ours.manifest.dtype == quant and f32.manifest.dtype == "f32"
    family = family_of(f32)
    prompts = [([Text("<|im_start|>user\nwhat is on the table?<|im_end|>\n<|im_start|>assistant\n")], [])]
    for (width, height), resolution in model.views:
        view = family.prepare_image(picture(width, height, seed=1), resolution, f"drift{width}x{height}")
        prompts.append((family.image_prefix(view), family.question_suffix(model.question)))
    drift = np.stack([teacher_forced_drift(ours, f32, *prompt, DECODE_STEPS)[0] for prompt in prompts])
    bound = BOUNDS[model.name, quant]
    measured = f"{model.name} {quant}: max {drift.max():.4f}, mean {drift.mean():.5f}"
    assert 0 < drift.max() <= bound.max and drift.mean() <= bound.mean, measured


@pytest.mark.parametrize(("model", "quant"), CASES)
def test_the_greedy_pipeline_runs_on_the_bundle(runtimes, model: Model, quant: str):
    ours, f32 = runtimes
    case = Case(model, "llamacpp")
    spec = pipeline_spec(case, "shared")  # greedy perceive with 2 rollouts, fuse, crop, reason
    image = picture(300, 200, seed=3)
    # with the groundings fixed, all but the texts is the f32 bundle's: regions, crops, token accounting
    fixed = timeless_result(spec, FixedGrounding(ours), image)
    assert len(fixed["regions"]) == 2 and fixed["crops"]
    assert fixed["stages"][-1]["visual_tokens"] > fixed["stages"][0]["visual_tokens"]  # view + crops
    assert without_texts(fixed) == without_texts(timeless_result(spec, FixedGrounding(f32), image))
    # f16 KV, flash attention and quantized matmuls round a prompt decoded in two parts (prefix + suffix)
    # differently from one part: greedy texts may then differ at a near-tie (Qwen3-VL q8_0's
    # own grounding did here)
    assert_reuse_changes_only_the_accounting(
        case, "shared", FixedGrounding(ours), image, fixed, same_texts=False
    )
    # the model's own greedy localizations: rollouts agree, and the run repeats exactly
    own = timeless_result(spec, ours, image)
    first, *others = own["stages"][0]["outputs"]
    assert others == [first] and isinstance(own["answer"], str)
    assert own == timeless_result(spec, ours, image)


def test_flash_attention_is_off_on_the_cpu_unless_asked(gguf_as, opened):
    """The option reaches llama.cpp: left out it decodes exactly as asked off, and asked on it rounds
    differently (its CPU kernel goes through f16)."""
    bundle = gguf_as("tiny_qwen3vl", "f16")
    runtime = {fa: open_once(opened, "llamacpp", bundle, flash_attention=fa) for fa in (None, False, True)}
    family = family_of(runtime[None])
    view = family.prepare_image(picture(96, 64, seed=2), None, "fa")
    prompt = family.image_prefix(view), family.question_suffix("where is the cup?")
    assert not teacher_forced_drift(runtime[None], runtime[False], *prompt, DECODE_STEPS)[0].any()
    assert teacher_forced_drift(runtime[True], runtime[False], *prompt, DECODE_STEPS)[0].max() > 0
