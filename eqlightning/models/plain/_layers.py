"""Layer helpers shared by the plain CNN families: the ``norm`` option and GroupNorm group counts, for images (2D)
and volumes (3D).

``norm="batch"`` is what the original papers use; ``norm="group"`` (GroupNorm) is the DP-SGD-compatible choice,
because BatchNorm mixes the examples of a batch and so has no per-example gradient (Opacus rejects it).
"""

from __future__ import annotations

from torch import nn

NORMS = ("batch", "group")
_GROUP_CANDIDATES = (32, 16, 8, 4, 2, 1)


def check_norm(norm: str) -> str:
    """Return ``norm`` if it is a known normalisation, else raise a ValueError saying what to use."""
    if norm not in NORMS:
        raise ValueError(f"unknown norm {norm!r}: use 'batch' (as in the papers) or 'group' "
                         "(GroupNorm, needed for DP-SGD, which cannot use BatchNorm)")
    return norm


def group_count(channels: int) -> int:
    """GroupNorm groups for ``channels``: the largest of 32, 16, 8, 4, 2, 1 that divides it."""
    return next(g for g in _GROUP_CANDIDATES if channels % g == 0)


def norm2d(norm: str, channels: int, eps: float = 1e-5) -> nn.Module:
    """A 2D normalisation over ``channels`` feature maps: BatchNorm2d or GroupNorm (no running statistics)."""
    return norm_nd(norm, channels, dims=2, eps=eps)


def norm3d(norm: str, channels: int, eps: float = 1e-5) -> nn.Module:
    """A 3D normalisation over ``channels`` feature volumes: BatchNorm3d or GroupNorm (no running statistics)."""
    return norm_nd(norm, channels, dims=3, eps=eps)


def norm_nd(norm: str, channels: int, dims: int, eps: float = 1e-5) -> nn.Module:
    """BatchNorm2d/3d (``dims`` 2/3) or GroupNorm, which normalises any number of spatial dimensions alike."""
    check_norm(norm)
    if norm == "batch":
        return batch_norm_class(dims)(channels, eps=eps)
    return nn.GroupNorm(group_count(channels), channels, eps=eps)


def conv_class(dims: int) -> type[nn.Conv2d] | type[nn.Conv3d]:
    """``nn.Conv2d`` for images (``dims=2``), ``nn.Conv3d`` for volumes (``dims=3``)."""
    return {2: nn.Conv2d, 3: nn.Conv3d}[_check_dims(dims)]


def batch_norm_class(dims: int) -> type[nn.BatchNorm2d] | type[nn.BatchNorm3d]:
    return {2: nn.BatchNorm2d, 3: nn.BatchNorm3d}[_check_dims(dims)]


def max_pool_class(dims: int) -> type[nn.MaxPool2d] | type[nn.MaxPool3d]:
    return {2: nn.MaxPool2d, 3: nn.MaxPool3d}[_check_dims(dims)]


def adaptive_avg_pool_class(dims: int) -> type[nn.AdaptiveAvgPool2d] | type[nn.AdaptiveAvgPool3d]:
    return {2: nn.AdaptiveAvgPool2d, 3: nn.AdaptiveAvgPool3d}[_check_dims(dims)]


def _check_dims(dims: int) -> int:
    if dims not in (2, 3):
        raise ValueError(f"dims must be 2 (images) or 3 (volumes), got {dims!r}")
    return dims


def init_conv_and_norm(module: nn.Module) -> None:
    """He (fan-out) init for convolutions, unit scale / zero shift for norms, as torchvision's CNNs do (2D and 3D:
    a 3D kernel's fan-out counts its depth too)."""
    for m in module.modules():
        if isinstance(m, (nn.Conv2d, nn.Conv3d)):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, (nn.BatchNorm2d, nn.BatchNorm3d, nn.GroupNorm)):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
