"""The MBConv layers: the per-field depthwise convolution and the field squeeze-excitation commute with escnn's group
action, export to identical plain modules, copy safely, fail clearly, and have exact per-sample gradients."""

from __future__ import annotations

import copy
import pickle

import pytest
import torch
import torch.nn.functional as F

import eqlightning.nn.basis as basis_module
from eqlightning.nn import (EquivariantConv2d, EquivariantDepthwiseConv2d, FieldGate, FieldSqueezeExcitation, export,
                            field_type, grid_elements, group_gspace, restrict)
from eqlightning.nn._escnn import enn

GROUPS = ["C1", "C4", "C8", "D4", "D8"]


def max_equivariance_error(layer, spatial: int, elements=None) -> float:
    return max(err for _, err in layer.check_equivariance(spatial=spatial, elements=elements))


def randomise(layer: torch.nn.Module) -> torch.nn.Module:
    """Non-trivial parameters everywhere (a zero bias would hide a wrong bias expansion)."""
    with torch.no_grad():
        for p in layer.parameters():
            p.normal_()
    return layer


def layers_for(group: str) -> list:
    """One instance of each layer kind (and option) on fields of ``group``, paired with a spatial size (odd and
    even sizes both covered; escnn's group action is the slow part of these tests, so one size each)."""
    reg = field_type(group, "regular", 3)
    gs = group_gspace(group)
    mixed = enn.FieldType(gs, [gs.regular_repr, gs.trivial_repr, gs.regular_repr])  # fields of two sizes
    return [
        (randomise(EquivariantDepthwiseConv2d(reg, 3, bias=True)), 9),
        (randomise(EquivariantDepthwiseConv2d(reg, 5)), 10),
        (randomise(FieldSqueezeExcitation(reg, 2)), 10),
        (randomise(FieldSqueezeExcitation(mixed, 1, activation="relu")), 9),
    ]


@pytest.mark.parametrize("group", GROUPS)
@pytest.mark.parametrize("mode", ["train", "eval"])
def test_layers_are_equivariant_on_the_grid(group, mode):
    for layer, spatial in layers_for(group):
        layer.train(mode == "train")
        assert max_equivariance_error(layer, spatial, grid_elements(layer.in_type.gspace)) < 1e-4, (layer, spatial)


@pytest.mark.parametrize("group", ["C8", "D8"])
def test_layers_are_equivariant_to_45_degrees_at_1x1(group):
    everything = list(group_gspace(group).fibergroup.elements)
    assert len(everything) > len(grid_elements(group_gspace(group)))  # 45 degree elements included
    for layer, _ in layers_for(group):
        layer.eval()
        assert max_equivariance_error(layer, 1, everything) < 1e-5, layer


def test_strided_depthwise_conv_is_exact_on_odd_sizes_and_on_restricted_fields():
    reg = field_type("D4", "regular", 2)
    assert max_equivariance_error(EquivariantDepthwiseConv2d(reg, 3, stride=2), 11, grid_elements(reg.gspace)) < 1e-4
    restricted = restrict(reg, "C4")  # one 8-channel field kind of C4: still one representation
    layer = randomise(EquivariantDepthwiseConv2d(restricted, 3, bias=True))
    assert max_equivariance_error(layer, 9, grid_elements(restricted.gspace)) < 1e-4


@pytest.mark.parametrize("group", ["C4", "D4"])
def test_depthwise_conv_is_one_equivariant_conv_per_field(group):
    """Field f's output is an EquivariantConv2d (one field -> one field) with coefficients weight[f] applied to field
    f alone: the layout of the coefficients, filter and groups."""
    reg = field_type(group, "regular", 3)
    layer = randomise(EquivariantDepthwiseConv2d(reg, 3, bias=True))
    single = field_type(group, "regular", 1)
    x = torch.randn(2, reg.size, 7, 7)
    y = layer(x)
    s = single.size
    for f in range(3):
        conv = EquivariantConv2d(single, single, 3, bias=True)
        with torch.no_grad():
            conv.weight.copy_(layer.weight[f])
            conv.bias.copy_(layer.bias[f])
        torch.testing.assert_close(y[:, f * s:(f + 1) * s], conv(x[:, f * s:(f + 1) * s]))
    assert layer.weight.shape == (3, conv.weight.numel()) and layer.basis is conv.basis  # the shared basis


