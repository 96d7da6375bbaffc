"""The PRV epsilon on the canonical horizon: per-step curve, exactness, Opacus agreement, monotonicity, budget."""

from __future__ import annotations

import numpy as np
import pytest
from opacus.accountants import create_accountant
from opacus.accountants.analysis.prv import PoissonSubsampledGaussianPRV, compute_safe_domain_size

from eqlightning.privacy import PrivacyLedger
from eqlightning.privacy import accounting

DEMO = (0.78, 1 / 19, 2.1e-5)  # (sigma, q, delta) of the typical 190-step run


def fresh(accountant: str, delta: float, history: list) -> float:
    """Epsilon of a new ledger with nothing cached, PRV grids included."""
    accounting._prv_grid.cache_clear()
    return PrivacyLedger(accountant, delta, history).epsilon()


def opacus_prv(history: list, delta: float) -> float:
    reference = create_accountant("prv")
    reference.history = [tuple(h) for h in history]
    return reference.get_epsilon(delta=delta)


@pytest.mark.parametrize("accountant", ["prv", "rdp", "gdp"])
def test_curve_is_exactly_the_epsilon_of_fresh_ledgers(accountant):
    sigma, q, delta = DEMO
    ledger = PrivacyLedger(accountant, delta, [(sigma, q, 5)])
    curve = ledger.epsilon_curve(sigma, q, 60)  # steps 6..65: grids for horizons 16, 32, 64 and 128
    assert len(curve) == 60
    for i in (0, 10, 11, 26, 27, 58, 59):  # around the horizon boundaries 16/17, 32/33, 64/65
        assert curve[i] == fresh(accountant, delta, [(sigma, q, 5 + i + 1)])  # bit for bit
        assert curve[i] != fresh(accountant, delta, [(sigma, q, 5 + i)])  # not off by one step
        assert curve[i] == ledger.epsilon(i + 1, sigma, q)
    assert curve[0] > ledger.epsilon() and ledger.epsilon_curve(sigma, q, 0) == []


def test_precompute_makes_stepping_a_lookup(monkeypatch):
    sigma, q, delta = DEMO
    ledger = PrivacyLedger("prv", delta)
    ledger.precompute(sigma, q, 40)

    def no_computation(*args):
        raise AssertionError("epsilon() computed instead of reading the cache")

    monkeypatch.setattr(accounting, "_epsilon", no_computation)
    shown = []
    for _ in range(40):
        ledger.step(sigma, q)
        shown.append(ledger.epsilon())
    monkeypatch.undo()
    for k in (1, 2, 16, 17, 40):
        assert shown[k - 1] == fresh("prv", delta, [(sigma, q, k)])


def test_state_round_trip_keeps_the_prv_value():
    sigma, q, delta = DEMO
    ledger = PrivacyLedger("prv", delta)
    for _ in range(37):
        ledger.step(sigma, q)
    shown = ledger.epsilon()
    accounting._prv_grid.cache_clear()
    clone = PrivacyLedger.from_state_dict(ledger.state_dict())
    assert clone.history == ledger.history and clone.epsilon() == shown


@pytest.mark.parametrize("sigma,q,delta,steps", [
    (*DEMO, 1), (*DEMO, 16), (*DEMO, 17), (*DEMO, 190),
    (1.1, 256 / 60000, 1e-5, 1000),  # horizon 1024: the closed-form tail path
])
def test_prv_within_one_percent_of_opacus(sigma, q, delta, steps):
    ours, theirs = fresh("prv", delta, [(sigma, q, steps)]), opacus_prv([(sigma, q, steps)], delta)
    assert ours == pytest.approx(theirs, rel=1e-2)
    assert abs(ours - theirs) <= 1e-3 * theirs  # seen: below 1e-4 relative


def test_prv_monotone_in_the_steps():
    sigma, q, delta = DEMO
    curve = PrivacyLedger("prv", delta).epsilon_curve(sigma, q, 300)  # horizons 16 .. 512
    assert np.all(np.diff(curve) > 0)
    sigma, q, delta = 0.8, 0.01, 1e-5  # later horizon boundaries, where one step adds less
    for horizon in (1024, 2048):
        before, at, after = (fresh("prv", delta, [(sigma, q, k)]) for k in (horizon - 1, horizon, horizon + 1))
        assert before < at < after


def test_both_tail_searches_agree():
    """Closed-form tails from the surviving Fourier coefficients == Opacus's inverse-FFT search, to rounding."""
    sigma, q, delta = DEMO
    for steps in (129, 190, 256):  # few coefficients alive: the default is the closed form
        grid = accounting._prv_grid(sigma, q, accounting.prv_horizon(steps), delta)
        fast = grid.epsilon(steps)
        assert fast == grid.epsilon(steps, path="tails")
        assert fast == pytest.approx(grid.epsilon(steps, path="fft"), abs=1e-9)


def test_grid_satisfies_opacus_conditions_for_every_step_count_below_its_horizon():
    """The canonical grid is at least as fine and as wide as the one Opacus builds for k compositions."""
    sigma, q, delta = DEMO
    delta_error, horizon = delta / 1000, 32
    assert accounting.prv_domain_size(sigma, q, horizon, delta_error) == compute_safe_domain_size(
        [PoissonSubsampledGaussianPRV(q, sigma)], [horizon], 0.01, delta_error)
    grid = accounting._prv_grid(sigma, q, horizon, delta)
    for k in (17, 24, 32):
        mesh = 0.01 / np.sqrt(k * np.log(12 / delta_error) / 2)
        assert grid.dt <= mesh * (1 + 1e-12)
        assert (grid.size // 2 - 1) * grid.dt >= accounting.prv_domain_size(sigma, q, k, delta_error)
    assert [accounting.prv_horizon(k) for k in (1, 16, 17, 32, 33, 14063)] == [16, 16, 32, 32, 64, 16384]


def test_max_steps_is_the_last_prv_step_within_budget():
    sigma, q, delta = DEMO
    ledger = PrivacyLedger("prv", delta, [(sigma, q, 10)])
    target = 5.0
    allowed = ledger.max_steps(target, sigma, q, hint=20)
    assert ledger.epsilon(allowed) <= target < ledger.epsilon(allowed + 1)
    curve = ledger.epsilon_curve(sigma, q, allowed + 1)
    assert allowed == sum(e <= target for e in curve)
    assert ledger.max_steps(target, sigma, q, hint=20, cap=allowed) == allowed
    assert ledger.max_steps(target, sigma, q, hint=20, cap=allowed + 5) == allowed
    assert ledger.max_steps(0.5, sigma, q, hint=20) == 0


def test_heterogeneous_prv_history_is_opacus():
    history = [(1.0, 0.01, 20), (2.0, 0.02, 10)]
    ledger = PrivacyLedger("prv", 1e-5)
    ledger.step(1.0, 0.01, 20)
    ledger.step(2.0, 0.02, 10)
    assert ledger.epsilon() == opacus_prv(history, 1e-5) == fresh("prv", 1e-5, history)
