"""Input checks shared by the whole package.

Every check raises :class:`CSAInputError` (a ``ValueError``) with one message that names the problem
and says how to fix it.  Checks run once, at the public boundary: a public function checks its inputs
and hands them to a private kernel, and the package's own callers call those kernels with values they
have already checked.  Conversions between numpy and torch live in :mod:`csa.arrays`.
"""
from __future__ import annotations

import math
import warnings
from typing import Any, Sequence

import numpy as np
import torch

from csa.arrays import as_numpy

__all__ = [
    "CSAError",
    "CSAInputError",
    "check_int",
    "check_float",
    "gnd_list",
    "check_descriptors",
    "check_ranks",
    "check_topk",
    "check_gnd",
    "check_kappas",
    "check_rows",
    "NORM_TOLERANCE",
]

#: Largest allowed deviation of a descriptor's L2 norm from 1 before it counts as "not normalized".
#: Loose enough for descriptors stored in float16, tight enough to catch un-normalized features.
NORM_TOLERANCE = 1e-3


class CSAError(Exception):
    """Base of every error the package raises on purpose; its message names the problem and the fix."""


class CSAInputError(CSAError, ValueError):
    """Bad input given to a csa function (wrong shape, dtype, range, missing key, corrupt file...)."""


def _shape(x: Any) -> tuple[int, ...]:
    return tuple(x.shape)


