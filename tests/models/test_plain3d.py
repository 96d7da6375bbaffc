"""Plain 3D baselines (3D, ACS and 2.5D ResNets) and the 2D -> 3D conversion: every plain dims=3 registry entry is
tested for free.

Models are kept small (width 0.125, batch 2; 8-28^3 volumes except one 64^3 forward) so the file runs in well under a
minute on two CPU cores. The layer tests compare against references written independently of the implementation:
ACS against three ``F.conv3d`` calls with hand-made cubic kernels, 2.5D against a loop of ``F.conv2d`` over slices.
"""

from __future__ import annotations

import inspect

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import eqlightning.models.plain  # noqa: F401  (importing registers the plain entry points)
from eqlightning.models.plain import ACSConv, convert_2d_to_3d, resnet18, resnet18_3d, resnet50, resnet50_3d
from eqlightning.models.plain.acs import VOLUME_SAFE_NAMES, acs_split, conv2d_to_3d
from eqlightning.models.profile import count_parameters, profile_backbone
from eqlightning.models.registry import _REGISTRY, create_backbone, list_backbones

PLAIN3D = sorted(name for name, entry in _REGISTRY.items() if not entry.equivariant and entry.dims == 3)
SMALL = {"width_multiplier": 0.125, "depth_multiplier": 0.1}  # widths 8-64, one block per stage
CONVERTED = {"resnet18_acs": (resnet18, "acs"), "resnet50_acs": (resnet50, "acs"),
             "resnet18_25d": (resnet18, "2.5d"), "resnet50_25d": (resnet50, "2.5d")}


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Small 3D convolutions run 10-30x slower with two OpenMP threads when other processes share the two cores
    (threads spin at every barrier): one thread keeps this file fast, whatever the machine's load."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _build(name: str, in_channels: int = 1, num_classes: int = 2, **kwargs) -> nn.Module:
    return _REGISTRY[name].fn(in_channels=in_channels, num_classes=num_classes, **kwargs)


def test_all_3d_families_registered():
    assert {"resnet18_3d", "resnet50_3d", *CONVERTED} <= set(PLAIN3D)
    assert set(PLAIN3D) <= set(list_backbones(equivariant=False, dims=3))
    model = create_backbone("resnet18_acs", in_channels=1, num_classes=2, **SMALL)
    assert model.dims == 3 and model.group is None


@pytest.mark.parametrize("name", PLAIN3D)
def test_entry_point_contract(name):
    entry = _REGISTRY[name]
    assert entry.description and "Options" in entry.fn.__doc__
    opts = inspect.signature(entry.fn).parameters
    assert {"in_channels", "num_classes", "input_size", "norm", "width_multiplier"} <= set(opts)
    assert opts["input_size"].default == 28


@pytest.mark.parametrize("name", PLAIN3D)
def test_forward_shape_28(name):
    model = _build(name, in_channels=3, num_classes=5, **SMALL)
    assert model.group is None and model.input_size == 28
    with torch.no_grad():  # train mode (BatchNorm uses batch statistics); gradients are tested below
        out = model(torch.randn(2, 3, 28, 28, 28))
    assert out.shape == (2, 5) and out.dtype == torch.float32


@pytest.mark.parametrize("name", PLAIN3D)
def test_forward_shape_64(name):
    model = _build(name, num_classes=4, input_size=64, **SMALL).eval()
    with torch.no_grad():
        assert model(torch.randn(2, 1, 64, 64, 64)).shape == (2, 4)


@pytest.mark.parametrize("name", PLAIN3D)
def test_backward_gives_finite_grads_for_every_parameter(name):
    model = _build(name, num_classes=3, **SMALL)
    nn.functional.cross_entropy(model(torch.randn(2, 1, 16, 16, 16)), torch.tensor([0, 2])).backward()
    for pname, p in model.named_parameters():
        assert p.grad is not None, f"{name}: {pname} got no gradient"
        assert torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, f"{name}: {pname} has a bad gradient"


