"""``MedMNIST3DDataModule``: the 6 3D MedMNIST datasets (28x28x28 and 64x64x64 volumes) as a LightningDataModule.

Everything but the augmentation is inherited from :class:`~eqlightning.data.MedMNISTDataModule`: metadata from
``medmnist.INFO`` right after ``__init__``, verified download (official MD5, or your ``md5=``), root resolution,
stratified ``train_fraction``, seeded shuffling and augmentation per (seed, epoch), deterministic val/test.

Batches are ``(volumes, labels)``: volumes ``float32 (B, 1, S, S, S)`` (axes D, H, W as in the file), normalised
exactly as the 2D module normalises images, ``(x / 255 - 0.5) / 0.5`` (so in [-1, 1]); labels ``long (B,)`` (all
3D datasets are multi-class or binary-class: use cross-entropy).
"""

from __future__ import annotations

from .augment3d import BatchAugment3D
from .medmnist import MedMNISTDataModule


class MedMNIST3DDataModule(MedMNISTDataModule):
    """A 3D MedMNIST dataset (MedMNIST+ v3 files) with verified download, stratified subsets and cube-symmetry
    augmentation.

    Args:
        flag: dataset name, one of the 6 3D flags of ``medmnist.INFO``: organmnist3d, nodulemnist3d,
            adrenalmnist3d, fracturemnist3d, vesselmnist3d, synapsemnist3d.
        size: volume side length: 28 or 64 (MedMNIST publishes no other 3D size).
        root: directory holding ``{flag}.npz`` / ``{flag}_64.npz``; default ``$EQL_DATA_ROOT``, else
            ``$XDG_CACHE_HOME/eqlightning/medmnist``. No 3D file ships inside the package.
        batch_size: training batch size.
        eval_batch_size: batch size for validation/test/predict; default ``batch_size``.
        num_workers: DataLoader worker processes (0 = load in the main process).
        train_fraction: use a seeded, class-stratified fraction in (0, 1] of the training split.
        seed: seed of the training subset, the shuffling and the augmentations.
        rotations: augment training volumes with symmetries of the voxel grid: ``"none"``, ``"cube"`` (a uniformly
            random one of the 24 rotations of the cube per sample) or ``"cube_reflections"`` (uniform over all 48,
            reflections included); see :func:`~eqlightning.data.cube_symmetries`.
        crop_padding: augment training volumes with random translations of up to this many voxels along each axis
            (padding is black, i.e. -1 after normalisation).
        download: download a missing file (from ``mirror`` or the official Zenodo URL).
        mirror: base URL (``http(s)://...`` or ``file:///...``) serving files under their official names.
        md5: expected MD5 of the file; default the official one. Set it to use your own file in the official format,
            e.g. one written by :func:`~eqlightning.data.write_synthetic_medmnist3d`.
        pin_memory: pin batches in page-locked memory (for GPU training).
        predict_split: the split ``predict`` scores (``train``, ``val`` or ``test``), in file order.
    """

    #: Volumes: batches are ``(B, 1, D, H, W)``.
    spatial_dims: int = 3

    def __init__(self, flag: str = "organmnist3d", size: int = 28, root: str | None = None, batch_size: int = 32,
                 eval_batch_size: int | None = None, num_workers: int = 0, train_fraction: float = 1.0,
                 seed: int = 0, rotations: str = "none", crop_padding: int = 0, download: bool = True,
                 mirror: str | None = None, md5: str | None = None, pin_memory: bool = False,
                 predict_split: str = "test") -> None:
        super().__init__(flag=flag, size=size, root=root, batch_size=batch_size, eval_batch_size=eval_batch_size,
                         num_workers=num_workers, train_fraction=train_fraction, seed=seed, download=download,
                         mirror=mirror, md5=md5, pin_memory=pin_memory, predict_split=predict_split)
        self.save_hyperparameters(ignore=["rot90", "flip"])  # this signature's arguments (no 2D rot90/flip)
        augment = BatchAugment3D(rotations=rotations, crop_padding=crop_padding, fill=-1.0)
        #: The training-batch augmentation (a :class:`BatchAugment3D`), or None when none is enabled.
        self.augment: BatchAugment3D | None = augment if augment.enabled else None
