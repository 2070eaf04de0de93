"""Re-creation of the official CSA (MCC-WH/CSA) test loop and training pipeline, used as the speed baseline.

Written from a reading of the official ``test.py``, ``train.py``, ``Dataset/ImageFromList.py`` and
``network/*.py``; this is our own code that performs the same computation in the same way:

* :class:`OfficialStyleModel` — the official network's arithmetic: explicit attention
  (``q @ k^T * scale``, softmax, ``@ v``; no fused SDPA), the same pre-norm blocks and the same
  parameter names, so it loads a :class:`csa.model.RerankTransformer` state dict with ``strict=True``.
  ``forward_feature`` returns the query-candidate cosines; ``forward`` returns ``(exp(cos / t), MSE)``
  like the official training forward.
* :func:`official_rerank` — the official per-query evaluation loop: a ``DataLoader`` with batch size 1
  whose dataset gathers the K candidate descriptors of one query, the query descriptor concatenated
  in front, the L-1 anchor descriptors gathered in the main process with the query in front, one
  ``bmm`` per query, ``forward_feature``, then ``np.argsort(-scores)`` and a per-query Python loop
  that re-orders the top-K.
* :class:`OfficialTrainingSet` / :func:`official_collate` / :func:`official_train_steps` — the official
  training data path: the ``Dataset.__getitem__`` gathers the K+1 token and L anchor descriptors of
  one sample and multiplies them (one ``mm`` per sample, in the loader workers), permutes rows 1..K
  with ``torch.randperm``, the collate function stacks the samples, and the step computes the
  contrastive + alpha * MSE loss from the model's outputs, back-propagates, logs the largest gradient
  of ``topk_proj`` and of the last block (as the official loop does) and takes an SGD step.

Deliberate differences (so both sides do the same work): the training set yields K+1 tokens like
ours (the official one yields K rows including the query); on the CPU the model runs in float32
(the official ``@autocast()`` is CUDA-only and its ``.half()`` input needs a GPU).
"""
from __future__ import annotations

import math
import time
from typing import Any

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset

from _common import sync

__all__ = ["OfficialStyleModel", "official_rerank", "OfficialTrainingSet", "official_collate",
           "official_train_steps"]


