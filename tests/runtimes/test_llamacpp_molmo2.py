"""The llama.cpp runtime on a hybrid Molmo2 bundle (Qwen3 text GGUF + ONNX vision), against transformers.

Measured on the tiny Molmo2 (f32 GGUF, f32 KV, flash attention off): last-token logits within ~2e-6 of
the reference, prefix and suffix chunks alike, image blocks decoded non-causally. Asserted: 2e-5, and
greedy tokens identical (the tiny model is checked to really generate that many).
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np
import pytest

llama_cpp = pytest.importorskip(
    "llama_cpp", reason="llama-cpp-python is not installed (pip install '.[llama]')"
)
pytest.importorskip("torch")

from engine.families import family_for  # noqa: E402
from runtimes.llamacpp import LlamaCppRuntime  # noqa: E402
from runtimes.protocol import RuntimeInputError, Sampling, Text  # noqa: E402
from runtimes.torch_ref import TorchRefRuntime  # noqa: E402
from tests.support import (  # noqa: E402
    assert_two_regions_and_crops_seen,
    fixed_points,
    molmo2_greedy_raw,
    picture,
    run_in_fresh_interpreter,
    timeless_result,
)

ATOL = 2e-5
NEW_TOKENS = 16


@pytest.fixture(scope="module")
def llama(tiny_molmo2_gguf: Path):
    runtime = LlamaCppRuntime(tiny_molmo2_gguf, device="cpu")
    yield runtime
    runtime.close()


@pytest.fixture(scope="module")
def reference(tiny_molmo2: Path) -> TorchRefRuntime:
    return TorchRefRuntime(tiny_molmo2, device="cpu")


@pytest.fixture(scope="module")
def family(llama, reference):
    assert llama.info.image == reference.info.image  # the engine's family sees the same model either way
    return family_for(llama.info.architecture, llama.info.image)


def assert_same_run(llama, reference, prefix_segments, suffix, n: int = 2) -> None:
    """Prefill + generate on both runtimes: prefix and whole-prompt logits close, tokens and counts equal."""
    ours, theirs = llama.prefill(prefix_segments, "base"), reference.prefill(prefix_segments, "base")
    assert ours.token_ids == theirs.token_ids and ours.next_position == theirs.next_position
    np.testing.assert_allclose(ours.state.logits, theirs.state[1], rtol=0, atol=ATOL)
    got = llama.generate(ours, suffix, n, Sampling(NEW_TOKENS))
    expected = reference.generate(theirs, suffix, n, Sampling(NEW_TOKENS))
    assert all(g.generated_tokens == NEW_TOKENS and g.finish_reason == "length" for g in expected)
    assert [g.token_ids for g in got] == [g.token_ids for g in expected]
    assert [(g.prompt_tokens, g.reused_tokens) for g in got] == [
        (g.prompt_tokens, g.reused_tokens) for g in expected
    ]
    np.testing.assert_allclose(
        suffix_logits(llama, ours, suffix),
        reference_suffix_logits(reference, theirs, suffix),
        rtol=0,
        atol=ATOL,
    )


def suffix_logits(llama, prefix, suffix) -> np.ndarray:
    """Last-token logits of `suffix` decoded on a copy of the prefix's sequence (a working slot)."""
    model, work = llama.model(prefix.variant), llama.model(prefix.variant).working[0]
    llama_cpp.llama_memory_seq_cp(model.memory, prefix.state.lease.seq_id, work, -1, -1)
    try:
        return llama._eval(model, suffix, work, prefix.next_position)[2]
    finally:
        model.clear(work)


def reference_suffix_logits(reference, prefix, suffix) -> np.ndarray:
    prompt = reference._tokenize(suffix, prefix.next_position)
    cache = copy.deepcopy(prefix.state[0])
    return reference._forward("base", prompt, cache, prefix.n_tokens, prefix.token_ids)


@pytest.mark.parametrize(("size", "resolution"), [((64, 64), 512), ((300, 500), 644)])
def test_prefill_and_greedy_tokens_match_torch_ref(llama, reference, family, size, resolution):
    image = family.prepare_image(picture(*size, seed=1), resolution, f"img{size}")
    prefix, suffix = family.image_prefix(image), family.question_suffix("Point to the dog.")
    assert_same_run(llama, reference, prefix, suffix)
    whole_ours, whole_theirs = (
        llama.prefill(prefix + suffix, "base"),
        reference.prefill(prefix + suffix, "base"),
    )
    np.testing.assert_allclose(whole_ours.state.logits, whole_theirs.state[1], rtol=0, atol=ATOL)


def test_view_and_crops_in_one_chunk_match_torch_ref(llama, reference, family):
    """Crops right after the view: one run of image tokens, one non-causal batch; and crops in a suffix."""
    image = family.prepare_image(picture(200, 120, seed=2), 512, "view")
    crops = [family.prepare_image(picture(w, h, seed=3), 378, f"crop{w}") for w, h in ((90, 60), (50, 110))]
    with_crops = family.question_suffix("What is it?", crops)
    assert_same_run(llama, reference, family.image_prefix(image) + with_crops[:-1], with_crops[-1:])
    assert_same_run(llama, reference, family.image_prefix(image), with_crops)


