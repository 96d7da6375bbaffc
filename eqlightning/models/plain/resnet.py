"""ResNet-18 / ResNet-50 as MedMNIST v2 trained them (the plain CNN baselines).

He et al., "Deep Residual Learning for Image Recognition" (CVPR 2016), in the variant of Yang et al., "MedMNIST v2"
(Scientific Data 10:41, 2023; ``experiments/MedMNIST2D/models.py``):

    stem   input_size <= 64: conv 3x3 stride 1, norm, ReLU (CIFAR style, no max-pool; 28 px stays 28 px)
           input_size  > 64: conv 7x7 stride 2, norm, ReLU, max-pool 3x3 stride 2 (ImageNet style, /4)
    stages widths 64-128-256-512 (x4 for bottlenecks); the first block of stages 2-4 has stride 2
    head   global average pool -> linear

Basic blocks (conv3-conv3, [2, 2, 2, 2] for ResNet-18) or bottlenecks (conv1-conv3-conv1 with the stride on the 3x3,
"ResNet v1.5", [3, 4, 6, 3] for ResNet-50). ``norm="group"`` swaps every BatchNorm for GroupNorm so the net can be
trained with DP-SGD. Written from ``torch.nn`` only (no torchvision), with no in-place activations, so Opacus'
per-sample gradient hooks see every activation they need. The blocks and :class:`ResNet` take ``dims=3`` for volumes
(Conv3d/BatchNorm3d; :mod:`.resnet3d` registers those); the default ``dims=2`` builds exactly the image networks.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from ..registry import register_backbone
from ..scaling import scale_depth, scale_width
from ._layers import adaptive_avg_pool_class, check_norm, conv_class, init_conv_and_norm, max_pool_class, norm_nd

CIFAR_STEM_MAX_SIZE = 64  # inputs up to this size get the 3x3 stride-1 stem


class BasicBlock(nn.Module):
    """conv 3x3 (stride) -> norm -> ReLU -> conv 3x3 -> norm, plus (projected) shortcut, then ReLU."""

    expansion = 1

    def __init__(self, in_planes: int, planes: int, stride: int, norm: str, dims: int = 2):
        super().__init__()
        out_planes, conv = planes * self.expansion, conv_class(dims)
        self.conv1 = conv(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.norm1 = norm_nd(norm, planes, dims)
        self.act1 = nn.ReLU()
        self.conv2 = conv(planes, out_planes, 3, padding=1, bias=False)
        self.norm2 = norm_nd(norm, out_planes, dims)
        self.shortcut = _shortcut(in_planes, out_planes, stride, norm, dims)
        self.act2 = nn.ReLU()

    @property
    def last_norm(self) -> nn.Module:
        return self.norm2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.act1(self.norm1(self.conv1(x)))  # (N, planes, H/s, W/s) (volumes: (N, planes, D/s, H/s, W/s))
        out = self.norm2(self.conv2(out))  # (N, planes, H/s, W/s)
        return self.act2(out + self.shortcut(x))


class Bottleneck(nn.Module):
    """conv 1x1 -> norm -> ReLU -> conv 3x3 (stride) -> norm -> ReLU -> conv 1x1 (x4) -> norm, shortcut, ReLU."""

    expansion = 4

    def __init__(self, in_planes: int, planes: int, stride: int, norm: str, dims: int = 2):
        super().__init__()
        out_planes, conv = planes * self.expansion, conv_class(dims)
        self.conv1 = conv(in_planes, planes, 1, bias=False)
        self.norm1 = norm_nd(norm, planes, dims)
        self.act1 = nn.ReLU()
        self.conv2 = conv(planes, planes, 3, stride=stride, padding=1, bias=False)
        self.norm2 = norm_nd(norm, planes, dims)
        self.act2 = nn.ReLU()
        self.conv3 = conv(planes, out_planes, 1, bias=False)
        self.norm3 = norm_nd(norm, out_planes, dims)
        self.shortcut = _shortcut(in_planes, out_planes, stride, norm, dims)
        self.act3 = nn.ReLU()

    @property
    def last_norm(self) -> nn.Module:
        return self.norm3

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.act1(self.norm1(self.conv1(x)))  # (N, planes, H, W)
        out = self.act2(self.norm2(self.conv2(out)))  # (N, planes, H/s, W/s)
        out = self.norm3(self.conv3(out))  # (N, 4 planes, H/s, W/s)
        return self.act3(out + self.shortcut(x))


def _shortcut(in_planes: int, out_planes: int, stride: int, norm: str, dims: int = 2) -> nn.Module:
    """Identity, or a 1x1 (strided) projection + norm when the shape changes."""
    if stride == 1 and in_planes == out_planes:
        return nn.Identity()
    return nn.Sequential(conv_class(dims)(in_planes, out_planes, 1, stride=stride, bias=False),
                         norm_nd(norm, out_planes, dims))


class ResNet(nn.Module):
    """A plain ResNet; build it through ``create_backbone('resnet18', ...)`` or ``'resnet50'`` (``dims=3``, for
    volumes ``(N, C, D, H, W)``: ``'resnet18_3d'`` or ``'resnet50_3d'``)."""

    group = None  # plain CNN: the logits are not invariant to any group

    def __init__(self, in_channels: int, num_classes: int, block: type[BasicBlock] | type[Bottleneck],
                 layers: Sequence[int], widths: Sequence[int] = (64, 128, 256, 512), input_size: int = 28,
                 norm: str = "batch", width_multiplier: float = 1.0, depth_multiplier: float = 1.0,
                 zero_init_residual: bool = False, dims: int = 2):
        super().__init__()
        check_norm(norm)
        self.in_channels, self.num_classes, self.input_size, self.norm = in_channels, num_classes, input_size, norm
        self.dims, conv = dims, conv_class(dims)  # 2: images (N, C, H, W); 3: volumes (N, C, D, H, W)
        widths = [scale_width(w, width_multiplier, divisor=8, minimum=8) for w in widths]
        self.stage_depths = [scale_depth(n, depth_multiplier) for n in layers]

        if input_size <= CIFAR_STEM_MAX_SIZE:  # MedMNIST's 28 px models: keep full resolution into stage 1
            stem: list[nn.Module] = [conv(in_channels, widths[0], 3, stride=1, padding=1, bias=False),
                                     norm_nd(norm, widths[0], dims), nn.ReLU()]
        else:  # MedMNIST's 224 px models (torchvision's ResNet): divide the resolution by 4
            stem = [conv(in_channels, widths[0], 7, stride=2, padding=3, bias=False),
                    norm_nd(norm, widths[0], dims), nn.ReLU(), max_pool_class(dims)(3, stride=2, padding=1)]
        self.stem = nn.Sequential(*stem)

        in_planes, stages = widths[0], []
        for index, (depth, planes) in enumerate(zip(self.stage_depths, widths)):
            blocks = []
            for b in range(depth):
                blocks.append(block(in_planes, planes, stride=2 if (index > 0 and b == 0) else 1, norm=norm,
                                    dims=dims))
                in_planes = planes * block.expansion
            stages.append(nn.Sequential(*blocks))
        self.stages = nn.Sequential(*stages)
        self.pool = adaptive_avg_pool_class(dims)(1)
        self.head = nn.Linear(in_planes, num_classes)
        self.num_features = in_planes

        init_conv_and_norm(self)
        if zero_init_residual:  # each residual branch starts as zero, so each block starts as the identity
            for m in self.modules():
                if isinstance(m, (BasicBlock, Bottleneck)):
                    nn.init.zeros_(m.last_norm.weight)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Pooled features ``(N, num_features)``."""
        x = self.stem(x)  # (N, w0, H, W) for the CIFAR stem, (N, w0, H/4, W/4) for the ImageNet stem (volumes: D too)
        x = self.stages(x)  # (N, C_last, h/8, w/8)
        return torch.flatten(self.pool(x), 1)  # (N, C_last)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.forward_features(x))  # (N, num_classes)


