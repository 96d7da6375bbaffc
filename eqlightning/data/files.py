"""Where MedMNIST files live, how they are downloaded, and how they are verified.

* **Root resolution** (:func:`resolve_root`): the explicit ``root`` argument, else the ``EQL_DATA_ROOT`` environment
  variable, else ``$XDG_CACHE_HOME/eqlightning/medmnist`` (``~/.cache/eqlightning/medmnist``).
* **Embedded sample**: ``breastmnist.npz`` (28x28, 560 kB, CC BY 4.0) ships inside the package
  (``eqlightning/data/samples``) and is used when the root does not hold that file, so a machine without network
  can run the quick start. No other file is embedded.
* **Download** (:func:`download_file`): from the official Zenodo URL or from ``mirror`` (an ``http(s)://`` or
  ``file://`` base URL holding files under their official names), streamed into a temporary file next to the
  destination, MD5-checked, then linked into place; on any failure the temporary file is removed and nothing
  that existed before is touched.
* **Verification** (:func:`verify_md5`): every file is checked against its expected MD5 (official, or the user's
  ``md5=`` for custom files in the official format). A mismatching file is refused, never deleted or overwritten.
  Successful checks are remembered in ``$XDG_CACHE_HOME/eqlightning/verified-md5.json`` (not next to the data,
  which may be read-only), keyed by absolute path and checked against size, ``mtime_ns`` and inode, so a
  changed file is hashed again. A same-size rewrite that keeps ``mtime_ns`` and the inode would go unnoticed,
  as with any stat-based cache (``make``, ``rsync``): delete the JSON file to force re-hashing.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import sys
import tempfile
import urllib.error
import urllib.request
from pathlib import Path
from typing import Iterator

ENV_ROOT = "EQL_DATA_ROOT"
#: Files shipped inside the package, with their (official) MD5.
EMBEDDED: dict[str, str] = {"breastmnist.npz": "750601b1f35ba3300ea97c75c52ff8f6"}
SAMPLES_DIR = Path(__file__).resolve().parent / "samples"
_CACHE_VERSION = 1
_CACHE_MAX_ENTRIES = 512


class DataFileError(Exception):
    """Base class of the data-file errors below."""


class DataFileNotFoundError(DataFileError, FileNotFoundError):
    """The file is not in the root and could not (or may not) be downloaded."""


class ChecksumError(DataFileError, ValueError):
    """A file (on disk or just downloaded) does not have the expected MD5."""


def user_cache_dir() -> Path:
    """``$XDG_CACHE_HOME/eqlightning``, or ``~/.cache/eqlightning`` when XDG_CACHE_HOME is unset or empty."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base).expanduser().absolute() / "eqlightning"


def resolve_root(root: str | os.PathLike | None = None) -> tuple[Path, str]:
    """Return ``(directory, where it came from)``: the argument, ``EQL_DATA_ROOT``, or the default cache."""
    if root is not None and str(root) != "":
        return Path(root).expanduser().absolute(), "root argument"
    env = os.environ.get(ENV_ROOT)
    if env:
        return Path(env).expanduser().absolute(), f"{ENV_ROOT} environment variable"
    return user_cache_dir() / "medmnist", "default cache directory"


def embedded_sample(filename: str) -> Path | None:
    """Path of the packaged copy of ``filename``, or None when it is not embedded."""
    path = SAMPLES_DIR / filename
    return path if filename in EMBEDDED and path.is_file() else None


def md5sum(path: str | os.PathLike, chunk_size: int = 1 << 20) -> str:
    """MD5 hex digest of a file, read in chunks."""
    digest = hashlib.md5(usedforsecurity=False)
    with open(path, "rb") as f:
        while chunk := f.read(chunk_size):
            digest.update(chunk)
    return digest.hexdigest()


# ---------------------------------------------------------------------------------------------- verification cache
def _cache_file() -> Path:
    return user_cache_dir() / "verified-md5.json"


def _stat_key(st: os.stat_result) -> dict[str, int]:
    return {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "ino": st.st_ino}


