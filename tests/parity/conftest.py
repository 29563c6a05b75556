"""The parity suite's fixtures: the models only it uses, and a case's runtime beside torch_ref (both
opened once per session, in tests/conftest.py's `opened`)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from tests.parity.models import Case, open_once, open_reference

pytest.importorskip("torch")
pytest.importorskip("onnxruntime")


@pytest.fixture(scope="session")
def tiny_molmo2_crop84(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from export.tiny_molmo2 import TINY_MOLMO2, build_tiny_molmo2

    sizes = dataclasses.replace(TINY_MOLMO2, crop_size=84, preprocessor_config=False)
    return build_tiny_molmo2(tmp_path_factory.mktemp("tiny") / "molmo2-crop84", seed=0, sizes=sizes)


@pytest.fixture(scope="session")
def tiny_molmo2_crop84_onnx(tiny_molmo2_crop84: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from engine.cli import main

    bundle = tmp_path_factory.mktemp("molmo2-crop84-onnx") / "bundle"
    assert main(["export", "onnx", "--model", str(tiny_molmo2_crop84), "--out", str(bundle)]) == 0
    return bundle


@pytest.fixture
def pair(request: pytest.FixtureRequest, opened: dict, case: Case):
    """(the runtime under test, torch_ref on the same checkpoint and LoRA) for a case."""
    bundle = request.getfixturevalue(case.bundle.fixture)
    return open_once(opened, case.runtime, bundle), open_reference(request, opened, case.model)