def test_depthwise_basis_is_shared_not_resampled(monkeypatch):
    reg = field_type("C8", "regular", 4)
    first = EquivariantDepthwiseConv2d(reg, 3)

    def refuse(*args, **kwargs):
        raise AssertionError("escnn's basis was sampled again")

    monkeypatch.setattr(basis_module, "_sample_block", refuse)
    second = EquivariantDepthwiseConv2d(field_type("C8", "regular", 7), 3)
    assert second.basis is first.basis


def test_depthwise_init_is_escnns_generalized_he():
    layer = EquivariantDepthwiseConv2d(field_type("D4", "regular", 4000), 3)
    std = layer.basis.init_std().float()
    ratio = layer.weight.std(dim=0) / std  # every field drawn from the same per-coefficient distribution
    assert ((ratio - 1).abs() < 0.1).all(), ratio


@pytest.mark.parametrize("group", ["C8", "D4"])
def test_export_gives_plain_modules_with_identical_outputs(group):
    for layer, _ in layers_for(group):
        layer.eval()
        plain = export(layer)
        assert not any(hasattr(m, "in_type") for m in plain.modules())
        x = torch.randn(2, layer.in_type.size, 9, 9)
        torch.testing.assert_close(plain(x), layer(x), atol=1e-5, rtol=1e-5)
        with torch.no_grad():  # a copy: the exported module does not share the original's parameters
            for p in plain.parameters():
                p.zero_()
        assert layer(x).abs().max() > 0
    reg = field_type(group, "regular", 3)
    conv = export(EquivariantDepthwiseConv2d(reg, 5, stride=2, bias=True))
    assert isinstance(conv, torch.nn.Conv2d) and conv.groups == 3 and conv.weight.shape == (reg.size, reg.size // 3,
                                                                                             5, 5)
    assert isinstance(export(FieldSqueezeExcitation(reg, 1)), FieldGate)


def test_eval_filter_cache_follows_parameter_updates():
    reg = field_type("C4", "regular", 2)
    conv = EquivariantDepthwiseConv2d(reg, 3, bias=True).eval()
    x = torch.randn(1, reg.size, 6, 6)
    with torch.no_grad():
        y0 = conv(x)
        assert conv._eval_cache is not None
        conv.weight.add_(1.0)  # an optimizer step updates in place
        y1 = conv(x)
    assert not torch.allclose(y0, y1)
    torch.testing.assert_close(y1, F.conv2d(x, *conv.expand(), padding=1, groups=2))
    conv.train()
    assert conv._eval_cache is None


def test_layers_pickle_copy_and_hold_no_buffers():
    reg = field_type("D4", "regular", 3)
    for layer in (randomise(EquivariantDepthwiseConv2d(reg, 3, bias=True)), randomise(FieldSqueezeExcitation(reg, 2))):
        assert list(layer.buffers()) == []  # Opacus's functorch mode refuses layers with buffers
        layer.eval()
        x = torch.randn(2, reg.size, 7, 7)
        with torch.no_grad():
            layer(x)  # fills the eval cache, which must not travel
        for clone in (pickle.loads(pickle.dumps(layer)), copy.deepcopy(layer)):
            torch.testing.assert_close(clone(x), layer(x))
            assert clone.out_type == layer.out_type


