"""Training samples of CSA: every training image is a query of its own.

:class:`NeighbourTable` holds each image's nearest neighbours by descriptor similarity (itself
first), :class:`TrainingSet` turns a sample index into token / anchor indices and relevance targets,
and :class:`GlobalBatchSampler` fixes a global batch order that is the same for any number of
processes.  The (K+1, L) affinity matrices themselves are built per batch on the device by
:func:`csa.affinity.indexed_affinity`.
"""
from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import torch
from tqdm import tqdm

from csa.fileio import fingerprint, load_pickle, save_pickle
from csa.search import stable_topk
from csa.validation import CSAInputError

__all__ = [
    "neighbour_cache_path",
    "compute_neighbours",
    "NeighbourTable",
    "TrainingSet",
    "GlobalBatchSampler",
    "sample_permutation",
    "stacked_clusters",
]


# --------------------------------------------------------------------------------------------
# nearest-neighbour table
# --------------------------------------------------------------------------------------------
@torch.no_grad()
def compute_neighbours(features: Any, width: int, chunk_size: int = 1024, device: str | torch.device = "cpu",
                       progress: bool = True) -> np.ndarray:
    """Top-``width`` neighbours of every row by dot product (cosine for unit rows), itself first.

    Works in query chunks of ``chunk_size`` rows (memory ``chunk_size x N``, never N x N); the
    row's own index is forced to the first column even with duplicate descriptors; the others follow
    by decreasing similarity, ties by index.  Returns an int32 (N, width) array.
    """
    feats = torch.as_tensor(np.asarray(features) if not isinstance(features, torch.Tensor) else features)
    feats = feats.to(device=device, dtype=torch.float32)
    n = feats.shape[0]
    if not 1 <= width <= n:
        raise CSAInputError(f"cannot take {width} neighbours among {n} training images; lower K / L "
                            f"(need max(K + 1, L) <= number of images)")
    out = np.empty((n, width), dtype=np.int32)
    for start in tqdm(range(0, n, chunk_size), desc="neighbours", disable=not progress, leave=False):
        stop = min(start + chunk_size, n)
        sim = feats[start:stop] @ feats.T                                    # (c, N)
        rows = torch.arange(stop - start, device=sim.device)
        sim[rows, rows + start] = float("inf")                              # self first, always
        out[start:stop] = stable_topk(sim, width, dim=1)[1].cpu().numpy()
    return out


def neighbour_cache_path(cache_dir: str | os.PathLike, trainset: str, split: str, topk: int, anchor_len: int,
                         feature_names: Sequence[str]) -> Path:
    """Cache file of a neighbour table; its name encodes trainset, split, K, L and the feature sets."""
    names = "+".join(feature_names)
    return Path(cache_dir) / f"neighbours_{trainset}_{split}_K{topk}_L{anchor_len}_{names}.pkl"


