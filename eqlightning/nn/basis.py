"""Steerable convolution bases: built once per process from escnn, shared by every layer that needs them.

An equivariant convolution's filter is a linear function of its coefficients,

    W[a, o, b, i, y, x] = sum_d  w[a, b, d] * B[d, o, i, y, x]      (and ``z, y, x`` for volumes)

for every output field ``a`` (channels ``o`` within it) and input field ``b`` (channels ``i``), with one basis ``B``
per pair of representations, shared by all field pairs of that kind. :class:`ConvBasis` holds those bases and
computes the expansion (coefficients -> filter) and its adjoint (filter gradient -> coefficient gradient) as a
single matrix product per representation pair. It is not a module and holds no buffers: layers look it up by a
hashable key, so there is one copy per process and device, nothing to broadcast under DDP, and nothing for Opacus's
buffer checks or its functorch mode (which moves a copy of the layer to ``meta``) to trip on.

The coefficient layout is escnn's (pairs sorted by representation names; within a pair, output field major), so
weights can be copied to and from ``escnn.nn.R2Conv``.
"""

from __future__ import annotations

import math
from collections import Counter, defaultdict
from dataclasses import dataclass

import numpy as np
import torch

from ._escnn import enn
from .fields import FieldTypeRecipe, ReprRecipe


@dataclass(frozen=True)
class FieldGroup:
    """Fields of one representation, as they sit in the grouped channel order."""

    recipe: ReprRecipe
    count: int
    start: int  # first channel in grouped order

    @property
    def stop(self) -> int:
        return self.start + self.count * self.recipe.size


@dataclass
class BasisBlock:
    """The basis shared by all (input field, output field) pairs of one pair of representations."""

    in_group: FieldGroup
    out_group: FieldGroup
    basis: torch.Tensor  # (d, o, i, k, k) or (d, o, i, k, k, k), float64 master copy
    he_std: torch.Tensor  # (d,) std of each coefficient under escnn's generalized He init
    offset: int  # first coefficient of this block in the weight vector
    symmetries: list | None = None  # see grid_symmetries()

    @property
    def dim(self) -> int:
        return self.basis.shape[0]

    @property
    def numel(self) -> int:
        return self.in_group.count * self.out_group.count * self.dim


def _grouped(recipe: FieldTypeRecipe):
    """Group fields by representation; returns the groups and the channel order (None when already grouped)."""
    fields_of: dict = defaultdict(list)
    starts, channel = [], 0
    for index, rep in enumerate(recipe.reprs):
        fields_of[rep].append(index)
        starts.append(channel)
        channel += rep.size
    groups, order, start = [], [], 0
    for rep, fields in fields_of.items():
        groups.append(FieldGroup(rep, len(fields), start))
        start += len(fields) * rep.size
        for f in fields:
            order.extend(range(starts[f], starts[f] + rep.size))
    identity = order == list(range(channel))
    return groups, (None if identity else order)


_BLOCK_CACHE: dict = {}


def _block_basis(in_type: FieldTypeRecipe, rep_in: ReprRecipe, rep_out: ReprRecipe, kernel_size, dilation, kwargs):
    """Sample escnn's steerable basis for one representation pair; returns (basis, per-element info) or None."""
    key = (in_type.sg_id, rep_in, rep_out, kernel_size, dilation, kwargs)
    if key not in _BLOCK_CACHE:
        with torch.inference_mode(False):  # cached for every later use, so never an inference tensor
            _BLOCK_CACHE[key] = _sample_block(in_type, rep_in, rep_out, kernel_size, dilation, kwargs)
    return _BLOCK_CACHE[key]


