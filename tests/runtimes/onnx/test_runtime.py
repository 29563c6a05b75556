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
from runtimes.bundle import read_manifest, sha256_file, write_manifest  # noqa: E402
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
    """A DecoderSession that keeps every call's KV before and after, and checks a buffer decoder's writes:
    before a call the slots from `length` on are still zero, after it the chunk's first slot is written."""

    def __init__(self, inner: DecoderSession) -> None:
        self.inner, self.calls = inner, []

    def __call__(self, inputs, kv):
        own = [as_array(value) for value in kv.own]
        if self.inner.in_place:
            assert all(not value[:, :, kv.length :].any() for value in own)
        logits, after = self.inner(inputs, kv)
        if self.inner.in_place:
            assert all(value[:, :, kv.length].any() for value in own)
        self.calls.append((kv, after))
        return logits, after

    def __getattr__(self, name):
        return getattr(self.inner, name)


def as_array(value) -> np.ndarray:
    """A KV tensor's data: the array itself, or a CPU OrtValue's buffer (a view, no copy)."""
    return value if isinstance(value, np.ndarray) else value.numpy()


def bound_to(runtime: OnnxRuntime, device: str) -> OnnxRuntime:
    """The runtime with its base decoder on the IO-binding (device) path, here on CPU."""
    plain = runtime.graphs("base").decoder
    runtime.graphs("base").decoder = DecoderSession(
        plain.session, (plain.kv_heads, plain.head_dim), plain.dtype, device
    )
    return runtime


@pytest.mark.parametrize("bind_device", [None, "cpu"])
@pytest.mark.parametrize("n", [1, 8])
def test_decode_steps_copy_no_kv(bundle, n, bind_device) -> None:
    """The prompt's KV is read in place by every step of the n rollouts (batch 1, one copy whatever n);
    their own KV is one buffer per layer, allocated once, the same objects on every step, written in place
    a slot a step, never grown. The prompt is the prefix's own arrays, or, where that holds fewer rows
    (`fork`), one copy of prefix + suffix, and then the rows' buffers hold only the new tokens' room."""
    path, resolution = bundle
    runtime = OnnxRuntime(path, device="cpu")
    if bind_device:
        bound_to(runtime, bind_device)
    family = family_of(runtime)
    prefix = runtime.prefill(
        family.image_prefix(family.prepare_image(picture(96, 64), resolution, "share")), "base"
    )
    recording = RecordingDecoder(runtime.graphs("base").decoder)
    runtime.graphs("base").decoder = recording
    new_tokens = 6
    (first, *_) = runtime.generate(
        prefix,
        family.question_suffix("find the dog"),
        n,
        Sampling(new_tokens, temperature=0.7, seeds=tuple(range(n)), ignore_eos=True),
    )
    (suffix_in, suffix_out), *steps = recording.calls  # the suffix's forward, then the decoding steps
    assert suffix_in.shared is prefix.state[0] and suffix_out.length == first.prompt_tokens
    assert len(steps) == new_tokens - 1
    room, suffix = new_tokens - 1, first.prompt_tokens
    shares_suffix = n > 1 and prefix.n_tokens < (n - 1) * suffix
    written, size = (0, room) if shares_suffix else (suffix, suffix + room)
    prompt, buffers = steps[0][0].shared, steps[0][0].own
    if shares_suffix:
        assert steps[0][0].shared_length == prefix.n_tokens + suffix
        assert all(
            as_array(value).shape[:3] == (1, runtime.sizes["num_key_value_heads"], prefix.n_tokens + suffix)
            for value in prompt
        )
    else:
        assert prompt is prefix.state[0]  # the prefix's arrays, not copies
    for step, (before, after) in enumerate(steps):
        assert before.shared is prompt
        assert all(a is b for a, b in zip(before.own, buffers, strict=True)) and after.own is before.own
        assert (before.length, after.length, before.size) == (written + step, before.length + 1, size)
        assert all(as_array(value).shape[:3:2] == (n, size) for value in before.own)
        assert all(isinstance(value, np.ndarray) != bool(bind_device) for value in before.own)
    if n == 1:  # one sequence decodes in the suffix's buffer itself
        assert all(a is b for a, b in zip(suffix_in.own, buffers, strict=True))


class FakeDecoderSession:
    """The parts of an InferenceSession that DecoderSession reads: a decoder graph with these KV inputs."""

    def __init__(self, *inputs: str) -> None:
        self.inputs = ("inputs_embeds", *inputs)

    def get_inputs(self):
        return [type("Input", (), {"name": name}) for name in self.inputs]

    def get_outputs(self):
        return [type("Output", (), {"name": name}) for name in ("logits", "present.0.key")]

    def get_providers(self):
        return ["CPUExecutionProvider"]


