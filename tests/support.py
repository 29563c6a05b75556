"""Helpers several test modules share: structured pictures, hand-made PNGs, a runtime with fixed groundings, and a run of
the whole pipeline in a fresh interpreter that reports which heavy libraries it loaded."""

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

from engine.families.molmo2 import Molmo2Family
from runtimes.base import Text

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


class FixedGrounding:
    """Delegates to a real runtime but replaces the perceive stage's outputs with a fixed grounding text, so
    a random model's pipeline gets regions and the reason stage runs on crops."""

    def __init__(self, inner, perceive_marker: str, grounding: str) -> None:
        self.inner, self.info = inner, inner.info
        self.perceive_marker = perceive_marker  # text only the perceive prompt contains
        self.grounding = grounding

    def prefill(self, segments, variant):
        return self.inner.prefill(segments, variant)

    def generate(self, prefix, suffix, n, sampling):
        generations = self.inner.generate(prefix, suffix, n, sampling)
        if any(self.perceive_marker in s.text for s in suffix if isinstance(s, Text)):
            generations = [replace(g, text=self.grounding) for g in generations]
        return generations

    def close(self) -> None:
        pass


# an expression, in the child interpreter: the libraries the run path must never import that it has loaded
_HEAVY_LOADED = 'sorted({m.split(".")[0] for m in sys.modules} & {"torch", "transformers", "peft", "onnx"})'
_RUN_AND_LIST_MODULES = f"""
import json, sys
import numpy as np
from PIL import Image
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


MOLMO2_POINTS = '<points coords="1 1 250 300 2 750 650">a</points>'
# the perceive prompt's fixed part (after the question) tells a perceive call from a reason call
MOLMO2_PERCEIVE_MARKER = Molmo2Family.perceive_prompt.split("{question}")[-1].strip()


def fixed_points(runtime) -> FixedGrounding:
    return FixedGrounding(runtime, MOLMO2_PERCEIVE_MARKER, MOLMO2_POINTS)


def molmo2_greedy_raw(bundle: Path, runtime: str) -> dict:
    """SPARC with greedy rollouts: every stage is deterministic, so runtimes must agree exactly."""
    return {
        "model": {"bundle": str(bundle), "runtime": runtime, "device": "cpu"},
        "stages": [
            {"perceive": {"resolution": 512, "rollouts": 2, "temperature": 0.0, "max_new_tokens": 12}},
            {"fuse": {"iou_thr": 0.5}},
            {"crop": {"min_side": 64, "resolution": 378, "max_crops": 2}},
            {"reason": {"resolution": 512, "max_new_tokens": 12}},
        ],
    }


def timeless_result(spec: dict, runtime, image: Image.Image) -> dict:
    """A pipeline run's --json result without wall times: what two runtimes must agree on exactly."""
    from engine.pipeline import Pipeline
    from engine.spec import validate

    result = Pipeline(validate(spec), runtime).run(image, "What colour is the car?").to_dict()
    for stage in result["stages"]:
        stage.pop("ms")
    return result


def assert_two_regions_and_crops_seen(result: dict) -> None:
    perceive, reason = result["stages"][0], result["stages"][-1]
    assert len(result["regions"]) == 2 and reason["visual_tokens"] > perceive["visual_tokens"]


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
