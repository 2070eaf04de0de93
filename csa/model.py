"""The CSA re-ranking transformer.

Input: per query, a (K+1, L) *affinity* matrix — row 0 is the query, rows 1..K the first-stage
top-K candidates, each described by its cosine similarities to L anchors. A linear layer
(``topk_proj``, L -> C) embeds every row, a stack of pre-norm transformer blocks mixes the K+1
tokens, and the new score of candidate i is cos(token_i, token_0). A second linear
(``feature_align``, C -> L) maps tokens back to affinity space; it is used only by the training loss.

Parameter names and shapes are those of the official implementation (MCC-WH/CSA), so state dicts
load both ways with ``strict=True``.

Constructor defaults: the official class defaults are ``topk_dim=512, embed_dim=2048, depth=6,
num_heads=4, qkv_bias=False`` and all dropouts 0, which is *not* the model the paper trains and
tests.  Our defaults are the paper's recipe (the official training and test scripts):
``anchor_len=512, embed_dim=768, depth=2, num_heads=12, mlp_ratio=4, qkv_bias=True`` and
dropout / attention-dropout / drop-path 0.1 (active in training only).  The official argument
``topk_dim`` is called ``anchor_len`` here: it is the number of anchors L, not K.

On the CPU, dropout, attention with dropout and no-grad inference run through the faster kernels of
:mod:`csa.cpu_kernels` (same numbers and random draws); this file holds only the model.
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from csa.cpu_kernels import Dropout, block_forward_cpu_inference, cpu_attention_with_dropout
from csa.validation import CSAInputError

__all__ = ["RerankTransformer", "DropPath", "Attention", "Mlp", "Block", "FeatureAlign", "token_cosine", "unwrap"]


class DropPath(nn.Module):
    """Stochastic depth: in training, zero a whole sample's residual branch with probability p
    and scale the kept ones by 1 / (1 - p); identity in eval mode."""

    def __init__(self, drop_prob: float = 0.0) -> None:
        super().__init__()
        self.drop_prob = float(drop_prob)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.drop_prob == 0.0 or not self.training:
            return x
        keep = 1.0 - self.drop_prob
        mask = torch.empty((x.shape[0],) + (1,) * (x.ndim - 1), dtype=x.dtype, device=x.device).bernoulli_(keep)
        return x * mask / keep

    def extra_repr(self) -> str:
        return f"drop_prob={self.drop_prob}"


class Attention(nn.Module):
    """Multi-head self-attention (fused qkv projection, scaled dot product, output projection)."""

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = True, attn_drop: float = 0.0,
                 proj_drop: float = 0.0) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"embed_dim={dim} must be divisible by num_heads={num_heads}")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scale = self.head_dim ** -0.5
        self.attn_drop = float(attn_drop)
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = Dropout(proj_drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        # (B, N, 3C) -> (3, B, heads, N, head_dim): channel layout is [q | k | v], each split by head.
        q, k, v = self.qkv(x).reshape(b, n, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        if self.training and self.attn_drop > 0.0 and x.device.type == "cpu":
            out = cpu_attention_with_dropout(q, k, v, self.attn_drop, self.scale)
        else:
            out = F.scaled_dot_product_attention(q, k, v, dropout_p=self.attn_drop if self.training else 0.0,
                                                 scale=self.scale)
        out = out.transpose(1, 2).reshape(b, n, c)
        return self.proj_drop(self.proj(out))


class Mlp(nn.Module):
    """Two-layer feed-forward network with exact GELU and dropout after each layer."""

    def __init__(self, dim: int, hidden: int, drop: float = 0.0) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)
        self.drop = Dropout(drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(self.fc2(self.drop(F.gelu(self.fc1(x)))))


class Block(nn.Module):
    """Pre-norm transformer block: x + DropPath(Attn(LN(x))), then x + DropPath(MLP(LN(x)))."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0, qkv_bias: bool = True,
                 drop: float = 0.0, attn_drop: float = 0.0, drop_path: float = 0.0) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, num_heads, qkv_bias=qkv_bias, attn_drop=attn_drop, proj_drop=drop)
        self.drop_path = DropPath(drop_path)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), drop=drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.device.type == "cpu" and not (self.training or torch.is_grad_enabled()):
            return block_forward_cpu_inference(self, x)
        x = x + self.drop_path(self.attn(self.norm1(x)))
        return x + self.drop_path(self.mlp(self.norm2(x)))


