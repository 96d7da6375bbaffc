"""The study store: Optuna's RDB storage (SQLite file by default, or a database server URL), one Optuna study per
variant, one trial per attempt at a run.

Why Optuna: its storage is transactional (a ``kill -9`` never corrupts it), readable while workers write, has
heartbeats that turn the runs of dead workers into retries, and its samplers (TPE, NSGA-II, grid) choose the runs of
a recipe or architecture search: a search is another way of filling the same queue. What is ours is the mapping
from trials to runs:

- every trial carries user attributes ``key`` (the hash of the run's input config), ``variant``, ``axes`` and
  ``overrides``; the newest trial of a key says the run's state (waiting, running, complete, failed);
- planning enqueues a WAITING trial for every key without one (never for a complete, waiting or running key; for a
  failed one only when retrying failures is asked for);
- a worker takes a trial under a file lock next to the store (``Study.ask`` pops a waiting trial atomically; the lock
  keeps an empty queue from making a search sample a run twice or a grid study create an empty trial);
- a worker that stops beating for ``grace`` seconds has its trial failed and re-enqueued (Optuna's
  ``RetryHeartbeatStaleTrialCallback``, at most ``max_retry`` times); the retry resumes from the run's ``last.ckpt``.
"""

from __future__ import annotations

import contextlib
import copy
import fcntl
import itertools
import json
import math
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import optuna
from optuna.storages import RDBStorage, RetryHeartbeatStaleTrialCallback, fail_stale_trials
from optuna.trial import FrozenTrial, Trial, TrialState

from .spec import ALIASES, MAPPING_KEYS, PlannedRun, StudySpec

optuna.logging.set_verbosity(optuna.logging.WARNING)
# Heartbeats and their retry callback are marked experimental since Optuna 2.8 (and stable in use since): say so once,
# here, rather than on every store a worker opens. setup.cfg bounds Optuna below 6.
warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning, module=r"(optuna|eqlightning)\.")
warnings.filterwarnings("ignore", "Heartbeat of storage is supposed to be used with Study.optimize")

_MAX_DUPLICATES = 20  # repeated suggestions after which a search space counts as exhausted
_STATE = {TrialState.WAITING: "waiting", TrialState.RUNNING: "running", TrialState.COMPLETE: "complete",
          TrialState.FAIL: "failed", TrialState.PRUNED: "failed"}


@dataclass
class Claim:
    """A run a worker has taken: its trial (RUNNING), variant and planned run."""

    variant: str
    study: optuna.Study
    trial: Trial
    run: PlannedRun

    @property
    def key(self) -> str:
        return self.run.key


