"""``ImageClassifier``: a LightningModule around any registered backbone, with MedMNIST's losses and metrics."""

from __future__ import annotations

from typing import Any

import lightning.pytorch as L
import torch
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn

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
        init_from: start the backbone from a checkpoint (a ``.ckpt``, a run directory or a run-name directory, whose
            newest run is used): tensors whose name and shape match are copied, the others (a stem for other
            channels, a head for other classes) rebuilt; loaded at the first ``fit`` (see :mod:`eqlightning.transfer`).
        freeze_stages: freeze the stem and the first ``k`` stages of the backbone during training (0: none).
    """

    def __init__(self, backbone: str = "eq_resnet8", backbone_kwargs: dict[str, Any] | None = None,
                 num_classes: int = 2, in_channels: int = 1, task: str = "multi-class", input_size: int = 28,
                 optimizer: OptimizerCallable = torch.optim.Adam, lr_scheduler: LRSchedulerCallable | None = None,
                 label_smoothing: float = 0.0, init_from: str | None = None, freeze_stages: int = 0):
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

    def setup(self, stage: str) -> None:
        # transfer (init_from / freeze_stages) once, before the optimizer and the DP callback see the parameters;
        # a checkpoint given to fit(ckpt_path=...) is restored after this and overwrites the loaded weights
        if stage != "fit" or getattr(self, "transfer_report", None) is not None:
            return
        from lightning.pytorch.utilities import rank_zero_info

        from .transfer import apply_transfer

        report = apply_transfer(self.backbone, self.hparams.get("init_from"), self.hparams.get("freeze_stages", 0),
                                backbone_name=self.hparams.get("backbone"),
                                load=not getattr(self, "_weights_from_checkpoint", False))
        if report is not None:
            rank_zero_info(str(report))
            #: what the transfer did (source, loaded, reinitialised, frozen, ...), for run summaries
            self.transfer_report = report.to_dict()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.backbone(x)

    def loss(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return tasks.loss_fn(self.task, logits, target, self.label_smoothing)

    def training_step(self, batch, batch_idx: int) -> torch.Tensor:
        x, y = batch
        self._check_batch(x, batch_idx)
        loss = self.loss(self(x), y)
        self.log("train/loss", loss, on_step=True, on_epoch=True, prog_bar=True, batch_size=len(x))
        return loss

    def _eval_step(self, batch, metrics, stage: str, batch_idx: int = 1) -> None:
        x, y = batch
        self._check_batch(x, batch_idx)
        logits = self(x)
        self.log(f"{stage}/loss", self.loss(logits, y), on_epoch=True, batch_size=len(x), sync_dist=True)
        metrics.update(*tasks.metric_inputs(self.task, tasks.scores(self.task, logits), y))
        self.log_dict(metrics, on_epoch=True, on_step=False, prog_bar=stage == "val", batch_size=len(x))

    def validation_step(self, batch, batch_idx: int) -> None:
        self._eval_step(batch, self.val_metrics, "val", batch_idx)

    def test_step(self, batch, batch_idx: int) -> None:
        self._eval_step(batch, self.test_metrics, "test", batch_idx)

    def on_test_epoch_end(self) -> None:
        reported = any(getattr(c, "reports_privacy", False) for c in self.trainer.callbacks)
        if self.checkpoint_privacy is None or reported:  # not private, or the DP callback logs the numbers itself
            return
        self.log("dp/epsilon", self.checkpoint_privacy["epsilon"])
        if "delta" in self.checkpoint_privacy:
            self.log("dp/delta", self.checkpoint_privacy["delta"])

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self.checkpoint_privacy = privacy_state(checkpoint)
        self._weights_from_checkpoint = True
        self._checkpoint_ema = checkpoint_ema(checkpoint)

    def _use_checkpoint_ema(self) -> None:
        """Evaluate a DP checkpoint with its EMA weights, as the private run did, also without the DP callback
        (which otherwise swaps them in itself)."""
        ema, self._checkpoint_ema = getattr(self, "_checkpoint_ema", None), None
        if ema is None or any(getattr(c, "reports_privacy", False) for c in self.trainer.callbacks):
            return
        named = dict(self.named_parameters())
        names = ema.get("names") or [n for n, p in named.items() if p.requires_grad]
        if len(names) != len(ema["shadow"]) or any(n not in named for n in names):
            rank_zero_warn("the checkpoint's EMA weights do not match this model's parameters; evaluating its raw "
                           "weights instead")
            return
        with torch.no_grad():
            for name, value in zip(names, ema["shadow"]):
                named[name].copy_(value.to(named[name].device, named[name].dtype))
        rank_zero_info(f"evaluating the checkpoint's EMA weights (decay {ema.get('decay')}), as its private run did")

    def _check_inputs(self) -> None:
        """A data module whose images do not fit the model fails here, naming both, not in a convolution."""
        data = getattr(self.trainer, "datamodule", None)
        from .models import backbone_entry
        ours, theirs = backbone_entry(self.hparams.backbone).dims, getattr(data, "spatial_dims", None)
        if isinstance(theirs, int) and ours != theirs:
            kinds = {2: "images (2D)", 3: "volumes (3D)"}
            hint = ("a 3D backbone such as eq_resnet8_3d or resnet18_3d" if theirs == 3
                    else "a 2D backbone such as eq_resnet8 or resnet18")
            raise ValueError(f"backbone {self.hparams.backbone!r} takes {kinds[ours]} but the data module "
                             f"{type(data).__name__} ({getattr(data, 'flag', '')}) gives {kinds[theirs]}; use {hint}")
        for name in ("in_channels", "num_classes"):
            ours, theirs = self.hparams.get(name), getattr(data, name, None)
            if isinstance(theirs, int) and ours is not None and ours != theirs:
                raise ValueError(f"the model has {name}={ours} but the data module {type(data).__name__} "
                                 f"({getattr(data, 'flag', '')}) has {name}={theirs}; build the model with "
                                 f"{name}={theirs} (the CLI links it from the data)")

    def _check_batch(self, x: torch.Tensor, batch_idx: int) -> None:
        if batch_idx == 0 and x.ndim in (4, 5) and x.shape[1] != self.hparams.in_channels:
            raise ValueError(f"the batch has {x.shape[1]} channels (shape {tuple(x.shape)}) but the model was built "
                             f"for in_channels={self.hparams.in_channels}; build it with in_channels={x.shape[1]}")

    def on_test_start(self) -> None:
        self._check_inputs()
        self._use_checkpoint_ema()

    def on_validation_start(self) -> None:
        if self.trainer.state.fn == "validate":
            self._check_inputs()
            self._use_checkpoint_ema()

    def on_predict_start(self) -> None:
        self._check_inputs()
        self._use_checkpoint_ema()

    def on_fit_start(self) -> None:
        self._check_inputs()
        self.checkpoint_privacy = None  # training moves the weights away from the checkpoint's epsilon
        self._checkpoint_ema = None  # the DP callback resumes its own EMA

    def predict_step(self, batch, batch_idx: int) -> torch.Tensor:
        x = batch[0] if isinstance(batch, (tuple, list)) else batch
        self._check_batch(x, batch_idx)
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


def checkpoint_ema(checkpoint: dict[str, Any]) -> dict[str, Any] | None:
    """The EMA weights a DP checkpoint holds (``{"shadow": [...], "names": [...], "decay": ...}``), or None."""
    callbacks = checkpoint.get("callbacks")
    for key, state in (callbacks.items() if isinstance(callbacks, dict) else ()):
        if str(key).startswith("DifferentialPrivacy") and isinstance(state, dict) and isinstance(state.get("ema"), dict):
            return state["ema"]
    return None
