"""A study config: a base fit config, the axes to vary (a grid, named variants, seeds) or a recipe search, and where
its runs and store live. ``StudySpec.plan()`` turns it into the runs a grid study holds, each with its resolved
input config and a key (a hash of that config), the identity that makes a study idempotent.

A study file (paths are relative to the file)::

    name: pneumonia-width            # default: the file name; the study lives in <root>/<name>/
    base: ../pneumoniamnist/eq_d4.yaml   # one fit config or a list (merged in order; callback lists add up)
    overrides: {epochs: 5}           # applied to every run (the recipe)
    grid: {width: [0.25, 0.5, 1.0]}  # cartesian product of config keys (dotted) or the short names below; a
                                     # value that is a mapping sets several keys (e.g. {dataset: x, epochs: 30})
    seeds: [0, 1]
    variants:                        # optional: each a name with its own base/overrides/grid/family
      eq_d4: {overrides: {group: D4}}
      plain: {base: ../pneumoniamnist/resnet18.yaml, grid: {}}
    search:                          # optional: a recipe search instead of the grid (per variant)
      metric: val/auc                # the selection metric (validation only)
      n_trials: 12
      space: {lr: {low: 1.0e-4, high: 1.0e-1, log: true}, epochs: {low: 2, high: 10}}
      # or several objectives (a Pareto front; sampler nsga2 or tpe), e.g. an architecture search:
      # objectives: [{metric: val/auc, direction: maximize}, {metric: flops, direction: minimize}]
      # early_stop: {patience: 5}    # stop a trial whose val metric has not improved for 5 epochs
    workers: 2                       # local worker processes (`--workers` overrides)
    launcher: local                  # or slurm (see `slurm:` for submitit's parameters)
"""

from __future__ import annotations

import copy
import hashlib
import itertools
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

#: Short names for the keys studies vary most; any dotted config key works as well.
ALIASES = {
    "seed": "seed_everything",
    "dataset": "data.flag",
    "size": "data.size",
    "train_fraction": "data.train_fraction",
    "batch_size": "data.batch_size",
    "backbone": "model.backbone",
    "group": "model.backbone_kwargs.group",
    "width": "model.backbone_kwargs.width_multiplier",
    "depth": "model.backbone_kwargs.depth_multiplier",
    "phi": "model.backbone_kwargs.phi",
    "lr": "model.optimizer.init_args.lr",
    "epochs": "trainer.max_epochs",
    "augmult": "privacy.augmult",
    "clip": "privacy.max_grad_norm",
}
#: ``epsilon: off`` (or null) trains without DP; a number sets the DP callback's target_epsilon.
EPSILON = "epsilon"
_PRIVACY_PREFIX = "privacy."
_DP_CLASS = "DifferentialPrivacy"
#: Keys whose value is itself a mapping (anything else given a mapping is a bundle of overrides).
MAPPING_KEYS = {"model.backbone_kwargs", "model.optimizer", "model.lr_scheduler", "model.optimizer.init_args",
                 "model.lr_scheduler.init_args"}
#: Keys that say which model and data a variant is (checked against study-wide overrides, see _check_identity).
_IDENTITY_KEYS = ("model.backbone", "data.flag")
_TOP_KEYS = {"name", "root", "base", "overrides", "grid", "seeds", "variants", "search", "workers", "launcher",
             "slurm", "heartbeat", "store", "description", "selection"}
_VARIANT_KEYS = {"base", "overrides", "grid", "family", "seeds"}
_SEARCH_KEYS = {"metric", "direction", "objectives", "n_trials", "sampler", "space", "seed", "population",
                "early_stop"}
_SAMPLERS = ("tpe", "random", "nsga2", "grid")
#: Objectives a search may minimise or maximise besides a validation metric: the model's cost, known from its run.
COST_OBJECTIVES = ("flops", "parameters", "train_flops")
_EARLY_STOP_KEYS = {"patience", "min_delta"}


class StudyConfigError(ValueError):
    """A study file that cannot be run; the message names the key and the fix."""


@dataclass
class Variant:
    name: str
    base: list[Path]
    overrides: dict[str, Any]
    grid: dict[str, list]
    seeds: list[int | None]
    family: str | None = None


@dataclass(frozen=True)
class Objective:
    """One thing a search optimises: a validation metric (``val/auc``) or a cost (:data:`COST_OBJECTIVES`)."""

    metric: str
    direction: str = "maximize"