class StudyStore:
    def __init__(self, spec: StudySpec):
        self.spec = spec
        spec.directory.mkdir(parents=True, exist_ok=True)
        beat = spec.heartbeat
        self.retry = RetryHeartbeatStaleTrialCallback(max_retry=int(beat["max_retry"]))
        engine = {"connect_args": {"timeout": 120}} if spec.store_url.startswith("sqlite") else {}
        self.storage = RDBStorage(spec.store_url, engine_kwargs=engine, heartbeat_interval=int(beat["interval"]),
                                  grace_period=int(beat["grace"]), heartbeat_stale_trial_callback=self.retry)
        self._lock_path = spec.directory / "store.lock"
        self._studies: dict[str, optuna.Study] = {}

    # -- Optuna studies -----------------------------------------------------------------------------------------------
    def study(self, variant: str) -> optuna.Study:
        if variant not in self._studies:
            search = self.spec.search
            self._studies[variant] = optuna.create_study(
                storage=self.storage, study_name=f"{self.spec.name}/{variant}", load_if_exists=True,
                directions=search.directions if search else ["maximize"], sampler=_sampler(self.spec))
        return self._studies[variant]

    @contextlib.contextmanager
    def locked(self) -> Iterator[None]:
        with open(self._lock_path, "a") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)

    def trials(self, variant: str) -> list[FrozenTrial]:
        """The attempts at runs of ``variant`` (not a search's repeated suggestions)."""
        return [t for t in self.study(variant).get_trials(deepcopy=False)
                if "key" in t.user_attrs and not t.user_attrs.get("duplicate")]

    def latest(self, variant: str) -> dict[str, FrozenTrial]:
        """The newest trial of each key of ``variant``."""
        newest: dict[str, FrozenTrial] = {}
        for trial in self.trials(variant):
            key = trial.user_attrs["key"]
            if key not in newest or trial.number > newest[key].number:
                newest[key] = trial
        return newest

    # -- planning -----------------------------------------------------------------------------------------------------
    def sync_plan(self, retry_failed: bool = False) -> dict[str, int]:
        """Enqueue the planned runs the store lacks (and failed ones if ``retry_failed``); returns counts of what was
        ``added``, ``retried`` and already ``known``. Idempotent: calling it again adds nothing."""
        counts = {"added": 0, "retried": 0, "known": 0}
        with self.locked():
            plan = self.spec.plan()
            by_variant: dict[str, list[PlannedRun]] = {}
            self._order = {run.key: index for index, run in enumerate(plan)}
            for run in plan:
                by_variant.setdefault(run.variant, []).append(run)
            for variant in self.spec.variants:
                study = self.study(variant.name)
                study.set_user_attr("plan", [run.key for run in by_variant.get(variant.name, [])])
                latest = self.latest(variant.name)
                for run in by_variant.get(variant.name, []):
                    trial = latest.get(run.key)
                    if trial is None:
                        self._enqueue(study, run, self._order[run.key])
                        counts["added"] += 1
                    elif trial.state == TrialState.FAIL and retry_failed:
                        self._enqueue(study, run, self._order[run.key])
                        counts["retried"] += 1
                    else:
                        counts["known"] += 1
        return counts

    @staticmethod
    def _enqueue(study: optuna.Study, run: PlannedRun, order: int) -> None:
        study.enqueue_trial({}, user_attrs={**_attrs(run), "order": order})

    # -- workers ------------------------------------------------------------------------------------------------------
    def take(self, worker: str) -> Claim | None:
        """Take the next waiting run (or sample a new one for a search), marked RUNNING with a first heartbeat."""
        with self.locked():
            self.fail_stale()
            while True:
                taken, dropped = self._take_one()
                if not dropped:
                    break
        if taken is not None:
            variant, study, trial, run = taken
            trial.set_user_attr("worker", worker)
            trial.set_user_attr("started", time.time())
            self.beat(study, trial.number)
            return Claim(variant, study, trial, run)
        return None

    def _take_one(self) -> tuple[tuple | None, bool]:
        """(variant, study, trial, run) or None, and whether a stale trial was dropped (then look again)."""
        for variant in self._by_next_waiting():
            study = self.study(variant.name)
            if study.get_trials(deepcopy=False, states=(TrialState.WAITING,)):
                trial = study.ask()
                if "key" not in trial.user_attrs:  # only if the queue emptied under us (a server store)
                    study.tell(trial, state=TrialState.FAIL)
                    continue
                run = self.spec.run(variant, _axes(trial.user_attrs))
                plan = study.user_attrs.get("plan") if self.spec.search is None else None
                if run.key != trial.user_attrs["key"] or (plan is not None and run.key not in plan):
                    # planned by an older version of the study file (other values, or a seed or grid value since
                    # removed): not run, and not counted
                    trial.set_user_attr("error", "dropped: no longer in the study's plan")
                    study.tell(trial, state=TrialState.FAIL)
                    return None, True
            elif self._search_room(variant.name):
                # A sampler seeded afresh from the trial count: workers in other processes never repeat each
                # other's suggestions, and a rerun of the same search suggests the same values.
                known = self.latest(variant.name)
                study.sampler = _sampler(self.spec, offset=len(study.get_trials(deepcopy=False)))
                trial = study.ask()
                run = self.spec.run(variant, {name: _suggest(trial, name, dist)
                                              for name, dist in self.spec.search.space.items()})
                for name, value in _attrs(run).items():
                    trial.set_user_attr(name, value)
                if run.key in known:  # the sampler repeated a recipe (a small space): not a new run
                    trial.set_user_attr("duplicate", True)
                    study.tell(trial, state=TrialState.PRUNED)
                    return None, True
            else:
                continue
            return (variant.name, study, trial, run), False
        return None, False

    def _by_next_waiting(self) -> list:
        """Variants in the plan order of their next waiting run (Optuna pops each study's queue in trial order), so
        that runs go seed-major across variants; variants with nothing waiting come last (a search samples there)."""
        ranked = []
        for index, variant in enumerate(self.spec.variants):
            waiting = self.study(variant.name).get_trials(deepcopy=False, states=(TrialState.WAITING,))
            head = min(waiting, key=lambda t: t.number) if waiting else None
            ranked.append((head.user_attrs.get("order", math.inf) if head else math.inf, index, variant))
        return [variant for *_, variant in sorted(ranked, key=lambda item: item[:2])]

    def _search_room(self, variant: str) -> bool:
        """A search samples until it has n_trials distinct runs, or its space looks exhausted (_MAX_DUPLICATES
        repeated suggestions)."""
        search = self.spec.search
        if search is None or len(self.latest(variant)) >= int(search.n_trials):
            return False
        repeats = sum(bool(t.user_attrs.get("duplicate")) for t in self.study(variant).get_trials(deepcopy=False))
        return repeats < _MAX_DUPLICATES

    def beat(self, study: optuna.Study, number: int) -> None:
        study_id = self.storage.get_study_id_from_name(study.study_name)
        self.storage.record_heartbeat(self.storage.get_trial_id_from_study_id_trial_number(study_id, number))

    def fail_stale(self) -> None:
        """Fail the running trials whose worker stopped beating; each is re-enqueued (up to ``max_retry`` times)."""
        for variant in self.spec.variants:
            fail_stale_trials(self.study(variant.name))

    def complete(self, claim: Claim, result: dict[str, Any]) -> None:
        """Record a finished run; a search's trial is told its objectives (a run missing one is failed, with why)."""
        search = self.spec.search
        values = list(result.get("objectives") or [result.get("objective")])
        names = [o.metric for o in search.objectives] if search else ["objective"]
        missing = [n for n, v in itertools.zip_longest(names, values) if not _finite(v)]
        with _unless_taken_over():
            claim.trial.set_user_attr("result", result)
            claim.trial.set_user_attr("finished", time.time())
            if search is not None and missing:
                claim.trial.set_user_attr("error", f"the run finished without a value for {', '.join(missing)}")
                claim.study.tell(claim.trial, state=TrialState.FAIL, skip_if_finished=True)
            else:
                claim.study.tell(claim.trial, [v if _finite(v) else float("nan") for v in values],
                                 skip_if_finished=True)

    def fail(self, claim: Claim, error: str) -> None:
        """A run that failed by itself: recorded with its error, retried only by ``study run --retry-failed``."""
        with _unless_taken_over():
            claim.trial.set_user_attr("error", error[-2000:])
            claim.trial.set_user_attr("finished", time.time())
            claim.study.tell(claim.trial, state=TrialState.FAIL, skip_if_finished=True)

    def interrupt(self, claim: Claim, why: str) -> None:
        """A run stopped from outside (SIGTERM, preemption): failed and enqueued again, to resume from last.ckpt."""
        with _unless_taken_over():
            claim.trial.set_user_attr("interrupted", why)
            claim.study.tell(claim.trial, state=TrialState.FAIL)  # raises if taken over meanwhile: no second retry
            self.retry(claim.study, claim.study.get_trials(deepcopy=False)[claim.trial.number])

    # -- reading ------------------------------------------------------------------------------------------------------
    def rows(self, include_unplanned: bool = False) -> list[dict[str, Any]]:
        """One row per run (its newest trial), as the report reads them; runs no longer in a grid study's plan are
        left out unless ``include_unplanned``."""
        rows = []
        planned = self._planned_axes()
        for variant in self.spec.variants:
            study = self.study(variant.name)
            plan = study.user_attrs.get("plan")
            for key, trial in self.latest(variant.name).items():
                if self.spec.search is None and plan is not None and key not in plan and not include_unplanned:
                    continue
                rows.append(_row(variant.name, variant.family, trial, planned.get((variant.name, key))))
        return rows

    def _planned_axes(self) -> dict[tuple[str, str], dict[str, Any]]:
        """``{(variant, key): axes}`` of the current plan: a run whose study file was restructured (a grid value
        moved into the overrides, say) keeps its key and result, and is reported with today's axes."""
        if not hasattr(self, "_planned"):
            self._planned = {(run.variant, run.key): run.axes for run in self.spec.plan()}
        return self._planned

    def counts(self) -> dict[str, int]:
        counts = {"complete": 0, "running": 0, "waiting": 0, "failed": 0}
        for row in self.rows():
            counts[row["state"]] += 1
        if self.spec.search is not None:  # runs a search has yet to sample count as waiting
            counts["waiting"] += sum(int(self.spec.search.n_trials) - len(self.latest(v.name))
                                     for v in self.spec.variants if self._search_room(v.name))
        counts["total"] = sum(counts.values())
        return counts

    def attempts(self) -> dict[str, int]:
        """How many trials each key has had (1 = run once; more = retried after a dead worker or an interruption)."""
        counts: dict[str, int] = {}
        for variant in self.spec.variants:
            for trial in self.trials(variant.name):
                counts[trial.user_attrs["key"]] = counts.get(trial.user_attrs["key"], 0) + 1
        return counts


