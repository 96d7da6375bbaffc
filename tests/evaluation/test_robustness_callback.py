"""The Robustness callback inside Trainer.test: metric names, D4 invariance, every task type, the closed form of
the attacks on a linear model, module state left as found, LightningCLI/YAML."""

from __future__ import annotations

import math

import lightning.pytorch as L
import pytest
import torch

from eqlightning import tasks
from eqlightning.classifier import ImageClassifier
from eqlightning.evaluation import Robustness

PGD = {"name": "pgd", "eps": 8, "steps": 3, "step_size": 4, "random_start": True}


def _labels(task: str, n: int = 16, classes: int = 2) -> torch.Tensor:
    g = torch.Generator().manual_seed(2)
    if task == tasks.MULTI_LABEL:
        return torch.randint(0, 2, (n, classes), generator=g)
    y = torch.randint(0, classes, (n,), generator=g)
    y[:classes] = torch.arange(classes)  # every class present: AUC is defined
    return y


@pytest.fixture(scope="module")
def d4_model() -> ImageClassifier:
    torch.manual_seed(0)
    return ImageClassifier("eq_resnet8", {"group": "D4"}, num_classes=2, in_channels=1, task="binary-class")


def test_d4_classifier_logs_every_metric_and_rotations_keep_acc(d4_model, images, run_test):
    callback = Robustness(rotations=[90, 180, 270, 45], flips=True, attacks=[{"name": "fgsm", "eps": 2}, PGD])
    m = run_test(d4_model, callback, images, _labels(tasks.BINARY))
    expected = {f"test/{t}/{k}" for t in ("rot90", "rot180", "rot270", "rot45", "hflip")
                for k in ("acc", "auc", "invariance_error")}
    expected |= {"test/disk/acc", "test/disk/auc", "test/fgsm_eps2/acc", "test/fgsm_eps2/auc", "test/pgd_eps8/acc",
                 "test/pgd_eps8/auc", "test/invariance_error", "test/invariance_error/rot90",
                 "test/invariance_error/hflip"}
    logged = set(m) - {"test/acc", "test/auc", "test/loss"}
    assert logged == expected
    assert logged == set(callback.metric_names(d4_model))
    for t in ("rot90", "rot180", "rot270", "hflip"):
        assert m[f"test/{t}/acc"] == m["test/acc"]
        assert m[f"test/{t}/auc"] == pytest.approx(m["test/auc"], abs=1e-6)
        assert m[f"test/{t}/invariance_error"] < 1e-4
    assert m["test/invariance_error"] < 1e-4
    assert m["test/invariance_error"] == max(m["test/invariance_error/rot90"], m["test/invariance_error/hflip"])
    assert m["test/invariance_error/rot90"] == m["test/rot90/invariance_error"]
    assert 1e-4 < m["test/rot45/invariance_error"] < 1  # 45 degrees is not exact on the pixel grid
    assert all(math.isfinite(v) for v in m.values())
    assert m["test/pgd_eps8/acc"] <= m["test/acc"] and m["test/fgsm_eps2/acc"] <= m["test/acc"]
    assert all(p.grad is None and p.requires_grad for p in d4_model.parameters())


def test_a_second_test_starts_from_fresh_metrics(d4_model, images, run_test):
    callback = Robustness(rotations=[90], flips=False, symmetry=False)
    y = _labels(tasks.BINARY)
    first = run_test(d4_model, callback, images, y)
    second = run_test(d4_model, callback, images[:8], y[:8])
    assert set(first) == set(second) == {"test/acc", "test/auc", "test/loss", "test/rot90/acc", "test/rot90/auc",
                                         "test/rot90/invariance_error"}
    assert second["test/rot90/acc"] == second["test/acc"]  # not mixed with the first test's 16 images


def test_plain_backbone_logs_a_nonzero_symmetry_diagnostic(images, run_test):
    torch.manual_seed(0)
    model = ImageClassifier("resnet18", {"width_multiplier": 0.125}, num_classes=2, in_channels=1,
                            task="binary-class")
    m = run_test(model, Robustness(rotations=[], flips=False), images, _labels(tasks.BINARY))
    assert set(m) - {"test/acc", "test/auc", "test/loss"} == {
        "test/invariance_error", "test/invariance_error/rot90", "test/invariance_error/hflip"}
    assert m["test/invariance_error/rot90"] > 1e-3 and m["test/invariance_error/hflip"] > 1e-3


@pytest.mark.parametrize("task", [tasks.MULTI_LABEL, tasks.MULTI_CLASS, tasks.ORDINAL])
def test_every_task_type_runs_and_logs_finite_values(task, images, run_test):
    torch.manual_seed(0)
    model = ImageClassifier("eq_resnet8", {"group": "D4", "width_multiplier": 0.25}, num_classes=3, in_channels=1,
                            task=task)
    callback = Robustness(rotations=[90, 30], flips=True, attacks=[{"name": "fgsm", "eps": 8}, PGD])
    m = run_test(model, callback, images, _labels(task, classes=3))
    assert set(m) >= set(callback.metric_names(model)) and "test/rot30/invariance_error" in m
    assert all(math.isfinite(v) for v in m.values())
    assert m["test/rot90/acc"] == m["test/acc"] and m["test/invariance_error"] < 1e-4
    assert m["test/pgd_eps8/acc"] <= m["test/acc"] and m["test/fgsm_eps8/acc"] <= m["test/acc"]


