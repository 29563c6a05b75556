"""What a device install costs: disk per extra, and how long the CLI takes to start.

    python benchmarks/footprint.py                                  # the onnx extra, into out/footprint
    python benchmarks/footprint.py --extras core,onnx,llama --repeats 7
    python benchmarks/footprint.py --baseline-root /tmp/old-checkout   # adds ratios to that checkout

For each extra, a fresh virtual environment gets `pip install -e 'ROOT[extra]'` (the pip cache makes this
quick after the first time) and is measured:

- size: the whole environment directory on disk (MB = 1e6 bytes), and the largest distributions in it;
- `sparc-engine --help`: wall time of the process, median over --repeats runs after one warm-up run (which
  writes the bytecode caches, as any second start on a device finds them);
- import time of the run path (`python -X importtime`: engine.cli, engine.pipeline and the extra's runtime
  module), median, with the heaviest top-level imports.

With --baseline-root (another checkout, e.g. `git archive` of an older commit), that checkout is installed
too and measured in the same run, the two environments taking turns on every timed start, so that load
from other jobs shifts both alike; each figure is then also given as a ratio this / baseline.
Writes OUT/footprint.json and OUT/footprint.md and prints the markdown.
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
sys.path.insert(0, str(ROOT))  # a plain script: run from a checkout without installing

from benchmarks.workload import write_report  # noqa: E402

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
    ratios: dict[str, float] = field(default_factory=dict)  # figure / the baseline's, with --baseline-root


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--extras", default="onnx", help="comma-separated extras; 'core' is no extra")
    parser.add_argument("--root", type=Path, default=ROOT, help="the checkout to install (default: this one)")
    parser.add_argument("--out", type=Path, default=ROOT / "out/footprint", help="where the reports go")
    parser.add_argument("--repeats", type=int, default=5, help="timed starts per figure (median reported)")
    parser.add_argument(
        "--baseline-root", type=Path, help="another checkout to measure alongside, for ratios"
    )
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


def timed_ms(command: list[str], cwd: Path) -> tuple[float, str]:
    """Wall time of a command and its stderr."""
    start = time.perf_counter()
    done = subprocess.run(command, check=True, capture_output=True, text=True, cwd=cwd)
    return (time.perf_counter() - start) * 1000, done.stderr


def top_level_imports(importtime: str) -> dict[str, float]:
    """Top-level module -> cumulative ms, from `python -X importtime`'s stderr."""
    return {
        m.group(4): int(m.group(2)) / 1000
        for m in map(IMPORTTIME.match, importtime.splitlines())
        if m and len(m.group(3)) == 1  # nested imports are indented by two more spaces a level
    }


def measure(args: argparse.Namespace, extra: str, scratch: Path) -> list[Footprint]:
    """The extra installed from --root (and from --baseline-root); the environments take turns."""
    roots = [args.root, *([args.baseline_root] if args.baseline_root else [])]
    venvs = [scratch / f"{extra}-{index}" for index in range(len(roots))]
    bins = [install(args.python, root, extra, venv) for root, venv in zip(roots, venvs)]
    statement = "import " + ", ".join(RUN_PATH + RUNTIME_MODULES.get(extra, []))
    commands = [
        ([str(b / "sparc-engine"), "--help"], [str(b / "python"), "-X", "importtime", "-c", statement])
        for b in bins
    ]
    # run from the scratch folder, so the checkout's own folders cannot shadow the installed ones
    for help_command, import_command in commands:  # warm-up: bytecode caches
        timed_ms(help_command, scratch)
        timed_ms(import_command, scratch)
    help_ms: list[list[float]] = [[] for _ in bins]
    imports: list[list[dict[str, float]]] = [[] for _ in bins]
    for _ in range(args.repeats):
        for index, (help_command, import_command) in enumerate(commands):
            help_ms[index].append(timed_ms(help_command, scratch)[0])
            imports[index].append(top_level_imports(timed_ms(import_command, scratch)[1]))
    footprints = [
        summarize(extra, venv, bin_dir, help_ms[index], imports[index])
        for index, (venv, bin_dir) in enumerate(zip(venvs, bins))
    ]
    if len(footprints) == 2:
        new, old = footprints
        new.ratios = {
            key: round(getattr(new, key) / getattr(old, key), 2)
            for key in ("size_mb", "help_ms", "import_ms")
        }
    return footprints


def summarize(
    extra: str, venv: Path, bin_dir: Path, help_ms: list[float], imports: list[dict[str, float]]
) -> Footprint:
    sizes = json.loads(
        subprocess.run([str(bin_dir / "python"), "-c", DIST_SIZES], check=True, capture_output=True).stdout
    )
    per_module = {name: statistics.median(run.get(name, 0.0) for run in imports) for name in imports[0]}
    return Footprint(
        extra=extra,
        size_mb=round(dir_size(venv) / 1e6, 1),
        largest={name: round(b / 1e6, 1) for name, b in sorted(sizes.items(), key=lambda i: -i[1])[:8]},
        help_ms=round(statistics.median(help_ms), 1),
        import_ms=round(statistics.median(sum(run.values()) for run in imports), 1),
        heaviest_imports={
            name: round(ms, 1) for name, ms in sorted(per_module.items(), key=lambda i: -i[1])[:6]
        },
    )


def markdown(footprints: list[Footprint], baseline: list[Footprint]) -> str:
    def cell(f: Footprint, key: str, unit: str) -> str:
        ratio = f" ({f.ratios[key]:.2f}x)" if key in f.ratios else ""
        return f"{getattr(f, key):.0f} {unit}{ratio}"

    lines = [
        "| extra | environment | `sparc-engine --help` | run-path imports | largest distributions (MB) |",
        "|---|---|---|---|---|",
    ]
    rows = [(f.extra, f) for f in footprints] + [(f"{f.extra} (baseline)", f) for f in baseline]
    for name, f in rows:
        largest = ", ".join(f"{dist} {mb:.0f}" for dist, mb in list(f.largest.items())[:5])
        lines.append(
            f"| {name} | {cell(f, 'size_mb', 'MB')} | {cell(f, 'help_ms', 'ms')} | "
            f"{cell(f, 'import_ms', 'ms')} | {largest} |"
        )
    if baseline:
        lines.append("\nRatios in brackets: this checkout / the baseline, measured in the same run.")
    return "\n".join(lines) + "\n"


def measure_all(args: argparse.Namespace) -> tuple[dict, str]:
    """Every extra of args.extras (and the baseline's): the report and its markdown."""
    with tempfile.TemporaryDirectory(prefix="footprint-") as scratch:
        measured = [measure(args, extra, Path(scratch)) for extra in args.extras.split(",")]
    footprints = [pair[0] for pair in measured]
    baseline = [pair[1] for pair in measured if len(pair) == 2]
    report = {
        "root": str(args.root),
        "baseline_root": str(args.baseline_root) if args.baseline_root else None,
        "repeats": args.repeats,
        "extras": [asdict(f) for f in footprints],
        "baseline": [asdict(f) for f in baseline],
    }
    return report, markdown(footprints, baseline)


def footprint_report(extras: str, repeats: int) -> tuple[dict, str]:
    """This checkout's extras, as `sparc-engine bench --footprint EXTRAS` reports them."""
    args = argparse.Namespace(
        extras=extras, root=ROOT, repeats=repeats, baseline_root=None, python=sys.executable
    )
    return measure_all(args)


def main() -> int:
    args = parse_args()
    write_report(args.out, "footprint", *measure_all(args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
