"""eqlightning's layer rules registered with Opacus, for people who use Opacus's own ``GradSampleModule`` /
``PrivacyEngine`` on eqlightning models (the ``DifferentialPrivacy`` callback does not need this: its engine asks
each layer for its ``per_sample_gradients`` directly)."""

from __future__ import annotations

from opacus.grad_sample import register_grad_sampler

from ..nn import EquivariantConv2d, EquivariantConv3d, EquivariantDepthwiseConv2d, FieldGroupNorm, FourierFieldNorm


def _layer_rule(layer, activations, backprops) -> dict:
    return layer.per_sample_gradients(tuple(activations), backprops)  # Opacus passes sum-reduced backprops


for _layer in (EquivariantConv2d, EquivariantConv3d, EquivariantDepthwiseConv2d, FieldGroupNorm, FourierFieldNorm):
    register_grad_sampler(_layer)(_layer_rule)
