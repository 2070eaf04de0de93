"""How a demo gain grows with the training data: models trained on a growing share of the training landmarks.

``csa demo curve`` runs :func:`learning_curve` and writes a CSV file (``data/demo/results/curve_<trainset>.csv``).
"""
from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import pandas as pd

from csa.data.layout import load_clusters
from csa.experiments.held_out import check_experiment, landmark_sizes, subset_trainset, train_and_test
from csa.progress import progress_bar

__all__ = ["learning_curve"]


def learning_curve(root: str | os.PathLike, trainset: str, overrides: Mapping[str, Any],
                   fractions: Sequence[float] = (0.25, 0.5, 1.0), seeds: Sequence[int] = (0,),
                   progress: bool = True) -> pd.DataFrame:
    """Train on a growing share of the training city's landmarks (whole landmarks, drawn at random per seed)
    and measure the CSA gains on the test city.  The photos of the landmarks left out stay in the trainset
    without their label (neighbours and distractors, as the photos without a landmark), so only the
    supervision grows along the curve, not the pool of images."""
    check_experiment(root, trainset, seeds=seeds, fractions=fractions)
    root = Path(root)
    clusters = load_clusters(root, trainset, "train")
    sizes = landmark_sizes(clusters)
    landmarks = list(sizes)
    total = sum(sizes.values())
    rows = []
    with tempfile.TemporaryDirectory(prefix="csa-curve-") as tmp:
        jobs = [(fr, s) for fr in fractions for s in seeds]
        for fraction, seed in progress_bar(jobs, desc=f"learning curve on {trainset}", disable=not progress):
            order = np.random.default_rng(seed).permutation(landmarks)
            chosen, count = [], 0
            for lm in order:
                if count >= fraction * total - 1e-9:
                    break
                chosen.append(int(lm))
                count += sizes[int(lm)]
            unlabel = np.isin(clusters, landmarks) & ~np.isin(clusters, chosen)
            name = f"{trainset}-{int(round(100 * fraction))}pct-s{seed}"
            subset_trainset(root, trainset, np.ones(len(clusters), dtype=bool), Path(tmp), name, unlabel=unlabel)
            rows += train_and_test(root, trainset, Path(tmp), name, Path(tmp, "runs", name), seed, overrides,
                                   {"fraction": fraction, "seed": seed, "landmarks": len(chosen),
                                    "landmark_images": count})
    return pd.DataFrame(rows)
