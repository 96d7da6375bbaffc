"""``eqlightning list [backbones|datasets|groups]``: what can be named in a config, and which data files are here."""

from __future__ import annotations

import argparse
import inspect
import re

GROUPS_SHOWN = ("C1", "C2", "C4", "C8", "C16", "D1", "D2", "D4", "D8", "D16")
SIZES = (28, 64, 128, 224)


def option_names(fn) -> list[str]:
    """A factory's options: its keyword parameters, or the names in its docstring's ``Options:`` paragraph."""
    params = [n for n, p in inspect.signature(fn).parameters.items()
              if n not in ("in_channels", "num_classes") and p.kind == p.KEYWORD_ONLY]
    doc = inspect.getdoc(fn) or ""
    match = re.search(r"Options:(.*?)(?:\n\s*\n|$)", doc, flags=re.S)
    if params or match is None:
        return params
    text, depth, flat = match.group(1), 0, []
    for char in text:  # drop parenthesised explanations, keep the top-level comma-separated names
        depth += (char == "(") - (char == ")")
        if depth == 0 and char not in "()":
            flat.append(char)
    return [m.group(0) for part in "".join(flat).split(",") if (m := re.search(r"[A-Za-z_]\w*", part))]


def backbones_table() -> list[str]:
    from .models.registry import backbone_entry, list_backbones

    lines = ["Backbones (model.backbone; options under model.backbone_kwargs):"]
    for name in list_backbones():
        entry = backbone_entry(name)
        kind = ("equivariant" if entry.equivariant else "plain") + (", 3D" if entry.dims == 3 else "")
        lines.append(f"  {name:<16} [{kind}] {entry.description}")
        lines.append(f"  {'':<16} options: {', '.join(option_names(entry.fn)) or '-'}")
    return lines


def datasets_table() -> list[str]:
    from .data.catalog import SIZES_3D, dataset_info, file_name, flags_2d, flags_3d
    from .data.files import embedded_sample, resolve_root

    root, origin = resolve_root(None)
    lines = [f"Datasets (data.flag, data.size); files looked up in {root} ({origin}); "
             f"+ present, - missing (downloaded on first use):"]
    for flag in (*flags_2d(), *flags_3d()):
        info = dataset_info(flag, 28)
        marks = []
        for size in (SIZES if info.spatial_dims == 2 else SIZES_3D):
            name = file_name(flag, size)
            here = (root / name).is_file() or embedded_sample(name) is not None
            marks.append(f"{size}{'+' if here else '-'}")
        kind = "" if info.spatial_dims == 2 else " (3D: MedMNIST3DDataModule)"
        lines.append(f"  {flag:<15} {info.task:<26} {info.num_classes:>2} classes, {info.in_channels} ch, "
                     f"{info.license:<12} sizes {' '.join(marks)}{kind}")
    return lines


def groups_table() -> list[str]:
    return ["Groups (backbone_kwargs.group; equivariant backbones, one per stage allowed):",
            "  C<N>: N rotations by 360/N degrees;  D<N>: N rotations and N reflections (N >= 1)",
            f"  e.g. {', '.join(GROUPS_SHOWN)}  (exact on the pixel grid: C1, C2, C4, D1, D2, D4; others approximate)",
            "  3D backbones (*_3d): O (the cube's 24 rotations), Oh (with reflections, 48): exact on the voxel grid;",
            "  SO3, O3 (band-limited fields, backbone_kwargs.band_limit): exact for the grid's 24/48, others approximate"]


TABLES = {"backbones": backbones_table, "datasets": datasets_table, "groups": groups_table}


def list_command(args: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="eqlightning list", description=__doc__.splitlines()[0])
    parser.add_argument("what", nargs="*", help=f"any of {', '.join(TABLES)} (default: everything)")
    options = parser.parse_args(args)
    unknown = [w for w in options.what if w not in TABLES]
    if unknown:
        parser.error(f"unknown {unknown[0]!r}: choose from {', '.join(TABLES)}")
    for i, what in enumerate(options.what or TABLES):
        if i:
            print()
        print("\n".join(TABLES[what]()))
    return 0
