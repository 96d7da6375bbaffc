"""Batched, seeded tensor augmentations for square images (no torchvision); cubic volumes: see ``augment3d``.

The dihedral group D4 (rotations by multiples of 90 degrees, and reflections) acts exactly on the pixel grid, so
``rot90`` and ``flip`` are lossless: with both enabled every sample gets a uniformly random element of D4, the
symmetry group that a D4-equivariant network is built to respect (an equivariant net gains little from them; a plain
CNN gains a lot). ``crop_padding`` adds small random translations (pad with ``fill``, then crop back).

Every op is vectorised over the batch: per-sample choices are drawn from one ``torch.Generator`` and applied with
masks / gathers, so the cost does not grow with Python-level loops over samples.
"""

from __future__ import annotations

import torch
from torch import Tensor


class BatchAugment:
    """Random D4 elements and translations for a ``(N, C, H, W)`` batch, one independent draw per sample.

    Args:
        rot90: rotate each sample by ``k * 90`` degrees, ``k`` uniform in {0, 1, 2, 3} (needs ``H == W``).
        flip: mirror each sample left-right with probability 1/2 (applied before the rotation, so with ``rot90``
            the result is uniform over all 8 elements of D4).
        crop_padding: pad by this many pixels on every side with ``fill`` and crop a random ``H x W`` window, i.e.
            translate by ``(dy, dx)`` uniform in ``[-p, p]^2``. 0 disables it.
        fill: value of the padded border, in the units of the input (``-1.0`` is black for images normalised as
            MedMNIST does, ``(x / 255 - 0.5) / 0.5``).

    Call it as ``augment(batch, generator=g)``; the same generator state gives the same output.
    """

    def __init__(self, rot90: bool = False, flip: bool = False, crop_padding: int = 0, fill: float = 0.0) -> None:
        if isinstance(crop_padding, bool) or not isinstance(crop_padding, int) or crop_padding < 0:
            raise ValueError(f"crop_padding must be an int >= 0 (pixels of padding on each side), "
                             f"got {crop_padding!r}")
        self.rot90, self.flip, self.crop_padding, self.fill = bool(rot90), bool(flip), crop_padding, float(fill)

    @property
    def enabled(self) -> bool:
        """Whether any augmentation is switched on."""
        return self.rot90 or self.flip or self.crop_padding > 0

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(rot90={self.rot90}, flip={self.flip}, crop_padding={self.crop_padding}, "
                f"fill={self.fill})")

    def __call__(self, x: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """Return an augmented copy of ``x`` (``(N, C, H, W)``); ``x`` itself is not modified."""
        if x.dim() != 4:
            raise ValueError(f"BatchAugment expects a (N, C, H, W) batch, got shape {tuple(x.shape)}")
        n = x.shape[0]
        if n == 0 or not self.enabled:
            return x.clone()
        if self.flip:
            x = flip_lr(x, torch.rand(n, generator=generator) < 0.5)
        if self.rot90:
            x = rotate90(x, torch.randint(0, 4, (n,), generator=generator))
        if self.crop_padding:
            p = self.crop_padding
            x = translate(x, torch.randint(0, 2 * p + 1, (n, 2), generator=generator) - p, fill=self.fill)
        return x


def flip_lr(x: Tensor, mask: Tensor) -> Tensor:
    """Mirror the samples where ``mask`` (``(N,)`` bool) is True along the width axis; returns a new tensor."""
    return torch.where(mask.view(-1, 1, 1, 1).to(x.device), x.flip(-1), x)


def rotate90(x: Tensor, k: Tensor) -> Tensor:
    """Rotate sample ``i`` by ``k[i] * 90`` degrees counter-clockwise (as ``torch.rot90(dims=(-2, -1))``)."""
    if x.shape[-1] != x.shape[-2]:
        raise ValueError(f"rot90 augmentation needs square images, got {x.shape[-2]}x{x.shape[-1]}: "
                         f"switch rot90 off for this data")
    k = k.to(x.device) % 4
    out = x.clone()
    for quarter in (1, 2, 3):  # 3 masked ops per batch, not one op per sample
        idx = (k == quarter).nonzero(as_tuple=True)[0]
        if idx.numel():
            out[idx] = torch.rot90(x[idx], quarter, dims=(-2, -1))
    return out


def translate(x: Tensor, shift: Tensor, fill: float = 0.0) -> Tensor:
    """Shift sample ``i`` by ``shift[i]`` pixels/voxels (content moves towards higher indices for positive values).

    ``x`` is ``(N, C, H, W)`` with ``shift`` ``(N, 2)`` = ``(dy, dx)``, or ``(N, C, D, H, W)`` with ``shift``
    ``(N, 3)`` = ``(dz, dy, dx)``. Equivalent to padding by ``p >= max|shift|`` with ``fill`` and cropping the
    window at ``p - shift``; implemented as one gather over the padded batch.
    """
    n, c, *spatial = x.shape
    k = len(spatial)
    if tuple(shift.shape) != (n, k):
        raise ValueError(f"shift must have shape ({n}, {k}) for a batch of shape {tuple(x.shape)}, "
                         f"got {tuple(shift.shape)}")
    shift = shift.to(x.device)
    p = int(shift.abs().max()) if shift.numel() else 0
    if p == 0:
        return x.clone()
    padded = torch.nn.functional.pad(x, (p, p) * k, value=fill)  # (N, C, *(S + 2p))
    index = [torch.arange(n, device=x.device).view(n, *[1] * k)]
    for axis, side in enumerate(spatial):  # broadcastable (N, 1.., side, 1..) window start + offset per axis
        shape = [n] + [1] * k
        shape[1 + axis] = side
        index.append(((p - shift[:, axis]).view(n, 1) + torch.arange(side, device=x.device)).view(shape))
    out = padded.movedim(1, -1)[tuple(index)]  # (N, *spatial, C)
    return out.movedim(-1, 1).contiguous()
