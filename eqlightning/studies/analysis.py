"""Fits and tables over a study's result rows: power-law scaling fits with bootstrap CIs, per-axis exponents ("which
axis to scale first"), the compute frontier and mean +- std tables over seeds. numpy/scipy only.

Input: the store's rows, one dict per planned run (``variant``, ``key``, ``state``, ``seed``, ``axes``, ``family``,
``dataset``, ``parameters``, ``flops``, ``train_flops``, ``epsilon``, ``target_epsilon``, ``metrics``, ...). Only rows
with ``state == "complete"`` and a numeric ``metrics["test/acc"]`` enter fits and tables (:func:`usable`); the
error is ``1 - test/acc``.

Axis names: a study varies config keys, written short (``width``) or dotted
(``model.backbone_kwargs.width_multiplier``). :func:`axis_kind` maps them to ``width``, ``depth``, ``resolution``
(``size``/``data.size``), ``phi`` (the scaling axes), ``train_fraction``, ``epsilon`` and ``seed``.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Sequence

import numpy as np

from .powerlaw import ERR_FLOOR, PowerLawFit, percentiles, bootstrap_indices, fit_power_law

SCALING_AXES = ("width", "depth", "resolution", "phi")
COSTS = ("parameters", "train_flops", "flops")


# -- rows --------------------------------------------------------------------------------------------------------------
def axis_kind(key: str) -> str | None:
    """``width``/``depth``/``resolution``/``phi``/``train_fraction``/``epsilon``/``seed`` for an axis key, else None."""
    last = key.split(".")[-1]
    if last in ("width", "width_multiplier"):
        return "width"
    if last in ("depth", "depth_multiplier"):
        return "depth"
    if last == "size" and (key == "size" or key.startswith("data.")):
        return "resolution"
    if last == "phi":
        return "phi"
    if last == "train_fraction":
        return "train_fraction"
    if last in ("epsilon", "target_epsilon"):
        return "epsilon"
    if last in ("seed", "seed_everything"):
        return "seed"
    return None


def as_number(value: Any) -> float | None:
    """``value`` as a finite float, or None (bools, strings, NaN, inf are not numbers here)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return None
    return float(value)


def acc_of(row: dict) -> float | None:
    return as_number((row.get("metrics") or {}).get("test/acc"))


def usable(rows: Iterable[dict]) -> list[dict]:
    """The rows that enter fits and tables: complete, with a numeric ``test/acc``."""
    return [r for r in rows if r.get("state") == "complete" and acc_of(r) is not None]


def error_of(row: dict) -> float:
    return 1.0 - acc_of(row)


def config_axes(row: dict) -> dict[str, Any]:
    """The row's axes without the seed: what identifies its configuration across seeds. A list or mapping value (a
    searched architecture's per-stage groups, say) is given as its JSON text, so configurations can be grouped."""
    return {k: (json.dumps(v, sort_keys=True) if isinstance(v, (list, dict)) else v)
            for k, v in (row.get("axes") or {}).items() if axis_kind(k) != "seed"}


def config_id(row: dict) -> str:
    """Identity of a configuration: seeds of one config share it (dataset, variant, family, target epsilon, axes)."""
    return json.dumps([row.get("dataset"), row.get("variant"), row.get("family"), row.get("target_epsilon"),
                       sorted(config_axes(row).items())], default=str)


def condition_of(row: dict) -> tuple:
    """What must be held fixed to compare model sizes: dataset, target epsilon and the axes that are neither scaling
    axes, seeds nor epsilon (e.g. ``train_fraction``, recipe values)."""
    other = tuple(sorted((k, v) for k, v in config_axes(row).items()
                         if axis_kind(k) not in (*SCALING_AXES, "epsilon")))
    return (row.get("dataset"), row.get("target_epsilon"), other)


def condition_label(condition: tuple) -> str:
    """``non-private`` / ``eps=8`` plus the other fixed axes, e.g. ``eps=8, train_fraction=0.5``."""
    _, eps, other = condition
    parts = ["non-private" if eps is None else f"eps={eps:g}" if as_number(eps) is not None else f"eps={eps}"]
    parts += [f"{k.split('.')[-1]}={v}" for k, v in other]
    return ", ".join(parts)


def group_rows(rows: Iterable[dict], key: Callable[[dict], Any]) -> dict[Any, list[dict]]:
    """Rows grouped by ``key(row)``, groups in first-seen order."""
    groups: dict[Any, list[dict]] = {}
    for row in rows:
        groups.setdefault(key(row), []).append(row)
    return groups


