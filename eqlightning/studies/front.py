"""A multi-objective search's result: the Pareto front of its trials (e.g. validation AUC against FLOPs), drawn next to
reference models, tabulated for the report, and a chosen trial exported as a fit config.

A trial is on the front when no other complete trial is at least as good in every objective and better in one. The
front is computed on the search's own objectives (validation metrics and costs), never on test metrics; the test
metrics of the front's trials are shown beside it, to be read, not to choose by.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np
import yaml

from .analysis import as_number, config_axes, group_rows
from .spec import COST_OBJECTIVES, Objective, StudySpec

_COST_LABELS = {"flops": "FLOPs per image", "parameters": "parameters", "train_flops": "training FLOPs"}


def objective_values(row: dict, objectives: Sequence[Objective]) -> list[float | None]:
    """A row's value of each objective: what the store recorded for the search, else the row's own fields."""
    recorded = row.get("objectives") or []
    values = []
    for index, objective in enumerate(objectives):
        value = recorded[index] if index < len(recorded) else None
        if value is None:
            value = row.get("val") if index == 0 else row.get(objective.metric)
        values.append(as_number(value))
    return values


def nondominated(values: Sequence[Sequence[float]], directions: Sequence[str]) -> list[bool]:
    """For each point, whether no other point is at least as good in every objective and better in one."""
    signs = np.array([1.0 if d == "maximize" else -1.0 for d in directions])
    points = np.asarray(values, dtype=float).reshape(len(values), len(directions)) * signs  # larger is better
    keep = []
    for p in points:
        dominated = np.any(np.all(points >= p, axis=1) & np.any(points > p, axis=1))
        keep.append(not bool(dominated))
    return keep


def search_front(rows: Iterable[dict], objectives: Sequence[Objective]) -> tuple[list[dict], list[dict]]:
    """``(trials, front)``: the complete rows with every objective measured (each with ``values``), and those on the
    Pareto front, sorted by their second objective (the cost)."""
    trials = []
    for row in rows:
        values = objective_values(row, objectives)
        if row.get("state") == "complete" and all(v is not None for v in values):
            trials.append({**row, "values": values})
    if not trials:
        return [], []
    flags = nondominated([t["values"] for t in trials], [o.direction for o in objectives])
    front = [t for t, on in zip(trials, flags) if on]
    order = 1 if len(objectives) > 1 else 0
    return trials, sorted(front, key=lambda t: (t["values"][order], t["trial"]))


def reference_points(rows: Iterable[dict], objectives: Sequence[Objective]) -> list[dict]:
    """Reference models (another study's complete runs), seeds averaged per variant and configuration: ``{label,
    values, values_std, test_acc, test_auc, runs}``, for the front's plot and table."""
    points = []
    complete = [r for r in rows if r.get("state") == "complete"]
    def label(row: dict) -> str:  # a variant's configs are kept apart (e.g. all data vs a quarter of it)
        axes = ", ".join(f"{k.split('.')[-1]}={v}" for k, v in sorted(config_axes(row).items()))
        return f"{row['variant']} ({axes})" if axes else row["variant"]

    for variant, runs in sorted(group_rows(complete, label).items()):
        columns = list(zip(*(objective_values(r, objectives) for r in runs)))
        if any(all(v is None for v in column) for column in columns):
            continue
        means = [float(np.mean([v for v in c if v is not None])) for c in columns]
        stds = [float(np.std([v for v in c if v is not None], ddof=1)) if sum(v is not None for v in c) > 1 else None
                for c in columns]
        metric = lambda name: _mean((r.get("metrics") or {}).get(name) for r in runs)  # noqa: E731
        points.append({"label": variant, "values": means, "values_std": stds, "test_acc": metric("test/acc"),
                       "test_auc": metric("test/auc"), "parameters": _mean(r.get("parameters") for r in runs),
                       "flops": _mean(r.get("flops") for r in runs), "runs": len(runs)})
    return points


def _mean(values: Iterable[Any]) -> float | None:
    numbers = [v for v in (as_number(x) for x in values) if v is not None]
    return float(np.mean(numbers)) if numbers else None


def _label(objective: Objective) -> str:
    return _COST_LABELS.get(objective.metric, objective.metric)


