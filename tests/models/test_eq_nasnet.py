"""eq_nasnet: equivariant MBConv / fused MBConv / basic blocks, restrictions between stages, the architecture spec
(defaults, validation, round trip), scaling, and exact per-sample gradients through every mechanism.

(The registry-wide tests in test_equivariant.py, test_grad_samplers.py and test_precision.py cover eq_nasnet's
invariance for C4/C8/D4/D8, its float64 per-sample gradients and mixed precision already.)
"""

from __future__ import annotations

import inspect

import pytest
import torch
import yaml
from opacus import GradSampleModule

import eqlightning.privacy  # noqa: F401  (registers the layer rules with Opacus)
from eqlightning.models import backbone_entry, create_backbone, list_backbones, profile_backbone
from eqlightning.models.eq_nasnet import (STAGE_KEYS, EqNASNet, EquivariantFusedMBConv, EquivariantMBConv,
                                          _make_block, eq_nasnet, resolve_stage)
from eqlightning.models.eq_resnet import BasicBlock, _Layers
from eqlightning.nn import (EquivariantDepthwiseConv2d, FieldBatchNorm, FieldGroupNorm, FieldSqueezeExcitation,
                            Restrict, field_type, grid_elements, image_symmetries, restrict)
from eqlightning.nn._escnn import enn
from eqlightning.privacy import PerSampleGradients, list_mechanisms

TOL = 1e-4


def max_invariance_error(model, x: torch.Tensor, group: str) -> float:
    with torch.no_grad():
        y = model(x)
        return max((model(t(x)) - y).abs().max().item() for t in image_symmetries(group).values())


def rotation_change(model, x: torch.Tensor) -> float:
    with torch.no_grad():
        return (model(torch.rot90(x, 1, (2, 3))) - model(x)).abs().max().item()


def blocks_of(model) -> list:
    return [b for stage in model.stages for b in stage if not isinstance(b, Restrict)]


# ---------------------------------------------------------------------------------------------------- blocks
def block_equivariance_error(block, t_in, size: int) -> float:
    """escnn's group action (every grid element of the block's group) on input and output."""
    t_out = block.out_type
    x = torch.randn(2, t_in.size, size, size)
    with torch.no_grad():
        y = block(x)
        errors = []
        for g in grid_elements(t_out.gspace):
            gx = enn.GeometricTensor(x, t_in).transform(g).tensor
            gy = enn.GeometricTensor(y, t_out).transform(g).tensor
            errors.append((block(gx) - gy).abs().max().item())
    return max(errors)


def randomise_norms(block):
    """Random per-field norm affines (the defaults, weight 1 and bias 0, would hide a field mix-up)."""
    with torch.no_grad():
        for m in block.modules():
            if isinstance(m, (FieldGroupNorm, FieldBatchNorm)):
                m.weight.normal_()
                m.bias.normal_()
    return block


@pytest.mark.parametrize("kind", ["mbconv", "fused_mbconv", "basic"])
@pytest.mark.parametrize("stride,size", [(1, 9), (2, 9), (2, 10)])
def test_blocks_are_equivariant_with_stride_2_on_odd_and_even_sizes(kind, stride, size):
    t_in, t_out = field_type("D4", "regular", 2), field_type("D4", "regular", 3)
    stage = resolve_stage(0, {"block": kind, "width": 24, "expand": 1 if kind == "basic" else 2})
    block = randomise_norms(_make_block(stage, t_in, t_out, stride == 2, _Layers("group", None, "silu", 3)))
    out_size = size if stride == 1 else (size + 1) // 2
    assert block(torch.randn(1, t_in.size, size, size)).shape == (1, t_out.size, out_size, out_size)
    assert block_equivariance_error(block.train(), t_in, size) < TOL


@pytest.mark.parametrize("cls", [EquivariantMBConv, EquivariantFusedMBConv])
def test_blocks_on_restricted_fields_are_equivariant_to_the_subgroup(cls):
    t_in = restrict(field_type("D4", "regular", 2), "C4")  # what a Restrict between stages hands the next block
    t_out = field_type(t_in.gspace, "regular", 4)
    block = randomise_norms(cls(t_in, t_out, True, _Layers("group", None, "silu", 3), expand=2, se=0.5))
    assert block.se is not None and not block.use_residual
    assert block_equivariance_error(block, t_in, 9) < TOL


