"""Plain (non-equivariant) baselines, written without torchvision/timm.

Importing this package registers ``resnet18``, ``resnet50`` (:mod:`.resnet`), ``efficientnet_b0``
(:mod:`.efficientnet`), ``vit_tiny`` and ``vit_small`` (:mod:`.vit`) with ``equivariant=False``.
"""

from .efficientnet import EfficientNet, efficientnet_b0
from .resnet import ResNet, resnet18, resnet50
from .vit import VisionTransformer, vit_small, vit_tiny

__all__ = ["ResNet", "resnet18", "resnet50", "EfficientNet", "efficientnet_b0", "VisionTransformer", "vit_tiny",
           "vit_small"]