class NeighbourTable:
    """Nearest neighbours of every training sample, for tokens (self + top-K) and anchors (self + top L-1).

    ``features`` is a list of (N_s, D) arrays, one per feature set (the paper's R50/R101/R152
    augmentation): they are stacked as more samples, and each set's neighbours are searched within
    that set only, then offset to the stacked index.  ``indices[i, 0] == i``; row width is
    ``max(K + 1, L)``.  With ``cache_path`` the table is read from there when present (and its
    fingerprint matches the features) or computed and written atomically; ``computed`` says which.
    """

    def __init__(self, features: Sequence[Any], topk: int, anchor_len: int, cache_path: str | os.PathLike | None = None,
                 chunk_size: int = 1024, device: str | torch.device = "cpu", progress: bool = True) -> None:
        if isinstance(features, (np.ndarray, torch.Tensor)):
            features = [features]
        if topk < 1 or anchor_len < 1:
            raise CSAInputError(f"topk (K={topk}) and anchor_len (L={anchor_len}) must be >= 1")
        feats = [np.asarray(f.detach().cpu() if isinstance(f, torch.Tensor) else f, dtype=np.float32) for f in features]
        if not feats or any(f.ndim != 2 for f in feats) or len({f.shape[1] for f in feats}) != 1:
            raise CSAInputError("features must be a non-empty list of (N, D) arrays with the same D")
        self.topk, self.anchor_len = int(topk), int(anchor_len)
        self.width = max(self.topk + 1, self.anchor_len)
        self.set_sizes = [len(f) for f in feats]
        self.cache_path = Path(cache_path) if cache_path is not None else None
        digest = fingerprint(*feats)
        self.computed = False
        cached = self._read_cache(digest)
        if cached is not None:
            self.indices = cached
        else:
            parts, offset = [], 0
            for f in feats:
                parts.append(compute_neighbours(f, self.width, chunk_size, device, progress) + np.int32(offset))
                offset += len(f)
            self.indices = np.concatenate(parts, axis=0)
            self.computed = True
            if self.cache_path is not None:
                save_pickle({"indices": self.indices, "fingerprint": digest, "topk": self.topk,
                             "anchor_len": self.anchor_len, "set_sizes": self.set_sizes}, self.cache_path)

    def _read_cache(self, fingerprint: str) -> np.ndarray | None:
        if self.cache_path is None or not self.cache_path.is_file():
            return None
        try:
            obj = load_pickle(self.cache_path)
            ok = (obj["fingerprint"] == fingerprint and obj["indices"].shape == (sum(self.set_sizes), self.width))
        except Exception as exc:  # damaged cache: recompute
            warnings.warn(f"ignoring unreadable neighbour cache {self.cache_path} ({exc}); recomputing", stacklevel=3)
            return None
        if not ok:
            warnings.warn(f"neighbour cache {self.cache_path} was built from other features; recomputing",
                          stacklevel=3)
            return None
        return obj["indices"]

    def __len__(self) -> int:
        return self.indices.shape[0]

    def tokens(self, i: int) -> np.ndarray:
        """Self + top-K neighbours of sample ``i`` (K + 1 stacked indices)."""
        return self.indices[i, : self.topk + 1]

    def anchors(self, i: int) -> np.ndarray:
        """Self + top L-1 neighbours of sample ``i`` (L stacked indices)."""
        return self.indices[i, : self.anchor_len]


# --------------------------------------------------------------------------------------------
# samples, permutations, batch order
# --------------------------------------------------------------------------------------------
def _rng(seed: int, *keys: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence([int(seed) & 0xFFFFFFFF, *(int(k) for k in keys)]))


def sample_permutation(seed: int, epoch: int, index: int, k: int) -> np.ndarray:
    """Row order [0, 1 + perm(K)] of sample ``index`` in ``epoch``: row 0 (the query) stays first.

    A pure function of (seed, epoch, index): the same for any number of processes or workers.
    """
    return np.concatenate(([0], 1 + _rng(seed, 1, epoch, index).permutation(k))).astype(np.int64)


def stacked_clusters(clusters: Any, n_sets: int) -> np.ndarray:
    """Cluster ids of ``n_sets`` stacked feature sets: set s gets ``clusters + s * (max + 1)``.

    Neighbours are searched within a set, so a cluster is only ever compared within its own set; keeping
    the sets' ids apart makes ``samples='with-positives'`` count an image's positives in its own set
    (an image alone in its cluster must not become a query because its copies in other sets share its id).
    """
    c = np.asarray(clusters).astype(np.int64).ravel()
    step = int(c.max(initial=-1)) + 1 - min(int(c.min(initial=0)), 0)
    return np.concatenate([c + s * step for s in range(int(n_sets))])


