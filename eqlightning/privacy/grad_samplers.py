"""Exact per-sample gradient rules for eqlightning's layers, registered with Opacus's hooks mode.

Each rule gets the layer's input ``activations[0]`` and the gradient of the loss with respect to the layer's output
``backprops`` for the whole batch, and returns one gradient per sample and parameter. They compute in fp32 (inputs
may be bf16/fp16 under mixed precision) and return the parameters' dtype.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
import torch.nn.functional as F
from opacus.grad_sample import register_grad_sampler

from ..models.plain.vit import TokenEmbedding
from ..nn import EquivariantConv2d, FieldGroupNorm
from .fused import promote_fp32, take_fused_grad_sample


@contextmanager
def _fp32(*tensors: torch.Tensor):
    """Autocast off; bf16/fp16 inputs promoted to fp32 (fp32 and fp64 stay as they are)."""
    device = tensors[0].device.type
    with torch.autocast(device, enabled=False):
        yield [promote_fp32(t) for t in tensors]


def conv_filter_grad_sample(layer: EquivariantConv2d, x: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """Per-sample gradient w.r.t. the expanded filter, ``(N, out, in, k, k)``, by unfold + batched matmul."""
    n, k = x.shape[0], layer.kernel_size
    cols = F.unfold(x, k, dilation=layer.dilation, padding=layer.padding, stride=layer.stride)  # (N, in*k*k, L)
    grads = torch.bmm(g.reshape(n, g.shape[1], -1), cols.transpose(1, 2))  # (N, out, in*k*k)
    return grads.view(n, g.shape[1], x.shape[1], k, k)


@register_grad_sampler(EquivariantConv2d)
def equivariant_conv_grad_sample(layer: EquivariantConv2d, activations, backprops) -> dict:
    """The filter is linear in the coefficients (``W = B w``), so ``dL/dw_n = B^T dL/dW_n``: per-sample filter
    gradients mapped back onto the basis coefficients with :meth:`ConvBasis.project`. In the fused mode the
    layer's backward has already computed them (see :mod:`eqlightning.privacy.fused`)."""
    fused = take_fused_grad_sample(layer, activations[0], backprops.shape[0])  # Opacus scaled backprops by N
    if fused is not None:
        return fused
    result = {}
    with _fp32(activations[0], backprops) as (x, g):
        if layer.weight.requires_grad:
            filt = conv_filter_grad_sample(layer, x, g)
            result[layer.weight] = layer.basis.project(filt).to(layer.weight.dtype)  # (N, dim)
        if layer.bias is not None and layer.bias.requires_grad:
            result[layer.bias] = layer.basis.project_bias(g.sum(dim=(2, 3))).to(layer.bias.dtype)  # (N, bias_dim)
    return result


@register_grad_sampler(FieldGroupNorm)
def field_group_norm_grad_sample(layer: FieldGroupNorm, activations, backprops) -> dict:
    """Closed form: per-channel sums of ``g * x_hat`` (weight) and ``g`` (bias), summed within each field.

    (Recomputing ``x_hat`` with ``group_norm`` is faster on CPU than ``rstd * (sum g x - mean * sum g)`` from
    ``var_mean``, measured at batch 64-256 on 7-28 px maps.)
    """
    result = {}
    if not layer.affine:
        return result
    with _fp32(activations[0], backprops) as (x, g):
        n = x.shape[0]
        shape = (n, layer.num_fields, layer.field_size)
        if layer.weight.requires_grad:
            x_hat = F.group_norm(x, layer.num_groups, eps=layer.eps)
            result[layer.weight] = (x_hat * g).sum(dim=(2, 3)).view(shape).sum(2).to(layer.weight.dtype)
        if layer.bias.requires_grad:
            result[layer.bias] = g.sum(dim=(2, 3)).view(shape).sum(2).to(layer.bias.dtype)
    return result


@register_grad_sampler(TokenEmbedding)
def token_embedding_grad_sample(layer: TokenEmbedding, activations, backprops) -> dict:
    """The class token and position embedding are added per sample: their gradients are slices of ``backprops``."""
    result = {}
    g = backprops  # (N, T + 1, dim)
    if layer.cls_token.requires_grad:
        result[layer.cls_token] = g[:, :1].unsqueeze(1).to(layer.cls_token.dtype)  # (N, 1, 1, dim)
    if layer.pos_embed.requires_grad:
        result[layer.pos_embed] = g.unsqueeze(1).to(layer.pos_embed.dtype)  # (N, 1, T + 1, dim)
    return result