class LinearBinary(L.LightningModule):
    """logits ``[0, w.x + b]`` with a task but no hparams (num_classes comes from the callback) and no loss()."""

    task = "binary-class"
    group = None

    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.w = torch.nn.Parameter(torch.randn(28 * 28, generator=g) * 0.01)
        self.b = torch.nn.Parameter(torch.tensor(0.01))

    def forward(self, x):
        m = x.flatten(1) @ self.w + self.b
        return torch.stack([torch.zeros_like(m), m], dim=1)

    def test_step(self, batch, batch_idx):
        pass


def test_attack_acc_is_the_closed_form_on_a_linear_model(run_test):
    g = torch.Generator().manual_seed(5)
    x, y = torch.rand(64, 1, 28, 28, generator=g) - 0.5, torch.randint(0, 2, (64,), generator=g)
    model, eps = LinearBinary(), 1.0
    with torch.no_grad():
        margin = (2 * y - 1) * model(x)[:, 1]
    drop = eps * 2 / 255 * model.w.detach().abs().sum()
    assert ((margin - drop).abs() > 1e-4).all()
    callback = Robustness(rotations=[], flips=False, symmetry=False, num_classes=2, attacks=[
        {"name": "fgsm", "eps": eps}, {"name": "pgd", "eps": eps, "steps": 12, "step_size": 0.25}])
    m = run_test(model, callback, x, y, batch_size=16)
    expected = float((margin > drop).float().mean())
    assert 0 < expected < float((margin > 0).float().mean())
    assert m["test/fgsm_eps1/acc"] == pytest.approx(expected)
    assert m["test/pgd_eps1/acc"] == pytest.approx(expected)


def test_batch_hook_restores_train_mode_and_uses_eval(images):
    torch.manual_seed(0)
    model = ImageClassifier("resnet18", {"width_multiplier": 0.125}, num_classes=2, in_channels=1,
                            task="binary-class").train()
    stats = {k: v.clone() for k, v in model.state_dict().items()}
    callback = Robustness(rotations=[90, 45], attacks=[{"name": "fgsm", "eps": 1}])
    callback.on_test_start(None, model)
    callback.on_test_epoch_start(None, model)
    callback.on_test_batch_end(None, model, None, (images[:4], _labels(tasks.BINARY)[:4]), 0)
    assert model.training and all(m.training for m in model.modules())
    assert all(torch.equal(stats[k], v) for k, v in model.state_dict().items())  # BN ran in eval mode
    assert all(p.grad is None and p.requires_grad for p in model.parameters())
    with pytest.raises(ValueError, match=r"\(images, labels\)"):
        callback.on_test_batch_end(None, model, None, {"image": images}, 0)


def test_module_without_task_or_num_classes_is_a_clear_error():
    class NoTask(L.LightningModule):
        pass

    with pytest.raises(ValueError, match="no `task` attribute"):
        Robustness().on_test_start(None, NoTask())
    no_classes = LinearBinary()
    with pytest.raises(ValueError, match=r"Robustness\(num_classes=...\)"):
        Robustness().on_test_start(None, no_classes)
    with pytest.raises(ValueError, match="num_classes=3 but the module has hparams.num_classes=2"):
        Robustness(num_classes=3).on_test_start(None, ImageClassifier("resnet18", {"width_multiplier": 0.125},
                                                                      num_classes=2, task="binary-class"))


def test_yaml_callback_under_lightning_cli(tmp_path):
    from lightning.pytorch.cli import LightningCLI

    config = tmp_path / "robust.yaml"
    config.write_text("""
trainer:
  logger: false
  callbacks:
    - class_path: eqlightning.evaluation.Robustness
      init_args:
        rotations: [90, 180, 270, 45]
        flips: true
        attacks:
          - {name: fgsm, eps: 2}
          - {name: pgd, eps: 0.5, steps: 10, step_size: 0.125, random_start: true}
        symmetry: true
model:
  backbone: resnet18
  backbone_kwargs: {width_multiplier: 0.125}
  task: binary-class
""")
    cli = LightningCLI(ImageClassifier, run=False, args=["--config", str(config)], save_config_callback=None)
    callback = next(c for c in cli.trainer.callbacks if isinstance(c, Robustness))
    assert list(callback.rotations) == ["rot90", "rot180", "rot270", "rot45"]
    assert [a.label for a in callback.attacks] == ["fgsm_eps2", "pgd_eps0.5"]
    assert callback.attacks[1].steps == 10 and callback.attacks[1].step_size == 0.125
