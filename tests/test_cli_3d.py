"""3D from the CLI: fit and test from configs/ on a synthetic organmnist3d file in the official format (no 3D file
can be downloaded on CI machines), a private fit from the DP config, and clear errors for 2D/3D mix-ups."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from eqlightning import ImageClassifier
from eqlightning.cli import run_cli
from eqlightning.data import md5sum, write_synthetic_medmnist3d

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def _fresh_run_id(monkeypatch):
    monkeypatch.delenv("EQL_RUN_ID", raising=False)


@pytest.fixture(scope="module")
def organ3d(tmp_path_factory) -> list[str]:
    """``--data.root``/``--data.md5`` of a small synthetic organmnist3d.npz (28^3, 11 classes)."""
    path = write_synthetic_medmnist3d(tmp_path_factory.mktemp("med3d"), "organmnist3d", 28, (44, 22, 22), seed=0)
    return ["--data.root", str(path.parent), "--data.md5", md5sum(path)]


@pytest.mark.slow
def test_fit_then_test_from_the_3d_config(tmp_path, organ3d):
    common = ["--config", str(REPO / "configs/organmnist3d/eq_o.yaml"), *organ3d, "--run_root", str(tmp_path),
              "--trainer.enable_progress_bar", "false", "--model.backbone_kwargs.width_multiplier", "0.5",
              "--data.batch_size", "11", "--model.backbone_kwargs.stem_pools", "1"]
    fit = run_cli(["fit", *common, "--trainer.max_epochs", "2"])
    run_dir = Path(fit.trainer.log_dir)
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["model"]["group"] == "O" and summary["model"]["flops"] > 0
    metrics = fit.trainer.callback_metrics  # test_after_fit: test metrics and the symmetry diagnostic
    assert 0 <= metrics["test/acc"].item() <= 1 and "test/auc" in metrics
    assert metrics["test/invariance_error/rot90"].item() < 1e-4  # rot90 about the depth axis
    assert metrics["test/invariance_error/rot90_dh"].item() < 1e-4  # and about the width axis: all of O

    test = run_cli(["test", *common, "--ckpt_path", str(run_dir / "checkpoints" / "best.ckpt")])
    assert test.trainer.callback_metrics["test/acc"].item() == pytest.approx(metrics["test/acc"].item())
    restored = ImageClassifier.load_from_checkpoint(run_dir / "checkpoints" / "best.ckpt").eval()
    with torch.no_grad():
        assert restored(torch.randn(2, 1, 28, 28, 28)).shape == (2, 11)


@pytest.mark.slow
def test_private_fit_from_the_3d_dp_config_reports_epsilon(tmp_path, organ3d):
    from eqlightning.privacy import DifferentialPrivacy

    cli = run_cli(["fit", "--config", str(REPO / "configs/dp/organmnist3d_eps8.yaml"), *organ3d,
                   "--run_root", str(tmp_path), "--trainer.max_epochs", "1", "--data.batch_size", "22",
                   "--model.backbone_kwargs.width_multiplier", "0.5", "--model.backbone_kwargs.stem_pools", "1",
                   "--trainer.enable_progress_bar", "false"])
    dp = next(c for c in cli.trainer.callbacks if isinstance(c, DifferentialPrivacy))
    metrics = cli.trainer.callback_metrics
    assert 0 < dp.epsilon <= 8.0 and metrics["dp/epsilon"].item() == pytest.approx(dp.epsilon, rel=1e-5)
    assert metrics["dp/delta"].item() == pytest.approx(0.1 / 44, rel=1e-5)
    assert "test/auc" in metrics
    best = Path(cli.trainer.log_dir) / "checkpoints" / "best.ckpt"
    assert torch.load(best, weights_only=False)["callbacks"][dp.state_key]["steps"] > 0


def test_a_2d_backbone_on_volumes_is_a_clear_error(tmp_path, organ3d):
    with pytest.raises(ValueError, match=r"backbone 'eq_resnet8' takes images \(2D\) but the data module "
                                         r"MedMNIST3DDataModule \(organmnist3d\) gives volumes \(3D\)"):
        run_cli(["fit", "--config", str(REPO / "configs/organmnist3d/eq_o.yaml"), *organ3d,
                 "--run_root", str(tmp_path), "--model.backbone", "eq_resnet8", "--model.backbone_kwargs.group", "D4",
                 "--trainer.fast_dev_run", "1",
                 "--trainer.enable_progress_bar", "false"])
