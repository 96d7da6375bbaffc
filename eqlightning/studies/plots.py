"""A study's figures as PNGs (matplotlib, headless: ``Figure`` + ``FigureCanvasAgg``, no pyplot, no global state).

Each function takes result rows (pass one dataset's rows: the plots do not separate datasets), writes ``out`` and
returns its path, or None when there is nothing to draw. Points are means over seeds with std error bars; a series is
one family plus whatever else varies within that family's rows (variant, epsilon, other axes) besides the x axis.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Callable, Iterable

import numpy as np

from .analysis import SCALING_AXES, PowerLawFit, acc_of, as_number, axis_kind, config_axes, error_of, group_rows, usable

_ATTACK = re.compile(r"^(?P<kind>[A-Za-z]+)_eps(?P<eps>\d+(?:\.\d+)?(?:e[+-]?\d+)?)$")
_ROTATION = re.compile(r"^rot(?P<angle>-?\d+(?:\.\d+)?(?:e[+-]?\d+)?)$")
_MARKERS = "osD^vP*X"


def _figure(panels: int, width: float = 5.0, height: float = 3.6):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width * panels, height))
    FigureCanvasAgg(fig)
    return fig, fig.subplots(1, panels, squeeze=False)[0]


def _save(fig, out: str | Path, title: str | None) -> Path:
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    path = Path(out)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110, bbox_inches="tight")  # "tight": legends placed outside the axes stay in the image
    return path


def _finish(ax, xlabel: str, ylabel: str, title: str | None = None, log_x: bool = False,
            ticks: Iterable[float] | None = None, legend: bool = True) -> None:
    """Labels, grid, a legend right of the axes; log x with plain tick labels at ``ticks`` (if given)."""
    if log_x:
        from matplotlib.ticker import FixedLocator, NullFormatter, ScalarFormatter

        ax.set_xscale("log")
        ax.xaxis.set_minor_formatter(NullFormatter())
        if ticks is not None:
            ax.xaxis.set_major_locator(FixedLocator(sorted(ticks)))
            ax.xaxis.set_major_formatter(ScalarFormatter())
            ax.xaxis.set_minor_locator(FixedLocator([]))
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if title:
        ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3, which="major")
    if legend and ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0.0)


def family_colors(rows: Iterable[dict]) -> dict[str, Any]:
    """One tab10 colour per family (sorted names), the same in every figure of a report."""
    from matplotlib import colormaps

    cmap = colormaps["tab10"]
    families = sorted({str(r.get("family")) for r in rows})
    return {f: cmap(i % 10) for i, f in enumerate(families)}


def _identity(row: dict, drop: set[str], variant: bool) -> dict[str, Any]:
    """What tells a row's series apart within its family (epsilon axes are the target epsilon, ``eps``)."""
    ident = {"eps": row.get("target_epsilon")} if "epsilon" not in drop else {}
    if variant:
        ident["variant"] = row.get("variant")
    ident.update({k.split(".")[-1]: v for k, v in config_axes(row).items()
                  if axis_kind(k) not in (*drop, "epsilon") and k not in drop})
    return ident


def series(rows: Iterable[dict], drop: set[str], variant: bool = True) -> dict[tuple[str, str], list[dict]]:
    """``{(family, label): rows}``: usable rows split by family and by what varies within the family (target
    epsilon, variant, axes) except the axes kinds/keys in ``drop`` (the x axis). Labels name the varying parts."""
    out: dict[tuple[str, str], list[dict]] = {}
    for family, frows in sorted(group_rows(usable(rows), lambda r: str(r.get("family"))).items()):
        idents = [_identity(r, drop, variant) for r in frows]
        keys = sorted({k for i in idents for k in i})
        varying = [k for k in keys if len({repr(i.get(k)) for i in idents}) > 1]
        for row, ident in zip(frows, idents):
            parts = [("non-private" if ident.get(k) is None else f"eps={ident[k]:g}") if k == "eps"
                     else str(ident.get(k)) if k == "variant" else f"{k}={ident.get(k)}" for k in varying]
            out.setdefault((family, ", ".join([family] + parts)), []).append(row)
    return out


