"""Post-hoc whitening of global descriptors, learned on training data only.

Two ways to learn a projection ``x -> l2n(P (x - m))`` from (N, D) row descriptors:

* **learned whitening** (``Lw``, :func:`learn_lw`), as cirtorch learns it for the paper's ``-gem-w``
  networks: the covariance ``S`` of the differences of matching pairs (two photos of one landmark) is
  whitened (``S = L L^T``, first step ``L^{-1}``), then the training descriptors, centred on the mean of
  the pair images and mapped by ``L^{-1}``, are rotated onto their principal axes (largest variance
  first).  The pair differences then have identity covariance and the data diagonal covariance.
* **PCA-whitening** (:func:`learn_pcaw`), unsupervised: principal axes of the descriptors, each divided
  by the square root of its variance.

``shrinkage`` pulls the covariance towards a multiple of the identity, ``(1 - s) C + s tr(C)/D I``, which
keeps the inverse stable when there are fewer independent pairs (or images) than dimensions; with
``shrinkage=0`` a singular covariance gets the smallest ridge ``a I`` (``a`` = 1e-10, 1e-9, ...) that
makes it positive definite, as cirtorch does.  ``dimensions`` keeps the first output dimensions.
Everything is computed in float64; :meth:`Whitening.apply` returns float32 L2-normalized rows.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

from csa.descriptors.pooling import whiten_apply
from csa.validation import CSAInputError

__all__ = ["WHITENINGS", "LearnedWhitening", "matching_pairs", "learn_lw", "learn_pcaw", "learn_whitening",
           "whitened_name"]

#: Whitening kinds and the suffix of their descriptor sets (``lite0-gem`` -> ``lite0-gem-w``, ``-pcaw``).
WHITENINGS = {"lw": "w", "pcaw": "pcaw"}


@dataclass(frozen=True)
class LearnedWhitening:
    """A learned projection: mean ``m`` (D,), projection ``P`` (D', D) with rows ordered by importance."""

    kind: str
    m: np.ndarray
    P: np.ndarray

    def apply(self, x: np.ndarray, dimensions: int | None = None) -> np.ndarray:
        """``l2n((x - m) @ P[:d].T)`` of (N, D) rows, as float32."""
        x = np.asarray(x)
        if x.ndim != 2 or x.shape[1] != self.m.shape[0]:
            raise CSAInputError(f"whitening learned on {self.m.shape[0]}-d descriptors cannot map rows of shape "
                                f"{x.shape}; apply it to the descriptor set it was learned for")
        return whiten_apply(x.astype(np.float64), self.m, self.P, dimensions).astype(np.float32)


def _rows64(features: np.ndarray, what: str) -> np.ndarray:
    x = np.asarray(features, dtype=np.float64)
    if x.ndim != 2 or x.shape[0] < 2 or not np.isfinite(x).all():
        raise CSAInputError(f"{what} must be a finite (N, D) array with N >= 2, got shape {x.shape}")
    return x


def _check_settings(shrinkage: float, dimensions: int | None, dim: int) -> None:
    if not 0.0 <= shrinkage <= 1.0:
        raise CSAInputError(f"whitening shrinkage must be in [0, 1], got {shrinkage}")
    if dimensions is not None and not 1 <= dimensions <= dim:
        raise CSAInputError(f"whitening dimensions must be in [1, {dim}], got {dimensions}")


def _shrunk(cov: np.ndarray, shrinkage: float) -> np.ndarray:
    cov = (cov + cov.T) / 2
    return (1 - shrinkage) * cov + shrinkage * np.trace(cov) / cov.shape[0] * np.eye(cov.shape[0])


def _cholesky_with_ridge(cov: np.ndarray) -> np.ndarray:
    """Lower Cholesky factor of ``cov + a I`` with the smallest ``a`` in 0, 1e-10, 1e-9, ... that works."""
    ridge = 0.0
    while True:
        try:
            return np.linalg.cholesky(cov + ridge * np.eye(cov.shape[0]))
        except np.linalg.LinAlgError:
            ridge = 1e-10 if ridge == 0.0 else ridge * 10
            if ridge > 1e3 * max(1.0, float(np.abs(cov).max())):
                raise CSAInputError("the pair-difference covariance cannot be made positive definite; "
                                    "pass a shrinkage > 0") from None


def _principal_axes(cov: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Eigenvalues (descending) and eigenvectors (columns) of a symmetric matrix."""
    values, vectors = np.linalg.eigh((cov + cov.T) / 2)
    order = np.argsort(values)[::-1]
    return values[order], vectors[:, order]


def matching_pairs(clusters: Sequence[int]) -> np.ndarray:
    """All unordered pairs ``(i, j)``, ``i < j``, of rows with the same cluster id: an (M, 2) int array."""
    clusters = np.asarray(clusters)
    pairs = []
    for c in np.unique(clusters):
        rows = np.flatnonzero(clusters == c)
        if rows.size > 1:
            i, j = np.triu_indices(rows.size, k=1)
            pairs.append(np.stack([rows[i], rows[j]], axis=1))
    if not pairs:
        raise CSAInputError("no two training images share a landmark: learned whitening needs matching pairs")
    return np.concatenate(pairs)


def learn_lw(features: np.ndarray, pairs: np.ndarray, shrinkage: float = 0.0,
             dimensions: int | None = None) -> LearnedWhitening:
    """Learned whitening (Lw) from matching pairs ``(M, 2)`` of rows of ``features`` (N, D)."""
    x = _rows64(features, "whitening training descriptors")
    pairs = np.asarray(pairs)
    if pairs.ndim != 2 or pairs.shape[1] != 2 or pairs.size == 0 or pairs.min() < 0 or pairs.max() >= len(x):
        raise CSAInputError(f"matching pairs must be an (M, 2) array of row indices in [0, {len(x)})")
    _check_settings(shrinkage, dimensions, x.shape[1])
    m = x[pairs.ravel()].mean(axis=0)
    diff = x[pairs[:, 0]] - x[pairs[:, 1]]
    lower = _cholesky_with_ridge(_shrunk(diff.T @ diff / len(diff), shrinkage))
    first = np.linalg.inv(lower)                                             # L^{-1}: pair diffs -> identity
    mapped = (x - m) @ first.T
    _, axes = _principal_axes(mapped.T @ mapped / len(mapped))
    P = axes.T @ first
    return LearnedWhitening("lw", m, P[:dimensions] if dimensions else P)


def learn_pcaw(features: np.ndarray, shrinkage: float = 0.0, dimensions: int | None = None) -> LearnedWhitening:
    """PCA-whitening of ``features`` (N, D): principal axes scaled to unit variance (largest variance first)."""
    x = _rows64(features, "whitening training descriptors")
    _check_settings(shrinkage, dimensions, x.shape[1])
    m = x.mean(axis=0)
    xc = x - m
    values, axes = _principal_axes(_shrunk(xc.T @ xc / len(xc), shrinkage))
    d = dimensions or x.shape[1]
    if values[d - 1] <= 1e-12 * max(values[0], 1e-300):
        raise CSAInputError(f"the descriptors span fewer than {d} dimensions ({len(x)} rows); lower the "
                            f"whitening dimensions or pass a shrinkage > 0")
    P = axes[:, :d].T / np.sqrt(values[:d])[:, None]
    return LearnedWhitening("pcaw", m, P)


def learn_whitening(kind: str, features: np.ndarray, clusters: Sequence[int] | None = None, shrinkage: float = 0.0,
                    dimensions: int | None = None) -> LearnedWhitening:
    """``kind`` ``'lw'`` (needs ``clusters``, one landmark id per row) or ``'pcaw'``."""
    if kind == "lw":
        if clusters is None:
            raise CSAInputError("learned whitening (lw) needs the training images' landmark clusters")
        return learn_lw(features, matching_pairs(clusters), shrinkage, dimensions)
    if kind == "pcaw":
        return learn_pcaw(features, shrinkage, dimensions)
    raise CSAInputError(f"unknown whitening {kind!r}; choose one of {', '.join(WHITENINGS)}")


def whitened_name(feature_name: str, kind: str | None) -> str:
    """The descriptor-set name of ``feature_name`` after whitening ``kind`` (``None``: unchanged)."""
    if kind is None:
        return feature_name
    if kind not in WHITENINGS:
        raise CSAInputError(f"unknown whitening {kind!r}; choose one of {', '.join(WHITENINGS)}")
    return f"{feature_name}-{WHITENINGS[kind]}"
