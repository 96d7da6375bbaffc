"""2D CNNs made 3D with their 2D weights: ACS, 2.5D and I3D-inflated convolutions (MedMNIST v2's 3D baselines).

Yang et al., "Reinforcing 2D CNNs for 3D medical images" (ACSConv, IEEE JBHI 2021), as used by "MedMNIST v2"
(Scientific Data 10:41, 2023; ``experiments/MedMNIST3D``). :func:`convert_2d_to_3d` copies a 2D network and turns
every ``Conv2d`` with a ``k x k`` kernel ``W`` (out, in, k, k) into a convolution over volumes ``(N, C, D, H, W)``:

    "acs"   :class:`ACSConv`: the output channels are split into three groups (sizes :func:`acs_split`) whose kernels
            lie in the axial (1 x k x k: H, W), coronal (k x 1 x k: D, W) and sagittal (k x k x 1: D, H) planes;
            the three outputs are concatenated. Same parameters as the 2D conv.
    "2.5d"  ``Conv3d`` with kernel 1 x k x k: every depth slice convolved with the 2D filters (a slice-wise 2D CNN,
            except that strides and pools also subsample depth, as in MedMNIST v2).
    "i3d"   ``Conv3d`` with kernel k x k x k, ``W`` repeated along depth and divided by k (Carreira & Zisserman 2017):
            on a volume constant along depth it gives the 2D output on every slice away from the depth border.

Strides, paddings and dilations become the same in depth as in the plane (the 2D values must be square, except the
kernel and padding of "2.5d"); an unpadded 1 x 1 conv becomes a 1 x 1 x 1 ``Conv3d`` in each mode.
``BatchNorm2d``/``InstanceNorm2d``, ``Dropout2d`` and the max/average/adaptive pools become their 3D versions (pool
windows cubic); ``GroupNorm``, elementwise activations, ``Linear`` and the containers work unchanged. The weights (and
batch-norm statistics) are copied, so a 2D-trained network starts the 3D one.

Everything is plain ``torch.nn`` (ACSConv holds three ``Conv3d`` children, no parameters of its own, no buffers, no
in-place ops), so Opacus' per-sample gradient rules and ``torch.func`` apply exactly.
"""

from __future__ import annotations

import copy
from typing import Iterable

import torch
from torch import nn

from .resnet import BasicBlock, Bottleneck, ResNet

MODES = ("acs", "2.5d", "i3d")
VIEWS = ("axial", "coronal", "sagittal")  # kernel 1 x k x k, k x 1 x k, k x k x 1


def acs_split(out_channels: int) -> tuple[int, int, int]:
    """Output channels of the axial, coronal and sagittal views: as equal as possible, the first views larger
    (7 -> (3, 2, 2), 8 -> (3, 3, 2)), as in the ACSConv paper's code."""
    base, extra = divmod(out_channels, 3)
    return tuple(base + (view < extra) for view in range(3))


