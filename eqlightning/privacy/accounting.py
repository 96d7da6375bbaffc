"""Privacy accounting for DP-SGD: noise calibration, epsilon after each step, the step budget, checkpointable state.

Every number comes from Opacus's accountants (``prv``: privacy random variables, upper bound; ``rdp``: Renyi DP;
``gdp``: Gaussian DP, asymptotic). They assume **Poisson sampling** with rate ``q`` and the Gaussian mechanism with
noise multiplier ``sigma`` at every step; the plugin enforces the sampling.

Opacus recomputes the whole RDP curve on every ``get_epsilon`` (~160 ms here), too slow to ask at each training
step. The RDP of ``s`` identical steps is ``s`` times that of one step, so the ledger caches the one-step curve per
``(sigma, q)`` and converts with Opacus's own ``get_privacy_spent``: the same value, in microseconds. PRV has no
such shortcut (~0.5-1 s per call); :meth:`PrivacyLedger.epsilon` caches its results by step count.
"""

from __future__ import annotations

import math
from functools import lru_cache

from opacus.accountants import create_accountant
from opacus.accountants.analysis import gdp as gdp_analysis
from opacus.accountants.analysis import rdp as rdp_analysis
from opacus.accountants.rdp import RDPAccountant
from opacus.accountants.utils import get_noise_multiplier

ACCOUNTANTS = ("prv", "rdp", "gdp")


@lru_cache(maxsize=64)
def _rdp_one_step(noise_multiplier: float, sample_rate: float) -> tuple:
    return tuple(rdp_analysis.compute_rdp(q=sample_rate, noise_multiplier=noise_multiplier, steps=1,
                                          orders=RDPAccountant.DEFAULT_ALPHAS))


def calibrate_noise(target_epsilon: float, delta: float, sample_rate: float, steps: int, accountant: str) -> float:
    """The smallest noise multiplier (to 0.01 in epsilon) such that ``steps`` steps spend at most ``target_epsilon``."""
    return float(get_noise_multiplier(target_epsilon=target_epsilon, target_delta=delta, sample_rate=sample_rate,
                                      steps=steps, accountant=accountant, epsilon_tolerance=0.01))


class PrivacyLedger:
    """The history of (noise multiplier, sample rate, steps) of a run and the epsilon it has spent at ``delta``."""

    def __init__(self, accountant: str, delta: float, history: list | None = None):
        if accountant not in ACCOUNTANTS:
            raise ValueError(f"unknown accountant {accountant!r}: use one of {ACCOUNTANTS}")
        self.accountant, self.delta = accountant, float(delta)
        self.history: list[tuple[float, float, int]] = [tuple(h) for h in (history or [])]
        self._cache: dict = {}

    @property
    def steps(self) -> int:
        return sum(int(s) for _, _, s in self.history)

    def step(self, noise_multiplier: float, sample_rate: float, steps: int = 1) -> None:
        if self.history and self.history[-1][:2] == (noise_multiplier, sample_rate):
            sigma, q, s = self.history[-1]
            self.history[-1] = (sigma, q, s + steps)
        else:
            self.history.append((float(noise_multiplier), float(sample_rate), int(steps)))

    def epsilon(self, extra_steps: int = 0, noise_multiplier: float | None = None,
                sample_rate: float | None = None) -> float:
        """Epsilon spent so far, or after ``extra_steps`` more steps at ``(noise_multiplier, sample_rate)``."""
        history = list(self.history)
        if extra_steps:
            if noise_multiplier is None or sample_rate is None:
                noise_multiplier, sample_rate = history[-1][:2]
            history.append((noise_multiplier, sample_rate, extra_steps))
        key = _merged(history)
        if key not in self._cache:
            self._cache[key] = _epsilon(self.accountant, key, self.delta)
        return self._cache[key]

    def max_steps(self, target_epsilon: float, noise_multiplier: float, sample_rate: float, hint: int,
                  cap: int | None = None) -> int:
        """The most further steps at ``(noise_multiplier, sample_rate)`` that keep epsilon <= ``target_epsilon``.

        ``hint`` (e.g. the planned number of steps) is where the search starts; epsilon grows with the steps. With
        ``cap`` (the steps the run can take at all), the answer is at most ``cap`` and costs one evaluation when
        the whole run fits the budget.
        """
        def fits(extra: int) -> bool:
            return extra == 0 or self.epsilon(extra, noise_multiplier, sample_rate) <= target_epsilon

        if cap is not None and fits(cap):
            return int(cap)
        if not fits(1):
            return 0
        low, high = 1, max(1, int(hint))
        while fits(high):  # grow until it no longer fits
            low, high = high, high * 2
        while high - low > 1:  # invariant: fits(low), not fits(high)
            mid = (low + high) // 2
            low, high = (mid, high) if fits(mid) else (low, mid)
        return low

    def state_dict(self) -> dict:
        return {"accountant": self.accountant, "delta": self.delta, "history": [list(h) for h in self.history]}

    @classmethod
    def from_state_dict(cls, state: dict) -> "PrivacyLedger":
        return cls(state["accountant"], state["delta"], state["history"])


def _merged(history: list) -> tuple:
    """Consecutive entries with the same (sigma, q) as one entry, so equal histories share a cache key."""
    merged: list = []
    for sigma, q, steps in history:
        if merged and merged[-1][:2] == (sigma, q):
            merged[-1] = (sigma, q, merged[-1][2] + steps)
        elif steps:
            merged.append((float(sigma), float(q), int(steps)))
    return tuple(merged)


def _epsilon(accountant: str, history: tuple, delta: float) -> float:
    history = [h for h in history if h[2] > 0]
    if not history:
        return 0.0
    if any(sigma <= 0 for sigma, _, _ in history):
        return float("inf")  # a step without noise releases the exact gradient: no finite epsilon
    if accountant == "rdp":
        orders = RDPAccountant.DEFAULT_ALPHAS
        rdp = [sum(s * r for s, r in zip((h[2] for h in history), column))
               for column in zip(*(_rdp_one_step(h[0], h[1]) for h in history))]
        eps, _ = rdp_analysis.get_privacy_spent(orders=orders, rdp=rdp, delta=delta)
        return float(eps)
    if accountant == "gdp":
        if len({h[:2] for h in history}) != 1:
            raise ValueError("the gdp accountant needs a constant noise multiplier and sample rate; use prv or rdp")
        sigma, q = history[0][:2]
        return float(gdp_analysis.compute_eps_poisson(steps=sum(h[2] for h in history), noise_multiplier=sigma,
                                                      sample_rate=q, delta=delta))
    reference = create_accountant("prv")
    reference.history = [tuple(h) for h in history]
    eps = float(reference.get_epsilon(delta=delta))
    return eps if math.isfinite(eps) else float("inf")