def test_residual_exactly_when_stride_1_and_the_field_types_match():
    d4 = field_type("D4", "regular", 2)
    layers = _Layers("group", None, "silu", 3)
    for cls in (EquivariantMBConv, EquivariantFusedMBConv):
        for expand in (1, 3):
            same = cls(d4, d4, False, layers, expand=expand)
            assert same.use_residual
            assert not cls(d4, d4, True, layers, expand=expand).use_residual  # stride 2
            assert not cls(d4, field_type("D4", "regular", 3), False, layers, expand=expand).use_residual  # wider
            restricted = restrict(field_type("D4", "regular", 1), "C4")  # 8 channels, like 2 C4 fields...
            other = field_type(restricted.gspace, "regular", 2)  # ...but another representation: no sum
            assert not cls(restricted, other, False, layers, expand=expand).use_residual
            # the residual adds the input: with the last norm zeroed, the block is the identity (zero without)
            wider = cls(d4, field_type("D4", "regular", 3), False, layers, expand=expand)
            x = torch.randn(2, d4.size, 7, 7)
            with torch.no_grad():
                for block in (same, wider):
                    last = (block.project if block.project is not None else block.expand)[1]
                    last.weight.zero_()
                    last.bias.zero_()
                torch.testing.assert_close(same(x), x)
                assert wider(x).abs().max() == 0
    model = create_backbone("eq_nasnet", group="C4", width_multiplier=0.5)
    assert [b.use_residual for b in blocks_of(model)] == [True, False, True, False, True, False]


# ----------------------------------------------------------------------------------------------- backbone
def test_default_architecture_is_c4_then_c1_and_not_rotation_invariant():
    model = create_backbone("eq_nasnet", in_channels=3, num_classes=4)
    assert model.stage_groups == ["C4", "C4", "C4", "C1"] and model.group == "C1"
    assert [sum(not isinstance(b, Restrict) for b in s) for s in model.stages] == [1, 2, 2, 1]
    assert isinstance(model.stages[3][0], Restrict) and not any(isinstance(b, Restrict) for s in model.stages[:3]
                                                                for b in s)
    assert model.input_size == model.scaled_input_size == 28 and model.in_channels == 3 and model.num_classes == 4
    assert len(model.input_type) == 3 and model.feature_type.size == 80
    assert model.architecture() == [
        {"block": "mbconv", "width": 16, "depth": 1, "kernel": 3, "expand": 1, "stride": 1, "se": 0.25, "group": "C4"},
        {"block": "mbconv", "width": 24, "depth": 2, "kernel": 3, "expand": 6, "stride": 2, "se": 0.25, "group": "C4"},
        {"block": "mbconv", "width": 40, "depth": 2, "kernel": 5, "expand": 6, "stride": 2, "se": 0.25, "group": "C4"},
        {"block": "mbconv", "width": 80, "depth": 1, "kernel": 3, "expand": 6, "stride": 2, "se": 0.25, "group": "C1"},
    ]
    hidden = model.stages[1][0].expand[0]  # expand 6 on 16 channels of C4: 24 regular fields
    assert hidden.out_type.size == 96 and model.stages[1][0].se.gate.reduce.out_features == 1  # int(4 * 0.25)
    x = torch.randn(2, 3, 28, 28)
    assert model(x).shape == (2, 4) and model.forward_features(x).shape == (2, 80)
    with torch.no_grad():  # strides 1, 2, 2, 2: 28 -> 28 -> 14 -> 7 -> 4
        h, sizes = model.stem(x), []
        for stage in model.stages:
            h = stage(h)
            sizes.append(h.shape[-1])
    assert sizes == [28, 14, 7, 4]
    assert rotation_change(model.eval(), x) > 1e-3  # C1 last: the logits are not invariant to rotations


