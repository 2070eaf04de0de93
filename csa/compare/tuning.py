"""Parameters of the untrained re-rankers chosen the way CSA's recipe is: on the training city, never the test city.

CSA's demo recipe is selected on the held-out landmarks of the city its model trains on; a baseline that
needs no training gets the same treatment here.  Each parameter (L of the affinity baselines, n of the
query / database expansions, k of diffusion, k1 of k-reciprocal) is tried over a small grid on the
training city's leave-one-out queries, and the value with the highest Medium mAP is kept; ties go to
the first value of the grid, ordered from the simplest (fewest neighbours) up.  The test city's queries
are never looked at.  The first-stage K of the top-K re-rankers is not selected: it is CSA's test K.
"""
from __future__ import annotations

from functools import partial
from typing import Any, Mapping, Sequence

import numpy as np
import pandas as pd

from csa.compare.affinity_baseline import affinity_cosine
from csa.compare.chain import compose
from csa.compare.inputs import Ranker
from csa.compare.diffusion import diffusion
from csa.compare.expansion import AugmentDatabase, alpha_qe, aqe
from csa.compare.k_reciprocal import k_reciprocal
from csa.data.demo import CITIES, LOO_BASE
from csa.evaluate import PROTOCOLS, evaluate_revisited
from csa.progress import progress_bar
from csa.search import _first_stage
from csa.validation import CSAInputError, check_descriptors, check_gnd

__all__ = ["GRIDS", "training_benchmark", "untrained_ranker", "select_setting", "select_setting_pooled",
           "select_untrained", "tuned_methods"]

#: Untrained re-ranker -> (its selected parameter, the values tried, simplest first).
GRIDS: dict[str, tuple[str, tuple[int, ...]]] = {
    "AQE": ("n", (1, 2, 5, 10)),
    "αQE": ("n", (2, 5, 10, 20, 50)),
    "αDBA": ("n", (2, 5, 10, 20, 50)),
    "αDBA+αQE": ("n", (2, 5, 10, 20, 50)),
    "diffusion": ("k", (10, 20, 50, 100)),
    "k-reciprocal": ("k1", (10, 20, 40)),
    "affinity cosine": ("L", (32, 64, 128, 256, 512)),
    "affinity cosine (centred)": ("L", (32, 64, 128, 256, 512)),
}


def training_benchmark(dataset: str) -> str:
    """The leave-one-out benchmark of the city whose photos train the model that re-ranks demo ``dataset``.

    On the demo each city is re-ranked by the model trained on the other city, so e.g.
    ``roxford5k-mini`` and ``roxford5k-mini-loo`` give ``rparis6k-mini-loo``: the queries on which the
    settings of everything that re-ranks Oxford are chosen.
    """
    city = LOO_BASE.get(dataset, dataset)
    if city not in CITIES:
        raise CSAInputError(f"{dataset!r} is not a demo benchmark; choose one of "
                            f"{sorted(CITIES) + sorted(LOO_BASE)}")
    (other,) = [name for name in CITIES if name != city]
    return CITIES[other]["loo"]


def untrained_ranker(name: str, value: int, topk: int, n_db: int) -> Ranker:
    """The untrained re-ranker ``name`` (a key of :data:`GRIDS`) with its selected parameter at ``value``.

    The other parameters are those of :func:`csa.compare.methods.default_methods` (α = 3; λ = 0.3 and
    k2 = 6; diffusion α = 0.99, γ = 3, query k = 10, no truncation); every depth is capped to the
    database size ``n_db``, and the top-K re-rankers re-rank ``topk`` candidates.
    """
    if name not in GRIDS:
        raise CSAInputError(f"no selection grid for {name!r}; choose from {sorted(GRIDS)}")

    def cap(v: int, limit: int) -> int:
        return max(1, min(int(v), limit))

    k = cap(topk, n_db)
    if name.startswith("affinity cosine"):
        return partial(affinity_cosine, topk=k, anchor_len=cap(value, n_db + 1), centred=name.endswith("(centred)"))
    if name == "AQE":
        return partial(aqe, n=cap(value, n_db))
    if name == "αQE":
        return partial(alpha_qe, n=cap(value, n_db), alpha=3.0)
    if name == "αDBA":
        return compose(AugmentDatabase(n=cap(value, n_db - 1), alpha=3.0))
    if name == "αDBA+αQE":
        return compose(AugmentDatabase(n=cap(value, n_db - 1), alpha=3.0), partial(alpha_qe, n=cap(value, n_db), alpha=3.0))
    if name == "diffusion":
        return partial(diffusion, k=cap(value, n_db), truncation=None, alpha=0.99, gamma=3.0, iterations=20,
                       query_k=cap(10, n_db))
    return partial(k_reciprocal, k1=cap(value, k), k2=6, lambda_value=0.3, topk=k)


