"""Database-side augmentation (DBA, αDBA): every database vector replaced by its weighted neighbourhood mean.

:class:`AugmentDatabase` is the :func:`csa.compare.chain.compose` step that applies it; the αDBA and DBA
re-rankers of :mod:`csa.compare.expansion` are chains of that one step.
"""
from __future__ import annotations

import math
from typing import Any

import torch
from tqdm import tqdm

from csa.compare.inputs import as_float_cpu, normalize_rows
from csa.validation import CSAInputError, check_float, check_int

__all__ = ["augment_database", "AugmentDatabase"]


def augment_database(dbvecs: Any, n: int, alpha: float = 0.0, chunk_size: int = 1024,
                     progress: bool = False) -> Any:
    """Database-side augmentation: replace each database vector by its weighted neighbourhood mean.

    ``d_j' = normalize(d_j + sum_{i=1..n} max(d_j·d_i, 0)^alpha d_i)`` over the ``n`` nearest
    *other* database vectors of ``d_j`` (``d_j`` itself keeps weight 1).  ``alpha = 0`` is DBA,
    ``alpha > 0`` αDBA.  ``n = 0`` returns the vectors unchanged.  The database-database
    neighbours are found chunk by chunk (``chunk_size`` database rows against the whole database),
    never as an N x N matrix: time O(N² D), memory O(chunk_size · N + N D).  At 1M images this is
    an offline job (hours on a CPU): compute it once and store the result.
    Returns the same kind (numpy/torch) as ``dbvecs``, float32.
    """
    db_t = as_float_cpu(dbvecs)
    if db_t.ndim != 2:
        raise CSAInputError(f"dbvecs must be 2-D (N, D), got shape {tuple(db_t.shape)}")
    n_db = db_t.shape[0]
    n = check_int("n", n, 0, n_db - 1, hint=f" (the database has {n_db} images, so at most {n_db - 1} others)")
    alpha = check_float("alpha", alpha, 0.0)
    chunk_size = check_int("chunk_size", chunk_size, 1)
    if n == 0:
        out = db_t.clone()
    else:
        out = torch.empty_like(db_t)
        starts = range(0, n_db, chunk_size)
        for start in tqdm(starts, desc="database augmentation", disable=not progress):
            block = db_t[start:start + chunk_size]
            sims = block @ db_t.T                                     # (c, N)
            rows = torch.arange(block.shape[0])
            sims[rows, rows + start] = -math.inf                       # exclude the image itself
            top_sims, top_idx = torch.topk(sims, n, dim=1)
            weights = top_sims.clamp_min(0.0).pow(alpha)
            out[start:start + chunk_size] = block + torch.einsum("cn,cnd->cd", weights, db_t[top_idx])
        out = normalize_rows(out)
    return out if isinstance(dbvecs, torch.Tensor) else out.numpy()


class AugmentDatabase:
    """A :func:`csa.compare.chain.compose` step that replaces the database by its (α)DBA-augmented version and
    searches it again (the following steps then see the augmented database)."""

    def __init__(self, n: int = 50, alpha: float = 3.0, chunk_size: int = 1024, progress: bool = False):
        self.n, self.alpha, self.chunk_size, self.progress = n, alpha, chunk_size, progress

    def __call__(self, dbvecs: Any) -> Any:
        return augment_database(dbvecs, self.n, self.alpha, self.chunk_size, self.progress)

    def __repr__(self) -> str:
        return f"AugmentDatabase(n={self.n}, alpha={self.alpha})"
