"""Power-law scaling fits ``err = E + A * x**(-alpha)`` with bootstrap confidence intervals (numpy/scipy only).

The fit is in log space with a Huber loss from a small grid of starts (Chinchilla's approach 3), on ``log10(x)``
normalised to its range; bootstrap refits resample configs (``groups``: the seeds of one config move together) and
run as one batched fit, checked against full ``least_squares`` refits in the tests.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Iterable, Sequence

import numpy as np
from scipy.optimize import least_squares

_LN10 = math.log(10.0)
ERR_FLOOR = 1e-6  # an error of exactly 0 (ACC 1.0) is fitted as 1e-6: the fit is in log space


@dataclass
class PowerLawFit:
    """``err = E + A * x**(-alpha)`` with percentile-bootstrap CIs; ``ok`` is False (and ``reason`` says why) when no
    fit was made. ``grid``/``band_low``/``band_high``: the CI band of the prediction over the fitted x range."""

    E: float | None = None
    A: float | None = None
    alpha: float | None = None
    E_ci: tuple[float, float] | None = None
    A_ci: tuple[float, float] | None = None
    alpha_ci: tuple[float, float] | None = None
    n_points: int = 0
    n_unique_x: int = 0
    n_groups: int = 0
    n_boot: int = 0
    n_boot_distinct: int = 0  # distinct resamples: few (e.g. 3 configs, 1 seed) make the CIs meaningless
    ci: float = 0.95
    reason: str | None = None
    grid: np.ndarray | None = field(default=None, repr=False)
    band_low: np.ndarray | None = field(default=None, repr=False)
    band_high: np.ndarray | None = field(default=None, repr=False)
    boot: np.ndarray | None = field(default=None, repr=False)  # (n_boot, 3): E, A, alpha per bootstrap sample

    @property
    def ok(self) -> bool:
        return self.reason is None

    def predict(self, x: Any) -> np.ndarray:
        """The fitted error at ``x``."""
        if not self.ok:
            raise ValueError(f"no fit to predict with: {self.reason}")
        return self.E + self.A * np.asarray(x, dtype=float) ** (-self.alpha)

    def band(self, x: Any) -> tuple[np.ndarray, np.ndarray]:
        """The CI band (low, high) of the prediction at ``x``: percentiles of the bootstrap fits' predictions."""
        if not self.ok or self.boot is None or len(self.boot) == 0:
            raise ValueError(f"no bootstrap fits for a band ({self.reason or 'n_boot=0'})")
        x = np.asarray(x, dtype=float)
        preds = self.boot[:, :1] + self.boot[:, 1:2] * x.reshape(1, -1) ** (-self.boot[:, 2:3])
        lo, hi = np.percentile(preds, percentiles(self.ci), axis=0)
        return lo.reshape(x.shape), hi.reshape(x.shape)

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe numbers (no arrays, no NaN)."""
        out = {k: getattr(self, k) for k in ("E", "A", "alpha", "n_points", "n_unique_x", "n_groups", "n_boot",
                                             "n_boot_distinct", "ci", "reason")}
        for k in ("E_ci", "A_ci", "alpha_ci"):
            value = getattr(self, k)
            out[k] = None if value is None else [float(v) for v in value]
        return out


def percentiles(ci: float) -> tuple[float, float]:
    return 50.0 * (1.0 - ci), 50.0 * (1.0 + ci)


def _bounds(log_err: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Bounds of (E, b, alpha): 0 <= E <= the largest error, b = log(reducible error at x_ref), 0 < alpha <= 3."""
    return np.array([0.0, -40.0, 1e-6]), np.array([float(np.exp(log_err.max())), 10.0, 3.0])


