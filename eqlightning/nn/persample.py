"""The contract between layers and per-sample gradient mechanisms (:mod:`eqlightning.privacy`).

DP-SGD needs each sample's gradient of every trainable parameter. A mechanism gets them for any layer with
``torch.func`` (slow but general); a layer can offer an exact, faster rule by implementing one method:

    per_sample_gradients(inputs: tuple[Tensor, ...], grad_output: Tensor) -> dict[nn.Parameter, Tensor]

``inputs`` are the layer's forward inputs and ``grad_output`` the gradient of a **sum**-reduced loss with respect
to its output, for a batch of N samples (batch first). The result maps each trainable parameter of the layer (not
of its children) to an ``(N, *param.shape)`` tensor: sample n's gradient. Rules compute in at least float32 (inputs
may be bf16/fp16 under mixed precision, see :func:`fp32_compute`) and return the parameter's dtype. Layers implement
it without importing anything from ``eqlightning.privacy``: :class:`~eqlightning.nn.EquivariantConv2d`,
:class:`~eqlightning.nn.EquivariantDepthwiseConv2d`, :class:`~eqlightning.nn.FieldGroupNorm` and the ViT's
``TokenEmbedding`` do.

An equivariant convolution also exposes what a mechanism needs to compute its per-sample gradients in its own way:
its :class:`~eqlightning.nn.ConvBasis` (``layer.basis``: ``expand``/``project`` and their bias twins, the basis
``blocks`` with their field groups and grid ``symmetries``, ``channels_grouped``), its geometry (``kernel_size``,
``stride``, ``padding``, ``dilation``) and :meth:`~eqlightning.nn.EquivariantConv2d.route_training_forward`, which
lets a mechanism run the layer's training forward through its own autograd function (the ``fused`` mechanism
computes per-sample gradients inside the convolution's backward that way).
"""

from __future__ import annotations

from contextlib import contextmanager

import torch


def has_per_sample_rule(module: torch.nn.Module) -> bool:
    """Whether ``module`` implements the ``per_sample_gradients`` contract."""
    return callable(getattr(module, "per_sample_gradients", None))


def promote_fp32(t):
    """bf16/fp16 tensors as fp32; anything else (fp32, fp64, integer tensors, non-tensors) unchanged."""
    return t.float() if isinstance(t, torch.Tensor) and t.dtype in (torch.float16, torch.bfloat16) else t


@contextmanager
def fp32_compute(*tensors: torch.Tensor):
    """Autocast off, and bf16/fp16 ``tensors`` promoted to fp32 (fp32 and fp64 stay as they are)."""
    device = tensors[0].device.type
    with torch.autocast(device, enabled=False):
        yield [promote_fp32(t) for t in tensors]