def test_text_between_images_in_one_chunk_is_refused(llama, family):
    first = family.prepare_image(picture(64, 64), 378, "a")
    second = family.prepare_image(picture(80, 40), 378, "b")
    segments = [*family.image_prefix(first), Text("and then"), *family.question_suffix("?", [second])]
    with pytest.raises(RuntimeInputError, match="text between its images"):
        llama.prefill(segments, "base")


def test_sampled_rollouts_batched_equal_one_by_one(llama, reference, family):
    image = family.prepare_image(picture(96, 64), 512, "sample")
    prefix_segments, suffix = family.image_prefix(image), family.question_suffix("find the dog")
    seeds = (5, 6, 7)
    prefix = llama.prefill(prefix_segments, "base")
    batched = llama.generate(prefix, suffix, 3, Sampling(12, temperature=1.0, seeds=seeds))
    alone = [llama.generate(prefix, suffix, 1, Sampling(12, temperature=1.0, seeds=(s,)))[0] for s in seeds]
    assert [g.token_ids for g in batched] == [g.token_ids for g in alone]
    assert len({tuple(g.token_ids) for g in batched}) > 1  # the streams differ
    theirs = reference.prefill(prefix_segments, "base")
    expected = reference.generate(theirs, suffix, 3, Sampling(12, temperature=1.0, seeds=seeds))
    assert [g.token_ids for g in batched] == [g.token_ids for g in expected]


@pytest.mark.parametrize("points", [False, True], ids=["model-points", "fixed-points"])
def test_pipeline_gives_the_same_result_on_llamacpp_and_torch_ref(
    llama, reference, tiny_molmo2_gguf, tiny_molmo2, points
):
    image = picture(300, 200, seed=3)
    wrap = fixed_points if points else (lambda runtime: runtime)
    ours = timeless_result(molmo2_greedy_raw(tiny_molmo2_gguf, "llamacpp"), wrap(llama), image)
    theirs = timeless_result(molmo2_greedy_raw(tiny_molmo2, "torch_ref"), wrap(reference), image)
    assert ours == theirs
    if points:
        assert_two_regions_and_crops_seen(ours)


def test_a_hybrid_bundle_runs_in_a_fresh_interpreter_without_torch(tiny_molmo2_gguf: Path) -> None:
    spec = {
        "model": {"bundle": str(tiny_molmo2_gguf), "runtime": "llamacpp", "device": "cpu"},
        "stages": [
            {"perceive": {"resolution": 378, "rollouts": 2, "max_new_tokens": 8}},
            {"fuse": {}},
            {"crop": {"min_side": 32, "resolution": 378}},
            {"reason": {"resolution": 378, "max_new_tokens": 8}},
        ],
    }
    output = run_in_fresh_interpreter(spec)
    assert output["heavy"] == [] and isinstance(output["answer"], str)


def test_the_hybrid_bundle_lists_its_gguf_and_onnx_files(tiny_molmo2_gguf: Path) -> None:
    from runtimes.bundle import read_manifest, verify

    manifest = read_manifest(tiny_molmo2_gguf)
    assert (manifest.format, manifest.architecture) == ("gguf", "Molmo2ForConditionalGeneration")
    roles = {"text": "base/model-f32.gguf", "vision": "base/vision.onnx", "embed": "base/embed.onnx"}
    assert manifest.variants == {"base": roles}
    assert set(manifest.files) == {"tokenizer.json", *roles.values()}
    assert {"image_token_id", "eos_token_ids"} <= set(manifest.tokens) and "processor" in manifest.model
    verify(tiny_molmo2_gguf, manifest)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"qk_norm_type": "olmo"}, "qk_norm_type='olmo'"),
        ({"norm_after": True}, "norm_after=True"),
        ({"attention_bias": True}, "attention_bias=True"),
        ({"rope_scaling_layers": [0]}, "rope_scaling_layers"),
    ],
)
def test_a_text_decoder_other_than_plain_qwen3_is_refused(tiny_molmo2, tmp_path, change, message):
    from engine.errors import UserError
    from export.gguf.base import GgufJob
    from export.gguf.molmo2 import Molmo2Gguf

    config = json.loads((tiny_molmo2 / "config.json").read_text())
    config["text_config"].update(change)
    with pytest.raises(UserError, match="cannot be exported to GGUF") as refused:
        Molmo2Gguf().export(GgufJob(tiny_molmo2, tmp_path / "out", "f32", None, config, None))
    assert message in str(refused.value) and not (tmp_path / "out").exists()


def test_a_perception_lora_is_refused_for_molmo2(tiny_molmo2, tmp_path):
    from engine.errors import UserError
    from export.gguf.base import GgufJob
    from export.gguf.molmo2 import Molmo2Gguf

    config = json.loads((tiny_molmo2 / "config.json").read_text())
    with pytest.raises(UserError, match="--perception-lora is not supported for Molmo2"):
        Molmo2Gguf().export(GgufJob(tiny_molmo2, tmp_path / "out", "f32", tmp_path / "lora", config, None))
