"""Equivariant ResNets: C_N / D_N regular fields, a group per stage, invariant logits.

Layout (He et al. 2016, with the stride moved into a symmetric pool so rotations stay exact):

    stem   conv k x k  trivial fields (image channels) -> regular fields, norm, act, [symmetric max-pool]*s
    stage  [Restrict to the stage's group] + blocks; the first block of stages 2.. halves H and W
    head   group pooling (max over each field) -> global average pool -> dropout -> linear

Basic blocks (conv3-conv3) or bottlenecks (conv1-conv3-conv1, expansion 4). Widths are given in channels of the
plain counterpart: a stage of ``c`` channels has ``c / |G|`` regular fields (same channel count as the plain net,
about ``|G|`` times fewer parameters), or, with ``fixparams=True``, enough fields that the parameter count matches
the plain net (as escnn's wide ResNets do). The logits are invariant to the last stage's group; for groups that
contain them, this is exact for rotations by multiples of 90 degrees and flips at every input size.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
from torch import nn

from ..nn import (EquivariantConv2d, EquivariantConv3d, EquivariantPool2d, FieldBatchNorm, FieldGroupNorm,
                  FourierFieldNorm, FourierGroupPooling, FourierPointwise, GroupPooling, PointwiseNonlinearity,
                  Restrict, canonical_group, canonical_group3d, conv_basis, export, field_type, field_type3d,
                  group_gspace, group_gspace3d, gspace_name)
from ..nn.fields import as_recipe
from .registry import register_backbone
from .scaling import compound_scaling, scale_depth, scale_resolution


def _pointwise(ftype) -> bool:
    """Whether the fields permute their channels (C_N, D_N, O, Oh) rather than being band-limited (SO3, O3)."""
    return all("pointwise" in r.supported_nonlinearities for r in ftype.representations)


def _make_norm(kind: str, ftype, norm_groups: int | None) -> nn.Module:
    if kind == "group":
        return (FieldGroupNorm if _pointwise(ftype) else FourierFieldNorm)(ftype, num_groups=norm_groups)
    if kind == "batch":
        if not _pointwise(ftype):
            raise ValueError("norm='batch' is not available for band-limited SO3/O3 fields; use norm='group' "
                             "(FourierFieldNorm) or 'none'")
        return FieldBatchNorm(ftype)
    if kind == "none":
        return nn.Identity()
    raise ValueError(f"unknown norm {kind!r}: use 'group' (DP-compatible, default), 'batch' or 'none'")


class _Layers:
    """Builds layers on field types with the backbone's settings."""

    def __init__(self, norm: str, norm_groups: int | None, activation: str, kernel_size: int, band_limit: int = 2):
        self.norm, self.norm_groups, self.activation, self.kernel_size = norm, norm_groups, activation, kernel_size
        self.band_limit = band_limit

    def regular(self, gspace, count: int):
        """``count`` regular fields (band-limited at ``band_limit`` for SO3/O3)."""
        return regular_fields(gspace, count, self.band_limit)

    def act(self, t):
        """The nonlinearity: pointwise on permutation fields, Fourier-sampled (escnn's FourierELU) on SO3/O3."""
        return (PointwiseNonlinearity if _pointwise(t) else FourierPointwise)(t, self.activation)

    def conv(self, t_in, t_out, kernel_size=None):
        conv = EquivariantConv3d if t_in.gspace.dimensionality == 3 else EquivariantConv2d
        return conv(t_in, t_out, kernel_size or self.kernel_size, bias=self.norm == "none")

    def norm_act(self, t):
        return _make_norm(self.norm, t, self.norm_groups), self.act(t)


class BasicBlock(nn.Module):
    """conv k -> norm -> act -> conv k -> norm, plus (projected) shortcut, then act."""

    expansion = 1

    @staticmethod
    def convs(k: int) -> tuple:
        """The block's convolutions as (kernel, in, out) multiples of the stage width (for ``fixparams``)."""
        return ((k, 1, 1), (k, 1, 1))

    def __init__(self, t_in, t_mid, downsample: bool, layers: _Layers):
        super().__init__()
        t_out = t_mid
        self.pool = EquivariantPool2d(t_in, "avg") if downsample else None
        self.conv1 = layers.conv(t_in, t_mid)
        self.norm1, self.act1 = layers.norm_act(t_mid)
        self.conv2 = layers.conv(t_mid, t_out)
        self.norm2 = _make_norm(layers.norm, t_out, layers.norm_groups)
        self.shortcut = None if t_in == t_out else nn.Sequential(layers.conv(t_in, t_out, 1),
                                                                 _make_norm(layers.norm, t_out, layers.norm_groups))
        self.act2 = layers.act(t_out)

    @property
    def out_type(self):
        return self.act2.out_type

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.pool is not None:
            x = self.pool(x)  # (N, C, ceil(H/2), ceil(W/2))
        out = self.act1(self.norm1(self.conv1(x)))
        out = self.norm2(self.conv2(out))
        return self.act2(out + (x if self.shortcut is None else self.shortcut(x)))


