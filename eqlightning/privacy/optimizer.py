"""Opacus's DP optimizers with two additions the training recipe needs.

* Augmentation multiplicity (De et al. 2022): a batch holds ``views`` augmented copies of each sample, adjacent.
  Their per-sample gradients are averaged *before* clipping, so each sample still contributes at most
  ``max_grad_norm`` and the sensitivity (and the accounting) is that of one view per sample.
* Loss scaling (fp16 mixed precision): per-sample gradients are computed from the scaled loss; they are divided by
  the scale before clipping so that the clipping bound applies to the true gradients.
"""

from __future__ import annotations

from typing import Callable

import torch
from opacus.optimizers import DistributedDPOptimizer, DPOptimizer


class _RecipeMixin:
    views: int = 1
    grad_scale: Callable[[], float] | None = None

    def _merge_views_and_unscale(self) -> None:
        scale = self.grad_scale() if self.grad_scale is not None else 1.0
        for p in self.params:
            if getattr(p, "grad_sample", None) is None:
                continue
            g = p.grad_sample  # one tensor per forward (the engine's list), or one tensor
            g = torch.cat(g, dim=0) if isinstance(g, list) else g  # (N * views, *p.shape)
            if self.views > 1:
                if g.shape[0] % self.views:
                    raise RuntimeError(f"a batch of {g.shape[0]} rows cannot hold {self.views} views per sample; "
                                       "the training loader must repeat each index `augmult` times")
                g = g.reshape(g.shape[0] // self.views, self.views, *g.shape[1:]).mean(dim=1)
            if scale != 1.0:
                g = g / scale
            p.grad_sample = g

    def clip_and_accumulate(self) -> None:
        self._merge_views_and_unscale()
        super().clip_and_accumulate()


class PrivateOptimizer(_RecipeMixin, DPOptimizer):
    """Single-process DP-SGD step: clip per-sample gradients, sum, add N(0, (sigma C)^2), divide by E[batch]."""


class DistributedPrivateOptimizer(_RecipeMixin, DistributedDPOptimizer):
    """DDP: every rank clips its samples, rank 0 adds the noise, the sum is all-reduced (Opacus semantics)."""


def make_private_optimizer(optimizer: torch.optim.Optimizer, *, distributed: bool, noise_multiplier: float,
                           max_grad_norm: float, expected_batch_size: float, views: int = 1,
                           grad_scale: Callable[[], float] | None = None,
                           generator: torch.Generator | None = None) -> DPOptimizer:
    """Wrap ``optimizer`` (its param groups and LR schedulers keep working on the original)."""
    cls = DistributedPrivateOptimizer if distributed else PrivateOptimizer
    private = cls(optimizer, noise_multiplier=noise_multiplier, max_grad_norm=max_grad_norm,
                  expected_batch_size=expected_batch_size, loss_reduction="mean", generator=generator)
    private.views, private.grad_scale = int(views), grad_scale
    return private
