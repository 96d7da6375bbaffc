"""The properties every per-sample gradient mechanism must have, end to end through the engine and the callback.

Parametrised over the registry: a new mechanism (one file + one registry line) is held to all of these, and to the
per-sample gradient exactness tests of ``test_grad_samplers.py``. Each property here was chosen because a broken
private path would otherwise pass: noise scaled by the wrong constant, clipping not applied per sample, views of a
sample clipped on their own, epsilon not matching the accountant.
"""

from __future__ import annotations

import copy

import lightning.pytorch as L
import pytest
import torch
import torch.nn.functional as F
from opacus.accountants import RDPAccountant
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from eqlightning.models import create_backbone
from eqlightning.privacy import DifferentialPrivacy, PerSampleGradients, list_mechanisms, make_private

MECHANISMS = list_mechanisms()


def small_model():
    return create_backbone("eq_resnet8", in_channels=1, num_classes=3, group="C4", width_multiplier=0.5)


@pytest.mark.parametrize("mechanism", MECHANISMS)
def test_every_clipped_per_sample_gradient_is_within_the_bound(mechanism):
    torch.manual_seed(0)
    model, clip = small_model(), 0.05
    x, y = torch.randn(12, 1, 12, 12) * 3, torch.randint(3, (12,))
    private = make_private(model, torch.optim.SGD(model.parameters(), lr=0.1), mechanism=mechanism,
                           noise_multiplier=0.0, max_grad_norm=clip, expected_batch_size=12)
    F.cross_entropy(model(x), y).backward()
    rows = torch.cat([torch.cat(p.grad_sample).reshape(12, -1) for p in model.parameters()], dim=1)
    norms = rows.norm(dim=1)
    assert (norms > clip).all()  # every sample is actually clipped in this setting
    private.optimizer.step()
    clipped = rows * (clip / (norms + 1e-6)).clamp(max=1.0)[:, None]
    assert (clipped.norm(dim=1) <= clip * (1 + 1e-6)).all()
    summed = torch.cat([p.grad.reshape(-1) for p in model.parameters()]) * 12  # grad = clipped sum / E[batch]
    torch.testing.assert_close(summed, clipped.sum(0), rtol=1e-5, atol=1e-7)
    private.detach()


@pytest.mark.parametrize("mechanism", MECHANISMS)
def test_an_empty_poisson_batch_is_a_noise_only_step(mechanism):
    """Poisson sampling draws empty batches (small data sets, small q): every layer must cope, and the step must
    add exactly the noise (std sigma * C / E[B]) with a zero gradient sum."""
    torch.manual_seed(0)
    model = small_model()
    before = [p.detach().clone() for p in model.parameters()]
    private = make_private(model, torch.optim.SGD(model.parameters(), lr=1.0), mechanism=mechanism,
                           noise_multiplier=0.0, max_grad_norm=1.0, expected_batch_size=4)
    out = model(torch.randn(0, 1, 12, 12))
    F.cross_entropy(out, torch.zeros(0, dtype=torch.long), reduction="sum").backward()
    assert all(torch.cat(p.grad_sample).shape[0] == 0 for p in model.parameters())
    private.optimizer.step()
    assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before))  # no noise, no gradient: no move
    private.detach()


@pytest.mark.parametrize("mechanism", MECHANISMS)
def test_without_noise_and_clipping_a_private_step_is_an_sgd_step(mechanism):
    torch.manual_seed(0)
    model = small_model()
    reference = copy.deepcopy(model)
    x, y = torch.randn(8, 1, 12, 12), torch.randint(3, (8,))
    private = make_private(model, torch.optim.SGD(model.parameters(), lr=0.1), mechanism=mechanism,
                           noise_multiplier=0.0, max_grad_norm=1e6, expected_batch_size=8)
    F.cross_entropy(model(x), y).backward()
    private.optimizer.step()
    private.detach()
    sgd = torch.optim.SGD(reference.parameters(), lr=0.1)
    F.cross_entropy(reference(x), y).backward()
    sgd.step()
    for p, q in zip(model.parameters(), reference.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-7)


class ZeroLoss(L.LightningModule):
    """A model whose loss is 0: every per-sample gradient is 0, so a private step moves the weights by the noise
    alone, ``-lr * N(0, (sigma C)^2) / E[batch]`` per coordinate and step."""

    def __init__(self, n: int = 256, batch_size: int = 32, width: int = 128):
        super().__init__()
        self.data = TensorDataset(torch.randn(n, 1, 4, 4), torch.zeros(n, dtype=torch.long))
        self.batch_size = batch_size
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(16, width), nn.GroupNorm(4, width), nn.Linear(width, width))

    def training_step(self, batch, batch_idx):
        return self.net(batch[0]).sum() * 0.0

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=1.0)

    def train_dataloader(self):
        return DataLoader(self.data, batch_size=self.batch_size, shuffle=True)


