"""Training curves: loss terms and learning rate against the epoch (``curves.png`` of every run)."""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
from matplotlib.figure import Figure

from csa.validation import CSAInputError

__all__ = ["plot_training_curves"]


def _history_columns(history: Any) -> dict[str, np.ndarray]:
    """Normalise a training history (DataFrame, dict of lists or list of per-epoch dicts) to columns."""
    if hasattr(history, "to_dict") and hasattr(history, "columns"):
        return {str(c): np.asarray(history[c]) for c in history.columns}
    if isinstance(history, Mapping):
        return {str(k): np.asarray(v) for k, v in history.items()}
    rows = list(history)
    if rows and all(isinstance(r, Mapping) for r in rows):
        keys = list(dict.fromkeys(k for r in rows for k in r))
        return {str(k): np.asarray([r.get(k, np.nan) for r in rows], dtype=float) for k in keys}
    raise CSAInputError(
        "history must be a pandas DataFrame, a dict of per-epoch lists or a list of per-epoch dicts "
        "(e.g. pandas.read_csv('history.csv'))"
    )


def plot_training_curves(history: Any) -> Figure:
    """Four panels against the epoch: total loss, contrastive loss, reconstruction loss, learning rate.

    ``history`` has columns ``epoch`` (optional: 1..E otherwise), ``loss``, ``contrastive``,
    ``reconstruction`` and ``lr`` (``history.csv`` of ``csa train``).  A column ``val_<name>``, when
    present, is drawn dashed on the same panel as ``<name>``.
    """
    cols = _history_columns(history)
    needed = ["loss", "contrastive", "reconstruction", "lr"]
    missing = [c for c in needed if c not in cols]
    if missing:
        raise CSAInputError(f"history lacks the column(s) {missing}: it needs {needed} (and optionally 'epoch')")
    n = len(cols["loss"])
    epoch = cols.get("epoch", np.arange(1, n + 1))
    fig = Figure(figsize=(10.0, 6.4), layout="constrained")
    axes = fig.subplots(2, 2, sharex=True)
    panels = [
        ("loss", "total loss", "#1f77b4", "loss (nats + alpha x distance)"),
        ("contrastive", "contrastive loss", "#9467bd", "-log p(relevant) (nats)"),
        ("reconstruction", "reconstruction loss", "#8c564b", "distance of unit rows"),
        ("lr", "learning rate", "#ff7f0e", "learning rate (after scaling)"),
    ]
    for ax, (key, label, color, unit) in zip(axes.ravel(), panels):
        ax.plot(epoch, cols[key], color=color, marker="o" if n <= 30 else None, markersize=3, label="train")
        if f"val_{key}" in cols:
            ax.plot(epoch, cols[f"val_{key}"], color=color, linestyle="--", label="validation")
            ax.legend(fontsize=9, frameon=False)
        ax.set_title(label, fontsize=11)
        ax.set_ylabel(unit, fontsize=9)
        ax.grid(alpha=0.3)
        if key == "lr":
            ax.ticklabel_format(axis="y", style="sci", scilimits=(-2, 3))
    for ax in axes[1]:
        ax.set_xlabel("epoch")
    fig.suptitle("training curves", fontsize=13, fontweight="bold")
    return fig
