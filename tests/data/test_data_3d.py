"""3D MedMNIST: catalogue, synthetic files, MedMNIST3DDataModule batches, cube-symmetry augmentation, downloads and
errors. Every file here is synthetic (write_synthetic_medmnist3d); nothing is fetched from the internet."""

from __future__ import annotations

import hashlib
import os
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from eqlightning.data import (BatchAugment3D, ChecksumError, DataFileNotFoundError, DataFormatError,
                              MedMNIST3DDataModule, MedMNISTDataModule, apply_cube_symmetry, cube_symmetries,
                              dataset_info, flags_3d, medmnist_info, write_synthetic_medmnist3d)
from eqlightning.data.augment import translate
from eqlightning.data.synthetic import main as synthetic_main

FLAGS_3D = ["organmnist3d", "nodulemnist3d", "adrenalmnist3d", "fracturemnist3d", "vesselmnist3d", "synapsemnist3d"]
SMALL = (8, 4, 4)


def _md5(path: Path) -> str:
    return hashlib.md5(Path(path).read_bytes()).hexdigest()


def _write(root: Path, flag: str = "organmnist3d", size: int = 28, counts=SMALL, seed: int = 0) -> tuple[Path, str]:
    path = write_synthetic_medmnist3d(root, flag, size, counts, seed)
    return path, _md5(path)


def _dm(root, flag="organmnist3d", md5=None, **kwargs) -> MedMNIST3DDataModule:
    kwargs.setdefault("batch_size", 4)
    return MedMNIST3DDataModule(flag=flag, root=str(root), md5=md5, download=False, **kwargs)


