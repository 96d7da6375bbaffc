"""The DP-SGD step: clipping bound, noise level, equivalence with SGD without noise/clipping, augmult, loss scale."""

from __future__ import annotations

import copy

import pytest
import torch
from opacus import GradSampleModule

import eqlightning.privacy  # noqa: F401
from eqlightning.models import create_backbone
from eqlightning.privacy import make_private_optimizer


def private_step(model, x, y, *, noise=0.0, clip=1.0, expected=None, views=1, grad_scale=None, loss_scale=1.0):
    gsm = GradSampleModule(model, loss_reduction="mean")
    opt = make_private_optimizer(torch.optim.SGD(model.parameters(), lr=0.1), distributed=False,
                                 noise_multiplier=noise, max_grad_norm=clip,
                                 expected_batch_size=expected or len(x) // views, views=views,
                                 grad_scale=grad_scale)
    opt.zero_grad()
    (torch.nn.functional.cross_entropy(gsm(x), y) * loss_scale).backward()
    per_sample = [p.grad_sample.detach().clone() for p in opt.params]
    opt.step()
    gsm.cleanup()
    return opt, per_sample


def small_model():
    return create_backbone("eq_resnet8", in_channels=1, num_classes=3, group="C4", width_multiplier=0.5)


def test_every_clipped_per_sample_gradient_is_within_the_bound():
    torch.manual_seed(0)
    model, clip = small_model(), 0.05
    x, y = torch.randn(12, 1, 12, 12) * 3, torch.randint(3, (12,))
    opt, per_sample = private_step(model, x, y, clip=clip)
    flat = torch.cat([g.reshape(len(g), -1) for g in per_sample], dim=1)  # (N, params)
    norms = flat.norm(dim=1)
    assert (norms > clip).all()  # every sample is actually clipped in this setting
    factors = (clip / (norms + 1e-6)).clamp(max=1.0)
    clipped = flat * factors[:, None]
    assert (clipped.norm(dim=1) <= clip * (1 + 1e-6)).all()
    # and the optimizer summed exactly these clipped gradients (noise 0): grad = sum / expected batch size
    summed = torch.cat([p.grad.reshape(-1) for p in opt.params]) * len(x)
    torch.testing.assert_close(summed, clipped.sum(0), rtol=1e-5, atol=1e-7)


def test_noise_standard_deviation_matches_noise_multiplier_times_clip():
    torch.manual_seed(0)
    model = torch.nn.Linear(400, 500)  # 200k noise samples
    x, y = torch.zeros(10, 400), torch.zeros(10, dtype=torch.long)
    with torch.no_grad():
        model.weight.zero_(), model.bias.zero_()
    gsm = GradSampleModule(model, loss_reduction="mean")
    sigma, clip, expected = 1.3, 0.7, 10
    opt = make_private_optimizer(torch.optim.SGD(model.parameters(), lr=0.0), distributed=False,
                                 noise_multiplier=sigma, max_grad_norm=clip, expected_batch_size=expected)
    (gsm(x).sum() * 0).backward()  # zero gradients: what remains is the noise
    opt.step()
    noise = torch.cat([p.grad.reshape(-1) for p in model.parameters()]) * expected
    expected_std = sigma * clip
    assert abs(noise.mean().item()) < 4 * expected_std / noise.numel() ** 0.5
    # std estimate of 200k Gaussian samples: relative standard error 1/sqrt(2n) ~ 0.16%; allow 1%
    assert noise.std().item() == pytest.approx(expected_std, rel=0.01)


def test_without_noise_and_clipping_a_private_step_is_an_sgd_step():
    torch.manual_seed(0)
    model = small_model()
    reference = copy.deepcopy(model)
    x, y = torch.randn(8, 1, 12, 12), torch.randint(3, (8,))
    private_step(model, x, y, noise=0.0, clip=1e6)
    sgd = torch.optim.SGD(reference.parameters(), lr=0.1)
    torch.nn.functional.cross_entropy(reference(x), y).backward()
    sgd.step()
    for p, q in zip(model.parameters(), reference.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-7)


def test_augmult_averages_the_views_of_each_sample_before_clipping():
    torch.manual_seed(0)
    model, clip, views = small_model(), 0.05, 3
    x, y = torch.randn(4 * views, 1, 12, 12), torch.randint(3, (4,)).repeat_interleave(views)
    opt, per_row = private_step(model, x, y, clip=clip, views=views)
    rows = torch.cat([g.reshape(len(g), -1) for g in per_row], dim=1)  # (N * views, params)
    per_sample = rows.reshape(4, views, -1).mean(1)
    factors = (clip / (per_sample.norm(dim=1) + 1e-6)).clamp(max=1.0)
    expected = (per_sample * factors[:, None]).sum(0) / 4
    torch.testing.assert_close(torch.cat([p.grad.reshape(-1) for p in opt.params]), expected, rtol=1e-5,
                               atol=1e-7)


def test_loss_scale_is_removed_before_clipping():
    torch.manual_seed(0)
    x, y = torch.randn(6, 1, 12, 12), torch.randint(3, (6,))
    model = small_model()
    scaled = copy.deepcopy(model)
    private_step(model, x, y, clip=0.05)
    private_step(scaled, x, y, clip=0.05, loss_scale=1024.0, grad_scale=lambda: 1024.0)
    for p, q in zip(model.parameters(), scaled.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-6)
