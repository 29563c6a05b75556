"""What a device install costs: disk per extra, and how long the CLI takes to start.

    python benchmarks/footprint.py                                  # the onnx extra, into out/footprint
    python benchmarks/footprint.py --extras core,onnx,llama --repeats 7
    python benchmarks/footprint.py --root /tmp/old-checkout --out out/footprint-before
    python benchmarks/footprint.py --baseline out/footprint-before/footprint.json   # adds ratios

For each extra, a fresh virtual environment gets `pip install -e 'ROOT[extra]'` (the pip cache makes this
quick after the first time) and is measured:

- size: the whole environment directory on disk (MB = 1e6 bytes), and the largest distributions in it;
- `sparc-engine --help`: wall time of the process, median over --repeats runs after one warm-up run (which
  writes the bytecode caches, as any second start on a device finds them);
- import time of the run path (`python -X importtime`: engine.cli, engine.pipeline and the extra's runtime
  module), median, with the heaviest top-level imports.

With --baseline (an earlier footprint.json, e.g. of another commit), each figure is also given as a ratio
new / baseline. Writes OUT/footprint.json and OUT/footprint.md and prints the markdown.
Not a test: the times depend on the machine and its load.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import stat
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# the modules `sparc-engine run` loads besides the CLI, per extra (core has no runtime of its own)
RUNTIME_MODULES = {
    "core": [],
    "onnx": ["runtimes.onnx"],
    "onnx-gpu": ["runtimes.onnx"],
    "llama": ["runtimes.llamacpp"],
}
RUN_PATH = ["engine.cli", "engine.pipeline"]

# run inside the measured environment: installed size of each distribution, in bytes
DIST_SIZES = """
import json, importlib.metadata as md
sizes = {}
for dist in md.distributions():
    total = 0
    for f in dist.files or []:
        p = dist.locate_file(f)
        if p.is_file():
            total += p.stat().st_size
    sizes[dist.metadata["Name"]] = total
