"""``LastCheckpoint``: ``checkpoints/last.ckpt`` always holds the newest state of the run.

Lightning's ``ModelCheckpoint(save_last=True)`` (2.6) rewrites ``last.ckpt`` only when it also saves a top-k
checkpoint, so with a monitored metric ``last.ckpt`` can be many epochs old. This callback saves it

- at the end of every training epoch (after validation and after every other callback's epoch-end work, so the
  privacy ledger and the sampler state are those of the finished epoch),
- when training ends for any reason Lightning handles as an end: ``max_epochs``/``max_steps``, ``max_time``,
  early stopping, the privacy budget,
- on SIGTERM (a scheduler's preemption, ``scancel``, ``timeout``): Lightning stops at the end of the current batch
  and this saves that state, mid-epoch, before the process exits. Resuming from it continues with the next batch.

It does not save after other exceptions or Ctrl-C: the state may then be half way through a step, and the previous
``last.ckpt`` is the one to resume from. Lightning writes checkpoints through a temporary file, so a ``kill -9``
during a save leaves the previous ``last.ckpt`` intact.
"""

from __future__ import annotations

from pathlib import Path

from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.callbacks import Checkpoint
from lightning.pytorch.utilities.exceptions import SIGTERMException

LAST = "last.ckpt"


class LastCheckpoint(Checkpoint):
    """Keep ``<dirpath>/last.ckpt`` equal to the newest state of the run (see the module docstring)."""

    def __init__(self, dirpath: str | Path):
        self.dirpath = Path(dirpath)
        self._saved_at: int | None = None
        self.saves = 0

    @property
    def path(self) -> Path:
        return self.dirpath / LAST

    @property
    def state_key(self) -> str:
        return f"LastCheckpoint[{self.dirpath.name}]"

    def on_train_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._save(trainer)

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._save(trainer)

    def on_exception(self, trainer: Trainer, pl_module: LightningModule, exception: BaseException) -> None:
        if isinstance(exception, SIGTERMException):  # raised by Lightning at a batch boundary: a consistent state
            self._save(trainer)

    def _save(self, trainer: Trainer) -> None:
        if trainer.fast_dev_run or trainer.sanity_checking:
            return
        batches = trainer.fit_loop.epoch_loop.batch_progress.total.completed  # training batches so far
        if batches == self._saved_at or batches == 0:
            return
        trainer.save_checkpoint(str(self.path))
        self._saved_at = batches
        self.saves += 1
