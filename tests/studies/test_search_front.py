"""Multi-objective searches: objectives in the study file, an Optuna study with several directions, named choices and
list entries in the space, early stopping, the Pareto front (against a brute-force reference), its plot and report
section, and the export of a trial as a fit config that loads."""

from __future__ import annotations

import random
import time
from pathlib import Path

import optuna
import pytest
import yaml

from eqlightning.cli import main
from eqlightning.studies.front import nondominated, reference_points, search_front
from eqlightning.studies.spec import Objective, StudyConfigError, apply_override, load_spec
from eqlightning.studies.store import StudyStore, summarize_run

REPO = Path(__file__).resolve().parents[2]
QUICKSTART = str(REPO / "configs/quickstart.yaml")
OBJECTIVES = [{"metric": "val/auc", "direction": "maximize"}, {"metric": "flops", "direction": "minimize"}]
SPACE = {"group": {"choices": {"c4": "C4", "d4_c1": ["D4", "D4", "C1"]}},  # named choices: a label per value
         "model.backbone_kwargs.width_multiplier": {"choices": [0.25, 0.5]}, "lr": {"low": 1e-4, "high": 1e-2}}


def _study(tmp_path: Path, **search) -> Path:
    body = {"name": "mo", "base": QUICKSTART, "search": {"objectives": OBJECTIVES, "n_trials": 6, "sampler": "nsga2",
                                                         "population": 4, "space": SPACE, **search}}
    path = tmp_path / "mo.yaml"
    path.write_text(yaml.safe_dump(body, sort_keys=False))
    return path


def _fake_result(claim, auc: float, flops: float) -> dict:
    return {"objective": auc, "val": auc, "objectives": [auc, flops], "flops": flops, "parameters": int(flops / 100),
            "metrics": {"test/acc": auc - 0.05, "test/auc": auc - 0.02}, "family": "C4", "dataset": "pneumoniamnist"}


def brute_front(points, directions):
    better = [1 if d == "maximize" else -1 for d in directions]
    keep = []
    for i, p in enumerate(points):
        dominated = False
        for j, q in enumerate(points):
            ge = all(b * qk >= b * pk for b, qk, pk in zip(better, q, p))
            gt = any(b * qk > b * pk for b, qk, pk in zip(better, q, p))
            dominated |= i != j and ge and gt
        keep.append(not dominated)
    return keep


def test_nondominated_equals_a_brute_force_check_and_respects_directions():
    rng = random.Random(0)
    for trial in range(30):
        points = [(rng.choice([0.5, 0.6, 0.7, 0.8]), rng.choice([1, 2, 3, 4])) for _ in range(rng.randint(1, 12))]
        for directions in (("maximize", "minimize"), ("minimize", "minimize"), ("maximize", "maximize")):
            assert nondominated(points, directions) == brute_front(points, directions), (points, directions)
    # ties: equal points do not dominate each other; a point better in one and equal in the other does
    assert nondominated([(0.8, 2), (0.8, 2), (0.8, 3)], ("maximize", "minimize")) == [True, True, False]


def test_a_multi_objective_search_tells_optuna_every_objective(tmp_path):
    spec = load_spec(_study(tmp_path), root=tmp_path)
    assert spec.search.directions == ["maximize", "minimize"] and spec.search.metric == "val/auc"
    store = StudyStore(spec)
    assert store.study("default").directions == [optuna.study.StudyDirection.MAXIMIZE,
                                                 optuna.study.StudyDirection.MINIMIZE]
    claims = [c for c in iter(lambda: store.take("w"), None)]
    assert len(claims) == 6 and len({c.key for c in claims}) == 6
    values = {}
    for index, claim in enumerate(claims):
        kwargs = claim.run.config["model"]["backbone_kwargs"]
        assert kwargs["group"] in ("C4", ["D4", "D4", "C1"])  # the value, not its label
        assert claim.trial.params["group"] in ("c4", "d4_c1")
        values[claim.key] = (0.6 + 0.05 * index, 1e6 * (1 + index % 3))
        store.complete(claim, _fake_result(claim, *values[claim.key]))
    optuna_front = {t.user_attrs["key"] for t in store.study("default").best_trials}
    trials, front = search_front(store.rows(), spec.search.objectives)
    assert len(trials) == 6 and {t["key"] for t in front} == optuna_front  # the same front as Optuna's
    assert [t["values"][1] for t in front] == sorted(t["values"][1] for t in front)