def plot_front(rows: Iterable[dict], objectives: Sequence[Objective], out: str | Path, *,
               references: Sequence[dict] = (), title: str | None = None) -> Path | None:
    """The first objective (y) against the second (x; log scale for a cost): every trial, the Pareto front as a
    staircase with trial numbers, and the ``references`` (:func:`reference_points`) as labelled stars."""
    from .plots import _figure, _finish, _save, family_colors

    if len(objectives) < 2:
        return None
    trials, front = search_front(rows, objectives)
    if not trials:
        return None
    fig, (ax,) = _figure(1, 6.4, 4.4)
    colors = family_colors(trials)
    for variant, vrows in sorted(group_rows(trials, lambda r: r["variant"]).items()):
        ax.scatter([t["values"][1] for t in vrows], [t["values"][0] for t in vrows], s=18, alpha=0.55,
                   color=colors.get(vrows[0].get("family")), label=f"trials ({variant})" if variant != "default"
                   else "trials")
    ax.plot([t["values"][1] for t in front], [t["values"][0] for t in front], "k-", linewidth=1,
            drawstyle="steps-post" if objectives[0].direction == "maximize" else "default", label="Pareto front")
    ax.scatter([t["values"][1] for t in front], [t["values"][0] for t in front], s=36, facecolors="none",
               edgecolors="k", linewidths=1.2)
    for t in front:
        ax.annotate(f"#{t['trial']}", (t["values"][1], t["values"][0]), textcoords="offset points", xytext=(4, -9),
                    fontsize=7)
    for index, ref in enumerate(references):
        x, y = ref["values"][1], ref["values"][0]
        yerr = ref["values_std"][0]
        ax.errorbar([x], [y], yerr=None if yerr is None else [yerr], fmt="*", markersize=11, capsize=3,
                    color=f"C{(index + 3) % 10}", label=f"{ref['label']} ({ref['runs']} runs)")
    log_x = objectives[1].metric in COST_OBJECTIVES
    _finish(ax, f"{_label(objectives[1])} ({objectives[1].direction})",
            f"{_label(objectives[0])} ({objectives[0].direction})", log_x=log_x)
    return _save(fig, out, title)


def _count(value: Any) -> str:
    number = as_number(value)
    if number is None:
        return "–"
    for scale, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(number) >= scale:
            return f"{number / scale:.3g}{suffix}"
    return f"{number:.3g}"


def _fmt(objective: Objective, value: Any) -> str:
    return _count(value) if objective.metric in COST_OBJECTIVES else _score(value)


def _score(value: Any) -> str:
    number = as_number(value)
    return "–" if number is None else f"{number:.3f}"


def _metric(row: dict, name: str) -> str:
    return _score((row.get("metrics") or {}).get(name))


def _axes_text(row: dict) -> str:
    """``lr=0.00429, stages.2.kernel=5, group=['C4', 'C1']``: short keys (a list entry keeps its index)."""
    def short(key: str) -> str:
        parts = key.split(".")
        return ".".join(parts[-3:]) if len(parts) > 2 and parts[-2].isdigit() else parts[-1]

    def value(v: Any) -> str:
        return f"{v:.3g}" if isinstance(v, float) else str(v)

    return ", ".join(f"{short(k)}={value(v)}" for k, v in sorted((row.get("axes") or {}).items()) if k != "seed")


def front_section(rows: Sequence[dict], objectives: Sequence[Objective], out_dir: str | Path, *,
                  references: Sequence[dict] = (), reference_note: str | None = None) -> list[str]:
    """The report's Markdown section for a multi-objective search: the plot, the front and the references."""
    trials, front = search_front(rows, objectives)
    lines = ["## Search: Pareto front", ""]
    if not trials:
        return lines + ["No complete trial with every objective measured yet: no front.", ""]
    names = ", ".join(f"{o.metric} ({o.direction})" for o in objectives)
    lines += [f"{len(front)} of {len(trials)} complete trials are Pareto-optimal in {names}. The front is chosen on "
              f"these objectives only; test metrics are shown beside it, not used to choose. "
              f"`eqlightning study export <study> --trial N --out configs/<name>.yaml` writes a trial as a fit "
              f"config.", ""]
    path = plot_front(rows, objectives, Path(out_dir) / "pareto_front.png", references=references)
    if path is not None:
        lines += [f"![Pareto front]({path.name})", ""]
    header = ["trial", "variant", *(o.metric for o in objectives), "test ACC", "test AUC", "parameters", "FLOPs",
              "searched values"]
    body = [[f"#{t['trial']}", t["variant"], *(_fmt(o, v) for o, v in zip(objectives, t["values"])),
             _metric(t, "test/acc"), _metric(t, "test/auc"), _count(t.get("parameters")), _count(t.get("flops")),
             _axes_text(t)] for t in front]
    lines += _table(header, body)
    if references:
        lines += ["References (seeds averaged; " + (reference_note or "another study's runs") + "):", ""]
        lines += _table(["model", *(o.metric for o in objectives), "test ACC", "test AUC", "parameters", "FLOPs",
                         "runs"],
                        [[r["label"], *(_fmt(o, v) for o, v in zip(objectives, r["values"])),
                          _score(r["test_acc"]), _score(r["test_auc"]),
                          _count(r["parameters"]), _count(r["flops"]), r["runs"]] for r in references])
    return lines


