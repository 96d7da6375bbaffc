"""Private training with DDP on CPU (gloo), run by tests/privacy/test_ddp.py as a script.

    python tests/privacy/ddp_worker.py --out DIR --devices 2 [--strategy ddp|ddp_spawn] [--precision bf16-mixed]
        [--full-batch] [--checkpoint-every K] [--resume CKPT]

``--full-batch``: one batch of the whole data set per epoch (sampling rate 1), no noise, no clipping: the update is
then the full-batch gradient step, the same for any number of processes. ``--checkpoint-every K`` saves
``DIR/step=<K, 2K, ...>.ckpt`` (as a run killed after such a step would leave); ``--resume CKPT`` continues.

Lightning's ``ddp`` strategy re-launches this script for rank 1. Every rank writes its final parameters and the
accounting to ``DIR/rank<r>.pt``.
"""

from __future__ import annotations

import argparse
import functools
import os
import sys
from pathlib import Path

import lightning.pytorch as L
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from torch.utils.data import DataLoader, TensorDataset

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from eqlightning import ImageClassifier  # noqa: E402
from eqlightning.privacy import DifferentialPrivacy  # noqa: E402


class SyntheticData(L.LightningDataModule):
    def __init__(self, n: int = 256, batch_size: int = 32):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.x = torch.randn(n, 1, 16, 16, generator=g)
        self.y = (self.x[:, :, 4:12, 4:12].mean(dim=(1, 2, 3)) > 0).long()
        self.batch_size = batch_size

    def train_dataloader(self):
        return DataLoader(TensorDataset(self.x, self.y), batch_size=self.batch_size, shuffle=True)


class SaveResults(L.Callback):
    """Writes each rank's parameters and accounting at the end of fit (inside the workers, also for ddp_spawn)."""

    def __init__(self, out: Path):
        self.out, self.batches = out, []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.batches.append(sorted(batch[0].sum(dim=(1, 2, 3)).tolist()))

    def on_fit_end(self, trainer, pl_module):
        dp = next(c for c in trainer.callbacks if isinstance(c, DifferentialPrivacy))  # the worker's own copy
        self.out.mkdir(parents=True, exist_ok=True)
        torch.save({"params": [p.detach().clone() for p in pl_module.parameters()], "epsilon": dp.epsilon,
                    "batches": self.batches,
                    "steps": dp.ledger.steps, "sample_rate": dp.sample_rate, "noise": dp.noise_multiplier,
                    "world_size": trainer.world_size, "pid": os.getpid()}, self.out / f"rank{trainer.global_rank}.pt")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--devices", type=int, default=2)
    parser.add_argument("--strategy", default="ddp")
    parser.add_argument("--precision", default="32-true")
    parser.add_argument("--backbone", default="eq_resnet8")
    parser.add_argument("--full-batch", action="store_true")
    parser.add_argument("--checkpoint-every", type=int, default=0)
    parser.add_argument("--resume", default=None)
    parser.add_argument("--distributed-sampler", action="store_true", help="(wrongly) keep Lightning's sampler")
    args = parser.parse_args()
    torch.set_num_threads(1)
    L.seed_everything(0)
    model = ImageClassifier(args.backbone, {"group": "D4", "width_multiplier": 0.5} if args.backbone.startswith("eq")
                            else {"norm": "group", "width_multiplier": 0.125}, num_classes=2, in_channels=1,
                            task="binary-class", input_size=16,
                            optimizer=functools.partial(torch.optim.SGD, lr=0.5))
    if args.full_batch:
        dp = DifferentialPrivacy(noise_multiplier=0.0, max_grad_norm=1e6, accountant="rdp", seed=11)
    else:
        dp = DifferentialPrivacy(target_epsilon=4.0, epochs=2, accountant="rdp", seed=11)
    callbacks = [dp, SaveResults(args.out)]
    if args.checkpoint_every:
        callbacks.append(ModelCheckpoint(dirpath=args.out, every_n_train_steps=args.checkpoint_every,
                                         save_top_k=-1, filename="{step}"))
    trainer = L.Trainer(accelerator="cpu", devices=args.devices, strategy=args.strategy if args.devices > 1 else "auto",
                        max_epochs=2, callbacks=callbacks, logger=False,
                        enable_checkpointing=bool(args.checkpoint_every), enable_progress_bar=False,
                        enable_model_summary=False, use_distributed_sampler=args.distributed_sampler,
                        precision=args.precision, num_sanity_val_steps=0, limit_val_batches=0)
    data = SyntheticData(batch_size=256 if args.full_batch else 32)
    trainer.fit(model, data, ckpt_path=args.resume)


if __name__ == "__main__":
    main()
