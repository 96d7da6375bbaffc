"""The SO(3) / O(3) layer set: FourierPointwise, FourierGroupPooling, FourierFieldNorm (eqlightning.nn.fourier)."""

from __future__ import annotations

import copy
import pickle

import numpy as np
import pytest
import torch
from torch import nn

from eqlightning.nn import (EquivariantConv3d, EquivariantModule, FourierFieldNorm, FourierGroupPooling,
                            FourierPointwise, export, field_type3d, volume_symmetries, voxel_elements)
from eqlightning.nn._escnn import enn
from eqlightning.nn.fourier import fourier_sampling
from eqlightning.nn.groups3d import transform_fields

GROUPS = ["SO3", "O3"]


def _random_rotations(group, count=5, seed=1):
    """``count`` random elements (O3: random rotations and rotation-reflections), none of them a grid element."""
    return list(group.grid("rand", count, seed=seed))


def _field_norm(ft, **kwargs):
    """A FourierFieldNorm with a random affine (a bias added to the wrong channels must show)."""
    layer = FourierFieldNorm(ft, **kwargs)
    with torch.no_grad():
        layer.weight.uniform_(0.5, 1.5)
        layer.bias.normal_()
    return layer


def _layers(ft):
    return {
        "pointwise": FourierPointwise(ft),
        "pool_norm": FourierGroupPooling(ft),
        "pool_max": FourierGroupPooling(ft, mode="max"),
        "field_norm": _field_norm(ft, num_groups=1),
    }


@pytest.mark.parametrize("group,band_limit", [("SO3", 1), ("SO3", 2), ("O3", 1), ("O3", 2)])
def test_pointwise_matches_escnn_fourier_elu(group, band_limit):
    ft = field_type3d(group, "regular", 2, band_limit=band_limit)
    ours = FourierPointwise(ft, "elu")
    ref = enn.FourierELU(ft.gspace, 2, ft.gspace.fibergroup.bl_irreps(band_limit), inplace=False,
                         type="thomson_cube", N=4)
    assert ref.in_type.representations[0].irreps == ft.representations[0].irreps
    A, A_inv = ours.matrices(torch.zeros(1))
    assert torch.allclose(A, ref.A, atol=1e-6) and torch.allclose(A_inv, ref.Ainv, atol=1e-6)  # same grid, same order
    x = torch.randn(3, ft.size, 2, 3, 2)
    expected = ref(enn.GeometricTensor(x, ref.in_type)).tensor
    assert (ours(x) - expected).abs().max() < 1e-5
    assert ours.grid_points == (96 if group == "SO3" else 192) and ours.exact_on_voxel_grid


def test_default_grid_is_escnns_thomson_cube_and_closed_under_the_cube():
    ft = field_type3d("SO3", "regular", 1, band_limit=1)
    group = ft.gspace.fibergroup
    key = FourierPointwise(ft).key
    from eqlightning.nn.fourier import _grid_elements

    ours = np.stack([g.to("MAT") for g in _grid_elements(group, "SO3", key.grid, key.grid_size)])
    theirs = np.stack([g.to("MAT") for g in group.grid("thomson_cube", 4)])
    assert np.abs(ours - theirs).max() < 1e-6  # escnn's elements are float32 results
    assert fourier_sampling(key).exact


class _Chain(EquivariantModule):
    """Layers in a row, checked as one (fewer group actions to apply than one check per layer)."""

    def __init__(self, *layers):
        super().__init__(layers[0].in_type, layers[-1].out_type)
        self.layers = nn.Sequential(*layers)

    def forward(self, x):
        return self.layers(x)


@pytest.mark.parametrize("group", GROUPS)
def test_every_layer_is_exactly_equivariant_on_the_voxel_grid(group):
    ft = field_type3d(group, "regular", 1, band_limit=2 if group == "SO3" else 1)
    elements = voxel_elements(ft.gspace)
    assert len(elements) == (24 if group == "SO3" else 48)
    layers = _layers(ft)
    if group == "O3":  # 48 elements: the field norm, nonlinearity and band norms checked as one chain
        layers = {"chain": _Chain(layers["field_norm"], layers["pointwise"], layers["pool_norm"]),
                  "pool_max": layers["pool_max"]}
    for size, (name, layer) in zip((3, 4, 5, 3), layers.items()):
        x = torch.randn(2, ft.size, size, size, size)
        errors = layer.check_equivariance(x, elements=elements)
        assert max(e for _, e in errors) < 1e-5, name


