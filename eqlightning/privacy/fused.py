"""The fused per-sample gradient path for equivariant convolutions (``grad_sample_mode="fused"``).

With Opacus hooks, autograd computes the usual summed weight gradient (a full weight-gradient convolution) and the
hook then computes every sample's gradient again. Here the convolution runs through one autograd function whose
backward computes the input gradient, each sample's filter gradient and its projection onto the basis
coefficients, hands those per-sample gradients to Opacus (through the registered rule), and returns their sum as
the weight gradient, so the summed weight-gradient convolution is never computed. The result is exactly the same
per-sample gradients as the hooks rule (tested), with one weight-gradient pass fewer.

Per-sample filter gradients are computed with the convolution weight-gradient kernel grouped over the batch where
the feature map is large, and with unfold + batched matmul where it is small (the grouped kernel is slow there). On
the smallest maps (the wide last stages) the coefficient gradients come from orbit sums instead (see
:mod:`eqlightning.privacy.orbit`), which skips most of the per-sample filter gradient.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from opacus import GradSampleModule
from opacus.grad_sample.functorch import ft_compute_per_sample_gradient
from opacus.grad_sample.grad_sample_module import (_get_batch_size, create_or_accumulate_grad_sample,
                                                  promote_current_grad_sample)
from opacus.layers.dp_rnn import RNNLinear
from opacus.utils.module_utils import trainable_parameters

from ..nn import EquivariantConv2d
from .orbit import orbit_plan

#: output maps with at least this many pixels use the grouped weight-gradient kernel (measured on CPU, see
#: benchmarks/results); smaller ones use unfold + bmm
GROUPED_MIN_PIXELS = 144
#: output maps with at most this many pixels use the orbit path where it applies (7x7 maps: 1.7x faster than
#: unfold + bmm on CPU; 14x14 maps: 1.8x slower)
ORBIT_MAX_PIXELS = 100


def per_sample_filter_grads(layer: EquivariantConv2d, x: torch.Tensor, gy: torch.Tensor) -> torch.Tensor:
    """``(N, out, in, k, k)``: each sample's gradient w.r.t. the expanded filter."""
    n, c_in = x.shape[:2]
    c_out, k = gy.shape[1], layer.kernel_size
    if gy.shape[2] * gy.shape[3] >= GROUPED_MIN_PIXELS:
        grads = torch.nn.grad.conv2d_weight(
            x.reshape(1, n * c_in, *x.shape[2:]), (n * c_out, c_in, k, k), gy.reshape(1, n * c_out, *gy.shape[2:]),
            stride=layer.stride, padding=layer.padding, dilation=layer.dilation, groups=n)
        return grads.view(n, c_out, c_in, k, k)
    cols = F.unfold(x, k, dilation=layer.dilation, padding=layer.padding, stride=layer.stride)  # (N, in*k*k, L)
    return torch.bmm(gy.reshape(n, c_out, -1), cols.transpose(1, 2)).view(n, c_out, c_in, k, k)


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
    if pixels >= GROUPED_MIN_PIXELS or len(basis.blocks) != 1 or basis._in_order is not None \
            or basis._out_order is not None:
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
    def forward(ctx, x, weight, bias, layer):
        filt, expanded_bias = layer.expand()  # fp32 expansion (autocast off inside), autograd not recording
        ctx.layer = layer
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
        with torch.autocast(gy.device.type, enabled=False):
            xs, gs = promote_fp32(x), promote_fp32(gy)
            weight_samples = per_sample_coefficient_grads(layer, xs, gs.to(xs.dtype))  # (N, dim)
            bias_samples = None if layer.bias is None else layer.basis.project_bias(gs.sum(dim=(2, 3)))
        # Opacus's rule for this layer hands these over (per-sample gradients of a mean loss are N times these);
        # the input's identity makes sure they are only taken for this very forward
        layer._fused_grad_sample = (_identity(x), weight_samples, bias_samples)
        grad_w = weight_samples.sum(0).to(layer.weight.dtype)
        grad_b = None if bias_samples is None else bias_samples.sum(0).to(layer.bias.dtype)
        return grad_x, grad_w, grad_b, None


def promote_fp32(t):
    """bf16/fp16 tensors as fp32; anything else (fp32, fp64, integer tensors, non-tensors) unchanged."""
    return t.float() if isinstance(t, torch.Tensor) and t.dtype in (torch.float16, torch.bfloat16) else t


def _identity(x: torch.Tensor) -> tuple:
    return x.data_ptr(), x.shape, x.stride(), x._version


