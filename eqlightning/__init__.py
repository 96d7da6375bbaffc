"""eqlightning: equivariant CNNs for medical images on PyTorch Lightning, with optional DP-SGD.

    from eqlightning import ImageClassifier, MedMNISTDataModule, create_backbone, list_backbones

Top-level names are imported on first use, so ``import eqlightning.nn`` does not load Lightning or the data
stack. Importing eqlightning never imports opacus: the privacy plugin lives in ``eqlightning.privacy``.
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

_EXPORTS = {
    "ImageClassifier": "eqlightning.classifier",
    "MedMNISTDataModule": "eqlightning.data",
    "MedMNIST3DDataModule": "eqlightning.data",
    "create_backbone": "eqlightning.models",
    "list_backbones": "eqlightning.models",
    "profile_backbone": "eqlightning.models",
}

__all__ = [*_EXPORTS, "__version__"]


def __getattr__(name: str):
    if name in _EXPORTS:
        value = getattr(importlib.import_module(_EXPORTS[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'eqlightning' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(__all__)
