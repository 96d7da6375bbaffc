"""Width/depth/resolution scaling shared by all backbone families (EfficientNet's compound scaling)."""

from __future__ import annotations

import math


def compound_scaling(phi: float, alpha: float = 1.2, beta: float = 1.1, gamma: float = 1.15) -> tuple[float, float, float]:
    """EfficientNet compound scaling (Tan & Le, 2019): ``(depth, width, resolution)`` multipliers for ``phi``.

    depth = alpha**phi, width = beta**phi, resolution = gamma**phi, with alpha * beta**2 * gamma**2 ~ 2 so each
    unit of ``phi`` roughly doubles the FLOPs.
    """
    for name, value in (("alpha", alpha), ("beta", beta), ("gamma", gamma)):
        if value < 1:
            raise ValueError(f"compound scaling needs {name} >= 1, got {value}")
    return alpha ** phi, beta ** phi, gamma ** phi


def scale_depth(blocks: int, multiplier: float) -> int:
    """Blocks in a stage after a depth multiplier (rounded up, at least 1)."""
    return max(1, math.ceil(blocks * multiplier))


def scale_width(channels: float, multiplier: float = 1.0, divisor: int = 1, minimum: int = 1) -> int:
    """Channels (or fields) after a width multiplier, rounded to a multiple of ``divisor`` (never down >10%)."""
    value = channels * multiplier
    rounded = max(minimum, int(value + divisor / 2) // divisor * divisor)
    if rounded < 0.9 * value:
        rounded += divisor
    return int(rounded)


def scale_resolution(input_size: int, multiplier: float) -> int:
    """Input resolution after a resolution multiplier (rounded to the nearest pixel)."""
    return max(1, int(round(input_size * multiplier)))
