"""Published test numbers on MedMNIST (2D, 28 px) to print next to a study's results (from the project's notes,
``references.md``): ACC/AUC as fractions, ``epsilon`` None for non-private training. Not measured here."""

from __future__ import annotations

from typing import Any

MEDMNIST_V2 = "MedMNIST v2 (Yang et al., Scientific Data 10:41, 2023), trained from scratch"
MEDMNIST_PLUS = "MedMNIST+ (Doerrich et al. 2024), best ACC at 28 px, ImageNet-pretrained"
DP_BENCHMARK = "public DP MedMNIST benchmark (ResNet-18 style, 28 px, eps 8, batch 1024, 120 epochs, clip 1.2)"

# (dataset, model, ACC, AUC, epsilon, source)
_TABLE: tuple[tuple[str, str, float | None, float | None, float | None, str], ...] = (
    ("pneumoniamnist", "ResNet-18 (28)", 0.854, 0.944, None, MEDMNIST_V2),
    ("pneumoniamnist", "ResNet-50 (28)", 0.854, 0.948, None, MEDMNIST_V2),
    ("breastmnist", "ResNet-18 (28)", 0.863, 0.901, None, MEDMNIST_V2),
    ("retinamnist", "ResNet-18 (28)", 0.524, 0.717, None, MEDMNIST_V2),
    ("retinamnist", "ResNet-50 (28)", 0.528, 0.726, None, MEDMNIST_V2),
    ("pathmnist", "ResNet-18 (28)", 0.907, 0.983, None, MEDMNIST_V2),
    ("pathmnist", "ResNet-50 (28)", 0.911, 0.990, None, MEDMNIST_V2),
    ("dermamnist", "ResNet-18 (28)", 0.735, 0.917, None, MEDMNIST_V2),
    ("bloodmnist", "ResNet-18 (28)", 0.958, 0.998, None, MEDMNIST_V2),
    ("pneumoniamnist", "best model (28)", 0.8659, None, None, MEDMNIST_PLUS),
    ("breastmnist", "best model (28)", 0.8654, None, None, MEDMNIST_PLUS),
    ("retinamnist", "best model (28)", 0.5425, None, None, MEDMNIST_PLUS),
    ("pneumoniamnist", "ResNet-18 style, DP-SGD", 0.869, 0.960, 8.0, DP_BENCHMARK),
    ("breastmnist", "ResNet-18 style, DP-SGD", 0.731, 0.790, 8.0, DP_BENCHMARK),
    ("pathmnist", "ResNet-18 style, DP-SGD", 0.812, 0.959, 8.0, DP_BENCHMARK),
    ("bloodmnist", "ResNet-18 style, DP-SGD", 0.886, 0.987, 8.0, DP_BENCHMARK),
    ("retinamnist", "ResNet-18 style, DP-SGD", 0.545, 0.746, 8.0, DP_BENCHMARK),
    ("octmnist", "ResNet-18 style, DP-SGD", 0.667, 0.904, 8.0, DP_BENCHMARK),
    ("organamnist", "ResNet-18 style, DP-SGD", 0.824, 0.979, 8.0, DP_BENCHMARK),
    ("organcmnist", "ResNet-18 style, DP-SGD", 0.828, 0.978, 8.0, DP_BENCHMARK),
    ("organsmnist", "ResNet-18 style, DP-SGD", 0.680, 0.946, 8.0, DP_BENCHMARK),
    ("tissuemnist", "ResNet-18 style, DP-SGD", 0.587, 0.846, 8.0, DP_BENCHMARK),
)
REFERENCES: list[dict[str, Any]] = [
    {"dataset": d, "model": m, "acc": acc, "auc": auc, "epsilon": eps, "source": src}
    for d, m, acc, auc, eps, src in _TABLE
]


def references_for(dataset: str) -> list[dict[str, Any]]:
    """Published numbers for the MedMNIST flag ``dataset`` (e.g. ``pneumoniamnist``; case-insensitive): dicts with
    ``dataset``, ``model``, ``acc``, ``auc`` (None when not published), ``epsilon`` (None = non-private), ``source``.
    Empty for a dataset without published numbers here."""
    flag = str(dataset).strip().lower()
    return [dict(ref) for ref in REFERENCES if ref["dataset"] == flag]
