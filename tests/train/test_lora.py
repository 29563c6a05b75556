"""`train perception-lora` on the tiny models: the loss falls, the adapter loads, exports and runs."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from engine.batch import Row
from engine.cli import main
from engine.errors import UserError
from tests.support import picture
from train.lora import (
    LoraOptions,
    checkpoint_families,
    row_boxes,
    text_decoder_pattern,
    train_perception_lora,
)

ROOT = Path(__file__).parents[2]
CLI = Path(sys.executable).parent / "sparc-engine"
SMALL = LoraOptions(resolutions=(64,), steps=3, batch_size=2, lr=1e-2, device="cpu")


def write_rows(folder: Path, n: int, *, boxless: int = 0) -> Path:
    """n rows with made-up boxes on small pictures of different shapes, then `boxless` rows without."""
    folder.mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(n + boxless):
        width, height = (96, 64) if i % 2 else (64, 80)
        picture(width, height, seed=i).save(folder / f"{i}.png")
        row = {"id": f"r{i}", "image": f"{i}.png", "question": f"where is thing {i}?"}
        if i < n:
            row |= {"boxes": [[4 + i, 6, 40, 30 + i], [50, 40, 60, 60]], "labels": [f"thing {i}", "cup"]}
        rows.append(row)
    path = folder / "rows.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def env_one_thread() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1"}


def falls(losses: list[float], by: float) -> bool:
    """The mean of the last three steps is below `by` times the first step's loss."""
    return sum(losses[-3:]) / 3 < by * losses[0]


