"""``eqlightning`` / ``python cli.py``: LightningCLI with ``fit``, ``validate``, ``test`` and ``predict``.

    python cli.py fit --config configs/quickstart.yaml
    python cli.py test --config configs/quickstart.yaml --ckpt_path runs/quickstart/<run>/checkpoints/best.ckpt
    python cli.py fit --config configs/breastmnist/eq_d4.yaml --print_config

Each run writes everything under one directory, ``<run_root>/<run_name>/<timestamp>/``: ``metrics.csv`` (and
TensorBoard events if tensorboard is installed), ``config.yaml``, ``hparams.yaml`` and ``checkpoints/``
(``best.ckpt`` by ``val/auc``, and ``last.ckpt``). ``run_name`` defaults to the name of the first config file.
The data module's ``num_classes``, ``in_channels``, ``task`` and ``input_size`` are linked into the model.
"""

from __future__ import annotations

import importlib.util
import os
import sys
from datetime import datetime
from pathlib import Path

from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
from lightning.pytorch.loggers import CSVLogger

from .classifier import ImageClassifier
from .data import MedMNISTDataModule

_RUN_ID_ENV = "EQL_RUN_ID"  # shared by the processes of one multi-process (DDP) run


class EqLightningCLI(LightningCLI):
    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        for name in ("num_classes", "in_channels", "task", "input_size"):
            parser.link_arguments(f"data.{name}", f"model.{name}", apply_on="instantiate")
        parser.add_lightning_class_args(ModelCheckpoint, "checkpoint")
        parser.set_defaults({"checkpoint.monitor": "val/auc", "checkpoint.mode": "max", "checkpoint.save_last": True,
                             "checkpoint.filename": "best", "checkpoint.auto_insert_metric_name": False})
        parser.add_argument("--run_name", type=str | None, default=None,
                            help="Run directory name under run_root (default: the first config file's name).")
        parser.add_argument("--run_root", type=str, default="runs", help="Where run directories are created.")
        parser.add_argument("--test_after_fit", type=bool, default=False,
                            help="After `fit`, test the best checkpoint (by val/auc) and print the test metrics.")

    def instantiate_trainer(self, **kwargs):
        config = self.config[self.subcommand] if self.subcommand else self.config
        if config.get("trainer", {}).get("logger") in (None, True) and "logger" not in kwargs:
            kwargs["logger"] = self._default_loggers(config)
        return super().instantiate_trainer(**kwargs)

    def _default_loggers(self, config) -> list:
        configs = config.get("config") or []
        name = config.get("run_name") or (Path(str(configs[0])).stem if configs else "run")
        root = Path(config.get("run_root") or "runs")
        version = os.environ.get(_RUN_ID_ENV) or _launcher_run_id()
        if version is None:
            version = datetime.now().strftime("%Y%m%d-%H%M%S")
            suffix = 1
            while (root / name / version).exists():
                suffix += 1
                version = f"{version.split('.')[0]}.{suffix}"
            os.environ[_RUN_ID_ENV] = version  # child processes launched by Lightning reuse the directory
        loggers = [CSVLogger(save_dir=str(root), name=name, version=version)]
        if importlib.util.find_spec("tensorboard") is not None:
            from lightning.pytorch.loggers import TensorBoardLogger

            loggers.append(TensorBoardLogger(save_dir=str(root), name=name, version=version,
                                             default_hp_metric=False))
        return loggers

    def after_fit(self) -> None:
        if self.config[self.subcommand].get("test_after_fit"):
            self.trainer.test(self.model, datamodule=self.datamodule, ckpt_path="best")


def _launcher_run_id() -> str | None:
    """A run id every process of a multi-node launch shares (torchrun's rendezvous id, the SLURM job), if any:
    the processes start independently there, so a timestamp could differ between them."""
    rdzv = os.environ.get("TORCHELASTIC_RUN_ID")
    if rdzv and rdzv != "none":
        return f"torchrun-{rdzv}"
    if os.environ.get("SLURM_JOB_ID") and int(os.environ.get("SLURM_NTASKS", "1")) > 1:
        return f"slurm-{os.environ['SLURM_JOB_ID']}"
    return None


def main(args: list[str] | None = None, run: bool = True) -> EqLightningCLI:
    """Entry point of ``python cli.py`` and the ``eqlightning`` console script (``args`` for use from Python)."""
    inherited_run_id = _RUN_ID_ENV in os.environ  # set by a parent process of the same (DDP) run
    try:
        return EqLightningCLI(ImageClassifier, MedMNISTDataModule, seed_everything_default=0, args=args, run=run)
    finally:
        if not inherited_run_id:  # the next run started from this process gets its own directory
            os.environ.pop(_RUN_ID_ENV, None)


if __name__ == "__main__":  # pragma: no cover
    main(sys.argv[1:])
