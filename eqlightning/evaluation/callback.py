"""``Robustness``: a Lightning callback that adds test-time robustness metrics to ``trainer.test``.

    trainer = Trainer(callbacks=[Robustness(rotations=[90, 180, 270, 45], attacks=[{"name": "fgsm", "eps": 2}])])

During the test epoch it evaluates every test batch again under rotations, a horizontal flip and adversarial
attacks, accumulates ACC/AUC (as the module's own ``test/acc`` / ``test/auc``, from :mod:`eqlightning.tasks`) and the
logits' invariance error over the whole epoch, and logs them at its end with ``pl_module.log`` (so they appear in
``trainer.test``'s results, ``trainer.callback_metrics``, the loggers and the CLI's summary). It evaluates whatever
weights the module holds during the test batches (e.g. the EMA weights swapped in by ``DifferentialPrivacy``).

Logged (``<t>`` a transform, ``<a>`` an attack):

* ``test/rot90/{acc,auc,invariance_error}`` (also rot180, rot270: exact ``torch.rot90``, reference: the image);
* ``test/rot45/...`` for angles that are not multiples of 90 (bilinear, inside the inscribed disk, reference: the
  disk-masked image), with ``test/disk/{acc,auc}``: the scores on the disk-masked, unrotated images;
* ``test/hflip/{acc,auc,invariance_error}``;
* ``test/fgsm_eps2/{acc,auc}``, ``test/pgd_eps2/{acc,auc}`` (``eps`` in grey levels, written compactly: 0.5 ->
  ``eps0.5``);
* ``test/invariance_error`` (the largest over the group's generators) and ``test/invariance_error/<g>`` per generator.

The invariance error of a transform ``g`` is the mean over samples of ``||f(gx) - f(x)|| / ||f(x)||`` on the logits.
"""

from __future__ import annotations

import math
import re
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any, Callable

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from torchmetrics import MeanMetric

from .. import tasks
from .attacks import BOUNDS, PIXEL_SCALE, check_attack_args, fgsm, pgd
from .transforms import BACKGROUND, hflip, mask_disk, rotate

DEFAULT_ROTATIONS = (90, 180, 270, 45)
_ATTACK_KEYS = {"fgsm": ("name", "eps", "label"),
                "pgd": ("name", "eps", "steps", "step_size", "random_start", "label")}
_GROUP = re.compile(r"^([CD])(\d+)$")


def _fmt(value: float) -> str:
    """Compact number for metric names: 2.0 -> '2', 0.5 -> '0.5'."""
    return format(float(value), "g")


@dataclass(frozen=True)
class _Transform:
    name: str
    fn: Callable[[torch.Tensor], torch.Tensor]
    scored: bool  # log acc/auc (not only the invariance error)


@dataclass(frozen=True)
class _Attack:
    label: str
    name: str
    eps: float
    steps: int = 1
    step_size: float | None = None
    random_start: bool = False


def _parse_attack(spec: Any, index: int) -> _Attack:
    where = f"Robustness: attacks[{index}]"
    if not isinstance(spec, dict):
        raise ValueError(f"{where} must be a dict such as {{'name': 'pgd', 'eps': 2}}, got {spec!r}")
    name = spec.get("name")
    if name not in _ATTACK_KEYS:
        raise ValueError(f"{where}: unknown attack name {name!r}; use one of {sorted(_ATTACK_KEYS)}")
    unknown = sorted(set(spec) - set(_ATTACK_KEYS[name]))
    if unknown:
        raise ValueError(f"{where}: unknown key(s) {unknown} for {name!r}; allowed: {list(_ATTACK_KEYS[name])}")
    if "eps" not in spec:
        raise ValueError(f"{where}: give the radius 'eps' in grey levels (0-255), e.g. {{'name': {name!r}, 'eps': 2}}")
    eps, steps = spec["eps"], spec.get("steps", 10 if name == "pgd" else 1)
    step_size, random_start = spec.get("step_size"), spec.get("random_start", name == "pgd")
    check_attack_args(eps, steps, step_size, where=where)
    if not isinstance(random_start, bool):
        raise ValueError(f"{where}: random_start must be true or false, got {random_start!r}")
    label = spec.get("label", f"{name}_eps{_fmt(eps)}")
    if not (isinstance(label, str) and label and "/" not in label):
        raise ValueError(f"{where}: label must be a non-empty string without '/', got {label!r}")
    return _Attack(label, name, float(eps), int(steps), None if step_size is None else float(step_size), random_start)


