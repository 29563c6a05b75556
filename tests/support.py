"""Helpers several test modules share: structured pictures, a runtime with fixed groundings, pipeline
results without wall times, and a run of the whole pipeline in a fresh interpreter that reports which
heavy libraries it loaded."""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
from PIL import Image

from engine.boxes import Box
from engine.families import family_for
from runtimes.protocol import Text

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

from engine.boxes import Box
from engine.families import family_for
from runtimes.protocol import Text
from engine.pipeline import open_pipeline
from engine.spec import validate
spec = validate(json.loads(sys.argv[1]))
image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (120, 160, 3), dtype=np.uint8))
result = open_pipeline(spec).run(image, "Where is the cat?")
# numba, pandas: what ensemble-boxes would pull in; the run path fuses with its own WBF
exporters = {"torch", "transformers", "peft", "onnx"}
heavy = sorted({m.split(".")[0] for m in sys.modules} & {*exporters, "ensemble_boxes", "numba", "pandas"})
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


BOXES = (Box(0.1, 0.15, 0.4, 0.5, "a"), Box(0.6, 0.1, 0.9, 0.3, "b"))


class FixedGrounding:
    """Delegates to a real runtime but answers the perceive prompt with the family's own grounding of
    BOXES, so that a random model's pipeline gets regions and the reason stage runs on crops."""

    def __init__(self, inner) -> None:
        self.inner, self.info, self.eos_ids = inner, inner.info, inner.eos_ids
        family = family_for(inner.info.architecture, inner.info.image)
        self.marker = family.perceive_prompt.split("{question}")[-1].format().strip()  # only perceive has it
        self.grounding = family.grounding_target(BOXES)

    def prefill(self, segments, variant):
        return self.inner.prefill(segments, variant)

    def generate(self, prefix, suffix, n, sampling):
        generations = self.inner.generate(prefix, suffix, n, sampling)
        if any(self.marker in s.text for s in suffix if isinstance(s, Text)):
            generations = [replace(g, text=self.grounding) for g in generations]
        return generations

    def close(self) -> None:
        pass


def timeless_result(spec: dict, runtime, image: Image.Image) -> dict:
    """A pipeline run's --json result with every stage's outputs and without wall times: what two runtimes
    must agree on exactly."""
    from engine.pipeline import Pipeline
    from engine.spec import validate

    result = Pipeline(validate(spec), runtime).run(image, "What colour is the car?")
    timeless = result.to_dict()
    for stage, trace in zip(timeless["stages"], result.stages, strict=True):
        stage.pop("ms")
        stage["outputs"] = trace.outputs
    return timeless