@pytest.mark.parametrize("name", PLAIN3D)
def test_eval_is_deterministic(name):
    model = _build(name, **SMALL).eval()
    x = torch.randn(2, 1, 8, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(model(x), model(x), rtol=0, atol=0)


@pytest.mark.filterwarnings("ignore:Full backward hook is firing")  # the volumes need no gradient
@pytest.mark.parametrize("name", PLAIN3D)
def test_dp_variant_has_exact_opacus_per_sample_gradients(name):
    """GroupNorm variant: passes Opacus' validation, holds parameters only in leaf modules (ACSConv's are in its
    three Conv3d views), and Opacus' per-sample gradients equal single-example gradients (float64)."""
    from opacus import GradSampleModule
    from opacus.validators import ModuleValidator

    model = _build(name, norm="group", width_multiplier=0.125).double()  # all blocks: identity shortcuts too
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())
    assert ModuleValidator.validate(model, strict=False) == []
    for mname, m in model.named_modules():
        if list(m.parameters(recurse=False)):
            assert not list(m.children()), f"{name}: {mname or 'root'} holds parameters and has children"
    x, y = torch.randn(2, 1, 8, 8, 8, dtype=torch.float64), torch.tensor([0, 1])
    wrapped = GradSampleModule(model, loss_reduction="sum")
    nn.functional.cross_entropy(wrapped(x), y, reduction="sum").backward()
    per_sample = {k: p.grad_sample.detach().clone() for k, p in model.named_parameters()}
    wrapped._close()
    for i in range(2):
        model.zero_grad()
        nn.functional.cross_entropy(model(x[i:i + 1]), y[i:i + 1], reduction="sum").backward()
        for k, p in model.named_parameters():
            torch.testing.assert_close(per_sample[k][i], p.grad, rtol=1e-7, atol=1e-10, msg=f"{name}: {k}")


@pytest.mark.parametrize("name", PLAIN3D)
def test_profile_flops_positive_and_growing(name):
    flops = {s: profile_backbone(_build(name, input_size=s, **SMALL), s, 1).flops for s in (16, 28)}
    assert 0 < flops[16] < flops[28]


@pytest.mark.parametrize("name", [n for n in PLAIN3D if "norm" in inspect.signature(_REGISTRY[n].fn).parameters])
def test_unknown_norm_is_rejected(name):
    with pytest.raises(ValueError, match="unknown norm 'layer'.*'batch'.*'group'"):
        _build(name, norm="layer")


# ---------------------------------------------------------------------------------------------- reference sizes

def _resnet_parameters(bottleneck: bool, layers, dims: int, in_channels: int, num_classes: int,
                       widths=(64, 128, 256, 512)) -> int:
    """Parameters of a CIFAR-stem ResNet counted by hand: each k^dims conv, two per norm, the head."""
    k3 = 3 ** dims
    count, c_in = k3 * in_channels * widths[0] + 2 * widths[0], widths[0]
    for stage, (depth, width) in enumerate(zip(layers, widths)):
        for b in range(depth):
            c_out = 4 * width if bottleneck else width
            if bottleneck:  # 1x1 -> 3x3 -> 1x1 (x4), three norms
                count += c_in * width + 2 * width + k3 * width * width + 2 * width + width * c_out + 2 * c_out
            else:  # 3x3 -> 3x3, two norms
                count += k3 * c_in * width + 2 * width + k3 * width * width + 2 * width
            if (stage > 0 and b == 0) or c_in != c_out:  # projection shortcut: 1x1 conv + norm
                count += c_in * c_out + 2 * c_out
            c_in = c_out
    return count + c_in * num_classes + num_classes


def test_hand_count_matches_the_2d_resnets():
    """The hand count reproduces the 2D models (and so torchvision's 11,173,962 / 23,520,842, tests/test_plain)."""
    assert _resnet_parameters(False, (2, 2, 2, 2), 2, 3, 10) == 11_173_962
    assert _resnet_parameters(True, (3, 4, 6, 3), 2, 3, 10) == 23_520_842


def test_3d_resnet_parameter_counts():
    """OrganMNIST3D setting (1 channel, 11 classes): 33,145,419 and 46,157,387 parameters, the hand count, and
    within 1% of the 3D ResNet-18/50 of Med3D / MONAI (33.2M / 46.2M; they differ only in the 7x7x7 stem)."""
    n18 = count_parameters(resnet18_3d(in_channels=1, num_classes=11))
    n50 = count_parameters(resnet50_3d(in_channels=1, num_classes=11))
    assert n18 == _resnet_parameters(False, (2, 2, 2, 2), 3, 1, 11) == 33_145_419
    assert n50 == _resnet_parameters(True, (3, 4, 6, 3), 3, 1, 11) == 46_157_387
    assert abs(n18 - 33.2e6) / 33.2e6 < 0.01 and abs(n50 - 46.2e6) / 46.2e6 < 0.01


