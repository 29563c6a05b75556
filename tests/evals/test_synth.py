"""The synthetic shapes benchmark: deterministic bytes, unique targets, exact boxes, CLI and bad arguments."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from engine.errors import UserError
from evals.synth import (
    COLORS,
    GAP,
    SHAPES,
    Scene,
    parse_object_size,
    parse_objects,
    parse_sizes,
    render,
    sample_scene,
    write_dataset,
)

ROOT = Path(__file__).resolve().parents[2]
SIZES = [(256, 256), (512, 512), (320, 200)]


def _write(out: Path, seed: int = 0, n: int = 4, **kw) -> list[dict]:
    rows = write_dataset(out, n, seed, kw.pop("sizes", SIZES), kw.pop("objects", (3, 8)), (0.01, 0.03), **kw)
    return [json.loads(line) for line in rows.read_text().splitlines()]


def _files(out: Path) -> dict[str, bytes]:
    return {str(p.relative_to(out)): p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()}


def _pixels_of(image: np.ndarray, color: str) -> np.ndarray:
    return np.argwhere((image == COLORS[color]).all(axis=-1))  # (N, 2) as (y, x)


def _extent(yx: np.ndarray) -> tuple[int, int, int, int]:
    (y1, x1), (y2, x2) = yx.min(0), yx.max(0)
    return int(x1), int(y1), int(x2) + 1, int(y2) + 1  # half-open, like the boxes


def test_same_seed_same_bytes_other_seed_other_bytes(tmp_path):
    _write(tmp_path / "a", seed=7)
    _write(tmp_path / "b", seed=7)
    _write(tmp_path / "c", seed=8)
    a, b, c = (_files(tmp_path / d) for d in "abc")
    assert a == b and len(a) == 5  # rows.jsonl + 4 images, no temp file left
    assert a["rows.jsonl"] != c["rows.jsonl"]
    assert [a[k] for k in a if k.endswith(".png")] != [c[k] for k in c if k.endswith(".png")]


def test_rows_format_and_images(tmp_path):
    rows = _write(tmp_path, seed=3, n=6)
    assert [r["id"] for r in rows] == [f"synth-3-{i:05d}" for i in range(6)]
    assert [r["category"] for r in rows] == ["shape", "color"] * 3
    for i, row in enumerate(rows):
        width, height = SIZES[i % len(SIZES)]
        assert (row["width"], row["height"], row["long_side"]) == (width, height, max(width, height))
        assert row["image"] == f"images/{row['id']}.png"
        assert row["boxes"] == [row["objects"][0]["box"]] and len(row["labels"]) == 1
        assert 3 <= len(row["objects"]) <= 8
        target = row["objects"][0]
        if row["category"] == "shape":
            assert row["question"] == f"What shape is the {target['color']} object?"
            assert (row["answer"], row["labels"]) == (target["shape"], [f"{target['color']} object"])
        else:
            assert row["question"] == f"What color is the {target['shape']}?"
            assert (row["answer"], row["labels"]) == (target["color"], [target["shape"]])
        image = np.asarray(Image.open(tmp_path / row["image"]))
        assert image.shape == (height, width, 3)


def _check_scene(scene: Scene, object_size: tuple[float, float]) -> None:
    target, others = scene.objects[0], scene.objects[1:]
    assert scene.kind in ("shape", "color")
    if scene.kind == "shape":
        assert all(o.color != target.color for o in others)
        assert (scene.answer, scene.label) == (target.shape, f"{target.color} object")
    else:
        assert all(o.shape != target.shape for o in others)
        assert (scene.answer, scene.label) == (target.color, target.shape)
    long_side = max(scene.width, scene.height)
    lo, hi = (max(4, round(f * long_side)) for f in object_size)
    for i, obj in enumerate(scene.objects):
        x1, y1, x2, y2 = obj.box
        assert obj.shape in SHAPES and obj.color in COLORS
        assert 0 <= x1 < x2 <= scene.width and 0 <= y1 < y2 <= scene.height
        assert x2 - x1 == y2 - y1 and lo <= x2 - x1 <= hi
        for ox1, oy1, ox2, oy2 in (o.box for o in scene.objects[i + 1 :]):
            apart = x2 + GAP <= ox1 or ox2 + GAP <= x1 or y2 + GAP <= oy1 or oy2 + GAP <= y1
            assert apart, (obj.box, (ox1, oy1, ox2, oy2))


def _check_pixels(scene: Scene) -> None:
    image = np.asarray(render(scene))
    drawn = ~(image == 255).all(axis=-1)
    assert drawn.sum() == sum(_pixels_of(image, c).shape[0] for c in COLORS)  # white or exactly a color
    for obj in scene.objects:  # each object's box is the extent of its color's pixels around it
        x1, y1, x2, y2 = obj.box
        left, top = max(0, x1 - 1), max(0, y1 - 1)  # one pixel around the box: the gap keeps neighbours out
        ex1, ey1, ex2, ey2 = _extent(_pixels_of(image[top : y2 + 1, left : x2 + 1], obj.color))
        assert (ex1 + left, ey1 + top, ex2 + left, ey2 + top) == obj.box
    if scene.kind == "shape":  # the target's color is unique, so its pixels alone give the box
        assert _extent(_pixels_of(image, scene.objects[0].color)) == scene.objects[0].box
    boxes = np.zeros(drawn.shape, bool)
    for x1, y1, x2, y2 in (o.box for o in scene.objects):
        boxes[y1:y2, x1:x2] = True
    assert not (drawn & ~boxes).any()


@pytest.mark.parametrize("kind", ["shape", "color"])
@pytest.mark.parametrize(("width", "height"), [(256, 256), (512, 512), (320, 200), (200, 320)])
def test_scene_rules_and_pixels(kind, width, height):
    for seed in range(5):
        scene = sample_scene(np.random.default_rng(seed), width, height, 12, (0.01, 0.05), kind)
        assert (scene.width, scene.height, len(scene.objects)) == (width, height, 12)
        _check_scene(scene, (0.01, 0.05))
        _check_pixels(scene)


@settings(max_examples=40, deadline=None)
@given(
    seed=st.integers(0, 2**32 - 1),
    width=st.integers(32, 400),
    height=st.integers(32, 400),
    n=st.integers(1, 6),
    size=st.tuples(st.floats(0.005, 0.1), st.floats(0.005, 0.1)).map(sorted),
    kind=st.sampled_from(["shape", "color"]),
)
def test_scene_rules_hold_for_any_draw(seed, width, height, n, size, kind):
    try:
        scene = sample_scene(np.random.default_rng(seed), width, height, n, tuple(size), kind)
    except UserError as error:  # allowed only when the objects do not fit
        assert "cannot place" in str(error)
        return
    _check_scene(scene, tuple(size))
    _check_pixels(scene)


def test_large_non_square_scene():
    scene = sample_scene(np.random.default_rng(1), 4096, 3072, 8)
    _check_scene(scene, (0.01, 0.03))
    image = np.asarray(render(scene))
    assert image.shape == (3072, 4096, 3)
    assert _extent(_pixels_of(image, scene.objects[0].color)) == scene.objects[0].box
    # 1-3% of 4096: the shape is 41 to 123 px, a few pixels at a 256-px view
    assert all(41 <= o.box[2] - o.box[0] <= 123 for o in scene.objects)


def test_parsers():
    assert parse_sizes("1024,2048,4096x3072") == [(1024, 1024), (2048, 2048), (4096, 3072)]
    assert parse_objects("3-8") == (3, 8) and parse_objects("5") == (5, 5)
    assert parse_object_size("0.01-0.03") == (0.01, 0.03) and parse_object_size("0.02") == (0.02, 0.02)


@pytest.mark.parametrize(
    ("call", "names"),
    [
        (lambda: parse_sizes("31"), "31"),
        (lambda: parse_sizes("4097x100"), "4097"),
        (lambda: parse_sizes("1024,abc"), "abc"),
        (lambda: parse_objects("0"), "0"),
        (lambda: parse_objects("3-201"), "3-201"),
        (lambda: parse_objects("8-3"), "8-3"),
        (lambda: parse_objects("three"), "three"),
        (lambda: parse_object_size("0.03-0.01"), "0.03-0.01"),
        (lambda: parse_object_size("1.5"), "1.5"),
        (lambda: parse_object_size("x"), "x"),
        (lambda: sample_scene(np.random.default_rng(0), 32, 32, 200), "200"),
        (lambda: sample_scene(np.random.default_rng(0), 4096, 32, 2, (0.03, 0.03)), "4096x32"),
        (lambda: sample_scene(np.random.default_rng(0), 64, 64, 201), "201"),
    ],
)
def test_bad_arguments_raise_user_error(call, names):
    with pytest.raises(UserError, match=names.replace(".", r"\.")) as error:
        call()
    assert "\n" not in str(error.value)


def test_cli_writes_rows_and_rejects_bad_sizes(tmp_path):
    script = Path(sys.executable).parent / "sparc-engine"
    command = [str(script)] if script.exists() else [sys.executable, "-m", "engine.cli"]
    args = ["data", "synth", "--out", str(tmp_path), "--n", "4", "--seed", "3", "--sizes", "256,320x200"]
    done = subprocess.run(command + args, capture_output=True, text=True, cwd=ROOT)
    assert done.returncode == 0, done.stderr
    assert len(done.stdout.strip().splitlines()) == 1 and "4 rows" in done.stdout
    rows = [json.loads(line) for line in (tmp_path / "rows.jsonl").read_text().splitlines()]
    assert [(r["width"], r["height"]) for r in rows] == [(256, 256), (320, 200)] * 2
    assert all((tmp_path / r["image"]).is_file() for r in rows)
    bad = subprocess.run(command + args[:-1] + ["10"], capture_output=True, text=True, cwd=ROOT)
    assert bad.returncode == 1 and bad.stderr.strip().startswith("error: ") and "10x10" in bad.stderr
    assert "Traceback" not in bad.stderr