@pytest.mark.parametrize("group", GROUPS)
def test_norms_are_exactly_equivariant_to_every_rotation(group):
    """Band norms and the field norm only use rotation-invariant quantities: exact for any element (at 1x1x1)."""
    ft = field_type3d(group, "regular", 2, band_limit=2)
    elements = _random_rotations(ft.gspace.fibergroup)
    x = torch.randn(8, ft.size, 1, 1, 1)
    for layer in (FourierGroupPooling(ft), _field_norm(ft), _field_norm(ft, num_groups=2)):
        assert max(e for _, e in layer.check_equivariance(x, elements=elements, spatial=1)) < 1e-5


@pytest.mark.parametrize("band_limit,bound", [(1, 0.015), (2, 0.12)])
def test_pointwise_is_approximately_equivariant_to_other_rotations(band_limit, bound):
    """Off the grid, sampling 96 points aliases the nonlinearity. Measured (mean relative error per field, ELU,
    random inputs): 0.7% at L=1, 8-9% at L=2."""
    ft = field_type3d("SO3", "regular", 2, band_limit=band_limit)
    layer = FourierPointwise(ft)
    x = torch.randn(64, ft.size, 1, 1, 1)
    y = layer(x)
    for g in _random_rotations(ft.gspace.fibergroup):
        diff = layer(transform_fields(x, ft, g)) - transform_fields(y, ft, g)
        relative = diff.view(64, 2, -1).norm(dim=2) / y.view(64, 2, -1).norm(dim=2)
        assert relative.mean() < bound
        assert relative.mean() > 1e-4  # it is an approximation: a much smaller error would mean a broken test


def test_max_pooling_is_only_approximately_invariant_off_the_grid():
    ft = field_type3d("SO3", "regular", 2, band_limit=1)
    pool = FourierGroupPooling(ft, mode="max")
    x = torch.randn(64, ft.size, 1, 1, 1)
    errors = [e for _, e in pool.check_equivariance(x, elements=_random_rotations(ft.gspace.fibergroup), spatial=1)]
    assert 1e-4 < max(errors) < 1.0


def test_a_grid_not_closed_under_the_cube_is_detected():
    """A fibonacci grid is not closed under the cube rotations: the layer says so and the grid check fails."""
    ft = field_type3d("SO3", "regular", 1, band_limit=1)
    layer = FourierPointwise(ft, grid="fibonacci", grid_size=100)
    assert not layer.exact_on_voxel_grid
    assert max(e for _, e in layer.check_equivariance(spatial=3)) > 1e-3


def test_a_mean_over_all_channels_is_not_equivariant():
    """Plain GroupNorm (mean over every channel, not only the frequency-0 ones) breaks equivariance."""
    ft = field_type3d("SO3", "regular", 2, band_limit=1)
    layer = FourierFieldNorm(ft, num_groups=1)
    x = torch.randn(2, ft.size, 3, 3, 3) + 1.0
    g = ft.gspace.fibergroup.grid("cube")[5]
    plain = lambda t: nn.functional.group_norm(t, 1)  # noqa: E731
    assert (plain(transform_fields(x, ft, g)) - transform_fields(plain(x), ft, g)).abs().max() > 1e-2
    assert (layer(transform_fields(x, ft, g)) - transform_fields(layer(x), ft, g)).abs().max() < 1e-5


@pytest.mark.parametrize("group,band_limit", [("SO3", 2), ("O3", 1)])
def test_a_small_network_is_invariant_to_the_24_volume_rotations(group, band_limit):
    torch.manual_seed(0)
    trivial = field_type3d(group, "trivial", 1, band_limit=band_limit)
    regular = field_type3d(group, "regular", 2, band_limit=band_limit)
    net = nn.Sequential(
        EquivariantConv3d(trivial, regular, 3), FourierFieldNorm(regular), FourierPointwise(regular),
        EquivariantConv3d(regular, regular, 3), FourierGroupPooling(regular),
    ).eval()  # eval: the convolutions expand their filters once
    x = torch.randn(2, 1, 5, 5, 5)
    with torch.no_grad():
        reference = net(x).mean(dim=(2, 3, 4))
        assert reference.shape == (2, 2 * (band_limit + 1) * (1 if group == "SO3" else 2))
        symmetries = volume_symmetries(group)
        assert len(symmetries) == (24 if group == "SO3" else 48)
        for name, transform in symmetries.items():
            assert (net(transform(x)).mean(dim=(2, 3, 4)) - reference).abs().max() < 1e-4, name
        plain = export(net)
        assert not any(isinstance(m, (EquivariantConv3d, FourierPointwise)) for m in plain.modules())
        assert (plain(x).mean(dim=(2, 3, 4)) - reference).abs().max() < 1e-5


