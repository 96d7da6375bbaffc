"""benchmarks/run.py says when the machine was busy: spreads, load, CPU share, the noisy verdict, the refusal to
write.

The decision functions are tested on synthetic numbers (no timing); one tiny end-to-end run checks the report's shape.
"""

from __future__ import annotations

import importlib.util
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "benchmarks" / "run.py"


def _load_bench():
    spec = importlib.util.spec_from_file_location("bench_run", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


bench = _load_bench()
LIMITS = bench.NOISE_THRESHOLDS


def quiet_block(**changes) -> dict:
    """Facts of a (device, batch) block well inside every threshold; ``changes`` override some."""
    block = {"relative_iqr": {"equivariant/nonprivate": 0.02, "equivariant/dp-fused": 0.03, "eval exported": 0.01},
             "load_before": [1.9, 1.5, 1.0], "load_after": [2.0, 1.6, 1.1], "own_load_before": 1.8,
             "own_load_after": 1.9, "free_cpus": 0, "threads": 2, "cpu_per_wall": 1.8, "cpu_share": 0.9}
    return {**block, **changes}


# ------------------------------------------------------------------------------------------------- spread
def test_spread_of_identical_rounds_is_zero():
    s = bench.spread([50.0] * 11)
    assert s == {"median": 50.0, "min": 50.0, "max": 50.0, "relative_iqr": 0.0}


def test_spread_is_the_interquartile_range_over_the_median():
    s = bench.spread([90.0, 95.0, 100.0, 105.0, 110.0])  # inclusive quartiles 95 and 105
    assert (s["median"], s["min"], s["max"]) == (100.0, 90.0, 110.0)
    assert s["relative_iqr"] == pytest.approx(0.10)


def test_spread_ignores_a_single_outlier_but_not_a_busy_half():
    quiet = [54.0, 55.0, 54.5, 53.8, 190.0, 54.2, 54.9, 55.1, 54.4, 54.0, 54.6]
    busy = [54.0, 190.0, 54.5, 120.0, 55.0, 192.0, 54.2, 150.0, 54.9, 188.0, 54.4]
    assert bench.spread(quiet)["relative_iqr"] < LIMITS["max_relative_iqr"]
    assert bench.spread(quiet)["max"] == 190.0
    assert bench.spread(busy)["relative_iqr"] > LIMITS["max_relative_iqr"]


def test_spread_of_one_round():
    assert bench.spread([3.0])["relative_iqr"] == 0.0


def test_round_ratios_pair_the_rounds():
    a, b = {"rounds": [2.0, 3.0, 4.0]}, {"rounds": [1.0, 2.0, 2.0]}
    assert bench.round_ratios(a, b) == [2.0, 1.5, 2.0]
    assert bench.paired_ratio(a, b) == 2.0


# ------------------------------------------------------------------------------------- each threshold alone
def test_quiet_block_has_no_reasons():
    assert bench.noise_reasons({"cpu/64": quiet_block()}) == []


def test_spread_threshold():
    limit = LIMITS["max_relative_iqr"]
    assert bench.spread_reason({"a": limit, "b": 0.0}, limit) is None  # at the limit: still quiet
    reason = bench.spread_reason({"a": limit + 0.001, "b": 0.0}, limit)
    assert reason is not None and f"a {100 * (limit + 0.001):.1f}%" in reason and "b " not in reason


def test_spread_threshold_from_synthetic_timings():
    limit = LIMITS["max_relative_iqr"]
    timings = {"steady": [100.0, 101.0, 99.0, 100.5, 100.2], "jumpy": [100.0, 80.0, 120.0, 60.0, 140.0]}
    iqr = {name: bench.spread(t)["relative_iqr"] for name, t in timings.items()}
    reason = bench.spread_reason(iqr, limit)
    assert "jumpy" in reason and "steady" not in reason


def test_spread_reason_lists_the_worst_first():
    reason = bench.spread_reason({f"c{i}": 0.2 + i / 100 for i in range(5)}, 0.1)
    assert reason.index("c4") < reason.index("c3") < reason.index("c2") and "and 2 more" in reason


def test_load_threshold():
    limit = LIMITS["max_external_load"]
    # 2 CPUs, 2 threads: nothing free; the benchmark's own 2.0 does not count
    assert bench.load_reason(2.0 + limit, 2.0, 0, limit) is None  # at the limit: still quiet
    assert "2.75 at the start" in bench.load_reason(2.0 + limit + 0.25, 2.0, 0, limit)
    # free CPUs absorb other load
    assert bench.load_reason(6.0, 0.0, 6, limit) is None
    assert bench.load_reason(6.6, 0.0, 6, limit) is not None


def test_cpu_share_threshold():
    limit = LIMITS["min_cpu_share"]
    assert bench.cpu_share_reason(limit, 2, limit) is None
    reason = bench.cpu_share_reason(limit - 0.01, 2, limit)
    assert reason is not None and "0.98 CPU s per wall s" in reason
    assert bench.cpu_share_reason(None, 1, limit) is None  # not checked on CUDA


@pytest.mark.parametrize("changes, word", [
    ({"relative_iqr": {"equivariant/dp-fused": 0.25}}, "relative IQR"),
    ({"load_before": [3.5, 2.0, 1.0]}, "load average"),
    ({"cpu_share": 0.3}, "CPU s per wall s"),
])
def test_each_threshold_alone_makes_it_noisy(changes, word):
    reasons = bench.noise_reasons({"cpu/64": quiet_block(), "cpu/256": quiet_block(**changes)})
    assert len(reasons) == 1 and reasons[0].startswith("cpu/256: ") and word in reasons[0]


def test_all_thresholds_crossed():
    busy = quiet_block(relative_iqr={"x": 0.5}, load_before=[4.0, 3.0, 2.0], cpu_share=0.2)
    assert len(bench.noise_reasons({"cpu/64": busy})) == 3


def test_thresholds_are_passed_through():
    block = quiet_block(relative_iqr={"x": 0.05})
    assert bench.noise_reasons({"b": block}) == []
    assert len(bench.noise_reasons({"b": block}, {**LIMITS, "max_relative_iqr": 0.04})) == 1


# ---------------------------------------------------------------------------------------- own load, facts
def test_own_load_follows_the_kernel_average():
    assert bench.own_load([(0.0, 0.0), (60.0, 120.0)]) == pytest.approx(2 * (1 - math.exp(-1)))  # 2 CPUs for 60 s
    assert bench.own_load([(0.0, 0.0), (1000.0, 1000.0)]) == pytest.approx(1.0)  # steady state
    # busy long ago, idle for the last minute: decayed by e
    idle = bench.own_load([(0.0, 0.0), (1000.0, 1000.0), (1060.0, 1000.0)])
    assert idle == pytest.approx(math.exp(-1))
    assert bench.own_load([(5.0, 1.0)]) == 0.0


def test_cpu_history_snapshot():
    snap = bench.CpuHistory().snapshot()
    assert len(snap["load"]) == 3 and snap["own_load"] >= 0.0


def test_block_quietness_collects_the_facts():
    import torch

    result = {"train_step_spread": {"a": {"relative_iqr": 0.04}}, "eval_forward_spread": {"b": {"relative_iqr": 0.3}}}
    before, after = {"load": [1.0, 0.5, 0.2], "own_load": 0.4}, {"load": [2.0, 1.0, 0.4], "own_load": 1.9}
    facts = bench.block_quietness(result, {"cpu_s": 3.0, "wall_s": 2.0}, before, after, torch.device("cpu"))
    threads = torch.get_num_threads()
    assert facts["relative_iqr"] == {"a": 0.04, "eval b": 0.3}
    assert facts["cpu_per_wall"] == 1.5 and facts["cpu_share"] == round(1.5 / threads, 3)
    assert facts["threads"] == threads and facts["free_cpus"] == bench.cpus_available() - threads
    assert (facts["load_before"], facts["load_after"], facts["own_load_before"]) == ([1.0, 0.5, 0.2],
                                                                                     [2.0, 1.0, 0.4], 0.4)
    reasons = bench.noise_reasons({"cpu/8": facts})
    assert any("eval b 30.0%" in r for r in reasons)


# ------------------------------------------------------------------------------------------ writing or not
def _report(noisy: bool) -> dict:
    return {"noisy": noisy, "noisy_reasons": ["cpu/64: something"] if noisy else [], "quiet": {}}


def test_noisy_report_is_not_written(tmp_path, capsys):
    out = tmp_path / "r.json"
    assert bench.write_report(_report(True), ["profile"], out, allow_noisy=False) is False
    assert not out.exists() and not (tmp_path / "r-profile.txt").exists()
    assert "--allow-noisy" in capsys.readouterr().out


def test_noisy_report_is_written_when_allowed(tmp_path):
    out = tmp_path / "r.json"
    assert bench.write_report(_report(True), [], out, allow_noisy=True) is True
    assert json.loads(out.read_text())["noisy"] is True


def test_quiet_report_is_written(tmp_path):
    out = tmp_path / "sub" / "r.json"
    assert bench.write_report(_report(False), ["profile"], out, allow_noisy=False) is True
    assert json.loads(out.read_text())["noisy"] is False and (tmp_path / "sub" / "r-profile.txt").exists()


def test_print_quietness_is_loud_only_when_noisy(capsys):
    quiet = {"nproc": 2, "torch_threads": 2, "thresholds": LIMITS, "blocks": {"cpu/64": quiet_block()}}
    bench.print_quietness(quiet, [])
    printed = capsys.readouterr().out
    assert "cpu/64: load 1.90" in printed and "quiet: no threshold crossed" in printed and "NOISY" not in printed
    bench.print_quietness(quiet, ["cpu/64: load average 9"])
    assert "NOISY" in capsys.readouterr().out


# ------------------------------------------------------------------------------------------------ end to end
@pytest.mark.slow
def test_tiny_run_reports_quietness(tmp_path):
    out = tmp_path / "bench.json"
    args = ["--batch-sizes", "2", "--warmup", "0", "--repeats", "2", "--size", "8", "--group", "C1",
            "--skip-functorch", "--skip-data", "--no-profile", "--allow-noisy", "--settle-seconds", "0",
            "--out", str(out)]
    run = subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, cwd=REPO)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "=== cpu (32), batch 2 ===" in run.stdout and "=== quietness:" in run.stdout
    report = json.loads(out.read_text())
    quiet, result = report["quiet"], report["results"]["cpu"]["2"]
    assert {"nproc", "cpu_count", "torch_threads", "thresholds", "blocks"} <= set(quiet)
    block = quiet["blocks"]["cpu/2"]
    assert {"load_before", "load_after", "measured_cpu_s", "measured_wall_s", "cpu_per_wall"} <= set(block)
    assert set(result["train_step_spread"]) == set(result["train_step_ms"])
    assert set(result["ratio_spread"]) == set(result["targets"])
    assert report["noisy"] == bool(report["noisy_reasons"]) == ("NOISY" in run.stdout)
