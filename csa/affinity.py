"""Affinity features: each item's cosine similarities to the query's anchors.

For query q with first-stage ranking r = ranks[:, q]:
tokens  = [query, db[r[0]], ..., db[r[K-1]]]      (K+1 items, query first)
anchors = [query, db[r[0]], ..., db[r[L-2]]]      (L items)
affinity = tokens @ anchors^T                      (K+1, L), float32.

At test time the rows come from a query and its ranking (:func:`query_affinity`); in training every
item is a row of one descriptor table and tokens / anchors are index lists into it
(:func:`indexed_affinity`).  Both end in the same batched product.
"""
from __future__ import annotations

from typing import Any, Iterator

import numpy as np
import torch

from csa.search import rerank_depth
from csa.arrays import as_tensor
from csa.validation import CSAInputError, check_descriptors, check_ranks, check_topk

__all__ = ["query_affinity", "indexed_affinity", "iter_affinity", "build_affinity"]


def query_affinity(qvecs: torch.Tensor, dbvecs: torch.Tensor, neighbours: torch.Tensor, topk: int,
                   anchor_len: int) -> torch.Tensor:
    """Test-time affinities (B, K+1, L) float32 of queries (B, D) over a database (N, D).

    ``neighbours`` (B, M), M >= max(K, L-1), are each query's first-stage database indices.  The
    anchors are the first L of the K+1 tokens when L - 1 <= K, so one gather of the top
    max(K, L-1) rows serves both; the product is one ``bmm``.
    """
    b = qvecs.shape[0]
    m = rerank_depth(topk, anchor_len)
    rows = dbvecs.index_select(0, neighbours[:, :m].reshape(-1)).view(b, m, -1)
    items = torch.cat([qvecs.unsqueeze(1), rows], dim=1).float()      # (B, M+1, D)
    return torch.bmm(items[:, :topk + 1], items[:, :anchor_len].transpose(1, 2))


def indexed_affinity(features: torch.Tensor, token_idx: torch.Tensor, anchor_idx: torch.Tensor) -> torch.Tensor:
    """Training affinities: ``out[b, i, j] = <features[token_idx[b, i]], features[anchor_idx[b, j]]>``.

    ``features`` (N, D) on the compute device; ``token_idx`` (B, K+1) and ``anchor_idx`` (B, L)
    integer indices (tokens may be permuted, anchors keep their similarity order).  Returns
    (B, K+1, L) in the features' dtype (one gather each + one ``bmm``).
    """
    if features.ndim != 2 or token_idx.ndim != 2 or anchor_idx.ndim != 2 or token_idx.shape[0] != anchor_idx.shape[0]:
        raise CSAInputError(f"indexed_affinity needs features (N, D), token_idx (B, K+1), anchor_idx (B, L); got "
                            f"{tuple(features.shape)}, {tuple(token_idx.shape)}, {tuple(anchor_idx.shape)}")
    token_idx = token_idx.to(features.device, torch.long)
    anchor_idx = anchor_idx.to(features.device, torch.long)
    tokens = features.index_select(0, token_idx.reshape(-1)).view(*token_idx.shape, -1)
    anchors = features.index_select(0, anchor_idx.reshape(-1)).view(*anchor_idx.shape, -1)
    return torch.bmm(tokens, anchors.transpose(1, 2))


def _checked_inputs(qvecs: Any, dbvecs: Any, ranks: Any, topk: int, anchor_len: int,
                    normalize: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    qvecs, dbvecs = check_descriptors(qvecs, dbvecs, normalize=normalize)
    check_topk(topk, anchor_len, dbvecs.shape[0])
    m = rerank_depth(topk, anchor_len)
    check_ranks(ranks, dbvecs.shape[0], qvecs.shape[0], min_rows=m, prefix=m)
    return as_tensor(qvecs).float(), as_tensor(dbvecs).float(), as_tensor(ranks)[:m].long()


def iter_affinity(qvecs: Any, dbvecs: Any, ranks: Any, topk: int, anchor_len: int, batch_size: int = 8,
                  normalize: str = "warn") -> Iterator[tuple[slice, Any]]:
    """Yield ``(query_slice, affinity (b, K+1, L))`` for consecutive blocks of ``batch_size`` queries.

    Memory is bounded by one block whatever the number of queries.  Affinities are numpy arrays
    when ``qvecs`` is numpy, torch tensors otherwise.
    """
    if batch_size < 1:
        raise CSAInputError(f"batch_size must be >= 1, got {batch_size}")
    as_numpy = isinstance(qvecs, np.ndarray)
    q, db, r = _checked_inputs(qvecs, dbvecs, ranks, topk, anchor_len, normalize)
    for sl, aff in _iter_affinity(q, db, r, topk, anchor_len, batch_size):
        yield sl, (aff.numpy() if as_numpy else aff)


def _iter_affinity(q: torch.Tensor, db: torch.Tensor, ranks: torch.Tensor, topk: int, anchor_len: int,
                   batch_size: int) -> Iterator[tuple[slice, torch.Tensor]]:
    """:func:`iter_affinity` on checked float tensors and the top max(K, L-1) rows of the ranking (int64)."""
    r = ranks.to(db.device)
    for s in range(0, q.shape[0], batch_size):
        sl = slice(s, min(s + batch_size, q.shape[0]))
        yield sl, query_affinity(q[sl].to(db.device), db, r[:, sl].T, topk, anchor_len)


def build_affinity(qvecs: Any, dbvecs: Any, ranks: Any, topk: int, anchor_len: int, batch_size: int = 64,
                   normalize: str = "warn") -> Any:
    """All affinities at once: (Q, K+1, L) float32 (numpy in -> numpy out)."""
    parts = [a for _, a in iter_affinity(qvecs, dbvecs, ranks, topk, anchor_len, batch_size, normalize)]
    return np.concatenate(parts) if isinstance(qvecs, np.ndarray) else torch.cat(parts)
