"""Plain (non-equivariant) baselines, written without torchvision/timm.

Importing this package registers ``resnet18``, ``resnet50`` (:mod:`.resnet`), ``efficientnet_b0``
(:mod:`.efficientnet`), ``vit_tiny`` and ``vit_small`` (:mod:`.vit`) with ``equivariant=False``, and for volumes
(``dims=3``) ``resnet18_3d``, ``resnet50_3d``, ``resnet18_acs``, ``resnet50_acs``, ``resnet18_25d`` and
``resnet50_25d`` (:mod:`.resnet3d`; ACS/2.5D/I3D conversion of any 2D CNN: :func:`.acs.convert_2d_to_3d`).
"""

from .acs import ACSConv, convert_2d_to_3d
from .efficientnet import EfficientNet, efficientnet_b0
from .resnet import ResNet, resnet18, resnet50
from .resnet3d import resnet18_25d, resnet18_3d, resnet18_acs, resnet50_25d, resnet50_3d, resnet50_acs
from .vit import VisionTransformer, vit_small, vit_tiny

__all__ = ["ResNet", "resnet18", "resnet50", "EfficientNet", "efficientnet_b0", "VisionTransformer", "vit_tiny",
           "vit_small", "resnet18_3d", "resnet50_3d", "resnet18_acs", "resnet50_acs", "resnet18_25d",
           "resnet50_25d", "ACSConv", "convert_2d_to_3d"]
