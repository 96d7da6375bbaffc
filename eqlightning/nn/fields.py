"""Symmetry groups by name, and picklable descriptions of escnn field types.

Groups are named as in the literature: ``"C8"`` is the cyclic group of 8 rotations (multiples of 45 degrees),
``"D4"`` the dihedral group of 4 rotations and 4 reflections, ``"D1"`` a single reflection, ``"C1"`` the trivial
group. They act on images as subgroups of O(2) (escnn's ``rot2dOnR2`` / ``flipRot2dOnR2``).

escnn's ``FieldType`` objects cannot be pickled (they hold local closures) and are slow to deep-copy, but
``ddp_spawn``, Opacus's functorch mode and checkpoint tooling pickle or copy modules. Layers therefore store a
:class:`FieldTypeRecipe` (plain, hashable data) and rebuild the escnn object on demand from a per-process cache.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import lru_cache
from typing import Sequence

import numpy as np
import torch

from ._escnn import enn, group as escnn_group, gspaces

_GROUP_NAME = re.compile(r"^([CD])(\d+)$")


def parse_group(name: str) -> tuple[str, int]:
    """``"D4"`` -> ``("D", 4)``; raises a ValueError naming the accepted forms otherwise."""
    match = _GROUP_NAME.match(str(name).strip().upper())
    if match is None or int(match.group(2)) < 1:
        raise ValueError(
            f"unknown symmetry group {name!r}: use 'C<N>' for N rotations (e.g. 'C8') or 'D<N>' for N rotations "
            "and N reflections (e.g. 'D4'), with N >= 1"
        )
    return match.group(1), int(match.group(2))


def canonical_group(name: str) -> str:
    """``" d4 "`` -> ``"D4"``."""
    kind, n = parse_group(name)
    return f"{kind}{n}"


@lru_cache(maxsize=None)
def group_gspace(name: str):
    """The escnn gspace of a named group acting on the plane."""
    kind, n = parse_group(name)
    return gspaces.rot2dOnR2(n) if kind == "C" else gspaces.flipRot2dOnR2(n)


def gspace_name(gspace) -> str:
    """Name of a gspace's group: ``"C8"``, ``"D4"``, ... (also for restricted gspaces); ``"O"``, ``"Oh"``, ... in 3D."""
    if isinstance(gspace, gspaces.GSpace3D):
        from .groups3d import gspace3d_name
        return gspace3d_name(gspace)
    axis, order = gspace._sg_id
    return f"{'C' if axis is None else 'D'}{order}"


def subgroup_id(gspace, target: str):
    """The escnn subgroup id that restricts ``gspace`` to the named group ``target``."""
    source = gspace_name(gspace)
    s_kind, s_n = parse_group(source)
    t_kind, t_n = parse_group(target)
    if s_n % t_n != 0 or (s_kind == "C" and t_kind == "D"):
        raise ValueError(
            f"cannot restrict {source} to {target}: {target} is not a subgroup of {source}. Restrict C<N> to "
            f"C<M> and D<N> to D<M> or C<M>, with M dividing N (e.g. D8 -> D4 -> D1)."
        )
    fiber = gspace.fibergroup
    is_dihedral_fiber = hasattr(fiber, "reflection")  # a restricted D1 is represented by escnn as the cyclic group C2
    if s_kind == "C":
        return t_n
    if not is_dihedral_fiber:  # D1 seen as C2 = {e, flip}: only C1 or itself remain
        return 1 if t_kind == "C" else 2
    return (None, t_n) if t_kind == "C" else (0, t_n)


@dataclass(frozen=True)
class ReprRecipe:
    """A representation as data: its name, irreps, change of basis and supported nonlinearities."""

    name: str
    irreps: tuple
    size: int
    change_of_basis: bytes
    nonlinearities: frozenset

    @classmethod
    def from_escnn(cls, rep) -> "ReprRecipe":
        cob = np.ascontiguousarray(rep.change_of_basis, dtype=np.float64)
        return cls(rep.name, tuple(tuple(i) for i in rep.irreps), rep.size, cob.tobytes(),
                   frozenset(rep.supported_nonlinearities))

    def build(self, group):
        known = group.representations.get(self.name)
        cob = np.frombuffer(self.change_of_basis, dtype=np.float64).reshape(self.size, self.size)
        if known is not None and tuple(tuple(i) for i in known.irreps) == self.irreps and np.allclose(
            known.change_of_basis, cob
        ):
            return known
        return escnn_group.Representation(group, self.name, [tuple(i) for i in self.irreps], cob.copy(),
                                          set(self.nonlinearities))


@dataclass(frozen=True)
class FieldTypeRecipe:
    """A planar escnn ``FieldType`` as hashable, picklable data (gspace subgroup id + representations)."""

    sg_id: tuple
    maximum_frequency: int
    reprs: tuple

    @classmethod
    def from_escnn(cls, field_type) -> "FieldTypeRecipe":
        gs = field_type.gspace
        reprs = tuple(ReprRecipe.from_escnn(r) for r in field_type.representations)
        if isinstance(gs, gspaces.GSpace3D):  # named, since escnn's 3D subgroup ids hold group elements
            from .groups3d import band_limit_of, gspace3d_name, is_continuous
            name = gspace3d_name(gs)
            band = band_limit_of(field_type.representations) if is_continuous(name) else 2
            return cls(("R3", name), band, reprs)
        if not isinstance(gs, gspaces.GSpace2D):
            raise TypeError(f"only planar (GSpace2D) or 3D (GSpace3D) field types are supported, got {gs}")
        return cls(tuple(gs._sg_id), int(getattr(gs, "_maximum_frequency", 6)), reprs)

    def build(self):
        return _build_field_type(self)

    @property
    def size(self) -> int:
        return sum(r.size for r in self.reprs)

    @property
    def dims(self) -> int:
        """Spatial dimensions: 2 for images, 3 for volumes."""
        return 3 if self.sg_id[:1] == ("R3",) else 2


