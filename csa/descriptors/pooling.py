"""Global pooling and normalization layers for image descriptors: GeM, L2N and learned whitening.

Semantics follow the cirtorch conventions used by the gl18 / rSfM120k GeM networks:
``gem(x) = (mean_{h,w} clamp(x, eps)^p)^(1/p)``, ``l2n(x) = x / (||x||_2 + eps)`` and the learned
whitening ``l2n(P @ (x - m))``.
"""
from __future__ import annotations

import numpy as np
import torch
from torch import nn

from csa.validation import CSAInputError

__all__ = ["gem", "GeM", "l2n", "L2N", "whiten_apply", "Whitening"]

#: Epsilon used by cirtorch both for the GeM clamp and for the L2 normalization denominator.
EPS = 1e-6


def gem(x: torch.Tensor, p: float | torch.Tensor = 3.0, eps: float = EPS) -> torch.Tensor:
    """Generalized-mean pooling of a (B, C, H, W) feature map into (B, C)."""
    if x.ndim != 4:
        raise CSAInputError(f"gem expects a (B, C, H, W) feature map, got shape {tuple(x.shape)}")
    return x.clamp(min=eps).pow(p).mean(dim=(-2, -1)).pow(1.0 / p)


class GeM(nn.Module):
    """GeM pooling layer; ``learnable=True`` makes ``p`` a parameter (stored as ``p``, shape (1,))."""

    def __init__(self, p: float = 3.0, learnable: bool = False, eps: float = EPS):
        super().__init__()
        if not p > 0:
            raise CSAInputError(f"GeM power p must be > 0, got {p}")
        value = torch.ones(1) * float(p)
        if learnable:
            self.p = nn.Parameter(value)
        else:
            self.register_buffer("p", value)
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return gem(x, self.p, self.eps)

    def extra_repr(self) -> str:
        return f"p={float(self.p):.4f}, eps={self.eps}"


def l2n(x, eps: float = EPS, dim: int = -1):
    """L2-normalize along ``dim`` as ``x / (||x|| + eps)``; accepts numpy or torch, returns the same kind."""
    if isinstance(x, np.ndarray):
        return x / (np.linalg.norm(x, ord=2, axis=dim, keepdims=True) + eps)
    return x / (torch.linalg.vector_norm(x, ord=2, dim=dim, keepdim=True) + eps)


class L2N(nn.Module):
    """L2 normalization of the last dimension (module form of :func:`l2n`)."""

    def __init__(self, eps: float = EPS):
        super().__init__()
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return l2n(x, self.eps)


def whiten_apply(x, m, P, dimensions: int | None = None):
    """Apply a learned whitening to row descriptors ``x`` (N, D): ``l2n((x - m) @ P[:d].T)``.

    ``m`` is the mean (D,) or (D, 1) as cirtorch stores it, ``P`` the (D', D) projection; ``dimensions``
    keeps the first d output dimensions.  numpy in, numpy out (float32 kept); torch in, torch out.
    """
    is_numpy = isinstance(x, np.ndarray)
    xt = torch.from_numpy(np.asarray(x)) if is_numpy else x
    mt = torch.as_tensor(np.asarray(m) if not isinstance(m, torch.Tensor) else m).reshape(-1)
    Pt = torch.as_tensor(np.asarray(P) if not isinstance(P, torch.Tensor) else P)
    if xt.ndim != 2 or Pt.ndim != 2 or Pt.shape[1] != xt.shape[1] or mt.numel() != xt.shape[1]:
        raise CSAInputError(f"whitening shapes do not fit: x {tuple(xt.shape)} (N, D), m {tuple(mt.shape)} (D,), "
                            f"P {tuple(Pt.shape)} (D', D); pass row descriptors and the matching whitening")
    d = Pt.shape[0] if dimensions is None else int(dimensions)
    dtype = torch.promote_types(xt.dtype, Pt.dtype)
    out = (xt.to(dtype) - mt.to(dtype)) @ Pt[:d].to(dtype).T
    out = l2n(out).to(xt.dtype)
    return out.numpy() if is_numpy else out


class Whitening(nn.Module):
    """Learned whitening ``l2n(P (x - m))`` as a module (buffers ``m`` (D,) and ``P`` (D', D))."""

    def __init__(self, m, P):
        super().__init__()
        self.register_buffer("m", torch.as_tensor(np.asarray(m), dtype=torch.float32).reshape(-1))
        self.register_buffer("P", torch.as_tensor(np.asarray(P), dtype=torch.float32))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return whiten_apply(x, self.m, self.P)
