"""Refuse layers that break per-sample independence before any private training starts."""

from __future__ import annotations

from torch import nn

from ..nn import FieldBatchNorm


class DPCompatibilityError(ValueError):
    """A model contains layers whose outputs mix the samples of a batch (per-sample gradients are undefined)."""


def _mixes_samples(module: nn.Module) -> bool:
    if isinstance(module, (nn.modules.batchnorm._BatchNorm, FieldBatchNorm)):
        return True
    if isinstance(module, nn.modules.instancenorm._InstanceNorm) and module.track_running_stats:
        return True
    # escnn's own batch norms (InnerBatchNorm, IIDBatchNorm2d, ...) wrap torch batch norms or re-implement them
    return type(module).__module__.startswith("escnn.") and "BatchNorm" in type(module).__name__


def dp_incompatible_layers(model: nn.Module) -> list[tuple[str, str]]:
    """``(path, class name)`` of every layer whose output depends on other samples of the batch."""
    return [(name or "<model>", type(m).__name__) for name, m in model.named_modules() if _mixes_samples(m)]


def check_dp_compatible(model: nn.Module) -> None:
    """Raise :class:`DPCompatibilityError` naming each batch-statistics layer and the fix."""
    bad = dp_incompatible_layers(model)
    if not bad:
        return
    listed = ", ".join(f"{path} ({cls})" for path, cls in bad[:8]) + (f" and {len(bad) - 8} more" if len(bad) > 8
                                                                     else "")
    raise DPCompatibilityError(
        f"DP-SGD needs per-sample gradients, but these layers normalise with statistics of the whole batch: "
        f"{listed}. Use group normalisation instead: norm='group' for eqlightning backbones (FieldGroupNorm for "
        "equivariant layers, e.g. model.backbone_kwargs.norm: group), or for plain torch models "
        "`opacus.validators.ModuleValidator.fix(model)`, which replaces BatchNorm with GroupNorm."
    )