def _sample_block(in_type: FieldTypeRecipe, rep_in: ReprRecipe, rep_out: ReprRecipe, kernel_size, dilation, kwargs):
    """Sample one block of escnn's basis (see :func:`_block_basis`); 3D blocks go through the disk cache."""
    if in_type.dims != 3:
        return _sample_escnn_block(in_type, rep_in, rep_out, kernel_size, dilation, kwargs)
    reprs = tuple((r.name, r.irreps, r.size, r.change_of_basis) for r in (rep_in, rep_out))  # no sets: stable repr
    path = _disk_cache_path((in_type.sg_id, in_type.maximum_frequency, reprs, kernel_size, dilation, kwargs))
    if path is not None and path.is_file():
        try:
            saved = torch.load(path, weights_only=True)
            basis = None if saved["basis"] is None else saved["basis"].to(torch.float64)
            return None if basis is None else (basis, [(tuple(a), int(b)) for a, b in saved["info"]], None)
        except Exception:  # a truncated or foreign file: rebuild it
            pass
    block = _sample_escnn_block(in_type, rep_in, rep_out, kernel_size, dilation, kwargs)
    if path is not None:
        _disk_cache_store(path, block)
    return block


#: bump when the cached layout changes
_DISK_FORMAT = 1


def _disk_cache_path(key):
    """Where a 3D basis block is cached: ``$EQL_BASIS_CACHE`` (``off`` disables it), else
    ``$XDG_CACHE_HOME/eqlightning/bases`` (``~/.cache/...``). Keyed by escnn's version and the block's recipe."""
    import hashlib
    import os
    from importlib.metadata import version
    from pathlib import Path

    root = os.environ.get("EQL_BASIS_CACHE")
    if root is not None and root.strip().lower() in ("off", "0", "false", "none", ""):
        return None
    if root is None:
        root = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "eqlightning" / "bases"
    digest = hashlib.sha256(repr((_DISK_FORMAT, version("escnn"), key)).encode()).hexdigest()[:32]
    return Path(root) / f"{digest}.pt"


def _disk_cache_store(path, block) -> None:
    """Write a block atomically; an unwritable cache directory only costs the rebuild next time."""
    import os
    import tempfile

    basis = None if block is None else block[0].to(torch.float32)  # escnn samples in float32: lossless
    info = [] if block is None else [(list(a), b) for a, b in block[1]]
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
        with os.fdopen(fd, "wb") as f:
            torch.save({"basis": basis, "info": info}, f)
        os.replace(tmp, path)
    except OSError:
        pass


def _sample_escnn_block(in_type: FieldTypeRecipe, rep_in: ReprRecipe, rep_out: ReprRecipe, kernel_size, dilation,
                        kwargs):
    single_in = FieldTypeRecipe(in_type.sg_id, in_type.maximum_frequency, (rep_in,)).build()
    single_out = FieldTypeRecipe(in_type.sg_id, in_type.maximum_frequency, (rep_out,)).build()
    conv_class = enn.R3Conv if in_type.dims == 3 else enn.R2Conv
    conv = conv_class(single_in, single_out, kernel_size, dilation=dilation, bias=False, initialize=False,
                      **{k: (list(v) if isinstance(v, tuple) else v) for k, v in kwargs})
    expansion = conv.basisexpansion
    if expansion.dimension() == 0:
        return None
    (pair,) = expansion._representations_pairs
    block = getattr(expansion, f"block_expansion_{expansion._escape_pair(pair)}")
    sampled = block.sampled_basis.detach().to(torch.float64)  # (d, o, i, k**dims)
    info = [(tuple(a["in_irrep"]), a["out_irrep_idx"]) for a in block.get_basis_info()]
    # 3D: the symmetry search and the average cost minutes for Oh bases (48 copies of ~1e8 numbers); escnn's float32
    # sampling is already equivariant to ~1e-7, and only the 2D orbit mechanism uses the symmetries
    symmetries = None if in_type.dims == 3 else grid_symmetries(sampled, single_in, single_out, kernel_size)
    if symmetries:  # escnn samples in float32: make the grid symmetries exact (a Reynolds average)
        sampled = torch.stack([sampled[:, p_o][:, :, p_i][:, :, :, torch.as_tensor(k_map)]
                               for p_o, p_i, k_map, _ in symmetries]).mean(0)
    return sampled.reshape(*sampled.shape[:3], *(kernel_size,) * in_type.dims), info, symmetries


def _permutation(matrix) -> np.ndarray | None:
    """``P[k] = j`` where ``matrix[:, k] = e_j`` (None if not a permutation matrix)."""
    m = np.asarray(matrix)
    if not np.allclose(np.abs(m).sum(0), 1) or not np.all(np.isclose(m, 0) | np.isclose(m, 1)):
        return None
    return np.argmax(m, axis=0)


