"""Shared pieces of the robustness tests: tiny random test sets and a quiet ``Trainer.test`` runner."""

from __future__ import annotations

import warnings

import lightning.pytorch as L
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset


@pytest.fixture
def run_test():
    """``run_test(module, callback, x, y, batch_size=8) -> {name: float}``: trainer.test, then its callback metrics."""

    def run(module, callback, x, y, batch_size: int = 8) -> dict[str, float]:
        trainer = L.Trainer(accelerator="cpu", devices=1, callbacks=[callback], logger=False,
                            enable_progress_bar=False, enable_checkpointing=False, enable_model_summary=False)
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*(num_workers|does not have many workers).*")
            warnings.filterwarnings("ignore", message=".*No positive samples in targets.*")
            trainer.test(module, dataloaders=DataLoader(TensorDataset(x, y), batch_size=batch_size), verbose=False)
        return {k: float(v) for k, v in trainer.callback_metrics.items()}

    return run


@pytest.fixture
def images() -> torch.Tensor:
    """16 random 28x28 grey images in eqlightning's normalised range [-1, 1]."""
    return torch.rand(16, 1, 28, 28, generator=torch.Generator().manual_seed(1)) * 2 - 1
