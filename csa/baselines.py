"""Classic visual re-rankers under one interface, for comparison with CSA.

Every method has the signature of :func:`csa.rerank.rerank` minus the model::

    new_ranks = method(qvecs, dbvecs, ranks, **params)

``qvecs`` (Q, D) and ``dbvecs`` (N, D) are L2-normalized float rows, ``ranks`` is a ranking in the
revisitop layout (N or K, Q) (``ranks[:, q]`` is query q's database order).  The result has the
same shape as ``ranks`` and the same kind (numpy in -> numpy out, torch in -> torch out, same
integer dtype).

Two families:

* **top-K re-rankers** (:func:`diffusion`, :func:`k_reciprocal`, :func:`affinity_cosine`) reorder
  only the first K rows of ``ranks``; rows K and beyond keep their first-stage order.
* **re-querying methods** (:func:`aqe`, :func:`alpha_qe`, :func:`dba`, :func:`alpha_dba`) build new
  query (or database) descriptors and search the *whole database* again by exact cosine
  similarity; the result keeps as many rows as ``ranks`` had (the top of the new full ranking).

Chains such as αDBA then αQE, or αQE then CSA, are built with :func:`compose`.
Nothing here materializes an N x N matrix: database-side work is chunked, per-query work is
bounded by the re-ranking depth.  Each docstring states time and memory scaling.
"""
from __future__ import annotations

import math
from typing import Any, Callable

import numpy as np
import torch
from tqdm import tqdm

from csa.affinity import iter_affinity
from csa.search import first_stage
from csa.validation import CSAInputError, check_descriptors, check_ranks

__all__ = [
    "aqe",
    "alpha_qe",
    "dba",
    "alpha_dba",
    "augment_database",
    "AugmentDatabase",
    "diffusion",
    "k_reciprocal",
    "affinity_cosine",
    "compose",
]

Ranker = Callable[..., Any]


# ----------------------------------------------------------------------------------------------
# shared helpers
# ----------------------------------------------------------------------------------------------
def _check_int(name: str, value: Any, low: int, high: int | None = None, hint: str = "") -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise CSAInputError(f"{name} must be an integer, got {value!r}")
    value = int(value)
    if value < low:
        raise CSAInputError(f"{name} must be >= {low}, got {value}{hint}")
    if high is not None and value > high:
        raise CSAInputError(f"{name}={value} is too large: it must be <= {high}{hint}")
    return value


