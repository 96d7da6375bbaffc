"""The MedMNIST catalogue: which datasets (2D and 3D) and sizes exist, their metadata, file names, URLs and MD5s.

Everything here comes from ``medmnist.INFO`` (``medmnist/info.py`` of the installed ``medmnist`` package), so a
newer medmnist release with new checksums is picked up without editing this file. The keys per flag are
``url``/``MD5`` for the 28-px file and ``url_{size}``/``MD5_{size}`` for the others: 64, 128 and 224 for the 2D
datasets (``S x S`` images), 64 only for the 3D ones (``S x S x S`` volumes).

``INFO`` is read from ``medmnist/info.py`` *without importing the medmnist package*: ``import medmnist`` (and even
``import medmnist.info``, which runs the package ``__init__``) imports PIL, pandas and scikit-learn (about 0.4 s on
top of torch and Lightning), silences import errors with a bare ``except`` that prints to stdout, and creates
``~/.medmnist`` as a side effect. The dictionary is a plain literal, so it is parsed with :func:`ast.literal_eval`;
if that ever fails (a future medmnist that builds INFO in code) we fall back to ``from medmnist.info import INFO``.
"""

from __future__ import annotations

import ast
import importlib.util
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

#: Image sizes MedMNIST publishes for 2D datasets (MedMNIST+ / v3).
SIZES: tuple[int, ...] = (28, 64, 128, 224)
#: Volume sizes MedMNIST publishes for 3D datasets (28x28x28 and 64x64x64).
SIZES_3D: tuple[int, ...] = (28, 64)
#: Split names, in the order MedMNIST uses them.
SPLITS: tuple[str, ...] = ("train", "val", "test")
#: medmnist's task strings.
MULTI_CLASS = "multi-class"
BINARY = "binary-class"
MULTI_LABEL = "multi-label, binary-class"
ORDINAL = "ordinal-regression"
TASKS: tuple[str, ...] = (MULTI_CLASS, BINARY, MULTI_LABEL, ORDINAL)


@lru_cache(maxsize=1)
def medmnist_info() -> dict[str, dict[str, Any]]:
    """Return ``medmnist.INFO`` (all flags, 2D and 3D), read without importing the medmnist package."""
    spec = importlib.util.find_spec("medmnist")
    if spec is None:
        raise ModuleNotFoundError("the 'medmnist' package is required for MedMNIST metadata: pip install medmnist "
                                  "(it needs neither torchvision nor a network connection)")
    for location in spec.submodule_search_locations or ():
        info_py = Path(location) / "info.py"
        if not info_py.is_file():
            continue
        try:
            tree = ast.parse(info_py.read_text(encoding="utf-8"), filename=str(info_py))
            for node in tree.body:
                if (isinstance(node, ast.Assign) and len(node.targets) == 1
                        and isinstance(node.targets[0], ast.Name) and node.targets[0].id == "INFO"):
                    info = ast.literal_eval(node.value)
                    if isinstance(info, dict) and info:
                        return info
        except (SyntaxError, ValueError, OSError):
            pass
    from medmnist.info import INFO  # fallback: runs medmnist/__init__ (heavier, but always right)
    return INFO


def _is_2d(entry: dict[str, Any]) -> bool:
    return not str(entry.get("python_class", "")).endswith("3D")


def flags_2d() -> tuple[str, ...]:
    """The 2D MedMNIST flags in INFO order (12 in medmnist 3.0: pathmnist ... organsmnist)."""
    return tuple(flag for flag, entry in medmnist_info().items() if _is_2d(entry))


def flags_3d() -> tuple[str, ...]:
    """The 3D MedMNIST flags in INFO order (6 in medmnist 3.0: organmnist3d, nodulemnist3d, adrenalmnist3d,
    fracturemnist3d, vesselmnist3d, synapsemnist3d)."""
    return tuple(flag for flag, entry in medmnist_info().items() if not _is_2d(entry))


