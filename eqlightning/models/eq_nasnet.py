"""Eq-NASNet: equivariant MBConv networks built from an architecture spec (a searchable, EfficientNet-like family).

Layout (EfficientNet / EfficientNetV2 blocks on regular fields, the stride moved into a symmetric pool so rotations
stay exact, as in the equivariant ResNets):

    stem    conv k x k  trivial fields (image channels) -> regular fields of the first stage's group, norm, act
    stage   [Restrict to the stage's group] + ``depth`` blocks of one type; the first block of a stride-2 stage
            halves H and W with a symmetric average pool at its start
    head    [1x1 conv, norm, act] -> group pooling (max over each field) -> global average pool -> dropout -> linear

Blocks (``block`` in a stage spec):

    mbconv        1x1 expansion (skipped when expand == 1) -> norm -> act -> depthwise k x k -> norm -> act
                  -> [field squeeze-excitation] -> 1x1 projection -> norm, + input when shapes match
                  (MobileNetV2 / EfficientNet's inverted residual, no activation after the projection)
    fused_mbconv  k x k expansion -> norm -> act -> [SE] -> 1x1 projection -> norm, + input when shapes match
                  (EfficientNetV2; with expand == 1 a single k x k conv -> norm -> act -> [SE])
    basic         the equivariant ResNet's conv k -> conv k block with its (projected) shortcut

The depthwise convolution is per *field* (:class:`~eqlightning.nn.EquivariantDepthwiseConv2d`) and the SE gate is
one invariant scalar per field (:class:`~eqlightning.nn.FieldSqueezeExcitation`): a plain per-channel depthwise
filter or gate would not be equivariant. Widths are given in channels of the plain counterpart: a stage of ``c``
channels has ``max(1, round(c * width_multiplier / |G|))`` regular fields. Hidden widths are ``expand`` times the
block's input channels; the SE bottleneck is ``se`` times the block's input fields (EfficientNet's 0.25).

Groups: one per stage, each a subgroup of the previous stage's (the features are restricted between stages, never
lifted). By default every stage but the last is C4 and the last is the trivial group C1 (the thesis's finding:
equivariance in the early stages, none in the last). The logits are invariant to the last stage's group; for groups
that contain them, exactly for rotations by multiples of 90 degrees and flips, at every input size.
"""

from __future__ import annotations

import difflib
import math
from collections.abc import Mapping, Sequence

import torch
from torch import nn

from ..nn import (EquivariantDepthwiseConv2d, EquivariantPool2d, FieldSqueezeExcitation, GroupPooling, Restrict,
                  canonical_group, export, field_type, gspace_name, parse_group)
from .eq_resnet import BasicBlock, _Layers, _make_norm
from .registry import register_backbone
from .scaling import compound_scaling, scale_depth, scale_resolution

BLOCKS = ("mbconv", "fused_mbconv", "basic")
STAGE_KEYS = ("block", "width", "depth", "kernel", "expand", "stride", "se", "group")
DEFAULT_EXPAND = {"mbconv": 6, "fused_mbconv": 4, "basic": 1}
DEFAULT_SE = {"mbconv": 0.25, "fused_mbconv": 0.25, "basic": 0.0}


def group_order(group: str) -> int:
    """``|G|``: N for C_N, 2N for D_N."""
    kind, n = parse_group(group)
    return n if kind == "C" else 2 * n


def is_subgroup(small: str, large: str) -> bool:
    """Whether the planar group ``small`` is one ``large`` can be restricted to (C_M < C_N, and C_M, D_M < D_N, for
    M dividing N)."""
    s_kind, s_n = parse_group(small)
    l_kind, l_n = parse_group(large)
    return l_n % s_n == 0 and not (l_kind == "C" and s_kind == "D")


def default_groups(stages: int) -> list[str]:
    """C4 in every stage but the last, C1 in the last (a single stage: C4)."""
    return ["C4"] * stages if stages == 1 else ["C4"] * (stages - 1) + ["C1"]


