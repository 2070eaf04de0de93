"""Data layouts on disk and the training data of CSA.

Layout under a data root (see docs/ARCHITECTURE.md)::

    annotations/<dataset>/gnd_<dataset>.pkl     revisitop ground truth {imlist, qimlist, gnd}
    annotations/<trainset>.pkl                  {'train': {'cluster': [...]}, 'val': {...}}
    test/<dataset>/<name>.pkl                   {'db': (N, D), 'query': (Q, D)} float32 rows
    train/<trainset>/<name>.pkl                 {'train': (N, D), 'val': (M, D)} float32 rows

The official code's flat ``train/<name>.pkl`` is read too for the trainset ``retrieval-SfM-120k``.
Arrays stored column-wise (cirtorch's D x N) are transposed when the shapes (or the unit row norms)
make the orientation unambiguous, and refused otherwise.

Training data: every training image is a query; :class:`NeighbourTable` holds its nearest
neighbours by descriptor similarity (itself first), :class:`TrainingSet` turns a sample index into
token / anchor indices and relevance targets, and :class:`GlobalBatchSampler` fixes a global batch
order that is the same for any number of processes.  The (K+1, L) affinity matrices themselves are
built per batch on the device by :func:`csa.engine.batch_affinity`.
"""
from __future__ import annotations

import hashlib
import os
import warnings
from pathlib import Path
from typing import Any, Iterator, NamedTuple, Sequence

import numpy as np
import torch
from tqdm import tqdm

from csa.io import load_pickle, save_pickle
from csa.validation import CSAInputError

__all__ = [
    "REFERENCE_TRAINSET",
    "gnd_path",
    "test_features_path",
    "train_features_path",
    "clusters_path",
    "load_gnd",
    "save_gnd",
    "TestFeatures",
    "load_test_features",
    "save_test_features",
    "load_train_features",
    "save_train_features",
    "load_clusters",
    "save_clusters",
    "neighbour_cache_path",
    "compute_neighbours",
    "NeighbourTable",
    "TrainingSet",
    "GlobalBatchSampler",
    "sample_permutation",
]

#: The trainset of the paper; its features may also sit at the official flat path train/<name>.pkl.
REFERENCE_TRAINSET = "retrieval-SfM-120k"

_HOW_TO_CREATE = (
    "create it with `python -m csa.demo build --source ../shared/data --out data/demo` (demo data), "
    "`python -m csa.download` (the paper's data) or the csa.datasets.save_* functions "
    "(see notebooks/ on feature extraction)"
)


# --------------------------------------------------------------------------------------------
# paths
# --------------------------------------------------------------------------------------------
def gnd_path(data_root: str | os.PathLike, dataset: str) -> Path:
    """``<data_root>/annotations/<dataset>/gnd_<dataset>.pkl``."""
    return Path(data_root) / "annotations" / dataset / f"gnd_{dataset}.pkl"


def test_features_path(data_root: str | os.PathLike, dataset: str, name: str) -> Path:
    """``<data_root>/test/<dataset>/<name>.pkl``."""
    return Path(data_root) / "test" / dataset / f"{name}.pkl"


def train_features_path(data_root: str | os.PathLike, trainset: str, name: str) -> Path:
    """``<data_root>/train/<trainset>/<name>.pkl`` (the path this project writes)."""
    return Path(data_root) / "train" / trainset / f"{name}.pkl"


def clusters_path(data_root: str | os.PathLike, trainset: str) -> Path:
    """``<data_root>/annotations/<trainset>.pkl``."""
    return Path(data_root) / "annotations" / f"{trainset}.pkl"


def _require(path: Path, what: str, how: str = _HOW_TO_CREATE) -> Path:
    if not path.is_file():
        raise CSAInputError(f"{what} not found at {path}; {how}")
    return path


def _load(path: Path, what: str) -> Any:
    try:
        return load_pickle(path)
    except Exception as exc:  # truncated / foreign file
        raise CSAInputError(f"cannot read {what} {path} ({type(exc).__name__}: {exc}); the file is damaged "
                            f"or not a pickle: delete it and write it again") from exc


