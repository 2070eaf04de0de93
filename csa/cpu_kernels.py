"""CPU speed kernels of the model: faster dropout masks, attention with dropout, chunked inference.

None of this changes what the model computes, only how fast the CPU computes it: the paper's model
is :mod:`csa.model`, which calls these when it runs on the CPU. State-dict keys are unaffected (the
kernels hold no parameters) and the random draws are those the model has always made, so a seeded
training run gives the same weights bit for bit.
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn

__all__ = ["Dropout", "UniformDropout", "CPUDropoutAttention", "cpu_attention_with_dropout",
           "CPU_INFERENCE_CHUNK_ROWS", "block_forward_cpu_inference"]

#: Token rows per MLP chunk in CPU inference (see :func:`block_forward_cpu_inference`).
CPU_INFERENCE_CHUNK_ROWS = 2048


class UniformDropout(torch.autograd.Function):
    """Inverted dropout for CPU training: keep each entry with probability 1 - p (a uniform draw >= p) and
    scale it by 1 / (1 - p). The distribution of ``F.dropout``; the mask comes from ``torch.rand``, several
    times faster on the CPU than the ``bernoulli_`` sampler ``F.dropout`` uses there (another random stream)."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, p: float) -> torch.Tensor:
        """``x`` times the scaled keep-mask; the mask is saved for the backward pass."""
        mask = torch.rand(x.shape).ge_(p).mul_(1.0 / (1.0 - p)).to(x.dtype)
        ctx.save_for_backward(mask)
        return x * mask

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        """The gradient times the same mask (none for ``p``)."""
        (mask,) = ctx.saved_tensors
        return grad * mask, None


class Dropout(nn.Dropout):
    """``nn.Dropout`` with the faster CPU training mask of :class:`UniformDropout` (other devices: ``F.dropout``)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training and 0.0 < self.p < 1.0 and x.device.type == "cpu" and not self.inplace:
            return UniformDropout.apply(x, self.p)
        return super().forward(x)


class CPUDropoutAttention(torch.autograd.Function):
    """``softmax(q k^T * scale)`` with dropout ``p`` on the probabilities, times ``v``, for CPU training.

    The arithmetic of ``F.scaled_dot_product_attention`` with ``dropout_p > 0`` (which on the CPU falls back
    to its unfused math path: safe-softmax checks, a ``bernoulli_`` mask, autograd through every step) written
    as one function with a hand-written backward. The products run in the inputs' dtype (bfloat16 under
    autocast: the fast path of CPUs with native bf16), softmax and the mask in float32.
    """

    @staticmethod
    def forward(ctx: Any, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, p: float, scale: float) -> torch.Tensor:
        """The attention output; saves the scaled queries, keys, values, probabilities and mask."""
        with torch.autocast("cpu", enabled=False):
            qs = q * scale
            probs = torch.softmax(torch.matmul(qs, k.transpose(-2, -1)), dim=-1, dtype=torch.float32)
            mask = torch.rand(probs.shape).ge_(p).mul_(1.0 / (1.0 - p))
            out = torch.matmul((probs * mask).to(v.dtype), v)
        ctx.save_for_backward(qs, k, v, probs, mask)
        ctx.scale = scale
        return out

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, None, None]:
        """Gradients of ``q``, ``k`` and ``v`` through the mask and the softmax (none for ``p``, ``scale``)."""
        qs, k, v, probs, mask = ctx.saved_tensors
        with torch.autocast("cpu", enabled=False):
            grad = grad.to(v.dtype)
            d_dropped = torch.matmul(grad, v.transpose(-2, -1)).float()          # d(probs * mask)
            dv = torch.matmul((probs * mask).to(v.dtype).transpose(-2, -1), grad)
            d_scores = torch._softmax_backward_data(d_dropped.mul_(mask), probs, -1, torch.float32).to(qs.dtype)
            dq = torch.matmul(d_scores, k).mul_(ctx.scale)
            dk = torch.matmul(d_scores.transpose(-2, -1), qs)
        return dq, dk, dv, None, None


def cpu_attention_with_dropout(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, p: float,
                               scale: float) -> torch.Tensor:
    """Attention of (B, heads, N, head_dim) ``q, k, v`` with dropout ``p`` on the probabilities (CPU training)."""
    return CPUDropoutAttention.apply(q, k, v, p, scale)


def block_forward_cpu_inference(block: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """A pre-norm block's forward (``norm1``, ``attn``, ``norm2``, ``mlp``) without autograd on the CPU,
    with less memory traffic.

    The MLP is row-wise, so it runs over chunks of :data:`CPU_INFERENCE_CHUNK_ROWS` token rows
    and adds into the residual in place: its (rows, 4C) intermediates stay a few MB and are
    reused, instead of ~100 MB fresh (page-faulted) buffers per re-ranking batch, which cost
    10-40% of the CPU re-ranking time. Results equal the block's forward in eval mode.
    """
    x = (x + block.attn(block.norm1(x))).contiguous()
    flat = x.view(-1, x.shape[-1])
    for start in range(0, flat.shape[0], CPU_INFERENCE_CHUNK_ROWS):
        rows = flat[start:start + CPU_INFERENCE_CHUNK_ROWS]
        rows += block.mlp(block.norm2(rows))
    return x
