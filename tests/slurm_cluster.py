"""A real one-node SLURM cluster for tests, started and stopped by the tests themselves.

See ../shared/notes/slurm-local.md for the configuration this follows and the pitfalls behind it. Use:

    reason = ensure_slurm_installed()      # None, or why SLURM cannot be had here
    with LocalSlurm() as cluster:          # daemons up, node idle, SLURM_CONF set in os.environ
        subprocess.run(["sbatch", ...], env={**os.environ, **cluster.env})
        cluster.wait_for_empty_queue(30)
    # jobs cancelled, daemons stopped, temporary directory deleted, SLURM_CONF restored

The session fixture `slurm_cluster` (conftest.py) wraps this. The cluster has no accounting (no `sacct`): submitit
then cannot learn the state of a job, so never block on `job.result()` / `job.wait()` of a job that may not finish
normally (cancelled, killed, timed out): poll for files the job writes, or call `result()` only once `job.done()`
is true (the result pickle exists; true for jobs that returned *or* raised). `write_result` below is a job
function for such tests; the job's Python must be able to import this module: see `job_setup_lines`.

The daemons listen on all interfaces and `auth/none` lets anyone who reaches them submit jobs (run as the user who
started them): tests only.
"""

from __future__ import annotations

import contextlib
import ctypes
import fcntl
import os
import pwd
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import warnings
from pathlib import Path

TESTS_DIR = Path(__file__).resolve().parent
REQUIRED_BINARIES = ("slurmctld", "slurmd", "sbatch", "sinfo", "squeue", "scancel")
DEFAULT_PORTS = (16817, 16818)  # (SlurmctldPort, SlurmdPort), as in the notes
DIR_PREFIX = "eql-slurm-"
KILL_WAIT_S = 5  # KillWait: submitit ignores SIGTERM, so a cancelled task is SIGKILLed this long after scancel
_EXTRA_SBIN = ("/usr/sbin", "/usr/local/sbin", "/sbin")  # slurmctld/slurmd live here; not always on a user's PATH
_LOCK_FILE = Path(tempfile.gettempdir()) / f"eql-slurm-start-{os.getuid()}.lock"  # serialises port choice + start

#: Seconds the last `apt-get install` in ensure_slurm_installed() took (None: nothing was installed).
last_install_seconds: float | None = None


def which(name: str) -> str | None:
    """`shutil.which`, also looking in the sbin directories (the daemons are in /usr/sbin)."""
    path = os.pathsep.join([os.environ.get("PATH", os.defpath), *_EXTRA_SBIN])
    return shutil.which(name, path=path)


def missing_binaries() -> list[str]:
    return [name for name in REQUIRED_BINARIES if which(name) is None]


def _tail(text: str, lines: int = 15) -> str:
    return "\n".join(text.strip().splitlines()[-lines:])


def ensure_slurm_installed() -> str | None:
    """None when SLURM's daemons and client commands are available (installing Debian's `slurm-wlm` with apt-get
    if they are not, when running as root); otherwise a human-readable reason why SLURM cannot be had."""
    global last_install_seconds
    missing = missing_binaries()
    if not missing:
        return None
    what = f"SLURM is not installed (missing: {', '.join(missing)})"
    if os.geteuid() != 0:
        return f"{what} and this is not root: install it with `apt-get install -y slurm-wlm`"
    apt_get = shutil.which("apt-get")
    if apt_get is None:
        return f"{what} and there is no apt-get to install slurm-wlm with"
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}

    def apt(*args: str) -> subprocess.CompletedProcess:
        try:
            return subprocess.run([apt_get, "-o", "DPkg::Lock::Timeout=300", *args], env=env, text=True,
                                  stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=1200,
                                  stdin=subprocess.DEVNULL)
        except subprocess.TimeoutExpired as e:
            out = e.stdout.decode(errors="replace") if isinstance(e.stdout, bytes) else (e.stdout or "")
            return subprocess.CompletedProcess(e.cmd, 124, out + f"\n(timed out after {e.timeout:.0f} s)")

    started = time.monotonic()
    install = apt("install", "-y", "slurm-wlm")
    stale_lists = ("Unable to locate package", "has no installation candidate", "Failed to fetch",
                   "404  Not Found", "404 Not Found")
    if install.returncode != 0 and any(s in install.stdout for s in stale_lists):
        update = apt("update")
        if update.returncode != 0:
            return f"{what}; `apt-get update` failed (exit {update.returncode}):\n{_tail(update.stdout)}"
        install = apt("install", "-y", "slurm-wlm")
    last_install_seconds = time.monotonic() - started
    if install.returncode != 0:
        return (f"{what}; `apt-get install -y slurm-wlm` failed (exit {install.returncode}):\n"
                f"{_tail(install.stdout)}")
    missing = missing_binaries()
    if missing:
        return f"`apt-get install -y slurm-wlm` succeeded but {', '.join(missing)} are still not found"
    return None


