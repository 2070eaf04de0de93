"""Data layouts on disk: where ground truth, descriptors and trainset annotations live, and how they are read.

Layout under a data root (see docs/ARCHITECTURE.md)::

    annotations/<dataset>/gnd_<dataset>.pkl     revisitop ground truth {imlist, qimlist, gnd}
    annotations/<trainset>.pkl                  {'train': {'cluster': [...]}, 'val': {...}}
    test/<dataset>/<name>.pkl                   {'db': (N, D), 'query': (Q, D)} float32 rows
    train/<trainset>/<name>.pkl                 {'train': (N, D), 'val': (M, D)} float32 rows

The official code's flat ``train/<name>.pkl`` is read too for the trainset ``retrieval-SfM-120k``.
Arrays stored column-wise (cirtorch's D x N) are transposed when the shapes (or the unit row norms)
make the orientation unambiguous, and refused otherwise.

Every pickle is read with the restricted unpickler of :func:`csa.fileio.load_pickle` (plain data and
numpy arrays only).  What is read is checked against what it must match: a ground truth's index
lists must be integers inside its ``imlist`` and it needs one entry per ``qimlist`` name; test
features must have one database row per ``imlist`` name and one query row per ``qimlist`` name
when the dataset's ground truth sits in the same data root.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch

from csa.fileio import PickleRefused, load_pickle, save_pickle
from csa.validation import CSAInputError, check_gnd

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
]

#: The trainset of the paper; its features may also sit at the official flat path train/<name>.pkl.
REFERENCE_TRAINSET = "retrieval-SfM-120k"

_HOW_TO_CREATE = (
    "create it with `csa demo build --source ../shared/data --out data/demo` (demo data), "
    "`csa download` (the paper's data) or the csa.data.layout.save_* functions "
    "(see notebooks/ on feature extraction)"
)
_HOW_TO_EXTRACT = (
    "extract it with `csa demo extract --root data/demo` (demo data; its test descriptors can also be "
    "restored in seconds from their committed float16 copy with "
    "csa.descriptors.compact.ensure_demo_features(\"data/demo\")), "
    "`csa extract <dataset> --data-root data --backbone <network> --download` (the paper's data) "
    "or the csa.data.layout.save_* functions"
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
    except PickleRefused:
        raise
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
                            f"shape {a.shape} dtype {a.dtype}; rewrite it with csa.data.layout.save_*")
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
                            f"(one per image of the annotations); do features and annotations belong together? "
                            f"Re-extract them (csa extract / csa demo extract --force)")
    if dim is not None and out.shape[1] != dim:
        raise CSAInputError(f"{what} in {path} has dimension {out.shape[1]}, expected {dim}")
    return np.ascontiguousarray(out, dtype=np.float32)


# --------------------------------------------------------------------------------------------
# ground truth, test and train features, clusters
# --------------------------------------------------------------------------------------------
def load_gnd(data_root: str | os.PathLike, dataset: str) -> dict:
    """Load the revisitop ground truth ``{'imlist', 'qimlist', 'gnd'}`` of ``dataset``."""
    path = _require(gnd_path(data_root, dataset), f"ground truth of '{dataset}'")
    gt = _load(path, "ground truth")
    if not isinstance(gt, dict) or not {"imlist", "qimlist", "gnd"} <= set(gt):
        raise CSAInputError(f"{path} is not a revisitop ground truth: it needs the keys 'imlist', 'qimlist', "
                            f"'gnd' (got {sorted(gt) if isinstance(gt, dict) else type(gt).__name__})")
    try:
        check_gnd(gt, n_db=len(gt["imlist"]), n_q=len(gt["qimlist"]))
    except CSAInputError as exc:
        raise CSAInputError(f"{path} is not a consistent ground truth: {exc}") from None
    return gt


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


def load_test_features(data_root: str | os.PathLike, dataset: str, name: str,
                       gnd: dict | None = None) -> TestFeatures:
    """Load ``test/<dataset>/<name>.pkl``; return ``TestFeatures(query (Q, D), db (N, D))``.

    The row counts must match the ``imlist`` and ``qimlist`` of ``gnd`` (``dataset``'s ground truth as
    :func:`load_gnd` returns it, for a caller that has it already) or, without it, of
    ``annotations/<dataset>/gnd_<dataset>.pkl`` when that exists (features of another dataset or version
    are refused).
    """
    path = _require(test_features_path(data_root, dataset, name), f"test features '{name}' of '{dataset}'",
                    _HOW_TO_EXTRACT)
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
    n_db = n_q = None
    if gnd is None and gnd_path(data_root, dataset).is_file():
        gnd = load_gnd(data_root, dataset)
    if gnd is not None:
        n_db, n_q = len(gnd["imlist"]), len(gnd["qimlist"])
    db = _as_rows(db, "'db'", path, n_rows=n_db, dim=dim)
    q = _as_rows(q, "'query'", path, n_rows=n_q, dim=db.shape[1])
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
    return _require(path, f"training features '{name}' of '{trainset}'", _HOW_TO_EXTRACT)


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