def _normalised(path: Path, split: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The split as the module must serve it, computed independently with numpy: (N, 1, S, S, S), (N,)."""
    with np.load(path) as npz:
        images, labels = npz[f"{split}_images"], npz[f"{split}_labels"]
    x = (images.astype(np.float32) / 255 - 0.5) / 0.5
    return torch.from_numpy(x[:, None]), torch.from_numpy(labels[:, 0].astype(np.int64))


# ------------------------------------------------------------------------------------------------ catalogue
def test_six_3d_flags():
    assert list(flags_3d()) == FLAGS_3D


@pytest.mark.parametrize("size", [28, 64])
@pytest.mark.parametrize("flag", FLAGS_3D)
def test_metadata_right_after_init(flag, size, tmp_path):
    entry = medmnist_info()[flag]
    dm = MedMNIST3DDataModule(flag=flag, size=size, root=str(tmp_path / "empty"), download=False)
    labels = [entry["label"][str(i)] for i in range(len(entry["label"]))]
    assert (dm.num_classes, dm.label_names, dm.task) == (len(labels), labels, entry["task"])
    assert dm.in_channels == 1 and dm.spatial_dims == 3 and dm.input_size == size
    assert dm.split_sizes == entry["n_samples"] and not dm.multilabel and dm.augment is None
    suffix = "" if size == 28 else "_64"
    info = dm.info
    assert info.spatial_dims == 3 and info.input_size == size
    assert info.filename == f"{flag}{suffix}.npz" and info.url == entry[f"url{suffix}"] and info.filename in info.url
    assert info.md5 == entry[f"MD5{suffix}"] == dm.md5
    assert not (tmp_path / "empty").exists()  # nothing read, nothing created


def test_2d_unchanged():
    assert MedMNISTDataModule.spatial_dims == 2 and MedMNISTDataModule(flag="pathmnist").spatial_dims == 2
    assert dataset_info("breastmnist", 224).spatial_dims == 2 and dataset_info("breastmnist").shape_name == "28x28"


@pytest.mark.parametrize("size", [128, 224, 32, True])
def test_wrong_size_for_3d_flag(size):
    with pytest.raises(ValueError, match=r"size .* for 'vesselmnist3d': valid sizes are 28, 64 \(.*3D.*64x64x64\)"):
        MedMNIST3DDataModule(flag="vesselmnist3d", size=size)


def test_flag_of_the_other_dimensionality():
    with pytest.raises(ValueError, match="'organmnist3d' is a 3D .*MedMNIST3DDataModule.*breastmnist"):
        MedMNISTDataModule(flag="organmnist3d")
    with pytest.raises(ValueError, match="'breastmnist' is a 2D .*use eqlightning.data.MedMNISTDataModule.*"
                                         "organmnist3d, nodulemnist3d"):
        MedMNIST3DDataModule(flag="breastmnist")
    with pytest.raises(ValueError, match="unknown MedMNIST flag 'lungmnist3d'.*valid 3D flags: organmnist3d"):
        MedMNIST3DDataModule(flag="lungmnist3d")


@pytest.mark.parametrize("kwargs, match", [({"rotations": "d4"}, "rotations must be one of 'none', 'cube'"),
                                           ({"rotations": True}, "rotations"), ({"crop_padding": -1}, "crop_padding"),
                                           ({"md5": "skip"}, "md5 must be 32 hex digits"),
                                           ({"train_fraction": 0}, "train_fraction")])
def test_rejects_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        MedMNIST3DDataModule(**kwargs)


def test_hyperparameters_are_the_3d_signature():
    hp = MedMNIST3DDataModule(flag="nodulemnist3d", size=64, rotations="cube", crop_padding=1).hparams
    assert hp["flag"] == "nodulemnist3d" and hp["size"] == 64 and hp["rotations"] == "cube"
    assert hp["crop_padding"] == 1 and "rot90" not in hp and "flip" not in hp


# ------------------------------------------------------------------------------------------- synthetic files
@pytest.mark.parametrize("size", [28, 64])
def test_synthetic_file_official_format(tmp_path, size):
    path = write_synthetic_medmnist3d(tmp_path, "fracturemnist3d", size, (7, 3, 2))
    assert path == tmp_path / ("fracturemnist3d.npz" if size == 28 else "fracturemnist3d_64.npz")
    with np.load(path) as npz:
        assert sorted(npz.files) == sorted(f"{s}_{k}" for s in ("train", "val", "test") for k in ("images", "labels"))
        for split, n in zip(("train", "val", "test"), (7, 3, 2)):
            assert npz[f"{split}_images"].shape == (n, size, size, size) and npz[f"{split}_images"].dtype == np.uint8
            assert npz[f"{split}_labels"].shape == (n, 1) and npz[f"{split}_labels"].dtype == np.uint8
        assert sorted(np.bincount(npz["train_labels"][:, 0])) == [2, 2, 3]  # balanced, every class present


def test_synthetic_class_structure_and_reproducibility(tmp_path):
    """The ball's volume grows with the class (learnable, rotation-invariant); same arguments give the same bytes."""
    path, md5 = _write(tmp_path / "a", "organmnist3d", counts=(33, 1, 1))
    with np.load(path) as npz:
        bright = (npz["train_images"] > 128).reshape(33, -1).sum(1)
        labels = npz["train_labels"][:, 0]
    per_class = [bright[labels == c].mean() for c in range(11)]
    assert all(a < b for a, b in zip(per_class, per_class[1:])), per_class
    assert _write(tmp_path / "b", "organmnist3d", counts=(33, 1, 1))[1] == md5
    assert _write(tmp_path / "c", "organmnist3d", counts=(33, 1, 1), seed=1)[1] != md5


def test_synthetic_writer_never_replaces_a_file(tmp_path):
    real = tmp_path / "adrenalmnist3d.npz"
    real.write_bytes(b"a real download")
    with pytest.raises(FileExistsError, match="overwrite=True"):
        write_synthetic_medmnist3d(tmp_path, "adrenalmnist3d")
    assert real.read_bytes() == b"a real download" and sorted(os.listdir(tmp_path)) == ["adrenalmnist3d.npz"]
    write_synthetic_medmnist3d(tmp_path, "adrenalmnist3d", samples_per_split=(2, 2, 2), overwrite=True)
    assert np.load(real)["val_images"].shape == (2, 28, 28, 28) and sorted(os.listdir(tmp_path)) == [real.name]
    with pytest.raises(ValueError, match="3D datasets only"):
        write_synthetic_medmnist3d(tmp_path, "breastmnist")
    with pytest.raises(ValueError, match="samples_per_split"):
        write_synthetic_medmnist3d(tmp_path / "x", "adrenalmnist3d", samples_per_split=(4, 0, 4))


def test_synthetic_command_prints_md5_and_path(tmp_path, capsys):
    assert synthetic_main(["synapsemnist3d", "--root", str(tmp_path), "--samples", "4", "2", "2"]) == 0
    out, err = capsys.readouterr()
    md5, path = out.split()
    assert Path(path) == tmp_path / "synapsemnist3d.npz" and md5 == _md5(Path(path))
    assert f"--data.md5 {md5}" in err and f"--data.root {tmp_path}" in err


# -------------------------------------------------------------------------------------------- data module
@pytest.mark.parametrize("flag, size", [(f, 28) for f in FLAGS_3D] + [("nodulemnist3d", 64)])
def test_batches_shapes_dtypes_normalisation(tmp_path, flag, size):
    path, md5 = _write(tmp_path, flag, size)
    dm = _dm(tmp_path, flag, md5, size=size)
    dm.setup()
    assert dm.file_path == path and dm.split_sizes == {"train": 8, "val": 4, "test": 4}  # the file's counts
    assert dm.train_dataset.images.dtype == torch.uint8 and dm.train_dataset.images.shape == (8, 1, size, size, size)
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == (4, 1, size, size, size) and x.dtype == torch.float32
    assert y.shape == (4,) and y.dtype == torch.long
    ref_x, ref_y = _normalised(path, "val")
    got = [torch.cat(t) for t in zip(*dm.val_dataloader())]
    torch.testing.assert_close(got[0], ref_x, rtol=0, atol=1e-6)  # (x / 255 - 0.5) / 0.5, file order
    assert torch.equal(got[1], ref_y) and int(y.max()) < dm.num_classes
    assert float(got[0].min()) >= -1.0 and float(got[0].max()) <= 1.0


def test_train_fraction_is_stratified_and_seeded(tmp_path):
    path, md5 = _write(tmp_path, "organmnist3d", counts=(44, 2, 2))  # 4 volumes per class
    labels = _normalised(path, "train")[1]
    dm = _dm(tmp_path, md5=md5, train_fraction=0.5, seed=3)
    ds = dm.train_dataset
    assert len(ds) == 22 and torch.bincount(ds.labels, minlength=11).tolist() == [2] * 11
    assert torch.equal(_dm(tmp_path, md5=md5, train_fraction=0.5, seed=3).train_dataset.images, ds.images)
    assert not torch.equal(_dm(tmp_path, md5=md5, train_fraction=0.5, seed=4).train_dataset.images, ds.images)
    assert dm.split_sizes["train"] == 44 and labels.numel() == 44
    assert dm.majority_rate("train") == pytest.approx(2 / 22)


def test_val_test_deterministic_and_never_augmented(tmp_path):
    path, md5 = _write(tmp_path, "vesselmnist3d")
    dm = _dm(tmp_path, "vesselmnist3d", md5, rotations="cube_reflections", crop_padding=2)
    assert dm.augment is not None
    for loader, split in ((dm.val_dataloader, "val"), (dm.test_dataloader, "test"), (dm.predict_dataloader, "test")):
        first, second = [torch.cat([b[0] for b in loader()]) for _ in range(2)]
        assert torch.equal(first, second) and torch.equal(first, _normalised(path, split)[0])


def _symmetry_table(originals: torch.Tensor) -> dict[bytes, tuple[int, int]]:
    """Every grid symmetry of every original volume -> (original index, symmetry index)."""
    return {g(v).contiguous().numpy().tobytes(): (i, g.index)
            for i, v in enumerate(originals) for g in cube_symmetries(reflections=True)}


@pytest.mark.parametrize("rotations", ["cube", "cube_reflections"])
def test_training_batches_are_grid_symmetries_seeded_per_epoch(tmp_path, rotations):
    path, md5 = _write(tmp_path, "synapsemnist3d", counts=(16, 2, 2))
    table = _symmetry_table(_normalised(path, "train")[0])

    def loader(seed: int):
        return _dm(tmp_path, "synapsemnist3d", md5, rotations=rotations, seed=seed, batch_size=6).train_dataloader()

    def epoch(loader, number: int) -> list[tuple[int, int]]:
        loader.sampler.set_epoch(number)  # as Lightning does before every epoch
        found = [table.get(v.numpy().tobytes()) for x, _ in loader for v in x]
        assert None not in found, "a training volume is not a grid symmetry of any original"
        assert sorted(i for i, _ in found) == list(range(16))  # each training volume once per epoch
        return found

    uninterrupted = loader(0)
    first, second = epoch(uninterrupted, 0), epoch(uninterrupted, 1)
    assert len({g for _, g in first}) > 4  # different samples get different symmetries
    if rotations == "cube":
        assert all(g < 24 for _, g in first + second)  # rotations only, no reflection
    assert dict(second) != dict(first)  # fresh symmetries each epoch
    resumed = loader(0)
    assert epoch(resumed, 1) == second  # a run resumed at epoch 1 replays the same order and symmetries
    assert epoch(resumed, 0) == first
    assert dict(epoch(loader(1), 0)) != dict(first)  # another seed, other symmetries


# ------------------------------------------------------------------------------------------- augmentation
def _generated(generators: list) -> set[tuple]:
    """All distinct outputs of words in the generators on a volume with distinct voxels (the group they span)."""
    probe = torch.arange(64).view(4, 4, 4)
    seen, frontier = {tuple(probe.flatten().tolist())}, [probe]
    while frontier:
        nxt = []
        for v in frontier:
            for gen in generators:
                w = gen(v)
                key = tuple(w.flatten().tolist())
                if key not in seen:
                    seen.add(key)
                    nxt.append(w)
        frontier = nxt
    return seen


@pytest.mark.parametrize("reflections, order", [(False, 24), (True, 48)])
def test_cube_symmetries_are_the_group(reflections, order):
    probe = torch.arange(64).view(1, 4, 4, 4)  # all voxels distinct: distinct permutations give distinct outputs
    group = cube_symmetries(reflections)
    images = {tuple(g(probe).flatten().tolist()): g.index for g in group}
    assert len(group) == order and len(images) == order  # pairwise distinct
    assert [g.index for g in group] == list(range(order)) and torch.equal(group[0](probe), probe)
    for g in group:  # closed under composition (so inverses are in it too: it is a finite group)
        for h in group:
            assert tuple(g(h(probe)).flatten().tolist()) in images
    assert all(g.is_rotation for g in group[:24]) and not any(g.is_rotation for g in group[24:])
    # ... and it is exactly the group spanned by quarter turns about the three axes (plus a mirror)
    turns = [lambda v, d=d: torch.rot90(v, 1, dims=d) for d in ((-3, -2), (-3, -1), (-2, -1))]
    spanned = _generated(turns + ([lambda v: v.flip(-1)] if reflections else []))
    assert spanned == {tuple(g(probe[0]).flatten().tolist()) for g in group}


def test_cube_symmetries_keep_shape_batch_and_channels():
    x = torch.rand(2, 3, 5, 5, 5)
    for g in cube_symmetries(True):
        y = g(x)
        assert y.shape == x.shape
        assert torch.equal(y.flatten(2).sort(-1).values, x.flatten(2).sort(-1).values)  # a voxel permutation
        assert torch.equal(y[1, 2], g(x[1, 2]))  # acts on the last three axes only
    with pytest.raises(ValueError, match="cubic"):
        cube_symmetries()[1](torch.rand(1, 4, 4, 5))


def test_apply_cube_symmetry_matches_the_list():
    x = torch.rand(48, 2, 3, 3, 3, generator=torch.Generator().manual_seed(0))
    index = torch.randperm(48, generator=torch.Generator().manual_seed(1))
    out = apply_cube_symmetry(x, index)
    group = cube_symmetries(True)
    for i in range(48):
        assert torch.equal(out[i], group[int(index[i])](x[i]))
    with pytest.raises(ValueError, match="0..47"):
        apply_cube_symmetry(x[:1], torch.tensor([48]))


@pytest.mark.parametrize("rotations, order", [("cube", 24), ("cube_reflections", 48)])
def test_augment_uniform_over_the_group(rotations, order):
    probe = torch.arange(27, dtype=torch.float32).view(1, 1, 3, 3, 3)
    refs = torch.stack([g(probe[0]).flatten() for g in cube_symmetries(True)])  # (48, 27)
    n = 200 * order
    out = BatchAugment3D(rotations)(probe.expand(n, -1, -1, -1, -1), generator=torch.Generator().manual_seed(5))
    match = (out.flatten(1)[:, None, :] == refs[None]).all(-1)  # (n, 48)
    assert match.sum(1).eq(1).all()  # every output is exactly one grid symmetry of its input
    counts = torch.bincount(match.float().argmax(1), minlength=48)
    assert (counts[:order] > 0).all() and (counts[order:] == 0).all()
    assert ((counts[:order] - 200).abs() < 5 * 200 ** 0.5).all(), counts  # uniform within 5 sigma
    again = BatchAugment3D(rotations)(probe.expand(n, -1, -1, -1, -1), generator=torch.Generator().manual_seed(5))
    assert torch.equal(out, again)  # seeded


def test_translate_3d_and_crop_padding():
    x = torch.rand(3, 2, 4, 4, 4)
    shift = torch.tensor([[1, 0, -2], [0, 0, 0], [-1, 2, 1]])
    out = translate(x, shift, fill=-1.0)
    for i, (dz, dy, dx) in enumerate(shift.tolist()):
        ref = torch.full_like(x[i], -1.0)
        src = x[i][:, max(0, -dz):4 - max(0, dz), max(0, -dy):4 - max(0, dy), max(0, -dx):4 - max(0, dx)]
        ref[:, max(0, dz):4 + min(0, dz), max(0, dy):4 + min(0, dy), max(0, dx):4 + min(0, dx)] = src
        assert torch.equal(out[i], ref)
    crop = BatchAugment3D(crop_padding=1, fill=-1.0)(x, generator=torch.Generator().manual_seed(0))
    assert crop.shape == x.shape and (crop == -1.0).any()
    with pytest.raises(ValueError, match=r"expects a \(N, C, D, H, W\) batch, got shape \(2, 4, 4, 4\)"):
        BatchAugment3D("cube")(torch.rand(2, 4, 4, 4))


# ---------------------------------------------------------------------------------- downloads and bad files
def test_download_from_http_mirror_and_file_mirror(tmp_path, http_server):
    served, md5 = _write(tmp_path / "server", "adrenalmnist3d")
    url = http_server(tmp_path / "server")
    dm = MedMNIST3DDataModule(flag="adrenalmnist3d", root=str(tmp_path / "root"), mirror=url, md5=md5)
    dm.prepare_data()
    assert dm.file_path == tmp_path / "root" / "adrenalmnist3d.npz" and dm.file_path.read_bytes() == served.read_bytes()
    assert os.listdir(tmp_path / "root") == ["adrenalmnist3d.npz"]
    served64, md5_64 = _write(tmp_path / "mirror dir", "nodulemnist3d", size=64, counts=(2, 2, 2))
    dm = MedMNIST3DDataModule(flag="nodulemnist3d", size=64, root=str(tmp_path / "root"),
                              mirror=(tmp_path / "mirror dir").as_uri(), md5=md5_64)
    dm.setup("test")
    assert dm.file_path.name == "nodulemnist3d_64.npz" and dm.test_dataset.images.shape == (2, 1, 64, 64, 64)


def test_wrong_checksum_writes_and_overwrites_nothing(tmp_path, http_server):
    served, md5 = _write(tmp_path / "server", "organmnist3d")
    url = http_server(tmp_path / "server")
    root = tmp_path / "root"
    with pytest.raises(ChecksumError, match="nothing was saved") as err:  # official md5 expected, synthetic served
        MedMNIST3DDataModule(flag="organmnist3d", root=str(root), mirror=url).prepare_data()
    assert dataset_info("organmnist3d").md5 in str(err.value)
    assert not root.exists() or os.listdir(root) == []
    placed, _ = _write(root, "organmnist3d", seed=7)  # a file already in the root with another md5
    before = (placed.read_bytes(), placed.stat().st_mtime_ns)
    with pytest.raises(ChecksumError, match="left untouched"):
        MedMNIST3DDataModule(flag="organmnist3d", root=str(root), mirror=url, md5=md5).setup()
    assert (placed.read_bytes(), placed.stat().st_mtime_ns) == before and os.listdir(root) == [placed.name]


def test_offline_errors_are_clear(tmp_path, dead_url):
    info = dataset_info("fracturemnist3d", 64)
    with pytest.raises(DataFileNotFoundError) as err:
        MedMNIST3DDataModule(flag="fracturemnist3d", size=64, root=str(tmp_path / "r"), download=False).setup()
    assert "fracturemnist3d_64.npz" in str(err.value) and info.url in str(err.value) and info.md5 in str(err.value)
    with pytest.raises(DataFileNotFoundError, match="offline"):
        MedMNIST3DDataModule(flag="fracturemnist3d", size=64, root=str(tmp_path / "r"), mirror=dead_url).setup()


def _bad_file(tmp_path: Path, **arrays) -> str:
    """Write organmnist3d.npz from a good synthetic file with ``arrays`` replaced; return the DataFormatError."""
    path, _ = _write(tmp_path, "organmnist3d", counts=(4, 2, 2))
    data = dict(np.load(path))
    data.update(arrays)
    np.savez_compressed(path, **data)
    with pytest.raises(DataFormatError) as err:
        _dm(tmp_path, md5=_md5(path)).setup()
    message = str(err.value)
    assert str(path) in message and "organmnist3d file at 28x28x28" in message and "Fix:" in message
    return message


@pytest.mark.parametrize("images, shape", [
    (np.zeros((4, 28, 28), np.uint8), r"\(4, 28, 28\), expected \(N, 28, 28, 28\) .*2D images"),
    (np.zeros((4, 28, 28, 27), np.uint8), r"\(4, 28, 28, 27\), expected \(N, 28, 28, 28\)"),
    (np.zeros((4, 1, 28, 28, 28), np.uint8), r"\(4, 1, 28, 28, 28\), expected \(N, 28, 28, 28\)"),
])
def test_mis_shaped_volumes(tmp_path, images, shape):
    assert re.search(r"train_images has shape " + shape, _bad_file(tmp_path, train_images=images))


def test_wrong_resolution_suggests_size(tmp_path):
    message = _bad_file(tmp_path, val_images=np.zeros((2, 64, 64, 64), np.uint8))
    assert "(2, 64, 64, 64), expected (N, 28, 28, 28)" in message and "size=64" in message


def test_bad_labels_and_dtype(tmp_path):
    assert "11 classes (0..10)" in _bad_file(tmp_path / "labels", test_labels=np.full((2, 1), 11, np.uint8))
    assert "expected uint8" in _bad_file(tmp_path / "dtype", test_images=np.zeros((2, 28, 28, 28), np.float32))


def test_corrupt_file(tmp_path):
    path, _ = _write(tmp_path, "organmnist3d")
    path.write_bytes(path.read_bytes()[:5000])  # truncated
    with pytest.raises(DataFormatError, match=f"{path}.*cannot read it as .npz"):
        _dm(tmp_path, md5=_md5(path)).setup()