def _rotation_name(angle: float) -> tuple[str, float]:
    if isinstance(angle, bool) or not isinstance(angle, (int, float)) or not math.isfinite(angle):
        raise ValueError(f"Robustness: rotations must be finite angles in degrees, got {angle!r}")
    turned = float(angle) % 360
    if turned == 0:
        raise ValueError(f"Robustness: rotation by {angle!r} degrees is the identity; drop it from rotations")
    return f"rot{_fmt(turned)}", turned


#: 3D groups (volumes ``(N, C, D, H, W)``): ``rot90`` turns the H-W plane, ``rot90_dh`` the D-H plane; together they
#: generate the 24 rotations of the cube, and with ``hflip`` all 48 symmetries
_GROUPS_3D = {"O": ["rot90", "rot90_dh"], "SO3": ["rot90", "rot90_dh"], "Oh": ["rot90", "rot90_dh", "hflip"],
              "O3": ["rot90", "rot90_dh", "hflip"], "C1": []}


def group_generators(group: str | None) -> list[str]:
    """The transforms on the pixel grid that generate the part of ``group`` acting exactly on it: ``rot90`` (or
    ``rot180`` for C2/D2-like groups) and, for dihedral groups, ``hflip``. ``None`` (a plain backbone) gives
    ``['rot90', 'hflip']`` as a diagnostic."""
    if group is None:
        return ["rot90", "hflip"]
    if str(group).strip() in _GROUPS_3D:  # volumes: rot90 about the depth axis and about the width axis generate O
        return _GROUPS_3D[str(group).strip()]
    match = _GROUP.match(str(group).strip().upper())
    if not match:
        raise ValueError(f"Robustness: cannot read the group {group!r}; expected 'C<N>', 'D<N>' or None")
    kind, order = match.group(1), int(match.group(2))
    gens = ["rot90"] if order % 4 == 0 else ["rot180"] if order % 2 == 0 else []
    return gens + (["hflip"] if kind == "D" else [])


class _State:
    """Epoch accumulators of one test dataloader."""

    def __init__(self, task: str, num_classes: int, scored: list[str], invariance: list[str], device):
        self.scores = {name: tasks.make_metrics(task, num_classes, prefix=f"test/{name}/").to(device)
                       for name in scored}
        self.invariance = {name: MeanMetric().to(device) for name in invariance}


