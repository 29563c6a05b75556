"""`sparc-engine eval`: specs run over a dataset, scored into report.json/.md/.png, and a rerun resumes."""

import json
import subprocess
from pathlib import Path

import pytest

from engine.cli import main
from engine.errors import UserError
from engine.pipeline import Pipeline
from evals.runner import spec_names
from tests.support import SPARC_ENGINE, demo_overrides, picture, read_results

ROOT = Path(__file__).parents[2]
DEMO = ROOT / "specs" / "demo.yaml"
CAT = '[{"bbox_2d": [100, 100, 300, 300], "label": "cat"}]'  # 0..1000 of the image
BASELINE = """name: baseline
model: {bundle: unused, runtime: onnx}
stages:
  - reason: {resolution: 256, max_new_tokens: 4}
"""
SPARC = """model: {bundle: unused, runtime: onnx}
stages:
  - perceive: {resolution: 256, rollouts: 2}
  - fuse: {}
  - crop: {min_side: 32, resolution: 64}
  - reason: {resolution: 256}
"""
SPEC_KEYS = {
    "name", "spec", "results", "answered", "failed", "accuracy", "by", "boxes_n", "region_recall", "mean_iou",
    "crop_recall", "visual_tokens_computed", "visual_tokens_in_context", "crops", "p50_ms", "p95_ms",
}  # fmt: skip


def _dataset(folder: Path) -> Path:
    """3 rows: an open question with boxes, a multiple-choice one, and one without boxes."""
    rows = [
        {"id": "r0", "question": "What shape is the red object?", "answer": "circle", "category": "shape",
         "boxes": [[32, 24, 97, 73]], "long_side": 320},
        {"id": "r1", "question": "What color is the star?", "answer": "B", "options": {"A": "red", "B": "blue"},
         "category": "color", "boxes": [[0, 0, 64, 64]], "long_side": 320},
        {"id": "r2", "question": "What shape is the blue object?", "answer": "square", "category": "shape",
         "long_side": 256},
    ]  # fmt: skip
    for i, (row, size) in enumerate(zip(rows, [(320, 240), (240, 320), (256, 256)])):
        picture(*size, seed=i).save(folder / f"{row['id']}.png")
        row["image"] = f"{row['id']}.png"
    path = folder / "rows.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def test_spec_names_take_the_parent_folder_when_stems_clash():
    assert spec_names([Path("specs/demo.yaml"), Path("a/b.yaml")]) == ["demo", "b"]
    assert spec_names([Path("specs/demo.yaml"), Path("other/demo.yaml")]) == ["specs-demo", "other-demo"]
    with pytest.raises(UserError, match="rename one"):
        spec_names([Path("specs/demo.yaml"), Path("specs/demo.yaml")])


@pytest.fixture
def scripted_eval(tmp_path, monkeypatch, scripted_runtime):
    """eval (of baseline.yaml unless specs are named) on a scripted runtime that answers 'circle' and
    boxes CAT (no model); returns it and the list of the pipelines it opened."""
    opened = []

    def open_scripted(spec):
        opened.append(spec)
        return Pipeline(spec, scripted_runtime([CAT] * 64, answer="circle"))

    monkeypatch.setattr("engine.pipeline.open_pipeline", open_scripted)
    (tmp_path / "baseline.yaml").write_text(BASELINE)
    (tmp_path / "sparc.yaml").write_text(SPARC)
    dataset, out = _dataset(tmp_path), tmp_path / "out"

    def run(*extra, specs=("baseline.yaml",)):
        paths = [str(tmp_path / spec) for spec in specs]
        return main(["eval", *paths, "--dataset", str(dataset), "--out", str(out), *extra])

    return run, opened


def test_eval_scores_limits_and_resumes_in_process(scripted_eval, tmp_path, capsys):
    run, opened = scripted_eval
    assert run("--limit", "2", "--by", "category") == 0
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    (spec,) = report["specs"]
    assert report["rows"] == 2 and (spec["answered"], spec["failed"]) == (2, 0)
    assert spec["accuracy"] == 0.5  # 'circle' is right for r0 only
    shape, color = {"accuracy": 1.0, "n": 1}, {"accuracy": 0.0, "n": 1}
    assert spec["by"] == {"category": {"color": color, "shape": shape}}
    assert spec["region_recall"] == 0.0 and spec["crops"] == 0.0  # a baseline has no regions
    assert "baseline: accuracy 50.0%; 2 answered now, 0 already in" in capsys.readouterr().out
    assert run() == 0  # all 3 rows: only the third is computed
    assert "1 answered now, 2 already in" in capsys.readouterr().out
    assert len(opened) == 2
    assert run() == 0  # nothing left: no model is opened
    assert len(opened) == 2 and "0 answered now, 3 already in" in capsys.readouterr().out


def test_eval_scores_the_regions_crops_and_tokens_of_a_sparc_spec(scripted_eval, tmp_path):
    run, _ = scripted_eval
    assert run(specs=("baseline.yaml", "sparc.yaml")) == 0
    baseline, sparc = json.loads((tmp_path / "out" / "report.json").read_text())["specs"]
    assert (baseline["name"], sparc["name"]) == ("baseline", "sparc")  # the spec's name, else its file's
    assert sparc["crops"] == 1.0 and sparc["boxes_n"] == 2
    # CAT is [32, 24, 97, 73] px on r0 (its ground truth: IoU 1) and [24, 32, 73, 97] on r1 (IoU 1280/6001)
    assert sparc["region_recall"] == 0.5
    assert sparc["mean_iou"] == pytest.approx((1.0 + 1280 / 6001) / 2)
    assert sparc["visual_tokens_in_context"] > baseline["visual_tokens_in_context"]  # view + crop
    assert sparc["visual_tokens_computed"] == sparc["visual_tokens_in_context"]  # the view computed once
    table = (tmp_path / "out" / "report.md").read_text().splitlines()
    assert table[-2].startswith("| baseline | 33.3 |") and table[-1].startswith("| sparc | 33.3 |")