@dataclass
class Search:
    metric: str = "val/auc"
    direction: str = "maximize"
    n_trials: int = 10
    sampler: str = "tpe"
    space: dict[str, dict] = field(default_factory=dict)
    seed: int = 0
    objectives: list[Objective] = field(default_factory=list)  # all of them; the first is metric/direction
    population: int | None = None  # NSGA-II's population size (Optuna's default: 50)
    early_stop: dict[str, Any] | None = None  # {patience, min_delta}: Lightning's EarlyStopping on `metric`

    @property
    def directions(self) -> list[str]:
        return [o.direction for o in self.objectives]

    @property
    def multi_objective(self) -> bool:
        return len(self.objectives) > 1

    def describe(self) -> str:
        """``val/auc (maximize), flops (minimize)``."""
        return ", ".join(f"{o.metric} ({o.direction})" for o in self.objectives)


@dataclass
class PlannedRun:
    """One run of a study: its variant, the values it varies (``axes``), its input config and key."""

    variant: str
    axes: dict[str, Any]
    config: dict[str, Any]

    @property
    def key(self) -> str:
        return config_key(self.config)


@dataclass
class StudySpec:
    name: str
    path: Path
    directory: Path
    variants: list[Variant]
    search: Search | None = None
    workers: int = 1
    launcher: str = "local"
    slurm: dict[str, Any] = field(default_factory=dict)
    heartbeat: dict[str, float] = field(default_factory=lambda: {"interval": 10, "grace": 60, "max_retry": 3})
    store: str | None = None
    selection: str | None = None

    @property
    def store_url(self) -> str:
        return self.store or f"sqlite:///{(self.directory / 'study.db').resolve()}"

    @property
    def runs_root(self) -> Path:
        return self.directory / "runs"

    def variant(self, name: str) -> Variant:
        for variant in self.variants:
            if variant.name == name:
                return variant
        raise StudyConfigError(f"variant {name!r} is not in {self.path} (variants: "
                               f"{', '.join(v.name for v in self.variants)})")

    def plan(self) -> list[PlannedRun]:
        """Every run of a grid study (variant x grid x seeds), in a stable order; empty for a search."""
        if self.search is not None:
            return []
        runs = []
        seeds = list(dict.fromkeys(seed for variant in self.variants for seed in variant.seeds))
        for seed in seeds:  # seed-major: a study stopped half-way has every cell with its first seeds
            for variant in self.variants:
                if seed not in variant.seeds:
                    continue
                keys = list(variant.grid)
                for values in itertools.product(*(variant.grid[k] for k in keys)):
                    axes = dict(zip(keys, values))
                    if seed is not None:
                        axes["seed"] = seed
                    runs.append(self.run(variant, axes))
        return runs

    def run(self, variant: Variant, axes: dict[str, Any]) -> PlannedRun:
        """The run of ``variant`` with ``axes`` (grid values, a seed, sampled recipe values) on top of its config."""
        config = load_base(variant.base)
        for key, value in {**variant.overrides, **axes}.items():
            apply_override(config, key, value)
        config["test_after_fit"] = True  # every study run is fit + test, selected on validation only
        if self.search is not None and self.search.early_stop:
            _add_early_stopping(config, self.search)
        named = {(k if k == "seed" else ALIASES.get(k, k)): v for k, v in axes.items()}  # full keys in results
        return PlannedRun(variant.name, named, config)


