"""Revisited Oxford/Paris evaluation (mAP and mP@k), a drop-in for revisitop's ``evaluate.py``.

:func:`compute_ap` and :func:`compute_map` return exactly what revisitop returns (same rules,
vectorized): AP by the trapezoid rule over the precision-recall curve; junk images are removed by
shifting the positions of the positives that come after them; queries without positives get
``nan`` and are excluded from the means; precision at k uses revisitop's rule
``kq = min(max(pos), k)`` (1-based positions after junk removal), i.e. if all positives are found
before rank k, precision is measured at the last positive; ``nres`` is the number of positives in
the ground truth, even when a truncated ranking misses some of them (missing ones count as
never retrieved).  One deliberate difference: when a truncated ranking contains *no* positive,
revisitop's mP@k crashes (max of an empty array); here that query's AP is 0 and its P@k is 0.

Inputs are checked before any number is computed (revisitop checks nothing): every column of
``ranks`` must list distinct, non-negative database indices (and indices below ``n_db`` when the
database size is known: given as ``n_db`` or read from the ground truth's ``imlist``), a ranking of a
known database must list all of it unless the caller declares a short list (``short_list=True``),
ground-truth index lists must hold whole numbers, and ``kappas`` positive.  A duplicated or negative
index would otherwise give impossible scores (an AP above 100%).
"""
from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from csa.arrays import as_numpy
from csa.validation import CSAInputError, check_gnd, check_kappas, check_ranks

__all__ = ["compute_ap", "compute_map", "protocol_gnd", "evaluate_revisited", "format_revisited",
           "print_revisited", "query_scores", "protocol_summary", "random_ranking_map", "PROTOCOLS",
           "PROTOCOL_SETS", "database_size"]

PROTOCOLS = ("easy", "medium", "hard")

#: Which ground-truth lists are positives ('ok') and which are ignored ('junk') under each protocol.
PROTOCOL_SETS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "easy": (("easy",), ("junk", "hard")),
    "medium": (("easy", "hard"), ("junk",)),
    "hard": (("hard",), ("junk", "easy")),
}


def compute_ap(ranks: Any, nres: int) -> float:
    """Trapezoid-rule average precision from the sorted 0-based positions of the retrieved positives.

    ``ranks``: positions (after junk removal) of the positives found; ``nres``: total positives.
    """
    pos = np.asarray(ranks, dtype=np.float64)
    if pos.size == 0:
        return 0.0
    j = np.arange(pos.size, dtype=np.float64)
    safe = np.where(pos == 0, 1.0, pos)
    precision_before = np.where(pos == 0, 1.0, j / safe)      # precision just before this positive
    precision_at = (j + 1) / (pos + 1)                         # precision including it
    return float(np.sum((precision_before + precision_at) / 2.0) / nres)


def query_scores(pos: np.ndarray, nres: int, kappas: Sequence[int]) -> tuple[float, np.ndarray]:
    """AP and P@k of one query from the sorted 0-based positions of its positives after junk removal.

    P@k follows revisitop: ``kq = min(max(pos) + 1, k)``; a query whose positives were all missed
    (truncated ranking) gets AP 0 and P@k 0.
    """
    ap = compute_ap(pos, nres)
    prs = np.zeros(len(kappas))
    if pos.size:
        pos1 = pos + 1
        for j, k in enumerate(kappas):
            kq = min(int(pos1.max()), k)
            prs[j] = np.count_nonzero(pos1 <= kq) / kq
    return ap, prs


def _positions(column: np.ndarray, ok: np.ndarray, junk: np.ndarray) -> np.ndarray:
    """0-based positions of positives in ``column`` after removing the junk entries before them."""
    pos = np.flatnonzero(np.isin(column, ok))
    if junk.size:
        jpos = np.flatnonzero(np.isin(column, junk))
        pos = pos - np.searchsorted(jpos, pos, side="left")   # junk strictly before each positive
    return pos


