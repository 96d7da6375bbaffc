"""The DifferentialPrivacy callback on real Lightning runs: any LightningModule, budget, resume, refusals."""

from __future__ import annotations

import math
import warnings

import lightning.pytorch as L
import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import ModelCheckpoint
from eqlightning.privacy import PoissonSampler
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from eqlightning import ImageClassifier, MedMNISTDataModule
from eqlightning.nn import image_symmetries
from eqlightning.privacy import DifferentialPrivacy, DPCompatibilityError, LogicalBatchSampler


class ForeignNet(L.LightningModule):
    """A LightningModule from "another project": nothing in it knows about privacy."""

    def __init__(self, n: int = 192, batch_size: int = 16, seed: int = 0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        x = torch.randn(n, 1, 8, 8, generator=g)
        y = (x.mean(dim=(1, 2, 3)) > 0).long()
        self.data, self.batch_size = TensorDataset(x, y), batch_size
        self.net = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.GroupNorm(2, 8), nn.ReLU(),
                                 nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 2))
        self.batch_sizes: list[int] = []

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        self.batch_sizes.append(len(x))
        return F.cross_entropy(self(x), y)

    def test_step(self, batch, batch_idx):
        x, y = batch
        self.log("test/acc", (self(x).argmax(1) == y).float().mean())

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.5)

    def train_dataloader(self):
        return DataLoader(self.data, batch_size=self.batch_size, shuffle=True)

    def test_dataloader(self):
        return DataLoader(self.data, batch_size=64)


def trainer(tmp_path, callbacks, **kwargs) -> L.Trainer:
    options = dict(max_epochs=2, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                   enable_model_summary=False, default_root_dir=str(tmp_path), accelerator="cpu")
    options.update(kwargs)
    return L.Trainer(callbacks=callbacks, **options)


def params(module) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1) for p in module.parameters()])


def test_a_foreign_lightning_module_trains_privately(tmp_path):
    L.seed_everything(0)
    model = ForeignNet()
    before = params(model).clone()
    dp = DifferentialPrivacy(target_epsilon=3.0, accountant="rdp")
    t = trainer(tmp_path, [dp])
    t.fit(model)
    assert not torch.equal(params(model), before)
    assert 0 < dp.epsilon <= 3.0 and dp.ledger.steps == 2 * 12  # 192 / 16 logical steps per epoch
    assert len(set(model.batch_sizes)) > 1  # Poisson: batch sizes vary
    assert sum(model.batch_sizes) / len(model.batch_sizes) == pytest.approx(16, rel=0.25)
    # nothing of Opacus is left on the user's model after fit
    assert not any(hasattr(p, "grad_sample") for p in model.parameters())
    assert not hasattr(model, "autograd_grad_sample_hooks")
    assert "train_dataloader" not in vars(model)
    results = t.test(model, verbose=False)[0]
    assert results["dp/epsilon"] == pytest.approx(dp.epsilon, rel=1e-6)
    assert results["dp/delta"] == pytest.approx(dp.delta, rel=1e-6)  # logged as float32


def test_the_training_loader_is_poisson(tmp_path):
    seen = {}

    class Spy(L.Callback):
        def on_train_epoch_start(self, trainer, pl_module):
            seen["sampler"] = trainer.train_dataloader.batch_sampler

    dp = DifferentialPrivacy(noise_multiplier=1.0)
    trainer(tmp_path, [dp, Spy()], max_epochs=1).fit(ForeignNet())
    assert isinstance(seen["sampler"], LogicalBatchSampler)
    assert isinstance(seen["sampler"].sampler, PoissonSampler)
    assert dp.sample_rate == pytest.approx(1 / 12)


def test_opting_out_of_poisson_sampling_warns_loudly(tmp_path):
    dp = DifferentialPrivacy(noise_multiplier=1.0, poisson_sampling=False)
    with pytest.warns(UserWarning, match="NOT a formal privacy guarantee"):
        trainer(tmp_path, [dp], max_epochs=1).fit(ForeignNet())


