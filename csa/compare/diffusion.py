"""Diffusion re-ranking (Iscen et al., CVPR 2017) on global descriptors."""
from __future__ import annotations

import math
from typing import Any, Callable

import numpy as np
import torch
from tqdm import tqdm

from csa.compare.common import baseline_inputs
from csa.search import resort_topk
from csa.validation import check_float, check_int

__all__ = ["diffusion"]


def _conjugate_gradient(matvec: Callable[[np.ndarray], np.ndarray], b: np.ndarray, iterations: int,
                        tol: float = 1e-10) -> np.ndarray:
    """Solve A x = b for symmetric positive definite A with at most ``iterations`` CG steps (x0 = 0)."""
    x = np.zeros_like(b)
    r = b.copy()
    p = r.copy()
    rs = float(r @ r)
    stop = tol * tol * max(rs, 1e-300)
    for _ in range(iterations):
        if rs <= stop:
            break
        ap = matvec(p)
        step = rs / float(p @ ap)
        x += step * p
        r -= step * ap
        rs_new = float(r @ r)
        p = r + (rs_new / rs) * p
        rs = rs_new
    return x


def diffusion(qvecs: Any, dbvecs: Any, ranks: Any, k: int = 50, truncation: int = 1000,
              alpha: float = 0.99, gamma: float = 3.0, iterations: int = 20, query_k: int = 10,
              progress: bool = False) -> Any:
    """Diffusion re-ranking (Iscen, Tolias, Avrithis, Furon & Chum, CVPR 2017), global descriptors.

    Per query, on its truncated neighbourhood T = the first ``truncation`` images of ``ranks[:, q]``:
    a kNN graph (each node's ``k`` nearest other nodes of T), affinities ``a_ij = max(d_i·d_j, 0)^gamma``
    kept only for reciprocal (mutual) neighbours, symmetric normalization ``S = D^-1/2 A D^-1/2``,
    and ``(I - alpha S) f = y`` solved by ``iterations`` conjugate-gradient steps, where ``y`` holds
    ``max(q·d_i, 0)^gamma`` on the query's ``query_k`` first images of T and 0 elsewhere.  T is
    re-sorted by decreasing ``f`` (nodes the diffusion does not reach keep their order after the
    reached ones); images past ``truncation`` keep their order.

    Defaults as in the paper / its public code: ``k = 50, truncation = 1000, alpha = 0.99,
    gamma = 3, 20 CG iterations, query_k = 10``.  The graph is built per query on T (no offline
    database graph): time O(Q T² D), memory O(T² + T D) per query.
    """
    q, db, r = baseline_inputs(qvecs, dbvecs, ranks)
    truncation = check_int("truncation", truncation, 2, r.shape[0],
                            hint=" (the number of rows of ranks; pass a deeper ranking or truncate less)")
    k = check_int("k", k, 1, truncation - 1, hint=f" (each of the truncation={truncation} nodes has "
                                                  f"{truncation - 1} others)")
    query_k = check_int("query_k", query_k, 1, truncation)
    alpha = check_float("alpha", alpha, 0.0, 1.0, high_open=True)
    gamma = check_float("gamma", gamma, 0.0)
    iterations = check_int("iterations", iterations, 1)
    scores = np.zeros((r.shape[1], truncation))
    for qi in tqdm(range(r.shape[1]), desc="diffusion", disable=not progress):
        idx = torch.from_numpy(r[:truncation, qi].copy())
        x = db[idx]                                                    # (T, D)
        sims = (x @ x.T).double()
        sims.fill_diagonal_(-math.inf)
        nn = torch.topk(sims, k, dim=1).indices
        knn = torch.zeros(truncation, truncation, dtype=torch.bool)
        knn.scatter_(1, nn, True)
        mutual = knn & knn.T
        affinity = torch.where(mutual, sims.clamp_min(0.0).pow(gamma), torch.zeros((), dtype=sims.dtype))
        degree = affinity.sum(dim=1)
        inv_sqrt = torch.where(degree > 0, degree.clamp_min(1e-300).rsqrt(), torch.zeros_like(degree))
        s_norm = (inv_sqrt[:, None] * affinity * inv_sqrt[None, :]).numpy()
        y = np.zeros(truncation)
        y[:query_k] = (x[:query_k] @ q[qi]).double().clamp_min(0.0).pow(gamma).numpy()
        f = _conjugate_gradient(lambda v: v - alpha * (s_norm @ v), y, iterations)
        scores[qi] = f
    return resort_topk(ranks, scores, truncation)
