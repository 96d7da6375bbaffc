"""Speed of equivariant and private training, measured side by side in one process.

    python benchmarks/run.py --out benchmarks/results/<machine>.json        (or: make bench)

What is compared (default: the default equivariant backbone of configs/, eq_resnet8 with D4 and GroupNorm, at
28 px, 1 channel, 2 classes; random data, cross-entropy, SGD with momentum):

* ``equivariant``: the backbone as trained, filters expanded from basis coefficients at every step;
* ``same_channel_plain``: its export (plain Conv2d/GroupNorm with the same channels), trained as a plain CNN;
* ``param_matched_plain``: a plain CNN with the same parameter count (the same ResNet with the trivial group C1,
  width searched to match, exported);
* each non-private and private (DP-SGD: per-sample gradients, clipping to 1.0, noise 1.0, Opacus's DPOptimizer as
  the ``DifferentialPrivacy`` callback builds it); for the equivariant backbone every per-sample path: Opacus hooks,
  Opacus functorch and eqlightning's ``fused`` path (the callback's default);
* eval forward (no grad) of the equivariant model in training mode (expanding filters), in eval mode (cached
  filters) and exported, against a plain CNN with the same channels built without equivariance (C1, exported);
* data pipeline throughput (the training DataLoader of the embedded BreastMNIST sample with D4 augmentation) against
  the images/s of the model steps.

Timing: after warm-up, the configurations are measured round-robin (one step each per round, so drift hits all of
them alike); times are medians over rounds and the target ratios medians of the per-round ratios; each private step is also split into forward, backward (per-sample
gradients included) and optimizer step (clipping, noise, update). Peak memory is the growth of the process's peak
resident set over two steps (CPU, after returning freed memory to the OS) or ``torch.cuda.max_memory_allocated``.
The JSON holds, per device and batch size, the target ratios under ``dp_over_nonprivate``,
``equivariant_over_same_channel_plain`` and ``exported_over_plain``; ``--profile`` (default on) adds a
``torch.profiler`` table of the slowest operators of the non-private and the private equivariant step.
"""

from __future__ import annotations

import argparse
import copy
import ctypes
import gc
import json
import os
import platform
import statistics
import time
from contextlib import nullcontext
from pathlib import Path

import torch
import torch.nn.functional as F

from eqlightning.models import create_backbone
from eqlightning.nn import export

