"""Evaluation beyond accuracy: test-time robustness to rotations, flips and adversarial attacks.

    from eqlightning.evaluation import Robustness
    trainer = lightning.Trainer(callbacks=[Robustness(rotations=[90, 180, 270, 45],
                                                      attacks=[{"name": "pgd", "eps": 2}])])

:class:`Robustness` (a Lightning callback, :mod:`.callback`) logs ``test/rot90/acc``, ``test/hflip/invariance_error``,
``test/pgd_eps2/auc``, ``test/invariance_error``, ... during ``trainer.test``. The building blocks work without
Lightning: :func:`rotate`, :func:`disk_mask`, :func:`mask_disk`, :func:`hflip` (:mod:`.transforms`) and
:func:`fgsm`, :func:`pgd` (:mod:`.attacks`, radius in grey levels 0-255). Importing this package never imports opacus.
"""

from .attacks import BOUNDS, PIXEL_SCALE, fgsm, pgd
from .callback import DEFAULT_ROTATIONS, Robustness, group_generators
from .transforms import BACKGROUND, disk_mask, hflip, mask_disk, rotate

__all__ = ["Robustness", "rotate", "disk_mask", "mask_disk", "hflip", "fgsm", "pgd", "group_generators",
           "BACKGROUND", "PIXEL_SCALE", "BOUNDS", "DEFAULT_ROTATIONS"]
