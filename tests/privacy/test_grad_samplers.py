"""Per-sample gradients of eqlightning's layers and backbones against a per-example autograd loop, for every
registered mechanism (a new mechanism is held to all of these by registering it) and for the layer rules inside
stock Opacus."""

from __future__ import annotations

import copy

import pytest
import torch
from opacus import GradSampleModule

import eqlightning.privacy  # noqa: F401  (registers the rules with Opacus)
from eqlightning.models import create_backbone, list_backbones
from eqlightning.nn import EquivariantConv2d, FieldGroupNorm, field_type, group_gspace, restrict
from eqlightning.nn._escnn import enn
from eqlightning.privacy import PerSampleGradients, list_mechanisms
from eqlightning.privacy.mechanisms.fused import per_sample_filter_grads, shifted_filter_grads
from eqlightning.privacy.mechanisms.orbit import orbit_plan

TOL = 1e-5


def reference_grads(model: torch.nn.Module, x: torch.Tensor, target: torch.Tensor) -> dict:
    """Per-example gradients of ``loss(model(x_i), t_i)`` by a plain loop (the reference)."""
    grads = {name: [] for name, p in model.named_parameters() if p.requires_grad}
    for i in range(len(x)):
        model.zero_grad()
        loss_one(model(x[i:i + 1]), target[i:i + 1]).backward()
        for name, p in model.named_parameters():
            if p.requires_grad:
                grads[name].append(p.grad.detach().clone())
    return {name: torch.stack(g) for name, g in grads.items()}


