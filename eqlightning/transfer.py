"""Transfer learning: start a new task from a trained backbone, optionally with its first stages frozen.

    model:
      init_from: runs/pretrain-pneumoniamnist   # a .ckpt, a run directory, or a run-name directory (newest run)
      freeze_stages: 1                          # the stem and the first stage keep the pretrained weights

:class:`~eqlightning.ImageClassifier` does this in ``setup("fit")`` (once: a second ``fit`` does not reload), so a
checkpoint of the new model loads anywhere without the source file, and a run resumed with ``ckpt_path`` gets its own
weights back (Lightning restores them after ``setup``). The pieces, usable on any backbone:

* :func:`resolve_checkpoint`: ``runs/<name>/<timestamp>/checkpoints/{best,last}.ckpt`` from a run or run-name
  directory;
* :func:`load_backbone_weights`: copies every tensor (parameters and buffers) whose name and shape match, and
  reports the rest: ``reinitialised`` (same name, other shape: the stem for other input channels, the head for
  other classes; they keep the new model's initialisation), ``missing`` and ``unexpected``. It refuses a checkpoint
  of another architecture (fewer than half of the parameter tensors match) and, for equivariant backbones, one
  trained with another group (the coefficients of an equivariant convolution only mean something in its own basis:
  D4 and C8 layers have the same shapes);
* :func:`freeze_stages`: ``requires_grad=False`` for the stem and the first ``k`` stages (``backbone.stem`` and
  ``backbone.stages`` for the ResNets, equivariant ResNets and EfficientNet; for a ViT the stem is the patch and
  token/position embeddings and the stages are the transformer blocks). A stem or stage with a re-initialised tensor
  stays trainable as a whole (a rebuilt stem is trained). Frozen BatchNorm layers are kept in eval mode during
  training (running statistics used and not updated); GroupNorm/LayerNorm have no statistics, nothing to do.

Under DP-SGD (the ``DifferentialPrivacy`` callback attaches after ``setup``) frozen parameters get no per-sample
gradients, no clipping and no noise: layers without trainable parameters are not watched at all. Only the backward
through frozen layers that lie *between* trainable ones (e.g. frozen stage 1 after a rebuilt stem) still runs, for
the input gradients.
"""

from __future__ import annotations

import inspect
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import torch
from torch import nn

CHECKPOINT_NAMES = ("best.ckpt", "last.ckpt")  # looked for in <run>/checkpoints/, in this order
_RUN_ID = re.compile(r"(\d{8}-\d{6})(?:\.(\d+))?$")  # eqlightning.cli's run directory names


# --------------------------------------------------------------------------------------------------- checkpoints
def _run_checkpoint(run_dir: Path) -> Path | None:
    for name in CHECKPOINT_NAMES:
        path = run_dir / "checkpoints" / name
        if path.is_file():
            return path
    return None


def _run_order(run_dir: Path, checkpoint: Path) -> tuple:
    """Newest last: the timestamp of eqlightning.cli's run names (``20250101-120000[.2]``), else the file's age."""
    match = _RUN_ID.match(run_dir.name)
    if match:
        return datetime.strptime(match.group(1), "%Y%m%d-%H%M%S").timestamp(), int(match.group(2) or 1), run_dir.name
    return checkpoint.stat().st_mtime, 0, run_dir.name


def resolve_checkpoint(source: str | Path) -> Path:
    """The checkpoint file ``source`` names.

    ``source`` is a checkpoint file; a run directory ``<run_root>/<name>/<timestamp>`` (its
    ``checkpoints/best.ckpt``, else ``checkpoints/last.ckpt``); or a run-name directory ``<run_root>/<name>`` (the
    newest of its runs that has one). Relative paths are relative to the working directory.
    """
    path = Path(source).expanduser()
    looked_for = " or ".join(f"checkpoints/{n}" for n in CHECKPOINT_NAMES)
    if path.is_file():
        return path
    if not path.exists():
        raise FileNotFoundError(
            f"init_from: {str(path)!r} does not exist (resolved from {str(Path.cwd())!r}); give a .ckpt file, a run "
            f"directory <run_root>/<name>/<timestamp> or a run-name directory <run_root>/<name>, e.g. train the "
            f"source model first")
    found = _run_checkpoint(path)
    if found is not None:
        return found
    runs = [(d, c) for d in path.iterdir() if d.is_dir() and (c := _run_checkpoint(d)) is not None]
    if not runs:
        raise FileNotFoundError(f"init_from: no checkpoint in {str(path)!r}: looked for {looked_for} in it and in "
                                f"its run sub-directories <timestamp>/{looked_for}")
    return max(runs, key=lambda run: _run_order(*run))[1]


