"""Fixtures for the data tests: an isolated cache, no internet, synthetic MedMNIST files and local HTTP servers."""

from __future__ import annotations

import functools
import hashlib
import http.server
import socket
import threading
from pathlib import Path
from typing import Callable

import numpy as np
import pytest

from eqlightning.data import dataset_info


@pytest.fixture(scope="module", autouse=True)
def _isolated_module_env(tmp_path_factory: pytest.TempPathFactory):
    """Isolation for module-scoped fixtures, which are set up before the per-test fixture below (module scope, not
    session: the environment is restored before tests outside tests/data run)."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("XDG_CACHE_HOME", str(tmp_path_factory.mktemp("xdg-cache-module")))
        mp.delenv("EQL_DATA_ROOT", raising=False)
        yield


@pytest.fixture(autouse=True)
def _isolated_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """Each test gets its own verification cache / default root, and EQL_DATA_ROOT from the shell is ignored."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg-cache"))
    monkeypatch.delenv("EQL_DATA_ROOT", raising=False)


@pytest.fixture(autouse=True)
def _no_internet(monkeypatch: pytest.MonkeyPatch):
    """Refuse every connection that is not to the loopback interface (the tests must never reach Zenodo)."""
    real = socket.create_connection

    def guarded(address, *args, **kwargs):
        if address[0] not in ("127.0.0.1", "localhost", "::1"):
            raise OSError(f"test tried to reach the internet: {address}")
        return real(address, *args, **kwargs)

    monkeypatch.setattr(socket, "create_connection", guarded)


def md5_of(path: Path) -> str:
    return hashlib.md5(Path(path).read_bytes()).hexdigest()


@pytest.fixture
def write_npz() -> Callable[..., tuple[Path, str]]:
    """Factory writing a small synthetic file in the official MedMNIST format; returns ``(path, md5)``.

    ``write_npz(directory, flag, size=28, counts=(20, 8, 8), channels=None, image_size=None, drop=(),
    label_shift=0, seed=0)``: channels/image_size default to what ``flag``/``size`` require; ``drop`` removes keys;
    ``label_shift`` adds to every class index (to make labels out of range). Labels cycle through all classes.
    """

    def write(directory: Path, flag: str, size: int = 28, counts=(20, 8, 8), channels: int | None = None,
              image_size: int | None = None, drop: tuple[str, ...] = (), label_shift: int = 0,
              seed: int = 0, name: str | None = None) -> tuple[Path, str]:
        info = dataset_info(flag, size)
        channels = info.in_channels if channels is None else channels
        side = size if image_size is None else image_size
        rng = np.random.default_rng(seed)
        arrays = {}
        for split, n in zip(("train", "val", "test"), counts):
            shape = (n, side, side) if channels == 1 else (n, side, side, channels)
            arrays[f"{split}_images"] = rng.integers(0, 256, shape, dtype=np.uint8)
            if info.multilabel:
                labels = rng.integers(0, 2, (n, info.num_classes), dtype=np.uint8)
                labels[:, 0] = np.arange(n) % 2  # balanced first label (the stratification key)
            else:
                labels = ((np.arange(n) % info.num_classes) + label_shift).astype(np.uint8)[:, None]
            arrays[f"{split}_labels"] = labels
        for key in drop:
            arrays.pop(key)
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        path = directory / (name or info.filename)
        with open(path, "wb") as f:
            np.savez_compressed(f, **arrays)
        return path, md5_of(path)

    return write


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args) -> None:  # keep pytest output clean
        pass


@pytest.fixture
def http_server() -> Callable[[Path], str]:
    """Factory: serve a directory over HTTP on 127.0.0.1 (random free port); returns the base URL."""
    servers = []

    def serve(directory: Path) -> str:
        handler = functools.partial(_QuietHandler, directory=str(directory))
        server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
        threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True).start()
        servers.append(server)
        return f"http://127.0.0.1:{server.server_address[1]}"

    yield serve
    for server in servers:
        server.shutdown()
        server.server_close()


@pytest.fixture
def dead_url() -> str:
    """An http URL on a local port where nothing listens (connection refused at once)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}"
