"""Re-rank a first-stage ranking with a trained CSA model.

For each query the top-K of ``ranks[:, q]`` are re-sorted by descending model score (a stable
sort: equal scores keep the first-stage order); positions K and beyond are unchanged.

Speed: queries are processed ``batch_size`` at a time with one ``index_select`` gather and one
``bmm`` per batch, no Python loop per query.  Only the database rows referenced by the top
max(K, L-1) of some query are copied to the compute device, so a 1M-image database never has to
fit in GPU memory.

Precision: ``'fp32'`` (default, exact), ``'bf16'`` (the transformer runs under bfloat16
autocast; the affinity matrix, the final cosine and the sort stay float32), ``'auto'`` (bf16 on a
CUDA device that supports it, fp32 otherwise, e.g. on the CPU where bf16 is usually slower).
"""
from __future__ import annotations

from typing import Any, NamedTuple

import numpy as np
import torch
import torch.nn as nn
from tqdm import tqdm

from csa.affinity import query_affinity
from csa.device import resolve_device, resolve_precision
from csa.model import unwrap
from csa.search import rerank_depth, resort_topk
from csa.arrays import as_tensor
from csa.validation import CSAInputError, check_descriptors, check_int, check_ranks, check_topk

__all__ = ["rerank", "rerank_scores", "check_rerank_settings", "RerankRun"]


def rerank_scores(model: nn.Module, qvecs: Any, dbvecs: Any, ranks: Any, topk: int = 1024,
                  anchor_len: int = 512, batch_size: int = 8, device: str | torch.device | None = None,
                  precision: str = "fp32", progress: bool = True, normalize: str = "warn") -> Any:
    """Model scores (Q, K) of the top-K candidates of each query, in first-stage order.

    Same kind as ``ranks`` (numpy in -> numpy out; torch -> torch on ``ranks``' device).
    """
    qvecs, dbvecs = check_descriptors(qvecs, dbvecs, normalize=normalize)
    run = check_rerank_settings(model, qvecs.shape[0], dbvecs.shape[0], ranks, topk, anchor_len, batch_size, device,
                                precision)
    scores = _score_topk(model, qvecs, dbvecs, ranks, topk, anchor_len, run, progress)
    return scores.cpu().numpy() if isinstance(ranks, np.ndarray) else scores.to(ranks.device)


def rerank(model: nn.Module, qvecs: Any, dbvecs: Any, ranks: Any, topk: int = 1024, anchor_len: int = 512,
           batch_size: int = 8, device: str | torch.device | None = None, precision: str = "fp32",
           progress: bool = True, normalize: str = "warn") -> Any:
    """Return a new ranking (same layout, kind and dtype as ``ranks``) with each top-K re-sorted by CSA.

    ``qvecs`` (Q, D), ``dbvecs`` (N, D): L2-normalized descriptors (see
    :func:`csa.validation.check_descriptors` for ``normalize``); ``ranks`` (N or >= max(K, L-1), Q), see
    :func:`csa.search.rerank_depth`.  ``topk`` is K, the number of candidates re-sorted per query (in
    :func:`csa.search.first_stage` ``topk`` is instead the length of the first-stage lists).
    ``anchor_len`` must equal the model's.  ``device`` defaults to the model's device.
    """
    qvecs, dbvecs = check_descriptors(qvecs, dbvecs, normalize=normalize)
    run = check_rerank_settings(model, qvecs.shape[0], dbvecs.shape[0], ranks, topk, anchor_len, batch_size, device,
                                precision)
    return _rerank(model, qvecs, dbvecs, ranks, topk, anchor_len, run, progress)


class RerankRun(NamedTuple):
    """Checked settings of a re-ranking: queries per batch, the compute device and the autocast dtype
    (None: float32), resolved once."""

    batch_size: int
    device: torch.device
    amp_dtype: torch.dtype | None


def check_rerank_settings(model: nn.Module, n_q: int, n_db: int, ranks: Any, topk: int, anchor_len: int,
                          batch_size: int, device: str | torch.device | None, precision: str) -> RerankRun:
    """Check everything but the descriptors (K, L against the model, the ranking's used rows, the batch size,
    device and precision) for ``n_q`` queries over ``n_db`` images; resolve device and precision once."""
    check_topk(topk, anchor_len, n_db)
    model_len = int(unwrap(model).anchor_len)
    if anchor_len != model_len:
        raise CSAInputError(f"anchor_len={anchor_len} but the model was built for anchor_len={model_len}; "
                            f"pass anchor_len={model_len} (L is fixed by the trained weights)")
    m = rerank_depth(topk, anchor_len)
    check_ranks(ranks, n_db, n_q, min_rows=m, prefix=m)
    batch_size = check_int("batch_size", batch_size, 1)
    try:
        model_device = next(model.parameters()).device
    except StopIteration:
        model_device = torch.device("cpu")
    dev = resolve_device(device) if device is not None else model_device
    amp_dtype = resolve_precision(precision, dev)
    if model_device != dev:
        raise CSAInputError(f"the model is on {model_device} but device={dev}; move it with model.to({str(dev)!r})")
    return RerankRun(batch_size, dev, amp_dtype)


def _rerank(model: nn.Module, qvecs: Any, dbvecs: Any, ranks: Any, topk: int, anchor_len: int, run: RerankRun,
            progress: bool = True) -> Any:
    """:func:`rerank` on checked descriptors and settings (the kernel the package's callers use)."""
    return resort_topk(ranks, _score_topk(model, qvecs, dbvecs, ranks, topk, anchor_len, run, progress), topk)


@torch.inference_mode()
def _score_topk(model: nn.Module, qvecs: Any, dbvecs: Any, ranks: Any, topk: int, anchor_len: int, run: RerankRun,
                progress: bool) -> torch.Tensor:
    """Checked inputs -> scores (Q, K) float32 on the compute device."""
    net = unwrap(model)
    n_q, dev, amp_dtype, batch_size = qvecs.shape[0], run.device, run.amp_dtype, run.batch_size
    m = rerank_depth(topk, anchor_len)
    r = as_tensor(ranks).long()
    # Only database rows used as tokens/anchors go to the device; neighbours are re-indexed into them.
    used, local = torch.unique(r[:m].to(dev), return_inverse=True)      # local: (M, Q)
    db = as_tensor(dbvecs)
    if used.numel() < db.shape[0]:
        db = db.index_select(0, used.to(db.device))
    db_used = db.to(dev, torch.float32)  # no copy when a compact database (every row used) is already there
    q = as_tensor(qvecs).to(dev, torch.float32)
    neighbours = local.T.contiguous()                                     # (Q, M)

    was_training = net.training
    net.eval()
    scores = torch.empty((n_q, topk), dtype=torch.float32, device=dev)
    try:
        for s in tqdm(range(0, n_q, batch_size), desc="CSA re-ranking", unit="batch", disable=not progress):
            e = min(s + batch_size, n_q)
            aff = query_affinity(q[s:e], db_used, neighbours[s:e], topk, anchor_len)
            with torch.autocast(device_type=dev.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
                scores[s:e] = net.score(aff).float()
    finally:
        net.train(was_training)
    return scores
