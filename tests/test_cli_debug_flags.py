"""Lightning's debugging flags work with every fit config: ``fast_dev_run``, ``limit_*_batches``, ``max_time`` and
``overfit_batches``, each followed by the configs' ``test_after_fit`` (which tests the final weights when there is no
best checkpoint, e.g. under fast_dev_run).

Runs are kept small: batch 4, width x0.25 (equivariant and plain ResNets alike), and only the ``fit`` subcommand's
parser is built (LightningCLI otherwise builds four, most of a tiny run's time). The DP configs cost more (noise
calibration and accounting take seconds whatever the model): all but configs/dp/breastmnist_eps8.yaml are ``slow``.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from lightning.pytorch.callbacks import Timer
from lightning.pytorch.cli import LightningCLI

import eqlightning.cli as eql_cli
from eqlightning.cli import EqLightningCLI, run_cli
from eqlightning.data import md5sum, write_synthetic_medmnist3d

REPO = Path(__file__).resolve().parents[1]


def _fit_configs() -> list[str]:
    """Every LightningCLI fit config in configs/, except configs/multinode (DDP across nodes, for a cluster) and
    transfer configs that start from another run (tests/test_transfer.py runs them after their source)."""
    found = []
    for path in sorted((REPO / "configs").rglob("*.yaml")):
        rel = path.relative_to(REPO)
        content = yaml.safe_load(path.read_text())
        if (rel.parts[1] != "multinode" and isinstance(content, dict) and {"model", "data"} & content.keys()
                and not (content.get("model") or {}).get("init_from")):  # needs its source run: test_transfer.py
            found.append(str(rel))
    return found


FIT_CONFIGS = _fit_configs()
DP_CONFIG = "configs/dp/breastmnist_eps8.yaml"
PLAIN_CONFIG = "configs/quickstart.yaml"
SMALL = ["--data.batch_size", "4", "--model.backbone_kwargs.width_multiplier", "0.25",
         "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false"]
EVAL_64 = ["--data.eval_batch_size", "64"]  # the test after fit runs on the whole test split

FLAGS = {
    "fast_dev_run": ["--trainer.fast_dev_run=true"],
    "limit_batches": ["--trainer.limit_train_batches=2", "--trainer.limit_val_batches=1", "--trainer.max_epochs=1",
                      *EVAL_64],
    "max_time": ["--trainer.max_time=00:00:00:05", "--data.train_fraction=0.1", *EVAL_64],
    "overfit_batches": ["--trainer.overfit_batches=2", "--trainer.max_epochs=1", *EVAL_64],
}

# (config, flag) -> the error, for cases that fail inside eqlightning.privacy (left to its maintainers).
DP_XFAIL: dict[tuple[str, str], str] = {}


@pytest.fixture(autouse=True)
def _cli_env(monkeypatch, medmnist_root, tmp_path):
    monkeypatch.chdir(tmp_path)  # Trainer(default_root_dir) is the working directory
    monkeypatch.delenv("EQL_RUN_ID", raising=False)  # each run gets its own directory
    monkeypatch.setenv("EQL_DATA_ROOT", str(medmnist_root))
    fit_only = {"fit": LightningCLI.subcommands()["fit"]}
    monkeypatch.setattr(EqLightningCLI, "subcommands", staticmethod(lambda: fit_only))


@pytest.fixture
def said(monkeypatch) -> list[str]:
    """The lines eqlightning.cli prints with rank_zero_info."""
    lines: list[str] = []
    monkeypatch.setattr(eql_cli, "rank_zero_info", lambda message, *args, **kwargs: lines.append(str(message)))
    return lines


@pytest.fixture(scope="module")
def volumes(tmp_path_factory) -> list[str]:
    """A synthetic organmnist3d.npz (official format; no 3D file can be downloaded here) for the 3D configs."""
    path = write_synthetic_medmnist3d(tmp_path_factory.mktemp("med3d"), "organmnist3d", 28, (8, 4, 4))
    return ["--data.root", str(path.parent), "--data.md5", md5sum(path)]


def _fit(config: str, flags: list[str], tmp_path: Path, data: list[str] = ()):
    return run_cli(["fit", "--config", str(REPO / config), "--run_root", str(tmp_path), *SMALL, *data, *flags])


def _param(config: str, flag: str):
    reason = DP_XFAIL.get((config, flag))
    marks = [pytest.mark.xfail(strict=True, reason=reason)] if reason else []
    if config.startswith("configs/dp/") and config != DP_CONFIG:  # ~5 s each (noise calibration): `-m "not slow"`
        marks.append(pytest.mark.slow)
    return pytest.param(config, flag, id=f"{config.removeprefix('configs/')}-{flag}", marks=marks)


CASES = ([_param(config, "fast_dev_run") for config in FIT_CONFIGS]
         + [_param(config, flag) for config in (PLAIN_CONFIG, DP_CONFIG) for flag in FLAGS if flag != "fast_dev_run"])


def test_every_fit_config_is_covered():
    assert PLAIN_CONFIG in FIT_CONFIGS and DP_CONFIG in FIT_CONFIGS and len(FIT_CONFIGS) >= 20
    assert not any("multinode" in c for c in FIT_CONFIGS)


@pytest.mark.parametrize("config, flag", CASES)
def test_debug_flag_then_test_after_fit(config, flag, tmp_path, said, request):
    data = request.getfixturevalue("volumes") if "organmnist3d" in config else []
    cli = _fit(config, FLAGS[flag], tmp_path, data)
    trainer = cli.trainer
    metrics = trainer.callback_metrics
    assert trainer.global_step >= 1
    assert {"test/acc", "test/auc"} <= metrics.keys(), "test_after_fit did not run the test stage"
    if any(type(c).__name__ == "DifferentialPrivacy" for c in trainer.callbacks):
        assert "dp/epsilon" in metrics and "dp/delta" in metrics
    notes = [line for line in said if line.startswith("test_after_fit:")]
    if flag == "fast_dev_run":  # no checkpoint: the weights in memory are tested, and the user is told so
        assert trainer.global_step == 1 and trainer.ckpt_path is None
        assert sorted(p.name for p in tmp_path.iterdir()) == [], "fast_dev_run must write nothing"
        assert len(notes) == 1 and "fast_dev_run" in notes[0] and "weights at the end of fit" in notes[0], notes
        return
    assert notes == [] and trainer.ckpt_path == trainer.checkpoint_callback.best_model_path
    assert Path(trainer.ckpt_path).name == "best.ckpt" and Path(trainer.ckpt_path).is_file()
    if flag == "limit_batches":  # "1" is one batch, not 1.0 = 100% (see eqlightning.cli._parse_int_before_float)
        assert (trainer.num_training_batches, trainer.num_val_batches, trainer.current_epoch) == (2, [1], 1)
    elif flag == "overfit_batches":
        assert (trainer.num_training_batches, trainer.num_val_batches) == (2, [2])
    elif flag == "max_time":
        timer = next(c for c in trainer.callbacks if isinstance(c, Timer))
        assert timer.time_elapsed("train") >= 5 or trainer.current_epoch == trainer.max_epochs


def test_no_validation_yet_tests_the_final_weights(tmp_path, said):
    """A fit that ends before val/auc is ever logged has no best checkpoint: test the final weights, say why."""
    cli = _fit(PLAIN_CONFIG, ["--trainer.limit_train_batches=1", "--trainer.limit_val_batches=0",
                              "--trainer.max_epochs=1", *EVAL_64], tmp_path)
    assert cli.trainer.num_training_batches == 1
    assert cli.trainer.ckpt_path is None and "test/auc" in cli.trainer.callback_metrics
    assert len(said) == 1 and "'val/auc'" in said[0] and "no validation ran" in said[0], said


@pytest.mark.parametrize("value, expected", [("1", 1), ("3", 3), ("1.0", 1.0), ("0.25", 0.25)])
def test_limit_batches_parse_ints_as_batch_counts(value, expected, tmp_path):
    """Lightning: an int is a number of batches, a float a fraction; "1" must not become 1.0 (= all batches)."""
    cli = run_cli(["--config", str(REPO / PLAIN_CONFIG), "--run_root", str(tmp_path),
                *(f"--trainer.limit_{stage}_batches={value}" for stage in ("train", "val", "test", "predict"))],
               run=False)
    for stage in ("train", "val", "test", "predict"):
        parsed = cli.config["trainer"][f"limit_{stage}_batches"]
        assert parsed == expected and type(parsed) is type(expected), (stage, parsed)
