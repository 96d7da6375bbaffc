"""Speed of equivariant and private training, measured side by side in one process.

    python benchmarks/run.py --out benchmarks/results/<machine>.json        (or: make bench)
    python benchmarks/run.py --backbone eq_resnet8_3d --group O --batch-sizes 8 --out .../<machine>-3d.json

3D backbones are measured on volumes ``size^3`` (the plain comparisons then use Conv3d), without the data block.

What is compared (default: the default equivariant backbone of configs/, eq_resnet8 with D4 and GroupNorm, at
28 px, 1 channel, 2 classes; random data, cross-entropy, SGD with momentum):

* ``equivariant``: the backbone as trained, filters expanded from basis coefficients at every step;
* ``same_channel_plain``: its export (plain Conv2d/GroupNorm with the same channels), trained as a plain CNN;
* ``param_matched_plain``: a plain CNN with the same parameter count (the same ResNet with the trivial group C1,
  width searched to match, exported);
* each non-private and private (DP-SGD: per-sample gradients, clipping to 1.0, noise 1.0, Opacus's DPOptimizer as
  the ``DifferentialPrivacy`` callback builds it with ``eqlightning.privacy.engine.make_private``); for the
  equivariant backbone every per-sample mechanism: ``hooks`` (layer rules), ``functorch`` and ``fused`` (the
  callback's default);
* eval forward (no grad) of the equivariant model in training mode (expanding filters), in eval mode (cached
  filters) and exported, against a plain CNN with the same channels built without equivariance (C1, exported);
* data pipeline throughput (the training DataLoader of the embedded BreastMNIST sample with D4 augmentation) against
  the images/s of the model steps.

Timing: after warm-up, the configurations are measured round-robin (one step each per round, so drift hits all of
them alike); times are medians over rounds and the target ratios medians of the per-round ratios; each private step
is also split into forward, backward (per-sample gradients included) and optimizer step (clipping, noise, update). Peak memory is the growth of the process's peak
resident set over two steps (CPU, after returning freed memory to the OS) or ``torch.cuda.max_memory_allocated``.
The JSON holds, per device and batch size, the target ratios under ``dp_over_nonprivate``,
``equivariant_over_same_channel_plain`` and ``exported_over_plain``; ``--profile`` (default on) adds a
``torch.profiler`` table of the slowest operators of the non-private and the private equivariant step.

Quietness: a busy machine distorts the ratios, not only the times (the per-sample work of a private step does not
slow down like the rest), so every run records, per device and batch size, the spread of each configuration's
per-round times (``train_step_spread``, ``eval_forward_spread``: interquartile range over the median, min, max) and of
the per-round target ratios (``ratio_spread``), and under ``quiet`` the load average before and after each block,
the CPUs, the torch threads and the process's CPU time over the wall time of the measured rounds. The run is
*noisy* when any threshold of ``NOISE_THRESHOLDS`` is crossed (see ``noise_reasons``); then a warning names what was
noisy, and the results file is not written (exit status 1) unless ``--allow-noisy`` is given, in which case the JSON
says ``"noisy": true`` with the reasons. The results table is printed either way.
"""

from __future__ import annotations

import argparse
import copy
import ctypes
import gc
import json
import math
import os
import platform
import statistics
import time
from contextlib import nullcontext
from pathlib import Path

import torch
import torch.nn.functional as F

from eqlightning.models import backbone_entry, create_backbone
from eqlightning.nn import export

TARGETS = {"dp_over_nonprivate": 1.3, "equivariant_over_same_channel_plain": 1.05, "exported_over_plain": 1.0}
DP_PATHS = ("fused", "hooks", "functorch", "opacus")  # the engine's mechanisms, and stock Opacus as the baseline