print(json.dumps(sizes))
"""

IMPORTTIME = re.compile(r"import time:\s+(\d+) \|\s+(\d+) \|( +)(\S+)")  # self µs | cumulative µs | name


@dataclass
class Footprint:
    extra: str
    size_mb: float  # the environment directory, MB (1e6 bytes)
    largest: dict[str, float]  # distribution -> MB, the heaviest first
    help_ms: float  # `sparc-engine --help`, process wall time, median
    import_ms: float  # the run path's imports, sum of the top-level cumulative times, median
    heaviest_imports: dict[str, float]  # top-level module -> ms (cumulative), the heaviest first
    ratios: dict[str, float] = field(default_factory=dict)  # figure / the baseline's, when given


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--extras", default="onnx", help="comma-separated extras; 'core' is no extra")
    parser.add_argument("--root", type=Path, default=ROOT, help="the checkout to install (default: this one)")
    parser.add_argument("--out", type=Path, default=ROOT / "out/footprint", help="where the reports go")
    parser.add_argument("--repeats", type=int, default=5, help="timed starts per figure (median reported)")
    parser.add_argument("--baseline", type=Path, help="an earlier footprint.json to compare with")
    parser.add_argument("--python", default=sys.executable, help="interpreter that creates the environments")
    return parser.parse_args()


def dir_size(path: Path) -> int:
    """Bytes of every regular file under path (symlinks not followed, so the base interpreter is not counted)."""
    total = 0
    for folder, _, files in os.walk(path):
        for name in files:
            info = os.lstat(os.path.join(folder, name))
            total += info.st_size if stat.S_ISREG(info.st_mode) else 0
    return total


def install(python: str, root: Path, extra: str, venv: Path) -> Path:
    subprocess.run([python, "-m", "venv", str(venv)], check=True)
    bin_dir = venv / "bin"
    target = str(root) if extra == "core" else f"{root}[{extra}]"
    pip = [str(bin_dir / "python"), "-m", "pip", "install", "-q", "--disable-pip-version-check"]
    subprocess.run([*pip, "-e", target], check=True, stdout=subprocess.DEVNULL)
    return bin_dir


def median_ms(command: list[str], repeats: int, cwd: Path) -> float:
    subprocess.run(command, check=True, capture_output=True, cwd=cwd)  # warm-up: bytecode caches
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        subprocess.run(command, check=True, capture_output=True, cwd=cwd)
        times.append((time.perf_counter() - start) * 1000)
    return statistics.median(times)


def import_times(python: Path, modules: list[str], repeats: int, cwd: Path) -> tuple[float, dict[str, float]]:
    """Median total and per top-level module (cumulative µs -> ms) of `import modules` in a fresh process."""
    command = [str(python), "-X", "importtime", "-c", "import " + ", ".join(modules)]
    subprocess.run(command, check=True, capture_output=True, cwd=cwd)  # warm-up: bytecode caches
    totals, per_module = [], {}
    for _ in range(repeats):
        stderr = subprocess.run(command, check=True, capture_output=True, text=True, cwd=cwd).stderr
        top = {
            m.group(4): int(m.group(2)) / 1000
            for m in map(IMPORTTIME.match, stderr.splitlines())
            if m and len(m.group(3)) == 1  # nested imports are indented by two more spaces a level
        }
        totals.append(sum(top.values()))
        for name, ms in top.items():
            per_module.setdefault(name, []).append(ms)
    medians = {name: statistics.median(values) for name, values in per_module.items()}
    heaviest = dict(sorted(medians.items(), key=lambda item: -item[1])[:6])
    return statistics.median(totals), {name: round(ms, 1) for name, ms in heaviest.items()}


def measure(args: argparse.Namespace, extra: str) -> Footprint:
    with tempfile.TemporaryDirectory(prefix=f"footprint-{extra}-") as scratch:
        venv = Path(scratch) / "venv"
        bin_dir = install(args.python, args.root, extra, venv)
        sizes = json.loads(
            subprocess.run(
                [str(bin_dir / "python"), "-c", DIST_SIZES], check=True, capture_output=True
            ).stdout
        )
        largest = {name: round(b / 1e6, 1) for name, b in sorted(sizes.items(), key=lambda i: -i[1])[:8]}
        # run from the scratch folder, so the checkout's own folders cannot shadow the installed ones
        help_ms = median_ms([str(bin_dir / "sparc-engine"), "--help"], args.repeats, Path(scratch))
        modules = RUN_PATH + RUNTIME_MODULES.get(extra, [])
        import_ms, heaviest = import_times(bin_dir / "python", modules, args.repeats, Path(scratch))
        return Footprint(
            extra=extra,
            size_mb=round(dir_size(venv) / 1e6, 1),
            largest=largest,
            help_ms=round(help_ms, 1),
            import_ms=round(import_ms, 1),
            heaviest_imports=heaviest,
        )


def with_ratios(footprint: Footprint, baseline: dict[str, dict]) -> Footprint:
    old = baseline.get(footprint.extra)
    if old:
        footprint.ratios = {
            key: round(getattr(footprint, key) / old[key], 2) for key in ("size_mb", "help_ms", "import_ms")
        }
    return footprint


def markdown(footprints: list[Footprint]) -> str:
    compared = any(f.ratios for f in footprints)

    def cell(f: Footprint, key: str, unit: str) -> str:
        ratio = f" ({f.ratios[key]:.2f}x)" if key in f.ratios else ""
        return f"{getattr(f, key):.0f} {unit}{ratio}"

    lines = [
        "| extra | environment | `sparc-engine --help` | run-path imports | largest distributions |",
        "|---|---|---|---|---|",
    ]
    for f in footprints:
        largest = ", ".join(f"{name} {mb:.0f}" for name, mb in list(f.largest.items())[:5])
        lines.append(
            f"| {f.extra} | {cell(f, 'size_mb', 'MB')} | {cell(f, 'help_ms', 'ms')} | "
            f"{cell(f, 'import_ms', 'ms')} | {largest} |"
        )
    if compared:
        lines.append("\nRatios in brackets: this checkout / the baseline, measured on the same machine.")
    return "\n".join(lines) + "\n"


def main() -> int:
    args = parse_args()
    baseline = {}
    if args.baseline:
        baseline = {row["extra"]: row for row in json.loads(args.baseline.read_text())["extras"]}
    footprints = [with_ratios(measure(args, extra), baseline) for extra in args.extras.split(",")]
    args.out.mkdir(parents=True, exist_ok=True)
    report = {"root": str(args.root), "repeats": args.repeats, "extras": [asdict(f) for f in footprints]}
    (args.out / "footprint.json").write_text(json.dumps(report, indent=1) + "\n")
    table = markdown(footprints)
    (args.out / "footprint.md").write_text(table)
    print(table, end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