def stage_fields(channels: float, group: str) -> int:
    """Regular fields for ``channels`` plain channels: ``max(1, round(channels / |G|))``."""
    return max(1, round(channels / group_order(group)))


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _hint(value, choices) -> str:
    close = difflib.get_close_matches(str(value), choices, n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def resolve_stage(index: int, spec) -> dict:
    """One stage spec validated and with its defaults filled in (``group`` only when the spec names one).

    Raises a ValueError naming the stage index, the key and the bad value.
    """
    where = f"eq_nasnet stage {index}"
    if not isinstance(spec, Mapping):
        raise ValueError(f"{where}: a stage is a dict with the keys {', '.join(STAGE_KEYS)}, got {spec!r}")
    for key in spec:
        if key not in STAGE_KEYS:
            raise ValueError(f"{where}: unknown key {key!r}{_hint(key, STAGE_KEYS)}; a stage has the keys "
                             f"{', '.join(STAGE_KEYS)}")
    block = spec.get("block", "mbconv")
    if block not in BLOCKS:
        raise ValueError(f"{where}: block={block!r} is not a block type{_hint(block, BLOCKS)}; use one of "
                         f"{', '.join(map(repr, BLOCKS))}")
    if "width" not in spec:
        raise ValueError(f"{where}: the key 'width' is missing: the stage's channels in the plain counterpart "
                         "(e.g. 'width': 40)")
    stage = {"block": block, "width": spec["width"], "depth": spec.get("depth", 1), "kernel": spec.get("kernel", 3),
             "expand": spec.get("expand", DEFAULT_EXPAND[block]), "stride": spec.get("stride", 1),
             "se": spec.get("se", DEFAULT_SE[block])}
    for key in ("width", "depth"):
        if not _is_int(stage[key]) or stage[key] < 1:
            raise ValueError(f"{where}: {key}={stage[key]!r} must be an int >= 1")
    kernel = stage["kernel"]
    if not _is_int(kernel) or kernel < 1 or kernel % 2 == 0:
        raise ValueError(f"{where}: kernel={kernel!r} must be an odd int >= 1 (an even kernel has no centre pixel, "
                         "so rotations do not map it onto itself), e.g. 3 or 5")
    if not _is_int(stage["stride"]) or stage["stride"] not in (1, 2):
        raise ValueError(f"{where}: stride={stage['stride']!r} must be 1 or 2 (2 halves H and W in the stage's "
                         "first block)")
    if not _is_number(stage["expand"]) or stage["expand"] < 1:
        raise ValueError(f"{where}: expand={stage['expand']!r} must be a number >= 1 (hidden channels per input "
                         "channel; 1 = no expansion)")
    if not _is_number(stage["se"]) or not 0 <= stage["se"] <= 1:
        raise ValueError(f"{where}: se={stage['se']!r} must be in [0, 1] (the squeeze-excitation bottleneck as a "
                         "fraction of the block's input fields; 0 disables it)")
    if block == "basic" and (stage["expand"] != 1 or stage["se"] != 0):
        key = "expand" if stage["expand"] != 1 else "se"
        raise ValueError(f"{where}: {key}={stage[key]!r}, but block 'basic' has no expansion and no "
                         "squeeze-excitation; remove the key or use block 'mbconv' / 'fused_mbconv'")
    if "group" in spec:
        try:
            stage["group"] = canonical_group(spec["group"])
        except ValueError as err:
            raise ValueError(f"{where}: group={spec['group']!r}: {err}") from None
    return stage


def resolve_stages(stages) -> list[dict]:
    """Every stage of an architecture spec validated, with its defaults filled in (see :func:`resolve_stage`)."""
    if isinstance(stages, (str, Mapping)) or not isinstance(stages, Sequence) or len(stages) == 0:
        raise ValueError(f"eq_nasnet: stages must be a non-empty list of stage dicts (keys {', '.join(STAGE_KEYS)}), "
                         f"got {stages!r}")
    return [resolve_stage(i, spec) for i, spec in enumerate(stages)]


def resolve_groups(stages: list[dict], group) -> list[str]:
    """The group of every stage: the stage's own ``group`` key, else the backbone's ``group`` (one name, or one per
    stage), else :func:`default_groups`. Each must be a subgroup of the previous stage's."""
    n = len(stages)
    if group is None:
        backbone = default_groups(n)
    elif isinstance(group, str):
        backbone = [group] * n
    else:
        backbone = list(group)
        if len(backbone) != n:
            raise ValueError(f"group has {len(backbone)} entries but the architecture has {n} stages; give one "
                             f"group, or one per stage (e.g. {default_groups(n)})")
    backbone = [canonical_group(g) for g in backbone]
    groups = [stage.get("group", g) for stage, g in zip(stages, backbone)]
    for i in range(1, n):
        if not is_subgroup(groups[i], groups[i - 1]):
            raise ValueError(
                f"eq_nasnet stage {i} uses group {groups[i]} after stage {i - 1}'s {groups[i - 1]}, but {groups[i]} "
                f"is not a subgroup of {groups[i - 1]}: groups may only shrink between stages (features are "
                "restricted, never lifted). Restrict C<N> to C<M> and D<N> to D<M> or C<M>, with M dividing N "
                "(e.g. D4 -> C4 -> C1)"
            )
    return groups


def _hidden_type(t_in, expand: float):
    """Regular fields with ``expand`` times the channels of ``t_in`` (at least one field)."""
    order = t_in.gspace.fibergroup.order()
    return field_type(t_in.gspace, "regular", max(1, round(t_in.size * expand / order)))


def _squeeze_excitation(t, t_in, se: float, activation: str):
    """A field SE on ``t`` with a bottleneck of ``se`` times the block's input fields, or None for ``se == 0``."""
    if se <= 0:
        return None
    in_fields = t_in.size / t_in.gspace.fibergroup.order()  # in regular fields of the block's group
    return FieldSqueezeExcitation(t, max(1, int(in_fields * se)), activation)


class EquivariantMBConv(nn.Module):
    """Inverted residual block on fields: [pool] -> [1x1 expansion, norm, act] -> depthwise k x k, norm, act ->
    [field SE] -> 1x1 projection, norm (+ input when stride 1 and the field types match)."""

    def __init__(self, t_in, t_out, downsample: bool, layers: _Layers, expand: float = 6, se: float = 0.25):
        super().__init__()
        self.pool = EquivariantPool2d(t_in, "avg") if downsample else None
        t_hidden = t_in if expand == 1 else _hidden_type(t_in, expand)
        self.expand = None if expand == 1 else nn.Sequential(layers.conv(t_in, t_hidden, 1),
                                                             *layers.norm_act(t_hidden))
        depthwise = EquivariantDepthwiseConv2d(t_hidden, layers.kernel_size, bias=layers.norm == "none")
        self.depthwise = nn.Sequential(depthwise, *layers.norm_act(t_hidden))
        self.se = _squeeze_excitation(t_hidden, t_in, se, layers.activation)
        self.project = nn.Sequential(layers.conv(t_hidden, t_out, 1), _make_norm(layers.norm, t_out,
                                                                                 layers.norm_groups))
        self.use_residual = not downsample and t_in == t_out

    @property
    def out_type(self):
        return self.project[0].out_type

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.pool is not None:
            x = self.pool(x)  # (N, C_in, ceil(H/2), ceil(W/2))
        out = x if self.expand is None else self.expand(x)  # (N, C_hidden, H, W)
        out = self.depthwise(out)
        if self.se is not None:
            out = self.se(out)
        out = self.project(out)  # (N, C_out, H, W)
        return x + out if self.use_residual else out


class EquivariantFusedMBConv(nn.Module):
    """EfficientNetV2's fused block on fields: [pool] -> k x k expansion, norm, act -> [field SE] -> 1x1 projection,
    norm (+ input when stride 1 and the field types match); with ``expand == 1`` one k x k conv, norm, act, [SE]."""

    def __init__(self, t_in, t_out, downsample: bool, layers: _Layers, expand: float = 4, se: float = 0.25):
        super().__init__()
        self.pool = EquivariantPool2d(t_in, "avg") if downsample else None
        t_hidden = t_out if expand == 1 else _hidden_type(t_in, expand)
        self.expand = nn.Sequential(layers.conv(t_in, t_hidden), *layers.norm_act(t_hidden))
        self.se = _squeeze_excitation(t_hidden, t_in, se, layers.activation)
        self.project = None if expand == 1 else nn.Sequential(
            layers.conv(t_hidden, t_out, 1), _make_norm(layers.norm, t_out, layers.norm_groups))
        self.use_residual = not downsample and t_in == t_out

    @property
    def out_type(self):
        return (self.expand if self.project is None else self.project)[0].out_type

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.pool is not None:
            x = self.pool(x)
        out = self.expand(x)  # (N, C_hidden, H, W)
        if self.se is not None:
            out = self.se(out)
        if self.project is not None:
            out = self.project(out)  # (N, C_out, H, W)
        return x + out if self.use_residual else out


def _make_block(stage: dict, t_in, t_out, downsample: bool, layers: _Layers) -> nn.Module:
    if stage["block"] == "basic":
        return BasicBlock(t_in, t_out, downsample, layers)
    cls = EquivariantMBConv if stage["block"] == "mbconv" else EquivariantFusedMBConv
    return cls(t_in, t_out, downsample, layers, expand=stage["expand"], se=stage["se"])


class EqNASNet(nn.Module):
    """An equivariant MBConv network from an architecture spec; build it through ``create_backbone('eq_nasnet', ...)``
    (options: see :func:`eq_nasnet`)."""

    #: 4 small stages for 28 px inputs (28 -> 28 -> 14 -> 7 -> 4), EfficientNet-B0's first stages at lower depth
    DEFAULT_STAGES = (
        {"block": "mbconv", "expand": 1, "kernel": 3, "width": 16, "depth": 1, "stride": 1},
        {"block": "mbconv", "expand": 6, "kernel": 3, "width": 24, "depth": 2, "stride": 2},
        {"block": "mbconv", "expand": 6, "kernel": 5, "width": 40, "depth": 2, "stride": 2},
        {"block": "mbconv", "expand": 6, "kernel": 3, "width": 80, "depth": 1, "stride": 2},
    )

    def __init__(self, *, in_channels: int = 1, num_classes: int = 2, stages: Sequence[Mapping] | None = None,
                 group: str | Sequence[str] | None = None, stem_width: int = 16, stem_kernel: int = 3,
                 head_width: int | None = None, width_multiplier: float = 1.0, depth_multiplier: float = 1.0,
                 phi: float | None = None, input_size: int = 28, norm: str = "group", norm_groups: int | None = None,
                 activation: str = "silu", dropout: float = 0.0, group_pool: str = "max"):
        super().__init__()
        specs = resolve_stages(self.DEFAULT_STAGES if stages is None else stages)
        groups = resolve_groups(specs, group)
        for key, value in (("stem_width", stem_width), ("head_width", head_width)):
            if value is not None and (not _is_int(value) or value < 1):
                raise ValueError(f"eq_nasnet: {key}={value!r} must be an int >= 1 (channels of the plain "
                                 f"counterpart){'; None for no head convolution' if key == 'head_width' else ''}")
        if not _is_int(stem_kernel) or stem_kernel < 1 or stem_kernel % 2 == 0:
            raise ValueError(f"eq_nasnet: stem_kernel={stem_kernel!r} must be an odd int >= 1 (e.g. 3 or 5)")
        self.resolution_multiplier = 1.0
        if phi is not None:
            depth_multiplier, width_multiplier, self.resolution_multiplier = compound_scaling(phi)
        self.width_multiplier, self.depth_multiplier, self.phi = width_multiplier, depth_multiplier, phi
        self.input_size, self.in_channels, self.num_classes = input_size, in_channels, num_classes
        self.scaled_input_size = scale_resolution(input_size, self.resolution_multiplier)
        self.stage_groups = groups
        self.group = groups[-1]
        self._settings = dict(stem_kernel=stem_kernel, norm=norm, norm_groups=norm_groups, activation=activation,
                              dropout=dropout, group_pool=group_pool)

        # stem: image channels are trivial fields (invariant scalars that only move with the pixels)
        t = field_type(groups[0], "trivial", in_channels)
        t_stem = field_type(t.gspace, "regular", stage_fields(stem_width * width_multiplier, groups[0]))
        build = _Layers(norm, norm_groups, activation, stem_kernel)
        self.stem = nn.Sequential(build.conv(t, t_stem), *build.norm_act(t_stem))
        self._stem_width = t_stem.size

        t = t_stem
        stage_modules, self._architecture = [], []
        for spec, g in zip(specs, groups):
            blocks = []
            if gspace_name(t.gspace) != g:
                restriction = Restrict(t, g)
                blocks.append(restriction)
                t = restriction.out_type
            t_out = field_type(t.gspace, "regular", stage_fields(spec["width"] * width_multiplier, g))
            depth = scale_depth(spec["depth"], depth_multiplier)
            build = _Layers(norm, norm_groups, activation, spec["kernel"])
            for b in range(depth):
                blk = _make_block(spec, t, t_out, downsample=spec["stride"] == 2 and b == 0, layers=build)
                blocks.append(blk)
                t = blk.out_type
            stage_modules.append(nn.Sequential(*blocks))
            self._architecture.append({**spec, "width": t_out.size, "depth": depth, "group": g})
        self.stages = nn.Sequential(*stage_modules)

        self.head_conv = None
        self._head_width = None
        if head_width is not None:
            t_head = field_type(t.gspace, "regular", stage_fields(head_width * width_multiplier, groups[-1]))
            build = _Layers(norm, norm_groups, activation, 1)
            self.head_conv = nn.Sequential(build.conv(t, t_head, 1), *build.norm_act(t_head))
            t, self._head_width = t_head, t_head.size
        self.group_pool = GroupPooling(t, group_pool)
        self.dropout = nn.Dropout(dropout)
        self.head = nn.Linear(len(t), num_classes)

    @property
    def input_type(self):
        """Field type of the input image: one trivial field per channel."""
        return self.stem[0].in_type

    @property
    def feature_type(self):
        """Field type of the last stage (or of the head convolution), before group pooling."""
        return self.group_pool.in_type

    def architecture(self) -> list[dict]:
        """The fully resolved stage specs, as plain dicts with every key filled in: ``width`` is the stage's
        channels after the width multiplier (fields x |G|, so it maps back to the same fields), ``depth`` its blocks
        after the depth multiplier, ``group`` its group. ``EqNASNet(stages=net.architecture())`` builds the same
        stages (and, with the default stem/head, the same network)."""
        return [dict(stage) for stage in self._architecture]

    def backbone_kwargs(self) -> dict:
        """Options that rebuild this network exactly (multipliers and ``phi`` folded into the widths and depths;
        ``input_size`` is the scaled one): ``model.backbone_kwargs`` of a config for a found architecture."""
        return {"stages": self.architecture(), "group": list(self.stage_groups), "stem_width": self._stem_width,
                "head_width": self._head_width, "width_multiplier": 1.0, "depth_multiplier": 1.0, "phi": None,
                "input_size": self.scaled_input_size, **self._settings}

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Invariant features ``(N, fields)``."""
        x = self.stages(self.stem(x))  # (N, C_last, h, w)
        if self.head_conv is not None:
            x = self.head_conv(x)  # (N, C_head, h, w)
        return self.group_pool(x).mean(dim=(2, 3))  # (N, fields)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.dropout(self.forward_features(x)))

    def export(self) -> nn.Module:
        """A copy built from plain Conv2d/GroupNorm/Linear layers with identical outputs (``eqlightning.nn.export``)."""
        return export(self)


@register_backbone("eq_nasnet", equivariant=True)
def eq_nasnet(*, in_channels: int, num_classes: int, stages: Sequence[Mapping] | None = None,
              group: str | Sequence[str] | None = None, stem_width: int = 16, stem_kernel: int = 3,
              head_width: int | None = None, width_multiplier: float = 1.0, depth_multiplier: float = 1.0,
              phi: float | None = None, input_size: int = 28, norm: str = "group", norm_groups: int | None = None,
              activation: str = "silu", dropout: float = 0.0, group_pool: str = "max") -> EqNASNet:
    """Equivariant MBConv network built from an architecture spec (Eq-NASNet; C4 stages, then C1, by default).

    Options: stages (one dict per stage with the keys block ('mbconv' | 'fused_mbconv' | 'basic'; default mbconv),
    width (channels of the plain counterpart; max(1, round(width * width_multiplier / |G|)) regular fields), depth
    (blocks; default 1), kernel (odd; default 3), expand (expansion ratio; default 6 for mbconv, 4 for fused_mbconv),
    stride (1 or 2, of the stage's first block; default 1), se (squeeze-excitation bottleneck as a fraction of the
    block's input fields, 0 disables; default 0.25), group (optional; overrides the backbone's group for this
    stage); default: 4 stages for 28 px inputs, EqNASNet.DEFAULT_STAGES), group (one name for every stage, or one
    per stage; each a subgroup of the previous one; default C4 then C1 in the last stage), stem_width (16),
    stem_kernel (3), head_width (None = no 1x1 conv before group pooling), width_multiplier, depth_multiplier,
    phi (EfficientNet compound scaling; overrides both multipliers and sets scaled_input_size), input_size (28),
    norm ('group' (DP-compatible) | 'batch' | 'none'), norm_groups, activation ('silu'), dropout (0.0),
    group_pool ('max' | 'avg').
    """
    return EqNASNet(in_channels=in_channels, num_classes=num_classes, stages=stages, group=group,
                    stem_width=stem_width, stem_kernel=stem_kernel, head_width=head_width,
                    width_multiplier=width_multiplier, depth_multiplier=depth_multiplier, phi=phi,
                    input_size=input_size, norm=norm, norm_groups=norm_groups, activation=activation,
                    dropout=dropout, group_pool=group_pool)