def _table(header: Sequence[str], rows: Iterable[Sequence[Any]]) -> list[str]:
    cells = lambda row: "| " + " | ".join(str(c).replace("|", "\\|") for c in row) + " |"  # noqa: E731
    return [cells(header), cells(["---"] * len(header)), *(cells(r) for r in rows), ""]


def front_yaml(rows: Sequence[dict], objectives: Sequence[Objective]) -> list[dict]:
    """The front as plain data (``pareto.yaml``): trial, variant, key, objective values, test metrics, axes."""
    _, front = search_front(rows, objectives)
    return [{"trial": t["trial"], "variant": t["variant"], "key": t["key"],
             **{o.metric: t["values"][i] for i, o in enumerate(objectives)},
             "test": {k: v for k, v in (t.get("metrics") or {}).items() if k in ("test/acc", "test/auc")},
             "axes": {k: v for k, v in (t.get("axes") or {}).items() if k != "seed"}} for t in front]


def export_trial(spec: StudySpec, rows: Sequence[dict], trial: int, out: str | Path, *, variant: str | None = None,
                 force: bool = False) -> Path:
    """Write trial ``trial``'s fit config (its base, overrides and searched values, resolved) to ``out``, with a
    header saying where it came from. Refuses to overwrite an existing file unless ``force``."""
    matches = [r for r in rows if r.get("trial") == trial and (variant is None or r["variant"] == variant)]
    if not matches:
        known = ", ".join(f"#{r['trial']} ({r['variant']})" for r in rows[:20])
        raise ValueError(f"trial {trial}{'' if variant is None else f' of variant {variant!r}'} is not in study "
                         f"{spec.name}; its trials: {known or 'none yet'}")
    if len(matches) > 1:
        raise ValueError(f"trial {trial} exists in variants {', '.join(r['variant'] for r in matches)}: pass "
                         f"--variant to choose")
    row = matches[0]
    if row["state"] != "complete":
        raise ValueError(f"trial {trial} is {row['state']}, not complete: export a trial that ran (see the report)")
    out = Path(out)
    if out.exists() and not force:
        raise FileExistsError(f"{out} exists; pass --force to overwrite it, or choose another path")
    run = spec.run(spec.variant(row["variant"]), _planned_axes(spec, row))
    if run.key != row["key"]:
        raise ValueError(f"trial {trial}'s config no longer follows from {spec.path} (its base or search space "
                         f"changed since it ran): export from the config in {spec.directory / 'configs'} instead")
    config = dict(run.config)
    config["run_name"] = f"{spec.name}-trial{trial}"
    callbacks = [c for c in (config.get("trainer") or {}).get("callbacks") or []
                 if not str((c or {}).get("class_path", "")).endswith("EarlyStopping")]
    if config.get("trainer") is not None:
        config["trainer"]["callbacks"] = callbacks
        if not callbacks:
            del config["trainer"]["callbacks"]
    result = {m: v for m, v in zip([o.metric for o in spec.search.objectives] if spec.search else ["val"],
                                   row.get("objectives") or [row.get("val")])}
    header = [f"# Trial #{trial} of study {spec.name} ({spec.path.name}), variant {row['variant']}, run key "
              f"{row['key']}.",
              "# In the search: " + ", ".join(f"{k} = {_plain(v)}" for k, v in result.items()) + "; "
              + ", ".join(f"{k} = {_plain(v)}" for k, v in sorted((row.get("metrics") or {}).items())
                          if k in ("test/acc", "test/auc")) + " (seed " + str(row.get("seed")) + ").",
              f"#   python cli.py fit --config {out}"]
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text("\n".join(header) + "\n" + yaml.safe_dump(config, sort_keys=False))
    tmp.replace(out)
    return out


def _planned_axes(spec: StudySpec, row: dict) -> dict:
    """The axes the store recorded for the row's trial (unflattened, as planned)."""
    import json

    from .store import StudyStore

    store = StudyStore(spec)
    for trial in store.trials(row["variant"]):
        if trial.number == row["trial"]:
            return json.loads(trial.user_attrs.get("axes") or "{}")
    raise ValueError(f"trial {row['trial']} has no recorded axes")


def _plain(value: Any) -> str:
    number = as_number(value)
    if number is None:
        return "–"
    return f"{number:.4g}" if not float(number).is_integer() or abs(number) < 1e4 else _count(number)