def test_a_run_missing_an_objective_fails_with_the_reason(tmp_path):
    store = StudyStore(load_spec(_study(tmp_path), root=tmp_path))
    claim = store.take("w")
    store.complete(claim, {"objective": 0.8, "val": 0.8, "objectives": [0.8, None], "metrics": {"test/acc": 0.7}})
    (row,) = store.rows()
    assert row["state"] == "failed" and "without a value for flops" in row["error"]


def test_summarize_run_reads_each_objective():
    summary = {"metrics": {"best": {"monitor": "val/auc", "value": 0.9}, "final": {"val/acc": 0.85, "val/auc": 0.88},
                           "test": {"test/acc": 0.8}},
               "model": {"parameters": 1000, "flops": 2e6}, "steps": 10, "data": {"batch_size": 64}}
    result = summarize_run(summary, "val/auc", ["val/auc", "flops", "parameters", "val/acc"])
    assert result["objectives"] == [0.9, 2e6, 1000, 0.85]


@pytest.mark.parametrize("search, fragment", [
    ({"metric": "val/auc"}, "either metric/direction or objectives"),
    ({"objectives": [{"metric": "flops", "direction": "minimize"}, {"metric": "val/auc"}]}, "first objective"),
    ({"objectives": [{"metric": "val/auc"}, {"metric": "test/acc"}]}, "never on test"),
    ({"objectives": [{"metric": "val/auc"}, {"metric": "flops", "direction": "down"}]}, "maximize or minimize"),
    ({"objectives": [{"metric": "val/auc"}, {"metric": "val/auc"}]}, "listed twice"),
    ({"sampler": "tpe"}, "population"),
    ({"early_stop": {"patience": 0}}, "early_stop.patience"),
    ({"early_stop": {"wait": 3}}, "unknown key(s) wait"),
    ({"space": {"group": {"choices": [["C4", "C1"]]}}}, "give them labels"),
])
def test_bad_searches_fail_at_load_naming_the_key(tmp_path, search, fragment):
    with pytest.raises(StudyConfigError) as error:
        load_spec(_study(tmp_path, **search), root=tmp_path)
    assert fragment in str(error.value) and "\n" not in str(error.value)


def test_overrides_reach_list_entries_by_index_and_refuse_bad_indices():
    config = {"model": {"backbone_kwargs": {"stages": [{"kernel": 3}, {"kernel": 3}]}}}
    apply_override(config, "model.backbone_kwargs.stages.1.kernel", 5)
    apply_override(config, "model.backbone_kwargs.stages.-2.depth", 2)
    assert config["model"]["backbone_kwargs"]["stages"] == [{"kernel": 3, "depth": 2}, {"kernel": 5}]
    with pytest.raises(StudyConfigError, match="list of 2; '2' is not an index"):
        apply_override(config, "model.backbone_kwargs.stages.2.kernel", 5)
    with pytest.raises(StudyConfigError, match="not a mapping"):
        apply_override(config, "model.backbone_kwargs.stages.0.kernel.size", 5)


def test_early_stop_adds_lightnings_early_stopping_on_the_selection_metric(tmp_path):
    spec = load_spec(_study(tmp_path, early_stop={"patience": 3}), root=tmp_path)
    claim = StudyStore(spec).take("w")
    (callback,) = [c for c in claim.run.config["trainer"]["callbacks"] if c["class_path"].endswith("EarlyStopping")]
    assert callback["init_args"] == {"monitor": "val/auc", "mode": "max", "patience": 3, "min_delta": 0.0}


