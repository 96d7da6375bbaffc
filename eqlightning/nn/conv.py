"""Equivariant 2D and 3D convolutions on plain tensors, parametrised by escnn's steerable basis coefficients."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .basis import ConvBasis, conv_basis
from .module import EquivariantModule
from .persample import fp32_compute


class SteerableConv(EquivariantModule):
    r"""G-steerable convolution between fields of ``in_type`` and ``out_type``: the shared implementation of
    :class:`EquivariantConv2d` (images, C_N / D_N) and :class:`EquivariantConv3d` (volumes, O / Oh / SO3 / O3).
    Subclasses set the torch convolution (``_conv``, ``_plain``) and the per-sample filter gradient; the contract
    (coefficients ``weight``, ``expand``/``export``, per-sample gradients, forward routing) is documented on
    :class:`EquivariantConv2d`.
    """

    _dims = 2
    _conv = staticmethod(F.conv2d)
    _plain = nn.Conv2d

    def __init__(self, in_type, out_type, kernel_size: int, stride: int = 1, padding: int | None = None,
                 dilation: int = 1, bias: bool = True, sigma=None, frequencies_cutoff=None, rings=None,
                 maximum_offset=None):
        super().__init__(in_type, out_type)
        if self.dims != self._dims:
            raise ValueError(f"{type(self).__name__} convolves {self._dims}D fields, got {self.dims}D field types "
                             f"(use EquivariantConv{self.dims}d)")
        self.kernel_size, self.stride, self.dilation = int(kernel_size), int(stride), int(dilation)
        self.padding = dilation * (self.kernel_size - 1) // 2 if padding is None else int(padding)
        self._basis_kwargs = dict(sigma=sigma, frequencies_cutoff=frequencies_cutoff, rings=rings,
                                  maximum_offset=maximum_offset)
        basis = self.basis
        self.weight = nn.Parameter(torch.empty(basis.dim))
        self.bias = nn.Parameter(torch.zeros(basis.bias_dim)) if bias and basis.bias_dim > 0 else None
        self._eval_cache = None
        self._routed_forward = None
        self.reset_parameters()

    @property
    def basis(self) -> ConvBasis:
        """The shared basis (looked up in the per-process cache, so pickles and copies stay light)."""
        return conv_basis(self._in_recipe, self._out_recipe, self.kernel_size, self.dilation, **self._basis_kwargs)

    def reset_parameters(self) -> None:
        """escnn's generalized He initialisation of the coefficients; zero bias."""
        with torch.no_grad():
            std = self.basis.init_std().to(self.weight)
            self.weight.copy_(std * torch.randn_like(self.weight))
            if self.bias is not None:
                self.bias.zero_()

    def expand(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The expanded ``(out, in, *kernel)`` filter and ``(out,)`` bias, computed in the parameters' dtype.

        Autocast is disabled here so that bf16/fp16 mixed precision only affects the convolution itself.
        """
        with torch.autocast(self.weight.device.type, enabled=False):
            basis = self.basis
            filt = basis.expand(self.weight)
            bias = None if self.bias is None else basis.expand_bias(self.bias)
        return filt, bias

    def _cached_expand(self):
        key = (self.weight._version, self.weight.data_ptr(), self.weight.device, self.weight.dtype,
               None if self.bias is None else (self.bias._version, self.bias.data_ptr()))
        if self._eval_cache is None or self._eval_cache[0] != key:
            self._eval_cache = (key, self.expand())
        return self._eval_cache[1]

    def train(self, mode: bool = True):
        self._eval_cache = None
        return super().train(mode)

    def route_training_forward(self, forward=None):
        """Run training forwards (training mode, grad enabled) through ``forward(layer, x)`` instead of the
        default; ``None`` restores the default. Returns the previous routing.

        Part of the per-sample gradient contract (:mod:`eqlightning.nn.persample`): ``forward`` must return
        exactly what the default forward returns (a mechanism uses it to run the convolution through its own
        autograd function). Not saved with the module's state.
        """
        previous, self._routed_forward = self._routed_forward, forward
        return previous

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._check_input(x)
        if self._routed_forward is not None and self.training and torch.is_grad_enabled():
            return self._routed_forward(self, x)
        if not self.training and not torch.is_grad_enabled():
            filt, bias = self._cached_expand()
        else:
            filt, bias = self.expand()
        return self._conv(x, filt, bias, self.stride, self.padding, self.dilation)

    def export(self) -> nn.Module:
        """A ``torch.nn.Conv2d`` (``Conv3d``) with the expanded filter (identical outputs)."""
        filt, bias = (t.detach() if t is not None else None for t in self.expand())
        conv = self._plain(self._in_recipe.size, self._out_recipe.size, self.kernel_size, self.stride, self.padding,
                         self.dilation, bias=bias is not None, device=filt.device, dtype=filt.dtype)
        with torch.no_grad():
            conv.weight.copy_(filt)
            if bias is not None:
                conv.bias.copy_(bias)
        return conv

    def __getstate__(self):
        state = super().__getstate__() if hasattr(super(), "__getstate__") else self.__dict__.copy()
        state = dict(state)
        state["_eval_cache"] = None
        state["_routed_forward"] = None
        return state


    def per_sample_gradients(self, inputs, grad_output: torch.Tensor) -> dict:
        """Exact per-sample gradients (the contract of :mod:`eqlightning.nn.persample`). The filter is linear in
        the coefficients (``W = B w``), so ``dL/dw_n = B^T dL/dW_n``: per-sample filter gradients mapped back onto
        the basis coefficients with :meth:`ConvBasis.project`."""
        result = {}
        with fp32_compute(inputs[0], grad_output) as (x, g):
            if self.weight.requires_grad:
                filt = self.per_sample_filter_gradients(x, g.to(x.dtype))
                result[self.weight] = self.basis.project(filt).to(self.weight.dtype)  # (N, dim)
            if self.bias is not None and self.bias.requires_grad:
                spatial = tuple(range(2, g.dim()))
                result[self.bias] = self.basis.project_bias(g.sum(dim=spatial).to(x.dtype)).to(self.bias.dtype)
        return result

    def extra_repr(self) -> str:
        group = self.in_type.gspace.fibergroup.name
        return (f"{group}: {len(self._in_recipe.reprs)} -> {len(self._out_recipe.reprs)} fields "
                f"({self._in_recipe.size} -> {self._out_recipe.size} channels), kernel_size={self.kernel_size}, "
                f"stride={self.stride}, padding={self.padding}, coefficients={self.weight.numel()}")


class EquivariantConv2d(SteerableConv):
    r"""G-steerable convolution of images between fields of ``in_type`` and ``out_type`` (C_N or D_N, any N).

    The filter is ``W = B(w)``: a linear expansion of the trainable coefficients ``weight`` in escnn's basis of
    equivariant kernels, so that ``conv(rho_in(g) x) = rho_out(g) conv(x)`` for all rotations/reflections ``g`` of the
    group (exactly for those that map the pixel grid onto itself; up to discretisation for e.g. 45 degrees). The bias
    has one coefficient per trivial irrep of the output fields (one per regular or trivial field).

    Same numbers as ``escnn.nn.R2Conv`` with the same coefficients (same coefficient layout), but it takes and
    returns ``torch.Tensor`` s, holds no buffers, and works with Opacus, ``torch.func`` and DDP.

    .. warning:: In eval mode under ``torch.no_grad()`` the expanded filter is cached and reused until the
       coefficients change (tracked through their version counter) or the layer goes back to training mode.

    Args:
        in_type, out_type: escnn field types of one gspace (regular / trivial fields or their restrictions).
        kernel_size: odd sizes keep the kernel centred (required for exact rot90/flip equivariance).
        stride, padding, dilation: as ``torch.nn.Conv2d``; ``padding=None`` keeps the size ("same") at stride 1.
        bias: learn an equivariant bias.
        sigma, frequencies_cutoff, rings, maximum_offset: escnn's basis parameters (defaults as ``R2Conv``).
    """

    def per_sample_filter_gradients(self, x: torch.Tensor, grad_output: torch.Tensor) -> torch.Tensor:
        """``(N, out, in, k, k)``: each sample's gradient with respect to the expanded filter (unfold + batched
        matmul), for the layer's input ``x`` and the gradient of a sum-reduced loss w.r.t. its output."""
        n, k = x.shape[0], self.kernel_size
        cols = F.unfold(x, k, dilation=self.dilation, padding=self.padding, stride=self.stride)  # (N, in*k*k, L)
        grads = torch.bmm(grad_output.reshape(n, grad_output.shape[1], -1), cols.transpose(1, 2))
        return grads.view(n, grad_output.shape[1], x.shape[1], k, k)