def _read_cache(path: Path) -> dict[str, dict]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        if isinstance(data, dict) and data.get("version") == _CACHE_VERSION and isinstance(data.get("files"), dict):
            return data["files"]
    except (OSError, ValueError):
        pass  # missing or corrupt cache: start afresh
    return {}


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    """Exclusive advisory lock on ``path.lock`` (POSIX); a no-op where fcntl is unavailable."""
    try:
        import fcntl
    except ImportError:  # Windows: os.replace below still keeps the file whole
        yield
        return
    with open(path.with_name(path.name + ".lock"), "a+b") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _cache_lookup(real: str, st: os.stat_result) -> str | None:
    entry = _read_cache(_cache_file()).get(real)
    if isinstance(entry, dict) and all(entry.get(k) == v for k, v in _stat_key(st).items()):
        return entry.get("md5")
    return None


def _cache_store(real: str, st: os.stat_result, md5: str) -> None:
    """Record a successful verification: read-modify-write under a lock, written atomically (temp + replace)."""
    cache = _cache_file()
    try:
        cache.parent.mkdir(parents=True, exist_ok=True)
        with _locked(cache):
            files = _read_cache(cache)
            files[real] = {**_stat_key(st), "md5": md5}
            if len(files) > _CACHE_MAX_ENTRIES:  # forget files that are gone, then the oldest entries
                files = {k: v for k, v in files.items() if os.path.exists(k)}
                files = dict(list(files.items())[-_CACHE_MAX_ENTRIES:])
            fd, tmp = tempfile.mkstemp(prefix=".verified-md5.", suffix=".tmp", dir=cache.parent)
            try:
                with os.fdopen(fd, "w", encoding="utf-8") as f:
                    json.dump({"version": _CACHE_VERSION, "files": files}, f, indent=1, sort_keys=True)
                os.replace(tmp, cache)
            except BaseException:
                with contextlib.suppress(OSError):
                    os.unlink(tmp)
                raise
    except OSError:
        pass  # read-only home or full disk: verification still happened, we just hash again next time


def verify_md5(path: str | os.PathLike, expected: str, *, use_cache: bool = True) -> None:
    """Raise :class:`ChecksumError` unless ``path`` has MD5 ``expected``; the file is never modified or removed."""
    real = os.path.realpath(path)
    st = os.stat(real)
    expected = expected.strip().lower()
    if use_cache and _cache_lookup(real, st) == expected:
        return
    actual = md5sum(real)
    if actual != expected:
        raise ChecksumError(
            f"MD5 mismatch for {path}: expected {expected}, got {actual} ({st.st_size:,} bytes). The file is "
            f"corrupt, truncated or not the expected one, so it was not used (and was left untouched). Fix: delete "
            f"it and run again to re-download it, or copy a good copy there; if it is your own file in the "
            f"MedMNIST .npz format, pass its MD5 as md5=... .")
    if use_cache and os.stat(real).st_mtime_ns == st.st_mtime_ns:  # skip if it changed while we were hashing
        _cache_store(real, st, actual)


# ----------------------------------------------------------------------------------------------------- download
def _urlopen(url: str, timeout: float):
    """``urllib.request.urlopen`` (indirection so tests can intercept every network access)."""
    request = urllib.request.Request(url, headers={"User-Agent": "eqlightning-data (python urllib)"})
    return urllib.request.urlopen(request, timeout=timeout)  # noqa: S310 (http, https and file URLs are intended)


def _publish(tmp: str, dest: Path) -> bool:
    """Move a verified temp file to ``dest`` without replacing an existing file; False if one appeared meanwhile."""
    try:
        os.link(tmp, dest)  # atomic, and fails instead of overwriting
    except FileExistsError:
        return False  # another process was faster; the caller verifies whatever is there
    except OSError:  # file system without hard links
        if dest.exists():
            return False
        os.replace(tmp, dest)
    return True


