"""Per-sample gradient mechanisms, by name: ``fused`` (default), ``hooks``, ``functorch``.

A mechanism is one file here with a :class:`~.base.Mechanism` subclass decorated by ``@register_mechanism(name)``,
plus its import line below. See :mod:`.base` for the interface and the engine for what it is spared.
"""

from __future__ import annotations

from .base import Mechanism

_REGISTRY: dict[str, type[Mechanism]] = {}


def register_mechanism(name: str):
    """Class decorator: make a :class:`Mechanism` available as ``DifferentialPrivacy(grad_sample_mode=name)``."""
    def decorate(cls: type[Mechanism]) -> type[Mechanism]:
        if name in _REGISTRY and _REGISTRY[name] is not cls:
            raise ValueError(f"a per-sample gradient mechanism named {name!r} is already registered "
                             f"({_REGISTRY[name].__qualname__})")
        cls.name = name
        _REGISTRY[name] = cls
        return cls
    return decorate


def list_mechanisms() -> list[str]:
    return sorted(_REGISTRY)


def create_mechanism(name: str) -> Mechanism:
    if name not in _REGISTRY:
        raise ValueError(f"unknown per-sample gradient mechanism {name!r}: use one of {list_mechanisms()}")
    return _REGISTRY[name]()


# the registry lines: one per mechanism
from . import functorch, fused, hooks  # noqa: E402,F401

__all__ = ["Mechanism", "register_mechanism", "list_mechanisms", "create_mechanism"]