_OPTIONS = """Options: input_size (28; <= 64 uses the 3x3 stride-1 stem, larger the 7x7 stride-2 stem + max-pool),
    norm ('batch' as in the paper | 'group' for DP-SGD), width_multiplier (1.0; channels rounded to multiples of 8),
    depth_multiplier (1.0; blocks per stage rounded up), zero_init_residual (False; zero the last norm of each
    block)."""


@register_backbone("resnet18", equivariant=False)
def resnet18(*, in_channels: int, num_classes: int, input_size: int = 28, norm: str = "batch",
             width_multiplier: float = 1.0, depth_multiplier: float = 1.0,
             zero_init_residual: bool = False) -> ResNet:
    """ResNet-18 as in MedMNIST v2: basic blocks [2,2,2,2], widths 64-512 (11.2M params at 3 ch / 10 classes)."""
    return ResNet(in_channels, num_classes, BasicBlock, (2, 2, 2, 2), input_size=input_size, norm=norm,
                  width_multiplier=width_multiplier, depth_multiplier=depth_multiplier,
                  zero_init_residual=zero_init_residual)


@register_backbone("resnet50", equivariant=False)
def resnet50(*, in_channels: int, num_classes: int, input_size: int = 28, norm: str = "batch",
             width_multiplier: float = 1.0, depth_multiplier: float = 1.0,
             zero_init_residual: bool = False) -> ResNet:
    """ResNet-50 as in MedMNIST v2: bottlenecks [3,4,6,3], widths 64-512 x4 (23.5M params at 3 ch / 10 classes)."""
    return ResNet(in_channels, num_classes, Bottleneck, (3, 4, 6, 3), input_size=input_size, norm=norm,
                  width_multiplier=width_multiplier, depth_multiplier=depth_multiplier,
                  zero_init_residual=zero_init_residual)


for _fn in (resnet18, resnet50):
    _fn.__doc__ += "\n\n    " + _OPTIONS
