"""Runs a researcher can trust: exit codes, one run directory per run (with or without loggers), ``last.ckpt`` always
the newest state (every epoch, on any stop, on SIGTERM), resuming into the same directory, ``summary.json``,
``curves.png``, ``predictions.csv``, ``hparams.yaml`` with the optimizer and DP settings, and short errors."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from lightning.pytorch import Callback

from eqlightning.cli import EXIT_SIGTERM, EXIT_USER_ERROR, main, run_cli, short_message
from eqlightning.runs import RunCSVLogger

REPO = Path(__file__).resolve().parents[1]
QUICKSTART = str(REPO / "configs/quickstart.yaml")
DP_CONFIG = str(REPO / "configs/dp/breastmnist_eps8.yaml")
TINY = ["--model.backbone_kwargs.width_multiplier", "0.25", "--data.batch_size", "64", "--data.eval_batch_size",
        "160", "--trainer.limit_train_batches", "2", "--trainer.limit_val_batches", "1",
        "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false",
        "--trainer.log_every_n_steps", "1"]


@pytest.fixture(autouse=True)
def _env(monkeypatch, medmnist_root, tmp_path):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("EQL_RUN_ID", raising=False)
    monkeypatch.setenv("EQL_DATA_ROOT", str(medmnist_root))


def _fit(tmp_path, *flags, config=QUICKSTART, name="r"):
    return run_cli(["fit", "--config", config, "--run_root", str(tmp_path / "runs"), "--run_name", name, *TINY,
                    "--test_after_fit", "false", *flags])


def _rows(run_dir: Path) -> list[dict]:
    with open(run_dir / "metrics.csv", newline="") as file:
        return list(csv.DictReader(file))


def _env_for_subprocess(medmnist_root) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "EQL_RUN_ID"}
    env["EQL_DATA_ROOT"] = str(medmnist_root)
    return env


# --- exit codes and the last line ----------------------------------------------------------------------------------
@pytest.mark.slow
def test_both_entry_points_exit_0_on_success_and_2_on_a_user_error(tmp_path, medmnist_root):
    env, root = _env_for_subprocess(medmnist_root), str(tmp_path / "runs")
    script = Path(sys.executable).parent / "eqlightning"
    fit = subprocess.run([str(script), "fit", "--config", QUICKSTART, "--run_root", root, *TINY,
                          "--trainer.max_epochs", "1"], capture_output=True, text=True, env=env, timeout=300)
    assert fit.returncode == 0, fit.stderr[-2000:]
    run_dir = next((tmp_path / "runs" / "quickstart").iterdir())
    assert fit.stdout.strip().splitlines()[-1].startswith(f"run directory: {run_dir}")

    predict = subprocess.run([sys.executable, str(REPO / "cli.py"), "predict", "--config", QUICKSTART, "--run_root",
                              root, *TINY, "--ckpt_path", "last"], capture_output=True, text=True, env=env,
                             timeout=300)
    assert predict.returncode == 0, predict.stderr[-2000:]
    assert predict.stdout.strip().splitlines()[-1] == f"predictions: {run_dir / 'predictions.csv'} (156 rows)"

    bad = subprocess.run([sys.executable, str(REPO / "cli.py"), "fit", "--config", QUICKSTART, "--run_root", root,
                          "--model.backbone", "eq_resnet19"], capture_output=True, text=True, env=env, timeout=300)
    assert bad.returncode == EXIT_USER_ERROR
    errors = [line for line in bad.stderr.splitlines() if "eqlightning" in line or "Traceback" in line]
    assert errors == [line for line in errors if not line.startswith("Traceback")]
    assert "unknown backbone 'eq_resnet19'" in bad.stderr and "Did you mean 'eq_resnet18'" in bad.stderr
    assert len(bad.stderr.strip().splitlines()) <= 4, bad.stderr
    assert sorted(p.name for p in (tmp_path / "runs" / "quickstart").iterdir()) == [run_dir.name]  # nothing new


def test_main_returns_0_for_test_validate_and_says_where(tmp_path, capsys):
    fit = _fit(tmp_path, "--trainer.max_epochs", "1")
    run_dir = Path(fit.trainer.log_dir)
    best = run_dir / "checkpoints" / "best.ckpt"
    for command in ("test", "validate"):
        assert main([command, "--config", QUICKSTART, "--run_root", str(tmp_path / "runs"), "--run_name", "r", *TINY,
                     "--ckpt_path", str(best)]) == 0
        assert capsys.readouterr().out.strip().splitlines()[-1] == \
            f"run directory: {run_dir} (summary: {run_dir / 'summary.json'})"
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["checkpoints"]["test"] == summary["checkpoints"]["validate"] == str(best)
    assert {"test/acc", "test/auc"} <= summary["metrics"]["test"].keys()
    assert {"val/acc", "val/auc"} <= summary["metrics"]["validate"].keys()
    assert [h["command"] for h in summary["history"]] == ["fit", "test", "validate"]


@pytest.mark.parametrize("flags, fragment", [
    (["--trainer.max_epochs", "abc"], "--trainer.max_epochs: 'abc' is not valid (expected int or null)"),
    (["--data.flag", "foomnist"], "unknown MedMNIST flag 'foomnist'"),
    (["--model.backbone_kwargs.group", "X5"], "unknown symmetry group 'X5'"),
    (["--model.backbone_kwargs.width_multiplier", "-1"], "width_multiplier must be a number > 0"),
    (["--nonsense", "3"], "unrecognized arguments: --nonsense 3"),
    (["--ckpt_path", "missing.ckpt"], "--ckpt_path missing.ckpt: no such file"),
    (["--ckpt_path", "last"], "--ckpt_path last: no"),
])
def test_user_errors_are_one_short_line_and_exit_2(flags, fragment, tmp_path, capsys):
    code = main(["fit", "--config", QUICKSTART, "--run_root", str(tmp_path / "runs"), *TINY, *flags])
    err = capsys.readouterr().err
    lines = [line for line in err.strip().splitlines() if line.startswith("eqlightning: error:")]
    assert code == EXIT_USER_ERROR and len(lines) == 1 and fragment in lines[0], err
    assert len(lines[0]) < 400 and "Traceback" not in err
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").rglob("*"))


def test_debug_env_shows_the_traceback(tmp_path, monkeypatch):
    monkeypatch.setenv("EQL_DEBUG", "1")
    with pytest.raises(ValueError, match="unknown backbone"):
        main(["fit", "--config", QUICKSTART, "--run_root", str(tmp_path), "--model.backbone", "nope"])


def test_a_run_that_fails_early_leaves_no_directory(tmp_path, capsys):
    """The run directory exists (config.yaml is saved at setup) when the DP callback refuses batch norm."""
    code = main(["fit", "--config", DP_CONFIG, "--run_root", str(tmp_path / "runs"), *TINY,
                 "--model.backbone_kwargs.norm", "batch"])
    assert code == EXIT_USER_ERROR and "batch" in capsys.readouterr().err.lower()
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").rglob("*"))


def test_short_message_of_a_nested_union_error():
    text = ('Parser key "trainer.max_epochs":\n  Does not validate against any of the types in typing.Optional[int]:\n'
            "    - Expected a <class 'int'>\n    - Expected a <class 'NoneType'>\n  Given value type: <class 'str'>\n"
            "  Given value: abc")
    assert short_message(ValueError(text)) == "--trainer.max_epochs: 'abc' is not valid (expected int or null)"


# --- last.ckpt --------------------------------------------------------------------------------------------------------
def _ckpt(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=False)


def test_last_ckpt_is_the_final_state_even_when_the_monitored_metric_never_improves(tmp_path):
    """lr 0: val/auc is the same every epoch, so ModelCheckpoint saves best.ckpt once (epoch 0); Lightning's own
    save_last then kept last.ckpt at that epoch too."""
    cli = _fit(tmp_path, "--trainer.max_epochs", "3", "--model.optimizer.init_args.lr", "0")
    checkpoints = Path(cli.trainer.log_dir) / "checkpoints"
    assert _ckpt(checkpoints / "best.ckpt")["global_step"] == 2
    last = _ckpt(checkpoints / "last.ckpt")
    assert last["global_step"] == cli.trainer.global_step == 6 and last["epoch"] == 2


class _StopAt(Callback):
    def __init__(self, step: int, how: str):
        self.step, self.how = step, how

    def on_train_batch_end(self, trainer, *args):
        if trainer.global_step == self.step:
            if self.how == "sigterm":
                os.kill(os.getpid(), signal.SIGTERM)  # Lightning stops after this batch
            else:
                trainer.should_stop = True  # as max_time, early stopping and the privacy budget do


@pytest.mark.parametrize("how", ["should_stop", "sigterm"])
def test_last_ckpt_on_any_stop_mid_epoch(how, tmp_path, monkeypatch, capsys):
    from eqlightning import cli as eql_cli

    class Stopping(eql_cli.EqLightningCLI):
        def instantiate_trainer(self, **kwargs):
            trainer = super().instantiate_trainer(**kwargs)
            trainer.callbacks.insert(0, _StopAt(3, how))
            return trainer

    monkeypatch.setattr(eql_cli, "EqLightningCLI", Stopping)
    previous = signal.getsignal(signal.SIGTERM)
    code = main(["fit", "--config", QUICKSTART, "--run_root", str(tmp_path / "runs"), "--run_name", "s", *TINY,
                 "--trainer.max_epochs", "5", "--test_after_fit", "false"])
    assert signal.getsignal(signal.SIGTERM) == previous
    run_dir = next((tmp_path / "runs" / "s").iterdir())
    last = _ckpt(run_dir / "checkpoints" / "last.ckpt")
    assert last["global_step"] == 3  # mid-epoch 1 (2 batches per epoch)
    summary = json.loads((run_dir / "summary.json").read_text())
    if how == "sigterm":
        assert code == EXIT_SIGTERM and "--ckpt_path last" in capsys.readouterr().err
        assert (summary["status"], summary["stop_reason"]) == ("interrupted", "SIGTERM")
    else:
        assert code == 0 and summary["status"] == "stopped"


# --- resume ------------------------------------------------------------------------------------------------------------
def test_ckpt_path_last_resumes_the_same_run_directory(tmp_path):
    first = _fit(tmp_path, "--trainer.max_epochs", "2")
    run_dir = Path(first.trainer.log_dir)
    best_score = float(first.trainer.checkpoint_callback.best_model_score)
    (run_dir / "metrics.csv").write_text((run_dir / "metrics.csv").read_text())  # as left behind
    resumed = _fit(tmp_path, "--trainer.max_epochs", "3", "--ckpt_path", "last")
    assert Path(resumed.trainer.log_dir) == run_dir and resumed.trainer.global_step == 6
    assert sorted(p.name for p in run_dir.parent.iterdir()) == [run_dir.name]
    assert float(resumed.trainer.checkpoint_callback.best_model_score) >= best_score  # the best score was kept
    rows = _rows(run_dir)
    steps = [int(r["step"]) for r in rows if r["train/loss_step"]]
    assert steps == list(range(6))  # appended, each step once
    assert [r["epoch"] for r in rows if r["val/auc"]] == ["0", "1", "2"]
    assert (run_dir / "config.yaml").is_file() and (run_dir / "config.fit.yaml").is_file()
    summary = json.loads((run_dir / "summary.json").read_text())
    assert [h["steps"] for h in summary["history"]] == [4, 6] and summary["steps"] == 6
    assert summary["wall_time_s"]["fit"] >= sum(h["wall_time_s"] for h in summary["history"]) - 1e-3


def test_resume_drops_rows_logged_after_the_checkpoint(tmp_path):
    logger = RunCSVLogger(tmp_path, "n", "v", resume_step=None)
    for step in range(6):
        logger.log_metrics({"train/loss": float(step)}, step=step)
    logger.save()
    with pytest.raises(FileExistsError, match="resume the run with --ckpt_path"):
        _save_one(RunCSVLogger(tmp_path, "n", "v"))  # a fresh run never overwrites metrics.csv
    resumed = RunCSVLogger(tmp_path, "n", "v", resume_step=4)
    resumed.log_metrics({"train/loss": 40.0, "val/auc": 0.5}, step=4)
    resumed.save()
    rows = _rows(tmp_path / "n" / "v")
    assert [(r["step"], r["train/loss"], r["val/auc"]) for r in rows] == [
        ("0", "0.0", ""), ("1", "1.0", ""), ("2", "2.0", ""), ("3", "3.0", ""), ("4", "40.0", "0.5")]


def _save_one(logger):
    logger.log_metrics({"a": 1.0}, step=0)
    logger.save()


def test_an_explicit_checkpoint_of_a_run_resumes_into_that_run(tmp_path):
    first = _fit(tmp_path, "--trainer.max_epochs", "1")
    run_dir = Path(first.trainer.log_dir)
    resumed = _fit(tmp_path, "--trainer.max_epochs", "2", "--ckpt_path", str(run_dir / "checkpoints" / "last.ckpt"))
    assert Path(resumed.trainer.log_dir) == run_dir


# --- without loggers -------------------------------------------------------------------------------------------------
def test_logger_false_still_writes_into_the_run_directory(tmp_path):
    for _ in range(2):  # the second run must not trip over the first one's files
        cli = _fit(tmp_path, "--trainer.max_epochs", "1", "--trainer.logger", "false")
    runs = sorted((tmp_path / "runs" / "r").iterdir())
    assert len(runs) == 2 and not (tmp_path / "config.yaml").exists() and not (tmp_path / "checkpoints").exists()
    for run_dir in runs:
        assert {"config.yaml", "summary.json", "checkpoints"} <= {p.name for p in run_dir.iterdir()}
        assert (run_dir / "checkpoints" / "last.ckpt").is_file()
    assert Path(cli.trainer.default_root_dir) == runs[-1]


# --- what a run leaves behind ---------------------------------------------------------------------------------------
def test_summary_curves_and_hparams_of_a_private_run(tmp_path):
    cli = _fit(tmp_path, "--trainer.max_epochs", "2", "--test_after_fit", "true", config=DP_CONFIG)
    run_dir = Path(cli.trainer.log_dir)
    summary = json.loads((run_dir / "summary.json").read_text())
    dp = next(c for c in cli.trainer.callbacks if getattr(c, "reports_privacy", False))
    privacy = summary["privacy"]
    assert privacy["epsilon"] == pytest.approx(dp.epsilon) and 0 < privacy["epsilon"] <= 8
    assert privacy["steps"] == dp.ledger.steps > 0 and privacy["noise_multiplier"] == dp.noise_multiplier
    assert privacy["delta"] == pytest.approx(0.1 / 546) and privacy["accountant"] == "prv"
    assert summary["metrics"]["test"]["test/auc"] == pytest.approx(cli.trainer.callback_metrics["test/auc"].item())
    assert summary["metrics"]["test"]["test/invariance_error"] < 1e-4  # the per-run symmetry diagnostic (D4)
    assert summary["checkpoints"]["test"] == summary["checkpoints"]["best"] == str(run_dir / "checkpoints/best.ckpt")
    assert summary["model"]["parameters"] == sum(p.numel() for p in cli.model.parameters())
    assert summary["model"]["flops"] > 0 and summary["model"]["group"] == "D4"
    assert summary["optimizer"]["class_path"] == "torch.optim.SGD" and summary["seed"] == 0
    assert summary["versions"]["torch"] == torch.__version__ and summary["device"]["type"] == "cpu"
    assert len(summary["config_hash"]) == 16 and summary["status"] == "completed"
    png = (run_dir / "curves.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000
    hparams = yaml.safe_load((run_dir / "hparams.yaml").read_text())
    assert hparams["optimizer"]["init_args"]["lr"] == 2.0
    assert hparams["privacy"]["target_epsilon"] == 8.0 and hparams["backbone"] == "eq_resnet8"


def test_the_config_hash_ignores_where_a_run_goes(tmp_path):
    from eqlightning.cli import config_hash

    base = {"model": {"backbone": "eq_resnet8"}, "trainer": {"max_epochs": 3}}
    assert config_hash({**base, "run_root": "a", "ckpt_path": "x"}) == config_hash({**base, "run_root": "b"})
    assert config_hash(base) != config_hash({**base, "trainer": {"max_epochs": 4}})


def test_test_without_a_checkpoint_warns_about_random_weights(tmp_path):
    with pytest.warns(UserWarning, match="freshly initialised"):
        run_cli(["test", "--config", QUICKSTART, "--run_root", str(tmp_path), *TINY])


def test_eqlightning_list(capsys, medmnist_root):
    from eqlightning.models import list_backbones

    assert main(["list"]) == 0
    out = capsys.readouterr().out
    for name in list_backbones():
        assert f"  {name} " in out
    assert "pneumoniamnist" in out and "28+" in out and "D4" in out and "options: group," in out
    assert main(["list", "groups"]) == 0 and "Backbones" not in capsys.readouterr().out
    with pytest.raises(SystemExit):
        main(["list", "nonsense"])


# --- checkpoints evaluated as they were meant -------------------------------------------------------------------------
def test_a_channel_mismatch_is_caught_before_any_convolution(medmnist_root):
    import lightning.pytorch as L

    from eqlightning import ImageClassifier, MedMNISTDataModule

    data = MedMNISTDataModule("breastmnist", root=str(medmnist_root), batch_size=8)
    model = ImageClassifier("resnet18", {"width_multiplier": 0.125}, num_classes=2, in_channels=3, task="binary-class")
    trainer = L.Trainer(fast_dev_run=True, logger=False, enable_progress_bar=False, enable_model_summary=False)
    with pytest.raises(ValueError, match=r"in_channels=3 .*breastmnist.* has in_channels=1; build the model with"):
        trainer.fit(model, data)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.zeros(4, 1, 28, 28),
                                                                        torch.zeros(4, dtype=torch.long)))
    trainer = L.Trainer(fast_dev_run=True, logger=False, enable_progress_bar=False, enable_model_summary=False)
    with pytest.raises(ValueError, match=r"the batch has 1 channels .* in_channels=3; build it with in_channels=1"):
        trainer.fit(model, loader)  # plain loaders: checked on the first batch


@pytest.mark.slow
def test_a_dp_checkpoint_tested_without_the_dp_callback_uses_its_ema_weights(tmp_path):
    fit = _fit(tmp_path, "--trainer.max_epochs", "2", "--test_after_fit", "true", config=DP_CONFIG)
    with_callback = fit.trainer.callback_metrics["test/auc"].item()
    best = Path(fit.trainer.log_dir) / "checkpoints" / "best.ckpt"
    state = next(v for k, v in torch.load(best, weights_only=False)["callbacks"].items() if "Differential" in k)
    assert state["ema"]["names"]  # the EMA weights are in the checkpoint, by parameter name
    plain = run_cli(["test", "--config", QUICKSTART, "--run_root", str(tmp_path / "runs"), *TINY,
                     "--model.backbone_kwargs.norm", "group", "--ckpt_path", str(best)])
    assert plain.trainer.callback_metrics["test/auc"].item() == pytest.approx(with_callback, abs=1e-6)
    assert plain.trainer.callback_metrics["dp/epsilon"].item() == pytest.approx(state["epsilon"])


# --- kill -9 in the middle of a private run, then --ckpt_path last -------------------------------------------------
@pytest.mark.slow
def test_kill_9_mid_private_run_then_resume_ends_as_the_uninterrupted_run(tmp_path, medmnist_root):
    import time

    flags = ["--config", DP_CONFIG, *TINY, "--trainer.limit_train_batches", "1.0", "--trainer.max_epochs", "4",
             "--test_after_fit", "true"]
    reference = run_cli(["fit", *flags, "--run_root", str(tmp_path / "ref")])
    ref_dir = Path(reference.trainer.log_dir)

    env, root = _env_for_subprocess(medmnist_root), str(tmp_path / "killed")
    command = [sys.executable, str(REPO / "cli.py"), "fit", *flags, "--run_root", root]
    process = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 240
    while not list(Path(root).glob("*/*/checkpoints/last.ckpt")) and process.poll() is None:
        assert time.monotonic() < deadline, "no last.ckpt after 4 minutes"
        time.sleep(0.02)
    process.kill()  # SIGKILL: no handler runs, nothing is flushed
    _, err = process.communicate(timeout=60)
    assert process.returncode == -signal.SIGKILL, f"the run ended before it could be killed: {err[-1500:]}"
    run_dir = next(Path(root).glob("*/*"))
    killed_at = _ckpt(run_dir / "checkpoints" / "last.ckpt")["global_step"]

    resumed = subprocess.run(command + ["--ckpt_path", "last"], env=env, capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert sorted(p.name for p in run_dir.parent.iterdir()) == [run_dir.name]  # the same run directory

    ours, theirs = (json.loads((d / "summary.json").read_text()) for d in (run_dir, ref_dir))
    assert 0 < killed_at < ours["steps"] == theirs["steps"]
    assert ours["privacy"]["epsilon"] == theirs["privacy"]["epsilon"] and ours["privacy"]["steps"] == theirs[
        "privacy"]["steps"]
    assert ours["metrics"]["test"] == pytest.approx(theirs["metrics"]["test"], abs=1e-6)
    assert ours["metrics"]["best"]["value"] == pytest.approx(theirs["metrics"]["best"]["value"], abs=1e-6)
    final = {d: _ckpt(d / "checkpoints" / "last.ckpt")["state_dict"] for d in (run_dir, ref_dir)}
    for name, value in final[ref_dir].items():
        torch.testing.assert_close(final[run_dir][name], value, rtol=0, atol=0, msg=name)
    val = {d: [(r["epoch"], r["val/auc"]) for r in _rows(d) if r["val/auc"]] for d in (run_dir, ref_dir)}
    assert val[run_dir] == val[ref_dir]  # metrics.csv: each epoch once, as in the uninterrupted run


# --- every task type -------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("task, classes", [("binary-class", 2), ("multi-class", 3), ("ordinal-regression", 4),
                                           ("multi-label, binary-class", 3)])
def test_summary_and_predictions_for_every_task_type(task, classes, tmp_path):
    import lightning.pytorch as L
    from torch.utils.data import DataLoader, TensorDataset

    from eqlightning import ImageClassifier
    from eqlightning.runs import LastCheckpoint, PredictionWriter, RunSummary

    g = torch.Generator().manual_seed(0)
    x = torch.rand(12, 1, 28, 28, generator=g) * 2 - 1
    y = (torch.randint(0, 2, (12, classes), generator=g) if task.startswith("multi-label")
         else torch.arange(12).remainder(classes).reshape(12, 1))
    loader = DataLoader(TensorDataset(x, y), batch_size=6)
    model = ImageClassifier("eq_resnet8", {"group": "C4", "width_multiplier": 0.25}, num_classes=classes,
                            in_channels=1, task=task)
    run_dir = tmp_path / "run"
    writer = PredictionWriter(run_dir / "predictions.csv", split="test")
    trainer = L.Trainer(max_epochs=1, logger=RunCSVLogger(tmp_path, "", "run"), enable_progress_bar=False,
                        enable_model_summary=False, default_root_dir=str(run_dir),
                        callbacks=[RunSummary(run_dir), LastCheckpoint(run_dir / "checkpoints"), writer])
    trainer.fit(model, loader, loader)
    trainer.test(model, loader)
    predictions = trainer.predict(model, loader)
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["model"]["task"] == task and summary["status"] == "completed"
    assert {"val/acc", "val/auc"} <= summary["metrics"]["final"].keys()
    assert {"test/acc", "test/auc"} <= summary["metrics"]["test"].keys()
    assert (run_dir / "checkpoints" / "last.ckpt").is_file() and (run_dir / "curves.png").is_file()

    with open(run_dir / "predictions.csv", newline="") as file:
        rows = list(csv.DictReader(file))
    scores = torch.cat(predictions)
    assert len(rows) == 12 and [int(r["index"]) for r in rows] == list(range(12)) and rows[0]["split"] == "test"
    for i, row in enumerate(rows):
        got = torch.tensor([float(row[f"score_{j}"]) for j in range(classes)])
        torch.testing.assert_close(got, scores[i], atol=1e-5, rtol=1e-5)
        if task.startswith("multi-label"):
            assert [int(row[f"label_{j}"]) for j in range(classes)] == y[i].tolist()
            assert [int(row[f"pred_{j}"]) for j in range(classes)] == (scores[i] > 0.5).long().tolist()
        else:
            assert int(row["label"]) == int(y[i, 0])
            expected = int(scores[i, 1] > 0.5) if task == "binary-class" else int(scores[i].argmax())
            assert int(row["pred"]) == expected


def test_a_non_private_run_resumed_at_an_epoch_end_equals_the_uninterrupted_run(tmp_path):
    """Shuffling and augmentations are functions of (seed, epoch), so the resumed epochs see the same batches."""
    augment = ["--data.rot90", "true", "--data.flip", "true"]
    reference = _fit(tmp_path, "--trainer.max_epochs", "3", *augment, name="ref")
    _fit(tmp_path, "--trainer.max_epochs", "1", *augment, name="cut")
    resumed = _fit(tmp_path, "--trainer.max_epochs", "3", "--ckpt_path", "last", *augment, name="cut")
    ours, theirs = (_ckpt(Path(c.trainer.log_dir) / "checkpoints" / "last.ckpt") for c in (resumed, reference))
    assert ours["global_step"] == theirs["global_step"] == 6
    for name, value in theirs["state_dict"].items():
        torch.testing.assert_close(ours["state_dict"][name], value, rtol=0, atol=0, msg=name)


def test_training_batches_change_every_pass_and_repeat_per_epoch(medmnist_root):
    from eqlightning import MedMNISTDataModule

    data = MedMNISTDataModule("breastmnist", root=str(medmnist_root), batch_size=16, rot90=True)
    data.setup("fit")
    loader = data.train_dataloader()
    first, second = (next(iter(loader)) for _ in range(2))  # plain iteration advances the epoch
    assert not torch.equal(first[0], second[0])
    loader.sampler.set_epoch(0)
    again = next(iter(loader))
    assert torch.equal(first[0], again[0]) and torch.equal(first[1], again[1])
