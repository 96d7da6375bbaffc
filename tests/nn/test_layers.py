"""Every equivariant layer: escnn's group action commutes with it, export() is identical, copies are safe."""

from __future__ import annotations

import copy
import pickle

import pytest
import torch
from escnn.nn.init import _generalized_he_init_variances

from eqlightning.nn import (EquivariantConv2d, EquivariantPool2d, FieldBatchNorm, FieldGroupNorm, GroupPooling,
                            PointwiseNonlinearity, Restrict, export, field_type, grid_elements, group_gspace)
from eqlightning.nn._escnn import enn

GROUPS = ["C1", "C4", "C8", "D1", "D4", "D8"]


def mixed_types(group: str):
    """An input type mixing trivial and regular fields (not grouped by kind) and a regular+trivial output type."""
    gs = group_gspace(group)
    t_in = enn.FieldType(gs, [gs.trivial_repr, gs.regular_repr, gs.trivial_repr, gs.regular_repr])
    t_out = enn.FieldType(gs, [gs.regular_repr, gs.trivial_repr, gs.regular_repr])
    return t_in, t_out


def max_equivariance_error(layer, spatial: int, elements=None) -> float:
    return max(err for _, err in layer.check_equivariance(spatial=spatial, elements=elements))


def layers_for(group: str) -> list:
    """One instance of every layer kind on fields of ``group``."""
    t_in, t_out = mixed_types(group)
    reg = field_type(group, "regular", 4)
    return [
        EquivariantConv2d(t_in, t_out, 3),
        EquivariantConv2d(reg, reg, 5, bias=False),
        FieldGroupNorm(reg, num_groups=2),
        FieldBatchNorm(reg),
        PointwiseNonlinearity(t_out, "elu"),
        EquivariantPool2d(reg, "max"),
        EquivariantPool2d(t_in, "avg"),
        GroupPooling(t_out),
    ]


