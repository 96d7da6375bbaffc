"""``hooks``: each layer's own exact rule, Opacus's rule for standard torch layers, ``torch.func`` otherwise.

Rules, in order of preference: the layer's ``per_sample_gradients`` (the contract of
:mod:`eqlightning.nn.persample`: eqlightning's equivariant convolutions and normalisations), the rules Opacus
registers for torch layers (``Conv2d``, ``Linear``, ``GroupNorm``, ``LayerNorm``, ``Embedding``, ...; public
``GradSampleModule.GRAD_SAMPLERS``), then :func:`~.functorch.functorch_rule`.
"""

from __future__ import annotations

import torch
from opacus import GradSampleModule
from torch import nn

from ...nn import fp32_compute, has_per_sample_rule
from . import register_mechanism
from .base import Mechanism
from .functorch import functorch_rule


def layer_rule(layer: nn.Module, inputs: tuple, grad_output: torch.Tensor) -> dict:
    return layer.per_sample_gradients(inputs, grad_output)


def _opacus_rule(opacus_rule):
    def rule(layer: nn.Module, inputs: tuple, grad_output: torch.Tensor) -> dict:
        # fp32 under mixed precision: fp16 per-sample gradients of a scaled loss overflow long before the sum does
        with fp32_compute(grad_output, *inputs) as (g, *xs):
            return {p: value.to(p.dtype) for p, value in opacus_rule(layer, list(xs), g).items()}
    return rule


def best_rule(layer: nn.Module):
    if has_per_sample_rule(layer):
        return layer_rule
    opacus_rule = GradSampleModule.GRAD_SAMPLERS.get(type(layer))
    if opacus_rule is not None:
        return _opacus_rule(opacus_rule)
    return functorch_rule


@register_mechanism("hooks")
class Hooks(Mechanism):
    def rule(self, layer: nn.Module):
        return best_rule(layer)
