"""The onnxruntime runtime against the transformers reference on the tiny Molmo2 bundle.

Tolerance: last-token logits of a prefill or of a suffix chunk match within ~3e-6 (max abs, fp32); the
tests allow 2e-5. Greedy tokens must be identical, and the tiny model is checked to really generate that
many tokens.
"""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("torch")
ort = pytest.importorskip("onnxruntime")


from engine.families import family_for  # noqa: E402
from runtimes.onnx import OnnxRuntime  # noqa: E402
from runtimes.onnx.session import DecoderSession  # noqa: E402
from runtimes.protocol import Sampling  # noqa: E402
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
NEW_TOKENS = 16  # greedy tokens compared per sequence


@pytest.fixture(scope="module")
def onnx_runtime(tiny_molmo2_onnx: Path) -> OnnxRuntime:
    return OnnxRuntime(tiny_molmo2_onnx, device="cpu")


@pytest.fixture(scope="module")
def reference(tiny_molmo2: Path) -> TorchRefRuntime:
    return TorchRefRuntime(tiny_molmo2, device="cpu")


@pytest.fixture(scope="module")
def family(onnx_runtime, reference):
    assert onnx_runtime.info == reference.info  # the engine's family sees the same model either way
    return family_for(onnx_runtime.info.architecture, onnx_runtime.info.image)


def assert_same_run(onnx_runtime, reference, prefix_segments, suffix, n: int = 2) -> None:
    """Prefill + generate on both runtimes: prefix and suffix logits close, tokens and counts identical.

    The logits are the sharp check: the tiny model's greedy tokens survive even a causal-only image mask.
    """
    ours = onnx_runtime.prefill(prefix_segments, "base")
    theirs = reference.prefill(prefix_segments, "base")
    assert ours.token_ids == theirs.token_ids and ours.next_position == theirs.next_position
    np.testing.assert_allclose(ours.state[1], theirs.state[1], rtol=0, atol=ATOL)
    prompt = onnx_runtime._tokenize(suffix, ours.next_position)
    graphs = onnx_runtime.graphs("base")
    got, _ = onnx_runtime._forward(graphs, prompt, ours.state[0], ours.n_tokens, ours.token_ids)
    cache = copy.deepcopy(theirs.state[0])
    expected = reference._forward("base", prompt, cache, theirs.n_tokens, theirs.token_ids)
    np.testing.assert_allclose(got, expected, rtol=0, atol=ATOL)
    got = onnx_runtime.generate(ours, suffix, n, Sampling(NEW_TOKENS))
    expected = reference.generate(theirs, suffix, n, Sampling(NEW_TOKENS))
    assert all(g.generated_tokens == NEW_TOKENS and g.finish_reason == "length" for g in expected)
    assert [g.token_ids for g in got] == [g.token_ids for g in expected]
    assert [(g.prompt_tokens, g.reused_tokens) for g in got] == [
        (g.prompt_tokens, g.reused_tokens) for g in expected
    ]


@pytest.mark.parametrize(("size", "resolution"), [((64, 64), 512), ((300, 500), 644)])
def test_prefill_and_greedy_tokens_match_torch_ref(onnx_runtime, reference, family, size, resolution):
    image = family.prepare_image(picture(*size, seed=1), resolution, f"img{size}")
    suffix = family.question_suffix("Point to the dog.")
    assert_same_run(onnx_runtime, reference, family.image_prefix(image), suffix)


def test_several_images_in_one_chunk_match_torch_ref(onnx_runtime, reference, family):
    """Crops both ways: prefilled in one chunk with the global view (every image token attends to every
    other), and appended in a suffix on top of the cached view; the suffix then has no or some images."""
    image = family.prepare_image(picture(200, 120, seed=2), 512, "view")
    crops = [family.prepare_image(picture(w, h, seed=3), 378, f"crop{w}") for w, h in ((90, 60), (50, 110))]
    with_crops = family.question_suffix("What is it?", crops)
    one_chunk = family.image_prefix(image) + with_crops[:-1]
    assert_same_run(onnx_runtime, reference, one_chunk, with_crops[-1:])
    assert_same_run(onnx_runtime, reference, family.image_prefix(image), with_crops)


