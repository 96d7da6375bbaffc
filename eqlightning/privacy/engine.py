"""The per-sample gradient engine: one way to make a model, its optimizer and its loader private.

    from eqlightning.privacy.engine import make_private
    private = make_private(model, optimizer, loader, noise_multiplier=1.0, max_grad_norm=1.0)
    for x, y in private.loader:                      # Poisson-sampled batches
        private.optimizer.zero_grad()
        loss_fn(model(x), y).backward()              # per-sample gradients land on every parameter
        private.optimizer.step()                     # clip each, sum, add N(0, (sigma C)^2), divide by E[batch]
    private.detach()                                 # the model is as it was (hooks and attributes removed)

The ``DifferentialPrivacy`` callback, the benchmarks and code outside Lightning all use it. What the engine does
for every layer with trainable parameters, whatever the mechanism:

* on forward (training mode, grad enabled): keep the inputs, count the use of each parameter, and hook the
  output's gradient; a mechanism may say the layer delivers its per-sample gradients itself (``fused``);
* when the output's gradient arrives: run the mechanism's rule for the layer (sum-reduced semantics), scale by the
  batch size for a mean-reduced loss, and add into the parameter's current per-sample gradient (a layer used
  twice in one forward contributes twice);
* when a parameter's last use in that forward is done: append the result to ``param.grad_sample`` (a list: one
  tensor per forward; micro-batches of one logical batch concatenate). A second forward before the optimizer step
  is an error unless accumulation was allowed (Poisson sampling needs one step per batch).

The optimizer is :func:`~eqlightning.privacy.optimizer.make_private_optimizer` (Opacus's DP optimizers, which read
``param.grad_sample``: the public interface between per-sample gradients and clipping in Opacus).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import partial

import torch
from torch import nn
from torch.utils.data import DataLoader

from .mechanisms import Mechanism, create_mechanism
from .optimizer import make_private_optimizer
from .sampling import poisson_loader, shuffled_loader


class PerSampleGradients:
    """Attach a mechanism to ``model``: after each backward, every trainable parameter ``p`` holds
    ``p.grad_sample``, a list with one ``(N, *p.shape)`` tensor per forward since the last optimizer step."""

    def __init__(self, model: nn.Module, mechanism: str | Mechanism = "fused", *, loss_reduction: str = "mean",
                 allow_accumulation: bool = False):
        if loss_reduction not in ("mean", "sum"):
            raise ValueError(f"loss_reduction must be 'mean' or 'sum', got {loss_reduction!r}")
        self.model = model
        self.mechanism = create_mechanism(mechanism) if isinstance(mechanism, str) else mechanism
        self.loss_reduction, self.allow_accumulation = loss_reduction, allow_accumulation
        self.params = [p for p in model.parameters() if p.requires_grad]
        self._uses: dict[nn.Parameter, int] = {}  # pending uses of each parameter in the current forward
        self._current: dict[nn.Parameter, torch.Tensor] = {}  # their per-sample gradients so far
        self._in_rule = False  # a rule may run the layer's forward again (functorch): not a training forward
        self.mechanism.attach(model, self._deliver)
        self._handles = []
        for module in model.modules():
            own = [p for p in module.parameters(recurse=False) if p.requires_grad]
            if own:
                self._handles.append(module.register_forward_hook(
                    partial(self._after_forward, own=own, rule=self.mechanism.rule(module))))

    # ------------------------------------------------------------------ hooks
    def _after_forward(self, module: nn.Module, inputs: tuple, output, *, own: list, rule) -> None:
        if self._in_rule or not (module.training and torch.is_grad_enabled()):
            return
        for p in own:
            self._uses[p] = self._uses.get(p, 0) + 1
        if self.mechanism.delivers(module, output):
            return
        if not isinstance(output, torch.Tensor):
            raise TypeError(f"per-sample gradients need {type(module).__name__} to return one tensor, got "
                            f"{type(output).__name__}: give it a per_sample_gradients rule on its parent, or use "
                            "the functorch mechanism on a module that does")
        if not output.requires_grad:
            return
        saved = tuple(x.detach() if isinstance(x, torch.Tensor) else x for x in inputs)
        output.register_hook(partial(self._on_grad_output, module=module, inputs=saved, rule=rule))

    def _on_grad_output(self, grad_output: torch.Tensor, *, module: nn.Module, inputs: tuple, rule) -> None:
        if grad_output.shape[0] == 0:  # an empty Poisson batch: no sample, no rule to run
            grads = {p: p.new_zeros(0, *p.shape) for p in module.parameters(recurse=False) if p.requires_grad}
        else:
            self._in_rule = True
            try:
                grads = rule(module, inputs, grad_output.detach())
            finally:
                self._in_rule = False
        self._deliver(module, grads, grad_output.shape[0])

    def _deliver(self, module: nn.Module, grads: dict, batch_size: int) -> None:
        scale = batch_size if self.loss_reduction == "mean" else 1
        for p in module.parameters(recurse=False):
            if not p.requires_grad or p not in self._uses:
                continue
            g = grads.get(p)
            if g is not None:
                g = g * scale if scale != 1 else g
                self._current[p] = g if p not in self._current else self._current[p] + g
            self._uses[p] -= 1
            if self._uses[p] == 0:
                del self._uses[p]
                self._promote(p)

    def _promote(self, p: nn.Parameter) -> None:
        g = self._current.pop(p, None)
        if g is None:
            return
        samples = getattr(p, "grad_sample", None)
        if samples is None:
            p.grad_sample = [g]
        elif not self.allow_accumulation:
            raise ValueError("Poisson sampling allows one forward/backward per optimizer step: call "
                             "optimizer.step() after every batch, or split large batches with "
                             "DifferentialPrivacy(max_physical_batch_size=...)")
        else:
            samples.append(g)

    # ---------------------------------------------------------------- cleanup
    def detach(self) -> None:
        """Remove the hooks and every attribute the engine or the optimizer left on the parameters."""
        for handle in self._handles:
            handle.remove()
        self._handles = []
        self.mechanism.detach(self.model)
        self._uses.clear()
        self._current.clear()
        for p in self.model.parameters():
            for name in ("grad_sample", "summed_grad"):
                if hasattr(p, name):
                    delattr(p, name)


@dataclass
class PrivateTraining:
    """What :func:`make_private` returns: the same model (hooked), the private optimizer, the Poisson loader."""

    module: nn.Module
    optimizer: torch.optim.Optimizer
    loader: DataLoader | None
    sample_rate: float | None
    grad_samples: PerSampleGradients = field(repr=False)

    def detach(self) -> None:
        self.grad_samples.detach()


def make_private(module: nn.Module, optimizer: torch.optim.Optimizer, loader: DataLoader | None = None, *,
                 noise_multiplier: float, max_grad_norm: float, mechanism: str | Mechanism = "fused",
                 expected_batch_size: float | None = None, distributed: bool = False, world_size: int = 1,
                 augmult: int = 1, max_physical_batch_size: int | None = None, grad_scale=None,
                 noise_generator: torch.Generator | None = None, seed: int = 0, rank: int = 0,
                 poisson_sampling: bool = True) -> PrivateTraining:
    """Make one training setup private.

    ``loader`` (optional) is replaced by a Poisson-sampled loader at rate ``q = 1 / len(loader)`` over its dataset
    (with ``augmult`` adjacent views per sample and physical batches of at most ``max_physical_batch_size``); the
    expected batch size is then ``q * len(dataset) / world_size`` per process. Without a loader give
    ``expected_batch_size``. The sampling streams are seeded by ``(seed, rank, epoch)`` (see
    :mod:`~eqlightning.privacy.sampling`); the noise comes from ``noise_generator`` (default: the global RNG).
    ``module`` is the module whose forward runs (the DDP-wrapped one under DDP); the optimizer is the distributed DP
    optimizer when ``distributed``.
    """
    private_loader, sample_rate = None, None
    if loader is not None:
        if poisson_sampling:
            private_loader, sample_rate = poisson_loader(loader, seed=seed, rank=rank, world_size=world_size,
                                                         views=augmult, max_physical=max_physical_batch_size)
        else:
            private_loader, sample_rate = shuffled_loader(loader, views=augmult,
                                                          max_physical=max_physical_batch_size), 1.0 / len(loader)
        expected_batch_size = sample_rate * len(loader.dataset) / world_size
    if expected_batch_size is None:
        raise ValueError("make_private needs the training loader or expected_batch_size (E[batch] per process)")
    grad_samples = PerSampleGradients(module, mechanism, allow_accumulation=max_physical_batch_size is not None)
    private_optimizer = make_private_optimizer(optimizer, distributed=distributed, noise_multiplier=noise_multiplier,
                                               max_grad_norm=max_grad_norm, expected_batch_size=expected_batch_size,
                                               views=augmult, grad_scale=grad_scale, generator=noise_generator)
    return PrivateTraining(module, private_optimizer, private_loader, sample_rate, grad_samples)
