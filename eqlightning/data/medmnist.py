"""``MedMNISTDataModule``: the 12 2D MedMNIST datasets at 28/64/128/224 px as a LightningDataModule.

Metadata (``num_classes``, ``in_channels``, ``task``, ``label_names``, ``input_size``, ``split_sizes``) comes from
``medmnist.INFO`` and is available right after ``__init__``, before any file is read, so LightningCLI can link it
into the model (``parser.link_arguments("data.num_classes", "model.num_classes", apply_on="instantiate")``).

Batches are ``(images, labels)``: images ``float32 (B, C, H, W)`` normalised as MedMNIST does
(``(x / 255 - 0.5) / 0.5``, so in [-1, 1]); labels ``long (B,)`` for multi-class, binary-class and
ordinal-regression (MedMNIST's evaluator scores ordinal regression as multi-class: use cross-entropy), and
``float (B, L)`` 0/1 targets for multi-label (use BCE-with-logits).
"""

from __future__ import annotations

import math
import re
from pathlib import Path

import lightning.pytorch as pl
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, Sampler, get_worker_info

from .augment import BatchAugment
from .catalog import MULTI_LABEL, SPLITS, dataset_info, flags_2d, flags_3d
from .files import ensure_file
from .splits import Split, load_splits, majority_rate, stratified_subset

_STAGE_SPLITS = {"fit": ("train", "val"), "validate": ("val",), "test": ("test",), "predict": ("test",)}


def normalize(images: Tensor) -> Tensor:
    """uint8 pixels -> float in [-1, 1], step for step as MedMNIST's ``ToTensor()`` + ``Normalize(0.5, 0.5)``."""
    return images.float().div(255).sub(0.5).div(0.5)


class MedMNISTDataset(Dataset):
    """One split in memory (uint8); item ``i`` is ``(float image (C, H, W) or volume (1, D, H, W), label)``,
    normalised on access."""

    def __init__(self, split: Split) -> None:
        self.images, self.labels = split.images, split.labels

    def __len__(self) -> int:
        return self.images.shape[0]

    def __getitem__(self, index: int) -> tuple[Tensor, Tensor]:
        return normalize(self.images[index]), self.labels[index]

    def __getitems__(self, indices: list[int]) -> list[tuple[Tensor, Tensor]]:
        """Batched fetch used by DataLoader: one gather and one normalisation per batch."""
        idx = torch.as_tensor(indices, dtype=torch.long)
        return list(zip(normalize(self.images[idx]).unbind(0), self.labels[idx].unbind(0)))


def _mix(seed: int, epoch: int, stream: int) -> int:
    """A 63-bit seed for one (seed, epoch, stream) triple."""
    return (int(seed) * 0x9E3779B1 + int(epoch) * 0x85EBCA77 + stream * 0xC2B2AE3D + 0x5EED) % 2**63


class EpochShuffle(Sampler[int]):
    """A permutation of ``range(n)`` that depends only on ``(seed, epoch)``, so a run resumed at an epoch boundary
    replays the uninterrupted run's order. Lightning calls :meth:`set_epoch` before every epoch; iterated without it,
    each pass advances the epoch by one. ``loader_generator`` (the DataLoader's) is reseeded per epoch too, which
    makes the worker seeds (and so their augmentations) a function of the epoch as well."""

    def __init__(self, n: int, seed: int, loader_generator: torch.Generator | None = None) -> None:
        self.n, self.seed, self.loader_generator = n, seed, loader_generator
        self.epoch, self._epoch_set = 0, True

    def set_epoch(self, epoch: int) -> None:
        self.epoch, self._epoch_set = int(epoch), True
        if self.loader_generator is not None:
            self.loader_generator.manual_seed(_mix(self.seed, self.epoch, 1))

    def __iter__(self):
        if not self._epoch_set:
            self.set_epoch(self.epoch + 1)
        self._epoch_set = False
        order = torch.randperm(self.n, generator=torch.Generator().manual_seed(_mix(self.seed, self.epoch, 0)))
        return iter(order.tolist())

    def __len__(self) -> int:
        return self.n


