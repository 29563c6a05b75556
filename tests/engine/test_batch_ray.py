"""`run --dataset --ray ADDRESS` on a local Ray: the same output as a local run, and a killed actor's rows
retried so that every id is written once."""

import os
import signal
import subprocess
from pathlib import Path

from engine.cli import main
from tests.support import (
    ROOT,
    dataset_command,
    heavy_imports,
    read_results,
    wait_for_lines,
    write_dataset,
)


def _actor_pids() -> list[int]:
    """Processes of this engine's Ray actors: Ray titles a worker process after its actor's class."""
    pids = []
    for entry in Path("/proc").iterdir():
        try:
            title = (entry / "cmdline").read_bytes()
        except OSError:  # not a process, or one that just ended
            continue
        if entry.name.isdigit() and b"RowActor" in title:
            pids.append(int(entry.name))
    return pids


def test_ray_run_equals_the_local_run_row_for_row(tmp_path, tiny_qwen3vl_onnx, ray_address, capsys):
    dataset = write_dataset(tmp_path / "data", 20, overflow_ids=["r1"])
    local, on_ray = tmp_path / "local.jsonl", tmp_path / "ray.jsonl"
    assert main(dataset_command(tiny_qwen3vl_onnx, dataset, local)[1:]) == 1  # r1 overflows the context
    capsys.readouterr()

    command = dataset_command(tiny_qwen3vl_onnx, dataset, on_ray, "--ray", ray_address, "--workers", "2")
    run = subprocess.run(command, cwd=ROOT, capture_output=True, text=True)
    assert run.returncode == 1, run.stderr
    assert "row r1: the prompt needs" in run.stderr and "19 answered, 0 already in" in run.stderr
    assert read_results(on_ray) == read_results(local) and len(read_results(local)) == 19

    again = subprocess.run(command, cwd=ROOT, capture_output=True, text=True)  # only r1 is tried again
    assert again.returncode == 1 and "0 answered, 19 already in" in again.stderr
    assert read_results(on_ray) == read_results(local)


def test_a_killed_actor_loses_no_row_and_repeats_none(tmp_path, tiny_qwen3vl_onnx, ray_address):
    dataset = write_dataset(tmp_path / "data", 20)
    out = tmp_path / "ray.jsonl"
    ray = ("--ray", ray_address, "--workers", "2")
    command = dataset_command(tiny_qwen3vl_onnx, dataset, out, *ray, perceive_tokens=48)
    earlier = set(_actor_pids())  # actors of an earlier run may still be on their way out
    driver = subprocess.Popen(command, cwd=ROOT, stderr=subprocess.PIPE, text=True)
    written = wait_for_lines(out, 2, driver)
    victims = [pid for pid in _actor_pids() if pid not in earlier]
    assert victims and written < 20, "the run ended before an actor could be killed"
    os.kill(victims[0], signal.SIGKILL)
    _, err = driver.communicate(timeout=300)
    assert driver.returncode == 0, err
    assert "20 answered, 0 already in" in err
    assert set(read_results(out)) == {f"r{i}" for i in range(20)}


def test_the_ray_runner_imports_neither_torch_nor_transformers():
    # Ray Data itself brings pandas: the [ray] extra's price, not the run path's
    assert set(heavy_imports("engine.batch_ray")) <= {"pandas"}
