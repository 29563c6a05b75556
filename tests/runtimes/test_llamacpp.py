"""The llama.cpp runtime against the transformers reference, on the tiny Qwen3-VL exported to f32 GGUF.

Measured on the tiny model (f32 GGUF, f32 KV, flash attention off; logits std ~0.9): text-only logits
within ~2.5e-6 of the reference; with images within ~1.5e-3 (the vision tower: most likely ggml's CPU
GELU, which rounds its input to f16 for a table lookup). Greedy winners lead by >= 0.17 on these prompts,
so greedy tokens are identical. Tolerances asserted: 1e-4 (text) and 5e-3 (images).
"""

import shutil

import numpy as np
import pytest

pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed (pip install '.[llama]')")

from engine.families import family_for  # noqa: E402
from engine.pipeline import Pipeline  # noqa: E402
from engine.spec import validate  # noqa: E402
from runtimes.llamacpp import LlamaCppRuntime, image_rgb  # noqa: E402
from runtimes.protocol import RuntimeInputError, Sampling, Text  # noqa: E402
from runtimes.torch_ref import TorchRefRuntime  # noqa: E402
from tests.support import picture

TEXT_ATOL = 1e-4
IMAGE_ATOL = 5e-3


@pytest.fixture(scope="module")
def llama(tiny_qwen3vl_gguf):
    runtime = LlamaCppRuntime(tiny_qwen3vl_gguf, device="cpu")
    yield runtime
    runtime.close()


@pytest.fixture(scope="module")
def reference(tiny_qwen3vl, tiny_qwen3vl_gguf):
    return TorchRefRuntime(
        tiny_qwen3vl, device="cpu", perception_lora=tiny_qwen3vl_gguf.parent / "perception-lora"
    )


@pytest.fixture(scope="module")
def family(llama):
    return family_for(llama.info.architecture, llama.info.image)


def last_logits(prefix):
    """Logits after a prefix's last token (both runtimes keep them in the prefix state)."""
    state = prefix.state
    return state.logits if hasattr(state, "logits") else state[1]


def test_image_pixels_are_recovered_exactly(family):
    image = picture(96, 160)
    prepared = family.prepare_image(image, None, "px")
    assert np.array_equal(image_rgb(prepared, family.image_config), np.asarray(image))  # 96x160: on the grid


@pytest.mark.parametrize("variant", ["base", "perception"])
def test_text_only_logits_and_greedy_tokens_match_reference(llama, reference, variant):
    segments = [Text("<|im_start|>user\nwhat is on the table?<|im_end|>\n<|im_start|>assistant\n")]
    ours, theirs = llama.prefill(segments, variant), reference.prefill(segments, variant)
    assert ours.token_ids == theirs.token_ids and ours.next_position == theirs.next_position
    np.testing.assert_allclose(last_logits(ours), last_logits(theirs), atol=TEXT_ATOL, rtol=0)
    expected = reference.generate(theirs, [], 1, Sampling(16))[0].token_ids
    assert llama.generate(ours, [], 1, Sampling(16))[0].token_ids == expected


@pytest.mark.parametrize("size", [(64, 64), (96, 160), (200, 72)])
def test_image_prompts_match_reference(llama, reference, family, size):
    image = family.prepare_image(picture(*size), None, f"img{size}")
    crop = family.prepare_image(picture(50, 90, seed=1), None, "crop")
    prefix_segments = family.image_prefix(image)
    suffix = family.question_suffix("where is the cat?", [crop])  # a crop: an image in the suffix
    ours, theirs = llama.prefill(prefix_segments, "base"), reference.prefill(prefix_segments, "base")
    assert ours.next_position == theirs.next_position  # M-RoPE: the image takes max(h, w) positions
    np.testing.assert_allclose(last_logits(ours), last_logits(theirs), atol=IMAGE_ATOL, rtol=0)
    whole_ours = llama.prefill(prefix_segments + suffix, "base")
    whole_theirs = reference.prefill(prefix_segments + suffix, "base")
    assert whole_ours.token_ids == whole_theirs.token_ids
    np.testing.assert_allclose(last_logits(whole_ours), last_logits(whole_theirs), atol=IMAGE_ATOL, rtol=0)
    expected = [g.token_ids for g in reference.generate(theirs, suffix, 2, Sampling(16))]
    generations = llama.generate(ours, suffix, 2, Sampling(16))
    assert [g.token_ids for g in generations] == expected
    assert generations[0].prompt_tokens == len(whole_ours.token_ids) - ours.n_tokens
    assert generations[1].reused_tokens == len(whole_ours.token_ids)


