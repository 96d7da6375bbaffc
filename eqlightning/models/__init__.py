"""Backbones (equivariant and plain) behind one registry."""

from .profile import Profile, count_parameters, profile_backbone
from .registry import backbone_entry, create_backbone, list_backbones, register_backbone
from .scaling import compound_scaling

__all__ = ["create_backbone", "list_backbones", "register_backbone", "backbone_entry", "profile_backbone",
           "count_parameters", "Profile", "compound_scaling"]
