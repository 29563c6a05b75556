"""The Qwen3-VL vision graph holds no N x N buffer for a single frame (export/onnx/attention.py), the ONNX
runtime sends it one frame per run, and the TensorRT lowering of the fused op computes the same outputs."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

from export.tensorrt.lower import lower_contrib_attention  # noqa: E402
from runtimes.families.qwen3vl import qwen_vision_tables  # noqa: E402
from runtimes.onnx import OnnxRuntime  # noqa: E402
from tests.support import picture  # noqa: E402

VISION_DEPTH = 2  # the tiny model's ViT blocks


def _branches(model: onnx.ModelProto) -> list[tuple[onnx.GraphProto, onnx.GraphProto]]:
    """(then, else) bodies of the main graph's If nodes: one per ViT block."""
    found = []
    for node in model.graph.node:
        if node.op_type == "If":
            bodies = {a.name: a.g for a in node.attribute}
            found.append((bodies["then_branch"], bodies["else_branch"]))
    return found


def _activation_matmuls(graph: onnx.GraphProto) -> list[str]:
    """MatMuls of `graph` whose operands are both computed (neither a weight nor a constant): the
    attention score and weighting products, which hold N x N elements."""
    fixed = {i.name for i in graph.initializer} | {
        o for n in graph.node if n.op_type == "Constant" for o in n.output
    }
    return [n.name for n in graph.node if n.op_type == "MatMul" and not fixed & set(n.input)]


def _vision_inputs(grids: list[tuple[int, int, int]]) -> dict[str, np.ndarray]:
    tables = qwen_vision_tables(grids, num_grid_per_side=8, merge_size=2)
    pixels = np.random.default_rng(0).standard_normal((int(tables.cu_seqlens[-1]), 3 * 2 * 16 * 16))
    lengths = np.diff(tables.cu_seqlens)
    return {
        "pixel_values": pixels.astype(np.float32),
        "interp_indices": tables.interp_indices,
        "interp_weights": tables.interp_weights,
        "rotary_pos_ids": tables.rotary_pos_ids,
        "frame_ids": np.repeat(np.arange(len(lengths)), lengths),
    }


def test_one_frame_runs_fused_attention_without_n_by_n_tensors(tiny_qwen3vl_onnx: Path) -> None:
    model = onnx.load(str(tiny_qwen3vl_onnx / "base/vision.onnx"))
    inputs = {
        i.name: [d.dim_param or d.dim_value for d in i.type.tensor_type.shape.dim] for i in model.graph.input
    }
    assert inputs["frame_ids"] == ["patches"]  # O(N): no (N, N) mask comes from the host
    assert not _activation_matmuls(model.graph)  # outside the attention branches: projections only
    branches = _branches(model)
    assert len(branches) == VISION_DEPTH
    for one_frame, several_frames in branches:
        ops = [(n.domain, n.op_type) for n in one_frame.node]
        assert ("com.microsoft", "MultiHeadAttention") in ops
        assert not _activation_matmuls(one_frame)  # the one-frame path builds no score matrix
        assert len(_activation_matmuls(several_frames)) == 2  # the block-masked fallback does


def test_the_runtime_runs_one_frame_per_vision_run(tiny_qwen3vl_onnx: Path) -> None:
    """So every image of a prompt (a global view and its crops) takes the fused path."""
    from engine.families import family_for

    runtime = OnnxRuntime(tiny_qwen3vl_onnx, device="cpu")
    session = runtime.graphs("base").vision
    runs = []

    class Recorder:
        def run(self, outputs, feeds):
            runs.append(feeds["frame_ids"])
            return session.run(outputs, feeds)

    family = family_for(runtime.info.architecture, runtime.info.image)
    images = [
        family.prepare_image(picture(w, h, seed=i), None, f"i{i}")
        for i, (w, h) in enumerate([(64, 96), (128, 32)])
    ]
    embeds, _ = runtime.family.vision(Recorder(), images)
    assert len(runs) == 2 and all(np.unique(ids).size == 1 for ids in runs)
    assert embeds.shape[0] == sum(image.n_tokens for image in images)


@pytest.mark.parametrize("grids", [[(1, 6, 10)], [(1, 4, 6), (2, 2, 4)]], ids=["one frame", "several frames"])
def test_lowering_for_tensorrt_computes_the_same(tiny_qwen3vl_onnx: Path, grids) -> None:
    model = onnx.load(str(tiny_qwen3vl_onnx / "base/vision.onnx"))
    fused = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    assert lower_contrib_attention(model, "fp32") == VISION_DEPTH
    for one_frame, _ in _branches(model):
        assert all(n.domain in ("", "ai.onnx") for n in one_frame.node)
    onnx.checker.check_model(model)
    plain = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    feeds = _vision_inputs(grids)
    for got, expected in zip(plain.run(None, feeds), fused.run(None, feeds)):
        np.testing.assert_allclose(got, expected, rtol=0, atol=1e-5)


@pytest.mark.parametrize(("dtype", "atol"), [("fp32", 1e-6), ("fp16", 2e-3)])
def test_lowering_keeps_the_graphs_float_type(dtype, atol) -> None:
    """An fp16 bundle's attention lowers to fp16 ops (TensorRT 11 builds strongly typed networks)."""
    from onnx import TensorProto, helper

    elem, float_type = {"fp32": (TensorProto.FLOAT, np.float32), "fp16": (TensorProto.FLOAT16, np.float16)}[
        dtype
    ]
    inputs = [helper.make_tensor_value_info(name, elem, [1, "n", 64]) for name in "qkv"]
    node = helper.make_node(
        "MultiHeadAttention", list("qkv"), ["out"], domain="com.microsoft", num_heads=4, scale=0.3
    )
    graph = helper.make_graph([node], "g", inputs, [helper.make_tensor_value_info("out", elem, None)])
    opsets = [helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)]
    model = helper.make_model(graph, opset_imports=opsets)
    feeds = {
        name: np.random.default_rng(i).standard_normal((1, 9, 64)).astype(float_type)
        for i, name in enumerate("qkv")
    }
    (expected,) = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(
        None, feeds
    )
    assert lower_contrib_attention(model, dtype) == 1
    (got,) = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(
        None, feeds
    )
    assert got.dtype == float_type
    np.testing.assert_allclose(got.astype(np.float32), expected.astype(np.float32), rtol=0, atol=atol)