class ACSConv(nn.Module):
    r"""ACS convolution of volumes ``(N, C_in, D, H, W)``: a 2D ``k x k`` convolution whose output channels are
    split into three views, each convolving one plane of the volume.

    With ``(a, c, s) = split`` and 2D kernels ``W_o`` (in, k, k), output channel ``o`` is
    ``y_o = W_o * x`` with ``W_o`` placed as a ``1 x k x k`` kernel (axial: over H, W) for the first ``a`` channels,
    ``k x 1 x k`` (coronal: over D, W) for the next ``c``, ``k x k x 1`` (sagittal: over D, H) for the last ``s``;
    padding and dilation act only along the kernel's ``k``-sized sides, the stride along all three. Each view is a
    ``Conv3d`` child (``axial``, ``coronal``, ``sagittal``; ``None`` for an empty view) holding its slice of the
    weights and bias. The views' outputs have the same size only if ``2 * padding == dilation * (kernel_size - 1)``
    (or ``padding="same"``), which is checked.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, stride: int = 1,
                 padding: int | str = 0, dilation: int = 1, bias: bool = True, padding_mode: str = "zeros",
                 split: tuple[int, int, int] | None = None, device=None, dtype=None):
        super().__init__()
        k, d = kernel_size, dilation
        padding = 0 if padding == "valid" else padding
        if padding != "same" and 2 * padding != d * (k - 1):
            hint = f"use padding={d * (k - 1) // 2}" if d * (k - 1) % 2 == 0 else "use an odd kernel size"
            raise ValueError(f"ACSConv: the axial, coronal and sagittal views only give outputs of one size when "
                             f"2 * padding == dilation * (kernel_size - 1); got kernel_size={k}, padding={padding!r}, "
                             f"dilation={d}: {hint}")
        split = acs_split(out_channels) if split is None else tuple(int(c) for c in split)
        if len(split) != 3 or min(split) < 0 or sum(split) != out_channels:
            raise ValueError(f"ACSConv: split must be three channel counts >= 0 adding up to out_channels="
                             f"{out_channels}, got {split}")
        self.in_channels, self.out_channels, self.kernel_size, self.split = in_channels, out_channels, k, split
        self.stride, self.padding, self.dilation = stride, padding, dilation
        for axis, channels in enumerate(split):  # the view's kernel is flat (size 1) along `axis`
            conv = None
            if channels:
                pad = padding if padding == "same" else _flat(padding, axis, 0)
                conv = nn.Conv3d(in_channels, channels, _flat(k, axis, 1), stride=stride, padding=pad,
                                 dilation=_flat(d, axis, 1), bias=bias, padding_mode=padding_mode, device=device,
                                 dtype=dtype)
            self.register_module(VIEWS[axis], conv)

    def views(self) -> list[tuple[int, nn.Conv3d]]:
        """``(axis, conv)`` for each non-empty view: the axis (0 = D, 1 = H, 2 = W) its kernel is flat along."""
        return [(axis, getattr(self, name)) for axis, name in enumerate(VIEWS) if getattr(self, name) is not None]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([conv(x) for _, conv in self.views()], dim=1)  # (N, a + c + s, D', H', W')

    def weight2d(self) -> torch.Tensor:
        """The 2D kernels ``(out_channels, in_channels, k, k)`` of the three views, in output-channel order."""
        return torch.cat([conv.weight.squeeze(2 + axis) for axis, conv in self.views()], dim=0)

    @classmethod
    def from_conv2d(cls, conv: nn.Conv2d) -> "ACSConv":
        """An ACSConv with ``conv``'s kernels and bias split over the three views (square kernel, stride, padding
        and dilation; ``groups=1``)."""
        if conv.groups != 1:
            raise ValueError(f"ACS splits the output channels into three views, which a grouped convolution "
                             f"(groups={conv.groups}) does not allow; use mode '2.5d' or 'i3d' for it")
        k, s, d = (_square(getattr(conv, a), a) for a in ("kernel_size", "stride", "dilation"))
        p = conv.padding if isinstance(conv.padding, str) else _square(conv.padding, "padding")
        weight = conv.weight
        acs = cls(conv.in_channels, conv.out_channels, k, s, p, d, conv.bias is not None, conv.padding_mode,
                  device=weight.device, dtype=weight.dtype)
        with torch.no_grad():
            start = 0
            for axis, view in acs.views():
                stop = start + view.out_channels
                view.weight.copy_(weight[start:stop].unsqueeze(2 + axis))
                if conv.bias is not None:
                    view.bias.copy_(conv.bias[start:stop])
                start = stop
        return acs.train(conv.training)

    def extra_repr(self) -> str:
        return (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}, "
                f"padding={self.padding!r}, dilation={self.dilation}, split={self.split}")


def conv2d_to_3d(conv: nn.Conv2d, mode: str) -> nn.Module:
    """One ``Conv2d`` as an :class:`ACSConv` (``"acs"``) or a ``Conv3d`` (``"2.5d"``, ``"i3d"``), weights copied. An
    unpadded 1 x 1 conv becomes a 1 x 1 x 1 ``Conv3d`` in every mode (its three ACS views would be that same conv)."""
    mode = check_mode(mode)
    pointwise = tuple(conv.kernel_size) == (1, 1) and conv.padding in ((0, 0), "valid", "same")
    if mode == "acs" and not pointwise:
        return ACSConv.from_conv2d(conv)
    weight, stride = conv.weight, _square(conv.stride, "stride")
    if mode == "2.5d" or pointwise:
        kernel, dilation = (1, *conv.kernel_size), (1, *conv.dilation)
        padding = conv.padding if isinstance(conv.padding, str) else (0, *conv.padding)
        weight3d = weight.unsqueeze(2)  # (out, in, 1, kh, kw)
    else:
        k = _square(conv.kernel_size, "kernel_size")
        kernel, dilation = k, _square(conv.dilation, "dilation")
        padding = conv.padding if isinstance(conv.padding, str) else _square(conv.padding, "padding")
        weight3d = weight.unsqueeze(2).repeat(1, 1, k, 1, 1) / k  # (out, in, k, k, k): sums to W along depth
    conv3d = nn.Conv3d(conv.in_channels, conv.out_channels, kernel, stride=stride, padding=padding,
                       dilation=dilation, groups=conv.groups, bias=conv.bias is not None,
                       padding_mode=conv.padding_mode, device=weight.device, dtype=weight.dtype)
    with torch.no_grad():
        conv3d.weight.copy_(weight3d)
        if conv.bias is not None:
            conv3d.bias.copy_(conv.bias)
    return conv3d.train(conv.training)


def check_mode(mode: str) -> str:
    if mode not in MODES:
        raise ValueError(f"unknown 2D -> 3D conversion mode {mode!r}: use 'acs' (ACS convolutions), '2.5d' "
                         "(1 x k x k kernels, slice by slice) or 'i3d' (k x k x k kernels inflated from the 2D ones)")
    return mode


def _flat(value: int, axis: int, flat_value: int) -> tuple[int, int, int]:
    """``value`` along the three axes, except ``flat_value`` along ``axis``."""
    return tuple(flat_value if a == axis else value for a in range(3))


def _square(value, name: str) -> int:
    """The single value of an int or an ``(a, a)`` pair; a 2D setting with two different values has no natural
    depth counterpart."""
    values = set(value) if isinstance(value, (tuple, list)) else {value}
    if len(values) != 1 or not isinstance(next(iter(values)), int):
        raise ValueError(f"{name}={value!r}: converting to 3D needs the same {name} along both image axes "
                         "(its depth value would be ambiguous)")
    return next(iter(values))


def _adaptive_size(size, name: str):
    return None if size is None or size == (None, None) else _square(size, name)


# Module -> 3D replacement, for the 2D layers that need one (exact types: a subclass may have its own forward).
_CONVERTERS = {
    nn.Conv2d: conv2d_to_3d,
    nn.BatchNorm2d: lambda m, _: _copy_state(m, nn.BatchNorm3d(m.num_features, m.eps, m.momentum, m.affine,
                                                               m.track_running_stats)),
    nn.InstanceNorm2d: lambda m, _: _copy_state(m, nn.InstanceNorm3d(m.num_features, m.eps, m.momentum, m.affine,
                                                                     m.track_running_stats)),
    nn.Dropout2d: lambda m, _: nn.Dropout3d(m.p),
    nn.MaxPool2d: lambda m, _: nn.MaxPool3d(*(_square(getattr(m, a), a) for a in ("kernel_size", "stride",
                                                                                  "padding", "dilation")),
                                            return_indices=m.return_indices, ceil_mode=m.ceil_mode),
    nn.AvgPool2d: lambda m, _: nn.AvgPool3d(*(_square(getattr(m, a), a) for a in ("kernel_size", "stride",
                                                                                  "padding")),
                                            ceil_mode=m.ceil_mode, count_include_pad=m.count_include_pad,
                                            divisor_override=m.divisor_override),
    nn.AdaptiveAvgPool2d: lambda m, _: nn.AdaptiveAvgPool3d(_adaptive_size(m.output_size, "output_size")),
    nn.AdaptiveMaxPool2d: lambda m, _: nn.AdaptiveMaxPool3d(_adaptive_size(m.output_size, "output_size"),
                                                            m.return_indices),
}

# Modules whose forward works on volumes as it is: elementwise, per-channel or feature-vector layers, containers,
# the 3D layers themselves (so converting twice is harmless), and eqlightning's own CNN modules (their forwards
# pool over all spatial dimensions); the last are named, so that this module does not import escnn.
_VOLUME_SAFE = (
    nn.ReLU, nn.ReLU6, nn.ELU, nn.SELU, nn.CELU, nn.GELU, nn.SiLU, nn.Mish, nn.LeakyReLU, nn.PReLU, nn.Sigmoid,
    nn.Tanh, nn.Hardswish, nn.Hardsigmoid, nn.Hardtanh, nn.Softplus, nn.Identity, nn.Dropout, nn.AlphaDropout,
    nn.GroupNorm, nn.Linear, nn.Flatten, nn.Sequential, nn.ModuleList, nn.ModuleDict,
    nn.Conv3d, nn.BatchNorm3d, nn.InstanceNorm3d, nn.Dropout3d, nn.MaxPool3d, nn.AvgPool3d, nn.AdaptiveAvgPool3d,
    nn.AdaptiveMaxPool3d, ACSConv, ResNet, BasicBlock, Bottleneck,
)
VOLUME_SAFE_NAMES = frozenset({
    "eqlightning.models.eq_resnet.EquivariantResNet", "eqlightning.models.eq_resnet.BasicBlock",
    "eqlightning.models.eq_resnet.Bottleneck", "eqlightning.nn.pooling.SymmetricDownsample",
    "eqlightning.nn.pooling.FieldPool", "eqlightning.nn.pooling.ChannelOrder",
})


def _copy_state(source: nn.Module, target: nn.Module) -> nn.Module:
    tensors = list(source.parameters()) + list(source.buffers())
    if tensors:
        target = target.to(device=tensors[0].device, dtype=tensors[0].dtype)
    target.load_state_dict(source.state_dict())
    return target


def _type_name(module: nn.Module) -> str:
    return f"{type(module).__module__}.{type(module).__qualname__}"


def convert_2d_to_3d(model2d: nn.Module, mode: str, trusted: Iterable[type] = ()) -> nn.Module:
    """A 3D copy of the 2D network ``model2d`` for volumes ``(N, C, D, H, W)``: its ``Conv2d`` layers as ACS
    (``mode="acs"``), 2.5D (``"2.5d"``) or I3D-inflated (``"i3d"``) convolutions and its 2D norms, pools and
    channel dropouts as 3D ones, all with the 2D weights (see the module docstring). ``model2d`` is not modified.

    Works on eqlightning's plain ResNets and on exported equivariant ResNets (``eqlightning.nn.export``). Any other
    module type must be vouched for in ``trusted`` (types whose forward works on volumes unchanged, i.e. that use
    no operation tied to two spatial dimensions, like ``x.mean(dim=(2, 3))``); otherwise a TypeError names it,
    before anything is converted. The copy keeps train/eval mode; if it has the registry's attributes ``group``
    and ``dims`` they become ``None`` and ``3`` (a 2.5D or I3D copy of a D4-equivariant network is still invariant
    to D4 acting in the slice plane, but not to a group of the volume's symmetries).
    """
    check_mode(mode)
    trusted = tuple(trusted)
    unknown: dict[str, list[str]] = {}
    for name, module in model2d.named_modules():
        if not (type(module) in _CONVERTERS or type(module) in _VOLUME_SAFE or isinstance(module, trusted)
                or _type_name(module) in VOLUME_SAFE_NAMES):
            unknown.setdefault(type(module).__name__ + f" ({type(module).__module__})", []).append(name or "<root>")
    if unknown:
        found = "; ".join(f"{kind} at {', '.join(names[:3])}{' ...' if len(names) > 3 else ''}"
                          for kind, names in unknown.items())
        raise TypeError(f"convert_2d_to_3d({mode!r}) cannot tell whether these modules work on volumes "
                        f"(N, C, D, H, W): {found}. Conv2d, 2D norms and pools are converted; activations, "
                        "GroupNorm, Linear, containers and eqlightning's ResNets work unchanged. If their forward "
                        "uses no operation tied to two spatial dimensions (such as x.mean(dim=(2, 3))), pass them "
                        "as trusted=[...]; otherwise replace them by 3D-ready modules first")
    if type(model2d) in _CONVERTERS:
        return _convert(model2d, mode, "")
    model3d = copy.deepcopy(model2d)
    converted: dict[int, nn.Module] = {}
    for path, module in list(model3d.named_modules(remove_duplicate=False)):
        if type(module) in _CONVERTERS:
            if id(module) not in converted:  # a layer used twice stays one (shared) layer
                converted[id(module)] = _convert(module, mode, path)
            parent, _, name = path.rpartition(".")
            setattr(model3d.get_submodule(parent), name, converted[id(module)])
    if getattr(model3d, "group", None) is not None:
        model3d.group = None
    if getattr(model3d, "dims", None) == 2:
        model3d.dims = 3
    return model3d


def _convert(module: nn.Module, mode: str, path: str) -> nn.Module:
    try:
        return _CONVERTERS[type(module)](module, mode).train(module.training)
    except ValueError as err:
        raise ValueError(f"convert_2d_to_3d({mode!r}): {path or '<root>'} ({module}): {err}") from None