def _means(aps: np.ndarray, prs: np.ndarray) -> tuple[float, np.ndarray]:
    """Means over the queries that have positives (``aps`` not nan), as revisitop reduces them."""
    n = int(np.count_nonzero(~np.isnan(aps)))
    if n == 0:
        return float("nan"), np.full(prs.shape[1], np.nan)
    return float(np.nansum(aps) / n), np.nansum(prs, axis=0) / n


def compute_map(ranks: Any, gnd: Sequence[dict], kappas: Sequence[int] = (), n_db: int | None = None,
                short_list: bool = False) -> tuple[float, np.ndarray, np.ndarray, np.ndarray]:
    """revisitop ``compute_map``: returns ``(map, aps, pr, prs)`` (fractions, not percent).

    ``ranks``: (N or K, Q) database indices; ``gnd``: per query dict with 'ok' and optional 'junk'
    (integer indices; float arrays of whole numbers, as revisitop's ``np.concatenate`` of empty lists
    makes them, are accepted); ``n_db``: the database size, when known (then indices must be below it
    and the ranking must have ``n_db`` rows unless ``short_list=True`` says it is a top-K list).
    """
    gnd = check_gnd(gnd, n_db=n_db)
    ranks = _checked_ranks(ranks, n_db, len(gnd), short_list)
    return _compute_map(ranks, gnd, check_kappas(kappas))


def database_size(gnd: Any, n_rows: int, n_db: int | None = None) -> int | None:
    """The database size a ranking of ``n_rows`` rows is scored against.

    ``n_db`` when given; else, when ``gnd`` is the whole revisitop dict, the length of its ``imlist``
    (or ``n_rows`` when the ranking is longer: a database extended with distractors, as in +R1M,
    ranks more images than the ground truth lists); else unknown (None).
    """
    if n_db is not None:
        return n_db
    if isinstance(gnd, dict) and "imlist" in gnd:
        try:
            listed = len(gnd["imlist"])
        except TypeError:
            raise CSAInputError("the ground truth's 'imlist' must be a list of database image names") from None
        return max(listed, n_rows)
    return None


def _checked_ranks(ranks: Any, n_db: int | None, n_q: int, short_list: bool) -> np.ndarray:
    """``check_ranks`` plus the completeness rule: a ranking of a known database lists every image
    unless the caller says it is a short list."""
    ranks = check_ranks(as_numpy(ranks), n_db, n_q)
    if n_db is not None and not short_list and ranks.shape[0] < n_db:
        raise CSAInputError(f"ranks has {ranks.shape[0]} rows but the database has {n_db} images: a partial ranking "
                            f"would be scored as if the missing positives were never retrieved; give the full (N, Q) "
                            f"ranking, or pass short_list=True if a top-{ranks.shape[0]} list is meant")
    return ranks


def _compute_map(ranks: np.ndarray, gnd: Sequence[dict], kappas: list[int]
                 ) -> tuple[float, np.ndarray, np.ndarray, np.ndarray]:
    """:func:`compute_map` on checked inputs."""
    nq = len(gnd)
    aps = np.zeros(nq)
    prs = np.zeros((nq, len(kappas)))
    for i in range(nq):
        ok = np.asarray(gnd[i]["ok"]).ravel().astype(np.int64)
        if ok.size == 0:
            aps[i] = np.nan
            prs[i, :] = np.nan
            continue
        junk = np.asarray(gnd[i].get("junk", []), dtype=np.int64).ravel()
        aps[i], prs[i] = query_scores(_positions(ranks[:, i], ok, junk), ok.size, kappas)
    mean_ap, mean_pr = _means(aps, prs)
    return mean_ap, aps, mean_pr, prs


def protocol_gnd(gnd: Sequence[dict], protocol: str) -> list[dict]:
    """Per-query {'ok', 'junk'} for a revisited protocol built from the raw easy/hard/junk lists
    (:data:`PROTOCOL_SETS`: easy: ok = easy, junk = junk + hard; medium: ok = easy + hard,
    junk = junk; hard: ok = hard, junk = junk + easy)."""
    if protocol not in PROTOCOL_SETS:
        raise CSAInputError(f"protocol must be one of {PROTOCOLS}, got {protocol!r}")
    ok_keys, junk_keys = PROTOCOL_SETS[protocol]

    def gather(g: dict, keys: tuple[str, ...]) -> np.ndarray:
        return np.concatenate([np.asarray(g[k], dtype=np.int64).ravel() for k in keys])

    return [{"ok": gather(g, ok_keys), "junk": gather(g, junk_keys)} for g in gnd]


