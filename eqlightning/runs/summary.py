"""``RunSummary``: ``summary.json`` (and ``curves.png``) in the run directory after ``fit``, ``validate``, ``test``.

``summary.json`` is what studies read: one JSON object per run directory, updated by every command run into it (a
``fit``, its resumption, a ``test`` of one of its checkpoints). Keys:

- ``status`` (``completed``, ``stopped``, ``interrupted``, ``failed``) and ``stop_reason`` (``max_epochs``,
  ``max_steps``, ``max_time``, ``privacy budget``, ``early stopping``, ``SIGTERM``, ...), ``epochs``, ``steps``;
- ``metrics``: ``final`` (the last logged value of every train/val metric), ``best`` (the monitored metric, its
  value and checkpoint), ``test`` / ``validate`` (every logged test metric, robustness metrics included);
- ``checkpoints``: ``best``, ``last``, and the one each ``test`` used;
- ``privacy`` for private runs: ``epsilon``, ``delta``, ``noise_multiplier``, ``sample_rate``, ``steps``,
  ``accountant``, ``max_grad_norm``, ``target_epsilon``;
- ``model`` (backbone, options, group, parameters, trainable parameters, forward FLOPs per image), ``optimizer``,
  ``data``; ``transfer`` when the backbone was initialised from another run;
- ``wall_time_s`` per command (a resumed fit adds its time to the interrupted one's), ``device``, ``seed``,
  ``versions`` (Python and packages), ``config_hash`` (of the resolved configuration without run-location keys)
  and ``history`` (one entry per command).
"""

from __future__ import annotations

import json
import math
import os
import platform
import sys
import time
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.callbacks import EarlyStopping, Timer
from lightning.pytorch.utilities import rank_zero_warn
from lightning.pytorch.utilities.exceptions import SIGTERMException

SUMMARY_FILE, CURVES_FILE = "summary.json", "curves.png"
PACKAGES = ("eqlightning", "torch", "lightning", "torchmetrics", "escnn", "opacus", "medmnist", "numpy")