def test_training_stops_before_the_budget_is_exceeded(tmp_path):
    L.seed_everything(0)
    dp = DifferentialPrivacy(target_epsilon=2.0, epochs=1, accountant="rdp")
    model = ForeignNet()
    t = trainer(tmp_path, [dp], max_epochs=5)
    t.fit(model)
    assert dp.ledger.steps == dp.budget_steps < 5 * 12
    assert dp.epsilon <= 2.0 < dp.ledger.epsilon(extra_steps=1)  # one more step would exceed the target
    checkpoint = torch.load(tmp_path / "dp-budget-reached.ckpt", weights_only=False)
    saved = checkpoint["callbacks"][dp.state_key]
    assert saved["steps"] == dp.ledger.steps and saved["epsilon"] == pytest.approx(dp.epsilon)


def test_resuming_continues_the_accounting(tmp_path):
    def run(max_epochs, ckpt_path=None, directory="a"):
        L.seed_everything(0)
        dp = DifferentialPrivacy(target_epsilon=4.0, epochs=4, accountant="rdp")
        checkpoint = ModelCheckpoint(dirpath=tmp_path / directory, save_last=True)
        t = trainer(tmp_path, [dp, checkpoint], max_epochs=max_epochs, enable_checkpointing=True)
        t.fit(ForeignNet(), ckpt_path=ckpt_path)
        return dp

    first = run(2)
    resumed = run(4, ckpt_path=str(tmp_path / "a" / "last.ckpt"))
    uninterrupted = run(4, directory="b")
    assert first.ledger.steps == 24 and resumed.ledger.steps == uninterrupted.ledger.steps == 48
    assert resumed.noise_multiplier == first.noise_multiplier == uninterrupted.noise_multiplier
    assert resumed.epsilon == pytest.approx(uninterrupted.epsilon, rel=1e-12)
    assert first.epsilon < resumed.epsilon <= 4.0


@pytest.mark.parametrize("backbone,options,layer", [("eq_resnet8", {"norm": "batch"}, "FieldBatchNorm"),
                                                    ("resnet18", {"norm": "batch", "width_multiplier": 0.25},
                                                     "BatchNorm2d")])
def test_batch_norm_is_refused_with_the_fix(tmp_path, backbone, options, layer):
    model = ImageClassifier(backbone, options, num_classes=2, task="binary-class")
    with pytest.raises(DPCompatibilityError, match=rf"backbone\.\S+ \({layer}\).*norm='group'.*ModuleValidator"):
        trainer(tmp_path, [DifferentialPrivacy(noise_multiplier=1.0)]).fit(
            model, MedMNISTDataModule("breastmnist", batch_size=64))


def test_plain_backbone_fixed_by_module_validator_trains(tmp_path):
    from opacus.validators import ModuleValidator

    model = ImageClassifier("resnet18", {"norm": "batch", "width_multiplier": 0.125}, num_classes=2,
                            task="binary-class")
    model.backbone = ModuleValidator.fix(model.backbone)
    dp = DifferentialPrivacy(noise_multiplier=1.0)
    trainer(tmp_path, [dp], max_epochs=1, limit_val_batches=0).fit(model, MedMNISTDataModule("breastmnist",
                                                                                           batch_size=64))
    assert dp.ledger.steps > 0


def test_equivariance_survives_private_training(tmp_path):
    L.seed_everything(0)
    model = ImageClassifier("eq_resnet8", {"group": "D4"}, num_classes=2, task="binary-class",
                            optimizer=lambda p: torch.optim.SGD(p, lr=1.0))
    before = params(model).clone()
    trainer(tmp_path, [DifferentialPrivacy(target_epsilon=8.0, accountant="rdp")], max_epochs=1,
            limit_val_batches=0).fit(model, MedMNISTDataModule("breastmnist", batch_size=64))
    assert (params(model) - before).abs().max() > 1e-3
    model.eval()
    x = torch.randn(3, 1, 28, 28)
    with torch.no_grad():
        y = model(x)
        for name, transform in image_symmetries("D4").items():
            assert (model(transform(x)) - y).abs().max() <= 1e-4, name


