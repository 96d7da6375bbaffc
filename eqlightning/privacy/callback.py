"""``DifferentialPrivacy``: a Lightning callback that makes any training run DP-SGD with an (epsilon, delta) budget.

    trainer = Trainer(callbacks=[DifferentialPrivacy(target_epsilon=8.0)], ...)   # or in YAML: trainer.callbacks

The callback only orchestrates; the work is done by the engine (:func:`~eqlightning.privacy.engine.make_private`:
Poisson loader, per-sample gradient mechanism, DP optimizer) and the ledger (:mod:`~.accounting`). At ``fit`` start
(after Lightning created the optimizer and wrapped DDP) it refuses layers with batch statistics, makes the run's
loader, model and optimizer private, calibrates the noise so the planned steps spend ``target_epsilon`` and
computes how many steps the budget allows. During training it accounts every step and logs ``dp/epsilon``: always
the exact spend of the steps taken so far. It skips (and stops before) any step that would take epsilon past the
target, saves a checkpoint when the budget is reached, and keeps in every checkpoint what a resumed run needs to be
the run that was never interrupted: the ledger, the random streams of the sampler (every rank's) and the noise.
``test`` reports ``dp/epsilon`` / ``dp/delta``.

Sharp edges it guards against: batch norm (refused), shuffled batches (Poisson is enforced; opting out warns that
epsilon is not a guarantee), DDP ranks drifting apart (the distributed DP optimizer all-reduces the noised
gradient), Lightning's distributed sampler (must be off), ranks sharing a random stream (each rank has its own),
gradient accumulation (use ``max_physical_batch_size``), delta >= 1/N (refused), a run that takes another number of
steps than the noise was calibrated for (warned, with both numbers).
"""

from __future__ import annotations

import math
import time
from pathlib import Path

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn

from . import _lightning
from .accounting import ACCOUNTANTS, PrivacyLedger, calibrate_noise
from .ema import WeightEMA
from .engine import make_private
from .mechanisms import list_mechanisms
from .sampling import PrivateDataLoader, stream_seed
from .validation import check_dp_compatible

_NOISE_STREAM = 0x4E6F697365  # stream key of the noise generator ("Noise")


def _positive(name: str, value, integer: bool = False, allow_none: bool = True) -> None:
    if value is None and allow_none:
        return
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value > 0
    if integer:
        ok = ok and float(value).is_integer()
    if not ok:
        kind = "a positive integer" if integer else "a positive, finite number"
        raise ValueError(f"DifferentialPrivacy: {name} must be {kind}, got {value!r}")