def check_int(name: str, value: Any, low: int, high: int | None = None, hint: str = "") -> int:
    """``value`` as an int in [low, high]; booleans and non-integers are refused."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise CSAInputError(f"{name} must be an integer, got {value!r}")
    value = int(value)
    if value < low:
        raise CSAInputError(f"{name} must be >= {low}, got {value}{hint}")
    if high is not None and value > high:
        raise CSAInputError(f"{name}={value} is too large: it must be <= {high}{hint}")
    return value


def check_float(name: str, value: Any, low: float, high: float | None = None,
                low_open: bool = False, high_open: bool = False) -> float:
    """``value`` as a finite float in the interval [low, high] (ends excluded when ``*_open``)."""
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise CSAInputError(f"{name} must be a number, got {value!r}")
    value = float(value)
    if not math.isfinite(value):
        raise CSAInputError(f"{name} must be finite, got {value}")
    if value < low or (low_open and value == low):
        raise CSAInputError(f"{name} must be {'>' if low_open else '>='} {low}, got {value}")
    if high is not None and (value > high or (high_open and value == high)):
        raise CSAInputError(f"{name} must be {'<' if high_open else '<='} {high}, got {value}")
    return value


def _as_float_tensor(x: Any, name: str) -> torch.Tensor:
    if isinstance(x, torch.Tensor):
        t = x
    elif isinstance(x, np.ndarray):
        t = torch.from_numpy(x)
    else:
        raise CSAInputError(f"{name} must be a numpy array or a torch tensor, got {type(x).__name__}")
    if not (t.is_floating_point()):
        raise CSAInputError(f"{name} must hold floating-point descriptors, got dtype {t.dtype}; "
                            f"convert with .astype(np.float32) / .float()")
    return t


def _row_stats(t: torch.Tensor, chunk: int = 65536) -> tuple[int, torch.Tensor]:
    """(number of rows with NaN/inf, float64 row norms), computed in row chunks so that a 1M x 2048
    database needs no full-size temporary copy."""
    bad = 0
    norms = torch.empty(t.shape[0], dtype=torch.float64)
    for start in range(0, t.shape[0], chunk):
        block = t[start:start + chunk]
        bad += int((~torch.isfinite(block)).any(dim=1).sum())
        norms[start:start + chunk] = torch.linalg.vector_norm(block.double(), dim=1)
    return bad, norms


def check_descriptors(qvecs: Any, dbvecs: Any, normalize: str = "warn") -> tuple[Any, Any]:
    """Check query (Q, D) and database (N, D) descriptors; return them (renormalized if needed).

    Checks: numpy or torch floating-point, 2-D (one row per image), same dimension D, at least one
    row each, all values finite, rows L2-normalized (within :data:`NORM_TOLERANCE`).

    ``normalize`` says what to do with rows that are not unit-norm:
    ``'warn'`` (default) renormalizes them and emits a ``UserWarning`` — cosine similarity is what
    every ranking in CSA means, so renormalizing is the intended behaviour, but the warning tells you
    your features were not what you thought; ``'silent'`` renormalizes without a warning;
    ``'error'`` raises :class:`CSAInputError`.  Zero rows always raise.
    The returned arrays have the same kind (numpy/torch) as the inputs; they are the inputs
    themselves when nothing had to change.
    """
    if normalize not in ("warn", "error", "silent"):
        raise CSAInputError(f"normalize must be 'warn', 'error' or 'silent', got {normalize!r}")
    tensors = []
    for name, x in (("qvecs", qvecs), ("dbvecs", dbvecs)):
        t = _as_float_tensor(x, name)
        if t.ndim != 2:
            raise CSAInputError(f"{name} must be 2-D (one row per image, shape (n, D)), got shape {_shape(x)}")
        if t.shape[0] == 0 or t.shape[1] == 0:
            raise CSAInputError(f"{name} is empty (shape {_shape(x)}); pass at least one descriptor")
        tensors.append(t)
    if tensors[0].shape[1] != tensors[1].shape[1]:
        raise CSAInputError(f"descriptor dimensions differ: qvecs has D={tensors[0].shape[1]}, dbvecs has "
                            f"D={tensors[1].shape[1]}; both must come from the same network (rows are images: "
                            f"transpose D x N arrays with .T)")
    return (check_rows(qvecs, "qvecs", normalize, _tensor=tensors[0]),
            check_rows(dbvecs, "dbvecs", normalize, _tensor=tensors[1]))


def check_rows(x: Any, name: str, normalize: str = "warn", _tensor: torch.Tensor | None = None) -> Any:
    """Check that the rows of the 2-D float array ``x`` are finite, non-zero and L2-normalized.

    ``normalize`` is as in :func:`check_descriptors` (``'warn'`` renormalizes with a warning,
    ``'silent'`` without, ``'error'`` raises); ``name`` says which array the message is about.
    Returns ``x`` (renormalized if needed, same kind).
    """
    t = _tensor if _tensor is not None else _as_float_tensor(x, name)
    if t.ndim != 2:
        raise CSAInputError(f"{name} must be 2-D (one row per image, shape (n, D)), got shape {_shape(x)}")
    bad, norms = _row_stats(t)
    if bad:
        raise CSAInputError(f"{name} has {bad} row(s) with NaN or inf values; "
                            f"fix or drop those descriptors before ranking")
    if bool((norms == 0).any()):
        raise CSAInputError(f"{name} has {int((norms == 0).sum())} all-zero row(s); they have no direction "
                            f"and cannot be L2-normalized — drop or recompute them")
    off = (norms - 1).abs() > NORM_TOLERANCE
    if bool(off.any()):
        msg = (f"{name}: {int(off.sum())} of {t.shape[0]} rows are not L2-normalized "
               f"(norms from {float(norms.min()):.4g} to {float(norms.max()):.4g})")
        if normalize == "error":
            raise CSAInputError(msg + "; L2-normalize the rows (x / ||x||) before calling")
        if normalize == "warn":
            warnings.warn(msg + "; renormalizing them", UserWarning, stacklevel=4)
        t = (t.double() / norms[:, None]).to(t.dtype)
        x = t.numpy() if isinstance(x, np.ndarray) else t
    return x


def _first_repeating_column(r: np.ndarray, n_db: int, chunk: int = 65536) -> int | None:
    """Index of the first column of ``r`` (integers in [0, n_db)) holding an index twice, else None.

    Short prefixes are sorted column-wise in one vectorized call.  Long ones (a full ranking of a
    1M-image database) mark each column's indices in a (Q, n_db) boolean table, reading ``r`` in
    blocks of ``chunk`` rows so that every access stays cache-friendly (about 1 s for 1M x 70).
    """
    m, n_q = r.shape
    if m < 2:
        return None
    if m * max(1, int(math.log2(m))) <= 4 * n_db:
        s = np.sort(r, axis=0)
        repeats = np.flatnonzero((s[1:] == s[:-1]).any(axis=0))
        return int(repeats[0]) if repeats.size else None
    seen = np.zeros((n_q, n_db), dtype=bool)
    for start in range(0, m, chunk):
        block = np.ascontiguousarray(r[start:start + chunk].T)
        for q in range(n_q):
            seen[q, block[q]] = True
    repeats = np.flatnonzero(np.count_nonzero(seen, axis=1) != m)
    return int(repeats[0]) if repeats.size else None


def check_ranks(ranks: Any, n_db: int | None, n_q: int, min_rows: int = 1, prefix: int | None = None) -> Any:
    """Check a ranking in the (N or K, Q) layout: integer, 2-D, ``n_q`` columns, and in each column's
    used prefix (the first ``prefix`` rows; all rows by default) distinct indices in [0, n_db).

    ``min_rows`` is the number of rows the caller needs (e.g. max(K, L - 1) for re-ranking);
    ``n_db=None`` (database size unknown, e.g. in :func:`csa.evaluate.compute_map`) checks indices
    are >= 0 only.  Returns ``ranks`` unchanged.
    """
    if isinstance(ranks, torch.Tensor):
        is_int = not ranks.is_floating_point() and not ranks.is_complex() and ranks.dtype != torch.bool
    elif isinstance(ranks, np.ndarray):
        is_int = np.issubdtype(ranks.dtype, np.integer)
    else:
        raise CSAInputError(f"ranks must be a numpy array or a torch tensor, got {type(ranks).__name__}")
    if not is_int:
        raise CSAInputError(f"ranks must hold integer database indices, got dtype {ranks.dtype}")
    if ranks.ndim != 2:
        raise CSAInputError(f"ranks must be 2-D with layout (N or K, Q) (ranks[:, q] is query q's order), "
                            f"got shape {tuple(ranks.shape)}")
    if ranks.shape[1] != n_q:
        hint = " (it looks transposed: use ranks.T)" if ranks.shape[0] == n_q else ""
        raise CSAInputError(f"ranks has {ranks.shape[1]} columns but there are {n_q} queries; the layout is "
                            f"(N or K, Q){hint}")
    if ranks.shape[0] < min_rows:
        raise CSAInputError(f"ranks has {ranks.shape[0]} rows but {min_rows} are needed (top-K / anchors); "
                            f"compute a deeper first-stage ranking or lower topk / anchor_len")
    if n_db is not None and ranks.shape[0] > n_db:
        raise CSAInputError(f"ranks has {ranks.shape[0]} rows but the database has only {n_db} images")
    used = as_numpy(ranks)[: ranks.shape[0] if prefix is None else prefix]
    if used.size == 0:
        return ranks
    lo, hi = int(used.min()), int(used.max())
    if lo < 0 or (n_db is not None and hi >= n_db):
        where = f"the database range [0, {n_db - 1}]" if n_db is not None else "the database range (>= 0)"
        raise CSAInputError(f"ranks holds indices from {lo} to {hi}, outside {where}; were they computed "
                            f"against another database?")
    column = _first_repeating_column(used, hi + 1)
    if column is not None:
        raise CSAInputError(f"ranks column {column} (query {column}) lists a database index more than once in "
                            f"its first {used.shape[0]} rows; a ranking is an order of distinct images — "
                            f"check how it was built (layout (N or K, Q), one column per query)")
    return ranks


def check_kappas(kappas: Sequence[int]) -> list[int]:
    """The ranks ``k`` of mP@k as a list of positive integers."""
    try:
        values = list(kappas)
    except TypeError as exc:
        raise CSAInputError(f"kappas must be a list of positive integers such as [1, 5, 10], got {kappas!r}") from exc
    for k in values:
        if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
            raise CSAInputError(f"kappas must be positive integers (precision at k needs k >= 1), got {values}")
    return [int(k) for k in values]


def check_topk(topk: int, anchor_len: int, n_db: int) -> None:
    """Check the re-ranking depth K and the anchor count L against a database of ``n_db`` images.

    The anchors are the query plus the top L-1 database images, so L-1 <= n_db is needed; the
    top-K needs K <= n_db.
    """
    for name, v in (("topk", topk), ("anchor_len", anchor_len)):
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 1:
            raise CSAInputError(f"{name} must be a positive integer, got {v!r}")
    if topk > n_db:
        raise CSAInputError(f"topk={topk} is larger than the database ({n_db} images); use topk <= {n_db}")
    if anchor_len - 1 > n_db:
        raise CSAInputError(f"anchor_len={anchor_len} needs {anchor_len - 1} database anchors but the database "
                            f"has {n_db} images; use anchor_len <= {n_db + 1} (and a model trained for it)")


def gnd_list(gnd: Any) -> Sequence[dict]:
    """The per-query list of a ground truth given either as the whole revisitop dict or as its ``'gnd'`` list."""
    if isinstance(gnd, dict):
        if "gnd" not in gnd:
            raise CSAInputError(f"a ground-truth dict needs a 'gnd' list (got keys {sorted(gnd)[:6]}); pass the "
                                f"revisitop dict {{'imlist', 'qimlist', 'gnd'}} or its 'gnd' list")
        return gnd["gnd"]
    return gnd


def check_gnd(gnd: Any, n_db: int | None = None, n_q: int | None = None) -> Sequence[dict]:
    """Check revisitop ground truth: dicts with 'easy'/'hard'/'junk' (raw) or 'ok'/'junk', one per query.

    ``gnd`` is the whole revisitop dict or its ``'gnd'`` list; the list is returned.  Index lists
    must hold non-negative integers; with ``n_db`` given they must lie in [0, n_db), with ``n_q``
    given there must be one entry per query.
    """
    gnd = gnd_list(gnd)
    if not isinstance(gnd, (list, tuple)) or len(gnd) == 0:
        raise CSAInputError(f"gnd must be a non-empty list with one dict per query, got {type(gnd).__name__}")
    if n_q is not None and len(gnd) != n_q:
        raise CSAInputError(f"gnd has {len(gnd)} queries but there are {n_q} queries (query descriptors); give "
                            f"one ground-truth entry per query, in the order of the queries")
    for i, g in enumerate(gnd):
        if not isinstance(g, dict):
            raise CSAInputError(f"gnd[{i}] must be a dict, got {type(g).__name__}")
        if "ok" in g:
            needed = ("ok",)
        else:
            needed = ("easy", "hard", "junk")
        missing = [k for k in needed if k not in g]
        if missing:
            raise CSAInputError(f"gnd[{i}] is missing key(s) {missing}; each query needs 'easy', 'hard', 'junk' "
                                f"(raw revisitop) or 'ok' (+ optional 'junk') (one protocol)")
        for k in ("ok", "easy", "hard", "junk"):
            if k in g:  # a protocol's ok/junk may be floats: revisitop builds them with np.concatenate
                _check_index_list(np.asarray(g[k]), f"gnd[{i}]['{k}']", n_db, whole_floats="ok" in g)
    return gnd


def _check_index_list(idx: np.ndarray, name: str, n_db: int | None, whole_floats: bool = False) -> None:
    if idx.size == 0:
        return
    if not np.issubdtype(idx.dtype, np.integer):
        whole = (whole_floats and np.issubdtype(idx.dtype, np.floating)
                 and bool(np.all(np.isfinite(idx) & (idx == np.round(idx)))))
        if not whole:
            raise CSAInputError(f"{name} must hold integer database indices, got {idx.dtype}")
    if idx.min() < 0 or (n_db is not None and idx.max() >= n_db):
        bound = f"[0, {n_db - 1}]" if n_db is not None else "[0, N)"
        raise CSAInputError(f"{name} has indices outside {bound}; does the ground truth belong to this database?")
