"""`sparc-engine bench`: the same queries through the naive transformers pipeline, the engine's runtimes
and llama-cpp-python's own chat handler, in one run, with every figure also a ratio to the naive one.

    sparc-engine bench --shape tiny --resolutions 64 --rollouts 1,2 --max-new-tokens 4 --repeats 1
    sparc-engine bench --shape 65m --repeats 1            # 256 px and full resolution, N = 1 and 8
    sparc-engine bench --shape 4b                         # fp16 on a CUDA GPU; skipped without one
    sparc-engine bench --shape 65m --onnx-quant fp32,int4 --gguf-quant f32,q8_0   # quantized bundles too

Builds the random checkpoint of --shape (or takes --model), exports it to ONNX (fp32; fp16 on a GPU) and
GGUF (f32; f16 on a GPU) once into --out, or in each quantization of --onnx-quant and --gguf-quant (a row
per bundle), then runs every pipeline on every workload in a process of its own (benchmarks/pipelines.py),
so that each peak resident memory is one pipeline's. Writes
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
import signal
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
from export import GGUF_QUANTS, ONNX_QUANTS

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


# the export options of each quantization a bundle may be asked in
ONNX_EXPORTS = {
    "fp32": ["--dtype", "fp32"],
    "fp16": ["--dtype", "fp16"],
    **{quant: ["--dtype", "fp32", "--quant", quant] for quant in ONNX_QUANTS},
}
GGUF_EXPORTS = {quant: ["--quant", quant] for quant in GGUF_QUANTS}
# bytes a decode step reads per text weight in each quantization, block scales included (int8/int4:
# MatMulNBits, an fp32 scale per 32 weights; q8_0: 34 bytes per 32; q4_k_m: about 4.85 bits a weight)
BYTES_PER_WEIGHT = {
    "fp32": 4.0,
    "f32": 4.0,
    "fp16": 2.0,
    "f16": 2.0,
    "int8": 1.125,
    "int8-a8": 1.125,
    "q8_0": 34 / 32,
    "int4": 0.625,
    "int4-a8": 0.625,
    "q4_k_m": 4.85 / 8,
}


@dataclass(frozen=True)
class Models:
    checkpoint: Path
    onnx: dict[str, Path]  # quantization -> bundle; empty when no pipeline runs one
    gguf: dict[str, Path]

    def bundles(self, pipeline: str) -> dict[str, tuple[str, str]]:
        """The bundles a pipeline runs, each a row: label -> (onnx, gguf) paths of its Job."""
        if pipeline == "onnx":
            return {quant: (str(path), "") for quant, path in self.onnx.items()}
        if pipeline in NEEDS_LLAMA:
            return {quant: ("", str(path)) for quant, path in self.gguf.items()}
        return {"": ("", "")}  # naive and torch_ref run the checkpoint


@dataclass
class Row:
    workload: Workload
    pipeline: str
    figures: Figures | None
    bundle: str = ""  # the bundle's quantization (fp32, int4, q8_0, ...) where the pipeline runs one
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


def _quants(text: str | None, default: str, known: dict[str, list[str]], option: str) -> list[str]:
    asked = _list(text) if text else [default]
    unknown = sorted(set(asked) - set(known))
    if unknown:
        raise UserError(f"{option}: unknown {', '.join(unknown)} (have: {', '.join(known)})")
    return list(dict.fromkeys(asked))


def bundle_quant(bundle: Path) -> str:
    """A given bundle's quantization, from its manifest: the row label of its pipelines."""
    from runtimes.bundle import read_manifest

    manifest = read_manifest(bundle)
    return (manifest.model.get("quant") or {}).get("method") or manifest.dtype


