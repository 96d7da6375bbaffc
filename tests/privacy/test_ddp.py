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


def run_worker(out: Path, *args: str, expect_failure: bool = False) -> str:
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    env.pop("EQL_RUN_ID", None)
    done = subprocess.run([sys.executable, str(WORKER), "--out", str(out), *args], capture_output=True, text=True,
                          timeout=600, env=env)
    assert (done.returncode != 0) == expect_failure, done.stdout[-3000:] + done.stderr[-5000:]
    return done.stdout + done.stderr


@pytest.fixture(scope="module")
def single(tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("single")
    run_worker(out, "--devices", "1")
    return torch.load(out / "rank0.pt")


@pytest.mark.parametrize("strategy", ["ddp"])  # ddp_spawn with DP: tests/test_strategies.py (every backbone)
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


def test_two_process_update_equals_the_single_process_update(tmp_path):
    """Sampling rate 1, no noise, no clipping: every step is the full-batch gradient step, whatever the number of
    processes. An expected batch size not divided by the world size (or a sum where a mean belongs) shows here."""
    run_worker(tmp_path / "one", "--devices", "1", "--full-batch")
    run_worker(tmp_path / "two", "--devices", "2", "--full-batch")
    single, rank0 = torch.load(tmp_path / "one" / "rank0.pt"), torch.load(tmp_path / "two" / "rank0.pt")
    assert single["sample_rate"] == rank0["sample_rate"] == 1.0 and single["steps"] == rank0["steps"] == 2
    for a, b in zip(single["params"], rank0["params"]):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_two_process_resume_reproduces_the_uninterrupted_run(tmp_path):
    """Resume a 2-process run from its checkpoint after 5 of 16 steps (mid-epoch): every rank's batches and the
    parameters are those of the uninterrupted run (each rank's sampling stream and the noise continue)."""
    run_worker(tmp_path / "full", "--devices", "2", "--checkpoint-every", "5")
    run_worker(tmp_path / "resumed", "--devices", "2", "--resume", str(tmp_path / "full" / "step=5.ckpt"))
    for rank in (0, 1):
        full = torch.load(tmp_path / "full" / f"rank{rank}.pt")
        resumed = torch.load(tmp_path / "resumed" / f"rank{rank}.pt")
        assert len(full["batches"]) == 16 and resumed["batches"] == full["batches"][5:]
        assert resumed["steps"] == full["steps"] == 16 and resumed["epsilon"] == full["epsilon"]
        for a, b in zip(resumed["params"], full["params"]):
            assert torch.equal(a, b)


def test_lightnings_distributed_sampler_is_refused(tmp_path):
    """With use_distributed_sampler=True Lightning would replace the Poisson loader (each rank a full batch, epsilon
    under-reported): refused with the fix."""
    output = run_worker(tmp_path, "--devices", "2", "--distributed-sampler", expect_failure=True)
    assert "Trainer(use_distributed_sampler=False)" in output