@pytest.mark.parametrize("name", sorted(CONVERTED))
def test_converted_nets_are_the_2d_nets_with_their_weights(name):
    """ACS/2.5D entries = the 2D net built with the same options and seed, each conv's 2D kernel and each norm
    carried over (so they also have exactly the 2D parameter count)."""
    build2d, mode = CONVERTED[name]
    options = dict(width_multiplier=0.25, zero_init_residual=True)
    torch.manual_seed(3)
    model2d = build2d(in_channels=1, num_classes=11, **options)
    torch.manual_seed(3)
    model3d = _build(name, num_classes=11, **options)
    assert count_parameters(model3d) == count_parameters(model2d)
    modules3d = dict(model3d.named_modules())
    convs = norms = 0
    for mname, m2 in model2d.named_modules():
        m3 = modules3d[mname]
        if isinstance(m2, nn.Conv2d):
            convs += 1
            kernel = m3.weight2d() if isinstance(m3, ACSConv) else m3.weight.squeeze(2)
            assert isinstance(m3, ACSConv if (mode == "acs" and m2.kernel_size == (3, 3)) else nn.Conv3d), mname
            torch.testing.assert_close(kernel, m2.weight, rtol=0, atol=0)
        elif isinstance(m2, nn.BatchNorm2d):
            norms += 1
            assert isinstance(m3, nn.BatchNorm3d), mname
            torch.testing.assert_close(m3.weight, m2.weight, rtol=0, atol=0)
    assert convs > 0 and norms > 0


# ---------------------------------------------------------------------------------------------- layers