@pytest.mark.parametrize("group", GROUPS)
def test_export_gives_plain_modules_with_identical_outputs(group):
    ft = field_type3d(group, "regular", 2, band_limit=1)
    x = torch.randn(2, ft.size, 3, 3, 3)
    for name, layer in _layers(ft).items():
        plain = layer.export()
        assert type(plain).__module__ == "eqlightning.nn.fourier" and not isinstance(plain, FourierPointwise)
        assert torch.equal(plain(x), layer(x)), name
        assert torch.equal(copy.deepcopy(plain).double()(x.double()), layer(x.double())), name  # float64 matrices
        restored = pickle.loads(pickle.dumps(plain))
        assert torch.equal(restored(x), layer(x)), name


def test_layers_pickle_copy_and_hold_no_buffers():
    ft = field_type3d("SO3", "regular", 2, band_limit=1)
    x = torch.randn(2, ft.size, 3, 3, 3)
    for name, layer in _layers(ft).items():
        assert list(layer.buffers()) == [], name
        for other in (pickle.loads(pickle.dumps(layer)), copy.deepcopy(layer)):
            assert torch.equal(other(x), layer(x)), name
            assert other.out_type == layer.out_type


def test_field_norm_normalises_and_applies_the_affine_per_field():
    ft = field_type3d("O3", "regular", 4, band_limit=1)  # 20 channels per field; channel 0 is the only trivial one
    layer = FourierFieldNorm(ft, num_groups=2, affine=False)
    assert layer.trivial == (0,)
    x = 3 * torch.randn(2, ft.size, 3, 3, 3) + 5
    y = layer(x).view(2, 2, 2, 20, 27)
    assert y[:, :, :, 0].mean(dim=(2, 3)).abs().max() < 1e-5  # trivial channels centred per group
    assert (y.pow(2).mean(dim=(2, 3, 4)) - 1).abs().max() < 1e-3  # unit RMS per group
    ratio = y[:, :, :, 1:] / x.view(2, 2, 2, 20, 27)[:, :, :, 1:]  # other channels are only scaled, per group
    assert (ratio - ratio[:, :, :1, :1, :1]).abs().max() < 1e-4
    affine = FourierFieldNorm(ft, num_groups=2)
    with torch.no_grad():
        affine.weight.copy_(torch.tensor([1.0, 2.0, 3.0, 4.0]))
        affine.bias.copy_(torch.tensor([0.5, -1.0, 0.0, 2.0]))
    z = affine(x).view(2, 4, 20, 27)
    expected = y.reshape(2, 4, 20, 27) * affine.weight.view(1, 4, 1, 1)
    expected[:, :, 0] += affine.bias.view(1, 4, 1)
    assert torch.allclose(z, expected, atol=1e-5)


def _loop_gradients(layer, x, upstream):
    """Per-example gradients of the sum-reduced loss ``sum(upstream * tanh(layer(x)))``, one sample at a time."""
    grads = {p: [] for p in (layer.weight, layer.bias)}
    for n in range(x.shape[0]):
        layer.zero_grad()
        (upstream[n:n + 1] * torch.tanh(layer(x[n:n + 1]))).sum().backward()
        for p in grads:
            grads[p].append(p.grad.clone())
    return {p: torch.stack(g) for p, g in grads.items()}


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.float64, 1e-10)])
@pytest.mark.parametrize("group,num_groups", [("SO3", 1), ("SO3", 3), ("O3", 1)])
def test_field_norm_per_sample_gradients_match_a_loop(dtype, tol, group, num_groups):
    torch.manual_seed(0)
    ft = field_type3d(group, "regular", 3, band_limit=1)
    layer = FourierFieldNorm(ft, num_groups=num_groups).to(dtype)
    with torch.no_grad():
        layer.weight.uniform_(0.5, 1.5)
        layer.bias.normal_()
    x = (torch.randn(4, ft.size, 2, 3, 2) * 2 + 1).to(dtype)
    upstream = torch.randn(4, ft.size, 2, 3, 2, dtype=dtype)
    y = layer(x)
    grad_output, = torch.autograd.grad((upstream * torch.tanh(y)).sum(), y)
    rule = layer.per_sample_gradients((x,), grad_output)
    expected = _loop_gradients(layer, x, upstream)
    for p in (layer.weight, layer.bias):
        assert rule[p].shape == (4, 3) and rule[p].dtype == dtype
        scale = expected[p].abs().max().item()
        assert (rule[p] - expected[p]).abs().max() <= tol * max(1.0, scale)
    layer.zero_grad()
    (upstream * torch.tanh(layer(x))).sum().backward()  # the per-sample gradients add up to the batch gradient
    for p in (layer.weight, layer.bias):
        assert torch.allclose(rule[p].sum(0), p.grad, atol=10 * tol, rtol=0)
    frozen = FourierFieldNorm(ft, num_groups=num_groups).to(dtype)
    frozen.weight.requires_grad_(False)
    assert set(frozen.per_sample_gradients((x,), grad_output)) == {frozen.bias}
    assert FourierFieldNorm(ft, affine=False).per_sample_gradients((x,), grad_output) == {}


