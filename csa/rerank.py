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

from typing import Any

import numpy as np
import torch
import torch.nn as nn
from tqdm import tqdm

from .affinity import affinity_batch
from .validation import CSAInputError, check_descriptors, check_ranks, check_topk

__all__ = ["rerank", "rerank_scores", "resolve_precision"]


def cpu_has_native_bf16() -> bool:
    """True when the CPU has bf16 matrix instructions (AVX512-BF16 or AMX-BF16), read from /proc/cpuinfo."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line for line in f if line.startswith("flags")), "").split()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def resolve_precision(precision: str, device: torch.device) -> torch.dtype | None:
    """Autocast dtype for ``precision`` on ``device`` (None = plain float32).

    ``'auto'`` picks bf16 only where it was measured to be both faster and as accurate
    (benchmarks/precision.py: 2.07x faster, mAP changes of at most 0.14 points on the demo checkpoints, on a CPU with
    AVX512-BF16): CUDA devices that support bf16 and CPUs with native bf16 instructions; fp32 elsewhere.
    """
    if precision == "fp32":
        return None
    if precision == "bf16":
        return torch.bfloat16
    if precision == "auto":
        if device.type == "cuda" and torch.cuda.is_available() and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        if device.type == "cpu" and cpu_has_native_bf16():
            return torch.bfloat16
        return None
    raise CSAInputError(f"precision must be 'fp32', 'bf16' or 'auto', got {precision!r}")


def _model_anchor_len(model: nn.Module) -> int:
    inner = model.module if hasattr(model, "module") else model
    if hasattr(inner, "anchor_len"):
        return int(inner.anchor_len)
    return int(inner.topk_proj.in_features)


def _as_tensor(x: Any) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(x)) if isinstance(x, np.ndarray) else x


def rerank_scores(model: nn.Module, qvecs: Any, dbvecs: Any, ranks: Any, topk: int = 1024,
                  anchor_len: int = 512, batch_size: int = 8, device: str | torch.device | None = None,
                  precision: str = "fp32", progress: bool = True, normalize: str = "warn") -> Any:
    """Model scores (Q, K) of the top-K candidates of each query, in first-stage order.

    Same kind as ``ranks`` (numpy in -> numpy out; torch -> torch on ``ranks``' device).
    """
    scores, _ = _run(model, qvecs, dbvecs, ranks, topk, anchor_len, batch_size, device, precision, progress,
                     normalize)
    return scores.cpu().numpy() if isinstance(ranks, np.ndarray) else scores.to(ranks.device)


def rerank(model: nn.Module, qvecs: Any, dbvecs: Any, ranks: Any, topk: int = 1024, anchor_len: int = 512,
           batch_size: int = 8, device: str | torch.device | None = None, precision: str = "fp32",
           progress: bool = True, normalize: str = "warn") -> Any:
    """Return a new ranking (same layout, kind and dtype as ``ranks``) with each top-K re-sorted by CSA.

    ``qvecs`` (Q, D), ``dbvecs`` (N, D): L2-normalized descriptors (see
    :func:`csa.validation.check_descriptors` for ``normalize``); ``ranks`` (N or >= max(K, L-1), Q).
    ``anchor_len`` must equal the model's.  ``device`` defaults to the model's device.
    """
    scores, r = _run(model, qvecs, dbvecs, ranks, topk, anchor_len, batch_size, device, precision, progress,
                     normalize)
    top = r[:topk].to(scores.device)                                       # (K, Q)
    order = torch.sort(scores, dim=1, descending=True, stable=True).indices  # (Q, K)
    new_top = torch.gather(top, 0, order.T)
    if isinstance(ranks, np.ndarray):
        out = ranks.copy()
        out[:topk] = new_top.cpu().numpy().astype(ranks.dtype, copy=False)
    else:
        out = ranks.clone()
        out[:topk] = new_top.to(ranks.device, ranks.dtype)
    return out


@torch.inference_mode()
def _run(model, qvecs, dbvecs, ranks, topk, anchor_len, batch_size, device, precision, progress, normalize):
    qvecs, dbvecs = check_descriptors(qvecs, dbvecs, normalize=normalize)
    n_db, n_q = dbvecs.shape[0], qvecs.shape[0]
    check_topk(topk, anchor_len, n_db)
    model_len = _model_anchor_len(model)
    if anchor_len != model_len:
        raise CSAInputError(f"anchor_len={anchor_len} but the model was built for anchor_len={model_len}; "
                            f"pass anchor_len={model_len} (L is fixed by the trained weights)")
    m = max(topk, anchor_len - 1)
    check_ranks(ranks, n_db, n_q, min_rows=m)
    if isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
        raise CSAInputError(f"batch_size must be a positive integer, got {batch_size!r}")
    try:
        param = next(model.parameters())
        model_device = param.device
    except StopIteration:
        model_device = torch.device("cpu")
    dev = torch.device(device) if device is not None else model_device
    amp_dtype = resolve_precision(precision, dev)

    if model_device != dev:
        raise CSAInputError(f"the model is on {model_device} but device={dev}; move it with model.to({str(dev)!r})")
    r = _as_tensor(ranks).long()
    # Only database rows used as tokens/anchors go to the device; neighbours are re-indexed into them.
    used, local = torch.unique(r[:m].to(dev), return_inverse=True)      # local: (M, Q)
    db = _as_tensor(dbvecs)
    db_used = db.index_select(0, used.to(db.device)).to(dev, torch.float32)
    q = _as_tensor(qvecs).to(dev, torch.float32)
    neighbours = local.T.contiguous()                                     # (Q, M)

    was_training = model.training
    model.eval()
    scores = torch.empty((n_q, topk), dtype=torch.float32, device=dev)
    try:
        for s in tqdm(range(0, n_q, batch_size), desc="CSA re-ranking", unit="batch", disable=not progress):
            e = min(s + batch_size, n_q)
            aff = affinity_batch(q[s:e], db_used, neighbours[s:e], topk, anchor_len)
            with torch.autocast(device_type=dev.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
                scores[s:e] = _score(model, aff)
    finally:
        model.train(was_training)
    return scores, r


def _score(model: nn.Module, affinity: torch.Tensor) -> torch.Tensor:
    inner = model.module if hasattr(model, "module") else model
    return inner.score(affinity).float()
