"""The onnxruntime runtime against the transformers reference on the tiny Qwen3-VL bundle.

Tolerance: last-token logits match within ~5e-6 (max abs, fp32); the tests allow 2e-5. Greedy tokens must
be identical, and the tiny model is checked to really generate that many tokens before any eos.
"""

from __future__ import annotations

import copy
import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import yaml

pytest.importorskip("torch")
ort = pytest.importorskip("onnxruntime")


from engine.cli import main  # noqa: E402
from engine.errors import UserError  # noqa: E402
from engine.families import family_for  # noqa: E402
from engine.pipeline import Pipeline  # noqa: E402
from engine.spec import Spec, validate  # noqa: E402
from runtimes import open_runtime  # noqa: E402
from runtimes.bundle import read_manifest, write_manifest  # noqa: E402
from runtimes.onnx import OnnxRuntime  # noqa: E402
from runtimes.protocol import RuntimeInputError, Sampling, Text  # noqa: E402
from runtimes.torch_ref import TorchRefRuntime  # noqa: E402
from tests.support import (  # noqa: E402
    FixedGrounding,
    assert_two_regions_and_crops_seen,
    picture,
    run_in_fresh_interpreter,
    timeless_result,
)

ATOL = 2e-5
NEW_TOKENS = 24  # greedy tokens compared per sequence (the brief asks for at least 16)
HAS_CUDA = "CUDAExecutionProvider" in ort.get_available_providers()


@pytest.fixture(scope="module")
def onnx_runtime(tiny_qwen3vl_onnx: Path) -> OnnxRuntime:
    return OnnxRuntime(tiny_qwen3vl_onnx, device="cpu")


@pytest.fixture(scope="module")
def reference(tiny_qwen3vl: Path, tiny_qwen3vl_onnx: Path) -> TorchRefRuntime:
    lora = tiny_qwen3vl_onnx.parent / "perception-lora"
    return TorchRefRuntime(tiny_qwen3vl, device="cpu", perception_lora=lora)


@pytest.fixture(scope="module")
def family(reference):
    return family_for(reference.info.architecture, reference.info.image)


@pytest.mark.parametrize("size", [(64, 64), (96, 160), (200, 72)])
@pytest.mark.parametrize("variant", ["base", "perception"])
def test_prefill_and_greedy_tokens_match_torch_ref(onnx_runtime, reference, family, size, variant) -> None:
    image = family.prepare_image(picture(*size), None, f"img{size}")
    crop = family.prepare_image(picture(40, 72, seed=1), None, "crop")  # an image in the suffix too
    suffix = family.question_suffix("where is the dog?", [crop])
    ours = onnx_runtime.prefill(family.image_prefix(image), variant)
    theirs = reference.prefill(family.image_prefix(image), variant)
    assert ours.token_ids == theirs.token_ids and ours.next_position == theirs.next_position
    np.testing.assert_allclose(ours.state[1], theirs.state[1], rtol=0, atol=ATOL)

    got = onnx_runtime.generate(ours, suffix, 3, Sampling(NEW_TOKENS))
    expected = reference.generate(theirs, suffix, 3, Sampling(NEW_TOKENS))
    assert all(g.generated_tokens == NEW_TOKENS and g.finish_reason == "length" for g in expected)
    assert [g.token_ids for g in got] == [g.token_ids for g in expected]
    assert [(g.prompt_tokens, g.reused_tokens) for g in got] == [
        (g.prompt_tokens, g.reused_tokens) for g in expected
    ]


def test_suffix_logits_match_torch_ref(onnx_runtime, reference, family) -> None:
    prefix = family.image_prefix(family.prepare_image(picture(128, 64), None, "suffix"))
    suffix = family.question_suffix("what colour is the box?")
    ours, theirs = onnx_runtime.prefill(prefix), reference.prefill(prefix)
    prompt = onnx_runtime._tokenize(suffix, ours.next_position)
    got, _ = onnx_runtime._forward(onnx_runtime.graphs("base"), prompt, ours.state[0], ours.n_tokens)
    expected = reference._forward("base", prompt, copy.deepcopy(theirs.state[0]), theirs.n_tokens)
    np.testing.assert_allclose(got, expected, rtol=0, atol=ATOL)


