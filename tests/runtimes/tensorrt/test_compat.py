"""TensorRT bundle compatibility: refuse engines built for another GPU architecture, TensorRT or platform."""

from __future__ import annotations

from dataclasses import replace

import pytest

from runtimes.bundle import Manifest, read_manifest, write_manifest
from runtimes.protocol import ImageConfig, RuntimeInputError
from runtimes.tensorrt.compat import (
    check_engine_compatible,
    normalize_compute_capability,
    parse_trt_version,
    platform_tag,
)

ORIN = Manifest(
    format="tensorrt",
    architecture="Qwen3VLForConditionalGeneration",
    source="models/qwen3vl-4b-onnx",
    dtype="fp16",
    image=ImageConfig(),
    tokens={},
    variants={"base": {"decoder": "base/decoder.engine"}},
    files={},
    tools={"tensorrt": "10.3.0"},
    model={"gpu_name": "Orin", "compute_capability": "8.7", "platform": "Linux-aarch64"},
)


def test_same_device_and_version_is_accepted() -> None:
    assert check_engine_compatible(ORIN, "10.3.0", "Orin", "8.7", platform="Linux-aarch64") == []
    assert check_engine_compatible(ORIN, "10.3.0", "Orin", (8, 7)) == []  # platform unknown: not checked


def test_another_architecture_is_refused() -> None:
    with pytest.raises(
        RuntimeInputError, match=r"compute capability 8\.7 \(Orin\), this GPU is NVIDIA H100 .*\(9\.0\)"
    ):
        check_engine_compatible(ORIN, "10.3.0", "NVIDIA H100 80GB HBM3", (9, 0))


@pytest.mark.parametrize("runtime", ["10.3.1", "10.4.0", "11.0.0", "8.6.1"])
def test_another_tensorrt_release_is_refused(runtime: str) -> None:
    with pytest.raises(
        RuntimeInputError, match=rf"built with TensorRT 10\.3\.0, this runtime is TensorRT {runtime}"
    ):
        check_engine_compatible(ORIN, runtime, "Orin", "8.7")


def test_build_numbers_count_only_when_both_sides_have_one() -> None:
    wheel = replace(ORIN, tools={"tensorrt": "10.13.3.9"})
    assert check_engine_compatible(wheel, "10.13.3.9", "Orin", "8.7") == []
    assert check_engine_compatible(wheel, "10.13.3", "Orin", "8.7") == []
    with pytest.raises(RuntimeInputError, match="TensorRT 10.13.3.9"):
        check_engine_compatible(wheel, "10.13.3.10", "Orin", "8.7")


def test_same_architecture_other_model_runs_with_a_note() -> None:
    ada = replace(ORIN, model={"gpu_name": "NVIDIA GeForce RTX 4090", "compute_capability": "8.9"})
    (note,) = check_engine_compatible(ada, "10.3.0", "NVIDIA L4", "sm_89")
    assert "built on NVIDIA GeForce RTX 4090, this GPU is NVIDIA L4" in note


def test_another_platform_is_refused() -> None:
    with pytest.raises(RuntimeInputError, match="built on Linux-aarch64, this machine is Windows-AMD64"):
        check_engine_compatible(ORIN, "10.3.0", "Orin", "8.7", platform="Windows-AMD64")


def test_incomplete_or_foreign_manifests_are_refused() -> None:
    with pytest.raises(RuntimeInputError, match="not a TensorRT bundle"):
        check_engine_compatible(replace(ORIN, format="onnx"), "10.3.0", "Orin", "8.7")
    with pytest.raises(RuntimeInputError, match="does not record tools.tensorrt, model.compute_capability"):
        check_engine_compatible(replace(ORIN, tools={}, model={}), "10.3.0", "Orin", "8.7")
    with pytest.raises(RuntimeInputError, match="cannot read TensorRT version"):
        check_engine_compatible(ORIN, "ten", "Orin", "8.7")


def test_the_fields_survive_the_manifest_file(tmp_path) -> None:
    write_manifest(tmp_path, ORIN)
    assert check_engine_compatible(read_manifest(tmp_path), "10.3.0", "Orin", "8.7") == []


def test_parsers() -> None:
    assert parse_trt_version("11.1.0.post1") == (11, 1, 0)
    assert parse_trt_version("10.13.3.9") == (10, 13, 3, 9)
    with pytest.raises(RuntimeInputError):
        parse_trt_version("10.3")
    assert [normalize_compute_capability(v) for v in ("8.7", (9, 0), "sm_87", "100", 8.9)] == [
        "8.7",
        "9.0",
        "8.7",
        "10.0",
        "8.9",
    ]
    with pytest.raises(RuntimeInputError):
        normalize_compute_capability("ampere")
    assert "-" in platform_tag()
