"""Transfer learning (eqlightning.transfer): init_from a checkpoint into a new task, freeze_stages, also under DP."""

from __future__ import annotations

import os
import time
from pathlib import Path

import lightning.pytorch as L
import pytest
import torch
from lightning.pytorch import Callback
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from eqlightning import ImageClassifier
from eqlightning.models import create_backbone
from eqlightning.transfer import freeze_stages, load_backbone_weights, resolve_checkpoint

REPO = Path(__file__).resolve().parents[1]
EQ = {"group": "D4", "width_multiplier": 0.5}


class TinyData(L.LightningDataModule):
    def __init__(self, channels: int = 1, classes: int = 2, n: int = 64, batch_size: int = 16):
        super().__init__()
        g = torch.Generator().manual_seed(1)
        x = torch.randn(n, channels, 28, 28, generator=g)
        self.data, self.batch_size = TensorDataset(x, torch.randint(0, classes, (n,), generator=g)), batch_size

    def train_dataloader(self):
        return DataLoader(self.data, batch_size=self.batch_size, shuffle=True)


def _trainer(tmp_path, **kwargs) -> L.Trainer:
    options = dict(max_epochs=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                   enable_model_summary=False, accelerator="cpu", default_root_dir=str(tmp_path))
    return L.Trainer(**{**options, **kwargs})


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    """A D4 eq_resnet8 trained one step on 1-channel, 2-class data, saved by the Trainer: (path, backbone state)."""
    tmp = tmp_path_factory.mktemp("source")
    torch.manual_seed(0)
    model = ImageClassifier("eq_resnet8", EQ, num_classes=2, in_channels=1)
    trainer = _trainer(tmp, max_steps=1)
    trainer.fit(model, datamodule=TinyData())
    path = tmp / "source.ckpt"
    trainer.save_checkpoint(path)
    return path, {k: v.clone() for k, v in model.backbone.state_dict().items()}


def _rebuilt(name: str) -> bool:
    return name.startswith(("stem.0.", "head."))


def test_round_trip_into_another_task_keeps_the_backbone_and_the_invariance(source):
    path, state = source
    model = ImageClassifier("eq_resnet8", EQ, num_classes=3, in_channels=3, init_from=str(path))
    model.setup("fit")
    report = model.transfer_report
    assert report["source"] == str(path) and report["source_backbone"] == "eq_resnet8"
    assert sorted(report["reinitialised"]) == ["head.bias", "head.weight", "stem.0.weight"]
    new = model.backbone.state_dict()
    for name, tensor in state.items():
        if not _rebuilt(name):
            assert torch.equal(new[name], tensor), name
    assert report["loaded"] == len(state) - 3 and report["frozen"] == 0
    # the printed report names both shapes of each rebuilt tensor
    reloaded = load_backbone_weights(create_backbone("eq_resnet8", in_channels=3, num_classes=3, **EQ), path)
    shapes = {name: (a, b) for name, a, b in reloaded.reinitialised}
    features = model.backbone.head.in_features
    assert shapes["head.weight"] == ((2, features), (3, features)) and shapes["head.bias"] == ((2,), (3,))
    assert shapes["stem.0.weight"][0] != shapes["stem.0.weight"][1]
    assert f"head.weight (2, {features}) -> (3, {features})" in str(reloaded) and "eq_resnet8" in str(reloaded)
    # forward works, and the logits are still D4-invariant
    model.eval()
    x = torch.randn(4, 3, 28, 28)
    with torch.no_grad():
        logits = model(x)
        assert logits.shape == (4, 3)
        for k in (1, 2, 3):
            assert torch.allclose(model(torch.rot90(x, k, dims=(2, 3))), logits, atol=1e-4)
        assert torch.allclose(model(torch.flip(x, dims=(3,))), logits, atol=1e-4)
    # a second fit does not reload (the weights trained in between stay)
    with torch.no_grad():
        model.backbone.stages[0][0].conv1.weight.add_(1.0)
    changed = model.backbone.stages[0][0].conv1.weight.clone()
    model.setup("fit")
    assert torch.equal(model.backbone.stages[0][0].conv1.weight, changed)


def _touch_run(run_dir: Path, *names: str) -> None:
    (run_dir / "checkpoints").mkdir(parents=True)
    for name in names:
        (run_dir / "checkpoints" / name).write_bytes(b"x")