def loss_one(out: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return (out * target).sum() / len(out)  # a generic linear loss (mean over the batch)


#: how per-sample gradients can be computed: every registered mechanism through the engine, and our layer rules
#: inside stock Opacus (``opacus-hooks``)
MODES = (*list_mechanisms(), "opacus-hooks")


def flat(grad_sample) -> torch.Tensor:
    return torch.cat(grad_sample) if isinstance(grad_sample, list) else grad_sample


def opacus_grads(model: torch.nn.Module, x: torch.Tensor, target: torch.Tensor, mode: str = "opacus-hooks") -> dict:
    if mode == "opacus-hooks":
        engine = GradSampleModule(model, loss_reduction="mean")
        loss_one(engine(x), target).backward()
    else:
        engine = PerSampleGradients(model, mode)
        loss_one(model(x), target).backward()
    grads = {name: flat(p.grad_sample).detach().clone() for name, p in model.named_parameters() if p.requires_grad}
    engine.cleanup() if mode == "opacus-hooks" else engine.detach()
    return grads


def assert_close_relative(ours: dict, ref: dict, tol: float = TOL) -> None:
    """Max relative error per parameter. The denominator is floored at 1e-6 of the model's largest gradient:
    some parameters have an exactly zero true gradient (the weight of a single-group GroupNorm that feeds, through
    ReLU and a bias-free conv, another normalisation is scale-invariant), and both values are then rounding."""
    assert ours.keys() == ref.keys()
    floor = 1e-6 * max(r.abs().max().item() for r in ref.values())
    for name in ref:
        assert ours[name].shape == ref[name].shape, name
        scale = max(ref[name].abs().max().item(), floor, 1e-30)
        rel = (ours[name] - ref[name]).abs().max().item() / scale
        assert rel <= tol, f"{name}: max relative error {rel:.2e}"


@pytest.mark.parametrize("group", ["C4", "C8", "D4", "D8"])
@pytest.mark.parametrize("kernel_size", [3, 5, 7])
@pytest.mark.parametrize("stride", [1, 2])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("spatial", [9, 13, 21], ids=["unfold", "shifted", "grouped"])  # the fused path's kernels
def test_equivariant_conv_per_sample_gradients(group, kernel_size, stride, bias, spatial):
    gs = group_gspace(group)
    t_in = enn.FieldType(gs, [gs.trivial_repr, gs.regular_repr])
    t_out = field_type(group, "regular", 2)
    conv = EquivariantConv2d(t_in, t_out, kernel_size, stride=stride, bias=bias)
    x = torch.randn(5, t_in.size, spatial, spatial)
    target = torch.randn(5, t_out.size, *conv(x[:1]).shape[2:])
    reference = reference_grads(conv, x, target)
    for mode in MODES:
        assert_close_relative(opacus_grads(conv, x, target, mode), reference)


@pytest.mark.parametrize("kernel_size,stride,dilation,padding", [(3, 1, 1, None), (3, 2, 1, None), (5, 2, 2, None),
                                                                  (3, 1, 1, 0), (7, 3, 1, 2)])
def test_shifted_filter_gradients_equal_unfold(kernel_size, stride, dilation, padding):
    """The fused path's middle kernel (one matmul per kernel offset) against unfold + bmm, at any geometry."""
    t = field_type("C4", "regular", 2)
    conv = EquivariantConv2d(t, t, kernel_size, stride=stride, dilation=dilation, padding=padding).double()
    x = torch.randn(3, t.size, 17, 17, dtype=torch.float64)
    gy = torch.randn_like(conv(x))
    expected = conv.per_sample_filter_gradients(x, gy)
    torch.testing.assert_close(shifted_filter_grads(conv, x, gy), expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("group", ["C8", "D4"])
def test_field_group_norm_per_sample_gradients(group):
    norm = FieldGroupNorm(field_type(group, "regular", 4), num_groups=2)
    with torch.no_grad():
        norm.weight.normal_()
        norm.bias.normal_()
    x = torch.randn(6, norm.in_type.size, 5, 5)
    target = torch.randn(6, norm.in_type.size, 5, 5)
    reference = reference_grads(norm, x, target)
    for mode in MODES:
        assert_close_relative(opacus_grads(norm, x, target, mode), reference)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("name,options", [
    ("eq_resnet8", {"group": "C4"}),
    ("eq_resnet8", {"group": "C8"}),
    ("eq_resnet8", {"group": "D4"}),
    ("eq_resnet8", {"group": "D8"}),
    ("eq_resnet8", {"group": ["D8", "D4", "D1"]}),
    ("eq_resnet18", {"group": "C4", "width_multiplier": 0.25}),
])
def test_complete_backbone_per_sample_gradients_float32(name, options, mode):
    model = create_backbone(name, in_channels=1, num_classes=3, **options)
    x = torch.randn(4, 1, 16, 16)
    target = torch.randn(4, 3)
    assert_close_relative(opacus_grads(model, x, target, mode), reference_grads(model, x, target))


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("name", list_backbones(equivariant=True, dims=2))
def test_every_equivariant_backbone_per_sample_gradients_are_exact_in_float64(name, mode):
    """In float32, a 50-layer GroupNorm net amplifies rounding: there the per-example float32 loop is itself
    ~8e-2 off the float64 truth (our float32 rule: ~8e-5). float64 shows the rules are exact for every backbone."""
    options = {"width_multiplier": 0.25} if name != "eq_resnet8" else {}
    model = create_backbone(name, in_channels=1, num_classes=3, group="D4", **options).double()
    x, target = torch.randn(3, 1, 28, 28, dtype=torch.float64), torch.randn(3, 3, dtype=torch.float64)
    assert_close_relative(opacus_grads(model, x, target, mode), reference_grads(model, x, target), tol=1e-9)


def test_vit_token_embedding_per_sample_gradients():
    model = create_backbone("vit_tiny", in_channels=1, num_classes=2, input_size=16, depth=1, dim=32, heads=2)
    x, target = torch.randn(3, 1, 16, 16), torch.randn(3, 2)
    ours = opacus_grads(model, x, target)
    ref = reference_grads(model, x, target)
    for name in ("embed.cls_token", "embed.pos_embed"):
        key = next(k for k in ref if k.endswith(name.split(".")[-1]))
        torch.testing.assert_close(ours[key], ref[key], atol=1e-5, rtol=1e-4)


def test_rules_compute_in_fp32_under_bf16_autocast():
    reg = field_type("C8", "regular", 2)
    conv = EquivariantConv2d(reg, reg, 3)
    x, target = torch.randn(4, reg.size, 7, 7), torch.randn(4, reg.size, 7, 7)
    gsm = GradSampleModule(conv, loss_reduction="mean")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = loss_one(gsm(x), target)
    loss.backward()
    per_sample = conv.weight.grad_sample.detach().clone()
    gsm.cleanup()
    assert per_sample.dtype == torch.float32
    ref = reference_grads(conv, x, target)["weight"]
    rel = ((per_sample - ref).abs().max() / ref.abs().max()).item()
    assert rel < 0.05  # bf16 activations and backprops, fp32 rule


@pytest.mark.parametrize("group,restrict_to", [("C1", None), ("C2", None), ("D1", None), ("C4", None), ("D4", None),
                                               ("C8", None), ("D8", None), ("C8", "C4"), ("D8", "D4")])
@pytest.mark.parametrize("kernel_size,size", [(3, 7), (5, 6)])
def test_orbit_coefficient_gradients_equal_the_projected_filter_gradients(group, restrict_to, kernel_size, size):
    """The orbit path (small maps) against the definition: project each sample's filter gradient on the basis."""
    t_in, t_out = field_type(group, "regular", 3), field_type(group, "regular", 2)
    if restrict_to is not None:  # fields of a larger group restricted: H permutes each field in several orbits
        t_in, t_out = restrict(t_in, restrict_to), restrict(t_out, restrict_to)
    conv = EquivariantConv2d(t_in, t_out, kernel_size).double()
    x = torch.randn(4, t_in.size, size, size, dtype=torch.float64)
    gy = torch.randn(4, t_out.size, size, size, dtype=torch.float64)
    plan = orbit_plan(conv, x)
    assert plan is not None
    expected = conv.basis.project(per_sample_filter_grads(conv, x, gy))
    got = plan.coefficient_grads(conv, x, gy)
    assert (got - expected).abs().max().item() <= 1e-12 * expected.abs().max().item()


def test_orbit_path_declines_what_it_cannot_do():
    reg = field_type("D4", "regular", 2)
    x = torch.randn(2, reg.size, 7, 7)
    assert orbit_plan(EquivariantConv2d(reg, reg, 3, stride=2), x) is None
    assert orbit_plan(EquivariantConv2d(reg, reg, 3, padding=0), x) is None
    mixed = enn.FieldType(reg.gspace, [reg.gspace.trivial_repr, reg.gspace.regular_repr])
    assert orbit_plan(EquivariantConv2d(mixed, reg, 3), torch.randn(2, mixed.size, 7, 7)) is None
    assert orbit_plan(EquivariantConv2d(field_type("D4", "trivial", 2), reg, 3), torch.randn(2, 2, 7, 7)) is None


@pytest.mark.parametrize("mode", list_mechanisms())
def test_per_sample_gradients_belong_to_their_own_step(mode):
    """Poisson batches change size every step: each step's per-sample gradients must come from that step (the
    stem's input needs no grad, so its gradient arrives before the fused layers'; it must not see a stale result)."""
    model = create_backbone("eq_resnet8", in_channels=1, num_classes=3, group="C4", width_multiplier=0.5)
    reference_model = copy.deepcopy(model)
    engine = PerSampleGradients(model, mode)
    for batch in (5, 3, 4):
        x, target = torch.randn(batch, 1, 16, 16), torch.randn(batch, 3)
        loss_one(model(x), target).backward()
        ours = {name: flat(p.grad_sample).detach().clone() for name, p in model.named_parameters()}
        for p in model.parameters():
            p.grad, p.grad_sample = None, None
        assert_close_relative(ours, reference_grads(reference_model, x, target))
    engine.detach()
    assert not any(hasattr(p, "grad_sample") for p in model.parameters())


def test_a_second_forward_without_a_step_is_refused_unless_accumulating():
    model = create_backbone("eq_resnet8", in_channels=1, num_classes=3, group="C4", width_multiplier=0.5)
    engine = PerSampleGradients(model, "fused")
    x, target = torch.randn(2, 1, 16, 16), torch.randn(2, 3)
    loss_one(model(x), target).backward()
    with pytest.raises(ValueError, match="max_physical_batch_size"):
        loss_one(model(x), target).backward()
    engine.detach()
    engine = PerSampleGradients(model, "fused", allow_accumulation=True)
    loss_one(model(x), target).backward()
    loss_one(model(x[:1]), target[:1]).backward()
    assert all([len(g) for g in p.grad_sample] == [2, 1] for p in model.parameters())
    engine.detach()


def test_a_layer_used_twice_in_one_forward_sums_its_contributions():
    layer = torch.nn.Linear(3, 3)
    model = torch.nn.Sequential(layer, torch.nn.Tanh(), layer)
    x, target = torch.randn(4, 3), torch.randn(4, 3)
    reference = reference_grads(model, x, target)
    for mode in list_mechanisms():
        ours = opacus_grads(model, x, target, mode)
        assert_close_relative({k: v for k, v in ours.items()}, reference)
