"""Reading and checking MedMNIST ``.npz`` splits, stratified training subsets, and trivial baselines.

Official file layout (all arrays ``uint8``)::

    {split}_images: (N, H, W)      grayscale     or (N, H, W, 3) RGB, H == W == size      (2D datasets)
                    (N, D, H, W)   grayscale volumes, D == H == W == size                 (3D datasets)
    {split}_labels: (N, 1)         class index (multi-class, binary-class, ordinal-regression)
                    (N, L)         0/1 per label (multi-label, binary-class: ChestMNIST, L = 14)

for ``split`` in train/val/test. In memory, images stay ``uint8`` as ``(N, C, H, W)`` or ``(N, 1, D, H, W)`` (4x
smaller than float; they are normalised per sample when read); labels become ``long (N,)`` or ``float (N, L)``.
A 4-D image array is read as RGB/1-channel images for a 2D flag and as volumes for a 3D flag (the flag decides).
"""

from __future__ import annotations

import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from .catalog import SPLITS, DatasetInfo
from .files import DataFileError


class DataFormatError(DataFileError, ValueError):
    """An ``.npz`` file does not have the layout, shapes or values its flag and size require."""


@dataclass
class Split:
    """One split in memory: ``images`` uint8 ``(N, C, H, W)`` (2D) or ``(N, 1, D, H, W)`` (3D), ``labels`` long
    ``(N,)`` or float ``(N, L)``."""

    images: Tensor
    labels: Tensor

    def __len__(self) -> int:
        return self.images.shape[0]


def _fail(path: Path, info: DatasetInfo, problem: str, fix: str) -> DataFormatError:
    return DataFormatError(f"{path} is not a valid MedMNIST {info.flag} file at {info.shape_name}: {problem}. "
                           f"Fix: {fix}")


def load_splits(path: str | Path, info: DatasetInfo, splits: tuple[str, ...] = SPLITS) -> dict[str, Split]:
    """Load and validate ``splits`` of a MedMNIST file; raises :class:`DataFormatError` on anything unexpected."""
    path = Path(path)
    official = f"use the official {info.filename} ({info.url})"
    try:
        npz = np.load(path, allow_pickle=False)
    except (OSError, ValueError, zipfile.BadZipFile) as err:
        raise _fail(path, info, f"numpy cannot read it as .npz ({err})", official) from err
    with npz:
        missing = [f"{s}_{kind}" for s in splits for kind in ("images", "labels") if f"{s}_{kind}" not in npz.files]
        if missing:
            raise _fail(path, info, f"missing key(s) {', '.join(missing)} (found: {', '.join(npz.files) or 'none'})",
                        f"{official}, or write a file with train/val/test _images and _labels arrays")
        return {s: _check_split(path, info, s, npz[f"{s}_images"], npz[f"{s}_labels"]) for s in splits}


def _check_split(path: Path, info: DatasetInfo, split: str, images: np.ndarray, labels: np.ndarray) -> Split:
    wrong_file = f"check that flag= and size= match the file (expected the format of {info.filename})"
    if images.dtype != np.uint8:
        raise _fail(path, info, f"{split}_images has dtype {images.dtype}, expected uint8 pixels in 0..255",
                    "store images as uint8")
    if info.spatial_dims == 3:
        x = _volumes(path, info, split, images, wrong_file)
    else:
        x = _images(path, info, split, images, wrong_file)
    n = images.shape[0]
    if labels.ndim == 0 or labels.shape[0] != n:
        raise _fail(path, info, f"{split}_images has {n} samples but {split}_labels has shape {labels.shape}",
                    "images and labels of a split must have the same length")
    if not (np.issubdtype(labels.dtype, np.integer) or np.issubdtype(labels.dtype, np.bool_)):
        raise _fail(path, info, f"{split}_labels has dtype {labels.dtype}, expected integers", "store integer labels")

    if info.multilabel:
        if labels.shape != (n, info.num_classes):
            raise _fail(path, info, f"{split}_labels has shape {labels.shape}, expected ({n}, {info.num_classes}) "
                        f"for {info.num_classes} binary labels", wrong_file)
        if labels.size and not np.isin(labels, (0, 1)).all():
            raise _fail(path, info, f"{split}_labels has values {np.unique(labels)[:10].tolist()}, expected 0/1",
                        "multi-label targets must be 0 or 1")
        y = torch.from_numpy(labels.astype(np.float32))
    else:
        if labels.ndim == 2 and labels.shape[1] == 1:
            labels = labels[:, 0]
        if labels.shape != (n,):
            raise _fail(path, info, f"{split}_labels has shape {labels.shape}, expected ({n}, 1) class indices",
                        wrong_file)
        if labels.size and (labels.min() < 0 or labels.max() >= info.num_classes):
            raise _fail(path, info, f"{split}_labels has values in [{labels.min()}, {labels.max()}] but "
                        f"{info.flag} has {info.num_classes} classes (0..{info.num_classes - 1})", wrong_file)
        y = torch.from_numpy(labels.astype(np.int64))
    return Split(images=x, labels=y)


