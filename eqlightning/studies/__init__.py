"""Studies: many runs from one config (``eqlightning study run|status|report``).

- ``spec``: the study file (base config, variants, grid axes, seeds, or a recipe search) and its plan of runs;
- ``store``: Optuna's storage as the queue and record of runs (SQLite by default), heartbeats for dead workers;
- ``worker``: takes runs and runs each as ``eqlightning fit`` + test in its own run directory;
- ``launch``: local worker processes or a SLURM job array (submitit), progress and ETA;
- ``analysis``, ``plots``, ``report``: scaling fits with bootstrap intervals, frontier, plots, a Markdown report.

Importing ``eqlightning`` does not import this package (nor Optuna): ``pip install eqlightning[studies]``.
"""

from .spec import StudyConfigError, StudySpec, load_spec

__all__ = ["StudyConfigError", "StudySpec", "load_spec"]
