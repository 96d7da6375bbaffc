"""Symmetry groups of volumes by name, and their exact action on the voxel grid.

``"O"`` is the octahedral group: the 24 rotations of the cube, which map the voxel grid onto itself, so layers built
on it are exactly equivariant at every size. ``"Oh"`` adds the reflections (48 elements). ``"SO3"`` (all rotations)
and ``"O3"`` (with reflections) are continuous: their fields are band-limited (the Fourier coefficients of a function
on the group up to frequency ``band_limit``); they are exact on the voxel grid for the 24 (48) grid elements and only
approximately (up to discretisation) for other rotations. ``"C1"`` is the trivial group (a plain 3D CNN).

Volumes are tensors ``(..., D, H, W)``; as in escnn, array axes are ``(-z, -y, x)`` of the group's (x, y, z).
"""

from __future__ import annotations

import re
from functools import lru_cache

import numpy as np
import torch

from ._escnn import enn, gspaces

#: canonical name -> (builder, order or None for continuous groups, description)
GROUPS_3D = {
    "O": (lambda L: gspaces.octaOnR3(), 24, "the 24 rotations of the cube"),
    "Oh": (lambda L: gspaces.fullOctaOnR3(), 48, "the 24 rotations of the cube and their reflections (48)"),
    "SO3": (lambda L: gspaces.rot3dOnR3(maximum_frequency=L), None, "all 3D rotations (band-limited fields)"),
    "O3": (lambda L: gspaces.flipRot3dOnR3(maximum_frequency=L), None, "all 3D rotations and reflections"),
    "C1": (lambda L: gspaces.trivialOnR3(), 1, "no symmetry (a plain 3D CNN)"),
}
_ALIASES = {"O": "O", "OCTA": "O", "OH": "Oh", "FULLO": "Oh", "FULLOCTA": "Oh", "SO3": "SO3", "SO(3)": "SO3",
            "O3": "O3", "O(3)": "O3", "C1": "C1", "TRIVIAL": "C1"}
_CONTINUOUS = ("SO3", "O3")
#: escnn's fibre group class of each named group's gspace
_FIBER_CLASS = {"O": "Octahedral", "Oh": "DirectProductGroup", "SO3": "SO3", "O3": "O3", "C1": "CyclicGroup"}


def canonical_group3d(name: str) -> str:
    """``"oh"`` -> ``"Oh"``; raises a ValueError naming the 3D groups otherwise."""
    key = re.sub(r"[\s_-]", "", str(name)).upper()
    if key not in _ALIASES:
        raise ValueError(f"unknown 3D symmetry group {name!r}: use one of " +
                         ", ".join(f"'{n}' ({d})" for n, (_, _, d) in GROUPS_3D.items()))
    return _ALIASES[key]


def is_continuous(name: str) -> bool:
    return canonical_group3d(name) in _CONTINUOUS


@lru_cache(maxsize=None)
def group_gspace3d(name: str, band_limit: int = 2):
    """The escnn gspace of a named 3D group (``band_limit`` only matters for SO3 / O3)."""
    canonical = canonical_group3d(name)
    if isinstance(band_limit, bool) or not isinstance(band_limit, int) or band_limit < 0:
        raise ValueError(f"band_limit must be an int >= 0 (the highest frequency of SO(3) fields), got {band_limit!r}")
    return GROUPS_3D[canonical][0](band_limit if canonical in _CONTINUOUS else 2)


def gspace3d_name(gspace) -> str:
    """Name of a 3D gspace's group (``"O"``, ``"Oh"``, ``"SO3"``, ``"O3"``, ``"C1"``)."""
    kind = type(gspace.fibergroup).__name__  # build only the candidate's gspace (building O costs seconds)
    candidates = [name for name, cls in _FIBER_CLASS.items() if cls == kind] or list(GROUPS_3D)
    for name in candidates:
        if group_gspace3d(name)._sg_id == gspace._sg_id:
            return name
    raise ValueError(f"unsupported 3D gspace {gspace} (supported: {', '.join(GROUPS_3D)})")


