"""The CLI as a user meets it: exit codes, one-line errors, the --json contract, batch runs that resume."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from engine.cli import main

ROOT = Path(__file__).parents[2]
DEMO = ROOT / "specs" / "demo.yaml"


@pytest.fixture
def image_path(tmp_path):
    rng = np.random.default_rng(0)
    path = tmp_path / "scene.png"
    Image.fromarray(rng.integers(0, 255, (120, 200, 3), dtype=np.uint8)).save(path)
    return path


@pytest.fixture
def demo_args(tiny_qwen3vl):
    # small budgets: the CLI's plumbing is under test here, not the model
    return [
        "--set", f"model.bundle={tiny_qwen3vl}",
        "--set", "model.runtime=torch_ref",  # the demo spec runs an ONNX bundle; this is the HF checkpoint
        "--set", "model.device=cpu",
        "--set", "stages.0.perceive.max_new_tokens=8",
        "--set", "stages.3.reason.max_new_tokens=4",
    ]  # fmt: skip


def test_validate_ok_and_help(capsys):
    assert main(["validate", str(DEMO)]) == 0
    assert "ok (perceive -> fuse -> crop -> reason" in capsys.readouterr().out
    with pytest.raises(SystemExit) as caught:
        main(["run", "--help"])
    assert caught.value.code == 0
    assert "--save-viz" in capsys.readouterr().out


def test_bad_spec_exits_2_naming_every_problem(capsys):
    code = main(["validate", str(DEMO), "--set", "stages.0.perceive.rollouts=0", "--set", "model.device=tpu"])
    err = capsys.readouterr().err.splitlines()
    assert code == 2
    assert err[0].startswith("spec error: stages.0.perceive.rollouts:") and "(got 0)" in err[0]
    assert err[1].startswith("spec error: model.device:")


def test_json_prints_exactly_the_contract(capsys, demo_args, image_path, tmp_path):
    viz = tmp_path / "viz.png"
    code = main(["run", str(DEMO), *demo_args, "--image", str(image_path), "--question", "where?", "--json",
                 "--save-viz", str(viz)])  # fmt: skip
    assert code == 0
    result = json.loads(capsys.readouterr().out)
    assert set(result) == {"answer", "regions", "crops", "stages"}
    assert isinstance(result["answer"], str)
    for region in result["regions"]:
        assert set(region) == {"box", "score"} and len(region["box"]) == 4
        x1, y1, x2, y2 = region["box"]
        assert 0 <= x1 < x2 <= 200 and 0 <= y1 < y2 <= 120  # pixels of the original image
    assert [s["name"] for s in result["stages"]] == ["perceive", "fuse", "crop", "reason"]
    for stage in result["stages"]:
        assert set(stage) == {
            "name",
            "prompt_tokens",
            "reused_tokens",
            "generated_tokens",
            "visual_tokens",
            "visual_tokens_computed",
            "ms",
        }
    perceive, reason = result["stages"][0], result["stages"][3]
    assert perceive["reused_tokens"] > 0 and reason["reused_tokens"] > 0  # 4 rollouts, same resolution
    assert Image.open(viz).size == (200, 120)


def test_spec_example_is_the_default_input(capsys, demo_args):
    assert main(["run", str(DEMO), *demo_args, "--json"]) == 0
    assert "answer" in json.loads(capsys.readouterr().out)


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda d: d / "missing.png", "no such file"),
        (lambda d: (d / "bad.png").write_bytes(b"not an image") and d / "bad.png", "not an image"),
    ],
)
def test_bad_image_is_one_line_and_exit_1(tmp_path, make, message, tiny_qwen3vl):
    path = make(tmp_path)
    run = subprocess.run(
        [sys.executable, "-m", "engine.cli", "run", str(DEMO), "--set", f"model.bundle={tiny_qwen3vl}",
         "--image", str(path), "--question", "q"],
        capture_output=True, text=True, cwd=ROOT,
    )  # fmt: skip
    assert run.returncode == 1
    assert "Traceback" not in run.stderr
    lines = run.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0].lower()


def test_missing_bundle_and_usage_errors(capsys, image_path):
    code = main(
        [
            "run",
            str(DEMO),
            "--set",
            "model.bundle=/nonexistent",
            "--image",
            str(image_path),
            "--question",
            "q",
        ]
    )
    assert code == 1
    assert "model.bundle '/nonexistent' does not exist" in capsys.readouterr().err
    with pytest.raises(SystemExit) as caught:
        main(["run", str(DEMO), "--dataset", "in.jsonl"])
    assert caught.value.code == 2


def test_dataset_appends_and_resumes(tmp_path, demo_args, image_path, capsys):
    rows = [{"id": i, "image": image_path.name, "question": "what?"} for i in ("a", "b", "c")]
    rows.append({"id": "d", "image": "missing.png", "question": "what?"})
    dataset = tmp_path / "in.jsonl"
    dataset.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    out = tmp_path / "out.jsonl"
    assert main(["run", str(DEMO), *demo_args, "--dataset", str(dataset), "--out", str(out)]) == 1
    err = capsys.readouterr().err
    assert "row d:" in err and "3 answered, 0 already" in err and "1 failed" in err
    written = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["id"] for r in written] == ["a", "b", "c"] and all("answer" in r for r in written)

    # a kill mid-write leaves half a line: the rerun drops it and answers only what is missing
    out.write_text(out.read_text() + '{"id": "d", "ans')
    (tmp_path / "missing.png").write_bytes(image_path.read_bytes())
    assert main(["run", str(DEMO), *demo_args, "--dataset", str(dataset), "--out", str(out)]) == 0
    assert "1 answered, 3 already" in capsys.readouterr().err
    assert [json.loads(line)["id"] for line in out.read_text().splitlines()] == ["a", "b", "c", "d"]


def test_bad_dataset_rows_are_named(tmp_path, demo_args, capsys):
    dataset = tmp_path / "in.jsonl"
    dataset.write_text('{"id": 1, "image": "x.png"}\n')
    code = main(["run", str(DEMO), *demo_args, "--dataset", str(dataset), "--out", str(tmp_path / "o.jsonl")])
    assert code == 1
    assert f"{dataset}:1: row lacks question" in capsys.readouterr().err
