"""Every registered backbone under a multi-process strategy, run by tests/test_strategies.py as a script.

    python tests/strategy_worker.py --out DIR --strategy ddp|ddp_spawn [--private]

One LightningModule holds a small version of every 2D backbone and of the 3D ones in ``DDP_3D``
(tests/small_backbones.py) and trains them together (the loss is the sum of their losses; 2D nets see images, 3D
nets volumes), so one 2-process launch covers the registry. Each rank writes its
final parameters to ``DIR/rank<r>.pt``.
"""

from __future__ import annotations

import argparse
import functools
import os
import sys
from pathlib import Path

import lightning.pytorch as L
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from small_backbones import ALL, DDP_3D, small_backbone, small_backbone3d  # noqa: E402


class AllBackbones(L.LightningModule):
    def __init__(self, optimizer=functools.partial(torch.optim.SGD, lr=0.05)):
        super().__init__()
        self.backbones = nn.ModuleDict({name: small_backbone(name) for name in ALL})
        self.volume_backbones = nn.ModuleDict({name: small_backbone3d(name) for name in DDP_3D})
        self.optimizer = optimizer
        g = torch.Generator().manual_seed(0)
        self.data = TensorDataset(torch.randn(64, 1, 28, 28, generator=g), torch.randn(64, 1, 8, 8, 8, generator=g),
                                  torch.randint(0, 2, (64,), generator=g))

    def training_step(self, batch, batch_idx):
        x, volumes, y = batch
        return (sum(F.cross_entropy(net(x).float(), y) for net in self.backbones.values())
                + sum(F.cross_entropy(net(volumes).float(), y) for net in self.volume_backbones.values()))

    def configure_optimizers(self):
        return self.optimizer(self.parameters())

    def train_dataloader(self):
        return DataLoader(self.data, batch_size=16, shuffle=True)


class SaveResults(L.Callback):
    def __init__(self, out: Path):
        self.out = out

    def on_fit_end(self, trainer, pl_module):
        dp = next((c for c in trainer.callbacks if type(c).__name__ == "DifferentialPrivacy"), None)
        self.out.mkdir(parents=True, exist_ok=True)
        torch.save({"params": {k: v.detach().clone() for k, v in pl_module.named_parameters()},
                    "world_size": trainer.world_size, "pid": os.getpid(), "strategy": type(trainer.strategy).__name__,
                    "epsilon": None if dp is None else dp.epsilon, "steps": trainer.global_step,
                    "dp_steps": None if dp is None else dp.ledger.steps},
                   self.out / f"rank{trainer.global_rank}.pt")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--strategy", default="ddp")
    parser.add_argument("--private", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(1)
    L.seed_everything(0)
    model = AllBackbones()
    if os.environ.get("LOCAL_RANK", "0") == "0":  # the launching process (ddp re-runs this script for rank 1)
        torch.save({k: v.detach().clone() for k, v in model.named_parameters()}, args.out / "initial.pt")
    callbacks = [SaveResults(args.out)]
    if args.private:
        from eqlightning.privacy import DifferentialPrivacy
        callbacks.insert(0, DifferentialPrivacy(noise_multiplier=0.8, accountant="rdp", seed=5))
    trainer = L.Trainer(accelerator="cpu", devices=2, strategy=args.strategy, max_epochs=2, callbacks=callbacks,
                        logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, use_distributed_sampler=not args.private,
                        num_sanity_val_steps=0)
    trainer.fit(model)


if __name__ == "__main__":
    main()