def grid_map(size: int, matrix: np.ndarray) -> np.ndarray:
    """For each cell of a ``size^dims`` grid (row-major), the flat index of the cell at ``matrix @ (centred
    position)``; ``dims`` is the matrix's size (2 for images, 3 for volumes)."""
    dims = matrix.shape[0]
    coords = 2 * np.indices((size,) * dims).reshape(dims, -1) - (size - 1)  # doubled centred positions: integers
    moved = (np.rint(matrix @ coords).astype(int) + size - 1) // 2
    return np.ravel_multi_index(tuple(moved), (size,) * dims)


def _array_axes(dims: int) -> np.ndarray:
    """escnn's base-space coordinates (x, y[, z]) -> array axes: (row, col) = (-y, x); (-z, -y, x) in 3D."""
    return np.array([[0.0, -1.0], [1.0, 0.0]]) if dims == 2 else np.array([[0.0, 0, -1], [0, -1, 0], [1, 0, 0]])


def grid_symmetries(basis: torch.Tensor, in_type, out_type, kernel_size: int) -> list | None:
    """The symmetries of a block basis ``(d, o, i, k**dims)`` under the group elements that map the pixel (voxel)
    grid onto itself: ``[(P_out, P_in, kernel_map, matrix), ...]`` with ``B[:, P_out][:, :, P_in][..., kernel_map]
    == B``.

    ``matrix`` acts on centred array positions. escnn's base-space matrices act on (x, y[, z]) with arrays indexed
    (-y, x) / (-z, -y, x); whether ``T_h`` is that matrix or its inverse is settled by the basis itself. Returns None
    when the fields do not transform by permutations or no consistent convention is found.
    """
    from .fields import grid_elements

    gspace = in_type.gspace
    in_rep, out_rep = in_type.representations[0], out_type.representations[0]
    to_rc = _array_axes(gspace.dimensionality)
    elements = grid_elements(gspace)
    b = basis.numpy()
    for inverse in (False, True):
        found = []
        for h in elements:
            m = to_rc @ np.asarray(gspace.basespace_action(h)) @ to_rc.T
            m = np.rint(np.linalg.inv(m) if inverse else m)
            p_out, p_in = _permutation(out_rep(h)), _permutation(in_rep(h))
            if p_out is None or p_in is None:
                return None
            found.append((p_out, p_in, grid_map(kernel_size, m), m))
        if all(np.allclose(b[:, p_o][:, :, p_i][:, :, :, k_map], b, atol=1e-5) for p_o, p_i, k_map, _ in found):
            return found
    return None


