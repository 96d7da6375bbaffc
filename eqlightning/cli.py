"""``eqlightning`` / ``python cli.py``: LightningCLI with ``fit``, ``validate``, ``test`` and ``predict``.

    python cli.py fit --config configs/quickstart.yaml
    python cli.py test --config configs/quickstart.yaml --ckpt_path runs/quickstart/<run>/checkpoints/best.ckpt
    python cli.py fit --config configs/breastmnist/eq_d4.yaml --print_config

Each run writes everything under one directory, ``<run_root>/<run_name>/<timestamp>/``: ``metrics.csv`` (and
TensorBoard events if tensorboard is installed), ``config.yaml``, ``hparams.yaml`` and ``checkpoints/``
(``best.ckpt`` by ``val/auc``, and ``last.ckpt``). ``run_name`` defaults to the name of the first config file.
``--test_after_fit`` tests ``best.ckpt``, or the final weights when there is none (e.g. ``--trainer.fast_dev_run``,
which saves nothing).
The data module's ``num_classes``, ``in_channels``, ``task`` and ``input_size`` are linked into the model.
"""

from __future__ import annotations

import importlib.util
import operator
import os
import sys
from datetime import datetime
from functools import reduce
from pathlib import Path

from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.utilities import rank_zero_info

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
        _parse_int_before_float(parser)
        parser.add_argument("--test_after_fit", type=bool, default=False,
                            help="After `fit`, test the best checkpoint (by val/auc) and print the test metrics; "
                                 "without one (fast_dev_run, no validation yet) test the final weights.")

    def instantiate_trainer(self, **kwargs):
        config = self.config[self.subcommand] if self.subcommand else self.config
        if config.get("trainer", {}).get("logger") in (None, True) and "logger" not in kwargs:
            kwargs["logger"] = self._default_loggers(config)
        trainer = super().instantiate_trainer(**kwargs)
        if trainer.fast_dev_run:  # Lightning (2.6) still saves last.ckpt after a fast_dev_run, into ./checkpoints
            for callback in trainer.checkpoint_callbacks:
                callback.save_last = False
        return trainer

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
        if not self.config[self.subcommand].get("test_after_fit"):
            return
        best, why_not = self._best_checkpoint()
        if best is None:  # e.g. --trainer.fast_dev_run: test what we have rather than fail after a good fit
            rank_zero_info(f"test_after_fit: {why_not}, so the test runs on the weights at the end of fit.")
        self.trainer.test(self.model, datamodule=self.datamodule, ckpt_path=best)

    def _best_checkpoint(self) -> tuple[str | None, str]:
        """``(path of the best checkpoint, "")``, or ``(None, why there is none)``."""
        trainer = self.trainer
        if trainer.fast_dev_run:
            return None, "fast_dev_run saves no checkpoint"
        callback = trainer.checkpoint_callback
        if callback is None:
            return None, "there is no ModelCheckpoint callback"
        best = getattr(callback, "best_model_path", "")
        if not best:
            monitor = getattr(callback, "monitor", None)
            return None, (f"no best checkpoint by {monitor!r} was saved (not logged yet, e.g. no validation ran, "
                          f"or save_top_k=0)" if monitor else "no checkpoint was saved")
        return best, ""


def _parse_int_before_float(parser: LightningArgumentParser) -> None:
    """Make ``--trainer.limit_val_batches 1`` one batch, as in Python, not 1.0 (= 100%).

    Lightning annotates ``limit_*_batches`` as ``Optional[Union[int, float]]``, but typing caches unions by equality and
    lightning.fabric creates ``Optional[Union[float, int]]`` first, so jsonargparse gets the float-first union and
    tries float first (Lightning issue #21259). Rebuild such trainer type hints int-first with ``|`` (not cached)."""
    for action in parser._actions:
        args = getattr(getattr(action, "_typehint", None), "__args__", None)
        if (not action.dest.startswith("trainer.") or not isinstance(args, tuple) or int not in args
                or float not in args or args.index(int) < args.index(float)):
            continue
        rest = [t for t in args if t is not int]
        rest.insert(rest.index(float), int)
        try:
            action._typehint = reduce(operator.or_, rest)
        except TypeError:  # a subtype without `|` support: leave this argument as Lightning declares it
            pass


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