class RunSummary(Callback):
    """Write ``summary.json`` (and, after ``fit``, ``curves.png``) into ``run_dir``.

    Args:
        run_dir: the run directory.
        config: the resolved configuration (recorded as ``optimizer``, ``data``, ... and hashed), optional.
        config_hash: a hash of the configuration, identical for runs of the same configuration.
        plot: draw the training curves after ``fit``.
    """

    def __init__(self, run_dir: str | Path, config: dict[str, Any] | None = None, config_hash: str | None = None,
                 plot: bool = True):
        self.run_dir = Path(run_dir)
        self.config, self.config_hash, self.plot = config or {}, config_hash, plot
        self._started: float | None = None
        self._model: dict[str, Any] | None = None
        self.tested_checkpoint: str | None = None

    @property
    def path(self) -> Path:
        return self.run_dir / SUMMARY_FILE

    # -- hooks -----------------------------------------------------------------------------------------------------
    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        self._started = time.perf_counter()
        if self._model is None:  # once per module (fit, then test_after_fit, share it); before a DP engine hooks it
            self._model = _model_info(pl_module)

    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self._model is not None:  # after the module's own setup (which may freeze stages for transfer)
            self._model["trainable_parameters"] = sum(p.numel() for p in pl_module.parameters() if p.requires_grad)

    def on_fit_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._write(trainer, pl_module, "fit", _stop_reason(trainer))

    def on_validation_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if trainer.state.fn == "validate":
            self._write(trainer, pl_module, "validate", None)

    def on_test_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._write(trainer, pl_module, "test", None)

    def on_exception(self, trainer: Trainer, pl_module: LightningModule, exception: BaseException) -> None:
        reason = "SIGTERM" if isinstance(exception, SIGTERMException) else type(exception).__name__
        status = "interrupted" if isinstance(exception, (SIGTERMException, KeyboardInterrupt)) else "failed"
        command = getattr(trainer.state.fn, "value", trainer.state.fn) or "fit"
        self._write(trainer, pl_module, str(command), reason, status=status)

    # -- writing ---------------------------------------------------------------------------------------------------
    def _write(self, trainer: Trainer, pl_module: LightningModule, command: str, reason: str | None,
               status: str | None = None) -> None:
        for logger in trainer.loggers:  # flush metrics.csv before reading it for the plot
            logger.save()
        if not trainer.is_global_zero or trainer.sanity_checking:
            return
        summary = self.read(self.run_dir)
        elapsed = time.perf_counter() - (self._started or time.perf_counter())
        metrics = _scalars(trainer.callback_metrics)
        summary.setdefault("metrics", {})
        checkpoints = summary.setdefault("checkpoints", {})
        if status is None:
            status = "completed" if reason in (None, "max_epochs", "max_steps") else "stopped"
        if command == "fit":
            summary["status"], summary["stop_reason"] = status, reason
            summary["epochs"], summary["steps"] = trainer.current_epoch, trainer.global_step
            summary["metrics"]["final"] = {k: v for k, v in metrics.items() if not k.startswith("test/")}
            best = _best(trainer)
            if best:
                summary["metrics"]["best"] = best
                checkpoints["best"] = best.get("checkpoint")
            last = self.run_dir / "checkpoints" / "last.ckpt"
            if last.is_file():
                checkpoints["last"] = str(last)
            summary["wall_time_s"] = _add_time(summary.get("wall_time_s"), "fit", elapsed)
        else:
            summary["metrics"][command] = {k: v for k, v in metrics.items()
                                           if k.startswith(("test/", "val/", "dp/"))}
            if self.tested_checkpoint:
                checkpoints[command] = self.tested_checkpoint
            summary["wall_time_s"] = {**summary.get("wall_time_s", {}), command: round(elapsed, 3)}
            summary.setdefault("status", status)
        privacy = _privacy(trainer, pl_module)
        if privacy:
            summary["privacy"] = privacy
        summary["model"] = {**summary.get("model", {}), **(self._model or _model_info(pl_module))}
        transfer = getattr(pl_module, "transfer_report", None)
        if transfer:
            summary["transfer"] = transfer
        model_config = self.config.get("model") or {}
        for key in ("optimizer", "lr_scheduler"):
            if model_config.get(key) is not None:
                summary[key] = model_config[key]
        for key, name in (("data", "data"), ("seed_everything", "seed")):
            if key in self.config:
                summary[name] = self.config[key]
        summary["device"] = _device(trainer)
        summary["versions"] = versions()
        if self.config_hash:
            summary["config_hash"] = self.config_hash
        summary.setdefault("history", []).append({
            "command": command, "status": status, "reason": reason, "steps": trainer.global_step,
            "ended": datetime.now(timezone.utc).isoformat(timespec="seconds"), "wall_time_s": round(elapsed, 3)})
        summary["run_dir"] = str(self.run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(summary, indent=2, sort_keys=False, default=str) + "\n")
        os.replace(tmp, self.path)
        if command == "fit" and self.plot:
            try:
                from .plots import plot_curves

                plot_curves(self.run_dir)
            except Exception as error:  # a plot must never fail a finished run
                rank_zero_warn(f"could not draw {self.run_dir / CURVES_FILE}: {error}")

    @staticmethod
    def read(run_dir: str | Path) -> dict[str, Any]:
        """The run's ``summary.json`` as a dict (empty when there is none yet)."""
        path = Path(run_dir) / SUMMARY_FILE
        if not path.is_file():
            return {}
        try:
            return json.loads(path.read_text())
        except json.JSONDecodeError as error:
            raise ValueError(f"{path} is not valid JSON ({error}); move it away to start a new summary") from None


def _scalars(metrics: dict[str, Any]) -> dict[str, float]:
    out = {}
    for key, value in sorted(metrics.items()):
        if isinstance(value, torch.Tensor) and value.numel() == 1:
            value = value.item()
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            out[key] = float(value) if math.isfinite(value) else None
    return out