def _value_key(v: Any) -> tuple:
    """Sort key for axis values of mixed types: numbers (in order), then strings, then None."""
    return (v is None, isinstance(v, str), v if isinstance(v, (int, float)) else str(v))


def _std(values: Sequence[float]) -> float | None:
    """Sample standard deviation (ddof=1); None for fewer than two values."""
    return float(np.std(values, ddof=1)) if len(values) >= 2 else None


def _mean(values: Iterable[Any]) -> float | None:
    numbers = [v for v in map(as_number, values) if v is not None]
    return float(np.mean(numbers)) if numbers else None



def _cost_points(rows: list[dict], x: str) -> tuple[list[dict], np.ndarray, np.ndarray]:
    if x not in COSTS:
        raise ValueError(f"x must be one of {', '.join(COSTS)}, got {x!r}")
    rows = [r for r in usable(rows) if (as_number(r.get(x)) or 0) > 0]
    return rows, np.array([float(r[x]) for r in rows]), np.array([error_of(r) for r in rows])


def fits_by_family(rows: Iterable[dict], x: str = "parameters", **fit_kwargs: Any) -> dict[str, PowerLawFit]:
    """``{family: fit_power_law(cost, error)}`` over the usable rows with a positive ``x`` (``parameters`` or
    ``train_flops``); seeds of one config are resampled together. Pass rows of one condition (dataset, epsilon, data
    fraction: :func:`condition_of`): this function does not separate them."""
    rows, _, _ = _cost_points(list(rows), x)
    out = {}
    for family, frows in sorted(group_rows(rows, lambda r: str(r.get("family"))).items()):
        xs, errs = [float(r[x]) for r in frows], [error_of(r) for r in frows]
        out[family] = fit_power_law(xs, errs, groups=[config_id(r) for r in frows], **fit_kwargs)
    return out


# -- per-axis exponents ------------------------------------------------------------------------------------------------
@dataclass
class AxisExponent:
    """How the error falls when one scaling axis grows with the others fixed.

    ``slope`` = d log(err) / d log(cost) from a least-squares line through (log2 cost, log2 err) of the runs, with a
    bootstrap CI: the error is multiplied by ``2**slope`` per doubling of the training FLOPs spent along this axis,
    so ``decrease_per_doubling = 1 - 2**slope`` (the fraction of the error removed by doubling the compute). Unlike
    ``alpha`` it needs no irreducible-error term and is comparable across axes. ``vs_parameters`` / ``vs_cost``: the
    power-law fits (alpha) of the same runs.
    """

    axis: str
    key: str
    values: list = field(default_factory=list)
    context: str = ""
    n_points: int = 0
    cost: str = "train_flops"
    slope: float | None = None
    slope_ci: tuple[float, float] | None = None
    vs_parameters: PowerLawFit | None = None
    vs_cost: PowerLawFit | None = None
    reason: str | None = None

    @property
    def decrease_per_doubling(self) -> float | None:
        return None if self.slope is None else 1.0 - 2.0 ** self.slope

    def to_dict(self) -> dict[str, Any]:
        out = {k: getattr(self, k) for k in ("axis", "key", "context", "n_points", "cost", "slope", "reason")}
        out["values"] = [v if as_number(v) is not None or isinstance(v, str) else str(v) for v in self.values]
        out["slope_ci"] = None if self.slope_ci is None else list(self.slope_ci)
        out["decrease_per_doubling"] = self.decrease_per_doubling
        for k in ("vs_parameters", "vs_cost"):
            out[k] = None if getattr(self, k) is None else getattr(self, k).to_dict()
        return out


def _slope(x: np.ndarray, err: np.ndarray) -> float:
    return float(np.polyfit(np.log2(x), np.log2(np.maximum(err, ERR_FLOOR)), 1)[0])


def _axis_slice(rows: list[dict], key: str) -> tuple[list[dict], str]:
    """The runs along axis ``key`` with everything else fixed: the context (dataset, target epsilon, all other axes)
    with the most distinct values of ``key`` (ties: the most runs)."""
    def context(r: dict) -> str:
        other = sorted((k, v) for k, v in config_axes(r).items() if k != key)
        return json.dumps([r.get("dataset"), r.get("target_epsilon"), other], default=str)

    groups = group_rows([r for r in rows if key in (r.get("axes") or {})], context)
    if not groups:
        return [], ""
    best = max(groups.values(), key=lambda g: (len({json.dumps(r["axes"][key], default=str) for r in g}), len(g)))
    fixed = {k: v for k, v in config_axes(best[0]).items() if k != key}
    label = condition_label((best[0].get("dataset"), best[0].get("target_epsilon"), ()))
    return best, ", ".join([label] + [f"{k.split('.')[-1]}={v}" for k, v in sorted(fixed.items())])


