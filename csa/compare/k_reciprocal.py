"""k-reciprocal re-ranking (Zhong et al., CVPR 2017) of each query's top-K."""
from __future__ import annotations

from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from csa.compare.inputs import baseline_inputs
from csa.search import resort_topk
from csa.validation import check_float, check_int

__all__ = ["k_reciprocal"]


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

    An adaptation of the authors' protocol: their script re-ranks transductively, with every query and
    the whole gallery in one distance matrix; here each query is re-ranked with only its own top-K, so a
    query never sees the other queries (the protocol of every other method here).

    Defaults from the paper: ``k1 = 20, k2 = 6, lambda = 0.3``; ``topk = 1024`` (the CSA test depth).
    Time O(Q K² (D + K)) (dense K x K set operations as matrix products), memory O(K²) per query.
    """
    q, db, r = baseline_inputs(qvecs, dbvecs, ranks)
    topk = check_int("topk", topk, 1, r.shape[0], hint=" (the number of rows of ranks)")
    k1 = check_int("k1", k1, 1, topk, hint=f" (only topk={topk} candidates + the query are compared)")
    k2 = check_int("k2", k2, 1, topk + 1, hint=f" (only topk + 1 = {topk + 1} items exist)")
    lambda_value = check_float("lambda_value", lambda_value, 0.0, 1.0)
    scores = np.zeros((r.shape[1], topk))
    for qi in tqdm(range(r.shape[1]), desc="k-reciprocal", disable=not progress):
        items = torch.cat([q[qi:qi + 1], db[torch.from_numpy(r[:topk, qi].copy())]])
        final = _k_reciprocal_distance(items, k1, k2, lambda_value)
        scores[qi] = -final
    return resort_topk(ranks, scores, topk)
