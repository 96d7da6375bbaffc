"""Backbone registry: ``create_backbone(name, in_channels=..., num_classes=..., **kwargs)`` and ``list_backbones()``.

A backbone maps images ``(N, in_channels, H, W)`` (a 3D backbone: volumes ``(N, in_channels, D, H, W)``) to logits
``(N, num_classes)`` and has an attribute ``group``: the name of the group its logits are invariant to (``"C8"``,
``"D4"``, ``"O"``, ...; the last stage's group when the backbone restricts between stages), or ``None`` for plain
backbones. Entries say their spatial dimensions (``dims``: 2 or 3). Families register their entry points with
:func:`register_backbone` at the bottom of their own file; every registered name is covered by the parametrised
tests in ``tests/models``.
"""

from __future__ import annotations

import difflib
import fnmatch
from dataclasses import dataclass
from typing import Callable

from torch import nn


@dataclass(frozen=True)
class BackboneEntry:
    name: str
    fn: Callable[..., nn.Module]
    equivariant: bool
    description: str
    dims: int = 2


_REGISTRY: dict[str, BackboneEntry] = {}


def register_backbone(name: str | None = None, *, equivariant: bool, dims: int = 2):
    """Decorator registering a factory ``fn(*, in_channels, num_classes, **kwargs) -> nn.Module`` for images
    (``dims=2``) or volumes (``dims=3``)."""
    if dims not in (2, 3):
        raise ValueError(f"dims must be 2 (images) or 3 (volumes), got {dims!r}")

    def decorator(fn):
        key = name or fn.__name__
        if key in _REGISTRY:
            raise ValueError(f"backbone {key!r} is already registered (by {_REGISTRY[key].fn.__module__})")
        doc = (fn.__doc__ or "").strip().splitlines()
        _REGISTRY[key] = BackboneEntry(key, fn, equivariant, doc[0] if doc else "", dims)
        return fn

    return decorator


def _ensure_families_loaded() -> None:
    from . import eq_nasnet, eq_resnet, eq_resnet3d, plain  # noqa: F401  (importing registers the entry points)


def list_backbones(pattern: str = "*", equivariant: bool | None = None, dims: int | None = None) -> list[str]:
    """Registered backbone names matching a glob ``pattern``, optionally only (non-)equivariant ones, or only those
    for images (``dims=2``) or volumes (``dims=3``)."""
    _ensure_families_loaded()
    return sorted(n for n, e in _REGISTRY.items()
                  if fnmatch.fnmatch(n, pattern) and (equivariant is None or e.equivariant == equivariant)
                  and (dims is None or e.dims == dims))


def backbone_entry(name: str) -> BackboneEntry:
    _ensure_families_loaded()
    if name not in _REGISTRY:
        close = difflib.get_close_matches(name, _REGISTRY, n=3)
        hint = f" Did you mean {', '.join(map(repr, close))}?" if close else ""
        raise ValueError(f"unknown backbone {name!r}.{hint} Registered: {', '.join(sorted(_REGISTRY))}")
    return _REGISTRY[name]


def create_backbone(name: str, *, in_channels: int = 1, num_classes: int = 2, **kwargs) -> nn.Module:
    """Build a registered backbone by name; ``kwargs`` go to the family (see each entry point's docstring)."""
    entry = backbone_entry(name)
    _check_common_options(name, in_channels, num_classes, kwargs)
    try:
        model = entry.fn(in_channels=in_channels, num_classes=num_classes, **kwargs)
    except TypeError as err:
        raise TypeError(f"backbone {name!r}: {err}. Its options: {entry.fn.__doc__}") from err
    if not hasattr(model, "group"):
        raise TypeError(f"backbone {name!r} must set the attribute `group` (a group name, or None if plain)")
    model.dims = entry.dims  # 2: images (N, C, H, W); 3: volumes (N, C, D, H, W)
    return model


def _check_common_options(name: str, in_channels, num_classes, options: dict) -> None:
    """Values every family shares, checked before building so a bad one fails with its name, not deep inside."""
    for key, value in (("in_channels", in_channels), ("num_classes", num_classes)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"backbone {name!r}: {key} must be an int >= 1, got {value!r}")
    for key in ("width_multiplier", "depth_multiplier"):
        value = options.get(key)
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0):
            raise ValueError(f"backbone {name!r}: {key} must be a number > 0 (e.g. 0.5 halves it), got {value!r}")
    size = options.get("input_size")
    if size is not None and (isinstance(size, bool) or not isinstance(size, int) or size < 8):
        raise ValueError(f"backbone {name!r}: input_size must be an int >= 8 (the image side in pixels), got {size!r}")
    dropout = options.get("dropout")
    if dropout is not None and not (isinstance(dropout, (int, float)) and 0 <= dropout < 1):
        raise ValueError(f"backbone {name!r}: dropout must be in [0, 1), got {dropout!r}")
