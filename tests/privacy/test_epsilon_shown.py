"""Every epsilon that is shown (logger, progress bar, callback_metrics, checkpoint, test) is the exact spend of the
steps taken so far, for every accountant, and never above the budget; runs that differ from the plan say so."""

from __future__ import annotations

import csv
import warnings

import lightning.pytorch as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger

from eqlightning.privacy import DifferentialPrivacy, PrivacyLedger

from test_callback import ForeignNet, trainer  # noqa: E402  (tests/privacy is on sys.path)


class Shown(L.Callback):
    """After every batch: the steps taken, the ledger's epsilon, and what Lightning shows for dp/epsilon."""

    def __init__(self):
        self.rows = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        dp = next(c for c in trainer.callbacks if isinstance(c, DifferentialPrivacy))
        self.rows.append((dp.ledger.steps, dp.ledger.epsilon(), float(trainer.callback_metrics["dp/epsilon"]),
                          float(trainer.progress_bar_metrics["dp/epsilon"])))


@pytest.mark.parametrize("accountant", ["prv", "rdp", "gdp"])
def test_the_shown_epsilon_is_the_ledgers_after_every_step_and_after_fit(tmp_path, accountant):
    """The issue's case: a foreign module, 512 examples, batch 64, 2 epochs, target 2 at delta 1e-5."""
    L.seed_everything(0)
    dp, shown = DifferentialPrivacy(target_epsilon=2.0, delta=1e-5, accountant=accountant), Shown()
    t = trainer(tmp_path, [dp, shown], max_epochs=2)
    t.fit(ForeignNet(n=512, batch_size=64))
    assert [r[0] for r in shown.rows] == list(range(1, 17))
    for steps, ledger, metric, bar in shown.rows:
        reference = PrivacyLedger(accountant, 1e-5, [(dp.noise_multiplier, dp.sample_rate, steps)]).epsilon()
        assert ledger == reference
        assert metric == pytest.approx(ledger, rel=1e-6) and bar == pytest.approx(ledger, rel=1e-6)  # float32
    final = float(t.callback_metrics["dp/epsilon"])
    assert final == pytest.approx(dp.epsilon, rel=1e-6) and dp.epsilon <= 2.0
    assert dp.epsilon > 1.9  # the noise was calibrated for these 16 steps
    assert t.test(ForeignNet(n=512, batch_size=64), verbose=False)[0]["dp/epsilon"] == pytest.approx(dp.epsilon,
                                                                                                    rel=1e-6)


def test_no_written_row_exceeds_the_budget_when_it_stops_between_logging_steps(tmp_path):
    """Budget planned for 1 epoch (12 steps) of a 5-epoch run, written every 5 steps: training stops at step 12, between
    logging steps; every row written is the exact epsilon of its step, all within the budget."""
    L.seed_everything(0)
    dp = DifferentialPrivacy(target_epsilon=3.0, epochs=1, accountant="prv")
    logger = CSVLogger(tmp_path, name="run", version="v")
    t = trainer(tmp_path, [dp], max_epochs=5, logger=logger, log_every_n_steps=5)
    t.fit(ForeignNet())
    assert dp.ledger.steps == dp.budget_steps == 12
    with open(tmp_path / "run" / "v" / "metrics.csv") as f:
        rows = [r for r in csv.DictReader(f) if r.get("dp/epsilon")]
    assert rows
    for row in rows:
        steps = int(row["step"]) + 1
        exact = PrivacyLedger("prv", dp.delta, [(dp.noise_multiplier, dp.sample_rate, min(steps, 12))]).epsilon()
        assert float(row["dp/epsilon"]) == pytest.approx(exact, rel=1e-6) and float(row["dp/epsilon"]) <= 3.0
    assert float(t.callback_metrics["dp/epsilon"]) == pytest.approx(dp.epsilon, rel=1e-6) and dp.epsilon <= 3.0
    saved = torch.load(tmp_path / "dp-budget-reached.ckpt", weights_only=False)["callbacks"][dp.state_key]
    assert saved["epsilon"] == dp.epsilon and saved["steps"] == 12


def test_a_checkpoint_holds_the_spend_of_the_steps_that_produced_it(tmp_path):
    L.seed_everything(0)
    dp = DifferentialPrivacy(target_epsilon=3.0, accountant="rdp")
    every = ModelCheckpoint(dirpath=tmp_path, every_n_train_steps=7, save_top_k=-1, filename="{step}")
    trainer(tmp_path, [dp, every], enable_checkpointing=True).fit(ForeignNet())
    saved = torch.load(tmp_path / "step=7.ckpt", weights_only=False)["callbacks"][dp.state_key]
    assert saved["steps"] == 7
    assert saved["epsilon"] == PrivacyLedger("rdp", dp.delta, [(dp.noise_multiplier, dp.sample_rate, 7)]).epsilon()


@pytest.mark.parametrize("flags,actual", [({"limit_train_batches": 4}, 8), ({"max_steps": 5}, 5),
                                          ({"fast_dev_run": True}, 1)])
def test_a_run_shorter_than_the_plan_is_warned_about_with_both_numbers(tmp_path, flags, actual):
    dp = DifferentialPrivacy(target_epsilon=3.0, epochs=2, accountant="rdp")
    with pytest.warns(UserWarning, match=rf"calibrated for 24 steps, but this run will take {actual}\b"):
        trainer(tmp_path, [dp], **flags).fit(ForeignNet())
    assert dp.ledger.steps == actual and dp.epsilon < 3.0


def test_a_run_that_matches_the_plan_is_not_warned_about(tmp_path):
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        warnings.filterwarnings("ignore", message=".*(LeafSpec|Optimal order|num_workers|does not have many workers"
                                                  "|GPU available"
                                                  "|The `srun` command is available).*")  # a machine with SLURM
        trainer(tmp_path, [DifferentialPrivacy(target_epsilon=3.0, accountant="rdp")]).fit(ForeignNet())


def test_stopping_early_says_what_was_spent(tmp_path):
    class StopAfter(L.Callback):
        def on_train_batch_end(self, trainer, *args):
            if trainer.global_step >= 5:
                trainer.should_stop = True

    dp = DifferentialPrivacy(target_epsilon=3.0, accountant="rdp")
    with pytest.warns(UserWarning, match=r"ended after 5 of the 24 steps the noise was calibrated for"):
        trainer(tmp_path, [dp, StopAfter()]).fit(ForeignNet())


@pytest.mark.parametrize("delta", [1 / 192, 0.01])
def test_delta_not_below_one_over_n_is_refused(tmp_path, delta):
    with pytest.raises(ValueError, match=r"delta=0\.0\d+ is not below 1/N = 0\.00521 for N=192"):
        trainer(tmp_path, [DifferentialPrivacy(target_epsilon=3.0, delta=delta)]).fit(ForeignNet())
