"""FGSM and PGD: closed form on a linear binary model, the L-infinity ball, the valid range, inference mode."""

from __future__ import annotations

import pytest
import torch

from eqlightning import tasks
from eqlightning.evaluation import PIXEL_SCALE, fgsm, pgd

EPS = 1.0  # grey levels
RADIUS = EPS * 2 / 255  # in the normalised space


class LinearBinary(torch.nn.Module):
    """Binary logits ``[0, w.x + b]``: the loss gradient's sign is ``-sign(w)`` for label 1, ``+sign(w)`` for 0."""

    def __init__(self, dim: int = 28 * 28, seed: int = 0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.w = torch.nn.Parameter(torch.randn(dim, generator=g) * 0.01)
        self.b = torch.nn.Parameter(torch.tensor(0.01))

    def forward(self, x):
        m = x.flatten(1) @ self.w + self.b
        return torch.stack([torch.zeros_like(m), m], dim=1)


def _loss(logits, y):
    return tasks.loss_fn(tasks.BINARY, logits, y)


def _data(n: int = 64):
    g = torch.Generator().manual_seed(5)
    x = (torch.rand(n, 1, 28, 28, generator=g) - 0.5)  # in [-0.5, 0.5]: the clamp to [-1, 1] never acts
    y = torch.randint(0, 2, (n,), generator=g)
    return x, y


def _margins(model, x, y):
    """The correct class's margin: (2y - 1) * (w.x + b); a sample is classified correctly iff it is > 0."""
    with torch.no_grad():
        return (2 * y - 1) * model(x)[:, 1]


def test_pixel_scale_is_eqlightnings_normalisation():
    assert PIXEL_SCALE == pytest.approx(2 / 255)


def test_fgsm_on_a_linear_model_is_the_closed_form():
    model, (x, y) = LinearBinary(), _data()
    x_adv = fgsm(model, _loss, x, y, EPS)
    sign_margin = (2 * y - 1).float().view(-1, 1, 1, 1)
    expected = -RADIUS * model.w.detach().sign().view(1, 1, 28, 28) * sign_margin
    torch.testing.assert_close(x_adv - x, expected, atol=1e-6, rtol=0)
    drop = RADIUS * model.w.detach().abs().sum()
    torch.testing.assert_close(_margins(model, x_adv, y), _margins(model, x, y) - drop, atol=1e-5, rtol=0)
    assert all(p.grad is None for p in model.parameters())


def test_pgd_reaches_the_same_corner_and_acc_is_the_closed_form():
    model, (x, y) = LinearBinary(), _data()
    clean, drop = _margins(model, x, y), RADIUS * model.w.detach().abs().sum()
    assert ((clean - drop).abs() > 1e-4).all() and 0 < (clean > drop).float().mean() < (clean > 0).float().mean()
    x_adv = pgd(model, _loss, x, y, EPS, steps=12, step_size=EPS / 4, random_start=True,
                generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(x_adv, fgsm(model, _loss, x, y, EPS), atol=1e-6, rtol=0)
    attacked = _margins(model, x_adv, y)
    torch.testing.assert_close(attacked, clean - drop, atol=1e-5, rtol=0)
    assert torch.equal(attacked > 0, clean > drop)  # ACC under attack = fraction with margin > eps * ||w||_1


def test_pgd_stays_in_the_ball_and_the_valid_range():
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3), torch.nn.ReLU(), torch.nn.Flatten(),
                              torch.nn.Linear(4 * 26 * 26, 3))
    x = (torch.rand(8, 1, 28, 28) * 2 - 1)
    x[:, :, :4] = 1.0
    x[:, :, -4:] = -1.0  # on the bounds: any step outwards must be clamped
    y = torch.randint(0, 3, (8,))
    loss = lambda z, t: tasks.loss_fn(tasks.MULTI_CLASS, z, t)  # noqa: E731
    for eps in (3.0, 40.0):
        x_adv = pgd(net, loss, x, y, eps, steps=5, step_size=eps, random_start=True)
        assert (x_adv - x).abs().max() <= eps * 2 / 255 + 1e-6
        assert x_adv.min() >= -1 and x_adv.max() <= 1
        assert (x_adv - x).abs().max() > 0.9 * eps * 2 / 255  # it does move (to the ball's faces)
        with torch.no_grad():
            assert loss(net(x_adv), y) > loss(net(x), y)
    unclamped = pgd(net, loss, x, y, 40.0, steps=2, bounds=None)
    assert unclamped.max() > 1 or unclamped.min() < -1
    assert torch.equal(pgd(net, loss, x, y, 0.0, steps=3), x)  # radius 0: nothing moves
    assert all(p.grad is None for p in net.parameters())


def test_attacks_work_under_inference_mode_and_keep_the_input():
    model, (x, y) = LinearBinary(), _data(8)
    with torch.inference_mode():
        xi, yi = x.clone(), y.clone()
        a = fgsm(model, _loss, xi, yi, EPS)
        b = pgd(model, _loss, xi, yi, EPS, steps=3, random_start=False)
    assert torch.equal(xi, x)
    torch.testing.assert_close(a, fgsm(model, _loss, x, y, EPS))
    torch.testing.assert_close(b, pgd(model, _loss, x, y, EPS, steps=3, random_start=False))


def test_attack_needs_an_input_gradient():
    model, (x, y) = LinearBinary(), _data(4)
    with pytest.raises(RuntimeError, match="input gradient"):
        fgsm(lambda z: model(z).detach(), _loss, x, y, EPS)


@pytest.mark.parametrize("kwargs,match", [
    ({"eps": -1}, "eps must be"), ({"eps": float("inf")}, "eps must be"), ({"eps": 1, "steps": 0}, "steps"),
    ({"eps": 1, "steps": 2.5}, "steps"), ({"eps": 1, "step_size": 0}, "step_size"),
    ({"eps": 1, "bounds": (1, -1)}, "bounds"), ({"eps": 1, "pixel_scale": 0}, "pixel_scale")])
def test_attack_arguments_are_validated(kwargs, match):
    model, (x, y) = LinearBinary(), _data(2)
    with pytest.raises(ValueError, match=match):
        pgd(model, _loss, x, y, **kwargs)