def band_limit_of(reprs) -> int:
    """The highest SO(3) frequency among the irreps of some escnn representations (2 when there is none)."""
    freqs = [int(irr[-1]) for rep in reprs for irr in rep.irreps if len(irr) and isinstance(irr[-1], (int, np.integer))]
    return max(freqs, default=2)


def field_type3d(group, kind: str = "regular", count: int = 1, band_limit: int = 2):
    """``count`` fields of one kind: ``"regular"`` (for SO3/O3 the band-limited regular representation, i.e. a
    function on the group given by its Fourier coefficients up to frequency ``band_limit``) or ``"trivial"``."""
    gs = group_gspace3d(group, band_limit) if isinstance(group, str) else group
    if kind == "trivial":
        rep = gs.trivial_repr
    elif kind == "regular":
        if gs.fibergroup.order() > 0:
            rep = gs.regular_repr
        else:
            rep = gs.fibergroup.bl_regular_representation(band_limit)
    else:
        raise ValueError(f"unknown field kind {kind!r}: use 'regular' or 'trivial'")
    return enn.FieldType(gs, [rep] * int(count))


def _array_matrix(gspace, element) -> np.ndarray:
    """The element's action on centred array positions ``(-z, -y, x)`` (a signed permutation on grid elements)."""
    to_array = np.array([[0.0, 0.0, -1.0], [0.0, -1.0, 0.0], [1.0, 0.0, 0.0]])
    return to_array @ np.asarray(gspace.basespace_action(element)) @ to_array.T


def voxel_elements(gspace) -> list:
    """The group elements that map the voxel grid onto itself: all of O / Oh, the 24 (SO3) or 48 (O3) cube
    symmetries of a continuous group, the identity of C1. Layers are exact for these at any size."""
    group = gspace.fibergroup
    if group.order() > 0:
        candidates = list(group.elements)
    else:
        candidates = list(group.grid("cube"))
    exact = []
    for g in candidates:
        m = _array_matrix(gspace, g)
        if np.all(np.isclose(np.abs(m), 0) | np.isclose(np.abs(m), 1)) and np.allclose(np.abs(m).sum(0), 1):
            exact.append(g)
    return exact


def voxel_map(size: int, matrix: np.ndarray) -> np.ndarray:
    """For each voxel of a ``size^3`` grid (flat, row-major), the flat index of the voxel at ``matrix @ position``
    (positions centred on the grid's middle)."""
    coords = 2 * np.indices((size,) * 3).reshape(3, -1) - (size - 1)  # doubled centred positions: integers
    moved = np.rint(matrix @ coords).astype(int)
    idx = (moved + size - 1) // 2
    return (idx[0] * size + idx[1]) * size + idx[2]


def transform_volume(x: torch.Tensor, matrix: np.ndarray) -> torch.Tensor:
    """``x'(p) = x(matrix^-1 p)`` on the last three (equal) axes: a rotation/reflection of the voxel grid."""
    size = x.shape[-1]
    if x.shape[-3:] != (size,) * 3:
        raise ValueError(f"grid rotations need a cubic volume (..., S, S, S), got shape {tuple(x.shape)}")
    inverse = np.linalg.inv(matrix)
    if size > 1 and not np.allclose(inverse, np.rint(inverse)):
        raise ValueError("only rotations/reflections that map the voxel grid onto itself act exactly on volumes "
                         "larger than 1x1x1")
    index = torch.as_tensor(voxel_map(size, np.rint(inverse)), device=x.device)
    return x.flatten(-3).index_select(-1, index).view(x.shape)


def volume_symmetries(group: str) -> dict:
    """The voxel-grid transforms ``(..., S, S, S) -> (..., S, S, S)`` of a named 3D group: 24 for O / SO3, 48 for
    Oh / O3, the identity for C1. Keys name the element by its signed-permutation matrix on array axes."""
    gs = group_gspace3d(group)
    transforms = {}
    for g in voxel_elements(gs):
        m = np.rint(_array_matrix(gs, g)).astype(int)
        transforms[str(m.tolist())] = lambda x, m=m: transform_volume(x, m)
    return transforms


