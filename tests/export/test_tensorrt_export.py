"""`sparc-engine export tensorrt`: source checks and sizing run anywhere; building needs TensorRT and a GPU.

Without them the command must stop with one clear line. The bundle writer is exercised here against a
recording stand-in for the `tensorrt` module (it checks our calls and the manifest, not TensorRT itself);
the real build runs only in test_builds_engines_on_gpu, which skips without TensorRT and a CUDA GPU.
"""

from __future__ import annotations

import importlib.util
import sys
import types
from pathlib import Path

import pytest

import export.tensorrt as trt_export
from engine.cli import main
from engine.errors import UserError
from export.tensorrt import NEEDS_DEVICE, plan_precision, size_profiles
from export.tensorrt.profiles import Workload
from runtimes.bundle import Manifest, read_manifest, sha256_file, write_manifest
from runtimes.protocol import ImageConfig
from runtimes.tensorrt.compat import check_engine_compatible, platform_tag

onnx = pytest.importorskip("onnx")
from onnx import TensorProto, helper  # noqa: E402

VISION = {"pixel_values": ("patches", 1536), "frame_ids": ("patches",)}
EMBED = {"input_ids": ("batch", "sequence")}
DECODER = {
    "inputs_embeds": ("batch", "sequence", 128),
    "attention_mask": ("batch", "total"),
    "past_key_values.0.key": ("batch", 2, "past", 32),
    "prefix_key_values.0.key": (1, 2, "prefix", 32),
}


def _graph(path: Path, inputs: dict[str, tuple]) -> None:
    values = [helper.make_tensor_value_info(n, TensorProto.FLOAT, list(d)) for n, d in inputs.items()]
    outputs = [helper.make_tensor_value_info(f"{n}_out", TensorProto.FLOAT, None) for n in inputs]
    nodes = [helper.make_node("Identity", [n], [f"{n}_out"]) for n in inputs]
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(helper.make_model(helper.make_graph(nodes, "g", values, outputs)), str(path))


@pytest.fixture
def onnx_bundle(tmp_path: Path) -> Path:
    """A bundle shaped like the ONNX exporter's: graphs with the real input names, a perception decoder."""
    bundle = tmp_path / "onnx"
    graphs = {"base/vision.onnx": VISION, "base/embed.onnx": EMBED, "base/decoder.onnx": DECODER}
    graphs["perception/decoder.onnx"] = DECODER
    for relative, inputs in graphs.items():
        _graph(bundle / relative, inputs)
    (bundle / "tokenizer.json").write_text("{}")
    files = ["tokenizer.json", *graphs]
    write_manifest(
        bundle,
        Manifest(
            format="onnx",
            architecture="Qwen3VLForConditionalGeneration",
            source="tiny",
            dtype="fp32",
            image=ImageConfig(),
            tokens={"image_token_id": 7},
            variants={
                "base": {
                    "vision": "base/vision.onnx",
                    "embed": "base/embed.onnx",
                    "decoder": "base/decoder.onnx",
                },
                "perception": {"decoder": "perception/decoder.onnx"},
            },
            files={f: sha256_file(bundle / f) for f in files},
            tools={"onnx": onnx.__version__},
            model={"max_position_embeddings": 4096, "num_layers": 1},
        ),
    )
    return bundle


def _export(bundle: Path, out: Path, *extra: str) -> int:
    return main(["export", "tensorrt", "--from", str(bundle), "--out", str(out), *extra])


def test_without_tensorrt_it_stops_with_one_line(onnx_bundle, tmp_path, monkeypatch, capsys) -> None:
    monkeypatch.setitem(sys.modules, "tensorrt", None)  # `import tensorrt` raises ImportError
    assert _export(onnx_bundle, tmp_path / "trt") == 1
    err = capsys.readouterr().err
    assert err == f"error: {NEEDS_DEVICE} (tensorrt is not installed here)\n"
    assert "built on the target device" in err and "sparc-engine[tensorrt]" in err
    assert not (tmp_path / "trt").exists()


def test_without_a_gpu_it_stops_with_one_line(onnx_bundle, tmp_path, monkeypatch, capsys) -> None:
    monkeypatch.setitem(sys.modules, "tensorrt", types.SimpleNamespace(__version__="10.3.0"))
    monkeypatch.setattr(trt_export, "_detect_gpu", lambda: None)
    assert _export(onnx_bundle, tmp_path / "trt") == 1
    assert capsys.readouterr().err == f"error: {NEEDS_DEVICE} (no CUDA GPU found here)\n"


