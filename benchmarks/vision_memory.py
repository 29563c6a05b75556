"""Peak memory and time of the ONNX vision stage (and a whole perceive stage) against the image size.

    python benchmarks/vision_memory.py --shape 65m --before 01aa0c6     # a ~65M Qwen3-VL, against a commit
    python benchmarks/vision_memory.py --sizes 800x600 1600x1200          # the tiny test model
    python benchmarks/vision_memory.py --bundle models/molmo2-onnx        # bundles exported before

Builds the random checkpoint (--shape, as benchmarks/quant.py), exports it with this checkout's exporter
and, with --before REV, also with the exporter of that commit (its tree is unpacked under OUT with
`git archive`; the runtime is this checkout's for both); or takes the --bundle directories as they are.
Then, for each bundle, each image size runs in a subprocess of its own (which imports no torch), so that
every peak is that run's alone:

- vision: the vision graph on one image at --sizes (WxH: examples/street.png resized to it):
  the process's peak resident memory (VmHWM) after the first run, how much of it that run added over
  the loaded runtime and the prepared image, and the graph's time (median of --repeats runs);
- perceive: at the largest size, the image prefix + question prefilled and --max-new-tokens generated
  (N=1, greedy), as the perceive stage does: peak resident memory and wall time.

Ratios are against the first bundle (--before when given), measured in the same run. Writes
OUT/vision_memory.json and OUT/vision_memory.md and prints the markdown. Not a test: the figures depend
on the machine and its load.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # a plain script: run from a checkout without installing

from benchmarks.workload import write_report  # noqa: E402

QUESTION = "Which objects does the question ask about? What colour is the car?"


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--shape", choices=("tiny", "65m"), default="tiny", help="random checkpoint to build")
    parser.add_argument("--out", type=Path, default=ROOT / "out/vision_memory", help="bundles and reports")
    parser.add_argument("--before", metavar="REV", help="also export with this commit's exporter (baseline)")
    parser.add_argument(
        "--bundle", type=Path, action="append", help="measure this exported bundle (any family) instead"
    )
    parser.add_argument(
        "--sizes", nargs="+", default=["400x300", "800x600", "1200x900", "1600x1200"], help="images, WxH"
    )
    parser.add_argument("--repeats", type=int, default=3, help="timed vision runs per size (median)")
    parser.add_argument("--max-new-tokens", type=int, default=32, help="perceive: tokens generated")
    parser.add_argument("--child", nargs=3, metavar=("STAGE", "BUNDLE", "SIZE"), help=argparse.SUPPRESS)
    return parser.parse_args()


def peak_mb() -> float:
    """The process's peak resident set so far (VmHWM), MB."""
    return _status_kb("VmHWM") / 1024


def _status_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def _dims(size: str) -> tuple[int, int]:
    width, height = size.split("x")
    return int(width), int(height)


def child(stage: str, bundle: Path, size: str, args: argparse.Namespace) -> dict:
    """One measurement in this (fresh) process; the parent reads the JSON line it prints."""
    import numpy as np
    from PIL import Image

    from engine.families import family_for
    from runtimes.onnx import OnnxRuntime
    from runtimes.protocol import Sampling

    width, height = _dims(size)
    runtime = OnnxRuntime(bundle, device="cpu")
    family = family_for(runtime.info.architecture, runtime.info.image)
    street = Image.open(ROOT / "examples/street.png").convert("RGB").resize((width, height))
    image = family.prepare_image(street, max(width, height), "street")
    # Qwen3-VL: (patches, C * T * P * P); Molmo2: (crops, patches per crop, P * P * C)
    row = {"patches": int(np.prod(image.pixel_values.shape[:-1])), "tokens": image.n_tokens}
    before = _status_kb("VmRSS") / 1024
    if stage == "vision":
        graphs, times = runtime.graphs("base"), []
        for _ in range(args.repeats):
            start = time.perf_counter()
            runtime.vision(graphs, [image])
            times.append(time.perf_counter() - start)
            if len(times) == 1:  # the peak of one run: later runs can only add allocator slack
                row |= {"peak_mb": peak_mb(), "added_mb": peak_mb() - before}
        return row | {"vision_s": statistics.median(times)}
    start = time.perf_counter()
    prefix = runtime.prefill([*family.image_prefix(image), *family.question_suffix(QUESTION)])
    (generation,) = runtime.generate(prefix, [], 1, Sampling(args.max_new_tokens))
    row |= {"perceive_s": time.perf_counter() - start, "generated": generation.generated_tokens}
    return row | {"peak_mb": peak_mb(), "added_mb": peak_mb() - before}


