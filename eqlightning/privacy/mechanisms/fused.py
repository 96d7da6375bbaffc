"""``fused`` (the default): equivariant convolutions compute per-sample gradients inside their own backward.

With per-layer rules, autograd computes the usual summed weight gradient (a full weight-gradient convolution) and
the rule then computes every sample's gradient again. Here the convolution's training forward runs through one
autograd function (:meth:`EquivariantConv2d.route_training_forward`) whose backward computes the input gradient,
each sample's filter gradient and its projection onto the basis coefficients, delivers those per-sample gradients
to the engine, and returns their sum as the weight gradient: the summed weight-gradient convolution is never
computed. Every other layer (and a convolution whose input needs no gradient, the stem) uses the ``hooks`` rules.

Per-sample filter gradients come from the convolution weight-gradient kernel grouped over the batch where the
feature map is large, from unfold + batched matmul where it is small, and on the smallest maps (the wide last
stages) from orbit sums of the symmetric basis (:mod:`.orbit`), which skips most of the per-sample filter gradient.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ...nn import EquivariantConv2d, promote_fp32
from . import register_mechanism
from .base import Mechanism
from .hooks import best_rule
from .orbit import orbit_plan

#: output maps with at least this many pixels use the weight-gradient convolution grouped over the batch; from
#: SHIFTED_MIN_PIXELS up to that, one batched matmul per kernel offset on shifted views of the input; below, unfold
#: + bmm. Measured on a 2-core CPU at batch 64 (ms for a 3x3 conv, channels in = out):
#:   32 ch 28x28: grouped 21.8, shifted 34.4, unfold 67.1;  64 ch 14x14: grouped 30.0, shifted 18.4, unfold 20.5;
#:   128 ch 7x7: grouped 74.0, shifted 52.4, unfold 35.8 (and the orbit path, below, beats all three there).
GROUPED_MIN_PIXELS = 400
SHIFTED_MIN_PIXELS = 144
#: output maps with at most this many pixels use the orbit path where it applies (7x7 maps: 1.7x faster than
#: unfold + bmm on CPU; 14x14 maps: 1.8x slower)
ORBIT_MAX_PIXELS = 100


def per_sample_filter_grads(layer: EquivariantConv2d, x: torch.Tensor, gy: torch.Tensor) -> torch.Tensor:
    """``(N, out, in, k, k)``: each sample's gradient w.r.t. the expanded filter."""
    n, c_in = x.shape[:2]
    c_out, k = gy.shape[1], layer.kernel_size
    pixels = gy.shape[2] * gy.shape[3]
    if pixels >= GROUPED_MIN_PIXELS:
        grads = torch.nn.grad.conv2d_weight(
            x.reshape(1, n * c_in, *x.shape[2:]), (n * c_out, c_in, k, k), gy.reshape(1, n * c_out, *gy.shape[2:]),
            stride=layer.stride, padding=layer.padding, dilation=layer.dilation, groups=n)
        return grads.view(n, c_out, c_in, k, k)
    if pixels >= SHIFTED_MIN_PIXELS:
        return shifted_filter_grads(layer, x, gy)
    return layer.per_sample_filter_gradients(x, gy)


def shifted_filter_grads(layer: EquivariantConv2d, x: torch.Tensor, gy: torch.Tensor) -> torch.Tensor:
    """``(N, out, in, k, k)`` by one batched matmul per kernel offset: ``G[:, :, :, u, v] = gy @ x_uv^T`` with
    ``x_uv`` the (padded) input seen through offset ``(u, v)`` at the layer's stride and dilation. No unfolded
    copy of the input (k*k times its size) is made."""
    n, c_in = x.shape[:2]
    c_out, k, (h, w) = gy.shape[1], layer.kernel_size, gy.shape[2:]
    stride, dilation, pad = layer.stride, layer.dilation, layer.padding
    xp = F.pad(x, (pad, pad, pad, pad)) if pad else x
    g = gy.reshape(n, c_out, h * w)
    grads = x.new_empty(k, k, n, c_out, c_in)
    for u in range(k):
        for v in range(k):
            rows = slice(u * dilation, u * dilation + stride * (h - 1) + 1, stride)
            cols = slice(v * dilation, v * dilation + stride * (w - 1) + 1, stride)
            view = xp[:, :, rows, cols].reshape(n, c_in, h * w)
            torch.bmm(g, view.transpose(1, 2), out=grads[u, v])
    return grads.permute(2, 3, 4, 0, 1)