@contextlib.contextmanager
def _unless_taken_over() -> Iterator[None]:
    """A trial failed as stale while its worker was alive (a starved heartbeat) has been retried: its retry waits on
    the run directory's lock and records the run's result itself, so this late word is dropped."""
    try:
        yield
    except optuna.exceptions.UpdateFinishedTrialError:
        pass
    except ValueError as error:  # Study.tell of a trial finished between our last two calls
        if "Cannot tell a" not in str(error):
            raise


def _attrs(run: PlannedRun) -> dict[str, Any]:
    return {"key": run.key, "variant": run.variant, "axes": json.dumps(run.axes, sort_keys=True, default=str)}


def _axes(attrs: dict[str, Any]) -> dict[str, Any]:
    return json.loads(attrs.get("axes") or "{}")


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _suggest(trial: Trial, name: str, dist: dict[str, Any]) -> Any:
    choices = dist.get("choices")
    if isinstance(choices, dict):  # named choices: the sampler sees the labels, the config gets the values
        return copy.deepcopy(choices[trial.suggest_categorical(name, list(choices))])
    if choices is not None:
        return trial.suggest_categorical(name, list(choices))
    low, high = dist["low"], dist["high"]
    if all(isinstance(v, int) and not isinstance(v, bool) for v in (low, high)):
        return trial.suggest_int(name, low, high, step=int(dist.get("step", 1)), log=bool(dist.get("log", False)))
    return trial.suggest_float(name, float(low), float(high), log=bool(dist.get("log", False)),
                               step=dist.get("step"))


