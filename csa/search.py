"""First-stage retrieval: exact cosine ranking of the database for each query.

Descriptors are L2-normalized rows, so cosine = dot product.  Ranks use the revisitop layout
``(N, Q)`` (or ``(topk, Q)``): ``ranks[:, q]`` lists database indices from most to least similar.
Ties (equal scores) are broken by the lower database index, so results are deterministic and
identical with or without ``topk`` and for any ``chunk_size``.
"""
from __future__ import annotations

from typing import Any

import numpy as np
import torch

from csa.arrays import as_tensor, same_kind
from csa.validation import CSAInputError, check_descriptors

__all__ = ["first_stage", "rerank_depth", "stable_topk", "merge_topk", "resort_topk"]


def rerank_depth(topk: int, anchor_len: int) -> int:
    """How many first-stage rows re-ranking reads: max(K, L-1) for K = ``topk`` candidates and
    L = ``anchor_len`` anchors (the query and its top L-1 images are the anchors).

    Here ``topk`` is the re-ranking depth K (as in :func:`csa.rerank.rerank`); in :func:`first_stage`
    ``topk`` is the length of the returned lists, which must be at least this depth.
    """
    return max(int(topk), int(anchor_len) - 1)


def stable_topk(scores: torch.Tensor, k: int, dim: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``k`` largest entries of a 2-D tensor along ``dim``, ordered by (score descending, index ascending).

    Exact on ties: when several entries tie with the k-th value, the lowest indices are kept (the
    order a stable descending sort gives), which ``torch.topk`` alone does not promise.
    Returns ``(values, indices)`` with size ``k`` along ``dim``.
    """
    if scores.ndim != 2 or dim not in (0, 1, -1, -2):
        raise CSAInputError(f"stable_topk works on 2-D scores along dim 0 or 1, got shape {tuple(scores.shape)}")
    dim = dim % 2
    vals, idx = torch.topk(scores, k, dim=dim, largest=True, sorted=True)
    kth = vals.select(dim, k - 1).unsqueeze(dim)
    short = (scores == kth).sum(dim) != (vals == kth).sum(dim)
    for line in torch.nonzero(short).flatten().tolist():  # more ties at the k-th value than kept: stable sort
        s_line = scores.select(1 - dim, line)
        order = torch.sort(s_line, descending=True, stable=True).indices[:k]
        idx.select(1 - dim, line).copy_(order)
        vals.select(1 - dim, line).copy_(s_line[order])
    by_index = torch.sort(idx, dim=dim).indices
    idx, vals = idx.gather(dim, by_index), vals.gather(dim, by_index)
    by_score = torch.sort(vals, dim=dim, descending=True, stable=True).indices
    return vals.gather(dim, by_score), idx.gather(dim, by_score)


def merge_topk(vals: torch.Tensor, idx: torch.Tensor, new_vals: torch.Tensor, new_idx: torch.Tensor,
               k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Merge two (score desc, index asc) lists along dim 0 into the top ``k``.

    Every index of the first list must be lower than every index of the second (database chunks
    visited in order), so a stable sort of the concatenation keeps lower indices first among ties.
    """
    all_vals, all_idx = torch.cat([vals, new_vals]), torch.cat([idx, new_idx])
    order = torch.sort(all_vals, dim=0, descending=True, stable=True).indices[:k]
    return all_vals.gather(0, order), all_idx.gather(0, order)


def resort_topk(ranks: Any, scores: Any, topk: int) -> Any:
    """``ranks`` (N or K', Q) with each column's first ``topk`` entries re-sorted by decreasing
    ``scores`` (Q, topk), ties keeping the first-stage order; rows ``topk`` and beyond unchanged.

    Same kind, dtype and device as ``ranks``.
    """
    r = as_tensor(ranks)
    s = as_tensor(scores)
    top = r[:topk].to(s.device)                                             # (K, Q)
    order = torch.sort(s, dim=1, descending=True, stable=True).indices      # (Q, K)
    new_top = torch.gather(top, 0, order.T.to(top.device))
    out = r.clone()
    out[:topk] = new_top.to(r.device, r.dtype)
    return same_kind(out, ranks)


def first_stage(qvecs: Any, dbvecs: Any, topk: int | None = None, chunk_size: int = 65536,
                device: str | torch.device | None = None, normalize: str = "warn") -> Any:
    """Rank the database (N, D) for every query (Q, D) by descending cosine similarity.

    ``topk`` here is the *length of the returned lists* (not the re-ranking depth K of
    :func:`csa.rerank.rerank`; a list to be re-ranked needs :func:`rerank_depth` rows).
    Returns int64 ranks of shape ``(N, Q)``, or ``(topk, Q)`` when ``topk`` is given; numpy in ->
    numpy out, torch in -> torch out (on the queries' device).  With ``topk`` the database is
    scanned in chunks of ``chunk_size`` rows with a running top-k merge, so memory stays
    O((topk + chunk_size) * Q) whatever N is.  ``normalize`` is passed to
    :func:`csa.validation.check_descriptors`.
    """
    qvecs, dbvecs = check_descriptors(qvecs, dbvecs, normalize=normalize)
    n_db = dbvecs.shape[0]
    if chunk_size < 1:
        raise CSAInputError(f"chunk_size must be >= 1, got {chunk_size}")
    if topk is not None and (isinstance(topk, bool) or not isinstance(topk, (int, np.integer)) or topk < 1):
        raise CSAInputError(f"topk must be a positive integer or None, got {topk!r}")
    if topk is not None and topk > n_db:
        raise CSAInputError(f"topk={topk} is larger than the database ({n_db} images); use topk <= {n_db} or None")
    return _first_stage(qvecs, dbvecs, topk, chunk_size, device)


def _first_stage(qvecs: Any, dbvecs: Any, topk: int | None = None, chunk_size: int = 65536,
                 device: str | torch.device | None = None) -> Any:
    """:func:`first_stage` on checked descriptors and arguments (the kernel the package's callers use)."""
    q, db = as_tensor(qvecs), as_tensor(dbvecs)
    out_device = q.device
    dev = torch.device(device) if device is not None else q.device
    q = q.to(dev, torch.float32)
    if topk is None or topk == db.shape[0]:
        ranks = _full_ranking(q, db, dev, chunk_size)
    else:
        ranks = _topk_ranking(q, db, dev, int(topk), chunk_size)
    return ranks.cpu().numpy() if isinstance(qvecs, np.ndarray) else ranks.to(out_device)


def _full_ranking(q: torch.Tensor, db: torch.Tensor, dev: torch.device, chunk_size: int) -> torch.Tensor:
    """Full stable descending sort of every query's scores.

    The scores are the products of the top-k path (``chunk_size`` database rows against all queries
    at a time), so both paths rank the very same floats: a matrix product's rounding can depend on
    how many queries it holds, not on how the database rows are chunked. The sort then runs over
    blocks of queries to bound its temporary memory.
    """
    n_db, n_q = db.shape[0], q.shape[0]
    scores = torch.empty((n_db, n_q), dtype=torch.float32, device=dev)
    for start in range(0, n_db, chunk_size):
        torch.mm(db[start:start + chunk_size].to(dev, torch.float32), q.T, out=scores[start:start + chunk_size])
    step = max(1, (chunk_size * 64) // max(n_db, 1))
    out = torch.empty((n_db, n_q), dtype=torch.int64, device=dev)
    for s in range(0, n_q, step):
        out[:, s:s + step] = torch.sort(scores[:, s:s + step], dim=0, descending=True, stable=True).indices
    return out


def _topk_ranking(q: torch.Tensor, db: torch.Tensor, dev: torch.device, k: int, chunk_size: int) -> torch.Tensor:
    """Running top-k over database chunks visited in index order (see :func:`merge_topk`)."""
    n_q = q.shape[0]
    best_val = torch.empty((0, n_q), dtype=torch.float32, device=dev)
    best_idx = torch.empty((0, n_q), dtype=torch.int64, device=dev)
    for start in range(0, db.shape[0], chunk_size):
        scores = db[start:start + chunk_size].to(dev, torch.float32) @ q.T  # (c, Q)
        val, idx = stable_topk(scores, min(k, scores.shape[0]), dim=0)
        best_val, best_idx = merge_topk(best_val, best_idx, val, idx + start, k)
    return best_idx