# A (device, batch size) block is noisy when any of these is crossed (checked by ``noise_reasons``):
#   max_relative_iqr: the interquartile range of any timed configuration's per-round times (train steps and eval
#       forwards) above this fraction of its median (on a quiet 2-core VM running 2 torch threads the small steps
#       still spread by 10-15%: measured with nothing else running; a busy machine gives 30% and more);
#   max_external_load: at the start of the block, the 1-minute load average minus this benchmark's own part of it
#       (its CPU use, averaged as the kernel averages the load) above the CPUs the benchmark leaves free
#       (nproc - the threads it runs: torch's intra-op threads on CPU, 1 on CUDA) plus this many CPUs: other
#       processes wanted the CPUs the benchmark uses;
#   min_cpu_share (CPU devices only): the process's CPU time over the wall time of the measured rounds below this
#       fraction of its torch threads: it got much less CPU than its threads could use, so it was competing.
# The load average is the whole (virtual) machine's; in a container sharing a larger host it may overstate the load.
NOISE_THRESHOLDS = {"max_relative_iqr": 0.20, "max_external_load": 0.5, "min_cpu_share": 0.5}
SETTLE_TIMEOUT_S = 240  # before each block, wait at most this long for the load of earlier work to decay
LOADAVG_TAU_S = 60.0  # the kernel's 1-minute load average is an exponential average with a 60 s time constant


