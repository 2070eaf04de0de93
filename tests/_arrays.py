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


def unit_quarter_rows(rng: np.random.Generator, n: int, d: int = 32) -> np.ndarray:
    """Unit rows with 16 entries of +-1/4: every score is a multiple of 1/16, exact in float16 and float32
    whatever the summation order, and many scores tie."""
    x = np.zeros((n, d), np.float32)
    for row in x:
        row[rng.choice(d, 16, replace=False)] = rng.choice([-0.25, 0.25], 16)
    return x
