"""The cluster path for real: a study submitted as a SLURM job array (submitit) to a one-node SLURM started by the
tests (tests/slurm_cluster.py). A task cancelled mid-run (`scancel`) has its run taken over by the other task and
resumed from last.ckpt; every run completes exactly once; the failing run is recorded with its error."""

from __future__ import annotations

import subprocess

import pytest

from eqlightning.studies.spec import load_spec
from eqlightning.studies.store import StudyStore

from study_helpers import EQL, assert_complete_once, env_with_data, mid_run, tiny_study, wait_for


@pytest.mark.slurm
@pytest.mark.slow
def test_a_study_on_a_slurm_job_array_survives_scancel_of_a_task(slurm_cluster, tmp_path, medmnist_root):
    config = tiny_study(tmp_path, seeds=[0], launcher="slurm", slurm={"slurm_partition": "debug", "timeout_min": 30,
                                                          "cpus_per_task": 1})
    env = {**env_with_data(medmnist_root), **slurm_cluster.env}
    root = str(tmp_path / "studies")
    driver = subprocess.Popen([EQL, "study", "run", str(config), "--root", root, "--poll", "0.5"], env=env,
                              cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    store = StudyStore(load_spec(config, root=root))
    try:
        victim = wait_for(lambda: mid_run(store), 240, "a run with a saved epoch on a SLURM task")
        task = victim["worker"].rsplit(":slurm", 1)[1]  # <array job id>_<task id>
        assert "_" in task, victim["worker"]
        cancelled = subprocess.run(["scancel", task], env=env, capture_output=True, text=True, timeout=60)
        assert cancelled.returncode == 0, cancelled.stderr
        out, _ = driver.communicate(timeout=600)
    finally:
        if driver.poll() is None:
            driver.kill()
            driver.communicate()
    assert driver.returncode == 1, out  # the broken run fails; everything else completes
    assert "submitted SLURM job array" in out and "2/3 runs complete, 1 failed" in out
    rows = assert_complete_once(store, resumed={victim["key"]})
    assert store.attempts()[victim["key"]] >= 2
    assert rows[victim["key"]]["worker"] != victim["worker"]  # finished by the other task
    slurm_cluster.wait_for_empty_queue(120)  # the workers end once nothing is left: no task lingers
