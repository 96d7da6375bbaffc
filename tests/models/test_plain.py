"""Plain baselines (ResNet, EfficientNet, ViT): every plain name in the registry is tested for free.

Models are kept small (28 px, batch 2, reduced width/depth where the factory allows it) so the file runs in well
under a minute on two CPU cores.
"""

from __future__ import annotations

import inspect

import pytest
import torch
from torch import nn

import eqlightning.models.plain  # noqa: F401  (importing registers the plain entry points)
from eqlightning.models.plain import efficientnet_b0, resnet18, resnet50, vit_small, vit_tiny
from eqlightning.models.profile import count_parameters, profile_backbone
from eqlightning.models.registry import _REGISTRY

PLAIN = sorted(name for name, entry in _REGISTRY.items() if not entry.equivariant and entry.dims == 2)


def _options(name: str) -> set[str]:
    return set(inspect.signature(_REGISTRY[name].fn).parameters)


def _build(name: str, in_channels: int = 1, num_classes: int = 2, **kwargs) -> nn.Module:
    return _REGISTRY[name].fn(in_channels=in_channels, num_classes=num_classes, **kwargs)


def _small(name: str) -> dict:
    """Options shrinking a model for the expensive tests, if its factory has them."""
    opts = _options(name)
    small = {}
    if "width_multiplier" in opts:
        small["width_multiplier"] = 0.25
    if "depth" in opts:
        small["depth"] = 2
    return small


def _dp_options(name: str) -> dict:
    """Options making a model DP-SGD-compatible: GroupNorm for CNNs, no dropout (so outputs are comparable)."""
    opts = _options(name)
    kwargs = {"norm": "group"} if "norm" in opts else {}
    if "dropout" in opts:
        kwargs["dropout"] = 0.0
    return kwargs


def test_all_families_registered():
    assert {"resnet18", "resnet50", "efficientnet_b0", "vit_tiny", "vit_small"} <= set(PLAIN)


@pytest.mark.parametrize("name", PLAIN)
def test_entry_point_contract(name):
    entry = _REGISTRY[name]
    assert entry.description, f"{name}: first docstring line is the list_backbones description"
    assert "Options" in entry.fn.__doc__
    opts = inspect.signature(entry.fn).parameters
    assert {"in_channels", "num_classes", "input_size"} <= set(opts)
    assert opts["input_size"].default == 28


@pytest.mark.parametrize("in_channels", [1, 3])
@pytest.mark.parametrize("name", PLAIN)
def test_forward_shape_28(name, in_channels):
    model = _build(name, in_channels=in_channels, num_classes=5)
    assert model.group is None and model.input_size == 28
    with torch.no_grad():  # train mode (BatchNorm uses batch statistics); gradients are tested below
        out = model(torch.randn(2, in_channels, 28, 28))
    assert out.shape == (2, 5) and out.dtype == torch.float32


@pytest.mark.parametrize("name", PLAIN)
def test_forward_shape_64(name):
    model = _build(name, in_channels=3, num_classes=4, input_size=64, **_small(name)).eval()
    with torch.no_grad():
        assert model(torch.randn(2, 3, 64, 64)).shape == (2, 4)


@pytest.mark.parametrize("name", PLAIN)
def test_backward_gives_finite_grads_for_every_parameter(name):
    model = _build(name, in_channels=3, num_classes=3)
    loss = nn.functional.cross_entropy(model(torch.randn(2, 3, 28, 28)), torch.tensor([0, 2]))
    loss.backward()
    for pname, p in model.named_parameters():
        assert p.grad is not None, f"{name}: {pname} got no gradient"
        assert torch.isfinite(p.grad).all(), f"{name}: {pname} has non-finite gradient"


@pytest.mark.parametrize("name", PLAIN)
def test_eval_is_deterministic(name):
    model = _build(name, **_small(name)).eval()
    x = torch.randn(2, 1, 28, 28)
    with torch.no_grad():
        torch.testing.assert_close(model(x), model(x), rtol=0, atol=0)


@pytest.mark.parametrize("name", PLAIN)
def test_dp_variant_passes_opacus_validation(name):
    from opacus.validators import ModuleValidator

    model = _build(name, **_dp_options(name))
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())
    assert ModuleValidator.validate(model, strict=False) == []
    # Opacus' hooks need leaf-level parameters: no module may hold parameters and also have children
    for mname, m in model.named_modules():
        if list(m.parameters(recurse=False)):
            assert not list(m.children()), f"{name}: {mname or 'root'} holds parameters and has children"


@pytest.mark.filterwarnings("ignore:Full backward hook is firing")  # the images need no gradient
@pytest.mark.parametrize("name", PLAIN)
def test_opacus_per_sample_gradients_match_single_example_gradients(name):
    """Opacus' hooks give each example's exact gradient (float64, 16 px: float32 rounding in deep GroupNorm nets
    reaches ~1e-2 relative on some weights, which would hide nothing but makes the comparison flaky)."""
    from opacus import GradSampleModule

    model = _build(name, input_size=16, **_dp_options(name), **_small(name)).double()
    x, y = torch.randn(2, 1, 16, 16, dtype=torch.float64), torch.tensor([0, 1])
    wrapped = GradSampleModule(model, loss_reduction="sum")
    nn.functional.cross_entropy(wrapped(x), y, reduction="sum").backward()
    per_sample = {k: p.grad_sample.detach().clone() for k, p in model.named_parameters()}
    wrapped._close()
    for i in range(2):
        model.zero_grad()
        nn.functional.cross_entropy(model(x[i:i + 1]), y[i:i + 1], reduction="sum").backward()
        for k, p in model.named_parameters():
            torch.testing.assert_close(per_sample[k][i], p.grad, rtol=1e-7, atol=1e-10, msg=f"{name}: {k}")