def axis_exponent(rows: list[dict], key: str, *, n_boot: int = 1000, seed: int = 0, ci: float = 0.95) -> AxisExponent:
    """:class:`AxisExponent` of axis ``key`` over ``rows`` (one family); ``reason`` set when it cannot be measured."""
    sel, context = _axis_slice(usable(rows), key)
    values = sorted({r["axes"][key] for r in sel}, key=_value_key)
    out = AxisExponent(axis=axis_kind(key) or key, key=key, values=values, context=context, n_points=len(sel))
    if len(values) < 3:
        out.reason = f"needs >= 3 distinct values of {key}, got {len(values)}"
        return out
    cost = "train_flops" if all((as_number(r.get("train_flops")) or 0) > 0 for r in sel) else "flops"
    if not all((as_number(r.get(cost)) or 0) > 0 for r in sel):
        out.reason = "runs without train_flops/flops: no cost to compare axes by"
        return out
    out.cost = cost
    x, err = np.array([float(r[cost]) for r in sel]), np.array([error_of(r) for r in sel])
    groups = [config_id(r) for r in sel]
    kw = dict(n_boot=n_boot, seed=seed, ci=ci)
    out.vs_cost = fit_power_law(x, err, groups=groups, **kw)
    params = [r for r in sel if (as_number(r.get("parameters")) or 0) > 0]
    out.vs_parameters = fit_power_law([float(r["parameters"]) for r in params], [error_of(r) for r in params],
                                      groups=[config_id(r) for r in params], **kw)
    if len(np.unique(x)) < 2:
        out.reason = f"{cost} does not change along {key}"
        return out
    out.slope = _slope(x, err)
    slopes = [_slope(x[i], err[i]) for i in bootstrap_indices(x, groups, n_boot, seed, min_unique=2)]
    if slopes:
        out.slope_ci = tuple(float(v) for v in np.percentile(slopes, percentiles(ci)))
    return out


def axis_exponents(rows: Iterable[dict], **kwargs: Any) -> dict[str, dict[str, Any]]:
    """Per family: ``{"axes": {axis: AxisExponent}, "scale_first": axis | None, "clear": bool, "reason": str|None}``.

    Each scaling axis (width, depth, resolution, phi) is measured on the runs where it varies and every other axis
    is at one value (:func:`axis_exponent`). ``scale_first`` is the axis with the largest error decrease per
    doubling of training FLOPs (the most negative ``slope``); ``clear`` says its slope CI lies below the CI of every
    other measured axis (no overlap; False when only one axis was measured). Axes with < 3 distinct values carry a ``reason`` and are not compared.
    """
    rows = usable(rows)
    out: dict[str, dict[str, Any]] = {}
    for family, frows in sorted(group_rows(rows, lambda r: str(r.get("family"))).items()):
        keys = sorted({k for r in frows for k in (r.get("axes") or {}) if axis_kind(k) in SCALING_AXES})
        axes = {}
        for key in keys:
            name = axis_kind(key)
            axes[name if name not in axes else key] = axis_exponent(frows, key, **kwargs)
        measured = {k: a for k, a in axes.items() if a.slope is not None}
        entry: dict[str, Any] = {"axes": axes, "scale_first": None, "clear": False, "reason": None}
        if not keys:
            entry["reason"] = "no scaling axis (width, depth, resolution, phi) varies in this family's runs"
        elif not measured:
            entry["reason"] = "no scaling axis has >= 3 values with the other axes fixed"
        else:
            best = min(measured, key=lambda k: measured[k].slope)
            entry["scale_first"] = best
            hi = (measured[best].slope_ci or (measured[best].slope,) * 2)[1]
            entry["clear"] = len(measured) > 1 and all((a.slope_ci or (a.slope,) * 2)[0] > hi
                                                       for k, a in measured.items() if k != best)
        out[family] = entry
    return out


