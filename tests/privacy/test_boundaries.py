"""The privacy plugin's boundaries: non-private users never import opacus; layers import nothing from privacy; the
one private Lightning attribute the plugin relies on is still where it was (fails loudly on an upgrade)."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import lightning.pytorch as L
import torch
from torch.utils.data import DataLoader, TensorDataset

from eqlightning.privacy import _lightning

PACKAGE = Path(__file__).resolve().parents[2] / "eqlightning"


def test_importing_eqlightning_and_training_does_not_import_opacus_or_optuna():
    code = ("import sys, eqlightning, eqlightning.cli, eqlightning.models, eqlightning.nn, eqlightning.data; "
            "m = eqlightning.ImageClassifier('eq_resnet8', {'group': 'C4', 'width_multiplier': 0.5}, num_classes=2); "
            "print('opacus' in sys.modules, 'optuna' in sys.modules, 'submitit' in sys.modules)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip().splitlines()[-1] == "False False False"  # nor the study machinery


def imported_modules(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            names.add("." * node.level + (node.module or ""))
    return names


def test_layers_and_models_import_nothing_from_privacy():
    for folder in ("nn", "models"):
        for path in (PACKAGE / folder).rglob("*.py"):
            assert not [m for m in imported_modules(path) if "privacy" in m or m.startswith("opacus")], path


def test_the_callback_uses_no_private_attribute_of_another_package():
    source = (PACKAGE / "privacy" / "callback.py").read_text()
    tree = ast.parse(source)
    private = [node.attr for node in ast.walk(tree) if isinstance(node, ast.Attribute)
               and node.attr.startswith("_") and not node.attr.startswith("__")
               and not (isinstance(node.value, ast.Name) and node.value.id == "self")]
    assert private == [], private


def test_lightning_still_keeps_fit_loaders_where_the_plugin_replaces_them(tmp_path):
    """`trainer.fit(model, train_dataloaders=...)` keeps the loader in `fit_loop._data_source.instance`: if an
    upgrade moves it, this fails (and the plugin raises instead of silently training on the non-private loader)."""
    seen = {}

    class Model(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.layer = torch.nn.Linear(2, 1)

        def training_step(self, batch, batch_idx):
            seen["loader"] = self.trainer.train_dataloader
            return self.layer(batch[0]).sum()

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    class Swap(L.Callback):
        def on_fit_start(self, trainer, pl_module):
            original, install, restore = _lightning.training_loader(trainer, pl_module)
            seen["original"] = original
            install(replacement)

    data = TensorDataset(torch.randn(8, 2))
    loader, replacement = DataLoader(data, batch_size=4), DataLoader(data, batch_size=2)
    L.Trainer(max_epochs=1, callbacks=[Swap()], logger=False, enable_checkpointing=False, enable_progress_bar=False,
              enable_model_summary=False, default_root_dir=str(tmp_path)).fit(Model(), train_dataloaders=loader)
    assert seen["original"] is loader and seen["loader"] is replacement
