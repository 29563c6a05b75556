"""train/demo.py: the recipe runs end to end, is reproducible, and trains on what the engine renders."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from engine.boxes import Box
from engine.cropping import PixelBox
from evals.synth import Scene, SynthObject, render, sample_scene, write_dataset
from train.demo import (
    BOX_GRID,
    COLOR_EVERY,
    FIND_PHASE,
    HELDOUT_SLOTS,
    MIX_PHASE,
    OBJECTS,
    STEP_SLOTS,
    Curriculum,
    DemoData,
    snap_rows,
    snapped,
)
from train.examples import END_OF_TURN
from train.heldout import informative_position

ROOT = Path(__file__).resolve().parents[2]


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _train(out: Path, *options: str) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "engine.cli", "train", "demo", "--out", str(out), "--steps", "2",
               "--find-steps", "2", "--vision-steps", "2", "--lora-steps", "2", "--lora-rows", "4", "--threads", "1",
               *options]  # fmt: skip
    return subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=600)


@pytest.mark.slow
def test_train_demo_runs_and_is_reproducible(tmp_path: Path) -> None:
    first, second = _train(tmp_path / "a"), _train(tmp_path / "b")
    assert first.returncode == 0, first.stderr[-2000:]
    assert second.returncode == 0, second.stderr[-2000:]
    for name in ("model.safetensors", "perception-lora/adapter_model.safetensors"):
        assert _sha256(tmp_path / "a" / name) == _sha256(tmp_path / "b" / name), name
    assert (tmp_path / "a" / "training.png").is_file()
    assert not (tmp_path / "a" / "lora-data").exists()  # the LoRA's synthetic rows are not left behind
    record = json.loads((tmp_path / "a" / "training.json").read_text())
    losses = record["losses"]
    assert [len(losses[name]) for name in ("vision tower (stage 0)", MIX_PHASE.name, FIND_PHASE.name)] == [
        2,
        2,
        2,
    ]
    assert len(losses["perception LoRA"]) == 2
    assert set(record["vision_accuracy"]) == {"colour", "shape", "x", "y", "box"}
    heldout = record["heldout"]
    assert heldout["steps"] == [0, 4]  # the first step and the end of both phases
    assert set(heldout["losses"][0]) == set(heldout["chance"]) == {slot.name for slot in HELDOUT_SLOTS}


@pytest.mark.slow
def test_train_demo_on_cuda(tmp_path: Path) -> None:
    """Without a GPU: refused in one line before any work; with one: both stages train there."""
    import torch

    trained = _train(tmp_path / "m", "--device", "cuda")
    if not torch.cuda.is_available():
        assert trained.returncode != 0
        assert "torch sees no CUDA device" in trained.stderr
        assert "Traceback" not in trained.stderr
        assert not (tmp_path / "m" / "model.safetensors").exists()
        return
    assert trained.returncode == 0, trained.stderr[-2000:]
    assert (tmp_path / "m" / "perception-lora" / "adapter_model.safetensors").is_file()


def test_a_step_is_the_fixed_mix_and_deterministic(demo_data: DemoData) -> None:
    batch, again = demo_data.step(3), demo_data.step(3)
    assert len(batch) == 2 * len(STEP_SLOTS)
    assert [s.prompt.token_ids for s in batch] == [s.prompt.token_ids for s in again]
    assert [s.prompt.token_ids for s in batch] != [s.prompt.token_ids for s in demo_data.step(4)]


def test_the_find_phase_is_mostly_localization_among_the_benchmarks_distractors(demo_data: DemoData) -> None:
    assert demo_data.curriculum.objects(0, demo_data.steps) == (1, 1)  # the mixed phase starts alone ...
    step = demo_data.step(0, FIND_PHASE)  # ... the find phase never does
    assert [s.prompt.token_ids for s in step] == [s.prompt.token_ids for s in demo_data.step(0, FIND_PHASE)]
    assert [s.prompt.token_ids for s in step] != [s.prompt.token_ids for s in demo_data.step(0, MIX_PHASE)]
    perceive = [s for s in step if s.look_at]
    assert len(perceive) == len(FIND_PHASE.scenes) > len(step) / 2
    image_tokens = [int(s.prompt.image_mask.sum()) for s in perceive]
    assert min(image_tokens) < max(image_tokens)  # views at 256 and 512 px
    assert FIND_PHASE.guide.find > 0 and FIND_PHASE.guide.everywhere == 0
    assert MIX_PHASE.guide.find == 0


def test_find_through_ends_at_the_first_coordinate_digit_of_shape_questions(demo_data: DemoData) -> None:
    """The find term covers the target's tokens up to the first digit of the first coordinate, and only
    where the question names the target by its colour (a 256-px view hardly shows a shape)."""
    rng = np.random.default_rng(2)
    perceive, reason = STEP_SLOTS[0]
    tokenizer = demo_data.torch_family.tokenizer
    for kind in ("shape", "color"):
        scene = sample_scene(rng, 2048, 1536, 4, kind=kind)
        sequence = demo_data.sequence(perceive, scene, render(scene), rng)
        assert demo_data.sequence(reason, scene, render(scene), rng).find_through == 0
        if kind == "color":
            assert sequence.find_through == 0
            continue
        start = len(sequence.prompt.token_ids) - sequence.n_target
        first_digit = sequence.prompt.token_ids[start + sequence.find_through - 1]
        assert start + sequence.find_through - 1 == informative_position(sequence, tokenizer, grounding=True)
        assert tokenizer.decode([first_digit]).isdigit()
        written_before = tokenizer.decode(
            sequence.prompt.token_ids[start : start + sequence.find_through - 1]
        )
        assert written_before.endswith("[") and "bbox_2d" in written_before


def test_perceive_targets_are_the_family_grounding_of_the_target(demo_data: DemoData) -> None:
    rng = np.random.default_rng(0)
    scene = sample_scene(rng, 1024, 768, 5, kind="shape")
    sequence = demo_data.sequence(STEP_SLOTS[0][0], scene, render(scene), rng)
    tokenizer = demo_data.torch_family.tokenizer
    target = tokenizer.decode(sequence.prompt.token_ids[-sequence.n_target :], skip_special_tokens=False)
    grounding = demo_data.family.parse_grounding(target.removesuffix(END_OF_TURN))
    x1, y1, x2, y2 = scene.objects[0].box
    (box,) = grounding.boxes
    assert box.label == scene.label
    exact = Box(x1 / 1024, y1 / 768, x2 / 1024, y2 / 768)
    # the demo's grid: the smallest box of multiples of BOX_GRID holding the target
    assert box.iou(exact) == pytest.approx(exact.area / box.area)
    for corner in box.as_list():
        assert corner / BOX_GRID == pytest.approx(round(corner / BOX_GRID), abs=1e-3)
    assert BOX_GRID - 1e-9 <= min(box.width, box.height) <= max(box.width, box.height) <= 2 * BOX_GRID + 1e-9


@pytest.mark.parametrize(
    ("box", "grid_box"),
    [
        ((0.1501, 0.149, 0.16, 0.18), (0.15, 0.1, 0.2, 0.2)),
        ((0.15, 0.15, 0.2, 0.2), (0.15, 0.15, 0.2, 0.2)),  # already on the grid: unchanged
        ((0.97, 0.3, 0.999, 0.31), (0.95, 0.3, 1.0, 0.35)),
        ((0.3, 0.3, 0.3, 0.3), (0.3, 0.3, 0.35, 0.35)),  # never zero-area
    ],
)
def test_snapped_grows_a_box_to_the_grid(box, grid_box) -> None:
    assert snapped(box) == pytest.approx(grid_box)


def test_snap_rows_puts_the_lora_data_on_the_grid(tmp_path: Path) -> None:
    rows = write_dataset(tmp_path, 4, seed=3, sizes=[(1024, 768)], objects=(3, 4), object_size=(0.01, 0.03))
    before = [json.loads(line) for line in rows.read_text().splitlines()]
    snap_rows(rows)
    after = [json.loads(line) for line in rows.read_text().splitlines()]
    for old, new in zip(before, after):
        assert {k: v for k, v in old.items() if k != "boxes"} == {
            k: v for k, v in new.items() if k != "boxes"
        }
        ((x1, y1, x2, y2),), ((a1, b1, a2, b2),) = old["boxes"], new["boxes"]
        assert a1 <= x1 and b1 <= y1 and a2 >= x2 and b2 >= y2
        for corner, side in ((a1, 1024), (b1, 768), (a2, 1024), (b2, 768)):  # on a grid line, to the pixel
            cell = side * BOX_GRID
            assert abs(corner - round(corner / cell) * cell) <= 0.5


def test_reason_crops_follow_the_spec_and_mostly_hold_the_target(demo_data: DemoData) -> None:
    rng = np.random.default_rng(1)
    crop = demo_data.crop
    holding = 0
    for size in ((1024, 768), (2048, 2048), (4096, 3072)) * 40:
        scene = sample_scene(rng, *size, 5)
        boxes = demo_data.crop_boxes(scene, rng)
        assert 1 <= len(boxes) <= crop.max_crops
        assert all(min(b.width, b.height) >= round(crop.min_fraction * max(size)) for b in boxes)
        target = PixelBox(*scene.objects[0].box)
        holding += any(b.contains(target) for b in boxes)
    # the simulation misses on purpose (10%) and by jitter now and then; most crops hold the target
    assert 0.75 <= holding / 120 <= 0.97


def test_the_curriculum_adds_distractors_to_a_lone_target():
    curriculum, steps = Curriculum(), 1000
    alone, full = round(curriculum.alone * steps), round((curriculum.alone + curriculum.ramp) * steps)
    assert all(curriculum.objects(step, steps) == (1, 1) for step in range(0, alone + 1, 25))
    assert all(curriculum.objects(step, steps) == OBJECTS for step in range(full, steps, 25))
    ramp = [curriculum.objects(step, steps) for step in range(alone, full + 1, 10)]
    assert all(a[0] <= b[0] and a[1] <= b[1] for a, b in zip(ramp, ramp[1:]))  # growing all the way
    assert len(set(ramp)) > 4


def test_a_step_asks_both_kinds_of_question_mostly_shape(demo_data: DemoData) -> None:
    tokenizer = demo_data.torch_family.tokenizer
    perceive = [s for step in range(4) for s in demo_data.step(step) if s.look_at]
    colour = sum("What color" in tokenizer.decode(s.prompt.token_ids) for s in perceive)
    assert colour == len(perceive) // COLOR_EVERY


def test_perceive_sequences_guide_to_the_tokens_the_target_covers(demo_data: DemoData) -> None:
    red_star = SynthObject("star", "red", (0, 0, 64, 64))  # the top-left 2x2 tokens of a 256-px view
    blue_cross = SynthObject("cross", "blue", (160, 96, 224, 160))
    scene = Scene(
        256, 256, "shape", (red_star, blue_cross), "What shape is the red object?", "star", "red object"
    )
    rng = np.random.default_rng(0)
    perceive, reason = STEP_SLOTS[0]
    sequence = demo_data.sequence(perceive, scene, render(scene), rng)
    first = int(np.flatnonzero(sequence.prompt.image_mask)[0])
    assert sequence.look_at == (first, first + 1, first + 8, first + 9)  # rows of 8 tokens
    assert demo_data.sequence(reason, scene, render(scene), rng).look_at == ()
    step = demo_data.step(0)
    assert all(bool(s.look_at) == (s.n_target > 12) for s in step)  # bbox JSON is long, answers short