def fused_forward(layer: EquivariantConv2d, x: torch.Tensor) -> torch.Tensor:
    """Forward of an equivariant conv in training mode with the fused backward.

    Only where the input requires grad: otherwise (the stem) autograd fires Opacus's backward hook *before* the
    layer's backward, too early to take the per-sample gradients from it, and the layer's rule computes them.
    """
    layer._fused_grad_sample = None
    if not x.requires_grad:
        filt, bias = layer.expand()
        return F.conv2d(x, filt, bias, layer.stride, layer.padding, layer.dilation)
    return _FusedConv.apply(x, layer.weight, layer.bias, layer)


def enable_fused(module: torch.nn.Module, enabled: bool = True) -> int:
    """Route every EquivariantConv2d in ``module`` through the fused path (or back); returns how many."""
    count = 0
    for m in module.modules():
        if isinstance(m, EquivariantConv2d):
            m._training_forward = fused_forward if enabled else None
            m._fused_grad_sample = None
            count += 1
    return count


def take_fused_grad_sample(layer: EquivariantConv2d, x: torch.Tensor, scale: float) -> dict | None:
    """The per-sample gradients (times ``scale``) the fused backward of the forward on ``x`` left on ``layer``;
    None if there are none for that forward."""
    stash = getattr(layer, "_fused_grad_sample", None)
    if stash is None or stash[0] != _identity(x):
        return None
    layer._fused_grad_sample = None
    _, weight_samples, bias_samples = stash
    result = {}
    if layer.weight.requires_grad:
        result[layer.weight] = (weight_samples * scale).to(layer.weight.dtype)
    if bias_samples is not None and layer.bias.requires_grad:
        result[layer.bias] = (bias_samples * scale).to(layer.bias.dtype)
    return result


class PerSampleGradModule(GradSampleModule):
    """Opacus's ``GradSampleModule`` (hooks or functorch) with the fused path and two copies fewer per layer.

    * Fused equivariant convolutions hand over the per-sample gradients their backward computed (no rule runs).
    * For a mean-reduced loss Opacus multiplies every layer's output gradient by the batch size before the rule
      runs (a full pass over the largest activations of the backward); every rule is linear in that gradient, so
      this multiplies the much smaller per-sample gradients instead.
    * The first per-sample gradient of a parameter is kept as is instead of copied into a fresh zero tensor.
    * Under mixed precision every rule computes in fp32: Opacus's own rules would return fp16 per-sample gradients
      of the *scaled* loss, which overflow long before the summed gradient does.

    The per-sample gradients are the same as ``GradSampleModule``'s (tested against a per-example loop).
    """

    def capture_backprops_hook(self, module, _forward_input, forward_output, loss_reduction: str,
                               batch_first: bool):
        if not self.hooks_enabled:
            return
        if not batch_first or type(module) is RNNLinear:  # sequence-first layouts: Opacus's own path
            return super().capture_backprops_hook(module, _forward_input, forward_output, loss_reduction,
                                                  batch_first)
        if loss_reduction not in ("mean", "sum"):
            raise ValueError(f"loss_reduction must be 'mean' or 'sum', got {loss_reduction!r}")
        if not hasattr(module, "max_batch_len"):  # as Opacus: the largest batch among the pending forwards
            module.max_batch_len = _get_batch_size(module=module, batch_dim=0)
        batch = module.max_batch_len
        activations, backprops = self.rearrange_grad_samples(
            module=module, backprops=forward_output[0].detach(), loss_reduction="sum", batch_first=True)
        grad_samples = take_fused_grad_sample(module, activations[0], 1) \
            if isinstance(module, EquivariantConv2d) else None
        if grad_samples is None:
            if not self.force_functorch and self._get_module_type(module) in self.GRAD_SAMPLERS:
                rule = self.GRAD_SAMPLERS[self._get_module_type(module)]
            else:
                rule = ft_compute_per_sample_gradient
            with torch.autocast(backprops.device.type, enabled=False):  # every rule in fp32 (fp16 overflows)
                grad_samples = rule(module, [promote_fp32(a) for a in activations], promote_fp32(backprops))
        for param, sample in grad_samples.items():
            if loss_reduction == "mean":
                sample = sample * batch  # a new tensor: safe to keep
                if param.requires_grad and not hasattr(param, "_current_grad_sample") \
                        and sample.shape[0] == batch:
                    param._current_grad_sample = sample
                    continue
            create_or_accumulate_grad_sample(param=param, grad_sample=sample, max_batch_len=batch)
        for _, p in trainable_parameters(module):  # end of this layer's backward: as Opacus does
            p._forward_counter -= 1
            if p._forward_counter == 0:
                promote_current_grad_sample(p)
            if not self.grad_accumulation_allowed and isinstance(p.grad_sample, list) and len(p.grad_sample) > 1:
                raise ValueError("Poisson sampling is not compatible with gradient accumulation: call "
                                 "optimizer.step() after every forward/backward pass")
        if not module.activations:
            del module.max_batch_len  # the next batch may have another size
