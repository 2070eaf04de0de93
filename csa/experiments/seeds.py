"""How much a demo gain moves with the training seed: the same recipe trained with several seeds.

``csa demo seeds`` runs :func:`seed_sweep` and writes a CSV file (``data/demo/results/seeds_<trainset>.csv``).
"""
from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any, Mapping, Sequence

import pandas as pd

from csa.experiments.held_out import check_experiment, train_and_test
from csa.progress import progress_bar

__all__ = ["seed_sweep"]


def seed_sweep(root: str | os.PathLike, trainset: str, overrides: Mapping[str, Any], seeds: Sequence[int] = (0, 1, 2),
               progress: bool = True) -> pd.DataFrame:
    """Train with each seed on the whole trainset; CSA gains on the test city (official and leave-one-out)."""
    check_experiment(root, trainset, seeds=seeds)
    root = Path(root)
    rows = []
    with tempfile.TemporaryDirectory(prefix="csa-seeds-") as tmp:
        for seed in progress_bar(seeds, desc=f"seeds on {trainset}", disable=not progress):
            rows += train_and_test(root, trainset, root, trainset, Path(tmp, str(seed)), seed, overrides,
                                   {"seed": seed})
    return pd.DataFrame(rows)