def protocol_summary(aps: np.ndarray, prs: np.ndarray, kappas: Sequence[int]) -> dict:
    """``{'map', 'mp@k', 'aps'}`` in percent from per-query fractions (queries with nan AP excluded)."""
    mean_ap, mean_pr = _means(aps, prs)
    return {"map": 100.0 * mean_ap, "mp@k": {int(k): 100.0 * float(p) for k, p in zip(kappas, mean_pr)},
            "aps": 100.0 * aps}


def evaluate_revisited(ranks: Any, gnd: Any, kappas: Sequence[int] = (1, 5, 10), n_db: int | None = None,
                       short_list: bool = False) -> dict[str, dict]:
    """Easy / Medium / Hard results in percent from the raw revisitop ground truth.

    ``gnd``: the revisitop dict or its ``'gnd'`` list; ``n_db``: the database size, by default the
    length of the dict's ``imlist`` (:func:`database_size`).  With a known size, indices must lie in
    ``[0, n_db)`` and the ranking must list the whole database unless ``short_list=True`` (a top-K
    list; positives below it count as never retrieved).  Returns
    ``{'easy'|'medium'|'hard': {'map': float, 'mp@k': {k: float}, 'aps': (Q,) array}}``;
    ``aps`` has ``nan`` for queries without positives under that protocol.
    """
    rows = np.shape(ranks)[0] if np.ndim(ranks) == 2 else 0
    n_db = database_size(gnd, rows, n_db)
    gnd = check_gnd(gnd, n_db=n_db)
    if any("ok" in g for g in gnd):
        raise CSAInputError("evaluate_revisited needs the raw revisitop gnd (easy/hard/junk per query); for a "
                            "single ok/junk protocol call compute_map")
    ranks = _checked_ranks(ranks, n_db, len(gnd), short_list)
    kappas = check_kappas(kappas)
    results = {}
    for proto in PROTOCOLS:
        _, aps, _, prs = _compute_map(ranks, protocol_gnd(gnd, proto), kappas)
        results[proto] = protocol_summary(aps, prs, kappas)
    return results


def random_ranking_map(gnd: Any, n_db: int, n_trials: int = 100, seed: int = 0) -> dict[str, float]:
    """Mean E/M/H mAP (percent) of ``n_trials`` seeded uniformly random rankings: the chance level."""
    gnd = check_gnd(gnd)
    rng = np.random.default_rng(seed)
    acc = {p: 0.0 for p in PROTOCOLS}
    for _ in range(n_trials):
        ranks = np.stack([rng.permutation(n_db) for _ in range(len(gnd))], axis=1)
        res = evaluate_revisited(ranks, gnd)
        for p in acc:
            acc[p] += res[p]["map"] / n_trials
    return acc


def format_revisited(dataset: str, results: dict[str, dict], method: str = "") -> str:
    """revisitop-style summary lines, e.g. ``>> roxford5k: mAP E: 67.3, M: 44.3, H: 20.1``."""
    tag = f"{dataset}" + (f" ({method})" if method else "")
    e, m, h = (results[p] for p in PROTOCOLS)
    lines = [f">> {tag}: mAP E: {e['map']:.1f}, M: {m['map']:.1f}, H: {h['map']:.1f}"]
    ks = list(e["mp@k"])
    if ks:
        def fmt(r: dict) -> str:
            return "[" + ", ".join(f"{r['mp@k'][k]:.1f}" for k in ks) + "]"
        lines.append(f">> {tag}: mP@k{ks} E: {fmt(e)}, M: {fmt(m)}, H: {fmt(h)}")
    return "\n".join(lines)


def print_revisited(dataset: str, results: dict[str, dict], method: str = "") -> None:
    """Print :func:`format_revisited`."""
    print(format_revisited(dataset, results, method))