def per_sample_coefficient_grads(layer: EquivariantConv2d, x: torch.Tensor, gy: torch.Tensor) -> torch.Tensor:
    """``(N, dim)``: each sample's gradient w.r.t. the basis coefficients.

    On small maps with one kind of field in and out (the usual case), the filter gradients are computed directly
    in the layout of the projection, ``(N, in fields, out fields, out channels, in channels * k * k)``, by batching
    over input fields; this saves transposing the largest tensor of the backward pass.
    """
    basis = layer.basis
    n, pixels = x.shape[0], gy.shape[2] * gy.shape[3]
    if pixels <= ORBIT_MAX_PIXELS:
        plan = orbit_plan(layer, x)
        if plan is not None:
            return plan.coefficient_grads(layer, x, gy)
    if pixels >= SHIFTED_MIN_PIXELS or len(basis.blocks) != 1 or not basis.channels_grouped:
        return basis.project(per_sample_filter_grads(layer, x, gy))
    (block,) = basis.blocks
    a, o, b, i, d = block.out_group.count, block.out_group.recipe.size, block.in_group.count, \
        block.in_group.recipe.size, block.dim
    kk = layer.kernel_size ** 2
    cols = F.unfold(x, layer.kernel_size, dilation=layer.dilation, padding=layer.padding, stride=layer.stride)
    cols = cols.view(n, b, i * kk, pixels)  # (N, b, i*k*k, L)
    grads = torch.matmul(gy.reshape(n, 1, a * o, pixels), cols.transpose(-1, -2))  # (N, b, a*o, i*k*k)
    base = basis.tensors(x.device, x.dtype)["bases"][0]  # (d, o*i*k*k)
    coeff = (grads.reshape(n * b * a, o * i * kk) @ base.T).view(n, b, a, d)
    return coeff.transpose(1, 2).reshape(n, a * b * d)  # escnn's order: output field major


class _FusedConv(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, layer, deliver):
        filt, expanded_bias = layer.expand()  # fp32 expansion (autocast off inside), autograd not recording
        ctx.layer, ctx.deliver = layer, deliver
        ctx.save_for_backward(x, filt)
        return F.conv2d(x, filt, expanded_bias, layer.stride, layer.padding, layer.dilation)

    @staticmethod
    def backward(ctx, gy):
        x, filt = ctx.saved_tensors
        layer = ctx.layer
        grad_x = None
        if ctx.needs_input_grad[0]:
            grad_x = torch.nn.grad.conv2d_input(x.shape, filt.to(gy.dtype), gy, layer.stride, layer.padding,
                                                layer.dilation)
        if x.shape[0] == 0:  # an empty Poisson batch
            ctx.deliver(layer, {p: p.new_zeros(0, *p.shape) for p in (layer.weight, layer.bias)
                                if p is not None and p.requires_grad}, 0)
            return grad_x, torch.zeros_like(layer.weight), None if layer.bias is None else \
                torch.zeros_like(layer.bias), None, None
        with torch.autocast(gy.device.type, enabled=False):
            xs, gs = promote_fp32(x), promote_fp32(gy)
            weight_samples = per_sample_coefficient_grads(layer, xs, gs.to(xs.dtype))  # (N, dim)
            bias_samples = None if layer.bias is None else layer.basis.project_bias(gs.sum(dim=(2, 3)).to(xs.dtype))
        grads = {}
        if layer.weight.requires_grad:
            grads[layer.weight] = weight_samples.to(layer.weight.dtype)
        if bias_samples is not None and layer.bias.requires_grad:
            grads[layer.bias] = bias_samples.to(layer.bias.dtype)
        ctx.deliver(layer, grads, x.shape[0])
        grad_w = weight_samples.sum(0).to(layer.weight.dtype)
        grad_b = None if bias_samples is None else bias_samples.sum(0).to(layer.bias.dtype)
        return grad_x, grad_w, grad_b, None, None


@register_mechanism("fused")
class Fused(Mechanism):
    """Equivariant convolutions deliver from their backward; everything else as ``hooks``."""

    def __init__(self):
        self._deliver = None
        self._last_fused: dict = {}  # layer -> the output of its last fused forward (until the engine asks)

    def attach(self, model: nn.Module, deliver) -> None:
        self._deliver = deliver
        for m in model.modules():
            if isinstance(m, EquivariantConv2d):
                m.route_training_forward(self._forward)

    def detach(self, model: nn.Module) -> None:
        for m in model.modules():
            if isinstance(m, EquivariantConv2d):
                m.route_training_forward(None)
        self._last_fused.clear()
        self._deliver = None

    def _forward(self, layer: EquivariantConv2d, x: torch.Tensor) -> torch.Tensor:
        if not x.requires_grad or not any(p.requires_grad for p in layer.parameters(recurse=False)):
            # the stem: its backward runs after nothing that needs it, and the engine's rule handles it;
            # a frozen layer (no trainable parameter): only its input gradient, no per-sample gradients
            filt, bias = layer.expand()
            return F.conv2d(x, filt, bias, layer.stride, layer.padding, layer.dilation)
        out = _FusedConv.apply(x, layer.weight, layer.bias, layer, self._deliver)
        self._last_fused[layer] = out
        return out

    def delivers(self, layer: nn.Module, output: torch.Tensor) -> bool:
        return self._last_fused.pop(layer, None) is output

    def rule(self, layer: nn.Module):
        return best_rule(layer)