@pytest.mark.parametrize("name", PLAIN)
def test_profile_flops_positive_and_growing(name):
    flops = {s: profile_backbone(_build(name, input_size=s, **_small(name)), s, 1).flops for s in (28, 64)}
    assert 0 < flops[28] < flops[64]


@pytest.mark.parametrize("name", PLAIN)
def test_large_inputs_128_and_224(name):
    """The ImageNet-sized configurations (ImageNet stems, patch 16) build, run and grow with the input size."""
    flops = {s: profile_backbone(_build(name, in_channels=3, input_size=s, **_small(name)), s, 3).flops
             for s in (128, 224)}
    assert 0 < flops[128] < flops[224]


# ---------------------------------------------------------------------------------------------- reference sizes

def test_resnet18_parameter_count():
    n = count_parameters(resnet18(in_channels=3, num_classes=10))
    assert abs(n - 11.17e6) / 11.17e6 < 0.01, n  # torchvision resnet18 with a 3x3 stem and 10 classes: 11,173,962


def test_resnet50_parameter_count():
    n = count_parameters(resnet50(in_channels=3, num_classes=10))
    assert abs(n - 23.5e6) / 23.5e6 < 0.02, n  # torchvision resnet50 with a 3x3 stem and 10 classes: 23,520,842


def test_efficientnet_b0_parameter_count():
    n = count_parameters(efficientnet_b0(in_channels=3, num_classes=1000))
    assert abs(n - 5.29e6) / 5.29e6 < 0.03, n  # torchvision efficientnet_b0: 5,288,548


# ---------------------------------------------------------------------------------------------- family details

def test_resnet_stem_depends_on_input_size():
    small, large = resnet18(in_channels=1, num_classes=2), resnet18(in_channels=1, num_classes=2, input_size=224)
    assert small.stem[0].kernel_size == (3, 3) and small.stem[0].stride == (1, 1)
    assert not any(isinstance(m, nn.MaxPool2d) for m in small.stem)
    assert large.stem[0].kernel_size == (7, 7) and large.stem[0].stride == (2, 2)
    assert isinstance(large.stem[-1], nn.MaxPool2d)


def test_resnet_scaling_and_zero_init():
    model = resnet18(in_channels=1, num_classes=2, width_multiplier=0.5, depth_multiplier=1.5,
                     zero_init_residual=True, norm="group")
    assert model.stage_depths == [3, 3, 3, 3] and model.num_features == 256
    assert all(not b.last_norm.weight.detach().any() for stage in model.stages for b in stage)


def test_efficientnet_compound_scaling():
    base, scaled = efficientnet_b0(in_channels=1, num_classes=2), efficientnet_b0(in_channels=1, num_classes=2, phi=1)
    assert count_parameters(scaled) > count_parameters(base)
    assert profile_backbone(scaled, 28, 1).flops > profile_backbone(base, 28, 1).flops
    assert base.scaled_input_size == 28 and scaled.scaled_input_size == 32  # 28 * 1.15
    override = efficientnet_b0(in_channels=1, num_classes=2, phi=1, width_multiplier=1.0, depth_multiplier=1.0)
    assert count_parameters(override) == count_parameters(base)


def test_efficientnet_stem_stride_and_group_norm_groups():
    assert efficientnet_b0(in_channels=1, num_classes=2).stem[0].stride == (1, 1)
    assert efficientnet_b0(in_channels=1, num_classes=2, input_size=224).stem[0].stride == (2, 2)
    model = efficientnet_b0(in_channels=1, num_classes=2, norm="group", phi=0.5)
    for m in model.modules():
        if isinstance(m, nn.GroupNorm):
            assert m.num_channels % m.num_groups == 0 and m.num_groups >= 8


def test_vit_default_patch_sizes_and_tokens():
    assert [vit_tiny(in_channels=1, num_classes=2, input_size=s).patch_size for s in (28, 64, 128, 224)] == \
        [4, 8, 16, 16]
    assert vit_tiny(in_channels=1, num_classes=2).num_patches == 49
    model = vit_small(in_channels=1, num_classes=2, depth=1)
    assert model.tokens.pos_embed.shape == (1, 50, 384)
    assert vit_tiny(in_channels=1, num_classes=2, patch_size=7).num_patches == 16


# ---------------------------------------------------------------------------------------------- errors

@pytest.mark.parametrize("name", [n for n in PLAIN if "norm" in _options(n)])
def test_unknown_norm_is_rejected(name):
    with pytest.raises(ValueError, match="unknown norm 'layer'.*'batch'.*'group'"):
        _build(name, norm="layer")


def test_vit_patch_size_must_divide_input_size():
    with pytest.raises(ValueError, match="input_size=28.*patch_size=8"):
        vit_tiny(in_channels=1, num_classes=2, patch_size=8)
    with pytest.raises(ValueError, match="input_size=30.*patch_size=4"):
        vit_tiny(in_channels=1, num_classes=2, input_size=30)


def test_vit_heads_must_divide_dim_and_input_size_must_match():
    with pytest.raises(ValueError, match="dim=100.*heads=3"):
        vit_tiny(in_channels=1, num_classes=2, dim=100)
    model = vit_tiny(in_channels=1, num_classes=2, depth=1)
    with pytest.raises(ValueError, match="built for 28x28.*input_size=32"):
        model(torch.randn(1, 1, 32, 32))


def test_unknown_option_is_a_type_error():
    with pytest.raises(TypeError):
        resnet18(in_channels=1, num_classes=2, widht_multiplier=2.0)