class ConvBasis:
    """Expansion and adjoint for one (input type, output type, kernel) combination. Build via :func:`conv_basis`."""

    def __init__(self, in_type: FieldTypeRecipe, out_type: FieldTypeRecipe, kernel_size: int, dilation: int,
                 basis_kwargs: tuple):
        if in_type.sg_id != out_type.sg_id:
            raise ValueError("input and output field types must belong to the same group (same gspace)")
        self.in_size, self.out_size, self.kernel_size = in_type.size, out_type.size, kernel_size
        self.dims = in_type.dims
        self._kernel = (kernel_size,) * self.dims
        self.in_groups, in_order = _grouped(in_type)
        self.out_groups, out_order = _grouped(out_type)
        self._in_inverse = None if in_order is None else torch.argsort(torch.tensor(in_order))
        self._out_inverse = None if out_order is None else torch.argsort(torch.tensor(out_order))
        self._in_order = None if in_order is None else torch.tensor(in_order)
        self._out_order = None if out_order is None else torch.tensor(out_order)

        found = {}
        for gi in self.in_groups:
            for go in self.out_groups:
                sampled = _block_basis(in_type, gi.recipe, go.recipe, kernel_size, dilation, basis_kwargs)
                if sampled is not None:
                    found[(gi, go)] = sampled
        if not found:
            raise ValueError(
                f"no equivariant {'x'.join([str(kernel_size)] * self.dims)} filter maps these input fields to these "
                "output fields (empty steerable basis); use a larger kernel or different field types"
            )
        stds = _generalized_he_std(found)
        self.blocks: list[BasisBlock] = []
        offset = 0
        for gi, go in sorted(found, key=lambda p: (p[0].recipe.name, p[1].recipe.name)):  # escnn's order
            block = BasisBlock(gi, go, found[(gi, go)][0], stds[(gi, go)], offset, found[(gi, go)][2])
            self.blocks.append(block)
            offset += block.numel
        self.dim = offset
        self._bias_expansion = _bias_expansion(out_type)
        self.bias_dim = 0 if self._bias_expansion is None else self._bias_expansion.shape[1]
        self._device_cache: dict = {}

    @property
    def channels_grouped(self) -> bool:
        """Whether the fields of each representation already sit together in the channel order (no permutation
        between the layer's channels and the blocks' grouped order): the case per-sample fast paths handle."""
        return self._in_order is None and self._out_order is None

    # one copy of this object per process: modules share it and copies of modules keep sharing it
    def __deepcopy__(self, memo):
        return self

    def tensors(self, device: torch.device, dtype: torch.dtype) -> dict:
        """The bases (as (d, o*i*k*k) matrices), index orders and bias expansion on a device/dtype (memoised)."""
        key = (torch.device(device), dtype)
        if key not in self._device_cache:
            with torch.inference_mode(False):  # memoised for training too: never an inference tensor
                self._device_cache[key] = self._tensors(device, dtype)
        return self._device_cache[key]

    def _tensors(self, device: torch.device, dtype: torch.dtype) -> dict:
        to = dict(device=device, dtype=dtype)
        return {
            "bases": [b.basis.reshape(b.dim, -1).to(**to) for b in self.blocks],
            "in_inverse": None if self._in_inverse is None else self._in_inverse.to(device),
            "out_inverse": None if self._out_inverse is None else self._out_inverse.to(device),
            "in_order": None if self._in_order is None else self._in_order.to(device),
            "out_order": None if self._out_order is None else self._out_order.to(device),
            "bias": None if self._bias_expansion is None else self._bias_expansion.to(**to),
        }

    def expand(self, weight: torch.Tensor) -> torch.Tensor:
        """Coefficients ``(dim,)`` -> filter ``(out_size, in_size, k, k)`` (``k, k, k`` for volumes)."""
        t = self.tensors(weight.device, weight.dtype)
        k = self._kernel
        blocks = {(b.in_group, b.out_group): (b, basis) for b, basis in zip(self.blocks, t["bases"])}
        rows = []
        for go in self.out_groups:
            cols = []
            for gi in self.in_groups:
                a, o, b_, i = go.count, go.recipe.size, gi.count, gi.recipe.size
                entry = blocks.get((gi, go))
                if entry is None:
                    cols.append(weight.new_zeros(a * o, b_ * i, *k))
                    continue
                block, basis = entry
                coeff = weight[block.offset:block.offset + block.numel].view(a * b_, block.dim)
                filt = (coeff @ basis).view(a, b_, o, i, *k).transpose(1, 2)
                cols.append(filt.reshape(a * o, b_ * i, *k))
            rows.append(cols[0] if len(cols) == 1 else torch.cat(cols, dim=1))
        filt = rows[0] if len(rows) == 1 else torch.cat(rows, dim=0)
        if t["out_inverse"] is not None:
            filt = filt.index_select(0, t["out_inverse"])
        if t["in_inverse"] is not None:
            filt = filt.index_select(1, t["in_inverse"])
        return filt

    def project(self, filter_grad: torch.Tensor) -> torch.Tensor:
        """Adjoint of :meth:`expand`: ``(..., out_size, in_size, *kernel)`` -> ``(..., dim)``.

        Maps the gradient with respect to the filter (also a batch of per-sample filter gradients) to the gradient
        with respect to the coefficients.
        """
        lead = filter_grad.shape[:-2 - self.dims]
        g = filter_grad.reshape(-1, self.out_size, self.in_size, *self._kernel)
        t = self.tensors(g.device, g.dtype)
        if t["out_order"] is not None:
            g = g.index_select(1, t["out_order"])
        if t["in_order"] is not None:
            g = g.index_select(2, t["in_order"])
        n, kk = g.shape[0], self.kernel_size ** self.dims
        pieces = []
        for block, basis in zip(self.blocks, t["bases"]):
            go, gi = block.out_group, block.in_group
            a, o, b_, i = go.count, go.recipe.size, gi.count, gi.recipe.size
            part = g[:, go.start:go.stop, gi.start:gi.stop].reshape(n, a, o, b_, i, kk).transpose(2, 3)
            pieces.append((part.reshape(n * a * b_, o * i * kk) @ basis.T).reshape(n, block.numel))
        out = pieces[0] if len(pieces) == 1 else torch.cat(pieces, dim=1)
        return out.reshape(*lead, self.dim)

    def expand_bias(self, bias: torch.Tensor) -> torch.Tensor:
        """Bias coefficients ``(bias_dim,)`` (one per trivial irrep of the output fields) -> ``(out_size,)``."""
        return self.tensors(bias.device, bias.dtype)["bias"] @ bias

    def project_bias(self, bias_grad: torch.Tensor) -> torch.Tensor:
        """Adjoint of :meth:`expand_bias`: ``(..., out_size)`` -> ``(..., bias_dim)``."""
        return bias_grad @ self.tensors(bias_grad.device, bias_grad.dtype)["bias"]

    def init_std(self) -> torch.Tensor:
        """Per-coefficient std of escnn's generalized He initialisation, ``(dim,)``."""
        parts = [b.he_std.repeat(b.in_group.count * b.out_group.count) for b in self.blocks]
        return torch.cat(parts)


