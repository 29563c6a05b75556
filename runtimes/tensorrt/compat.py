"""Can this device run a TensorRT bundle? Checked from the manifest before any engine is deserialized.

A TensorRT engine is compiled for one GPU architecture and one TensorRT release. NVIDIA's rule (TensorRT
10.x and 11.x developer guide, "Version Compatibility" / "Engine Compatibility", and the support matrix's
"Engine Portability"): "By default, TensorRT engines are compatible only with the version of TensorRT used
to build them"; "without [hardware compatibility] mode, engines are not portable across different GPU
architectures"; "serialized engines are not portable across platforms". The exporter builds neither
version-compatible nor hardware-compatible engines, so the rule applied here is the strict one:

  - same platform (OS and CPU architecture) as the build, when the manifest records it;
  - same compute capability (e.g. 8.7 for Jetson Orin, 8.9 for Ada, 9.0 for Hopper);
  - same TensorRT major.minor.patch, and the same build number when both sides report one
    (pip wheels report 4 parts, e.g. 10.13.3.9; some installs report 3).

A different GPU model of the same compute capability is allowed with a note: TensorRT runs such an engine
but warns that tactics were timed on another device (performance may suffer). This check gives a clear
message up front; deserializing can still fail, so the runtime must also refuse a null engine.

The manifest keeps the TensorRT version in `tools["tensorrt"]` and the build device in `model`
(`gpu_name`, `compute_capability` as "major.minor", `platform` as "System-machine").
"""

from __future__ import annotations

import platform
import re

from runtimes.bundle import Manifest
from runtimes.protocol import RuntimeInputError

REBUILD = "rebuild the engines on this device: sparc-engine export tensorrt --from ONNX_BUNDLE --out BUNDLE"


def platform_tag() -> str:
    """This machine's OS and CPU architecture, e.g. 'Linux-aarch64' on a Jetson."""
    return f"{platform.system()}-{platform.machine()}"


def parse_trt_version(version: str) -> tuple[int, ...]:
    """'10.13.3.9' -> (10, 13, 3, 9); needs at least major.minor.patch. Suffixes like '.post1' are ignored."""
    match = re.match(r"^\s*(\d+(?:\.\d+)*)", version)
    parts = tuple(int(p) for p in match.group(1).split(".")) if match else ()
    if len(parts) < 3:
        raise RuntimeInputError(
            f"cannot read TensorRT version {version!r} (expected major.minor.patch[.build])"
        )
    return parts


def normalize_compute_capability(value: str | tuple[int, int] | float) -> str:
    """(8, 7), '8.7', 'sm_87' or '87' -> '8.7'."""
    if isinstance(value, tuple):
        return f"{int(value[0])}.{int(value[1])}"
    text = str(value).strip().lower().removeprefix("sm_")
    if re.fullmatch(r"\d+\.\d+", text):
        return text
    if re.fullmatch(r"\d{2,3}", text):  # sm_87 -> 8.7, sm_100 -> 10.0
        return f"{text[:-1]}.{text[-1]}"
    raise RuntimeInputError(f"cannot read compute capability {value!r} (expected e.g. '8.7')")


def check_engine_compatible(
    manifest: Manifest,
    runtime_trt_version: str,
    gpu_name: str,
    compute_capability: str | tuple[int, int],
    *,
    platform: str | None = None,
) -> list[str]:
    """Raise RuntimeInputError if this device cannot run the bundle's engines; return notes otherwise."""
    if manifest.format != "tensorrt":
        raise RuntimeInputError(f"not a TensorRT bundle (format {manifest.format!r})")
    built_version = manifest.tools.get("tensorrt")
    built_gpu = manifest.model.get("gpu_name")
    built_cc = manifest.model.get("compute_capability")
    missing = [
        key
        for key, value in (("tools.tensorrt", built_version), ("model.compute_capability", built_cc))
        if not value
    ]
    if missing:
        raise RuntimeInputError(f"the manifest does not record {', '.join(missing)}; {REBUILD}")

    built_platform = manifest.model.get("platform")
    if platform and built_platform and platform != built_platform:
        raise RuntimeInputError(
            f"the engines were built on {built_platform}, this machine is {platform}: TensorRT engines do "
            f"not move across platforms; {REBUILD}"
        )

    built_cc, here_cc = (
        normalize_compute_capability(built_cc),
        normalize_compute_capability(compute_capability),
    )
    if built_cc != here_cc:
        raise RuntimeInputError(
            f"the engines were built for compute capability {built_cc} ({built_gpu or 'unknown GPU'}), this GPU "
            f"is {gpu_name} ({here_cc}): a TensorRT engine runs only on the GPU architecture it was built "
            f"for; {REBUILD}"
        )

    built, here = parse_trt_version(str(built_version)), parse_trt_version(runtime_trt_version)
    common = min(len(built), len(here))  # the build number counts only when both sides report one
    if built[:common] != here[:common]:
        raise RuntimeInputError(
            f"the engines were built with TensorRT {built_version}, this runtime is TensorRT "
            f"{runtime_trt_version}: an engine runs only with the TensorRT version that built it; "
            f"install TensorRT {built_version} or {REBUILD}"
        )

    notes = []
    if built_gpu and built_gpu != gpu_name:
        notes.append(
            f"the engines were built on {built_gpu}, this GPU is {gpu_name} (same compute capability "
            f"{here_cc}): they run, but their kernels were tuned on the other GPU; rebuild here for best speed"
        )
    return notes
