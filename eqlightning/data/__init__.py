"""Data modules and data-file handling: MedMNIST 2D (28-224 px, D4 augmentation) and 3D (28/64 voxels, cube-symmetry
augmentation) with verified downloads, and synthetic 3D files for offline runs."""

from .augment import BatchAugment
from .augment3d import ROTATIONS, BatchAugment3D, CubeSymmetry, apply_cube_symmetry, cube_symmetries
from .catalog import SIZES, SIZES_3D, TASKS, DatasetInfo, dataset_info, file_name, flags_2d, flags_3d, medmnist_info
from .files import (ChecksumError, DataFileError, DataFileNotFoundError, download_file, embedded_sample, ensure_file,
                    md5sum, resolve_root, user_cache_dir, verify_md5)
from .medmnist import MedMNISTDataModule, MedMNISTDataset
from .medmnist3d import MedMNIST3DDataModule
from .splits import DataFormatError, load_splits, majority_rate, stratified_subset

__all__ = [
    "MedMNISTDataModule", "MedMNIST3DDataModule", "MedMNISTDataset", "BatchAugment", "BatchAugment3D",
    "cube_symmetries", "CubeSymmetry", "apply_cube_symmetry", "ROTATIONS", "write_synthetic_medmnist3d",
    "DatasetInfo", "dataset_info", "flags_2d", "flags_3d", "file_name", "medmnist_info", "SIZES", "SIZES_3D", "TASKS",
    "resolve_root", "user_cache_dir", "ensure_file", "download_file", "verify_md5", "md5sum", "embedded_sample",
    "DataFileError", "DataFileNotFoundError", "ChecksumError", "DataFormatError",
    "load_splits", "stratified_subset", "majority_rate",
]


def __getattr__(name: str):
    # Imported on first use, so that `python -m eqlightning.data.synthetic` runs a module not yet imported.
    if name == "write_synthetic_medmnist3d":
        from .synthetic import write_synthetic_medmnist3d
        return write_synthetic_medmnist3d
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
