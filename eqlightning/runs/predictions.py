"""``PredictionWriter``: ``predict`` writes ``predictions.csv`` into the run directory.

One row per image, in the order of the predicted split: ``index`` (position in that split), ``split``, the label(s)
when the batches carry them (``label``; ``label_<j>`` per label for multi-label tasks), one score per class
(``score_<j>``: softmax probabilities; sigmoid per label for multi-label) and the prediction (``pred``: argmax, or
``p(class 1) > 0.5`` for binary tasks as MedMNIST scores them; ``pred_<j>`` per label for multi-label).
"""

from __future__ import annotations

import csv
import os
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch import Callback, LightningModule, Trainer

from .. import tasks

PREDICTIONS_FILE = "predictions.csv"


class PredictionWriter(Callback):
    """Collect ``predict_step``'s scores (plus the batch labels) and write them as CSV at the end of ``predict``.

    Args:
        path: the CSV file. Under several processes each rank writes ``<stem>.rank<r>.csv`` with its share.
        split: written in the ``split`` column; default the data module's ``predict_split`` (else ``"test"``).
    """

    def __init__(self, path: str | Path, split: str | None = None):
        self.path, self.split = Path(path), split
        self._scores: list[torch.Tensor] = []
        self._labels: list[torch.Tensor | None] = []
        self.rows = 0
        self.written: Path | None = None

    def on_predict_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._scores, self._labels = [], []

    def on_predict_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any,
                             batch_idx: int, dataloader_idx: int = 0) -> None:
        if not isinstance(outputs, torch.Tensor):
            raise TypeError(f"PredictionWriter needs predict_step to return a tensor of scores (N, classes), got "
                            f"{type(outputs).__name__}")
        self._scores.append(outputs.detach().float().cpu())
        label = batch[1] if isinstance(batch, (tuple, list)) and len(batch) > 1 else None
        self._labels.append(label.detach().cpu() if isinstance(label, torch.Tensor) else None)

    def on_predict_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        path = self.path if trainer.world_size == 1 else \
            self.path.with_name(f"{self.path.stem}.rank{trainer.global_rank}{self.path.suffix}")
        split = self.split or getattr(trainer.datamodule, "predict_split", None) or "test"
        task = getattr(pl_module, "task", tasks.MULTI_CLASS)
        self.rows = write_predictions(path, task, self._scores, self._labels, split)
        self.written = path
        self._scores, self._labels = [], []


def write_predictions(path: str | Path, task: str, scores: list[torch.Tensor], labels: list[torch.Tensor | None],
                      split: str) -> int:
    """Write the CSV described in the module docstring; returns the number of rows."""
    path = Path(path)
    score = torch.cat(scores) if scores else torch.zeros(0, 0)
    has_labels = bool(labels) and all(label is not None for label in labels)
    label = torch.cat([lb.reshape(len(s), -1) for lb, s in zip(labels, scores)]) if has_labels else None
    classes = score.shape[1] if score.ndim == 2 else 0
    multilabel = task == tasks.MULTI_LABEL
    if multilabel:
        pred = (score > 0.5).long()
    elif task == tasks.BINARY:
        pred = (score[:, -1] > 0.5).long().unsqueeze(1)
    else:
        pred = score.argmax(dim=1, keepdim=True)
    header = ["index", "split"]
    if label is not None:
        header += [f"label_{j}" for j in range(label.shape[1])] if multilabel else ["label"]
    header += [f"score_{j}" for j in range(classes)]
    header += [f"pred_{j}" for j in range(classes)] if multilabel else ["pred"]
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    with open(tmp, "w", newline="") as file:
        writer = csv.writer(file)
        writer.writerow(header)
        for i in range(len(score)):
            row: list[Any] = [i, split]
            if label is not None:
                row += label[i].long().tolist() if multilabel else [int(label[i, 0])]
            row += [f"{v:.6g}" for v in score[i].tolist()]
            row += pred[i].tolist()
            writer.writerow(row)
    os.replace(tmp, path)
    return len(score)
