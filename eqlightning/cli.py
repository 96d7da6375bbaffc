"""``eqlightning`` / ``python cli.py``: LightningCLI with ``fit``, ``validate``, ``test``, ``predict`` (and ``list``).

    python cli.py fit --config configs/quickstart.yaml
    python cli.py fit --config configs/quickstart.yaml --ckpt_path last          # resume the newest run of that name
    python cli.py test --config configs/quickstart.yaml --ckpt_path runs/quickstart/<run>/checkpoints/best.ckpt
    python cli.py predict --config configs/quickstart.yaml --ckpt_path runs/quickstart/<run>/checkpoints/best.ckpt
    python cli.py list                                                           # backbones, datasets, groups

Each run writes everything under one directory, ``<run_root>/<run_name>/<timestamp>/`` (``run_name`` defaults to
the first config file's name), with or without loggers: ``config.yaml``, ``metrics.csv``, ``hparams.yaml`` (with
the optimizer and DP settings), ``checkpoints/best.ckpt`` (by ``val/auc``) and ``checkpoints/last.ckpt`` (the newest
state: every epoch, at any end of training, on SIGTERM), ``summary.json``, ``curves.png``; ``predict`` adds
``predictions.csv``. A command given a checkpoint of a run directory (``--ckpt_path``, or ``last``: the newest
``last.ckpt`` of the runs named ``run_name``) continues in that directory: ``fit`` resumes (metrics appended, the best
score kept), ``test`` adds its metrics to the same ``summary.json``.

Exit status: 0 on success, 2 for a user error (a one-line message naming the value and the fix; set
``EQL_DEBUG=1`` for the traceback), 143 when stopped by SIGTERM (``last.ckpt`` saved: resume with
``--ckpt_path last``), 1 for anything else (with the traceback).
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import math
import operator
import os
import re
import sys
from functools import reduce
from pathlib import Path
from typing import Any

import torch
from jsonargparse import ArgumentError
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI, SaveConfigCallback
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from lightning.pytorch.utilities.exceptions import SIGTERMException

from .classifier import ImageClassifier
from .data import MedMNISTDataModule
from .runs import (LastCheckpoint, PredictionWriter, RunCSVLogger, RunDirectory, RunSummary, find_last_checkpoint,
                   new_run, remove_if_empty, run_of_checkpoint)

_RUN_ID_ENV = "EQL_RUN_ID"  # shared by the processes of one multi-process (DDP) run
DEBUG_ENV = "EQL_DEBUG"
EXIT_USER_ERROR, EXIT_SIGTERM = 2, 143
#: Keys that say where a run goes, not what it computes: left out of the configuration hash.
_LOCATION_KEYS = ("config", "ckpt_path", "run_root", "run_name", "test_after_fit", "__path__")


class RunConfigSaver(SaveConfigCallback):
    """Saves ``config.yaml``; a later command in the same run directory (a resumed ``fit``, a ``test``) saves
    ``config.<command>.yaml`` (``.2``, ``.3``, ... when taken) instead of refusing or overwriting."""

    def setup(self, trainer, pl_module, stage: str) -> None:
        if not self.already_saved and trainer.log_dir and (Path(trainer.log_dir) / self.config_filename).exists():
            directory, number = Path(trainer.log_dir), 1
            stage = getattr(stage, "value", stage)
            name = f"config.{stage}.yaml"
            while (directory / name).exists():
                number += 1
                name = f"config.{stage}.{number}.yaml"
            self.config_filename = name
        super().setup(trainer, pl_module, stage)


class EqLightningCLI(LightningCLI):
    #: The run directory of the command being run (set before the trainer is created).
    run_dir: RunDirectory | None = None

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("save_config_callback", RunConfigSaver)
        super().__init__(*args, **kwargs)

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        # data: MedMNISTDataModule (2D) unless a config names another class, e.g. MedMNIST3DDataModule for volumes
        parser.set_defaults({"data": {"class_path": "eqlightning.data.MedMNISTDataModule"}})
        for name in ("num_classes", "in_channels", "task", "input_size"):
            parser.link_arguments(f"data.{name}", f"model.{name}", apply_on="instantiate")
        parser.add_lightning_class_args(ModelCheckpoint, "checkpoint")
        parser.set_defaults({"checkpoint.monitor": "val/auc", "checkpoint.mode": "max", "checkpoint.save_last": False,
                             "checkpoint.filename": "best", "checkpoint.auto_insert_metric_name": False})
        parser.add_argument("--run_name", type=str | None, default=None,
                            help="Run directory name under run_root (default: the first config file's name).")
        parser.add_argument("--run_root", type=str, default="runs", help="Where run directories are created.")
        _parse_int_before_float(parser)
        parser.add_argument("--test_after_fit", type=bool, default=False,
                            help="After `fit`, test the best checkpoint (by val/auc) and print the test metrics; "
                                 "without one (fast_dev_run, no validation yet) test the final weights.")

    # -- the run directory -----------------------------------------------------------------------------------------
    def _command_config(self):
        return self.config[self.subcommand] if self.subcommand else self.config

    def before_instantiate_classes(self) -> None:
        config = self._command_config()
        configs = config.get("config") or []
        name = config.get("run_name") or (Path(str(configs[0])).stem if configs else "run")
        root = Path(config.get("run_root") or "runs").resolve()
        ckpt = config.get("ckpt_path")
        if ckpt == "last":
            ckpt = str(find_last_checkpoint(root, name))
            config["ckpt_path"] = ckpt
            rank_zero_info(f"--ckpt_path last: resuming {ckpt}")
        elif ckpt and not Path(ckpt).is_file():
            raise FileNotFoundError(f"--ckpt_path {ckpt}: no such file; give a checkpoint file, or `last` for the "
                                    f"newest last.ckpt of the runs named {name!r} under {root}")
        if ckpt:
            ckpt = str(Path(ckpt).resolve())
            config["ckpt_path"] = ckpt
        run = run_of_checkpoint(ckpt) if ckpt else None
        if run is None:
            run = new_run(root, name, os.environ.get(_RUN_ID_ENV) or _launcher_run_id())
        os.environ[_RUN_ID_ENV] = run.version  # child processes launched by Lightning reuse the directory
        self.run_dir = run
        self._ckpt = ckpt

    def instantiate_trainer(self, **kwargs):
        if self.run_dir is None:  # instantiated without a subcommand (run=False): still one run directory
            self.before_instantiate_classes()
        run, config = self.run_dir, self._command_config()
        kwargs.setdefault("default_root_dir", str(run.path))  # where everything goes, with or without a logger
        if config.get("trainer", {}).get("logger") in (None, True) and "logger" not in kwargs:
            kwargs["logger"] = self._default_loggers(run)
        trainer = super().instantiate_trainer(**kwargs)
        for callback in trainer.checkpoint_callbacks:
            if isinstance(callback, ModelCheckpoint) and callback.save_last:
                rank_zero_warn("checkpoint.save_last is handled by eqlightning (checkpoints/last.ckpt always holds the "
                               "newest state); Lightning's own save_last is turned off")
                callback.save_last = False
        if trainer.checkpoint_callbacks and not trainer.fast_dev_run:
            trainer.callbacks.append(LastCheckpoint(run.checkpoints))
        if not trainer.fast_dev_run:
            resolved = _flat_data(_plain(config))
            trainer.callbacks.append(RunSummary(run.path, config=resolved, config_hash=config_hash(resolved)))
        if self.subcommand == "predict":
            trainer.callbacks.append(PredictionWriter(run.path / "predictions.csv"))
        if self.subcommand in ("fit", "test"):
            _add_symmetry_diagnostic(trainer)
        return trainer

    def _default_loggers(self, run: RunDirectory) -> list:
        resume_step = None
        if run.existing:  # appending to a run: keep its rows (for fit, those before the resumed checkpoint)
            resume_step = _logging_step(self._ckpt) if self.subcommand == "fit" and self._ckpt else math.inf
        loggers = [RunCSVLogger(save_dir=str(run.root), name=run.name, version=run.version, resume_step=resume_step)]
        if importlib.util.find_spec("tensorboard") is not None:
            from lightning.pytorch.loggers import TensorBoardLogger

            extra = {"purge_step": int(resume_step)} if resume_step not in (None, math.inf) else {}
            loggers.append(TensorBoardLogger(save_dir=str(run.root), name=run.name, version=run.version,
                                             default_hp_metric=False, **extra))
        return loggers

    # -- before/after each command ---------------------------------------------------------------------------------
    def _log_settings(self) -> None:
        """Record the optimizer, scheduler and DP settings in hparams.yaml (the model keeps only picklable hparams)."""
        config = _plain(self._command_config())
        settings = {k: config["model"][k] for k in ("optimizer", "lr_scheduler") if config.get("model", {}).get(k)}
        privacy = [c for c in (config.get("trainer", {}).get("callbacks") or [])
                   if isinstance(c, dict) and "DifferentialPrivacy" in str(c.get("class_path", ""))]
        if privacy:
            settings["privacy"] = privacy[0].get("init_args", {})
        for logger in self.trainer.loggers:
            logger.log_hyperparams(settings)

    def _summary(self) -> RunSummary | None:
        return next((c for c in self.trainer.callbacks if isinstance(c, RunSummary)), None)

    def before_fit(self) -> None:
        self._log_settings()

    def _before_evaluation(self, command: str) -> None:
        self._log_settings()
        if not self._ckpt:  # (init_from loads at fit only: an evaluation without a checkpoint is random weights)
            rank_zero_warn(f"`{command}` without --ckpt_path evaluates freshly initialised (random) weights; pass "
                           f"--ckpt_path <run>/checkpoints/best.ckpt (or `last`)")
        summary = self._summary()
        if summary is not None:
            summary.tested_checkpoint = self._ckpt or "initial weights"

    def before_test(self) -> None:
        self._before_evaluation("test")

    def before_validate(self) -> None:
        self._before_evaluation("validate")

    def before_predict(self) -> None:
        self._before_evaluation("predict")

    def after_fit(self) -> None:
        if not self._command_config().get("test_after_fit"):
            return
        best, why_not = self._best_checkpoint()
        if best is None:  # e.g. --trainer.fast_dev_run: test what we have rather than fail after a good fit
            rank_zero_info(f"test_after_fit: {why_not}, so the test runs on the weights at the end of fit.")
        summary = self._summary()
        if summary is not None:
            summary.tested_checkpoint = best or "final weights"
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

    def outcome(self) -> str:
        """The last line of a command: where its results are."""
        run = self.run_dir.path if self.run_dir else Path(self.trainer.default_root_dir)
        writer = next((c for c in self.trainer.callbacks if isinstance(c, PredictionWriter)), None)
        if writer is not None and writer.written is not None:
            return f"predictions: {writer.written} ({writer.rows} rows)"
        summary = run / "summary.json"
        return f"run directory: {run}" + (f" (summary: {summary})" if summary.is_file() else "")


def _add_symmetry_diagnostic(trainer) -> None:
    """Every test reports ``test/invariance_error`` (the logits' change under the model group's generators; for
    plain backbones under rot90 and the flip): one extra forward per generator. A configured ``Robustness`` callback
    (e.g. configs/evaluation/robustness.yaml) does this itself."""
    from .evaluation import Robustness

    if not any(isinstance(c, Robustness) for c in trainer.callbacks):
        trainer.callbacks.append(Robustness(rotations=[], flips=False, attacks=None, symmetry=True))


def _plain(config) -> dict[str, Any]:
    """A jsonargparse Namespace as plain JSON-able dicts (class paths and paths as strings)."""
    as_dict = config.as_dict() if hasattr(config, "as_dict") else dict(config)
    return json.loads(json.dumps(as_dict, default=str))


_DEFAULT_DATA = ("eqlightning.MedMNISTDataModule", "eqlightning.data.MedMNISTDataModule",
                 "eqlightning.data.medmnist.MedMNISTDataModule")


def _flat_data(config: dict[str, Any]) -> dict[str, Any]:
    """``data: {class_path, init_args: {...}}`` (how the CLI resolves the data module) as ``data: {...}`` with
    ``class_path`` only for a non-default class, so summaries, hashes and studies read ``data.flag`` as before."""
    data = config.get("data")
    if isinstance(data, dict) and isinstance(data.get("init_args"), dict):
        flat = dict(data["init_args"])
        if data.get("class_path") not in _DEFAULT_DATA:
            flat["class_path"] = data.get("class_path")
        config = {**config, "data": flat}
    return config


def config_hash(config: dict[str, Any]) -> str:
    """SHA-256 (first 16 hex digits) of the configuration without the keys that only say where the run goes."""
    what = {k: v for k, v in config.items() if k not in _LOCATION_KEYS}
    return hashlib.sha256(json.dumps(what, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _logging_step(ckpt: str) -> float:
    """The logging step a checkpoint was saved at: rows of metrics.csv from that step on are logged again."""
    state = torch.load(ckpt, map_location="cpu", weights_only=False, mmap=True)
    epoch_loop = state.get("loops", {}).get("fit_loop", {}).get("epoch_loop.state_dict", {})
    return float(epoch_loop.get("_batches_that_stepped", state.get("global_step", 0)))


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


def run_cli(args: list[str] | None = None, run: bool = True,
            cli_class: type[EqLightningCLI] = EqLightningCLI) -> EqLightningCLI:
    """Run one CLI command and return the LightningCLI object (for use from Python and tests; errors raise)."""
    inherited_run_id = _RUN_ID_ENV in os.environ  # set by a parent process of the same (DDP) run
    no_exit = {"exit_on_error": False}
    parser_kwargs = {**no_exit, **({name: no_exit for name in cli_class.subcommands()} if run else {})}
    try:
        return cli_class(ImageClassifier, MedMNISTDataModule, seed_everything_default=0, args=args, run=run,
                         parser_kwargs=parser_kwargs, subclass_mode_data=True)
    finally:
        if not inherited_run_id:  # the next run started from this process gets its own directory
            os.environ.pop(_RUN_ID_ENV, None)


#: Errors a user fixes by changing a value (shown as one line); anything else is a bug (shown with its traceback).
USER_ERRORS = (ArgumentError, ValueError, TypeError, FileNotFoundError, FileExistsError, KeyError, ImportError)


def main(args: list[str] | None = None) -> int:
    """Entry point of ``python cli.py`` and the ``eqlightning`` console script; returns the exit status."""
    given = sys.argv[1:] if args is None else list(args)
    if given[:1] == ["list"]:
        from .listing import list_command

        return list_command(given[1:])
    if given[:1] == ["study"]:
        from .studies.cli import main as study_main

        return study_main(given[1:])
    debug = os.environ.get(DEBUG_ENV, "") not in ("", "0")
    created: list[RunDirectory] = []

    class TrackedCLI(EqLightningCLI):  # remembers its run directory, to remove it if the command fails early
        def before_instantiate_classes(self) -> None:
            super().before_instantiate_classes()
            created.append(self.run_dir)

    try:
        cli = run_cli(args, cli_class=TrackedCLI)
    except SIGTERMException:
        print("eqlightning: stopped by SIGTERM; checkpoints/last.ckpt holds the state at the last finished batch: "
              "run the same command with --ckpt_path last to resume", file=sys.stderr)
        return EXIT_SIGTERM
    except SystemExit as stop:  # --help, --print_config (0), Lightning after Ctrl-C (1)
        _cleanup(created)
        return stop.code if isinstance(stop.code, int) else (0 if stop.code is None else 1)
    except USER_ERRORS as error:
        _cleanup(created)
        if debug:
            raise
        print(f"eqlightning: error: {short_message(error)}\n(set {DEBUG_ENV}=1 for the full traceback)",
              file=sys.stderr)
        return EXIT_USER_ERROR
    except BaseException:
        _cleanup(created)
        raise
    if cli.trainer.is_global_zero:
        print(cli.outcome())
    return 0


def _cleanup(created: list[RunDirectory]) -> None:
    for run in created:
        if run is not None and int(os.environ.get("LOCAL_RANK", "0")) == 0 and remove_if_empty(run):
            print(f"eqlightning: removed the empty run directory {run.path}", file=sys.stderr)


def short_message(error: BaseException) -> str:
    """One line (or a few) naming the bad value and the fix, from an exception raised while parsing or running."""
    text = str(error).strip() or type(error).__name__
    if isinstance(error, ArgumentError) or "Parser key" in text or "Given value" in text:
        return _short_parser_message(text)
    if isinstance(error, KeyError):
        text = text.strip("'\"")
    cause = error.__cause__ or error.__context__
    while cause is not None and isinstance(cause, USER_ERRORS) and str(cause).strip():
        if len(str(cause)) < len(text) and "Problem with given class_path" in text:
            text = str(cause).strip()  # the innermost message of a failed instantiation
        cause = cause.__cause__ or cause.__context__
    return text.splitlines()[0] if len(text.splitlines()) > 3 else text


def _short_parser_message(text: str) -> str:
    """jsonargparse's union-type report (dozens of lines) -> 'key: value is not valid (expected ...)' plus the
    innermost message of ours it contains, if any."""
    keys = re.findall(r'(?:Parser key|Key) "([^"]+)"', text)
    given = re.findall(r"Given value: (.*)", text)
    expected = list(dict.fromkeys(re.findall(r"Expected a <class '([\w.]+)'>", text)))
    ours = [line.strip() for line in text.splitlines()
            if re.search(r"(unknown|must be|got|Did you mean|not found|no such)", line) and "Given value" not in line
            and "Parser key" not in line and "Expected a" not in line]
    unrecognized = re.search(r"Unrecognized arguments: (.*)", text)
    if unrecognized:
        return f"unrecognized arguments: {unrecognized.group(1).strip()} (see --help for the options)"
    if keys:
        key = "--" + keys[0]
        value = given[-1].strip() if given else None
        if ours:
            return f"{key}: {ours[-1]}"
        if value is not None:
            hint = f" (expected {' or '.join('null' if t == 'NoneType' else t for t in expected)})" if expected else ""
            return f"{key}: {value!r} is not valid{hint}"
        return f"{key}: {text.splitlines()[-1].strip()}"
    return ours[-1] if ours else text.splitlines()[0]


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
