"""Affinity features: each item's cosine similarities to the query's anchors.

For query q with first-stage ranking r = ranks[:, q]:
tokens  = [query, db[r[0]], ..., db[r[K-1]]]      (K+1 items, query first)
anchors = [query, db[r[0]], ..., db[r[L-2]]]      (L items)
affinity = tokens @ anchors^T                      (K+1, L), float32.
"""
from __future__ import annotations

from typing import Any, Iterator

import numpy as np
import torch

from .validation import CSAInputError, check_descriptors, check_ranks, check_topk

__all__ = ["build_affinity", "iter_affinity", "affinity_batch"]


def affinity_batch(qvecs: torch.Tensor, dbvecs: torch.Tensor, neighbours: torch.Tensor, topk: int,
                   anchor_len: int) -> torch.Tensor:
    """Torch core: queries (B, D), database (N, D), neighbours (B, M) with M >= max(K, L-1).

    Anchors are the first L of the K+1 tokens when L - 1 <= K, so one gather of the top
    max(K, L-1) rows serves both; the product is one ``bmm``.  Returns (B, K+1, L) float32.
    """
    b = qvecs.shape[0]
    m = max(topk, anchor_len - 1)
    rows = dbvecs.index_select(0, neighbours[:, :m].reshape(-1)).view(b, m, -1)
    items = torch.cat([qvecs.unsqueeze(1), rows], dim=1).float()      # (B, M+1, D)
    return torch.bmm(items[:, :topk + 1], items[:, :anchor_len].transpose(1, 2))


def _prepare(qvecs, dbvecs, ranks, topk, anchor_len, normalize):
    qvecs, dbvecs = check_descriptors(qvecs, dbvecs, normalize=normalize)
    check_topk(topk, anchor_len, dbvecs.shape[0])
    check_ranks(ranks, dbvecs.shape[0], qvecs.shape[0], min_rows=max(topk, anchor_len - 1))
    as_t = lambda x: torch.from_numpy(np.ascontiguousarray(x)) if isinstance(x, np.ndarray) else x
    m = max(topk, anchor_len - 1)
    return as_t(qvecs).float(), as_t(dbvecs).float(), as_t(ranks)[:m].long()


def iter_affinity(qvecs: Any, dbvecs: Any, ranks: Any, topk: int, anchor_len: int, batch_size: int = 8,
                  normalize: str = "warn") -> Iterator[tuple[slice, Any]]:
    """Yield ``(query_slice, affinity (b, K+1, L))`` for consecutive blocks of ``batch_size`` queries.

    Memory is bounded by one block whatever the number of queries.  Affinities are numpy arrays
    when ``qvecs`` is numpy, torch tensors otherwise.
    """
    if batch_size < 1:
        raise CSAInputError(f"batch_size must be >= 1, got {batch_size}")
    as_numpy = isinstance(qvecs, np.ndarray)
    q, db, r = _prepare(qvecs, dbvecs, ranks, topk, anchor_len, normalize)
    r = r.to(db.device)
    for s in range(0, q.shape[0], batch_size):
        sl = slice(s, min(s + batch_size, q.shape[0]))
        aff = affinity_batch(q[sl].to(db.device), db, r[:, sl].T, topk, anchor_len)
        yield sl, (aff.numpy() if as_numpy else aff)


def build_affinity(qvecs: Any, dbvecs: Any, ranks: Any, topk: int, anchor_len: int, batch_size: int = 64,
                   normalize: str = "warn") -> Any:
    """All affinities at once: (Q, K+1, L) float32 (numpy in -> numpy out)."""
    parts = [a for _, a in iter_affinity(qvecs, dbvecs, ranks, topk, anchor_len, batch_size, normalize)]
    return np.concatenate(parts) if isinstance(qvecs, np.ndarray) else torch.cat(parts)
