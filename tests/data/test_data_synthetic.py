"""Synthetic files in the official format for what the shared folder lacks, and every content error."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest
import torch

from eqlightning.data import DataFormatError, MedMNISTDataModule


def _md5(path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


def _dm(root, flag, md5, **kwargs) -> MedMNISTDataModule:
    return MedMNISTDataModule(flag=flag, root=str(root), md5=md5, download=False, batch_size=8, **kwargs)


def test_chestmnist_multilabel(tmp_path, write_npz):
    _, md5 = write_npz(tmp_path, "chestmnist")
    dm = _dm(tmp_path, "chestmnist", md5)
    assert dm.multilabel and dm.num_classes == 14 and dm.task == "multi-label, binary-class"
    dm.setup()
    assert dm.split_sizes == {"train": 20, "val": 8, "test": 8}  # the file's counts once loaded
    ds = dm.train_dataset
    assert ds.labels.dtype == torch.float32 and ds.labels.shape == (20, 14)
    assert set(ds.labels.unique().tolist()) <= {0.0, 1.0}
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == (8, 1, 28, 28) and y.shape == (8, 14) and y.dtype == torch.float32
    logits = torch.zeros_like(y, requires_grad=True)
    torch.nn.functional.binary_cross_entropy_with_logits(logits, y).backward()  # BCE-ready targets
    p = ds.labels.mean(0).double()
    assert dm.majority_rate("train") == pytest.approx(float(torch.maximum(p, 1 - p).mean()))


def test_multilabel_train_fraction_keeps_first_label_balanced(tmp_path, write_npz):
    _, md5 = write_npz(tmp_path, "chestmnist", counts=(40, 4, 4))
    dm = _dm(tmp_path, "chestmnist", md5, train_fraction=0.5)
    labels = dm.train_dataset.labels
    assert labels.shape == (20, 14) and int(labels[:, 0].sum()) == 10


@pytest.mark.parametrize("flag, classes", [("dermamnist", 7), ("pathmnist", 9), ("bloodmnist", 8)])
def test_rgb_datasets(tmp_path, write_npz, flag, classes):
    _, md5 = write_npz(tmp_path, flag)
    dm = _dm(tmp_path, flag, md5)
    x, y = next(iter(dm.test_dataloader()))
    assert x.shape == (8, 3, 28, 28) and y.dtype == torch.long and int(y.max()) < classes
    assert dm.test_dataset.images.dtype == torch.uint8


@pytest.mark.parametrize("size", [64, 128, 224])
def test_larger_sizes_and_file_names(tmp_path, write_npz, size):
    path, md5 = write_npz(tmp_path, "organamnist", size=size, counts=(4, 2, 2))
    assert path.name == f"organamnist_{size}.npz"
    dm = _dm(tmp_path, "organamnist", md5, size=size)
    x, y = next(iter(dm.val_dataloader()))
    assert x.shape == (2, 1, size, size) and y.shape == (2,) and dm.file_path == path


def test_md5_argument_is_case_insensitive(tmp_path, write_npz):
    _, md5 = write_npz(tmp_path, "octmnist")
    assert len(_dm(tmp_path, "octmnist", md5.upper()).val_dataset) == 8


def test_custom_md5_does_not_fall_back_to_embedded_sample(tmp_path, write_npz):
    """breastmnist 28 is embedded, but a custom md5 asks for another file: missing must stay an error."""
    _, md5 = write_npz(tmp_path / "elsewhere", "breastmnist")
    with pytest.raises(FileNotFoundError, match="breastmnist.npz"):
        _dm(tmp_path / "empty", "breastmnist", md5).setup()


# ---------------------------------------------------------------------------------------------- content errors
def _error(tmp_path, write_npz, flag="pneumoniamnist", size=28, **kwargs) -> str:
    path, md5 = write_npz(tmp_path, flag, size=size, **kwargs)
    with pytest.raises(DataFormatError) as err:
        _dm(tmp_path, flag, md5, size=size).setup()
    message = str(err.value)
    assert str(path) in message and "Fix:" in message  # names the file and what to do
    return message


def test_wrong_channels_gray_file_for_rgb_flag(tmp_path, write_npz):
    message = _error(tmp_path, write_npz, flag="retinamnist", channels=1)
    assert "grayscale (1 channel)" in message and "retinamnist is RGB (3 channels)" in message


def test_wrong_channels_rgb_file_for_gray_flag(tmp_path, write_npz):
    assert "pneumoniamnist is grayscale" in _error(tmp_path, write_npz, channels=3)


def test_wrong_spatial_size(tmp_path, write_npz):
    message = _error(tmp_path, write_npz, size=64, image_size=28)
    assert "28x28 pixels but size=64" in message and "size=28" in message


def test_missing_keys(tmp_path, write_npz):
    message = _error(tmp_path, write_npz, drop=("val_labels", "test_images"))
    assert "missing key(s) val_labels, test_images" in message


def test_labels_out_of_range(tmp_path, write_npz):
    assert "2 classes (0..1)" in _error(tmp_path, write_npz, label_shift=1)


def test_count_mismatch(tmp_path, write_npz):
    path, _ = write_npz(tmp_path, "pneumoniamnist")
    data = dict(np.load(path))
    data["train_labels"] = data["train_labels"][:-3]
    np.savez_compressed(path, **data)
    with pytest.raises(DataFormatError, match=r"train_images has 20 samples but train_labels has shape \(17, 1\)"):
        _dm(tmp_path, "pneumoniamnist", _md5(path)).setup()


def test_multilabel_wrong_label_count_and_values(tmp_path, write_npz):
    path, _ = write_npz(tmp_path, "chestmnist")
    data = dict(np.load(path))
    data["val_labels"] = data["val_labels"][:, :5]
    np.savez_compressed(path, **data)
    with pytest.raises(DataFormatError, match=r"expected \(8, 14\)"):
        _dm(tmp_path, "chestmnist", _md5(path)).setup()
    data["val_labels"] = np.full((8, 14), 2, dtype=np.uint8)
    np.savez_compressed(path, **data)
    with pytest.raises(DataFormatError, match="expected 0/1"):
        _dm(tmp_path, "chestmnist", _md5(path)).setup()


def test_not_an_npz(tmp_path):
    path = tmp_path / "pneumoniamnist.npz"
    path.write_bytes(b"definitely not a zip file")
    with pytest.raises(DataFormatError, match="cannot read it as .npz"):
        _dm(tmp_path, "pneumoniamnist", _md5(path)).setup()