def test_functorch_per_sample_gradients_through_the_layers():
    """``torch.func`` (Opacus's functorch mode) works with the layers (no buffers, no in-place on inputs)."""
    from torch.func import functional_call, grad, vmap

    torch.manual_seed(0)
    ft = field_type3d("SO3", "regular", 2, band_limit=1)
    norm, act, pool = FourierFieldNorm(ft), FourierPointwise(ft), FourierGroupPooling(ft)
    net = nn.Sequential(norm, act, pool)
    params = {k: v.detach() for k, v in net.named_parameters()}
    x = torch.randn(3, ft.size, 2, 2, 2)

    def loss(p, sample):
        return functional_call(net, p, (sample.unsqueeze(0),)).pow(2).sum()

    per_sample = vmap(grad(loss), in_dims=(None, 0))(params, x)
    for n in range(3):
        net.zero_grad()
        net(x[n:n + 1]).pow(2).sum().backward()
        assert torch.allclose(per_sample["0.weight"][n], norm.weight.grad, atol=1e-5)
        assert torch.allclose(per_sample["0.bias"][n], norm.bias.grad, atol=1e-5)


def test_group_pooling_features():
    ft = field_type3d("SO3", "regular", 2, band_limit=2)
    x = torch.randn(1, ft.size, 1, 1, 1)
    y = FourierGroupPooling(ft)(x).view(2, 3)
    fields = x.view(2, 35)
    assert torch.allclose(y[:, 0], fields[:, 0])  # the signed mean (frequency 0)
    assert torch.allclose(y[:, 1], fields[:, 1:10].norm(dim=1))
    assert torch.allclose(y[:, 2], fields[:, 10:35].norm(dim=1))
    out = FourierGroupPooling(ft).out_type
    assert out.gspace == ft.gspace and len(out) == 6 and all(r.is_trivial() for r in out.representations)
    assert len(FourierGroupPooling(ft, mode="max").out_type) == 2


def test_clear_errors():
    so3 = field_type3d("SO3", "regular", 2, band_limit=1)
    octa = field_type3d("O", "regular", 1)
    with pytest.raises(ValueError, match="band-limited SO3 / O3 fields.*PointwiseNonlinearity"):
        FourierPointwise(octa)
    from eqlightning.nn import field_type
    with pytest.raises(ValueError, match="planar fields"):
        FourierFieldNorm(field_type("C4", "regular", 2))
    irrep1 = enn.FieldType(so3.gspace, [so3.gspace.fibergroup.irrep(1)] * 2)
    with pytest.raises(ValueError, match="band-limited regular fields"):
        FourierPointwise(irrep1)
    with pytest.raises(ValueError, match="band-limited regular fields"):
        FourierGroupPooling(irrep1)
    FourierFieldNorm(irrep1)  # any sum of irreps can be normalised (no trivial channel: only scaled)
    mixed = enn.FieldType(so3.gspace, [so3.representations[0], so3.gspace.trivial_repr])
    for layer in (FourierPointwise, FourierGroupPooling, FourierFieldNorm):
        with pytest.raises(ValueError, match="one representation"):
            layer(mixed)
    with pytest.raises(ValueError, match="num_groups=3 must divide"):
        FourierFieldNorm(so3, num_groups=3)
    with pytest.raises(ValueError, match="mode must be"):
        FourierGroupPooling(so3, mode="mean")
    with pytest.raises(ValueError, match="unknown activation"):
        FourierPointwise(so3, function="softplus_x")
    with pytest.raises(ValueError, match="needs a grid_size"):
        FourierPointwise(so3, grid="thomson")
    with pytest.raises(ValueError, match="fixed size"):
        FourierPointwise(so3, grid="cube", grid_size=3)
    with pytest.raises(ValueError, match=r"expects a \(N, 20, D, H, W\)"):
        FourierPointwise(so3)(torch.randn(1, 19, 2, 2, 2))


def test_bf16_autocast_runs_the_layers_close_to_float32():
    torch.manual_seed(0)
    ft = field_type3d("SO3", "regular", 2, band_limit=1)
    net = nn.Sequential(_field_norm(ft), FourierPointwise(ft), FourierGroupPooling(ft))
    x = torch.randn(2, ft.size, 3, 3, 3)
    reference = net(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = net(x)
        rule = net[0].per_sample_gradients((x.bfloat16(),), torch.randn_like(x).bfloat16())
    assert ((y.float() - reference).abs().max() / reference.abs().max()) < 5e-2
    assert rule[net[0].weight].dtype == torch.float32  # computed in fp32, returned in the parameter's dtype