def test_perception_variant_differs_from_base(onnx_runtime, family) -> None:
    prefix = family.image_prefix(family.prepare_image(picture(96, 96), None, "lora"))
    base = onnx_runtime.prefill(prefix, "base").state[1]
    perception = onnx_runtime.prefill(prefix, "perception").state[1]
    assert np.abs(base - perception).max() > 1e-2


def test_sampled_rollouts_match_torch_ref_and_the_prefix_is_not_mutated(
    onnx_runtime, reference, family
) -> None:
    prefix = family.image_prefix(family.prepare_image(picture(96, 64), None, "sample"))
    suffix = family.question_suffix("find the dog")
    sampling = Sampling(12, temperature=0.7, seeds=(5, 6, 7, 8))
    ours = onnx_runtime.prefill(prefix, "base")
    kv_before = [value.copy() for value in ours.state[0]]
    first = onnx_runtime.generate(ours, suffix, 4, sampling)
    again = onnx_runtime.generate(ours, suffix, 4, sampling)
    expected = reference.generate(reference.prefill(prefix, "base"), suffix, 4, sampling)
    assert [g.token_ids for g in first] == [g.token_ids for g in again] == [g.token_ids for g in expected]
    assert all(np.array_equal(a, b) for a, b in zip(kv_before, ours.state[0], strict=True))


def greedy_raw(bundle: Path, runtime: str, variant: str = "base") -> dict:
    """SPARC with greedy rollouts: every stage is deterministic, so runtimes must agree exactly."""
    perceive = {
        "resolution": 128,
        "rollouts": 3,
        "temperature": 0.0,
        "max_new_tokens": 24,
        "variant": variant,
    }
    return {
        "model": {"bundle": str(bundle), "runtime": runtime, "device": "cpu"},
        "stages": [
            {"perceive": perceive},
            {"fuse": {"iou_thr": 0.5}},
            {"crop": {"min_side": 32, "resolution": 96}},
            {"reason": {"resolution": 128, "max_new_tokens": 20}},
        ],
    }


def greedy_spec(bundle: Path, runtime: str, variant: str = "base") -> Spec:
    return validate(greedy_raw(bundle, runtime, variant))


BOXES = '[{"bbox_2d": [100, 150, 400, 500], "label": "a"}, {"bbox_2d": [600, 100, 900, 300], "label": "b"}]'


def fixed_boxes(runtime) -> FixedGrounding:
    return FixedGrounding(runtime, "bbox_2d", BOXES)


@pytest.mark.parametrize("boxes", [False, True], ids=["model-boxes", "fixed-boxes"])
def test_pipeline_gives_the_same_result_on_onnx_and_torch_ref(
    onnx_runtime, reference, tiny_qwen3vl_onnx, boxes
):
    image = picture(300, 200, seed=3)
    wrap = fixed_boxes if boxes else (lambda runtime: runtime)
    ours = timeless_result(greedy_raw(tiny_qwen3vl_onnx, "onnx", "perception"), wrap(onnx_runtime), image)
    theirs = timeless_result(greedy_raw(tiny_qwen3vl_onnx, "torch_ref", "perception"), wrap(reference), image)
    assert ours == theirs
    if boxes:
        assert_two_regions_and_crops_seen(ours)


def test_a_changed_file_is_refused(tiny_qwen3vl_onnx: Path, tmp_path: Path) -> None:
    bundle = shutil.copytree(tiny_qwen3vl_onnx, tmp_path / "bundle")
    data = bytearray((bundle / "perception/decoder.onnx").read_bytes())
    data[-100] ^= 1
    (bundle / "perception/decoder.onnx").write_bytes(bytes(data))
    runtime = OnnxRuntime(bundle, device="cpu")  # base is intact
    with pytest.raises(RuntimeInputError, match="perception/decoder.onnx does not match its sha256"):
        runtime.prefill([Text("hi")], "perception")
    (bundle / "base/vision.onnx").write_bytes(b"not a graph")
    with pytest.raises(RuntimeInputError, match="base/vision.onnx does not match its sha256"):
        OnnxRuntime(bundle, device="cpu")
    (bundle / "base/vision.onnx").unlink()
    with pytest.raises(RuntimeInputError, match="base/vision.onnx is missing"):
        OnnxRuntime(bundle, device="cpu")


