"""Local batch runs on the tiny ONNX model: a refused row fails alone, a SIGKILL loses nothing and a rerun
writes every id once, Ctrl-C exits 130."""

import re
import signal
import subprocess

from engine.cli import main
from tests.support import (
    ROOT,
    dataset_command,
    read_results,
    wait_for_lines,
    write_dataset,
)

# budgets large enough that a run takes seconds, so a signal lands in the middle of it
SLOW = 48
# enough rows that the run is still going when the signal lands (a row takes tens of ms on the tiny model)
ROWS_TO_INTERRUPT = 120


def test_a_row_the_runtime_refuses_fails_alone(tmp_path, tiny_qwen3vl_onnx, capsys):
    dataset = write_dataset(tmp_path / "data", 4, overflow_ids=["r1"])
    out = tmp_path / "out.jsonl"
    args = dataset_command(tiny_qwen3vl_onnx, dataset, out)[1:]  # the same arguments, in this process
    assert main(args) == 1
    err = capsys.readouterr().err
    assert "row r1: the prompt needs" in err and "tokens; the model takes 4096" in err
    assert "3 answered, 0 already in" in err and "1 failed" in err
    assert sorted(read_results(out)) == ["r0", "r2", "r3"]  # the rows after the refused one ran too

    assert main(args) == 1  # the refused row is retried, and refused again
    assert "0 answered, 3 already in" in capsys.readouterr().err


def test_sigkill_mid_run_then_rerun_writes_every_id_once(tmp_path, tiny_qwen3vl_onnx):
    dataset = write_dataset(tmp_path / "data", 20)
    out = tmp_path / "out.jsonl"
    command = dataset_command(tiny_qwen3vl_onnx, dataset, out, perceive_tokens=SLOW)
    process = subprocess.Popen(command, cwd=ROOT, stderr=subprocess.DEVNULL)
    written = wait_for_lines(out, 3, process)
    process.send_signal(signal.SIGKILL)
    assert process.wait() == -signal.SIGKILL
    assert 3 <= written < 20  # killed in the middle

    rerun = subprocess.run(command, cwd=ROOT, capture_output=True, text=True)
    assert rerun.returncode == 0, rerun.stderr
    done, kept = map(int, re.search(r"(\d+) answered, (\d+) already in", rerun.stderr).groups())
    assert kept >= written and done + kept == 20  # nothing written before the kill was lost
    assert set(read_results(out)) == {f"r{i}" for i in range(20)}


def test_ctrl_c_exits_130_and_the_rerun_finishes(tmp_path, tiny_qwen3vl_onnx):
    dataset = write_dataset(tmp_path / "data", ROWS_TO_INTERRUPT)
    out = tmp_path / "out.jsonl"
    command = dataset_command(tiny_qwen3vl_onnx, dataset, out, perceive_tokens=SLOW)
    # as a terminal's Ctrl-C finds it: SIGINT at its default, whatever this test process inherited
    process = subprocess.Popen(
        command, cwd=ROOT, stderr=subprocess.PIPE, text=True, preexec_fn=_sigint_by_default
    )
    wait_for_lines(out, 1, process)
    process.send_signal(signal.SIGINT)
    _, err = process.communicate(timeout=60)
    assert process.returncode == 130, (len(read_results(out)), signal.getsignal(signal.SIGINT), err[-500:])
    assert err.strip().splitlines()[-1] == "interrupted"
    assert len(read_results(out)) < ROWS_TO_INTERRUPT

    assert main(command[1:]) == 0
    assert set(read_results(out)) == {f"r{i}" for i in range(ROWS_TO_INTERRUPT)}


def _sigint_by_default() -> None:
    signal.signal(signal.SIGINT, signal.SIG_DFL)