# -- loading ------------------------------------------------------------------------------------------------------------
def load_spec(path: str | Path, root: str | Path | None = None) -> StudySpec:
    """Read a study file; ``root`` (default: its ``root:`` key, else ``studies``) holds ``<name>/``."""
    path = Path(path)
    if not path.is_file():
        raise StudyConfigError(f"study config {path}: no such file (see configs/studies/ for examples)")
    raw = yaml.safe_load(path.read_text()) or {}
    if not isinstance(raw, dict):
        raise StudyConfigError(f"{path}: a study config is a mapping (name, base, grid, ...), got {type(raw).__name__}")
    _check_keys(raw, _TOP_KEYS, str(path))
    here = path.parent
    name = str(raw.get("name") or path.stem)
    if not name.replace("-", "").replace("_", "").replace(".", "").isalnum():
        raise StudyConfigError(f"{path}: name {name!r} must be letters, digits, '-', '_' or '.' (it names a folder)")
    directory = Path(root or raw.get("root") or "studies") / name
    seeds = _seeds(raw.get("seeds"), str(path))
    base = _paths(raw.get("base"), here, f"{path}: base")
    common = _mapping(raw.get("overrides"), f"{path}: overrides")
    grid = _grid(raw.get("grid"), f"{path}: grid")
    variants = []
    for vname, vraw in (_mapping(raw.get("variants"), f"{path}: variants") or {"default": {}}).items():
        where = f"{path}: variants.{vname}"
        vraw = vraw or {}
        if not isinstance(vraw, dict):
            raise StudyConfigError(f"{where}: a variant is a mapping (base, overrides, grid, family), got {vraw!r}")
        _check_keys(vraw, _VARIANT_KEYS, where)
        vbase = _paths(vraw["base"], here, f"{where}.base") if "base" in vraw else base
        if not vbase:
            raise StudyConfigError(f"{where}: no base config; give `base:` (a fit config) for the study or the variant")
        variants.append(Variant(
            name=str(vname), base=vbase,
            overrides={**common, **_mapping(vraw.get("overrides"), f"{where}.overrides")},
            grid=_grid(vraw["grid"], f"{where}.grid") if "grid" in vraw else grid,
            seeds=_seeds(vraw["seeds"], where) if "seeds" in vraw else seeds,
            family=vraw.get("family")))
    spec = StudySpec(name=name, path=path.resolve(), directory=directory.resolve(), variants=variants,
                     search=_search(raw.get("search"), str(path)), workers=int(raw.get("workers") or 1),
                     launcher=str(raw.get("launcher") or "local"), slurm=dict(raw.get("slurm") or {}),
                     store=raw.get("store"), selection=raw.get("selection"))
    spec.heartbeat.update(raw.get("heartbeat") or {})
    if spec.launcher not in ("local", "slurm"):
        raise StudyConfigError(f"{path}: launcher {spec.launcher!r} is not known; use local or slurm")
    if spec.heartbeat["interval"] * 2 > spec.heartbeat["grace"]:
        raise StudyConfigError(f"{path}: heartbeat grace {spec.heartbeat['grace']} s must be at least twice the "
                               f"interval {spec.heartbeat['interval']} s, or live workers look dead")
    for variant in spec.variants:  # fail now, not in a worker: every base loads and every key applies
        spec.run(variant, {k: v[0] for k, v in variant.grid.items()})
        _check_identity(variant, common, raw["variants"][variant.name] if raw.get("variants") else {}, str(path))
    return spec


def _check_identity(variant: Variant, common: dict, own: dict | None, where: str) -> None:
    """A variant with its own base config keeps that base's backbone and dataset unless it overrides them itself:
    a study-wide ``backbone: eq_resnet8`` silently turning the plain baseline equivariant is refused."""
    own = own or {}
    if "base" not in own:
        return
    mine = {ALIASES.get(k, k) for k in (own.get("overrides") or {})}
    base = load_base(variant.base)
    for key in _IDENTITY_KEYS:
        given = {ALIASES.get(k, k): v for k, v in common.items()}.get(key)
        found = _lookup(base, key)
        if given is not None and found is not None and given != found and key not in mine:
            raise StudyConfigError(
                f"{where}: variants.{variant.name}: the study's overrides set {key} to {given!r} over its base's "
                f"{found!r}; move that override into the variants that need it, or set {key} in "
                f"variants.{variant.name}.overrides")


def _lookup(config: dict, key: str):
    node = config
    for part in key.split("."):
        if not isinstance(node, dict) or part not in node:
            return None
        node = node[part]
    return node


def _check_keys(raw: dict, allowed: set[str], where: str) -> None:
    unknown = sorted(set(raw) - allowed)
    if unknown:
        raise StudyConfigError(f"{where}: unknown key(s) {', '.join(unknown)}; allowed: {', '.join(sorted(allowed))}")


def _mapping(value, where: str) -> dict:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise StudyConfigError(f"{where}: expected a mapping of config keys to values, got {value!r}")
    return dict(value)


def _grid(value, where: str) -> dict[str, list]:
    grid = _mapping(value, where)
    for key, values in grid.items():
        if not isinstance(values, list) or not values:
            raise StudyConfigError(f"{where}.{key}: a grid axis is a non-empty list of values, got {values!r}")
    return grid


def _seeds(value, where: str) -> list[int | None]:
    if value is None:
        return [None]
    values = value if isinstance(value, list) else [value]
    if not values or not all(isinstance(v, int) and not isinstance(v, bool) for v in values):
        raise StudyConfigError(f"{where}: seeds must be a list of integers, got {value!r}")
    return values


def _paths(value, here: Path, where: str) -> list[Path]:
    if value is None:
        return []
    paths = [(here / p).resolve() for p in (value if isinstance(value, list) else [value])]
    for p in paths:
        if not p.is_file():
            raise StudyConfigError(f"{where}: config {p} does not exist (paths are relative to the study file)")
    return paths