def test_resolve_checkpoint_file_run_and_run_name(tmp_path):
    ckpt = tmp_path / "model.ckpt"
    ckpt.write_bytes(b"x")
    assert resolve_checkpoint(ckpt) == ckpt
    runs = tmp_path / "runs" / "pretrain"
    newer, older = runs / "20240102-000000", runs / "20240101-000000"
    _touch_run(newer, "last.ckpt")  # written first: the timestamp in the name decides, not the file's age
    time.sleep(0.01)
    _touch_run(older, "best.ckpt", "last.ckpt")
    os.utime(older / "checkpoints" / "best.ckpt")
    assert resolve_checkpoint(older) == older / "checkpoints" / "best.ckpt"  # best before last
    assert resolve_checkpoint(newer) == newer / "checkpoints" / "last.ckpt"
    assert resolve_checkpoint(str(runs)) == newer / "checkpoints" / "last.ckpt"
    _touch_run(runs / "20240102-000000.2", "best.ckpt")  # the CLI's suffix for a second run in the same second
    assert resolve_checkpoint(runs) == runs / "20240102-000000.2" / "checkpoints" / "best.ckpt"

    with pytest.raises(FileNotFoundError, match="nowhere.*does not exist"):
        resolve_checkpoint(tmp_path / "nowhere")
    (tmp_path / "empty" / "20240101-000000").mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match=r"no checkpoint in .*empty.*checkpoints/best\.ckpt or "
                                                r"checkpoints/last\.ckpt"):
        resolve_checkpoint(tmp_path / "empty")


def test_another_architecture_or_group_is_refused(source):
    path, _ = source
    with pytest.raises(ValueError, match=r"eq_resnet8.*resnet18.*different architecture"):
        load_backbone_weights(create_backbone("resnet18", width_multiplier=0.125, norm="group"), path,
                              backbone_name="resnet18")
    c8 = create_backbone("eq_resnet8", group="C8", width_multiplier=0.5)  # same shapes as D4, other basis
    with pytest.raises(ValueError, match=r"group \['D4', 'D4', 'D4'\].*\['C8', 'C8', 'C8'\]"):
        load_backbone_weights(c8, path)


def test_freeze_stages_flags_and_errors():
    backbone = create_backbone("eq_resnet8", **EQ)
    assert freeze_stages(backbone, 0) == [] and all(p.requires_grad for p in backbone.parameters())
    frozen = freeze_stages(backbone, 1)
    for name, p in backbone.named_parameters():
        assert p.requires_grad == (not name.startswith(("stem.", "stages.0."))), name
        assert (name in frozen) == (not p.requires_grad)
    kept: list[str] = []
    fresh = create_backbone("eq_resnet8", **EQ)
    frozen = freeze_stages(fresh, 2, keep_trainable={"stem.0.weight"}, kept=kept)  # a rebuilt stem stays trainable
    assert kept == ["stem"] and not any(n.startswith("stem.") for n in frozen)
    assert {n.split(".")[1] for n in frozen} == {"0", "1"}
    with pytest.raises(ValueError, match="has 3 stages"):
        freeze_stages(create_backbone("eq_resnet8", **EQ), 4)
    with pytest.raises(ValueError, match="no stages to freeze.*freeze_stages: 0"):
        freeze_stages(nn.Sequential(nn.Flatten(), nn.Linear(784, 2)), 1)
    vit = create_backbone("vit_tiny", dim=32, depth=2, heads=2)
    frozen = freeze_stages(vit, 1)
    assert {n.split(".")[0] for n in frozen} == {"patch_embed", "tokens", "blocks"}
    assert all(n.startswith("blocks.0.") for n in frozen if n.startswith("blocks."))


def _snapshot(module: nn.Module) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in module.named_parameters()}


def test_plain_fit_trains_only_the_unfrozen_parameters(source, tmp_path):
    path, state = source
    model = ImageClassifier("eq_resnet8", EQ, num_classes=2, in_channels=1, init_from=str(path), freeze_stages=1)
    _trainer(tmp_path, max_steps=3).fit(model, datamodule=TinyData())
    assert model.transfer_report["frozen"] > 0
    for name, p in model.backbone.named_parameters():
        if name.startswith(("stem.", "stages.0.")):
            assert not p.requires_grad and torch.equal(p, state[name]), name
        elif "norm" not in name or "weight" in name:  # GroupNorm biases of the last stage may stay ~0 in 3 steps
            assert p.requires_grad and not torch.equal(p, state[name]), name


def test_frozen_batch_norm_keeps_its_statistics(tmp_path):
    model = ImageClassifier("resnet18", {"width_multiplier": 0.125}, num_classes=2, in_channels=1, freeze_stages=1)
    stem_norm, later_norm = model.backbone.stem[1], model.backbone.stages[1][0].norm1
    before = stem_norm.running_mean.clone(), later_norm.running_mean.clone()
    _trainer(tmp_path, max_steps=2).fit(model, datamodule=TinyData())
    assert torch.equal(stem_norm.running_mean, before[0]) and not torch.equal(later_norm.running_mean, before[1])


