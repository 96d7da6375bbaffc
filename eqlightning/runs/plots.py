"""Training curves of a run as a PNG (matplotlib, headless): loss, validation ACC/AUC and, for private runs, epsilon."""

from __future__ import annotations

from pathlib import Path

from .logger import read_metrics

PANELS = (
    ("loss", ("train/loss_step", "train/loss_epoch", "val/loss")),
    ("validation ACC / AUC", ("val/acc", "val/auc")),
    ("privacy spent (epsilon)", ("dp/epsilon",)),
)


def plot_curves(run_dir: str | Path, out: str | Path | None = None) -> Path | None:
    """Draw ``<run_dir>/curves.png`` from ``metrics.csv`` against the training step; returns its path (None when
    nothing was logged). Panels without data are left out."""
    run_dir = Path(run_dir)
    rows = read_metrics(run_dir)
    series = {}
    for _, keys in PANELS:
        for key in keys:
            points = [(row["step"], row[key]) for row in rows if key in row and "step" in row]
            if points:
                series[key] = points
    panels = [(title, [k for k in keys if k in series]) for title, keys in PANELS]
    panels = [(title, keys) for title, keys in panels if keys]
    if not panels:
        return None
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(4.2 * len(panels), 3.2))  # no pyplot: headless, and no global backend change
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, len(panels), squeeze=False)
    for ax, (title, keys) in zip(axes[0], panels):
        for key in keys:
            steps, values = zip(*series[key])
            style = "-" if key.endswith("_step") else "o-"
            ax.plot(steps, values, style, label=key, markersize=3, linewidth=1 if key.endswith("_step") else 1.5,
                    alpha=0.5 if key.endswith("_step") else 1.0)
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(f"{run_dir.parent.name}/{run_dir.name}", fontsize=10)
    fig.tight_layout()
    path = Path(out) if out is not None else run_dir / "curves.png"
    fig.savefig(path, dpi=110)
    return path