# --------------------------------------------------------------------------------------------
# model
# --------------------------------------------------------------------------------------------
class _Attention(nn.Module):
    def __init__(self, dim: int, heads: int, qkv_bias: bool, attn_drop: float, drop: float) -> None:
        super().__init__()
        self.heads, self.scale = heads, (dim // heads) ** -0.5
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.attn_drop = nn.Dropout(attn_drop)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        qkv = self.qkv(x).reshape(b, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]
        weights = self.attn_drop(((q @ k.transpose(-2, -1)) * self.scale).softmax(dim=-1))
        return self.proj_drop(self.proj((weights @ v).transpose(1, 2).reshape(b, n, c)))


class _Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int, drop: float) -> None:
        super().__init__()
        self.fc1, self.fc2, self.drop = nn.Linear(dim, hidden), nn.Linear(hidden, dim), nn.Dropout(drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(self.fc2(self.drop(F.gelu(self.fc1(x)))))


def _drop_path(x: torch.Tensor, p: float, training: bool) -> torch.Tensor:
    if p == 0.0 or not training:
        return x
    keep = 1.0 - p
    mask = (keep + torch.rand((x.shape[0],) + (1,) * (x.ndim - 1), dtype=x.dtype, device=x.device)).floor_()
    return x.div(keep) * mask


class _Block(nn.Module):
    def __init__(self, dim: int, heads: int, mlp_ratio: float, qkv_bias: bool, drop: float, attn_drop: float,
                 drop_path: float) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = _Attention(dim, heads, qkv_bias, attn_drop, drop)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = _Mlp(dim, int(dim * mlp_ratio), drop)
        self.drop_path = float(drop_path)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + _drop_path(self.attn(self.norm1(x)), self.drop_path, self.training)
        return x + _drop_path(self.mlp(self.norm2(x)), self.drop_path, self.training)


class _FeatureAlign(nn.Module):
    def __init__(self, dim: int, anchor_len: int) -> None:
        super().__init__()
        self.layers = nn.ModuleList([nn.Linear(dim, anchor_len)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers[0](x)


class OfficialStyleModel(nn.Module):
    """The official network's computation with :class:`csa.model.RerankTransformer`'s parameter names."""

    def __init__(self, anchor_len: int = 512, embed_dim: int = 768, depth: int = 2, num_heads: int = 12,
                 mlp_ratio: float = 4, qkv_bias: bool = True, drop_rate: float = 0.1, attn_drop_rate: float = 0.1,
                 drop_path_rate: float = 0.1, **_: Any) -> None:
        super().__init__()
        self.t = 2.0
        self.pos_drop, self.sim_drop = nn.Dropout(drop_rate), nn.Dropout(drop_rate)
        self.topk_proj = nn.Linear(anchor_len, embed_dim)
        self.feature_align = _FeatureAlign(embed_dim, anchor_len)
        rates = torch.linspace(0, drop_path_rate, depth).tolist() if depth else []
        self.blocks = nn.ModuleList([_Block(embed_dim, num_heads, mlp_ratio, qkv_bias, drop_rate, attn_drop_rate,
                                            rates[i]) for i in range(depth)])

    @classmethod
    def from_model(cls, model: nn.Module) -> "OfficialStyleModel":
        """Same architecture and weights as a :class:`csa.model.RerankTransformer`."""
        twin = cls(**model.config)
        twin.load_state_dict(model.state_dict(), strict=True)
        return twin.to(next(model.parameters()).device)

    def _tokens(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pos_drop(self.topk_proj(self.sim_drop(x)))
        for blk in self.blocks:
            x = blk(x)
        return x

    def forward_feature(self, x: torch.Tensor) -> torch.Tensor:
        n = F.normalize(self._tokens(x), dim=-1)
        return torch.sum(n[:, 0, :].unsqueeze(1) * n[:, 1:, :], dim=-1)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        residual = x
        tokens = self._tokens(x)
        n = F.normalize(tokens, dim=-1)
        exp_sim = torch.exp(torch.sum(n[:, 0, :].unsqueeze(1) * n, dim=-1) / self.t)
        rec = self.feature_align(tokens)
        mse = (F.normalize(residual, dim=-1) - F.normalize(rec, dim=-1)).pow(2).sum(-1).clamp(1e-4, 1e4).sqrt().mean()
        return exp_sim, mse


# --------------------------------------------------------------------------------------------
# test loop
# --------------------------------------------------------------------------------------------
class _CandidateRows(Dataset):
    """Item i: the descriptors of query i's top-K candidates (K, D)."""

    def __init__(self, features: torch.Tensor, topk_indices: torch.Tensor) -> None:
        self.features, self.topk_indices = features, topk_indices

    def __len__(self) -> int:
        return self.topk_indices.shape[0]

    def __getitem__(self, i: int) -> torch.Tensor:
        return self.features[self.topk_indices[i]]


@torch.no_grad()
def official_rerank(net: OfficialStyleModel, qvecs: torch.Tensor, vecs: torch.Tensor, ranks: torch.Tensor,
                    topk: int, anchor_len: int, num_workers: int = 0, device: str = "cpu") -> torch.Tensor:
    """The official evaluation loop on ``ranks`` (N, Q) torch int64; returns the re-ranked copy.

    ``num_workers``: the official script uses 8 loader workers (it targets a GPU box); on a small CPU
    0 is the faster choice, so that is the default here (the favourable setting for the baseline).
    """
    net.eval()
    ranks = ranks.clone()
    topk_idx = ranks[:topk, :].t().long()
    anchor_idx = ranks[:anchor_len - 1, :].t().long()
    loader = DataLoader(_CandidateRows(vecs, topk_idx), batch_size=1, shuffle=False, num_workers=num_workers,
                        pin_memory=torch.cuda.is_available())
    scores = torch.zeros(qvecs.size(0), topk)
    for i, cand in enumerate(loader):
        items = torch.cat((qvecs[i].unsqueeze(0).unsqueeze(0), cand), dim=1)
        anchors = torch.cat((qvecs[i].unsqueeze(0).unsqueeze(0), vecs[anchor_idx[i]].unsqueeze(0)), dim=1)
        affinity = torch.bmm(items, anchors.permute(0, 2, 1))
        scores[i, :] = net.forward_feature(affinity.to(device)).data.squeeze().cpu()
    order = np.argsort(-scores.numpy(), axis=1)
    for i in range(scores.size(0)):
        ranks[:topk, i] = ranks[:topk, i][order[i]]
    return ranks


# --------------------------------------------------------------------------------------------
# training pipeline
# --------------------------------------------------------------------------------------------
class OfficialTrainingSet(Dataset):
    """Item i -> (affinity (K+1, L) computed here with one mm, relevance (K+1,)), rows 1..K permuted.

    ``neighbours`` (N, >= max(K+1, L)) stacked indices with the sample itself first; ``relevance``
    (N, >= K+1) float 0/1 labels of those neighbours (precomputed once, as the official set does).
    """

    def __init__(self, features: torch.Tensor, neighbours: torch.Tensor, relevance: torch.Tensor, topk: int,
                 anchor_len: int) -> None:
        self.features, self.neighbours, self.relevance = features, neighbours, relevance
        self.n_tokens, self.anchor_len = topk + 1, anchor_len

    def __len__(self) -> int:
        return self.neighbours.shape[0]

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        tokens = self.features[self.neighbours[i][:self.n_tokens]]
        anchors = self.features[self.neighbours[i][:self.anchor_len]]
        sim = torch.mm(tokens, anchors.t())
        perm = torch.cat((torch.zeros(1).long(), torch.randperm(sim.size(0) - 1) + 1))
        return sim[perm], self.relevance[i][:self.n_tokens][perm]


def official_collate(batch: list) -> tuple[torch.Tensor, torch.Tensor]:
    """Drop failed samples, stack affinities and labels."""
    batch = [b for b in batch if b is not None]
    sims, labels = zip(*batch)
    return torch.stack(sims, 0), torch.stack(labels, 0)


def official_train_steps(model: OfficialStyleModel, dataset: OfficialTrainingSet, batch_size: int, steps: int,
                         optimizer: torch.optim.Optimizer, alpha: float = 0.2, num_workers: int = 0,
                         device: str = "cpu", skip: int = 0) -> tuple[int, float]:
    """Run ``skip + steps`` official training iterations (shuffled loader, drop_last).

    Returns ``(samples, seconds)`` of the last ``steps`` iterations: the clock starts when batch
    ``skip`` is requested (after a device synchronization), so loader start-up and warm-up
    iterations are excluded when ``skip > 0``.
    """
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=True, num_workers=num_workers, drop_last=True,
                        collate_fn=official_collate, pin_memory=torch.cuda.is_available())
    model.train()
    seen, t0 = 0, time.perf_counter()
    optimizer.zero_grad()
    batches = iter(loader)
    for it in range(skip + steps):
        if it == skip:
            sync(device)
            seen, t0 = 0, time.perf_counter()
        try:
            sims, targets = next(batches)
        except StopIteration:
            break
        targets = targets.to(device, non_blocking=True)
        exp_sim, mse = model(sims.to(device, non_blocking=True))
        contrastive = torch.mean(-torch.log(torch.sum(exp_sim * targets, -1) / torch.sum(exp_sim, -1)))
        loss = contrastive + alpha * mse
        if not math.isfinite(contrastive.item()) or not math.isfinite(mse.item()):
            optimizer.zero_grad()
            continue
        loss.backward()
        with torch.no_grad():  # the official loop logs these every iteration
            max(p.grad.detach().abs().max().cpu() for p in model.topk_proj.parameters()).item()
            max(p.grad.detach().abs().max().cpu() for p in model.blocks[-1].parameters()).item()
        optimizer.step()
        optimizer.zero_grad()
        seen += sims.shape[0]
    sync(device)
    return seen, time.perf_counter() - t0
