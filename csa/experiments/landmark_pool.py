"""The demo's cities as arrays, training pools of landmarks, and whitening chosen on held-out training landmarks.

A :class:`City` holds one mini benchmark's database and official-query descriptors for several descriptor
sets (backbones), its official and leave-one-out (LOO) ground truth, the landmark of every database photo
(from the LOO queries, :func:`csa.data.demo.group_queries`) and its trainset's train split.  A training
pool is a list of :class:`PoolPart` (a city and the database rows a model may learn from, with their
landmark ids): the trainset of one city for the cross-city protocol, both cities minus a fold's landmarks
for the pooled protocol.  :func:`fit_whitening` learns a whitening on a pool only;
:func:`held_out_benchmarks` gives the pool's inner held-out folds (a whitening learned without a fold's
landmarks, those landmarks' LOO queries to score); :func:`select_whitening` scores the candidates there
(first-stage Medium mAP), and the untrained re-rankers' L is chosen on the same folds
(:func:`csa.experiments.pooled.pick_untrained_l`), so the test landmarks never take part in a choice.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Mapping, Sequence

import numpy as np
import pandas as pd

from csa.data.demo import CITIES, group_queries
from csa.data.layout import TestFeatures, clusters_path, load_gnd, load_test_features
from csa.descriptors.compact import load_compact
from csa.descriptors.whiten import LearnedWhitening, learn_whitening, whitened_name
from csa.evaluate import evaluate_revisited
from csa.fileio import load_pickle
from csa.search import first_stage
from csa.experiments.held_out import landmark_folds
from csa.validation import CSAInputError

__all__ = ["City", "PoolPart", "WHITENING_CANDIDATES", "load_city", "city_pool", "fit_whitening",
           "whiten_city", "HeldOutBenchmark", "held_out_benchmarks", "select_whitening", "choose_whitening"]

#: Whitening candidates: name -> (kind, shrinkage, dimensions); ``none`` keeps the GeM descriptors.
WHITENING_CANDIDATES: Mapping[str, tuple[str, float, int | None] | None] = {
    "none": None,
    "lw": ("lw", 0.0, None),
    "pcaw": ("pcaw", 0.1, 256),
}


@dataclass
class City:
    """One demo city: descriptors per descriptor set, ground truths, landmarks, the trainset's train split."""

    dataset: str
    db: dict[str, np.ndarray]
    query: dict[str, np.ndarray]
    gnd: list[dict]
    query_landmark: np.ndarray
    loo_gnd: list[dict]
    loo_rows: np.ndarray
    loo_landmark: np.ndarray
    image_landmark: np.ndarray
    train_rows: np.ndarray = field(repr=False)


@dataclass
class PoolPart:
    """Rows of one city's database a model may learn from, and their landmark ids (-1: no landmark)."""

    city: City
    rows: np.ndarray
    landmarks: np.ndarray


def load_city(root: str | os.PathLike, dataset: str, feature_names: Sequence[str], compact: bool = True) -> City:
    """Load a demo city (``roxford5k-mini`` or ``rparis6k-mini``) with the descriptor sets ``feature_names``,
    from their committed compact copies (:mod:`csa.descriptors.compact`) or, with ``compact=False``, from
    the extracted ``test/<dataset>/<name>.pkl`` files."""
    if dataset not in CITIES:
        raise CSAInputError(f"unknown demo city {dataset!r}; choose one of {', '.join(CITIES)}")
    gt, loo = load_gnd(root, dataset), load_gnd(root, CITIES[dataset]["loo"])
    if compact:
        feats = {name: _compact_features(root, name, dataset) for name in feature_names}
    else:
        feats = {name: load_test_features(root, dataset, name, gt) for name in feature_names}
    index = {n: i for i, n in enumerate(gt["imlist"])}
    loo_rows = np.array([index[n] for n in loo["qimlist"]], dtype=np.int64)
    loo_landmark = group_queries(loo["gnd"])
    image_landmark = np.full(len(gt["imlist"]), -1, dtype=np.int64)
    image_landmark[loo_rows] = loo_landmark
    split = load_pickle(clusters_path(root, CITIES[dataset]["trainset"]))["train"]
    return City(dataset, {n: f.db for n, f in feats.items()}, {n: f.query for n, f in feats.items()}, gt["gnd"],
                group_queries(gt["gnd"]), loo["gnd"], loo_rows, loo_landmark, image_landmark,
                np.array([index[n] for n in split["images"]], dtype=np.int64))


def _compact_features(root: str | os.PathLike, name: str, dataset: str) -> TestFeatures:
    db, query = load_compact(root, name, dataset)
    return TestFeatures(query=query, db=db)


def city_pool(city: City, exclude: Sequence[int] = ()) -> PoolPart:
    """The city's trainset train split as a pool part, without the photos of the landmarks ``exclude``."""
    rows = city.train_rows[~np.isin(city.image_landmark[city.train_rows], list(exclude))]
    return PoolPart(city, rows, city.image_landmark[rows])


