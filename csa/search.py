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

from .validation import CSAInputError, check_descriptors

__all__ = ["first_stage"]


def _to_tensor(x: Any) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(x)) if isinstance(x, np.ndarray) else x


def first_stage(qvecs: Any, dbvecs: Any, topk: int | None = None, chunk_size: int = 65536,
                device: str | torch.device | None = None, normalize: str = "warn") -> Any:
    """Rank the database (N, D) for every query (Q, D) by descending cosine similarity.

    Returns int64 ranks of shape ``(N, Q)``, or ``(topk, Q)`` when ``topk`` is given; numpy in ->
    numpy out, torch in -> torch out (on the queries' device).  With ``topk`` the database is
    scanned in chunks of ``chunk_size`` rows with a running top-k merge, so memory stays
    O((topk + chunk_size) * Q) whatever N is.  ``normalize`` is passed to
    :func:`csa.validation.check_descriptors`.
    """
    as_numpy = isinstance(qvecs, np.ndarray)
    qvecs, dbvecs = check_descriptors(qvecs, dbvecs, normalize=normalize)
    q, db = _to_tensor(qvecs), _to_tensor(dbvecs)
    out_device = q.device
    n_db = db.shape[0]
    if chunk_size < 1:
        raise CSAInputError(f"chunk_size must be >= 1, got {chunk_size}")
    if topk is not None and (isinstance(topk, bool) or not isinstance(topk, (int, np.integer)) or topk < 1):
        raise CSAInputError(f"topk must be a positive integer or None, got {topk!r}")
    if topk is not None and topk > n_db:
        raise CSAInputError(f"topk={topk} is larger than the database ({n_db} images); use topk <= {n_db} or None")
    dev = torch.device(device) if device is not None else q.device
    q = q.to(dev, torch.float32)
    if topk is None or topk == n_db:
        ranks = _full_ranking(q, db, dev, chunk_size)
    else:
        ranks = _topk_ranking(q, db, dev, int(topk), chunk_size)
    return ranks.cpu().numpy() if as_numpy else ranks.to(out_device)


def _full_ranking(q: torch.Tensor, db: torch.Tensor, dev: torch.device, chunk_size: int) -> torch.Tensor:
    """Full stable descending sort; queries processed in blocks to bound the score matrix."""
    n_db = db.shape[0]
    dbd = db.to(dev, torch.float32)
    step = max(1, (chunk_size * 64) // max(n_db, 1))
    out = torch.empty((n_db, q.shape[0]), dtype=torch.int64, device=dev)
    for s in range(0, q.shape[0], step):
        scores = dbd @ q[s:s + step].T                                   # (N, q)
        out[:, s:s + step] = torch.sort(scores, dim=0, descending=True, stable=True).indices
    return out


def _topk_ranking(q: torch.Tensor, db: torch.Tensor, dev: torch.device, k: int, chunk_size: int) -> torch.Tensor:
    """Running top-k over database chunks.

    Chunks are visited in increasing index order and the running list is placed before the new
    candidates, so a stable sort keeps lower indices first among equal scores.
    """
    n_q = q.shape[0]
    best_val = torch.empty((0, n_q), dtype=torch.float32, device=dev)
    best_idx = torch.empty((0, n_q), dtype=torch.int64, device=dev)
    for start in range(0, db.shape[0], chunk_size):
        chunk = db[start:start + chunk_size].to(dev, torch.float32)
        scores = chunk @ q.T                                             # (c, Q)
        take = min(k, scores.shape[0])
        val, idx = torch.sort(scores, dim=0, descending=True, stable=True)
        val, idx = val[:take], idx[:take] + start
        val = torch.cat([best_val, val])
        idx = torch.cat([best_idx, idx])
        order = torch.sort(val, dim=0, descending=True, stable=True).indices[:k]
        best_val = torch.gather(val, 0, order)
        best_idx = torch.gather(idx, 0, order)
    return best_idx