# --------------------------------------------------------------------------------------------------- models
def count_parameters(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def param_matched_plain(name: str, target: int, **kwargs) -> tuple[torch.nn.Module, float]:
    """The backbone with the trivial group C1, exported (a plain CNN with free k x k filters), width chosen so its
    parameters match ``target``. (Counted after export: escnn's C1 basis of a small kernel has fewer than k*k
    elements, the exported convolution has all of them.)"""
    def build(width):
        return export(create_backbone(name, group="C1", width_multiplier=width, **kwargs))
    low, high = 0.05, 8.0
    for _ in range(30):
        mid = (low * high) ** 0.5
        low, high = (mid, high) if count_parameters(build(mid)) < target else (low, mid)
    width = min((low, high), key=lambda w: abs(count_parameters(build(w)) - target))
    return build(width), width


def build_models(args) -> tuple[dict, float]:
    """The compared models, and the width multiplier of the parameter-matched plain CNN."""
    kwargs = dict(in_channels=args.in_channels, num_classes=args.num_classes, input_size=args.size)
    eq = create_backbone(args.backbone, group=args.group, **kwargs)
    plain, width = param_matched_plain(args.backbone, count_parameters(eq), **kwargs)
    return {
        "equivariant": eq,
        "same_channel_plain": export(eq),
        "param_matched_plain": plain,
        # for inference: a plain CNN with the same channels that never was equivariant (C1, width 1)
        "plain_reference": export(create_backbone(args.backbone, group="C1", **kwargs)),
    }, width


# ---------------------------------------------------------------------------------------------------- steps
def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class TrainStep:
    """One configuration: a model copy, its (private) optimizer and a fixed random batch."""

    def __init__(self, model, private: str | None, batch: int, args, device: torch.device):
        self.device, self.private = device, private
        self.model = copy.deepcopy(model).to(device).train()
        optimizer = torch.optim.SGD(self.model.parameters(), lr=1e-3, momentum=0.9)
        self.forward = self.model
        if private == "opacus":  # the baseline: Opacus's own GradSampleModule (hooks) with our layer rules
            from opacus import GradSampleModule

            from eqlightning.privacy import make_private_optimizer
            self.forward = GradSampleModule(self.model, loss_reduction="mean")
            optimizer = make_private_optimizer(optimizer, distributed=False, noise_multiplier=1.0, max_grad_norm=1.0,
                                               expected_batch_size=batch)
        elif private is not None:  # the same engine as the DifferentialPrivacy callback, outside Lightning
            from eqlightning.privacy.engine import make_private
            optimizer = make_private(self.model, optimizer, mechanism=private, noise_multiplier=1.0,
                                     max_grad_norm=1.0, expected_batch_size=batch).optimizer
        self.optimizer = optimizer
        generator = torch.Generator().manual_seed(0)
        self.x = torch.randn(batch, args.in_channels, *(args.size,) * args.dims, generator=generator).to(device)
        self.y = torch.randint(0, args.num_classes, (batch,), generator=generator).to(device)
        self.autocast = (torch.autocast(device.type, dtype=torch.bfloat16) if args.precision == "bf16-mixed"
                         else nullcontext())

    def __call__(self) -> tuple[float, float, float]:
        """Run one step; returns (forward, backward, optimizer) seconds."""
        synchronize(self.device)
        t0 = time.perf_counter()
        with self.autocast:
            out = self.forward(self.x)
        loss = F.cross_entropy(out.float(), self.y)
        synchronize(self.device)
        t1 = time.perf_counter()
        loss.backward()
        synchronize(self.device)
        t2 = time.perf_counter()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        synchronize(self.device)
        t3 = time.perf_counter()
        return t1 - t0, t2 - t1, t3 - t2


class EvalForward:
    def __init__(self, model, mode: str, batch: int, args, device: torch.device):
        self.device, self.model = device, copy.deepcopy(model).to(device).train(mode == "train")
        self.x = torch.randn(batch, args.in_channels, *(args.size,) * args.dims,
                             generator=torch.Generator().manual_seed(1)).to(device)
        self.autocast = (torch.autocast(device.type, dtype=torch.bfloat16) if args.precision == "bf16-mixed"
                         else nullcontext())

    def __call__(self) -> tuple[float]:
        synchronize(self.device)
        t0 = time.perf_counter()
        with torch.no_grad(), self.autocast:
            self.model(self.x)
        synchronize(self.device)
        return (time.perf_counter() - t0,)


def measure(configs: dict, warmup: int, repeats: int) -> tuple[dict, dict]:
    """Round-robin timing; per configuration the median of each phase and of the total, in milliseconds, and the
    spread of the totals; and the process's CPU and wall seconds over the measured rounds (warm-up excluded)."""
    for run in configs.values():
        for _ in range(warmup):
            run()
    samples = {name: [] for name in configs}
    wall, cpu = time.perf_counter(), time.process_time()
    for _ in range(repeats):
        for name, run in configs.items():
            samples[name].append(run())
    usage = {"cpu_s": time.process_time() - cpu, "wall_s": time.perf_counter() - wall}
    result = {}
    for name, rows in samples.items():
        totals = [sum(r) for r in rows]
        result[name] = {"ms": 1e3 * statistics.median(totals), "min_ms": 1e3 * min(totals),
                        "phases_ms": [1e3 * statistics.median(p) for p in zip(*rows)], "rounds": totals,
                        "spread": spread([1e3 * t for t in totals])}
    return result, usage


def spread(values: list[float]) -> dict:
    """Median, min, max and the interquartile range over the median (0 for a single value) of ``values``."""
    median = statistics.median(values)
    q1, _, q3 = statistics.quantiles(values, n=4, method="inclusive") if len(values) > 1 else values * 3
    return {"median": median, "min": min(values), "max": max(values), "relative_iqr": (q3 - q1) / median}


def round_ratios(a: dict, b: dict) -> list[float]:
    """``a / b`` of each round (both measured in the same round)."""
    return [x / y for x, y in zip(a["rounds"], b["rounds"])]


def paired_ratio(a: dict, b: dict) -> float:
    """Median over rounds of ``a / b`` measured in the same round: slow drift of the machine cancels."""
    return statistics.median(round_ratios(a, b))


# --------------------------------------------------------------------------------------------------- memory
def _rss_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise OSError(field)


def peak_memory_mb(run, device: torch.device) -> float | None:
    """Extra memory at the peak of two steps (RSS high-water mark on CPU, allocator peak on CUDA)."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        run(), run()
        return (torch.cuda.max_memory_allocated(device) - base) / 2**20
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset the peak RSS (VmHWM) to the current RSS
        base = _rss_kb("VmRSS")
        run(), run()
        return (_rss_kb("VmHWM") - base) / 1024
    except OSError:
        return None  # not Linux: no per-phase peak RSS


# ----------------------------------------------------------------------------------------------------- data
def data_throughput(batch: int, seconds: float) -> float:
    """Images/s of the training DataLoader (embedded BreastMNIST, D4 augmentation + padded crops, main process)."""
    from eqlightning.data import MedMNISTDataModule

    dm = MedMNISTDataModule("breastmnist", 28, batch_size=batch, rot90=True, flip=True, crop_padding=2,
                            download=False)
    dm.setup("fit")
    loader = dm.train_dataloader()
    images, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        for x, _ in loader:
            images += x.shape[0]
    return images / (time.perf_counter() - start)


# ------------------------------------------------------------------------------------------------ quietness
def own_load(samples: list[tuple[float, float]], tau: float = LOADAVG_TAU_S) -> float:
    """This process's part of a 1-minute load average read at the last sample: the CPUs it kept busy between
    consecutive ``(wall s, CPU s)`` samples, weighted as the kernel's exponential average weights them."""
    now, load = samples[-1][0], 0.0
    for (t0, c0), (t1, c1) in zip(samples, samples[1:]):
        if t1 > t0:
            load += (c1 - c0) / (t1 - t0) * (math.exp((t1 - now) / tau) - math.exp((t0 - now) / tau))
    return load


class CpuHistory:
    """The process's CPU time at moments of the run, for ``own_load``. The CPU time spent before it was made
    (interpreter start, imports) is counted as one CPU kept busy just before."""

    def __init__(self):
        wall, cpu = time.monotonic(), time.process_time()
        self.samples = [(wall - cpu, 0.0), (wall, cpu)]

    def snapshot(self) -> dict:
        """The load averages (1, 5, 15 minutes) now and this process's estimated part of the first."""
        self.samples.append((time.monotonic(), time.process_time()))
        return {"load": [round(x, 2) for x in os.getloadavg()], "own_load": round(own_load(self.samples), 2)}


def cpus_available() -> int:
    """The CPUs this process may run on (what ``nproc`` says)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def block_quietness(result: dict, usage: dict, before: dict, after: dict, device: torch.device) -> dict:
    """The quietness facts of one device and batch size: load before and after, the CPU over wall time of the
    measured rounds and each timed configuration's relative IQR."""
    threads = torch.get_num_threads() if device.type == "cpu" else 1
    cpu_per_wall = usage["cpu_s"] / usage["wall_s"] if usage["wall_s"] > 0 else 0.0
    relative_iqr = {**{k: v["relative_iqr"] for k, v in result["train_step_spread"].items()},
                    **{f"eval {k}": v["relative_iqr"] for k, v in result["eval_forward_spread"].items()}}
    return {
        "load_before": before["load"], "load_after": after["load"],
        "own_load_before": before["own_load"], "own_load_after": after["own_load"],
        "threads": threads, "free_cpus": cpus_available() - threads,
        "measured_cpu_s": round(usage["cpu_s"], 3), "measured_wall_s": round(usage["wall_s"], 3),
        "cpu_per_wall": round(cpu_per_wall, 3),
        "cpu_share": round(cpu_per_wall / threads, 3) if device.type == "cpu" else None,
        "relative_iqr": relative_iqr,
    }


def spread_reason(relative_iqr: dict, limit: float) -> str | None:
    """Why per-round times are too spread (any configuration's IQR above ``limit`` x its median), or None."""
    over = {k: v for k, v in relative_iqr.items() if v > limit}
    if not over:
        return None
    worst = sorted(over.items(), key=lambda kv: -kv[1])
    listed = ", ".join(f"{k} {v:.1%}" for k, v in worst[:3]) + (f" and {len(worst) - 3} more" if len(worst) > 3 else "")
    return f"per-round times spread: relative IQR above {limit:.0%} for {listed}"


def load_reason(load: float, own: float, free_cpus: int, limit: float) -> str | None:
    """Why the load at the start was too high (other processes' load above the free CPUs + ``limit``), or None."""
    external = load - own
    if external <= free_cpus + limit:
        return None
    return (f"load average {load:.2f} at the start, {external:.2f} of it not this benchmark's (own ~{own:.2f}), "
            f"above the {free_cpus} CPU(s) it leaves free + {limit}")


def wait_until_settled(history: "CpuHistory", device: torch.device, timeout: float = SETTLE_TIMEOUT_S) -> None:
    """Wait (at most ``timeout`` s) until the load of other processes passes ``load_reason``: the 1-minute load
    average lags by about a minute, so work that just ended (a test run, a build) would otherwise count as noise."""
    free = cpus_available() - (torch.get_num_threads() if device.type == "cpu" else 1)
    deadline, said = time.monotonic() + timeout, False
    while True:
        now = history.snapshot()
        if load_reason(now["load"][0], now["own_load"], free, NOISE_THRESHOLDS["max_external_load"]) is None:
            return
        if time.monotonic() > deadline:
            return  # measured anyway; noise_reasons will say so
        if not said:
            print(f"waiting up to {timeout:.0f} s for the load of other work to decay (load {now['load'][0]:.2f})",
                  flush=True)
            said = True
        time.sleep(5)


def cpu_share_reason(cpu_share: float | None, threads: int, limit: float) -> str | None:
    """Why the process got too little CPU (CPU/wall below ``limit`` x its threads), or None (also on CUDA)."""
    if cpu_share is None or cpu_share >= limit:
        return None
    return (f"the process got {cpu_share * threads:.2f} CPU s per wall s over the measured rounds, below "
            f"{limit} x its {threads} torch thread(s)")


def noise_reasons(blocks: dict, thresholds: dict = NOISE_THRESHOLDS) -> list[str]:
    """Why the measurement is noisy, one line per crossed threshold and block; empty when quiet. ``blocks`` maps a
    label (device/batch) to ``block_quietness`` facts."""
    reasons = []
    for label, b in blocks.items():
        found = (spread_reason(b["relative_iqr"], thresholds["max_relative_iqr"]),
                 load_reason(b["load_before"][0], b["own_load_before"], b["free_cpus"],
                             thresholds["max_external_load"]),
                 cpu_share_reason(b["cpu_share"], b["threads"], thresholds["min_cpu_share"]))
        reasons += [f"{label}: {r}" for r in found if r is not None]
    return reasons


# ---------------------------------------------------------------------------------------------------- bench
def bench_device(models: dict, args, device: torch.device, batch: int) -> tuple[dict, dict]:
    """The results of one device and batch size, and the CPU and wall seconds of its measured rounds."""
    eq = models["equivariant"]
    train = {"equivariant/nonprivate": TrainStep(eq, None, batch, args, device)}
    for path in DP_PATHS:
        if not (path == "functorch" and args.skip_functorch):
            train[f"equivariant/dp-{path}"] = TrainStep(eq, path, batch, args, device)
    for name in ("same_channel_plain", "param_matched_plain"):
        train[f"{name}/nonprivate"] = TrainStep(models[name], None, batch, args, device)
        train[f"{name}/dp-hooks"] = TrainStep(models[name], "hooks", batch, args, device)
    steps, train_usage = measure(train, args.warmup, args.repeats)
    memory = {name: peak_memory_mb(run, device) for name, run in train.items()}

    evals = {"equivariant/train_mode": EvalForward(eq, "train", batch, args, device),
             "equivariant/eval_cached": EvalForward(eq, "eval", batch, args, device),
             "exported": EvalForward(export(eq.eval()), "eval", batch, args, device),
             "plain_reference": EvalForward(models["plain_reference"], "eval", batch, args, device)}
    eq.train()
    forward, eval_usage = measure(evals, args.warmup, args.repeats * 2)
    usage = {k: train_usage[k] + eval_usage[k] for k in train_usage}

    ms = {name: row["ms"] for name, row in steps.items()}
    fastest = min(DP_PATHS, key=lambda p: ms.get(f"equivariant/dp-{p}", float("inf")))
    pairs = {
        "dp_over_nonprivate": (steps["equivariant/dp-fused"], steps["equivariant/nonprivate"]),
        "equivariant_over_same_channel_plain": (steps["equivariant/nonprivate"],
                                                steps["same_channel_plain/nonprivate"]),
        "exported_over_plain": (forward["exported"], forward["plain_reference"]),
    }
    ratios = {k: paired_ratio(a, b) for k, (a, b) in pairs.items()}
    result = {
        **{k: round(v, 3) for k, v in ratios.items()},
        "targets": TARGETS,
        "met": {k: ratios[k] <= TARGETS[k] * (1.02 if k == "exported_over_plain" else 1.0) for k in ratios},
        "more_ratios": {
            "dp_hooks_over_nonprivate": round(ms["equivariant/dp-hooks"] / ms["equivariant/nonprivate"], 3),
            **({"dp_functorch_over_nonprivate": round(ms["equivariant/dp-functorch"]
                                                      / ms["equivariant/nonprivate"], 3)}
               if "equivariant/dp-functorch" in ms else {}),
            "dp_opacus_over_nonprivate": round(ms["equivariant/dp-opacus"] / ms["equivariant/nonprivate"], 3),
            "dp_fused_over_opacus": round(ms["equivariant/dp-fused"] / ms["equivariant/dp-opacus"], 3),
            "fastest_dp_path": fastest,
            "same_channel_plain_dp_over_nonprivate": round(ms["same_channel_plain/dp-hooks"]
                                                           / ms["same_channel_plain/nonprivate"], 3),
            "equivariant_over_param_matched_plain": round(ms["equivariant/nonprivate"]
                                                          / ms["param_matched_plain/nonprivate"], 3),
            "equivariant_dp_over_same_channel_plain_dp": round(ms["equivariant/dp-fused"]
                                                               / ms["same_channel_plain/dp-hooks"], 3),
            "eval_train_mode_over_exported": round(forward["equivariant/train_mode"]["ms"]
                                                   / forward["exported"]["ms"], 3),
            "eval_cached_over_exported": round(forward["equivariant/eval_cached"]["ms"]
                                               / forward["exported"]["ms"], 3),
        },
        "ratio_spread": {k: rounded_spread(spread(round_ratios(a, b)), "") for k, (a, b) in pairs.items()},
        "train_step_ms": {k: round(v, 2) for k, v in ms.items()},
        "train_step_spread": {k: rounded_spread(r["spread"], "_ms") for k, r in steps.items()},
        "train_step_phases_ms": {k: {"forward": round(r["phases_ms"][0], 2), "backward": round(r["phases_ms"][1], 2),
                                     "optimizer": round(r["phases_ms"][2], 2)} for k, r in steps.items()},
        "peak_memory_mb": {k: None if v is None else round(v, 1) for k, v in memory.items()},
        "eval_forward_ms": {k: round(r["ms"], 2) for k, r in forward.items()},
        "eval_forward_spread": {k: rounded_spread(r["spread"], "_ms") for k, r in forward.items()},
        "images_per_s": {k: round(batch / v * 1e3, 1) for k, v in ms.items()},
    }
    if device.type == "cpu" and not args.skip_data:
        data = data_throughput(batch, args.data_seconds)
        result["images_per_s"]["data_pipeline"] = round(data, 1)
        result["more_ratios"]["data_over_private_step_throughput"] = round(
            data / result["images_per_s"]["equivariant/dp-fused"], 2)
    return result, usage


def rounded_spread(s: dict, unit: str) -> dict:
    """The relative IQR, min and max of a ``spread`` for the JSON (``unit`` suffixes the keys of min and max)."""
    return {"relative_iqr": round(s["relative_iqr"], 4), f"min{unit}": round(s["min"], 3),
            f"max{unit}": round(s["max"], 3)}


def profile_steps(models: dict, args, device: torch.device, batch: int) -> str:
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    tables = []
    for label, private in (("non-private", None), ("private (fused)", "fused")):
        run = TrainStep(models["equivariant"], private, batch, args, device)
        run(), run()
        with profile(activities=activities) as prof:
            for _ in range(3):
                run()
        sort = "cuda_time_total" if device.type == "cuda" else "cpu_time_total"
        tables.append(f"== {args.backbone} {args.group}, batch {batch}, {device.type}, {label}: 3 steps ==\n"
                      + prof.key_averages().table(sort_by=sort, row_limit=25, max_name_column_width=48))
    return "\n\n".join(tables)


def machine_description(device: torch.device) -> dict:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    info = {"cpu": cpu, "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "torch": torch.__version__, "python": platform.python_version(), "platform": platform.platform()}
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def print_table(device: str, batch: int, r: dict) -> None:
    print(f"\n=== {device}, batch {batch} ===")
    print(f"{'train step':42s} {'ms':>9s} {'iqr':>6s} {'fwd':>8s} {'bwd':>8s} {'opt':>8s} {'img/s':>8s} "
          f"{'peak MB':>8s}")
    for name, ms in r["train_step_ms"].items():
        p = r["train_step_phases_ms"][name]
        mem = r["peak_memory_mb"][name]
        iqr = r["train_step_spread"][name]["relative_iqr"]
        print(f"{name:42s} {ms:9.1f} {iqr:6.1%} {p['forward']:8.1f} {p['backward']:8.1f} {p['optimizer']:8.1f} "
              f"{r['images_per_s'][name]:8.0f} {'-' if mem is None else f'{mem:8.0f}':>8s}")
    for name, ms in r["eval_forward_ms"].items():
        print(f"{'eval forward ' + name:42s} {ms:9.1f} {r['eval_forward_spread'][name]['relative_iqr']:6.1%}")
    if "data_pipeline" in r["images_per_s"]:
        print(f"{'data pipeline (images/s)':42s} {r['images_per_s']['data_pipeline']:9.0f}")
    for key, target in r["targets"].items():
        status = "met" if r["met"][key] else f"MISSED by {r[key] / target - 1:+.0%}"
        bound = "= 1.0 (within 2%)" if key == "exported_over_plain" else f"<= {target}"
        s = r["ratio_spread"][key]
        print(f"{key:42s} {r[key]:9.3f}   target {bound}  {status}   "
              f"(rounds {s['min']:.3f}..{s['max']:.3f}, iqr {s['relative_iqr']:.1%})")
    for key, value in r["more_ratios"].items():
        print(f"{key:42s} {value if isinstance(value, str) else f'{value:9.3f}'}")


def print_quietness(quiet: dict, reasons: list[str]) -> None:
    """The quietness facts of each block, then either a one-line all-clear or a loud warning with the reasons."""
    t = quiet["thresholds"]
    print(f"\n=== quietness: {quiet['nproc']} CPUs, {quiet['torch_threads']} torch threads; noisy when a relative IQR "
          f"> {t['max_relative_iqr']:.0%}, other load > free CPUs + {t['max_external_load']}, or CPU share "
          f"< {t['min_cpu_share']} ===")
    for label, b in quiet["blocks"].items():
        worst = max(b["relative_iqr"], key=b["relative_iqr"].get)
        share = "" if b["cpu_share"] is None else f" = {b['cpu_share']:.2f} of {b['threads']} thread(s)"
        print(f"{label}: load {b['load_before'][0]:.2f} -> {b['load_after'][0]:.2f} (own ~{b['own_load_before']:.2f} "
              f"at start, {b['free_cpus']} CPU(s) free); measured rounds {b['cpu_per_wall']:.2f} CPU s per wall s"
              f"{share}; largest relative IQR {b['relative_iqr'][worst]:.1%} ({worst})")
    if not reasons:
        print("quiet: no threshold crossed")
        return
    bar = "!" * 100
    print(f"\n{bar}\n!!! NOISY: the machine was busy; the times and ratios above are not trustworthy")
    for reason in reasons:
        print(f"!!!  - {reason}")
    print(bar)


def write_report(report: dict, profiles: list[str], out: Path | None, allow_noisy: bool) -> bool:
    """Write the JSON (and the profiles beside it) to ``out``, or print the profiles when there is no ``out``.
    Returns False, writing nothing, when the report is noisy and ``allow_noisy`` is not set."""
    if out is None:
        if profiles:
            print("\n" + "\n\n".join(profiles))
        return True
    if report["noisy"] and not allow_noisy:
        print(f"\nNOT writing {out}: the measurement was noisy (rerun on a quiet machine, or pass --allow-noisy to "
              "write it with \"noisy\": true)")
        return False
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"\nwrote {out}" + (" (marked noisy)" if report["noisy"] else ""))
    if profiles:
        profile_path = out.with_name(out.stem + "-profile.txt")
        profile_path.write_text("\n\n".join(profiles) + "\n")
        print(f"wrote {profile_path}")
    return True


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    parser.add_argument("--devices", nargs="+", default=None, help="default: cpu, and cuda when available")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[64, 256])
    parser.add_argument("--backbone", default="eq_resnet8")
    parser.add_argument("--group", default="D4")
    parser.add_argument("--size", type=int, default=28)
    parser.add_argument("--in-channels", type=int, default=1)
    parser.add_argument("--num-classes", type=int, default=2)
    parser.add_argument("--precision", choices=["32", "bf16-mixed"], default=None,
                        help="default: 32 on CPU, bf16-mixed on CUDA")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=11)
    parser.add_argument("--skip-functorch", action="store_true", help="skip the functorch mechanism (slow)")
    parser.add_argument("--skip-data", action="store_true")
    parser.add_argument("--data-seconds", type=float, default=3.0)
    parser.add_argument("--no-profile", dest="profile", action="store_false")
    parser.add_argument("--machine", default=None, help="a name for the machine, stored with the results")
    parser.add_argument("--allow-noisy", action="store_true",
                        help="write the results even when the machine was busy (the JSON then says \"noisy\": true)")
    parser.add_argument("--settle-seconds", type=float, default=SETTLE_TIMEOUT_S,
                        help="before each block, wait at most this long for earlier load to decay (0: don't wait)")
    args = parser.parse_args()
    args.dims = backbone_entry(args.backbone).dims  # 3D backbones (eq_resnet8_3d, ...) get volumes size^3
    if args.dims == 3:
        args.skip_data = True  # the data-throughput block reads the embedded 2D BreastMNIST sample
    history = CpuHistory()
    devices = args.devices or (["cpu"] + (["cuda"] if torch.cuda.is_available() else []))
    torch.manual_seed(0)
    models, width = build_models(args)
    report = {"machine": {"name": args.machine, **machine_description(torch.device(devices[-1]))},
              "config": {"backbone": args.backbone, "group": args.group, "input_size": args.size, "dims": args.dims,
                         "in_channels": args.in_channels, "num_classes": args.num_classes,
                         "warmup": args.warmup, "repeats": args.repeats,
                         "parameters": {k: count_parameters(m) for k, m in models.items()},
                         "param_matched_width_multiplier": round(width, 4)},
              "noisy": None, "noisy_reasons": None,  # decided after the runs
              "quiet": {"nproc": cpus_available(), "cpu_count": os.cpu_count(),
                        "torch_threads": torch.get_num_threads(), "thresholds": NOISE_THRESHOLDS, "blocks": {}},
              "results": {}}
    profiles = []
    precision_arg = args.precision
    for name in devices:
        device = torch.device(name)
        args.precision = precision_arg or ("bf16-mixed" if device.type == "cuda" else "32")
        report["results"][name] = {"precision": args.precision}
        for batch in args.batch_sizes:
            wait_until_settled(history, device, args.settle_seconds)
            before = history.snapshot()
            result, usage = bench_device(models, args, device, batch)
            after = history.snapshot()
            report["results"][name][str(batch)] = result
            report["quiet"]["blocks"][f"{name}/{batch}"] = block_quietness(result, usage, before, after, device)
            print_table(f"{name} ({args.precision})", batch, result)
        if args.profile:
            profiles.append(profile_steps(models, args, device, args.batch_sizes[0]))
    reasons = noise_reasons(report["quiet"]["blocks"])
    report["noisy"], report["noisy_reasons"] = bool(reasons), reasons
    print_quietness(report["quiet"], reasons)
    if not write_report(report, profiles, args.out, args.allow_noisy):
        raise SystemExit(1)


if __name__ == "__main__":
    main()