def test_bf16_autocast_expands_the_filter_in_fp32():
    reg = field_type("C8", "regular", 2)
    conv = EquivariantDepthwiseConv2d(reg, 3)
    x = torch.randn(2, reg.size, 8, 8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        filt, _ = conv.expand()
        y = conv(x)
        grads = conv.per_sample_gradients((x.bfloat16(),), torch.ones_like(y))
    assert filt.dtype == torch.float32 and y.dtype == torch.bfloat16
    assert grads[conv.weight].dtype == torch.float32
    torch.testing.assert_close(y.float(), conv(x), atol=0.1, rtol=0.05)


def test_clear_errors():
    gs = group_gspace("C4")
    with pytest.raises(ValueError, match="all fields need one representation.*EquivariantConv2d for mixed"):
        EquivariantDepthwiseConv2d(enn.FieldType(gs, [gs.regular_repr, gs.trivial_repr]), 3)
    irreps = enn.FieldType(group_gspace("C8"), [group_gspace("C8").irrep(1)] * 2)
    with pytest.raises(ValueError, match="FieldSqueezeExcitation needs fields whose representation permutes"):
        FieldSqueezeExcitation(irreps, 1)
    for bad in (0, 1.5, True):
        with pytest.raises(ValueError, match=f"reduced_fields must be an int >= 1.*got {bad!r}"):
            FieldSqueezeExcitation(field_type("C4", "regular", 2), bad)
    with pytest.raises(ValueError, match="unknown activation"):
        FieldSqueezeExcitation(field_type("C4", "regular", 2), 1, activation="swishy")
    reg = field_type("C8", "regular", 2)
    for layer in (EquivariantDepthwiseConv2d(reg, 3), FieldSqueezeExcitation(reg, 1)):
        with pytest.raises(ValueError, match=r"expects a \(N, 16, H, W\) tensor for its 2 input fields"):
            layer(torch.zeros(1, 8, 5, 5))


def test_squeeze_excitation_gates_whole_fields_with_invariant_means():
    """The gate is computed from each field's mean over channels and pixels and scales all its channels alike."""
    reg = field_type("C4", "regular", 3)
    se = randomise(FieldSqueezeExcitation(reg, 2))
    x = torch.randn(2, reg.size, 5, 5)
    fields = x.view(2, 3, 4, 5, 5)
    gate = torch.sigmoid(se.gate.expand(torch.nn.functional.silu(se.gate.reduce(fields.mean(dim=(2, 3, 4))))))
    torch.testing.assert_close(se(x), (fields * gate[:, :, None, None, None]).view_as(x))


def per_example_loop(layer, x, gy) -> dict:
    grads = {name: [] for name, _ in layer.named_parameters()}
    for i in range(len(x)):
        layer.zero_grad()
        (layer(x[i:i + 1]) * gy[i:i + 1]).sum().backward()
        for name, p in layer.named_parameters():
            grads[name].append(p.grad.clone())
    return {name: torch.stack(g) for name, g in grads.items()}


@pytest.mark.parametrize("group,restrict_to", [("C1", None), ("C4", None), ("C8", None), ("D4", None), ("D8", None),
                                               ("D4", "C4")])
@pytest.mark.parametrize("kernel_size,stride,dilation,padding", [(3, 1, 1, None), (3, 2, 1, 0)])
def test_depthwise_per_sample_gradients_equal_a_per_example_loop(group, restrict_to, kernel_size, stride, dilation,
                                                                  padding):
    check_per_sample_gradients(group, restrict_to, kernel_size, stride, dilation, padding)


@pytest.mark.parametrize("kernel_size,stride,dilation,padding", [(5, 2, 1, None), (3, 1, 2, None), (3, 3, 2, 1)])
def test_depthwise_per_sample_gradients_at_any_geometry(kernel_size, stride, dilation, padding):
    check_per_sample_gradients("C4", None, kernel_size, stride, dilation, padding)


def check_per_sample_gradients(group, restrict_to, kernel_size, stride, dilation, padding):
    t = field_type(group, "regular", 3)
    t = t if restrict_to is None else restrict(t, restrict_to)
    layer = EquivariantDepthwiseConv2d(t, kernel_size, stride=stride, dilation=dilation, padding=padding,
                                       bias=True).double()
    x = torch.randn(4, t.size, 9, 8, dtype=torch.float64)
    gy = torch.randn_like(layer(x))
    ours = layer.per_sample_gradients((x,), gy)
    expected = per_example_loop(layer, x, gy)
    for name, p in layer.named_parameters():
        assert ours[p].shape == (4, *p.shape)
        scale = expected[name].abs().max()
        assert (ours[p] - expected[name]).abs().max() <= 1e-10 * scale, name


def test_per_sample_gradients_only_for_trainable_parameters():
    layer = EquivariantDepthwiseConv2d(field_type("C4", "regular", 2), 3, bias=True)
    layer.weight.requires_grad_(False)
    x = torch.randn(2, 8, 5, 5)
    assert list(layer.per_sample_gradients((x,), torch.randn(2, 8, 5, 5))) == [layer.bias]