def test_forked_sampled_rollouts_equal_independent_runs(llama, family):
    image = family.prepare_image(picture(96, 64), None, "sample")
    prefix = llama.prefill(family.image_prefix(image), "base")
    suffix = family.question_suffix("find the dog")
    seeds = (5, 6, 7)
    batched = llama.generate(prefix, suffix, 3, Sampling(12, temperature=1.0, seeds=seeds))
    alone = [llama.generate(prefix, suffix, 1, Sampling(12, temperature=1.0, seeds=(s,)))[0] for s in seeds]
    assert [g.token_ids for g in batched] == [g.token_ids for g in alone]
    assert len({tuple(g.token_ids) for g in batched}) > 1  # the streams differ
    again = llama.generate(prefix, suffix, 3, Sampling(12, temperature=1.0, seeds=seeds))
    assert [g.token_ids for g in again] == [g.token_ids for g in batched]  # the prefix is intact


def test_prefix_sequences_are_pooled_and_freed(tiny_qwen3vl_gguf):
    runtime = LlamaCppRuntime(tiny_qwen3vl_gguf, device="cpu", prefix_slots=2, max_rollouts=2)
    try:
        first, second = runtime.prefill([Text("a")], "base"), runtime.prefill([Text("b")], "base")
        with pytest.raises(RuntimeInputError, match="all 2 prefix sequences are held"):
            runtime.prefill([Text("c")], "base")
        with pytest.raises(RuntimeInputError, match="1..2"):
            runtime.generate(first, [Text(" d")], 3, Sampling(2))
        del first  # an evicted prefix frees its sequence
        third = runtime.prefill([Text("c")], "base")
        second.state.release()
        with pytest.raises(RuntimeInputError, match="released"):
            runtime.generate(second, [], 1, Sampling(2))
        assert runtime.generate(third, [Text(" d")], 2, Sampling(2))[0].generated_tokens == 2
    finally:
        runtime.close()


def test_sparc_pipeline_gives_the_reference_result(llama, reference):
    spec = validate(
        {
            "model": {"bundle": "unused"},
            "stages": [
                {"perceive": {"resolution": 128, "rollouts": 3, "temperature": 0.0, "max_new_tokens": 24}},
                {"fuse": {"iou_thr": 0.5}},
                {"crop": {"min_side": 64, "resolution": 64}},
                {"reason": {"resolution": 128, "max_new_tokens": 16}},
            ],
        }
    )
    image = picture(200, 120, seed=3)
    ours = Pipeline(spec, llama).run(image, "what colour is the box?")
    theirs = Pipeline(spec, reference).run(image, "what colour is the box?")
    assert ours.answer == theirs.answer
    assert [(r.box.as_list(), r.score) for r in ours.regions] == [
        (r.box.as_list(), r.score) for r in theirs.regions
    ]
    assert [s.outputs for s in ours.stages] == [s.outputs for s in theirs.stages]
    assert [s.prompt_tokens for s in ours.stages] == [s.prompt_tokens for s in theirs.stages]


def test_tampered_bundle_is_refused(tiny_qwen3vl_gguf, tmp_path):
    bundle = shutil.copytree(tiny_qwen3vl_gguf, tmp_path / "bundle")
    weights = next((bundle / "base").glob("model-*.gguf"))
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(RuntimeInputError, match="does not match its sha256"):
        LlamaCppRuntime(bundle, device="cpu")


def test_unknown_variant_is_refused(tiny_qwen3vl_gguf, llama):
    with pytest.raises(RuntimeInputError, match="variant 'lowres' is not available"):
        llama.prefill([Text("hi")], "lowres")


def test_opened_by_name_and_without_torch(tiny_qwen3vl_gguf):
    import subprocess
    import sys

    from runtimes import open_runtime

    runtime = open_runtime("llamacpp", tiny_qwen3vl_gguf, "cpu")
    assert isinstance(runtime, LlamaCppRuntime) and runtime.info.variants == ("base", "perception")
    runtime.close()
    code = "import sys, runtimes.llamacpp; sys.exit(any(m in sys.modules for m in ('torch', 'transformers')))"
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0  # the device run path