def _search(value, where: str) -> Search | None:
    if value is None:
        return None
    raw = _mapping(value, f"{where}: search")
    where = f"{where}: search"
    _check_keys(raw, _SEARCH_KEYS, where)
    objectives = _objectives(raw, where)
    plain = {k: raw[k] for k in raw if k not in ("space", "objectives", "metric", "direction")}
    search = Search(**plain, metric=objectives[0].metric, direction=objectives[0].direction, objectives=objectives,
                    space=_mapping(raw.get("space"), where))
    if search.sampler not in _SAMPLERS:
        raise StudyConfigError(f"{where}.sampler {search.sampler!r} is not known; use one of {_SAMPLERS}")
    if int(search.n_trials) < 1 or not search.space:
        raise StudyConfigError(f"{where}: a search needs n_trials >= 1 and a non-empty space")
    if search.population is not None and (search.sampler != "nsga2" or int(search.population) < 2):
        raise StudyConfigError(f"{where}.population {search.population!r}: a population (>= 2 trials per "
                               f"generation) is NSGA-II's; set sampler: nsga2 or drop it")
    for key, dist in search.space.items():
        _check_distribution(dist, f"{where}.space.{key}")
    if search.early_stop is not None:
        early = _mapping(search.early_stop, f"{where}.early_stop")
        _check_keys(early, _EARLY_STOP_KEYS, f"{where}.early_stop")
        patience = early.get("patience")
        if isinstance(patience, bool) or not isinstance(patience, int) or patience < 1:
            raise StudyConfigError(f"{where}.early_stop.patience must be an int >= 1 (validation epochs without "
                                   f"improvement), got {patience!r}")
        search.early_stop = early
    return search


def _objectives(raw: dict, where: str) -> list[Objective]:
    """``objectives: [{metric, direction}, ...]``, or the single ``metric`` / ``direction``."""
    if "objectives" in raw:
        if "metric" in raw or "direction" in raw:
            raise StudyConfigError(f"{where}: give either metric/direction or objectives, not both")
        items = raw["objectives"]
        if not isinstance(items, list) or not items:
            raise StudyConfigError(f"{where}.objectives: a non-empty list of {{metric, direction}}, got {items!r}")
    else:
        items = [{"metric": raw.get("metric", "val/auc"), "direction": raw.get("direction", "maximize")}]
    objectives = []
    for index, item in enumerate(items):
        here = f"{where}.objectives[{index}]" if "objectives" in raw else where
        if not isinstance(item, dict) or "metric" not in item or set(item) - {"metric", "direction"}:
            raise StudyConfigError(f"{here}: an objective is {{metric: val/auc, direction: maximize}}, got {item!r}")
        objective = Objective(str(item["metric"]), str(item.get("direction", "maximize")))
        if objective.direction not in ("maximize", "minimize"):
            raise StudyConfigError(f"{here}: direction must be maximize or minimize, got {objective.direction!r}")
        if not objective.metric.startswith("val/") and objective.metric not in COST_OBJECTIVES:
            raise StudyConfigError(f"{here}: metric {objective.metric!r}: select on validation (val/...), never on "
                                   f"test, or on a cost ({', '.join(COST_OBJECTIVES)})")
        objectives.append(objective)
    if not objectives[0].metric.startswith("val/"):
        raise StudyConfigError(f"{where}: the first objective is the selection metric and must be a validation "
                               f"metric (val/...), got {objectives[0].metric!r}; list the costs after it")
    if len({o.metric for o in objectives}) != len(objectives):
        raise StudyConfigError(f"{where}.objectives: a metric is listed twice")
    return objectives


def _check_distribution(dist: Any, where: str) -> None:
    """``{low, high[, log, step]}``, ``{choices: [...]}`` or named choices ``{choices: {label: value, ...}}``."""
    if not isinstance(dist, dict) or not ({"low", "high"} <= set(dist) or "choices" in dist):
        raise StudyConfigError(f"{where}: give {{low, high[, log, step]}} or {{choices: [...]}}, got {dist!r}")
    choices = dist.get("choices")
    if "choices" in dist and (not isinstance(choices, (list, dict)) or not choices):
        raise StudyConfigError(f"{where}.choices: a non-empty list, or a mapping of labels to values, got {choices!r}")
    if isinstance(choices, list) and not all(c is None or isinstance(c, (bool, int, float, str)) for c in choices):
        raise StudyConfigError(f"{where}.choices: list choices are numbers or strings; for lists or mappings "
                               f"give them labels: {{choices: {{label: value, ...}}}}")


