"""The EMA of the weights: its value after known updates (De et al.'s warm-up included), swap in/out, state."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from eqlightning.privacy import WeightEMA


def test_ema_value_after_known_updates():
    layer = nn.Linear(1, 1, bias=False)
    with torch.no_grad():
        layer.weight.fill_(1.0)
    ema = WeightEMA(layer, decay=0.5)
    expected = 1.0  # the shadow starts at the initial weights
    for t, value in enumerate([3.0, -2.0, 5.0, 7.0, 0.0]):
        with torch.no_grad():
            layer.weight.fill_(value)
        ema.update()
        d = min(0.5, (1 + t) / (10 + t))  # warm-up: 0.1, 0.18, 0.25, 0.31, 0.36 (all below the decay here)
        expected = d * expected + (1 - d) * value
        assert ema.shadow[0].item() == pytest.approx(expected, rel=1e-6)
    assert ema.updates == 5
    no_warmup = WeightEMA(layer, decay=0.9, warmup=False)  # shadow 0.0 (the weight's value now)
    with torch.no_grad():
        layer.weight.fill_(10.0)
    no_warmup.update()
    assert no_warmup.shadow[0].item() == pytest.approx(0.9 * 0.0 + 0.1 * 10.0)


def test_swap_in_and_out_restore_the_raw_weights_and_state_round_trips():
    layer = nn.Linear(2, 2)
    ema = WeightEMA(layer, decay=0.9)
    with torch.no_grad():
        layer.weight.add_(1.0)
    ema.update()
    raw = layer.weight.detach().clone()
    ema.swap_in()
    assert torch.equal(layer.weight, ema.shadow[0])
    ema.swap_out()
    assert torch.equal(layer.weight, raw)
    clone = WeightEMA(nn.Linear(2, 2), decay=0.9)
    clone.load_state_dict(ema.state_dict())
    assert clone.updates == 1 and all(torch.equal(a, b) for a, b in zip(clone.shadow, ema.shadow))
    with pytest.raises(ValueError, match="another model"):
        WeightEMA(nn.Linear(2, 2, bias=False), 0.9).load_state_dict(ema.state_dict())
