"""``DifferentialPrivacy``: a Lightning callback that turns any training run into DP-SGD with an (epsilon, delta) budget.

    trainer = Trainer(callbacks=[DifferentialPrivacy(target_epsilon=8.0)], ...)   # or in YAML: trainer.callbacks

What it does, at ``fit`` start (after Lightning has created the optimizer and wrapped DDP):

1. refuses layers with batch statistics (per-sample gradients would be undefined);
2. replaces the training loader with a Poisson-sampled one at rate ``q = 1 / len(loader)`` (optionally with
   ``augmult`` views per sample and physical micro-batches), keeping its dataset, collate and workers;
3. calibrates the noise multiplier so that the planned steps spend ``target_epsilon`` (or takes
   ``noise_multiplier`` as given), and computes how many steps the budget allows;
4. attaches Opacus's per-sample gradient hooks to the (DDP-wrapped) model and wraps the optimizer so every step
   clips each sample's gradient to ``max_grad_norm``, adds Gaussian noise and divides by the expected batch size.

During training it logs ``dp/epsilon`` after every step, skips (and stops before) any step that would take epsilon
past the target, saves a checkpoint when the budget is reached, keeps the accounting in checkpoints (a resumed run
continues it), and reports ``dp/epsilon`` / ``dp/delta`` in ``test``.

Sharp edges it guards against: batch norm (refused), shuffled batches (Poisson is enforced; opting out warns that
epsilon is not a guarantee), DDP ranks drifting apart (the DDP-wrapped module is made private so the distributed
optimizer all-reduces the noised gradients), Lightning's distributed sampler (must be off), ranks sharing a random
stream (each rank gets its own generator), gradient accumulation (use ``max_physical_batch_size``).
"""

from __future__ import annotations

import math
import warnings
from pathlib import Path

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from lightning.pytorch.utilities.model_helpers import is_overridden
from torch.utils.data import DataLoader

from .accounting import ACCOUNTANTS, PrivacyLedger, calibrate_noise
from .ema import WeightEMA
from .fused import PerSampleGradModule, enable_fused
from .optimizer import make_private_optimizer
from .sampling import LogicalBatchSampler, poisson_loader, rank_generator
from .validation import check_dp_compatible