# --------------------------------------------------------------------------------------------
# array orientation
# --------------------------------------------------------------------------------------------
def _unit_rows(a: np.ndarray, axis: int) -> bool:
    norms = np.linalg.norm(a.astype(np.float64, copy=False), axis=axis)
    return bool(norms.size) and bool(np.all(np.abs(norms - 1.0) < 1e-2))


def _as_rows(a: Any, what: str, path: Path, n_rows: int | None = None, dim: int | None = None) -> np.ndarray:
    """Return ``a`` as a float32 (n, D) array, transposing a D x n array when that is unambiguous.

    Evidence, in order: a known row count ``n_rows``, a known dimension ``dim``, then which axis
    has unit L2 norms.  Ambiguous arrays are refused.
    """
    if isinstance(a, torch.Tensor):
        a = a.detach().cpu().numpy()
    a = np.asarray(a)
    if a.ndim != 2 or not np.issubdtype(a.dtype, np.floating):
        raise CSAInputError(f"{what} in {path} must be a 2-D float array (one row per image), got "
                            f"shape {a.shape} dtype {a.dtype}; rewrite it with csa.datasets.save_*")
    r, c = a.shape

    def decide() -> bool | None:  # True: already rows, False: transpose, None: unknown
        for known, ax in ((n_rows, 0), (dim, 1)):
            if known is not None:
                fits_rows, fits_cols = a.shape[ax] == known, a.shape[1 - ax] == known
                if fits_rows != fits_cols:
                    return fits_rows
        if r != c:
            rows_unit, cols_unit = _unit_rows(a, 1), _unit_rows(a, 0)
            if rows_unit != cols_unit:
                return rows_unit
        return None

    rows = decide()
    if rows is None:
        raise CSAInputError(f"{what} in {path} has shape {a.shape} and its orientation (rows = images, or "
                            f"cirtorch's D x N) cannot be told apart; save it as (N, D) rows, L2-normalized")
    out = a if rows else a.T
    if n_rows is not None and out.shape[0] != n_rows:
        raise CSAInputError(f"{what} in {path} has {out.shape[0]} rows but {n_rows} were expected "
                            f"(one per image of the annotations); do features and annotations belong together?")
    if dim is not None and out.shape[1] != dim:
        raise CSAInputError(f"{what} in {path} has dimension {out.shape[1]}, expected {dim}")
    return np.ascontiguousarray(out, dtype=np.float32)


# --------------------------------------------------------------------------------------------
# ground truth, test and train features, clusters
# --------------------------------------------------------------------------------------------
def load_gnd(data_root: str | os.PathLike, dataset: str) -> dict:
    """Load the revisitop ground truth ``{'imlist', 'qimlist', 'gnd'}`` of ``dataset``."""
    path = _require(gnd_path(data_root, dataset), f"ground truth of '{dataset}'")
    cfg = _load(path, "ground truth")
    if not isinstance(cfg, dict) or not {"imlist", "qimlist", "gnd"} <= set(cfg):
        raise CSAInputError(f"{path} is not a revisitop ground truth: it needs the keys 'imlist', 'qimlist', "
                            f"'gnd' (got {sorted(cfg) if isinstance(cfg, dict) else type(cfg).__name__})")
    return cfg


def save_gnd(data_root: str | os.PathLike, dataset: str, gnd: dict) -> Path:
    """Write a ground truth dict (keys 'imlist', 'qimlist', 'gnd') atomically; return its path."""
    if not isinstance(gnd, dict) or not {"imlist", "qimlist", "gnd"} <= set(gnd):
        raise CSAInputError("save_gnd needs a dict with keys 'imlist', 'qimlist' and 'gnd'")
    path = gnd_path(data_root, dataset)
    save_pickle(gnd, path)
    return path


class TestFeatures(NamedTuple):
    """Descriptors of a test dataset: ``query`` (Q, D) and ``db`` (N, D), float32 rows."""

    query: np.ndarray
    db: np.ndarray


