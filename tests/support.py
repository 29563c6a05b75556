"""Helpers several test modules share: structured pictures, hand-made PNGs, a runtime with fixed
groundings, pipeline results without wall times, and a run of the whole pipeline in a fresh interpreter
that reports which heavy libraries it loaded."""

from __future__ import annotations

import json
import struct
import subprocess
import sys
import time
import zlib
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

import numpy as np
from PIL import Image

from engine.boxes import Box
from engine.families import family_for
from engine.grounding import Grounding
from runtimes.protocol import Text

ROOT = Path(__file__).resolve().parents[1]


def png_bytes(width: int, height: int, bit_depth: int, color_type: int, rows: bytes) -> bytes:
    """A PNG written by hand (rows: filter byte + packed samples per row), for modes Pillow cannot save."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, bit_depth, color_type, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", rows) + chunk(b"IEND", b"")


def blank_bitmap_png(width: int, height: int) -> bytes:
    """A valid all-black 1-bit PNG: huge in pixels, a few hundred kB on disk."""
    row = b"\0" * (1 + (width + 7) // 8)
    compressor = zlib.compressobj(9)
    rows_per_step = 1000
    data = b"".join(
        compressor.compress(row * min(rows_per_step, height - start))
        for start in range(0, height, rows_per_step)
    )
    return png_bytes(width, height, 1, 0, data + compressor.flush())


def picture(width: int, height: int, seed: int = 0) -> Image.Image:
    """Gradients + noise: resizing and patch-order mistakes show up in them."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    base = np.stack([x * 255 // max(width, 1), y * 255 // max(height, 1), (x + y) % 256], -1)
    return Image.fromarray((base + rng.integers(0, 40, base.shape)).clip(0, 255).astype(np.uint8))


# an expression, in the child interpreter: the libraries the run path must never import that it has
# loaded (numba, pandas: what ensemble-boxes would pull in; the run path fuses with its own WBF)
_HEAVY_LOADED = (
    'sorted({m.split(".")[0] for m in sys.modules} & '
    '{"torch", "transformers", "peft", "onnx", "ensemble_boxes", "numba", "pandas"})'
)
_RUN_AND_LIST_MODULES = f"""
import json, sys
import numpy as np
from PIL import Image

from engine.boxes import Box
from engine.families import family_for
from engine.grounding import Grounding
from runtimes.protocol import Text
from engine.pipeline import open_pipeline
from engine.spec import validate
spec = validate(json.loads(sys.argv[1]))
image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (120, 160, 3), dtype=np.uint8))
result = open_pipeline(spec).run(image, "Where is the cat?")
print(json.dumps({{"answer": result.answer, "heavy": {_HEAVY_LOADED}}}))
"""


def heavy_imports(module: str) -> list[str]:
    """The heavy libraries that importing `module` loads, in a fresh interpreter."""
    code = f"import json, sys, {module}; print(json.dumps({_HEAVY_LOADED}))"
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


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


def without_texts(result: dict) -> dict:
    """A timeless result less what another rounding of the same weights may change with fixed groundings:
    the answer, the reason stage's text and every stage's generated length."""
    kept = {key: value for key, value in result.items() if key != "answer"}
    kept["stages"] = [
        {key: value for key, value in stage.items() if key != "generated_tokens"}
        for stage in result["stages"]
    ]
    kept["stages"][-1].pop("outputs")
    return kept


DEMO_SPEC = ROOT / "specs" / "demo.yaml"
SPARC_ENGINE = str(Path(sys.executable).parent / "sparc-engine")  # the installed command
# longer than the tiny model's 4096-token context: the runtime refuses it, and only that query fails
OVERFLOWING_QUESTION = "word " * 5000


def demo_overrides(bundle: Path, perceive_tokens: int = 8, reason_tokens: int = 4) -> list[str]:
    """`--set` arguments running specs/demo.yaml on the tiny ONNX bundle, with small budgets."""
    values = {
        "model.bundle": bundle,
        "model.device": "cpu",
        "stages.0.perceive.max_new_tokens": perceive_tokens,
        "stages.3.reason.max_new_tokens": reason_tokens,
    }
    return [arg for key, value in values.items() for arg in ("--set", f"{key}={value}")]


def dataset_command(
    bundle: Path, dataset: Path, out: Path, *extra: str, perceive_tokens: int = 8
) -> list[str]:
    """`sparc-engine run specs/demo.yaml --dataset --out` on the tiny bundle, as a user types it."""
    overrides = demo_overrides(bundle, perceive_tokens=perceive_tokens)
    return [
        SPARC_ENGINE,
        "run",
        str(DEMO_SPEC),
        *overrides,
        "--dataset",
        str(dataset),
        "--out",
        str(out),
        *extra,
    ]


def write_dataset(folder: Path, n: int, overflow_ids: Sequence[str] = ()) -> Path:
    """rows.jsonl of n rows r0..r{n-1}, each with its own picture (no two rows share an image's KV, so a
    row's token counts do not depend on which rows ran before it); `overflow_ids` ask OVERFLOWING_QUESTION."""
    folder.mkdir(parents=True, exist_ok=True)
    lines = []
    for i in range(n):
        row_id = f"r{i}"
        picture(160 + 16 * (i % 5), 120, seed=i).save(folder / f"{row_id}.png")
        question = OVERFLOWING_QUESTION if row_id in overflow_ids else f"What is in corner {i}?"
        lines.append(json.dumps({"id": row_id, "image": f"{row_id}.png", "question": question, "n": i}))
    path = folder / "rows.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path


def read_results(path: Path) -> dict[str, dict]:
    """An output JSONL by id, wall times dropped (all else is deterministic); asserts no id is repeated."""
    records = [json.loads(line) for line in path.read_text().splitlines()]
    by_id = {record["id"]: record for record in records}
    assert len(by_id) == len(records), "an id is written twice"
    for record in records:
        for stage in record["stages"]:
            stage.pop("ms")
    return by_id


def wait_for_lines(path: Path, n: int, process: subprocess.Popen, timeout: float = 120) -> int:
    """Waits until `path` has at least n lines (or the process ended); returns the count."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        count = path.read_bytes().count(b"\n") if path.is_file() else 0
        if count >= n or process.poll() is not None:
            return count
        time.sleep(0.02)
    raise AssertionError(f"{path}: fewer than {n} lines after {timeout} s")


def assert_valid_grounding(result: Grounding) -> None:
    """What every parser promises whatever the model wrote: notes as text, no internal error, boxes
    normalized with positive area, labels as text."""
    assert isinstance(result, Grounding)
    assert all(isinstance(note, str) for note in result.notes)
    assert not any(note.startswith("internal parser error") for note in result.notes), result.notes
    for box in result.boxes:
        assert 0.0 <= box.x1 < box.x2 <= 1.0 and 0.0 <= box.y1 < box.y2 <= 1.0
        assert isinstance(box.label, str)