class FeatureAlign(nn.Module):
    """Token -> affinity-space projection (C -> L) used by the reconstruction loss.

    Kept as a one-element ``layers`` list so the parameter names are ``feature_align.layers.0.*``
    like the official checkpoints.
    """

    def __init__(self, embed_dim: int, anchor_len: int) -> None:
        super().__init__()
        self.layers = nn.ModuleList([nn.Linear(embed_dim, anchor_len)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers[0](x)


class RerankTransformer(nn.Module):
    """CSA re-ranker: affinity rows (B, K+1, L) -> contextualized tokens (B, K+1, C).

    Works for any K (the number of tokens is free); L (``anchor_len``) is fixed by the weights.
    """

    def __init__(self, anchor_len: int = 512, embed_dim: int = 768, depth: int = 2, num_heads: int = 12,
                 mlp_ratio: float = 4, qkv_bias: bool = True, drop_rate: float = 0.1,
                 attn_drop_rate: float = 0.1, drop_path_rate: float = 0.1) -> None:
        super().__init__()
        self._config = dict(anchor_len=int(anchor_len), embed_dim=int(embed_dim), depth=int(depth),
                            num_heads=int(num_heads), mlp_ratio=mlp_ratio, qkv_bias=bool(qkv_bias),
                            drop_rate=float(drop_rate), attn_drop_rate=float(attn_drop_rate),
                            drop_path_rate=float(drop_path_rate))
        self.anchor_len = int(anchor_len)
        self.embed_dim = int(embed_dim)
        # Registration order follows the official module so state_dict keys come out in the same order.
        self.pos_drop = Dropout(drop_rate)
        self.sim_drop = Dropout(drop_rate)
        self.topk_proj = nn.Linear(anchor_len, embed_dim)
        self.feature_align = FeatureAlign(embed_dim, anchor_len)
        rates = torch.linspace(0, drop_path_rate, depth).tolist() if depth > 0 else []
        self.blocks = nn.ModuleList([
            Block(embed_dim, num_heads, mlp_ratio=mlp_ratio, qkv_bias=qkv_bias, drop=drop_rate,
                  attn_drop=attn_drop_rate, drop_path=rates[i]) for i in range(depth)])
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(m: nn.Module) -> None:
        if isinstance(m, nn.Linear):
            nn.init.trunc_normal_(m.weight, std=0.02, a=-2.0, b=2.0)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)

    @property
    def config(self) -> dict[str, Any]:
        """The constructor arguments (a copy), enough to rebuild the architecture."""
        return dict(self._config)

    def no_weight_decay(self) -> set[str]:
        """Parameter-name prefixes excluded from weight decay (besides biases and norms)."""
        return {"feature_align"}

    def encode(self, affinity: torch.Tensor) -> torch.Tensor:
        """Affinity (B, K+1, L) -> output tokens (B, K+1, C) of the last block."""
        if affinity.ndim != 3 or affinity.shape[-1] != self.anchor_len:
            raise CSAInputError(f"affinity must have shape (B, K+1, {self.anchor_len}) for this model "
                                f"(anchor_len={self.anchor_len}), got {tuple(affinity.shape)}")
        x = self.pos_drop(self.topk_proj(self.sim_drop(affinity)))
        for blk in self.blocks:
            x = blk(x)
        return x

    def forward(self, affinity: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Return ``(tokens (B, K+1, C), reconstruction (B, K+1, L))``; losses live in :mod:`csa.losses`."""
        tokens = self.encode(affinity)
        return tokens, self.feature_align(tokens)

    def score(self, affinity: torch.Tensor) -> torch.Tensor:
        """Re-ranking scores (B, K): cosine of each candidate token with the query token, in float32."""
        tokens = self.encode(affinity)
        return token_cosine(tokens)


def unwrap(model: nn.Module) -> nn.Module:
    """The bare model inside a DistributedDataParallel / DataParallel wrapper (the model itself otherwise)."""
    return model.module if isinstance(getattr(model, "module", None), nn.Module) else model


def token_cosine(tokens: torch.Tensor) -> torch.Tensor:
    """cos(tokens[:, i], tokens[:, 0]) for i = 1..K, computed in float32 outside autocast."""
    with torch.autocast(device_type=tokens.device.type, enabled=False):
        t = F.normalize(tokens.float(), dim=-1)
        return torch.einsum("bkc,bc->bk", t[:, 1:], t[:, 0])
