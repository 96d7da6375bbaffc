"""The study store (Optuna RDB storage) as a queue: idempotent planning, no run taken twice by concurrent workers,
dead workers' runs retried from their heartbeat, errors recorded, searches sampling at most n_trials."""

from __future__ import annotations

import json
import multiprocessing
import time
from pathlib import Path

import pytest
import yaml

from eqlightning.studies.spec import load_spec
from eqlightning.studies.store import StudyStore, summarize_run

REPO = Path(__file__).resolve().parents[2]
QUICKSTART = str(REPO / "configs/quickstart.yaml")


def _spec(tmp_path: Path, **extra):
    body = {"name": "q", "base": QUICKSTART, "grid": {"width": [0.25, 0.5, 1.0]}, "seeds": [0, 1],
            "variants": {"d4": {"overrides": {"group": "D4"}}, "c4": {"overrides": {"group": "C4"}}},
            "heartbeat": {"interval": 10, "grace": 600, "max_retry": 1}, **extra}
    path = tmp_path / "q.yaml"
    path.write_text(yaml.safe_dump(body, sort_keys=False))
    return load_spec(path, root=tmp_path / "studies")


def _result(value: float = 0.9) -> dict:
    return {"objective": value, "val": value, "metrics": {"test/acc": 0.8, "test/auc": value}, "parameters": 10}


def test_planning_is_idempotent_and_every_run_is_taken_once(tmp_path):
    store = StudyStore(_spec(tmp_path))
    assert store.sync_plan() == {"added": 12, "retried": 0, "known": 0}
    assert store.sync_plan() == {"added": 0, "retried": 0, "known": 12}
    claims = []
    while (claim := store.take("w")) is not None:
        claims.append(claim)
    assert len(claims) == 12 and len({c.key for c in claims}) == 12
    assert [c.run.axes["seed"] for c in claims] == [0] * 6 + [1] * 6  # seed-major across variants
    assert store.counts() == {"complete": 0, "running": 12, "waiting": 0, "failed": 0, "total": 12}
    store.complete(claims[0], _result())
    store.fail(claims[1], "exit 2: model.backbone: unknown backbone 'x'")
    counts = store.counts()
    assert counts["complete"] == 1 and counts["failed"] == 1 and counts["running"] == 10
    rows = {r["key"]: r for r in store.rows()}
    assert rows[claims[0].key]["metrics"]["test/auc"] == 0.9 and rows[claims[0].key]["state"] == "complete"
    assert "unknown backbone" in rows[claims[1].key]["error"]
    assert store.sync_plan()["added"] == 0  # a failed run is not planned again...
    assert store.sync_plan(retry_failed=True)["retried"] == 1  # ...unless asked
    assert store.take("w").key == claims[1].key


def test_an_interrupted_run_is_enqueued_again(tmp_path):
    store = StudyStore(_spec(tmp_path))
    store.sync_plan()
    claim = store.take("w")
    store.interrupt(claim, "exit 143")
    assert {r["key"]: r for r in store.rows()}[claim.key]["state"] == "waiting"
    taken = []
    while (again := store.take("w")) is not None:  # a retry joins the end of its variant's queue
        taken.append(again.key)
    assert taken.count(claim.key) == 1 and store.attempts()[claim.key] == 2 and len(taken) == 12


def test_a_dead_workers_run_is_retried_after_the_grace_period_then_given_up(tmp_path):
    store = StudyStore(_spec(tmp_path, heartbeat={"interval": 1, "grace": 2, "max_retry": 1}))
    store.sync_plan()
    claim = store.take("dead")
    other = store.take("alive")
    deadline = time.time() + 4
    while time.time() < deadline:  # "alive" beats, "dead" does not
        store.beat(other.study, other.trial.number)
        time.sleep(0.5)
    store.fail_stale()
    rows = {r["key"]: r for r in store.rows()}
    assert rows[claim.key]["state"] == "waiting" and rows[other.key]["state"] == "running"
    store.complete(claim, _result())  # a worker thought dead reports late: dropped, its retry records the run
    assert {r["key"]: r for r in store.rows()}[claim.key]["state"] == "waiting"
    while (retry := store.take("second")).key != claim.key:
        store.complete(retry, _result())
    time.sleep(3.5)
    store.beat(other.study, other.trial.number)
    store.fail_stale()
    row = {r["key"]: r for r in store.rows()}[claim.key]
    assert row["state"] == "failed" and "given up after 2 attempts" in row["error"]  # max_retry 1