def _means(points: list[tuple[float, float]]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Mean and std (0 for one point) of y per distinct x, sorted by x."""
    by_x: dict[float, list[float]] = {}
    for x, y in points:
        by_x.setdefault(x, []).append(y)
    xs = np.array(sorted(by_x))
    ys = [by_x[x] for x in xs]
    return xs, np.array([np.mean(v) for v in ys]), np.array([np.std(v, ddof=1) if len(v) > 1 else 0.0 for v in ys])


def _draw(ax, rows: list[dict], x_of: Callable[[dict], float | None], y_of: Callable[[dict], float | None],
          drop: set[str], colors: dict, variant: bool = True, line: bool = True, suffix: str = "") -> int:
    """Mean +- std of ``y_of`` against ``x_of`` per :func:`series`; returns the number of series drawn."""
    drawn, marker_of = 0, {}
    for (family, label), srows in series(rows, drop, variant).items():
        points = [(x_of(r), y_of(r)) for r in srows]
        points = [(x, y) for x, y in points if x is not None and y is not None]
        if not points:
            continue
        xs, ys, sd = _means(points)
        marker = _MARKERS[marker_of.get(family, 0) % len(_MARKERS)]
        marker_of[family] = marker_of.get(family, 0) + 1
        ax.errorbar(xs, ys, yerr=sd, marker=marker, linestyle="-" if line else "none", color=colors.get(family),
                    capsize=3, markersize=4, linewidth=1.2, label=label + suffix)
        drawn += 1
    return drawn


def plot_error_vs_cost(rows: Iterable[dict], out: str | Path, *, x: str = "parameters",
                       fits: dict[str, PowerLawFit] | None = None, frontier: list[dict] | None = None,
                       title: str | None = None) -> Path | None:
    """Test error (1 - ACC) against ``x`` (``parameters`` or ``train_flops``, log scale) per family, with the power-law
    fits of ``fits`` (curve and bootstrap CI band) and the ``frontier`` (:func:`~.analysis.pareto_frontier`)."""
    rows = [r for r in usable(rows) if (as_number(r.get(x)) or 0) > 0]
    if not rows:
        return None
    colors = family_colors(rows)
    fig, (ax,) = _figure(1, 6.0, 4.2)
    _draw(ax, rows, lambda r: float(r[x]), error_of, drop=set(SCALING_AXES), colors=colors, line=False)
    for family, fit in (fits or {}).items():
        if fit is None or not fit.ok:
            continue
        grid = fit.grid if fit.grid is not None else np.geomspace(min(r[x] for r in rows), max(r[x] for r in rows), 60)
        ax.plot(grid, fit.predict(grid), "-", color=colors.get(family), linewidth=1,
                label=f"{family} fit: alpha={fit.alpha:.2f}")
        if fit.band_low is not None:
            ax.fill_between(fit.grid, fit.band_low, fit.band_high, color=colors.get(family), alpha=0.15, linewidth=0)
    if frontier:
        ax.plot([e["cost"] for e in frontier], [e["error"] for e in frontier], "k--", linewidth=1,
                drawstyle="steps-post", label="compute frontier")
    _finish(ax, {"parameters": "parameters", "train_flops": "training FLOPs", "flops": "FLOPs per image"}[x],
            "test error (1 - ACC)", log_x=True)
    return _save(fig, out, title)


def plot_error_vs_parameters(rows: Iterable[dict], out: str | Path, fits: dict[str, PowerLawFit] | None = None,
                             title: str | None = None) -> Path | None:
    """:func:`plot_error_vs_cost` against the parameter count."""
    return plot_error_vs_cost(rows, out, x="parameters", fits=fits, title=title)


def plot_error_vs_flops(rows: Iterable[dict], out: str | Path, fits: dict[str, PowerLawFit] | None = None,
                        frontier: list[dict] | None = None, title: str | None = None) -> Path | None:
    """:func:`plot_error_vs_cost` against the training FLOPs, with the compute frontier."""
    return plot_error_vs_cost(rows, out, x="train_flops", fits=fits, frontier=frontier, title=title)


def _metric(name: str) -> Callable[[dict], float | None]:
    return lambda r: as_number((r.get("metrics") or {}).get(name))


def plot_privacy(rows: Iterable[dict], out: str | Path, title: str | None = None) -> Path | None:
    """Test ACC and AUC against the target epsilon (log scale) per family; the non-private runs of the same series as
    a dashed line. None without private runs."""
    rows = usable(rows)
    if not any(as_number(r.get("target_epsilon")) for r in rows):
        return None
    colors = family_colors(rows)
    fig, axes = _figure(2)
    for ax, metric in zip(axes, ("acc", "auc")):
        y_of = acc_of if metric == "acc" else _metric("test/auc")
        for (family, label), srows in series(rows, {"epsilon"}, variant=False).items():
            private = [r for r in srows if as_number(r.get("target_epsilon"))]
            public = [y for y in map(y_of, (r for r in srows if r.get("target_epsilon") is None)) if y is not None]
            if not private:
                continue
            points = [(float(r["target_epsilon"]), y_of(r)) for r in private if y_of(r) is not None]
            if points:
                xs, ys, sd = _means(points)
                ax.errorbar(xs, ys, yerr=sd, fmt="o-", color=colors.get(family), capsize=3, markersize=4, label=label)
            if public:
                ax.axhline(float(np.mean(public)), color=colors.get(family), linestyle="--", linewidth=1,
                           label=f"{label}, non-private")
        _finish(ax, "target epsilon (DP-SGD)", f"test {metric.upper()}", f"{metric.upper()} vs privacy budget",
                log_x=True, ticks={float(r["target_epsilon"]) for r in rows if as_number(r.get("target_epsilon"))},
                legend=metric == "auc")  # the same series in both panels: one legend
    return _save(fig, out, title)


def plot_train_fraction(rows: Iterable[dict], out: str | Path, title: str | None = None) -> Path | None:
    """Test ACC against the training-set fraction (axis ``train_fraction``) per series. None unless some series has
    two or more fractions."""
    rows = usable(rows)

    def fraction(r: dict) -> float | None:
        return next((as_number(v) for k, v in (r.get("axes") or {}).items() if axis_kind(k) == "train_fraction"), None)

    if len({fraction(r) for r in rows} - {None}) < 2:
        return None
    fig, (ax,) = _figure(1, 6.0, 4.2)
    _draw(ax, [r for r in rows if fraction(r) is not None], fraction, acc_of, {"train_fraction"}, family_colors(rows))
    _finish(ax, "fraction of the training set", "test ACC", log_x=True, ticks={fraction(r) for r in rows} - {None})
    return _save(fig, out, title)


def robustness_metrics(rows: Iterable[dict]) -> tuple[dict[float, str], dict[str, dict[float, str]]]:
    """``({angle: metric}, {attack kind: {eps: metric}})`` from the ``test/<label>/acc`` names present; angle 0 and
    eps 0 are the plain ``test/acc``. Labels that are neither ``rot<angle>`` nor ``<kind>_eps<eps>`` are left out."""
    angles, attacks = {}, {}
    for name in sorted({k for r in rows for k in (r.get("metrics") or {})}):
        parts = name.split("/")
        if len(parts) != 3 or parts[0] != "test" or parts[2] != "acc":
            continue
        if m := _ROTATION.match(parts[1]):
            angles[float(m["angle"])] = name
        elif m := _ATTACK.match(parts[1]):
            attacks.setdefault(m["kind"].lower(), {})[float(m["eps"])] = name
    if angles:
        angles[0.0] = "test/acc"
    for table in attacks.values():
        table[0.0] = "test/acc"
    return angles, attacks


def plot_robustness(rows: Iterable[dict], out: str | Path, title: str | None = None) -> Path | None:
    """Test ACC against the rotation angle (from ``test/rot<angle>/acc``; 0 = plain test ACC) and against the attack
    radius in grey levels (``test/<fgsm|pgd>_eps<eps>/acc``, one line style per attack) per series. Panels without
    data are left out; None when no robustness metric was measured."""
    rows = usable(rows)
    angles, attacks = robustness_metrics(rows)
    measured = {name for table in (angles, *attacks.values()) for name in table.values()} - {"test/acc"}
    rows = [r for r in rows if measured & set(r.get("metrics") or {})]  # runs without these metrics add nothing
    panels = [p for p, on in (("rotation", len(angles) > 1), ("attack", bool(attacks))) if on]
    if not panels:
        return None
    colors = family_colors(rows)
    fig, axes = _figure(len(panels))
    for ax, panel in zip(axes, panels):
        if panel == "rotation":
            expanded = [(r, a) for r in rows for a in angles]
            _draw_long(ax, expanded, angles, colors, "-", "")
            ax.set_xticks(sorted(angles))
            _finish(ax, "rotation angle (degrees)", "test ACC", "ACC under rotation")
        else:
            for i, (kind, table) in enumerate(sorted(attacks.items())):
                _draw_long(ax, [(r, e) for r in rows for e in table], table, colors, ("-", "--", ":")[i % 3],
                           f" ({kind.upper()})")
            _finish(ax, "attack radius eps (grey levels, L-inf)", "test ACC", "ACC under attack")
    return _save(fig, out, title)


def _draw_long(ax, pairs: list[tuple[dict, float]], metric_of: dict[float, str], colors: dict, style: str,
               suffix: str) -> None:
    """Series of (row, x) pairs where y is the metric ``metric_of[x]`` of the row."""
    by_series, marker_of = series([r for r, _ in pairs], drop=set()), {}
    for (family, label), srows in by_series.items():
        marker = _MARKERS[marker_of.get(family, 0) % len(_MARKERS)]
        marker_of[family] = marker_of.get(family, 0) + 1
        ids = {id(r) for r in srows}
        points = [(x, as_number((r.get("metrics") or {}).get(metric_of[x]))) for r, x in pairs if id(r) in ids]
        points = [(x, y) for x, y in points if y is not None]
        if len({x for x, _ in points}) < 2:
            continue
        xs, ys, sd = _means(points)
        ax.errorbar(xs, ys, yerr=sd, linestyle=style, marker=marker, color=colors.get(family), capsize=3,
                    markersize=4, linewidth=1.2, label=label + suffix)
