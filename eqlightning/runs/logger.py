"""``RunCSVLogger``: ``metrics.csv`` and ``hparams.yaml`` in a run directory, appended to when a run resumes.

Lightning's ``CSVLogger`` deletes an existing ``metrics.csv`` when it opens a directory again, so a run resumed into
its own directory would lose its history. This logger keeps the rows logged before the checkpoint being resumed
(``resume_step``: the checkpoint's logging step) and drops the ones after it, which the resumed run logs again, so
the file of an interrupted-and-resumed run has the rows of the uninterrupted one.
"""

from __future__ import annotations

import csv
import os
from argparse import Namespace
from pathlib import Path
from typing import Any

from lightning.pytorch.core.saving import save_hparams_to_yaml
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.utilities import rank_zero_only

METRICS_FILE, HPARAMS_FILE = "metrics.csv", "hparams.yaml"


class RunCSVLogger(CSVLogger):
    """CSV metrics and YAML hyperparameters in ``<save_dir>/<name>/<version>/``.

    A ``CSVLogger`` to Lightning (which places ``config.yaml`` and ``checkpoints/`` by the first logger's
    ``log_dir`` only for its own CSV and TensorBoard loggers), with its own writer.

    Args:
        save_dir, name, version: the run directory is ``save_dir/name/version``.
        resume_step: when resuming into an existing run directory, keep only the rows of ``metrics.csv`` logged
            before this step (``None``: a fresh run; an existing ``metrics.csv`` is then an error, never overwritten).
    """

    def __init__(self, save_dir: str, name: str, version: str, resume_step: int | None = None):
        super().__init__(save_dir=str(save_dir), name=str(name), version=str(version))
        self._save_dir, self._name, self._version = str(save_dir), str(name), str(version)
        self.hparams: dict[str, Any] = {}
        self._rows: list[dict[str, Any]] = []
        self._keys: list[str] = []
        self._resume_step = resume_step
        self._prepared = False

    @property
    def name(self) -> str:
        return self._name

    @property
    def version(self) -> str:
        return self._version

    @property
    def save_dir(self) -> str:
        return self._save_dir

    @property
    def root_dir(self) -> str:
        return os.path.join(self._save_dir, self._name)

    @property
    def log_dir(self) -> str:
        return os.path.join(self._save_dir, self._name, self._version)

    @property
    def metrics_path(self) -> Path:
        return Path(self.log_dir) / METRICS_FILE

    @property
    def experiment(self) -> RunCSVLogger:  # CSVLogger's writer would delete an existing metrics.csv
        return self

    @rank_zero_only
    def log_hyperparams(self, params: dict[str, Any] | Namespace | None = None, *args: Any, **kwargs: Any) -> None:
        if params is None:
            return
        params = vars(params) if isinstance(params, Namespace) else dict(params)
        self.hparams.update(params)
        Path(self.log_dir).mkdir(parents=True, exist_ok=True)
        save_hparams_to_yaml(os.path.join(self.log_dir, HPARAMS_FILE), self.hparams)

    @rank_zero_only
    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        row = {k: (v.item() if hasattr(v, "item") else v) for k, v in metrics.items()}
        row["step"] = len(self._rows) if step is None else int(step)
        self._rows.append(row)

    @rank_zero_only
    def save(self) -> None:
        self._prepare()
        if not self._rows:
            return
        new = sorted({k for row in self._rows for k in row} - set(self._keys))
        exists = self.metrics_path.is_file()
        if new:
            self._keys = sorted([*self._keys, *new])
            if exists:  # a new column: rewrite the file with the wider header
                self._rewrite(self._read())
        with open(self.metrics_path, "a", newline="") as file:
            writer = csv.DictWriter(file, fieldnames=self._keys)
            if not exists:
                writer.writeheader()
            writer.writerows(self._rows)
        self._rows = []

    @rank_zero_only
    def finalize(self, status: str) -> None:
        self.save()

    def _prepare(self) -> None:
        """On the first save: create the directory; keep (resume) or refuse (fresh run) an existing metrics.csv."""
        if self._prepared:
            return
        self._prepared = True
        Path(self.log_dir).mkdir(parents=True, exist_ok=True)
        if not self.metrics_path.is_file():
            return
        if self._resume_step is None:
            raise FileExistsError(f"{self.metrics_path} exists: a new run would overwrite it; resume the run with "
                                  f"--ckpt_path, or choose another --run_name")
        rows = [row for row in self._read() if _step(row) < self._resume_step]
        with open(self.metrics_path, newline="") as file:
            self._keys = list(csv.DictReader(file).fieldnames or [])
        self._rewrite(rows)

    def _read(self) -> list[dict[str, str]]:
        with open(self.metrics_path, newline="") as file:
            return list(csv.DictReader(file))

    def _rewrite(self, rows: list[dict[str, Any]]) -> None:
        tmp = self.metrics_path.with_suffix(".csv.tmp")
        with open(tmp, "w", newline="") as file:
            writer = csv.DictWriter(file, fieldnames=self._keys)
            writer.writeheader()
            writer.writerows(rows)
        os.replace(tmp, self.metrics_path)


def _step(row: dict[str, str]) -> float:
    try:
        return float(row.get("step") or 0)
    except ValueError:
        return 0.0


def read_metrics(run_dir: str | Path) -> list[dict[str, float]]:
    """The rows of a run's ``metrics.csv`` as dicts of floats (empty cells left out)."""
    path = Path(run_dir) / METRICS_FILE
    if not path.is_file():
        return []
    rows = []
    with open(path, newline="") as file:
        for row in csv.DictReader(file):
            parsed = {}
            for key, value in row.items():
                if value not in (None, ""):
                    try:
                        parsed[key] = float(value)
                    except ValueError:
                        pass
            rows.append(parsed)
    return rows