def test_the_source_is_checked_before_the_device(onnx_bundle, tmp_path, capsys) -> None:
    assert _export(tmp_path / "nothing", tmp_path / "trt") == 1
    assert "not a bundle" in capsys.readouterr().err

    (onnx_bundle / "base/embed.onnx").write_bytes(b"changed")
    assert _export(onnx_bundle, tmp_path / "trt") == 1
    assert "base/embed.onnx does not match its sha256" in capsys.readouterr().err

    manifest = read_manifest(onnx_bundle)
    write_manifest(onnx_bundle, Manifest(**{**manifest.__dict__, "format": "gguf"}))
    assert _export(onnx_bundle, tmp_path / "trt") == 1
    assert "--from needs an ONNX bundle (this one is 'gguf')" in capsys.readouterr().err


def test_a_spec_too_long_for_the_model_is_refused(onnx_bundle, tmp_path, capsys) -> None:
    spec = tmp_path / "full.yaml"
    spec.write_text("model: {bundle: x}\nstages:\n  - reason: {resolution: full}\n")
    assert _export(onnx_bundle, tmp_path / "trt", "--spec", str(spec)) == 1
    assert "needs a context of 16898 tokens" in capsys.readouterr().err


def test_profiles_of_every_graph(onnx_bundle) -> None:
    plan, profiles = size_profiles(onnx_bundle, read_manifest(onnx_bundle), Workload())
    assert sorted(profiles) == [
        "base/decoder.onnx",
        "base/embed.onnx",
        "base/vision.onnx",
        "perception/decoder.onnx",
    ]
    assert [p.name for p in profiles["base/vision.onnx"]] == ["vision"]
    assert [p.name for p in profiles["perception/decoder.onnx"]] == ["prefill", "decode"]
    assert profiles["base/decoder.onnx"][1].shapes["attention_mask"] == ((1, 2), (8, 643), (8, 1802))


@pytest.mark.skipif(importlib.util.find_spec("torch") is None, reason="exporting the tiny model needs torch")
def test_profiles_follow_the_real_exported_graphs(tiny_qwen3vl_onnx: Path, tmp_path, monkeypatch) -> None:
    manifest = read_manifest(tiny_qwen3vl_onnx)
    sizes = manifest.model
    _, profiles = size_profiles(tiny_qwen3vl_onnx, manifest, Workload(rollouts=4))
    prefill, decode = profiles["base/decoder.onnx"]
    past = [name for name in decode.shapes if name.startswith("past_key_values.")]
    assert len(past) == 2 * sizes["num_layers"]
    kv = (sizes["num_key_value_heads"], sizes["head_dim"])
    # (batch, kv heads, own buffer, head_dim): the exported decoder writes in place, the buffer holding
    # a whole prompt as the suffix and the 256 new tokens at most
    assert decode.shapes[past[0]][2] == (4, kv[0], 1546 + 255, kv[1])
    prefix = [name for name in decode.shapes if name.startswith("prefix_key_values.")]
    assert len(prefix) == 2 * sizes["num_layers"]
    assert decode.shapes[prefix[0]][2] == (1, kv[0], 1546, kv[1])  # one copy of the prompt for the batch
    assert prefill.shapes["inputs_embeds"][2] == (1, 1546, sizes["hidden_size"])
    assert prefill.shapes["deepstack_embeds"][0] == (sizes["num_deepstack"], 1, 1, sizes["hidden_size"])
    (vision,) = profiles["base/vision.onnx"]
    assert vision.shapes["pixel_values"][1] == (1024, 3 * 2 * 16 * 16)

    monkeypatch.setitem(sys.modules, "tensorrt", None)
    assert _export(tiny_qwen3vl_onnx, tmp_path / "trt") == 1  # sized fine, then stops for want of TensorRT


@pytest.mark.parametrize(
    ("major", "onnx_dtype", "precision", "expected"),
    [
        (11, "fp32", None, ("fp32", True, ())),
        (11, "fp16", "fp16", ("fp16", True, ())),
        (10, "fp32", None, ("fp32", True, ())),
        (10, "fp32", "fp16", ("fp16", False, ("FP16",))),
        (10, "fp32", "bf16", ("bf16", False, ("BF16",))),
    ],
)
def test_precision_plans(major, onnx_dtype, precision, expected) -> None:
    plan = plan_precision(major, onnx_dtype, precision)
    assert (plan.name, plan.strongly_typed, plan.builder_flags) == expected