# ---------------------------------------------------------------------------------------------------- helpers


def _port_free(port: int) -> bool:
    """Whether a TCP listener could bind `port` on all interfaces (as slurmctld/slurmd do, with SO_REUSEADDR)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("", port))
        except OSError:
            return False
    return True


def pick_ports(preferred: tuple[int, int] = DEFAULT_PORTS) -> tuple[int, int]:
    """`preferred` when both are free, else the first free pair after it (then any two free ports)."""
    base = preferred[0]
    for candidate in [preferred, *((base + 2 * k, base + 2 * k + 1) for k in range(1, 200))]:
        if all(_port_free(p) for p in candidate):
            return candidate
    ports = []
    for _ in range(2):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.bind(("", 0))
            ports.append(s.getsockname()[1])
    return ports[0], ports[1]


def slurm_processes() -> list[tuple[int, str]]:
    """(pid, command line) of every running slurmctld/slurmd/slurmstepd/slurmscriptd on this machine."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            comm = (entry / "comm").read_text().strip()
            if comm not in ("slurmctld", "slurmd", "slurmstepd", "slurmscriptd"):
                continue
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
        except OSError:
            continue
        found.append((int(entry.name), cmdline or comm))
    return sorted(found)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale_dirs(base: str | Path) -> list[Path]:
    """Deletes the directories of earlier LocalSlurm clusters whose Python process died without `stop()` (killed by
    a signal) and that no running SLURM daemon uses; returns them. (Daemons die with the process that started them.)"""
    in_use = " ".join(cmd for _, cmd in slurm_processes())
    removed = []
    for d in Path(base).glob(f"{DIR_PREFIX}*"):
        try:
            owner = int((d / "owner.pid").read_text())
        except (OSError, ValueError):
            continue
        if not _pid_alive(owner) and str(d) not in in_use:
            shutil.rmtree(d, ignore_errors=True)
            removed.append(d)
    return removed


