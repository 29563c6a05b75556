"""How much of an ONNX decoding step its weights cost: a step of N rollouts against its weight MatMuls alone.

    python benchmarks/decode_floor.py out/bench/65m/onnx-fp32 out/bench/65m/onnx-int4-a8 --rollouts 1,8

A decoding step reads every weight of the decoder; whatever else it does (attention over the KV, norms,
rotary, reshapes, the runtime's host work) is what an engine can still take off. For each bundle this
builds, from its decoder graph, a graph of nothing but the weight multiplications (every MatMul or
MatMulNBits whose weight is an initializer: the same weights, attributes and dtype, each fed a (N, K)
input of its own) and times it against the real steps of `generate` with N rollouts on an image prompt
(--image at --resolution px and --question, --tokens per rollout, the decoder calls timed one by one),
both in one sitting on the runtime's session options.

Prints, and writes to OUT/decode_floor.json and .md, per bundle and N: the median step, the median run
of the weights-only graph, and the share of the step that is weights. Not a test: the times depend on the
machine and its load.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # a plain script: run from a checkout without installing

import numpy as np  # noqa: E402
import onnx  # noqa: E402
from onnx import helper  # noqa: E402
from PIL import Image  # noqa: E402

from benchmarks.workload import write_report  # noqa: E402
from engine.families import family_for  # noqa: E402
from runtimes.onnx import OnnxRuntime  # noqa: E402
from runtimes.onnx.session import open_session  # noqa: E402
from runtimes.protocol import Sampling  # noqa: E402

WEIGHT_OPS = {"MatMul": 1, "MatMulNBits": 2}  # op -> the input whose initializer gives the activations' dtype


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("bundles", type=Path, nargs="+", help="ONNX bundles (sparc-engine export onnx)")
    parser.add_argument("--rollouts", default="1,8", help="comma-separated N")
    parser.add_argument("--image", type=Path, default=ROOT / "examples/street.png")
    parser.add_argument("--question", default="What colour is the car parked next to the tree?")
    parser.add_argument("--resolution", type=int, default=256, help="image view, longest side in pixels")
    parser.add_argument("--tokens", type=int, default=32, help="tokens per rollout (end-of-sequence ignored)")
    parser.add_argument("--repeats", type=int, default=3, help="generate calls per figure")
    parser.add_argument("--out", type=Path, default=ROOT / "out/decode_floor", help="reports")
    return parser.parse_args()


def weights_only(decoder: onnx.ModelProto) -> onnx.ModelProto:
    """The decoder's weight multiplications as a graph of their own: one (batch, K) input per node."""
    initializers = {tensor.name: tensor for tensor in decoder.graph.initializer}
    nodes, inputs, outputs, used = [], [], [], {}
    for node in decoder.graph.node:
        if node.op_type not in WEIGHT_OPS or node.input[1] not in initializers:
            continue  # activations times activations: attention, not weights
        weight = initializers[node.input[1]]
        attributes = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        features = attributes["K"] if node.op_type == "MatMulNBits" else weight.dims[0]
        dtype = initializers[node.input[WEIGHT_OPS[node.op_type]]].data_type
        name = f"weights.{len(nodes)}"
        inputs.append(helper.make_tensor_value_info(f"{name}.in", dtype, ["batch", features]))
        outputs.append(helper.make_tensor_value_info(f"{name}.out", dtype, None))
        nodes.append(
            helper.make_node(
                node.op_type,
                [f"{name}.in", *node.input[1:]],
                [f"{name}.out"],
                domain=node.domain,
                **attributes,
            )
        )
        used |= {key: initializers[key] for key in node.input[1:] if key}
    graph = helper.make_graph(nodes, "weights_only", inputs, outputs, list(used.values()))
    return helper.make_model(graph, opset_imports=decoder.opset_import, ir_version=decoder.ir_version)


def time_weights(bundle: Path, rollouts: int, runs: int) -> tuple[float, int]:
    """Median ms of one run of the bundle's weights-only graph at batch `rollouts`, and its node count."""
    decoder = onnx.load(str(bundle / "base/decoder.onnx"))  # with its external data
    graph = weights_only(decoder)
    with tempfile.TemporaryDirectory() as scratch:
        path = Path(scratch) / "weights.onnx"
        onnx.save(graph, str(path), save_as_external_data=True, location="weights.onnx.data")
        session = open_session(path, ["CPUExecutionProvider"])
    rng = np.random.default_rng(0)
    feed = {
        i.name: rng.standard_normal((rollouts, i.shape[1])).astype(
            np.float16 if i.type == "tensor(float16)" else np.float32
        )
        for i in session.get_inputs()
    }
    session.run(None, feed)  # warm-up
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        session.run(None, feed)
        times.append((time.perf_counter() - start) * 1000)
    return statistics.median(times), len(graph.graph.node)


def time_steps(bundle: Path, rollouts: int, args: argparse.Namespace) -> list[float]:
    """ms of every decoding step (the decoder call of N rollouts, one token each) over --repeats generates."""
    runtime = OnnxRuntime(bundle, device="cpu")
    family = family_for(runtime.info.architecture, runtime.info.image)
    image = family.prepare_image(Image.open(args.image).convert("RGB"), args.resolution, "floor")
    graphs = runtime.graphs("base")
    decoder, steps = graphs.decoder, []

    class Timed:  # the runtime's decoder; its one-token calls (the decoding steps) are timed
        def __call__(self, inputs, kv):
            start = time.perf_counter()
            result = decoder(inputs, kv)
            if inputs["inputs_embeds"].shape[1] == 1:
                steps.append((time.perf_counter() - start) * 1000)
            return result

        def __getattr__(self, name):
            return getattr(decoder, name)

    graphs.decoder = Timed()
    sampling = Sampling(args.tokens, 0.7, seeds=tuple(range(rollouts)), ignore_eos=True)
    for repeat in range(args.repeats + 1):
        if repeat == 1:
            steps.clear()  # the first generate warms the sessions up
        prefix = runtime.prefill(family.image_prefix(image))
        runtime.generate(prefix, family.question_suffix(args.question), rollouts, sampling)
    runtime.close()
    return steps


def main() -> None:
    args = parse_args()
    rows = []
    for bundle in args.bundles:
        for rollouts in (int(n) for n in args.rollouts.split(",")):
            steps = time_steps(bundle, rollouts, args)
            weights_ms, nodes = time_weights(bundle, rollouts, len(steps))
            step_ms = statistics.median(steps)
            rows.append(
                {
                    "bundle": str(bundle),
                    "rollouts": rollouts,
                    "step_ms": step_ms,
                    "weights_ms": weights_ms,
                    "weight_nodes": nodes,
                    "weights_share": weights_ms / step_ms,
                }
            )
            print(f"decode_floor: {bundle}, N={rollouts}: done", file=sys.stderr)
    table = (
        f"decoding steps at {args.resolution} px, {args.tokens} tokens per rollout, median of "
        f"{args.repeats} generates; weights: the decoder's weight MatMuls alone, same batch\n\n"
        "| bundle | N | decoding step | weight MatMuls alone | share of the step |\n|---|---|---|---|---|\n"
    )
    for row in rows:
        table += (
            f"| {row['bundle']} | {row['rollouts']} | {row['step_ms']:.2f} ms | {row['weights_ms']:.2f} ms "
            f"({row['weight_nodes']} nodes) | {row['weights_share']:.0%} |\n"
        )
    settings = {key: getattr(args, key) for key in ("resolution", "tokens", "repeats", "question")}
    write_report(args.out, "decode_floor", {"rows": rows, **settings}, table)


if __name__ == "__main__":
    main()