class _Collate:
    """Stack samples into ``(images, labels)``; for training, augment with a seeded generator per worker.

    In a worker process the generator is seeded from ``get_worker_info().seed`` (drawn by PyTorch from the
    DataLoader's seeded generator, so it is reproducible and differs per worker and, without persistent workers, per
    epoch); in the main process from ``seed``, once, so successive epochs draw fresh augmentations.
    """

    def __init__(self, augment: BatchAugment | None = None, seed: int = 0, sampler: EpochShuffle | None = None) -> None:
        self.augment, self.seed, self.sampler = augment, seed, sampler
        self._generator: torch.Generator | None = None
        self._key: tuple | None = None

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_generator": None, "_key": None}  # each worker process seeds its own

    def generator(self) -> torch.Generator:
        info = get_worker_info()
        epoch = self.sampler.epoch if self.sampler is not None else 0
        key = ("worker", info.id, info.seed) if info is not None else ("main", epoch)
        if self._generator is None or key != self._key:
            seed = info.seed if info is not None else _mix(self.seed, epoch, 2)
            self._generator = torch.Generator().manual_seed((seed * 0x9E3779B1 + 0x5EED) % 2**63)
            self._key = key
        return self._generator

    def __call__(self, samples: list[tuple[Tensor, Tensor]]) -> tuple[Tensor, Tensor]:
        images = torch.stack([s[0] for s in samples])
        labels = torch.stack([s[1] for s in samples])
        if self.augment is not None:
            images = self.augment(images, generator=self.generator())
        return images, labels


