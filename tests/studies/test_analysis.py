"""eqlightning.studies analysis, plots and report: fits on synthetic data with known parameters, tables on
hand-made rows, and the report on synthetic study results (no training, no torch)."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from eqlightning.studies import plots
from eqlightning.studies.analysis import (axis_exponents, bootstrap_indices, fit_power_law, fits_by_family,
                                          pareto_frontier, summary_table)
from eqlightning.studies.references import references_for
from eqlightning.studies.report import write_report

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def row(variant="eq_d4", family="D4", seed=0, acc=0.8, auc=0.9, axes=None, state="complete", dataset="pneumoniamnist",
        parameters=1000, flops=1e6, train_flops=1e12, epsilon=None, target_epsilon=None, metrics=None, error=None,
        wall=10.0):
    """One result row as the store produces it."""
    m = {"test/acc": acc, "test/auc": auc, **(metrics or {})} if state == "complete" else {}
    return {"variant": variant, "key": f"{variant}-{json.dumps(axes, sort_keys=True)}-{seed}", "state": state,
            "seed": seed, "axes": {**(axes or {}), "seed": seed}, "family": family, "dataset": dataset,
            "parameters": parameters, "flops": flops, "train_flops": train_flops, "epsilon": epsilon,
            "target_epsilon": target_epsilon, "metrics": m, "val": 0.9, "wall_time_s": wall, "error": error,
            "duration_s": wall}


def synthetic(x, E=0.1, A=2.0, alpha=0.5, noise=0.02, seed=0):
    rng = np.random.default_rng(seed)
    x = np.asarray(x, dtype=float)
    return (E + A * x ** -alpha) * np.exp(rng.normal(0.0, noise, len(x)))


# -- power law ---------------------------------------------------------------------------------------------------------
def test_fit_recovers_known_parameters():
    x = np.geomspace(1e2, 1e6, 8)
    fit = fit_power_law(x, synthetic(x), n_boot=200)
    assert fit.ok and fit.n_unique_x == 8 and fit.n_boot >= 190
    assert fit.alpha_ci[0] <= 0.5 <= fit.alpha_ci[1]
    assert abs(fit.alpha - 0.5) < 0.08 and abs(fit.E - 0.1) < 0.01 and 1.3 < fit.A < 3.0
    assert fit.E_ci[0] <= 0.1 <= fit.E_ci[1]
    # predictions and the band cover the fitted range
    assert np.allclose(fit.predict(x), 0.1 + 2 * x ** -0.5, rtol=0.05)
    lo, hi = fit.band(x)
    assert np.all(lo <= hi) and np.all(lo <= fit.predict(x) + 1e-9) and np.all(fit.predict(x) <= hi + 1e-9)
    assert json.loads(json.dumps(fit.to_dict()))["alpha_ci"] == list(fit.alpha_ci)


def test_fit_tells_exponents_apart():
    """Catches a wrong sign or scale of the exponent: alpha 0.3 and 0.8 must come out as such."""
    x = np.geomspace(10, 1e5, 8)
    slow = fit_power_law(x, synthetic(x, A=1.0, alpha=0.3, noise=0.01), n_boot=50)
    fast = fit_power_law(x, synthetic(x, A=1.0, alpha=0.8, noise=0.01), n_boot=50)
    assert abs(slow.alpha - 0.3) < 0.06 and abs(fast.alpha - 0.8) < 0.15
    assert slow.alpha_ci[1] < fast.alpha_ci[0]


def test_fit_bootstraps_whole_groups():
    x = np.repeat(np.geomspace(1e2, 1e6, 5), 3)  # 5 configs x 3 seeds
    err = synthetic(x, noise=0.03, seed=1)
    groups = np.repeat(np.arange(5), 3)
    fit = fit_power_law(x, err, groups=groups, n_boot=100, seed=3)
    assert fit.ok and fit.n_groups == 5 and fit.n_points == 15 and fit.n_boot == 100
    assert fit.alpha_ci[0] <= 0.5 <= fit.alpha_ci[1]
    assert fit_power_law(x, err, n_boot=100, seed=3).n_groups == 15
    # a fixed seed gives the same CI; groups of the wrong length are refused
    assert fit_power_law(x, err, groups=groups, n_boot=100, seed=3).alpha_ci == fit.alpha_ci
    with pytest.raises(ValueError, match="one group label per point"):
        fit_power_law(x, err, groups=groups[:-1], n_boot=10)


def test_bootstrap_fits_match_scipy_refits():
    """The batched bootstrap refits (weighted LM) land where a full fit of each resample does (least_squares)."""
    x = np.repeat(np.geomspace(1e2, 1e6, 5), 2)
    err = synthetic(x, noise=0.03, seed=2)
    fit = fit_power_law(x, err, n_boot=4, seed=5)
    for k, idx in enumerate(bootstrap_indices(x, None, 4, 5)):
        refit = fit_power_law(x[idx], err[idx], n_boot=0)
        assert np.allclose(fit.boot[k], [refit.E, refit.A, refit.alpha], rtol=1e-3, atol=1e-5)


def test_fit_needs_three_sizes():
    fit = fit_power_law([1e3, 1e3, 1e4], [0.3, 0.31, 0.2], n_boot=10)
    assert not fit.ok and fit.reason == "needs >= 3 distinct sizes, got 2" and fit.alpha is None
    assert fit.to_dict()["reason"] == fit.reason
    with pytest.raises(ValueError, match="x must be finite and > 0"):
        fit_power_law([0, 1, 2], [0.3, 0.2, 0.1])


# -- rows --------------------------------------------------------------------------------------------------------------
def test_fits_by_family_separates_families():
    rows = []
    for family, alpha in (("D4", 0.6), ("plain", 0.3)):
        for p in np.geomspace(1e2, 1e6, 5):
            for s in (0, 1):
                err = synthetic([p], alpha=alpha, noise=0.01, seed=s)[0]
                rows.append(row(family=family, seed=s, acc=1 - err, parameters=int(p), axes={"width": float(p)}))
    rows.append(row(state="failed", error="boom", parameters=None))
    fits = fits_by_family(rows, "parameters", n_boot=30)
    assert set(fits) == {"D4", "plain"} and fits["D4"].n_groups == 5
    assert fits["D4"].alpha > fits["plain"].alpha + 0.15


def scaling_rows():
    """Family D4: error falls fast along width (alpha 0.6 vs FLOPs), slowly along depth (alpha 0.15)."""
    rows = []
    base_flops = 1e10
    for key, values, alpha in (("model.backbone_kwargs.width_multiplier", (0.5, 1.0, 2.0, 4.0), 0.6),
                               ("model.backbone_kwargs.depth_multiplier", (1.0, 2.0, 4.0), 0.15)):
        other = "model.backbone_kwargs.depth_multiplier" if "width" in key else "model.backbone_kwargs.width_multiplier"
        for v in values:
            if "depth" in key and v == 1.0:
                continue  # shared with the width sweep's (width 1, depth 1) point
            flops = base_flops * v ** 2 if "width" in key else base_flops * v
            for s in (0, 1):
                err = 0.02 + 0.3 * (flops / base_flops) ** -alpha * (1 + 0.01 * (s - 0.5))
                rows.append(row(seed=s, acc=1 - err, parameters=int(1e4 * flops / base_flops),
                                train_flops=flops, axes={key: v, other: 1.0}))
    return rows


def test_axis_exponents_picks_the_better_axis():
    result = axis_exponents(scaling_rows(), n_boot=50)["D4"]
    width, depth = result["axes"]["width"], result["axes"]["depth"]
    assert result["scale_first"] == "width" and result["clear"]
    assert width.slope < depth.slope < 0 and width.decrease_per_doubling > 0.2
    assert width.values == [0.5, 1.0, 2.0, 4.0] and depth.values == [1.0, 2.0, 4.0]
    assert depth.context.endswith("width_multiplier=1.0") and width.reason is None


def test_axis_exponents_skips_short_axes():
    rows = [row(seed=0, acc=0.8 + 0.01 * i, axes={"width": w}, train_flops=1e9 * w) for i, w in enumerate((1, 2))]
    entry = axis_exponents(rows, n_boot=10)["D4"]
    assert entry["scale_first"] is None
    assert "needs >= 3 distinct values of width, got 2" in entry["axes"]["width"].reason
    assert axis_exponents([row()], n_boot=10)["D4"]["reason"].startswith("no scaling axis")


def test_pareto_frontier_drops_dominated_points():
    rows = [row(variant=v, seed=s, acc=acc, train_flops=c, axes={"width": c})
            for v, c, accs in (("a", 1.0, (0.70, 0.72)), ("b", 2.0, (0.69, 0.69)), ("c", 3.0, (0.80, 0.80)),
                               ("d", 3.0, (0.75, 0.75)), ("e", 5.0, (0.79, 0.79)), ("f", 8.0, (0.90, 0.90)))
            for s, acc in enumerate(accs)]
    frontier = pareto_frontier(rows, "train_flops")
    assert [e["variant"] for e in frontier] == ["a", "c", "f"]
    assert [e["cost"] for e in frontier] == [1.0, 3.0, 8.0]
    assert frontier[0]["error"] == pytest.approx(0.29) and frontier[0]["n"] == 2


def test_summary_table_means_and_stds_over_seeds():
    rows = [row(seed=0, acc=0.80, auc=0.90, epsilon=7.9, target_epsilon=8.0, wall=10, metrics={"test/rot90/acc": 0.7}),
            row(seed=1, acc=0.84, auc=0.94, epsilon=8.0, target_epsilon=8.0, wall=20, metrics={"test/rot90/acc": 0.8}),
            row(seed=2, acc=0.88, auc=0.92, epsilon=8.0, target_epsilon=8.0, wall=30),
            row(seed=0, acc=0.70, auc=0.80),
            row(seed=1, state="failed", error="oom")]
    table = summary_table(rows)
    assert [e["target_epsilon"] for e in table] == [8.0, None]
    dp, plain = table
    assert dp["n"] == 3 and dp["n_seeds"] == 3 and dp["n_configs"] == 1
    assert dp["acc_mean"] == pytest.approx(0.84) and dp["acc_std"] == pytest.approx(0.04)
    assert dp["auc_mean"] == pytest.approx(0.92) and dp["auc_std"] == pytest.approx(0.02)
    assert dp["epsilon"] == pytest.approx(23.9 / 3) and dp["wall_time_s"] == pytest.approx(20.0)
    assert dp["robustness"] == {"rot90/acc": pytest.approx(0.75)} and dp["parameters"] == 1000
    assert plain["n"] == 1 and plain["acc_std"] is None and plain["robustness"] == {}


def test_plots_return_none_without_data(tmp_path):
    rows = [row(acc=0.7 + 0.1 * f, seed=s, axes={"data.train_fraction": f}) for f in (0.25, 0.5, 1.0) for s in (0, 1)]
    path = plots.plot_train_fraction(rows, tmp_path / "tf.png", title="data")
    assert path.read_bytes()[:8] == PNG_MAGIC
    for draw in (plots.plot_privacy, plots.plot_robustness, plots.plot_error_vs_parameters):
        assert draw([row(state="failed")], tmp_path / "none.png") is None
    assert plots.plot_train_fraction([row()], tmp_path / "none.png") is None and not (tmp_path / "none.png").exists()


def test_references():
    refs = references_for("PneumoniaMNIST")
    assert {(r["model"], r["acc"], r["auc"]) for r in refs} >= {("ResNet-18 (28)", 0.854, 0.944),
                                                                ("ResNet-50 (28)", 0.854, 0.948)}
    assert any(r["epsilon"] == 8.0 and r["acc"] == 0.869 and r["auc"] == 0.960 for r in refs)
    assert all(r["source"] for r in refs) and references_for("nosuchmnist") == []


# -- report ------------------------------------------------------------------------------------------------------------
def study_rows():
    """3 widths x (D4, C8) + plain, 2 seeds; D4 at eps 1/8 too; robustness metrics; one failed and one waiting run."""
    rows = []
    for family, variant, gain in (("D4", "eq_d4", 0.06), ("C8", "eq_c8", 0.04), ("plain", "plain", 0.0)):
        for w in (0.5, 1.0, 2.0):
            for s in (0, 1):
                acc = 0.70 + gain + 0.05 * math.log2(w) / 2 + 0.01 * s
                rot = {"test/rot90/acc": acc - (0 if family != "plain" else 0.1), "test/rot45/acc": acc - 0.05,
                       "test/fgsm_eps1/acc": acc - 0.1, "test/pgd_eps1/acc": acc - 0.15,
                       "test/pgd_eps2/acc": acc - 0.25, "test/hflip/acc": acc - 0.02}
                rows.append(row(family=family, variant=variant, seed=s, acc=acc, auc=acc + 0.1, axes={"width": w},
                                parameters=int(2e4 * w ** 2), flops=1e6 * w ** 2, train_flops=1e12 * w ** 2,
                                metrics=rot))
    for eps in (1.0, 8.0):
        for s in (0, 1):
            rows.append(row(family="D4", variant="eq_d4_dp", seed=s, acc=0.6 + 0.02 * eps + 0.01 * s, auc=0.85,
                            axes={"width": 1.0, "epsilon": eps}, parameters=20000, train_flops=1e12,
                            epsilon=eps * 0.99, target_epsilon=eps))
    rows.append(row(variant="eq_d4", state="failed", seed=3, axes={"width": 4.0}, error="CUDA out of memory",
                    parameters=None))
    rows.append(row(variant="eq_d4", state="waiting", seed=4, axes={"width": 4.0}, parameters=None))
    return rows


def test_write_report(tmp_path):
    path = write_report(study_rows(), tmp_path / "report", title="Width study", n_boot=40,
                        study_config_text="grid: {width: [0.5, 1, 2]}",
                        selection="recipe selected on val/auc by a 20-trial TPE search")
    text = path.read_text()
    assert path.name == "report.md"
    assert "# Width study" in text and "24 planned, 22 complete, 1 failed, 1 waiting" in text
    assert "recipe selected on val/auc by a 20-trial TPE search" in text
    assert "| eq_d4 | D4 | non-private | 1.0 | 2 | 0.765 ± 0.007 | 0.865 ± 0.007 | 0.900 |" in text  # std 0.00707
    assert "Published numbers for pneumoniamnist" in text and "0.854" in text and "0.944" in text
    assert "MedMNIST v2" in text and "0.869" in text  # DP benchmark at eps 8
    assert "alpha [CI]" in text and "scale **width** first" in text
    assert "CUDA out of memory" in text and "```yaml" in text
    pngs = sorted(p.name for p in (tmp_path / "report").glob("*.png"))
    assert {"privacy_pneumoniamnist.png", "robustness_pneumoniamnist.png"} <= set(pngs)
    assert any(p.startswith("error_vs_parameters") for p in pngs) and any(p.startswith("error_vs_flops") for p in pngs)
    for name in pngs:
        data = (tmp_path / "report" / name).read_bytes()
        assert data[:8] == PNG_MAGIC and len(data) > 5000, name
        assert f"]({name})" in text, name
    fits = json.loads((tmp_path / "report" / "fits.json").read_text())
    conditions = fits["datasets"]["pneumoniamnist"]["conditions"]
    plain = next(c for c in conditions if c["condition"] == "non-private")
    assert set(plain["fits"]["parameters"]) == {"C8", "D4", "plain"}
    assert plain["fits"]["parameters"]["D4"]["alpha"] > 0
    csv_lines = (tmp_path / "report" / "results.csv").read_text().splitlines()
    assert len(csv_lines) == 1 + len(study_rows()) and "axes.width" in csv_lines[0]
    assert "metrics.test/pgd_eps2/acc" in csv_lines[0]


def test_write_report_minimal_inputs(tmp_path):
    path = write_report([row(metrics=None, axes={})], tmp_path / "one", title="One run", n_boot=10)
    text = path.read_text()
    assert "1 complete" in text and "| eq_d4 | D4 | non-private |" in text
    assert "No private runs" in text and "No robustness metrics" in text and "No failed runs." in text
    assert json.loads((tmp_path / "one" / "fits.json").read_text())["datasets"]["pneumoniamnist"]
    empty = write_report([row(state="failed", error="boom"), row(state="running")], tmp_path / "none", title="Empty")
    assert "No complete run" in empty.read_text() and "boom" in empty.read_text()
    assert write_report([], tmp_path / "nothing", title="Nothing").is_file()
