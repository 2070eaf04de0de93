"""The inputs and helpers every baseline re-ranker shares: checked inputs, row normalization, a fresh exact
search, and the readable name of a method.

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
from csa.arrays import as_cpu_tensor, as_numpy
from csa.validation import check_descriptors, check_ranks

__all__ = ["Ranker", "baseline_inputs", "as_float_cpu", "describe", "normalize_rows", "search_again"]

#: A re-ranker: ``f(qvecs, dbvecs, ranks) -> ranks``.
Ranker = Callable[..., Any]


def as_float_cpu(x: Any) -> torch.Tensor:
    """``x`` as a float32 CPU tensor (no copy when it already is one)."""
    return as_cpu_tensor(x).to(torch.float32)


def baseline_inputs(qvecs: Any, dbvecs: Any, ranks: Any) -> tuple[torch.Tensor, torch.Tensor, np.ndarray]:
    """Check the inputs; return float32 CPU tensors and the ranks as an int64 numpy array."""
    qvecs, dbvecs = check_descriptors(qvecs, dbvecs, normalize="warn")
    check_ranks(ranks, dbvecs.shape[0], qvecs.shape[0])
    return as_float_cpu(qvecs), as_float_cpu(dbvecs), as_numpy(ranks).astype(np.int64, copy=False)


def describe(method: Any) -> str:
    """A readable name-and-parameters string of a method: ``name(k=v, ...)`` for a ``functools.partial``
    (without device, batch_size and progress, which do not change the result; a function with a
    ``display_name`` attribute, such as CSA's wrapper, is shown by it), the name of a function, the ``repr``
    of anything else (a chain names each of its steps so)."""
    keywords = getattr(method, "keywords", None)
    if keywords is not None:
        shown = {k: v for k, v in keywords.items() if k not in ("device", "batch_size", "progress")}
        func = getattr(method, "func", method)
        name = getattr(func, "display_name", None) or getattr(func, "__name__", repr(func))
        return f"{name}({', '.join(f'{k}={v}' for k, v in shown.items())})"
    return getattr(method, "__name__", repr(method))


def normalize_rows(x: torch.Tensor) -> torch.Tensor:
    """L2-normalize the rows of ``x`` (zero rows stay zero)."""
    return x / x.norm(dim=-1, keepdim=True).clamp_min(1e-12)


def search_again(qvecs: torch.Tensor, dbvecs: torch.Tensor, depth: int) -> np.ndarray:
    """Exact cosine ranking of the whole database, (depth, Q) int64 (ties by index); see
    :func:`csa.search.first_stage`.  Time O(Q N D), memory O(Q (depth + chunk))."""
    return first_stage(qvecs.numpy(), dbvecs.numpy(), topk=depth, normalize="silent")
