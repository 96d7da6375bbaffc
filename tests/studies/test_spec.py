"""Study configs: plans, keys, overrides (aliases, bundles, DP on/off), and clear errors for bad files."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from eqlightning.studies.spec import StudyConfigError, apply_override, config_key, load_base, load_spec

REPO = Path(__file__).resolve().parents[2]
CONFIGS = REPO / "configs"


def _study(tmp_path: Path, body: dict, name: str = "s") -> Path:
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(body, sort_keys=False))
    return path


def test_a_grid_study_plans_variant_x_grid_x_seeds_seed_major(tmp_path):
    path = _study(tmp_path, {"base": str(CONFIGS / "quickstart.yaml"), "grid": {"width": [0.25, 0.5, 1.0]},
                             "seeds": [0, 1], "variants": {"d4": {"overrides": {"group": "D4"}},
                                                           "c8": {"overrides": {"group": "C8"}},
                                                           "plain": {"base": str(CONFIGS / "pneumoniamnist/resnet18.yaml"),
                                                                     "grid": {"width": [0.125]}}}})
    spec = load_spec(path, root=tmp_path)
    plan = spec.plan()
    assert len(plan) == 2 * (3 + 3 + 1) and len({run.key for run in plan}) == len(plan)
    assert [run.axes["seed"] for run in plan] == [0] * 7 + [1] * 7  # seed-major
    first = plan[0]
    assert first.variant == "d4" and first.axes == {"model.backbone_kwargs.width_multiplier": 0.25, "seed": 0}
    assert first.config["model"]["backbone_kwargs"] == {"group": "D4", "width_multiplier": 0.25}
    assert first.config["seed_everything"] == 0 and first.config["test_after_fit"] is True
    assert plan[6].config["model"]["backbone"] == "resnet18" and spec.directory == (tmp_path / "s").resolve()
    assert [run.key for run in load_spec(path, root=tmp_path).plan()] == [run.key for run in plan]  # stable


def test_keys_change_with_any_value_and_only_then():
    config = load_base([CONFIGS / "quickstart.yaml"])
    key = config_key(config)
    assert config_key(load_base([CONFIGS / "quickstart.yaml"])) == key and len(key) == 16
    apply_override(config, "lr", 0.0021)
    assert config["model"]["optimizer"]["init_args"]["lr"] == 0.0021 and config_key(config) != key


def test_epsilon_sets_the_budget_or_removes_dp_and_privacy_keys_edit_the_callback():
    config = load_base([CONFIGS / "dp/breastmnist_eps8.yaml", CONFIGS / "evaluation/robustness.yaml"])
    assert len(config["trainer"]["callbacks"]) == 2  # callback lists add up across base files
    apply_override(config, "epsilon", 3)
    apply_override(config, "clip", 2.0)
    dp = config["trainer"]["callbacks"][0]["init_args"]
    assert dp["target_epsilon"] == 3.0 and dp["max_grad_norm"] == 2.0
    apply_override(config, "epsilon", "off")
    assert [c["class_path"] for c in config["trainer"]["callbacks"]] == ["eqlightning.evaluation.Robustness"]
    with pytest.raises(StudyConfigError, match="no DifferentialPrivacy callback"):
        apply_override(config, "epsilon", 8)
    with pytest.raises(StudyConfigError, match="positive number or `off`"):
        apply_override(load_base([CONFIGS / "dp/breastmnist_eps8.yaml"]), "epsilon", -1)


def test_a_mapping_grid_value_is_a_bundle_of_overrides():
    config = load_base([CONFIGS / "quickstart.yaml"])
    apply_override(config, "data", {"dataset": "pneumoniamnist", "epochs": 7})
    assert config["data"]["flag"] == "pneumoniamnist" and config["trainer"]["max_epochs"] == 7
    apply_override(config, "model.backbone_kwargs", {"group": "C4"})  # a real mapping value stays one
    assert config["model"]["backbone_kwargs"] == {"group": "C4"}


@pytest.mark.parametrize("body, fragment", [
    ({"base": "missing.yaml"}, "does not exist"),
    ({"base": "QS", "colour": 1}, "unknown key(s) colour"),
    ({"base": "QS", "grid": {"width": 0.5}}, "non-empty list"),
    ({"base": "QS", "seeds": ["a"]}, "seeds must be a list of integers"),
    ({"base": "QS", "search": {"metric": "test/auc", "space": {"lr": {"low": 0.1, "high": 1}}}}, "never on test"),
    ({"base": "QS", "search": {"space": {"lr": {"low": 0.1}}}}, "search.space.lr"),
    ({"base": "QS", "launcher": "pbs"}, "launcher 'pbs'"),
    ({"base": "QS", "heartbeat": {"interval": 10, "grace": 15}}, "at least twice"),
    ({"base": "QS", "overrides": {"epsilon": 8}}, "no DifferentialPrivacy callback"),
    ({"variants": {"v": {}}}, "no base config"),
    ({"base": "QS", "overrides": {"backbone": "eq_resnet8"},  # would turn the plain baseline equivariant
      "variants": {"eq": {}, "plain": {"base": str(CONFIGS / "pneumoniamnist/resnet18.yaml")}}},
     "variants.plain: the study's overrides set model.backbone to 'eq_resnet8' over its base's 'resnet18'"),
])
def test_bad_study_files_fail_at_load_naming_the_key(tmp_path, body, fragment):
    if body.get("base") == "QS":
        body["base"] = str(CONFIGS / "quickstart.yaml")
    with pytest.raises(StudyConfigError) as error:
        load_spec(_study(tmp_path, body), root=tmp_path)
    assert fragment in str(error.value) and "\n" not in str(error.value)


def test_every_committed_study_config_loads_and_plans(tmp_path):
    studies = sorted((CONFIGS / "studies").glob("*.yaml"))
    assert studies, "configs/studies/ holds the README's studies"
    for path in studies:
        spec = load_spec(path, root=tmp_path)
        assert spec.plan() or spec.search is not None, path


def test_a_variant_overriding_the_backbone_itself_is_fine(tmp_path):
    spec = load_spec(_study(tmp_path, {"base": str(CONFIGS / "quickstart.yaml"), "overrides": {"backbone": "eq_resnet8"},
                                       "variants": {"eq": {}, "plain": {
                                           "base": str(CONFIGS / "pneumoniamnist/resnet18.yaml"),
                                           "overrides": {"backbone": "resnet18", "width": 0.0625}}}}), root=tmp_path)
    assert [run.config["model"]["backbone"] for run in spec.plan()] == ["eq_resnet8", "resnet18"]
