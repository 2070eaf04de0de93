"""Global-descriptor networks: every network is a :class:`GeMNetwork` (built by name with
:func:`csa.descriptors.backbones.load_backbone`).

A :class:`GeMNetwork` is convolutional ``features`` -> GeM -> L2N, then optionally a fully-connected
whitening (``whiten``, learned end-to-end in the ``-gem-w`` networks) -> L2N, then optionally a post-hoc
learned whitening ``l2n(P (x - m))`` (``Lw`` in the cirtorch meta).  ``forward`` takes a normalized image
batch (B, 3, H, W) and returns (B, D) L2-normalized rows; ``net.meta`` holds ``mean``/``std`` (the input
normalization applied to pixels in [0, 1]) and ``outputdim``.  The two families live in
:mod:`csa.descriptors.lite0` (offline EfficientNet-Lite0) and :mod:`csa.descriptors.cirtorch` (the gl18 /
rSfM120k ResNet GeM networks of the paper).
"""
from __future__ import annotations

from typing import Any, Mapping

import torch
from torch import nn

from csa.descriptors.pooling import GeM, Whitening, l2n

__all__ = ["GeMNetwork", "LITE0", "LITE_BACKBONES"]

#: Name of the offline backbone (EfficientNet-Lite0 + GeM) used by the demo.
LITE0 = "lite0"
#: The offline backbones (EfficientNet-Lite0/1/2 + GeM); the demo's augmented training stacks all three.
LITE_BACKBONES = ("lite0", "lite1", "lite2")


class GeMNetwork(nn.Module):
    """features -> GeM -> L2N [-> whiten (Linear) -> L2N] [-> post-hoc whitening]; returns (B, D) rows."""

    def __init__(self, features: nn.Module, pool: GeM, whiten: nn.Linear | None = None,
                 meta: Mapping[str, Any] | None = None, post_whiten: Whitening | None = None):
        super().__init__()
        self.features = features
        self.pool = pool
        self.whiten = whiten
        self.post_whiten = post_whiten
        self.meta = dict(meta or {})

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        o = l2n(self.pool(self.features(x)))
        if self.whiten is not None:
            o = l2n(self.whiten(o))
        if self.post_whiten is not None:
            o = self.post_whiten(o)
        return o
