"""The official files in ../shared/data/medmnist: shapes, dtypes, split sizes, value ranges, metadata, loaders."""

from __future__ import annotations

import gc

import numpy as np
import pytest
import torch

from eqlightning.data import MedMNISTDataModule, dataset_info

REAL = [("breastmnist", 28, 1, 2), ("breastmnist", 64, 1, 2), ("pneumoniamnist", 28, 1, 2), ("retinamnist", 28, 3, 5)]


@pytest.fixture(scope="module")
def loaded(medmnist_root):
    """One data module per real file, every split loaded (module-scoped: loading is the slow part)."""
    modules = {}
    for flag, size, _, _ in REAL:
        dm = MedMNISTDataModule(flag=flag, size=size, root=str(medmnist_root), download=False, batch_size=64)
        dm.setup()
        modules[flag, size] = dm
    return modules


@pytest.mark.parametrize("flag, size, channels, classes", REAL)
def test_real_file_contents(loaded, medmnist_root, flag, size, channels, classes):
    dm = loaded[flag, size]
    info = dataset_info(flag, size)
    assert dm.file_path == medmnist_root / info.filename
    assert (dm.in_channels, dm.num_classes, dm.input_size) == (channels, classes, size)
    assert dm.task == ("ordinal-regression" if flag == "retinamnist" else "binary-class")
    assert dm.split_sizes == info.split_sizes
    raw = np.load(dm.file_path)
    for split in ("train", "val", "test"):
        ds = getattr(dm, f"{split}_dataset")
        assert len(ds) == info.split_sizes[split]
        assert ds.images.dtype == torch.uint8 and ds.images.shape == (len(ds), channels, size, size)
        assert ds.labels.dtype == torch.long and ds.labels.shape == (len(ds),)
        assert int(ds.labels.min()) == 0 and int(ds.labels.max()) == classes - 1
        # the same pixels as the file, moved to channels-first
        expected = raw[f"{split}_images"]
        expected = expected[:, None] if expected.ndim == 3 else expected.transpose(0, 3, 1, 2)
        assert np.array_equal(ds.images.numpy(), expected)
        assert np.array_equal(ds.labels.numpy(), raw[f"{split}_labels"][:, 0])
        x, y = ds[0]
        assert x.dtype == torch.float32 and x.shape == (channels, size, size) and y.dtype == torch.long
        assert torch.allclose(x, (torch.from_numpy(expected[0]).float() / 255 - 0.5) / 0.5)


def test_retinamnist_is_rgb_and_ordinal(loaded):
    dm = loaded["retinamnist", 28]
    x, y = next(iter(dm.val_dataloader()))
    assert x.shape == (64, 3, 28, 28) and y.shape == (64,) and y.dtype == torch.long
    # cross-entropy (how the LightningModule treats ordinal regression) accepts these targets as they are
    loss = torch.nn.functional.cross_entropy(torch.zeros(64, dm.num_classes), y)
    assert torch.isclose(loss, torch.tensor(np.log(5.0), dtype=loss.dtype))
    assert not torch.equal(x[:, 0], x[:, 1])  # real colour, not a replicated gray channel


def test_loader_round_trip(loaded):
    dm = loaded["pneumoniamnist", 28]
    seen, lo, hi = 0, 1.0, -1.0
    for x, y in dm.train_dataloader():
        assert x.dtype == torch.float32 and x.shape[1:] == (1, 28, 28) and y.dtype == torch.long
        assert x.shape[0] == y.shape[0] <= 64
        lo, hi, seen = min(lo, float(x.min())), max(hi, float(x.max())), seen + x.shape[0]
    assert seen == 4708 and lo == -1.0 and hi == 1.0
    val = list(dm.val_dataloader())
    assert sum(len(y) for _, y in val) == 524
    assert torch.equal(torch.cat([y for _, y in val]), dm.val_dataset.labels)  # no shuffle
    predict = list(dm.predict_dataloader())
    assert torch.equal(torch.cat([x for x, _ in predict]), torch.cat([x for x, _ in dm.test_dataloader()]))


def test_train_loader_shuffles_with_seed(loaded, medmnist_root):
    dm = loaded["breastmnist", 28]
    first = [y for _, y in dm.train_dataloader()]
    again = [y for _, y in dm.train_dataloader()]
    assert all(torch.equal(a, b) for a, b in zip(first, again))  # same seed -> same order
    assert not torch.equal(torch.cat(first), dm.train_dataset.labels)  # shuffled
    other = MedMNISTDataModule(root=str(medmnist_root), download=False, batch_size=64, seed=1)
    assert not torch.equal(next(iter(other.train_dataloader()))[1], first[0])


def test_majority_rate(loaded):
    dm = loaded["breastmnist", 28]
    for split in ("train", "val", "test"):
        labels = getattr(dm, f"{split}_dataset").labels
        assert dm.majority_rate(split) == pytest.approx(max(labels.float().mean(), 1 - labels.float().mean()))
    assert dm.majority_rate("test") == pytest.approx(114 / 156)  # 114 benign/normal of 156
    with pytest.raises(ValueError, match="split"):
        dm.majority_rate("training")


def test_setup_stages_load_only_what_they_need(medmnist_root):
    dm = MedMNISTDataModule(flag="retinamnist", root=str(medmnist_root), download=False)
    dm.setup("test")
    assert set(dm._datasets) == {"test"}
    dm.setup("fit")
    assert set(dm._datasets) == {"train", "val", "test"}


def test_worker_processes(medmnist_root):
    """num_workers > 0: persistent workers, same batches as in-process loading when there is no augmentation."""
    dm = MedMNISTDataModule(root=str(medmnist_root), download=False, batch_size=100, num_workers=1)
    loader = dm.val_dataloader()
    assert loader.persistent_workers and loader.num_workers == 1
    (x, y), = list(loader)
    assert torch.equal(y, dm.val_dataset.labels) and x.shape == (78, 1, 28, 28)
    del loader  # stop the worker now: left to a later cyclic GC, torch's worker shutdown can hang 5 s
    gc.collect()
    assert not MedMNISTDataModule(root=str(medmnist_root)).val_dataloader().persistent_workers
