"""Diffusion re-ranking (Iscen, Tolias, Avrithis, Furon & Chum, CVPR 2017) on global descriptors.

Conventions of the authors' code (their MATLAB release and fyang93's Python port):

* the kNN graph is built once over the **whole database**; a node's ``k`` nearest neighbours include
  the node itself (so ``k = 50`` means 49 others), edges are kept only between mutual neighbours,
  with weights ``max(d_i·d_j, 0)^gamma`` and a zero diagonal;
* ``S = D^-1/2 W D^-1/2`` and ``(I - alpha S) f = y`` is solved by conjugate gradients (relative
  tolerance 1e-6, 20 iterations), ``y`` holding ``max(q·d_i, 0)^gamma`` on the query's ``query_k``
  nearest database images;
* truncation (``truncation=T``) takes the sub-graph of that database graph on the query's first T
  images and re-normalizes it (``trunclap``); without truncation the whole graph is used, as the authors
  do for global descriptors on the 5k/6k benchmarks.
"""
from __future__ import annotations

from typing import Any, Callable

import numpy as np
import scipy.sparse as sp
import torch
from tqdm import tqdm

from csa.compare.inputs import baseline_inputs
from csa.search import resort_topk, stable_topk
from csa.arrays import same_kind
from csa.validation import check_float, check_int

__all__ = ["diffusion", "mutual_knn_graph"]


def _conjugate_gradient(matvec: Callable[[np.ndarray], np.ndarray], b: np.ndarray, iterations: int,
                        tol: float = 1e-6) -> np.ndarray:
    """Solve A x = b for symmetric positive definite A: at most ``iterations`` CG steps from x0 = 0,
    stopping when the residual is below ``tol`` times ``||b||`` or at a breakdown (``p·Ap`` not positive
    and finite, e.g. underflowed to 0 once the residual is already tiny), keeping the iterate reached."""
    x = np.zeros_like(b)
    r = b.copy()
    p = r.copy()
    rs = float(r @ r)
    stop = tol * tol * max(rs, 1e-300)
    for _ in range(iterations):
        if not rs > stop:  # also stops on a nan residual
            break
        ap = matvec(p)
        curvature = float(p @ ap)
        if not (np.isfinite(curvature) and curvature > 0.0):
            break
        step = rs / curvature
        x += step * p
        r -= step * ap
        rs_new = float(r @ r)
        p = r + (rs_new / rs) * p
        rs = rs_new
    return x


def mutual_knn_graph(dbvecs: torch.Tensor, k: int, gamma: float, chunk_size: int = 1024) -> sp.csr_matrix:
    """Affinity matrix (N, N) of the database's mutual kNN graph: ``W[i, j] = max(d_i·d_j, 0)^gamma`` when
    i and j are among each other's ``k`` nearest neighbours (each list includes the node itself), 0 on the
    diagonal.  Computed in chunks of ``chunk_size`` rows: memory O(chunk_size · N + N k)."""
    n = dbvecs.shape[0]
    db = dbvecs.double()
    idx = np.empty((n, k), dtype=np.int64)
    sims = np.empty((n, k))
    for start in range(0, n, chunk_size):
        block = db[start:start + chunk_size] @ db.T
        rows = torch.arange(block.shape[0])
        block[rows, rows + start] = float("inf")          # the node itself first, even among duplicates
        val, nn = stable_topk(block, k, dim=1)
        val[:, 0] = (db[start:start + chunk_size] * db[start:start + chunk_size]).sum(1)
        idx[start:start + chunk_size], sims[start:start + chunk_size] = nn.numpy(), val.numpy()
    rows = np.repeat(np.arange(n), k)
    member = sp.csr_matrix((np.ones(n * k), (rows, idx.ravel())), shape=(n, n))
    mutual = member.multiply(member.T)
    weights = sp.csr_matrix((np.maximum(sims.ravel(), 0.0) ** gamma, (rows, idx.ravel())), shape=(n, n))
    graph = sp.csr_matrix(weights.multiply(mutual))
    graph.setdiag(0)
    graph.eliminate_zeros()
    return graph


