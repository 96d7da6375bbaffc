"""The `slurm_cluster` fixture gives a working one-node SLURM (tests/slurm_cluster.py), for sbatch and for submitit.

Without accounting submitit cannot learn a job's state (`sacct` fails, the state stays UNKNOWN): these tests never
block on `job.result()`/`job.wait()`; they poll for files the jobs write, and call `result()` only once `done()` is
true (the result pickle exists, which it does for a job that returned or raised, never for a cancelled one).
"""

from __future__ import annotations

import os
import stat
import subprocess
import time
from pathlib import Path

import pytest

import slurm_cluster as local_slurm

WAIT_S = 60  # generous: a task starts within ~2 s here


def _executor(folder: Path):
    submitit = pytest.importorskip("submitit")
    executor = submitit.AutoExecutor(folder=folder, cluster="slurm")
    # setup: the job's Python (sys.executable, cwd = here) must import `slurm_cluster` to unpickle write_result
    executor.update_parameters(timeout_min=5, slurm_partition="debug", cpus_per_task=1,
                               slurm_setup=local_slurm.job_setup_lines())
    return executor


def _wait_done(job, timeout: float = WAIT_S) -> None:
    deadline = time.monotonic() + timeout
    while not job.done():
        if time.monotonic() > deadline:
            pytest.fail(f"submitit job {job.job_id} not done after {timeout} s; stderr:\n{job.stderr()}")
        time.sleep(0.2)


@pytest.mark.slurm
def test_cluster_is_up(slurm_cluster):
    assert os.environ["SLURM_CONF"] == str(slurm_cluster.conf_path) == slurm_cluster.env["SLURM_CONF"]
    assert slurm_cluster.run("sinfo", "-h", "-o", "%P %t").stdout.split() == ["debug*", "idle"]