class _PerSampleSpy(Callback):
    """After each backward (before the DP step): which parameters hold per-sample gradients, which layers are
    watched (forward hooks) by the engine."""

    def __init__(self):
        self.with_grad_sample: set[str] = set()
        self.hooked: set[str] = set()

    def on_after_backward(self, trainer, pl_module):
        backbone = pl_module.backbone
        self.with_grad_sample |= {n for n, p in backbone.named_parameters() if getattr(p, "grad_sample", None)
                                  is not None}
        self.hooked |= {n for n, m in backbone.named_modules() if m._forward_hooks}


def test_private_fit_gives_frozen_parameters_no_per_sample_gradients(source, tmp_path, monkeypatch):
    from eqlightning.privacy import DifferentialPrivacy
    from eqlightning.privacy.mechanisms import fused

    path, state = source
    # 3 input channels: the stem is rebuilt and trains, stage 1 is frozen between it and the trainable stages
    model = ImageClassifier("eq_resnet8", EQ, num_classes=2, in_channels=3, init_from=str(path), freeze_stages=1)
    computed = []
    original = fused.per_sample_coefficient_grads
    monkeypatch.setattr(fused, "per_sample_coefficient_grads",
                        lambda layer, x, gy: computed.append(layer) or original(layer, x, gy))
    spy = _PerSampleSpy()
    stem_before = _snapshot(model.backbone.stem)
    _trainer(tmp_path, callbacks=[DifferentialPrivacy(noise_multiplier=1.0, max_grad_norm=1.0), spy]).fit(
        model, datamodule=TinyData(channels=3))
    frozen = {n for n, p in model.backbone.named_parameters() if not p.requires_grad}
    assert frozen and all(n.startswith("stages.0.") for n in frozen) and model.transfer_report["frozen"] == len(frozen)
    trainable = {n for n, p in model.backbone.named_parameters() if p.requires_grad}
    assert spy.with_grad_sample == trainable  # every trainable parameter, no frozen one
    assert not any(n.startswith("stages.0.") for n in spy.hooked)  # frozen layers are not even watched
    names = {m: n for n, m in model.backbone.named_modules()}
    assert computed and not any(names[m].startswith("stages.0.") for m in computed)  # nor computed in backward
    after = dict(model.backbone.named_parameters())
    for name in frozen:
        assert torch.equal(after[name], state[name]), name
    for name, p in model.backbone.named_parameters():
        if name.startswith("stages.1.") and name.endswith("conv1.weight"):
            assert not torch.equal(p, state[name])
    assert not torch.equal(after["stem.0.weight"], stem_before["0.weight"])  # the rebuilt stem trained


def test_transfer_configs_run_through_the_cli(tmp_path, medmnist_root, monkeypatch):
    """The PneumoniaMNIST -> BreastMNIST configs, tiny: pretrain, then transfer from the run-name directory."""
    import eqlightning.cli as cli_module

    main = getattr(cli_module, "run_cli", cli_module.main)  # run_cli: the LightningCLI object, errors raised
    monkeypatch.delenv("EQL_RUN_ID", raising=False)
    monkeypatch.chdir(tmp_path)
    tiny = ["--run_root", str(tmp_path / "runs"), "--data.root", str(medmnist_root), "--data.batch_size", "16",
            "--model.backbone_kwargs.width_multiplier", "0.25", "--trainer.max_epochs", "1",
            "--trainer.limit_train_batches", "2", "--trainer.limit_val_batches", "1", "--test_after_fit", "false",
            "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false"]
    main(["fit", "--config", str(REPO / "configs/transfer/pneumoniamnist_pretrain.yaml"), *tiny])
    monkeypatch.delenv("EQL_RUN_ID", raising=False)
    target = REPO / "configs/transfer/breastmnist_from_pneumoniamnist.yaml"
    with pytest.raises(FileNotFoundError, match="missing-run.*does not exist"):
        main(["fit", "--config", str(target), *tiny, "--model.init_from", str(tmp_path / "missing-run")])
    monkeypatch.delenv("EQL_RUN_ID", raising=False)
    cli = main(["fit", "--config", str(target), *tiny])  # init_from: runs/pretrain-pneumoniamnist, from cwd
    report = cli.model.transfer_report
    assert Path(report["source"]).parts[-4] == "pretrain-pneumoniamnist" and report["source"].endswith(".ckpt")
    assert report["reinitialised"] == [] and report["frozen"] > 0
