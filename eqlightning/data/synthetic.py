"""Synthetic 3D MedMNIST files, for tests, CI runs and demos on machines that cannot download the real ones.

:func:`write_synthetic_medmnist3d` writes ``{flag}.npz`` (size 28) or ``{flag}_64.npz`` in the official format
(``{split}_images`` uint8 ``(N, S, S, S)``, ``{split}_labels`` uint8 ``(N, 1)``). Each volume holds one bright ball
on a dark noisy background; the ball's **radius grows with the class index** (its centre and brightness are random),
so the class is learnable and does not change under rotations, reflections or small translations.

The file's MD5 is not the official one, so pass it to the data module (``md5=``); checksum verification itself is
never skipped. From a shell::

    python -m eqlightning.data.synthetic organmnist3d --root /tmp/med3d      # prints "<md5>  <path>"
    python cli.py fit ... --data.flag organmnist3d --data.root /tmp/med3d --data.md5 <md5>

The bytes depend only on the arguments (fixed zip timestamps), so rewriting a file with the same arguments on the
same machine gives the same MD5; still, read the MD5 from the output rather than hard-coding it (another numpy or
zlib may compress differently).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import tempfile
import zipfile
from pathlib import Path

import numpy as np

from .catalog import SPLITS, dataset_info
from .files import md5sum

_ZIP_TIME = (1980, 1, 1, 0, 0, 0)


def _volumes(n: int, size: int, num_classes: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """``n`` volumes with every class present (when ``n >= num_classes``), in random order."""
    labels = rng.permutation(np.arange(n) % num_classes).astype(np.uint8)
    grid = np.arange(size, dtype=np.float32)
    images = np.empty((n, size, size, size), dtype=np.uint8)
    for i, c in enumerate(labels):
        radius = size * (0.12 + 0.23 * c / max(num_classes - 1, 1))
        centre = rng.uniform(radius + 1, size - 1 - radius, 3).astype(np.float32)
        d2 = ((grid[:, None, None] - centre[0]) ** 2 + (grid[None, :, None] - centre[1]) ** 2
              + (grid[None, None, :] - centre[2]) ** 2)
        ball = 1.0 / (1.0 + np.exp(np.sqrt(d2) - radius))  # soft edge about one voxel wide
        volume = 20.0 + rng.uniform(150.0, 230.0) * ball + rng.normal(0.0, 8.0, ball.shape)
        images[i] = np.clip(np.rint(volume), 0, 255).astype(np.uint8)
    return images, labels[:, None]


def write_synthetic_medmnist3d(root: str | os.PathLike, flag: str, size: int = 28,
                               samples_per_split: tuple[int, int, int] = (32, 8, 8), seed: int = 0, *,
                               overwrite: bool = False) -> Path:
    """Write a synthetic ``flag`` file in the official 3D MedMNIST format and name into ``root``; return its path.

    Args:
        root: directory to write into (created if needed); pass the same directory as ``root=`` to the data module.
        flag: a 3D flag (organmnist3d, nodulemnist3d, adrenalmnist3d, fracturemnist3d, vesselmnist3d,
            synapsemnist3d); labels follow its number of classes.
        size: 28 or 64 (the file is ``{flag}.npz`` or ``{flag}_64.npz``).
        samples_per_split: number of volumes in train, val and test; classes are balanced (counts differ by at most
            one), so every class is present in a split with at least as many volumes as classes.
        seed: seed of the content (same arguments, same arrays).
        overwrite: replace an existing file of that name; by default an existing file (perhaps a real download) is
            left alone and :class:`FileExistsError` is raised.

    The file's MD5 is ``md5sum(path)`` (:func:`~eqlightning.data.md5sum`); give it to the data module as ``md5=``.
    """
    info = dataset_info(flag, size)
    if info.spatial_dims != 3:
        raise ValueError(f"write_synthetic_medmnist3d writes 3D datasets only; {info.flag!r} is a 2D flag")
    counts = tuple(samples_per_split)
    if len(counts) != 3 or any(isinstance(n, bool) or not isinstance(n, int) or n < 1 for n in counts):
        raise ValueError(f"samples_per_split must be three ints >= 1 (train, val, test), got {samples_per_split!r}")
    directory = Path(root).expanduser().absolute()
    path = directory / info.filename
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} already exists (it may be a real MedMNIST download): choose another root, "
                              f"or pass overwrite=True (--overwrite) to replace it")
    directory.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng([int(seed), info.size, *map(ord, info.flag)])
    fd, tmp = tempfile.mkstemp(prefix=f".{info.filename}.", suffix=".part", dir=directory)
    try:
        with os.fdopen(fd, "wb") as f, zipfile.ZipFile(f, "w", compression=zipfile.ZIP_DEFLATED) as zf:
            for split, n in zip(SPLITS, counts):
                images, labels = _volumes(n, info.size, info.num_classes, rng)
                for key, array in ((f"{split}_images", images), (f"{split}_labels", labels)):
                    member = zipfile.ZipInfo(f"{key}.npy", date_time=_ZIP_TIME)
                    member.compress_type = zipfile.ZIP_DEFLATED
                    with zf.open(member, "w", force_zip64=True) as out:
                        np.lib.format.write_array(out, array, allow_pickle=False)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
    return path


def main(argv: list[str] | None = None) -> int:
    """``python -m eqlightning.data.synthetic FLAG --root DIR``: write the file, print ``<md5>  <path>``."""
    parser = argparse.ArgumentParser(prog="python -m eqlightning.data.synthetic",
                                     description="Write a synthetic 3D MedMNIST file and print '<md5>  <path>'.")
    parser.add_argument("flag", help="3D flag, e.g. organmnist3d")
    parser.add_argument("--root", required=True, help="directory to write into")
    parser.add_argument("--size", type=int, default=28, choices=(28, 64))
    parser.add_argument("--samples", type=int, nargs=3, default=(32, 8, 8), metavar=("TRAIN", "VAL", "TEST"))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--overwrite", action="store_true", help="replace an existing file of that name")
    args = parser.parse_args(argv)
    try:
        path = write_synthetic_medmnist3d(args.root, args.flag, args.size, tuple(args.samples), args.seed,
                                          overwrite=args.overwrite)
    except (ValueError, FileExistsError) as err:
        parser.exit(2, f"error: {err}\n")
    md5 = md5sum(path)
    print(f"{md5}  {path}")
    print(f"use it with: --data.flag {args.flag} --data.size {args.size} --data.root {path.parent} --data.md5 {md5}",
          file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
