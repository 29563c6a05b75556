"""Helpers several test modules share: structured pictures, and a run of the whole pipeline in a fresh
interpreter that reports which heavy libraries it loaded."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]


def picture(width: int, height: int, seed: int = 0) -> Image.Image:
    """Gradients + noise: resizing and patch-order mistakes show up in them."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    base = np.stack([x * 255 // max(width, 1), y * 255 // max(height, 1), (x + y) % 256], -1)
    return Image.fromarray((base + rng.integers(0, 40, base.shape)).clip(0, 255).astype(np.uint8))


_RUN_AND_LIST_MODULES = """
import json, sys
import numpy as np
from PIL import Image
from engine.pipeline import open_pipeline
from engine.spec import validate
spec = validate(json.loads(sys.argv[1]))
image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (120, 160, 3), dtype=np.uint8))
result = open_pipeline(spec).run(image, "Where is the cat?")
heavy = sorted({m.split(".")[0] for m in sys.modules} & {"torch", "transformers", "peft", "onnx"})
print(json.dumps({"answer": result.answer, "heavy": heavy}))
"""


def run_in_fresh_interpreter(spec: dict) -> dict:
    """Run a raw spec end to end in a new Python process; returns {"answer", "heavy": modules loaded}."""
    done = subprocess.run(
        [sys.executable, "-c", _RUN_AND_LIST_MODULES, json.dumps(spec)],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])


def structured_image(width: int, height: int, seed: int) -> Image.Image:
    """Gradients, a ripple and noise: every resize and patch-order mistake shows up in the pixels."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width].astype(np.float64)
    red = 255 * x / max(width - 1, 1)
    green = 255 * y / max(height - 1, 1)
    blue = 127.5 + 127.5 * np.sin(x / 7 + y / 11)
    noisy = np.stack([red, green, blue], axis=-1) + rng.normal(0, 20, (height, width, 3))
    return Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8))
