"""The one place that uses a private Lightning attribute: where ``trainer.fit`` keeps the training loader source.

Lightning has no public API for a callback to replace the training loader. The loader comes either from a
``train_dataloader`` hook (of the datamodule or the module: replaced through the public hook, an instance attribute)
or from ``trainer.fit(model, train_dataloaders=loader)``, which Lightning keeps in ``trainer.fit_loop._data_source``
(``_DataConnector``'s ``_DataHookSource``, whose ``instance`` is the loader). ``tests/privacy/test_lightning_compat.py``
fails loudly if an upgrade moves it; setup.cfg bounds the Lightning versions this was checked with.
"""

from __future__ import annotations

from typing import Callable

from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.utilities.model_helpers import is_overridden
from torch.utils.data import DataLoader


def training_loader(trainer: Trainer, pl_module: LightningModule) -> tuple[DataLoader, Callable, Callable]:
    """``(loader, install, restore)``: the run's training DataLoader, a function that makes Lightning use another
    loader instead for this fit, and one that undoes it (call it at teardown)."""
    source = getattr(trainer.fit_loop, "_data_source", None)
    instance = getattr(source, "instance", None)
    if isinstance(instance, DataLoader):  # trainer.fit(model, train_dataloaders=loader)
        def install(loader):
            source.instance = loader

        def restore():
            source.instance = instance
        return instance, install, restore
    owner = trainer.datamodule if trainer.datamodule is not None and is_overridden(
        "train_dataloader", trainer.datamodule) else pl_module
    if not is_overridden("train_dataloader", owner):
        raise ValueError("DifferentialPrivacy needs the training data as a DataLoader (from a LightningDataModule, "
                         "LightningModule.train_dataloader, or trainer.fit(model, train_dataloaders=...))")
    loader = owner.train_dataloader()
    if not isinstance(loader, DataLoader):
        raise TypeError(f"DifferentialPrivacy needs a torch DataLoader for training, got {type(loader).__name__}")

    def install(private):
        owner.train_dataloader = lambda: private  # an instance attribute: Lightning's hook call picks it up

    def restore():
        owner.__dict__.pop("train_dataloader", None)
    return loader, install, restore