def test_physical_micro_batches_give_the_same_step_as_one_batch(tmp_path):
    def run(max_physical):
        L.seed_everything(0)
        model = ForeignNet(batch_size=48)
        dp = DifferentialPrivacy(noise_multiplier=0.0, max_grad_norm=1e6, max_physical_batch_size=max_physical,
                                 seed=3)
        trainer(tmp_path, [dp], max_epochs=1).fit(model)
        return model, dp

    whole, dp_whole = run(None)
    split, dp_split = run(10)
    assert dp_whole.ledger.steps == dp_split.ledger.steps == 4  # one optimizer step per logical batch
    assert max(split.batch_sizes) <= 10 < max(whole.batch_sizes)
    torch.testing.assert_close(params(split), params(whole), rtol=1e-4, atol=1e-6)


def test_augmult_feeds_k_views_per_sample(tmp_path):
    L.seed_everything(0)
    model = ForeignNet()
    dp = DifferentialPrivacy(noise_multiplier=1.0, augmult=4)
    trainer(tmp_path, [dp], max_epochs=1).fit(model)
    assert all(b % 4 == 0 for b in model.batch_sizes) and dp.ledger.steps == 12
    assert sum(model.batch_sizes) / len(model.batch_sizes) == pytest.approx(64, rel=0.25)


def test_ema_weights_are_used_for_evaluation(tmp_path):
    captured = {}

    class Spy(L.Callback):
        def on_validation_batch_start(self, trainer, pl_module, *args):
            captured["during"] = params(pl_module).clone()

    L.seed_everything(0)
    model = ImageClassifier("eq_resnet8", {"group": "C4", "width_multiplier": 0.5}, num_classes=2,
                            task="binary-class", optimizer=lambda p: torch.optim.SGD(p, lr=1.0))
    dp = DifferentialPrivacy(noise_multiplier=1.0, ema_decay=0.9)
    trainer(tmp_path, [dp, Spy()], max_epochs=1).fit(model, MedMNISTDataModule("breastmnist", batch_size=64))
    shadow = torch.cat([s.reshape(-1) for s in dp.ema.shadow])
    torch.testing.assert_close(captured["during"], shadow)
    assert not torch.allclose(params(model), shadow)  # raw weights are back after validation
    assert dp.ema.updates == dp.ledger.steps


@pytest.mark.parametrize("precision,mode", [("bf16-mixed", "hooks"), ("32-true", "functorch")])
def test_mixed_precision_and_functorch_mode(tmp_path, precision, mode):
    L.seed_everything(0)
    model = ImageClassifier("eq_resnet8", {"group": "C8", "width_multiplier": 0.5}, num_classes=2,
                            task="binary-class")
    dp = DifferentialPrivacy(target_epsilon=8.0, accountant="rdp", grad_sample_mode=mode)
    trainer(tmp_path, [dp], max_epochs=1, limit_val_batches=0, precision=precision).fit(
        model, MedMNISTDataModule("breastmnist", batch_size=64))
    assert dp.ledger.steps == 9 and torch.isfinite(params(model)).all()


def test_test_run_reads_epsilon_from_the_checkpoint(tmp_path):
    L.seed_everything(0)
    dp = DifferentialPrivacy(target_epsilon=3.0, accountant="rdp")
    t = trainer(tmp_path, [dp, ModelCheckpoint(dirpath=tmp_path, save_last=True)], enable_checkpointing=True)
    t.fit(ForeignNet())
    fresh = DifferentialPrivacy(target_epsilon=3.0, accountant="rdp")
    results = trainer(tmp_path, [fresh]).test(ForeignNet(), ckpt_path=str(tmp_path / "last.ckpt"), verbose=False)
    assert results[0]["dp/epsilon"] == pytest.approx(dp.epsilon, rel=1e-6)