def _read_source(source) -> tuple[dict[str, torch.Tensor], dict[str, Any], str]:
    """``(backbone state dict, hyper-parameters, description)`` of a checkpoint path or an in-memory dict."""
    if isinstance(source, Mapping):
        obj, where = source, "<state dict>"
    else:
        path = resolve_checkpoint(source)
        obj, where = torch.load(path, map_location="cpu", weights_only=False), str(path)
    hparams: dict[str, Any] = {}
    if isinstance(obj, Mapping) and isinstance(obj.get("state_dict"), Mapping):  # a Lightning checkpoint
        hparams = dict(obj.get("hyper_parameters") or {})
        obj = obj["state_dict"]
    if not isinstance(obj, Mapping) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ValueError(f"init_from: {where} is neither a Lightning checkpoint nor a state dict of tensors")
    state = {str(k): v for k, v in obj.items()}
    if any(k.startswith("backbone.") for k in state):  # ImageClassifier: keep the backbone's entries
        state = {k[len("backbone."):]: v for k, v in state.items() if k.startswith("backbone.")}
    return state, hparams, where


# ------------------------------------------------------------------------------------------------------ loading
@dataclass
class TransferReport:
    """What :func:`load_backbone_weights` (and :func:`freeze_stages`) did; ``str()`` is a few-line summary."""

    source: str
    source_backbone: str | None = None
    source_kwargs: dict[str, Any] | None = None
    loaded: list[str] = field(default_factory=list)
    #: ``(name, checkpoint shape, new shape)``: tensors kept at the new model's initialisation
    reinitialised: list[tuple[str, tuple, tuple]] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    frozen: list[str] = field(default_factory=list)
    kept_trainable: list[str] = field(default_factory=list)  # stem/stages not frozen because they were rebuilt
    notes: list[str] = field(default_factory=list)
    loaded_fraction: float = 0.0  # of the model's parameter tensors

    def to_dict(self) -> dict[str, Any]:
        """Plain numbers and names (for logs and run summaries)."""
        return {"source": self.source, "source_backbone": self.source_backbone, "loaded": len(self.loaded),
                "reinitialised": [name for name, _, _ in self.reinitialised], "missing": list(self.missing),
                "unexpected": list(self.unexpected), "frozen": len(self.frozen)}

    def __str__(self) -> str:
        kwargs = "" if not self.source_kwargs else f" {self.source_kwargs}"
        lines = [f"transfer from {self.source} ({self.source_backbone or 'backbone not recorded'}{kwargs}):",
                 f"  loaded {len(self.loaded)} tensors ({self.loaded_fraction:.0%} of the parameter tensors)"]
        if math.isnan(self.loaded_fraction):
            lines.pop()
        if self.reinitialised:
            lines.append("  re-initialised (shape differs): " + ", ".join(
                f"{n} {_shape(a)} -> {_shape(b)}" for n, a, b in self.reinitialised))
        for label, names in (("missing in the checkpoint", self.missing), ("unexpected (ignored)", self.unexpected)):
            if names:
                lines.append(f"  {label}: {_names(names)}")
        if self.frozen or self.kept_trainable:
            lines.append(f"  frozen: {len(self.frozen)} parameter tensors"
                         + (f"; kept trainable (rebuilt): {', '.join(self.kept_trainable)}" if self.kept_trainable
                            else ""))
        lines += [f"  note: {note}" for note in self.notes]
        return "\n".join(lines)


def _shape(shape) -> str:
    return str(tuple(shape))


def _names(names: list[str], limit: int = 6) -> str:
    return ", ".join(names[:limit]) + (f" and {len(names) - limit} more" if len(names) > limit else "")


def _stage_groups_of(backbone: nn.Module, hparams: dict[str, Any]) -> list[str] | None:
    """The checkpoint's group per stage of ``backbone`` (an equivariant ResNet), from its hyper-parameters."""
    kwargs = hparams.get("backbone_kwargs") or {}
    group = kwargs.get("group")
    if group is None:
        default = inspect.signature(type(backbone).__init__).parameters.get("group")
        group = None if default is None or default.default is inspect.Parameter.empty else default.default
    if group is None:
        return None
    from .nn import canonical_group

    stages = len(backbone.stage_groups)
    groups = [group] * stages if isinstance(group, str) else list(group)
    return [canonical_group(g) for g in groups] if len(groups) == stages else None


