"""Per-sample gradients of the 3D layers and backbones against a per-example autograd loop, for every registered
mechanism and for stock Opacus with our rules (the same contract as tests/privacy/test_grad_samplers.py)."""

from __future__ import annotations

import pytest
import torch

from eqlightning.models import create_backbone, list_backbones
from eqlightning.nn import EquivariantConv3d, FieldGroupNorm, Restrict, field_type3d

from small_backbones import small_options3d
from test_grad_samplers import MODES, assert_close_relative, opacus_grads, reference_grads  # tests/privacy on sys.path


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("stride", [1, 2])
def test_conv3d_per_sample_gradients_match_the_loop(mode, stride):
    t_in, t_out = field_type3d("O", "regular", 1), field_type3d("O", "regular", 2)
    # (a bias right before a norm has a zero true gradient: the first conv has none)
    model = torch.nn.Sequential(EquivariantConv3d(field_type3d("O", "trivial", 2), t_in, 3, bias=False),
                                FieldGroupNorm(t_in), EquivariantConv3d(t_in, t_out, 3, stride=stride))
    x, target = torch.randn(3, 2, 5, 5, 5), torch.randn(3, t_out.size, *(3 if stride == 2 else 5,) * 3)
    assert_close_relative(opacus_grads(model, x, target, mode), reference_grads(model, x, target))


def test_conv3d_rule_directly_in_float64():
    """The layer's own rule (the contract of eqlightning.nn.persample), without any engine, to 1e-10."""
    t_in, t_out = field_type3d("Oh", "regular", 1), field_type3d("Oh", "trivial", 2)
    conv = EquivariantConv3d(t_in, t_out, 3, bias=True).double()
    x = torch.randn(3, t_in.size, 4, 4, 4, dtype=torch.float64)
    target = torch.randn(3, t_out.size, 4, 4, 4, dtype=torch.float64)
    out = conv(x)
    grad_out = torch.autograd.grad((out * target).sum(), out)[0]
    rule = conv.per_sample_gradients((x,), grad_out)
    ref = reference_grads(conv, x, target)  # loss_one divides by the batch of one: a sum-reduced loss per example
    torch.testing.assert_close(rule[conv.weight], ref["weight"], atol=1e-10, rtol=1e-8)
    torch.testing.assert_close(rule[conv.bias], ref["bias"], atol=1e-10, rtol=1e-8)


@pytest.mark.parametrize("mode", MODES)
def test_restricted_stage_per_sample_gradients(mode):
    t = field_type3d("Oh", "regular", 1)
    restrict = Restrict(t, "O")
    model = torch.nn.Sequential(restrict, EquivariantConv3d(restrict.out_type, field_type3d("O", "regular", 1), 3))
    x, target = torch.randn(2, t.size, 3, 3, 3), torch.randn(2, 24, 3, 3, 3)
    assert_close_relative(opacus_grads(model, x, target, mode), reference_grads(model, x, target))


#: every mechanism on the small equivariant net; every other 3D backbone with the default mechanism and stock Opacus
CASES = [("eq_resnet8_3d", mode) for mode in MODES] + [(name, mode) for name in list_backbones(dims=3)
                                                       if name != "eq_resnet8_3d" for mode in ("fused", "opacus-hooks")]


@pytest.mark.parametrize("name,mode", CASES)
def test_every_3d_backbone_per_sample_gradients_are_exact_in_float64(name, mode):
    model = create_backbone(name, in_channels=1, num_classes=3, input_size=8, **small_options3d(name)).double()
    x, target = torch.randn(2, 1, 8, 8, 8, dtype=torch.float64), torch.randn(2, 3, dtype=torch.float64)
    assert_close_relative(opacus_grads(model, x, target, mode), reference_grads(model, x, target), tol=1e-9)


@pytest.mark.parametrize("mode", ["fused", "opacus-hooks"])
def test_so3_backbone_per_sample_gradients_are_exact_in_float64(mode):
    """Band-limited fields: EquivariantConv3d on SO(3) bases, FourierFieldNorm's rule, FourierPointwise."""
    model = create_backbone("eq_resnet8_3d", in_channels=1, num_classes=3, group="SO3", band_limit=1,
                            width_multiplier=0.25).double()
    x, target = torch.randn(2, 1, 6, 6, 6, dtype=torch.float64), torch.randn(2, 3, dtype=torch.float64)
    assert_close_relative(opacus_grads(model, x, target, mode), reference_grads(model, x, target), tol=1e-9)
