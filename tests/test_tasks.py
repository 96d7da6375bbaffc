"""ACC and AUC are defined as MedMNIST defines them: compared with medmnist's own evaluator on the same scores."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from medmnist.evaluator import Evaluator, getACC, getAUC

from eqlightning import tasks


def our_metrics(task: str, logits: torch.Tensor, target: torch.Tensor, num_classes: int, batches: int = 3):
    metrics = tasks.make_metrics(task, num_classes, prefix="")
    probs = tasks.scores(task, logits)
    for p, y in zip(probs.chunk(batches), target.chunk(batches)):  # accumulated over batches like an epoch
        metrics.update(*tasks.metric_inputs(task, p, y))
    out = metrics.compute()
    return out["acc"].item(), out["auc"].item(), probs.numpy()


@pytest.mark.parametrize("task,num_classes", [(tasks.BINARY, 2), (tasks.MULTI_CLASS, 9), (tasks.ORDINAL, 5),
                                              (tasks.MULTI_LABEL, 14)])
def test_metrics_match_medmnist_functions(task, num_classes):
    g = torch.Generator().manual_seed(1)
    n = 301
    logits = torch.randn(n, num_classes, generator=g) * 2
    if task == tasks.MULTI_LABEL:
        target = (torch.rand(n, num_classes, generator=g) < 0.3).float()
        y_true = target.numpy()
    else:
        target = torch.randint(num_classes, (n,), generator=g)
        logits[torch.arange(n), target] += 1.0  # better than chance
        y_true = target.numpy()[:, None]
    acc, auc, probs = our_metrics(task, logits, target, num_classes)
    assert acc == pytest.approx(getACC(y_true, probs, task), abs=1e-6)
    assert auc == pytest.approx(getAUC(y_true, probs, task), abs=1e-5)


@pytest.mark.parametrize("flag,num_classes", [("breastmnist", 2), ("retinamnist", 5), ("pneumoniamnist", 2)])
def test_metrics_match_medmnist_evaluator_on_real_test_labels(medmnist_root, flag, num_classes):
    evaluator = Evaluator(flag, "test", size=28, root=str(medmnist_root))
    task = evaluator.info["task"]
    labels = torch.as_tensor(evaluator.labels[:, 0]).long()
    g = torch.Generator().manual_seed(2)
    logits = torch.randn(len(labels), num_classes, generator=g)
    logits[torch.arange(len(labels)), labels] += 0.8
    acc, auc, probs = our_metrics(task, logits, labels, num_classes, batches=5)
    expected_auc, expected_acc = evaluator.evaluate(probs)
    assert acc == pytest.approx(expected_acc, abs=1e-6)
    assert auc == pytest.approx(expected_auc, abs=1e-5)


def test_losses_follow_the_task():
    logits = torch.randn(4, 3, requires_grad=True)
    ce = tasks.loss_fn(tasks.MULTI_CLASS, logits, torch.tensor([0, 1, 2, 1]))
    torch.testing.assert_close(ce, torch.nn.functional.cross_entropy(logits, torch.tensor([0, 1, 2, 1])))
    target = torch.tensor([[1.0, 0, 1], [0, 0, 0], [1, 1, 1], [0, 1, 0]])
    bce = tasks.loss_fn(tasks.MULTI_LABEL, logits, target)
    torch.testing.assert_close(bce, torch.nn.functional.binary_cross_entropy_with_logits(logits, target))
    assert np.allclose(tasks.scores(tasks.MULTI_LABEL, logits).detach(), torch.sigmoid(logits).detach())


def test_task_validation():
    assert tasks.normalize_task("binary", 2) == tasks.BINARY
    with pytest.raises(ValueError, match="2 logits"):
        tasks.normalize_task("binary-class", 1)
    with pytest.raises(ValueError, match="unknown task"):
        tasks.normalize_task("regression", 1)