def _check_group(backbone: nn.Module, hparams: dict[str, Any], where: str) -> str | None:
    """Refuse an equivariant checkpoint of another group; returns a note when it cannot be checked."""
    target = getattr(backbone, "stage_groups", None)
    if target is None:
        return None
    name = hparams.get("backbone")
    if not name:
        return "the checkpoint records no backbone hyper-parameters: its symmetry group was not checked"
    from .models import backbone_entry

    try:
        equivariant = backbone_entry(str(name)).equivariant
    except ValueError:
        return f"the checkpoint's backbone {name!r} is not registered here: its group was not checked"
    if not equivariant:
        return None  # a plain checkpoint: the shape check decides
    source = _stage_groups_of(backbone, hparams)
    if source is not None and source != list(target):
        raise ValueError(
            f"init_from: {where} was trained with group {source} ({name}), this backbone uses {list(target)}: the "
            f"coefficients of an equivariant convolution are only meaningful in the group they were trained for "
            f"(C8 and D4 layers even have the same shapes). Use the checkpoint's group "
            f"(model.backbone_kwargs.group) or train a source model with this one")
    return None


def load_backbone_weights(backbone: nn.Module, source, *, backbone_name: str | None = None,
                          min_fraction: float = 0.5) -> TransferReport:
    """Copy the weights of ``source`` into ``backbone`` wherever name and shape match.

    ``source`` is a checkpoint path (see :func:`resolve_checkpoint`: a Lightning checkpoint of an
    ``ImageClassifier``, whose ``backbone.*`` entries are used, or a saved state dict) or an in-memory state dict.
    Parameters and buffers (e.g. batch-norm statistics) are copied; tensors whose shape differs keep the new model's
    initialisation and are listed as ``reinitialised``. Raises ValueError, naming both backbones, when fewer than
    ``min_fraction`` of the parameter tensors of ``backbone`` match (another architecture), or for an equivariant
    checkpoint trained with another group.
    """
    state, hparams, where = _read_source(source)
    source_name = hparams.get("backbone")
    target_name = backbone_name or type(backbone).__name__
    report = TransferReport(source=where, source_backbone=source_name, source_kwargs=hparams.get("backbone_kwargs"))
    if source_name and backbone_name and source_name != backbone_name:
        report.notes.append(f"the checkpoint's backbone is {source_name}, this model's {backbone_name}")
    note = _check_group(backbone, hparams, where)
    if note:
        report.notes.append(note)

    target = backbone.state_dict()
    matched: dict[str, torch.Tensor] = {}
    for name, tensor in target.items():
        if name not in state:
            report.missing.append(name)
        elif tuple(state[name].shape) != tuple(tensor.shape):
            report.reinitialised.append((name, tuple(state[name].shape), tuple(tensor.shape)))
        else:
            matched[name] = state[name]
            report.loaded.append(name)
    report.unexpected = [name for name in state if name not in target]

    params = [name for name, _ in backbone.named_parameters()]
    report.loaded_fraction = sum(name in matched for name in params) / max(1, len(params))
    if report.loaded_fraction < min_fraction:
        described = f"{source_name} {report.source_kwargs or {}}" if source_name else "a backbone of another kind"
        raise ValueError(
            f"init_from: {where} holds {described}; only {report.loaded_fraction:.0%} of the parameter tensors of "
            f"this {target_name} match it by name and shape (at least {min_fraction:.0%} needed): a different "
            f"architecture or width? Differences: "
            + _names([f"{n} {_shape(a)} -> {_shape(b)}" for n, a, b in report.reinitialised] + report.missing, 4))
    backbone.load_state_dict(matched, strict=False)
    return report


# ------------------------------------------------------------------------------------------------------ freezing
def backbone_stages(backbone: nn.Module) -> tuple[list[tuple[str, nn.Module]], list[tuple[str, nn.Module]]]:
    """``(stem parts, stages)`` as ``(name, module)`` lists, in forward order.

    ``backbone.stem`` and ``backbone.stages`` (the ResNets, equivariant ResNets, EfficientNet); for a ViT
    (``patch_embed``, ``tokens``, ``blocks``) the stem is the patch embedding with the class token and position
    embedding, and each transformer block is a stage.
    """
    stages = getattr(backbone, "stages", None)
    if isinstance(getattr(backbone, "stem", None), nn.Module) and isinstance(stages, (nn.Sequential, nn.ModuleList)):
        return [("stem", backbone.stem)], [(f"stages.{i}", s) for i, s in enumerate(stages)]
    blocks = getattr(backbone, "blocks", None)
    if all(isinstance(getattr(backbone, a, None), nn.Module) for a in ("patch_embed", "tokens")) and \
            isinstance(blocks, (nn.Sequential, nn.ModuleList)):
        return [("patch_embed", backbone.patch_embed), ("tokens", backbone.tokens)], \
            [(f"blocks.{i}", b) for i, b in enumerate(blocks)]
    raise ValueError(f"freeze_stages: {type(backbone).__name__} has no stages to freeze; it needs `stem` and `stages` "
                     "attributes (as eq_resnet*, resnet* and efficientnet_b0 have) or a ViT's `patch_embed`, `tokens` "
                     "and `blocks`. Set freeze_stages: 0, or give the backbone a `stem` module and a `stages` "
                     "nn.Sequential")


