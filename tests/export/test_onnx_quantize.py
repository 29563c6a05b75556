"""`sparc-engine export onnx --quant int8|int4|int8-a8|int4-a8` on the tiny Qwen3-VL: the manifest, smaller graphs, logits
close to the fp32 bundle's, and the pipeline on the quantized bundle.

Drift, measured here against the fp32 bundle of the same checkpoint (last-token logits of the test's
prompts, 64x64 to 256x256 px, base and perception variants; the logits span 5-7): int8 0.05-0.074 max
abs, int4 0.89-1.20, int8-a8 0.08-0.17, int4-a8 0.94-1.20 (the activations' int8 rounding adds to int8's
and vanishes in int4's). The tiny model's random weights (std 0.08, no structure) are the hard case for 4
bits: a block of 32 such weights gets 15 levels over about 4 standard deviations. The tests allow 0.15,
2.0, 0.26 and 2.0.
Decode steps drift about as much (max / mean |logit - fp32 logit| over 16 steps: int8 0.12 / 0.017, int4
1.97 / 0.30; tests/runtimes/onnx/test_quantized_decoding.py), so greedy tokens leave fp32's within a few
steps: the greedy pipeline is checked against fp32's with fixed groundings, and with the model's own for
rollouts that agree and a run that repeats exactly.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("torch")
pytest.importorskip("onnxruntime")
onnx = pytest.importorskip("onnx")

from engine.cli import main  # noqa: E402
from engine.families import family_for  # noqa: E402
from export import ONNX_QUANTS  # noqa: E402
from export.onnx.quantize import SCHEMES  # noqa: E402
from runtimes.bundle import read_manifest, verify  # noqa: E402
from runtimes.onnx import OnnxRuntime  # noqa: E402
from tests.parity.models import MODELS, Case  # noqa: E402
from tests.parity.pipelines import assert_reuse_changes_only_the_accounting, pipeline_spec  # noqa: E402
from tests.support import FixedGrounding, picture, timeless_result, without_texts  # noqa: E402

DRIFT = {"int8": 0.15, "int4": 2.0, "int8-a8": 0.26, "int4-a8": 2.0}


@pytest.fixture(scope="module")
def bundles(tiny_qwen3vl_onnx: Path, tiny_qwen3vl_onnx_as) -> dict[str, Path]:
    """The fp32 bundle and its int8 and int4 twins, each with the same perception LoRA merged."""
    return {"fp32": tiny_qwen3vl_onnx, **{quant: tiny_qwen3vl_onnx_as(quant) for quant in DRIFT}}


@pytest.fixture(scope="module")
def runtimes(bundles: dict[str, Path]) -> dict[str, OnnxRuntime]:
    return {name: OnnxRuntime(bundle, device="cpu") for name, bundle in bundles.items()}


def weight_matmuls(graph: Path) -> int:
    """MatMul nodes whose second input is a constant weight: what the quantizer rewrites."""
    model = onnx.load(str(graph))
    weights = {t.name for t in model.graph.initializer}
    return sum(n.op_type == "MatMul" and n.input[1] in weights for n in model.graph.node)


@pytest.mark.parametrize("quant", DRIFT)
def test_manifest_records_the_quantization(bundles, quant) -> None:
    manifest = read_manifest(bundles[quant])
    verify(bundles[quant], manifest)  # every file matches its sha256
    assert manifest.dtype == "fp32"  # the graphs' inputs and outputs
    assert read_manifest(bundles["fp32"]).model["quant"] is None
    record = manifest.model["quant"]
    scheme = SCHEMES[quant]
    assert (record["method"], record["bits"], record["symmetric"]) == (quant, scheme.bits, True)
    assert record["accuracy_level"] == scheme.accuracy_level
    fp32 = bundles["fp32"]
    assert record["nodes"] == {
        "base/vision.onnx": 0,  # Gemm layers: left as exported
        "base/embed.onnx": int(scheme.bits == 4),  # the table, as GatherBlockQuantized
        "base/decoder.onnx": weight_matmuls(fp32 / "base/decoder.onnx"),
        "perception/decoder.onnx": weight_matmuls(fp32 / "perception/decoder.onnx"),
    }
    decoder = onnx.load(str(bundles[quant] / "base/decoder.onnx"))
    assert weight_matmuls(bundles[quant] / "base/decoder.onnx") == 0
    attributes = [
        {a.name: a.i for a in n.attribute} for n in decoder.graph.node if n.op_type == "MatMulNBits"
    ]
    assert {a["bits"] for a in attributes} == {record["bits"]}
    # unset (0) multiplies in fp32; 4 quantizes the activations to int8 on a CPU
    assert {a.get("accuracy_level", 0) for a in attributes} == {scheme.accuracy_level or 0}


def test_the_cli_offers_every_scheme() -> None:
    assert set(ONNX_QUANTS) == set(SCHEMES)


def test_quantized_graphs_are_smaller(bundles) -> None:
    def size(name: str, relative: str) -> int:
        return (bundles[name] / relative).stat().st_size

    for relative in ("base/decoder.onnx", "perception/decoder.onnx"):
        assert size("int4", relative) < size("int8", relative) < size("fp32", relative) / 2
        assert size("int4", relative) < size("fp32", relative) / 4
    assert size("int4", "base/embed.onnx") < size("fp32", "base/embed.onnx") / 4
    assert size("int8", "base/embed.onnx") == size("fp32", "base/embed.onnx")
    assert size("int8", "base/vision.onnx") == size("fp32", "base/vision.onnx")


@pytest.mark.parametrize("quant", DRIFT)
@pytest.mark.parametrize("variant", ["base", "perception"])
def test_logit_drift_against_fp32_is_bounded(runtimes, quant, variant) -> None:
    fp32 = runtimes["fp32"]
    family = family_for(fp32.info.architecture, fp32.info.image)
    for size in [(64, 64), (96, 160), (256, 256)]:
        image = family.prepare_image(picture(*size), None, f"drift{size}")
        # the whole prompt: its last logits pick the first answer token
        prompt = [*family.image_prefix(image), *family.question_suffix("where is the dog?")]
        expected = fp32.prefill(prompt, variant).state[1]
        got = runtimes[quant].prefill(prompt, variant).state[1]
        drift = np.abs(got - expected).max()
        assert 0 < drift <= DRIFT[quant], f"{quant} {variant} {size}: drift {drift:.3f}"


@pytest.mark.parametrize("stages", ["shared", "mixed"])
@pytest.mark.parametrize("quant", DRIFT)
def test_the_greedy_pipeline_on_a_quantized_bundle(runtimes, quant, stages) -> None:
    case = Case(MODELS[0], "onnx")
    assert case.model.name == "qwen3vl"
    spec = pipeline_spec(case, stages)  # greedy: 2 rollouts at temperature 0, fuse, crop, reason
    image = picture(300, 200, seed=3)
    # with the boxes fixed, everything but the texts is the fp32 bundle's: regions, crops, token accounting
    fixed = timeless_result(spec, FixedGrounding(runtimes[quant]), image)
    assert len(fixed["regions"]) == 2 and fixed["crops"]
    assert without_texts(fixed) == without_texts(
        timeless_result(spec, FixedGrounding(runtimes["fp32"]), image)
    )
    # the model's own greedy localizations (whose tokens leave fp32's within a few steps, see
    # tests/runtimes/onnx/test_quantized_decoding.py): the rollouts agree and the run repeats exactly
    own = timeless_result(spec, runtimes[quant], image)
    first, *others = own["stages"][0]["outputs"]
    assert others == [first] and isinstance(own["answer"], str)
    assert own == timeless_result(spec, runtimes[quant], image)
    assert_reuse_changes_only_the_accounting(case, stages, runtimes[quant], image, own)


def test_quant_needs_fp32_weights(tiny_qwen3vl: Path, tmp_path: Path, capsys) -> None:
    args = ["export", "onnx", "--model", str(tiny_qwen3vl), "--out", str(tmp_path / "b")]
    assert main([*args, "--dtype", "fp16", "--quant", "int8"]) == 1
    assert "--quant int8 quantizes fp32 weights" in capsys.readouterr().err
    assert not (tmp_path / "b").exists()  # refused before any work