class Bottleneck(nn.Module):
    """conv 1 -> conv k -> conv 1 (x4 fields), norms and acts, plus (projected) shortcut, then act."""

    expansion = 4

    @staticmethod
    def convs(k: int) -> tuple:
        return ((1, 4, 1), (k, 1, 1), (1, 1, 4))

    def __init__(self, t_in, t_mid, downsample: bool, layers: _Layers):
        super().__init__()
        t_out = layers.regular(t_mid.gspace, len(t_mid) * self.expansion)
        self.pool = EquivariantPool2d(t_in, "avg") if downsample else None
        self.conv1 = layers.conv(t_in, t_mid, 1)
        self.norm1, self.act1 = layers.norm_act(t_mid)
        self.conv2 = layers.conv(t_mid, t_mid)
        self.norm2, self.act2 = layers.norm_act(t_mid)
        self.conv3 = layers.conv(t_mid, t_out, 1)
        self.norm3 = _make_norm(layers.norm, t_out, layers.norm_groups)
        self.shortcut = None if t_in == t_out else nn.Sequential(layers.conv(t_in, t_out, 1),
                                                                 _make_norm(layers.norm, t_out, layers.norm_groups))
        self.act3 = layers.act(t_out)

    @property
    def out_type(self):
        return self.act3.out_type

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.pool is not None:
            x = self.pool(x)
        out = self.act1(self.norm1(self.conv1(x)))
        out = self.act2(self.norm2(self.conv2(out)))
        out = self.norm3(self.conv3(out))
        return self.act3(out + (x if self.shortcut is None else self.shortcut(x)))


def gspace_of(group: str, dims: int = 2):
    """The escnn gspace of a named group acting on images (``dims=2``: C_N, D_N) or volumes (3: O, Oh, ...)."""
    return group_gspace3d(group) if dims == 3 else group_gspace(group)


def regular_fields(gspace, count: int, band_limit: int = 2):
    """``count`` regular fields of a gspace; for SO3/O3 the band-limited ones (``band_limit``)."""
    if gspace.dimensionality == 3:
        return field_type3d(gspace, "regular", count, band_limit)
    return field_type(gspace, "regular", count)


def fields_for(channels: float, group: str, fixparams: bool, convs=((3, 1, 1),), dims: int = 2,
               band_limit: int = 2) -> int:
    """Regular fields for a stage of ``channels`` plain channels.

    Without ``fixparams``: ``channels / |G|`` (same channels as the plain net). With it: enough fields that the
    stage's convolutions have as many parameters as the plain ones. ``convs`` lists a block's convolutions as
    ``(kernel, in, out)`` multiples of the stage width; a plain k x k conv has ``k^2 * in * out * c^2`` parameters
    (``k^3`` in 3D), an equivariant one ``d_k * in * out * f^2`` with ``d_k`` escnn's basis size per field pair, so
    ``f = c * sqrt(sum k^2 in out / sum d_k in out)`` (``sqrt(|G|)`` times more channels for a full basis).
    """
    gspace = gspace_of(group, dims)
    regular = as_recipe(regular_fields(gspace, 1, band_limit))
    if not fixparams:
        return max(1, round(channels / regular.size))
    plain = sum(k ** dims * a * b for k, a, b in convs)
    equivariant = sum(conv_basis(regular, regular, k).dim * a * b for k, a, b in convs)
    return max(1, round(channels * math.sqrt(plain / equivariant)))