def test_restriction_between_stages_keeps_the_last_groups_invariance():
    model = create_backbone("eq_nasnet", in_channels=1, num_classes=3, group=["D4", "D4", "C4", "C4"],
                            width_multiplier=0.5)
    assert model.group == "C4" and isinstance(model.stages[2][0], Restrict)
    x = torch.randn(2, 1, 27, 27)  # odd: every stride-2 pool uses its 3x3 window
    for net in (model.train(), model.eval(), model.export().eval()):
        assert max_invariance_error(net, x, "C4") <= TOL
    with torch.no_grad():  # C4 does not contain the flips D4 had: the restriction did happen
        assert (model(torch.flip(x, (-1,))) - model(x)).abs().max() > 1e-3
    # a stage's own group key wins over the backbone's
    stages = [dict(s) for s in EqNASNet.DEFAULT_STAGES]
    stages[3]["group"] = "C1"
    overridden = create_backbone("eq_nasnet", group="C4", stages=stages, width_multiplier=0.5)
    assert overridden.stage_groups == ["C4", "C4", "C4", "C1"]
    assert rotation_change(overridden.eval(), x) > 1e-3


def test_mixed_blocks_head_conv_and_norms():
    stages = [{"block": "fused_mbconv", "width": 16, "expand": 2, "se": 0},
              {"block": "basic", "width": 32, "stride": 2, "kernel": 5},
              {"block": "mbconv", "width": 32, "stride": 2, "depth": 2}]
    model = create_backbone("eq_nasnet", stages=stages, group="D4", head_width=48, norm="batch")
    kinds = [type(b) for b in blocks_of(model)]
    assert kinds == [EquivariantFusedMBConv, BasicBlock, EquivariantMBConv, EquivariantMBConv]
    assert blocks_of(model)[0].se is None and blocks_of(model)[2].se is not None
    assert model.feature_type.size == 48 and model.head.in_features == 6
    assert any(isinstance(m, FieldBatchNorm) for m in model.modules())
    assert not any(isinstance(m, FieldGroupNorm) for m in model.modules())
    x = torch.randn(3, 1, 20, 20)
    for net in (model.train(), model.eval(), model.export().eval()):
        assert max_invariance_error(net, x, "D4") <= TOL
    plain = create_backbone("eq_nasnet", stages=stages[2:], group="C4", norm="none")
    depthwise = [m for m in plain.modules() if isinstance(m, EquivariantDepthwiseConv2d)]
    assert depthwise and all(m.bias is not None for m in depthwise)  # no norm: the convolutions learn a bias


def test_width_depth_and_compound_scaling():
    def build(**kwargs):
        model = create_backbone("eq_nasnet", group="C4", **kwargs)
        return model, profile_backbone(model, model.scaled_input_size, 1)

    base, p_base = build()
    wide, p_wide = build(width_multiplier=2.0)
    deep, p_deep = build(depth_multiplier=2.0)
    scaled, p_scaled = build(phi=1.0)
    assert p_wide.parameters > 2.5 * p_base.parameters and p_wide.flops > 2.5 * p_base.flops  # 1x1 convs: quadratic
    assert [s["width"] for s in wide.architecture()] == [32, 48, 80, 160]
    assert len(blocks_of(deep)) == 2 * len(blocks_of(base)) == 12
    assert p_base.parameters < p_deep.parameters < p_wide.parameters and p_deep.flops > 1.5 * p_base.flops
    assert scaled.scaled_input_size == 32 and base.scaled_input_size == 28  # round(28 * 1.15)
    assert [s["depth"] for s in scaled.architecture()] == [2, 3, 3, 2]  # ceil(1.2 * depth)
    assert p_scaled.parameters > p_base.parameters and p_scaled.flops > p_base.flops
    ignored = create_backbone("eq_nasnet", group="C4", phi=1.0, width_multiplier=5.0, depth_multiplier=5.0)
    assert profile_backbone(ignored, 32, 1).parameters == p_scaled.parameters  # phi overrides both multipliers


