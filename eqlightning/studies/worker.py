"""A study worker: takes runs from the store until none is left, each as ``eqlightning fit`` (+ test) in its own
process and run directory ``<study>/runs/<variant>/<key>/``, beating the store's heartbeat meanwhile.

- exit 0 of the run: its summary.json goes into the store (the trial completes);
- exit 143 / a signal (SIGTERM from ``scancel``, preemption, the worker being stopped): the trial is re-enqueued and
  the next worker resumes the run from its ``last.ckpt`` (``--ckpt_path``);
- any other exit: the trial fails with the run's last error line, retried only on ``study run --retry-failed``;
- a finished run directory (a complete summary.json with test metrics) is recorded without running it again.

A worker that finds the queue empty but runs still RUNNING elsewhere waits: if their worker dies, it takes them
over once their heartbeat is ``grace`` seconds old. Many workers (processes here or SLURM tasks on other nodes)
share one store this way. Runs are child processes that die with their worker (``PR_SET_PDEATHSIG``).
"""

from __future__ import annotations

import ctypes
import fcntl
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

from ..runs import RunSummary
from ..runs.checkpoint import LAST
from ..runs.directory import CHECKPOINTS
from .spec import StudySpec, load_spec
from .store import Claim, StudyStore, summarize_run

EXIT_INTERRUPTED = 143
_ERROR_MARKERS = ("eqlightning: error:", "Error:", "Error ", "error:")


def work(config: str | Path, root: str | Path | None = None, worker: str | None = None, poll: float = 2.0,
         max_runs: int | None = None) -> int:
    """Take and run study runs until none is waiting or running; returns the number of runs this worker ran."""
    spec = load_spec(config, root)
    store = StudyStore(spec)
    store.sync_plan()
    worker = worker or f"{socket.gethostname()}:{os.getpid()}"
    stop = _StopFlag()
    done = 0
    while not stop.is_set() and (max_runs is None or done < max_runs):
        claim = store.take(worker)
        if claim is None:
            counts = store.counts()
            if counts["running"] == 0 and counts["waiting"] == 0:
                break
            stop.wait(poll)  # others are running: take their runs over if their workers die
            continue
        run_claim(spec, store, claim, stop)
        done += 1
    stop.restore()
    return done


def run_dir_of(spec: StudySpec, claim: Claim) -> Path:
    return spec.runs_root / claim.variant / claim.key


def run_claim(spec: StudySpec, store: StudyStore, claim: Claim, stop: "_StopFlag") -> str:
    """Run (or resume, or just record) one claimed run; returns ``complete``, ``failed`` or ``interrupted``."""
    run_dir = run_dir_of(spec, claim)
    run_dir.mkdir(parents=True, exist_ok=True)
    beating = threading.Event()
    beat = threading.Thread(target=_beat, args=(store, claim, beating, spec.heartbeat["interval"]), daemon=True)
    beat.start()  # from the start: waiting for the lock below is not being dead
    try:
        with open(run_dir / ".study.lock", "a") as lock:
            # A worker declared dead by mistake (a heartbeat starved for `grace` seconds) still holds this lock:
            # wait for its run to end instead of training the same run directory twice; then record its result.
            fcntl.flock(lock, fcntl.LOCK_EX)
            return _run_locked(spec, store, claim, stop, run_dir)
    finally:
        beating.set()
        beat.join()


def _run_locked(spec: StudySpec, store: StudyStore, claim: Claim, stop: "_StopFlag", run_dir: Path) -> str:
    metric = spec.search.metric if spec.search else "val/auc"
    objectives = [o.metric for o in spec.search.objectives] if spec.search else None
    finished = _finished_summary(run_dir)
    if finished:  # done before (e.g. its worker died after the run but before telling the store)
        store.complete(claim, summarize_run(finished, metric, objectives))
        return "complete"
    config_file = spec.directory / "configs" / claim.variant / f"{claim.key}.yaml"
    config_file.parent.mkdir(parents=True, exist_ok=True)
    _write_config(config_file, claim.run.config)
    cmd = [sys.executable, "-m", "eqlightning.cli", "fit", "--config", str(config_file),
           "--run_root", str(spec.runs_root), "--run_name", claim.variant,
           "--trainer.enable_progress_bar", "false"]
    last = run_dir / CHECKPOINTS / LAST
    if last.is_file():
        cmd += ["--ckpt_path", str(last)]
    log = spec.directory / "logs" / claim.variant / f"{claim.key}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "EQL_RUN_ID": claim.key}
    env.pop("EQL_DEBUG", None)
    with open(log, "a") as out:
        out.write(f"\n=== {time.strftime('%Y-%m-%d %H:%M:%S')} trial {claim.trial.number} on "
                  f"{socket.gethostname()}:{os.getpid()}: {' '.join(cmd)}\n")
        out.flush()
        process = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, preexec_fn=die_with_parent)
        stop.child = process
        try:
            code = process.wait()
        finally:
            stop.child = None
    if code == 0 and (summary := _finished_summary(run_dir)):
        store.complete(claim, summarize_run(summary, metric, objectives))
        return "complete"
    if code in (EXIT_INTERRUPTED, -signal.SIGTERM, -signal.SIGKILL, -signal.SIGINT) or stop.is_set():
        store.interrupt(claim, f"exit {code}")
        return "interrupted"
    store.fail(claim, f"exit {code}: {_last_error(log)} (log: {log})")
    return "failed"


