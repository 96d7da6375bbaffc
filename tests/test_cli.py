"""LightningCLI: configs parse and instantiate, fit then test on real data, one run directory, console script."""

from __future__ import annotations

import runpy
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from eqlightning import ImageClassifier
from eqlightning.cli import run_cli

REPO = Path(__file__).resolve().parents[1]
# Every fit config (study files in configs/studies/ are not: tests/studies/test_spec.py loads and plans each).
CONFIGS = sorted(str(p.relative_to(REPO)) for p in (REPO / "configs").rglob("*.yaml") if "studies" not in p.parts)


@pytest.fixture(autouse=True)
def _fresh_run_id(monkeypatch):
    monkeypatch.delenv("EQL_RUN_ID", raising=False)  # each CLI call in a test gets its own run directory


def test_print_config_shows_the_linked_model_and_data(capsys):
    with pytest.raises(SystemExit) as exit_info:
        run_cli(["fit", "--config", str(REPO / "configs/quickstart.yaml"), "--print_config"])
    assert exit_info.value.code == 0
    printed = capsys.readouterr().out
    assert "backbone: eq_resnet8" in printed and "flag: breastmnist" in printed and "test_after_fit: true" in printed


@pytest.mark.parametrize("config", CONFIGS)
def test_every_config_instantiates(config, tmp_path, medmnist_root):
    cli = run_cli(["--config", str(REPO / config), "--run_root", str(tmp_path),
                "--data.root", str(medmnist_root)], run=False)
    data, model = cli.datamodule, cli.model
    assert (model.hparams.num_classes, model.hparams.in_channels, model.task) == (data.num_classes,
                                                                                   data.in_channels, data.task)
    assert model.hparams.input_size == data.input_size
    x = torch.zeros(2, data.in_channels, *(data.input_size,) * data.spatial_dims)
    assert model.eval()(x).shape == (2, data.num_classes)


@pytest.mark.slow
def test_fit_then_test_on_pneumoniamnist_beats_the_majority_class(tmp_path, medmnist_root):
    common = ["--config", str(REPO / "configs/quickstart.yaml"), "--run_root", str(tmp_path),
              "--run_name", "pneumonia", "--data.flag", "pneumoniamnist", "--data.root", str(medmnist_root),
              "--data.batch_size", "128", "--trainer.enable_progress_bar", "false"]
    fit = run_cli(["fit", *common, "--trainer.max_epochs", "2", "--test_after_fit", "false"])
    run_dir = Path(fit.trainer.log_dir)
    assert run_dir.parent == tmp_path / "pneumonia"
    best = run_dir / "checkpoints" / "best.ckpt"
    for name in ("metrics.csv", "config.yaml", "hparams.yaml", "checkpoints/best.ckpt", "checkpoints/last.ckpt"):
        assert (run_dir / name).is_file(), name

    test = run_cli(["test", *common, "--ckpt_path", str(best)])
    metrics = test.trainer.callback_metrics
    majority = test.datamodule.majority_rate("test")
    assert majority == pytest.approx(390 / 624)
    assert metrics["test/acc"].item() > majority
    assert metrics["test/auc"].item() > 0.85

    # the checkpoint alone rebuilds the model
    restored = ImageClassifier.load_from_checkpoint(best).eval()
    x = torch.randn(3, 1, 28, 28)
    state = torch.load(best, weights_only=False)["state_dict"]
    reference = fit.model.eval()
    reference.load_state_dict(state)
    with torch.no_grad():
        torch.testing.assert_close(restored(x), reference(x))


@pytest.mark.slow
def test_private_fit_from_a_dp_config_reports_epsilon(tmp_path, medmnist_root):
    from eqlightning.privacy import DifferentialPrivacy

    cli = run_cli(["fit", "--config", str(REPO / "configs/dp/breastmnist_eps8.yaml"), "--run_root", str(tmp_path),
                "--data.root", str(medmnist_root), "--trainer.max_epochs", "2",
                "--trainer.enable_progress_bar", "false"])
    dp = next(c for c in cli.trainer.callbacks if isinstance(c, DifferentialPrivacy))
    metrics = cli.trainer.callback_metrics  # test_after_fit ran the test stage
    assert 0 < dp.epsilon <= 8.0 and metrics["dp/epsilon"].item() == pytest.approx(dp.epsilon, rel=1e-5)
    assert metrics["dp/delta"].item() == pytest.approx(0.1 / 546, rel=1e-5)
    assert "test/acc" in metrics and "test/auc" in metrics
    best = Path(cli.trainer.log_dir) / "checkpoints" / "best.ckpt"
    assert torch.load(best, weights_only=False)["callbacks"][dp.state_key]["steps"] > 0


def test_console_script_is_the_same_entry_point(capsys, monkeypatch):
    script = Path(sys.executable).parent / "eqlightning"
    assert script.is_file(), "run `make install` (pip install -e .) to create the console script"
    out = subprocess.run([str(script), "--help"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and "fit" in out.stdout and "test" in out.stdout
    monkeypatch.setattr(sys, "argv", ["cli.py", "--help"])
    with pytest.raises(SystemExit) as exit_info:
        runpy.run_path(str(REPO / "cli.py"), run_name="__main__")
    assert exit_info.value.code == 0
    top = capsys.readouterr().out
    assert top.split("\n", 1)[1] == out.stdout.split("\n", 1)[1]  # identical apart from the program name


def test_bad_backbone_name_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="unknown backbone 'eq_resnet19'.*Did you mean"):
        run_cli(["--config", str(REPO / "configs/quickstart.yaml"), "--run_root", str(tmp_path),
              "--model.backbone", "eq_resnet19"], run=False)


def test_multi_node_launchers_share_one_run_directory(monkeypatch):
    from eqlightning.cli import _launcher_run_id

    for name in ("TORCHELASTIC_RUN_ID", "SLURM_JOB_ID", "SLURM_NTASKS"):
        monkeypatch.delenv(name, raising=False)
    assert _launcher_run_id() is None
    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    monkeypatch.setenv("SLURM_NTASKS", "1")
    assert _launcher_run_id() is None  # a single-task job: a timestamp, as on a workstation
    monkeypatch.setenv("SLURM_NTASKS", "8")
    assert _launcher_run_id() == "slurm-4242"
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "exp7")
    assert _launcher_run_id() == "torchrun-exp7"