def _generalized_he_std(found: dict) -> dict:
    """escnn's ``generalized_he_init`` variances, computed per representation pair instead of per coefficient.

    For an output irrep, escnn counts the distinct input irrep types feeding it and, per type, the basis elements
    over all input fields; a coefficient's std is ``1 / sqrt(types * elements_of_its_type)``.
    """
    per_out: dict = defaultdict(Counter)  # (out group, out irrep idx) -> Counter(in irrep id -> basis elements)
    for (gi, go), (_, info, _) in found.items():
        for in_irrep, out_idx in info:
            per_out[(go, out_idx)][in_irrep] += gi.count
    stds = {}
    for (gi, go), (_, info, _) in found.items():
        values = []
        for in_irrep, out_idx in info:
            counts = per_out[(go, out_idx)]
            values.append(1.0 / math.sqrt(len(counts) * counts[in_irrep]))
        stds[(gi, go)] = torch.tensor(values, dtype=torch.float64)
    return stds


def _bias_expansion(out_type: FieldTypeRecipe):
    """Columns of each output field's change of basis that belong to its trivial irreps (as escnn's R2Conv)."""
    field_type = out_type.build()
    group = field_type.fibergroup
    columns = []
    position = 0
    for rep in field_type.representations:
        irrep_offset = 0
        for irr in rep.irreps:
            irrep = group.irrep(*irr)
            if irrep.is_trivial():
                column = torch.zeros(out_type.size, dtype=torch.float64)
                column[position:position + rep.size] = torch.as_tensor(rep.change_of_basis[:, irrep_offset])
                columns.append(column)
            irrep_offset += irrep.size
        position += rep.size
    return torch.stack(columns, dim=1) if columns else None


_CONV_CACHE: dict = {}


def conv_basis(in_type: FieldTypeRecipe, out_type: FieldTypeRecipe, kernel_size: int, dilation: int = 1,
               **basis_kwargs) -> ConvBasis:
    """The shared :class:`ConvBasis` for these types and kernel parameters (built on first use)."""
    kwargs = tuple(sorted((k, tuple(v) if isinstance(v, list) else v) for k, v in basis_kwargs.items()
                          if v is not None))
    key = (in_type, out_type, int(kernel_size), int(dilation), kwargs)
    if key not in _CONV_CACHE:
        with torch.inference_mode(False):  # shared by every later layer, so never an inference tensor
            _CONV_CACHE[key] = ConvBasis(in_type, out_type, int(kernel_size), int(dilation), kwargs)
    return _CONV_CACHE[key]
