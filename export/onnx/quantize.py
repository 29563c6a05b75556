"""Weight quantization of an exported bundle's graphs: `sparc-engine export onnx --quant SCHEME`.

Every scheme goes through onnxruntime's `MatMulNBits` quantizer (onnxruntime.quantization.matmul_nbits_quantizer):
every MatMul with a constant weight becomes a com.microsoft `MatMulNBits` node holding that weight as
8- or 4-bit integers in blocks of BLOCK_SIZE input rows, one fp32 scale per block (symmetric: no zero
points). With int8 and int4 the activations stay fp32: the kernel dequantizes a block of the weight and
multiplies in float (accuracy_level is left unset, which means fp32 compute); the -a8 schemes below differ
in that one attribute.

Why MatMulNBits for int8 too, rather than `quantize_dynamic`: quantize_dynamic is not weight-only. It
quantizes each activation to uint8 at run time with one scale per tensor (DynamicQuantizeLinear +
MatMulInteger), so one outlier in a row of activations coarsens the whole row. A plain QDQ graph (int8 weight -> DequantizeLinear -> MatMul) keeps activations fp32 but
dequantizes the whole weight on every call, or lets constant folding bring the fp32 weight back into
memory. MatMulNBits keeps the int8 weight in memory and dequantizes block by block inside the kernel, with
block-wise scales that follow the weight's local range, and int8 and int4 then differ in one number.

The price, measured on CPU with onnxruntime 1.32 (benchmarks/quant.py, ~65M model): its MatMulNBits kernel
has a fast fp32-compute path for 4 bits but not for 8, so int8 decodes 5-7x slower than fp32 while int4
decodes about 2x faster one sequence at a time; with 8 rollouts decoded together int4 is no faster than
fp32 (the step is bound by the multiplications, not by reading the weights).

Hence the `-a8` schemes: the same weights, with the nodes' accuracy_level 4, which makes onnxruntime's CPU
kernel quantize each block of activations to int8 at run time and multiply in int8 (VNNI/AMX where the
CPU has them). They are no longer weight-only in their arithmetic and drift more, but they are the
quantized bundles that run faster than fp32 on a CPU, rollouts included (README, Quantized ONNX bundles).
Other execution providers ignore accuracy_level and compute as the plain schemes do.

What stays fp32: the vision tower (its linear layers are `Gemm` on the 2-D patch matrix, which the
quantizer leaves alone; the GGUF bundles likewise keep their vision projector f16, since what the model
localizes comes from it), norms, biases, and with int8 the embedding table. With int4, a graph that is only
table lookups (the embed graph) has its table quantized as `GatherBlockQuantized`: the quantizer bumps a
graph with int4 Gather to opset 21, which the other graphs' opset-17 ops are not valid in. A graph with
nothing to quantize is left as it was exported.
"""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from export.onnx import save_graph
from runtimes.protocol import RuntimeInputError

BLOCK_SIZE = 32  # input rows per scale: what onnxruntime-genai's builder uses on CPU
QUANTIZED_OPS = ("MatMulNBits", "GatherBlockQuantized")


@dataclass(frozen=True)
class Scheme:
    bits: int
    accuracy_level: int | None  # MatMulNBits' compute type on CPU: None = fp32, 4 = int8


SCHEMES = {
    "int8": Scheme(8, None),
    "int4": Scheme(4, None),
    "int8-a8": Scheme(8, 4),
    "int4-a8": Scheme(4, 4),
}


@dataclass(frozen=True)
class Quantization:
    """What the manifest records under model.quant."""

    method: str  # as --quant
    bits: int
    block_size: int
    symmetric: bool
    nodes: dict[str, int]  # graph file -> nodes quantized in it
    accuracy_level: int | None = None


def quantize_graphs(bundle: Path, files: list[str], method: str) -> Quantization:
    """Quantize each graph file of the bundle (relative paths) in place."""
    try:
        from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer
    except ImportError:
        raise RuntimeInputError("--quant needs onnxruntime: pip install 'sparc-engine[onnx]'") from None
    import onnx

    scheme = SCHEMES[method]
    bits = scheme.bits
    # it logs every node it visits at INFO and each opset bump at WARNING; the manifest says what it did
    logging.getLogger(MatMulNBitsQuantizer.__module__).setLevel(logging.ERROR)
    nodes = {}
    for relative in files:
        path = bundle / relative
        model = onnx.load(str(path))  # with its external data, if any
        lookups_only = all(node.op_type == "Gather" for node in model.graph.node)
        quantizer = MatMulNBitsQuantizer(
            model,
            bits=bits,
            block_size=BLOCK_SIZE,
            is_symmetric=True,
            accuracy_level=scheme.accuracy_level,
            op_types_to_quantize=("Gather",) if lookups_only and bits == 4 else ("MatMul",),
        )
        with np.errstate(divide="ignore", invalid="ignore"):  # all-zero blocks: scale 0, handled by it
            quantizer.process()
        quantized = quantizer.model.model
        counts = Counter(node.op_type for node in quantized.graph.node)
        nodes[relative] = sum(counts[op] for op in QUANTIZED_OPS)
        if not nodes[relative]:
            continue
        external = path.with_name(path.name + ".data")
        had_external = external.is_file()
        external.unlink(missing_ok=True)
        # a quantized graph is smaller than its source: inline stays inline, past 2 GB stays external
        save_graph(quantized, path, external=had_external)
    return Quantization(
        method=method,
        bits=bits,
        block_size=BLOCK_SIZE,
        symmetric=True,
        nodes=nodes,
        accuracy_level=scheme.accuracy_level,
    )
