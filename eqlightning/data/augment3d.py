"""Batched, seeded augmentations for cubic volumes: the symmetries of the voxel grid, and translations.

The rotations of a cube form a group of 24 elements (the octahedral group O, isomorphic to S4); with reflections
there are 48 (O_h = O x {1, -1}). Each maps a ``D x D x D`` voxel grid onto itself exactly, as a permutation of
voxels, so it is lossless, like ``rot90``/``flip`` on square images. They act on the last three axes ``(D, H, W)``
of a tensor and are built only from :func:`torch.rot90` and :func:`torch.flip`.

Element ``i`` of :func:`cube_symmetries` (``0 <= i < 48``) is ``(f, o, k) = (i // 24, (i % 24) // 4, i % 4)``::

    x  ->  O_o( R_k( F^f(x) ) )

* ``F``: mirror along W (``x.flip(-1)``), applied when ``f == 1`` (elements 24..47 are the reflections, det -1);
* ``R_k``: rotate by ``k * 90`` degrees about the D axis (``torch.rot90(x, k, dims=(-2, -1))``);
* ``O_o``: one of 6 rotations taking the D axis to each of the 6 face directions (+D, +H, -D, -H, +W, -W):
  identity, ``rot90(x, 1|2|3, dims=(-3, -2))``, ``rot90(x, 1|3, dims=(-3, -1))``.

Every rotation of the cube is ``O_o R_k`` for exactly one ``(o, k)`` (``O_o`` says where the D axis goes, ``R_k``
the turn about it), so elements 0..23 are the 24 rotations (element 0 is the identity) and 0..47 all 48
symmetries, each exactly once. Drawing ``i`` uniformly therefore draws a uniform group element.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor

from .augment import translate

#: Values of the ``rotations`` option: no rotations, the 24 cube rotations, all 48 symmetries (with reflections).
ROTATIONS: tuple[str, ...] = ("none", "cube", "cube_reflections")
_ORIENT: tuple[tuple[int, tuple[int, int]], ...] = (
    (0, (-3, -2)), (1, (-3, -2)), (2, (-3, -2)), (3, (-3, -2)), (1, (-3, -1)), (3, (-3, -1)))


def _orient(x: Tensor, o: int) -> Tensor:
    k, dims = _ORIENT[o]
    return torch.rot90(x, k, dims=dims) if k else x


@dataclass(frozen=True)
class CubeSymmetry:
    """One symmetry of the voxel grid: ``x -> O_o(R_k(F^flip(x)))`` on the last three axes (see module docstring).

    Calling it on a ``(..., D, H, W)`` tensor with ``D == H == W`` returns the transformed tensor (a view or copy).
    """

    flip: bool
    orient: int
    k: int

    @property
    def index(self) -> int:
        """Position in ``cube_symmetries(reflections=True)`` (0..23 rotations, 24..47 reflections)."""
        return 24 * int(self.flip) + 4 * self.orient + self.k

    @property
    def is_rotation(self) -> bool:
        """True for the 24 proper rotations, False for the 24 elements that include a reflection."""
        return not self.flip

    def __call__(self, x: Tensor) -> Tensor:
        _check_cubic(x)
        if self.flip:
            x = x.flip(-1)
        if self.k:
            x = torch.rot90(x, self.k, dims=(-2, -1))
        return _orient(x, self.orient)

    def __repr__(self) -> str:
        return f"CubeSymmetry(index={self.index}, flip={self.flip}, orient={self.orient}, k={self.k})"


def cube_symmetries(reflections: bool = False) -> list[Callable[[Tensor], Tensor]]:
    """The 24 rotations of the cube (``reflections=False``) or all 48 symmetries, as exact voxel permutations.

    Each element is a :class:`CubeSymmetry`, a callable acting on the last three axes of a ``(..., D, H, W)``
    tensor (``D == H == W``). The list is ordered by :attr:`CubeSymmetry.index`; element 0 is the identity. The
    elements are pairwise distinct and the list is closed under composition and inverses (it is a group), so a
    network ``f`` is invariant to the grid's symmetries when ``f(g(x)) == f(x)`` for every ``g`` in the list.
    """
    n = 48 if reflections else 24
    return [CubeSymmetry(flip=i >= 24, orient=(i % 24) // 4, k=i % 4) for i in range(n)]


def _check_cubic(x: Tensor) -> None:
    if x.dim() < 3 or not x.shape[-1] == x.shape[-2] == x.shape[-3]:
        raise ValueError(f"cube symmetries need cubic volumes (..., S, S, S), got shape {tuple(x.shape)}")


def _masked(x: Tensor, which: Tensor, values: range, op: Callable[[Tensor, int], Tensor]) -> Tensor:
    """``out[i] = op(x[i], which[i])`` with one op per value in ``values`` (not per sample); 0 leaves ``x[i]``."""
    out = x.clone()
    for v in values:
        idx = (which == v).nonzero(as_tuple=True)[0]
        if idx.numel():
            out[idx] = op(x[idx], v)
    return out


def apply_cube_symmetry(x: Tensor, index: Tensor) -> Tensor:
    """Apply element ``index[i]`` of ``cube_symmetries(True)`` to sample ``x[i]`` of a ``(N, ..., S, S, S)`` batch.

    Vectorised: at most 1 + 3 + 5 batched ops whatever the batch size. ``x`` is not modified.
    """
    _check_cubic(x)
    index = index.to(x.device).long()
    if index.shape != (x.shape[0],) or (index.numel() and not 0 <= int(index.min()) <= int(index.max()) < 48):
        raise ValueError(f"index must be a ({x.shape[0]},) tensor of values in 0..47, got {index}")
    flip, orient, k = index >= 24, (index % 24) // 4, index % 4
    x = torch.where(flip.view(-1, *[1] * (x.dim() - 1)), x.flip(-1), x)
    x = _masked(x, k, range(1, 4), lambda t, q: torch.rot90(t, q, dims=(-2, -1)))
    return _masked(x, orient, range(1, 6), _orient)


class BatchAugment3D:
    """Random grid symmetries and translations for a ``(N, C, D, H, W)`` batch, one independent draw per sample.

    Args:
        rotations: ``"none"``; ``"cube"``: each sample gets a uniformly random one of the 24 rotations of the cube;
            ``"cube_reflections"``: uniform over all 48 symmetries (rotations and reflections). See
            :func:`cube_symmetries`. Needs ``D == H == W``.
        crop_padding: pad by this many voxels on every side with ``fill`` and crop a random ``D x H x W`` window,
            i.e. translate by ``(dz, dy, dx)`` uniform in ``[-p, p]^3`` (after the rotation). 0 disables it.
        fill: value of the padded border (``-1.0`` is black for data normalised as ``(x / 255 - 0.5) / 0.5``).

    Call it as ``augment(batch, generator=g)``; the same generator state gives the same output.
    """

    def __init__(self, rotations: str = "none", crop_padding: int = 0, fill: float = 0.0) -> None:
        if rotations not in ROTATIONS:
            raise ValueError(f"rotations must be one of {', '.join(map(repr, ROTATIONS))} (none, the 24 rotations "
                             f"of the cube, or all 48 symmetries with reflections), got {rotations!r}")
        if isinstance(crop_padding, bool) or not isinstance(crop_padding, int) or crop_padding < 0:
            raise ValueError(f"crop_padding must be an int >= 0 (voxels of padding on each side), "
                             f"got {crop_padding!r}")
        self.rotations, self.crop_padding, self.fill = rotations, crop_padding, float(fill)

    @property
    def group_order(self) -> int:
        """Number of symmetries drawn from: 1, 24 or 48."""
        return {"none": 1, "cube": 24, "cube_reflections": 48}[self.rotations]

    @property
    def enabled(self) -> bool:
        """Whether any augmentation is switched on."""
        return self.rotations != "none" or self.crop_padding > 0

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(rotations={self.rotations!r}, crop_padding={self.crop_padding}, "
                f"fill={self.fill})")

    def __call__(self, x: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """Return an augmented copy of ``x`` (``(N, C, D, H, W)``); ``x`` itself is not modified."""
        if x.dim() != 5:
            raise ValueError(f"BatchAugment3D expects a (N, C, D, H, W) batch, got shape {tuple(x.shape)}")
        n = x.shape[0]
        if n == 0 or not self.enabled:
            return x.clone()
        if self.rotations != "none":
            x = apply_cube_symmetry(x, torch.randint(0, self.group_order, (n,), generator=generator))
        if self.crop_padding:
            p = self.crop_padding
            x = translate(x, torch.randint(0, 2 * p + 1, (n, 3), generator=generator) - p, fill=self.fill)
        return x