# -- frontier and tables -----------------------------------------------------------------------------------------------
def config_means(rows: Iterable[dict], x: str | None = None) -> list[dict]:
    """One dict per configuration (seeds averaged): identity fields, ``n``, ``acc``, ``acc_std``, ``auc``,
    ``error``, ``error_std`` and, with ``x``, ``cost`` (the mean of ``row[x]``; configs without it are dropped)."""
    out = []
    for runs in group_rows(usable(rows), config_id).values():
        first = runs[0]
        accs = [acc_of(r) for r in runs]
        entry = {k: first.get(k) for k in ("variant", "family", "dataset", "target_epsilon")}
        entry.update(axes=config_axes(first), n=len(runs), acc=float(np.mean(accs)), acc_std=_std(accs),
                     auc=_mean((r.get("metrics") or {}).get("test/auc") for r in runs),
                     error=1.0 - float(np.mean(accs)), error_std=_std(accs),
                     parameters=_mean(r.get("parameters") for r in runs),
                     train_flops=_mean(r.get("train_flops") for r in runs))
        if x is not None:
            entry["cost"] = _mean(r.get(x) for r in runs)
            if entry["cost"] is None or entry["cost"] <= 0:
                continue
        out.append(entry)
    return out


def pareto_frontier(rows: Iterable[dict], x: str = "train_flops") -> list[dict]:
    """The compute-optimal frontier: configs (seeds averaged, :func:`config_means`) that no other config beats with
    a lower or equal error at a lower or equal cost ``x``; sorted by cost (so errors fall along it)."""
    if x not in COSTS:
        raise ValueError(f"pareto_frontier: x must be one of {', '.join(COSTS)}, got {x!r}")
    frontier, best = [], math.inf
    for entry in sorted(config_means(rows, x), key=lambda e: (e["cost"], e["error"])):
        if entry["error"] < best:
            frontier.append(entry)
            best = entry["error"]
    return frontier


def _field(row: dict, key: str) -> Any:
    """``row[key]``, else the axis ``key`` (``axes.<key>`` works too)."""
    if key in row:
        return row[key]
    axes = row.get("axes") or {}
    return axes.get(key[5:] if key.startswith("axes.") else key)


def robustness_labels(rows: Iterable[dict]) -> list[str]:
    """Metric labels ``<label>/acc`` measured besides the plain test ACC (``rot90/acc``, ``pgd_eps2/acc``, ...)."""
    labels = {k[5:] for r in rows for k in (r.get("metrics") or {})
              if k.startswith("test/") and k.endswith("/acc") and k.count("/") == 2}
    return sorted(labels)




def summary_table(rows: Iterable[dict], by: Sequence[str] = ("dataset", "variant", "target_epsilon")) -> list[dict]:
    """Mean and std (sample std, ddof=1; None for one run) over runs of each group of ``by`` (row fields or axis
    keys): ``n`` runs, ``n_seeds``, ``n_configs`` (> 1 means the group mixes configs: add their axes to ``by``),
    ``acc_mean/acc_std``, ``auc_mean/auc_std``, ``val_mean`` (the selection metric), ``parameters``, ``epsilon``
    (spent), ``wall_time_s`` (means) and
    ``robustness`` ``{label: mean ACC}``. Sorted by the ``by`` values."""
    rows = usable(rows)
    out = []
    groups = group_rows(rows, lambda r: tuple(json.dumps(_field(r, k), default=str) for k in by))
    for runs in groups.values():
        accs = [acc_of(r) for r in runs]
        aucs = [v for v in (as_number((r.get("metrics") or {}).get("test/auc")) for r in runs) if v is not None]
        entry = {k: _field(runs[0], k) for k in by}
        entry.update(n=len(runs), n_seeds=len({r.get("seed") for r in runs}),
                     n_configs=len({config_id(r) for r in runs}),
                     acc_mean=float(np.mean(accs)), acc_std=_std(accs),
                     auc_mean=float(np.mean(aucs)) if aucs else None, auc_std=_std(aucs),
                     val_mean=_mean(r.get("val") for r in runs),
                     parameters=_mean(r.get("parameters") for r in runs), epsilon=_mean(r.get("epsilon") for r in runs),
                     wall_time_s=_mean(r.get("wall_time_s") for r in runs),
                     robustness={label: _mean((r.get("metrics") or {}).get(f"test/{label}") for r in runs)
                                 for label in robustness_labels(runs)})
        out.append(entry)
    return sorted(out, key=lambda e: tuple(_value_key(e[k]) for k in by))