@pytest.mark.parametrize("prompt_length, layout", [(10, "shared"), (40, "repeated")])
def test_fork_keeps_the_layout_with_fewer_kv_rows(prompt_length, layout) -> None:
    """5 rollouts after a suffix of 8 tokens with room for 3 more: repeating the buffer holds 5 * 11 rows,
    sharing prompt + suffix holds prompt + 8 + 5 * 3; the fork takes the smaller, exactly."""
    buffer_decoder = FakeDecoderSession("cache_position", "past_key_values.0.key", "prefix_key_values.0.key")
    decoder = DecoderSession(buffer_decoder, (2, 4), np.float32)
    prompt = [np.random.default_rng(0).standard_normal((1, 2, prompt_length, 4), dtype=np.float32)]
    kv = decoder.start(prompt, prompt_length, room=11)
    kv.own[0][:, :, :8] = 1.0  # the suffix, as its forward writes it
    kv = replace(kv, length=8)
    forked = decoder.fork(kv, 5)
    if layout == "shared":
        assert forked.shared_length == prompt_length + 8 and (forked.length, forked.size) == (0, 3)
        np.testing.assert_array_equal(
            forked.shared[0], np.concatenate([prompt[0], kv.own[0][:, :, :8]], axis=2)
        )
        assert forked.own[0].shape == (5, 2, 3, 4) and not forked.own[0].any()
    else:
        assert forked.shared is prompt and (forked.length, forked.size) == (8, 11)
        np.testing.assert_array_equal(forked.own[0], np.repeat(kv.own[0], 5, axis=0))
    rows = forked.shared_length * (layout == "shared") + forked.own[0].shape[0] * forked.size
    assert rows == min(prompt_length + 8 + 5 * 3, 5 * 11)


@pytest.fixture(params=BUNDLES, ids=lambda b: b[0])
def concat_bundle(request, tmp_path_factory) -> tuple[Path, Path, int]:
    """The bundle as it was exported before `cache_position`: a decoder whose present is past + chunk.

    Rewritten from the buffer graph: each ScatterND becomes a Concat along the sequence, and the chunk's
    slot (what cache_position gave) becomes the past's length, which is what the older graph's causal mask
    counted from. (fixture, bundle, its copy, resolution)"""
    import onnx
    from onnx import helper

    fixture, resolution = request.param
    path = request.getfixturevalue(fixture)
    copy = tmp_path_factory.mktemp("concat") / "bundle"
    shutil.copytree(path, copy)
    graph_file = copy / "base/decoder.onnx"
    model = onnx.load(str(graph_file))
    graph = model.graph
    graph.input.remove(next(i for i in graph.input if i.name == "cache_position"))
    nodes = [
        helper.make_node("Shape", ["past_key_values.0.key"], ["old/shape"], start=2, end=3),
        helper.make_node("Identity", ["old/shape"], ["cache_position"]),
    ]
    for node in graph.node:
        if node.op_type == "ScatterND" and node.input[0].startswith("past_key_values."):  # not M-RoPE's
            node = helper.make_node("Concat", [node.input[0], node.input[2]], list(node.output), axis=2)
        nodes.append(node)
    graph.ClearField("node")
    graph.node.extend(nodes)
    onnx.save(model, str(graph_file))
    manifest = read_manifest(copy)
    files = {**manifest.files, "base/decoder.onnx": sha256_file(graph_file)}
    write_manifest(copy, replace(manifest, files=files))
    return path, copy, resolution


def test_older_bundles_decode_the_same_tokens(concat_bundle) -> None:
    """A decoder exported before the in-place KV (present = past + chunk) still runs, by its own
    layout, and the buffer decoder gives what it gives: the same prompt logits, the same sampled and
    greedy tokens."""
    path, copy, resolution = concat_bundle
    buffered, concat = OnnxRuntime(path, device="cpu"), OnnxRuntime(copy, device="cpu")
    assert buffered.graphs("base").decoder.in_place and not concat.graphs("base").decoder.in_place
    family = family_of(buffered)
    prefix = family.image_prefix(family.prepare_image(picture(160, 96), resolution, "old"))
    suffix = family.question_suffix("find the dog")
    runs = {}
    for name, runtime in (("buffered", buffered), ("concat", concat)):
        state = runtime.prefill(prefix, "base")
        sampled = runtime.generate(state, suffix, 3, Sampling(NEW_TOKENS, temperature=0.7, seeds=(1, 2, 3)))
        greedy = runtime.generate(state, suffix, 1, Sampling(NEW_TOKENS))
        runs[name] = (state.state[1], [g.token_ids for g in [*sampled, *greedy]])
    np.testing.assert_allclose(runs["buffered"][0], runs["concat"][0], rtol=0, atol=1e-5)
    assert runs["buffered"][1] == runs["concat"][1]


def test_a_graph_without_a_prefix_input_forks_by_repeating() -> None:
    """Bundles exported before the shared prefix: the KV is repeated into the n sequences' past."""

    decoder = DecoderSession(FakeDecoderSession("past_key_values.0.key"), (2, 4), np.float32)
    kv = decoder.fork(decoder.start([np.ones((1, 2, 3, 4), np.float32)], 3, room=5), 3)
    assert kv.shared is None and kv.own[0].shape == (3, 2, 3, 4) and kv.length == 3


def test_io_binding_path_decodes_the_same_tokens(bundle) -> None:
    """The CUDA path's IO binding (KV kept as OrtValues between steps), run on CPU so it is tested here."""
    path, resolution = bundle
    plain_runtime, bound = OnnxRuntime(path, device="cpu"), bound_to(OnnxRuntime(path, device="cpu"), "cpu")
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
