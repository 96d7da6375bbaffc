"""The MedMNIST catalogue: which 2D datasets and sizes exist, their metadata, file names, URLs and MD5s.

Everything here comes from ``medmnist.INFO`` (``medmnist/info.py`` of the installed ``medmnist`` package), so a
newer medmnist release with new checksums is picked up without editing this file. The keys per flag are
``url``/``MD5`` for the 28x28 file and ``url_{size}``/``MD5_{size}`` for 64, 128 and 224.

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


def file_name(flag: str, size: int) -> str:
    """Official file name: ``{flag}.npz`` for 28x28, ``{flag}_{size}.npz`` otherwise."""
    return f"{flag}.npz" if size == 28 else f"{flag}_{size}.npz"


@dataclass(frozen=True)
class DatasetInfo:
    """Metadata of one 2D MedMNIST dataset at one image size, as published in ``medmnist.INFO``.

    Attributes:
        flag: medmnist flag, e.g. ``"breastmnist"``.
        size: image side length in pixels (28, 64, 128 or 224).
        task: medmnist's task string (one of :data:`TASKS`).
        label_names: class names (labels for multi-label) in label order.
        in_channels: 1 (grayscale) or 3 (RGB).
        split_sizes: number of samples per split in the official file.
        filename: official file name (``breastmnist.npz``, ``breastmnist_64.npz``, ...).
        url: official Zenodo download URL.
        md5: official MD5 of the file.
        license: the dataset's license (CC BY 4.0, except DermaMNIST: CC BY-NC 4.0).
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

    @property
    def num_classes(self) -> int:
        """Number of classes (number of labels for multi-label; 2 for binary)."""
        return len(self.label_names)

    @property
    def multilabel(self) -> bool:
        """True for ChestMNIST-style multi-label tasks (labels are ``(N, L)`` 0/1 vectors)."""
        return self.task == MULTI_LABEL


def dataset_info(flag: str, size: int = 28) -> DatasetInfo:
    """Look up a 2D MedMNIST dataset; raises ``ValueError`` naming the valid flags/sizes for anything else."""
    info = medmnist_info()
    valid = flags_2d()
    key = flag.lower() if isinstance(flag, str) else flag
    if key not in valid:
        hint = (f" '{flag}' is a 3D MedMNIST dataset; eqlightning handles 2D images only."
                if key in info else "")
        raise ValueError(f"unknown MedMNIST flag {flag!r}.{hint} Valid 2D flags: {', '.join(valid)}")
    if isinstance(size, bool) or size not in SIZES:
        raise ValueError(f"unsupported MedMNIST image size {size!r} for {key!r}: valid sizes are "
                         f"{', '.join(map(str, SIZES))}")
    entry = info[key]
    suffix = "" if size == 28 else f"_{size}"
    try:
        url, md5 = entry[f"url{suffix}"], entry[f"MD5{suffix}"]
    except KeyError as err:
        raise ValueError(f"medmnist.INFO[{key!r}] has no {err.args[0]!r} entry: this medmnist version does not "
                         f"publish {key} at {size}x{size}; upgrade medmnist (pip install -U medmnist)") from None
    labels = entry["label"]
    return DatasetInfo(
        flag=key, size=int(size), task=entry["task"],
        label_names=tuple(labels[str(i)] for i in range(len(labels))),
        in_channels=int(entry["n_channels"]), split_sizes={s: int(entry["n_samples"][s]) for s in SPLITS},
        filename=file_name(key, size), url=url, md5=md5, license=entry.get("license", "unknown"),
    )
