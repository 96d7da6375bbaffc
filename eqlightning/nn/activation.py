"""Pointwise nonlinearities on fields whose representation permutes channels."""

from __future__ import annotations

import torch
from torch import nn

from .fields import check_pointwise
from .module import EquivariantModule

_ACTIVATIONS = {
    "relu": nn.ReLU,
    "elu": nn.ELU,
    "gelu": nn.GELU,
    "silu": nn.SiLU,
    "mish": nn.Mish,
    "tanh": nn.Tanh,
    "sigmoid": nn.Sigmoid,
    "leaky_relu": nn.LeakyReLU,
}


def make_activation(name: str) -> nn.Module:
    """A plain torch activation by name (``relu``, ``elu``, ``gelu``, ``silu``, ``mish``, ...)."""
    try:
        return _ACTIVATIONS[name]()
    except KeyError:
        raise ValueError(f"unknown activation {name!r}; choose one of {sorted(_ACTIVATIONS)}") from None


class PointwiseNonlinearity(EquivariantModule):
    r"""``sigma(x)`` applied to every channel: equivariant because regular/trivial fields transform by permuting
    channels (and pixels), and a pointwise function commutes with permutations."""

    def __init__(self, in_type, function: str = "relu"):
        super().__init__(in_type)
        check_pointwise(self.in_type, "PointwiseNonlinearity")
        self.function = function
        self.act = make_activation(function)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(x)

    def export(self) -> nn.Module:
        return make_activation(self.function)

    def extra_repr(self) -> str:
        return self.function
