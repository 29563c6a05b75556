"""The training tests run torch on one thread: on a 2-core machine shared with another job, two contending
threads ran about 20 times slower."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from engine.spec import load_spec
from train.demo import DemoData, open_checkpoint

DEMO_SPEC = Path(__file__).resolve().parents[2] / "specs" / "demo" / "sparc-wbf8.yaml"


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def demo_data(tiny_qwen3vl: Path) -> DemoData:
    family, torch_family = open_checkpoint(tiny_qwen3vl)
    return DemoData(family, torch_family, load_spec(DEMO_SPEC), seed=5, steps=100)
