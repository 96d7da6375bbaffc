"""Export a model with equivariant layers to plain torch layers (Conv2d, GroupNorm, ...) for inference."""

from __future__ import annotations

import copy

from torch import nn

from .module import EquivariantModule


def export(model: nn.Module) -> nn.Module:
    """A copy of ``model`` where every :class:`EquivariantModule` is replaced by its plain ``export()``.

    Convolutions become ``nn.Conv2d`` with the expanded filter, field norms ``nn.GroupNorm`` / ``nn.BatchNorm2d``
    with per-channel affine, and the parameter-free layers plain modules; outputs are identical (up to float
    rounding). The copy has no escnn types, so it pickles, scripts and runs at plain-CNN speed. ``model`` is not
    modified. Export in the mode you will run: batch norms are only identical in eval mode.
    """
    if isinstance(model, EquivariantModule):
        return model.export().train(model.training)
    exported = copy.deepcopy(model)
    _replace_children(exported)
    return exported


def _replace_children(module: nn.Module) -> None:
    for name, child in module.named_children():
        if isinstance(child, EquivariantModule):
            setattr(module, name, child.export().train(child.training))
        else:
            _replace_children(child)