def _memory_mb() -> int:
    """A RealMemory that slurmd will not find too large: 80% of MemTotal (1000 MB when unknown)."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return max(100, int(int(line.split()[1]) / 1024 * 0.8))
    except (OSError, ValueError, IndexError):
        pass
    return 1000


def _die_with_parent() -> None:  # preexec_fn: SIGTERM the daemon if the Python process that started it dies
    with contextlib.suppress(Exception):
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def _log_tail(path: Path, lines: int = 25) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError as e:
        return f"(cannot read {path}: {e.strerror})"
    return _tail(text, lines) or "(empty)"


class SlurmError(RuntimeError):
    pass


# ---------------------------------------------------------------------------------------------------- cluster


class LocalSlurm:
    """A one-node SLURM cluster (slurmctld + slurmd of this machine) in a fresh temporary directory.

    `with LocalSlurm() as cluster:` starts it (`start()`), `stop()` ends it; both are safe to call on a half-started
    cluster and `stop()` is idempotent. While it runs, `os.environ["SLURM_CONF"]` points at its slurm.conf, so that
    `sbatch`, `squeue`, `scancel` and submitit in this process and its children talk to it.

    Attributes: `dir` (the temporary directory), `conf_path`, `env` ({"SLURM_CONF": ...}, to merge into a subprocess
    environment), `node` (node name), `cpus`, `partition` ("debug"), `ports` ((slurmctld, slurmd)),
    `foreign_daemons` (slurm daemons already running on this machine when it started: reported with a warning).
    """

    partition = "debug"

    def __init__(self, *, ports: tuple[int, int] = DEFAULT_PORTS, startup_timeout: float = 60.0,
                 cpus: int | None = None) -> None:
        self.preferred_ports = ports
        self.startup_timeout = startup_timeout
        self.cpus = cpus or os.cpu_count() or 1
        self.node = socket.gethostname().split(".")[0]
        self.user = pwd.getpwuid(os.getuid()).pw_name
        self.dir: Path | None = None
        self.ports: tuple[int, int] | None = None
        self.foreign_daemons: list[tuple[int, str]] = []
        self.start_seconds: float | None = None
        self._procs: dict[str, subprocess.Popen] = {}
        self._logs: list = []
        self._saved_conf: str | None = None
        self._conf_set = False

    # -- paths and environment

    @property
    def conf_path(self) -> Path:
        if self.dir is None:
            raise SlurmError("the cluster is not started")
        return self.dir / "slurm.conf"

    @property
    def env(self) -> dict[str, str]:
        return {"SLURM_CONF": str(self.conf_path)}

    @staticmethod
    def job_setup_lines() -> list[str]:
        """Lines for submitit's `slurm_setup` so that a job's Python can import the modules in tests/ (job functions
        pickled by reference, such as `slurm_cluster.write_result`)."""
        return [f'export PYTHONPATH="{TESTS_DIR}${{PYTHONPATH:+:$PYTHONPATH}}"']

    # -- start / stop

    def __enter__(self) -> LocalSlurm:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def start(self) -> LocalSlurm:
        if self._procs:
            raise SlurmError("already started")
        started = time.monotonic()
        try:
            self._start()
        except BaseException:
            self.stop()
            raise
        self.start_seconds = time.monotonic() - started
        return self

    def _start(self) -> None:
        slurmctld, slurmd = which("slurmctld"), which("slurmd")
        if not slurmctld or not slurmd:
            raise SlurmError(f"SLURM is not installed (missing: {', '.join(missing_binaries())}): "
                             "see ensure_slurm_installed()")
        self.foreign_daemons = slurm_processes()
        if self.foreign_daemons:
            listing = "\n".join(f"  {pid}: {cmd}" for pid, cmd in self.foreign_daemons)
            warnings.warn("SLURM processes already running on this machine (another test session, or leaked by a "
                          f"crashed one: stop them by PID); starting a separate cluster on free ports:\n{listing}",
                          stacklevel=3)
        # Unix socket paths (slurmd's spool) must stay short: a short temporary directory, not pytest's tmp_path.
        base = tempfile.gettempdir()
        base = base if len(base) <= 40 else "/tmp"
        remove_stale_dirs(base)
        self.dir = Path(tempfile.mkdtemp(prefix=DIR_PREFIX, dir=base))
        (self.dir / "owner.pid").write_text(f"{os.getpid()}\n")
        for sub in ("state", "spool", "log"):
            (self.dir / sub).mkdir()
        # Choosing ports and binding them must not interleave with another session doing the same.
        with open(_LOCK_FILE, "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            self.ports = pick_ports(self.preferred_ports)
            self.conf_path.write_text(self._conf_text())
            self._saved_conf, self._conf_set = os.environ.get("SLURM_CONF"), True
            os.environ["SLURM_CONF"] = str(self.conf_path)
            self._spawn("slurmctld", [slurmctld, "-D", "-f", str(self.conf_path)])
            self._spawn("slurmd", [slurmd, "-D", "-f", str(self.conf_path), "-N", self.node])
            self._wait_idle()

    def _conf_text(self) -> str:
        d, (ctld_port, slurmd_port) = self.dir, self.ports
        return f"""\
