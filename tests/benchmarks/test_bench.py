"""`sparc-engine bench` as a user runs it, on the tiny shape: the report's structure, not its times."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks.bench import RATIO_KEYS, bundle_quant
from tests.support import ROOT, heavy_imports

TOKENS = 3
ROLLOUTS = (1, 2)
ENGINE = ("torch_ref", "onnx", "llamacpp")
SEQUENTIAL = ("naive", "chat_handler")  # one call per rollout, each computing the whole prompt


def bench(*args: str) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "engine.cli", "bench", *args]
    return subprocess.run(command, cwd=ROOT, capture_output=True, text=True, env={**os.environ, "CI": "1"})


@pytest.fixture(scope="module")
def report(tmp_path_factory: pytest.TempPathFactory) -> dict:
    out = tmp_path_factory.mktemp("bench")
    rollouts = ",".join(map(str, ROLLOUTS))
    done = bench(
        "--shape", "tiny", "--out", str(out), "--resolutions", "64", "--rollouts", rollouts,
        "--max-new-tokens", str(TOKENS), "--repeats", "1",
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    report = json.loads((out / "tiny/bench.json").read_text())
    assert (out / "tiny/bench.md").read_text() in done.stdout  # the table is printed too
    return report


def rows_by_pipeline(report: dict, rollouts: int) -> dict[str, dict]:
    return {row["pipeline"]: row for row in report["rows"] if row["workload"]["rollouts"] == rollouts}


def test_every_pipeline_runs_every_workload_and_does_the_same_work(report: dict) -> None:
    for n in ROLLOUTS:
        rows = rows_by_pipeline(report, n)
        ran = {name: row["figures"] for name, row in rows.items() if row["figures"]}
        skipped = {name: row["error"] for name, row in rows.items() if not row["figures"]}
        assert set(rows) == {"naive", *ENGINE, "chat_handler"}
        # only the llama.cpp pipelines may be missing, and then only for want of llama-cpp-python
        assert set(skipped) <= {"llamacpp", "chat_handler"}
        assert all("llama-cpp-python" in why for why in skipped.values())
        for name, figures in ran.items():
            assert figures["generated_tokens"] == n * TOKENS, name  # end-of-sequence ignored everywhere
            assert figures["rollouts"] == n
            assert 0 < figures["ttft_ms"] <= figures["e2e_ms"]
            assert figures["decode_tokens_per_s"] > 0 and figures["peak_rss_mb"] > 0
            assert figures["cold_start_ms"] > 0


def test_the_engine_computes_the_prompt_once_and_the_baselines_once_per_rollout(report: dict) -> None:
    for n in ROLLOUTS:
        ran = {name: row["figures"] for name, row in rows_by_pipeline(report, n).items() if row["figures"]}
        naive = ran["naive"]
        prompt = naive["prompt_tokens"] // n
        assert naive["prompt_tokens"] == n * prompt and naive["reused_tokens"] == 0
        assert naive["visual_tokens_computed"] == n * naive["visual_tokens"]
        for name in set(ENGINE) & set(ran):
            figures = ran[name]
            assert figures["visual_tokens"] == naive["visual_tokens"]
            assert figures["visual_tokens_computed"] == figures["visual_tokens"]
            assert figures["prompt_tokens"] == prompt, name
            assert figures["reused_tokens"] == (n - 1) * prompt, name
        if "chat_handler" in ran:  # its chat template may add a token or two around the same prompt
            assert ran["chat_handler"]["visual_tokens_computed"] == n * naive["visual_tokens"]
            assert ran["chat_handler"]["prompt_tokens"] >= naive["prompt_tokens"]


def test_every_figure_has_its_ratio_to_the_naive_pipeline(report: dict) -> None:
    # the figures the issue names, as time, memory and work
    assert {"ttft_ms", "e2e_ms", "prompt_tokens", "decode_tokens_per_s", "peak_rss_mb"} <= set(RATIO_KEYS)
    for n in ROLLOUTS:
        rows = rows_by_pipeline(report, n)
        naive = rows["naive"]["figures"]
        for row in rows.values():
            if row["figures"]:
                for key in RATIO_KEYS:
                    assert row["ratios"][key] == pytest.approx(row["figures"][key] / naive[key], abs=1e-3)
        assert rows["naive"]["ratios"]["e2e_ms"] == 1.0


def test_a_gpu_shape_without_a_gpu_is_skipped_with_a_message(tmp_path: Path) -> None:
    torch = pytest.importorskip("torch")
    if torch.cuda.is_available():
        pytest.skip("a CUDA GPU is here: the shape would run")
    done = bench("--shape", "2b", "--out", str(tmp_path))
    assert done.returncode == 0, done.stderr
    assert "no CUDA GPU, skipped" in done.stderr
    assert not list(tmp_path.iterdir())  # nothing built


def test_the_cli_offers_bench_without_importing_torch() -> None:
    assert heavy_imports("benchmarks") == []


def test_each_quantized_bundle_is_a_row_of_its_own(tmp_path: Path) -> None:
    done = bench(
        "--shape", "tiny", "--out", str(tmp_path), "--pipelines", "naive,onnx,llamacpp",
        "--onnx-quant", "fp32,int4", "--gguf-quant", "f32,q8_0", "--resolutions", "64", "--rollouts", "2",
        "--max-new-tokens", str(TOKENS), "--repeats", "1",
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    rows = json.loads((tmp_path / "tiny/bench.json").read_text())["rows"]
    labels = {(row["pipeline"], row["bundle"]) for row in rows}
    expected = {("naive", ""), ("onnx", "fp32"), ("onnx", "int4")}
    if any(row["pipeline"] == "llamacpp" and row["figures"] for row in rows):
        expected |= {("llamacpp", "f32"), ("llamacpp", "q8_0")}
    assert expected <= labels
    naive = next(row["figures"] for row in rows if row["pipeline"] == "naive")
    for row in rows:
        if row["figures"]:  # the same work, in every bundle
            assert row["figures"]["generated_tokens"] == 2 * TOKENS
            assert row["figures"]["visual_tokens"] == naive["visual_tokens"]
    table = (tmp_path / "tiny/bench.md").read_text()
    assert "| onnx int4 |" in table and "| onnx fp32 |" in table
    assert bundle_quant(tmp_path / "tiny/onnx-int4") == "int4"  # how a bundle given by --onnx is labelled


def test_an_unknown_quantization_is_refused_before_anything_is_built(tmp_path: Path) -> None:
    done = bench("--shape", "tiny", "--out", str(tmp_path), "--onnx-quant", "int3")
    assert done.returncode != 0
    assert "--onnx-quant: unknown int3" in done.stderr
    assert not list(tmp_path.iterdir())
