"""`eqlightning study report` from the store alone (results recorded as a worker records them), and the best
recipes of a search, chosen on validation."""

from __future__ import annotations

from pathlib import Path

import yaml

from eqlightning.cli import main
from eqlightning.studies.cli import best_recipes
from eqlightning.studies.spec import load_spec
from eqlightning.studies.store import StudyStore

REPO = Path(__file__).resolve().parents[2]


def _write(tmp_path: Path, body: dict) -> Path:
    path = tmp_path / "s.yaml"
    path.write_text(yaml.safe_dump(body, sort_keys=False))
    return path


def test_report_and_status_read_the_store(tmp_path, capsys):
    path = _write(tmp_path, {"name": "s", "base": str(REPO / "configs/quickstart.yaml"),
                             "grid": {"width": [0.25, 0.5, 1.0]}, "seeds": [0, 1]})
    store = StudyStore(load_spec(path, root=tmp_path))
    store.sync_plan()
    for index, claim in enumerate(iter(lambda: store.take("w"), None)):
        width = claim.run.axes["model.backbone_kwargs.width_multiplier"]
        if index == 5:
            store.fail(claim, "exit 1: RuntimeError: out of memory")
            continue
        error = 0.1 + 0.2 * width ** -0.5 + 0.01 * claim.run.axes["seed"]
        store.complete(claim, {"objective": 0.9, "val": 0.9, "metrics": {"test/acc": 1 - error, "test/auc": 0.9},
                               "family": "D4", "dataset": "breastmnist", "parameters": int(26000 * width ** 2),
                               "flops": 7e7 * width ** 2, "train_flops": 1e12 * width ** 2, "wall_time_s": 10.0})
    assert main(["study", "report", str(path), "--root", str(tmp_path)]) == 0
    report = (tmp_path / "s" / "report" / "report.md").read_text()
    assert "breastmnist" in report and "0.863" in report  # the published MedMNIST v2 ResNet-18 ACC next to ours
    assert "out of memory" in report and (tmp_path / "s" / "report" / "fits.json").is_file()
    assert main(["study", "status", str(path), "--root", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "5/6 done, 0 running, 1 failed, 0 left" in out and "FAILED" in out


def test_best_recipes_choose_on_validation_per_variant():
    rows = [{"variant": "eq", "state": "complete", "val": 0.8, "axes": {"lr": 0.1}, "key": "a"},
            {"variant": "eq", "state": "complete", "val": 0.9, "axes": {"lr": 0.01}, "key": "b"},
            {"variant": "eq", "state": "failed", "val": None, "axes": {"lr": 1.0}, "key": "c"},
            {"variant": "plain", "state": "complete", "val": 0.7, "axes": {"lr": 0.3}, "key": "d"}]
    best = best_recipes(rows)
    assert best["eq"]["overrides"] == {"lr": 0.01} and best["plain"]["trial_key"] == "d"
    assert best_recipes(rows, "minimize")["eq"]["overrides"] == {"lr": 0.1}


def test_study_errors_are_one_line_and_exit_2(tmp_path, capsys):
    assert main(["study", "run", str(tmp_path / "missing.yaml")]) == 2
    err = capsys.readouterr().err
    assert "missing.yaml: no such file" in err and len(err.strip().splitlines()) == 1
    assert main(["study", "run", str(_write(tmp_path, {"base": str(REPO / "configs/quickstart.yaml"),
                                                        "grid": {"lr": 0.1}}))]) == 2
    assert "non-empty list" in capsys.readouterr().err


def test_the_progress_line_counts_and_estimates_the_time_left():
    from eqlightning.studies.launch import progress_line

    counts = {"complete": 4, "running": 2, "waiting": 6, "failed": 1, "total": 13}
    rows = [{"duration_s": d} for d in (100.0, 140.0, 120.0, 120.0)] + [{"duration_s": None}]
    # (6 waiting + 2 running / 2) runs left over 2 workers: ceil(7 / 2) = 4 rounds of 120 s
    assert progress_line(counts, rows, workers=2) == ("4/13 done, 2 running, 1 failed, 6 left, ETA 8 min "
                                                      "(2 min/run)")
    assert progress_line(counts, [], workers=2).endswith("6 left")  # no finished run yet: no ETA