def transform_fields(x: torch.Tensor, field_type_, element) -> torch.Tensor:
    """escnn's action of a grid element on a tensor of fields ``(N, C, S, S, S)``: the representation on the
    channels and the grid rotation on the voxels (exact, no interpolation)."""
    gs = field_type_.gspace
    blocks = [_rep_matrix(rep, element) for rep in field_type_.representations]
    rho = torch.block_diag(*blocks).to(dtype=x.dtype, device=x.device)
    moved = transform_volume(x, _array_matrix(gs, element))
    return torch.einsum("oc,nc...->no...", rho, moved)


def restrict3d(field_type_, target: str):
    """Restrict 3D fields to a subgroup: ``(restricted field type, channel order or None)``.

    Supported: any group to itself or to ``C1`` (every channel becomes a scalar field), and ``Oh`` to ``O`` (a
    regular Oh field is two regular O fields, one per coset of the inversion; the channels are reordered so that each
    is in O's own regular order). escnn 1.0.11 does not restrict 3D gspaces (``_combine_subgroups`` is not
    implemented), so this is done here, and checked by the equivariance tests.
    """
    source, target = gspace3d_name(field_type_.gspace), canonical_group3d(target)
    if source == target:
        return field_type_, None
    if target == "C1":
        return field_type3d("C1", "trivial", field_type_.size), None
    if (source, target) != ("Oh", "O"):
        raise ValueError(f"cannot restrict {source} to {target}: supported restrictions are Oh -> O and any group "
                         "-> C1 (escnn has no 3D subgroup restriction for the others)")
    reg_o, order, position = _oh_to_o_regular(), [], 0
    fields = []
    for rep in field_type_.representations:
        if rep.name == field_type_.gspace.trivial_repr.name:
            fields.append(group_gspace3d("O").trivial_repr)
            order.append(position)
        elif rep.name == field_type_.gspace.regular_repr.name:
            fields.extend([group_gspace3d("O").regular_repr] * 2)
            order.extend(position + int(c) for c in reg_o)
        else:
            raise ValueError(f"Oh -> O restriction supports regular and trivial fields, got {rep.name!r}")
        position += rep.size
    return enn.FieldType(group_gspace3d("O"), fields), order


@lru_cache(maxsize=1)
def _oh_to_o_regular() -> tuple:
    """Order of a regular Oh field's 48 channels that makes it two regular O fields (verified on every element)."""
    oh, o = group_gspace3d("Oh"), group_gspace3d("O")
    big, small = oh.fibergroup, o.fibergroup
    _, inclusion, _ = big.subgroup((1, "octa"))
    reg_big, reg_small = oh.regular_repr, o.regular_repr
    # a regular field's channel for element g is where reg(g) sends the identity's channel
    channel = {g: int(np.argmax(reg_big(g)[:, 0])) for g in big.elements}
    inside = {inclusion(h) for h in small.elements}
    others = [g for g in big.elements if g not in inside]
    small_channel = {h: int(np.argmax(reg_small(h)[:, 0])) for h in small.elements}
    by_channel = sorted(small.elements, key=lambda h: small_channel[h])
    order = tuple(channel[inclusion(h) @ coset] for coset in (big.identity, others[0]) for h in by_channel)
    perm = np.asarray(order)
    target = np.zeros((48, 48))
    for h in small.elements:
        m = reg_big(inclusion(h))[np.ix_(perm, perm)]
        target[:24, :24] = target[24:, 24:] = reg_small(h)
        if not np.allclose(m, target) or not np.allclose(oh.basespace_action(inclusion(h)), o.basespace_action(h)):
            raise RuntimeError("escnn's Oh -> O embedding changed: the regular-field channel order no longer matches "
                               "(eqlightning.nn.groups3d._oh_to_o_regular); pin escnn==1.0.11")
    return order


_REP_MATRICES: dict = {}


def _rep_matrix(rep, element) -> torch.Tensor:
    """``rep(element)`` as a float64 tensor, memoised (escnn recomputes it from the irreps on every call)."""
    key = (rep.group.name, rep.name, element)
    if key not in _REP_MATRICES:
        _REP_MATRICES[key] = torch.as_tensor(np.asarray(rep(element)), dtype=torch.float64)
    return _REP_MATRICES[key]
