"""Bootstrap confidence intervals over queries for mAP and for mAP differences.

With a few dozen queries (or a dozen, on the demo subsets) a mAP difference of a few points can
be noise; these intervals say how much.  Queries whose AP is ``nan`` (no positives) are excluded,
as in revisitop.  Results are deterministic given ``seed``.
"""
from __future__ import annotations

from typing import Any

import numpy as np

from csa.validation import CSAInputError

__all__ = ["bootstrap_map_ci", "paired_bootstrap_gain"]


def _check(n_boot: int, level: float) -> None:
    if not (0 < level < 1):
        raise CSAInputError(f"level must be in (0, 1), got {level}")
    if n_boot < 1:
        raise CSAInputError(f"n_boot must be >= 1, got {n_boot}")


def _bootstrap_mean(values: np.ndarray, n_boot: int, seed: int, level: float) -> tuple[float, float, float]:
    """(mean, lower, upper): percentile interval of the mean over ``n_boot`` resamples with replacement."""
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, values.size, size=(n_boot, values.size))
    a = (1 - level) / 2
    lo, hi = np.quantile(values[idx].mean(axis=1), [a, 1 - a])
    return float(values.mean()), float(lo), float(hi)


def bootstrap_map_ci(aps: Any, n_boot: int = 10000, seed: int = 0, level: float = 0.95) -> tuple[float, float, float]:
    """(mean AP, lower, upper): percentile bootstrap over queries (resampled with replacement)."""
    _check(n_boot, level)
    a = np.asarray(aps, dtype=np.float64).ravel()
    a = a[~np.isnan(a)]
    if a.size == 0:
        raise CSAInputError("no query has a finite AP (all nan); nothing to average")
    return _bootstrap_mean(a, n_boot, seed, level)


def paired_bootstrap_gain(aps_new: Any, aps_base: Any, n_boot: int = 10000, seed: int = 0,
                          level: float = 0.95) -> tuple[float, float, float]:
    """(mean gain, lower, upper) of ``aps_new - aps_base``, resampling the same queries for both.

    Queries that are ``nan`` in either array are dropped.
    """
    _check(n_boot, level)
    a = np.asarray(aps_new, dtype=np.float64).ravel()
    b = np.asarray(aps_base, dtype=np.float64).ravel()
    if a.shape != b.shape:
        raise CSAInputError(f"aps_new has {a.size} queries but aps_base has {b.size}; they must be the same "
                            f"queries in the same order")
    keep = ~(np.isnan(a) | np.isnan(b))
    d = a[keep] - b[keep]
    if d.size == 0:
        raise CSAInputError("no query has a finite AP in both arrays; nothing to compare")
    return _bootstrap_mean(d, n_boot, seed, level)
