"""Loss, scores and metrics per MedMNIST task type, with ACC and AUC defined as ``medmnist.Evaluator`` does.

=========================  ======================  ===========================  ============================
task (medmnist's names)    loss                    scores                       ACC / AUC
=========================  ======================  ===========================  ============================
multi-class                cross-entropy           softmax                      argmax acc / one-vs-rest
                                                                                macro AUC
ordinal-regression         cross-entropy           softmax                      as multi-class (as MedMNIST)
binary-class               cross-entropy, 2 logits softmax, p(class 1)          p1 > 0.5 / AUC of p1
multi-label, binary-class  BCE with logits         sigmoid                      mean over labels of the
                                                                                per-label acc (p > 0.5) / AUC
=========================  ======================  ===========================  ============================
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torchmetrics import MetricCollection
from torchmetrics.classification import (BinaryAccuracy, BinaryAUROC, MulticlassAccuracy, MulticlassAUROC,
                                         MultilabelAccuracy, MultilabelAUROC)

MULTI_CLASS, BINARY, MULTI_LABEL, ORDINAL = ("multi-class", "binary-class", "multi-label, binary-class",
                                             "ordinal-regression")
TASKS = (MULTI_CLASS, BINARY, MULTI_LABEL, ORDINAL)
_ALIASES = {"multiclass": MULTI_CLASS, "binary": BINARY, "multilabel": MULTI_LABEL, "multi-label": MULTI_LABEL,
            "ordinal": ORDINAL}


def normalize_task(task: str, num_classes: int) -> str:
    """Validate a task name (medmnist's, or an alias such as 'binary') against the number of outputs."""
    task = _ALIASES.get(task, task)
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; use one of {TASKS} (medmnist.INFO[flag]['task'])")
    if task == BINARY and num_classes != 2:
        raise ValueError(f"task 'binary-class' uses 2 logits (as MedMNIST), got num_classes={num_classes}")
    if num_classes < 1 or (task in (MULTI_CLASS, ORDINAL) and num_classes < 2):
        raise ValueError(f"task {task!r} needs num_classes >= 2, got {num_classes}")
    return task


def loss_fn(task: str, logits: torch.Tensor, target: torch.Tensor, label_smoothing: float = 0.0) -> torch.Tensor:
    """Mean loss over the batch: BCE-with-logits for multi-label, cross-entropy otherwise."""
    if task == MULTI_LABEL:
        return F.binary_cross_entropy_with_logits(logits, target.float())
    return F.cross_entropy(logits, target.long().reshape(-1), label_smoothing=label_smoothing)


def scores(task: str, logits: torch.Tensor) -> torch.Tensor:
    """Class/label probabilities ``(N, num_classes)``: sigmoid for multi-label, softmax otherwise."""
    logits = logits.float()
    return torch.sigmoid(logits) if task == MULTI_LABEL else torch.softmax(logits, dim=-1)


def metric_inputs(task: str, probs: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """What the metrics of :func:`make_metrics` take: binary tasks score with p(class 1), as MedMNIST."""
    if task == MULTI_LABEL:
        return probs, target.long()
    target = target.long().reshape(-1)
    return (probs[:, -1], target) if task == BINARY else (probs, target)


def make_metrics(task: str, num_classes: int, prefix: str) -> MetricCollection:
    """``{prefix}acc`` and ``{prefix}auc`` over a whole epoch; feed them :func:`metric_inputs`."""
    if task == MULTI_LABEL:
        metrics = {"acc": MultilabelAccuracy(num_classes, threshold=0.5, average="macro"),
                   "auc": MultilabelAUROC(num_classes, average="macro")}
        return MetricCollection(metrics, prefix=prefix)
    if task == BINARY:
        return MetricCollection({"acc": BinaryAccuracy(threshold=0.5), "auc": BinaryAUROC()}, prefix=prefix)
    metrics = {"acc": MulticlassAccuracy(num_classes, average="micro"),
               "auc": MulticlassAUROC(num_classes, average="macro")}
    return MetricCollection(metrics, prefix=prefix)
