"""Testing a DP checkpoint without the DifferentialPrivacy callback still reports the epsilon stored in it.

The checkpoints are built by hand: a tiny ImageClassifier trained two steps without DP, saved, and given the
``callbacks`` entry a DifferentialPrivacy callback saves (``epsilon``, ``delta``, ``steps``, and its ledger/EMA state).
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import lightning.pytorch as L
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from eqlightning import ImageClassifier
from eqlightning.classifier import privacy_state

DP_KEY = "DifferentialPrivacy{'target_epsilon': 8.0, 'noise_multiplier': None, 'delta': None}"
DP_STATE = {"epsilon": 3.25, "delta": 2.5e-4, "steps": 2, "noise_multiplier": 1.1, "sample_rate": 0.25,
            "ledger": {"accountant": "prv", "history": [[1.1, 0.25, 2]]}, "ema": {"decay": 0.99, "shadow": {}}}
MODEL = dict(backbone="resnet18", backbone_kwargs={"width_multiplier": 0.125, "norm": "group"}, num_classes=2,
             in_channels=1, input_size=28)


def _loader() -> DataLoader:
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(16, 1, 28, 28, generator=g), torch.arange(16) % 2
    return DataLoader(TensorDataset(x, y), batch_size=8)


def _trainer(tmp_path: Path, callbacks=(), **kwargs) -> L.Trainer:
    return L.Trainer(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                     enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path,
                     callbacks=list(callbacks), **kwargs)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> dict[str, Path]:
    """``{"plain": a checkpoint of a non-private run, "dp": the same with a DifferentialPrivacy entry}``."""
    root = tmp_path_factory.mktemp("dp-report")
    torch.manual_seed(0)
    trainer = _trainer(root, max_steps=2)
    trainer.fit(ImageClassifier(**MODEL), train_dataloaders=_loader())
    plain, dp = root / "plain.ckpt", root / "dp.ckpt"
    trainer.save_checkpoint(plain)
    checkpoint = torch.load(plain, map_location="cpu", weights_only=False)
    assert not any(str(k).startswith("DifferentialPrivacy") for k in checkpoint.get("callbacks", {}))
    checkpoint.setdefault("callbacks", {})[DP_KEY] = DP_STATE
    torch.save(checkpoint, dp)
    return {"plain": plain, "dp": dp}


class _Reporter(L.Callback):
    """Stands in for DifferentialPrivacy: says whether it reports privacy, and logs its own epsilon when it does."""

    def __init__(self, reports: bool):
        self.reports_privacy = reports

    def on_test_epoch_end(self, trainer, pl_module):
        if self.reports_privacy:
            pl_module.log("dp/epsilon", 7.0)


def test_testing_a_dp_checkpoint_reports_its_epsilon(checkpoints, tmp_path):
    model = ImageClassifier(**MODEL)
    (result,) = _trainer(tmp_path).test(model, dataloaders=_loader(), ckpt_path=str(checkpoints["dp"]))
    assert result["dp/epsilon"] == pytest.approx(3.25) and result["dp/delta"] == pytest.approx(2.5e-4)
    assert "test/acc" in result
    assert model.checkpoint_privacy["steps"] == 2 and "ledger" not in model.checkpoint_privacy  # no bulky state kept

    restored = ImageClassifier.load_from_checkpoint(checkpoints["dp"])  # the same through load_from_checkpoint
    (result,) = _trainer(tmp_path).test(restored, dataloaders=_loader())
    assert result["dp/epsilon"] == pytest.approx(3.25)


def test_a_checkpoint_without_dp_state_reports_no_epsilon(checkpoints, tmp_path):
    model = ImageClassifier(**MODEL)
    trainer = _trainer(tmp_path)
    trainer.test(model, dataloaders=_loader(), ckpt_path=str(checkpoints["dp"]))
    (result,) = trainer.test(model, dataloaders=_loader(), ckpt_path=str(checkpoints["plain"]))  # forgets the 1st
    assert model.checkpoint_privacy is None
    assert "test/acc" in result and not any(k.startswith("dp/") for k in result)


@pytest.mark.parametrize("reports", [True, False])
def test_a_callback_that_reports_privacy_silences_the_module(checkpoints, tmp_path, reports):
    trainer = _trainer(tmp_path, callbacks=[_Reporter(reports)])
    (result,) = trainer.test(ImageClassifier(**MODEL), dataloaders=_loader(), ckpt_path=str(checkpoints["dp"]))
    if reports:  # only the callback's number, not an average of the two
        assert result["dp/epsilon"] == 7.0 and "dp/delta" not in result
    else:
        assert result["dp/epsilon"] == pytest.approx(3.25) and result["dp/delta"] == pytest.approx(2.5e-4)


def test_training_on_forgets_the_checkpoint_epsilon(checkpoints, tmp_path):
    """Fitting on from a DP checkpoint without DP: the weights change, so the stored epsilon no longer describes
    them."""
    model = ImageClassifier(**MODEL)
    trainer = _trainer(tmp_path, max_steps=3)
    trainer.fit(model, train_dataloaders=_loader(), ckpt_path=str(checkpoints["dp"]))
    (result,) = trainer.test(model, dataloaders=_loader())
    assert model.checkpoint_privacy is None and "dp/epsilon" not in result


def test_privacy_state_reads_only_dp_entries_with_epsilon():
    assert privacy_state({}) is None and privacy_state({"callbacks": None}) is None
    assert privacy_state({"callbacks": {"ModelCheckpoint{}": {"epsilon": 1.0}}}) is None
    assert privacy_state({"callbacks": {DP_KEY: {"steps": 0}}}) is None  # saved before any step: nothing to report
    state = privacy_state({"callbacks": {DP_KEY: {"epsilon": 1, "delta": 1e-5, "steps": 4}}})
    assert state == {"epsilon": 1.0, "delta": 1e-5, "steps": 4} and isinstance(state["epsilon"], float)
    with pytest.warns(UserWarning, match=r"epsilon='high'.*test with the DifferentialPrivacy callback"):
        assert privacy_state({"callbacks": {DP_KEY: {"epsilon": "high", "delta": 1e-5}}}) is None


def test_reporting_privacy_does_not_import_opacus():
    code = ("import sys\nfrom eqlightning.classifier import ImageClassifier, privacy_state\n"
            f"assert privacy_state({{'callbacks': {{{DP_KEY!r}: {{'epsilon': 1.0}}}}}})\n"
            "loaded = [m for m in sys.modules if m.split('.')[0] == 'opacus' or m.startswith('eqlightning.privacy')]\n"
            "assert not loaded, loaded\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
