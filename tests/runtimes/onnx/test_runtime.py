"""The onnxruntime runtime's own behaviour: bundle checks, refusals, the IO-binding path, no torch on the
run path. Its numbers against torch_ref are in tests/parity/."""

from __future__ import annotations

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
from engine.spec import validate  # noqa: E402
from runtimes import open_runtime  # noqa: E402
from runtimes.bundle import read_manifest, write_manifest  # noqa: E402
from runtimes.onnx import OnnxRuntime  # noqa: E402
from runtimes.onnx.session import DecoderSession  # noqa: E402
from runtimes.protocol import RuntimeInputError, Sampling, Text  # noqa: E402
from tests.support import picture, run_in_fresh_interpreter  # noqa: E402

HAS_CUDA = "CUDAExecutionProvider" in ort.get_available_providers()
# (bundle fixture, the view resolution its family's tests use)
BUNDLES = [("tiny_qwen3vl_onnx", 128), ("tiny_molmo2_onnx", 512)]
NEW_TOKENS = 16


@pytest.fixture(params=BUNDLES, ids=lambda b: b[0])
def bundle(request) -> tuple[Path, int]:
    fixture, resolution = request.param
    return request.getfixturevalue(fixture), resolution


def family_of(runtime):
    return family_for(runtime.info.architecture, runtime.info.image)


def perceive_spec(bundle: Path, variant: str = "perception") -> dict:
    return {
        "model": {"bundle": str(bundle), "runtime": "onnx", "device": "cpu"},
        "stages": [
            {"perceive": {"resolution": 128, "rollouts": 3, "max_new_tokens": 24, "variant": variant}},
            {"fuse": {"iou_thr": 0.5}},
            {"crop": {"min_side": 32, "resolution": 96}},
            {"reason": {"resolution": 128, "max_new_tokens": 20}},
        ],
    }


def test_generate_leaves_the_prefix_kv_as_it_was(bundle) -> None:
    path, resolution = bundle
    runtime = OnnxRuntime(path, device="cpu")
    family = family_of(runtime)
    prefix = runtime.prefill(
        family.image_prefix(family.prepare_image(picture(96, 64), resolution, "kv")), "base"
    )
    kv_before = [value.copy() for value in prefix.state[0]]
    runtime.generate(
        prefix, family.question_suffix("find the dog"), 4, Sampling(12, temperature=0.7, seeds=(5, 6, 7, 8))
    )
    assert all(np.array_equal(a, b) for a, b in zip(kv_before, prefix.state[0], strict=True))


class RecordingDecoder:
    """A DecoderSession that keeps every call's own past, shared prefix and returned present KV."""

    def __init__(self, inner: DecoderSession) -> None:
        self.inner, self.calls = inner, []

    def __call__(self, inputs, past, prefix=None):
        logits, present = self.inner(inputs, past, prefix)
        self.calls.append((list(past), prefix, present))
        return logits, present

    def __getattr__(self, name):
        return getattr(self.inner, name)


@pytest.mark.parametrize("n", [1, 8])
def test_rollouts_read_one_copy_of_the_prompt_kv(bundle, n) -> None:
    """The fork copies no KV: every decoding step of the n rollouts gets the suffix's present KV itself
    (batch 1, the prompt's length) as the shared prefix, and their own past holds only the new tokens, so
    the prompt's KV held does not grow with n."""
    path, resolution = bundle
    runtime = OnnxRuntime(path, device="cpu")
    family = family_of(runtime)
    prefix = runtime.prefill(
        family.image_prefix(family.prepare_image(picture(96, 64), resolution, "share")), "base"
    )
    recording = RecordingDecoder(runtime.graphs("base").decoder)
    runtime.graphs("base").decoder = recording
    suffix = family.question_suffix("find the dog")
    seeds = tuple(range(n))
    (first, *_) = runtime.generate(
        prefix, suffix, n, Sampling(6, temperature=0.7, seeds=seeds, ignore_eos=True)
    )
    (_, _, prompt_kv), *steps = recording.calls  # the suffix's forward, then the decoding steps
    prompt_tokens = prefix.n_tokens + first.prompt_tokens
    assert len(steps) == 5 and all(value.shape[:3:2] == (1, prompt_tokens) for value in prompt_kv)
    for step, (own, shared, _) in enumerate(steps):
        assert all(a is b for a, b in zip(shared, prompt_kv, strict=True))  # the same arrays, not copies
        assert all(value.shape[:3:2] == (n, step) for value in own)  # (n, kv heads, own tokens, head_dim)
    held = sum(value.nbytes for value in steps[-1][1])
    assert held == sum(value.nbytes for value in prompt_kv)  # one copy whatever n


