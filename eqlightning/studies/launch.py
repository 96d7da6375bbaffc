"""``eqlightning study run``: plan, start workers (processes here, or a SLURM job array through submitit), and follow
the store with a progress line (done / running / failed / left, ETA) until the study is finished.

Everything is in the store, so the driver holds no state: kill it (or everything) and run the same command again;
finished runs are kept, runs whose worker died are taken over after the heartbeat grace period and resume from
their ``last.ckpt``.
"""

from __future__ import annotations

import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, TextIO

from .spec import StudySpec, load_spec
from .store import StudyStore
from .worker import EXIT_INTERRUPTED, die_with_parent


def run_study(config: str | Path, root: str | Path | None = None, workers: int | None = None,
              launcher: str | None = None, retry_failed: bool = False, wait: bool = True, poll: float = 5.0,
              out: TextIO | None = None) -> int:
    """Run a study to its end; returns 0 when every run completed, 1 when some failed, 143 when stopped."""
    out = out or sys.stderr
    spec = load_spec(config, root)
    store = StudyStore(spec)
    added = store.sync_plan(retry_failed)
    workers = int(workers or spec.workers)
    launcher = launcher or spec.launcher
    if workers < 1:
        raise ValueError(f"--workers {workers}: give at least 1")
    counts = store.counts()
    print(f"study {spec.name}: {counts['total']} runs ({added['added']} new, {added['retried']} retried, "
          f"{counts['complete']} complete, {counts['failed']} failed); store {spec.store_url}", file=out)
    if counts["waiting"] + counts["running"] == 0:
        print(_final_line(spec, counts), file=out)
        return 0 if counts["failed"] == 0 else 1
    if launcher == "slurm":
        pool: _Pool = _SlurmPool(spec, workers, out)
    else:
        pool = _LocalPool(spec, workers, detach=not wait)
    if not wait:
        print(f"study {spec.name}: {pool.describe()}; follow it with `eqlightning study status {spec.path}`",
              file=out)
        return 0
    return follow(spec, store, pool, poll, out)


def follow(spec: StudySpec, store: StudyStore, pool: "_Pool", poll: float, out: TextIO) -> int:
    stopped: list[int] = []

    def on_signal(signum, frame):
        stopped.append(signum)
        pool.stop()

    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGTERM, signal.SIGINT)}
    progress = Progress(out, pool.size)
    try:
        while True:
            store.fail_stale()
            counts = store.counts()
            progress.show(counts, store.rows())
            if counts["waiting"] + counts["running"] == 0 or stopped:
                break
            if not pool.alive():
                progress.end()
                print(f"study {spec.name}: every worker has ended with {counts['waiting'] + counts['running']} runs "
                      f"left (see {spec.directory / 'logs'}); run the same command again to go on", file=out)
                return 1
            time.sleep(poll)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    progress.end()
    pool.join()
    counts = store.counts()
    if stopped:
        print(f"study {spec.name}: stopped; run the same command again to go on", file=out)
        return EXIT_INTERRUPTED
    print(_final_line(spec, counts), file=out)
    return 0 if counts["failed"] == 0 else 1


def _final_line(spec: StudySpec, counts: dict[str, int]) -> str:
    line = f"study {spec.name}: {counts['complete']}/{counts['total']} runs complete"
    if counts["failed"]:
        line += f", {counts['failed']} failed (errors: `eqlightning study status {spec.path}`; rerun them with " \
                f"--retry-failed)"
    return line + f"; `eqlightning study report {spec.path}` writes fits, plots and tables"


class Progress:
    """One line: done / running / failed / left and an ETA from the mean duration of the completed runs."""

    def __init__(self, out: TextIO, workers: int):
        self.out, self.workers, self.last, self.tty = out, workers, "", hasattr(out, "isatty") and out.isatty()
        self.shown_at = 0.0

    def show(self, counts: dict[str, int], rows: list[dict[str, Any]]) -> None:
        line = progress_line(counts, rows, self.workers)
        now = time.monotonic()
        if line == self.last and now - self.shown_at < 60:
            return
        self.last, self.shown_at = line, now
        if self.tty:
            self.out.write("\r\033[K" + line)
        else:
            self.out.write(line + "\n")
        self.out.flush()

    def end(self) -> None:
        if self.tty and self.last:
            self.out.write("\n")
            self.out.flush()
            self.last = ""


