"""Parameter and FLOP counts of a backbone at a given input size."""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode


@dataclass(frozen=True)
class Profile:
    parameters: int
    flops: int  # forward FLOPs for one image (a multiply-add counts as 2), eval mode
    input_size: int
    in_channels: int

    def as_dict(self) -> dict:
        return asdict(self)


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


@torch.no_grad()
def profile_backbone(model: nn.Module, input_size: int, in_channels: int) -> Profile:
    """Count trainable parameters and forward FLOPs (``torch.utils.flop_counter``) for one image (or volume, for a
    backbone with ``dims == 3``).

    Counted in eval mode, where an equivariant layer's filter is already expanded (as after ``export()``), so the
    numbers are those of the convolutions themselves.
    """
    was_training = model.training
    model.eval()
    param = next(model.parameters(), None)
    dims = getattr(model, "dims", 2)  # set by create_backbone from the registry entry (3 for volumes)
    x = torch.zeros(1, in_channels, *(input_size,) * dims, device=param.device if param is not None else "cpu")
    model(x)  # warm the eval-mode filter caches so the expansion is not counted
    counter = FlopCounterMode(display=False)
    with counter:
        model(x)
    model.train(was_training)
    return Profile(count_parameters(model), int(counter.get_total_flops()), input_size, in_channels)