class TrainingSet(torch.utils.data.Dataset):
    """Item ``i`` -> ``{'index', 'tokens' (K+1,), 'anchors' (L,), 'targets' (K+1,)}``.

    ``tokens`` are stacked feature indices: the sample itself first, then its top-K neighbours in a
    per-sample random order (``permute=True``; see :func:`sample_permutation`, call
    :meth:`set_epoch` every epoch). ``targets[j] = 1.0`` when token j has the query's cluster
    (``targets[0] == 1``).  ``anchors`` keep their similarity order (self first).  No descriptor
    arithmetic happens here: :func:`csa.affinity.indexed_affinity` builds the batch on the device.

    ``samples='with-positives'`` keeps as queries only the images whose cluster has another image (as
    in rSfM120k, where every image lies in a multi-image 3D model); the others still serve as tokens
    and anchors.  ``'all'`` (default) makes every image a query.
    """

    def __init__(self, table: NeighbourTable, clusters: Any, seed: int = 0, permute: bool = True,
                 samples: str = "all") -> None:
        clusters = np.asarray(clusters).astype(np.int64).ravel()
        if len(clusters) != len(table):
            raise CSAInputError(f"{len(clusters)} cluster labels for {len(table)} training samples; with several "
                                f"feature sets pass the labels repeated once per set")
        if samples not in ("all", "with-positives"):
            raise CSAInputError(f"samples must be 'all' or 'with-positives', got {samples!r}")
        self.table, self.clusters = table, clusters
        self.seed, self.permute, self.epoch = int(seed), bool(permute), 0
        if samples == "all":
            self.queries = np.arange(len(clusters))
        else:
            _, inverse, counts = np.unique(clusters, return_inverse=True, return_counts=True)
            self.queries = np.flatnonzero(counts[inverse] > 1)
            if len(self.queries) == 0:
                raise CSAInputError("no training image shares its cluster with another one; use samples='all'")

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return len(self.queries)

    def __getitem__(self, item: int) -> dict[str, torch.Tensor]:
        index = int(self.queries[item])
        tokens = self.table.tokens(index).astype(np.int64)
        if self.permute:
            tokens = tokens[sample_permutation(self.seed, self.epoch, index, len(tokens) - 1)]
        labels = self.clusters[tokens]
        targets = (labels == self.clusters[index]).astype(np.float32)
        return {"index": torch.tensor(index, dtype=torch.int64), "tokens": torch.from_numpy(tokens),
                "anchors": torch.from_numpy(self.table.anchors(index).astype(np.int64)),
                "targets": torch.from_numpy(targets)}


class GlobalBatchSampler(torch.utils.data.Sampler):
    """Per-rank index batches of one global order: the union over ranks of batch b equals batch b of
    a single process with the same global batch size B.

    ``order='reshuffle'``: a permutation drawn from (seed, epoch), the incomplete last global batch
    dropped.  ``order='fixed'``: the order of the official code on ``reference_gpus`` GPUs —
    ``torch.randperm`` seeded with ``seed`` and never re-seeded per epoch (DistributedSampler without
    ``set_epoch``), padded by repeating its first samples to a multiple of ``reference_gpus``, the last
    partial batch kept.  Rank r takes the slice [r * B/W, (r + 1) * B/W) of each global batch
    (and an equal share of a partial one), so B must be divisible by the world size W.
    """

    def __init__(self, n: int, global_batch: int, rank: int = 0, world_size: int = 1, seed: int = 0,
                 order: str = "reshuffle", reference_gpus: int = 4) -> None:
        if global_batch < 1 or global_batch % world_size:
            raise CSAInputError(f"global batch size {global_batch} must be a positive multiple of the number of "
                                f"processes ({world_size}); change --batch-size or --nproc_per_node")
        if n < global_batch:
            raise CSAInputError(f"only {n} training samples for a global batch of {global_batch}; lower --batch-size")
        if order not in ("reshuffle", "fixed"):
            raise CSAInputError(f"sample order must be 'reshuffle' or 'fixed', got {order!r}")
        self.n, self.global_batch, self.rank, self.world_size = n, global_batch, rank, world_size
        self.local_batch = global_batch // world_size
        self.seed, self.order, self.epoch = int(seed), order, 0
        self.padded = n if order == "reshuffle" else -(-n // reference_gpus) * reference_gpus
        last = self.padded % global_batch if order == "fixed" else 0
        if last % world_size:
            raise CSAInputError(f"the last partial batch of {last} samples cannot be split evenly over {world_size} "
                                f"processes; use a number of processes that divides {reference_gpus}")

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def global_order(self) -> np.ndarray:
        """Sample indices in the order of this epoch's global batches."""
        if self.order == "reshuffle":
            return _rng(self.seed, 0, self.epoch).permutation(self.n)
        perm = torch.randperm(self.n, generator=torch.Generator().manual_seed(self.seed)).numpy()
        return np.concatenate([perm, perm[: self.padded - self.n]])

    def __len__(self) -> int:
        return self.n // self.global_batch if self.order == "reshuffle" else -(-self.padded // self.global_batch)

    def __iter__(self) -> Iterator[list[int]]:
        order = self.global_order()
        for b in range(len(self)):
            batch = order[b * self.global_batch: (b + 1) * self.global_batch]
            share = len(batch) // self.world_size
            yield batch[self.rank * share: (self.rank + 1) * share].tolist()
