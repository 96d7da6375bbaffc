"""Equivariant 3D ResNets for volumes: the :mod:`.eq_resnet` family on 3D groups (O, Oh; a group per stage).

Same layout and options as the 2D family (basic blocks or bottlenecks, widths in plain channels, ``fixparams``,
width/depth multipliers, a group per stage with restriction between stages), on volumes ``(N, C, D, H, W)``:
convolutions are :class:`~eqlightning.nn.EquivariantConv3d` on escnn's R3 bases, pooling keeps the cube's
rotations exact, and the logits are invariant to the last stage's group, exactly for the 24 rotations of the cube
(``"O"``) or the 48 rotations and reflections (``"Oh"``) at every input size. Restrictions: ``Oh -> O`` and any group
``-> C1`` (e.g. ``group: [Oh, Oh, O]``). The stem kernel is 3 (a 5x5x5 regular basis costs ~10x more to expand).

``group: SO3`` (or ``O3``) builds the same network on band-limited fields (``band_limit`` L, default 2: 35 channels
per field): GroupNorm becomes :class:`~eqlightning.nn.FourierFieldNorm`, the nonlinearity escnn's Fourier ELU
(:class:`~eqlightning.nn.FourierPointwise`, sampled on 96 rotations closed under the cube's) and group pooling the
norms of each frequency band. Exact for the 24 (48) grid symmetries; other rotations are approximate (the
nonlinearity's sampling: ~1% off at L=1, ~9% at L=2, measured per field at 1x1x1).
"""

from __future__ import annotations

from .eq_resnet import _OPTIONS, BasicBlock, Bottleneck, EquivariantResNet
from .registry import register_backbone

_DEFAULTS = dict(group="O", stem_kernel=3, dims=3)


def _build(in_channels, num_classes, block, layers, widths, kwargs) -> EquivariantResNet:
    if "dims" in kwargs:
        raise TypeError("3D backbones always have dims=3; use the 2D names (eq_resnet18, ...) for images")
    return EquivariantResNet(in_channels, num_classes, block, layers, widths, **{**_DEFAULTS, **kwargs})


@register_backbone("eq_resnet8_3d", equivariant=True, dims=3)
def eq_resnet8_3d(*, in_channels: int, num_classes: int, **kwargs) -> EquivariantResNet:
    """Small equivariant 3D ResNet: 3 stages of 1 basic block, 48/96/192 channels (O: 2/4/8 regular fields)."""
    return _build(in_channels, num_classes, BasicBlock, (1, 1, 1), (48, 96, 192), kwargs)


@register_backbone("eq_resnet18_3d", equivariant=True, dims=3)
def eq_resnet18_3d(*, in_channels: int, num_classes: int, **kwargs) -> EquivariantResNet:
    """Equivariant 3D ResNet-18: basic blocks [2,2,2,2], 64-512 channels (same channels as resnet18_3d)."""
    return _build(in_channels, num_classes, BasicBlock, (2, 2, 2, 2), (64, 128, 256, 512), kwargs)


@register_backbone("eq_resnet50_3d", equivariant=True, dims=3)
def eq_resnet50_3d(*, in_channels: int, num_classes: int, **kwargs) -> EquivariantResNet:
    """Equivariant 3D ResNet-50: bottlenecks [3,4,6,3], 64-512 mid channels x4 (same channels as resnet50_3d)."""
    return _build(in_channels, num_classes, Bottleneck, (3, 4, 6, 3), (64, 128, 256, 512), kwargs)


for _fn in (eq_resnet8_3d, eq_resnet18_3d, eq_resnet50_3d):
    _fn.__doc__ += "\n\n    " + _OPTIONS.replace("'D4'", "'O'").replace("['D8','D4','D1']", "['Oh','Oh','O']").replace(
        "stem_kernel (5)", "stem_kernel (3)")