class EquivariantConv3d(SteerableConv):
    r"""G-steerable convolution of volumes ``(N, C, D, H, W)`` between 3D fields (groups O, Oh, SO3, O3, C1; see
    :mod:`eqlightning.nn.groups3d`), on escnn's ``R3Conv`` bases.

    Same contract as :class:`EquivariantConv2d`: ``weight`` holds the basis coefficients, the filter is expanded on
    the fly (cached in eval under ``no_grad``), the layer exports to a plain ``torch.nn.Conv3d`` and has exact
    per-sample gradients. Octahedral layers are exact for all 24 (48) grid rotations (reflections) at any size;
    the basis is averaged over them after sampling, so float32 sampling noise does not break that. SO3/O3 layers
    are exact for those grid elements too and approximately equivariant for other rotations.

    Args:
        in_type, out_type: escnn 3D field types of one gspace (see :func:`eqlightning.nn.groups3d.field_type3d`).
        kernel_size: odd, so the kernel is centred.
        stride, padding, dilation: as ``torch.nn.Conv3d``; ``padding=None`` keeps the size at stride 1.
        bias: learn an equivariant bias (one coefficient per trivial irrep of the output fields).
        sigma, frequencies_cutoff, rings: escnn's ``R3Conv`` basis parameters.
    """

    _dims = 3
    _conv = staticmethod(F.conv3d)
    _plain = nn.Conv3d

    def __init__(self, in_type, out_type, kernel_size: int, stride: int = 1, padding: int | None = None,
                 dilation: int = 1, bias: bool = True, sigma=None, frequencies_cutoff=None, rings=None):
        super().__init__(in_type, out_type, kernel_size, stride, padding, dilation, bias, sigma, frequencies_cutoff,
                         rings)

    def per_sample_filter_gradients(self, x: torch.Tensor, grad_output: torch.Tensor) -> torch.Tensor:
        """``(N, out, in, k, k, k)``: each sample's filter gradient, as one weight-gradient convolution grouped
        over the batch (the samples become groups, so no sample's gradient mixes with another's)."""
        n, c_in, c_out, k = x.shape[0], x.shape[1], grad_output.shape[1], self.kernel_size
        grads = torch.nn.grad.conv3d_weight(
            x.reshape(1, n * c_in, *x.shape[2:]), (n * c_out, c_in, k, k, k),
            grad_output.reshape(1, n * c_out, *grad_output.shape[2:]), self.stride, self.padding, self.dilation,
            groups=n)
        return grads.view(n, c_out, c_in, k, k, k)
