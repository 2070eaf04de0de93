"""Bootstrap confidence intervals for mAP and for mAP differences, over queries or over landmarks.

With a few dozen queries (or a dozen, on the demo subsets) a mAP difference of a few points can
be noise; these intervals say how much.  Queries whose AP is ``nan`` (no positives) are excluded,
as in revisitop.  Results are deterministic given ``seed``.

Queries of one landmark share their positives, so their APs move together: they are not independent
draws.  Pass ``groups`` (one landmark id per query, e.g. ``csa.data.demo.group_queries``) to resample
whole landmarks (a cluster bootstrap): each resample draws as many landmarks as there are, with
replacement, and averages the APs of all their queries.  That interval answers "new landmarks"; the
per-query one answers "new photos of these same landmarks" and is narrower.
"""
from __future__ import annotations

from typing import Any

import numpy as np

from csa.validation import CSAInputError

__all__ = ["bootstrap_map_ci", "paired_bootstrap_gain", "count_groups", "check_groups"]


def _check(n_boot: int, level: float) -> None:
    if not (0 < level < 1):
        raise CSAInputError(f"level must be in (0, 1), got {level}")
    if n_boot < 1:
        raise CSAInputError(f"n_boot must be >= 1, got {n_boot}")


def _bootstrap_mean(values: np.ndarray, n_boot: int, seed: int, level: float,
                    groups: np.ndarray | None = None) -> tuple[float, float, float]:
    """(mean, lower, upper): percentile interval of the mean over ``n_boot`` resamples with replacement.

    Without ``groups`` the values are resampled; with ``groups`` whole groups are, and each resample's
    mean is the sum of the drawn groups' values over the number of values drawn.
    """
    rng = np.random.default_rng(seed)
    a = (1 - level) / 2
    if groups is None:
        idx = rng.integers(0, values.size, size=(n_boot, values.size))
        means = values[idx].mean(axis=1)
    else:
        _, inverse = np.unique(groups, return_inverse=True)
        sums = np.bincount(inverse, weights=values)
        counts = np.bincount(inverse).astype(np.float64)
        pick = rng.integers(0, sums.size, size=(n_boot, sums.size))
        means = sums[pick].sum(axis=1) / counts[pick].sum(axis=1)
    lo, hi = np.quantile(means, [a, 1 - a])
    return float(values.mean()), float(lo), float(hi)


def check_groups(groups: Any, n: int) -> np.ndarray | None:
    """``groups`` as a flat array of ``n`` landmark ids (None stays None); one clear error otherwise."""
    if groups is None:
        return None
    g = np.asarray(groups).ravel()
    if g.size != n:
        raise CSAInputError(f"groups has {g.size} entries but there are {n} queries; give one landmark id "
                            f"per query, in query order (csa.compare.runner.query_landmarks gives them)")
    return g


def count_groups(groups: Any) -> int:
    """Number of distinct landmark ids in ``groups`` (the unit count of a landmark-level interval)."""
    return int(np.unique(np.asarray(groups).ravel()).size)


def bootstrap_map_ci(aps: Any, n_boot: int = 10000, seed: int = 0, level: float = 0.95,
                     groups: Any = None) -> tuple[float, float, float]:
    """(mean AP, lower, upper): percentile bootstrap over queries, or over landmarks with ``groups``."""
    _check(n_boot, level)
    a = np.asarray(aps, dtype=np.float64).ravel()
    g = check_groups(groups, a.size)
    keep = ~np.isnan(a)
    a = a[keep]
    if a.size == 0:
        raise CSAInputError("no query has a finite AP (all nan); nothing to average")
    return _bootstrap_mean(a, n_boot, seed, level, None if g is None else g[keep])


def paired_bootstrap_gain(aps_new: Any, aps_base: Any, n_boot: int = 10000, seed: int = 0,
                          level: float = 0.95, groups: Any = None) -> tuple[float, float, float]:
    """(mean gain, lower, upper) of ``aps_new - aps_base``, resampling the same queries for both.

    With ``groups`` (one landmark id per query) whole landmarks are resampled instead of queries.
    Queries that are ``nan`` in either array are dropped.
    """
    _check(n_boot, level)
    a = np.asarray(aps_new, dtype=np.float64).ravel()
    b = np.asarray(aps_base, dtype=np.float64).ravel()
    if a.shape != b.shape:
        raise CSAInputError(f"aps_new has {a.size} queries but aps_base has {b.size}; they must be the same "
                            f"queries in the same order")
    g = check_groups(groups, a.size)
    keep = ~(np.isnan(a) | np.isnan(b))
    d = a[keep] - b[keep]
    if d.size == 0:
        raise CSAInputError("no query has a finite AP in both arrays; nothing to compare")
    return _bootstrap_mean(d, n_boot, seed, level, None if g is None else g[keep])