def _acs_reference(x, weight, bias, split, stride, padding, dilation):
    """ACS by hand: each view's 2D kernels written into the middle plane of a k x k x k cube (axial: the middle
    depth plane, coronal: the middle H plane, sagittal: the middle W plane), three conv3d calls, concatenated."""
    k, outs, start = weight.shape[-1], [], 0
    for axis, channels in enumerate(split):
        w, b = weight[start:start + channels], None if bias is None else bias[start:start + channels]
        start += channels
        if channels == 0:
            continue
        cube = torch.zeros(channels, weight.shape[1], k, k, k, dtype=weight.dtype)
        if axis == 0:
            cube[:, :, k // 2, :, :] = w
        elif axis == 1:
            cube[:, :, :, k // 2, :] = w
        else:
            cube[:, :, :, :, k // 2] = w
        outs.append(F.conv3d(x, cube, b, stride=stride, padding=padding, dilation=dilation))
    return torch.cat(outs, dim=1)


def test_acs_split_follows_the_paper_code():
    assert [acs_split(c) for c in (2, 6, 7, 8, 64)] == [(1, 1, 0), (2, 2, 2), (3, 2, 2), (3, 3, 2), (22, 21, 21)]


@pytest.mark.parametrize("out_channels, split, kernel, stride, padding, dilation, bias",
                         [(7, (3, 2, 2), 3, 2, 1, 1, True), (8, (3, 3, 2), 5, 1, 4, 2, False),
                          (2, (1, 1, 0), 3, 1, 1, 1, True)])
def test_acs_conv_equals_explicit_reference(out_channels, split, kernel, stride, padding, dilation, bias):
    conv2d = nn.Conv2d(4, out_channels, kernel, stride, padding, dilation, bias=bias).double()
    acs = conv2d_to_3d(conv2d, "acs")
    assert isinstance(acs, ACSConv) and acs.split == split
    kernels = {"axial": (1, kernel, kernel), "coronal": (kernel, 1, kernel), "sagittal": (kernel, kernel, 1)}
    for view, channels in zip(kernels, split):
        conv = getattr(acs, view)
        if channels == 0:
            assert conv is None, view
        else:
            assert conv.kernel_size == kernels[view] and conv.out_channels == channels, view
    x = torch.randn(2, 4, 7, 9, 8, dtype=torch.float64)  # D, H, W all different: a swapped axis shows
    expected = _acs_reference(x, conv2d.weight, conv2d.bias, split, stride, padding, dilation)
    torch.testing.assert_close(acs(x), expected, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(acs.weight2d(), conv2d.weight, rtol=0, atol=0)


def test_acs_conv_per_sample_gradients_with_torch_func():
    """vmap(grad) through an ACSConv (three Conv3d views, torch.cat) equals single-example gradients."""
    from torch.func import functional_call, grad, vmap

    acs = conv2d_to_3d(nn.Conv2d(2, 5, 3, stride=2, padding=1).double(), "acs")
    params = {k: v.detach() for k, v in acs.named_parameters()}
    x = torch.randn(3, 2, 5, 6, 7, dtype=torch.float64)

    def loss(p, xi):
        return functional_call(acs, p, (xi[None],)).square().sum()

    per_sample = vmap(grad(loss), in_dims=(None, 0))(params, x)
    for i in range(3):
        acs.zero_grad()
        acs(x[i:i + 1]).square().sum().backward()
        for k, p in acs.named_parameters():
            torch.testing.assert_close(per_sample[k][i], p.grad, rtol=1e-10, atol=1e-12, msg=k)


@pytest.mark.parametrize("stride", [1, 2])
def test_25d_conv_equals_per_slice_conv2d(stride):
    conv2d = nn.Conv2d(3, 5, 3, stride=stride, padding=1).double()
    conv3d = conv2d_to_3d(conv2d, "2.5d")
    assert conv3d.kernel_size == (1, 3, 3)
    x = torch.randn(2, 3, 7, 9, 8, dtype=torch.float64)
    out = conv3d(x)
    slices = range(0, 7, stride)  # strides subsample depth too, as in MedMNIST v2
    assert out.shape[2] == len(slices)
    for j, d in enumerate(slices):
        torch.testing.assert_close(out[:, :, j], F.conv2d(x[:, :, d], conv2d.weight, conv2d.bias, stride, 1))


def test_i3d_inflation_of_a_depth_constant_volume_gives_the_2d_output():
    conv2d = nn.Conv2d(3, 5, 3, padding=1).double()
    conv3d = conv2d_to_3d(conv2d, "i3d")
    assert conv3d.kernel_size == (3, 3, 3)
    torch.testing.assert_close(conv3d.weight.sum(2), conv2d.weight)
    image = torch.randn(2, 3, 9, 8, dtype=torch.float64)
    out = conv3d(image.unsqueeze(2).expand(-1, -1, 6, -1, -1))
    for d in range(1, 5):  # the first and last slices see the zero padding in depth
        torch.testing.assert_close(out[:, :, d], conv2d(image))


def test_conversion_copies_norm_statistics_keeps_modes_sharing_and_the_original():
    model2d = nn.Sequential(nn.Conv2d(2, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU(), nn.Conv2d(6, 6, 3, padding=1),
                            nn.MaxPool2d(2), nn.AdaptiveAvgPool2d((1, 1)), nn.Flatten(), nn.Linear(6, 3))
    with torch.no_grad():
        model2d[1].running_mean.normal_()
        model2d[1].running_var.uniform_(0.5, 2)
    model2d.eval()
    model3d = convert_2d_to_3d(model2d, "acs")
    assert [type(m) for m in model3d] == [ACSConv, nn.BatchNorm3d, nn.ReLU, ACSConv, nn.MaxPool3d,
                                          nn.AdaptiveAvgPool3d, nn.Flatten, nn.Linear]
    assert not model3d.training and not model3d[0].axial.training
    for key, value in model2d[1].state_dict().items():
        torch.testing.assert_close(model3d[1].state_dict()[key], value)
    assert model3d(torch.randn(2, 2, 6, 6, 6)).shape == (2, 3)
    assert type(model2d[0]) is nn.Conv2d and model3d[7].weight is not model2d[7].weight  # original untouched

    conv = nn.Conv2d(2, 2, 3, padding=1)
    shared = convert_2d_to_3d(nn.Sequential(conv, nn.ReLU(), conv), "i3d")
    assert shared[0] is shared[2]  # a layer used twice stays one layer
    assert convert_2d_to_3d(model3d, "acs")[0] is not model3d[0]  # converting a 3D net again is a copy


def test_exported_equivariant_resnet_converts():
    """eq_resnet18 (D4) -> eqlightning.nn.export -> 3D: in 2.5D, a volume of identical slices gives the 2D net's
    logits (every layer, norm and pool sees each slice alike); ACS and I3D copies run on volumes."""
    from eqlightning.models.eq_resnet import eq_resnet18

    model2d = eq_resnet18(in_channels=1, num_classes=3, group="D4", width_multiplier=0.25).export().eval()
    image = torch.randn(2, 1, 16, 16)  # 16 -> 8 -> 4 -> 2: even sizes, so every pooling window is 2 wide
    volume = image.unsqueeze(2).expand(-1, -1, 16, -1, -1).contiguous()
    with torch.no_grad():
        expected = model2d(image)
        for mode in ("2.5d", "acs", "i3d"):
            model3d = convert_2d_to_3d(model2d, mode)
            assert model3d.group is None and model3d.dims == 3 and model2d.group == "D4"
            assert not any(isinstance(m, nn.Conv2d) for m in model3d.modules())
            out = model3d(volume)
            assert out.shape == (2, 3) and torch.isfinite(out).all()
            if mode == "2.5d":
                torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", [n for n in sorted(CONVERTED) if n.endswith("_25d")])
def test_25d_nets_on_identical_slices_equal_the_2d_nets(name):
    build2d, _ = CONVERTED[name]
    torch.manual_seed(5)
    model2d = build2d(in_channels=1, num_classes=3, norm="group", **SMALL)
    torch.manual_seed(5)
    model3d = _build(name, num_classes=3, norm="group", **SMALL)
    image = torch.randn(2, 1, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(model3d(image.unsqueeze(2).expand(-1, -1, 16, -1, -1)), model2d(image),
                                   rtol=1e-5, atol=1e-5)


def test_volume_safe_names_still_exist():
    """The eqlightning modules trusted by name (to keep escnn out of this import) must still be those classes."""
    import importlib

    for qualified in VOLUME_SAFE_NAMES:
        module, _, cls = qualified.rpartition(".")
        assert isinstance(getattr(importlib.import_module(module), cls), type), qualified


# ---------------------------------------------------------------------------------------------- family details

def test_3d_stem_depends_on_input_size_and_scaling_works():
    small = resnet18_3d(in_channels=1, num_classes=2, **SMALL)
    large = resnet18_3d(in_channels=1, num_classes=2, input_size=128, **SMALL)
    assert small.stem[0].kernel_size == (3, 3, 3) and small.stem[0].stride == (1, 1, 1)
    assert not any(isinstance(m, nn.MaxPool3d) for m in small.stem)
    assert large.stem[0].kernel_size == (7, 7, 7) and large.stem[0].stride == (2, 2, 2)
    assert isinstance(large.stem[-1], nn.MaxPool3d)
    model = resnet18_3d(in_channels=1, num_classes=2, width_multiplier=0.5, depth_multiplier=1.5,
                        zero_init_residual=True, norm="group")
    assert model.stage_depths == [3, 3, 3, 3] and model.num_features == 256
    assert all(not b.last_norm.weight.detach().any() for stage in model.stages for b in stage)


# ---------------------------------------------------------------------------------------------- errors

def test_unknown_modules_are_named_unless_trusted():
    class SpatialMean(nn.Module):
        def forward(self, x):
            return x.mean(dim=(2, 3))

    model2d = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), SpatialMean())
    with pytest.raises(TypeError, match=r"SpatialMean \(.*\) at 1.*trusted="):
        convert_2d_to_3d(model2d, "acs")
    assert isinstance(convert_2d_to_3d(model2d, "acs", trusted=[SpatialMean])[0], ACSConv)


def test_conversion_errors_say_what_to_do():
    with pytest.raises(ValueError, match="unknown 2D -> 3D conversion mode '3d'.*'acs'.*'2.5d'.*'i3d'"):
        convert_2d_to_3d(nn.Conv2d(1, 2, 3), "3d")
    grouped = nn.Sequential(nn.Conv2d(4, 4, 3, padding=1, groups=2))
    with pytest.raises(ValueError, match=r"'acs'\): 0 .*groups=2.*'2.5d' or 'i3d'"):
        convert_2d_to_3d(grouped, "acs")
    assert convert_2d_to_3d(grouped, "2.5d")[0].groups == 2
    with pytest.raises(ValueError, match=r"stride=\(1, 2\).*same stride"):
        convert_2d_to_3d(nn.Conv2d(1, 2, 3, stride=(1, 2)), "i3d")
    with pytest.raises(ValueError, match="2 \\* padding == dilation \\* \\(kernel_size - 1\\).*use padding=1"):
        convert_2d_to_3d(nn.Conv2d(1, 2, 3), "acs")
