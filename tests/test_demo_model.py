"""The embedded default: the committed demo checkpoint exports to ONNX and answers the bundled example as
`make demo` runs it (specs/demo.yaml, SPARC WBF N=8)."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

from tests.support import ROOT, SPARC_ENGINE

DEMO_MODEL = ROOT / "demo" / "qwen3vl"
GREEN_CROSS = (1435, 262, 1493, 320)  # examples/shapes.png, pixels: the object the question names


def test_the_committed_demo_model_answers_the_example(tmp_path: Path) -> None:
    assert (DEMO_MODEL / "model.safetensors").stat().st_size <= 30 * 2**20
    bundle = tmp_path / "demo-onnx"
    export = [SPARC_ENGINE, "export", "onnx", "--model", str(DEMO_MODEL),
              "--perception-lora", str(DEMO_MODEL / "perception-lora"), "--out", str(bundle)]  # fmt: skip
    exported = subprocess.run(export, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert exported.returncode == 0, exported.stderr[-2000:]
    run = [SPARC_ENGINE, "run", "specs/demo.yaml", "--set", f"model.bundle={bundle}", "--json"]
    answered = subprocess.run(run, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert answered.returncode == 0, answered.stderr[-2000:]
    result = json.loads(answered.stdout)
    assert result["answer"].strip() == "cross"
    x1, y1, x2, y2 = GREEN_CROSS
    assert any(a <= x1 and b <= y1 and c >= x2 and d >= y2 for a, b, c, d in result["crops"]), result["crops"]