def _stop_reason(trainer: Trainer) -> str:
    for callback in trainer.callbacks:
        if getattr(callback, "reports_privacy", False) and getattr(callback, "budget_reached", False):
            return "privacy budget"
        if isinstance(callback, EarlyStopping) and callback.stopped_epoch:
            return "early stopping"
        if isinstance(callback, Timer) and (callback.time_remaining() or 1) <= 0:
            return "max_time"
    if trainer.fast_dev_run:
        return "fast_dev_run"
    if trainer.max_steps not in (None, -1) and trainer.global_step >= trainer.max_steps:
        return "max_steps"
    if trainer.max_epochs is not None and trainer.current_epoch >= trainer.max_epochs:
        return "max_epochs"
    return "stopped early"


def _best(trainer: Trainer) -> dict[str, Any]:
    callback = trainer.checkpoint_callback
    score = getattr(callback, "best_model_score", None)
    if callback is None or score is None or not getattr(callback, "best_model_path", ""):
        return {}
    return {"monitor": callback.monitor, "mode": getattr(callback, "mode", None), "value": float(score),
            "checkpoint": callback.best_model_path}


def _privacy(trainer: Trainer, pl_module: LightningModule) -> dict[str, Any]:
    for callback in trainer.callbacks:
        if getattr(callback, "reports_privacy", False) and getattr(callback, "ledger", None) is not None:
            return {"epsilon": float(callback.epsilon), "delta": callback.delta,
                    "noise_multiplier": callback.noise_multiplier, "sample_rate": callback.sample_rate,
                    "steps": callback.ledger.steps, "accountant": callback.accountant,
                    "max_grad_norm": callback.max_grad_norm, "target_epsilon": callback.target_epsilon}
    state = getattr(pl_module, "checkpoint_privacy", None)
    return dict(state) if state else {}


def _model_info(pl_module: LightningModule) -> dict[str, Any]:
    hparams = dict(getattr(pl_module, "hparams", {}) or {})
    info = {k: hparams[k] for k in ("backbone", "backbone_kwargs", "num_classes", "in_channels", "input_size", "task")
            if k in hparams}
    info["group"] = getattr(pl_module, "group", None)
    info["parameters"] = sum(p.numel() for p in pl_module.parameters())
    info["trainable_parameters"] = sum(p.numel() for p in pl_module.parameters() if p.requires_grad)
    backbone = getattr(pl_module, "backbone", None)
    if backbone is not None and "input_size" in hparams and "in_channels" in hparams:
        try:
            from ..models import profile_backbone

            info["flops"] = profile_backbone(backbone, hparams["input_size"], hparams["in_channels"]).flops
        except Exception as error:  # FLOPs are informative; never fail a run over them
            info["flops"] = None
            rank_zero_warn(f"summary.json: could not count FLOPs ({error})")
    return info


def _device(trainer: Trainer) -> dict[str, Any]:
    root = trainer.strategy.root_device
    name = torch.cuda.get_device_name(root) if root.type == "cuda" else _cpu_name()
    return {"type": root.type, "name": name, "num_devices": trainer.num_devices, "world_size": trainer.world_size,
            "num_nodes": trainer.num_nodes, "strategy": type(trainer.strategy).__name__,
            "precision": str(trainer.precision), "cpu_count": os.cpu_count(), "host": platform.node()}


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as file:
            for line in file:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def versions() -> dict[str, str | None]:
    """Python and the versions of the packages a result depends on (None: not installed)."""
    found: dict[str, str | None] = {"python": sys.version.split()[0]}
    for package in PACKAGES:
        try:
            found[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            found[package] = None
    return found


def _add_time(previous: dict | None, command: str, seconds: float) -> dict[str, float]:
    times = dict(previous or {})
    times[command] = round(times.get(command, 0.0) + seconds, 3)
    return times
