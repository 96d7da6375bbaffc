"""Layers for band-limited SO(3) / O(3) fields: Fourier nonlinearity, invariant pooling and normalisation.

A band-limited regular field (``field_type3d("SO3", "regular", n, band_limit=L)``) holds, at every voxel, the Fourier
coefficients of a function on the group up to frequency ``L``: for each irrep ``l`` (O(3): each pair ``(j, l)``) a
``(2l+1) x (2l+1)`` block, stored as ``2l+1`` consecutive copies of the irrep (35 channels for SO(3) and ``L = 2``,
70 for O(3)). A rotation ``h`` acts on each copy by the irrep's matrix ``D_l(h)``; it moves the function: ``f(g) ->
f(h^-1 g)``. The channels do not permute, so pointwise nonlinearities, max pooling and the field norms of
:mod:`eqlightning.nn.norm` do not apply; this module provides their counterparts:

* :class:`FourierPointwise` samples each field's function on a finite grid of the group (inverse Fourier
  transform, ``A``), applies a pointwise nonlinearity there and transforms back (``A^+``): escnn's
  ``FourierPointwise`` / ``FourierELU``. On the default grid (escnn's ``thomson_cube`` with 4 seeds: 96 rotations,
  closed under the 24 rotations of the cube) it is exactly equivariant to the 24 (O(3): 48) voxel-grid elements and
  approximately to other rotations (aliasing of the nonlinearity on the finite grid).
* :class:`FourierGroupPooling` makes invariant features: per field, the signed frequency-0 coefficient and the norm
  of every other frequency band (exactly invariant to every rotation), or the maximum over the grid samples.
* :class:`FourierFieldNorm` normalises each sample's fields by groups: the frequency-0 channels are centred, every
  channel is divided by the group's root-mean-square; exactly equivariant to every rotation, with an exact
  per-sample gradient rule for DP-SGD.

Like the convolutions, the layers hold no escnn objects and no buffers: the sampling matrices are computed once per
process (and device / dtype) from a hashable key and looked up on each forward, so the layers pickle, deep-copy and
work with Opacus's functorch mode and DDP. ``export()`` gives plain torch modules (those hold the matrices as
buffers) with identical outputs.

Measured (escnn 1.0.11, float32, 2 CPU cores): on the 24 (48) voxel-grid elements every layer is exact to ~1e-6 at
any size. Off the grid (random rotations at 1x1x1, random inputs), the nonlinearity's mean relative error per field
is 0.7% (L=1) and 8% (L=2) with ELU on 96 points, 3% / 17% with ReLU; escnn's module gives the same numbers. Band
norms and the field norm stay exact (~1e-6) for every rotation; grid max pooling does not (errors ~0.4-1.2 on unit
inputs). A linear probe on random SO(3) features of rotated synthetic ellipsoids (4 classes) scored higher with band
norms than with grid max pooling in all 5 runs (accuracy 0.80-0.95 vs 0.74-0.92).

The ``thomson_cube`` grids are numerical optimisations (escnn caches them on disk in its own package folder; the 96
rotation grid took 40-150 s to compute cold on 2 cores). The 4 seeds of the default grid are stored here (copied from
escnn 1.0.11's result), so the default grid costs nothing cold and is the same on every machine: a checkpoint stores
no sampling matrices, so a grid recomputed differently elsewhere would silently change a trained model. Other grids
come from escnn (``G.grid(grid, grid_size)``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from .activation import make_activation
from .fields import FieldTypeRecipe, ReprRecipe, as_recipe
from .module import EquivariantModule
from .norm import default_num_groups
from .persample import fp32_compute

#: escnn 1.0.11's ``SO3.grid("thomson_cube", 4)`` is the orbit of these 4 unit quaternions (x, y, z, w) under the 24
#: rotations of the cube (scipy's ``Rotation.create_group("O")``), in that order: element ``g * 4 + s`` is
#: ``cube[g] * seed[s]``. (escnn's elements are float32 results: they agree with this orbit to 1.3e-7.)
_THOMSON_CUBE_SEEDS = {
    4: ((0.4452417281707014, -0.6228033008844959, 0.2984000898940016, -0.5699414340563382),
        (-0.6232512907780388, 0.5613792285056356, 0.45143512832372096, -0.30433125909323183),
        (-0.7700483037369562, -0.19475180982048598, 0.3947472785477006, 0.4618137379535887),
        (-0.06951602316812437, -0.5312734665340473, -0.6829818259675432, -0.4964391721830843)),
}
_GRIDS_WITHOUT_SIZE = ("cube", "ico", "tetra")
_DEFAULT_GRID_SIZE = {"thomson_cube": 4}


# ----------------------------------------------------------------------------------------------------------------
# Field checks
# ----------------------------------------------------------------------------------------------------------------

def _continuous_group(recipe: FieldTypeRecipe, layer: str) -> str:
    """The group name (``"SO3"`` / ``"O3"``) of 3D band-limited fields; a clear error for anything else."""
    name = recipe.sg_id[1] if recipe.sg_id[:1] == ("R3",) else None
    if name not in ("SO3", "O3"):
        where = f"the 3D group {name!r}" if name is not None else "planar fields"
        hint = (" (finite groups have regular fields that permute channels: use PointwiseNonlinearity, GroupPooling, "
                "FieldGroupNorm)" if name is not None else "")
        raise ValueError(f"{layer} works on band-limited SO3 / O3 fields (field_type3d('SO3', 'regular', n, "
                         f"band_limit=L)); got {where}{hint}")
    return name


def _single_repr(recipe: FieldTypeRecipe, layer: str) -> ReprRecipe:
    reprs = set(recipe.reprs)
    if len(reprs) != 1:
        raise ValueError(f"{layer} needs fields of one representation, got {sorted(r.name for r in reprs)}; apply "
                         "one layer per kind of field")
    return recipe.reprs[0]


def _irrep_runs(rep: ReprRecipe) -> list[tuple[tuple, int, int]]:
    """``[(irrep id, first channel, stop), ...]``: the maximal runs of equal consecutive irreps."""
    runs, start = [], 0
    sizes = _irrep_sizes(rep)
    for irrep, size in zip(rep.irreps, sizes):
        if runs and runs[-1][0] == irrep and runs[-1][2] == start:
            runs[-1] = (irrep, runs[-1][1], start + size)
        else:
            runs.append((irrep, start, start + size))
        start += size
    return runs


def _irrep_sizes(rep: ReprRecipe) -> list[int]:
    """Sizes of the irreps of a continuous 3D group: ``2l+1`` (the id's last entry is the frequency ``l``)."""
    return [2 * int(irrep[-1]) + 1 for irrep in rep.irreps]


def _is_trivial(irrep: tuple, group: str) -> bool:
    return tuple(irrep) == ((0,) if group == "SO3" else (0, 0))


def _check_identity_basis(rep: ReprRecipe, layer: str) -> None:
    cob = np.frombuffer(rep.change_of_basis, dtype=np.float64).reshape(rep.size, rep.size)
    if not np.allclose(cob, np.eye(rep.size)):
        raise ValueError(f"{layer} needs fields stored as direct sums of irreps (identity change of basis, as "
                         f"field_type3d builds them); {rep.name!r} has another basis")


def _check_spectral_regular(rep: ReprRecipe, layer: str) -> list[tuple[tuple, int, int]]:
    """Raise unless ``rep`` is a band-limited regular representation (each irrep ``l`` present ``2l+1`` times, in a
    row); returns its frequency bands."""
    _check_identity_basis(rep, layer)
    runs = _irrep_runs(rep)
    ids = [irrep for irrep, _, _ in runs]
    sizes = dict(zip(rep.irreps, _irrep_sizes(rep)))
    bad = [irrep for irrep, start, stop in runs if stop - start != sizes[irrep] ** 2]
    if bad or len(set(ids)) != len(ids):
        raise ValueError(
            f"{layer} needs band-limited regular fields (the Fourier coefficients of a function on the group: each "
            f"irrep l repeated 2l+1 times, as field_type3d(group, 'regular', n, band_limit=L) builds them); got "
            f"{rep.name!r} with irreps {list(rep.irreps)}")
    return runs


# ----------------------------------------------------------------------------------------------------------------
# Sampling matrices (per-process cache)
# ----------------------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class SamplingKey:
    """What determines a Fourier sampling: the field representation (with its group) and the grid."""

    sg_id: tuple
    maximum_frequency: int
    rep: ReprRecipe
    grid: str
    grid_size: int | None


@dataclass
class Sampling:
    """The inverse Fourier transform ``A`` (``(points, size)``: field coefficients -> samples on the grid) and its
    pseudo-inverse ``A_inv`` (``(size, points)``), float64; ``exact`` tells whether the grid is closed under the
    voxel-grid elements (then the nonlinearity is exactly equivariant to them)."""

    A: torch.Tensor
    A_inv: torch.Tensor
    exact: bool
    seconds: float


_SAMPLINGS: dict = {}
_ON_DEVICE: dict = {}


def _grid_elements(group, name: str, grid: str, grid_size):
    """The grid's group elements (O3: the SO3 grid, then the same rotations times the inversion, as escnn)."""
    if grid == "thomson_cube" and grid_size in _THOMSON_CUBE_SEEDS:
        from scipy.spatial.transform import Rotation

        cube, seeds = Rotation.create_group("O"), Rotation.from_quat(np.array(_THOMSON_CUBE_SEEDS[grid_size]))
        quats = np.concatenate([(cube[g] * seeds).as_quat() for g in range(len(cube))])
        if name == "SO3":
            return [group.element(q, param="Q") for q in quats]
        return [group.element((j, q), param="Q") for j in (0, 1) for q in quats]
    args = () if grid_size is None else (grid_size,)
    return list(group.grid(grid, *args))


def _closed_under_voxel_elements(gspace, elements) -> bool:
    from scipy.spatial import cKDTree

    from .groups3d import voxel_elements

    std = gspace.fibergroup.standard_representation()  # faithful: O(3) elements as 3x3 orthogonal matrices
    grid = np.stack([np.asarray(std(g)) for g in elements])  # (n, 3, 3)
    moved = np.stack([np.asarray(std(h)) for h in voxel_elements(gspace)])  # (k, 3, 3)
    products = np.einsum("hij,gjk->hgik", moved, grid).reshape(-1, 9)
    distance, _ = cKDTree(grid.reshape(-1, 9)).query(products)
    return bool(distance.max() < 1e-6)


def _build_kernel(group, runs) -> np.ndarray:
    """escnn's ``_build_kernel``: for each band, ``sqrt(d)`` times the identity, copy ``j`` holding ``e_j``."""
    parts = []
    for irrep, start, stop in runs:
        d = group.irrep(*irrep).size
        parts.append((np.eye(d) * np.sqrt(d)).reshape(-1))
    return np.concatenate(parts)


def fourier_sampling(key: SamplingKey) -> Sampling:
    """The sampling matrices of a field representation on a grid, built once per process."""
    if key not in _SAMPLINGS:
        import time

        start = time.perf_counter()
        field = FieldTypeRecipe(key.sg_id, key.maximum_frequency, (key.rep,)).build()
        gspace, rep = field.gspace, field.representations[0]
        group = gspace.fibergroup
        runs = _check_spectral_regular(key.rep, "FourierPointwise")
        kernel = _build_kernel(group, runs)
        kernel = kernel / np.linalg.norm(kernel)  # escnn's normalize=True
        elements = _grid_elements(group, key.sg_id[1], key.grid, key.grid_size)
        A = np.stack([rep(g) @ kernel for g in elements])  # (points, size): row g samples the function at g
        A_inv = np.linalg.inv(A.T @ A + 1e-8 * np.eye(rep.size)) @ A.T  # escnn's regularised pseudo-inverse
        with torch.inference_mode(False):
            _SAMPLINGS[key] = Sampling(torch.from_numpy(A), torch.from_numpy(A_inv),
                                       _closed_under_voxel_elements(gspace, elements), time.perf_counter() - start)
    return _SAMPLINGS[key]


def _on_device(key: SamplingKey, device, dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """``(A, A_inv)`` as tensors of ``device`` / ``dtype``, cast once from the float64 masters (float32: the numbers
    escnn's module holds)."""
    cache_key = (key, torch.device(device), dtype)
    if cache_key not in _ON_DEVICE:
        sampling = fourier_sampling(key)
        with torch.inference_mode(False):
            _ON_DEVICE[cache_key] = (sampling.A.to(device=device, dtype=dtype),
                                     sampling.A_inv.to(device=device, dtype=dtype))
    return _ON_DEVICE[cache_key]


def _resolve_grid(grid: str, grid_size):
    grid = str(grid)
    if grid_size is None:
        grid_size = _DEFAULT_GRID_SIZE.get(grid)
        if grid_size is None and grid not in _GRIDS_WITHOUT_SIZE:
            raise ValueError(f"grid {grid!r} needs a grid_size (see escnn's SO3.grid)")
    elif grid in _GRIDS_WITHOUT_SIZE:
        raise ValueError(f"grid {grid!r} has a fixed size: leave grid_size=None")
    return grid, (None if grid_size is None else int(grid_size))


# ----------------------------------------------------------------------------------------------------------------
# Shared computations (the layers and their exports run the same functions)
# ----------------------------------------------------------------------------------------------------------------

def _fourier_pointwise(x, A, A_inv, act, num_fields: int, field_size: int):
    n, spatial = x.shape[0], x.shape[2:]
    samples = torch.einsum("gs,nfsv->nfgv", A, x.reshape(n, num_fields, field_size, -1))  # escnn's contraction
    out = torch.einsum("sg,nfgv->nfsv", A_inv, act(samples))
    return out.reshape(n, num_fields * field_size, *spatial)


def _band_invariants(x, bands, num_fields: int, field_size: int):
    """Per field and band: the signed coefficient of a one-channel trivial band, else the band's norm."""
    n, spatial = x.shape[0], x.shape[2:]
    fields = x.reshape(n, num_fields, field_size, -1)
    out = [fields[:, :, start] if signed else torch.linalg.vector_norm(fields[:, :, start:stop], dim=2)
           for start, stop, signed in bands]
    return torch.stack(out, dim=2).reshape(n, num_fields * len(bands), *spatial)


def _grid_max(x, A, num_fields: int, field_size: int):
    n, spatial = x.shape[0], x.shape[2:]
    samples = torch.einsum("gs,nfsv->nfgv", A, x.reshape(n, num_fields, field_size, -1))
    return samples.amax(dim=2).reshape(n, num_fields, *spatial)


_MASKS: dict = {}


def _trivial_mask(field_size: int, trivial: tuple, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The trivial channels' index and a ``(size, 1)`` 0/1 mask of them, on ``like``'s device and dtype (cached)."""
    key = (field_size, trivial, like.device, like.dtype)
    if key not in _MASKS:
        with torch.inference_mode(False):
            index = torch.as_tensor(trivial, dtype=torch.long, device=like.device)
            mask = torch.zeros(field_size, 1, dtype=like.dtype, device=like.device).index_fill_(0, index, 1.0)
            _MASKS[key] = (index, mask)
    return _MASKS[key]


def _centre_scale(x, num_groups: int, field_size: int, trivial: tuple, eps: float):
    """``x_hat``: per sample and group, the trivial channels centred, everything divided by the group's RMS."""
    n, voxels = x.shape[0], math.prod(x.shape[2:])
    fields = x.reshape(n, num_groups, -1, field_size, voxels)  # (N, G, fields per group, size, V)
    if trivial:
        index, mask = _trivial_mask(field_size, trivial, x)
        mean = fields.index_select(3, index).mean(dim=(2, 3, 4), keepdim=True)  # (N, G, 1, 1, 1)
        fields = fields - mean * mask
    var = fields.pow(2).mean(dim=(2, 3, 4), keepdim=True)
    return fields * torch.rsqrt(var + eps)  # (N, G, Fg, size, V)


def _fourier_field_norm(x, num_groups: int, field_size: int, trivial: tuple, eps: float, weight, bias):
    x_hat = _centre_scale(x, num_groups, field_size, trivial, eps)
    if weight is not None:
        groups = x_hat.shape[1]
        x_hat = x_hat * weight.view(1, groups, -1, 1, 1)
        if trivial:
            x_hat = x_hat + bias.view(1, groups, -1, 1, 1) * _trivial_mask(field_size, trivial, x_hat)[1]
    return x_hat.reshape(x.shape)


# ----------------------------------------------------------------------------------------------------------------
# Layers
# ----------------------------------------------------------------------------------------------------------------

class FourierPointwise(EquivariantModule):
    r"""A pointwise nonlinearity on band-limited SO(3) / O(3) fields, applied to samples of each field's function on
    a grid of the group (escnn's ``FourierPointwise``; ``function="elu"`` is ``FourierELU``).

    For each field and voxel: ``y = A^+ sigma(A x)`` with ``A`` the ``(points, size)`` inverse Fourier transform onto
    the grid and ``A^+`` escnn's regularised pseudo-inverse ``(A^T A + 1e-8 I)^-1 A^T``; the same numbers as
    ``escnn.nn.FourierPointwise(gspace, fields, G.bl_irreps(L), function="p_" + function, type=grid, N=grid_size)``.

    Args:
        in_type: band-limited regular fields of one representation (``field_type3d("SO3" | "O3", "regular", n,
            band_limit=L)``); the output has the same type.
        function: ``"elu"`` (default), ``"relu"``, ``"gelu"``, ``"silu"``, ``"tanh"``, ... (escnn's ``"p_elu"`` names
            are accepted too).
        grid, grid_size: the sampling grid, as escnn's ``Group.grid(grid, grid_size)``. The default
            ``"thomson_cube"`` with 4 seeds (96 rotations; O(3): 192) is closed under the rotations of the cube, so
            the layer is exactly equivariant to the 24 (48) voxel-grid elements; :attr:`exact_on_voxel_grid` says
            whether a grid is. 96 samples suit ``band_limit <= 2`` (35 coefficients); use more for higher bands.
    """

    def __init__(self, in_type, function: str = "elu", grid: str = "thomson_cube", grid_size: int | None = None):
        super().__init__(in_type)
        recipe = self._in_recipe
        _continuous_group(recipe, "FourierPointwise")
        rep = _single_repr(recipe, "FourierPointwise")
        _check_spectral_regular(rep, "FourierPointwise")
        grid, grid_size = _resolve_grid(grid, grid_size)
        self.function = str(function).removeprefix("p_")
        self.act = make_activation(self.function)
        self.key = SamplingKey(recipe.sg_id, recipe.maximum_frequency, rep, grid, grid_size)
        self.num_fields, self.field_size = len(recipe.reprs), rep.size
        sampling = fourier_sampling(self.key)
        self.grid_points = sampling.A.shape[0]
        self.exact_on_voxel_grid = sampling.exact

    def matrices(self, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(A, A_inv)`` on ``like``'s device and dtype."""
        return _on_device(self.key, like.device, like.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._check_input(x)
        A, A_inv = self.matrices(x)
        return _fourier_pointwise(x, A, A_inv, self.act, self.num_fields, self.field_size)

    def export(self) -> nn.Module:
        sampling = fourier_sampling(self.key)
        return SampledNonlinearity(sampling.A, sampling.A_inv, self.function, self.num_fields)

    def extra_repr(self) -> str:
        return (f"{self.num_fields} fields of {self.field_size}, {self.function} on {self.grid_points} points "
                f"({self.key.grid}{'' if self.key.grid_size is None else f', {self.key.grid_size}'})")


class FourierGroupPooling(EquivariantModule):
    r"""Invariant (trivial) features of band-limited SO(3) / O(3) fields, one group of features per field.

    ``mode="norm"`` (default): for each frequency band of a field (each irrep: ``l = 0, 1, ..., L``; O(3): each
    ``(j, l)``), the Euclidean norm of its ``(2l+1)^2`` coefficients, except that the frequency-0 band (a single
    invariant coefficient: the function's mean) is kept with its sign. These are exactly invariant to every rotation
    (the bands transform by orthogonal matrices), cost no sampling, and give ``L+1`` features per field (O(3):
    ``2(L+1)``). This is the one to use in a classifier: a rotation that is not a voxel-grid element changes them
    only through the convolutions' own approximation, and the signed mean plus the energy per frequency carry more
    than one number per field.

    ``mode="max"``: the maximum of the field's function over the grid samples (as escnn's ``GroupPooling`` does for
    finite groups): one feature per field, exactly invariant to the voxel-grid elements only.

    Output: ``field_type3d(gspace, "trivial", count)`` of the input's gspace; spatial size unchanged.
    """

    def __init__(self, in_type, mode: str = "norm", grid: str = "thomson_cube", grid_size: int | None = None):
        from .groups3d import field_type3d

        recipe = as_recipe(in_type)
        group = _continuous_group(recipe, "FourierGroupPooling")
        rep = _single_repr(recipe, "FourierGroupPooling")
        runs = _check_spectral_regular(rep, "FourierGroupPooling")
        if mode not in ("norm", "max"):
            raise ValueError(f"FourierGroupPooling mode must be 'norm' or 'max', got {mode!r}")
        num_fields = len(recipe.reprs)
        self_bands = tuple((start, stop, stop - start == 1 and _is_trivial(irrep, group))
                           for irrep, start, stop in runs)
        per_field = len(self_bands) if mode == "norm" else 1
        built = recipe.build()
        super().__init__(built, field_type3d(built.gspace, "trivial", num_fields * per_field))
        self.mode, self.num_fields, self.field_size = mode, num_fields, rep.size
        self.bands = self_bands
        self.features_per_field = per_field
        self.key = None
        if mode == "max":
            grid, grid_size = _resolve_grid(grid, grid_size)
            self.key = SamplingKey(recipe.sg_id, recipe.maximum_frequency, rep, grid, grid_size)
            self.exact_on_voxel_grid = fourier_sampling(self.key).exact
        else:
            self.exact_on_voxel_grid = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._check_input(x)
        if self.mode == "norm":
            return _band_invariants(x, self.bands, self.num_fields, self.field_size)
        A, _ = _on_device(self.key, x.device, x.dtype)
        return _grid_max(x, A, self.num_fields, self.field_size)

    def export(self) -> nn.Module:
        if self.mode == "norm":
            return BandInvariants(self.bands, self.num_fields, self.field_size)
        return GridMax(fourier_sampling(self.key).A, self.num_fields)

    def extra_repr(self) -> str:
        return f"{self.num_fields} fields of {self.field_size} -> {self.features_per_field} each, mode={self.mode}"


class FourierFieldNorm(EquivariantModule):
    r"""Per-sample group normalisation of band-limited SO(3) / O(3) fields (or any fields stored as sums of irreps),
    equivariant to every rotation.

    For each sample, the fields are split into ``num_groups`` groups of whole fields. In each group, the mean of the
    frequency-0 (trivial) channels over the group's fields and voxels is subtracted from those channels only (a
    mean over all channels would not be equivariant: the other channels rotate), and every channel is divided by
    ``sqrt(mean of the squared centred values over the group's channels and voxels + eps)`` (a rotation-invariant
    energy, since the irreps act by orthogonal matrices). With ``affine``, field ``f`` is multiplied by
    ``weight[f]`` (all its channels) and ``bias[f]`` is added to its frequency-0 channel.

    Each sample is normalised on its own, so per-sample gradients are well defined (exact rule:
    :meth:`per_sample_gradients`): the normalisation to use under DP-SGD.
    """

    def __init__(self, in_type, num_groups: int | None = None, eps: float = 1e-5, affine: bool = True):
        super().__init__(in_type)
        recipe = self._in_recipe
        group = _continuous_group(recipe, "FourierFieldNorm")
        rep = _single_repr(recipe, "FourierFieldNorm")
        _check_identity_basis(rep, "FourierFieldNorm")
        self.field_size = rep.size
        self.num_fields = len(recipe.reprs)
        channel, trivial = 0, []
        for irrep, size in zip(rep.irreps, _irrep_sizes(rep)):
            if _is_trivial(irrep, group):
                trivial.append(channel)
            channel += size
        self.trivial = tuple(trivial)
        self.num_groups = default_num_groups(self.num_fields) if num_groups is None else int(num_groups)
        if self.num_groups < 1 or self.num_fields % self.num_groups != 0:
            raise ValueError(f"FourierFieldNorm: num_groups={num_groups} must divide the number of fields "
                             f"({self.num_fields}) so that every group holds whole fields")
        self.eps, self.affine = float(eps), bool(affine)
        if affine:
            self.weight = nn.Parameter(torch.ones(self.num_fields))
            self.bias = nn.Parameter(torch.zeros(self.num_fields))
        else:
            self.register_parameter("weight", None)
            self.register_parameter("bias", None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Statistics and output in at least float32 (like ``F.group_norm`` under autocast)."""
        self._check_input(x)
        with fp32_compute(x) as (x,):
            return _fourier_field_norm(x, self.num_groups, self.field_size, self.trivial, self.eps, self.weight,
                                       self.bias)

    def per_sample_gradients(self, inputs, grad_output: torch.Tensor) -> dict:
        """Exact per-sample gradients (see :mod:`eqlightning.nn.persample`): per field, the sum of ``g * x_hat``
        over its channels and voxels (weight) and of ``g`` over its frequency-0 channels and voxels (bias)."""
        result = {}
        if not self.affine:
            return result
        with torch.no_grad(), fp32_compute(inputs[0], grad_output) as (x, g):
            n = x.shape[0]
            g = g.reshape(n, self.num_fields, self.field_size, -1)
            if self.weight.requires_grad:
                x_hat = _centre_scale(x, self.num_groups, self.field_size, self.trivial, self.eps)
                x_hat = x_hat.reshape(g.shape)
                result[self.weight] = (x_hat * g).sum(dim=(2, 3)).to(self.weight.dtype)
            if self.bias.requires_grad:
                if self.trivial:
                    index = _trivial_mask(self.field_size, self.trivial, g)[0]
                    result[self.bias] = g.index_select(2, index).sum(dim=(2, 3)).to(self.bias.dtype)
                else:
                    result[self.bias] = g.new_zeros(n, self.num_fields).to(self.bias.dtype)
        return result

    def export(self) -> nn.Module:
        norm = FieldNormPlain(self.num_groups, self.num_fields, self.field_size, self.trivial, self.eps, self.affine)
        if self.affine:
            norm = norm.to(self.weight)
            with torch.no_grad():
                norm.weight.copy_(self.weight)
                norm.bias.copy_(self.bias)
        return norm

    def extra_repr(self) -> str:
        return (f"{self.num_fields} fields of {self.field_size}, num_groups={self.num_groups}, "
                f"trivial channels {list(self.trivial)}, affine={self.affine}")


# ----------------------------------------------------------------------------------------------------------------
# Plain exports (no escnn types; the sampling matrices become buffers)
# ----------------------------------------------------------------------------------------------------------------

class SampledNonlinearity(nn.Module):
    """Exported :class:`FourierPointwise`: ``A^+ act(A x)`` per field, with ``A`` / ``A^+`` as buffers."""

    def __init__(self, A: torch.Tensor, A_inv: torch.Tensor, function: str, num_fields: int):
        super().__init__()
        self.register_buffer("A", A.detach().clone())
        self.register_buffer("A_inv", A_inv.detach().clone())
        self.function, self.num_fields = function, int(num_fields)
        self.act = make_activation(function)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _fourier_pointwise(x, self.A.to(x), self.A_inv.to(x), self.act, self.num_fields,
                                  self.A.shape[1])

    def extra_repr(self) -> str:
        return f"{self.num_fields} fields of {self.A.shape[1]}, {self.function} on {self.A.shape[0]} points"


class BandInvariants(nn.Module):
    """Exported ``FourierGroupPooling(mode="norm")``: per field, the signed trivial coefficient and band norms."""

    def __init__(self, bands, num_fields: int, field_size: int):
        super().__init__()
        self.bands = tuple((int(a), int(b), bool(s)) for a, b, s in bands)
        self.num_fields, self.field_size = int(num_fields), int(field_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _band_invariants(x, self.bands, self.num_fields, self.field_size)

    def extra_repr(self) -> str:
        return f"{self.num_fields} fields of {self.field_size}, bands {[b[:2] for b in self.bands]}"


class GridMax(nn.Module):
    """Exported ``FourierGroupPooling(mode="max")``: the maximum of each field's samples ``A x``."""

    def __init__(self, A: torch.Tensor, num_fields: int):
        super().__init__()
        self.register_buffer("A", A.detach().clone())
        self.num_fields = int(num_fields)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _grid_max(x, self.A.to(x), self.num_fields, self.A.shape[1])


class FieldNormPlain(nn.Module):
    """Exported :class:`FourierFieldNorm` (per-field weight and bias, trivial channels given by index)."""

    def __init__(self, num_groups: int, num_fields: int, field_size: int, trivial, eps: float, affine: bool):
        super().__init__()
        self.num_groups, self.num_fields, self.field_size = int(num_groups), int(num_fields), int(field_size)
        self.trivial, self.eps, self.affine = tuple(int(c) for c in trivial), float(eps), bool(affine)
        self.weight = nn.Parameter(torch.ones(num_fields)) if affine else None
        self.bias = nn.Parameter(torch.zeros(num_fields)) if affine else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with fp32_compute(x) as (x,):
            return _fourier_field_norm(x, self.num_groups, self.field_size, self.trivial, self.eps, self.weight,
                                       self.bias)

    def extra_repr(self) -> str:
        return f"{self.num_fields} fields of {self.field_size}, num_groups={self.num_groups}, affine={self.affine}"