def select_setting(candidates: Mapping[Any, Ranker], qvecs: Any, dbvecs: Any, gnd: Any, protocol: str = "medium",
                   first_stage_ranks: Any = None) -> tuple[Any, pd.DataFrame]:
    """Run every candidate (value -> ranker) on one benchmark and keep the best value.

    Pass the *training* city's benchmark.  The score is the ``protocol`` mAP (percent) of each
    candidate's ranking of the first stage ``first_stage_ranks`` (default: the exact cosine ranking);
    the best value wins, ties go to the first candidate in order.  Returns (value, table with one row
    per candidate: value, mAP, chosen).
    """
    if not candidates:
        raise CSAInputError("candidates is empty: give at least one {value: ranker}")
    if protocol not in PROTOCOLS:
        raise CSAInputError(f"protocol must be one of {list(PROTOCOLS)}, not {protocol!r}")
    qvecs, dbvecs = check_descriptors(qvecs, dbvecs, normalize="warn")
    gnd = check_gnd(gnd, n_db=dbvecs.shape[0], n_q=qvecs.shape[0])
    ranks = _first_stage(qvecs, dbvecs) if first_stage_ranks is None else first_stage_ranks
    return _select_setting(candidates, qvecs, dbvecs, gnd, protocol, ranks)


def _select_setting(candidates: Mapping[Any, Ranker], qvecs: np.ndarray, dbvecs: np.ndarray, gnd: list,
                    protocol: str, ranks: np.ndarray) -> tuple[Any, pd.DataFrame]:
    """:func:`select_setting` on inputs already checked (descriptors, ground truth, first-stage ranks)."""
    scores = [evaluate_revisited(ranker(qvecs, dbvecs, ranks), gnd)[protocol]["map"] for ranker in candidates.values()]
    values = list(candidates)
    best = _best(scores)
    table = pd.DataFrame({"value": values, f"{protocol}_map": scores, "chosen": [i == best for i in range(len(values))]})
    return values[best], table


def _best(scores: Sequence[float]) -> int:
    """Index of the highest score; ties go to the first."""
    return max(range(len(scores)), key=lambda i: (scores[i], -i))


def select_setting_pooled(candidates: Mapping[Any, Ranker], benchmarks: Sequence[tuple[Any, Any, Any]],
                          protocol: str = "medium") -> tuple[Any, pd.DataFrame]:
    """:func:`select_setting` over several (training) benchmarks ``(qvecs, dbvecs, gnd)`` pooled by query.

    Every candidate re-ranks each benchmark's first stage; its score is the sum over benchmarks of the
    ``protocol`` mAP times the benchmark's number of queries (each query counts once, whichever benchmark it
    belongs to); the best value wins, ties go to the first candidate.  Returns (value, table with one row per
    candidate: value, the query-weighted mean mAP, chosen).
    """
    if not benchmarks:
        raise CSAInputError("benchmarks is empty: give at least one (qvecs, dbvecs, gnd)")
    totals = [0.0] * len(candidates)
    queries = 0
    for qvecs, dbvecs, gnd in benchmarks:
        _, table = select_setting(candidates, qvecs, dbvecs, gnd, protocol)
        n_q = len(qvecs)
        totals = [total + score * n_q for total, score in zip(totals, table[f"{protocol}_map"])]
        queries += n_q
    values = list(candidates)
    best = _best(totals)
    table = pd.DataFrame({"value": values, f"{protocol}_map": [total / queries for total in totals],
                          "chosen": [i == best for i in range(len(values))]})
    return values[best], table


def select_untrained(names: Sequence[str], qvecs: Any, dbvecs: Any, gnd: Any, topk: int,
                     grids: Mapping[str, tuple[str, Sequence[int]]] = GRIDS) -> tuple[dict[str, int], pd.DataFrame]:
    """Select the parameter of every untrained re-ranker in ``names`` on one (training) benchmark.

    Returns ({name: chosen value}, long table: method, parameter, value, medium_map, chosen).
    """
    qvecs, dbvecs = check_descriptors(qvecs, dbvecs, normalize="warn")
    gnd = check_gnd(gnd, n_db=dbvecs.shape[0], n_q=qvecs.shape[0])
    ranks = _first_stage(qvecs, dbvecs)
    chosen, rows = {}, []
    for name in progress_bar(list(names), desc="choosing settings", unit="method"):
        if name not in grids:
            raise CSAInputError(f"no selection grid for {name!r}; choose from {sorted(grids)}")
        parameter, values = grids[name]
        candidates = {v: untrained_ranker(name, v, topk, dbvecs.shape[0]) for v in values}
        chosen[name], table = _select_setting(candidates, qvecs, dbvecs, gnd, "medium", ranks)
        rows.append(table.assign(method=name, parameter=parameter))
    table = pd.concat(rows, ignore_index=True)[["method", "parameter", "value", "medium_map", "chosen"]]
    return chosen, table


def tuned_methods(chosen: Mapping[str, int], topk: int, n_db: int,
                  grids: Mapping[str, tuple[str, Sequence[int]]] = GRIDS) -> tuple[dict[str, Ranker], dict[str, dict]]:
    """The re-rankers of ``chosen`` ({name: value}, from :func:`select_untrained`) for a database of ``n_db``
    images, and their settings ({name: {parameter: value}}) for :func:`csa.compare.runner.run_comparison`."""
    methods = {name: untrained_ranker(name, value, topk, n_db) for name, value in chosen.items()}
    settings = {name: {grids[name][0]: value} for name, value in chosen.items()}
    return methods, settings