def file_name(flag: str, size: int) -> str:
    """Official file name: ``{flag}.npz`` for size 28, ``{flag}_{size}.npz`` otherwise (2D and 3D alike)."""
    return f"{flag}.npz" if size == 28 else f"{flag}_{size}.npz"


@dataclass(frozen=True)
class DatasetInfo:
    """Metadata of one MedMNIST dataset (2D or 3D) at one image size, as published in ``medmnist.INFO``.

    Attributes:
        flag: medmnist flag, e.g. ``"breastmnist"`` or ``"organmnist3d"``.
        size: side length in pixels/voxels (2D: 28, 64, 128 or 224; 3D: 28 or 64).
        task: medmnist's task string (one of :data:`TASKS`).
        label_names: class names (labels for multi-label) in label order.
        in_channels: 1 (grayscale) or 3 (RGB).
        split_sizes: number of samples per split in the official file.
        filename: official file name (``breastmnist.npz``, ``breastmnist_64.npz``, ...).
        url: official Zenodo download URL.
        md5: official MD5 of the file.
        license: the dataset's license (CC BY 4.0, except DermaMNIST: CC BY-NC 4.0).
        spatial_dims: 2 for ``size x size`` images, 3 for ``size x size x size`` volumes.
    """

    flag: str
    size: int
    task: str
    label_names: tuple[str, ...]
    in_channels: int
    split_sizes: dict[str, int]
    filename: str
    url: str
    md5: str
    license: str
    spatial_dims: int = 2

    @property
    def input_size(self) -> int:
        """Side length of the (square) images or (cubic) volumes: the same as ``size``."""
        return self.size

    @property
    def shape_name(self) -> str:
        """``"28x28"`` for 2D, ``"28x28x28"`` for 3D (used in messages)."""
        return "x".join([str(self.size)] * self.spatial_dims)

    @property
    def num_classes(self) -> int:
        """Number of classes (number of labels for multi-label; 2 for binary)."""
        return len(self.label_names)

    @property
    def multilabel(self) -> bool:
        """True for ChestMNIST-style multi-label tasks (labels are ``(N, L)`` 0/1 vectors)."""
        return self.task == MULTI_LABEL


def dataset_info(flag: str, size: int = 28) -> DatasetInfo:
    """Look up a 2D or 3D MedMNIST dataset; raises ``ValueError`` naming the valid flags/sizes for anything else."""
    info = medmnist_info()
    key = flag.lower() if isinstance(flag, str) else flag
    if not isinstance(key, str) or key not in info:
        raise ValueError(f"unknown MedMNIST flag {flag!r}. Valid 2D flags: {', '.join(flags_2d())}; valid 3D flags: "
                         f"{', '.join(flags_3d())}")
    entry = info[key]
    spatial_dims = 2 if _is_2d(entry) else 3
    sizes = SIZES if spatial_dims == 2 else SIZES_3D
    if isinstance(size, bool) or size not in sizes:
        why = "" if spatial_dims == 2 else (f" ({key} is a 3D dataset: MedMNIST publishes 3D volumes only at "
                                            f"{' and '.join(f'{s}x{s}x{s}' for s in SIZES_3D)})")
        raise ValueError(f"unsupported MedMNIST image size {size!r} for {key!r}: valid sizes are "
                         f"{', '.join(map(str, sizes))}{why}")
    suffix = "" if size == 28 else f"_{size}"
    try:
        url, md5 = entry[f"url{suffix}"], entry[f"MD5{suffix}"]
    except KeyError as err:
        raise ValueError(f"medmnist.INFO[{key!r}] has no {err.args[0]!r} entry: this medmnist version does not "
                         f"publish {key} at size {size}; upgrade medmnist (pip install -U medmnist)") from None
    labels = entry["label"]
    return DatasetInfo(
        flag=key, size=int(size), task=entry["task"],
        label_names=tuple(labels[str(i)] for i in range(len(labels))),
        in_channels=int(entry["n_channels"]), split_sizes={s: int(entry["n_samples"][s]) for s in SPLITS},
        filename=file_name(key, size), url=url, md5=md5, license=entry.get("license", "unknown"),
        spatial_dims=spatial_dims,
    )