def test_architecture_round_trips_through_a_config():
    model = create_backbone("eq_nasnet", in_channels=1, num_classes=3).eval()
    arch = model.architecture()
    assert all(list(stage) == list(STAGE_KEYS) for stage in arch)
    rebuilt = create_backbone("eq_nasnet", in_channels=1, num_classes=3, stages=arch).eval()
    rebuilt.load_state_dict(model.state_dict())  # strict: the same parameters with the same names and shapes
    x = torch.randn(2, 1, 28, 28)
    with torch.no_grad():
        torch.testing.assert_close(rebuilt(x), model(x), rtol=0, atol=0)

    stages = [{"block": "fused_mbconv", "width": 12, "expand": 3}, {"width": 20, "stride": 2, "kernel": 5, "se": 0.5},
              {"block": "basic", "width": 40, "stride": 2, "group": "C1"}]
    scaled = create_backbone("eq_nasnet", in_channels=2, num_classes=3, stages=stages, group="D4", phi=0.5,
                             head_width=24, stem_width=8, activation="relu").eval()
    config = yaml.safe_load(yaml.safe_dump(scaled.backbone_kwargs()))  # as written to, and read from, a YAML config
    assert config["input_size"] == scaled.scaled_input_size == 30 and config["group"] == ["D4", "D4", "C1"]
    again = create_backbone("eq_nasnet", in_channels=2, num_classes=3, **config).eval()
    assert again.architecture() == scaled.architecture()
    again.load_state_dict(scaled.state_dict())
    x = torch.randn(2, 2, 30, 30)
    with torch.no_grad():
        torch.testing.assert_close(again(x), scaled(x), rtol=0, atol=0)


def test_buildable_from_a_yaml_config():
    config = yaml.safe_load("""
        backbone: eq_nasnet
        backbone_kwargs:
          group: [D4, C4, C1]
          width_multiplier: 0.5
          stages:
            - {block: fused_mbconv, width: 16, expand: 2}
            - {block: mbconv, width: 24, stride: 2, kernel: 5, se: 0}
            - {block: basic, width: 32, stride: 2}
    """)
    model = create_backbone(config["backbone"], in_channels=1, num_classes=2, **config["backbone_kwargs"])
    assert model.stage_groups == ["D4", "C4", "C1"]
    assert model(torch.randn(1, 1, 28, 28)).shape == (1, 2)


def test_stage_defaults():
    base = {"width": 16, "depth": 1, "kernel": 3, "stride": 1}
    assert resolve_stage(0, {"width": 16}) == {"block": "mbconv", **base, "expand": 6, "se": 0.25}
    assert resolve_stage(0, {"width": 16, "block": "fused_mbconv"}) == {"block": "fused_mbconv", **base, "expand": 4,
                                                                          "se": 0.25}
    assert resolve_stage(0, {"width": 16, "block": "basic"}) == {"block": "basic", **base, "expand": 1, "se": 0.0}
    assert resolve_stage(0, {"width": 16, "group": " d4"})["group"] == "D4"
    model = create_backbone("eq_nasnet", stages=[{"width": 16}, {"width": 32, "group": "C1"}], stem_width=8)
    assert model.stage_groups == ["C4", "C1"] and create_backbone("eq_nasnet", stages=[{"width": 8}]).group == "C4"
    assert model.stages[0][0].expand[0].out_type.size == 48  # expand 6 x the 8 stem channels


SPEC_ERRORS = [
    ({"stages": [{"width": 16}, {"width": 24, "kernal": 5}]}, r"stage 1: unknown key 'kernal' \(did you mean 'kernel'"),
    ({"stages": [{"width": 16, "block": "mbconvv"}]}, r"stage 0: block='mbconvv'.*did you mean 'mbconv'"),
    ({"stages": [{"width": 16}, {"width": 24, "kernel": 4}]}, r"stage 1: kernel=4 must be an odd int"),
    ({"stages": [{"width": 16, "stride": 3}]}, r"stage 0: stride=3 must be 1 or 2"),
    ({"stages": [{"width": 16}, {"width": 16, "depth": 0}]}, r"stage 1: depth=0 must be an int >= 1"),
    ({"stages": [{"width": 0}]}, r"stage 0: width=0 must be an int >= 1"),
    ({"stages": [{"width": 16, "expand": 0.5}]}, r"stage 0: expand=0.5 must be a number >= 1"),
    ({"stages": [{"width": 16, "se": 1.5}]}, r"stage 0: se=1.5 must be in \[0, 1\]"),
    ({"stages": [{"width": 16, "block": "basic", "se": 0.25}]}, r"stage 0: se=0.25, but block 'basic' has no"),
    ({"stages": [{"depth": 2}]}, r"stage 0: the key 'width' is missing"),
    ({"stages": [{"width": 16, "group": "SO2"}]}, r"stage 0: group='SO2': unknown symmetry group"),
    ({"stages": []}, r"stages must be a non-empty list"),
    ({"stages": [16, 24]}, r"stage 0: a stage is a dict"),
    ({"group": ["C4", "D4", "C4", "C1"]}, r"stage 1 uses group D4 after stage 0's C4, but D4 is not a subgroup of C4.*"
                                          r"Restrict C<N> to C<M> and D<N> to D<M> or C<M>"),
    ({"group": ["C8", "C8", "C3", "C1"]}, r"C3 is not a subgroup of C8"),
    ({"group": ["C4", "C1"]}, r"group has 2 entries but the architecture has 4 stages"),
    ({"stem_kernel": 4}, r"stem_kernel=4 must be an odd int"),
    ({"head_width": 0}, r"head_width=0 must be an int >= 1"),
]