class DifferentialPrivacy(Callback):
    """DP-SGD for any LightningModule, with (epsilon, delta) accounting that survives restarts.

    Args:
        target_epsilon: privacy budget; the noise multiplier is calibrated so the planned steps spend it, and
            training stops before a step would exceed it. Give this or ``noise_multiplier``.
        noise_multiplier: fixed noise std / max_grad_norm (then epsilon is only reported, with no stop).
        delta: target delta, below 1/N for N training examples. Default: ``0.1 / N``.
        max_grad_norm: per-sample clipping bound C.
        accountant: ``"prv"`` (default, tightest), ``"rdp"`` or ``"gdp"``.
        epochs / steps: the schedule the noise is calibrated for (default: the trainer's ``max_epochs``).
        augmult: augmented views per sample whose gradients are averaged before clipping (1 = off).
        ema_decay: keep an EMA of the weights (e.g. 0.999) and evaluate with it.
        max_physical_batch_size: split each Poisson batch into micro-batches of at most this many samples (the
            optimizer steps once per logical batch), so memory does not limit the batch size.
        poisson_sampling: keep True. False trains on shuffled batches and warns that the reported epsilon is not
            a formal guarantee.
        grad_sample_mode: the per-sample gradient mechanism: ``"fused"`` (default: equivariant convolutions
            compute per-sample gradients inside their own backward), ``"hooks"`` (per-layer rules) or
            ``"functorch"`` (``torch.func`` for every layer); see :mod:`eqlightning.privacy.mechanisms`.
        seed: seed of the sampling and noise streams (default: the global seed at the first fit). Each rank and
            each epoch gets its own stream; the streams' state is saved in checkpoints. Like Opacus without
            ``secure_mode``, the noise comes from a seeded pseudo-random generator: keep the seed private.
    """

    #: tells other components (e.g. ImageClassifier's test report) that this callback logs dp/epsilon itself
    reports_privacy = True

    def __init__(self, target_epsilon: float | None = None, noise_multiplier: float | None = None,
                 delta: float | None = None, max_grad_norm: float = 1.0, accountant: str = "prv",
                 epochs: int | None = None, steps: int | None = None, augmult: int = 1,
                 ema_decay: float | None = None, max_physical_batch_size: int | None = None,
                 poisson_sampling: bool = True, grad_sample_mode: str = "fused", seed: int | None = None):
        super().__init__()
        if (target_epsilon is None) == (noise_multiplier is None):
            raise ValueError("DifferentialPrivacy: give exactly one of target_epsilon (the noise is calibrated to "
                             "spend it) or noise_multiplier (epsilon is then reported, not targeted)")
        _positive("target_epsilon", target_epsilon)
        if noise_multiplier is not None and not (isinstance(noise_multiplier, (int, float))
                                                 and math.isfinite(noise_multiplier) and noise_multiplier >= 0):
            raise ValueError(f"DifferentialPrivacy: noise_multiplier must be >= 0 and finite, got {noise_multiplier!r}")
        if delta is not None and not (isinstance(delta, (int, float)) and 0 < delta < 1):
            raise ValueError(f"DifferentialPrivacy: delta must be in (0, 1) (typically below 1/N), got {delta!r}")
        _positive("max_grad_norm", max_grad_norm, allow_none=False)
        if accountant not in ACCOUNTANTS:
            raise ValueError(f"DifferentialPrivacy: accountant must be one of {ACCOUNTANTS}, got {accountant!r}")
        if epochs is not None and steps is not None:
            raise ValueError("DifferentialPrivacy: plan with epochs or steps, not both")
        _positive("epochs", epochs, integer=True)
        _positive("steps", steps, integer=True)
        _positive("augmult", augmult, integer=True, allow_none=False)
        _positive("max_physical_batch_size", max_physical_batch_size, integer=True)
        if ema_decay is not None and not (0 <= ema_decay < 1):
            raise ValueError(f"DifferentialPrivacy: ema_decay must be in [0, 1), got {ema_decay!r}")
        if grad_sample_mode not in list_mechanisms():
            raise ValueError(f"DifferentialPrivacy: grad_sample_mode must be one of {list_mechanisms()}, got "
                             f"{grad_sample_mode!r}")
        self.target_epsilon, self.noise_multiplier, self.delta = target_epsilon, noise_multiplier, delta
        self.max_grad_norm, self.accountant = float(max_grad_norm), accountant
        self.epochs, self.steps, self.augmult = epochs, steps, int(augmult)
        self.ema_decay, self.max_physical_batch_size = ema_decay, max_physical_batch_size
        self.poisson_sampling, self.grad_sample_mode, self.seed = poisson_sampling, grad_sample_mode, seed
        self.ledger: PrivacyLedger | None = None
        self.sample_rate: float | None = None
        self.budget_steps: float = math.inf
        self.ema: WeightEMA | None = None
        self.accounting_seconds = 0.0  # time spent computing epsilon (calibration, budget, every step)
        self._restored: dict | None = None
        self._private = None  # the engine's PrivateTraining while fitting
        self._loader: PrivateDataLoader | None = None
        self._noise: torch.Generator | None = None
        self._restore_loader = None
        self._stepped = False
        self._budget_reported = False
        self._run_steps = 0
        self._mid_batch_warned = False
        self._planned = 0
        self._test_ema: WeightEMA | None = None

    # ------------------------------------------------------------------ setup
    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        check_dp_compatible(pl_module)
        if trainer.accumulate_grad_batches != 1:
            raise ValueError("DifferentialPrivacy: Trainer(accumulate_grad_batches>1) breaks Poisson batches; use "
                             "DifferentialPrivacy(max_physical_batch_size=...) for large batches instead")

    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        # a checkpoint being resumed, or this callback's own state when it is reused for another fit: the
        # accounting and the random streams continue either way (epsilon never resets, no batch is redrawn)
        state = self._restored or (self.state_dict() if self.ledger is not None else {})
        self._restored = None
        base, install, self._restore_loader = _lightning.training_loader(trainer, pl_module)
        n_train, world = len(base.dataset), trainer.world_size
        if state.get("seed") is not None:
            self.seed = int(state["seed"])
        elif self.seed is None:
            self.seed = int(torch.initial_seed())
        self.delta = state.get("delta", self.delta) or 0.1 / n_train
        if self.delta >= 1.0 / n_train:
            raise ValueError(f"DifferentialPrivacy: delta={self.delta:.3g} is not below 1/N = {1 / n_train:.3g} for "
                             f"N={n_train} training examples (it would allow releasing whole examples); use e.g. "
                             f"delta={0.1 / n_train:.2g}")
        if self._noise is None:
            self._noise = torch.Generator(device=pl_module.device)
            self._noise.manual_seed(stream_seed(self.seed, _NOISE_STREAM))
        if state.get("noise_rng") is not None:
            self._noise.set_state(state["noise_rng"])

        self.sample_rate = 1.0 / len(base)  # the Poisson loader's rate (one expected pass per epoch)
        steps_per_epoch = len(base)
        planned = self._planned_steps(trainer, steps_per_epoch)
        started = time.perf_counter()
        self.ledger = PrivacyLedger.from_state_dict(state["ledger"]) if "ledger" in state else \
            PrivacyLedger(self.accountant, self.delta)
        if "noise_multiplier" in state:  # resuming: keep the schedule the budget was planned with
            self.noise_multiplier = state["noise_multiplier"]
        elif self.noise_multiplier is None:
            self.noise_multiplier = calibrate_noise(self.target_epsilon, self.delta, self.sample_rate, planned,
                                                    self.accountant)
        remaining = max(0, self._trainer_steps(trainer, steps_per_epoch) - self.ledger.steps)
        self._run_steps = self.ledger.steps + remaining  # where this run ends without a budget stop
        if self.target_epsilon is not None:
            self.budget_steps = self.ledger.steps + self.ledger.max_steps(
                self.target_epsilon, self.noise_multiplier, self.sample_rate, hint=max(1, planned - self.ledger.steps),
                cap=max(1, remaining))
        horizon = min(self._run_steps, self.budget_steps) - self.ledger.steps
        if horizon > 0 and self.noise_multiplier > 0:  # every value shown during training, computed here at once
            self.ledger.precompute(self.noise_multiplier, self.sample_rate, int(horizon))
        self.accounting_seconds += time.perf_counter() - started
        self._planned = planned

        scaler = getattr(trainer.precision_plugin, "scaler", None)
        if len(trainer.strategy.optimizers) != 1:
            raise ValueError(f"DifferentialPrivacy supports one optimizer, got {len(trainer.strategy.optimizers)}")
        # the DDP-wrapped module under DDP: its forward is the one that runs
        self._private = make_private(
            trainer.strategy.model, trainer.strategy.optimizers[0], base, noise_multiplier=self.noise_multiplier,
            max_grad_norm=self.max_grad_norm, mechanism=self.grad_sample_mode, distributed=world > 1,
            world_size=world, augmult=self.augmult, max_physical_batch_size=self.max_physical_batch_size,
            grad_scale=scaler.get_scale if scaler is not None else None, noise_generator=self._noise, seed=self.seed,
            rank=trainer.global_rank, poisson_sampling=self.poisson_sampling)
        self._loader, self.sample_rate = self._private.loader, self._private.sample_rate
        if not self.poisson_sampling:
            rank_zero_warn("DifferentialPrivacy(poisson_sampling=False): batches are shuffled, not Poisson-sampled, "
                           "so the reported epsilon is NOT a formal privacy guarantee")
        if state.get("sampling") is not None:
            self._loader.load_state_dict(state["sampling"])
        install(self._loader)

        self._optimizer = self._private.optimizer
        self._optimizer.attach_step_hook(self._after_private_step)
        trainer.strategy.optimizers = [self._optimizer]
        if self.ema_decay is not None:
            self.ema = WeightEMA(pl_module, self.ema_decay)
            if "ema" in state:
                self.ema.load_state_dict(state["ema"])
        rank_zero_info(
            f"DP-SGD: sample rate {self.sample_rate:.5f} ({n_train} examples, E[batch] {self.sample_rate * n_train:.1f}"
            f"), noise multiplier {self.noise_multiplier:.4f}, clip {self.max_grad_norm}, delta {self.delta:.3g}, "
            f"{self.accountant} accountant, {self.grad_sample_mode} per-sample gradients; planned {planned} steps"
            + (f", budget epsilon {self.target_epsilon} allows {self.budget_steps} steps in total"
               if self.target_epsilon is not None else "")
            + (f"; resuming after {self.ledger.steps} steps (epsilon {self.ledger.epsilon():.4f})"
               if self.ledger.steps else ""))

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        loader = trainer.train_dataloader
        if loader is not self._loader:
            raise ValueError("DifferentialPrivacy: Lightning replaced the Poisson-sampled training loader (it does "
                             "under DDP with use_distributed_sampler=True): set Trainer(use_distributed_sampler="
                             "False) (YAML: trainer.use_distributed_sampler: false)")
        self._warn_if_run_differs_from_plan(trainer)

    def _warn_if_run_differs_from_plan(self, trainer: Trainer) -> None:
        batches = len(self._loader)
        limited = trainer.num_training_batches < batches
        steps_per_epoch = len(self._loader.batch_sampler.sampler)
        if limited:  # limit_train_batches / fast_dev_run: count logical batches within the limit
            steps_per_epoch = max(1, int(trainer.num_training_batches * steps_per_epoch / batches))
        actual = min(self._trainer_steps(trainer, steps_per_epoch), self.budget_steps)
        if self.target_epsilon is not None and actual != self._planned and not self.ledger.steps:
            spent = self.ledger.epsilon(actual, self.noise_multiplier, self.sample_rate)
            rank_zero_warn(f"DifferentialPrivacy: the noise was calibrated for {self._planned} steps, but this run "
                           f"will take {actual} (limit_train_batches, fast_dev_run, max_steps or max_epochs differ "
                           f"from the plan): it will spend epsilon {spent:.4g}, not {self.target_epsilon}")

    # --------------------------------------------------------------- training
    def _after_private_step(self, optimizer) -> None:  # Opacus step hook: once per real (noised) step
        self.ledger.step(self.noise_multiplier, self.sample_rate)
        self._stepped = True

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        ends_logical_batch = self._loader.batch_sampler.pop_end()
        over_budget = self.ledger.steps >= self.budget_steps
        self._optimizer.signal_skip_step(do_skip=over_budget or not ends_logical_batch)
        if over_budget:
            trainer.should_stop = True

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self._stepped:
            self._stepped = False
            if self.ema is not None:
                self.ema.update()
        pl_module.log("dp/epsilon", self.epsilon, on_step=True, on_epoch=False, prog_bar=True)
        if self.budget_steps <= self.ledger.steps < self._run_steps and not self._budget_reported:
            self._budget_reported = True
            trainer.should_stop = True
            path = self._budget_checkpoint_path(trainer)
            trainer.save_checkpoint(path)
            rank_zero_info(f"DP-SGD: the privacy budget epsilon={self.target_epsilon} allows no further step "
                           f"(spent {self.epsilon:.4f} in {self.ledger.steps} steps); training stops. "
                           f"Checkpoint: {path}")

    @staticmethod
    def _budget_checkpoint_path(trainer: Trainer) -> str:
        callback = trainer.checkpoint_callback
        directory = getattr(callback, "dirpath", None) or trainer.default_root_dir
        return str(Path(directory) / "dp-budget-reached.ckpt")

    def _planned_steps(self, trainer: Trainer, steps_per_epoch: int) -> int:
        if self.steps is not None:
            return int(self.steps)
        if self.epochs is not None:
            return int(self.epochs) * steps_per_epoch
        return self._trainer_steps(trainer, steps_per_epoch)

    @staticmethod
    def _trainer_steps(trainer: Trainer, steps_per_epoch: int) -> int:
        by_epochs = trainer.max_epochs * steps_per_epoch if trainer.max_epochs not in (None, -1) else math.inf
        by_steps = trainer.max_steps if trainer.max_steps not in (None, -1) else math.inf
        steps = min(by_epochs, by_steps)
        if not math.isfinite(steps):
            raise ValueError("DifferentialPrivacy: set Trainer(max_epochs=...) or DifferentialPrivacy(epochs=... or "
                             "steps=...) so the noise can be calibrated for a known number of steps")
        return int(steps)

    # ------------------------------------------------------------- evaluation
    def on_validation_start(self, trainer, pl_module) -> None:
        if self.ema is not None:
            self.ema.swap_in()

    def on_validation_end(self, trainer, pl_module) -> None:
        if self.ema is not None:
            self.ema.swap_out()

    def on_test_start(self, trainer, pl_module) -> None:
        # Testing a checkpoint: its weights come from the file, so the EMA must too. Epsilon: the whole run's when
        # this process trained it (choosing among checkpoints is post-processing of the run), else the file's (the
        # spend of the steps that produced that checkpoint).
        state = self._state_from_checkpoint(trainer)
        if self.ledger is None and state:
            self.ledger = PrivacyLedger.from_state_dict(state["ledger"])
        self._test_ema = self.ema
        if state and "ema" in state and self.ema_decay is not None:
            self._test_ema = WeightEMA(pl_module, self.ema_decay)
            self._test_ema.load_state_dict(state["ema"])
        if self._test_ema is not None:
            self._test_ema.swap_in()

    def on_test_epoch_end(self, trainer, pl_module) -> None:
        if self.ledger is not None:
            pl_module.log("dp/epsilon", self.epsilon)
            pl_module.log("dp/delta", self.ledger.delta)

    def on_test_end(self, trainer, pl_module) -> None:
        if self._test_ema is not None:
            self._test_ema.swap_out()
            self._test_ema = None

    def _state_from_checkpoint(self, trainer: Trainer) -> dict | None:
        path = trainer.ckpt_path
        if not path:
            return None
        checkpoint = torch.load(path, map_location="cpu", weights_only=False)
        return checkpoint.get("callbacks", {}).get(self.state_key)

    # ----------------------------------------------------------- end and state
    def on_fit_end(self, trainer, pl_module) -> None:
        if self.ledger is None:
            return
        if self.ledger.steps < min(self._run_steps, self.budget_steps) and self.target_epsilon is not None:
            rank_zero_warn(f"DifferentialPrivacy: training ended after {self.ledger.steps} of the "
                           f"{min(self._run_steps, self.budget_steps)} steps the noise was calibrated for (max_time, "
                           f"early stopping or an interruption): spent epsilon {self.epsilon:.4f} of "
                           f"{self.target_epsilon}")
        rank_zero_info(f"DP-SGD: spent epsilon {self.epsilon:.4f} at delta {self.ledger.delta:.3g} "
                       f"({self.accountant}) in {self.ledger.steps} steps; accounting took "
                       f"{self.accounting_seconds:.2f} s")

    def teardown(self, trainer, pl_module, stage: str) -> None:
        if stage != "fit":
            return
        if self._private is not None:
            self._private.detach()  # remove the hooks and the engine's attributes from the user's model
            self._private = None
        if self._restore_loader is not None:
            self._restore_loader()
            self._restore_loader = None

    @property
    def budget_reached(self) -> bool:
        """Whether training stopped (or will stop) because the budget allows no further step before the planned end."""
        return self.ledger is not None and self.budget_steps <= self.ledger.steps < self._run_steps

    def state_dict(self) -> dict:
        if self.ledger is None:
            return dict(self._restored or {})
        state = {"ledger": self.ledger.state_dict(), "delta": self.ledger.delta,
                 "noise_multiplier": self.noise_multiplier, "sample_rate": self.sample_rate,
                 "max_grad_norm": self.max_grad_norm, "target_epsilon": self.target_epsilon,
                 "epsilon": self.epsilon, "steps": self.ledger.steps, "accountant": self.accountant,
                 "seed": self.seed}
        if self._loader is not None:
            sampler = self._loader.batch_sampler
            if sampler.mid_logical_batch and not self._mid_batch_warned:
                self._mid_batch_warned = True
                rank_zero_warn("DifferentialPrivacy: a checkpoint was saved between the micro-batches of one "
                               "logical batch; a run resumed from it restarts that logical batch")
            state["sampling"] = sampler.state_dict()
        if self._noise is not None:
            state["noise_rng"] = self._noise.get_state()
        if self.ema is not None:
            state["ema"] = self.ema.state_dict()
        return state

    def load_state_dict(self, state_dict: dict) -> None:
        self._restored = dict(state_dict)

    @property
    def epsilon(self) -> float:
        """Epsilon spent so far: the exact value for the steps taken (0 before training)."""
        if self.ledger is None:
            return 0.0
        started = time.perf_counter()
        value = self.ledger.epsilon()
        self.accounting_seconds += time.perf_counter() - started
        return value