def download_file(url: str, dest: str | os.PathLike, md5: str, *, timeout: float = 60.0) -> Path:
    """Download ``url`` to ``dest`` if its MD5 is ``md5``; otherwise raise and leave nothing behind.

    Raises:
        ChecksumError: the downloaded bytes have another MD5 (nothing is written to ``dest``).
        OSError: network or file-system failure (``urllib.error.URLError`` is an OSError).
    """
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".part", dir=dest.parent)
    try:
        digest, n_bytes = hashlib.md5(usedforsecurity=False), 0
        with os.fdopen(fd, "wb") as out, _urlopen(url, timeout) as response:
            expected_len = response.headers.get("Content-Length") if hasattr(response, "headers") else None
            while chunk := response.read(1 << 20):
                digest.update(chunk)
                out.write(chunk)
                n_bytes += len(chunk)
        if expected_len is not None and expected_len.isdigit() and int(expected_len) != n_bytes:
            raise OSError(f"download of {url} was cut short: got {n_bytes:,} of {int(expected_len):,} bytes")
        actual = digest.hexdigest()
        if actual != md5.strip().lower():
            raise ChecksumError(
                f"the bytes downloaded from {url} ({n_bytes:,} bytes) have MD5 {actual}, expected {md5}; nothing "
                f"was saved to {dest}. The server or mirror does not serve the expected file: check the URL or "
                f"mirror, or pass the right md5=... for a custom file.")
        os.chmod(tmp, 0o644)
        if _publish(tmp, dest):
            real = os.path.realpath(dest)
            _cache_store(real, os.stat(real), actual)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
    return dest


def _mirror_url(mirror: str, filename: str) -> str:
    if not mirror.startswith(("http://", "https://", "file://")):
        raise ValueError(f"mirror must be an http://, https:// or file:// base URL, got {mirror!r} (for a local "
                         f"directory use file:///abs/path or point root= at it)")
    return mirror.rstrip("/") + "/" + filename


def ensure_file(filename: str, url: str, md5: str, root: str | os.PathLike | None = None, *,
                download: bool = True, mirror: str | None = None, timeout: float = 60.0) -> Path:
    """Return the path of a verified copy of ``filename``, downloading it into the root if needed.

    Order: ``<root>/<filename>`` (verified; a mismatch raises, it is never replaced), then the embedded copy
    (only for embedded files whose MD5 is the one asked for), then a download from ``mirror`` or ``url``.

    Args:
        filename: official file name, e.g. ``"breastmnist_64.npz"``.
        url: official download URL (used when ``mirror`` is None).
        md5: expected MD5 (official, or the user's for a custom file).
        root: data directory; None resolves ``EQL_DATA_ROOT`` or the default cache (see :func:`resolve_root`).
        download: allow downloading a missing file.
        mirror: base URL (``http(s)://`` or ``file://``) holding files under their official names.
        timeout: socket timeout in seconds for the download.
    """
    directory, source = resolve_root(root)
    if directory.exists() and not directory.is_dir():
        raise NotADirectoryError(f"MedMNIST root {directory} (from the {source}) is not a directory: point "
                                 f"root= or {ENV_ROOT} at a directory")
    path = directory / filename
    md5 = md5.strip().lower()
    if path.exists():
        verify_md5(path, md5)
        return path
    sample = embedded_sample(filename)
    if sample is not None and EMBEDDED[filename] == md5:
        verify_md5(sample, md5)
        return sample
    source_url = _mirror_url(mirror, filename) if mirror else url
    where = (f"Download it from {url} (MD5 {md5}) and put it in {directory} (the {source}), or set root= or the "
             f"{ENV_ROOT} environment variable to a directory that holds it")
    if not download:
        raise DataFileNotFoundError(f"MedMNIST file {filename!r} is not in {directory} and download=False. {where}.")
    try:
        directory.mkdir(parents=True, exist_ok=True)
        if not os.access(directory, os.W_OK | os.X_OK):
            raise PermissionError("permission denied")
    except OSError as err:
        raise DataFileNotFoundError(f"MedMNIST file {filename!r} is missing and cannot be downloaded into "
                                    f"{directory} ({err}): choose a writable root= or {ENV_ROOT}. {where}.") from err
    print(f"eqlightning: downloading {source_url} -> {path}", file=sys.stderr, flush=True)
    try:
        download_file(source_url, path, md5, timeout=timeout)  # a ChecksumError propagates as it is
    except OSError as err:  # URLError, HTTPError, timeouts, connection refused
        http_error = isinstance(err, urllib.error.HTTPError)
        reason = err if http_error else getattr(err, "reason", None) or err
        raise DataFileNotFoundError(
            f"MedMNIST file {filename!r} is not in {directory} and could not be downloaded from {source_url} "
            f"({reason}){'' if http_error else '; are you offline?'} {where}"
            f"{'' if mirror else ', or pass mirror= with a base URL that serves it'}.") from err
    verify_md5(path, md5)  # cheap (cached by the download) unless another process placed the file meanwhile
    return path
