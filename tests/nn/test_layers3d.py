"""The 3D layer set on escnn's R3 bases: every layer is equivariant under escnn's action of the group (the 24 / 48
voxel-grid elements at any size; other SO(3) rotations at 1x1x1), exports to plain torch modules with identical
outputs, and the bases are cached on disk (cold and warm)."""

from __future__ import annotations

import pickle

import numpy as np
import pytest
import torch

from eqlightning.nn import (EquivariantConv3d, EquivariantPool3d, FieldBatchNorm, FieldGroupNorm, GroupPooling,
                            PointwiseNonlinearity, Restrict, canonical_group3d, export, field_type3d, group_gspace3d,
                            transform_fields, volume_symmetries, voxel_elements)
from eqlightning.nn._escnn import enn
from eqlightning.nn.basis import _BLOCK_CACHE, _CONV_CACHE, _disk_cache_path, conv_basis
from eqlightning.nn.fields import as_recipe

TOL = 2e-5


def worst(layer, **kwargs) -> float:
    errors = layer.check_equivariance(**kwargs)
    assert errors, "no group element was checked"
    return max(e for _, e in errors)


@pytest.mark.parametrize("group,order", [("O", 24), ("Oh", 48), ("SO3", 24), ("O3", 48), ("C1", 1)])
def test_named_groups_and_their_voxel_grid_elements(group, order):
    gs = group_gspace3d(group)
    assert len(voxel_elements(gs)) == order and len(volume_symmetries(group)) == order
    assert canonical_group3d(group.lower()) == group
    # the 24 rotations are distinct and closed under composition (a group)
    x = torch.arange(27.0).view(3, 3, 3)
    images = {tuple(t(x).flatten().tolist()) for t in volume_symmetries(group).values()}
    assert len(images) == order
    if order <= 24:  # closure (Oh/O3: O and one reflection, which the distinct images above already include)
        for t in volume_symmetries(group).values():
            for u in volume_symmetries(group).values():
                assert tuple(t(u(x)).flatten().tolist()) in images


def test_unknown_group_names_the_choices():
    with pytest.raises(ValueError, match="unknown 3D symmetry group 'D4'.*'O'.*'Oh'.*'SO3'"):
        group_gspace3d("D4")