def _add_early_stopping(config: dict, search: Search) -> None:
    """Lightning's EarlyStopping on the selection metric: a trial stops once ``patience`` validations in a row did
    not improve it (its objective is its best validation value, so the epochs cut could only have raised it later)."""
    callbacks = config.setdefault("trainer", {}).setdefault("callbacks", []) or []
    callbacks.append({"class_path": "lightning.pytorch.callbacks.EarlyStopping",
                      "init_args": {"monitor": search.metric, "mode": "max" if search.direction == "maximize" else "min",
                                    "patience": int(search.early_stop["patience"]),
                                    "min_delta": float(search.early_stop.get("min_delta", 0.0))}})
    config["trainer"]["callbacks"] = callbacks


# -- configs ------------------------------------------------------------------------------------------------------------
def load_base(paths: list[Path]) -> dict[str, Any]:
    """The base fit configs merged in order: mappings merge, ``trainer.callbacks`` lists add up, others replace."""
    config: dict[str, Any] = {}
    for path in paths:
        loaded = yaml.safe_load(Path(path).read_text()) or {}
        if not isinstance(loaded, dict):
            raise StudyConfigError(f"base config {path}: expected a fit config (a mapping)")
        _merge(config, loaded)
    return config


def _merge(into: dict, other: dict, path: str = "") -> None:
    for key, value in other.items():
        where = f"{path}.{key}" if path else key
        if isinstance(value, dict) and isinstance(into.get(key), dict):
            _merge(into[key], value, where)
        elif where == "trainer.callbacks" and isinstance(value, list) and isinstance(into.get(key), list):
            into[key] = into[key] + copy.deepcopy(value)
        else:
            into[key] = copy.deepcopy(value)


def apply_override(config: dict[str, Any], key: str, value: Any) -> None:
    """Set a dotted ``key`` (or one of ``ALIASES``) in ``config``; ``epsilon``/``privacy.*`` edit the DP callback."""
    if isinstance(value, dict) and key not in MAPPING_KEYS:  # a bundle: one grid value setting several keys
        for inner, inner_value in value.items():
            apply_override(config, inner, inner_value)
        return
    key = ALIASES.get(key, key)
    if key == EPSILON:
        _set_epsilon(config, value)
        return
    if key.startswith(_PRIVACY_PREFIX):
        callback = _dp_callback(config, key)
        callback.setdefault("init_args", {})[key[len(_PRIVACY_PREFIX):]] = value
        return
    node: Any = config
    parts = key.split(".")
    for depth, part in enumerate(parts):
        last = depth == len(parts) - 1
        if isinstance(node, list):  # a list entry by index, e.g. model.backbone_kwargs.stages.2.kernel
            if not part.lstrip("-").isdigit() or not -len(node) <= int(part) < len(node):
                raise StudyConfigError(f"override {key}: {'.'.join(parts[:depth]) or key} is a list of {len(node)}; "
                                       f"{part!r} is not an index into it")
            if last:
                node[int(part)] = value
                return
            node = node[int(part)]
            continue
        if not isinstance(node, dict):
            raise StudyConfigError(f"override {key}: {parts[depth - 1]!r} holds {node!r}, not a mapping; check the key")
        if last:
            node[part] = value
            return
        node = node.setdefault(part, {})


def _dp_callbacks(config: dict) -> list[dict]:
    return [c for c in (config.get("trainer") or {}).get("callbacks") or []
            if isinstance(c, dict) and str(c.get("class_path", "")).endswith(_DP_CLASS)]


def _dp_callback(config: dict, key: str) -> dict:
    found = _dp_callbacks(config)
    if not found:
        raise StudyConfigError(f"{key}: the base config has no DifferentialPrivacy callback; use a private base "
                               f"config (configs/dp/...) for this variant")
    return found[0]


def _set_epsilon(config: dict, value: Any) -> None:
    if value is None or (isinstance(value, str) and value.lower() in ("off", "none", "false")):
        callbacks = config.get("trainer", {}).get("callbacks") or []
        config["trainer"]["callbacks"] = [c for c in callbacks if c not in _dp_callbacks(config)]
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise StudyConfigError(f"epsilon: {value!r} is not a privacy budget; give a positive number or `off`")
    _dp_callback(config, EPSILON).setdefault("init_args", {})["target_epsilon"] = float(value)


def config_key(config: dict[str, Any]) -> str:
    """16 hex digits of SHA-256 over the canonical JSON of a run's input config: equal configs, equal keys."""
    text = json.dumps(config, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]
