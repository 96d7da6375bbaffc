"""ddp and ddp_spawn (2 CPU processes, gloo) for every registered backbone, with and without DP-SGD.

The replicas must stay identical (DDP all-reduces the gradients; under DP the distributed DP optimizer all-reduces
the clipped sums and rank 0's noise) and must have trained.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from small_backbones import ALL, DDP_3D

WORKER = Path(__file__).with_name("strategy_worker.py")
pytestmark = pytest.mark.ddp


@pytest.mark.parametrize("private", [False, True], ids=["nonprivate", "dp"])
@pytest.mark.parametrize("strategy", ["ddp", "ddp_spawn"])
def test_every_backbone_trains_identically_on_two_processes(tmp_path, strategy, private):
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    env.pop("EQL_RUN_ID", None)
    done = subprocess.run([sys.executable, str(WORKER), "--out", str(tmp_path), "--strategy", strategy]
                          + (["--private"] if private else []), capture_output=True, text=True, timeout=600, env=env)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-5000:]
    initial = torch.load(tmp_path / "initial.pt")
    rank0, rank1 = torch.load(tmp_path / "rank0.pt"), torch.load(tmp_path / "rank1.pt")
    assert rank0["world_size"] == rank1["world_size"] == 2 and rank0["pid"] != rank1["pid"]
    assert rank0["steps"] == rank1["steps"] > 0
    if private:
        assert rank0["epsilon"] == rank1["epsilon"] > 0 and rank0["dp_steps"] == rank1["dp_steps"] > 0
    for prefix, name in [*(("backbones", n) for n in ALL), *(("volume_backbones", n) for n in DDP_3D)]:
        keys = [k for k in initial if k.startswith(f"{prefix}.{name}.")]
        assert keys, name
        for k in keys:
            assert torch.equal(rank0["params"][k], rank1["params"][k]), f"{name}: {k} differs between ranks"
        moved = max((rank0["params"][k] - initial[k]).abs().max().item() for k in keys)
        assert moved > 1e-5, f"{name} did not train"