def fit(callback, model, tmp_path, **kwargs) -> L.Trainer:
    options = dict(max_epochs=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                   enable_model_summary=False, default_root_dir=str(tmp_path), accelerator="cpu")
    options.update(kwargs)
    trainer = L.Trainer(callbacks=[callback], **options)
    trainer.fit(model)
    return trainer


@pytest.mark.parametrize("mechanism", MECHANISMS)
def test_the_noise_through_the_callback_has_std_sigma_times_clip(tmp_path, mechanism):
    """With C != 1 (noise passed as sigma/C, or clip applied twice, would show): after s steps every weight moved by
    a sum of s independent N(0, (sigma C / E[B])^2) draws (lr 1)."""
    L.seed_everything(0)
    model = ZeroLoss()
    before = torch.cat([p.detach().reshape(-1) for p in model.parameters()]).clone()
    sigma, clip = 0.7, 2.5
    dp = DifferentialPrivacy(noise_multiplier=sigma, max_grad_norm=clip, accountant="rdp", grad_sample_mode=mechanism)
    fit(dp, model, tmp_path)
    moved = torch.cat([p.detach().reshape(-1) for p in model.parameters()]) - before
    steps, expected_batch = dp.ledger.steps, dp.sample_rate * 256
    assert steps == 8 and expected_batch == pytest.approx(32)
    expected = sigma * clip * steps ** 0.5 / expected_batch
    # ~18k coordinates: the std estimate's relative standard error is ~0.5%; allow 3%
    assert moved.std().item() == pytest.approx(expected, rel=0.03)
    assert abs(moved.mean().item()) < 4 * expected / moved.numel() ** 0.5


class Deterministic(L.LightningModule):
    """A small classifier on fixed data without augmentation: the views of a sample are identical."""

    def __init__(self, n: int = 96, batch_size: int = 16):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        x = torch.randn(n, 1, 8, 8, generator=g)
        self.data = TensorDataset(x, (x.mean(dim=(1, 2, 3)) > 0).long())
        self.batch_size = batch_size
        torch.manual_seed(1)
        self.net = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.GroupNorm(2, 4), nn.ReLU(),
                                 nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 2))

    def training_step(self, batch, batch_idx):
        return F.cross_entropy(self.net(batch[0]), batch[1])

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.5)

    def train_dataloader(self):
        return DataLoader(self.data, batch_size=self.batch_size, shuffle=True)


@pytest.mark.parametrize("mechanism", MECHANISMS)
def test_augmult_with_identical_views_is_the_step_without_augmult(tmp_path, mechanism):
    """The views of a sample are averaged before clipping, and the batch is still E[B] samples: with identical views
    and no noise, augmult 4 must train exactly like augmult 1 (views clipped on their own, or counted as samples,
    would take a 4x larger step)."""
    def run(augmult):
        model = Deterministic()
        dp = DifferentialPrivacy(noise_multiplier=0.0, max_grad_norm=0.05, augmult=augmult, seed=5,
                                 grad_sample_mode=mechanism)
        fit(dp, model, tmp_path)
        return torch.cat([p.detach().reshape(-1) for p in model.parameters()])

    start = torch.cat([p.detach().reshape(-1) for p in Deterministic().parameters()])
    one, four = run(1), run(4)
    assert (one - start).abs().max() > 1e-3  # the runs did train
    torch.testing.assert_close(four, one, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("mechanism", MECHANISMS)
def test_epsilon_is_the_accountants_for_the_steps_taken(tmp_path, mechanism):
    L.seed_everything(0)
    dp = DifferentialPrivacy(target_epsilon=3.0, accountant="rdp", grad_sample_mode=mechanism)
    fit(dp, Deterministic(), tmp_path, max_epochs=2)
    reference = RDPAccountant()
    for _ in range(dp.ledger.steps):
        reference.step(noise_multiplier=dp.noise_multiplier, sample_rate=dp.sample_rate)
    assert dp.ledger.steps == 12
    assert dp.epsilon == pytest.approx(reference.get_epsilon(delta=dp.delta), rel=1e-9)
    assert dp.epsilon <= 3.0


def test_the_engine_leaves_nothing_behind():
    model = small_model()
    names = set(vars(model)) | {n for m in model.modules() for n in vars(m)}
    for mechanism in MECHANISMS:
        engine = PerSampleGradients(model, mechanism)
        F.cross_entropy(model(torch.randn(2, 1, 12, 12)), torch.tensor([0, 1])).backward()
        engine.detach()
        assert not any(hasattr(p, "grad_sample") for p in model.parameters())
        assert not any(m._forward_hooks for m in model.modules())
        assert (set(vars(model)) | {n for m in model.modules() for n in vars(m)}) == names