@pytest.mark.parametrize("group", GROUPS)
@pytest.mark.parametrize("kernel_size,stride", [(3, 1), (5, 2), (7, 1)])
@pytest.mark.parametrize("bias", [True, False])
def test_conv_matches_escnn_r2conv(group, kernel_size, stride, bias):
    t_in, t_out = mixed_types(group)
    ref = enn.R2Conv(t_in, t_out, kernel_size, padding=kernel_size // 2, stride=stride, bias=bias)
    ours = EquivariantConv2d(t_in, t_out, kernel_size, stride=stride, bias=bias)
    assert ours.weight.shape == ref.weights.shape
    with torch.no_grad():
        ours.weight.copy_(ref.weights)
        if bias:
            ref.bias.normal_()
            ours.bias.copy_(ref.bias)
    x = torch.randn(2, t_in.size, 11, 11)
    expected = ref(enn.GeometricTensor(x, t_in)).tensor
    torch.testing.assert_close(ours(x), expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("group", GROUPS)
def test_conv_init_and_bias_expansion_match_escnn(group):
    t_in, t_out = mixed_types(group)
    ref = enn.R2Conv(t_in, t_out, 5, bias=True)
    ours = EquivariantConv2d(t_in, t_out, 5)
    torch.testing.assert_close(ours.basis.init_std().float(), _generalized_he_init_variances(ref.basisexpansion))
    torch.testing.assert_close(ours.basis._bias_expansion.float(), ref.bias_expansion)


@pytest.mark.parametrize("group", ["C8", "D4"])
def test_conv_projection_is_the_adjoint_of_the_expansion(group):
    t_in, t_out = mixed_types(group)
    basis = EquivariantConv2d(t_in, t_out, 5).basis
    w = torch.randn(basis.dim, dtype=torch.float64)
    g = torch.randn(3, t_out.size, t_in.size, 5, 5, dtype=torch.float64)
    lhs = torch.einsum("oikl,noikl->n", basis.expand(w), g)
    rhs = basis.project(g) @ w
    torch.testing.assert_close(lhs, rhs)
    b = torch.randn(basis.bias_dim, dtype=torch.float64)
    gb = torch.randn(3, t_out.size, dtype=torch.float64)
    torch.testing.assert_close(gb @ basis.expand_bias(b), basis.project_bias(gb) @ b)


@pytest.mark.parametrize("group", GROUPS)
@pytest.mark.parametrize("mode", ["train", "eval"])
def test_every_layer_is_equivariant_on_the_grid(group, mode):
    for layer in layers_for(group):
        layer.train(mode == "train")
        elements = grid_elements(layer.in_type.gspace)
        for spatial in (9, 10):
            assert max_equivariance_error(layer, spatial, elements) < 1e-4, (layer, spatial)


@pytest.mark.parametrize("group", ["C8", "D8"])
def test_every_layer_is_equivariant_to_45_degrees_at_1x1(group):
    everything = list(group_gspace(group).fibergroup.elements)
    assert any(not e in grid_elements(group_gspace(group)) for e in everything)  # 45 degree elements included
    for layer in layers_for(group):
        if isinstance(layer, EquivariantPool2d):
            continue  # 1x1 -> 1x1 pooling is the identity
        layer.eval()
        assert max_equivariance_error(layer, 1, everything) < 1e-5, layer


def test_strided_conv_is_exact_on_odd_sizes():
    reg = field_type("D4", "regular", 2)
    conv = EquivariantConv2d(reg, reg, 3, stride=2)
    assert max_equivariance_error(conv, 11, grid_elements(reg.gspace)) < 1e-4


def test_plain_groupnorm_with_per_channel_affine_is_not_equivariant():
    """The negative control: why FieldGroupNorm shares the affine within each field."""
    reg = field_type("C8", "regular", 2)
    plain = torch.nn.GroupNorm(2, reg.size)
    with torch.no_grad():
        plain.weight.normal_()
    x = torch.randn(2, reg.size, 5, 5)
    g = grid_elements(reg.gspace)[1]
    gx = enn.GeometricTensor(x, reg).transform(g).tensor
    gy = enn.GeometricTensor(plain(x), reg).transform(g).tensor
    assert (plain(gx) - gy).abs().max() > 0.1


def test_restrict_keeps_the_tensor_and_changes_the_group():
    reg = field_type("D8", "regular", 2)
    layer = Restrict(reg, "D4")
    x = torch.randn(2, reg.size, 5, 5)
    assert torch.equal(layer(x), x)
    assert layer.out_type.gspace.fibergroup.order() == 8 and layer.out_type.size == reg.size
    assert max_equivariance_error(layer, 5, grid_elements(layer.out_type.gspace)) == 0
    with pytest.raises(ValueError, match="not a subgroup"):
        Restrict(reg, "C3")
    following = EquivariantConv2d(layer.out_type, field_type(layer.out_type.gspace, "regular", 3), 3)
    assert max_equivariance_error(following, 7, grid_elements(following.in_type.gspace)) < 1e-4


@pytest.mark.parametrize("group", ["C8", "D4"])
def test_export_gives_plain_modules_with_identical_outputs(group):
    for layer in layers_for(group):
        layer.eval()
        for p in layer.parameters():
            torch.nn.init.normal_(p)
        plain = export(layer)
        assert not any(hasattr(m, "in_type") for m in plain.modules())
        x = torch.randn(2, layer.in_type.size, 9, 9)
        torch.testing.assert_close(plain(x), layer(x), atol=1e-5, rtol=1e-5)
    conv = EquivariantConv2d(*mixed_types(group), 3)
    assert isinstance(export(conv), torch.nn.Conv2d)
    assert isinstance(export(FieldGroupNorm(field_type(group, "regular", 2))), torch.nn.GroupNorm)


def test_eval_filter_cache_follows_parameter_updates():
    reg = field_type("C4", "regular", 2)
    conv = EquivariantConv2d(reg, reg, 3).eval()
    x = torch.randn(1, reg.size, 6, 6)
    with torch.no_grad():
        y0 = conv(x)
        assert conv._eval_cache is not None
        conv.weight.add_(1.0)  # an optimizer step updates in place
        y1 = conv(x)
    assert not torch.allclose(y0, y1)
    torch.testing.assert_close(y1, torch.nn.functional.conv2d(x, *conv.expand(), padding=1))
    conv.load_state_dict({"weight": torch.zeros_like(conv.weight), "bias": torch.zeros_like(conv.bias)})
    with torch.no_grad():
        assert conv(x).abs().max() == 0
    conv.train()
    assert conv._eval_cache is None


def test_layers_pickle_copy_and_hold_no_buffers():
    t_in, t_out = mixed_types("D4")
    conv = EquivariantConv2d(t_in, t_out, 3)
    assert list(conv.buffers()) == []  # Opacus's functorch mode refuses layers with buffers
    x = torch.randn(2, t_in.size, 7, 7)
    for clone in (pickle.loads(pickle.dumps(conv)), copy.deepcopy(conv)):
        torch.testing.assert_close(clone(x), conv(x))
    gp = pickle.loads(pickle.dumps(GroupPooling(t_out)))
    assert gp.out_type.size == len(t_out)


def test_bf16_autocast_expands_the_filter_in_fp32():
    reg = field_type("C8", "regular", 2)
    conv = EquivariantConv2d(reg, reg, 3)
    x = torch.randn(2, reg.size, 8, 8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        filt, _ = conv.expand()
        y = conv(x)
    assert filt.dtype == torch.float32 and y.dtype == torch.bfloat16
    torch.testing.assert_close(y.float(), conv(x), atol=0.1, rtol=0.05)


def test_clear_errors():
    irreps = enn.FieldType(group_gspace("C8"), [group_gspace("C8").irrep(1)])
    with pytest.raises(ValueError, match="permutes channels"):
        FieldGroupNorm(irreps)
    with pytest.raises(ValueError, match="must divide"):
        FieldGroupNorm(field_type("C4", "regular", 3), num_groups=2)
    with pytest.raises(ValueError, match="unknown symmetry group"):
        field_type("SO2", "regular")
    with pytest.raises(ValueError, match=r"expects a \(N, 8, H, W\)"):
        EquivariantConv2d(field_type("C8", "regular"), field_type("C8", "regular"), 3)(torch.zeros(1, 3, 5, 5))
    with pytest.raises(ValueError, match="unknown activation"):
        PointwiseNonlinearity(field_type("C4", "regular"), "swishy")


def test_a_basis_first_used_under_inference_mode_still_trains(monkeypatch):
    """Trainer.test/validate run under torch.inference_mode(); the shared basis caches built there must not hold
    inference tensors, or every later training forward of a layer with that basis fails in autograd."""
    import eqlightning.nn.basis as basis_module
    from eqlightning.nn import EquivariantConv2d, field_type

    monkeypatch.setattr(basis_module, "_CONV_CACHE", {})
    monkeypatch.setattr(basis_module, "_BLOCK_CACHE", {})
    conv = EquivariantConv2d(field_type("D4", "trivial", 1), field_type("D4", "regular", 2), kernel_size=3)
    with torch.inference_mode():  # the first use of this basis, as in a `validate` before `fit`
        conv.eval()(torch.randn(1, 1, 9, 9))
    twin = EquivariantConv2d(field_type("D4", "trivial", 1), field_type("D4", "regular", 2), kernel_size=3)
    twin.train()(torch.randn(2, 1, 9, 9)).square().sum().backward()
    assert twin.weight.grad is not None and torch.isfinite(twin.weight.grad).all()