@pytest.mark.parametrize("kwargs,message", SPEC_ERRORS, ids=[m.split(":")[0][:30] for _, m in SPEC_ERRORS])
def test_spec_errors_name_the_stage_key_and_value(kwargs, message):
    with pytest.raises(ValueError, match=message):
        create_backbone("eq_nasnet", **kwargs)


def test_registry_entry():
    assert "eq_nasnet" in list_backbones(equivariant=True)
    entry = backbone_entry("eq_nasnet")
    assert entry.description.startswith("Equivariant MBConv network built from an architecture spec")
    assert "Options" in entry.fn.__doc__
    factory = inspect.signature(eq_nasnet).parameters
    network = inspect.signature(EqNASNet).parameters
    for name, param in factory.items():  # the factory and the class must not drift apart
        if name not in ("in_channels", "num_classes"):
            assert network[name].default == param.default, name
    assert set(network) - set(factory) == set()


# ------------------------------------------------------------------------------------------ per-sample gradients
def loss_one(out: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return (out * target).sum() / len(out)


def reference_grads(model, x, target) -> dict:
    grads = {name: [] for name, _ in model.named_parameters()}
    for i in range(len(x)):
        model.zero_grad()
        loss_one(model(x[i:i + 1]), target[i:i + 1]).backward()
        for name, p in model.named_parameters():
            grads[name].append(p.grad.detach().clone())
    return {name: torch.stack(g) for name, g in grads.items()}


def engine_grads(model, x, target, mode: str) -> dict:
    if mode == "opacus-hooks":  # our rules inside stock Opacus
        engine = GradSampleModule(model, loss_reduction="mean")
        loss_one(engine(x), target).backward()
    else:
        engine = PerSampleGradients(model, mode)
        loss_one(model(x), target).backward()
    grads = {}
    for name, p in model.named_parameters():
        g = p.grad_sample
        grads[name] = (torch.cat(g) if isinstance(g, list) else g).detach().clone()
    engine.cleanup() if mode == "opacus-hooks" else engine.detach()
    return grads


@pytest.mark.parametrize("mode", [*list_mechanisms(), "opacus-hooks"])
def test_per_sample_gradients_of_every_block_kind_are_exact_in_float64(mode):
    """SE gates (their Linear layers), depthwise convs, fused and basic blocks, restrictions D4 -> C4 -> C1 and a
    head conv, per-sample gradients against a per-example loop."""
    stages = [{"block": "mbconv", "width": 16, "expand": 1, "se": 0.5},
              {"block": "fused_mbconv", "width": 16, "expand": 2, "stride": 2},
              {"block": "basic", "width": 16, "group": "C4"},
              {"block": "mbconv", "width": 6, "expand": 2, "stride": 2, "group": "C1"}]
    model = create_backbone("eq_nasnet", in_channels=1, num_classes=3, stages=stages, group="D4", head_width=8,
                            stem_width=8).double()
    assert any(isinstance(m, FieldSqueezeExcitation) for m in model.modules())
    x, target = torch.randn(3, 1, 12, 12, dtype=torch.float64), torch.randn(3, 3, dtype=torch.float64)
    reference = reference_grads(model, x, target)
    ours = engine_grads(model, x, target, mode)
    assert ours.keys() == reference.keys()
    floor = 1e-6 * max(r.abs().max().item() for r in reference.values())
    for name, ref in reference.items():
        scale = max(ref.abs().max().item(), floor)
        assert (ours[name] - ref).abs().max().item() <= 1e-9 * scale, name
