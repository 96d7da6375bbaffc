"""Downloads from a local HTTP server and a file:// mirror; bad bytes and dead servers. Never the real internet."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest
import torch

import eqlightning.data.files as files
from eqlightning.data import ChecksumError, DataFileNotFoundError, MedMNISTDataModule, dataset_info, download_file


def _leftovers(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir()) if directory.exists() else []


def test_download_from_http_mirror(tmp_path, write_npz, http_server):
    served, md5 = write_npz(tmp_path / "server", "dermamnist", size=64, counts=(6, 2, 2))
    url = http_server(tmp_path / "server")
    root = tmp_path / "root" / "nested"  # created on demand
    dm = MedMNISTDataModule(flag="dermamnist", size=64, root=str(root), mirror=url + "/", md5=md5, batch_size=4)
    dm.prepare_data()
    assert dm.file_path == root / "dermamnist_64.npz"
    assert dm.file_path.read_bytes() == served.read_bytes()
    assert _leftovers(root) == ["dermamnist_64.npz"]  # no .part file left
    assert stat.S_IMODE(os.stat(dm.file_path).st_mode) == 0o644
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == (4, 3, 64, 64) and y.dtype == torch.long


def test_downloaded_file_is_not_hashed_again(tmp_path, write_npz, http_server, monkeypatch):
    _, md5 = write_npz(tmp_path / "server", "octmnist")
    url = http_server(tmp_path / "server")
    calls = []
    monkeypatch.setattr(files, "md5sum", lambda *a, **k: calls.append(a) or "")
    MedMNISTDataModule(flag="octmnist", root=str(tmp_path / "root"), mirror=url, md5=md5).prepare_data()
    MedMNISTDataModule(flag="octmnist", root=str(tmp_path / "root"), mirror=url, md5=md5).prepare_data()
    assert calls == []  # the streaming hash of the download was recorded in the verification cache


def test_download_from_file_mirror(tmp_path, write_npz):
    served, md5 = write_npz(tmp_path / "mirror dir", "chestmnist", size=128, counts=(2, 2, 2))
    mirror = (tmp_path / "mirror dir").as_uri()  # file:///.../mirror%20dir
    dm = MedMNISTDataModule(flag="chestmnist", size=128, root=str(tmp_path / "root"), mirror=mirror, md5=md5)
    dm.setup("test")
    assert dm.file_path.read_bytes() == served.read_bytes()
    assert dm.test_dataset.labels.shape == (2, 14)


def test_wrong_bytes_are_refused(tmp_path, write_npz, http_server):
    write_npz(tmp_path / "server", "bloodmnist")
    url = http_server(tmp_path / "server")
    root = tmp_path / "root"
    with pytest.raises(ChecksumError) as err:
        MedMNISTDataModule(flag="bloodmnist", root=str(root), mirror=url).prepare_data()  # official md5 expected
    message = str(err.value)
    assert f"{url}/bloodmnist.npz" in message and dataset_info("bloodmnist").md5 in message
    assert "nothing was saved" in message
    assert _leftovers(root) == []


def test_http_404(tmp_path, http_server):
    (tmp_path / "server").mkdir()
    url = http_server(tmp_path / "server")
    with pytest.raises(DataFileNotFoundError, match=r"could not be downloaded from .*tissuemnist.npz \(HTTP Error 404"):
        MedMNISTDataModule(flag="tissuemnist", root=str(tmp_path / "root"), mirror=url).prepare_data()
    assert _leftovers(tmp_path / "root") == []


def test_unreachable_server(tmp_path, dead_url):
    info = dataset_info("organcmnist", 224)
    with pytest.raises(DataFileNotFoundError) as err:
        MedMNISTDataModule(flag="organcmnist", size=224, root=str(tmp_path / "root"), mirror=dead_url).prepare_data()
    message = str(err.value)
    for part in ("organcmnist_224.npz", f"{dead_url}/organcmnist_224.npz", info.url, info.md5,
                 str(tmp_path / "root"), "EQL_DATA_ROOT", "offline"):
        assert part in message
    assert _leftovers(tmp_path / "root") == []


def test_official_url_is_used_without_mirror(tmp_path, monkeypatch):
    """Without a mirror the official Zenodo URL is requested (intercepted here: tests never go online)."""
    import urllib.error
    requested = []

    def offline(url, timeout):
        requested.append(url)
        raise urllib.error.URLError("no network in tests")

    monkeypatch.setattr(files, "_urlopen", offline)
    info = dataset_info("organsmnist", 64)
    with pytest.raises(DataFileNotFoundError, match="no network in tests") as err:
        MedMNISTDataModule(flag="organsmnist", size=64, root=str(tmp_path / "root")).prepare_data()
    assert requested == [info.url] and info.url.startswith("https://zenodo.org/")
    assert "mirror=" in str(err.value)


def test_truncated_transfer(tmp_path, monkeypatch):
    """A server that announces more bytes than it sends: refused, nothing left behind."""
    import io

    class Short(io.BytesIO):
        headers = {"Content-Length": "1000"}

    monkeypatch.setattr(files, "_urlopen", lambda url, timeout: Short(b"x" * 10))
    with pytest.raises(OSError, match="cut short"):
        download_file("http://127.0.0.1:1/f.npz", tmp_path / "f.npz", "0" * 32)
    assert _leftovers(tmp_path) == []


def test_existing_file_is_never_overwritten(tmp_path, write_npz, monkeypatch):
    """A file that appears at the destination while downloading wins; the download is discarded."""
    served, md5 = write_npz(tmp_path / "mirror", "octmnist")
    dest = tmp_path / "root" / "octmnist.npz"
    dest.parent.mkdir()
    real_urlopen = files._urlopen

    def racing(url, timeout):
        dest.write_bytes(b"someone else's file")
        return real_urlopen(url, timeout)

    monkeypatch.setattr(files, "_urlopen", racing)
    download_file((tmp_path / "mirror" / "octmnist.npz").as_uri(), dest, md5)
    assert dest.read_bytes() == b"someone else's file"
    assert _leftovers(dest.parent) == ["octmnist.npz"]


def test_unwritable_root(tmp_path, write_npz):
    _, md5 = write_npz(tmp_path / "mirror", "octmnist")
    (tmp_path / "a_file").write_text("x")
    root = tmp_path / "a_file" / "data"  # cannot be created
    with pytest.raises(DataFileNotFoundError, match="writable root") as err:
        MedMNISTDataModule(flag="octmnist", root=str(root), md5=md5,
                           mirror=(tmp_path / "mirror").as_uri()).prepare_data()
    assert "EQL_DATA_ROOT" in str(err.value) and md5 in str(err.value)