def load_test_features(data_root: str | os.PathLike, dataset: str, name: str) -> TestFeatures:
    """Load ``test/<dataset>/<name>.pkl``; return ``TestFeatures(query (Q, D), db (N, D))``."""
    path = _require(test_features_path(data_root, dataset, name), f"test features '{name}' of '{dataset}'")
    obj = _load(path, "test features")
    if not isinstance(obj, dict) or not {"db", "query"} <= set(obj):
        raise CSAInputError(f"{path} must hold a dict with 'db' and 'query' descriptor arrays")
    db, q = np.asarray(obj["db"]), np.asarray(obj["query"])
    dim = None
    if db.ndim == 2 and q.ndim == 2:  # the shared dimension is D
        if db.shape[1] == q.shape[1] and db.shape[0] != q.shape[0]:
            dim = db.shape[1]
        elif db.shape[0] == q.shape[0] and db.shape[1] != q.shape[1]:
            dim = db.shape[0]
    db = _as_rows(db, "'db'", path, dim=dim)
    q = _as_rows(q, "'query'", path, dim=db.shape[1])
    return TestFeatures(query=q, db=db)


def save_test_features(data_root: str | os.PathLike, dataset: str, name: str, *, query: Any, db: Any) -> Path:
    """Write ``{'db': (N, D), 'query': (Q, D)}`` float32 rows atomically; return the path."""
    path = test_features_path(data_root, dataset, name)
    db = _as_rows(db, "'db'", path)
    q = _as_rows(query, "'query'", path, dim=db.shape[1])
    save_pickle({"db": db, "query": q}, path)
    return path


def _train_file(data_root: str | os.PathLike, trainset: str, name: str) -> Path:
    path = train_features_path(data_root, trainset, name)
    if not path.is_file() and trainset == REFERENCE_TRAINSET:
        flat = Path(data_root) / "train" / f"{name}.pkl"  # the official layout
        if flat.is_file():
            return flat
    return _require(path, f"training features '{name}' of '{trainset}'")


def load_train_features(data_root: str | os.PathLike, trainset: str, name: str, split: str = "train",
                        n_rows: int | None = None) -> np.ndarray:
    """Load the (N, D) float32 descriptors of one split ('train' or 'val') of a trainset.

    ``n_rows`` (e.g. the number of cluster labels) is checked and helps orient D x N arrays.
    """
    path = _train_file(data_root, trainset, name)
    obj = _load(path, "training features")
    if not isinstance(obj, dict) or split not in obj:
        keys = sorted(obj) if isinstance(obj, dict) else type(obj).__name__
        raise CSAInputError(f"{path} has no split '{split}' (found {keys}); it must be a dict "
                            f"{{'train': (N, D), 'val': (M, D)}}")
    return _as_rows(obj[split], f"split '{split}'", path, n_rows=n_rows)


def save_train_features(data_root: str | os.PathLike, trainset: str, name: str, train: Any,
                        val: Any | None = None) -> Path:
    """Write ``{'train': (N, D), 'val': (M, D)}`` float32 rows atomically; return the path."""
    path = train_features_path(data_root, trainset, name)
    obj = {"train": _as_rows(train, "'train'", path)}
    if val is not None:
        obj["val"] = _as_rows(val, "'val'", path, dim=obj["train"].shape[1])
    save_pickle(obj, path)
    return path


def load_clusters(data_root: str | os.PathLike, trainset: str, split: str = "train") -> np.ndarray:
    """Cluster id of every image of a trainset split, as an int64 (N,) array."""
    path = _require(clusters_path(data_root, trainset), f"annotations of trainset '{trainset}'")
    obj = _load(path, "trainset annotations")
    if not isinstance(obj, dict) or split not in obj or "cluster" not in obj[split]:
        raise CSAInputError(f"{path} must be a dict {{'{split}': {{'cluster': [...]}}, ...}} with one cluster id "
                            f"per image; split '{split}' or its 'cluster' list is missing")
    clusters = np.asarray(obj[split]["cluster"])
    if clusters.ndim != 1 or not (np.issubdtype(clusters.dtype, np.integer)
                                  or np.all(np.equal(np.mod(clusters, 1), 0))):
        raise CSAInputError(f"{path}: '{split}'/'cluster' must be a flat list of integer cluster ids")
    return clusters.astype(np.int64)