@pytest.mark.parametrize("kwargs,message", [
    ({}, "exactly one of target_epsilon"),
    ({"target_epsilon": 1.0, "noise_multiplier": 1.0}, "exactly one of target_epsilon"),
    ({"target_epsilon": -1.0}, "target_epsilon must be a positive"),
    ({"target_epsilon": math.nan}, "target_epsilon must be a positive"),
    ({"target_epsilon": 1.0, "delta": 1.5}, r"delta must be in \(0, 1\)"),
    ({"target_epsilon": 1.0, "max_grad_norm": 0}, "max_grad_norm must be"),
    ({"target_epsilon": 1.0, "accountant": "moments"}, "accountant must be one of"),
    ({"target_epsilon": 1.0, "epochs": 2, "steps": 10}, "epochs or steps, not both"),
    ({"target_epsilon": 1.0, "augmult": 0}, "augmult must be a positive integer"),
    ({"target_epsilon": 1.0, "ema_decay": 1.0}, r"ema_decay must be in \[0, 1\)"),
    ({"noise_multiplier": -0.5}, "noise_multiplier must be >= 0"),
    ({"target_epsilon": 1.0, "grad_sample_mode": "ghost"}, "grad_sample_mode must be one of"),
])
def test_invalid_configuration_is_refused_up_front(kwargs, message):
    with pytest.raises(ValueError, match=message):
        DifferentialPrivacy(**kwargs)


def test_gradient_accumulation_is_refused(tmp_path):
    with pytest.raises(ValueError, match="max_physical_batch_size"):
        trainer(tmp_path, [DifferentialPrivacy(noise_multiplier=1.0)], accumulate_grad_batches=2).fit(ForeignNet())


def test_no_warning_storm_in_a_normal_run(tmp_path):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer(tmp_path, [DifferentialPrivacy(noise_multiplier=1.0)], max_epochs=1).fit(ForeignNet())
    assert not [w for w in caught if "formal privacy guarantee" in str(w.message)]


def test_reusing_the_callback_for_another_fit_continues_the_accounting(tmp_path):
    L.seed_everything(0)
    model, dp = ForeignNet(), DifferentialPrivacy(noise_multiplier=1.0, accountant="rdp")
    trainer(tmp_path, [dp], max_epochs=1).fit(model)
    after_first = (dp.ledger.steps, dp.epsilon)
    trainer(tmp_path, [dp], max_epochs=1).fit(model)
    assert dp.ledger.steps == 2 * after_first[0] and dp.epsilon > after_first[1]


def test_testing_a_checkpoint_uses_that_checkpoints_ema(tmp_path):
    L.seed_everything(0)
    dp = DifferentialPrivacy(noise_multiplier=1.0, accountant="rdp", ema_decay=0.5)
    model = ForeignNet()
    every_epoch = ModelCheckpoint(dirpath=tmp_path, filename="{epoch}", save_top_k=-1, every_n_epochs=1)
    t = trainer(tmp_path, [dp, every_epoch], max_epochs=2, enable_checkpointing=True)
    t.fit(model)
    path = tmp_path / "epoch=0.ckpt"
    saved = torch.load(path, weights_only=False)["callbacks"][dp.state_key]
    saved_ema = torch.cat([s.reshape(-1) for s in saved["ema"]["shadow"]])
    final_ema = torch.cat([s.reshape(-1) for s in dp.ema.shadow])
    assert not torch.allclose(saved_ema, final_ema)
    seen = {}

    class Spy(L.Callback):
        def on_test_batch_start(self, trainer, pl_module, *args):
            seen["weights"] = params(pl_module).clone()

    t.callbacks.append(Spy())
    results = t.test(model, ckpt_path=str(path), verbose=False)[0]
    torch.testing.assert_close(seen["weights"], saved_ema)  # the tested checkpoint's EMA, not the final one
    assert results["dp/epsilon"] == pytest.approx(dp.epsilon, rel=1e-6)  # the whole run's epsilon
