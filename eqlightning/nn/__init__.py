"""Tensor-native equivariant layers built from escnn field types and steerable bases.

Each layer takes and returns plain ``torch.Tensor`` s (so Opacus, ``torch.func`` and DDP work with it), knows its
``in_type`` / ``out_type`` (escnn field types, for testing with escnn's group action) and exports to plain torch
modules with identical outputs.
"""

from .activation import PointwiseNonlinearity, make_activation
from .basis import ConvBasis, conv_basis
from .conv import EquivariantConv2d, EquivariantConv3d, SteerableConv
from .export import export
from .fields import (FieldTypeRecipe, canonical_group, field_type, grid_elements, group_gspace, gspace_name,
                     image_symmetries,
                     parse_group, restrict)
from .mbconv import EquivariantDepthwiseConv2d, FieldGate, FieldSqueezeExcitation
from .module import EquivariantModule
from .norm import FieldBatchNorm, FieldGroupNorm
from .persample import fp32_compute, has_per_sample_rule, promote_fp32
from .groups3d import (GROUPS_3D, canonical_group3d, field_type3d, group_gspace3d, transform_fields,
                       volume_symmetries, voxel_elements)
from .pooling import (ChannelOrder, EquivariantPool2d, EquivariantPool3d, FieldPool, GroupPooling, Restrict,
                      SymmetricDownsample, symmetric_downsample)

__all__ = [
    "EquivariantModule", "SteerableConv", "EquivariantConv2d", "EquivariantConv3d", "EquivariantPool3d", "ChannelOrder",
    "GROUPS_3D", "canonical_group3d", "field_type3d", "group_gspace3d", "transform_fields", "volume_symmetries",
    "voxel_elements", "EquivariantDepthwiseConv2d", "FieldSqueezeExcitation", "FieldGate",
    "FieldGroupNorm", "FieldBatchNorm", "PointwiseNonlinearity",
    "EquivariantPool2d", "GroupPooling", "Restrict", "SymmetricDownsample", "FieldPool", "symmetric_downsample",
    "export", "make_activation", "ConvBasis", "conv_basis", "FieldTypeRecipe", "field_type", "group_gspace",
    "gspace_name", "parse_group", "canonical_group", "restrict", "grid_elements", "image_symmetries",
    "has_per_sample_rule", "fp32_compute", "promote_fp32",
]
from .fourier import FourierFieldNorm, FourierGroupPooling, FourierPointwise

__all__ += ["FourierPointwise", "FourierGroupPooling", "FourierFieldNorm"]
