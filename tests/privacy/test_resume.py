"""A resumed private run is the run that was never interrupted: same batches, same noise, same parameters, same
epsilon, bit for bit on CPU; and no batch or noise vector of an earlier step is ever drawn again."""

from __future__ import annotations

import lightning.pytorch as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from eqlightning.privacy import DifferentialPrivacy, PoissonSampler

from test_callback import ForeignNet, params, trainer  # noqa: E402  (tests/privacy is on sys.path)


class Recorder(L.Callback):
    """Each step's batch (as a fingerprint of its samples), noise vector and parameters."""

    def __init__(self):
        self.batches, self.noise, self.params = [], [], []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.batches.append(tuple(sorted(batch[0].sum(dim=(1, 2, 3)).tolist())))

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        dp = next(c for c in trainer.callbacks if isinstance(c, DifferentialPrivacy))
        expected_batch = dp.sample_rate * len(pl_module.data)
        # after a DP step: grad = (clipped sum + noise) / E[batch]; Opacus keeps the clipped sum until zero_grad
        self.noise.append(torch.cat([(p.grad * expected_batch - p.summed_grad).reshape(-1)
                                     for p in pl_module.parameters()]))
        self.params.append(params(pl_module).clone())


def run(tmp_path, ckpt_path=None, every=None, directory="ckpt", dp=None, max_epochs=3):
    L.seed_everything(0)  # as every config does: the resumed run must not replay the streams from the seed
    dp = dp or DifferentialPrivacy(target_epsilon=4.0, epochs=3, accountant="rdp")
    recorder = Recorder()
    callbacks = [dp, recorder]
    if every:  # every few steps (mid-epoch) and at every epoch end
        callbacks.append(ModelCheckpoint(dirpath=tmp_path / directory, every_n_train_steps=every, save_top_k=-1,
                                         filename="{step}"))
        callbacks.append(ModelCheckpoint(dirpath=tmp_path / directory, every_n_epochs=1, save_top_k=-1,
                                         filename="end-{step}"))
    trainer(tmp_path, callbacks, max_epochs=max_epochs, enable_checkpointing=bool(every)).fit(
        ForeignNet(), ckpt_path=ckpt_path)
    return dp, recorder


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    directory = tmp_path_factory.mktemp("uninterrupted")
    return run(directory, every=5), directory / "ckpt"


@pytest.mark.parametrize("name,step", [("step=5", 5), ("step=15", 15), ("end-step=12", 12), ("end-step=24", 24)],
                         ids=["mid-first-epoch", "mid-second-epoch", "first-epoch-end", "second-epoch-end"])
def test_resume_reproduces_the_uninterrupted_run(tmp_path, uninterrupted, name, step):
    (full_dp, full), checkpoints = uninterrupted
    resumed_dp, resumed = run(tmp_path, ckpt_path=str(checkpoints / f"{name}.ckpt"))
    assert full_dp.ledger.steps == 36 and len(resumed.batches) == 36 - step
    assert resumed.batches == full.batches[step:]
    for a, b in zip(resumed.noise, full.noise[step:]):
        assert torch.equal(a, b)
    for a, b in zip(resumed.params, full.params[step:]):
        assert torch.equal(a, b)
    assert resumed_dp.epsilon == full_dp.epsilon and resumed_dp.ledger.history == full_dp.ledger.history


def test_no_batch_or_noise_vector_repeats(uninterrupted):
    (_, full), _ = uninterrupted
    assert len(set(full.batches)) == len(full.batches)
    noise = torch.stack(full.noise)
    assert noise.abs().min() > 0
    for i in range(1, len(noise)):
        assert not (noise[:i] == noise[i]).all(dim=1).any(), i


def test_a_second_fit_with_the_same_callback_draws_new_batches_and_noise(tmp_path):
    dp = DifferentialPrivacy(noise_multiplier=1.0, accountant="rdp")
    _, first = run(tmp_path, dp=dp, max_epochs=1)
    _, second = run(tmp_path, dp=dp, max_epochs=1)
    assert dp.ledger.steps == 24
    assert not set(first.batches) & set(second.batches)
    assert not any(torch.equal(a, b) for a in first.noise for b in second.noise)


def test_resuming_from_the_budget_checkpoint_takes_no_step(tmp_path):
    """However the run is continued (resume from the budget checkpoint, or another fit with the same callback),
    no step is taken past the budget."""
    L.seed_everything(0)
    dp = DifferentialPrivacy(target_epsilon=2.0, epochs=1, accountant="rdp")
    trainer(tmp_path, [dp], max_epochs=5).fit(ForeignNet())
    spent, steps = dp.epsilon, dp.ledger.steps
    assert spent <= 2.0 < dp.ledger.epsilon(extra_steps=1)
    resumed = DifferentialPrivacy(target_epsilon=2.0, epochs=1, accountant="rdp")
    model = ForeignNet()
    before = params(model).clone()
    trainer(tmp_path, [resumed], max_epochs=10).fit(model, ckpt_path=str(tmp_path / "dp-budget-reached.ckpt"))
    assert resumed.ledger.steps == steps and resumed.epsilon == spent
    checkpoint_params = params(model)
    trainer(tmp_path, [dp], max_epochs=2).fit(model)  # the same callback, a new fit
    assert dp.ledger.steps == steps and dp.epsilon <= 2.0
    assert torch.equal(params(model), checkpoint_params) and not torch.equal(before, checkpoint_params)


def test_iterating_a_poisson_sampler_twice_draws_new_batches():
    sampler = PoissonSampler(200, 0.1, steps=4, seed=0)
    first, second = list(sampler), list(sampler)
    assert len(first) == len(second) == 4 and first != second
    assert list(PoissonSampler(200, 0.1, steps=4, seed=0)) == first  # and it is reproducible from the seed