def save_clusters(data_root: str | os.PathLike, trainset: str, splits: dict[str, dict]) -> Path:
    """Write trainset annotations ``{'train': {'cluster': [...], ...}, 'val': {...}}`` atomically."""
    for split, entry in splits.items():
        if not isinstance(entry, dict) or "cluster" not in entry:
            raise CSAInputError(f"split '{split}' needs a dict with a 'cluster' list")
    path = clusters_path(data_root, trainset)
    save_pickle(splits, path)
    return path


# --------------------------------------------------------------------------------------------
# nearest-neighbour table
# --------------------------------------------------------------------------------------------
def _tie_ordered(values: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    """Order each row's selected indices by value (descending), ties by index (ascending)."""
    by_index = torch.sort(indices, dim=1, stable=True)
    vals = torch.gather(values, 1, by_index.indices)
    order = torch.sort(vals, dim=1, descending=True, stable=True).indices
    return torch.gather(by_index.values, 1, order)


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
        val, idx = torch.topk(sim, width, dim=1)
        out[start:stop] = _tie_ordered(val, idx).cpu().numpy()
    return out


def _fingerprint(features: Sequence[np.ndarray]) -> str:
    h = hashlib.sha1()
    for f in features:
        h.update(str(f.shape).encode())
        h.update(np.ascontiguousarray(f[:: max(1, len(f) // 64)]).tobytes())
        h.update(np.float64(np.sum(f, dtype=np.float64)).tobytes())
    return h.hexdigest()


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
        fingerprint = _fingerprint(feats)
        self.computed = False
        cached = self._read_cache(fingerprint)
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
                save_pickle({"indices": self.indices, "fingerprint": fingerprint, "topk": self.topk,
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


class TrainingSet(torch.utils.data.Dataset):
    """Item ``i`` -> ``{'index', 'tokens' (K+1,), 'anchors' (L,), 'targets' (K+1,)}``.

    ``tokens`` are stacked feature indices: the sample itself first, then its top-K neighbours in a
    per-sample random order (``permute=True``; see :func:`sample_permutation`, call
    :meth:`set_epoch` every epoch). ``targets[j] = 1.0`` when token j has the query's cluster
    (``targets[0] == 1``).  ``anchors`` keep their similarity order (self first).  No descriptor
    arithmetic happens here: :func:`csa.engine.batch_affinity` builds the batch on the device.
    """

    def __init__(self, table: NeighbourTable, clusters: Any, seed: int = 0, permute: bool = True) -> None:
        clusters = np.asarray(clusters).astype(np.int64).ravel()
        if len(clusters) != len(table):
            raise CSAInputError(f"{len(clusters)} cluster labels for {len(table)} training samples; with several "
                                f"feature sets pass the labels repeated once per set")
        self.table, self.clusters = table, clusters
        self.seed, self.permute, self.epoch = int(seed), bool(permute), 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return len(self.table)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
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
    a single process with the same global batch size.

    The order is a permutation drawn from (seed, epoch) (or 0..N-1 without ``shuffle``); incomplete
    last global batches are dropped. Rank r takes the slice [r * B/W, (r + 1) * B/W) of each
    global batch of size B, so B must be divisible by the world size W.
    """

    def __init__(self, n: int, global_batch: int, rank: int = 0, world_size: int = 1, seed: int = 0,
                 shuffle: bool = True) -> None:
        if global_batch < 1 or global_batch % world_size:
            raise CSAInputError(f"global batch size {global_batch} must be a positive multiple of the number of "
                                f"processes ({world_size}); change --batch-size or --nproc_per_node")
        if n < global_batch:
            raise CSAInputError(f"only {n} training samples for a global batch of {global_batch}; lower --batch-size")
        self.n, self.global_batch, self.rank, self.world_size = n, global_batch, rank, world_size
        self.local_batch = global_batch // world_size
        self.seed, self.shuffle, self.epoch = int(seed), shuffle, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def global_order(self) -> np.ndarray:
        if self.shuffle:
            return _rng(self.seed, 0, self.epoch).permutation(self.n)
        return np.arange(self.n)

    def __len__(self) -> int:
        return self.n // self.global_batch

    def __iter__(self) -> Iterator[list[int]]:
        order = self.global_order()
        for b in range(len(self)):
            start = b * self.global_batch + self.rank * self.local_batch
            yield order[start: start + self.local_batch].tolist()
