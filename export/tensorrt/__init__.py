"""`sparc-engine export tensorrt`: ONNX bundle -> TensorRT engine bundle, built on the device that runs it.

    sparc-engine export tensorrt --from ONNX_BUNDLE --out BUNDLE [--precision fp16] [--spec SPEC]

    bundle/
      manifest.yaml          # format tensorrt; tools.tensorrt and model.{gpu_name, compute_capability,
                             # platform, profiles}: runtimes/tensorrt/compat.py checks them before loading
      tokenizer.json
      base/<role>.engine     # one engine per ONNX graph of the source bundle
      perception/<role>.engine

TensorRT engines are compiled for one GPU architecture and one TensorRT release, so they are built on the
target device (a Jetson builds its own). What runs anywhere: the source bundle check and the profile
sizing (export/tensorrt/profiles.py); without `tensorrt` or a CUDA GPU the command stops there with one line.

Precision: TensorRT 11 builds only strongly typed networks (the BuilderFlag.FP16/INT8 flags are gone):
the engine computes in the ONNX graph's own types, so another precision means exporting the ONNX bundle in
it. TensorRT 10 (JetPack) can still lower an fp32 graph to fp16/bf16 with builder flags. int8/fp8 need
quantize/dequantize nodes in the ONNX graph on both.

Contrib ops: the Qwen3-VL vision graph's onnxruntime `MultiHeadAttention` is lowered to standard ops
before parsing (export/tensorrt/lower.py); TensorRT's parser knows no contrib ops. The decoder's
shared-prefix attention (export/onnx/base.py) is written in standard ops and needs no lowering.

STATUS: the builder path below (_build_engine, _detect_gpu, _write_bundle) has NOT YET RUN ON A GPU: no
device was lent while it was written. It follows the TensorRT 10/11 Python API documentation; treat it
as unverified until `tests/export/test_tensorrt_export.py::test_builds_engines_on_gpu` passes on a GPU.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

from engine.errors import UserError
from export.tensorrt.profiles import (
    Plan,
    Profile,
    Workload,
    graph_profiles,
    onnx_inputs,
    plan_profiles,
    workload_from_spec,
)
from runtimes.bundle import MANIFEST, Manifest, read_manifest, sha256_file, verify, write_manifest
from runtimes.tensorrt.compat import platform_tag

NEEDS_DEVICE = (
    "TensorRT engines must be built on the target device (the GPU that will run them) with the "
    "`tensorrt` extra installed: pip install 'sparc-engine[tensorrt]'"
)


@dataclass(frozen=True)
class Precision:
    """How to get a precision out of TensorRT: a strongly typed network, or builder flags (TensorRT 10 only)."""

    name: str
    strongly_typed: bool
    builder_flags: tuple[str, ...] = ()  # tensorrt.BuilderFlag member names


def plan_precision(trt_major: int, onnx_dtype: str, precision: str | None) -> Precision:
    """Decide the network mode; refuse what the TensorRT version cannot do with a fix in the message."""
    wanted = precision or onnx_dtype
    if wanted == onnx_dtype:
        return Precision(wanted, strongly_typed=True)  # the graph's own types: works on 10 and 11
    if wanted in ("fp8", "int8"):
        raise UserError(
            f"--precision {wanted} needs quantize/dequantize nodes in the ONNX graph (explicit quantization); "
            f"this bundle is {onnx_dtype}: export a quantized ONNX bundle first"
        )
    if trt_major >= 11:
        raise UserError(
            f"TensorRT {trt_major} builds only strongly typed networks, in the ONNX graph's own precision "
            f"({onnx_dtype}); export the ONNX bundle in {wanted} or leave out --precision"
        )
    if onnx_dtype != "fp32":
        raise UserError(
            f"--precision {wanted}: TensorRT can lower only an fp32 graph; this one is {onnx_dtype}"
        )
    return Precision(wanted, strongly_typed=False, builder_flags=(wanted.upper(),))  # FP16 | BF16


def size_profiles(
    source: Path, manifest: Manifest, workload: Workload
) -> tuple[Plan, dict[str, list[Profile]]]:
    """Profiles of every ONNX graph of the bundle (file path -> profiles), read from the graphs' inputs."""
    max_positions = manifest.model.get("max_position_embeddings")
    try:
        plan = plan_profiles(workload, manifest.image, max_positions)
        graphs = sorted({path for roles in manifest.variants.values() for path in roles.values()})
        return plan, {path: graph_profiles(onnx_inputs(source / path), plan) for path in graphs}
    except ValueError as error:
        raise UserError(f"{source}: {error}") from None


def export_tensorrt(args: argparse.Namespace) -> Path:
    source: Path = args.source
    manifest = read_manifest(source)
    if manifest.format != "onnx":
        raise UserError(f"{source}: --from needs an ONNX bundle (this one is {manifest.format!r})")
    verify(source, manifest)  # the graphs we size and build from are the ones the manifest describes
    workload = Workload()
    if args.spec:
        from engine.spec import load_spec

        workload = workload_from_spec(load_spec(args.spec))
    try:
        import onnx  # noqa: F401  (reads the graphs' input names and axes)
    except ImportError:
        raise UserError("export tensorrt needs onnx to read the graphs' inputs: pip install onnx") from None
    plan, profiles = size_profiles(source, manifest, workload)

    try:
        import tensorrt as trt
    except ImportError:
        raise UserError(f"{NEEDS_DEVICE} (tensorrt is not installed here)") from None
    gpu = _detect_gpu()
    if gpu is None:
        raise UserError(f"{NEEDS_DEVICE} (no CUDA GPU found here)")
    precision = plan_precision(int(trt.__version__.split(".")[0]), manifest.dtype, args.precision)
    return _write_bundle(trt, gpu, source, manifest, precision, plan, profiles, Path(args.out))


