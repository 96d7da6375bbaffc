"""Every registered equivariant backbone: invariant logits (train, eval, exported), scaling options, counts."""

from __future__ import annotations

import pickle

import pytest
import torch

from eqlightning.models import create_backbone, list_backbones, profile_backbone
from eqlightning.models.eq_resnet import fields_for
from eqlightning.nn import image_symmetries

EQUIVARIANT = list_backbones(equivariant=True, dims=2)
GROUPS = ["C4", "C8", "D4", "D8"]
TOL = 1e-4


def small(name: str) -> dict:
    """Narrower versions of the big networks keep the suite fast; invariance does not depend on width."""
    return {"width_multiplier": 0.25} if name in ("eq_resnet18", "eq_resnet50") else {}


def max_invariance_error(model, x: torch.Tensor, group: str) -> float:
    with torch.no_grad():
        y = model(x)
        return max((model(t(x)) - y).abs().max().item() for t in image_symmetries(group).values())


def test_registry_has_the_equivariant_families():
    assert {"eq_resnet8", "eq_resnet18", "eq_resnet50"} <= set(EQUIVARIANT)


@pytest.mark.parametrize("name", EQUIVARIANT)
@pytest.mark.parametrize("group", GROUPS)
def test_logits_are_invariant_in_train_eval_and_after_export(name, group):
    model = create_backbone(name, in_channels=3, num_classes=5, group=group, **small(name))
    assert model.group == group
    x = torch.randn(2, 3, 28, 28)
    model.train()
    assert max_invariance_error(model, x, group) <= TOL
    model.eval()
    assert max_invariance_error(model, x, group) <= TOL
    exported = model.export().eval()
    assert not any(type(m).__module__.startswith("eqlightning.nn") and hasattr(m, "in_type")
                   for m in exported.modules())
    assert max_invariance_error(exported, x, group) <= TOL
    with torch.no_grad():
        torch.testing.assert_close(exported(x), model(x), atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("name", EQUIVARIANT)
def test_batchnorm_variant_is_invariant_too(name):
    model = create_backbone(name, in_channels=1, num_classes=2, group="D4", norm="batch", **small(name))
    x = torch.randn(4, 1, 28, 28)
    model.train()
    assert max_invariance_error(model, x, "D4") <= TOL
    model.eval()
    assert max_invariance_error(model, x, "D4") <= TOL
    assert max_invariance_error(model.export().eval(), x, "D4") <= TOL


@pytest.mark.parametrize("size", [27, 64])
def test_invariance_at_other_resolutions(size):
    model = create_backbone("eq_resnet8", in_channels=1, num_classes=2, group="D4", input_size=size).eval()
    assert max_invariance_error(model, torch.randn(2, 1, size, size), "D4") <= TOL


def test_restriction_between_stages():
    model = create_backbone("eq_resnet8", in_channels=1, num_classes=3, group=["D8", "D4", "D1"])
    assert model.group == "D1" and model.stage_groups == ["D8", "D4", "D1"]
    x = torch.randn(2, 1, 28, 28)
    assert max_invariance_error(model.eval(), x, "D1") <= TOL
    with torch.no_grad():  # D1 is not invariant to rotations: the restriction did happen
        assert (model(torch.rot90(x, 1, (2, 3))) - model(x)).abs().max() > 1e-3
    with pytest.raises(ValueError, match="one per stage"):
        create_backbone("eq_resnet8", in_channels=1, num_classes=3, group=["D8", "D4"])


@pytest.mark.parametrize("name,plain", [("eq_resnet18", "resnet18"), ("eq_resnet50", "resnet50")])
@pytest.mark.parametrize("group", ["C8", "D4"])
def test_fixparams_matches_the_plain_parameter_count(name, plain, group):
    def params(model):
        return sum(p.numel() for p in model.parameters())

    reference = params(create_backbone(plain, in_channels=1, num_classes=2, norm="group"))
    same_channels = params(create_backbone(name, in_channels=1, num_classes=2, group=group))
    fixed = params(create_backbone(name, in_channels=1, num_classes=2, group=group, fixparams=True))
    assert same_channels < reference / 4  # |G| = 8 times fewer parameters at equal channels (basis is band-limited)
    assert abs(fixed - reference) / reference < 0.05, (fixed, reference)


def test_fields_for_same_channels_and_fixparams():
    assert fields_for(64, "D4", fixparams=False) == 8
    assert fields_for(64, "C4", fixparams=False) == 16
    assert fields_for(64, "D4", fixparams=True) > 8
    assert fields_for(64, "D4", True, ((1, 4, 1), (3, 1, 1), (1, 1, 4))) < fields_for(64, "D4", True)


def test_width_depth_and_compound_scaling():
    base = create_backbone("eq_resnet8", in_channels=1, num_classes=2)
    wide = create_backbone("eq_resnet8", in_channels=1, num_classes=2, width_multiplier=2.0)
    deep = create_backbone("eq_resnet8", in_channels=1, num_classes=2, depth_multiplier=2.0)
    scaled = create_backbone("eq_resnet8", in_channels=1, num_classes=2, phi=1.0)
    p = {k: profile_backbone(m, 28, 1) for k, m in dict(base=base, wide=wide, deep=deep, scaled=scaled).items()}
    assert p["wide"].parameters > 2 * p["base"].parameters
    assert sum(len(s) for s in deep.stages) == 2 * sum(len(s) for s in base.stages)
    assert p["scaled"].flops > p["base"].flops and scaled.scaled_input_size == 32  # round(28 * 1.15)


def test_profile_counts_grow_with_resolution():
    model = create_backbone("eq_resnet8", in_channels=1, num_classes=2)
    small_, large = profile_backbone(model, 28, 1), profile_backbone(model, 64, 1)
    assert small_.parameters == large.parameters > 0
    assert large.flops > 4 * small_.flops > 0


def test_backbone_pickles_and_stem_pools_follow_resolution():
    model = create_backbone("eq_resnet8", in_channels=3, num_classes=4, input_size=128, group="C8")
    assert sum(type(m).__name__ == "EquivariantPool2d" for m in model.stem) == 2  # 128 -> 32 before stage 1
    clone = pickle.loads(pickle.dumps(model))
    x = torch.randn(1, 3, 32, 32)
    model.eval(), clone.eval()
    with torch.no_grad():
        torch.testing.assert_close(clone(x), model(x))