def progress_line(counts: dict[str, int], rows: list[dict[str, Any]], workers: int) -> str:
    left = counts["waiting"]
    line = (f"{counts['complete']}/{counts['total']} done, {counts['running']} running, {counts['failed']} failed, "
            f"{left} left")
    durations = [r["duration_s"] for r in rows if r.get("duration_s")]
    if durations and left + counts["running"]:
        mean = sum(durations) / len(durations)
        eta = math.ceil((left + counts["running"] / 2) / max(1, workers)) * mean
        line += f", ETA {_duration(eta)} ({_duration(mean)}/run)"
    return line


def _duration(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


# -- workers --------------------------------------------------------------------------------------------------------
class _Pool:
    size = 0

    def alive(self) -> bool: ...
    def stop(self) -> None: ...
    def join(self) -> None: ...
    def describe(self) -> str: ...


class _LocalPool(_Pool):
    """Worker processes on this machine. They die with the driver (a ``kill -9`` of it stops its runs too, which
    save last.ckpt and are retaken by the next ``study run``), unless ``detach`` (``--no-wait``): then they run on in
    their own session until the study is done."""

    def __init__(self, spec: StudySpec, size: int, detach: bool = False):
        self.size = size
        logs = spec.directory / "logs"
        logs.mkdir(parents=True, exist_ok=True)
        self.processes = []
        env = dict(os.environ)
        if size > 1 and "OMP_NUM_THREADS" not in env:  # share the cores instead of oversubscribing them
            env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // size))
        for index in range(size):
            log = open(logs / f"worker-{index}.log", "a")
            cmd = [sys.executable, "-m", "eqlightning.studies.worker", str(spec.path),
                   "--root", str(spec.directory.parent)]
            self.processes.append(subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env,
                                                   start_new_session=detach,
                                                   preexec_fn=None if detach else die_with_parent))
            log.close()

    def alive(self) -> bool:
        return any(p.poll() is None for p in self.processes)

    def stop(self) -> None:
        for process in self.processes:
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)

    def join(self) -> None:
        for process in self.processes:
            process.wait()

    def describe(self) -> str:
        return f"{self.size} local worker{'s' if self.size != 1 else ''} (pids {', '.join(str(p.pid) for p in self.processes)})"


class _SlurmPool(_Pool):
    """A SLURM job array of workers, submitted with submitit; its parameters come from the study's ``slurm:``
    mapping (submitit's names: ``slurm_partition``, ``timeout_min``, ``cpus_per_task``, ``gpus_per_node``,
    ``mem_gb``, ``slurm_array_parallelism``, ...). The store must be on a filesystem the nodes share (or a server)."""

    def __init__(self, spec: StudySpec, size: int, out: TextIO):
        import submitit

        from .worker import slurm_task

        self.size = size
        folder = spec.directory / "slurm" / "%j"
        executor = submitit.AutoExecutor(folder=folder, cluster="slurm")
        params = {"timeout_min": 24 * 60, "slurm_job_name": f"study-{spec.name}", **spec.slurm}
        params.setdefault("slurm_array_parallelism", size)
        executor.update_parameters(**params)
        root, cwd = str(spec.directory.parent), os.getcwd()
        self.jobs = executor.map_array(slurm_task, [str(spec.path)] * size, [root] * size, [cwd] * size)
        print(f"study {spec.name}: submitted SLURM job array {self.jobs[0].job_id.split('_')[0]} with {size} "
              f"workers (logs in {spec.directory / 'slurm'})", file=out)

    def alive(self) -> bool:
        """Whether a task of the array is pending or running (squeue: works without SLURM accounting)."""
        array = self.jobs[0].job_id.split("_")[0]
        try:
            listed = subprocess.run(["squeue", "-h", "-j", array, "-o", "%i"], capture_output=True, text=True,
                                    timeout=60)
        except (OSError, subprocess.TimeoutExpired):
            return not all(_done(job) for job in self.jobs)
        if listed.returncode != 0:  # an array squeue no longer knows has ended (or the controller is busy)
            return "Invalid job id" not in listed.stderr
        return bool(listed.stdout.strip())

    def stop(self) -> None:
        pass  # the cluster's jobs go on without the driver; `scancel` them to stop

    def join(self) -> None:
        pass

    def describe(self) -> str:
        return f"SLURM job array {self.jobs[0].job_id.split('_')[0]} ({self.size} tasks)"


def _done(job) -> bool:
    try:
        return job.done()
    except Exception:  # no accounting or a transient squeue error: say "alive" and look again later
        return False
