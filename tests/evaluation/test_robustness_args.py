"""Robustness validates its arguments up front, with the bad value and the fix in the message."""

from __future__ import annotations

import subprocess
import sys

import pytest

from eqlightning.evaluation import DEFAULT_ROTATIONS, Robustness, group_generators


@pytest.mark.parametrize("kwargs,match", [
    ({"attacks": [{"name": "cw", "eps": 2}]}, r"unknown attack name 'cw'; use one of \['fgsm', 'pgd'\]"),
    ({"attacks": [{"name": "fgsm", "eps": -1}]}, r"attacks\[0\]: eps must be .* got -1"),
    ({"attacks": [{"name": "fgsm"}]}, "give the radius 'eps'"),
    ({"attacks": [{"name": "pgd", "eps": 2, "steps": 0}]}, "steps must be an integer >= 1, got 0"),
    ({"attacks": [{"name": "pgd", "eps": 2, "step_size": -0.5}]}, "step_size must be > 0"),
    ({"attacks": [{"name": "pgd", "eps": 2, "random_start": "yes"}]}, "random_start must be true or false"),
    ({"attacks": [{"name": "fgsm", "eps": 2, "steps": 3}]}, r"unknown key\(s\) \['steps'\] for 'fgsm'"),
    ({"attacks": [{"name": "pgd", "eps": 2}, {"name": "pgd", "eps": 2, "steps": 50}]}, "give one of them a 'label'"),
    ({"attacks": {"name": "pgd", "eps": 2}}, "must be a list of dicts"),
    ({"attacks": [{"name": "fgsm", "eps": 2, "label": "hflip"}]}, "label 'hflip' is the name of a transform"),
    ({"attacks": [{"name": "fgsm", "eps": 2, "label": "a/b"}]}, "without '/'"),
    ({"attacks": ["pgd"]}, "must be a dict"),
    ({"rotations": [360]}, "identity; drop it"),
    ({"rotations": [90, -270]}, r"same rotation twice \(rot90\)"),
    ({"rotations": [float("nan")]}, "finite angles"),
    ({"rotations": ["45"]}, "finite angles"),
    ({"num_classes": 0}, "num_classes must be a positive integer"),
    ({"bounds": (1.0, -1.0)}, "bounds must be"),
    ({"pixel_scale": -1}, "pixel_scale"),
    ({"background": float("inf")}, "background must be a finite"),
    ({"flips": "no"}, "flips and symmetry must be true or false"),
    ({"rotations": [], "flips": False, "symmetry": False}, "nothing to evaluate"),
])
def test_bad_arguments_fail_up_front(kwargs, match):
    with pytest.raises(ValueError, match=match):
        Robustness(**kwargs)


def test_defaults_and_names():
    callback = Robustness(rotations=[-90, 22.5, 390], attacks=[{"name": "pgd", "eps": 0.5, "label": "pgd_weak"}])
    assert list(callback.rotations) == ["rot270", "rot22.5", "rot30"]
    assert callback.attacks[0].label == "pgd_weak" and callback.attacks[0].steps == 10
    assert callback.attacks[0].random_start is True
    assert list(Robustness().rotations) == [f"rot{a}" for a in DEFAULT_ROTATIONS] and Robustness().attacks == []


@pytest.mark.parametrize("group,generators", [
    (None, ["rot90", "hflip"]), ("D4", ["rot90", "hflip"]), ("C8", ["rot90"]), ("C4", ["rot90"]),
    ("C2", ["rot180"]), ("D2", ["rot180", "hflip"]), ("D1", ["hflip"]), ("D3", ["hflip"]), ("C1", [])])
def test_group_generators(group, generators):
    assert group_generators(group) == generators


def test_unknown_group_is_an_error():
    with pytest.raises(ValueError, match="cannot read the group 'SO2'"):
        group_generators("SO2")


def test_import_does_not_load_opacus():
    if "opacus" in sys.modules:  # imported by other tests of this session: check in a fresh interpreter
        code = "import sys, eqlightning.evaluation; assert 'opacus' not in sys.modules, 'opacus was imported'"
        subprocess.run([sys.executable, "-c", code], check=True)
    else:
        import eqlightning.evaluation  # noqa: F401

        assert "opacus" not in sys.modules