_BUILT: dict = {}


def _build_field_type(recipe: FieldTypeRecipe):
    if recipe not in _BUILT:
        gs = _gspace_from_id(recipe.sg_id, recipe.maximum_frequency)
        reprs = {}
        for r in recipe.reprs:
            if r not in reprs:
                reprs[r] = r.build(gs.fibergroup)
        _BUILT[recipe] = enn.FieldType(gs, [reprs[r] for r in recipe.reprs])
    return _BUILT[recipe]


@lru_cache(maxsize=None)
def _gspace_from_id(sg_id: tuple, maximum_frequency: int):
    if sg_id[:1] == ("R3",):
        from .groups3d import group_gspace3d
        return group_gspace3d(sg_id[1], maximum_frequency)
    return gspaces.GSpace2D(sg_id, maximum_frequency=maximum_frequency)


def as_recipe(field_type) -> FieldTypeRecipe:
    """Accepts an escnn FieldType or a recipe and returns the recipe (registering the built type in the cache)."""
    if isinstance(field_type, FieldTypeRecipe):
        return field_type
    recipe = FieldTypeRecipe.from_escnn(field_type)
    _BUILT.setdefault(recipe, field_type)
    return recipe


def field_type(group, kinds: Sequence[str] | str, count: int = 1):
    """Build a field type of one group: ``field_type("D4", "regular", 8)`` or ``field_type(gs, ["trivial"] * 3)``."""
    gs = group_gspace(group) if isinstance(group, str) else group
    if isinstance(gs, gspaces.GSpace3D):
        from .groups3d import field_type3d
        kinds = [kinds] * count if isinstance(kinds, str) else list(kinds)
        return enn.FieldType(gs, [r for k in kinds for r in field_type3d(gs, k, 1).representations])
    if isinstance(kinds, str):
        kinds = [kinds] * count
    reps = []
    for kind in kinds:
        if kind == "regular":
            reps.append(gs.regular_repr)
        elif kind == "trivial":
            reps.append(gs.trivial_repr)
        else:
            raise ValueError(f"unknown field kind {kind!r}: use 'regular' or 'trivial'")
    return enn.FieldType(gs, reps)


def restrict(field_type_, target: str):
    """Restrict a field type to the named subgroup (the tensor itself does not change)."""
    if gspace_name(field_type_.gspace) == canonical_group(target):
        return field_type_
    return field_type_.restrict(subgroup_id(field_type_.gspace, target))


def field_sizes(field_type_) -> list[int]:
    return [r.size for r in field_type_.representations]


def check_pointwise(field_type_, layer: str) -> None:
    """Raise unless every field transforms by a permutation (regular, trivial or their restrictions)."""
    bad = [r.name for r in field_type_.representations if "pointwise" not in r.supported_nonlinearities]
    if bad:
        raise ValueError(
            f"{layer} needs fields whose representation permutes channels (regular or trivial fields, or their "
            f"restrictions); got {sorted(set(bad))}. Build the field type from 'regular'/'trivial' fields."
        )


def as_field_type(field_type_or_recipe):
    """An escnn FieldType from either a FieldType or a :class:`FieldTypeRecipe`."""
    if isinstance(field_type_or_recipe, FieldTypeRecipe):
        return field_type_or_recipe.build()
    return field_type_or_recipe


def grid_elements(gspace) -> list:
    """The group elements that map the pixel grid onto itself (rotations by multiples of 90 degrees, grid flips).

    Layers are exactly equivariant to these at any spatial size; other elements (e.g. 45 degrees in C8) are only
    exact at 1x1 spatial size.
    """
    if isinstance(gspace, gspaces.GSpace3D):
        from .groups3d import voxel_elements
        return voxel_elements(gspace)
    action = gspace.basespace_action
    exact = []
    for g in gspace.fibergroup.elements:
        m = np.asarray(action(g))
        if np.all(np.isclose(np.abs(m), 0) | np.isclose(np.abs(m), 1)) and np.allclose(np.abs(m).sum(0), 1):
            exact.append(g)
    return exact


def image_symmetries(group: str) -> dict:
    """The torch image transforms ``(N, C, H, W) -> (N, C, H, W)`` in a group that map the pixel grid onto itself.

    Rotations by 90 degrees (``torch.rot90``) belong to C_N / D_N when 4 divides N, by 180 degrees when 2 does;
    D_N contains the flip of the W axis (escnn's reflection axis) and, for even N, also that of the H axis.
    """
    kind, n = parse_group(group)
    transforms = {}
    for k in (1, 2, 3):
        if (n * k) % 4 == 0:
            transforms[f"rot{90 * k}"] = lambda x, k=k: torch.rot90(x, k, dims=(-2, -1))
    if kind == "D":
        transforms["flip_w"] = lambda x: torch.flip(x, dims=(-1,))
        if n % 2 == 0:
            transforms["flip_h"] = lambda x: torch.flip(x, dims=(-2,))
    return transforms
