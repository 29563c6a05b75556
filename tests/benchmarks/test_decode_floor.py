"""benchmarks/decode_floor.py on the tiny bundles: the weights-only graph is the decoder's weight
multiplications, exactly, and the script writes a row per bundle and N (its times are not checked)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

from benchmarks.decode_floor import weights_only  # noqa: E402
from runtimes.bundle import read_manifest  # noqa: E402
from tests.support import ROOT  # noqa: E402


@pytest.fixture(params=["fp32", "int4-a8"])
def bundle(request, tiny_qwen3vl_onnx: Path, tiny_qwen3vl_onnx_as) -> Path:
    return tiny_qwen3vl_onnx if request.param == "fp32" else tiny_qwen3vl_onnx_as(request.param)


def test_weights_only_holds_every_weight_multiplication_and_nothing_else(bundle: Path) -> None:
    decoder = onnx.load(str(bundle / "base/decoder.onnx"))
    weights = {tensor.name: tensor for tensor in decoder.graph.initializer}
    expected = [
        node
        for node in decoder.graph.node
        if node.op_type in ("MatMul", "MatMulNBits") and node.input[1] in weights
    ]
    graph = weights_only(decoder)
    assert [n.op_type for n in graph.graph.node] == [n.op_type for n in expected]
    assert [list(n.input[1:]) for n in graph.graph.node] == [list(n.input[1:]) for n in expected]
    layers = int(read_manifest(bundle).model["num_layers"])
    assert len(expected) == 7 * layers + 1  # q, k, v, o, gate, up, down per layer, and lm_head
    session = ort.InferenceSession(graph.SerializeToString(), providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(0)
    feed = {i.name: rng.standard_normal((3, i.shape[1])).astype(np.float32) for i in session.get_inputs()}
    outputs = session.run(None, feed)
    first = expected[0]
    if first.op_type == "MatMul":  # the node computes what it computed in the decoder: x @ W
        weight = onnx.numpy_helper.to_array(weights[first.input[1]])
        np.testing.assert_allclose(outputs[0], feed["weights.0.in"] @ weight, rtol=1e-5, atol=1e-5)
    assert all(o.shape[0] == 3 for o in outputs)


def test_the_script_reports_a_row_per_bundle_and_rollout_count(
    tiny_qwen3vl_onnx: Path, tmp_path: Path
) -> None:
    command = [
        sys.executable, "benchmarks/decode_floor.py", str(tiny_qwen3vl_onnx), "--rollouts", "1,2",
        "--resolution", "64", "--tokens", "3", "--repeats", "1", "--out", str(tmp_path),
    ]  # fmt: skip
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    rows = json.loads((tmp_path / "decode_floor.json").read_text())["rows"]
    assert [row["rollouts"] for row in rows] == [1, 2]
    assert all(row["step_ms"] > 0 and row["weights_ms"] > 0 and row["weight_nodes"] > 0 for row in rows)
    assert (tmp_path / "decode_floor.md").read_text() in done.stdout
