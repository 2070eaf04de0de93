"""Choosing the demo recipe on the training city alone: every setting of a small grid scored on held-out landmarks.

For every setting of :data:`GRID` and every fold of the training city's landmarks
(:func:`csa.experiments.held_out.landmark_folds`), a model trains on the trainset without the fold's
landmarks and is scored on the leave-one-out queries of the held-out landmarks (their photos against the
whole database of the training city): the Medium mAP gain of CSA over the first stage.  :func:`choose`
takes the setting with the best mean held-out gain over folds.  The test city is never looked at.
``csa demo select`` runs this and writes a CSV file (``data/demo/results/selection_<trainset>.csv``).
"""
from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import pandas as pd

from csa.data.demo import CITIES
from csa.data.layout import clusters_path, load_clusters
from csa.experiments.held_out import (TRAIN_TO_OWN, check_experiment, csa_gain, held_out_benchmark, landmark_folds,
                                      subset_trainset, train_demo_model)
from csa.fileio import load_pickle
from csa.progress import progress_bar
from csa.training.recipes import GRID

__all__ = ["GRID", "select_recipe", "choose"]


def select_recipe(root: str | os.PathLike, trainset: str, grid: Mapping[str, Mapping[str, Any]] = GRID,
                  n_folds: int = 3, seed: int = 0, progress: bool = True) -> pd.DataFrame:
    """Score every setting of ``grid`` on held-out landmarks of ``trainset``'s own city (one row per fold)."""
    check_experiment(root, trainset, n_folds=n_folds, seeds=[seed])
    root = Path(root)
    own = TRAIN_TO_OWN[trainset]
    clusters = load_clusters(root, trainset, "train")
    images = load_pickle(clusters_path(root, trainset))["train"]["images"]
    rows = []
    with tempfile.TemporaryDirectory(prefix="csa-select-") as tmp:
        folds = landmark_folds(clusters, n_folds)
        benchmarks = []  # per fold, written and read once for every setting: its trainset and held-out queries
        for f, fold in enumerate(folds):
            held = np.isin(clusters, list(fold))
            subset_trainset(root, trainset, ~held, Path(tmp), f"{trainset}-fold{f}")
            benchmarks.append(held_out_benchmark(root, CITIES[own]["loo"], {images[i] for i in np.flatnonzero(held)}))
        jobs = [(name, f) for name in grid for f in range(n_folds)]
        for name, f in progress_bar(jobs, desc=f"recipe selection on {trainset}", disable=not progress):
            model, seconds = train_demo_model(Path(tmp), f"{trainset}-fold{f}", Path(tmp, "runs", name, str(f)), seed, grid[name])
            rows.append({"trainset": trainset, "setting": name, "fold": f, "held_out_landmarks": len(folds[f]),
                         **csa_gain(model, *benchmarks[f]), "train_seconds": seconds})
    return pd.DataFrame(rows)


def choose(table: pd.DataFrame, grid: Mapping[str, Mapping[str, Any]] = GRID) -> str:
    """The setting with the highest mean held-out Medium gain over folds (ties: the earlier in ``grid``)."""
    means = table.groupby("setting")["medium_gain"].mean()
    return max(grid, key=lambda name: (means.get(name, -np.inf), -list(grid).index(name)))
