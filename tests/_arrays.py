"""Shared test fixtures for descriptor arrays and float64 references."""
from __future__ import annotations

import numpy as np


def unit_rows(n: int, d: int, seed: int) -> np.ndarray:
    x = np.random.default_rng(seed).standard_normal((n, d))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def brute_force_neighbours(x: np.ndarray, width: int) -> np.ndarray:
    """float64 reference: self, then the others by decreasing similarity (ties by index)."""
    x = x.astype(np.float64)
    sim = x @ x.T
    out = np.empty((len(x), width), dtype=np.int64)
    for i in range(len(x)):
        others = [j for j in np.lexsort((np.arange(len(x)), -sim[i])) if j != i]
        out[i] = [i] + others[: width - 1]
    return out
