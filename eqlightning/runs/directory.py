"""Run directories: ``<run_root>/<run_name>/<version>/``, where a new run starts and where a resumed one continues.

A run directory is the unit a study reads: ``config.yaml``, ``metrics.csv``, ``hparams.yaml``, ``checkpoints/``,
``summary.json``, ``curves.png`` (and ``predictions.csv`` after ``predict``). Resuming from one of its checkpoints
continues in the same directory; ``--ckpt_path last`` picks the newest ``last.ckpt`` among the runs of one name.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from .checkpoint import LAST

CHECKPOINTS = "checkpoints"
_MARKERS = ("config.yaml", "metrics.csv", "summary.json", "hparams.yaml")


@dataclass
class RunDirectory:
    """Where one command writes: ``root/name/version``; ``existing`` when it continues a run already there."""

    root: Path
    name: str
    version: str
    existing: bool = False

    @property
    def path(self) -> Path:
        return self.root / self.name / self.version

    @property
    def checkpoints(self) -> Path:
        return self.path / CHECKPOINTS


def new_run(root: str | Path, name: str, version: str | None = None) -> RunDirectory:
    """A fresh directory under ``root/name``: ``version``, or a timestamp (``.2``, ``.3``, ... when taken)."""
    root = Path(root)
    if version is not None:
        return RunDirectory(root, name, version, existing=(root / name / version).exists())
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    version, suffix = stamp, 1
    while (root / name / version).exists():
        suffix += 1
        version = f"{stamp}.{suffix}"
    return RunDirectory(root, name, version)


def run_of_checkpoint(ckpt: str | Path) -> RunDirectory | None:
    """The run directory a checkpoint belongs to (``<run>/checkpoints/<file>.ckpt`` with run files next to
    ``checkpoints/``), or None for a checkpoint elsewhere."""
    ckpt = Path(ckpt).resolve()
    run = ckpt.parent.parent
    if ckpt.parent.name != CHECKPOINTS or not any((run / marker).is_file() for marker in _MARKERS):
        return None
    return RunDirectory(run.parent.parent, run.parent.name, run.name, existing=True)


def find_last_checkpoint(root: str | Path, name: str) -> Path:
    """The newest ``<root>/<name>/*/checkpoints/last.ckpt`` (by modification time); FileNotFoundError naming where
    it looked otherwise."""
    candidates = sorted((root_dir / CHECKPOINTS / LAST for root_dir in (Path(root) / name).glob("*")
                         if (root_dir / CHECKPOINTS / LAST).is_file()), key=lambda p: p.stat().st_mtime)
    if not candidates:
        raise FileNotFoundError(f"--ckpt_path last: no {Path(root) / name / '*' / CHECKPOINTS / LAST} to resume; "
                                f"check --run_root/--run_name (or the config's run_name), give a checkpoint path, "
                                f"or start a new run without --ckpt_path")
    return candidates[-1]


def remove_if_empty(run: RunDirectory) -> bool:
    """After a failed command: delete a run directory this command created if it holds no checkpoint and no logged
    metrics (only ``config.yaml``/``hparams.yaml``/an empty ``metrics.csv``), and its name folder if then empty.
    Returns whether it was removed. Never touches a directory that existed before."""
    path = run.path
    if run.existing or not path.is_dir():
        return False
    if any(path.rglob("*.ckpt")):
        return False
    metrics = path / "metrics.csv"
    if metrics.is_file() and len(metrics.read_text().strip().splitlines()) > 1:
        return False
    shutil.rmtree(path, ignore_errors=True)
    parent = path.parent
    if parent.is_dir() and not any(parent.iterdir()):
        parent.rmdir()
    return True