def _finished_summary(run_dir: Path) -> dict:
    try:
        summary = RunSummary.read(run_dir)
    except ValueError:
        return {}
    history = summary.get("history") or []
    tested = any(h.get("command") == "test" and h.get("status") == "completed" for h in history)
    has_test = "test/acc" in ((summary.get("metrics") or {}).get("test") or {})
    return summary if tested and has_test else {}


def _write_config(path: Path, config: dict) -> None:
    import yaml

    tmp = path.with_suffix(".tmp")
    tmp.write_text(f"# written by `eqlightning study` (the run's input config; its resolved one is the run's "
                   f"config.yaml)\n{yaml.safe_dump(config, sort_keys=False)}")
    os.replace(tmp, path)


def _beat(store: StudyStore, claim: Claim, stop: threading.Event, interval: float) -> None:
    while not stop.wait(interval):
        try:
            store.beat(claim.study, claim.trial.number)
        except Exception as error:  # a busy store: the next beat will do (grace is several intervals)
            print(f"eqlightning study: heartbeat failed ({error})", file=sys.stderr)


def _last_error(log: Path) -> str:
    lines = [line.strip() for line in log.read_text(errors="replace").splitlines() if line.strip()]
    for line in reversed(lines):
        if any(marker in line for marker in _ERROR_MARKERS):
            return line[:500]
    return lines[-1][:500] if lines else "no output"


def die_with_parent() -> None:  # pragma: no cover (runs in the child)
    """Linux: the run gets SIGTERM (saves last.ckpt and stops) when its worker dies, even by kill -9."""
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except OSError:
        pass


class _StopFlag(threading.Event):
    """Set by SIGTERM/SIGINT: the running child is told to stop (it saves last.ckpt) and the worker takes no more."""

    def __init__(self):
        super().__init__()
        self.child: subprocess.Popen | None = None
        self._previous = {}
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                self._previous[sig] = signal.signal(sig, self._handle)

    stopped_by_signal = 0  # how many workers of this process were stopped by a signal

    def _handle(self, signum, frame) -> None:
        if not self.is_set():
            _StopFlag.stopped_by_signal += 1
        self.set()
        child = self.child
        if child is not None and child.poll() is None:
            child.send_signal(signal.SIGTERM)

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def slurm_task(config: str, root: str | None, cwd: str) -> int:
    """One task of a SLURM job array (submitted by ``study run --launcher slurm`` through submitit): a worker that
    starts where the study was launched from (relative data and config paths keep their meaning)."""
    os.chdir(cwd)
    return work(config, root, worker=f"{socket.gethostname()}:{os.getpid()}:slurm{os.environ.get('SLURM_ARRAY_JOB_ID', '')}"
                f"_{os.environ.get('SLURM_ARRAY_TASK_ID', '')}")


def main(argv: list[str] | None = None) -> int:
    """``python -m eqlightning.studies.worker CONFIG [--root DIR]``: what ``study run`` starts per worker."""
    import argparse

    parser = argparse.ArgumentParser(prog="eqlightning study work")
    parser.add_argument("config")
    parser.add_argument("--root", default=None)
    parser.add_argument("--poll", type=float, default=2.0)
    args = parser.parse_args(argv)
    stopped = _StopFlag.stopped_by_signal
    work(args.config, args.root, poll=args.poll)
    return EXIT_INTERRUPTED if _StopFlag.stopped_by_signal > stopped else 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
