"""Data modules and data-file handling: MedMNIST (2D, 28-224 px) with verified downloads and D4 augmentation."""

from .augment import BatchAugment
from .catalog import SIZES, TASKS, DatasetInfo, dataset_info, file_name, flags_2d, medmnist_info
from .files import (ChecksumError, DataFileError, DataFileNotFoundError, download_file, embedded_sample, ensure_file,
                    md5sum, resolve_root, user_cache_dir, verify_md5)
from .medmnist import MedMNISTDataModule, MedMNISTDataset
from .splits import DataFormatError, load_splits, majority_rate, stratified_subset

__all__ = [
    "MedMNISTDataModule", "MedMNISTDataset", "BatchAugment",
    "DatasetInfo", "dataset_info", "flags_2d", "file_name", "medmnist_info", "SIZES", "TASKS",
    "resolve_root", "user_cache_dir", "ensure_file", "download_file", "verify_md5", "md5sum", "embedded_sample",
    "DataFileError", "DataFileNotFoundError", "ChecksumError", "DataFormatError",
    "load_splits", "stratified_subset", "majority_rate",
]
