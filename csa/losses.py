"""CSA training losses: contrastive loss on the output tokens + affinity reconstruction loss.

With x_i the L2-normalized output tokens (i = 0 is the query) and y_i in {0, 1} the relevance of
item i (y_0 = 1: the query counts as relevant to itself):

    s_i           = exp(cos(x_0, x_i) / t)                   for all i = 0..K (query included)
    contrastive   = -log( sum_i s_i y_i / sum_i s_i )        averaged over the batch
    reconstruction= mean_i sqrt(clamp(||n(A_i) - n(R_i)||^2, 1e-4, 1e4)),  n = L2-normalization
    loss          = contrastive + alpha * reconstruction

where A_i is the input affinity row and R_i = feature_align(x_i) its reconstruction. Both are
computed in float32 (also under autocast) and the contrastive term with ``logsumexp``, which equals
the formula above without overflow for any temperature.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = ["contrastive_loss", "reconstruction_loss", "CSACriterion"]


def contrastive_loss(tokens: torch.Tensor, targets: torch.Tensor, temperature: float = 2.0) -> torch.Tensor:
    """Mean over the batch of -log(sum_i s_i y_i / sum_i s_i), s_i = exp(cos(x_0, x_i) / t).

    ``tokens``: (B, K+1, C) model outputs; ``targets``: (B, K+1) non-negative relevance weights
    (normally 0/1 with ``targets[:, 0] == 1``; a sample whose targets are all zero gives +inf).
    """
    if tokens.ndim != 3 or targets.shape != tokens.shape[:2]:
        raise ValueError(f"tokens must be (B, K+1, C) and targets (B, K+1); got {tuple(tokens.shape)} "
                         f"and {tuple(targets.shape)}")
    with torch.autocast(device_type=tokens.device.type, enabled=False):
        x = F.normalize(tokens.float(), dim=-1)
        logits = torch.einsum("bkc,bc->bk", x, x[:, 0]) / temperature          # (B, K+1), i = 0..K
        log_y = torch.log(targets.to(logits.dtype))                             # log 0 = -inf drops the term
        per_sample = torch.logsumexp(logits, dim=1) - torch.logsumexp(logits + log_y, dim=1)
        return per_sample.mean()


def reconstruction_loss(affinity: torch.Tensor, reconstruction: torch.Tensor) -> torch.Tensor:
    """Mean over all (sample, token) of the clamped L2 distance between normalized rows."""
    if affinity.shape != reconstruction.shape:
        raise ValueError(f"affinity {tuple(affinity.shape)} and reconstruction {tuple(reconstruction.shape)} "
                         f"must have the same shape")
    with torch.autocast(device_type=affinity.device.type, enabled=False):
        diff = F.normalize(affinity.float(), dim=-1) - F.normalize(reconstruction.float(), dim=-1)
        return diff.pow(2).sum(dim=-1).clamp(min=1e-4, max=1e4).sqrt().mean()


class CSACriterion(nn.Module):
    """``loss = contrastive + alpha * reconstruction``; returns a dict with the three terms."""

    def __init__(self, alpha: float = 0.2, temperature: float = 2.0) -> None:
        super().__init__()
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        self.alpha = float(alpha)
        self.temperature = float(temperature)

    def forward(self, tokens: torch.Tensor, reconstruction: torch.Tensor, affinity: torch.Tensor,
                targets: torch.Tensor) -> dict[str, torch.Tensor]:
        con = contrastive_loss(tokens, targets, self.temperature)
        rec = reconstruction_loss(affinity, reconstruction)
        return {"loss": con + self.alpha * rec, "contrastive": con, "reconstruction": rec}

    def extra_repr(self) -> str:
        return f"alpha={self.alpha}, temperature={self.temperature}"
