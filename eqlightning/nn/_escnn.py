"""The one place eqlightning imports escnn, with two compatibility fixes applied first.

1. scikit-learn >= 1.8 refuses ``np.matrix`` in ``randomized_svd``, which escnn 1.0.11 calls with one when it solves
   for the intertwiners of dihedral groups (``escnn/group/_numerical.py``): every D_N regular basis failed with
   ``TypeError: np.matrix is not supported``. We hand escnn's call an ndarray instead (same numbers, same result).
2. escnn warns at import that ``py3nj`` is missing. py3nj (which needs gfortran) only speeds up SO(3)
   Clebsch-Gordan coefficients; the planar groups never need them and the 3D groups (O, Oh, SO3, O3) get them from
   escnn's numerical fallback (cached on disk by escnn), so that warning is silenced. The same ``np.matrix`` fix
   is what lets that fallback run for the 3D groups from an empty cache.
"""

from __future__ import annotations

import warnings

import numpy as np

with warnings.catch_warnings():
    warnings.filterwarnings("ignore", message=".*py3nj.*")
    import escnn.group._numerical as _numerical
    from escnn import gspaces, group, nn as enn  # noqa: F401  (re-exported)


def _patch_randomized_svd() -> None:
    original = getattr(_numerical, "randomized_svd", None)
    if original is None or getattr(original, "_eqlightning_ndarray", False):
        return

    def randomized_svd(M, *args, **kwargs):
        return original(np.asarray(M), *args, **kwargs)

    randomized_svd._eqlightning_ndarray = True
    _numerical.randomized_svd = randomized_svd


_patch_randomized_svd()

__all__ = ["gspaces", "group", "enn"]
