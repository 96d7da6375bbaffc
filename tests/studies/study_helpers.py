"""Helpers of the study tests: a tiny study (4 short runs and one that fails), waiting on the store."""

from __future__ import annotations

import csv
import os
import sys
import time
from pathlib import Path

import yaml

from eqlightning.studies.store import StudyStore

REPO = Path(__file__).resolve().parents[2]
EQL = str(Path(sys.executable).parent / "eqlightning")
TINY = {"epochs": 6, "trainer.limit_train_batches": 6, "trainer.limit_val_batches": 1, "data.eval_batch_size": 200,
        "trainer.enable_model_summary": False, "width": 0.25}


def tiny_study(tmp_path: Path, **extra) -> Path:
    body = {"name": "tiny", "base": str(REPO / "configs/quickstart.yaml"), "overrides": TINY,
            "grid": {"group": ["D4", "C4"]}, "seeds": [0, 1],
            "variants": {"eq": {}, "broken": {"overrides": {"backbone": "no_such_net"}, "grid": {}, "seeds": [0]}},
            "heartbeat": {"interval": 1, "grace": 3, "max_retry": 3}, "workers": 2, **extra}
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(body, sort_keys=False))
    return path


def env_with_data(medmnist_root: Path) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("EQL_RUN_ID", "EQL_DEBUG")}
    env["EQL_DATA_ROOT"] = str(medmnist_root)
    return env


def wait_for(condition, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = condition()
        if found:
            return found
        time.sleep(0.2)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


def mid_run(store: StudyStore, exclude=()):
    """A running run not in ``exclude`` with a saved epoch (last.ckpt) and at least half its epochs still to go (so
    that a kill now lands before it ends)."""
    for row in store.rows():
        run = store.spec.runs_root / row["variant"] / row["key"]
        if row["state"] != "running" or row["key"] in exclude or not (run / "checkpoints" / "last.ckpt").is_file():
            continue
        try:
            with open(run / "metrics.csv", newline="") as file:
                epochs = [int(r["epoch"]) for r in csv.DictReader(file) if r.get("epoch")]
        except (OSError, ValueError, KeyError):
            continue
        if epochs and max(epochs) < TINY["epochs"] // 2:
            return row
    return None


def assert_complete_once(store: StudyStore, resumed: set[str]) -> dict:
    """Every `eq` run complete, its summary.json there; the ``resumed`` keys restarted from their last.ckpt, every
    other run started once; the `broken` run failed with its error, tried once. Returns the rows by key."""
    rows = {r["key"]: r for r in store.rows()}
    good = [r for r in rows.values() if r["variant"] == "eq"]
    planned = [run for run in store.spec.plan() if run.variant == "eq"]
    assert len(good) == len(planned) and all(r["state"] == "complete" for r in good), [(r["key"], r["state"]) for r in good]
    broken = next(r for r in rows.values() if r["variant"] == "broken")
    assert broken["state"] == "failed" and "no_such_net" in broken["error"]
    assert store.attempts()[broken["key"]] == 1  # a failure is not retried without --retry-failed
    for row in good:
        assert row["metrics"]["test/acc"] > 0 and row["parameters"] > 0 and row["train_flops"] > 0
        assert (store.spec.runs_root / "eq" / row["key"] / "summary.json").is_file()
        log = (store.spec.directory / "logs" / "eq" / f"{row['key']}.log").read_text()
        starts = [line for line in log.splitlines() if line.startswith("=== ")]
        if row["key"] in resumed:  # resumed from last.ckpt, in the same run directory
            assert len(starts) >= 2 and all("--ckpt_path" in start for start in starts[1:]), log[-3000:]
        else:
            assert len(starts) == 1, f"run {row['key']} started {len(starts)} times"  # nothing run twice
    return rows