def _sampler(spec: StudySpec, offset: int = 0) -> optuna.samplers.BaseSampler | None:
    search = spec.search
    if search is None:
        return None
    seed = int(search.seed) + offset
    if search.sampler == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    if search.sampler == "nsga2":
        population = {} if search.population is None else {"population_size": int(search.population)}
        return optuna.samplers.NSGAIISampler(seed=seed, **population)
    if search.sampler == "grid":
        space = {k: list(v["choices"]) for k, v in search.space.items() if "choices" in v}
        if len(space) != len(search.space):
            raise ValueError("search.sampler grid needs `choices` for every space entry")
        return optuna.samplers.GridSampler(space, seed=seed)
    return optuna.samplers.TPESampler(seed=seed, n_startup_trials=min(5, max(1, int(search.n_trials) // 3)))


def flat_axes(axes: dict[str, Any]) -> dict[str, Any]:
    """Axes as the report reads them: a bundle (a mapping value setting several keys) becomes its keys, and short
    names their full config keys (``{data: {dataset: x, epochs: 4}}`` -> ``{data.flag: x, trainer.max_epochs: 4}``)."""
    flat: dict[str, Any] = {}
    for key, value in axes.items():
        if isinstance(value, dict) and key not in MAPPING_KEYS:
            flat.update(flat_axes(value))
        else:
            flat[key if key == "seed" else ALIASES.get(key, key)] = value
    return flat


def _row(variant: str, family: str | None, trial: FrozenTrial, axes: dict[str, Any] | None = None) -> dict[str, Any]:
    result = trial.user_attrs.get("result") or {}
    axes = flat_axes(_axes(trial.user_attrs) if axes is None else axes)
    state = _STATE.get(trial.state, "failed")
    error = trial.user_attrs.get("error")
    if trial.state == TrialState.FAIL and not error:
        history = RetryHeartbeatStaleTrialCallback.retry_history(trial)
        error = (f"interrupted ({trial.user_attrs['interrupted']})" if "interrupted" in trial.user_attrs
                 else f"its worker stopped; given up after {len(history) + 1} attempts")
    started, finished = trial.user_attrs.get("started"), trial.user_attrs.get("finished")
    return {
        "variant": variant, "key": trial.user_attrs["key"], "state": state, "trial": trial.number,
        "seed": axes.get("seed", result.get("seed")), "axes": axes,
        "family": family or result.get("family"), "dataset": result.get("dataset"),
        "parameters": result.get("parameters"), "flops": result.get("flops"),
        "train_flops": result.get("train_flops"), "epsilon": result.get("epsilon"),
        "target_epsilon": result.get("target_epsilon"), "metrics": result.get("metrics") or {},
        "val": result.get("val"), "wall_time_s": result.get("wall_time_s"), "error": error,
        "duration_s": (finished - started) if started and finished and state == "complete" else None,
        "run_dir": result.get("run_dir"), "worker": trial.user_attrs.get("worker"),
        "objectives": result.get("objectives"),
    }


def summarize_run(summary: dict[str, Any], metric: str, objectives: list[str] | None = None) -> dict[str, Any]:
    """What the store keeps of a run's summary.json: enough for the report to need nothing else. ``objectives``: a
    search's metrics (validation metrics or costs), whose values are kept in that order as ``objectives``."""
    model, data, privacy = summary.get("model") or {}, summary.get("data") or {}, summary.get("privacy") or {}
    metrics = summary.get("metrics") or {}
    best = metrics.get("best") or {}
    val = best.get("value") if best.get("monitor") == metric else (metrics.get("final") or {}).get(metric)
    flops, steps, batch = model.get("flops"), summary.get("steps"), data.get("batch_size")
    wall = summary.get("wall_time_s") or {}
    result = {
        "objective": val, "val": val, "metric": metric,
        "metrics": {k: v for k, v in (metrics.get("test") or {}).items() if isinstance(v, (int, float))},
        "family": model.get("group") or "plain", "dataset": data.get("flag"), "size": data.get("size"),
        "backbone": model.get("backbone"), "parameters": model.get("parameters"), "flops": flops,
        # forward + backward ~ 3x the forward FLOPs per training sample (expected batch size for Poisson DP batches)
        "train_flops": 3.0 * flops * steps * batch if flops and steps and batch else None,
        "epsilon": privacy.get("epsilon"), "target_epsilon": privacy.get("target_epsilon"),
        "wall_time_s": sum(v for v in wall.values() if isinstance(v, (int, float))) or None,
        "seed": summary.get("seed"), "status": summary.get("status"), "stop_reason": summary.get("stop_reason"),
        "run_dir": summary.get("run_dir"), "config_hash": summary.get("config_hash"),
        "device": (summary.get("device") or {}).get("name"),
    }
    if objectives:
        result["objectives"] = [_objective_value(summary, result, name) for name in objectives]
    return result


def _objective_value(summary: dict[str, Any], result: dict[str, Any], name: str) -> float | None:
    """A validation metric (the best value when it is the checkpoint monitor, else the final one) or a cost."""
    if not name.startswith("val/"):
        return result.get(name)
    metrics = summary.get("metrics") or {}
    best = metrics.get("best") or {}
    return best.get("value") if best.get("monitor") == name else (metrics.get("final") or {}).get(name)
