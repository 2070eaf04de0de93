"""The CSA paper's untrained baseline: re-rank the top-K by the cosine between affinity rows."""
from __future__ import annotations

from typing import Any

import numpy as np
import torch

from csa.affinity import _iter_affinity
from csa.compare.inputs import as_float_cpu, baseline_inputs, normalize_rows
from csa.arrays import as_tensor
from csa.search import rerank_depth, resort_topk
from csa.validation import CSAInputError, check_int

__all__ = ["affinity_cosine"]


def affinity_cosine(qvecs: Any, dbvecs: Any, ranks: Any, topk: int = 1024, anchor_len: int = 512,
                    centred: bool = False, query_batch: int = 8, *, chunk_size: int | None = None) -> Any:
    """The CSA paper's untrained baseline: cosine between affinity rows (Ouyang et al. NeurIPS 2021).

    Tokens are [query, top-``topk`` images], anchors [query, top ``anchor_len - 1`` images] of
    ``ranks[:, q]`` (as in :mod:`csa.affinity`); each token's affinity row holds its cosine
    similarities to the anchors.  Each candidate is scored by the cosine between its row and the
    query's row and the top-K is re-sorted by decreasing score (ties keep the first-stage order).
    ``centred=True`` subtracts each row's mean first (a Pearson correlation of the rows).

    Defaults ``topk = 1024, anchor_len = 512`` (the CSA test setting).  ``query_batch`` queries are
    scored together (``chunk_size`` is its former name, still accepted).
    Time O(Q K L D), memory O(query_batch · K · L).
    """
    if chunk_size is not None:
        if query_batch not in (8, chunk_size):
            raise CSAInputError(f"query_batch={query_batch!r} and chunk_size={chunk_size!r} name the same setting; "
                                f"pass only query_batch")
        query_batch = chunk_size
    q, db, r = baseline_inputs(qvecs, dbvecs, ranks)
    topk = check_int("topk", topk, 1, r.shape[0], hint=" (the number of rows of ranks)")
    anchor_len = check_int("anchor_len", anchor_len, 1, r.shape[0] + 1,
                            hint=" (query + anchor_len - 1 rows of ranks)")
    if not isinstance(centred, (bool, np.bool_)):
        raise CSAInputError(f"centred must be True or False, got {centred!r}")
    query_batch = check_int("query_batch", query_batch, 1)
    scores = np.zeros((r.shape[1], topk))
    top = as_tensor(r)[:rerank_depth(topk, anchor_len)].long()                # checked above: no second pass
    for query_slice, affinity in _iter_affinity(q.float(), db.float(), top, topk, anchor_len, query_batch):
        a = as_float_cpu(affinity).double()                              # (B, K+1, L)
        if centred:
            a = a - a.mean(dim=2, keepdim=True)
        a = normalize_rows(a)                                            # each affinity row
        scores[query_slice] = torch.einsum("bl,bkl->bk", a[:, 0], a[:, 1:]).numpy()
    return resort_topk(ranks, scores, topk)
