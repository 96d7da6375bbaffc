"""train_fraction: size, per-class stratification, seeding, every class kept."""

from __future__ import annotations

import pytest
import torch

from eqlightning.data import MedMNISTDataModule, stratified_subset


@pytest.mark.parametrize("fraction", [0.013, 0.1, 0.25, 0.5, 0.9])
@pytest.mark.parametrize("n, classes, seed", [(4708, 2, 0), (1080, 5, 3), (97, 7, 1)])
def test_size_and_stratification(n, classes, seed, fraction):
    g = torch.Generator().manual_seed(seed)
    labels = torch.multinomial(torch.linspace(1, 4, classes), n, replacement=True, generator=g)  # imbalanced
    idx = stratified_subset(labels, fraction, seed)
    assert idx.unique().numel() == idx.numel() and torch.equal(idx, idx.sort().values)
    counts = torch.bincount(labels, minlength=classes)
    kept = torch.bincount(labels[idx], minlength=classes)
    forced = int(((counts > 0) & (fraction * counts < 1)).sum())  # classes kept at 1 sample although f*n_c < 1
    assert round(fraction * n) <= idx.numel() <= round(fraction * n) + forced
    for c in range(classes):
        if counts[c]:
            assert kept[c] >= 1
            assert abs(float(kept[c]) - fraction * float(counts[c])) <= 1.0  # proportions within +-1 sample


def test_full_fraction_is_everything():
    labels = torch.tensor([0, 1, 1, 0, 2])
    assert torch.equal(stratified_subset(labels, 1.0, 0), torch.arange(5))


def test_rare_class_is_kept():
    labels = torch.tensor([0] * 1000 + [1])
    idx = stratified_subset(labels, 0.01, 0)
    assert 1000 in idx.tolist() and idx.numel() == 11


@pytest.mark.parametrize("fraction", [0.0, -0.5, 1.01])
def test_invalid_fraction(fraction):
    with pytest.raises(ValueError, match="fraction"):
        stratified_subset(torch.zeros(4, dtype=torch.long), fraction, 0)


def test_data_module_subset(medmnist_root):
    def train_labels(seed: int, fraction: float = 0.2) -> tuple[torch.Tensor, torch.Tensor]:
        dm = MedMNISTDataModule(flag="pneumoniamnist", root=str(medmnist_root), download=False, seed=seed,
                                train_fraction=fraction)
        dm.setup("fit")
        return dm.train_dataset.images, dm.train_dataset.labels

    full_images, full = train_labels(0, 1.0)
    images, labels = train_labels(0)
    assert len(labels) == round(0.2 * 4708)
    for c in (0, 1):
        assert abs(int((labels == c).sum()) - 0.2 * int((full == c).sum())) <= 1
    again_images, again = train_labels(0)
    assert torch.equal(images, again_images) and torch.equal(labels, again)  # deterministic for a seed
    other_images, _ = train_labels(1)
    assert not torch.equal(images, other_images)  # another seed, another subset
    # the subset is made of real training samples
    rows = {bytes(img.flatten().tolist()) for img in full_images}
    assert all(bytes(img.flatten().tolist()) in rows for img in images[:50])


def test_subset_only_affects_train(medmnist_root):
    dm = MedMNISTDataModule(flag="retinamnist", root=str(medmnist_root), download=False, train_fraction=0.05)
    dm.setup()
    assert len(dm.train_dataset) == 54 and len(dm.val_dataset) == 120 and len(dm.test_dataset) == 400
    assert set(dm.train_dataset.labels.tolist()) == {0, 1, 2, 3, 4}
    assert dm.split_sizes["train"] == 1080  # the file's split, before the fraction