def _take_all(spec_path: str, root: str, out: str) -> None:
    store = StudyStore(load_spec(spec_path, root=root))
    taken = []
    while (claim := store.take("p")) is not None:
        taken.append(claim.key)
        store.complete(claim, _result())
    Path(out).write_text(json.dumps(taken))


def test_concurrent_workers_never_take_the_same_run(tmp_path):
    spec = _spec(tmp_path, seeds=[0, 1, 2, 3])
    StudyStore(spec).sync_plan()
    context = multiprocessing.get_context("spawn")
    outs = [tmp_path / f"taken{i}.json" for i in range(3)]
    workers = [context.Process(target=_take_all, args=(str(spec.path), str(spec.directory.parent), str(o)))
               for o in outs]
    for w in workers:
        w.start()
    for w in workers:
        w.join(120)
        assert w.exitcode == 0
    taken = [key for o in outs for key in json.loads(o.read_text())]
    assert len(taken) == 24 and len(set(taken)) == 24 and all(json.loads(o.read_text()) for o in outs)
    assert set(StudyStore(spec).attempts().values()) == {1}


def test_a_search_samples_its_space_at_most_n_trials_per_variant(tmp_path):
    spec = _spec(tmp_path, search={"metric": "val/auc", "n_trials": 3, "sampler": "random",
                                   "space": {"lr": {"low": 1e-4, "high": 1e-1, "log": True},
                                             "epochs": {"low": 2, "high": 5}, "augmult": {"choices": [1, 2]}}},
                 grid={}, seeds=None)
    spec.variants[0].base = [REPO / "configs/dp/breastmnist_eps8.yaml"]  # augmult is a DP setting
    spec.variants = spec.variants[:1]
    store = StudyStore(spec)
    assert store.sync_plan()["added"] == 0 and store.counts()["waiting"] == 3
    claims = [store.take("w") for _ in range(3)]
    assert store.take("w") is None
    for claim, value in zip(claims, (0.7, 0.9, 0.8)):
        lr = claim.run.config["model"]["optimizer"]["init_args"]["lr"]
        assert 1e-4 <= lr <= 1e-1 and 2 <= claim.run.config["trainer"]["max_epochs"] <= 5
        assert claim.run.config["trainer"]["callbacks"][0]["init_args"]["augmult"] in (1, 2)
        store.complete(claim, _result(value))
    assert store.counts() == {"complete": 3, "running": 0, "waiting": 0, "failed": 0, "total": 3}
    best = max(store.rows(), key=lambda r: r["val"])
    assert best["val"] == 0.9 and "model.optimizer.init_args.lr" in best["axes"]


def test_summarize_run_keeps_what_the_report_needs():
    summary = {"metrics": {"best": {"monitor": "val/auc", "value": 0.93},
                           "test": {"test/acc": 0.8, "test/auc": 0.9, "test/rot45/acc": 0.7}},
               "model": {"group": None, "parameters": 1000, "flops": 2e6}, "steps": 10,
               "data": {"flag": "breastmnist", "batch_size": 64}, "privacy": {"epsilon": 7.5, "target_epsilon": 8},
               "wall_time_s": {"fit": 10.0, "test": 2.0}, "seed": 1}
    result = summarize_run(summary, "val/auc")
    assert result["objective"] == result["val"] == 0.93 and result["family"] == "plain"
    assert result["train_flops"] == pytest.approx(3 * 2e6 * 10 * 64) and result["wall_time_s"] == 12.0
    assert result["metrics"]["test/rot45/acc"] == 0.7 and result["epsilon"] == 7.5 and result["seed"] == 1