@pytest.mark.slurm
def test_sbatch_array(slurm_cluster, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    submitted = subprocess.run(
        ["sbatch", "--parsable", "--array=0-3", f"--output={tmp_path}/slurm-%A_%a.out",
         "--wrap", f"echo $SLURM_ARRAY_TASK_ID > {out}/.$SLURM_ARRAY_TASK_ID && mv {out}/.$SLURM_ARRAY_TASK_ID "
                   f"{out}/task_$SLURM_ARRAY_TASK_ID.txt"],
        env={**os.environ, **slurm_cluster.env}, capture_output=True, text=True, check=True)
    assert submitted.stdout.strip().isdigit()
    expected = [out / f"task_{i}.txt" for i in range(4)]
    missing = local_slurm.wait_for_files(expected, WAIT_S)
    assert not missing, f"array tasks did not write {missing}; queue: {slurm_cluster.squeue()}\n{slurm_cluster.logs()}"
    assert [p.read_text().strip() for p in expected] == ["0", "1", "2", "3"]
    slurm_cluster.wait_for_empty_queue(WAIT_S)


@pytest.mark.slurm
def test_submitit_map_array(slurm_cluster, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    jobs = _executor(tmp_path / "submitit").map_array(local_slurm.write_result, [1, 2, 3], [str(out)] * 3)
    assert [job.job_id.split("_")[1] for job in jobs] == ["0", "1", "2"]
    missing = local_slurm.wait_for_files([out / f"{x}.txt" for x in (1, 2, 3)], WAIT_S)
    assert not missing, f"no result files {missing}; stderr of the first task:\n{jobs[0].stderr()}"
    for job in jobs:  # the result files are written before the result pickles: wait for those too
        _wait_done(job)
    assert [job.result() for job in jobs] == [1, 4, 9]
    slurm_cluster.wait_for_empty_queue(WAIT_S)


@pytest.mark.slurm
def test_submitit_failed_job_raises(slurm_cluster, tmp_path):
    submitit = pytest.importorskip("submitit")
    job = _executor(tmp_path / "submitit").submit(local_slurm.write_result, -1, str(tmp_path))
    _wait_done(job)  # a job that raised writes its result pickle too: done() turns true, result() raises
    with pytest.raises(submitit.core.utils.FailedJobError, match="negative input -1"):
        job.result()
    slurm_cluster.wait_for_empty_queue(WAIT_S)


@pytest.mark.slurm
def test_scancel_one_array_task(slurm_cluster, tmp_path):
    """scancel of one running task: submitit ignores SIGTERM, so SLURM SIGKILLs it after KillWait (5 s); the other
    tasks run on; the cancelled task never writes a result pickle, so its `done()` stays false (its `result()`
    would block for ever without accounting)."""
    out = tmp_path / "out"
    out.mkdir()
    jobs = _executor(tmp_path / "submitit").map_array(local_slurm.write_result, [1, 2], [str(out)] * 2, [300, 2])
    started = local_slurm.wait_for_files([out / ".1.started"], WAIT_S)
    assert not started, f"task 0 did not start; queue: {slurm_cluster.squeue()}"
    time.sleep(1)  # past submitit's start-up: its SIGTERM handler is installed
    t0 = time.monotonic()
    subprocess.run(["scancel", jobs[0].job_id], env={**os.environ, **slurm_cluster.env}, check=True)
    while any(line.split()[0] == jobs[0].job_id for line in slurm_cluster.squeue()):
        assert time.monotonic() - t0 < local_slurm.KILL_WAIT_S + 20, "the cancelled task is still in the queue"
        time.sleep(0.1)
    assert not local_slurm.wait_for_files([out / "2.txt"], WAIT_S)
    _wait_done(jobs[1])
    assert jobs[1].result() == 4
    assert not (out / "1.txt").exists()
    assert not jobs[0].done()  # and never will be: no result pickle, no sacct
    slurm_cluster.wait_for_empty_queue(WAIT_S)


# -------------------------------------------------------------------- ensure_slurm_installed, with a fake PATH


@pytest.fixture
def no_slurm(tmp_path, monkeypatch):
    """A PATH with no SLURM (and nothing else) on it; returns its bin directory."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    monkeypatch.setenv("PATH", str(bin_dir))
    monkeypatch.setattr(local_slurm, "_EXTRA_SBIN", ())
    return bin_dir


def test_ensure_slurm_installed_not_root(no_slurm, monkeypatch):
    monkeypatch.setattr(local_slurm.os, "geteuid", lambda: 1000)
    reason = local_slurm.ensure_slurm_installed()
    assert "not installed" in reason and "slurmctld" in reason and "not root" in reason


def test_ensure_slurm_installed_no_apt_get(no_slurm, monkeypatch):
    monkeypatch.setattr(local_slurm.os, "geteuid", lambda: 0)
    assert "no apt-get" in local_slurm.ensure_slurm_installed()


def _fake_apt_get(bin_dir: Path, body: str) -> Path:
    log = bin_dir.parent / "apt.log"
    script = bin_dir / "apt-get"
    script.write_text(f"#!/bin/sh\nPATH=/usr/bin:/bin\necho \"$DEBIAN_FRONTEND $*\" >> {log}\n{body}\n")
    script.chmod(script.stat().st_mode | stat.S_IEXEC)
    return log


def test_ensure_slurm_installed_updates_lists_once(no_slurm, monkeypatch):
    monkeypatch.setattr(local_slurm.os, "geteuid", lambda: 0)
    fake_bins = " ".join(local_slurm.REQUIRED_BINARIES)
    log = _fake_apt_get(no_slurm, f"""
case "$*" in
  *update*) touch {no_slurm}/../updated ;;
  *install*) [ -e {no_slurm}/../updated ] || {{ echo "E: Unable to locate package slurm-wlm"; exit 100; }}
             for b in {fake_bins}; do printf '#!/bin/sh\\n' > {no_slurm}/$b; chmod +x {no_slurm}/$b; done ;;
esac""")
    assert local_slurm.ensure_slurm_installed() is None
    calls = [line.split() for line in log.read_text().splitlines()]
    assert [c[0] for c in calls] == ["noninteractive"] * 3
    assert [c[-3:] if "install" in c else c[-1:] for c in calls] == [
        ["install", "-y", "slurm-wlm"], ["update"], ["install", "-y", "slurm-wlm"]]


def test_ensure_slurm_installed_reports_failure(no_slurm, monkeypatch):
    monkeypatch.setattr(local_slurm.os, "geteuid", lambda: 0)
    log = _fake_apt_get(no_slurm, 'echo "E: Sub-process /usr/bin/dpkg returned an error code (1)"; exit 100')
    reason = local_slurm.ensure_slurm_installed()
    assert "failed (exit 100)" in reason and "dpkg returned an error code" in reason
    assert len(log.read_text().splitlines()) == 1  # no `apt-get update` for a failure that is not about lists