@pytest.mark.parametrize("group", ["O", "Oh"])
def test_our_exact_action_is_escnns_on_grid_elements(group):
    """transform_fields (used by check_equivariance in 3D) against escnn's own GeometricTensor.transform."""
    ft = field_type3d(group, "regular", 1) + field_type3d(group, "trivial", 1)
    x = torch.randn(2, ft.size, 4, 4, 4)
    for g in voxel_elements(ft.gspace):
        ours = transform_fields(x, ft, g)
        theirs = enn.GeometricTensor(x, ft).transform(g).tensor
        torch.testing.assert_close(ours, theirs, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("group", ["O", "Oh"])
@pytest.mark.parametrize("kinds", [("trivial", "regular"), ("regular", "regular"), ("regular", "trivial")])
def test_conv3d_is_equivariant_and_exports(group, kinds):
    t_in, t_out = field_type3d(group, kinds[0], 2), field_type3d(group, kinds[1], 1)
    conv = EquivariantConv3d(t_in, t_out, 3)
    assert worst(conv, spatial=5) < TOL
    strided = EquivariantConv3d(t_in, t_out, 3, stride=2)  # stride 2 on an odd size keeps the grid centred
    assert worst(strided, spatial=7) < TOL
    x = torch.randn(2, t_in.size, 5, 5, 5)
    plain = conv.export()
    assert isinstance(plain, torch.nn.Conv3d)
    torch.testing.assert_close(plain(x), conv(x), atol=1e-6, rtol=1e-5)
    clone = pickle.loads(pickle.dumps(conv))
    torch.testing.assert_close(clone(x), conv(x))


def test_conv3d_mixed_fields_restricted_fields_and_errors():
    t_in = field_type3d("O", "regular", 1) + field_type3d("O", "trivial", 2)
    t_out = field_type3d("O", "trivial", 1) + field_type3d("O", "regular", 2)
    assert worst(EquivariantConv3d(t_in, t_out, 3), spatial=3) < TOL
    restrict = Restrict(field_type3d("Oh", "regular", 1) + field_type3d("Oh", "trivial", 1), "O")
    assert restrict.order is not None and worst(restrict, spatial=3) == 0
    assert worst(EquivariantConv3d(restrict.out_type, field_type3d("O", "regular", 1), 3), spatial=3) < TOL
    to_plain = Restrict(field_type3d("O", "regular", 1), "C1")
    assert to_plain.order is None and to_plain.out_type.size == 24
    with pytest.raises(ValueError, match="cannot restrict O to Oh"):
        Restrict(field_type3d("O", "regular", 1), "Oh")
    with pytest.raises(ValueError, match="EquivariantConv3d"):
        from eqlightning.nn import EquivariantConv2d
        EquivariantConv2d(field_type3d("O", "trivial", 1), field_type3d("O", "regular", 1), 3)
    with pytest.raises(ValueError, match=r"expects a \(N, 24, D, H, W\) tensor"):
        EquivariantConv3d(field_type3d("O", "regular", 1), field_type3d("O", "regular", 1), 3)(
            torch.randn(1, 24, 5, 5))


@pytest.mark.parametrize("group", ["O", "Oh"])
def test_norms_nonlinearity_pools_and_group_pooling(group):
    t = field_type3d(group, "regular", 2)
    for layer in (FieldGroupNorm(t, 2), FieldBatchNorm(t), PointwiseNonlinearity(t, "elu"),
                  EquivariantPool3d(t, "max"), EquivariantPool3d(t, "avg"), GroupPooling(t)):
        assert worst(layer, spatial=5) < TOL, type(layer).__name__
        x = torch.randn(3, t.size, 6, 6, 6)  # even size: 2-wide windows
        assert worst(layer, x=x) < TOL, type(layer).__name__
        layer.eval()
        torch.testing.assert_close(export(layer).eval()(x), layer(x), atol=1e-6, rtol=1e-5)
    assert isinstance(export(FieldBatchNorm(t)), torch.nn.BatchNorm3d)
    assert isinstance(export(FieldGroupNorm(t, 2)), torch.nn.GroupNorm)


def test_so3_conv_is_exact_on_the_grid_and_equivariant_to_any_rotation_at_1x1x1():
    gs = group_gspace3d("SO3")
    t_in, t_out = field_type3d("SO3", "regular", 1, band_limit=1), field_type3d("SO3", "regular", 2, band_limit=1)
    conv = EquivariantConv3d(t_in, t_out, 3)
    assert worst(conv, spatial=5) < TOL  # the 24 grid rotations
    rng = np.random.default_rng(0)
    elements = [gs.fibergroup.sample() for _ in range(5)]
    assert not any(np.allclose(np.abs(gs.basespace_action(g)), np.round(np.abs(gs.basespace_action(g))))
                   for g in elements)  # generic rotations: none maps the voxel grid onto itself
    x = torch.from_numpy(rng.standard_normal((3, t_in.size, 1, 1, 1))).float()
    assert worst(conv, x=x, elements=elements) < 1e-5
    with pytest.raises(ValueError, match="map the voxel grid onto itself"):
        conv.check_equivariance(spatial=3, elements=elements)


def test_bases_are_cached_on_disk_cold_and_warm(tmp_path, monkeypatch):
    monkeypatch.setenv("EQL_BASIS_CACHE", str(tmp_path))
    t_in, t_out = as_recipe(field_type3d("O", "regular", 1)), as_recipe(field_type3d("O", "regular", 2))
    _BLOCK_CACHE.clear(), _CONV_CACHE.clear()
    cold = conv_basis(t_in, t_out, 3)
    files = sorted(tmp_path.glob("*.pt"))
    assert len(files) == 1  # one (regular, regular) block
    _BLOCK_CACHE.clear(), _CONV_CACHE.clear()
    warm = conv_basis(t_in, t_out, 3)
    assert warm is not cold and torch.equal(warm.blocks[0].basis, cold.blocks[0].basis)
    files[0].write_bytes(b"truncated")  # a broken cache file is rebuilt, not trusted
    _BLOCK_CACHE.clear(), _CONV_CACHE.clear()
    rebuilt = conv_basis(t_in, t_out, 3)
    assert torch.equal(rebuilt.blocks[0].basis, cold.blocks[0].basis) and files[0].stat().st_size > 1000
    monkeypatch.setenv("EQL_BASIS_CACHE", "off")
    assert _disk_cache_path(("anything",)) is None
