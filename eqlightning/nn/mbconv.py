"""The two layers an equivariant MBConv block needs beyond ordinary equivariant convolutions: a per-field
(depthwise) steerable convolution and a squeeze-excitation gate computed from invariant features."""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn

from .activation import make_activation
from .basis import ConvBasis, conv_basis
from .fields import FieldTypeRecipe, check_pointwise, field_sizes
from .module import EquivariantModule
from .persample import fp32_compute


class EquivariantDepthwiseConv2d(EquivariantModule):
    r"""Depthwise G-steerable convolution: every field is convolved with its own filter and maps only to itself.

    All ``F`` fields share one representation ``rho`` (of size ``s``, e.g. regular fields). Field ``f`` has its own
    coefficient vector ``w_f`` in escnn's basis ``B`` of equivariant ``k x k`` kernels from one ``rho`` field to one
    ``rho`` field, so ``weight`` is ``(F, d)`` and field ``f``'s ``(s, s, k, k)`` filter is ``W_f = B(w_f)``. The
    filters are stacked to ``(F * s, s, k, k)`` and applied with ``F.conv2d(..., groups=F)``: a block-diagonal
    convolution whose blocks are each equivariant, ``W_f(rho(g) x_f) = rho(g) W_f(x_f)``, so the layer is too (exactly
    for the rotations/flips that map the pixel grid onto itself; up to discretisation for e.g. 45 degrees). This is the
    depthwise convolution of MobileNet/EfficientNet with a field (``|G|`` channels for regular fields) in place of a
    channel: a plain depthwise filter on one channel of a regular field would not be equivariant, as a rotation moves
    the signal to the field's other channels. The optional bias has one coefficient per trivial irrep of each field
    (one per regular field).

    The basis is the shared per-process one of :func:`~eqlightning.nn.conv_basis` for (one field -> one field), so no
    layer samples escnn's basis itself. Initialisation is escnn's generalized He for that basis (each output field
    has exactly one input field). Like :class:`~eqlightning.nn.EquivariantConv2d` it takes and returns
    ``torch.Tensor`` s, holds no buffers, expands in the parameters' dtype with autocast off, caches the expanded
    filter in eval mode under ``torch.no_grad()`` until the coefficients change, exports to an ``nn.Conv2d`` with
    ``groups=F``, and has an exact per-sample gradient rule (:meth:`per_sample_gradients`).

    Args:
        in_type: escnn field type (or recipe) whose fields all have one representation; the output type is the same.
        kernel_size: odd sizes keep the kernel centred (required for exact rot90/flip equivariance).
        stride, padding, dilation: as ``torch.nn.Conv2d``; ``padding=None`` keeps the size ("same") at stride 1.
        bias: learn an equivariant bias.
        sigma, frequencies_cutoff, rings, maximum_offset: escnn's basis parameters (defaults as ``R2Conv``).
    """

    def __init__(self, in_type, kernel_size: int, stride: int = 1, padding: int | None = None, dilation: int = 1,
                 bias: bool = False, sigma=None, frequencies_cutoff=None, rings=None, maximum_offset=None):
        super().__init__(in_type)
        reprs = self._in_recipe.reprs
        if len(set(reprs)) != 1:
            names = sorted({r.name for r in reprs})
            raise ValueError(
                f"EquivariantDepthwiseConv2d maps every field to itself, so all fields need one representation; got "
                f"{len(set(reprs))} kinds ({', '.join(names)}). Use fields of one kind (e.g. field_type(group, "
                "'regular', n)), or EquivariantConv2d for mixed fields"
            )
        self.num_fields, self.field_size = len(reprs), reprs[0].size
        self._field_recipe = FieldTypeRecipe(self._in_recipe.sg_id, self._in_recipe.maximum_frequency, (reprs[0],))
        self.kernel_size, self.stride, self.dilation = int(kernel_size), int(stride), int(dilation)
        self.padding = dilation * (self.kernel_size - 1) // 2 if padding is None else int(padding)
        self._basis_kwargs = dict(sigma=sigma, frequencies_cutoff=frequencies_cutoff, rings=rings,
                                  maximum_offset=maximum_offset)
        basis = self.basis
        self.weight = nn.Parameter(torch.empty(self.num_fields, basis.dim))
        self.bias = nn.Parameter(torch.zeros(self.num_fields, basis.bias_dim)) if bias and basis.bias_dim > 0 \
            else None
        self._eval_cache = None
        self.reset_parameters()

    @property
    def basis(self) -> ConvBasis:
        """The shared (one field -> one field) basis, looked up in the per-process cache."""
        return conv_basis(self._field_recipe, self._field_recipe, self.kernel_size, self.dilation, **self._basis_kwargs)

    def reset_parameters(self) -> None:
        """escnn's generalized He initialisation of every field's coefficients; zero bias."""
        with torch.no_grad():
            std = self.basis.init_std().to(self.weight)  # (d,)
            self.weight.copy_(std * torch.randn_like(self.weight))
            if self.bias is not None:
                self.bias.zero_()

    def expand(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The expanded ``(F * s, s, k, k)`` filter and ``(F * s,)`` bias, computed in the parameters' dtype.

        ``W[f] = sum_d weight[f, d] B[d]``: one matrix product for all fields. Autocast is disabled here so that
        bf16/fp16 mixed precision only affects the convolution itself.
        """
        with torch.autocast(self.weight.device.type, enabled=False):
            t = self.basis.tensors(self.weight.device, self.weight.dtype)
            (base,) = t["bases"]  # (d, s*s*k*k): one block, (out channel, in channel, y, x) order
            s, k = self.field_size, self.kernel_size
            filt = (self.weight @ base).view(self.num_fields * s, s, k, k)
            bias = None if self.bias is None else (self.bias @ t["bias"].T).reshape(-1)  # (F, s) -> (F*s,)
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

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._check_input(x)
        if not self.training and not torch.is_grad_enabled():
            filt, bias = self._cached_expand()
        else:
            filt, bias = self.expand()
        return F.conv2d(x, filt, bias, self.stride, self.padding, self.dilation, groups=self.num_fields)

    def export(self) -> nn.Conv2d:
        """A depthwise-by-field ``torch.nn.Conv2d`` (``groups=F``) with the expanded filter (identical outputs)."""
        filt, bias = (t.detach() if t is not None else None for t in self.expand())
        c = self._in_recipe.size
        conv = nn.Conv2d(c, c, self.kernel_size, self.stride, self.padding, self.dilation, groups=self.num_fields,
                         bias=bias is not None, device=filt.device, dtype=filt.dtype)
        with torch.no_grad():
            conv.weight.copy_(filt)
            if bias is not None:
                conv.bias.copy_(bias)
        return conv

    def __getstate__(self):
        state = super().__getstate__() if hasattr(super(), "__getstate__") else self.__dict__.copy()
        state = dict(state)
        state["_eval_cache"] = None
        return state

    def per_sample_filter_gradients(self, x: torch.Tensor, grad_output: torch.Tensor) -> torch.Tensor:
        """``(N, F, s, s, k, k)``: each sample's gradient with respect to each field's expanded filter.

        ``G[n, f, o, i, u, v] = sum_p grad_output[n, (f, o), p] * x[n, (f, i), p + (u, v)]``: the input is unfolded
        into ``k x k`` patches ``(N, F, s*k*k, L)`` and multiplied with the output gradient ``(N, F, s, L)`` in one
        batched matmul over samples and fields (the grouped convolution's weight gradient, kept per sample).
        """
        n, f, s, k = x.shape[0], self.num_fields, self.field_size, self.kernel_size
        cols = F.unfold(x, k, dilation=self.dilation, padding=self.padding, stride=self.stride)  # (N, F*s*k*k, L)
        cols = cols.view(n, f, s * k * k, cols.shape[-1])
        grads = torch.matmul(grad_output.reshape(n, f, s, -1), cols.transpose(-1, -2))  # (N, F, s, s*k*k)
        return grads.view(n, f, s, s, k, k)

    def per_sample_gradients(self, inputs, grad_output: torch.Tensor) -> dict:
        """Exact per-sample gradients (the contract of :mod:`eqlightning.nn.persample`). Each field's filter is
        linear in its own coefficients (``W_f = B w_f``), so ``dL/dw_{n,f} = B^T dL/dW_{n,f}``: every sample's and
        field's filter gradient mapped back onto the basis with :meth:`ConvBasis.project` (the adjoint of the
        expansion); the bias likewise with :meth:`ConvBasis.project_bias`. Computed in fp32 under autocast."""
        result = {}
        with fp32_compute(inputs[0], grad_output) as (x, g):
            g = g.to(x.dtype)
            n, f, s = x.shape[0], self.num_fields, self.field_size
            if self.weight.requires_grad:
                filt = self.per_sample_filter_gradients(x, g)  # (N, F, s, s, k, k)
                coeff = self.basis.project(filt.reshape(n * f, s, s, self.kernel_size, self.kernel_size))
                result[self.weight] = coeff.view(n, f, -1).to(self.weight.dtype)  # (N, F, d)
            if self.bias is not None and self.bias.requires_grad:
                channel_sums = g.sum(dim=(2, 3)).view(n, f, s)  # (N, F, s)
                result[self.bias] = self.basis.project_bias(channel_sums).to(self.bias.dtype)  # (N, F, bias_dim)
        return result

    def extra_repr(self) -> str:
        group = self.in_type.gspace.fibergroup.name
        return (f"{group}: {self.num_fields} fields of {self.field_size} channels, depthwise, "
                f"kernel_size={self.kernel_size}, stride={self.stride}, padding={self.padding}, "
                f"coefficients={self.weight.numel()}")


class FieldGate(nn.Module):
    r"""Plain-module form of :class:`FieldSqueezeExcitation` (what it exports to): no escnn types.

    ``z[n, f]`` = mean of field ``f`` of sample ``n`` over its channels and pixels; ``gate = sigmoid(W_2 act(W_1 z +
    b_1) + b_2)`` with ``W_1: F -> r``, ``W_2: r -> F``; every channel of field ``f`` is multiplied by ``gate[n, f]``.
    """

    def __init__(self, sizes: list[int], reduced: int, activation: str = "silu"):
        super().__init__()
        self.sizes, self.activation = [int(s) for s in sizes], activation
        self.reduce = nn.Linear(len(self.sizes), reduced)
        self.act = make_activation(activation)
        self.expand = nn.Linear(reduced, len(self.sizes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, c, h, w = x.shape
        f = len(self.sizes)
        if len(set(self.sizes)) == 1:
            fields = x.reshape(n, f, self.sizes[0] * h * w)  # (N, F, s*H*W)
            gate = torch.sigmoid(self.expand(self.act(self.reduce(fields.mean(dim=2)))))  # (N, F)
            return (fields * gate.unsqueeze(2)).reshape(n, c, h, w)
        squeezed = torch.stack([part.mean(dim=(1, 2, 3)) for part in torch.split(x, self.sizes, dim=1)], dim=1)
        gate = torch.sigmoid(self.expand(self.act(self.reduce(squeezed))))  # (N, F)
        repeats = torch.tensor(self.sizes, device=x.device)
        return x * gate.repeat_interleave(repeats, dim=1, output_size=c)[:, :, None, None]

    def extra_repr(self) -> str:
        return f"{len(self.sizes)} fields, {self.activation}"


class FieldSqueezeExcitation(EquivariantModule):
    r"""Squeeze-and-excitation (Hu et al. 2018) on fields: one gate per field, computed from invariant features.

    Per sample, each field is squeezed to one number, its mean over its channels and over all pixels. A rotation or
    flip ``g`` permutes a regular (or trivial) field's channels and moves its pixels over a grid that maps onto
    itself, so that mean is invariant. The ``F`` invariants go through ``Linear(F, r) -> act -> Linear(r, F) ->
    sigmoid``, and every channel of field ``f`` is multiplied by gate ``f``. The gates are invariant and a scalar
    commutes with ``rho(g)``, so ``SE(rho(g) x) = rho(g) SE(x)``. (EfficientNet's per-channel gate is not
    equivariant: a rotation moves a field's signal across channels with different gates.)

    The computation is a plain :class:`FieldGate` (``self.gate``), which is what :meth:`export` returns; its
    parameters live in two ``nn.Linear`` on ``(N, F)`` inputs, for which every per-sample gradient mechanism has an
    exact rule (Opacus's ``Linear`` rule, or ``torch.func``).

    Args:
        in_type: fields whose representation permutes channels (regular / trivial, or their restrictions).
        reduced_fields: the width ``r`` of the bottleneck (EfficientNet: a quarter of the block's input).
        activation: between the two linear maps (``silu`` as EfficientNet, ``relu``, ...).
    """

    def __init__(self, in_type, reduced_fields: int, activation: str = "silu"):
        super().__init__(in_type)
        check_pointwise(self.in_type, "FieldSqueezeExcitation")
        if isinstance(reduced_fields, bool) or not isinstance(reduced_fields, int) or reduced_fields < 1:
            raise ValueError(f"FieldSqueezeExcitation: reduced_fields must be an int >= 1 (the bottleneck width), "
                             f"got {reduced_fields!r}")
        self.gate = FieldGate(field_sizes(self.in_type), reduced_fields, activation)

    @property
    def num_fields(self) -> int:
        return len(self.gate.sizes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._check_input(x)
        return self.gate(x)

    def export(self) -> FieldGate:
        """A copy of the plain gate (identical outputs, its own parameters)."""
        return copy.deepcopy(self.gate)

    def extra_repr(self) -> str:
        return f"{self.num_fields} -> {self.gate.reduce.out_features} -> {self.num_fields} fields"