# --- not yet run on a GPU ------------------------------------------------------------------------------


def _detect_gpu() -> tuple[str, str] | None:
    """(name, compute capability 'major.minor') of CUDA device 0, or None. cuda-python first, then nvidia-smi."""
    try:
        try:
            from cuda.bindings import runtime as cudart  # cuda-python >= 12.6
        except ImportError:
            from cuda import cudart  # older cuda-python
        error, count = cudart.cudaGetDeviceCount()
        if error != cudart.cudaError_t.cudaSuccess or count < 1:
            return None
        error, props = cudart.cudaGetDeviceProperties(0)
        if error == cudart.cudaError_t.cudaSuccess:
            name = props.name.decode(errors="replace") if isinstance(props.name, bytes) else str(props.name)
            return name.rstrip("\x00").strip(), f"{props.major}.{props.minor}"
    except ImportError:
        pass
    try:  # Jetson has no nvidia-smi on older JetPacks: cuda-python above is the way there
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=name,compute_cap", "--format=csv,noheader", "--id=0"],
            capture_output=True,
            text=True,
            timeout=30,
            check=True,
        ).stdout
        name, capability = (part.strip() for part in out.splitlines()[0].rsplit(",", 1))
        return name, capability
    except (OSError, subprocess.SubprocessError, ValueError, IndexError):
        return None


def _build_engine(trt, onnx_path: Path, dtype: str, profiles: list[Profile], precision: Precision) -> bytes:
    """Parse one ONNX graph and build a serialized engine with one optimization profile per Profile."""
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    flags = 0
    strongly_typed = getattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED", None)
    if precision.strongly_typed and strongly_typed is not None:  # TensorRT 11: always strongly typed
        flags |= 1 << int(strongly_typed)
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    import onnx

    from export.tensorrt.lower import lower_contrib_attention

    graph = onnx.load(str(onnx_path), load_external_data=False)  # weights stay in the .data file
    # the vision graph's MultiHeadAttention: TensorRT's parser has no contrib ops
    lower_contrib_attention(graph, dtype)
    if not parser.parse(graph.SerializeToString(), str(onnx_path)):  # the path resolves external .data
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise UserError(f"TensorRT cannot parse {onnx_path}: {errors}")
    config = builder.create_builder_config()
    for flag in precision.builder_flags:
        config.set_flag(getattr(trt.BuilderFlag, flag))
    for profile in profiles:  # index order = Profile order: the runtime selects them by index
        optimization = builder.create_optimization_profile()
        for name, (low, opt, high) in profile.shapes.items():
            optimization.set_shape(name, low, opt, high)
        config.add_optimization_profile(optimization)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise UserError(f"TensorRT failed to build an engine from {onnx_path} (see its log above)")
    return bytes(serialized)


def _write_bundle(
    trt,
    gpu: tuple[str, str],
    source: Path,
    manifest: Manifest,
    precision: Precision,
    plan: Plan,
    profiles: dict[str, list[Profile]],
    out: Path,
) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    (out / MANIFEST).unlink(missing_ok=True)  # incomplete until the manifest is rewritten
    engines = {path: str(Path(path).with_suffix(".engine")) for path in profiles}
    for onnx_path, engine_path in engines.items():
        serialized = _build_engine(trt, source / onnx_path, manifest.dtype, profiles[onnx_path], precision)
        (out / engine_path).parent.mkdir(parents=True, exist_ok=True)
        (out / engine_path).write_bytes(serialized)
    shutil.copyfile(source / "tokenizer.json", out / "tokenizer.json")
    variants = {
        variant: {role: engines[path] for role, path in roles.items()}
        for variant, roles in manifest.variants.items()
    }
    files = ["tokenizer.json", *engines.values()]
    gpu_name, capability = gpu
    result = Manifest(
        format="tensorrt",
        architecture=manifest.architecture,
        source=str(source),
        dtype=precision.name,
        image=manifest.image,
        tokens=manifest.tokens,
        variants=variants,
        files={relative: sha256_file(out / relative) for relative in files},
        tools={**manifest.tools, "tensorrt": trt.__version__},
        model={
            **manifest.model,
            "gpu_name": gpu_name,
            "compute_capability": capability,
            "platform": platform_tag(),
            "strongly_typed": precision.strongly_typed,
            "longest_prompt": plan.longest_prompt,
            "context": plan.context,
            # engine file -> its profiles in index order: [{name, shapes: input -> [min, opt, max]}]
            "profiles": {
                engines[path]: [{"name": p.name, "shapes": p.as_dict()} for p in graph]
                for path, graph in profiles.items()
            },
        },
    )
    write_manifest(out, result)
    return out