TARGETS = {"dp_over_nonprivate": 1.3, "equivariant_over_same_channel_plain": 1.05, "exported_over_plain": 1.0}
DP_PATHS = ("fused", "hooks", "functorch")


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
        if private is not None:
            from eqlightning.privacy.fused import PerSampleGradModule, enable_fused
            from eqlightning.privacy.optimizer import make_private_optimizer
            if private == "fused":
                enable_fused(self.model)
            self.forward = PerSampleGradModule(self.model, batch_first=True, loss_reduction="mean", strict=True,
                                            force_functorch=private == "functorch")
            optimizer = make_private_optimizer(optimizer, distributed=False, noise_multiplier=1.0,
                                               max_grad_norm=1.0, expected_batch_size=batch)
        self.optimizer = optimizer
        generator = torch.Generator().manual_seed(0)
        self.x = torch.randn(batch, args.in_channels, args.size, args.size, generator=generator).to(device)
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
        self.x = torch.randn(batch, args.in_channels, args.size, args.size,
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


def measure(configs: dict, warmup: int, repeats: int) -> dict:
    """Round-robin timing; per configuration the median of each phase and of the total, in milliseconds."""
    for run in configs.values():
        for _ in range(warmup):
            run()
    samples = {name: [] for name in configs}
    for _ in range(repeats):
        for name, run in configs.items():
            samples[name].append(run())
    result = {}
    for name, rows in samples.items():
        totals = [sum(r) for r in rows]
        result[name] = {"ms": 1e3 * statistics.median(totals), "min_ms": 1e3 * min(totals),
                        "phases_ms": [1e3 * statistics.median(p) for p in zip(*rows)], "rounds": totals}
    return result


def paired_ratio(a: dict, b: dict) -> float:
    """Median over rounds of ``a / b`` measured in the same round: slow drift of the machine cancels."""
    return statistics.median(x / y for x, y in zip(a["rounds"], b["rounds"]))


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


# ---------------------------------------------------------------------------------------------------- bench
def bench_device(models: dict, args, device: torch.device, batch: int) -> dict:
    eq = models["equivariant"]
    train = {"equivariant/nonprivate": TrainStep(eq, None, batch, args, device)}
    for path in DP_PATHS:
        if not (path == "functorch" and args.skip_functorch):
            train[f"equivariant/dp-{path}"] = TrainStep(eq, path, batch, args, device)
    for name in ("same_channel_plain", "param_matched_plain"):
        train[f"{name}/nonprivate"] = TrainStep(models[name], None, batch, args, device)
        train[f"{name}/dp-hooks"] = TrainStep(models[name], "hooks", batch, args, device)
    steps = measure(train, args.warmup, args.repeats)
    memory = {name: peak_memory_mb(run, device) for name, run in train.items()}

    evals = {"equivariant/train_mode": EvalForward(eq, "train", batch, args, device),
             "equivariant/eval_cached": EvalForward(eq, "eval", batch, args, device),
             "exported": EvalForward(export(eq.eval()), "eval", batch, args, device),
             "plain_reference": EvalForward(models["plain_reference"], "eval", batch, args, device)}
    eq.train()
    forward = measure(evals, args.warmup, args.repeats * 2)

    ms = {name: row["ms"] for name, row in steps.items()}
    fastest = min(DP_PATHS, key=lambda p: ms.get(f"equivariant/dp-{p}", float("inf")))
    ratios = {
        "dp_over_nonprivate": paired_ratio(steps["equivariant/dp-fused"], steps["equivariant/nonprivate"]),
        "equivariant_over_same_channel_plain": paired_ratio(steps["equivariant/nonprivate"],
                                                            steps["same_channel_plain/nonprivate"]),
        "exported_over_plain": paired_ratio(forward["exported"], forward["plain_reference"]),
    }
    result = {
        **{k: round(v, 3) for k, v in ratios.items()},
        "targets": TARGETS,
        "met": {k: ratios[k] <= TARGETS[k] * (1.02 if k == "exported_over_plain" else 1.0) for k in ratios},
        "more_ratios": {
            "dp_hooks_over_nonprivate": round(ms["equivariant/dp-hooks"] / ms["equivariant/nonprivate"], 3),
            **({"dp_functorch_over_nonprivate": round(ms["equivariant/dp-functorch"]
                                                      / ms["equivariant/nonprivate"], 3)}
               if "equivariant/dp-functorch" in ms else {}),
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
        "train_step_ms": {k: round(v, 2) for k, v in ms.items()},
        "train_step_phases_ms": {k: {"forward": round(r["phases_ms"][0], 2), "backward": round(r["phases_ms"][1], 2),
                                     "optimizer": round(r["phases_ms"][2], 2)} for k, r in steps.items()},
        "peak_memory_mb": {k: None if v is None else round(v, 1) for k, v in memory.items()},
        "eval_forward_ms": {k: round(r["ms"], 2) for k, r in forward.items()},
        "images_per_s": {k: round(batch / v * 1e3, 1) for k, v in ms.items()},
    }
    if device.type == "cpu" and not args.skip_data:
        data = data_throughput(batch, args.data_seconds)
        result["images_per_s"]["data_pipeline"] = round(data, 1)
        result["more_ratios"]["data_over_private_step_throughput"] = round(
            data / result["images_per_s"]["equivariant/dp-fused"], 2)
    return result


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
    print(f"{'train step':42s} {'ms':>9s} {'fwd':>8s} {'bwd':>8s} {'opt':>8s} {'img/s':>8s} {'peak MB':>8s}")
    for name, ms in r["train_step_ms"].items():
        p = r["train_step_phases_ms"][name]
        mem = r["peak_memory_mb"][name]
        print(f"{name:42s} {ms:9.1f} {p['forward']:8.1f} {p['backward']:8.1f} {p['optimizer']:8.1f} "
              f"{r['images_per_s'][name]:8.0f} {'-' if mem is None else f'{mem:8.0f}':>8s}")
    for name, ms in r["eval_forward_ms"].items():
        print(f"{'eval forward ' + name:42s} {ms:9.1f}")
    if "data_pipeline" in r["images_per_s"]:
        print(f"{'data pipeline (images/s)':42s} {r['images_per_s']['data_pipeline']:9.0f}")
    for key, target in r["targets"].items():
        status = "met" if r["met"][key] else f"MISSED by {r[key] / target - 1:+.0%}"
        bound = "= 1.0 (within 2%)" if key == "exported_over_plain" else f"<= {target}"
        print(f"{key:42s} {r[key]:9.3f}   target {bound}  {status}")
    for key, value in r["more_ratios"].items():
        print(f"{key:42s} {value if isinstance(value, str) else f'{value:9.3f}'}")


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
    parser.add_argument("--skip-functorch", action="store_true", help="skip Opacus's functorch path (slow)")
    parser.add_argument("--skip-data", action="store_true")
    parser.add_argument("--data-seconds", type=float, default=3.0)
    parser.add_argument("--no-profile", dest="profile", action="store_false")
    parser.add_argument("--machine", default=None, help="a name for the machine, stored with the results")
    args = parser.parse_args()
    devices = args.devices or (["cpu"] + (["cuda"] if torch.cuda.is_available() else []))
    torch.manual_seed(0)
    models, width = build_models(args)
    report = {"machine": {"name": args.machine, **machine_description(torch.device(devices[-1]))},
              "config": {"backbone": args.backbone, "group": args.group, "input_size": args.size,
                         "in_channels": args.in_channels, "num_classes": args.num_classes,
                         "warmup": args.warmup, "repeats": args.repeats,
                         "parameters": {k: count_parameters(m) for k, m in models.items()},
                         "param_matched_width_multiplier": round(width, 4)},
              "results": {}}
    profiles = []
    precision_arg = args.precision
    for name in devices:
        device = torch.device(name)
        args.precision = precision_arg or ("bf16-mixed" if device.type == "cuda" else "32")
        report["results"][name] = {"precision": args.precision}
        for batch in args.batch_sizes:
            result = bench_device(models, args, device, batch)
            report["results"][name][str(batch)] = result
            print_table(f"{name} ({args.precision})", batch, result)
        if args.profile:
            profiles.append(profile_steps(models, args, device, args.batch_sizes[0]))
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=2) + "\n")
        print(f"\nwrote {args.out}")
        if profiles:
            profile_path = args.out.with_name(args.out.stem + "-profile.txt")
            profile_path.write_text("\n\n".join(profiles) + "\n")
            print(f"wrote {profile_path}")
    elif profiles:
        print("\n" + "\n\n".join(profiles))


if __name__ == "__main__":
    main()