def measure(stage: str, bundle: Path, size: str, args: argparse.Namespace) -> dict:
    command = [sys.executable, __file__, "--repeats", str(args.repeats), "--max-new-tokens"]
    command += [str(args.max_new_tokens), "--child", stage, str(bundle), size]
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    if done.returncode:
        raise SystemExit(f"{stage} {bundle} {size} failed:\n{done.stderr}")
    return json.loads(done.stdout.splitlines()[-1])


def export(model: Path, bundle: Path, source: Path = ROOT) -> Path:
    """`sparc-engine export onnx` with the exporter of the tree at `source`, in a subprocess."""
    if not (bundle / "manifest.yaml").is_file():  # -m runs the engine package found first: source's
        command = [
            sys.executable,
            "-m",
            "engine.cli",
            "export",
            "onnx",
            "--model",
            str(model),
            "--out",
            str(bundle),
        ]
        subprocess.run(command, cwd=source, check=True, capture_output=True)
    return bundle


def checkout(rev: str, out: Path) -> Path:
    """The tree of commit `rev`, unpacked (no git worktree: the repository's state is left alone)."""
    tree = out / f"src-{rev}"
    if not tree.is_dir():
        tree.mkdir(parents=True)
        archive = subprocess.run(["git", "archive", rev], cwd=ROOT, capture_output=True, check=True).stdout
        subprocess.run(["tar", "-x", "-C", str(tree)], input=archive, check=True)
    return tree


def exported_bundles(args: argparse.Namespace) -> dict[str, Path]:
    """The --shape checkpoint exported by this checkout (and by --before's commit first)."""
    from benchmarks.quant import SHAPES
    from export.tiny import build_tiny_qwen3vl_cached

    with contextlib.redirect_stdout(io.StringIO()):
        model = build_tiny_qwen3vl_cached(args.out / args.shape, sizes=SHAPES[args.shape])
    bundles = {}
    if args.before:
        bundles[f"before ({args.before})"] = export(
            model, args.out / f"bundle-{args.shape}-{args.before}", checkout(args.before, args.out)
        )
    bundles["this checkout"] = export(model, args.out / f"bundle-{args.shape}")
    return bundles


def markdown(report: dict) -> str:
    names = list(report["bundles"])
    first = report["bundles"][names[0]]
    lines = [
        f"{report['model']}, ONNX on CPU, one image per vision run; ratios against {names[0]}:\n",
        "| bundle | image | patches | vision peak RSS | added by the vision run | vision graph time |",
        "|---|---|---|---|---|---|",
    ]
    for name, rows in report["bundles"].items():
        for size, row in rows["vision"].items():
            base = first["vision"][size]
            peak, time_s = _versus(row, base, "peak_mb", "MB"), _versus(row, base, "vision_s", "s", 2)
            lines.append(_row(name, size, row["patches"], peak, f"{row['added_mb']:.0f} MB", time_s))
    lines += [
        "",
        "| bundle | perceive at | peak RSS | wall (prefill + decode) | tokens |",
        "|---|---|---|---|---|",
    ]
    for name, rows in report["bundles"].items():
        row, base = rows["perceive"], first["perceive"]
        image = f"{report['largest']} ({row['tokens']} visual tokens)"
        wall = _versus(row, base, "perceive_s", "s", 2)
        lines.append(_row(name, image, _versus(row, base, "peak_mb", "MB"), wall, row["generated"]))
    return "\n".join(lines) + "\n"


def _versus(row: dict, base: dict, key: str, unit: str, digits: int = 0) -> str:
    """A figure with its ratio to the baseline's, e.g. `594 MB (0.19x)`."""
    return f"{row[key]:.{digits}f} {unit} ({row[key] / base[key]:.2f}x)"


def _row(*cells: object) -> str:
    return "| " + " | ".join(str(cell) for cell in cells) + " |"


def main() -> int:
    args = parse_args()
    if args.child:
        stage, bundle, size = args.child
        print(json.dumps(child(stage, Path(bundle), size, args)))
        return 0
    args.out.mkdir(parents=True, exist_ok=True)
    bundles = {str(bundle): bundle for bundle in args.bundle or []} or exported_bundles(args)
    largest = max(args.sizes, key=lambda size: _dims(size)[0] * _dims(size)[1])
    title = "the given bundles" if args.bundle else f"{args.shape} Qwen3-VL"
    report = {"model": title, "largest": largest, "bundles": {}}
    for name, bundle in bundles.items():
        report["bundles"][name] = {
            "vision": {size: measure("vision", bundle, size, args) for size in args.sizes},
            "perceive": measure("perceive", bundle, largest, args),
        }
    write_report(args.out, "vision_memory", report, markdown(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
