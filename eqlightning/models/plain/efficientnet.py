"""EfficientNet-B0 and its compound-scaled variants (the plain MBConv baseline).

Tan & Le, "EfficientNet: Rethinking Model Scaling for Convolutional Neural Networks" (ICML 2019), built like
torchvision's ``efficientnet_b0`` but from ``torch.nn`` only:

    stem   conv 3x3, 32 channels, norm, SiLU
    stages MBConv blocks from the B0 table below (expand 1x1 -> depthwise k x k -> squeeze-and-excitation ->
           project 1x1; residual when stride 1 and channels match, optional stochastic depth)
    head   conv 1x1 to 1280, norm, SiLU -> global average pool -> dropout 0.2 -> linear

Small inputs: for ``input_size <= 64`` the stem has stride 1 instead of 2. EfficientNet divides the resolution by 32,
which would take a 28 px MedMNIST image to 1x1 before the last stages; with the stride-1 stem 28 px ends at 2x2 and
64 px at 4x4 (224 px keeps the original stride 2 and ends at 7x7).

Compound scaling: ``phi`` gives depth and width multipliers from :func:`~eqlightning.models.scaling.compound_scaling`
(channels rounded to multiples of 8, repeats rounded up). The resolution multiplier cannot change the data the model
is fed, so it is only reported as ``scaled_input_size`` (pick the dataset's image size from it).
``norm="group"`` swaps every BatchNorm for GroupNorm (DP-SGD cannot use BatchNorm).
"""

from __future__ import annotations

import torch
from torch import nn

from ..registry import register_backbone
from ..scaling import compound_scaling, scale_depth, scale_resolution, scale_width
from ._layers import check_norm, norm2d

SMALL_INPUT_MAX_SIZE = 64  # inputs up to this size get a stride-1 stem

# (expand ratio, out channels, repeats, stride of the first block, kernel size), EfficientNet-B0 (paper Table 1)
B0_STAGES: tuple[tuple[int, int, int, int, int], ...] = (
    (1, 16, 1, 1, 3),
    (6, 24, 2, 2, 3),
    (6, 40, 2, 2, 5),
    (6, 80, 3, 2, 3),
    (6, 112, 3, 1, 5),
    (6, 192, 4, 2, 5),
    (6, 320, 1, 1, 3),
)
NORM_EPS = 1e-3  # as the TensorFlow reference


def conv_norm_act(in_ch: int, out_ch: int, kernel_size: int, stride: int, norm: str, groups: int = 1,
                  act: bool = True) -> nn.Sequential:
    """conv k x k ('same' padding, no bias) -> norm -> SiLU (or no activation)."""
    layers: list[nn.Module] = [nn.Conv2d(in_ch, out_ch, kernel_size, stride=stride, padding=kernel_size // 2,
                                         groups=groups, bias=False), norm2d(norm, out_ch, eps=NORM_EPS)]
    if act:
        layers.append(nn.SiLU())
    return nn.Sequential(*layers)


class SqueezeExcitation(nn.Module):
    """Channel gating (Hu et al. 2018): global pool -> 1x1 conv -> SiLU -> 1x1 conv -> sigmoid -> scale."""

    def __init__(self, channels: int, squeeze: int):
        super().__init__()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.reduce = nn.Conv2d(channels, squeeze, 1)
        self.act = nn.SiLU()
        self.expand = nn.Conv2d(squeeze, channels, 1)
        self.gate = nn.Sigmoid()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scale = self.gate(self.expand(self.act(self.reduce(self.pool(x)))))  # (N, C, 1, 1)
        return x * scale  # (N, C, H, W)


class StochasticDepth(nn.Module):
    """Drops the residual branch per example with probability ``p`` in training (Huang et al. 2016), rescaled."""

    def __init__(self, p: float):
        super().__init__()
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0.0:
            return x
        keep = 1.0 - self.p
        mask = torch.empty(x.shape[0], 1, 1, 1, device=x.device, dtype=x.dtype).bernoulli_(keep)  # (N, 1, 1, 1)
        return x * mask / keep


class MBConv(nn.Module):
    """Inverted residual block: [expand 1x1] -> depthwise k x k (stride) -> SE -> project 1x1 (+ residual)."""

    def __init__(self, in_ch: int, out_ch: int, expand: int, kernel_size: int, stride: int, norm: str,
                 drop_prob: float = 0.0, se_ratio: float = 0.25):
        super().__init__()
        hidden = in_ch * expand
        self.use_residual = stride == 1 and in_ch == out_ch
        self.expand = conv_norm_act(in_ch, hidden, 1, 1, norm) if expand != 1 else nn.Identity()
        self.depthwise = conv_norm_act(hidden, hidden, kernel_size, stride, norm, groups=hidden)
        self.se = SqueezeExcitation(hidden, max(1, int(in_ch * se_ratio)))  # ratio of the block's input channels
        self.project = conv_norm_act(hidden, out_ch, 1, 1, norm, act=False)
        self.drop = StochasticDepth(drop_prob) if self.use_residual else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.expand(x)  # (N, hidden, H, W)
        out = self.se(self.depthwise(out))  # (N, hidden, H/s, W/s)
        out = self.project(out)  # (N, out_ch, H/s, W/s)
        return x + self.drop(out) if self.use_residual else out


