"""Exponential moving average of the weights, evaluated in place of the raw weights (De et al. 2022).

The average is a function of the released (noised) parameters only, so it costs no privacy.
"""

from __future__ import annotations

import torch
from torch import nn


class WeightEMA:
    """``shadow = d * shadow + (1 - d) * param`` after every optimizer step, with De et al.'s warm-up
    ``d_t = min(decay, (1 + t) / (10 + t))`` so early averages are not dominated by the initialisation."""

    def __init__(self, module: nn.Module, decay: float, warmup: bool = True):
        self.decay, self.warmup = float(decay), warmup
        named = [(n, p) for n, p in module.named_parameters() if p.requires_grad]
        self.names = [n for n, _ in named]  # saved with the shadow, so the weights can be matched without us
        self._params = [p for _, p in named]
        self.shadow = [p.detach().clone() for p in self._params]
        self.updates = 0
        self._backup: list | None = None

    @torch.no_grad()
    def update(self) -> None:
        t = self.updates
        d = min(self.decay, (1 + t) / (10 + t)) if self.warmup else self.decay
        torch._foreach_mul_(self.shadow, d)
        torch._foreach_add_(self.shadow, [p.detach() for p in self._params], alpha=1 - d)
        self.updates += 1

    @torch.no_grad()
    def swap_in(self) -> None:
        """Put the averaged weights into the module (keeps the raw ones until :meth:`swap_out`)."""
        if self._backup is None:
            self._backup = [p.detach().clone() for p in self._params]
            for p, s in zip(self._params, self.shadow):
                p.copy_(s)

    @torch.no_grad()
    def swap_out(self) -> None:
        if self._backup is not None:
            for p, b in zip(self._params, self._backup):
                p.copy_(b)
            self._backup = None

    def state_dict(self) -> dict:
        return {"decay": self.decay, "warmup": self.warmup, "updates": self.updates, "names": list(self.names),
                "shadow": [s.detach().cpu().clone() for s in self.shadow]}

    def load_state_dict(self, state: dict) -> None:
        if len(state["shadow"]) != len(self.shadow):
            raise ValueError(f"EMA state holds {len(state['shadow'])} tensors, the model {len(self.shadow)}: the "
                             "checkpoint belongs to another model")
        self.updates = int(state["updates"])
        for s, saved in zip(self.shadow, state["shadow"]):
            s.copy_(saved)
