"""What a run leaves behind and how it resumes: run directories, ``last.ckpt``, ``metrics.csv``, ``summary.json``,
``curves.png`` and ``predictions.csv`` (used by the CLI; each piece is a plain Lightning callback or logger)."""

from .checkpoint import LastCheckpoint
from .directory import RunDirectory, find_last_checkpoint, new_run, remove_if_empty, run_of_checkpoint
from .logger import RunCSVLogger, read_metrics
from .plots import plot_curves
from .predictions import PredictionWriter, write_predictions
from .summary import RunSummary, versions

__all__ = ["LastCheckpoint", "PredictionWriter", "RunCSVLogger", "RunDirectory", "RunSummary",
           "find_last_checkpoint", "new_run", "plot_curves", "read_metrics", "remove_if_empty", "run_of_checkpoint",
           "versions", "write_predictions"]