def test_a_graph_without_a_prefix_input_forks_by_repeating() -> None:
    """Bundles exported before the shared prefix: the KV is repeated into the n sequences' past."""

    class Session:  # the parts of an InferenceSession that DecoderSession reads
        def get_inputs(self):
            return [type("Input", (), {"name": name}) for name in ("inputs_embeds", "past_key_values.0.key")]

        def get_outputs(self):
            return [type("Output", (), {"name": name}) for name in ("logits", "present.0.key")]

        def get_providers(self):
            return ["CPUExecutionProvider"]

    decoder = DecoderSession(Session(), (2, 4), np.float32)
    kv = [np.ones((1, 2, 3, 4), np.float32)]
    past, shared = decoder.fork(kv, 3)
    assert shared is None and past[0].shape == (3, 2, 3, 4)


def test_io_binding_path_decodes_the_same_tokens(bundle) -> None:
    """The CUDA path's IO binding (KV kept as OrtValues between steps), run on CPU so it is tested here."""
    path, resolution = bundle
    plain_runtime, bound = OnnxRuntime(path, device="cpu"), OnnxRuntime(path, device="cpu")
    plain = bound.graphs("base").decoder
    bound.graphs("base").decoder = DecoderSession(
        plain.session, (plain.kv_heads, plain.head_dim), plain.dtype, "cpu"
    )
    family = family_of(bound)
    prefix = family.image_prefix(family.prepare_image(picture(160, 96), resolution, "bind"))
    suffix = family.question_suffix("find the dog")
    got = bound.generate(bound.prefill(prefix, "base"), suffix, 3, Sampling(NEW_TOKENS))
    expected = plain_runtime.generate(plain_runtime.prefill(prefix, "base"), suffix, 3, Sampling(NEW_TOKENS))
    assert [g.token_ids for g in got] == [g.token_ids for g in expected]
    assert not isinstance(bound.prefill(prefix, "base").state[0][0], np.ndarray)  # KV stayed an OrtValue


def test_a_bundle_runs_in_a_fresh_interpreter_without_torch(bundle) -> None:
    path, resolution = bundle
    spec = {
        "model": {"bundle": str(path), "runtime": "onnx", "device": "auto"},
        "stages": [
            {
                "perceive": {
                    "resolution": resolution,
                    "rollouts": 2,
                    "max_new_tokens": 8,
                    "variant": "perception",
                }
            },
            {"fuse": {}},
            {"crop": {"min_side": 32, "resolution": resolution}},
            {"reason": {"resolution": resolution, "max_new_tokens": 8}},
        ],
    }
    output = run_in_fresh_interpreter(spec)
    assert output["heavy"] == [] and isinstance(output["answer"], str)


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
        Pipeline(validate(perceive_spec(bundle)), runtime)
    assert calls == []

    # and from the command line: one line, exit code 1
    spec_file, image_file = tmp_path / "spec.yaml", tmp_path / "image.png"
    spec_file.write_text(yaml.safe_dump(perceive_spec(bundle)))
    picture(64, 64).save(image_file)
    assert main(["run", str(spec_file), "--image", str(image_file), "--question", "q"]) == 1
    assert "no weights variant perception" in capsys.readouterr().err


def test_device_cuda_without_the_cuda_provider_is_refused(tiny_qwen3vl_onnx: Path) -> None:
    if HAS_CUDA:
        pytest.skip("this onnxruntime has the CUDA provider")
    with pytest.raises(RuntimeInputError, match="no CUDA execution provider"):
        open_runtime("onnx", tiny_qwen3vl_onnx, "cuda")


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs onnxruntime's CUDA execution provider")
def test_cuda_decodes_the_same_greedy_tokens_as_cpu(bundle) -> None:
    path, resolution = bundle
    cpu, gpu = OnnxRuntime(path, device="cpu"), OnnxRuntime(path, device="cuda")
    family = family_of(cpu)
    prefix = family.image_prefix(family.prepare_image(picture(160, 96), resolution, "gpu"))
    suffix = family.question_suffix("find the dog")
    got = gpu.generate(gpu.prefill(prefix, "base"), suffix, 4, Sampling(24))
    expected = cpu.generate(cpu.prefill(prefix, "base"), suffix, 4, Sampling(24))
    assert [g.token_ids for g in got] == [g.token_ids for g in expected]