def test_sampled_rollouts_batched_equal_one_by_one_and_the_prefix_is_not_mutated(
    onnx_runtime, reference, family
):
    image = family.prepare_image(picture(96, 64), 512, "sample")
    prefix_segments, suffix = family.image_prefix(image), family.question_suffix("find the dog")
    seeds = (5, 6, 7)
    prefix = onnx_runtime.prefill(prefix_segments, "base")
    kv_before = [value.copy() for value in prefix.state[0]]
    batched = onnx_runtime.generate(prefix, suffix, 3, Sampling(12, temperature=1.0, seeds=seeds))
    alone = [
        onnx_runtime.generate(prefix, suffix, 1, Sampling(12, temperature=1.0, seeds=(s,)))[0] for s in seeds
    ]
    assert [g.token_ids for g in batched] == [g.token_ids for g in alone]
    assert len({tuple(g.token_ids) for g in batched}) > 1  # the streams differ
    assert all(np.array_equal(a, b) for a, b in zip(kv_before, prefix.state[0], strict=True))
    theirs = reference.prefill(prefix_segments, "base")
    expected = reference.generate(theirs, suffix, 3, Sampling(12, temperature=1.0, seeds=seeds))
    assert [g.token_ids for g in batched] == [g.token_ids for g in expected]


def test_io_binding_path_decodes_the_same_tokens(tiny_molmo2_onnx, onnx_runtime, family):
    """The CUDA path's IO binding (KV kept as OrtValues between steps), run on CPU so it is tested here."""
    bound = OnnxRuntime(tiny_molmo2_onnx, device="cpu")
    plain = bound.graphs("base").decoder
    bound.graphs("base").decoder = DecoderSession(
        plain.session, (plain.kv_heads, plain.head_dim), plain.dtype, "cpu"
    )
    prefix = family.image_prefix(family.prepare_image(picture(160, 96), 512, "bind"))
    suffix = family.question_suffix("find the dog")
    got = bound.generate(bound.prefill(prefix, "base"), suffix, 2, Sampling(NEW_TOKENS))
    expected = onnx_runtime.generate(onnx_runtime.prefill(prefix, "base"), suffix, 2, Sampling(NEW_TOKENS))
    assert [g.token_ids for g in got] == [g.token_ids for g in expected]


@pytest.mark.parametrize("points", [False, True], ids=["model-points", "fixed-points"])
def test_pipeline_gives_the_same_result_on_onnx_and_torch_ref(
    onnx_runtime, reference, tiny_molmo2_onnx, tiny_molmo2, points
):
    image = picture(300, 200, seed=3)
    wrap = fixed_points if points else (lambda runtime: runtime)
    ours = timeless_result(molmo2_greedy_raw(tiny_molmo2_onnx, "onnx"), wrap(onnx_runtime), image)
    theirs = timeless_result(molmo2_greedy_raw(tiny_molmo2, "torch_ref"), wrap(reference), image)
    assert ours == theirs
    if points:
        assert_two_regions_and_crops_seen(ours)


def test_a_molmo2_bundle_runs_in_a_fresh_interpreter_without_torch(tiny_molmo2_onnx: Path) -> None:
    spec = {
        "model": {"bundle": str(tiny_molmo2_onnx), "runtime": "onnx", "device": "auto"},
        "stages": [
            {"perceive": {"resolution": 378, "rollouts": 2, "max_new_tokens": 8}},
            {"fuse": {}},
            {"crop": {"min_side": 32, "resolution": 378}},
            {"reason": {"resolution": 378, "max_new_tokens": 8}},
        ],
    }
    output = run_in_fresh_interpreter(spec)
    assert output["heavy"] == [] and isinstance(output["answer"], str)


@pytest.mark.gpu
@pytest.mark.skipif(
    "CUDAExecutionProvider" not in ort.get_available_providers(),
    reason="needs onnxruntime's CUDA execution provider",
)
def test_cuda_decodes_the_same_greedy_tokens_as_cpu(tiny_molmo2_onnx: Path, onnx_runtime, family) -> None:
    gpu = OnnxRuntime(tiny_molmo2_onnx, device="cuda")
    prefix = family.image_prefix(family.prepare_image(picture(160, 96), 512, "gpu"))
    suffix = family.question_suffix("find the dog")
    got = gpu.generate(gpu.prefill(prefix, "base"), suffix, 3, Sampling(NEW_TOKENS))
    expected = onnx_runtime.generate(onnx_runtime.prefill(prefix, "base"), suffix, 3, Sampling(NEW_TOKENS))
    assert [g.token_ids for g in got] == [g.token_ids for g in expected]