def _check_float(name: str, value: Any, low: float, high: float | None = None,
                 low_open: bool = False, high_open: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise CSAInputError(f"{name} must be a number, got {value!r}")
    value = float(value)
    if not math.isfinite(value):
        raise CSAInputError(f"{name} must be finite, got {value}")
    if value < low or (low_open and value == low):
        raise CSAInputError(f"{name} must be {'>' if low_open else '>='} {low}, got {value}")
    if high is not None and (value > high or (high_open and value == high)):
        raise CSAInputError(f"{name} must be {'<' if high_open else '<='} {high}, got {value}")
    return value


def _as_tensor(x: Any) -> torch.Tensor:
    t = x if isinstance(x, torch.Tensor) else torch.from_numpy(np.asarray(x))
    return t.detach().to("cpu", torch.float32)


def _prepare(qvecs: Any, dbvecs: Any, ranks: Any, min_rows: int = 1
             ) -> tuple[torch.Tensor, torch.Tensor, np.ndarray]:
    """Validate inputs; return float32 CPU tensors and the ranks as an int64 numpy array."""
    qvecs, dbvecs = check_descriptors(qvecs, dbvecs, normalize="warn")
    check_ranks(ranks, dbvecs.shape[0], qvecs.shape[0], min_rows=min_rows)
    r = ranks.detach().cpu().numpy() if isinstance(ranks, torch.Tensor) else np.asarray(ranks)
    return _as_tensor(qvecs), _as_tensor(dbvecs), r.astype(np.int64, copy=False)


def _like(new_ranks: np.ndarray, ranks: Any) -> Any:
    """Return ``new_ranks`` as the same kind (numpy/torch), dtype and device as ``ranks``."""
    if isinstance(ranks, torch.Tensor):
        return torch.from_numpy(np.ascontiguousarray(new_ranks)).to(device=ranks.device, dtype=ranks.dtype)
    return np.ascontiguousarray(new_ranks).astype(ranks.dtype, copy=False)


def _normalize_rows(x: torch.Tensor) -> torch.Tensor:
    return x / x.norm(dim=-1, keepdim=True).clamp_min(1e-12)


def _reorder_top(ranks: np.ndarray, q: int, depth: int, scores: np.ndarray, out: np.ndarray) -> None:
    """Write into ``out[:depth, q]`` the first ``depth`` entries of ``ranks[:, q]`` sorted by
    decreasing ``scores`` (ties keep the first-stage order)."""
    order = np.argsort(-scores, kind="stable")
    out[:depth, q] = ranks[:depth, q][order]


def _search(qvecs: torch.Tensor, dbvecs: torch.Tensor, depth: int) -> np.ndarray:
    """Exact cosine ranking of the whole database, (depth, Q) int64 (ties by index); see
    :func:`csa.search.first_stage`.  Time O(Q N D), memory O(Q (depth + chunk))."""
    return first_stage(qvecs.numpy(), dbvecs.numpy(), topk=depth, normalize="silent")


# ----------------------------------------------------------------------------------------------
# query expansion
# ----------------------------------------------------------------------------------------------
def alpha_qe(qvecs: Any, dbvecs: Any, ranks: Any, n: int = 50, alpha: float = 3.0) -> Any:
    """α-weighted query expansion (αQE), Radenović, Tolias & Chum, TPAMI 2018.

    The new query is ``normalize(q + sum_{i=1..n} max(q·d_i, 0)^alpha d_i)`` over the top ``n``
    database images of ``ranks[:, q]`` (the query itself has weight 1, as its similarity to
    itself is 1); the whole database is then searched again with it.  ``alpha = 0`` gives average
    query expansion (:func:`aqe`).  Similarities are clipped at 0 before the power so that a
    non-integer ``alpha`` is defined (for ``alpha = 0`` every weight stays 1).
    ``n = 0`` means no expansion: ``ranks`` is returned unchanged.

    Defaults ``n = 50, alpha = 3`` as used with GeM descriptors by Radenović et al. (2018).
    Re-queries the whole database: time O(Q N D + Q N log N), memory O(Q n D + N · chunk).
    Returns as many rows as ``ranks`` has.
    """
    q, db, r = _prepare(qvecs, dbvecs, ranks)
    n = _check_int("n", n, 0, r.shape[0],
                   hint=f" (the number of rows of ranks; pass a deeper ranking or a smaller n)")
    alpha = _check_float("alpha", alpha, 0.0)
    if n == 0:
        return _like(r.copy(), ranks)
    neighbours = db[torch.from_numpy(r[:n].T.copy())]               # (Q, n, D)
    sims = torch.einsum("qnd,qd->qn", neighbours, q)
    weights = sims.clamp_min(0.0).pow(alpha)                         # 0 ** 0 == 1
    expanded = _normalize_rows(q + torch.einsum("qn,qnd->qd", weights, neighbours))
    return _like(_search(expanded, db, depth=r.shape[0]), ranks)


def aqe(qvecs: Any, dbvecs: Any, ranks: Any, n: int = 2) -> Any:
    """Average query expansion (AQE), Chum et al. ICCV 2007, in the global-descriptor form used by
    Radenović et al. (TPAMI 2018): the new query is ``normalize(q + sum_{i=1..n} d_i)`` over the
    top ``n`` images of ``ranks[:, q]``, and the whole database is searched again.

    Default ``n = 2``.  ``n = 0`` returns ``ranks`` unchanged.  Same cost as :func:`alpha_qe`.
    """
    return alpha_qe(qvecs, dbvecs, ranks, n=n, alpha=0.0)


# ----------------------------------------------------------------------------------------------
# database-side augmentation
# ----------------------------------------------------------------------------------------------
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
    db_t = _as_tensor(dbvecs)
    if db_t.ndim != 2:
        raise CSAInputError(f"dbvecs must be 2-D (N, D), got shape {tuple(db_t.shape)}")
    n_db = db_t.shape[0]
    n = _check_int("n", n, 0, n_db - 1, hint=f" (the database has {n_db} images, so at most {n_db - 1} others)")
    alpha = _check_float("alpha", alpha, 0.0)
    chunk_size = _check_int("chunk_size", chunk_size, 1)
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
        out = _normalize_rows(out)
    return out if isinstance(dbvecs, torch.Tensor) else out.numpy()


class AugmentDatabase:
    """A :func:`compose` step that replaces the database by its (α)DBA-augmented version and
    searches it again (the following steps then see the augmented database)."""

    def __init__(self, n: int = 50, alpha: float = 3.0, chunk_size: int = 1024, progress: bool = False):
        self.n, self.alpha, self.chunk_size, self.progress = n, alpha, chunk_size, progress

    def __call__(self, dbvecs: Any) -> Any:
        return augment_database(dbvecs, self.n, self.alpha, self.chunk_size, self.progress)

    def __repr__(self) -> str:
        return f"AugmentDatabase(n={self.n}, alpha={self.alpha})"


def alpha_dba(qvecs: Any, dbvecs: Any, ranks: Any, n: int = 50, alpha: float = 3.0,
              chunk_size: int = 1024, progress: bool = False) -> Any:
    """αDBA (Radenović et al. TPAMI 2018): augment the database with :func:`augment_database`
    (weights ``sim^alpha``, the image itself weight 1) and rank it again with the original queries.

    Defaults ``n = 50, alpha = 3`` (mirroring αQE).  ``ranks`` only fixes the number of output rows.
    Time O(N² D) for the augmentation (offline in practice) + O(Q N D) for the search; memory
    O(chunk_size · N).  Follow it by αQE with ``compose(AugmentDatabase(...), alpha_qe)``.
    """
    q, db, r = _prepare(qvecs, dbvecs, ranks)
    augmented = augment_database(db, n, alpha, chunk_size, progress)
    return _like(_search(q, augmented, depth=r.shape[0]), ranks)


def dba(qvecs: Any, dbvecs: Any, ranks: Any, n: int = 2, chunk_size: int = 1024,
        progress: bool = False) -> Any:
    """Database-side augmentation with equal weights (DBA; Arandjelović & Zisserman CVPR 2012,
    Gordo et al. IJCV 2017): each database vector becomes ``normalize(d_j + sum of its n nearest
    other database vectors)``, then the database is ranked again.  Default ``n = 2``.
    Cost as :func:`alpha_dba`.
    """
    return alpha_dba(qvecs, dbvecs, ranks, n=n, alpha=0.0, chunk_size=chunk_size, progress=progress)


# ----------------------------------------------------------------------------------------------
# diffusion
# ----------------------------------------------------------------------------------------------
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
    q, db, r = _prepare(qvecs, dbvecs, ranks)
    truncation = _check_int("truncation", truncation, 2, r.shape[0],
                            hint=" (the number of rows of ranks; pass a deeper ranking or truncate less)")
    k = _check_int("k", k, 1, truncation - 1, hint=f" (each of the truncation={truncation} nodes has "
                                                  f"{truncation - 1} others)")
    query_k = _check_int("query_k", query_k, 1, truncation)
    alpha = _check_float("alpha", alpha, 0.0, 1.0, high_open=True)
    gamma = _check_float("gamma", gamma, 0.0)
    iterations = _check_int("iterations", iterations, 1)
    out = r.copy()
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
        _reorder_top(r, qi, truncation, f, out)
    return _like(out, ranks)


# ----------------------------------------------------------------------------------------------
# k-reciprocal
# ----------------------------------------------------------------------------------------------
def _k_reciprocal_distance(x: torch.Tensor, k1: int, k2: int, lambda_value: float) -> np.ndarray:
    """Final k-reciprocal distance of item 0 (the query) to items 1..M-1 of ``x`` (M, D)."""
    m = x.shape[0]
    sims = (x @ x.T).double()
    dist = (2.0 - 2.0 * sims).clamp_min(0.0)                           # squared Euclidean distance
    dist = dist / dist.max(dim=1, keepdim=True).values.clamp_min(1e-12)  # each row scaled to max 1
    rank = torch.sort(dist, dim=1, stable=True).indices
    rows = torch.arange(m)[:, None]

    def reciprocal(depth: int) -> torch.Tensor:
        near = torch.zeros(m, m, dtype=torch.bool)
        near[rows, rank[:, :depth + 1]] = True                        # the depth+1 nearest, self included
        return near & near.T

    recip = reciprocal(k1)                                             # R(i, k1)
    recip_half = reciprocal(int(round(k1 / 2)))                        # R(j, k1/2)
    rf, hf = recip.float(), recip_half.float()
    overlap = hf @ rf.T                                                # overlap[j, i] = |R(j,k1/2) ∩ R(i,k1)|
    size_half = hf.sum(dim=1)
    # candidate j in R(i, k1) brings its R(j, k1/2) when more than 2/3 of it lies in R(i, k1)
    accept = recip & (overlap.T > (2.0 / 3.0) * size_half[None, :])
    expanded = recip | ((accept.float() @ hf) > 0)
    weights = torch.where(expanded, torch.exp(-dist), torch.zeros((), dtype=dist.dtype))
    v = weights / weights.sum(dim=1, keepdim=True)
    if k2 > 1:                                                         # local query expansion
        v = v[rank[:, :k2]].mean(dim=1)
    overlap_min = torch.minimum(v[0][None, :], v).sum(dim=1)
    jaccard = 1.0 - overlap_min / (2.0 - overlap_min)
    final = (1.0 - lambda_value) * jaccard + lambda_value * dist[0]
    return final[1:].numpy()


def k_reciprocal(qvecs: Any, dbvecs: Any, ranks: Any, k1: int = 20, k2: int = 6,
                 lambda_value: float = 0.3, topk: int = 1024, progress: bool = False) -> Any:
    """k-reciprocal re-ranking (Zhong, Zheng, Cao & Li, CVPR 2017), on the query + its top-K.

    Per query the item set is [query, first ``topk`` images of ``ranks[:, q]``] with squared
    Euclidean distances ``2 - 2 cos`` (each row divided by its maximum, as in the authors' code).
    For each item: its k-reciprocal set R(i, k1); every j in it whose R(j, k1/2) overlaps R(i, k1) in
    more than 2/3 of its members adds R(j, k1/2); the expanded set is encoded with Gaussian-kernel
    weights ``exp(-d)`` normalized to sum 1; local query expansion averages the encodings of the
    ``k2`` nearest items; the Jaccard distance ``1 - sum min / sum max`` to the query is mixed as
    ``(1 - lambda) * Jaccard + lambda * d``.  The top-K is re-sorted by increasing final distance.

    Defaults from the paper: ``k1 = 20, k2 = 6, lambda = 0.3``; ``topk = 1024`` (the CSA test depth).
    Time O(Q K² (D + K)) (dense K x K set operations as matrix products), memory O(K²) per query.
    """
    q, db, r = _prepare(qvecs, dbvecs, ranks)
    topk = _check_int("topk", topk, 1, r.shape[0], hint=" (the number of rows of ranks)")
    k1 = _check_int("k1", k1, 1, topk, hint=f" (only topk={topk} candidates + the query are compared)")
    k2 = _check_int("k2", k2, 1, topk + 1, hint=f" (only topk + 1 = {topk + 1} items exist)")
    lambda_value = _check_float("lambda_value", lambda_value, 0.0, 1.0)
    out = r.copy()
    for qi in tqdm(range(r.shape[1]), desc="k-reciprocal", disable=not progress):
        items = torch.cat([q[qi:qi + 1], db[torch.from_numpy(r[:topk, qi].copy())]])
        final = _k_reciprocal_distance(items, k1, k2, lambda_value)
        _reorder_top(r, qi, topk, -final, out)
    return _like(out, ranks)


# ----------------------------------------------------------------------------------------------
# untrained affinity baseline of the CSA paper
# ----------------------------------------------------------------------------------------------
def affinity_cosine(qvecs: Any, dbvecs: Any, ranks: Any, topk: int = 1024, anchor_len: int = 512,
                    centred: bool = False, chunk_size: int = 8) -> Any:
    """The CSA paper's untrained baseline: cosine between affinity rows (Ouyang et al. NeurIPS 2021).

    Tokens are [query, top-``topk`` images], anchors [query, top ``anchor_len - 1`` images] of
    ``ranks[:, q]`` (as in :mod:`csa.affinity`); each token's affinity row holds its cosine
    similarities to the anchors.  Each candidate is scored by the cosine between its row and the
    query's row and the top-K is re-sorted by decreasing score (ties keep the first-stage order).
    ``centred=True`` subtracts each row's mean first (a Pearson correlation of the rows).

    Defaults ``topk = 1024, anchor_len = 512`` (the CSA test setting).
    Time O(Q K L D), memory O(chunk_size · K · L).
    """
    q, db, r = _prepare(qvecs, dbvecs, ranks)
    topk = _check_int("topk", topk, 1, r.shape[0], hint=" (the number of rows of ranks)")
    anchor_len = _check_int("anchor_len", anchor_len, 1, r.shape[0] + 1,
                            hint=" (query + anchor_len - 1 rows of ranks)")
    if not isinstance(centred, (bool, np.bool_)):
        raise CSAInputError(f"centred must be True or False, got {centred!r}")
    chunk_size = _check_int("chunk_size", chunk_size, 1)
    out = r.copy()
    for query_slice, affinity in iter_affinity(q, db, r, topk, anchor_len, batch_size=chunk_size,
                                               normalize="silent"):
        a = _as_tensor(affinity).double()                              # (B, K+1, L)
        if centred:
            a = a - a.mean(dim=2, keepdim=True)
        a = a / a.norm(dim=2, keepdim=True).clamp_min(1e-12)
        scores = torch.einsum("bl,bkl->bk", a[:, 0], a[:, 1:]).numpy()
        for row, qi in enumerate(range(r.shape[1])[query_slice]):
            _reorder_top(r, qi, topk, scores[row], out)
    return _like(out, ranks)


# ----------------------------------------------------------------------------------------------
# chaining
# ----------------------------------------------------------------------------------------------
def compose(*steps: Ranker | AugmentDatabase) -> Ranker:
    """Chain re-rankers: ``compose(a, b)(qvecs, dbvecs, ranks) == b(qvecs, dbvecs, a(qvecs, dbvecs, ranks))``.

    A step is either a ranker ``f(qvecs, dbvecs, ranks) -> ranks`` (use ``functools.partial`` or a
    lambda to fix its parameters) or an :class:`AugmentDatabase`, which replaces the database by its
    augmented version for all following steps and ranks it again (αDBA).  Examples::

        compose(AugmentDatabase(n=50, alpha=3), alpha_qe)             # αDBA + αQE
        compose(alpha_qe, lambda q, d, r: rerank(model, q, d, r))      # αQE then CSA (GSS+CSA row)
        compose(diffusion, lambda q, d, r: rerank(model, q, d, r))     # DFS+CSA row
    """
    if not steps:
        raise CSAInputError("compose needs at least one step")
    for i, step in enumerate(steps):
        if not callable(step):
            raise CSAInputError(f"compose step {i} is not callable: {step!r}")

    def chained(qvecs: Any, dbvecs: Any, ranks: Any) -> Any:
        for step in steps:
            if isinstance(step, AugmentDatabase):
                q, db, r = _prepare(qvecs, dbvecs, ranks)
                dbvecs = step(dbvecs)
                ranks = _like(_search(q, _as_tensor(dbvecs), depth=r.shape[0]), ranks)
            else:
                ranks = step(qvecs, dbvecs, ranks)
        return ranks

    chained.__name__ = " + ".join(getattr(s, "__name__", repr(s)) for s in steps)
    chained.steps = steps  # type: ignore[attr-defined]
    return chained
