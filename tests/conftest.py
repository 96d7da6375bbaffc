"""Shared fixtures. Real MedMNIST files live in ../shared/data/medmnist (see its MANIFEST.md)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
SHARED_MEDMNIST = Path(os.environ.get("EQL_TEST_DATA", REPO.parent / "shared" / "data" / "medmnist"))


@pytest.fixture(scope="session")
def medmnist_root() -> Path:
    """Directory with the official breastmnist/pneumoniamnist/retinamnist .npz files (read-only)."""
    if not (SHARED_MEDMNIST / "pneumoniamnist.npz").is_file():
        pytest.fail(f"real MedMNIST files not found in {SHARED_MEDMNIST}: put the official .npz files there or "
                    "set EQL_TEST_DATA to their directory")
    return SHARED_MEDMNIST


@pytest.fixture(autouse=True)
def _seed_and_threads():
    torch.manual_seed(0)
    yield