@pytest.fixture(scope="module")
def qwen_adapter(tiny_qwen3vl: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("lora")
    dataset = write_rows(root / "data", 3, boxless=1)
    options = LoraOptions(resolutions=(64, 96), steps=20, batch_size=4, lr=1e-2, device="cpu")
    train_perception_lora(tiny_qwen3vl, dataset, root / "adapter", options)
    return root / "adapter"


def test_qwen3vl_loss_falls_and_the_run_is_recorded(qwen_adapter):
    record = json.loads((qwen_adapter / "training.json").read_text())
    assert len(record["losses"]) == 20 and falls(record["losses"], 0.6)
    assert record["rows_used"] == 3 and record["rows_skipped_without_boxes"] == 1
    assert record["examples"] == 6  # every row at both resolutions
    assert record["options"]["resolutions"] == [64, 96] and record["device"] == "cpu"
    assert (qwen_adapter / "training.png").read_bytes().startswith(b"\x89PNG")
    tensors = load_file(qwen_adapter / "adapter_model.safetensors")
    # the text decoder's attention only: the vision tower keeps its base weights
    assert tensors and all(".language_model.layers." in name for name in tensors)
    assert {name.split(".")[-3] for name in tensors} == {"q_proj", "k_proj", "v_proj", "o_proj"}


def test_the_adapter_loads_with_peft_and_changes_the_weights(qwen_adapter, tiny_qwen3vl):
    from peft import PeftModel
    from transformers import AutoModelForImageTextToText

    base = AutoModelForImageTextToText.from_pretrained(tiny_qwen3vl, dtype=torch.float32)
    before = {k: v.clone() for k, v in base.state_dict().items()}
    merged = PeftModel.from_pretrained(base, qwen_adapter).merge_and_unload()
    changed = {k for k, v in merged.state_dict().items() if not torch.equal(v, before[k])}
    assert changed and all(".language_model." in k and "_proj" in k for k in changed)


def test_export_onnx_takes_the_adapter(qwen_adapter, tiny_qwen3vl, tmp_path):
    bundle = tmp_path / "bundle"
    args = ["export", "onnx", "--model", str(tiny_qwen3vl), "--perception-lora", str(qwen_adapter)]
    done = subprocess.run(
        [str(CLI), *args, "--out", str(bundle)],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env=env_one_thread(),
    )
    assert done.returncode == 0, done.stderr
    manifest = yaml.safe_load((bundle / "manifest.yaml").read_text())
    assert set(manifest["variants"]) == {"base", "perception"} and manifest["variants"]["perception"]


def test_torch_ref_runs_a_perception_stage_with_the_adapter(qwen_adapter, tiny_qwen3vl, tmp_path, capsys):
    image = tmp_path / "scene.png"
    picture(96, 64, seed=9).save(image)
    code = main(
        ["run", str(ROOT / "specs" / "demo.yaml"), "--image", str(image), "--question", "where?", "--json",
         "--set", f"model.bundle={tiny_qwen3vl}", "--set", "model.runtime=torch_ref",
         "--set", "model.device=cpu", "--set", f"model.perception_lora={qwen_adapter}",
         "--set", "stages.0.perceive.variant=perception", "--set", "stages.0.perceive.max_new_tokens=8",
         "--set", "stages.3.reason.max_new_tokens=4"]
    )  # fmt: skip
    assert code == 0
    result = json.loads(capsys.readouterr().out)
    assert [stage["name"] for stage in result["stages"]][0] == "perceive"


def test_molmo2_loss_falls_on_points_targets(tiny_molmo2, tmp_path):
    dataset = write_rows(tmp_path / "data", 2)
    family, _ = checkpoint_families(tiny_molmo2)
    target = family.grounding_target(
        row_boxes(Row("r0", Path("0.png"), "q", {"boxes": [[0, 0, 64, 80]]}), 64, 80)
    )
    assert target == '<points coords="1 1 500 500">target</points>'  # a box's centre, 0-1000
    options = LoraOptions(resolutions=(64,), steps=12, batch_size=2, lr=1e-2, device="cpu")
    curve = train_perception_lora(tiny_molmo2, dataset, tmp_path / "adapter", options)
    assert falls(curve.losses, 0.8)
    tensors = load_file(tmp_path / "adapter" / "adapter_model.safetensors")
    assert tensors and all(".language_model." in name for name in tensors)


def test_molmo2_targets_skip_the_vision_tower(tiny_molmo2):
    from transformers import AutoModelForImageTextToText

    model = AutoModelForImageTextToText.from_pretrained(tiny_molmo2, dtype=torch.float32)
    pattern = text_decoder_pattern(model, ["q_proj", "down_proj"])
    matched = [name for name, _ in model.named_modules() if re.fullmatch(pattern, name)]
    layers = model.config.text_config.num_hidden_layers
    assert len(matched) == 2 * layers and all(name.startswith("model.language_model.") for name in matched)
    with pytest.raises(UserError, match="no text-decoder module named qkv .its linear layers: down_proj"):
        text_decoder_pattern(model, ["q_proj", "qkv"])


def test_the_same_seed_gives_the_same_adapter(tiny_qwen3vl, tmp_path):
    dataset = write_rows(tmp_path / "data", 2)
    adapters = []
    for name, seed in (("a", 0), ("b", 0), ("c", 1)):
        train_perception_lora(tiny_qwen3vl, dataset, tmp_path / name, replace(SMALL, seed=seed))
        adapters.append(load_file(tmp_path / name / "adapter_model.safetensors"))
    same, other = adapters[0], adapters[1]
    assert same.keys() == other.keys() and all(torch.equal(same[k], other[k]) for k in same)
    assert not all(torch.equal(same[k], adapters[2][k]) for k in same)


def test_rows_without_boxes_and_bad_boxes_are_user_errors(tiny_qwen3vl, tmp_path):
    dataset = write_rows(tmp_path / "data", 0, boxless=2)
    with pytest.raises(UserError, match="no row of the dataset has boxes .2 rows"):
        train_perception_lora(tiny_qwen3vl, dataset, tmp_path / "out", SMALL)
    with pytest.raises(UserError, match="row 'x': a box must be 4 pixel coordinates"):
        row_boxes(Row("x", Path("x.png"), "q", {"boxes": [[1, 2, 3]]}), 10, 10)
    with pytest.raises(UserError, match="row 'x': labels must be a list as long as boxes"):
        row_boxes(Row("x", Path("x.png"), "q", {"boxes": [[1, 2, 3, 4]], "labels": ["a", "b"]}), 10, 10)
    # pixels -> [0, 1] of the image, swapped corners ordered and outside ones clipped
    (box,) = row_boxes(Row("x", Path("x.png"), "q", {"boxes": [[50, 40, -5, 10]]}), 100, 50)
    assert box.as_list() == [0.0, 0.2, 0.5, 0.8] and box.label == "target"


def test_cli_trains_and_prints_the_summary(tiny_qwen3vl, tmp_path):
    dataset = write_rows(tmp_path / "data", 2, boxless=1)
    args = ["train", "perception-lora", "--model", str(tiny_qwen3vl), "--dataset", str(dataset)]
    options = ["--steps", "3", "--batch-size", "2", "--resolutions", "64", "--device", "cpu"]
    done = subprocess.run(
        [str(CLI), *args, "--out", str(tmp_path / "adapter"), *options],
        capture_output=True, text=True, cwd=ROOT, env=env_one_thread(),
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    (line,) = done.stdout.strip().splitlines()
    assert "perception LoRA for Qwen3VLForConditionalGeneration, 3 steps on 2 rows x 1 resolutions" in line
    assert "(skipped without boxes: 1)" in line and "Warning" not in done.stderr
    bad = subprocess.run(
        [str(CLI), *args, "--out", str(tmp_path / "x"), "--resolutions", "256,big"],
        capture_output=True, text=True, cwd=ROOT, env=env_one_thread(),
    )  # fmt: skip
    assert bad.returncode == 1 and bad.stderr.strip().splitlines() == [
        "error: --resolutions: 'big' is not an integer >= 32 (pixels, longest side) or 'full'"
    ]