def _images(path: Path, info: DatasetInfo, split: str, images: np.ndarray, wrong_file: str) -> Tensor:
    """2D: ``(N, H, W)`` or ``(N, H, W, C)`` uint8 -> ``(N, C, H, W)``."""
    if images.ndim == 3:
        channels = 1
    elif images.ndim == 4 and images.shape[-1] in (1, 3):
        channels = images.shape[-1]
    else:
        volumes = " (that looks like 3D volumes: use a 3D flag)" if images.ndim == 4 else ""
        raise _fail(path, info, f"{split}_images has shape {images.shape}, expected (N, H, W) or (N, H, W, 3)"
                    f"{volumes}", wrong_file)
    if channels != info.in_channels:
        kind = {1: "grayscale (1 channel)", 3: "RGB (3 channels)"}
        raise _fail(path, info, f"{split}_images is {kind[channels]} but {info.flag} is {kind[info.in_channels]}",
                    wrong_file)
    h, w = images.shape[1:3]
    if (h, w) != (info.size, info.size):
        raise _fail(path, info, f"{split}_images are {h}x{w} pixels but size={info.size}",
                    f"pass size={h} if that is the intended resolution, or use {info.filename}")
    x = torch.from_numpy(np.ascontiguousarray(images))
    return x.unsqueeze(1) if images.ndim == 3 else x.permute(0, 3, 1, 2).contiguous()


def _volumes(path: Path, info: DatasetInfo, split: str, images: np.ndarray, wrong_file: str) -> Tensor:
    """3D: ``(N, D, H, W)`` uint8 with ``D == H == W == size`` -> ``(N, 1, D, H, W)``."""
    s = info.size
    if images.ndim != 4:
        hint = " (that looks like 2D images: use a 2D flag)" if images.ndim == 3 else ""
        raise _fail(path, info, f"{split}_images has shape {images.shape}, expected (N, {s}, {s}, {s}) grayscale "
                    f"volumes{hint}", wrong_file)
    if images.shape[1:] != (s, s, s):
        sides = sorted(set(images.shape[1:]))
        fix = (f"pass size={sides[0]} if that is the intended resolution, or use {info.filename}"
               if len(sides) == 1 else wrong_file)
        raise _fail(path, info, f"{split}_images has shape {images.shape}, expected (N, {s}, {s}, {s})", fix)
    return torch.from_numpy(np.ascontiguousarray(images)).unsqueeze(1)


def strata(labels: Tensor) -> Tensor:
    """Stratification key per sample: the class index, or the first label's 0/1 value for multi-label targets."""
    return labels[:, 0].long() if labels.dim() == 2 else labels.long()


def stratified_subset(labels: Tensor, fraction: float, seed: int) -> Tensor:
    """Sorted indices of a seeded, class-stratified ``fraction`` of the samples.

    Each class ``c`` with ``n_c`` samples keeps ``floor(f * n_c)`` or ``ceil(f * n_c)`` samples (largest remainders
    first, so the total is ``round(f * N)``), and at least one, so every class present stays present (which can
    make the total slightly larger for tiny fractions). Multi-label targets are stratified on the first label.
    The same ``(labels, fraction, seed)`` always gives the same subset.
    """
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"fraction must be in (0, 1], got {fraction!r}")
    n = labels.shape[0]
    if fraction == 1.0 or n == 0:
        return torch.arange(n)
    key = strata(labels)
    classes, counts = torch.unique(key, return_counts=True)
    exact = fraction * counts.double()
    keep = exact.floor().long().clamp(min=1)
    remaining = round(fraction * n) - int(keep.sum())
    if remaining > 0:
        room = (keep < counts) & (keep == exact.floor().long())
        order = torch.argsort(torch.where(room, exact - exact.floor(), torch.full_like(exact, -1.0)),
                              descending=True, stable=True)
        keep[order[:remaining]] += 1
    g = torch.Generator().manual_seed(int(seed))
    chosen = []
    for c, k in zip(classes.tolist(), keep.tolist()):
        members = (key == c).nonzero(as_tuple=True)[0]
        chosen.append(members[torch.randperm(members.numel(), generator=g)[:k]])
    return torch.cat(chosen).sort().values


def majority_rate(labels: Tensor) -> float:
    """Accuracy of always predicting the most frequent class; multi-label: mean over labels of ``max(p, 1 - p)``."""
    if labels.shape[0] == 0:
        raise ValueError("majority_rate of an empty split is undefined")
    if labels.dim() == 2:
        p = labels.double().mean(0)
        return float(torch.maximum(p, 1 - p).mean())
    return float(torch.bincount(labels.long()).max()) / labels.shape[0]
