"""Metadata for every 2D flag, straight from medmnist.INFO, without any file present."""

from __future__ import annotations

import sys

import pytest

from eqlightning.data import SIZES, MedMNISTDataModule, dataset_info, file_name, flags_2d, medmnist_info

FLAGS_2D = ["pathmnist", "chestmnist", "dermamnist", "octmnist", "pneumoniamnist", "retinamnist", "breastmnist",
            "bloodmnist", "tissuemnist", "organamnist", "organcmnist", "organsmnist"]


def test_twelve_2d_flags():
    assert list(flags_2d()) == FLAGS_2D


def test_info_parsed_without_importing_medmnist(monkeypatch, tmp_path):
    """INFO is read from medmnist/info.py without running the package (no PIL/pandas/sklearn, no ~/.medmnist)."""
    for name in [m for m in sys.modules if m == "medmnist" or m.startswith("medmnist.")]:
        monkeypatch.delitem(sys.modules, name)
    info = medmnist_info.__wrapped__()
    assert "medmnist" not in sys.modules and "medmnist.info" not in sys.modules
    monkeypatch.setenv("HOME", str(tmp_path))  # medmnist.info creates ~/.medmnist on import
    from medmnist.info import INFO
    assert info == INFO
    assert "torchvision" not in sys.modules


@pytest.mark.parametrize("flag", FLAGS_2D)
def test_metadata_without_files(flag, tmp_path):
    entry = medmnist_info()[flag]
    dm = MedMNISTDataModule(flag=flag, root=str(tmp_path / "empty"), download=False)
    labels = [entry["label"][str(i)] for i in range(len(entry["label"]))]
    assert dm.num_classes == len(labels)
    assert dm.label_names == labels
    assert dm.in_channels == entry["n_channels"]
    assert dm.task == entry["task"]
    assert dm.input_size == 28
    assert dm.split_sizes == entry["n_samples"]
    assert dm.multilabel == (flag == "chestmnist")
    assert dm.augment is None
    assert not (tmp_path / "empty").exists()  # nothing read, nothing created
    if entry["task"] == "binary-class":
        assert dm.num_classes == 2


@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("flag", ["pathmnist", "chestmnist", "organsmnist"])
def test_file_names_urls_md5(flag, size):
    info = dataset_info(flag, size)
    entry = medmnist_info()[flag]
    suffix = "" if size == 28 else f"_{size}"
    assert info.filename == (f"{flag}.npz" if size == 28 else f"{flag}_{size}.npz") == file_name(flag, size)
    assert info.url == entry[f"url{suffix}"] and info.filename in info.url
    assert info.md5 == entry[f"MD5{suffix}"]
    assert MedMNISTDataModule(flag=flag, size=size).input_size == size


def test_known_checksums():
    assert dataset_info("breastmnist").md5 == "750601b1f35ba3300ea97c75c52ff8f6"
    assert dataset_info("breastmnist", 64).md5 == "742edef2a1fd1524b2efff4bd7ba9364"
    assert dataset_info("chestmnist").task == "multi-label, binary-class"
    assert dataset_info("retinamnist").task == "ordinal-regression"


@pytest.mark.parametrize("flag", ["organmnist3d", "nodulemnist3d"])
def test_rejects_3d_flags(flag):
    with pytest.raises(ValueError, match="3D") as err:
        MedMNISTDataModule(flag=flag)
    assert "breastmnist" in str(err.value)  # lists the valid flags


def test_rejects_unknown_flag():
    with pytest.raises(ValueError, match=r"unknown MedMNIST flag 'cifar10'.*pathmnist.*organsmnist"):
        MedMNISTDataModule(flag="cifar10")


@pytest.mark.parametrize("size", [32, 0, 256, True])
def test_rejects_other_sizes(size):
    with pytest.raises(ValueError, match=r"size .*28, 64, 128, 224"):
        MedMNISTDataModule(size=size)


@pytest.mark.parametrize("kwargs, match", [
    ({"train_fraction": 0.0}, "train_fraction"), ({"train_fraction": 1.5}, "train_fraction"),
    ({"train_fraction": -0.1}, "train_fraction"), ({"train_fraction": float("nan")}, "train_fraction"),
    ({"batch_size": 0}, "batch_size"), ({"num_workers": -1}, "num_workers"), ({"crop_padding": -2}, "crop_padding"),
    ({"eval_batch_size": 0}, "eval_batch_size"), ({"md5": "abc"}, "md5"), ({"mirror": "ftp://x"}, "mirror"),
])
def test_rejects_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        MedMNISTDataModule(**kwargs)


def test_hyperparameters_saved():
    dm = MedMNISTDataModule(flag="pathmnist", size=64, batch_size=32, flip=True)
    assert dm.hparams["flag"] == "pathmnist" and dm.hparams["size"] == 64 and dm.hparams["flip"] is True
    assert dm.eval_batch_size == 32 and dm.augment is not None and dm.augment.flip and not dm.augment.rot90
