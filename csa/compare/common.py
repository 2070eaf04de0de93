"""What every baseline re-ranker shares: checked inputs, row normalization, a fresh exact search.

A baseline has the signature of :func:`csa.rerank.rerank` minus the model::

    new_ranks = method(qvecs, dbvecs, ranks, **params)

``qvecs`` (Q, D) and ``dbvecs`` (N, D) are L2-normalized float rows, ``ranks`` is a ranking in the
revisitop layout (N or K, Q).  The result has the shape, kind (numpy / torch) and integer dtype of
``ranks``.
"""
from __future__ import annotations

from typing import Any, Callable

import numpy as np
import torch

from csa.search import first_stage
from csa.validation import as_tensor, check_descriptors, check_ranks

__all__ = ["Ranker", "baseline_inputs", "as_float_cpu", "normalize_rows", "search_again"]

#: A re-ranker: ``f(qvecs, dbvecs, ranks) -> ranks``.
Ranker = Callable[..., Any]


def as_float_cpu(x: Any) -> torch.Tensor:
    """``x`` as a float32 CPU tensor."""
    return as_tensor(x).detach().to("cpu", torch.float32)


def baseline_inputs(qvecs: Any, dbvecs: Any, ranks: Any, min_rows: int = 1
                    ) -> tuple[torch.Tensor, torch.Tensor, np.ndarray]:
    """Check the inputs; return float32 CPU tensors and the ranks as an int64 numpy array."""
    qvecs, dbvecs = check_descriptors(qvecs, dbvecs, normalize="warn")
    check_ranks(ranks, dbvecs.shape[0], qvecs.shape[0], min_rows=min_rows)
    r = ranks.detach().cpu().numpy() if isinstance(ranks, torch.Tensor) else np.asarray(ranks)
    return as_float_cpu(qvecs), as_float_cpu(dbvecs), r.astype(np.int64, copy=False)


def normalize_rows(x: torch.Tensor) -> torch.Tensor:
    """L2-normalize the rows of ``x`` (zero rows stay zero)."""
    return x / x.norm(dim=-1, keepdim=True).clamp_min(1e-12)


def search_again(qvecs: torch.Tensor, dbvecs: torch.Tensor, depth: int) -> np.ndarray:
    """Exact cosine ranking of the whole database, (depth, Q) int64 (ties by index); see
    :func:`csa.search.first_stage`.  Time O(Q N D), memory O(Q (depth + chunk))."""
    return first_stage(qvecs.numpy(), dbvecs.numpy(), topk=depth, normalize="silent")
