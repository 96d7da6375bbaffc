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


@pytest.fixture(scope="session")
def slurm_cluster():
    """A real one-node SLURM cluster (tests/slurm_cluster.py: LocalSlurm), started once per session and stopped at
    its end; SLURM_CONF points at it meanwhile. Installs Debian's slurm-wlm when missing and root; otherwise skips,
    or fails when EQL_REQUIRE_SLURM=1 (CI)."""
    import slurm_cluster as local_slurm  # tests/ is on sys.path (rootdir conftest, no __init__.py)

    reason = local_slurm.ensure_slurm_installed()
    if reason is not None:
        if os.environ.get("EQL_REQUIRE_SLURM") == "1":
            pytest.fail(f"EQL_REQUIRE_SLURM=1 but no SLURM: {reason}", pytrace=False)
        pytest.skip(reason)
    with local_slurm.LocalSlurm() as cluster:
        yield cluster


@pytest.fixture(scope="session", autouse=True)
def _basis_cache(tmp_path_factory):
    """3D bases are cached on disk (eqlightning.nn.basis): the suite uses its own cache, not the user's."""
    previous = os.environ.get("EQL_BASIS_CACHE")
    os.environ["EQL_BASIS_CACHE"] = str(tmp_path_factory.mktemp("basis-cache"))
    yield
    if previous is None:
        os.environ.pop("EQL_BASIS_CACHE", None)
    else:
        os.environ["EQL_BASIS_CACHE"] = previous
