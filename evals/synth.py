"""The synthetic high-resolution shapes benchmark: small 2D shapes on a white background.

In the spirit of "Seeing Beyond Redundancy": complexity is controlled exactly (image size, object count, object
size), and the question is answerable only by resolving one small object. Torch-free: numpy and Pillow.
"""

from __future__ import annotations

import json
import math
import os
import re
import sys
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw
from tqdm import tqdm

from engine.errors import UserError

# The vocabulary is a published contract: rows, prompts and scoring use these exact names.
SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "star", "cross")
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 160, 60),
    "blue": (40, 80, 220),
    "yellow": (230, 200, 30),
    "purple": (140, 60, 180),
    "orange": (240, 130, 30),
}
SIDE_RANGE = (32, 4096)  # image sides, pixels
OBJECTS_RANGE = (1, 200)
MIN_OBJECT_SIDE = 4  # pixels: below this no shape is drawable at all
GAP = 3  # white pixels kept between any two objects, so they never touch
TRIES = 1000  # rejection-sampling draws per object before giving up


@dataclass(frozen=True)
class SynthObject:
    shape: str
    color: str
    box: tuple[int, int, int, int]  # pixels, half-open [x1, y1, x2, y2): the tight extent of its drawn pixels


@dataclass(frozen=True)
class Scene:
    width: int
    height: int
    kind: str  # "shape": asks the shape of the one object of a color | "color": the color of the one shape
    objects: tuple[SynthObject, ...]  # the target first
    question: str
    answer: str
    label: str  # what the question names the target by: "red object" | "star"


@lru_cache(maxsize=128)  # sample_scene and render draw the same masks
def _mask(shape: str, side: int) -> Image.Image:
    """The shape drawn aliased (mode "1": every pixel on or off) filling a side x side square exactly."""
    mask = Image.new("1", (side, side), 0)
    draw, last = ImageDraw.Draw(mask), side - 1
    if shape == "circle":
        draw.ellipse((0, 0, last, last), fill=1)
    elif shape == "square":
        draw.rectangle((0, 0, last, last), fill=1)
    elif shape == "triangle":  # pointing up; the outline makes sure the tip pixel is drawn
        draw.polygon([(0, last), (last, last), (round(last / 2), 0)], fill=1, outline=1)
    elif shape == "star":  # five points, inner radius of a regular pentagram, stretched to fill the square
        angles = -math.pi / 2 + np.arange(10) * math.pi / 5  # tips and notches alternate, first tip up
        radii = np.where(np.arange(10) % 2 == 0, 1.0, 0.382)
        xy = np.stack([radii * np.cos(angles), radii * np.sin(angles)], axis=1)
        xy = np.rint((xy - xy.min(0)) / np.ptp(xy, axis=0) * last).astype(int)
        draw.polygon([tuple(p) for p in xy.tolist()], fill=1, outline=1)
    elif shape == "cross":  # a plus sign, arms about a third of the side wide
        inset = round(side / 3)
        draw.rectangle((inset, 0, last - inset, last), fill=1)
        draw.rectangle((0, inset, last, last - inset), fill=1)
    else:
        raise ValueError(f"unknown shape {shape!r}")
    # render() redraws each object from its box alone, which holds because every shape fills its square
    assert mask.getbbox() == (0, 0, side, side), (shape, side)
    return mask


def _check_size(width: int, height: int) -> None:
    lo, hi = SIDE_RANGE
    if not (lo <= width <= hi and lo <= height <= hi):
        raise UserError(f"image size {width}x{height}: each side must be {lo}..{hi}")


def sample_scene(
    rng: np.random.Generator,
    width: int,
    height: int,
    n_objects: int,
    object_size: tuple[float, float] = (0.01, 0.03),
    kind: str = "shape",
) -> Scene:
    """Draw a scene whose target is the only object with the attribute the question names it by."""
    _check_size(width, height)
    if not OBJECTS_RANGE[0] <= n_objects <= OBJECTS_RANGE[1]:
        raise UserError(f"objects {n_objects}: must be {OBJECTS_RANGE[0]}..{OBJECTS_RANGE[1]}")
    if kind not in ("shape", "color"):
        raise UserError(f"question kind {kind!r}: must be shape or color")
    colors = list(COLORS)
    shape, color = SHAPES[rng.integers(len(SHAPES))], colors[rng.integers(len(colors))]
    # distractors differ from the target in the attribute the question uses, and are free in the other
    other_shapes = [s for s in SHAPES if kind == "shape" or s != shape]
    other_colors = [c for c in colors if kind == "color" or c != color]
    attributes = [(shape, color)] + [
        (other_shapes[rng.integers(len(other_shapes))], other_colors[rng.integers(len(other_colors))])
        for _ in range(n_objects - 1)
    ]
    long_side = max(width, height)
    placed = np.zeros((0, 4), dtype=np.int64)  # x1, y1, x2, y2 of the objects placed so far
    objects = []
    for obj_shape, obj_color in attributes:
        side = max(MIN_OBJECT_SIDE, round(rng.uniform(*object_size) * long_side))
        for _ in range(TRIES if side <= min(width, height) else 0):
            x, y = int(rng.integers(width - side + 1)), int(rng.integers(height - side + 1))
            x1, y1, x2, y2 = placed.T
            clash = (x < x2 + GAP) & (x1 < x + side + GAP) & (y < y2 + GAP) & (y1 < y + side + GAP)
            if not clash.any():
                break
        else:
            raise UserError(
                f"cannot place {n_objects} objects of {object_size[0]:g}-{object_size[1]:g} of the longest "
                f"side in {width}x{height} (object {len(objects) + 1}: {side} px); use fewer or smaller objects"
            )
        bx1, by1, bx2, by2 = _mask(obj_shape, side).getbbox()  # the extent of what is actually drawn
        box = (x + bx1, y + by1, x + bx2, y + by2)
        placed = np.vstack([placed, box])
        objects.append(SynthObject(obj_shape, obj_color, box))
    if kind == "shape":
        question, answer, label = f"What shape is the {color} object?", shape, f"{color} object"
    else:
        question, answer, label = f"What color is the {shape}?", color, shape
    return Scene(width, height, kind, tuple(objects), question, answer, label)


