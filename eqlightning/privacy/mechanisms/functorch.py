"""``functorch``: every layer's per-sample gradients with ``torch.func`` (``vmap`` over ``grad``).

General (any layer whose forward is a function of its inputs and parameters) and exact, but slower than the
layer rules; the reference the other mechanisms are checked against in ``tests/privacy``.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.func import functional_call, grad, vmap

from ...nn import fp32_compute
from . import register_mechanism
from .base import Mechanism


def functorch_rule(layer: nn.Module, inputs: tuple, grad_output: torch.Tensor) -> dict:
    """Per-sample gradients of the layer's own trainable parameters (not its children's) by ``vmap(grad)``."""
    params = {name: p for name, p in layer.named_parameters(recurse=False) if p.requires_grad}
    frozen = {name: p for name, p in layer.named_parameters(recurse=False) if not p.requires_grad}
    if not params:
        return {}

    def loss(weights, x, g):  # one sample: <layer(x), g>, whose gradient is the sample's gradient
        out = functional_call(layer, {**weights, **frozen}, (x.unsqueeze(0),))
        return (out * g.unsqueeze(0)).sum()

    with fp32_compute(inputs[0], grad_output) as (x, g):
        weights = {name: p.detach().to(x.dtype) if p.is_floating_point() else p.detach() for name, p in
                   params.items()}
        grads = vmap(grad(loss), in_dims=(None, 0, 0))(weights, x, g.to(x.dtype))
    return {params[name]: value.to(params[name].dtype) for name, value in grads.items()}


@register_mechanism("functorch")
class Functorch(Mechanism):
    def rule(self, layer: nn.Module):
        return functorch_rule