def _frozen_norm_eval(module: nn.Module, args) -> None:
    """Forward pre-hook of a frozen batch norm: normalise with its running statistics and leave them alone."""
    if module.training and not any(p.requires_grad for p in module.parameters(recurse=False)):
        module.train(False)


def _is_batch_norm(module: nn.Module) -> bool:
    from .nn import FieldBatchNorm

    return isinstance(module, (nn.modules.batchnorm._BatchNorm, FieldBatchNorm)) and \
        getattr(module, "track_running_stats", False)


def freeze_stages(backbone: nn.Module, k: int, keep_trainable=(), kept: list[str] | None = None) -> list[str]:
    """Freeze the stem and the first ``k`` stages of ``backbone``; returns the names of the frozen parameters.

    ``k=0`` freezes nothing. A stem or stage holding one of the parameter names in ``keep_trainable`` (e.g. the
    tensors :func:`load_backbone_weights` re-initialised) stays trainable as a whole; its name is appended to
    ``kept``. Batch norms in frozen parts stay in eval mode during training (a forward pre-hook; it lets go once
    their parameters are trainable again). See :func:`backbone_stages` for what the stages are.
    """
    if isinstance(k, bool) or not isinstance(k, int) or k < 0:
        raise ValueError(f"freeze_stages must be an int >= 0 (0 = train everything), got {k!r}")
    if k == 0:
        return []
    stem, stages = backbone_stages(backbone)
    if k > len(stages):
        raise ValueError(f"freeze_stages={k}, but {type(backbone).__name__} has {len(stages)} stages after the stem: "
                         f"use 0 to {len(stages)}")
    keep, frozen = set(keep_trainable), []
    units = [("stem", stem)] + [(name, [(name, module)]) for name, module in stages[:k]]
    for unit, parts in units:
        names = [(f"{prefix}.{n}", p) for prefix, module in parts for n, p in module.named_parameters()]
        if any(n in keep for n, _ in names):
            if kept is not None:
                kept.append(unit)
            continue
        for n, p in names:
            p.requires_grad_(False)
            frozen.append(n)
        for _, module in parts:
            for m in module.modules():
                if _is_batch_norm(m) and not getattr(m, "_eql_frozen_eval", False):
                    m.register_forward_pre_hook(_frozen_norm_eval)
                    m._eql_frozen_eval = True
    return frozen


def apply_transfer(backbone: nn.Module, init_from=None, freeze: int = 0, *, backbone_name: str | None = None,
                   load: bool = True) -> TransferReport | None:
    """What ``ImageClassifier(init_from=..., freeze_stages=...)`` does at its first ``fit``: load, then freeze
    (re-initialised parts stay trainable). ``load=False``: the weights are already those of a checkpoint of the
    new model (e.g. after ``load_from_checkpoint``), only freeze. None when there is nothing to do."""
    if init_from is None and not freeze:
        return None
    if init_from is not None and load:
        report = load_backbone_weights(backbone, init_from, backbone_name=backbone_name)
    elif init_from is not None:
        report = TransferReport(source=str(init_from), loaded_fraction=math.nan,
                                notes=["the weights come from a checkpoint of this model: init_from not reloaded"])
    else:
        report = TransferReport(source="none", notes=["no init_from: the frozen stages keep their random "
                                                      "initialisation"])
    keep = {name for name, _, _ in report.reinitialised} | {m for m in report.missing}
    report.frozen = freeze_stages(backbone, freeze, keep_trainable=keep, kept=report.kept_trainable)
    total = sum(p.numel() for p in backbone.parameters())
    trainable = sum(p.numel() for p in backbone.parameters() if p.requires_grad)
    if report.frozen:
        report.notes.append(f"{trainable:,} of {total:,} parameters trainable ({trainable / max(1, total):.0%})")
    return report
