"""``write_report``: a study's Markdown report (``report.md``), its fit numbers (``fits.json``), one CSV row per run
(``results.csv``) and the figures (PNGs), from the store's result rows. Works with any subset of results: a section
without data is replaced by one line saying why.

Sections: header (run counts, recipe selection), results per dataset (mean +- std over seeds) next to published
numbers, scaling fits per family (error vs parameters and vs training FLOPs, with bootstrap CIs), per-axis exponents
and which axis to scale first, the compute frontier, privacy, data efficiency, robustness, failed runs.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import math
import re
from collections import Counter
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np

from . import plots
from .analysis import (AxisExponent, PowerLawFit, as_number, axis_exponents, axis_kind, condition_label, condition_of,
                       config_axes, fits_by_family, group_rows, pareto_frontier, robustness_labels, summary_table,
                       usable)
from .references import references_for

_ROW_FIELDS = ("variant", "key", "state", "seed", "family", "dataset", "parameters", "flops", "train_flops",
               "epsilon", "target_epsilon", "val", "wall_time_s", "duration_s", "error")
_COST_NAMES = {"parameters": "parameters", "train_flops": "training FLOPs", "flops": "FLOPs per image"}


# -- formatting --------------------------------------------------------------------------------------------------------
def _f(value: Any, spec: str = ".3f") -> str:
    number = as_number(value)
    return "–" if number is None else format(number, spec)


def _pm(mean: Any, std: Any) -> str:
    return _f(mean) if as_number(std) is None else f"{_f(mean)} ± {_f(std)}"


def _ci(value: Any, ci: Sequence[float] | None, spec: str = ".3f") -> str:
    return _f(value, spec) if ci is None else f"{_f(value, spec)} [{_f(ci[0], spec)}, {_f(ci[1], spec)}]"


def _count(value: Any) -> str:
    """1234567 -> 1.23M, 36112 -> 36.1k."""
    number = as_number(value)
    if number is None:
        return "–"
    for scale, suffix in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(number) >= scale:
            return f"{number / scale:.3g}{suffix}"
    return f"{number:.3g}"


def _eps(value: Any) -> str:
    return "non-private" if value is None else _f(value, "g")


def _table_axes(rows: list[dict]) -> list[str]:
    """Axis keys to show as columns: all but seeds and epsilon (the target epsilon has its own column)."""
    return sorted({k for r in rows for k in config_axes(r) if axis_kind(k) != "epsilon"})


def _table(header: Sequence[str], rows: Iterable[Sequence[Any]]) -> list[str]:
    cells = lambda row: "| " + " | ".join(str(c).replace("|", "\\|") for c in row) + " |"  # noqa: E731
    return [cells(header), cells(["---"] * len(header)), *(cells(r) for r in rows), ""]


def _slug(*parts: Any) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "-", "_".join(str(p) for p in parts)).strip("-").lower() or "all"


def _axis_name(key: str) -> str:
    """The last part of a dotted key; a list entry keeps its index (``stages.1.kernel``)."""
    parts = key.split(".")
    return ".".join(parts[-3:]) if len(parts) > 2 and parts[-2].isdigit() else parts[-1]


def _value(value: Any) -> str:
    """An axis value in a table cell ("–" where the run did not set the axis)."""
    return "–" if value is None else str(value)


# -- JSON / CSV --------------------------------------------------------------------------------------------------------
def json_safe(value: Any) -> Any:
    """``value`` with fits as dicts, numpy scalars as Python numbers, NaN/inf as None, tuples as lists."""
    if isinstance(value, (PowerLawFit, AxisExponent)):
        return json_safe(value.to_dict())
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return json_safe(dataclasses.asdict(value))
    if isinstance(value, dict):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return str(value)


def write_results_csv(rows: Sequence[dict], path: str | Path) -> Path:
    """One line per run: the row's fields, then ``axes.<key>`` and ``metrics.<name>`` columns (union over rows)."""
    extra = sorted({k for r in rows for k, v in r.items()
                    if k not in (*_ROW_FIELDS, "axes", "metrics") and not isinstance(v, (dict, list))})
    axes = sorted({k for r in rows for k in (r.get("axes") or {})})
    metrics = sorted({k for r in rows for k in (r.get("metrics") or {})})
    path = Path(path)
    with path.open("w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow([*_ROW_FIELDS, *extra, *(f"axes.{k}" for k in axes), *(f"metrics.{k}" for k in metrics)])
        for r in rows:
            writer.writerow([r.get(k) for k in (*_ROW_FIELDS, *extra)] + [(r.get("axes") or {}).get(k) for k in axes]
                            + [(r.get("metrics") or {}).get(k) for k in metrics])
    return path


# -- sections ----------------------------------------------------------------------------------------------------------
def _header(rows: list[dict], title: str, selection: str | None) -> list[str]:
    states = Counter(str(r.get("state")) for r in rows)
    other = {k: v for k, v in states.items() if k not in ("complete", "failed")}
    lines = [f"# {title}", "",
             f"- Runs: {len(rows)} planned, {states.get('complete', 0)} complete, {states.get('failed', 0)} failed"
             + "".join(f", {v} {k}" for k, v in sorted(other.items())) + "."]
    untested = states.get("complete", 0) - len(usable(rows))
    if untested:
        lines.append(f"- {untested} complete run(s) have no numeric test/acc and are left out of every table and fit.")
    if selection:
        lines.append(f"- Recipe selection: {selection.strip().rstrip('.')}.")
    lines += ["- Error = 1 - test ACC. Values are means ± sample std over seeds (std omitted for a single seed); "
              "published numbers are quoted from their sources, not measured here.", ""]
    return lines


def _results(drows: list[dict], dataset: str) -> list[str]:
    axes = _table_axes(drows)
    table = summary_table(drows, by=("variant", "family", "target_epsilon", *axes))
    lines = _table(["variant", "family", "target eps", *map(_axis_name, axes), "runs", "test ACC", "test AUC",
                    "val (selection)", "parameters", "eps spent", "wall time (s)"],
                   [[e["variant"], e["family"], _eps(e["target_epsilon"]), *(_value(e[k]) for k in axes), e["n"],
                     _pm(e["acc_mean"], e["acc_std"]), _pm(e["auc_mean"], e["auc_std"]), _f(e["val_mean"]),
                     _count(e["parameters"]),
                     _f(e["epsilon"], ".2f"), _f(e["wall_time_s"], ".0f")] for e in table])
    refs = references_for(dataset)
    if refs:
        lines += [f"Published numbers for {dataset} (not measured here):", ""]
        lines += _table(["model", "ACC", "AUC", "eps", "source"],
                        [[r["model"], _f(r["acc"]), _f(r["auc"]), _eps(r["epsilon"]), r["source"]] for r in refs])
    else:
        lines += [f"No published reference numbers for {dataset} in `references.py`.", ""]
    return lines


def _fit_rows(fits: dict[str, PowerLawFit], cost: str) -> list[list[Any]]:
    out = []
    for family, fit in fits.items():
        if fit.ok:
            boot = (f"{fit.n_boot}" if fit.n_boot_distinct >= 20 else
                    f"{fit.n_boot} (only {fit.n_boot_distinct} distinct resamples: CIs not meaningful)")
            out.append([family, _COST_NAMES[cost], fit.n_points, fit.n_unique_x, _ci(fit.E, fit.E_ci),
                        _ci(fit.A, fit.A_ci, ".3g"), _ci(fit.alpha, fit.alpha_ci), boot])
        else:
            out.append([family, _COST_NAMES[cost], fit.n_points, fit.n_unique_x, "–", "–", "–", fit.reason])
    return out


def _scaling(crows: list[dict], tag: str, out_dir: Path, fit_kw: dict) -> tuple[list[str], dict]:
    """Fits and figures of one condition; ([], {}) when no family has 3 distinct sizes."""
    fits = {cost: fits_by_family(crows, x=cost, **fit_kw) for cost in ("parameters", "train_flops")}
    if not any(f.ok for by_family in fits.values() for f in by_family.values()):
        return [], {}
    lines = _table(["family", "vs", "runs", "distinct sizes", "E [CI]", "A [CI]", "alpha [CI]", "bootstrap fits"],
                   _fit_rows(fits["parameters"], "parameters") + _fit_rows(fits["train_flops"], "train_flops"))
    frontier = pareto_frontier(crows, "train_flops")
    for cost, path in (("parameters", plots.plot_error_vs_parameters(crows, out_dir / f"error_vs_parameters_{tag}.png",
                                                                     fits=fits["parameters"])),
                       ("train_flops", plots.plot_error_vs_flops(crows, out_dir / f"error_vs_flops_{tag}.png",
                                                                 fits=fits["train_flops"], frontier=frontier))):
        if path is not None:
            lines += [f"![error vs {_COST_NAMES[cost]}]({path.name})", ""]
    return lines, fits


def _axes_section(crows: list[dict], fit_kw: dict) -> tuple[list[str], dict]:
    result = axis_exponents(crows, **fit_kw)
    if not any(a.slope is not None for entry in result.values() for a in entry["axes"].values()):
        return [], result
    table, verdicts = [], []
    for family, entry in result.items():
        for name, a in entry["axes"].items():
            by_params = a.vs_parameters
            table.append([family, name, ", ".join(map(str, a.values)), a.n_points,
                          _ci(by_params.alpha, by_params.alpha_ci) if by_params and by_params.ok else "–",
                          _ci(a.slope, a.slope_ci),
                          _f(None if a.slope is None else 100 * a.decrease_per_doubling, ".1f"),
                          a.context if a.reason is None else a.reason])
        best = entry["scale_first"]
        if best is None:
            verdicts.append(f"- **{family}**: {entry['reason']}.")
        else:
            a = entry["axes"][best]
            n = sum(x.slope is not None for x in entry["axes"].values())
            confidence = ("only axis measured" if n == 1 else "its CI is below every other axis's"
                          if entry["clear"] else "CIs overlap: not a clear winner")
            cost = _COST_NAMES.get(a.cost, a.cost)
            if a.decrease_per_doubling <= 0:  # the best axis does not reduce the error: say so, not "scale it"
                verdicts.append(f"- **{family}**: no measured axis reduces the error ({best}: "
                                f"{-100 * a.decrease_per_doubling:.1f}% more error per doubling of {cost}).")
                continue
            verdicts.append(f"- **{family}**: scale **{best}** first: {100 * a.decrease_per_doubling:.1f}% less error "
                            f"per doubling of {cost} ({confidence}).")
    lines = _table(["family", "axis", "values", "runs", "alpha vs parameters [CI]",
                    "slope d log err / d log FLOPs [CI]", "error decrease per FLOPs doubling (%)", "held fixed / note"],
                   table)
    return lines + verdicts + [""], result


def _frontier(prows: list[dict]) -> list[str]:
    frontier = pareto_frontier(prows, "train_flops")
    if not frontier:
        return []
    return _table(["training FLOPs", "variant", "family", "axes", "runs", "test error", "parameters"],
                  [[_count(e["cost"]), e["variant"], e["family"],
                    ", ".join(f"{_axis_name(k)}={v}" for k, v in sorted(e["axes"].items())
                              if axis_kind(k) != "epsilon") or "–", e["n"],
                    _pm(e["error"], e["error_std"]), _count(e["parameters"])] for e in frontier])


def _robustness(drows: list[dict], tag: str, out_dir: Path) -> list[str]:
    labels = robustness_labels(drows)
    if not labels:
        return [f"No robustness metrics (test/<transform or attack>/acc) in these runs: add the Robustness callback "
                f"to measure them.", ""]
    axes = _table_axes(drows)
    table = summary_table(drows, by=("variant", "family", "target_epsilon", *axes))
    lines = _table(["variant", "family", "target eps", *map(_axis_name, axes), "test ACC", *labels],
                   [[e["variant"], e["family"], _eps(e["target_epsilon"]), *(_value(e[k]) for k in axes),
                     _f(e["acc_mean"]),
                     *(_f(e["robustness"].get(label)) for label in labels)] for e in table])
    path = plots.plot_robustness(drows, out_dir / f"robustness_{tag}.png", title="robustness")
    return lines + ([f"![robustness]({path.name})", ""] if path else [])


def _failed(rows: list[dict]) -> list[str]:
    failed = [r for r in rows if r.get("state") == "failed"]
    if not failed:
        return ["No failed runs.", ""]
    return [f"- `{r.get('variant')}` seed {r.get('seed')} (key `{str(r.get('key'))[:10]}`, axes "
            f"{json.dumps(config_axes(r), default=str)}): {str(r.get('error') or 'no error recorded').splitlines()[0]}"
            for r in failed] + [""]


def _frontier_section(drows: list[dict], entry: dict) -> list[str]:
    """The compute frontier per privacy level, over every config at that level (all sizes, data fractions, recipes)."""
    lines = ["### Compute frontier", "",
             "The configs with the lowest error at each training-FLOPs budget (seeds averaged), per privacy level, "
             "over every config at that level (all sizes, data fractions, recipes).", ""]
    entry["frontier"] = {}
    for eps, prows in sorted(group_rows(drows, lambda r: r.get("target_epsilon")).items(),
                             key=lambda kv: (kv[0] is not None, as_number(kv[0]) or 0)):
        table = _frontier(prows)
        if table:
            lines += [f"**{condition_label((None, eps, ()))}**", ""] + table
            entry["frontier"][_eps(eps)] = pareto_frontier(prows, "train_flops")
    if len(lines) == 4:
        lines[2] = "No run has training FLOPs recorded: no frontier."
    return lines + [""]


def _listed(labels: list[str]) -> str:
    return "; ".join(labels[:5]) + ("; ..." if len(labels) > 5 else "")


def _scaling_sections(drows: list[dict], tag: str, out_dir: Path, fit_kw: dict) -> tuple[list[str], list[dict]]:
    """"Scaling fits" and "Which axis to scale first" of one dataset, per condition (:func:`condition_of`)."""
    scaling, axes = ["### Scaling fits: err = E + A * x^(-alpha)", ""], ["### Which axis to scale first", ""]
    unfit, unmeasured, entries = [], [], []
    conditions = sorted(group_rows(drows, condition_of).items(), key=lambda kv: condition_label(kv[0]))
    for i, (condition, crows) in enumerate(conditions):
        label = condition_label(condition)
        fit_lines, fits = _scaling(crows, f"{tag}_{i}_{_slug(label)[:40]}", out_dir, fit_kw)
        axis_lines, axis_result = _axes_section(crows, fit_kw)
        scaling += [f"**{label}**", ""] + fit_lines if fit_lines else []
        axes += [f"**{label}**", ""] + axis_lines if axis_lines else []
        unfit += [] if fit_lines else [label]
        unmeasured += [] if axis_lines else [label]
        entries.append({"condition": label, "fits": fits, "axes": axis_result})
    if unfit:
        scaling.append(f"No fit for {len(unfit)} condition(s) ({_listed(unfit)}): no family has runs at >= 3 distinct "
                       f"sizes there.")
    if unmeasured:
        axes.append(f"No per-axis exponent for {len(unmeasured)} condition(s) ({_listed(unmeasured)}): no scaling axis "
                    f"(width, depth, resolution, phi) takes >= 3 values there with the other axes fixed.")
    return scaling + [""] + axes + [""], entries


def _dataset_section(dataset: str, drows: list[dict], out_dir: Path, fit_kw: dict) -> tuple[list[str], dict]:
    """Every section of one dataset, and its part of fits.json."""
    tag = _slug(dataset)
    lines = [f"## {dataset}", "", "### Results", ""] + _results(drows, dataset)
    scaling, conditions = _scaling_sections(drows, tag, out_dir, fit_kw)
    entry: dict[str, Any] = {"conditions": conditions}
    lines += scaling + _frontier_section(drows, entry) + ["### Privacy", ""]
    path = plots.plot_privacy(drows, out_dir / f"privacy_{tag}.png", title=f"{dataset}: ACC/AUC vs epsilon")
    lines += [f"![ACC and AUC vs epsilon]({path.name})", ""] if path else ["No private runs: no privacy plot.", ""]
    lines += ["### Data efficiency", ""]
    path = plots.plot_train_fraction(drows, out_dir / f"train_fraction_{tag}.png", title=f"{dataset}: ACC vs data")
    lines += ([f"![ACC vs training fraction]({path.name})", ""] if path
              else ["data.train_fraction takes fewer than 2 values: no data-efficiency plot.", ""])
    return lines + ["### Robustness", ""] + _robustness(drows, tag, out_dir), entry


# -- the report --------------------------------------------------------------------------------------------------------
def write_report(rows: Iterable[dict], out_dir: str | Path, *, title: str, study_config_text: str | None = None,
                 selection: str | None = None, n_boot: int = 1000, seed: int = 0, objectives: Sequence | None = None,
                 references: Sequence[dict] = (), reference_note: str | None = None) -> Path:
    """Write ``report.md``, ``fits.json``, ``results.csv`` and the PNGs into ``out_dir``; return the report's path.

    Args:
        rows: the store's result rows (any states; only complete rows with a test ACC enter tables and fits).
        out_dir: created if missing; files of an earlier report there are overwritten.
        title: the report's heading.
        study_config_text: the study file's text, quoted at the end of the report.
        selection: how the recipes were chosen (e.g. "recipe selected on val/auc by a 20-trial TPE search").
        n_boot, seed: bootstrap samples and seed of every fit's CI (fewer = faster, coarser CIs).
        objectives: a multi-objective search's objectives: adds the Pareto front section (:mod:`.front`), with
            ``references`` (:func:`.front.reference_points`, described by ``reference_note``) beside it.
    """
    rows, out_dir = list(rows), Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    write_results_csv(rows, out_dir / "results.csv")
    good = usable(rows)
    lines = _header(rows, title, selection)
    if objectives is not None and len(objectives) > 1:
        from .front import front_section

        lines += front_section(rows, objectives, out_dir, references=references, reference_note=reference_note)
    fits_json: dict[str, Any] = {"title": title, "n_boot": n_boot, "error": "1 - test/acc", "datasets": {}}
    if not good:
        lines += ["## Results", "", "No complete run with a test ACC yet: nothing to tabulate or fit.", ""]
    for dataset, drows in sorted(group_rows(good, lambda r: str(r.get("dataset") or "unknown")).items()):
        section, fits_json["datasets"][dataset] = _dataset_section(dataset, drows, out_dir,
                                                                   {"n_boot": n_boot, "seed": seed})
        lines += section
    lines += ["## Failed runs", ""] + _failed(rows)
    if study_config_text:
        lines += ["## Study config", "", "```yaml", study_config_text.rstrip(), "```", ""]
    (out_dir / "fits.json").write_text(json.dumps(json_safe(fits_json), indent=1, allow_nan=False) + "\n")
    path = out_dir / "report.md"
    path.write_text("\n".join(lines).rstrip() + "\n")
    return path