class EquivariantResNet(nn.Module):
    """An equivariant ResNet; build it through ``create_backbone('eq_resnet18', ...)`` and friends."""

    def __init__(self, in_channels: int, num_classes: int, block: type, layers: Sequence[int],
                 widths: Sequence[int], group: str | Sequence[str] = "D4", width_multiplier: float = 1.0,
                 depth_multiplier: float = 1.0, phi: float | None = None, input_size: int = 28,
                 fixparams: bool = False, norm: str = "group", norm_groups: int | None = None,
                 activation: str = "relu", kernel_size: int = 3, stem_kernel: int = 5,
                 stem_pools: int | None = None, dropout: float = 0.0, group_pool: str = "max", dims: int = 2,
                 band_limit: int = 2):
        super().__init__()
        groups = [group] * len(layers) if isinstance(group, str) else list(group)
        if len(groups) != len(layers):
            example = ['D8', 'D4', 'D1', 'D1'] if dims == 2 else ['Oh', 'Oh', 'O', 'O']
            raise ValueError(f"group has {len(groups)} entries but the network has {len(layers)} stages; give one "
                             f"group, or one per stage (e.g. {example[:len(layers)]})")
        groups = [(canonical_group3d if dims == 3 else canonical_group)(g) for g in groups]
        self.dims = dims
        self.resolution_multiplier = 1.0
        if phi is not None:
            depth_multiplier, width_multiplier, self.resolution_multiplier = compound_scaling(phi)
        self.input_size, self.in_channels, self.num_classes = input_size, in_channels, num_classes
        self.scaled_input_size = scale_resolution(input_size, self.resolution_multiplier)
        self.stage_groups = groups
        self.group = groups[-1]
        build = _Layers(norm, norm_groups, activation, kernel_size, band_limit)

        # stem: image channels are trivial fields (invariant scalars that only move with the pixels)
        first_fields = fields_for(widths[0] * width_multiplier, groups[0], fixparams, ((kernel_size, 1, 1),), dims,
                                  band_limit)
        t = field_type(gspace_of(groups[0], dims), "trivial", in_channels)
        t_stem = build.regular(t.gspace, first_fields)
        if stem_pools is None:  # bring large inputs down to ~32 px before the first stage, as ResNets do
            stem_pools = max(0, math.ceil(math.log2(max(input_size, 1) / 32)))
        stem = [build.conv(t, t_stem, stem_kernel), *build.norm_act(t_stem)]
        stem += [EquivariantPool2d(t_stem, "max" if _pointwise(t_stem) else "avg") for _ in range(stem_pools)]
        self.stem = nn.Sequential(*stem)

        t = t_stem
        stages = []
        for index, (count, width, g) in enumerate(zip(layers, widths, groups)):
            blocks = []
            if gspace_name(t.gspace) != g:
                restriction = Restrict(t, g)
                blocks.append(restriction)
                t = restriction.out_type
            mid = build.regular(t.gspace, fields_for(width * width_multiplier, g, fixparams, block.convs(kernel_size),
                                                     dims, band_limit))
            for b in range(scale_depth(count, depth_multiplier)):
                blk = block(t, mid, downsample=(index > 0 and b == 0), layers=build)
                blocks.append(blk)
                t = blk.out_type
            stages.append(nn.Sequential(*blocks))
        self.stages = nn.Sequential(*stages)
        # invariant features: max/mean over each field's channels, or for SO3/O3 fields the norm of each frequency
        # band (exactly invariant to every rotation; group_pool is then 'norm' or 'max' over the group grid)
        if _pointwise(t):
            self.group_pool = GroupPooling(t, group_pool)
        else:
            self.group_pool = FourierGroupPooling(t, "norm" if group_pool in ("max", "norm") else group_pool)
        self.dropout = nn.Dropout(dropout)
        self.head = nn.Linear(self.group_pool.out_type.size, num_classes)

    @property
    def input_type(self):
        """Field type of the input image (volume): one trivial field per channel."""
        return self.stem[0].in_type

    @property
    def feature_type(self):
        """Field type of the last stage (before group pooling)."""
        return self.group_pool.in_type

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Invariant features ``(N, features)`` (one per field; L+1 per band-limited SO3 field)."""
        x = self.stages(self.stem(x))  # (N, C_last, h, w[, d])
        return self.group_pool(x).flatten(2).mean(2)  # (N, fields)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.dropout(self.forward_features(x)))

    def export(self) -> nn.Module:
        """A copy built from plain Conv2d/GroupNorm/... layers with identical outputs (see ``eqlightning.nn.export``)."""
        return export(self)


_OPTIONS = """Options: group ('D4'; or one group per stage, e.g. ['D8','D4','D1'] restricts between stages),
    width_multiplier, depth_multiplier, phi (EfficientNet compound scaling; overrides both), input_size,
    fixparams (match the plain net's parameter count), norm ('group' | 'batch' | 'none'), norm_groups,
    activation ('relu', 'elu', 'mish', ...), kernel_size (3), stem_kernel (5), stem_pools (auto), dropout,
    group_pool ('max' | 'avg'), band_limit (3D SO3/O3 fields: highest frequency, default 2)."""


@register_backbone("eq_resnet8", equivariant=True)
def eq_resnet8(*, in_channels: int, num_classes: int, **kwargs) -> EquivariantResNet:
    """Small equivariant ResNet: 3 stages of 1 basic block, 32/64/128 channels (D4: 4/8/16 fields)."""
    return EquivariantResNet(in_channels, num_classes, BasicBlock, (1, 1, 1), (32, 64, 128), **kwargs)


@register_backbone("eq_resnet18", equivariant=True)
def eq_resnet18(*, in_channels: int, num_classes: int, **kwargs) -> EquivariantResNet:
    """Equivariant ResNet-18: basic blocks [2,2,2,2], 64-512 channels (same channels as resnet18)."""
    return EquivariantResNet(in_channels, num_classes, BasicBlock, (2, 2, 2, 2), (64, 128, 256, 512), **kwargs)


@register_backbone("eq_resnet50", equivariant=True)
def eq_resnet50(*, in_channels: int, num_classes: int, **kwargs) -> EquivariantResNet:
    """Equivariant ResNet-50: bottlenecks [3,4,6,3], 64-512 mid channels x4 (same channels as resnet50)."""
    return EquivariantResNet(in_channels, num_classes, Bottleneck, (3, 4, 6, 3), (64, 128, 256, 512), **kwargs)


for _fn in (eq_resnet8, eq_resnet18, eq_resnet50):
    _fn.__doc__ += "\n\n    " + _OPTIONS