def test_report_draws_the_front_next_to_references_and_export_writes_a_fit_config(tmp_path, capsys):
    path = _study(tmp_path)
    spec = load_spec(path, root=tmp_path)
    store = StudyStore(spec)
    claims = [c for c in iter(lambda: store.take("w"), None)]
    points = [(0.70, 1e6), (0.80, 2e6), (0.75, 3e6), (0.90, 4e6), (0.60, 5e5), (0.85, 4e6)]
    for claim, (auc, flops) in zip(claims, points):
        store.complete(claim, _fake_result(claim, auc, flops))
    reference = tmp_path / "ref.yaml"  # a grid study whose runs are drawn next to the front
    reference.write_text(yaml.safe_dump({"name": "ref", "base": QUICKSTART, "seeds": [0, 1, 2]}))
    ref_store = StudyStore(load_spec(reference, root=tmp_path))
    ref_store.sync_plan()
    for claim in iter(lambda: ref_store.take("w"), None):  # seed 2 ran on other data: not like for like
        other = claim.run.axes["seed"] == 2
        ref_store.complete(claim, {"objective": 0.8, "val": 0.1 if other else 0.8, "flops": 7e7, "parameters": 26000,
                                   "dataset": "breastmnist" if other else "pneumoniamnist",
                                   "metrics": {"test/acc": 0.75, "test/auc": 0.8}})
    assert main(["study", "report", str(path), "--root", str(tmp_path), "--reference", str(reference)]) == 0
    out = tmp_path / "mo" / "report"
    report = (out / "report.md").read_text()
    assert "## Search: Pareto front" in report and (out / "pareto_front.png").stat().st_size > 5000
    front = yaml.safe_load((out / "pareto.yaml").read_text())
    expected = {c.trial.number for c, on in zip(claims, brute_front(points, ("maximize", "minimize"))) if on}
    assert {t["trial"] for t in front} == expected and len(expected) == 4  # (0.6,5e5) (0.7,1e6) (0.8,2e6) (0.9,4e6)
    assert "| default | 0.800 | 70M | 0.750 | 0.800 | 26k | 70M | 2 |" in report  # the reference, seeds averaged
    best = max(front, key=lambda t: t["val/auc"])
    target = tmp_path / "configs" / "found.yaml"
    assert main(["study", "export", str(path), "--root", str(tmp_path), "--trial", str(best["trial"]),
                 "--out", str(target)]) == 0
    config = yaml.safe_load(target.read_text())
    claim = next(c for c in claims if c.trial.number == best["trial"])
    assert config["model"] == claim.run.config["model"] and config["run_name"] == f"mo-trial{best['trial']}"
    assert "val/auc = 0.9" in target.read_text().splitlines()[1]
    before = target.read_text()
    assert main(["study", "export", str(path), "--root", str(tmp_path), "--trial", str(best["trial"]),
                 "--out", str(target)]) == 2  # never overwritten without --force
    assert target.read_text() == before and "--force" in capsys.readouterr().err
    assert main(["study", "export", str(path), "--root", str(tmp_path), "--trial", "99", "--out",
                 str(tmp_path / "x.yaml")]) == 2


def test_reference_points_average_seeds_per_variant_and_config():
    rows = [{"variant": "a", "state": "complete", "val": v, "flops": 10.0, "metrics": {"test/acc": v - 0.1},
             "axes": {"seed": seed}} for seed, v in enumerate((0.7, 0.9))]
    rows += [{"variant": "a", "state": "complete", "val": 0.5, "flops": 10.0, "axes": {"data.train_fraction": 0.25}},
             {"variant": "b", "state": "failed", "val": None}]
    whole, quarter = reference_points(rows, [Objective("val/auc"), Objective("flops", "minimize")])
    assert whole["label"] == "a" and whole["values"] == pytest.approx([0.8, 10.0]) and whole["runs"] == 2
    assert whole["test_acc"] == pytest.approx(0.7)
    assert quarter["label"] == "a (train_fraction=0.25)" and quarter["values"][0] == 0.5



def test_a_dead_workers_search_trial_is_retried_with_the_same_values_and_counted_once(tmp_path):
    path = _study(tmp_path, n_trials=3)
    body = yaml.safe_load(path.read_text())
    body["heartbeat"] = {"interval": 1, "grace": 2, "max_retry": 2}
    path.write_text(yaml.safe_dump(body, sort_keys=False))
    store = StudyStore(load_spec(path, root=tmp_path))
    dead, alive = store.take("dead"), store.take("alive")
    deadline = time.time() + 4
    while time.time() < deadline:  # "alive" beats, "dead" does not
        store.beat(alive.study, alive.trial.number)
        time.sleep(0.5)
    store.complete(alive, _fake_result(alive, 0.8, 2e6))
    taken = [c for c in iter(lambda: store.take("second"), None)]  # the dead trial's retry, then one new sample
    assert dead.key in {c.key for c in taken} and len(taken) == 2
    retry = next(c for c in taken if c.key == dead.key)
    assert retry.trial.params == dead.trial.params and retry.run.config == dead.run.config
    for claim in taken:
        store.complete(claim, _fake_result(claim, 0.9 if claim is retry else 0.7, 1e6))
    rows = store.rows()
    assert len(rows) == 3 and all(r["state"] == "complete" for r in rows) and store.attempts()[dead.key] == 2
    _, front = search_front(rows, load_spec(path, root=tmp_path).search.objectives)
    assert [t["key"] for t in front] == [dead.key]  # (0.9, 1e6) dominates the others
