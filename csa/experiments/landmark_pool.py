"""The demo's cities as arrays, training pools of landmarks, and whitening chosen on held-out training landmarks.

A :class:`City` holds one mini benchmark's database and official-query descriptors for several descriptor
sets (backbones), its official and leave-one-out (LOO) ground truth, the landmark of every database photo
(from the LOO queries, :func:`csa.data.demo.group_queries`) and its trainset's train split.  A training
pool is a list of :class:`PoolPart` (a city and the database rows a model may learn from, with their
landmark ids): the trainset of one city for the cross-city protocol, both cities minus a fold's landmarks
for the pooled protocol.  :func:`fit_whitening` learns a whitening on a pool only;
:func:`select_whitening` scores the candidates on landmarks held out of the pool (first-stage Medium mAP
of their LOO queries), so the test landmarks never take part in the choice.
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
           "whiten_city", "select_whitening", "choose_whitening"]

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


def _held_out_map(city: City, db: np.ndarray, held: Sequence[int]) -> tuple[int, float]:
    keep = np.flatnonzero(np.isin(city.loo_landmark, list(held)))
    if keep.size == 0:
        return 0, float("nan")
    ranks = first_stage(db[city.loo_rows[keep]], db)
    return int(keep.size), float(evaluate_revisited(ranks, [city.loo_gnd[i] for i in keep])["medium"]["map"])


def select_whitening(pool: Sequence[PoolPart], feature: str, candidates: Sequence[str] = tuple(WHITENING_CANDIDATES),
                     n_folds: int = 3) -> pd.DataFrame:
    """Score each whitening candidate on landmarks held out of ``pool`` (one row per fold, city, candidate).

    The pool's landmarks (all cities) are dealt into ``n_folds`` folds of similar image count
    (:func:`csa.experiments.held_out.landmark_folds`); each candidate is learned on the pool without a
    fold's landmarks and scored by the first-stage Medium mAP of those landmarks' LOO queries in their own
    city's database (the whole database, whitened).
    """
    keys = [(p, int(lm)) for p, part in enumerate(pool) for lm in part.landmarks if lm >= 0]
    codes = {k: i for i, k in enumerate(dict.fromkeys(keys))}
    folds = landmark_folds([codes[k] for k in keys], n_folds)
    rows = []
    for f, fold in enumerate(folds):
        held = {k for k, c in codes.items() if c in fold}
        inner = [PoolPart(part.city, part.rows[~np.isin(part.landmarks, [lm for q, lm in held if q == p])],
                          part.landmarks[~np.isin(part.landmarks, [lm for q, lm in held if q == p])])
                 for p, part in enumerate(pool)]
        for name in candidates:
            whitening = fit_whitening(inner, feature, name)
            for p, part in enumerate(pool):
                db, _ = whiten_city(part.city, feature, whitening)
                n, score = _held_out_map(part.city, db, [lm for q, lm in held if q == p])
                if n:
                    rows.append({"inner_fold": f, "city": part.city.dataset, "whitening": name,
                                 "descriptors": whitened_name(feature, (WHITENING_CANDIDATES[name] or (None,))[0]),
                                 "queries": n, "first_medium": score})
    return pd.DataFrame(rows)


def choose_whitening(table: pd.DataFrame, among: Sequence[str] | None = None) -> str:
    """The candidate with the best query-weighted mean held-out Medium mAP (ties: the earlier candidate)."""
    order = list(among or WHITENING_CANDIDATES)
    t = table[table["whitening"].isin(order)]
    score = (t["first_medium"] * t["queries"]).groupby(t["whitening"]).sum() / t.groupby("whitening")["queries"].sum()
    return max(order, key=lambda n: (score.get(n, -np.inf), -order.index(n)))