def test_eval_refuses_to_resume_with_another_spec(scripted_eval, capsys):
    run, opened = scripted_eval
    assert run("--limit", "1") == 0
    assert run("--set", "seed=1") == 1
    assert "holds results of another spec or --set" in capsys.readouterr().err
    assert len(opened) == 1


def test_eval_failed_rows_exit_1_and_are_retried(scripted_eval, tmp_path, capsys):
    run, _ = scripted_eval
    (tmp_path / "r1.png").unlink()
    assert run() == 1
    captured = capsys.readouterr()
    assert "1 failed" in captured.out and "row r1:" in captured.err
    assert json.loads((tmp_path / "out" / "report.json").read_text())["specs"][0]["failed"] == 1
    picture(240, 320, seed=1).save(tmp_path / "r1.png")
    assert run() == 0 and "1 answered now, 2 already in" in capsys.readouterr().out


def test_eval_bad_input_is_one_line(tmp_path, capsys):
    rows = tmp_path / "rows.jsonl"
    rows.write_text(json.dumps({"id": "a", "image": "a.png", "question": "q"}) + "\n")
    (tmp_path / "baseline.yaml").write_text(BASELINE)
    args = ["eval", str(tmp_path / "baseline.yaml"), "--dataset", str(rows), "--out", str(tmp_path / "out")]
    assert main(args) == 1
    assert "1 rows have no 'answer'" in capsys.readouterr().err
    assert main([*args, "--set", "stages.0.reason.resolution=8"]) == 2  # every spec checked, named
    assert capsys.readouterr().err.startswith(f"spec error: {tmp_path / 'baseline.yaml'}: stages.0.reason")


def test_eval_command_end_to_end_on_the_tiny_model(tmp_path, tiny_qwen3vl_onnx):
    """Two specs on the tiny random ONNX model through the installed command; the rerun computes nothing."""
    dataset = _dataset(tmp_path)
    (tmp_path / "baseline.yaml").write_text(BASELINE)
    out = tmp_path / "eval"
    command = [
        SPARC_ENGINE, "eval", str(tmp_path / "baseline.yaml"), str(DEMO),
        "--dataset", str(dataset), "--out", str(out),
        "--set", f"model.bundle={tiny_qwen3vl_onnx}", "--set", "model.device=cpu",
    ]  # fmt: skip
    first = subprocess.run(command, capture_output=True, text=True, cwd=tmp_path)
    assert first.returncode == 0, first.stderr

    report = json.loads((out / "report.json").read_text())
    assert set(report) == {"dataset", "rows", "specs"} and report["rows"] == 3
    assert [Path(s["spec"]).name for s in report["specs"]] == ["baseline.yaml", "demo.yaml"]
    for spec in report["specs"]:
        assert set(spec) == SPEC_KEYS
        assert (spec["answered"], spec["failed"], spec["boxes_n"]) == (3, 0, 2)
        assert 0.0 <= spec["accuracy"] <= 1.0 and 0.0 <= spec["region_recall"] <= 1.0
        assert list(spec["by"]) == ["category", "long_side"] and list(spec["by"]["long_side"]) == [
            "256",
            "320",
        ]
        assert spec["visual_tokens_in_context"] > 0 and spec["p95_ms"] >= spec["p50_ms"] > 0
        assert isinstance(spec["crops"], float) and isinstance(spec["visual_tokens_computed"], float)
    baseline, demo = report["specs"]
    assert (
        baseline["crops"] == 0 and baseline["visual_tokens_computed"] == baseline["visual_tokens_in_context"]
    )
    # perceive and reason share the 256-px view: its KV is computed once, then only the crops are new
    assert demo["visual_tokens_computed"] == demo["visual_tokens_in_context"]

    table = (out / "report.md").read_text().splitlines()
    header = next(line for line in table if line.startswith("| spec |"))
    assert header == (
        "| spec | accuracy | color | shape | 256 | 320 | recall@0.5 | mean IoU | in a crop | visual tokens computed | "
        "in context | crops | p50 ms | p95 ms |"
    )
    assert sum(line.startswith("| ") for line in table) == 3  # the header and one row per spec
    assert (out / "pareto.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    results = {name: (out / name / "results.jsonl").read_bytes() for name in ("baseline", "demo")}
    assert all(len(data.splitlines()) == 3 for data in results.values())
    second = subprocess.run(command, capture_output=True, text=True, cwd=tmp_path)
    assert second.returncode == 0, second.stderr
    assert second.stdout.count("0 answered now, 3 already in") == 2
    assert {name: (out / name / "results.jsonl").read_bytes() for name in results} == results


def test_eval_on_ray_scores_like_a_local_eval(tmp_path, tiny_qwen3vl_onnx, ray_address, capsys):
    dataset = _dataset(tmp_path)
    args = ["eval", str(DEMO), "--dataset", str(dataset), *demo_overrides(tiny_qwen3vl_onnx)]
    assert main([*args, "--out", str(tmp_path / "local")]) == 0
    assert main([*args, "--out", str(tmp_path / "ray"), "--ray", ray_address, "--workers", "2"]) == 0
    assert "3 answered now, 0 already in" in capsys.readouterr().out
    local, on_ray = (read_results(tmp_path / out / "demo" / "results.jsonl") for out in ("local", "ray"))
    assert on_ray == local and len(local) == 3