GRAD_SAMPLE_MODES = ("fused", "hooks", "functorch")


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
        delta: target delta. Default: ``0.1 / N`` for a training set of N examples (below 1/N, as DP requires).
        max_grad_norm: per-sample clipping bound C.
        accountant: ``"prv"`` (default, tightest), ``"rdp"`` or ``"gdp"``.
        epochs / steps: the schedule the noise is calibrated for (default: the trainer's ``max_epochs``).
        augmult: augmented views per sample whose gradients are averaged before clipping (1 = off).
        ema_decay: keep an EMA of the weights (e.g. 0.999) and evaluate with it.
        max_physical_batch_size: split each Poisson batch into micro-batches of at most this many samples (the
            optimizer steps once per logical batch), so memory does not limit the batch size.
        poisson_sampling: keep True. False trains on shuffled batches and warns that the reported epsilon is not
            a formal guarantee.
        grad_sample_mode: ``"fused"`` (default: Opacus hooks, with equivariant convolutions computing their
            per-sample gradients inside their own backward instead of an extra weight-gradient pass), ``"hooks"``
            (Opacus's hooks with per-layer rules) or ``"functorch"`` (``torch.func`` for every layer).
        seed: seed of the Poisson sampler (default: derived from the global seed; each rank differs).
    """

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
        if grad_sample_mode not in GRAD_SAMPLE_MODES:
            raise ValueError(f"DifferentialPrivacy: grad_sample_mode must be one of {GRAD_SAMPLE_MODES}, got "
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
        self._restored: dict | None = None
        self._gsm = None
        self._optimizer = None
        self._sampler: LogicalBatchSampler | None = None
        self._patched = None
        self._stepped = False
        self._budget_reported = False
        self._run_steps = 0
        self._test_ema: WeightEMA | None = None

    # ------------------------------------------------------------------ setup
    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        check_dp_compatible(pl_module)
        if trainer.world_size > 1 and getattr(trainer._accelerator_connector, "use_distributed_sampler", False):
            raise ValueError("DifferentialPrivacy under DDP samples the whole dataset with a distributed Poisson "
                             "sampler; Lightning's DistributedSampler must be off: Trainer(use_distributed_sampler="
                             "False) (YAML: trainer.use_distributed_sampler: false)")
        if trainer.accumulate_grad_batches != 1:
            raise ValueError("DifferentialPrivacy: Trainer(accumulate_grad_batches>1) breaks Poisson batches; use "
                             "DifferentialPrivacy(max_physical_batch_size=...) for large batches instead")

    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        distributed = trainer.world_size > 1
        base = self._install_private_loader(trainer, pl_module, distributed)
        n_train = len(base.dataset)
        steps_per_epoch = len(self._sampler.sampler)
        planned = self._planned_steps(trainer, steps_per_epoch)

        # a checkpoint being resumed, or this callback's own state when it is reused for another fit: the
        # accounting continues either way (epsilon never resets)
        state = self._restored or (self.state_dict() if self.ledger is not None else {})
        self._restored = None
        self.delta = state.get("delta", self.delta) or 0.1 / n_train
        self.ledger = PrivacyLedger.from_state_dict(state["ledger"]) if "ledger" in state else \
            PrivacyLedger(self.accountant, self.delta)
        if "noise_multiplier" in state:  # resuming: keep the schedule the budget was planned with
            self.noise_multiplier = state["noise_multiplier"]
        elif self.noise_multiplier is None:
            self.noise_multiplier = calibrate_noise(self.target_epsilon, self.delta, self.sample_rate, planned,
                                                    self.accountant)
        remaining = self._trainer_steps(trainer, steps_per_epoch) - self.ledger.steps
        self._run_steps = self.ledger.steps + max(0, remaining)  # where this run ends without a budget stop
        if self.target_epsilon is not None:
            self.budget_steps = self.ledger.steps + self.ledger.max_steps(
                self.target_epsilon, self.noise_multiplier, self.sample_rate, hint=max(1, planned - self.ledger.steps),
                cap=max(1, remaining))

        # Opacus's hook on the first layer fires before its backward (its input needs no grad): expected, not news
        warnings.filterwarnings("ignore", message="Full backward hook is firing when gradients are computed with "
                                "respect to module outputs since no inputs require gradients")
        model = trainer.strategy.model  # the DDP-wrapped module under DDP: its optimizer must be the distributed one
        if self.grad_sample_mode == "fused":
            enable_fused(pl_module)
        self._gsm = PerSampleGradModule(model, batch_first=True, loss_reduction="mean", strict=True,
                                     force_functorch=self.grad_sample_mode == "functorch")
        if self.max_physical_batch_size is None:
            self._gsm.forbid_grad_accumulation()
        if len(trainer.strategy.optimizers) != 1:
            raise ValueError(f"DifferentialPrivacy supports one optimizer, got {len(trainer.strategy.optimizers)}")
        scaler = getattr(trainer.precision_plugin, "scaler", None)
        self._optimizer = make_private_optimizer(
            trainer.strategy.optimizers[0], distributed=distributed, noise_multiplier=self.noise_multiplier,
            max_grad_norm=self.max_grad_norm, expected_batch_size=self.sample_rate * n_train / trainer.world_size,
            views=self.augmult, grad_scale=scaler.get_scale if scaler is not None else None)
        self._optimizer.attach_step_hook(self._after_private_step)
        trainer.strategy.optimizers = [self._optimizer]

        if self.ema_decay is not None:
            self.ema = WeightEMA(pl_module, self.ema_decay)
            if "ema" in state:
                self.ema.load_state_dict(state["ema"])
        rank_zero_info(
            f"DP-SGD: sample rate {self.sample_rate:.5f} ({n_train} examples, E[batch] {self.sample_rate * n_train:.1f}"
            f"), noise multiplier {self.noise_multiplier:.4f}, clip {self.max_grad_norm}, delta {self.delta:.3g}, "
            f"{self.accountant} accountant; planned {planned} steps"
            + (f", budget epsilon {self.target_epsilon} allows {self.budget_steps} steps in total"
               if self.target_epsilon is not None else "")
            + (f"; resuming after {self.ledger.steps} steps (epsilon {self.ledger.epsilon():.3f})"
               if self.ledger.steps else ""))

    def _install_private_loader(self, trainer: Trainer, pl_module: LightningModule, distributed: bool) -> DataLoader:
        """Build the Poisson loader from the run's training loader and make Lightning use it."""
        source = getattr(trainer.fit_loop, "_data_source", None)
        instance = getattr(source, "instance", None)
        if isinstance(instance, DataLoader):
            base = instance
        else:
            owner = trainer.datamodule if trainer.datamodule is not None and is_overridden(
                "train_dataloader", trainer.datamodule) else pl_module
            if not is_overridden("train_dataloader", owner):
                raise ValueError("DifferentialPrivacy needs the training data as a DataLoader (from a "
                                 "LightningDataModule, LightningModule.train_dataloader, or trainer.fit(...))")
            base = owner.train_dataloader()
        if not isinstance(base, DataLoader):
            raise TypeError(f"DifferentialPrivacy needs a torch DataLoader for training, got {type(base).__name__}")
        seed = self.seed if self.seed is not None else torch.initial_seed()
        generator = rank_generator(seed, trainer.global_rank)
        if self.poisson_sampling:
            loader, self.sample_rate = poisson_loader(base, distributed=distributed, generator=generator,
                                                      views=self.augmult, max_physical=self.max_physical_batch_size)
        else:
            warnings.warn("DifferentialPrivacy(poisson_sampling=False): batches are shuffled, not Poisson-sampled, so "
                          "the reported epsilon is NOT a formal privacy guarantee", UserWarning, stacklevel=2)
            rank_zero_warn("DP WITHOUT POISSON SAMPLING: the reported epsilon is not a formal guarantee")
            batch_sampler = LogicalBatchSampler(base.batch_sampler, self.augmult, self.max_physical_batch_size)
            loader = DataLoader(base.dataset, batch_sampler=batch_sampler, collate_fn=base.collate_fn,
                                num_workers=base.num_workers, pin_memory=base.pin_memory)
            self.sample_rate = 1.0 / len(base)
        self._sampler = loader.batch_sampler
        if isinstance(instance, DataLoader):
            source.instance = loader
            self._patched = (source, "instance", instance)
        else:
            owner.train_dataloader = lambda: loader  # instance attribute: Lightning's hook call picks it up
            self._patched = (owner, "train_dataloader", None)
        return base

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

    # --------------------------------------------------------------- training
    def _after_private_step(self, optimizer) -> None:  # Opacus step hook: once per real (noised) step
        self.ledger.step(self.noise_multiplier, self.sample_rate)
        self._stepped = True

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        ends_logical_batch = self._sampler.pop_end()
        over_budget = self.ledger.steps >= self.budget_steps
        self._optimizer.signal_skip_step(do_skip=over_budget or not ends_logical_batch)
        if over_budget:
            trainer.should_stop = True

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self._stepped:
            self._stepped = False
            if self.ema is not None:
                self.ema.update()
        pl_module.log("dp/epsilon", self._epsilon_for_log(trainer), on_step=True, on_epoch=False, prog_bar=True)
        if self.budget_steps <= self.ledger.steps < self._run_steps and not self._budget_reported:
            self._budget_reported = True
            trainer.should_stop = True
            path = self._budget_checkpoint_path(trainer)
            trainer.save_checkpoint(path)
            rank_zero_info(f"DP-SGD: the privacy budget epsilon={self.target_epsilon} allows no further step "
                           f"(spent {self.ledger.epsilon():.4f} in {self.ledger.steps} steps); training stops. "
                           f"Checkpoint: {path}")

    def _epsilon_for_log(self, trainer: Trainer) -> float:
        steps = self.ledger.steps
        every = max(1, int(getattr(trainer, "log_every_n_steps", 1) or 1))
        if self.accountant != "prv" or steps % every == 0 or steps == 0:
            return self.ledger.epsilon()
        # PRV costs ~1 s per evaluation: between logging steps report the value at the next logging step (an upper
        # bound, since epsilon grows with the steps); the steps Lightning writes are exact.
        return self.ledger.epsilon(extra_steps=every - steps % every)

    @staticmethod
    def _budget_checkpoint_path(trainer: Trainer) -> str:
        callback = trainer.checkpoint_callback
        directory = getattr(callback, "dirpath", None) or trainer.default_root_dir
        return str(Path(directory) / "dp-budget-reached.ckpt")

    # ------------------------------------------------------------- evaluation
    def on_validation_start(self, trainer, pl_module) -> None:
        if self.ema is not None:
            self.ema.swap_in()

    def on_validation_end(self, trainer, pl_module) -> None:
        if self.ema is not None:
            self.ema.swap_out()

    def on_test_start(self, trainer, pl_module) -> None:
        # Testing a checkpoint: its weights come from the file, so the EMA must too. Epsilon: the whole run's when
        # this process trained it (choosing among checkpoints is post-processing of the run), else the file's.
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
            pl_module.log("dp/epsilon", self.ledger.epsilon())
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
        if self.ledger is not None:
            rank_zero_info(f"DP-SGD: spent epsilon {self.ledger.epsilon():.4f} at delta {self.ledger.delta:.3g} "
                           f"({self.accountant}) in {self.ledger.steps} steps")

    def teardown(self, trainer, pl_module, stage: str) -> None:
        if stage != "fit":
            return
        if self._gsm is not None:
            self._gsm.cleanup()  # remove the hooks and Opacus's attributes from the user's model
            self._gsm = None
            enable_fused(pl_module, False)
        if self._patched is not None:
            owner, name, original = self._patched
            if original is None:
                owner.__dict__.pop(name, None)
            else:
                setattr(owner, name, original)
            self._patched = None

    def state_dict(self) -> dict:
        if self.ledger is None:
            return dict(self._restored or {})
        state = {"ledger": self.ledger.state_dict(), "delta": self.ledger.delta,
                 "noise_multiplier": self.noise_multiplier, "sample_rate": self.sample_rate,
                 "max_grad_norm": self.max_grad_norm, "target_epsilon": self.target_epsilon,
                 "epsilon": self.ledger.epsilon(), "steps": self.ledger.steps}
        if self.ema is not None:
            state["ema"] = self.ema.state_dict()
        return state

    def load_state_dict(self, state_dict: dict) -> None:
        self._restored = dict(state_dict)

    @property
    def epsilon(self) -> float:
        """Epsilon spent so far (0 before training)."""
        return 0.0 if self.ledger is None else self.ledger.epsilon()
