"""Lower onnxruntime contrib ops to standard ONNX before TensorRT parses a graph.

The ONNX exporter writes the Qwen3-VL vision attention as `com.microsoft::MultiHeadAttention`
(export/onnx/attention.py: memory linear in the patches on onnxruntime). TensorRT's ONNX parser knows no
contrib ops, so each such node becomes Reshape-Transpose-MatMul-Softmax-MatMul, the pattern TensorRT fuses
into its own attention kernels. Only the form the exporter writes is lowered: 3-D query, key and value of
one hidden width, no bias, mask or past; anything else is refused rather than lowered wrongly.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import helper, numpy_helper

CONTRIB_DOMAIN = "com.microsoft"


FLOATS = {"fp32": np.float32, "fp16": np.float16}  # a bundle's dtype -> its graphs' float type


def lower_contrib_attention(model: onnx.ModelProto, dtype: str) -> int:
    """Replace every MultiHeadAttention node (subgraphs too) in place, in a graph of float type `dtype`
    (the bundle's: fp32 | fp16); returns how many were replaced."""
    return _lower_graph(model.graph, FLOATS[dtype])


def _lower_graph(graph: onnx.GraphProto, dtype: type[np.floating]) -> int:
    lowered, nodes = 0, []
    for node in graph.node:
        for attribute in node.attribute:  # If / Loop bodies
            if attribute.type == attribute.GRAPH:
                lowered += _lower_graph(attribute.g, dtype)
        if node.domain == CONTRIB_DOMAIN and node.op_type == "MultiHeadAttention":
            nodes += _plain_attention(node, dtype)
            lowered += 1
        else:
            nodes.append(node)
    del graph.node[:]
    graph.node.extend(nodes)
    return lowered


def _plain_attention(node: onnx.NodeProto, dtype: type[np.floating]) -> list[onnx.NodeProto]:
    """One MultiHeadAttention(query, key, value) as standard ops, with the same output name."""
    if len([name for name in node.input if name]) != 3 or len(node.output) != 1:
        raise ValueError(f"{node.name}: only MultiHeadAttention(query, key, value) can be lowered")
    attributes = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    unknown = sorted(set(attributes) - {"num_heads", "scale"})
    if unknown or "scale" not in attributes:  # the exporter always writes the scale
        raise ValueError(f"{node.name}: cannot lower MultiHeadAttention with attributes {sorted(attributes)}")
    query, key, value = node.input
    prefix = f"{node.name or node.output[0]}/lowered"

    def name(suffix: str) -> str:
        return f"{prefix}/{suffix}"

    heads_shape = numpy_helper.from_array(np.array([0, 0, attributes["num_heads"], -1], np.int64))
    merged_shape = numpy_helper.from_array(np.array([0, 0, -1], np.int64))
    scale = numpy_helper.from_array(np.array(attributes["scale"], dtype))
    nodes = [
        helper.make_node("Constant", [], [name("heads_shape")], value=heads_shape),
        helper.make_node("Constant", [], [name("merged_shape")], value=merged_shape),
        helper.make_node("Constant", [], [name("scale")], value=scale),
    ]
    # (B, S, h * d) -> (B, h, S, d); keys straight to (B, h, d, L) for the score MatMul
    for role, tensor, perm in (
        ("q", query, [0, 2, 1, 3]),
        ("k", key, [0, 2, 3, 1]),
        ("v", value, [0, 2, 1, 3]),
    ):
        nodes.append(helper.make_node("Reshape", [tensor, name("heads_shape")], [name(f"{role}_heads")]))
        nodes.append(helper.make_node("Transpose", [name(f"{role}_heads")], [name(role)], perm=perm))
    nodes += [
        # (B, h, S, d) x (B, h, d, L) -> (B, h, S, L) scores; then softmax over the keys
        helper.make_node("MatMul", [name("q"), name("k")], [name("scores")]),
        helper.make_node("Mul", [name("scores"), name("scale")], [name("scaled")]),
        helper.make_node("Softmax", [name("scaled")], [name("weights")], axis=-1),
        helper.make_node("MatMul", [name("weights"), name("v")], [name("heads_out")]),  # (B, h, S, d)
        helper.make_node("Transpose", [name("heads_out")], [name("out_t")], perm=[0, 2, 1, 3]),
        helper.make_node("Reshape", [name("out_t"), name("merged_shape")], [node.output[0]]),
    ]
    return nodes
