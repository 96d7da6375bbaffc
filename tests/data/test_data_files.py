"""Root resolution, missing/corrupt files, the MD5 verification cache and the embedded sample."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

import eqlightning.data.files as files
from eqlightning.data import (ChecksumError, DataFileNotFoundError, MedMNISTDataModule, dataset_info, ensure_file,
                              resolve_root, user_cache_dir, verify_md5)

BREAST_MD5 = "750601b1f35ba3300ea97c75c52ff8f6"


@pytest.fixture
def count_hashes(monkeypatch):
    """Count calls of the hashing function (files.md5sum)."""
    calls = []
    real = files.md5sum

    def counting(path, *args, **kwargs):
        calls.append(Path(path))
        return real(path, *args, **kwargs)

    monkeypatch.setattr(files, "md5sum", counting)
    return calls


# ------------------------------------------------------------------------------------------------ root resolution
def test_root_resolution_order(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert resolve_root() == (tmp_path / "xdg" / "eqlightning" / "medmnist", "default cache directory")
    monkeypatch.setenv("EQL_DATA_ROOT", str(tmp_path / "env"))
    assert resolve_root() == (tmp_path / "env", "EQL_DATA_ROOT environment variable")
    assert resolve_root(tmp_path / "arg") == (tmp_path / "arg", "root argument")
    monkeypatch.delenv("EQL_DATA_ROOT")
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert resolve_root()[0] == tmp_path / "home" / ".cache" / "eqlightning" / "medmnist"
    assert user_cache_dir() == tmp_path / "home" / ".cache" / "eqlightning"


def test_env_root_is_used_by_the_data_module(tmp_path, monkeypatch, medmnist_root):
    monkeypatch.setenv("EQL_DATA_ROOT", str(medmnist_root))
    dm = MedMNISTDataModule(flag="pneumoniamnist", download=False)
    dm.prepare_data()
    assert dm.file_path == medmnist_root / "pneumoniamnist.npz"


# ---------------------------------------------------------------------------------------------------- missing
def test_missing_file_without_download(tmp_path):
    info = dataset_info("pathmnist", 64)
    with pytest.raises(DataFileNotFoundError) as err:
        MedMNISTDataModule(flag="pathmnist", size=64, root=str(tmp_path / "data"), download=False).setup()
    message = str(err.value)
    for part in ("pathmnist_64.npz", info.url, info.md5, str(tmp_path / "data"), "EQL_DATA_ROOT", "download=False"):
        assert part in message
    assert isinstance(err.value, FileNotFoundError)
    assert not (tmp_path / "data").exists()


def test_root_that_is_a_file(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(NotADirectoryError, match="not a directory"):
        MedMNISTDataModule(flag="octmnist", root=str(tmp_path / "file"), download=False).prepare_data()


# --------------------------------------------------------------------------------------------- corrupt files
@pytest.mark.parametrize("damage", ["truncate", "flip_byte", "other_file"])
def test_corrupt_file_is_refused_and_untouched(tmp_path, medmnist_root, damage):
    path = tmp_path / "breastmnist.npz"
    good = (medmnist_root / "breastmnist.npz").read_bytes()
    bad = {"truncate": good[: len(good) // 2], "flip_byte": good[:1000] + bytes([good[1000] ^ 1]) + good[1001:],
           "other_file": (medmnist_root / "pneumoniamnist.npz").read_bytes()}[damage]
    path.write_bytes(bad)
    before = path.stat()
    with pytest.raises(ChecksumError) as err:
        MedMNISTDataModule(root=str(tmp_path), download=True).setup()  # download=True: still must not replace it
    message = str(err.value)
    assert str(path) in message and f"expected {BREAST_MD5}" in message and files.md5sum(path) in message
    assert "delete it" in message and "md5=" in message
    assert path.read_bytes() == bad and path.stat().st_mtime_ns == before.st_mtime_ns  # untouched
    assert {p.name for p in tmp_path.iterdir()} - {"xdg-cache"} == {"breastmnist.npz"}  # no temp files


def test_wrong_md5_argument(tmp_path, medmnist_root):
    with pytest.raises(ChecksumError, match="expected 00000000000000000000000000000000"):
        MedMNISTDataModule(root=str(medmnist_root), md5="0" * 32).prepare_data()


def test_failed_verification_is_not_cached(tmp_path, medmnist_root, count_hashes):
    path = tmp_path / "breastmnist.npz"
    shutil.copy(medmnist_root / "breastmnist.npz", path)
    for _ in range(2):
        with pytest.raises(ChecksumError):
            verify_md5(path, "0" * 32)
    assert len(count_hashes) == 2


# --------------------------------------------------------------------------------------- verification cache
@pytest.mark.parametrize("via", ["directory", "symlink"])
def test_second_load_does_not_rehash(tmp_path, medmnist_root, count_hashes, via):
    """One hash for any number of loads, whichever way the root is spelled. Files are hashed and cached under their
    resolved path (os.path.realpath), so compare with that: ../shared may itself be a symbolic link."""
    link = tmp_path / "medmnist-link"
    link.symlink_to(medmnist_root, target_is_directory=True)
    root, other = (medmnist_root, link) if via == "directory" else (link, medmnist_root)
    real = Path(os.path.realpath(medmnist_root / "pneumoniamnist.npz"))
    MedMNISTDataModule(flag="pneumoniamnist", root=str(root), download=False).prepare_data()
    MedMNISTDataModule(flag="pneumoniamnist", root=str(root), download=False).prepare_data()
    dm = MedMNISTDataModule(flag="pneumoniamnist", root=str(root), download=False)
    dm.prepare_data()
    dm.setup()  # prepare_data + setup on one instance: still one check
    assert count_hashes == [real]
    assert dm.file_path == root / "pneumoniamnist.npz"  # reported as the user spelled it, not resolved
    MedMNISTDataModule(flag="pneumoniamnist", root=str(other), download=False).prepare_data()
    assert count_hashes == [real]  # the same file through the other path: already verified
    cache = json.loads((tmp_path / "xdg-cache" / "eqlightning" / "verified-md5.json").read_text())
    assert list(cache["files"]) == [str(real)]
    assert cache["files"][str(real)]["md5"] == "28209eda62fecd6e6a2d98b1501bb15f"
    assert not any(p.name.startswith(".") for p in medmnist_root.iterdir())


def test_modified_file_is_reverified(tmp_path, write_npz, count_hashes):
    path, md5 = write_npz(tmp_path / "data", "octmnist")
    verify_md5(path, md5)
    verify_md5(path, md5)
    assert len(count_hashes) == 1
    original = path.read_bytes()
    path.write_bytes(original[:-1] + bytes([original[-1] ^ 0xFF]))  # same size, new content
    os.utime(path, ns=(path.stat().st_atime_ns, path.stat().st_mtime_ns + 1_000_000))
    with pytest.raises(ChecksumError):
        verify_md5(path, md5)
    assert len(count_hashes) == 2
    path.write_bytes(original)  # restored: verified (hashed) again, then cached again
    verify_md5(path, md5)
    verify_md5(path, md5)
    assert len(count_hashes) == 3


def test_cache_is_per_expected_md5(tmp_path, write_npz, count_hashes):
    path, md5 = write_npz(tmp_path / "data", "octmnist")
    verify_md5(path, md5)
    with pytest.raises(ChecksumError):
        verify_md5(path, "f" * 32)  # a cached success for md5 must not vouch for another checksum


def test_corrupt_or_unwritable_cache_is_harmless(tmp_path, write_npz, monkeypatch):
    path, md5 = write_npz(tmp_path / "data", "octmnist")
    cache = tmp_path / "xdg-cache" / "eqlightning" / "verified-md5.json"
    cache.parent.mkdir(parents=True)
    cache.write_text("{not json")
    verify_md5(path, md5)
    assert json.loads(cache.read_text())["version"] == 1
    monkeypatch.setenv("XDG_CACHE_HOME", str(path))  # a file: the cache directory cannot be created
    verify_md5(path, md5)


def test_concurrent_cache_writers(tmp_path, write_npz):
    """Threads verifying different files at once: the JSON stays valid and keeps every entry."""
    from concurrent.futures import ThreadPoolExecutor
    made = [write_npz(tmp_path / "data", "octmnist", counts=(2, 1, 1), seed=i, name=f"f{i}.npz") for i in range(8)]
    with ThreadPoolExecutor(4) as pool:
        list(pool.map(lambda pm: verify_md5(*pm), made))
    cache = json.loads((tmp_path / "xdg-cache" / "eqlightning" / "verified-md5.json").read_text())
    assert {os.path.realpath(p) for p, _ in made} <= set(cache["files"])
    assert not [p for p in cache_dir_files(tmp_path) if p.endswith(".tmp")]


def cache_dir_files(tmp_path: Path) -> list[str]:
    return os.listdir(tmp_path / "xdg-cache" / "eqlightning")


# ----------------------------------------------------------------------------------------------- embedded sample
def test_embedded_sample_matches_shared_file(medmnist_root):
    sample = files.embedded_sample("breastmnist.npz")
    assert sample is not None and files.md5sum(sample) == BREAST_MD5 == dataset_info("breastmnist").md5
    assert sample.read_bytes() == (medmnist_root / "breastmnist.npz").read_bytes()
    assert (sample.parent / "ATTRIBUTION.md").is_file()
    assert files.embedded_sample("breastmnist_64.npz") is None and files.embedded_sample("pathmnist.npz") is None


@pytest.mark.parametrize("download", [False, True])
def test_embedded_sample_used_when_root_is_empty(tmp_path, monkeypatch, download):
    def no_download(*args, **kwargs):
        raise AssertionError("must not download")

    monkeypatch.setattr(files, "download_file", no_download)
    dm = MedMNISTDataModule(root=str(tmp_path / "empty"), download=download)
    dm.setup()
    assert dm.file_path == files.SAMPLES_DIR / "breastmnist.npz"
    assert dm.split_sizes == {"train": 546, "val": 78, "test": 156} and len(dm.test_dataset) == 156
    assert not (tmp_path / "empty").exists()  # nothing copied


def test_embedded_sample_is_verified_too(tmp_path, monkeypatch):
    fake = tmp_path / "samples"
    fake.mkdir()
    (fake / "breastmnist.npz").write_bytes(b"tampered")
    monkeypatch.setattr(files, "SAMPLES_DIR", fake)
    with pytest.raises(ChecksumError, match="expected 750601b1"):
        ensure_file("breastmnist.npz", "http://unused", BREAST_MD5, tmp_path / "empty", download=False)
    assert (fake / "breastmnist.npz").read_bytes() == b"tampered"


def test_no_embedded_fallback_for_64px(tmp_path):
    with pytest.raises(DataFileNotFoundError, match="breastmnist_64.npz"):
        MedMNISTDataModule(size=64, root=str(tmp_path), download=False).prepare_data()


def test_defaults_work_offline():
    """MedMNISTDataModule() with no root, no EQL_DATA_ROOT and an empty cache: the quick start still runs."""
    dm = MedMNISTDataModule(download=False)
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == (128, 1, 28, 28) and dm.file_path == files.SAMPLES_DIR / "breastmnist.npz"