def prepare(args: argparse.Namespace, out: Path, gpu: bool, run: list[str]) -> Models:
    """The checkpoint and the bundles the pipelines in `run` need: given, or built and exported once."""
    onnx_quants = _quants(args.onnx_quant, "fp16" if gpu else "fp32", ONNX_EXPORTS, "--onnx-quant")
    gguf_quants = _quants(args.gguf_quant, "f16" if gpu else "f32", GGUF_EXPORTS, "--gguf-quant")
    if args.model:
        checkpoint = args.model
    else:
        from export.tiny import build_tiny_qwen3vl_cached

        checkpoint = build_tiny_qwen3vl_cached(out, seed=args.seed, sizes=sizes(args.shape))
    onnx: dict[str, Path] = {}
    if args.onnx:
        onnx = {bundle_quant(args.onnx): args.onnx}
    elif "onnx" in run:
        onnx = {q: _export(checkpoint, out / f"onnx-{q}", "onnx", ONNX_EXPORTS[q]) for q in onnx_quants}
    gguf: dict[str, Path] = {}
    if args.gguf:
        gguf = {bundle_quant(args.gguf): args.gguf}
    elif any(p in NEEDS_LLAMA for p in run):
        gguf = {q: _export(checkpoint, out / f"gguf-{q}", "gguf", GGUF_EXPORTS[q]) for q in gguf_quants}
    return Models(checkpoint, onnx, gguf)


def run_pipeline(job: Job, timeout: float) -> tuple[Figures | None, str]:
    """One pipeline on one workload, in a fresh process; (figures, "") or (None, why not)."""
    job = dataclasses.replace(job, spawned_at=time.time())
    command = [sys.executable, "-m", "benchmarks.pipelines", json.dumps(asdict(job))]
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=timeout, cwd=ROOT)
    except subprocess.TimeoutExpired:
        return None, f"took over {timeout:.0f} s"
    if done.returncode < 0:  # the library crashed (llama.cpp's AMX kernels can, see the README)
        return None, f"crashed: {signal.Signals(-done.returncode).name}"
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


def text_weight_bytes(checkpoint: Path, bytes_per_weight: float) -> float:
    """Bytes of the language model's weights at bytes_per_weight each: what one decode step reads (the
    vision tower is not run while decoding). From the safetensors headers, without loading tensors."""
    total = 0.0
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


def bandwidth_bound(
    checkpoint: Path, figures: Figures, workload: Workload, gbs: float, bytes_per_weight: float
) -> float:
    """Decode tokens/s if every step only read the text weights and the fp16 KV of its N sequences at gbs."""
    text = json.loads((checkpoint / "config.json").read_text())["text_config"]
    kv_per_token = 2 * text["num_hidden_layers"] * text["num_key_value_heads"] * text["head_dim"] * 2
    prompt = (figures.prompt_tokens + figures.reused_tokens) / workload.rollouts
    context = prompt + workload.max_new_tokens / 2  # the average length a step attends to
    step_bytes = text_weight_bytes(checkpoint, bytes_per_weight) + workload.rollouts * context * kv_per_token
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
        pipeline = f"{row.pipeline} {row.bundle}".strip()
        lines.append(f"| {row.workload.name} | {pipeline} | " + " | ".join(cells) + " |")
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
            for quant, (onnx, gguf) in models.bundles(pipeline).items():
                job = Job(
                    pipeline=pipeline,
                    model=str(models.checkpoint),
                    onnx=onnx,
                    gguf=gguf,
                    device="cuda" if gpu else "cpu",
                    threads=threads,
                    image=str(args.image),
                    question=args.question,
                    workload=workload,
                    repeats=args.repeats,
                    spawned_at=0.0,
                )
                figures, error = run_pipeline(job, args.timeout)
                rows.append(Row(workload, pipeline, figures, bundle=quant, error=error))
                label = f"{pipeline} {quant}".strip()
                print(f"bench: {workload.name}, {label}: {error or 'done'}", file=sys.stderr)
        rows += [Row(workload, pipeline, None, error=why) for pipeline, why in skipped.items()]
    add_ratios(rows)
    device = _cpu_name() + f", {threads} threads"
    if gpu:
        device, gbs = gpu_bandwidth(args)
        for row in rows:
            if row.figures and gbs:
                # the checkpoint's pipelines (naive, torch_ref) run it in fp16
                weight = BYTES_PER_WEIGHT.get(row.bundle, 2.0)
                bound = bandwidth_bound(models.checkpoint, row.figures, row.workload, gbs, weight)
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
