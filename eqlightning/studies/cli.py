"""``eqlightning study run|status|report|work CONFIG``: the command line of studies (see ``eqlightning.studies``)."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import yaml

from .spec import StudyConfigError, load_spec

_USAGE = "eqlightning study {run,status,report,work,export} configs/studies/<name>.yaml [options]"


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="eqlightning study", description="Many runs from one config: a grid of "
                                     "variants/axes/seeds or a recipe search, resumable, on local workers or SLURM.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="{run,status,report,work,export}")
    run = commands.add_parser("run", help="plan the study and run what is left (resumes; never reruns a finished run)")
    status = commands.add_parser("status", help="runs done/running/failed/left, failures with their errors")
    report = commands.add_parser("report", help="fits, plots and a Markdown report from the store")
    work = commands.add_parser("work", help="one worker: take runs from the store until none is left")
    export = commands.add_parser("export", help="write a search trial's resolved fit config (e.g. under configs/)")
    for command in (run, status, report, work, export):
        command.add_argument("config", help="a study config (configs/studies/*.yaml)")
        command.add_argument("--root", default=None, help="folder holding <name>/ (default: the config's root, "
                             "else ./studies)")
    run.add_argument("--workers", type=int, default=None, help="worker processes or SLURM tasks (default: the "
                     "config's workers)")
    run.add_argument("--launcher", choices=("local", "slurm"), default=None)
    run.add_argument("--retry-failed", action="store_true", help="run the failed runs again")
    run.add_argument("--no-wait", action="store_true", help="start the workers and return")
    run.add_argument("--poll", type=float, default=5.0, help="seconds between progress updates")
    report.add_argument("--out", default=None, help="output folder (default: <study>/report)")
    report.add_argument("--reference", action="append", default=[], metavar="STUDY_CONFIG",
                        help="another study whose runs (seeds averaged per variant) are drawn next to a search's "
                        "Pareto front; repeatable")
    export.add_argument("--trial", type=int, required=True, help="the trial number (the report's #N)")
    export.add_argument("--variant", default=None, help="the variant, when several have a trial N")
    export.add_argument("--out", required=True, help="the fit config to write, e.g. configs/eq_nasnet/found.yaml")
    export.add_argument("--force", action="store_true", help="overwrite --out if it exists")
    work.add_argument("--poll", type=float, default=2.0)
    try:
        args = parser.parse_args(argv)
    except SystemExit as stop:
        return int(stop.code or 0)
    try:
        if args.command == "run":
            from .launch import run_study

            return run_study(args.config, args.root, args.workers, args.launcher, args.retry_failed,
                             wait=not args.no_wait, poll=args.poll)
        if args.command == "status":
            return status_command(args.config, args.root)
        if args.command == "report":
            return report_command(args.config, args.root, args.out, args.reference)
        if args.command == "export":
            return export_command(args.config, args.root, args.trial, args.out, args.variant, args.force)
        from .worker import work as work_loop

        work_loop(args.config, args.root, poll=args.poll)
        return 0
    except (StudyConfigError, FileNotFoundError, FileExistsError, ValueError) as error:
        print(f"eqlightning study: error: {error}", file=sys.stderr)
        return 2


def status_command(config: str, root: str | None = None, out=None) -> int:
    from .launch import progress_line
    from .store import StudyStore

    out = out or sys.stdout
    spec = load_spec(config, root)
    store = StudyStore(spec)
    store.fail_stale()
    rows, counts = store.rows(), store.counts()
    print(f"study {spec.name} ({spec.directory}; store {spec.store_url})", file=out)
    print(progress_line(counts, rows, spec.workers), file=out)
    for variant in spec.variants:
        mine = [r for r in rows if r["variant"] == variant.name]
        states = {s: sum(r["state"] == s for r in mine) for s in ("complete", "running", "waiting", "failed")}
        print(f"  {variant.name:<16} " + "  ".join(f"{k} {v}" for k, v in states.items()), file=out)
    for row in rows:
        if row["state"] == "running":
            print(f"  running  {row['variant']}/{row['key']} {_axes(row)} on {row['worker']}", file=out)
    for row in rows:
        if row["state"] == "failed":
            print(f"  FAILED   {row['variant']}/{row['key']} {_axes(row)}: {row['error']}", file=out)
    return 0


def _axes(row: dict) -> str:
    return " ".join(f"{k}={v}" for k, v in row["axes"].items())


def report_command(config: str, root: str | None = None, out_dir: str | None = None,
                   reference_configs: list[str] | None = None) -> int:
    from .report import write_report
    from .store import StudyStore

    spec = load_spec(config, root)
    store = StudyStore(spec)
    rows = store.rows()
    search = spec.search
    selection = spec.selection
    if search is not None and not selection:
        selection = (f"{'architectures' if search.multi_objective else 'recipes'} selected on {search.describe()} "
                     f"by a {search.n_trials}-trial {search.sampler} search per variant")
    references, note = [], None
    if reference_configs:
        if search is None or not search.multi_objective:
            raise ValueError("--reference draws other runs next to a multi-objective search's Pareto front; "
                             f"{spec.path.name} has no such search")
        from .front import reference_points

        # like for like: the references' runs on the search's datasets at its privacy level
        conditions = {(r.get("dataset"), r.get("target_epsilon")) for r in rows if r["state"] == "complete"}
        for other in reference_configs:
            other_rows = StudyStore(load_spec(other, root)).rows()
            references += reference_points([r for r in other_rows
                                            if (r.get("dataset"), r.get("target_epsilon")) in conditions],
                                           search.objectives)
        note = ("runs of " + ", ".join(Path(c).name for c in reference_configs)
                + " on the same data at the same privacy level")
    started = time.monotonic()
    out = Path(out_dir) if out_dir else spec.directory / "report"
    path = write_report(rows, out, title=f"Study {spec.name}", study_config_text=spec.path.read_text(),
                        selection=selection, objectives=search.objectives if search else None,
                        references=references, reference_note=note)
    print(f"report: {path} ({len(rows)} runs, {time.monotonic() - started:.1f} s)")
    if search is not None and search.multi_objective:
        from .front import front_yaml

        (out / "pareto.yaml").write_text(f"# the Pareto front in {search.describe()}; export a trial with "
                                         f"`eqlightning study export {config} --trial N --out <config>`\n"
                                         + yaml.safe_dump(front_yaml(rows, search.objectives), sort_keys=False))
        print(f"Pareto front: {out / 'pareto.yaml'}")
    if search is not None:
        best = best_recipes(rows, spec.search.direction)
        (out / "best_recipes.yaml").write_text(
            f"# best trial per variant by {spec.search.metric} ({spec.search.direction}); paste a variant's values "
            f"into a grid study's overrides\n" + yaml.safe_dump(best, sort_keys=False))
        print(f"best recipes: {out / 'best_recipes.yaml'}")
    return 0


def export_command(config: str, root: str | None, trial: int, out: str, variant: str | None = None,
                   force: bool = False) -> int:
    from .front import export_trial
    from .store import StudyStore

    spec = load_spec(config, root)
    if spec.search is None:
        raise ValueError(f"{spec.path.name} is a grid study: its run configs are in {spec.directory / 'configs'}; "
                         "export picks a search's trial")
    path = export_trial(spec, StudyStore(spec).rows(), trial, out, variant=variant, force=force)
    print(f"wrote {path}: train it with `python cli.py fit --config {path}`")
    return 0


def best_recipes(rows: list[dict], direction: str = "maximize") -> dict[str, dict]:
    """Per variant, the searched values (axes) of the complete trial with the best validation value."""
    best: dict[str, dict] = {}
    sign = 1 if direction == "maximize" else -1
    for row in rows:
        if row["state"] != "complete" or row.get("val") is None:
            continue
        current = best.get(row["variant"])
        if current is None or sign * row["val"] > sign * current["val"]:
            best[row["variant"]] = row
    return {variant: {"overrides": dict(row["axes"]), "val": row["val"], "trial_key": row["key"]}
            for variant, row in best.items()}


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main(sys.argv[1:]))
