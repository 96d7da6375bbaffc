"""A real study on two local workers: kill -9 of a worker, then of the whole study, then the same command again:
every run complete exactly once, killed runs resumed from their last.ckpt, a failing run recorded with its error."""

from __future__ import annotations

import os
import signal
import subprocess

import pytest

from eqlightning.studies.spec import load_spec
from eqlightning.studies.store import StudyStore

from study_helpers import EQL, assert_complete_once, env_with_data, mid_run, tiny_study, wait_for  # tests/studies/ is on sys.path


@pytest.mark.slow
def test_a_study_survives_kill_9_of_a_worker_and_of_everything(tmp_path, medmnist_root):
    config = tiny_study(tmp_path)
    env, root = env_with_data(medmnist_root), str(tmp_path / "studies")
    command = [EQL, "study", "run", str(config), "--root", root, "--poll", "0.5"]
    driver = subprocess.Popen(command, env=env, cwd=tmp_path, start_new_session=True,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    store = StudyStore(load_spec(config, root=root))
    try:
        victim = wait_for(lambda: mid_run(store), 180, "a run with a saved epoch")
        os.kill(int(victim["worker"].split(":")[1]), signal.SIGKILL)  # one worker dies mid-run
        wait_for(lambda: store.attempts().get(victim["key"], 0) >= 2, 120, "the killed worker's run to be retaken")
        second = wait_for(lambda: mid_run(store, exclude={victim["key"]}), 180, "another run mid-way")
        os.killpg(driver.pid, signal.SIGKILL)  # the whole study: driver, workers, runs
        driver.wait(30)
    finally:
        if driver.poll() is None:
            os.killpg(driver.pid, signal.SIGKILL)
    assert store.counts()["complete"] < 4

    rerun = subprocess.run(command, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert rerun.returncode == 1, rerun.stdout + rerun.stderr  # one run fails by itself
    assert "4/5 runs complete, 1 failed" in rerun.stderr

    assert_complete_once(store, resumed={victim["key"], second["key"]})

    again = subprocess.run(command, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert "0 new" in again.stderr and "4/5 runs complete" in again.stderr  # idempotent: nothing runs
    status = subprocess.run([EQL, "study", "status", str(config), "--root", root], env=env, capture_output=True,
                            text=True, timeout=120)
    assert status.returncode == 0 and "FAILED" in status.stdout and "no_such_net" in status.stdout


def test_no_wait_returns_at_once_and_detached_workers_finish_the_study(tmp_path, medmnist_root):
    config = tiny_study(tmp_path, variants={"broken": {"overrides": {"backbone": "no_such_net"}, "grid": {},
                                                       "seeds": [0]}}, workers=1)
    env, root = env_with_data(medmnist_root), str(tmp_path / "studies")
    started = subprocess.run([EQL, "study", "run", str(config), "--root", root, "--no-wait"], env=env, cwd=tmp_path,
                             capture_output=True, text=True, timeout=120)
    assert started.returncode == 0 and "1 local worker (pid" in started.stderr, started.stderr
    store = StudyStore(load_spec(config, root=root))
    wait_for(lambda: store.counts()["failed"] == 1, 120, "the detached worker to run (and fail) the study's run")
    assert "no_such_net" in store.rows()[0]["error"]