class MedMNISTDataModule(pl.LightningDataModule):
    """A 2D MedMNIST dataset (MedMNIST+ v3 files) with verified download, stratified subsets and D4 augmentation.

    Args:
        flag: dataset name, one of the 12 2D flags of ``medmnist.INFO`` (pathmnist, chestmnist, dermamnist,
            octmnist, pneumoniamnist, retinamnist, breastmnist, bloodmnist, tissuemnist, organamnist, organcmnist,
            organsmnist).
        size: image side length: 28, 64, 128 or 224.
        root: directory holding ``{flag}.npz`` / ``{flag}_{size}.npz``; default ``$EQL_DATA_ROOT``, else
            ``$XDG_CACHE_HOME/eqlightning/medmnist``. breastmnist at 28 px falls back to a copy inside the package.
        batch_size: training batch size.
        eval_batch_size: batch size for validation/test/predict; default ``batch_size``.
        num_workers: DataLoader worker processes (0 = load in the main process).
        train_fraction: use a seeded, class-stratified fraction in (0, 1] of the training split.
        seed: seed of the training subset, the shuffling and the augmentations.
        rot90: augment training batches with random rotations by multiples of 90 degrees.
        flip: augment training batches with random left-right flips (with ``rot90``: all of D4).
        crop_padding: augment training batches with random translations of up to this many pixels (zero padding,
            i.e. black).
        download: download a missing file (from ``mirror`` or the official Zenodo URL).
        mirror: base URL (``http(s)://...`` or ``file:///...``) serving files under their official names.
        md5: expected MD5 of the file; default the official one. Set it to use your own file in the official format.
        pin_memory: pin batches in page-locked memory (for GPU training).
        predict_split: the split ``predict`` scores (``train``, ``val`` or ``test``), in file order.
    """

    #: 2 for images ``(B, C, H, W)``; :class:`~eqlightning.data.MedMNIST3DDataModule` has 3 (volumes).
    spatial_dims: int = 2

    def __init__(self, flag: str = "breastmnist", size: int = 28, root: str | None = None, batch_size: int = 128,
                 eval_batch_size: int | None = None, num_workers: int = 0, train_fraction: float = 1.0,
                 seed: int = 0, rot90: bool = False, flip: bool = False, crop_padding: int = 0,
                 download: bool = True, mirror: str | None = None, md5: str | None = None,
                 pin_memory: bool = False, predict_split: str = "test") -> None:
        super().__init__()
        if predict_split not in SPLITS:
            raise ValueError(f"predict_split must be one of {', '.join(SPLITS)}, got {predict_split!r}")
        self.info = dataset_info(flag, size)
        if self.info.spatial_dims != self.spatial_dims:
            other = "MedMNIST3DDataModule" if self.info.spatial_dims == 3 else "MedMNISTDataModule"
            valid = flags_3d() if self.spatial_dims == 3 else flags_2d()
            raise ValueError(f"'{self.info.flag}' is a {self.info.spatial_dims}D MedMNIST dataset: use "
                             f"eqlightning.data.{other} for it. Valid flags for {type(self).__name__} "
                             f"({self.spatial_dims}D): {', '.join(valid)}")
        for name, value, minimum in (("batch_size", batch_size, 1), ("num_workers", num_workers, 0),
                                     ("crop_padding", crop_padding, 0), ("seed", seed, 0)):
            if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
                raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")
        if eval_batch_size is not None and (not isinstance(eval_batch_size, int) or eval_batch_size < 1):
            raise ValueError(f"eval_batch_size must be an int >= 1 or None (= batch_size), got {eval_batch_size!r}")
        if (isinstance(train_fraction, bool) or not isinstance(train_fraction, (int, float))
                or math.isnan(train_fraction) or not 0.0 < train_fraction <= 1.0):
            raise ValueError(f"train_fraction must be a number in (0, 1] (e.g. 0.1 for 10% of the training split), "
                             f"got {train_fraction!r}")
        if md5 is not None and not re.fullmatch(r"[0-9a-fA-F]{32}", str(md5).strip()):
            raise ValueError(f"md5 must be 32 hex digits (e.g. from `md5sum file.npz`), got {md5!r}")
        if mirror is not None and not str(mirror).startswith(("http://", "https://", "file://")):
            raise ValueError(f"mirror must be an http://, https:// or file:// base URL, got {mirror!r}")
        self.save_hyperparameters()
        self.flag, self.size, self.root = self.info.flag, size, root
        self.batch_size, self.eval_batch_size = batch_size, eval_batch_size or batch_size
        self.num_workers, self.pin_memory = num_workers, pin_memory
        #: The split :meth:`predict_dataloader` serves.
        self.predict_split = predict_split
        self.train_fraction, self.seed = float(train_fraction), seed
        self.download, self.mirror = download, mirror
        self.md5 = (md5 or self.info.md5).strip().lower()
        augment = BatchAugment(rot90=rot90, flip=flip, crop_padding=crop_padding, fill=-1.0)
        #: The training-batch augmentation (a :class:`BatchAugment`), or None when none is enabled.
        self.augment: BatchAugment | None = augment if augment.enabled else None
        #: Path of the verified ``.npz`` file, set once it has been found (None before).
        self.file_path: Path | None = None
        self._datasets: dict[str, MedMNISTDataset] = {}
        self._sizes: dict[str, int] = {}  # samples per split in the file, filled as splits are loaded

    # ------------------------------------------------------------------------------------------------- metadata
    @property
    def num_classes(self) -> int:
        """Number of classes (number of labels for multi-label, 2 for binary)."""
        return self.info.num_classes

    @property
    def in_channels(self) -> int:
        """Image channels: 1 (grayscale) or 3 (RGB)."""
        return self.info.in_channels

    @property
    def task(self) -> str:
        """medmnist's task string: 'multi-class', 'binary-class', 'multi-label, binary-class', 'ordinal-regression'."""
        return self.info.task

    @property
    def multilabel(self) -> bool:
        """True when labels are ``float (N, L)`` 0/1 targets (use BCE), False for class indices (cross-entropy)."""
        return self.info.task == MULTI_LABEL

    @property
    def label_names(self) -> list[str]:
        """Class (or label) names in label order."""
        return list(self.info.label_names)

    @property
    def input_size(self) -> int:
        """Image side length in pixels."""
        return self.size

    @property
    def split_sizes(self) -> dict[str, int]:
        """Samples per split: INFO's counts, replaced by the file's own once a split is loaded (the full split,
        before ``train_fraction``; they differ only for custom files given with ``md5=``)."""
        return {s: self._sizes.get(s, n) for s, n in self.info.split_sizes.items()}

    def majority_rate(self, split: str = "test") -> float:
        """Accuracy of always predicting the most frequent class in ``split`` (loads it); for ``"train"`` this is
        the subset selected by ``train_fraction``. Multi-label: mean over labels of ``max(p, 1 - p)``."""
        return majority_rate(self._dataset(split).labels)

    # ---------------------------------------------------------------------------------------------- loading
    def _ensure_file(self) -> Path:
        if self.file_path is None:
            self.file_path = ensure_file(self.info.filename, self.info.url, self.md5, self.root,
                                         download=self.download, mirror=self.mirror)
        return self.file_path

    def prepare_data(self) -> None:
        """Find, download if allowed, and verify the file (Lightning calls this on one process per node)."""
        self._ensure_file()

    def setup(self, stage: str | None = None) -> None:
        """Load the splits that ``stage`` needs ('fit': train + val, 'validate': val, 'test': test, 'predict':
        ``predict_split``)."""
        self._load((self.predict_split,) if stage == "predict" else _STAGE_SPLITS.get(stage, SPLITS))

    def _load(self, splits: tuple[str, ...]) -> None:
        todo = tuple(s for s in splits if s not in self._datasets)
        if not todo:
            return
        loaded = load_splits(self._ensure_file(), self.info, todo)
        self._sizes.update({s: len(part) for s, part in loaded.items()})
        if "train" in loaded and self.train_fraction < 1.0:
            idx = stratified_subset(loaded["train"].labels, self.train_fraction, self.seed)
            loaded["train"] = Split(loaded["train"].images[idx], loaded["train"].labels[idx])
        self._datasets.update({s: MedMNISTDataset(part) for s, part in loaded.items()})

    def _dataset(self, split: str) -> MedMNISTDataset:
        if split not in SPLITS:
            raise ValueError(f"unknown split {split!r}: use one of {', '.join(SPLITS)}")
        self._load((split,))
        return self._datasets[split]

    @property
    def train_dataset(self) -> MedMNISTDataset:
        """Training split (after ``train_fraction``), loaded on first access."""
        return self._dataset("train")

    @property
    def val_dataset(self) -> MedMNISTDataset:
        """Validation split, loaded on first access."""
        return self._dataset("val")

    @property
    def test_dataset(self) -> MedMNISTDataset:
        """Test split, loaded on first access."""
        return self._dataset("test")

    # ------------------------------------------------------------------------------------------- dataloaders
    def _loader(self, dataset: Dataset, batch_size: int, train: bool) -> DataLoader:
        generator = torch.Generator().manual_seed(_mix(self.seed, 0, 1)) if train else None
        sampler = EpochShuffle(len(dataset), self.seed, generator) if train else None
        return DataLoader(dataset, batch_size=batch_size, sampler=sampler, generator=generator,
                          num_workers=self.num_workers, persistent_workers=self.num_workers > 0,
                          pin_memory=self.pin_memory,
                          collate_fn=_Collate(self.augment if train else None, self.seed, sampler))

    def train_dataloader(self) -> DataLoader:
        """Shuffled (seeded) training batches, augmented when rot90/flip/crop_padding are set."""
        return self._loader(self.train_dataset, self.batch_size, train=True)

    def val_dataloader(self) -> DataLoader:
        """Validation batches in file order, never augmented."""
        return self._loader(self.val_dataset, self.eval_batch_size, train=False)

    def test_dataloader(self) -> DataLoader:
        """Test batches in file order, never augmented."""
        return self._loader(self.test_dataset, self.eval_batch_size, train=False)

    def predict_dataloader(self) -> DataLoader:
        """``predict_split`` (default the test split) in file order, never augmented, labels included."""
        if self.predict_split == "train":  # the selected training subset, unshuffled and unaugmented
            return self._loader(self.train_dataset, self.eval_batch_size, train=False)
        return self._loader(self._dataset(self.predict_split), self.eval_batch_size, train=False)