def test_waiting_runs_of_an_older_plan_are_dropped_not_run(tmp_path):
    spec = _spec(tmp_path)
    StudyStore(spec).sync_plan()
    body = yaml.safe_load(spec.path.read_text())
    body["overrides"] = {"lr": 0.01}  # every run's config changes: new keys
    spec.path.write_text(yaml.safe_dump(body, sort_keys=False))
    store = StudyStore(load_spec(spec.path, root=spec.directory.parent))
    assert store.sync_plan()["added"] == 12
    keys = {run.key for run in store.spec.plan()}
    taken = [claim.key for claim in iter(lambda: store.take("w"), None)]
    assert sorted(taken) == sorted(keys)  # the 12 old waiting trials were dropped on the way
    assert store.counts()["total"] == 12


def test_waiting_runs_of_a_removed_seed_are_dropped_not_run(tmp_path):
    spec = _spec(tmp_path)
    StudyStore(spec).sync_plan()
    body = yaml.safe_load(spec.path.read_text())
    body["seeds"] = [0]  # seed 1's runs leave the plan; their configs (and keys) are unchanged
    spec.path.write_text(yaml.safe_dump(body, sort_keys=False))
    store = StudyStore(load_spec(spec.path, root=spec.directory.parent))
    assert store.sync_plan() == {"added": 0, "retried": 0, "known": 6}
    taken = [claim.run.axes["seed"] for claim in iter(lambda: store.take("w"), None)]
    assert taken == [0] * 6 and store.counts()["total"] == 6


def test_a_run_whose_axis_became_an_override_is_reported_with_todays_axes(tmp_path):
    spec = _spec(tmp_path, grid={"epochs": [2]}, seeds=[0])
    store = StudyStore(spec)
    store.sync_plan()
    for claim in iter(lambda: store.take("w"), None):
        store.complete(claim, _result())
    body = yaml.safe_load(spec.path.read_text())
    body.pop("grid")
    body["overrides"] = {"epochs": 2}  # the same configs (and keys): epochs is no longer an axis
    spec.path.write_text(yaml.safe_dump(body, sort_keys=False))
    store = StudyStore(load_spec(spec.path, root=spec.directory.parent))
    assert store.sync_plan()["added"] == 0
    assert all(r["state"] == "complete" and r["axes"] == {"seed": 0} for r in store.rows())


def test_rows_flatten_bundles_and_short_names_for_the_report():
    from eqlightning.studies.store import flat_axes

    assert flat_axes({"data": {"dataset": "retinamnist", "epochs": 15}, "width": 0.5, "seed": 2,
                      "model.backbone_kwargs": {"group": "C4"}}) == {
        "data.flag": "retinamnist", "trainer.max_epochs": 15, "model.backbone_kwargs.width_multiplier": 0.5,
        "seed": 2, "model.backbone_kwargs": {"group": "C4"}}


def test_search_workers_in_other_processes_never_sample_the_same_recipe(tmp_path):
    space = {"lr": {"low": 1e-4, "high": 1e-1, "log": True}}
    spec = _spec(tmp_path, search={"n_trials": 4, "sampler": "tpe", "space": space}, grid={}, seeds=None)
    spec.variants = spec.variants[:1]
    first, second = StudyStore(spec), StudyStore(spec)  # two workers: same seed, separate sampler objects
    claims = [first.take("a"), second.take("b"), first.take("a"), second.take("b")]
    assert len({c.key for c in claims}) == 4 and first.take("a") is None


def test_a_search_space_smaller_than_n_trials_ends_when_exhausted(tmp_path):
    spec = _spec(tmp_path, search={"n_trials": 5, "sampler": "random", "space": {"epochs": {"choices": [1, 2]}}},
                 grid={}, seeds=None)
    spec.variants = spec.variants[:1]
    store = StudyStore(spec)
    claims = [c for c in iter(lambda: store.take("w"), None)]
    assert sorted(c.run.config["trainer"]["max_epochs"] for c in claims) == [1, 2]
    for claim in claims:
        store.complete(claim, _result())
    assert store.counts() == {"complete": 2, "running": 0, "waiting": 0, "failed": 0, "total": 2}
    assert all(r["state"] == "complete" for r in store.rows())  # repeated suggestions are not runs
