"""Test-time image transforms: exact rotations by multiples of 90 degrees and flips, and bilinear rotation by any
angle inside the inscribed disk.

Convention: a positive angle rotates the image counter-clockwise as displayed (row 0 at the top), the same as
``torch.rot90(x, k=1, dims=(-2, -1))`` for 90 degrees. Images are ``(..., H, W)``; every leading dimension (batch,
channels) is transformed alike.

Rotating by an angle that is not a multiple of 90 degrees moves the corners of the image out of the frame and brings
in new ones; :func:`rotate` therefore keeps only the inscribed disk (the pixels whose centres lie within ``min(H, W) /
2`` of the centre), sets everything outside it to ``background``, and does so both before and after rotating. The
reference to compare a rotated image with is then :func:`mask_disk` of the original, not the original. The default
background is ``-1``: black in eqlightning's normalised space (:func:`eqlightning.data.medmnist.normalize` maps grey
levels 0..255 to [-1, 1]), which is also the background of most MedMNIST images.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

#: Black in eqlightning's normalised space ([0, 255] -> [-1, 1]); the default background outside the disk.
BACKGROUND = -1.0


def _size(size) -> tuple[int, int]:
    h, w = (size, size) if isinstance(size, int) else tuple(size)
    if h < 1 or w < 1:
        raise ValueError(f"disk_mask: image size must be positive, got {size!r}")
    return int(h), int(w)


def disk_mask(size: int | tuple[int, int], device: torch.device | str | None = None) -> torch.Tensor:
    """Boolean ``(H, W)`` mask of the inscribed disk: pixels whose centre lies within ``min(H, W) / 2`` of the image
    centre. For square images it is invariant to ``rot90`` and to flips."""
    h, w = _size(size)
    rows = torch.arange(h, device=device, dtype=torch.float64) + 0.5 - h / 2
    cols = torch.arange(w, device=device, dtype=torch.float64) + 0.5 - w / 2
    radius = min(h, w) / 2
    return rows[:, None] ** 2 + cols[None, :] ** 2 <= radius ** 2


def mask_disk(x: torch.Tensor, background: float = BACKGROUND) -> torch.Tensor:
    """``x`` with every pixel outside the inscribed disk set to ``background``."""
    return x.masked_fill(~disk_mask(x.shape[-2:], x.device), background)


def hflip(x: torch.Tensor) -> torch.Tensor:
    """Horizontal flip (left <-> right)."""
    return x.flip(-1)


def rotate(x: torch.Tensor, angle: float, *, exact: bool = True, background: float = BACKGROUND) -> torch.Tensor:
    """Rotate images ``(..., H, W)`` counter-clockwise by ``angle`` degrees.

    With ``exact=True`` (default) a multiple of 90 degrees is ``torch.rot90``: exact, the whole image, no mask. Any
    other angle (or any angle with ``exact=False``) is a bilinear rotation of the inscribed disk: pixels outside the
    disk are set to ``background`` before and after rotating (samples falling outside the frame read
    ``background`` too), so compare the result with ``mask_disk(x, background)``.
    """
    angle = float(angle)
    if not math.isfinite(angle):
        raise ValueError(f"rotate: angle must be a finite number of degrees, got {angle!r}")
    if x.dim() < 2 or not x.is_floating_point():
        raise ValueError(f"rotate: expected floating-point images (..., H, W), got {x.dtype} {tuple(x.shape)}")
    quarter = angle / 90
    if exact and quarter.is_integer():
        return torch.rot90(x, int(quarter) % 4, dims=(-2, -1))
    h, w = x.shape[-2:]
    a = math.radians(angle)
    c, s = math.cos(a), math.sin(a)
    # affine_grid maps output (column, row) coordinates, normalised to [-1, 1] per axis, to input coordinates. In
    # pixel units (rows pointing down) the source of an output pixel is R(angle) @ its position, which with k=1
    # reproduces rot90; the H/W factors undo the per-axis normalisation for non-square images.
    theta = torch.tensor([[[c, -s * h / w, 0.0], [s * w / h, c, 0.0]]], dtype=x.dtype, device=x.device)
    flat = mask_disk(x, background).reshape(1, -1, h, w) - background  # zero padding then reads `background`
    grid = F.affine_grid(theta, [1, flat.shape[1], h, w], align_corners=False)
    out = F.grid_sample(flat, grid, mode="bilinear", padding_mode="zeros", align_corners=False) + background
    return mask_disk(out.reshape(x.shape), background)
