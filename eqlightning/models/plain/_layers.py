"""Layer helpers shared by the plain CNN families: the ``norm`` option and GroupNorm group counts.

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
    check_norm(norm)
    if norm == "batch":
        return nn.BatchNorm2d(channels, eps=eps)
    return nn.GroupNorm(group_count(channels), channels, eps=eps)


def init_conv_and_norm(module: nn.Module) -> None:
    """He (fan-out) init for convolutions, unit scale / zero shift for norms, as torchvision's CNNs do."""
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, (nn.BatchNorm2d, nn.GroupNorm)):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
