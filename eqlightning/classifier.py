"""``ImageClassifier``: a LightningModule around any registered backbone, with MedMNIST's losses and metrics."""

from __future__ import annotations

from typing import Any

import lightning.pytorch as L
import torch
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from lightning.pytorch.utilities import rank_zero_warn

from . import tasks
from .models import create_backbone


class ImageClassifier(L.LightningModule):
    """Image classification with a backbone from the registry (``eqlightning.list_backbones()``).

    The backbone is given by name and keyword arguments, so a checkpoint alone rebuilds the model
    (``ImageClassifier.load_from_checkpoint(path)``). Loss and metrics follow ``task`` (see :mod:`eqlightning.tasks`);
    it logs ``train/loss``, ``val/loss``, ``val/acc``, ``val/auc``, ``test/acc`` and ``test/auc``. Under LightningCLI
    ``num_classes``, ``in_channels``, ``task`` and ``input_size`` are linked from the data module.

    Testing a checkpoint of a private (DP-SGD) run also logs the ``dp/epsilon`` and ``dp/delta`` stored in it, even
    without the ``DifferentialPrivacy`` callback (which, when present, reports them itself); see
    :attr:`checkpoint_privacy`.

    Args:
        backbone: registered backbone name, e.g. ``"eq_resnet18"``, ``"resnet18"``.
        backbone_kwargs: options of that backbone, e.g. ``{"group": "D4", "width_multiplier": 0.5}``.
        num_classes: number of classes (labels for multi-label tasks).
        in_channels: image channels.
        task: medmnist task name ('multi-class', 'binary-class', 'multi-label, binary-class', 'ordinal-regression').
        input_size: image size the backbone is built for.
        optimizer: a callable ``params -> Optimizer`` (in YAML: ``class_path``/``init_args``); default Adam(1e-3).
        lr_scheduler: optional callable ``optimizer -> LR scheduler`` (stepped every epoch).
        label_smoothing: for the cross-entropy tasks.
    """

    def __init__(self, backbone: str = "eq_resnet8", backbone_kwargs: dict[str, Any] | None = None,
                 num_classes: int = 2, in_channels: int = 1, task: str = "multi-class", input_size: int = 28,
                 optimizer: OptimizerCallable = torch.optim.Adam, lr_scheduler: LRSchedulerCallable | None = None,
                 label_smoothing: float = 0.0):
        super().__init__()
        self.save_hyperparameters(ignore=["optimizer", "lr_scheduler"])
        self.task = tasks.normalize_task(task, num_classes)
        kwargs = {"input_size": input_size, **(backbone_kwargs or {})}
        self.backbone = create_backbone(backbone, in_channels=in_channels, num_classes=num_classes, **kwargs)
        self.optimizer_factory, self.lr_scheduler_factory = optimizer, lr_scheduler
        self.label_smoothing = label_smoothing
        self.val_metrics = tasks.make_metrics(self.task, num_classes, prefix="val/")
        self.test_metrics = tasks.make_metrics(self.task, num_classes, prefix="test/")
        #: The privacy state (``epsilon``, ``delta``, ``steps``, ...) of the DP checkpoint these weights were loaded
        #: from; None for a non-private checkpoint, and after any training (the weights are then no longer those).
        self.checkpoint_privacy: dict[str, Any] | None = None

    @property
    def group(self) -> str | None:
        """The group the logits are invariant to (None for plain backbones)."""
        return self.backbone.group

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.backbone(x)

    def loss(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return tasks.loss_fn(self.task, logits, target, self.label_smoothing)

    def training_step(self, batch, batch_idx: int) -> torch.Tensor:
        x, y = batch
        loss = self.loss(self(x), y)
        self.log("train/loss", loss, on_step=True, on_epoch=True, prog_bar=True, batch_size=len(x))
        return loss

    def _eval_step(self, batch, metrics, stage: str) -> None:
        x, y = batch
        logits = self(x)
        self.log(f"{stage}/loss", self.loss(logits, y), on_epoch=True, batch_size=len(x), sync_dist=True)
        metrics.update(*tasks.metric_inputs(self.task, tasks.scores(self.task, logits), y))
        self.log_dict(metrics, on_epoch=True, on_step=False, prog_bar=stage == "val", batch_size=len(x))

    def validation_step(self, batch, batch_idx: int) -> None:
        self._eval_step(batch, self.val_metrics, "val")

    def test_step(self, batch, batch_idx: int) -> None:
        self._eval_step(batch, self.test_metrics, "test")

    def on_test_epoch_end(self) -> None:
        reported = any(getattr(c, "reports_privacy", False) for c in self.trainer.callbacks)
        if self.checkpoint_privacy is None or reported:  # not private, or the DP callback logs the numbers itself
            return
        self.log("dp/epsilon", self.checkpoint_privacy["epsilon"])
        if "delta" in self.checkpoint_privacy:
            self.log("dp/delta", self.checkpoint_privacy["delta"])

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self.checkpoint_privacy = privacy_state(checkpoint)

    def on_fit_start(self) -> None:
        self.checkpoint_privacy = None  # training moves the weights away from the checkpoint's epsilon

    def predict_step(self, batch, batch_idx: int) -> torch.Tensor:
        x = batch[0] if isinstance(batch, (tuple, list)) else batch
        return tasks.scores(self.task, self(x))

    def configure_optimizers(self):
        optimizer = self.optimizer_factory(self.parameters())
        if self.lr_scheduler_factory is None:
            return optimizer
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": self.lr_scheduler_factory(optimizer),
                                                         "interval": "epoch"}}


def privacy_state(checkpoint: dict[str, Any]) -> dict[str, Any] | None:
    """The ``DifferentialPrivacy`` callback's state saved in a Lightning checkpoint (a dict with ``epsilon``,
    ``delta``, ``steps``, ...), or None for a non-private checkpoint. Reads the dict only: nothing from Opacus."""
    callbacks = checkpoint.get("callbacks")
    for key, state in (callbacks.items() if isinstance(callbacks, dict) else ()):
        if not (str(key).startswith("DifferentialPrivacy") and isinstance(state, dict) and "epsilon" in state):
            continue
        try:
            numbers = {name: float(state[name]) for name in ("epsilon", "delta") if name in state}
        except (TypeError, ValueError):
            rank_zero_warn(f"checkpoint entry {key!r} holds epsilon={state.get('epsilon')!r}, delta="
                           f"{state.get('delta')!r}, not numbers: dp/epsilon is not reported; test with the "
                           f"DifferentialPrivacy callback to recompute it.")
            return None
        scalars = {k: v for k, v in state.items() if v is None or isinstance(v, (bool, int, float, str))}
        return {**scalars, **numbers}  # not the ledger or the EMA weights
    return None
