"""ResNet-18 / ResNet-50 for volumes: MedMNIST v2's 3D baselines ("3D", "ACS" and "2.5D").

Yang et al., "MedMNIST v2" (Scientific Data 10:41, 2023; ``experiments/MedMNIST3D``) trained the ResNets of
:mod:`.resnet` on the 28^3 and 64^3 MedMNIST3D volumes ``(N, C, D, H, W)`` in three forms, each registered here:

    resnet18_3d,  resnet50_3d    3D convolutions (3x3x3, 1x1x1) and BatchNorm3d: the 2D layout with one more axis
    resnet18_acs, resnet50_acs   the 2D network with ACS convolutions (:class:`.acs.ACSConv`): the k x k kernels'
                                 output channels split over the axial, coronal and sagittal planes
    resnet18_25d, resnet50_25d   the 2D network with 1 x k x k kernels (each slice convolved with 2D filters)

The stem follows ``input_size`` as in 2D: up to 64 (MedMNIST3D's 28 and 64) a 3x3(x3) stride-1 conv and no max-pool,
larger a 7x7(x7) stride-2 conv and a max-pool. ACS and 2.5D nets have the 2D net's parameters (they are built as
:func:`.acs.convert_2d_to_3d` of it); the 3D net has k times more in each k x k conv. ``norm="group"`` gives the
DP-SGD-compatible variants (GroupNorm, exact per-sample gradients through Opacus' Conv3d rule or ``torch.func``).
"""

from __future__ import annotations

from ..registry import register_backbone
from .acs import convert_2d_to_3d
from .resnet import _OPTIONS, BasicBlock, Bottleneck, ResNet, resnet18, resnet50


@register_backbone("resnet18_3d", equivariant=False, dims=3)
def resnet18_3d(*, in_channels: int, num_classes: int, input_size: int = 28, norm: str = "batch",
                width_multiplier: float = 1.0, depth_multiplier: float = 1.0,
                zero_init_residual: bool = False) -> ResNet:
    """3D ResNet-18 as in MedMNIST v2: 3x3x3 basic blocks [2,2,2,2], widths 64-512 (33.2M params at 1 ch)."""
    return ResNet(in_channels, num_classes, BasicBlock, (2, 2, 2, 2), input_size=input_size, norm=norm,
                  width_multiplier=width_multiplier, depth_multiplier=depth_multiplier,
                  zero_init_residual=zero_init_residual, dims=3)


@register_backbone("resnet50_3d", equivariant=False, dims=3)
def resnet50_3d(*, in_channels: int, num_classes: int, input_size: int = 28, norm: str = "batch",
                width_multiplier: float = 1.0, depth_multiplier: float = 1.0,
                zero_init_residual: bool = False) -> ResNet:
    """3D ResNet-50 as in MedMNIST v2: bottlenecks [3,4,6,3] with 3x3x3 convs, widths 64-512 x4 (46.2M params)."""
    return ResNet(in_channels, num_classes, Bottleneck, (3, 4, 6, 3), input_size=input_size, norm=norm,
                  width_multiplier=width_multiplier, depth_multiplier=depth_multiplier,
                  zero_init_residual=zero_init_residual, dims=3)


def _converted(name: str, base, mode: str, doc: str):
    """Register ``name``: the 2D ``base`` ResNet built with the same options, converted to 3D by ``mode``."""
    def factory(*, in_channels: int, num_classes: int, input_size: int = 28, norm: str = "batch",
                width_multiplier: float = 1.0, depth_multiplier: float = 1.0,
                zero_init_residual: bool = False) -> ResNet:
        return convert_2d_to_3d(base(in_channels=in_channels, num_classes=num_classes, input_size=input_size,
                                     norm=norm, width_multiplier=width_multiplier, depth_multiplier=depth_multiplier,
                                     zero_init_residual=zero_init_residual), mode)

    factory.__name__ = factory.__qualname__ = name
    factory.__doc__ = doc
    return register_backbone(name, equivariant=False, dims=3)(factory)


resnet18_acs = _converted("resnet18_acs", resnet18, "acs", """ResNet-18 with ACS convolutions (MedMNIST v2's "ACS"): resnet18's 11.2M params, kernels over 3 planes.""")
resnet50_acs = _converted("resnet50_acs", resnet50, "acs", """ResNet-50 with ACS convolutions (MedMNIST v2's "ACS"): resnet50's 23.5M params, kernels over 3 planes.""")
resnet18_25d = _converted("resnet18_25d", resnet18, "2.5d", """ResNet-18 with 2.5D (1 x k x k) convolutions (MedMNIST v2's "2.5D"): resnet18's 11.2M params.""")
resnet50_25d = _converted("resnet50_25d", resnet50, "2.5d", """ResNet-50 with 2.5D (1 x k x k) convolutions (MedMNIST v2's "2.5D"): resnet50's 23.5M params.""")


for _fn in (resnet18_3d, resnet50_3d, resnet18_acs, resnet50_acs, resnet18_25d, resnet50_25d):
    _fn.__doc__ += "\n\n    " + _OPTIONS.replace("3x3 stride-1 stem", "3x3(x3) stride-1 stem").replace(
        "7x7 stride-2 stem", "7x7(x7) stride-2 stem")