def _transition(graph: sp.spmatrix) -> sp.csr_matrix:
    """``D^-1/2 W D^-1/2`` (isolated nodes stay isolated)."""
    degree = np.asarray(graph.sum(axis=1)).ravel()
    inv = np.zeros_like(degree)
    inv[degree > 0] = degree[degree > 0] ** -0.5
    d = sp.diags(inv)
    return sp.csr_matrix(d @ graph @ d)


def _diffuse(s: sp.spmatrix, y: np.ndarray, alpha: float, iterations: int, tol: float) -> np.ndarray:
    return _conjugate_gradient(lambda v: v - alpha * (s @ v), y, iterations, tol)


def _query_vector(q: torch.Tensor, nodes: torch.Tensor, query_k: int, gamma: float) -> np.ndarray:
    """``y``: ``max(q·d, 0)^gamma`` on the ``query_k`` nodes most similar to the query, 0 elsewhere."""
    sims = (nodes.double() @ q.double())
    top = stable_topk(sims[:, None], query_k, dim=0)[1][:, 0]
    y = np.zeros(nodes.shape[0])
    y[top.numpy()] = sims[top].clamp_min(0.0).pow(gamma).numpy()
    return y


def diffusion(qvecs: Any, dbvecs: Any, ranks: Any, k: int = 50, truncation: int | None = None,
              alpha: float = 0.99, gamma: float = 3.0, iterations: int = 20, query_k: int = 10,
              tol: float = 1e-6, progress: bool = False) -> Any:
    """Diffusion re-ranking with the authors' conventions (module docstring).

    Without ``truncation`` every database image gets a diffusion score and the result is the top of the
    new full ranking (as many rows as ``ranks``; ties by database index).  With ``truncation=T`` the
    query's first T images of ``ranks`` are re-sorted by their scores on the re-normalized sub-graph
    (ties keep the first-stage order) and rows T and beyond keep their order.

    Defaults of the authors' code for global descriptors: ``k = 50`` (the node itself included),
    ``alpha = 0.99, gamma = 3``, 20 CG iterations with tolerance 1e-6, ``query_k = 10``, no truncation.
    Time O(N² D) for the graph (once per call) + O(Q · iterations · N k); memory O(N k).
    """
    q, db, r = baseline_inputs(qvecs, dbvecs, ranks)
    n_db = db.shape[0]
    k = check_int("k", k, 1, n_db, hint=f" (the database has {n_db} images; k counts the node itself)")
    if truncation is not None:
        truncation = check_int("truncation", truncation, 2, r.shape[0],
                               hint=" (the number of rows of ranks; pass a deeper ranking or truncate less)")
    query_k = check_int("query_k", query_k, 1, truncation or n_db)
    alpha = check_float("alpha", alpha, 0.0, 1.0, high_open=True)
    gamma = check_float("gamma", gamma, 0.0)
    iterations = check_int("iterations", iterations, 1)
    tol = check_float("tol", tol, 0.0)
    graph = mutual_knn_graph(db, k, gamma)
    if truncation is None:
        s = _transition(graph)
        scores = np.stack([_diffuse(s, _query_vector(q[qi], db, query_k, gamma), alpha, iterations, tol)
                           for qi in tqdm(range(r.shape[1]), desc="diffusion", disable=not progress)], axis=1)
        order = stable_topk(torch.from_numpy(scores), r.shape[0], dim=0)[1]          # (rows, Q), ties by index
        return same_kind(order.numpy(), ranks)
    scores = np.zeros((r.shape[1], truncation))
    for qi in tqdm(range(r.shape[1]), desc="diffusion", disable=not progress):
        sub = r[:truncation, qi]
        s = _transition(graph[sub][:, sub])
        scores[qi] = _diffuse(s, _query_vector(q[qi], db[torch.from_numpy(sub)], query_k, gamma), alpha,
                              iterations, tol)
    return resort_topk(ranks, scores, truncation)