class Robustness(Callback):
    """Test-time robustness metrics: rotated and flipped test sets, adversarial attacks, symmetry diagnostic.

    Opt-in: add it to the trainer's callbacks (in YAML under ``trainer.callbacks`` with ``class_path:
    eqlightning.evaluation.Robustness``). The module must have a ``task`` (see :mod:`eqlightning.tasks`) and
    ``hparams.num_classes`` (or pass ``num_classes``), like :class:`eqlightning.ImageClassifier`; it may have
    ``loss(logits, y)`` (the attacks maximise it; else the task's loss) and ``group`` (the symmetry group of its
    logits, None for plain backbones). Test batches must be ``(images, labels)``.

    Args:
        rotations: angles in degrees, counter-clockwise. Multiples of 90 are exact (``torch.rot90``); others are
            bilinear rotations of the inscribed disk (see :func:`~eqlightning.evaluation.rotate`). Default
            ``[90, 180, 270, 45]``; ``[]`` for none.
        flips: evaluate on horizontally flipped images.
        attacks: L-infinity attacks, each a dict: ``{"name": "fgsm", "eps": 2}`` or ``{"name": "pgd", "eps": 2,
            "steps": 10, "step_size": 0.5, "random_start": true}``; ``eps`` and ``step_size`` in grey levels
            (0-255); PGD defaults: 10 steps of ``2.5 * eps / steps``, random start. An optional ``"label"``
            replaces the metric name (``pgd_eps2``). The attacks maximise the module's loss.
        symmetry: log ``test/invariance_error`` under the generators of the backbone's group (one extra forward each,
            shared with ``rotations`` / ``flips``).
        num_classes: used when the module has no ``hparams.num_classes``.
        background: the value outside the disk for non-exact rotations; -1 is black after eqlightning's
            normalisation.
        pixel_scale: input units per grey level (2/255 for images normalised to [-1, 1]).
        bounds: the valid input range attacked images are clamped to, or None.
        seed: seed of the attacks' random starts.
    """

    def __init__(self, rotations: list[float] | None = None, flips: bool = True, attacks: list[dict] | None = None,
                 symmetry: bool = True, num_classes: int | None = None, background: float = BACKGROUND,
                 pixel_scale: float = PIXEL_SCALE, bounds: tuple[float, float] | None = BOUNDS, seed: int = 0):
        super().__init__()
        rotations = list(DEFAULT_ROTATIONS if rotations is None else rotations)
        self.rotations: dict[str, float] = {}
        for angle in rotations:
            name, turned = _rotation_name(angle)
            if name in self.rotations:
                raise ValueError(f"Robustness: rotations list the same rotation twice ({name}); drop one of them")
            self.rotations[name] = turned
        if not isinstance(flips, bool) or not isinstance(symmetry, bool):
            raise ValueError(f"Robustness: flips and symmetry must be true or false, got {flips!r}, {symmetry!r}")
        if attacks is not None and not isinstance(attacks, (list, tuple)):
            raise ValueError(f"Robustness: attacks must be a list of dicts, got {attacks!r}")
        self.attacks = [_parse_attack(spec, i) for i, spec in enumerate(attacks or [])]
        labels = [a.label for a in self.attacks]
        for label in labels:
            if labels.count(label) > 1:
                raise ValueError(f"Robustness: two attacks would log as {label!r}; give one of them a 'label'")
            if label in {*self.rotations, "hflip", "disk", "invariance_error"} or re.fullmatch(r"rot[\d.e+-]+", label):
                raise ValueError(f"Robustness: attack label {label!r} is the name of a transform's metrics; choose "
                                 f"another label")
        check_attack_args(0, pixel_scale=pixel_scale, bounds=bounds, where="Robustness")
        if num_classes is not None and not (isinstance(num_classes, int) and not isinstance(num_classes, bool)
                                            and num_classes >= 1):
            raise ValueError(f"Robustness: num_classes must be a positive integer or None, got {num_classes!r}")
        if isinstance(background, bool) or not isinstance(background, (int, float)) or not math.isfinite(background):
            raise ValueError(f"Robustness: background must be a finite number (-1 is black), got {background!r}")
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise ValueError(f"Robustness: seed must be an integer, got {seed!r}")
        if not (self.rotations or flips or self.attacks or symmetry):
            raise ValueError("Robustness: nothing to evaluate; enable rotations, flips, attacks or symmetry")
        self.flips, self.symmetry, self.num_classes = flips, symmetry, num_classes
        self.background, self.pixel_scale = float(background), float(pixel_scale)
        self.bounds = None if bounds is None else (float(bounds[0]), float(bounds[1]))
        self.seed = seed
        self._task: str | None = None
        self._classes: int | None = None
        self._generators: list[str] = []
        self._exact: list[_Transform] = []
        self._states: dict[int, _State] = {}
        self._generator: torch.Generator | None = None

    # ------------------------------------------------------------------ set-up
    def _resolve(self, pl_module: LightningModule) -> None:
        task = getattr(pl_module, "task", None)
        hparams = getattr(pl_module, "hparams", None) or {}
        classes = hparams.get("num_classes") if hasattr(hparams, "get") else None
        if classes is not None and self.num_classes is not None and int(classes) != self.num_classes:
            raise ValueError(f"Robustness: num_classes={self.num_classes} but the module has hparams.num_classes="
                             f"{classes}; drop the callback's num_classes")
        classes = self.num_classes if classes is None else classes
        if not isinstance(task, str):
            raise ValueError(f"Robustness: {type(pl_module).__name__} has no `task` attribute (a task name of "
                             f"eqlightning.tasks, e.g. 'multi-class'); set self.task in the module, or use "
                             f"eqlightning.ImageClassifier")
        if classes is None:
            raise ValueError(f"Robustness: {type(pl_module).__name__} has no hparams.num_classes; pass "
                             f"Robustness(num_classes=...) or save it with self.save_hyperparameters()")
        self._classes = int(classes)
        self._task = tasks.normalize_task(task, self._classes)
        group = getattr(pl_module, "group", None)
        self._generators = group_generators(group) if self.symmetry else []
        exact: dict[str, _Transform] = {}
        for name, angle in self.rotations.items():
            if angle % 90 == 0:
                exact[name] = _Transform(name, lambda x, k=int(angle // 90): torch.rot90(x, k, dims=(-2, -1)), True)
        if self.flips:
            exact["hflip"] = _Transform("hflip", hflip, True)
        for name in self._generators:  # reuse the rotations' / flips' forwards
            if name not in exact:
                if name == "rot90_dh":
                    fn = lambda x: torch.rot90(x, 1, dims=(-3, -2))  # noqa: E731
                else:
                    fn = hflip if name == "hflip" else lambda x, k=int(name[3:]) // 90: torch.rot90(x, k, dims=(-2, -1))
                exact[name] = _Transform(name, fn, False)
        self._exact = list(exact.values())

    def _new_state(self, device) -> _State:
        bilinear = [n for n, a in self.rotations.items() if a % 90 != 0]
        scored = [t.name for t in self._exact if t.scored] + (["disk", *bilinear] if bilinear else [])
        scored += [a.label for a in self.attacks]
        invariance = [t.name for t in self._exact] + bilinear
        return _State(self._task, self._classes, scored, invariance, device)

    def on_test_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._resolve(pl_module)
        self._generator = torch.Generator(device=pl_module.device)
        self._generator.manual_seed(self.seed)

    def on_test_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._states = {}

    # ------------------------------------------------------------------ per batch
    def _update(self, state: _State, name: str, logits: torch.Tensor, y: torch.Tensor,
                reference: torch.Tensor | None = None) -> None:
        if name in state.scores:
            probs = tasks.scores(self._task, logits)
            state.scores[name].update(*tasks.metric_inputs(self._task, probs, y))
        if reference is not None and name in state.invariance:
            ref = reference.float().flatten(1)
            diff = (logits.float().flatten(1) - ref).norm(dim=1)
            state.invariance[name].update(diff / ref.norm(dim=1).clamp_min(1e-12))

    def on_test_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs, batch, batch_idx: int,
                          dataloader_idx: int = 0) -> None:
        if self._task is None:  # test hooks called without on_test_start (should not happen in Lightning)
            self._resolve(pl_module)
        if not (isinstance(batch, (tuple, list)) and len(batch) >= 2 and isinstance(batch[0], torch.Tensor)):
            raise ValueError(f"Robustness: test batches must be (images, labels), got {type(batch).__name__}")
        x, y = batch[0], batch[1]
        if dataloader_idx not in self._states:
            self._states[dataloader_idx] = self._new_state(pl_module.device)
        state = self._states[dataloader_idx]
        modes = {m: m.training for m in pl_module.modules()}
        if any(modes.values()):
            pl_module.eval()
        context = getattr(trainer.precision_plugin, "test_step_context", None) if trainer is not None else None
        try:
            with context() if context is not None else nullcontext():
                self._evaluate(pl_module, state, x, y)
        finally:
            if any(modes.values()):
                for module, training in modes.items():
                    module.training = training

    def _evaluate(self, pl_module: LightningModule, state: _State, x: torch.Tensor, y: torch.Tensor) -> None:
        with torch.no_grad():
            reference = pl_module(x)
            for t in self._exact:
                self._update(state, t.name, pl_module(t.fn(x)), y, reference)
            bilinear = {n: a for n, a in self.rotations.items() if a % 90 != 0}
            if bilinear:
                masked = mask_disk(x, self.background)
                masked_ref = pl_module(masked)
                self._update(state, "disk", masked_ref, y)
                for name, angle in bilinear.items():
                    rotated = rotate(masked, angle, exact=False, background=self.background)
                    self._update(state, name, pl_module(rotated), y, masked_ref)
        if not self.attacks:
            return
        loss = getattr(pl_module, "loss", None)
        if not callable(loss):
            task = self._task

            def loss(logits, target):
                return tasks.loss_fn(task, logits, target)

        options = dict(pixel_scale=self.pixel_scale, bounds=self.bounds)
        frozen = [p for p in pl_module.parameters() if p.requires_grad]
        try:
            for p in frozen:  # gradients w.r.t. the input only: cheaper, and nothing lands on the parameters
                p.requires_grad_(False)
            for attack in self.attacks:
                if attack.name == "fgsm":
                    x_adv = fgsm(pl_module, loss, x, y, attack.eps, **options)
                else:
                    x_adv = pgd(pl_module, loss, x, y, attack.eps, steps=attack.steps, step_size=attack.step_size,
                                random_start=attack.random_start, generator=self._generator, **options)
                with torch.no_grad():
                    self._update(state, attack.label, pl_module(x_adv), y)
        finally:
            for p in frozen:
                p.requires_grad_(True)

    # ------------------------------------------------------------------ epoch end
    def metric_names(self, pl_module: LightningModule) -> list[str]:
        """The names this callback logs when testing ``pl_module`` (with one test dataloader)."""
        self._resolve(pl_module)
        state = self._new_state("cpu")
        names = [f"test/{n}/{m}" for n, c in state.scores.items() for m in ("acc", "auc")]
        exact = {t.name: t for t in self._exact}
        names += [f"test/{n}/invariance_error" for n in state.invariance if n not in exact or exact[n].scored]
        if self._generators:
            names += ["test/invariance_error", *(f"test/invariance_error/{g}" for g in self._generators)]
        return names

    def on_test_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        several = len(self._states) > 1
        exact = {t.name: t for t in self._exact}
        for index, state in sorted(self._states.items()):
            values: dict[str, torch.Tensor] = {}
            for collection in state.scores.values():
                values.update(collection.compute())
            errors = {name: metric.compute() for name, metric in state.invariance.items()}
            for name, error in errors.items():
                if name not in exact or exact[name].scored:
                    values[f"test/{name}/invariance_error"] = error
            if self._generators:
                values["test/invariance_error"] = torch.stack([errors[g] for g in self._generators]).max()
                values.update({f"test/invariance_error/{g}": errors[g] for g in self._generators})
            suffix = f"/dataloader_idx_{index}" if several else ""
            for name, value in values.items():
                # the torchmetrics values are already reduced over processes; sync_dist keeps Lightning quiet
                pl_module.log(name + suffix, value.float(), sync_dist=True, add_dataloader_idx=False)
            for metric in [*state.scores.values(), *state.invariance.values()]:
                metric.reset()
        self._states = {}

