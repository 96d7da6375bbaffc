"""Checks that the installed environment can run eqlightning (run by ``make install``).

Fails with an actionable message for the traps seen on the CPU machines: torchvision installed next to a CPU torch
(it breaks torchmetrics and Lightning on import), numpy 2 (escnn's lie_learn is built against numpy 1.x), and a
missing ``jsonargparse[signatures]`` (LightningCLI).
"""

from __future__ import annotations

import importlib.util
import sys


def problems() -> list[str]:
    found = []
    if importlib.util.find_spec("torchvision") is not None:
        found.append(
            "torchvision is installed: with the CPU torch its import fails and torchmetrics/Lightning crash. "
            "Remove it (`.venv/bin/pip uninstall -y torchvision`); medmnist does not need it."
        )
    import numpy

    if int(numpy.__version__.split(".")[0]) >= 2:
        found.append(f"numpy {numpy.__version__} is installed; escnn needs numpy<2 (pip install 'numpy<2').")
    for module, package in [("docstring_parser", "jsonargparse[signatures]"), ("escnn", "escnn"),
                            ("lightning", "lightning"), ("torchmetrics", "torchmetrics"), ("medmnist", "medmnist")]:
        if importlib.util.find_spec(module) is None:
            found.append(f"{module} is missing: install {package}.")
    return found


def main() -> int:
    found = problems()
    for line in found:
        print(f"environment problem: {line}", file=sys.stderr)
    if not found:
        import eqlightning  # noqa: F401  (the import itself is part of the check)

        print("environment ok")
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main())
