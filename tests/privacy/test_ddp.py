"""Private training under DDP (2 CPU processes, gloo): ranks stay identical; epsilon as with one process."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

WORKER = Path(__file__).with_name("ddp_worker.py")
pytestmark = pytest.mark.ddp


def run_worker(out: Path, *args: str) -> None:
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    env.pop("EQL_RUN_ID", None)
    done = subprocess.run([sys.executable, str(WORKER), "--out", str(out), *args], capture_output=True, text=True,
                          timeout=600, env=env)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-5000:]


@pytest.fixture(scope="module")
def single(tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("single")
    run_worker(out, "--devices", "1")
    return torch.load(out / "rank0.pt")


@pytest.mark.parametrize("strategy", ["ddp", "ddp_spawn"])
def test_two_process_private_training(tmp_path, single, strategy):
    run_worker(tmp_path, "--devices", "2", "--strategy", strategy)
    rank0, rank1 = torch.load(tmp_path / "rank0.pt"), torch.load(tmp_path / "rank1.pt")
    assert rank0["world_size"] == rank1["world_size"] == 2 and rank0["pid"] != rank1["pid"]
    for a, b in zip(rank0["params"], rank1["params"]):
        assert torch.equal(a, b)  # the distributed DP optimizer all-reduces the noised gradient
    assert rank0["steps"] == rank1["steps"] == single["steps"] == 16  # 256 / 32 per epoch, 2 epochs
    assert rank0["sample_rate"] == single["sample_rate"] == pytest.approx(32 / 256)
    assert rank0["noise"] == single["noise"]
    assert rank0["epsilon"] == pytest.approx(single["epsilon"], rel=1e-12) and rank0["epsilon"] <= 4.0
    moved = max((a - b).abs().max().item() for a, b in zip(rank0["params"], single["params"]))
    assert moved > 0  # different (Poisson) batches than the single process, same accounting