def _model(p: np.ndarray, u: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(reducible term g, prediction, Jacobian of log(prediction)) of ``E + exp(b - alpha*ln10*u)``; ``p`` is (3,)
    or (B, 3), the outputs (n,) / (B, n) and (n, 3) / (B, n, 3)."""
    p = np.asarray(p)
    E, b, alpha = (p[..., k, None] for k in range(3))
    g = np.exp(b - alpha * _LN10 * u)
    pred = E + g
    return g, pred, np.stack([1.0 / pred, g / pred, -_LN10 * u * g / pred], axis=-1)


def _fit_once(u: np.ndarray, log_err: np.ndarray, starts: np.ndarray, delta: float) -> np.ndarray:
    """Minimise the Huber loss of ``log(E + exp(b - alpha*ln10*u)) - log(err)`` over (E, b, alpha), with
    ``u = log10(x) - log10(x_ref)`` (so ``A = exp(b) * x_ref**alpha``): :func:`_fit_weighted` from every start
    (B, 3) at once, then ``scipy.optimize.least_squares`` (trust-region reflective, bounds) from the best of them."""
    lo, hi = _bounds(log_err)
    ones = np.ones((len(starts), len(u)))
    candidates = _fit_weighted(u, log_err, ones, starts, delta)
    losses = (_huber(np.log(_model(candidates, u)[1]) - log_err, delta)).sum(axis=1)
    p0 = np.clip(candidates[np.argmin(losses)], lo + 1e-9, hi - 1e-9)
    res = least_squares(lambda p: np.log(_model(p, u)[1]) - log_err, p0, jac=lambda p: _model(p, u)[2],
                        bounds=(lo, hi), loss="huber", f_scale=delta, method="trf", max_nfev=300)
    return res.x if res.cost <= losses.min() + 1e-15 else candidates[np.argmin(losses)]


def _huber(r: np.ndarray, delta: float) -> np.ndarray:
    a = np.abs(r)
    return np.where(a <= delta, 0.5 * r * r, delta * a - 0.5 * delta * delta)


def _fit_weighted(u: np.ndarray, log_err: np.ndarray, weights: np.ndarray, p0: np.ndarray, delta: float,
                  iters: int = 300) -> np.ndarray:
    """The same Huber fit for B weight vectors at once (``weights`` (B, n): a bootstrap resample is the original
    points counted with multiplicity) from ``p0`` ((3,) or one start per row (B, 3)): Levenberg-Marquardt on the
    IRLS-weighted normal equations, steps clipped to the bounds, a step kept only when it lowers the loss.
    Returns (B, 3)."""
    lo, hi = _bounds(log_err)
    P = np.clip(np.broadcast_to(p0, (len(weights), 3)), lo, hi).astype(float)
    lam = np.full(len(weights), 1e-3)
    loss = lambda P, w: (w * _huber(np.log(_model(P, u)[1]) - log_err, delta)).sum(axis=1)  # noqa: E731
    L = loss(P, weights)
    active = np.arange(len(weights))  # samples still improving
    for _ in range(iters):
        if not len(active):
            break
        p, w, la, l0 = P[active], weights[active], lam[active], L[active]
        _, pred, J = _model(p, u)
        r = np.log(pred) - log_err
        omega = w * np.minimum(1.0, delta / np.maximum(np.abs(r), 1e-300))
        JtJ = np.einsum("bni,bn,bnj->bij", J, omega, J)
        Jtr = np.einsum("bni,bn->bi", J, omega * r)
        damp = la[:, None, None] * (np.eye(3) * np.diagonal(JtJ, axis1=1, axis2=2)[:, :, None] + 1e-12 * np.eye(3))
        pn = np.clip(p + np.linalg.solve(JtJ + damp, -Jtr[..., None])[..., 0], lo, hi)
        ln = loss(pn, w)
        better = ln < l0
        done = (better & (l0 - ln <= 1e-12 * (1.0 + l0))) | (~better & (la >= 1e8))
        P[active[better]], L[active[better]] = pn[better], ln[better]
        lam[active] = np.clip(np.where(better, la / 3.0, la * 4.0), 1e-10, 1e10)
        active = active[~done]
    return P


def _starts(log_err: np.ndarray) -> np.ndarray:
    """A grid of 12 starts: E in {1, 50, 90}% of the smallest error, alpha in {0.2, 0.5, 1, 2}."""
    err = np.exp(log_err)
    out = []
    for frac in (0.01, 0.5, 0.9):
        e0 = frac * err.min()
        b0 = math.log(max(float(np.exp(np.mean(np.log(np.maximum(err - e0, 1e-9))))), 1e-9))
        out += [[e0, b0, a0] for a0 in (0.2, 0.5, 1.0, 2.0)]
    return np.array(out)


def _group_index(groups: Sequence[Any] | None, n: int) -> list[np.ndarray]:
    if groups is None:
        return [np.array([i]) for i in range(n)]
    if len(groups) != n:
        raise ValueError(f"groups has {len(groups)} entries for {n} points; give one group label per point")
    index: dict[Any, list[int]] = {}
    for i, g in enumerate(groups):
        index.setdefault(g if not isinstance(g, list) else tuple(g), []).append(i)
    return [np.array(v) for v in index.values()]


def bootstrap_indices(x: np.ndarray, groups: Sequence[Any] | None, n_boot: int, seed: int,
                      min_unique: int = 3) -> Iterable[np.ndarray]:
    """Two-stage cluster bootstrap: draw groups with replacement, then the rows of each drawn group with replacement
    (seeds of a config when groups are configs; each row is its own group when ``groups`` is None). Draws with fewer
    than ``min_unique`` distinct x are redrawn (up to 50 times per sample, else the sample is skipped)."""
    rng = np.random.default_rng(seed)
    index = _group_index(groups, len(x))
    group_x = [set(x[i].tolist()) for i in index]
    for _ in range(n_boot):
        for _try in range(50):
            picked = rng.integers(len(index), size=len(index))
            if len(set().union(*(group_x[g] for g in picked))) < min_unique:
                continue  # the second stage can only lose values
            idx = np.concatenate([index[g][rng.integers(len(index[g]), size=len(index[g]))] for g in picked])
            if len(np.unique(x[idx])) >= min_unique:
                yield idx
                break


def fit_power_law(x: Sequence[float], err: Sequence[float], *, groups: Sequence[Any] | None = None,
                  n_boot: int = 1000, seed: int = 0, ci: float = 0.95, huber_delta: float = 0.1) -> PowerLawFit:
    """Fit ``err = E + A * x**(-alpha)`` (E >= 0, A > 0, 0 < alpha <= 3) to points ``(x, err)``.

    Chinchilla's approach 3: a Huber loss (``huber_delta``, in log-error units; 0.1 = 10 % relative error) on
    ``log(pred) - log(err)``, minimised from a grid of 12 starts (:func:`_fit_once`), with x taken
    as ``log10(x)`` centred on its mean so the parameters stay of order one. CIs: percentile bootstrap over
    :func:`bootstrap_indices` (``groups``: one label per point, e.g. the config of each run, so that seeds of a
    config are resampled together); each bootstrap fit starts from the full-data fit. With fewer than 3 distinct x no
    fit is made: the result has ``ok == False`` and a ``reason``.
    """
    x, err = np.asarray(x, dtype=float).ravel(), np.asarray(err, dtype=float).ravel()
    if len(x) != len(err):
        raise ValueError(f"fit_power_law: x has {len(x)} values and err {len(err)}; give one error per x")
    if not (np.all(np.isfinite(x)) and np.all(x > 0)):
        raise ValueError(f"fit_power_law: x must be finite and > 0 (model sizes, FLOPs), got {x[~(x > 0)][:3]}")
    if not np.all(np.isfinite(err)) or np.any(err < 0):
        raise ValueError(f"fit_power_law: err must be finite and >= 0 (1 - accuracy), got {err}")
    if not 0.0 < ci < 1.0:
        raise ValueError(f"fit_power_law: ci must be in (0, 1), e.g. 0.95, got {ci!r}")
    n_unique = len(np.unique(x))
    n_groups = len(_group_index(groups, len(x)))
    base = dict(n_points=len(x), n_unique_x=n_unique, n_groups=n_groups, ci=ci)
    if n_unique < 3:
        return PowerLawFit(reason=f"needs >= 3 distinct sizes, got {n_unique}", **base)
    ref = float(np.mean(np.log10(x)))
    u, log_err = np.log10(x) - ref, np.log(np.maximum(err, ERR_FLOOR))
    p = _fit_once(u, log_err, _starts(log_err), huber_delta)

    def natural(q: np.ndarray) -> np.ndarray:  # (E, b, alpha) -> (E, A, alpha)
        return np.array([q[0], math.exp(q[1] + q[2] * _LN10 * ref), q[2]])

    weights = np.array([np.bincount(i, minlength=len(x)) for i in bootstrap_indices(x, groups, n_boot, seed)],
                       dtype=float).reshape(-1, len(x))
    boot = np.array([natural(q) for q in _fit_weighted(u, log_err, weights, p, huber_delta)]).reshape(-1, 3)
    E, A, alpha = natural(p)
    fit = PowerLawFit(E=float(E), A=float(A), alpha=float(alpha), n_boot=len(boot), boot=boot,
                      n_boot_distinct=len(np.unique(weights, axis=0)), **base)
    if len(boot):
        lo, hi = np.percentile(boot, percentiles(ci), axis=0)
        fit.E_ci, fit.A_ci, fit.alpha_ci = ((float(lo[k]), float(hi[k])) for k in range(3))
        fit.grid = np.geomspace(x.min(), x.max(), 60)
        fit.band_low, fit.band_high = fit.band(fit.grid)
    return fit