@pytest.mark.parametrize(
    ("major", "onnx_dtype", "precision", "message"),
    [
        (11, "fp32", "fp16", r"TensorRT 11 builds only strongly typed .* export the ONNX bundle in fp16"),
        (11, "fp32", "int8", "quantize/dequantize nodes"),
        (10, "fp32", "fp8", "quantize/dequantize nodes"),
        (10, "fp16", "bf16", "can lower only an fp32 graph"),
    ],
)
def test_precisions_tensorrt_cannot_build_are_refused(major, onnx_dtype, precision, message) -> None:
    with pytest.raises(UserError, match=message):
        plan_precision(major, onnx_dtype, precision)


class _Recorder:
    """Stands in for the `tensorrt` module: records the calls our builder makes, returns b'engine'."""

    __version__ = "10.3.0"

    def __init__(self) -> None:
        self.calls: list[tuple] = []
        recorder = self

        class Obj:
            def __init__(self, name: str) -> None:
                self.name = name

            def __getattr__(self, attr: str):
                def call(*args, **kwargs):
                    recorder.calls.append((self.name, attr, args))
                    if attr == "parse_from_file":
                        return True
                    if attr == "build_serialized_network":
                        return b"engine"
                    return Obj(attr)

                return call

        self.Logger = type("Logger", (), {"WARNING": 2, "__init__": lambda s, level: None})
        self.Builder = lambda logger: Obj("builder")
        self.OnnxParser = lambda network, logger: Obj("parser")
        self.NetworkDefinitionCreationFlag = types.SimpleNamespace(STRONGLY_TYPED=1)
        self.BuilderFlag = types.SimpleNamespace(FP16="FP16", BF16="BF16")


def test_bundle_writer_against_a_stand_in(onnx_bundle, tmp_path, monkeypatch) -> None:
    fake = _Recorder()
    monkeypatch.setitem(sys.modules, "tensorrt", fake)
    monkeypatch.setattr(trt_export, "_detect_gpu", lambda: ("Orin", "8.7"))
    out = tmp_path / "trt"
    assert _export(onnx_bundle, out, "--precision", "fp16") == 0

    manifest = read_manifest(out)
    assert manifest.format == "tensorrt" and manifest.dtype == "fp16"
    assert manifest.variants == {
        "base": {
            "vision": "base/vision.engine",
            "embed": "base/embed.engine",
            "decoder": "base/decoder.engine",
        },
        "perception": {"decoder": "perception/decoder.engine"},
    }
    assert (out / "perception/decoder.engine").read_bytes() == b"engine"
    assert manifest.model["strongly_typed"] is False  # TensorRT 10 lowering fp32 with BuilderFlag.FP16
    assert [p["name"] for p in manifest.model["profiles"]["base/decoder.engine"]] == ["prefill", "decode"]
    assert check_engine_compatible(manifest, "10.3.0", "Orin", "8.7", platform=platform_tag()) == []

    config_flags = [args for who, attr, args in fake.calls if attr == "set_flag"]
    assert config_flags == [("FP16",)] * 4  # one engine per ONNX graph
    shapes = [args for who, attr, args in fake.calls if attr == "set_shape"]
    assert ("input_ids", (1, 1), (8, 1), (8, 1)) in shapes
    assert [args for who, attr, args in fake.calls if attr == "create_network"][0] == (0,)  # weakly typed


def _gpu_ready() -> bool:
    try:
        import tensorrt  # noqa: F401
    except ImportError:
        return False
    return trt_export._detect_gpu() is not None


@pytest.mark.gpu
@pytest.mark.skipif(not _gpu_ready(), reason="needs tensorrt and a CUDA GPU")
def test_builds_engines_on_gpu(tiny_qwen3vl_onnx: Path, tmp_path: Path) -> None:
    """The real build from the tiny model's ONNX bundle: engines load back with their profiles."""
    import tensorrt as trt

    out = tmp_path / "trt"
    assert _export(tiny_qwen3vl_onnx, out, "--spec", "specs/demo.yaml") == 0
    manifest = read_manifest(out)
    name, capability = trt_export._detect_gpu()
    assert check_engine_compatible(manifest, trt.__version__, name, capability, platform=platform_tag()) == []
    runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
    for relative, profiles in manifest.model["profiles"].items():
        engine = runtime.deserialize_cuda_engine((out / relative).read_bytes())
        assert engine is not None and engine.num_optimization_profiles == len(profiles)
