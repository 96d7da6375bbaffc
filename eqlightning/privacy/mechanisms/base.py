"""What a per-sample gradient mechanism is: the one thing that differs between ``hooks``, ``functorch``, ``fused``.

The engine (:mod:`eqlightning.privacy.engine`) does everything else: it watches every layer with trainable
parameters, keeps the layer's inputs, waits for the gradient of its output, scales for the loss reduction,
accumulates layers used twice in one forward, concatenates micro-batches, and leaves ``param.grad_sample`` for the
DP optimizer. A mechanism decides, per layer, how that layer's per-sample gradients are computed:

* :meth:`Mechanism.rule` returns a function ``rule(layer, inputs, grad_output) -> {param: (N, *param.shape)}``
  with the contract of :mod:`eqlightning.nn.persample` (sum-reduced loss), called by the engine when the gradient
  of the layer's output is known;
* a mechanism may instead deliver a layer's per-sample gradients itself (e.g. from inside the layer's own backward):
  :meth:`Mechanism.attach` gets a ``deliver(layer, grads, batch_size)`` callable, and :meth:`Mechanism.delivers`
  tells the engine, right after a forward, that this forward's gradients will come that way.

A new mechanism is one file in this folder with a class decorated by ``@register_mechanism("name")`` and one
import line in ``mechanisms/__init__.py``; ``tests/privacy/test_mechanisms.py`` then holds it to every property
the existing ones satisfy.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn

#: ``rule(layer, inputs, grad_output) -> {parameter: per-sample gradients}`` (sum-reduced loss)
Rule = Callable[[nn.Module, tuple, torch.Tensor], dict]
#: ``deliver(layer, grads, batch_size)``: per-sample gradients of a sum-reduced loss, handed to the engine
Deliver = Callable[[nn.Module, dict, int], None]


class Mechanism:
    """Base class: per-layer rules, optionally self-delivering layers. Stateless between attach and detach."""

    name: str = ""

    def attach(self, model: nn.Module, deliver: Deliver) -> None:
        """Prepare ``model`` (e.g. route layers through a custom backward). Default: nothing."""

    def detach(self, model: nn.Module) -> None:
        """Undo :meth:`attach`. Default: nothing."""

    def rule(self, layer: nn.Module) -> Rule:
        raise NotImplementedError

    def delivers(self, layer: nn.Module, output: torch.Tensor) -> bool:
        """Whether the forward of ``layer`` that produced ``output`` delivers its own per-sample gradients."""
        return False
