"""Conversions between numpy arrays, memory maps and torch tensors, sharing memory where they can.

Public functions of the package accept numpy or torch and return the kind they got; these helpers do the
conversions on the way in and out.  They check nothing: the checks live in :mod:`csa.validation`.
"""
from __future__ import annotations

import warnings
from typing import Any

import numpy as np
import torch

__all__ = ["as_tensor", "as_cpu_tensor", "as_numpy", "same_kind"]


def as_tensor(x: Any) -> torch.Tensor:
    """A torch view of ``x`` (numpy arrays are shared without copy when contiguous); tensors pass through."""
    if isinstance(x, torch.Tensor):
        return x
    return torch.from_numpy(np.ascontiguousarray(x))


def as_cpu_tensor(x: Any) -> torch.Tensor:
    """``x`` (numpy array, memory map or tensor) as a CPU tensor of its own dtype, sharing memory when it can
    (arrays with negative strides, which torch cannot view, are copied).  Read-only memory maps are shared
    too (they are only read), without torch's warning about them."""
    if isinstance(x, torch.Tensor):
        return x.detach().cpu()
    a = np.asarray(x)
    if any(step < 0 for step in a.strides):
        a = np.ascontiguousarray(a)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return torch.from_numpy(a)


def as_numpy(x: Any) -> np.ndarray:
    """``x`` (tensor on any device, numpy array or nested list) as a numpy array; arrays pass through."""
    if isinstance(x, torch.Tensor):
        return x.detach().cpu().numpy()
    return np.asarray(x)


def same_kind(values: Any, like: Any) -> Any:
    """``values`` (numpy or torch) as the kind, dtype and device of ``like`` (numpy in -> numpy out)."""
    if isinstance(like, torch.Tensor):
        return as_tensor(values).to(device=like.device, dtype=like.dtype)
    return np.ascontiguousarray(as_numpy(values)).astype(like.dtype, copy=False)