def _pool_arrays(pool: Sequence[PoolPart], feature: str) -> tuple[np.ndarray, np.ndarray]:
    """Stacked descriptors of a pool and one cluster id per row (landmark ids made unique across cities;
    photos without a landmark each their own cluster)."""
    feats, clusters, offset = [], [], 0
    for part in pool:
        lm = part.landmarks.copy()
        lone = lm < 0
        lm[lone] = lm.max(initial=0) + 1 + np.arange(int(lone.sum()))
        feats.append(part.city.db[feature][part.rows])
        clusters.append(lm + offset)
        offset += int(lm.max(initial=0)) + 1
    return np.concatenate(feats), np.concatenate(clusters)


def fit_whitening(pool: Sequence[PoolPart], feature: str, candidate: str) -> LearnedWhitening | None:
    """Learn whitening ``candidate`` (a key of :data:`WHITENING_CANDIDATES`) on the pool's rows only."""
    if candidate not in WHITENING_CANDIDATES:
        raise CSAInputError(f"unknown whitening candidate {candidate!r}; choose one of {', '.join(WHITENING_CANDIDATES)}")
    spec = WHITENING_CANDIDATES[candidate]
    if spec is None:
        return None
    kind, shrinkage, dimensions = spec
    x, clusters = _pool_arrays(pool, feature)
    return learn_whitening(kind, x, clusters, shrinkage=shrinkage, dimensions=dimensions)


def whiten_city(city: City, feature: str, whitening: LearnedWhitening | None) -> tuple[np.ndarray, np.ndarray]:
    """``(db, official queries)`` of ``feature`` after ``whitening`` (unchanged when ``None``)."""
    if whitening is None:
        return city.db[feature], city.query[feature]
    return whitening.apply(city.db[feature]), whitening.apply(city.query[feature])


@dataclass
class HeldOutBenchmark:
    """LOO queries of one inner fold's held-out landmarks in their city, against that city's whole database
    whitened by a candidate learned on the inner-train part of the pool (without those landmarks)."""

    inner_fold: int
    city: str
    qvecs: np.ndarray
    dbvecs: np.ndarray
    gnd: list[dict]


def held_out_benchmarks(pool: Sequence[PoolPart], feature: str, candidate: str,
                        n_folds: int = 3) -> list[HeldOutBenchmark]:
    """The inner held-out folds of a training ``pool`` as benchmarks, for whitening ``candidate``.

    The pool's landmarks (all cities) are dealt into ``n_folds`` folds of similar image count
    (:func:`csa.experiments.held_out.landmark_folds`); for each fold the candidate is learned on the pool
    without the fold's landmarks (:func:`fit_whitening`) and applied to each city's whole database, whose
    rows of the fold's landmarks are the LOO queries.  No whitening is ever fitted on a photo that scores.
    """
    keys = [(p, int(lm)) for p, part in enumerate(pool) for lm in part.landmarks if lm >= 0]
    codes = {k: i for i, k in enumerate(dict.fromkeys(keys))}
    out = []
    for f, fold in enumerate(landmark_folds([codes[k] for k in keys], n_folds)):
        held = [[lm for (q, lm), c in codes.items() if c in fold and q == p] for p in range(len(pool))]
        inner = [PoolPart(part.city, part.rows[~np.isin(part.landmarks, held[p])],
                          part.landmarks[~np.isin(part.landmarks, held[p])]) for p, part in enumerate(pool)]
        whitening = fit_whitening(inner, feature, candidate)
        for p, part in enumerate(pool):
            keep = np.flatnonzero(np.isin(part.city.loo_landmark, held[p]))
            if keep.size:
                db, _ = whiten_city(part.city, feature, whitening)
                out.append(HeldOutBenchmark(f, part.city.dataset, db[part.city.loo_rows[keep]], db,
                                            [part.city.loo_gnd[i] for i in keep]))
    return out


def select_whitening(pool: Sequence[PoolPart], feature: str, candidates: Sequence[str] = tuple(WHITENING_CANDIDATES),
                     n_folds: int = 3) -> pd.DataFrame:
    """Score each whitening candidate on landmarks held out of ``pool`` (one row per fold, city, candidate):
    the first-stage Medium mAP of :func:`held_out_benchmarks`, so the test landmarks take no part."""
    rows = []
    for name in candidates:
        for b in held_out_benchmarks(pool, feature, name, n_folds):
            score = evaluate_revisited(first_stage(b.qvecs, b.dbvecs), b.gnd)["medium"]["map"]
            rows.append({"inner_fold": b.inner_fold, "city": b.city, "whitening": name,
                         "descriptors": whitened_name(feature, (WHITENING_CANDIDATES[name] or (None,))[0]),
                         "queries": len(b.gnd), "first_medium": float(score)})
    return pd.DataFrame(rows).sort_values(["inner_fold"], kind="stable", ignore_index=True)


def choose_whitening(table: pd.DataFrame, among: Sequence[str] | None = None) -> str:
    """The candidate with the best query-weighted mean held-out Medium mAP (ties: the earlier candidate)."""
    order = list(among or WHITENING_CANDIDATES)
    t = table[table["whitening"].isin(order)]
    score = (t["first_medium"] * t["queries"]).groupby(t["whitening"]).sum() / t.groupby("whitening")["queries"].sum()
    return max(order, key=lambda n: (score.get(n, -np.inf), -order.index(n)))