# A one-node test cluster written by tests/slurm_cluster.py (see shared/notes/slurm-local.md)
ClusterName=local
SlurmctldHost={self.node}(127.0.0.1)
SlurmUser={self.user}
SlurmdUser={self.user}
AuthType=auth/none
CredType=cred/none
AuthInfo=cred_expire=10
SlurmctldPort={ctld_port}
SlurmdPort={slurmd_port}
StateSaveLocation={d}/state
SlurmdSpoolDir={d}/spool
SlurmctldPidFile={d}/slurmctld.pid
SlurmdPidFile={d}/slurmd.pid
SlurmctldLogFile={d}/log/slurmctld.log
SlurmdLogFile={d}/log/slurmd.log
SlurmdParameters=config_overrides
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerType=sched/backfill
SchedulerParameters=batch_sched_delay=0,sched_interval=2,bf_interval=1
MpiDefault=none
MailProg=/bin/true
ReturnToService=2
KillWait={KILL_WAIT_S}
NodeName={self.node} NodeAddr=127.0.0.1 CPUs={self.cpus} Sockets=1 CoresPerSocket={self.cpus} ThreadsPerCore=1 \
RealMemory={_memory_mb()} State=UNKNOWN
PartitionName={self.partition} Nodes=ALL Default=YES MaxTime=INFINITE State=UP
"""

    def _spawn(self, name: str, cmd: list[str]) -> None:
        out = open(self.dir / "log" / f"{name}.out", "wb")
        self._logs.append(out)
        self._procs[name] = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                             env={**os.environ, **self.env}, start_new_session=True,
                                             preexec_fn=_die_with_parent)

    def run(self, *cmd: str, timeout: float = 30, check: bool = False) -> subprocess.CompletedProcess:
        """Runs a SLURM client command (sinfo, squeue, scancel, sbatch ...) against this cluster."""
        return subprocess.run(list(cmd), env={**os.environ, **self.env}, text=True, capture_output=True,
                              timeout=timeout, check=check, stdin=subprocess.DEVNULL)

    def logs(self, lines: int = 25) -> str:
        """The tails of the daemons' logs (for error messages)."""
        if self.dir is None:
            return "(no logs: the cluster directory was not created)"
        parts = []
        for name in ("slurmctld.out", "slurmctld.log", "slurmd.out", "slurmd.log"):
            parts.append(f"--- {name}\n{_log_tail(self.dir / 'log' / name, lines)}")
        return "\n".join(parts)

    def _wait_idle(self) -> None:
        deadline = time.monotonic() + self.startup_timeout
        last = ""
        while True:
            dead = {name: p.returncode for name, p in self._procs.items() if p.poll() is not None}
            if dead:
                raise SlurmError(f"SLURM daemon(s) exited during start-up (exit codes {dead}); ports {self.ports}, "
                                 f"conf {self.conf_path}\n{self.logs()}")
            try:
                result = self.run("sinfo", "-h", "-o", "%t", timeout=10)
                last = (result.stdout + result.stderr).strip()
                if "idle" in result.stdout.split():
                    return
            except subprocess.TimeoutExpired:
                last = "(sinfo timed out)"
            if time.monotonic() > deadline:
                raise SlurmError(f"the SLURM node did not become idle within {self.startup_timeout:.0f} s "
                                 f"(last `sinfo -h -o %t`: {last!r}); ports {self.ports}\n{self.logs()}")
            time.sleep(0.2)

    def squeue(self) -> list[str]:
        """`squeue` lines (job id, state, name) of all jobs still in the queue."""
        result = self.run("squeue", "-h", "-o", "%i %T %j", timeout=15)
        if result.returncode != 0:
            raise SlurmError(f"squeue failed: {result.stderr.strip()}")
        return result.stdout.splitlines()

    def wait_for_empty_queue(self, timeout: float = 60.0) -> None:
        """Waits until no job is pending, running or completing; TimeoutError (with the queue) otherwise."""
        deadline = time.monotonic() + timeout
        while True:
            jobs = self.squeue()
            if not jobs:
                return
            if time.monotonic() > deadline:
                raise TimeoutError(f"SLURM queue not empty after {timeout:.0f} s:\n" + "\n".join(jobs))
            time.sleep(0.25)

    def cancel_all(self) -> None:
        """scancel every job of this user (errors ignored)."""
        with contextlib.suppress(Exception):
            self.run("scancel", f"--user={self.user}", timeout=15)

    def stop(self) -> None:
        """Cancels all jobs (and waits for them to end), stops the daemons, deletes the directory, restores
        SLURM_CONF. Errors are suppressed: this must always clean up."""
        ctld = self._procs.get("slurmctld")
        if ctld is not None and ctld.poll() is None and self._procs.get("slurmd") is not None:
            self.cancel_all()
            with contextlib.suppress(Exception):  # cancelled tasks are SIGKILLed after KillWait
                self.wait_for_empty_queue(timeout=KILL_WAIT_S + 15)
        for name in ("slurmd", "slurmctld"):
            proc = self._procs.pop(name, None)
            if proc is None:
                continue
            with contextlib.suppress(ProcessLookupError):
                if proc.poll() is None:
                    os.kill(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(proc.pid, signal.SIGKILL)
                proc.wait()
        self._procs.clear()
        # Step daemons (slurmstepd) of finished jobs exit a moment after their job: wait for them, report leftovers.
        before = {pid for pid, _ in self.foreign_daemons}
        deadline = time.monotonic() + 5
        while (left := [p for p in slurm_processes() if p[0] not in before]) and time.monotonic() < deadline:
            time.sleep(0.1)
        if left:
            warnings.warn(f"SLURM processes left after stopping the test cluster: {left}", stacklevel=2)
        for f in self._logs:
            with contextlib.suppress(OSError):
                f.close()
        self._logs.clear()
        if self._conf_set:
            if self._saved_conf is None:
                os.environ.pop("SLURM_CONF", None)
            else:
                os.environ["SLURM_CONF"] = self._saved_conf
            self._conf_set = False
        if self.dir is not None:
            shutil.rmtree(self.dir, ignore_errors=True)
            self.dir = None


# ---------------------------------------------------------------------------------------------------- job functions


def write_result(x: int, out_dir: str, sleep_s: float = 0.0) -> int:
    """A submitit job function: touches out_dir/.<x>.started, sleeps `sleep_s`, writes `x * x` to out_dir/<x>.txt
    (atomically) and returns it. Raises ValueError for a negative x (to test a job that fails)."""
    out = Path(out_dir)
    (out / f".{x}.started").touch()
    if sleep_s:
        time.sleep(sleep_s)
    if x < 0:
        raise ValueError(f"negative input {x}")
    tmp = out / f".{x}.txt.tmp"
    tmp.write_text(str(x * x))
    tmp.replace(out / f"{x}.txt")
    return x * x


def wait_for_files(paths, timeout: float) -> list[Path]:
    """Waits until every path exists; returns those still missing after `timeout` seconds."""
    paths = [Path(p) for p in paths]
    deadline = time.monotonic() + timeout
    while True:
        missing = [p for p in paths if not p.exists()]
        if not missing or time.monotonic() > deadline:
            return missing
        time.sleep(0.2)


__all__ = ["LocalSlurm", "SlurmError", "ensure_slurm_installed", "job_setup_lines", "missing_binaries",
           "pick_ports", "remove_stale_dirs", "slurm_processes", "wait_for_files", "which", "write_result"]
job_setup_lines = LocalSlurm.job_setup_lines