def test_a_missing_variant_is_refused_before_any_work(
    tiny_qwen3vl_onnx: Path, tmp_path: Path, capsys
) -> None:
    bundle = shutil.copytree(tiny_qwen3vl_onnx, tmp_path / "bundle")
    manifest = read_manifest(bundle)
    variants = {"base": manifest.variants["base"]}
    files = {k: v for k, v in manifest.files.items() if not k.startswith("perception/")}
    write_manifest(bundle, replace(manifest, variants=variants, files=files))
    runtime = OnnxRuntime(bundle, device="cpu")
    assert runtime.info.variants == ("base",)
    with pytest.raises(RuntimeInputError, match="no variant 'perception'"):
        runtime.prefill([Text("hi")], "perception")
    calls = []
    runtime.prefill = lambda *args: calls.append(args)  # any model work would go through prefill
    with pytest.raises(UserError, match="no weights variant perception"):
        Pipeline(greedy_spec(bundle, "onnx", "perception"), runtime)
    assert calls == []

    # and from the command line: one line, exit code 1
    spec_file, image_file = tmp_path / "spec.yaml", tmp_path / "image.png"
    spec_file.write_text(yaml.safe_dump(greedy_raw(bundle, "onnx", "perception")))
    picture(64, 64).save(image_file)
    assert main(["run", str(spec_file), "--image", str(image_file), "--question", "q"]) == 1
    assert "no weights variant perception" in capsys.readouterr().err


def test_device_cuda_without_the_cuda_provider_is_refused(tiny_qwen3vl_onnx: Path) -> None:
    if HAS_CUDA:
        pytest.skip("this onnxruntime has the CUDA provider")
    with pytest.raises(RuntimeInputError, match="no CUDA execution provider"):
        open_runtime("onnx", tiny_qwen3vl_onnx, "cuda")


def test_a_bundle_runs_in_a_fresh_interpreter_without_torch(tiny_qwen3vl_onnx: Path) -> None:
    spec = {
        "model": {"bundle": str(tiny_qwen3vl_onnx), "runtime": "onnx", "device": "auto"},
        "stages": [
            {"perceive": {"resolution": 64, "rollouts": 2, "max_new_tokens": 8, "variant": "perception"}},
            {"fuse": {}},
            {"crop": {"min_side": 32, "resolution": 64}},
            {"reason": {"resolution": 64, "max_new_tokens": 8}},
        ],
    }
    output = run_in_fresh_interpreter(spec)
    assert output["heavy"] == [] and isinstance(output["answer"], str)


def test_io_binding_path_decodes_the_same_tokens(tiny_qwen3vl_onnx: Path, onnx_runtime, family) -> None:
    """The CUDA path's IO binding (KV kept as OrtValues between steps), run on CPU so it is tested here."""
    from runtimes.onnx.session import DecoderSession

    bound = OnnxRuntime(tiny_qwen3vl_onnx, device="cpu")
    plain = bound.graphs("base").decoder
    bound.graphs("base").decoder = DecoderSession(
        plain.session, (plain.kv_heads, plain.head_dim), plain.dtype, "cpu"
    )
    prefix = family.image_prefix(family.prepare_image(picture(160, 96), None, "bind"))
    suffix = family.question_suffix("find the dog")
    got = bound.generate(bound.prefill(prefix, "base"), suffix, 3, Sampling(NEW_TOKENS))
    expected = onnx_runtime.generate(onnx_runtime.prefill(prefix, "base"), suffix, 3, Sampling(NEW_TOKENS))
    assert [g.token_ids for g in got] == [g.token_ids for g in expected]
    assert not isinstance(bound.prefill(prefix, "base").state[0][0], np.ndarray)  # KV stayed an OrtValue


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs onnxruntime's CUDA execution provider")
def test_cuda_decodes_the_same_greedy_tokens_as_cpu(tiny_qwen3vl_onnx: Path, onnx_runtime, family) -> None:
    gpu = OnnxRuntime(tiny_qwen3vl_onnx, device="cuda")
    prefix = family.image_prefix(family.prepare_image(picture(160, 96), None, "gpu"))
    suffix = family.question_suffix("find the dog")
    got = gpu.generate(gpu.prefill(prefix, "base"), suffix, 4, Sampling(NEW_TOKENS))
    expected = onnx_runtime.generate(onnx_runtime.prefill(prefix, "base"), suffix, 4, Sampling(NEW_TOKENS))
    assert [g.token_ids for g in got] == [g.token_ids for g in expected]
