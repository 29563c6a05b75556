"""`sparc-engine bench`: the same queries through the naive transformers pipeline, the engine's runtimes
and llama-cpp-python's own chat handler, in one run, with every figure also a ratio to the naive one.

    sparc-engine bench --shape tiny --resolutions 64 --rollouts 1,2 --max-new-tokens 4 --repeats 1
    sparc-engine bench --shape 65m --repeats 1            # 256 px and full resolution, N = 1 and 8
    sparc-engine bench --shape 4b                         # fp16 on a CUDA GPU; skipped without one

Builds the random checkpoint of --shape (or takes --model), exports it to ONNX (fp32; fp16 on a GPU) and
GGUF (f32; f16 on a GPU) once into --out, then runs every pipeline on every workload in a process of its
own (benchmarks/pipelines.py), so that each peak resident memory is one pipeline's. Writes
OUT/SHAPE/bench.json and bench.md and prints the markdown. Not a test: the times depend on the machine.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import importlib.util
import io
import json
import os
import platform
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from datetime import date
from pathlib import Path

from benchmarks import PIPELINES, ROOT
from benchmarks.pipelines import Figures, Job, Workload, figures_from_json
from benchmarks.shapes import SHAPES, sizes
from benchmarks.workload import write_report
from engine.errors import UserError

# figures given as a ratio to the naive pipeline's (reused tokens are not: the naive pipeline reuses none)
RATIO_KEYS = (
    "ttft_ms",
    "e2e_ms",
    "prompt_tokens",
    "visual_tokens_computed",
    "decode_tokens_per_s",
    "peak_rss_mb",
    "cold_start_ms",
)
# memory bandwidth of known GPUs, GB/s (datasheets), matched against the device name in this order
GPU_BANDWIDTH = (
    ("H200", 4800.0),
    ("H100 PCIe", 2000.0),
    ("H100", 3350.0),
    ("A100-SXM4-80GB", 2039.0),
    ("A100", 1555.0),
    ("L40S", 864.0),
    ("L4", 300.0),
    ("A10G", 600.0),
    ("RTX 4090", 1008.0),
    ("Orin", 204.8),
)
NEEDS_LLAMA = ("llamacpp", "chat_handler")


@dataclass(frozen=True)
class Models:
    checkpoint: Path
    onnx: Path | None  # None when no pipeline runs it
    gguf: Path | None


@dataclass
class Row:
    workload: Workload
    pipeline: str
    figures: Figures | None
    error: str = ""  # why a pipeline has no figures
    ratios: dict[str, float] = dataclasses.field(default_factory=dict)  # figure / naive's
    bandwidth_fraction: float | None = None  # decode tokens/s over the memory-bandwidth bound (GPU)


def _list(text: str) -> list[str]:
    return [item.strip() for item in text.split(",") if item.strip()]


def workloads(args: argparse.Namespace) -> list[Workload]:
    try:
        resolutions = [None if r == "full" else int(r) for r in _list(args.resolutions)]
        rollouts = [int(n) for n in _list(args.rollouts)]
    except ValueError as error:
        raise UserError(f"--resolutions takes pixels or 'full', --rollouts numbers: {error}") from error
    return [
        Workload(resolution, n, args.max_new_tokens, args.temperature, args.seed)
        for resolution in resolutions
        for n in rollouts
    ]


def pipelines(args: argparse.Namespace) -> tuple[list[str], dict[str, str]]:
    """The pipelines to run, and those skipped with the reason."""
    asked = _list(args.pipelines)
    unknown = sorted(set(asked) - set(PIPELINES))
    if unknown:
        raise UserError(f"--pipelines: unknown {', '.join(unknown)} (have: {', '.join(PIPELINES)})")
    skipped = {}
    if importlib.util.find_spec("llama_cpp") is None:
        skipped = {
            p: "llama-cpp-python is not installed: pip install 'sparc-engine[llama]'" for p in NEEDS_LLAMA
        }
    return [p for p in PIPELINES if p in asked and p not in skipped], {
        p: skipped[p] for p in asked if p in skipped
    }


def _export(checkpoint: Path, bundle: Path, fmt: str, options: list[str]) -> Path:
    """Export once: a bundle newer than its checkpoint is kept."""
    manifest = bundle / "manifest.yaml"
    if manifest.is_file() and manifest.stat().st_mtime >= (checkpoint / "config.json").stat().st_mtime:
        return bundle
    from engine.cli import main as cli

    with contextlib.redirect_stdout(io.StringIO()):  # the CLI prints the bundle's path
        code = cli(["export", fmt, "--model", str(checkpoint), "--out", str(bundle), *options])
    if code != 0:
        raise UserError(f"export {fmt} of {checkpoint} failed")
    return bundle


def prepare(args: argparse.Namespace, out: Path, gpu: bool, run: list[str]) -> Models:
    """The checkpoint and the bundles the pipelines in `run` need: given, or built and exported once."""
    if args.model:
        checkpoint = args.model
    else:
        from export.tiny import build_tiny_qwen3vl_cached

        checkpoint = build_tiny_qwen3vl_cached(out, seed=args.seed, sizes=sizes(args.shape))
    onnx_dtype, gguf_quant = ("fp16", "f16") if gpu else ("fp32", "f32")
    onnx = args.onnx
    if onnx is None and "onnx" in run:
        onnx = _export(checkpoint, out / f"onnx-{onnx_dtype}", "onnx", ["--dtype", onnx_dtype])
    gguf = args.gguf
    if gguf is None and any(p in NEEDS_LLAMA for p in run):
        gguf = _export(checkpoint, out / f"gguf-{gguf_quant}", "gguf", ["--quant", gguf_quant])
    return Models(checkpoint, onnx, gguf)


def run_pipeline(job: Job, timeout: float) -> tuple[Figures | None, str]:
    """One pipeline on one workload, in a fresh process; (figures, "") or (None, why not)."""
    job = dataclasses.replace(job, spawned_at=time.time())
    command = [sys.executable, "-m", "benchmarks.pipelines", json.dumps(asdict(job))]
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=timeout, cwd=ROOT)
    except subprocess.TimeoutExpired:
        return None, f"took over {timeout:.0f} s"
    if done.returncode != 0:
        lines = done.stderr.strip().splitlines() or [f"exit code {done.returncode}"]
        return None, lines[-1]
    return figures_from_json(done.stdout.strip().splitlines()[-1]), ""


def add_ratios(rows: list[Row]) -> None:
    naive = {r.workload: r.figures for r in rows if r.pipeline == "naive" and r.figures}
    for row in rows:
        base = naive.get(row.workload)
        if row.figures is None or base is None:
            continue
        row.ratios = {
            key: round(getattr(row.figures, key) / getattr(base, key), 3)
            for key in RATIO_KEYS
            if getattr(base, key)
        }


def gpu_bandwidth(args: argparse.Namespace) -> tuple[str, float | None]:
    import torch

    name = torch.cuda.get_device_name(0)
    if args.bandwidth:
        return name, args.bandwidth
    return name, next((gbs for known, gbs in GPU_BANDWIDTH if known in name), None)


def text_weight_bytes(checkpoint: Path, bytes_per_weight: int) -> int:
    """Bytes of the language model's weights at bytes_per_weight each: what one decode step reads (the
    vision tower is not run while decoding). From the safetensors headers, without loading tensors."""
    total = 0
    for path in checkpoint.glob("*.safetensors"):
        with path.open("rb") as handle:
            header = json.loads(handle.read(int.from_bytes(handle.read(8), "little")))
        for name, tensor in header.items():
            if name != "__metadata__" and ".visual." not in f".{name}":
                count = 1
                for dim in tensor["shape"]:
                    count *= dim
                total += count * bytes_per_weight
    return total


def bandwidth_bound(checkpoint: Path, figures: Figures, workload: Workload, gbs: float) -> float:
    """Decode tokens/s if every step only read the weights and the KV of its N sequences at gbs (fp16)."""
    text = json.loads((checkpoint / "config.json").read_text())["text_config"]
    kv_per_token = 2 * text["num_hidden_layers"] * text["num_key_value_heads"] * text["head_dim"] * 2
    prompt = (figures.prompt_tokens + figures.reused_tokens) / workload.rollouts
    context = prompt + workload.max_new_tokens / 2  # the average length a step attends to
    step_bytes = text_weight_bytes(checkpoint, 2) + workload.rollouts * context * kv_per_token
    return workload.rollouts * gbs * 1e9 / step_bytes


def _cell(row: Row, key: str, unit: str, digits: int = 0) -> str:
    value = getattr(row.figures, key)
    ratio = f" ({row.ratios[key]:.2f}x)" if key in row.ratios and row.pipeline != "naive" else ""
    return f"{value:,.{digits}f}{unit}{ratio}"


def markdown(rows: list[Row], header: str, gpu: bool) -> str:
    columns = [
        "workload",
        "pipeline",
        "time to first token",
        "end-to-end",
        "prompt tokens computed / reused",
        "visual tokens in the prompt / computed",
        "decode tokens/s",
        *(["of the bandwidth bound"] if gpu else []),
        "peak RSS",
        "cold start",
    ]
    lines = [header, "", "| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for row in rows:
        if row.figures is None:
            cells = [row.error] + [""] * (len(columns) - 3)
        else:
            f = row.figures
            cells = [
                _cell(row, "ttft_ms", " ms"),
                _cell(row, "e2e_ms", " ms"),
                f"{f.prompt_tokens:,} / {f.reused_tokens:,}"
                + (f" ({row.ratios['prompt_tokens']:.2f}x)" if "prompt_tokens" in row.ratios else ""),
                f"{f.visual_tokens:,} / {f.visual_tokens_computed:,}",
                _cell(row, "decode_tokens_per_s", "", 1),
                *(
                    [f"{row.bandwidth_fraction:.1%}" if row.bandwidth_fraction is not None else "–"]
                    if gpu
                    else []
                ),
                _cell(row, "peak_rss_mb", " MB"),
                _cell(row, "cold_start_ms", " ms"),
            ]
        lines.append(f"| {row.workload.name} | {row.pipeline} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _cpu_name() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def bench_command(args: argparse.Namespace) -> int:
    gpu = (args.device or ("cuda" if SHAPES[args.shape].gpu else "cpu")) == "cuda"
    if gpu:
        import torch

        if not torch.cuda.is_available():
            what = (
                f"--model {args.model} on cuda" if args.model else f"shape {args.shape} (fp16 on a CUDA GPU)"
            )
            print(f"bench: {what}: torch sees no CUDA GPU, skipped", file=sys.stderr)
            return 0
    out = args.out / (args.model.name if args.model else args.shape)
    run, skipped = pipelines(args)
    models = prepare(args, out, gpu, run)
    threads = args.threads or os.cpu_count() or 1
    rows = []
    for workload in workloads(args):
        for pipeline in run:
            job = Job(
                pipeline=pipeline,
                model=str(models.checkpoint),
                onnx=str(models.onnx or ""),
                gguf=str(models.gguf or ""),
                device="cuda" if gpu else "cpu",
                threads=threads,
                image=str(args.image),
                question=args.question,
                workload=workload,
                repeats=args.repeats,
                spawned_at=0.0,
            )
            figures, error = run_pipeline(job, args.timeout)
            rows.append(Row(workload, pipeline, figures, error))
            print(f"bench: {workload.name}, {pipeline}: {error or 'done'}", file=sys.stderr)
        rows += [Row(workload, pipeline, None, why) for pipeline, why in skipped.items()]
    add_ratios(rows)
    device = _cpu_name() + f", {threads} threads"
    if gpu:
        device, gbs = gpu_bandwidth(args)
        for row in rows:
            if row.figures and gbs:
                bound = bandwidth_bound(models.checkpoint, row.figures, row.workload, gbs)
                row.bandwidth_fraction = round(row.figures.decode_tokens_per_s / bound, 4)
    header = (
        f"{args.model or args.shape} on {device}, {date.today()}: perceive stage, {args.max_new_tokens} tokens "
        f"per rollout (end-of-sequence ignored), temperature {args.temperature}, seed {args.seed}, median of "
        f"{args.repeats}; ratios in brackets are to the naive pipeline on the same workload"
    )
    report = {
        "shape": args.shape,
        "model": str(models.checkpoint),
        "device": device,
        "date": str(date.today()),
        "image": str(args.image),
        "max_new_tokens": args.max_new_tokens,
        "temperature": args.temperature,
        "seed": args.seed,
        "repeats": args.repeats,
        "rows": [
            {**asdict(row), "workload": {**asdict(row.workload), "name": row.workload.name}} for row in rows
        ],
    }
    table = markdown(rows, header, gpu)
    if args.footprint:
        from benchmarks.footprint import footprint_report

        report["footprint"], footprint_table = footprint_report(args.footprint, args.repeats)
        table += "\n" + footprint_table
    write_report(out, "bench", report, table)
    return 0
