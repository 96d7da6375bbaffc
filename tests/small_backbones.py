"""Small, DP-compatible versions of every registered backbone, shared by the precision and strategy tests.

Width/depth shrink the networks so a whole-zoo test stays fast; GroupNorm replaces batch norm where a factory offers
the choice (DP-SGD needs per-sample independence); dropout is off so runs are comparable.
"""

from __future__ import annotations

import inspect

from eqlightning.models import backbone_entry, create_backbone, list_backbones

SMALL = {
    "eq_resnet8": {"group": "D4", "width_multiplier": 0.5},
    "eq_resnet18": {"group": "C4", "width_multiplier": 0.25},
    "eq_resnet50": {"group": ["D4", "D4", "D1", "D1"], "width_multiplier": 0.125},
    "eq_nasnet": {"width_multiplier": 0.5},  # the default groups: C4, C4, C4, then C1 (a restriction)
    "resnet18": {"width_multiplier": 0.125},
    "resnet50": {"width_multiplier": 0.125},
    "efficientnet_b0": {"width_multiplier": 0.25},
    "vit_tiny": {"dim": 32, "depth": 1, "heads": 2},
    "vit_small": {"dim": 32, "depth": 1, "heads": 2},
}


def small_options(name: str, table: dict | None = None) -> dict:
    """Options for a small, DP-compatible ``name`` (from ``SMALL``, or ``table``); fails for a backbone registered
    without an entry there."""
    table = SMALL if table is None else table
    if name not in table:
        raise KeyError(f"backbone {name!r} has no small test configuration: add one to tests/small_backbones.py")
    options = dict(table[name])
    accepted = inspect.signature(backbone_entry(name).fn).parameters
    if "norm" in accepted or backbone_entry(name).equivariant:
        options["norm"] = "group"
    if "dropout" in accepted:
        options["dropout"] = 0.0
    return options


def small_backbone(name: str, in_channels: int = 1, num_classes: int = 2, input_size: int = 28):
    return create_backbone(name, in_channels=in_channels, num_classes=num_classes, input_size=input_size,
                           **small_options(name))


ALL = list_backbones(dims=2)

#: 3D backbones (volumes): small widths, GroupNorm (DP-compatible)
SMALL_3D = {
    "eq_resnet8_3d": {"group": "O", "width_multiplier": 0.5},
    "eq_resnet18_3d": {"group": ["Oh", "Oh", "O", "O"], "width_multiplier": 0.125},
    "eq_resnet50_3d": {"group": "O", "width_multiplier": 0.05},
    **{name: {"width_multiplier": 0.125, "depth_multiplier": 0.1}
       for name in ("resnet18_3d", "resnet50_3d", "resnet18_acs", "resnet50_acs", "resnet18_25d", "resnet50_25d")},
}


def small_options3d(name: str) -> dict:
    """Options for a small, DP-compatible 3D ``name`` (``SMALL_3D``)."""
    return small_options(name, SMALL_3D)


ALL_3D = list_backbones(dims=3)
#: the 3D backbones the multi-process strategy tests train (an equivariant and a plain one keep them short)
DDP_3D = ["eq_resnet8_3d", "resnet18_3d"]


def small_backbone3d(name: str, in_channels: int = 1, num_classes: int = 2, input_size: int = 8):
    return create_backbone(name, in_channels=in_channels, num_classes=num_classes, input_size=input_size,
                           **small_options3d(name))