def render(scene: Scene) -> Image.Image:
    """The scene at full size: RGB, white background, each pixel white or exactly one object's color."""
    image = Image.new("RGB", (scene.width, scene.height), (255, 255, 255))
    for obj in scene.objects:
        x1, y1, x2, y2 = obj.box
        image.paste(COLORS[obj.color], obj.box, _mask(obj.shape, x2 - x1))
    return image


def scene_row(scene: Scene, row_id: str, image: str) -> dict:
    target = scene.objects[0]
    return {
        "id": row_id,
        "image": image,
        "question": scene.question,
        "answer": scene.answer,
        "boxes": [list(target.box)],  # the boxes the question is about: here just the target
        "labels": [scene.label],
        "category": scene.kind,
        "width": scene.width,
        "height": scene.height,
        "long_side": max(scene.width, scene.height),
        "objects": [{"shape": o.shape, "color": o.color, "box": list(o.box)} for o in scene.objects],
    }


def write_dataset(
    out: Path,
    n: int,
    seed: int,
    sizes: list[tuple[int, int]],
    objects: tuple[int, int],
    object_size: tuple[float, float],
    questions: str = "both",
) -> Path:
    """Write out/images/*.png and out/rows.jsonl (returned); the same arguments give the same bytes."""
    if seed < 0:
        raise UserError(f"seed {seed}: must be >= 0")
    images = Path(out) / "images"
    images.mkdir(parents=True, exist_ok=True)
    lines = []
    for i in tqdm(range(n), desc="synth", unit="image", file=sys.stderr):
        rng = np.random.default_rng([seed, i])  # one stream per row: row i does not depend on n
        width, height = sizes[i % len(sizes)]
        kind = ("shape", "color")[i % 2] if questions == "both" else questions
        scene = sample_scene(
            rng, width, height, int(rng.integers(objects[0], objects[1] + 1)), object_size, kind
        )
        row_id = f"synth-{seed}-{i:05d}"
        # fixed options and no metadata, so the bytes depend on the pixels alone
        render(scene).save(images / f"{row_id}.png", format="PNG", compress_level=6)
        lines.append(json.dumps(scene_row(scene, row_id, f"images/{row_id}.png")) + "\n")
    rows = Path(out) / "rows.jsonl"
    partial = rows.with_name(rows.name + ".tmp")
    partial.write_text("".join(lines))
    os.replace(partial, rows)  # atomic: a killed run leaves the old rows.jsonl or none, never half of one
    return rows


def parse_sizes(text: str) -> list[tuple[int, int]]:
    """'1024,2048,4096x3072' -> [(1024, 1024), (2048, 2048), (4096, 3072)]: N is square, WxH is not."""
    sizes = []
    for item in text.split(","):
        match = re.fullmatch(r"\s*(\d+)(?:x(\d+))?\s*", item)
        if not match:
            raise UserError(f"--sizes: bad size {item!r} (N or WxH, comma-separated)")
        width = int(match[1])
        height = int(match[2] or width)
        _check_size(width, height)
        sizes.append((width, height))
    return sizes


def _parse_range(text: str, flag: str, number: str) -> tuple[str, str]:
    match = re.fullmatch(rf"\s*({number})\s*(?:-\s*({number})\s*)?", text)
    if not match:
        raise UserError(f"{flag}: bad range {text!r} (a value or MIN-MAX)")
    return match[1], match[2] or match[1]


def parse_objects(text: str) -> tuple[int, int]:
    """'3-8' -> (3, 8), '5' -> (5, 5)."""
    lo, hi = (int(v) for v in _parse_range(text, "--objects", r"\d+"))
    if not OBJECTS_RANGE[0] <= lo <= hi <= OBJECTS_RANGE[1]:
        raise UserError(
            f"--objects: {text!r} must be MIN <= MAX within {OBJECTS_RANGE[0]}..{OBJECTS_RANGE[1]}"
        )
    return lo, hi


def parse_object_size(text: str) -> tuple[float, float]:
    """'0.01-0.03' -> (0.01, 0.03), '0.02' -> (0.02, 0.02): fractions of the image's longest side."""
    lo, hi = (float(v) for v in _parse_range(text, "--object-size", r"\d*\.?\d+(?:e-?\d+)?"))
    if not 0 < lo <= hi <= 1:
        raise UserError(f"--object-size: {text!r} must be MIN <= MAX within (0, 1]")
    return lo, hi


def synth_command(args) -> str:
    if args.n < 1:
        raise UserError(f"--n {args.n}: must be >= 1")
    sizes = parse_sizes(args.sizes)
    rows = write_dataset(
        args.out,
        args.n,
        args.seed,
        sizes,
        parse_objects(args.objects),
        parse_object_size(args.object_size),
        args.questions,
    )
    names = ",".join(f"{w}" if w == h else f"{w}x{h}" for w, h in sizes)
    return f"wrote {args.n} rows to {rows} (sizes {names}, seed {args.seed}, questions {args.questions})"