class EfficientNet(nn.Module):
    """A plain EfficientNet; build it through ``create_backbone('efficientnet_b0', ...)``."""

    group = None  # plain CNN: the logits are not invariant to any group

    def __init__(self, in_channels: int, num_classes: int, input_size: int = 28, norm: str = "batch",
                 phi: float = 0.0, width_multiplier: float | None = None, depth_multiplier: float | None = None,
                 dropout: float = 0.2, stochastic_depth: float = 0.0, stem_channels: int = 32,
                 head_channels: int = 1280):
        super().__init__()
        check_norm(norm)
        depth_phi, width_phi, self.resolution_multiplier = compound_scaling(phi)
        self.width_multiplier = width_phi if width_multiplier is None else width_multiplier
        self.depth_multiplier = depth_phi if depth_multiplier is None else depth_multiplier
        self.in_channels, self.num_classes, self.input_size, self.norm = in_channels, num_classes, input_size, norm
        self.scaled_input_size = scale_resolution(input_size, self.resolution_multiplier)

        def width(c: int) -> int:
            return scale_width(c, self.width_multiplier, divisor=8, minimum=8)

        stem_stride = 1 if input_size <= SMALL_INPUT_MAX_SIZE else 2
        self.stem = conv_norm_act(in_channels, width(stem_channels), 3, stem_stride, norm)

        repeats = [scale_depth(r, self.depth_multiplier) for _, _, r, _, _ in B0_STAGES]
        total, index = sum(repeats), 0
        in_ch, stages = width(stem_channels), []
        for (expand, channels, _, stride, kernel), count in zip(B0_STAGES, repeats):
            blocks = []
            for b in range(count):
                drop = stochastic_depth * index / total  # linearly increasing with depth, as torchvision
                blocks.append(MBConv(in_ch, width(channels), expand, kernel, stride if b == 0 else 1, norm, drop))
                in_ch, index = width(channels), index + 1
            stages.append(nn.Sequential(*blocks))
        self.stages = nn.Sequential(*stages)
        self.head_conv = conv_norm_act(in_ch, width(head_channels), 1, 1, norm)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.dropout = nn.Dropout(dropout)
        self.head = nn.Linear(width(head_channels), num_classes)
        self.num_features = width(head_channels)
        self._init_weights()

    def _init_weights(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out")
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, (nn.BatchNorm2d, nn.GroupNorm)):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                bound = 1.0 / m.out_features ** 0.5
                nn.init.uniform_(m.weight, -bound, bound)
                nn.init.zeros_(m.bias)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Pooled features ``(N, num_features)``."""
        x = self.stem(x)  # (N, 32, H, W) for small inputs, (N, 32, H/2, W/2) otherwise
        x = self.stages(x)  # (N, 320, h/16, w/16)
        x = self.head_conv(x)  # (N, 1280, h/16, w/16)
        return torch.flatten(self.pool(x), 1)  # (N, 1280)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.dropout(self.forward_features(x)))  # (N, num_classes)


@register_backbone("efficientnet_b0", equivariant=False)
def efficientnet_b0(*, in_channels: int, num_classes: int, input_size: int = 28, norm: str = "batch",
                    phi: float = 0.0, width_multiplier: float | None = None, depth_multiplier: float | None = None,
                    dropout: float = 0.2, stochastic_depth: float = 0.0) -> EfficientNet:
    """EfficientNet-B0 (MBConv + squeeze-excitation, SiLU; 5.3M params at 1000 classes), compound-scaled by phi.

    Options: input_size (28; <= 64 uses a stride-1 stem so 28 px ends at 2x2, not 1x1), norm ('batch' as in the
    paper | 'group' for DP-SGD), phi (0.0; compound scaling: depth 1.2**phi, width 1.1**phi, the resolution
    1.15**phi is reported as ``scaled_input_size``), width_multiplier / depth_multiplier (override phi's),
    dropout (0.2, before the classifier), stochastic_depth (0.0 = off; torchvision's B0 uses 0.2).
    """
    return EfficientNet(in_channels, num_classes, input_size=input_size, norm=norm, phi=phi,
                        width_multiplier=width_multiplier, depth_multiplier=depth_multiplier, dropout=dropout,
                        stochastic_depth=stochastic_depth)
