"""L-infinity adversarial attacks (FGSM, PGD) that maximise a loss, with the radius in grey levels.

``eps`` and ``step_size`` are in pixel units: grey levels of the 0..255 image. ``pixel_scale`` converts them to the
model's input space; the default ``2 / 255`` is eqlightning's normalisation (:func:`eqlightning.data.medmnist.
normalize` maps [0, 255] to [-1, 1]), so ``eps=2`` is a radius of ``4 / 255`` there. Attacked images are clamped to
``bounds`` (default ``(-1, 1)``, the valid range after normalisation; ``None`` for no clamping).

The functions work outside Lightning and inside ``torch.inference_mode()`` (they switch it off and clone their
inputs). Gradients are taken with respect to the input only (``torch.autograd.grad``): no ``.grad`` is written to
the model's parameters. The model is used in whatever mode it is in; call ``model.eval()`` first.
"""

from __future__ import annotations

import math
from typing import Callable

import torch

#: One grey level in eqlightning's normalised space ([0, 255] -> [-1, 1]).
PIXEL_SCALE = 2 / 255
#: The valid range of normalised images.
BOUNDS = (-1.0, 1.0)


def _real(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def check_attack_args(eps, steps=1, step_size=None, pixel_scale=PIXEL_SCALE, bounds=BOUNDS, where="attack") -> None:
    """Raise ValueError with the fix for a bad radius, number of steps, step size, pixel scale or bounds."""
    if not (_real(eps) and eps >= 0):
        raise ValueError(f"{where}: eps must be a finite radius >= 0 in grey levels (0-255), got {eps!r}")
    if not (isinstance(steps, int) and not isinstance(steps, bool) and steps >= 1):
        raise ValueError(f"{where}: steps must be an integer >= 1, got {steps!r}")
    if step_size is not None and not (_real(step_size) and step_size > 0):
        raise ValueError(f"{where}: step_size must be > 0 in grey levels (or None for 2.5 * eps / steps), got "
                         f"{step_size!r}")
    if not (_real(pixel_scale) and pixel_scale > 0):
        raise ValueError(f"{where}: pixel_scale (input units per grey level, 2/255 for eqlightning's "
                         f"normalisation) must be > 0, got {pixel_scale!r}")
    if bounds is not None:
        ok = isinstance(bounds, (tuple, list)) and len(bounds) == 2 and all(_real(b) for b in bounds)
        if not (ok and bounds[0] < bounds[1]):
            raise ValueError(f"{where}: bounds must be (low, high) with low < high, or None, got {bounds!r}")


def _input_gradient(model_fn: Callable, loss_fn: Callable, x: torch.Tensor, y) -> torch.Tensor:
    x = x.detach().requires_grad_(True)
    logits = model_fn(x)
    if not (isinstance(logits, torch.Tensor) and logits.requires_grad):
        raise RuntimeError("attack: the model's output does not depend on its input through autograd (was it run "
                           "under torch.no_grad(), or does it detach?); the attack needs the input gradient")
    # the sum over the batch instead of the mean: same signs, no underflow in half precision
    loss = loss_fn(logits, y) * x.shape[0]
    (grad,) = torch.autograd.grad(loss, x)
    return grad


def _clone(y):
    return y.clone() if isinstance(y, torch.Tensor) else y


def pgd(model_fn: Callable[[torch.Tensor], torch.Tensor], loss_fn: Callable, x: torch.Tensor, y, eps: float, *,
        steps: int = 10, step_size: float | None = None, random_start: bool = True,
        pixel_scale: float = PIXEL_SCALE, bounds: tuple[float, float] | None = BOUNDS,
        generator: torch.Generator | None = None) -> torch.Tensor:
    """Projected gradient ascent of ``loss_fn(model_fn(x'), y)`` over the L-infinity ball of radius ``eps`` around
    ``x`` intersected with ``bounds``: ``x' <- clip(x' + step_size * sign(grad))``, ``steps`` times.

    Args:
        model_fn: images -> logits (e.g. the model in eval mode).
        loss_fn: ``(logits, y) -> scalar`` mean loss, e.g. ``lambda z, t: eqlightning.tasks.loss_fn(task, z, t)``.
        x, y: a batch of images and its labels.
        eps: L-infinity radius in grey levels (0-255).
        steps: gradient steps.
        step_size: in grey levels; default ``2.5 * eps / steps`` (Madry et al.).
        random_start: start from a uniform point of the ball instead of ``x``.
        pixel_scale: input units per grey level (``2 / 255`` for eqlightning's normalisation).
        bounds: the valid input range ``(low, high)``, or None.
        generator: random generator for the start (on ``x``'s device).

    Returns: the attacked images (detached, same shape and dtype as ``x``).
    """
    check_attack_args(eps, steps, step_size, pixel_scale, bounds, where="pgd")
    radius = eps * pixel_scale
    step = (2.5 * eps / steps if step_size is None else step_size) * pixel_scale
    with torch.inference_mode(False), torch.enable_grad():
        x0, y = x.detach().clone(), _clone(y)  # inference tensors cannot be saved for backward
        low, high = x0 - radius, x0 + radius

        def project(z: torch.Tensor) -> torch.Tensor:
            z = torch.clamp(z, min=low, max=high)
            return z if bounds is None else z.clamp(bounds[0], bounds[1])

        x_adv = x0.clone()
        if random_start and radius > 0:
            noise = torch.rand(x0.shape, generator=generator, device=x0.device, dtype=x0.dtype)
            x_adv = project(x0 + (2 * noise - 1) * radius)
        for _ in range(steps):
            grad = _input_gradient(model_fn, loss_fn, x_adv, y)
            x_adv = project(x_adv.detach() + step * grad.sign())
    return x_adv.detach()


def fgsm(model_fn: Callable[[torch.Tensor], torch.Tensor], loss_fn: Callable, x: torch.Tensor, y, eps: float, *,
         pixel_scale: float = PIXEL_SCALE, bounds: tuple[float, float] | None = BOUNDS) -> torch.Tensor:
    """Fast gradient sign method: ``clip(x + eps * sign(grad_x loss_fn(model_fn(x), y)))``, ``eps`` in grey levels
    (see :func:`pgd` for the arguments). Returns the attacked images (detached)."""
    check_attack_args(eps, pixel_scale=pixel_scale, bounds=bounds, where="fgsm")
    radius = eps * pixel_scale
    with torch.inference_mode(False), torch.enable_grad():
        x0, y = x.detach().clone(), _clone(y)
        x_adv = x0 + radius * _input_gradient(model_fn, loss_fn, x0, y).sign()
        if bounds is not None:
            x_adv = x_adv.clamp(bounds[0], bounds[1])
    return x_adv.detach()
