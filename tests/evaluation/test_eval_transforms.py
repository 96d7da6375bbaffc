"""Rotations and flips: orientation convention, the disk, exactness, and invariance of D4 vs plain backbones."""

from __future__ import annotations

import math

import pytest
import torch

from eqlightning import create_backbone
from eqlightning.evaluation import BACKGROUND, disk_mask, hflip, mask_disk, rotate


def _smooth(n: int = 4, size: int = 28) -> torch.Tensor:
    """Low-frequency images (a few sinusoids) that bilinear interpolation reproduces well."""
    g = torch.Generator().manual_seed(3)
    r = torch.arange(size, dtype=torch.float32)[:, None] / size
    c = torch.arange(size, dtype=torch.float32)[None, :] / size
    out = torch.zeros(n, 1, size, size)
    for i in range(n):
        for _ in range(3):
            fr, fc, phase = (torch.rand(3, generator=g) * torch.tensor([2.0, 2.0, 6.28])).tolist()
            out[i, 0] += torch.sin(2 * math.pi * (fr * r + fc * c) + phase) / 3
    return out


def test_disk_mask_is_the_inscribed_disk_and_symmetric():
    m = disk_mask(28)
    assert m.shape == (28, 28) and m.dtype == torch.bool
    assert m[14, 14] and m[0, 14] and m[14, 0] and not m[0, 0] and not m[27, 27] and not m[1, 2]
    assert abs(int(m.sum()) - math.pi * 14 ** 2) < 0.03 * math.pi * 14 ** 2
    assert torch.equal(m, torch.rot90(m, 1)) and torch.equal(m, m.flip(-1))
    wide = disk_mask((20, 28))
    assert wide.shape == (20, 28) and not wide[10, 0] and wide[10, 14] and wide[0, 14]


def test_mask_disk_sets_the_outside_to_the_background(images):
    masked = mask_disk(images)
    inside = disk_mask(28)
    assert torch.equal(masked[..., inside], images[..., inside])
    assert (masked[..., ~inside] == BACKGROUND).all() and BACKGROUND == -1.0
    assert (mask_disk(images, background=0.0)[..., ~inside] == 0).all()


@pytest.mark.parametrize("exact", [True, False])
def test_positive_angles_turn_counter_clockwise_like_rot90(exact):
    x = torch.full((1, 1, 28, 28), -1.0)
    x[0, 0, 8, 19] = 1.0  # top-right quadrant (row 8, column 19), inside the disk
    out = rotate(x, 90, exact=exact)
    row, col = divmod(int(out.flatten().argmax()), 28)
    assert (row, col) == (27 - 19, 8)  # counter-clockwise: top-right -> top-left
    assert torch.equal(torch.rot90(x, 1, dims=(-2, -1)).flatten().argmax(), out.flatten().argmax())


def test_exact_rotations_are_rot90_and_360_is_the_identity(images):
    assert torch.equal(rotate(images, 360), images)
    assert torch.equal(rotate(images, 0), images)
    for angle, k in ((90, 1), (180, 2), (270, 3), (-90, 3), (450, 1)):
        assert torch.equal(rotate(images, angle), torch.rot90(images, k, dims=(-2, -1)))
    assert torch.equal(hflip(images), images.flip(-1))


@pytest.mark.parametrize("angle,k", [(90, 1), (180, 2), (270, 3), (-90, 3)])
def test_bilinear_path_matches_rot90_on_the_disk(images, angle, k):
    bilinear = rotate(images, angle, exact=False)
    expected = mask_disk(torch.rot90(images, k, dims=(-2, -1)))
    torch.testing.assert_close(bilinear, expected, atol=1e-5, rtol=0)


def test_bilinear_360_is_the_masked_image_and_works_on_any_leading_dims(images):
    torch.testing.assert_close(rotate(images, 360, exact=False), mask_disk(images), atol=1e-5, rtol=0)
    three = images[:2].expand(2, 3, 28, 28).contiguous()
    torch.testing.assert_close(rotate(three, 30)[:, 1], rotate(images[:2], 30)[:, 0])
    torch.testing.assert_close(rotate(images[0, 0], 30), rotate(images, 30)[0, 0])
    wide = torch.rand(2, 1, 20, 28) * 2 - 1  # non-square: 180 degrees maps pixel centres onto pixel centres
    torch.testing.assert_close(rotate(wide, 180, exact=False), mask_disk(wide.flip(-1, -2)), atol=1e-5, rtol=0)


def test_rotating_there_and_back_is_close_on_the_disk():
    x = _smooth()
    inner = torch.nn.functional.pad(disk_mask(24), (2, 2, 2, 2))  # the disk, 2 pixels in from its rim
    back = rotate(rotate(x, 30), -30)
    assert (back - x)[..., inner].abs().max() < 0.05
    wrong_way = rotate(rotate(x, 30), 30)  # 60 degrees: far from x (the check above can fail)
    assert (wrong_way - x)[..., inner].abs().max() > 0.3
    outside = ~disk_mask(28)
    assert (back[..., outside] == BACKGROUND).all()


def test_rotate_rejects_bad_input(images):
    with pytest.raises(ValueError, match="finite"):
        rotate(images, float("nan"))
    with pytest.raises(ValueError, match="floating-point"):
        rotate(images.to(torch.uint8), 30)


def _invariance_error(model, x, transform) -> float:
    with torch.no_grad():
        ref = model(x)
        return float(((model(transform(x)) - ref).norm(dim=1) / ref.norm(dim=1)).mean())


def test_d4_backbone_is_invariant_and_a_plain_one_is_not(images):
    eq = create_backbone("eq_resnet8", in_channels=1, num_classes=2, group="D4").eval()
    plain = create_backbone("resnet18", in_channels=1, num_classes=2, width_multiplier=0.125).eval()
    for angle in (90, 180, 270):
        assert _invariance_error(eq, images, lambda x: rotate(x, angle)) < 1e-4
        assert _invariance_error(plain, images, lambda x: rotate(x, angle)) > 1e-3
    assert _invariance_error(eq, images, hflip) < 1e-4
    assert _invariance_error(plain, images, hflip) > 1e-3
    with torch.no_grad():  # same predictions, hence the same ACC/AUC
        assert torch.equal(eq(images).argmax(1), eq(rotate(images, 90)).argmax(1))
