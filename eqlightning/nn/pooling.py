"""Spatial downsampling that commutes with the grid symmetries, group pooling, and group restriction."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .fields import as_field_type, check_pointwise, field_sizes, field_type, restrict
from .groups3d import restrict3d
from .module import EquivariantModule


def _window(size: int) -> tuple[int, int]:
    # A stride-2 window is symmetric under p -> size-1-p (rotations by 90 degrees, flips) only if it is
    # 2 wide on an even size, or 3 wide with padding 1 on an odd size.
    return (2, 0) if size % 2 == 0 else (3, 1)


def symmetric_downsample(x: torch.Tensor, mode: str = "max") -> torch.Tensor:
    """Halve every spatial side (to ceil(size/2)) with windows that map onto themselves under the grid's rotations
    and flips: ``(N, C, H, W)`` images or ``(N, C, D, H, W)`` volumes."""
    windows = [_window(size) for size in x.shape[2:]]
    kernel, padding = tuple(k for k, _ in windows), tuple(p for _, p in windows)
    if x.dim() == 5:
        if mode == "max":
            return F.max_pool3d(x, kernel, 2, padding)
        return F.avg_pool3d(x, kernel, 2, padding, count_include_pad=True)
    if mode == "max":
        return F.max_pool2d(x, kernel, 2, padding)
    return F.avg_pool2d(x, kernel, 2, padding, count_include_pad=True)


class SymmetricDownsample(nn.Module):
    """Plain-module form of :func:`symmetric_downsample` (what :class:`EquivariantPool2d` exports to)."""

    def __init__(self, mode: str = "max"):
        super().__init__()
        if mode not in ("max", "avg"):
            raise ValueError(f"pooling mode must be 'max' or 'avg', got {mode!r}")
        self.mode = mode

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return symmetric_downsample(x, self.mode)

    def extra_repr(self) -> str:
        return self.mode


class EquivariantPool2d(EquivariantModule):
    r"""Downsample by 2 with max or average pooling that keeps exact rot90/flip equivariance (volumes too: each
    side gets its own symmetric window, so the 24/48 rotations/reflections of the cube stay exact).

    A stride-2 window with an odd kernel on an even-sized map (or an even kernel on an odd-sized one) samples a
    grid that is not symmetric about the image centre, so rotating the input does not rotate the output. This layer
    picks a 2x2 window on even sizes and a 3x3 window with padding 1 on odd sizes. Max pooling needs fields that
    permute channels; average pooling is linear and works for any field.
    """

    def __init__(self, in_type, mode: str = "max"):
        super().__init__(in_type)
        if mode == "max":
            check_pointwise(self.in_type, f"{type(self).__name__}(mode='max')")
        self.pool = SymmetricDownsample(mode)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._check_input(x)
        return self.pool(x)

    def export(self) -> nn.Module:
        return SymmetricDownsample(self.pool.mode)


class FieldPool(nn.Module):
    """Max or mean over the channels of each field: ``(N, sum(sizes), H, W) -> (N, len(sizes), H, W)``."""

    def __init__(self, sizes: list[int], mode: str = "max"):
        super().__init__()
        if mode not in ("max", "avg"):
            raise ValueError(f"group pooling mode must be 'max' or 'avg', got {mode!r}")
        self.sizes, self.mode = list(sizes), mode

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        reduce = (lambda t, d: t.amax(d)) if self.mode == "max" else (lambda t, d: t.mean(d))
        if len(set(self.sizes)) == 1:
            return reduce(x.reshape(x.shape[0], len(self.sizes), self.sizes[0], *x.shape[2:]), 2)
        return torch.cat([reduce(part, 1).unsqueeze(1) for part in torch.split(x, self.sizes, dim=1)], dim=1)

    def extra_repr(self) -> str:
        return f"{len(self.sizes)} fields, {self.mode}"


class GroupPooling(EquivariantModule):
    r"""Invariant features: each field is reduced to one channel (max or mean over its channels).

    For a field that permutes its channels under the group, the max/mean over them is invariant, so the output
    consists of trivial fields that only move with the pixels.
    """

    def __init__(self, in_type, mode: str = "max"):
        in_type = as_field_type(in_type)
        check_pointwise(in_type, "GroupPooling")
        out = field_type(in_type.gspace, ["trivial"] * len(in_type))
        super().__init__(in_type, out)
        self.pool = FieldPool(field_sizes(in_type), mode)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._check_input(x)
        return self.pool(x)

    def export(self) -> nn.Module:
        return FieldPool(self.pool.sizes, self.pool.mode)


class Restrict(EquivariantModule):
    """Restrict the symmetry group of the fields (e.g. D8 -> D4): the tensor is unchanged, its field type is not.
    (In 3D, Oh -> O reorders the channels of regular fields so that each becomes two regular O fields, and any
    group -> C1 makes every channel a scalar; see :func:`eqlightning.nn.groups3d.restrict3d`.)

    Later layers built on ``out_type`` are only constrained by the subgroup, so they have more free parameters;
    escnn's wide ResNets restrict D8 -> D4 -> D1 between stages in this way.
    """

    def __init__(self, in_type, group: str):
        in_type = as_field_type(in_type)
        order = None
        if in_type.gspace.dimensionality == 3:  # escnn cannot restrict 3D gspaces: a channel reordering may be needed
            out_type, order = restrict3d(in_type, group)
        else:
            out_type = restrict(in_type, group)
        super().__init__(in_type, out_type)
        self.group = group
        self.order = None if order is None or list(order) == list(range(len(order))) else tuple(order)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x if self.order is None else x[:, list(self.order)]

    def export(self) -> nn.Module:
        return nn.Identity() if self.order is None else ChannelOrder(self.order)

    def extra_repr(self) -> str:
        return f"to {self.group}"


class EquivariantPool3d(EquivariantPool2d):
    """:class:`EquivariantPool2d` for volumes ``(N, C, D, H, W)`` (the same windows on each of the three sides)."""


class ChannelOrder(nn.Module):
    """Reorder channels: ``y[:, j] = x[:, order[j]]`` (what a 3D :class:`Restrict` needs, e.g. Oh -> O)."""

    def __init__(self, order):
        super().__init__()
        self.order = tuple(int(i) for i in order)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x[:, list(self.order)]

    def extra_repr(self) -> str:
        return f"{len(self.order)} channels"
