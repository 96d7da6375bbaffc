"""Every registered equivariant 3D backbone: logits invariant to all 24 (O) / 48 (Oh) grid symmetries of the volume
in train, eval and exported modes; restriction between stages; scaling options; pickling; FLOPs on volumes."""

from __future__ import annotations

import pickle

import pytest
import torch

from eqlightning.models import create_backbone, list_backbones, profile_backbone
from eqlightning.models.eq_resnet import fields_for
from eqlightning.nn import volume_symmetries

EQUIVARIANT_3D = list_backbones(equivariant=True, dims=3)
TOL = 1e-4
#: narrow versions keep the suite fast (a regular O field has 24 channels, an Oh field 48)
SMALL = {"eq_resnet8_3d": 0.5, "eq_resnet18_3d": 0.125, "eq_resnet50_3d": 0.05}


def max_invariance_error(model, x: torch.Tensor, group: str) -> float:
    with torch.no_grad():
        y = model(x)
        return max((model(t(x)) - y).abs().max().item() for t in volume_symmetries(group).values())


def test_registry_has_the_3d_family():
    assert {"eq_resnet8_3d", "eq_resnet18_3d", "eq_resnet50_3d"} <= set(EQUIVARIANT_3D)
    assert not set(EQUIVARIANT_3D) & set(list_backbones(dims=2))


@pytest.mark.parametrize("name", EQUIVARIANT_3D)
def test_logits_are_invariant_to_the_24_cube_rotations_in_train_eval_and_after_export(name):
    model = create_backbone(name, in_channels=2, num_classes=3, group="O", width_multiplier=SMALL[name])
    assert model.group == "O" and model.dims == 3
    x = torch.randn(2, 2, 9, 9, 9)  # odd: the pools take their 3-wide windows
    assert len(volume_symmetries("O")) == 24
    model.train()
    assert max_invariance_error(model, x, "O") <= TOL
    model.eval()
    assert max_invariance_error(model, x, "O") <= TOL
    exported = model.export().eval()
    assert not any(type(m).__module__.startswith("eqlightning.nn") and hasattr(m, "in_type")
                   for m in exported.modules())
    assert max_invariance_error(exported, x, "O") <= TOL
    with torch.no_grad():
        torch.testing.assert_close(exported(x), model(x), atol=1e-5, rtol=1e-4)


def test_oh_is_invariant_to_all_48_and_restriction_to_o_keeps_the_24():
    model = create_backbone("eq_resnet8_3d", in_channels=1, num_classes=2, group="Oh", width_multiplier=0.5,
                            norm="batch").eval()
    x = torch.randn(2, 1, 8, 8, 8)  # even: 2-wide windows
    assert len(volume_symmetries("Oh")) == 48 and max_invariance_error(model, x, "Oh") <= TOL
    restricted = create_backbone("eq_resnet8_3d", in_channels=1, num_classes=2, group=["Oh", "O", "O"],
                                 width_multiplier=0.5).eval()
    assert restricted.group == "O" and restricted.stage_groups == ["Oh", "O", "O"]
    assert max_invariance_error(restricted, x, "O") <= TOL
    flip = lambda v: torch.flip(v, dims=(-1,))  # noqa: E731  (a reflection: not in O)
    with torch.no_grad():
        assert (restricted(flip(x)) - restricted(x)).abs().max() > 1e-3


def test_plain_last_stage_and_bad_groups():
    model = create_backbone("eq_resnet8_3d", in_channels=1, num_classes=2, group=["O", "O", "C1"],
                            width_multiplier=0.5)
    assert model.group == "C1" and model(torch.randn(1, 1, 8, 8, 8)).shape == (1, 2)
    with pytest.raises(ValueError, match="unknown 3D symmetry group 'D4'"):
        create_backbone("eq_resnet8_3d", in_channels=1, num_classes=2, group="D4")
    with pytest.raises(ValueError, match="cannot restrict O to Oh"):
        create_backbone("eq_resnet8_3d", in_channels=1, num_classes=2, group=["O", "Oh", "Oh"])
    with pytest.raises(ValueError, match=r"expects a \(N, 1, D, H, W\) tensor"):
        model(torch.randn(1, 1, 8, 8))
    with pytest.raises(TypeError, match="dims=3"):
        create_backbone("eq_resnet8_3d", in_channels=1, num_classes=2, dims=2)


def test_fields_width_depth_and_fixparams():
    assert fields_for(48, "O", False, dims=3) == 2 and fields_for(96, "Oh", False, dims=3) == 2
    small = create_backbone("eq_resnet8_3d", in_channels=1, num_classes=2, width_multiplier=0.5)
    wide = create_backbone("eq_resnet8_3d", in_channels=1, num_classes=2)
    deep = create_backbone("eq_resnet18_3d", in_channels=1, num_classes=2, width_multiplier=0.125,
                           depth_multiplier=2.0)
    assert sum(p.numel() for p in wide.parameters()) > sum(p.numel() for p in small.parameters())
    assert [len(s) for s in deep.stages] == [4, 4, 4, 4]
    # fixparams: sqrt(27 / d) more fields, where d is the basis size per regular field pair
    fixed = fields_for(48, "O", True, ((3, 1, 1),), dims=3)
    assert fixed > fields_for(48, "O", False, dims=3)


def test_pickles_and_profile_counts_volume_flops():
    model = create_backbone("eq_resnet8_3d", in_channels=1, num_classes=2, width_multiplier=0.5).eval()
    clone = pickle.loads(pickle.dumps(model))
    x = torch.randn(1, 1, 8, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(clone(x), model(x))
    p28, p12 = profile_backbone(model, 28, 1), profile_backbone(model, 12, 1)
    assert p28.parameters == p12.parameters and p28.flops > 10 * p12.flops  # FLOPs grow with the volume


@pytest.mark.parametrize("group,band_limit,count", [("SO3", 1, 24), ("SO3", 2, 24), ("O3", 1, 48)])
def test_so3_and_o3_backbones_are_invariant_on_the_grid_in_train_eval_and_after_export(group, band_limit, count):
    model = create_backbone("eq_resnet8_3d", in_channels=1, num_classes=3, group=group, band_limit=band_limit,
                            width_multiplier=0.5)
    assert model.group == group and len(volume_symmetries(group)) == count
    field = model.stem[0].out_type.representations[0]
    assert field.size == sum((2 * l + 1) ** 2 for l in range(band_limit + 1)) * (2 if group == "O3" else 1)
    x = torch.randn(2, 1, 7, 7, 7)
    for mode in ("train", "eval"):
        model.train(mode == "train")
        assert max_invariance_error(model, x, group) <= TOL
    exported = model.export().eval()
    assert max_invariance_error(exported, x, group) <= TOL
    with torch.no_grad():
        torch.testing.assert_close(exported(x), model(x), atol=1e-5, rtol=1e-4)
    with pytest.raises(ValueError, match="norm='batch' is not available for band-limited"):
        create_backbone("eq_resnet8_3d", in_channels=1, num_classes=3, group=group, norm="batch")
