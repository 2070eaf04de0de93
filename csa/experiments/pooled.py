"""The paper's table on the demo: cross-city and pooled protocols, per-query APs of every row.

Two protocols, both judged on landmarks a model never trained on:

* **cross-city** (:func:`cross_city_runs`): a model trains on one city's trainset and re-ranks the other
  city's official queries and LOO queries (as the rest of the demo);
* **pooled** (:func:`pooled_runs`): the landmarks of both cities are dealt into folds; a model trains on
  both cities' photos outside a fold and re-ranks the LOO queries of the fold's landmarks in their own
  city's database.  Every landmark is held out once, so about twenty landmarks are test units.

For each benchmark and descriptor variant (GeM, and GeM whitened by the candidate chosen on held-out
*training* landmarks, :func:`csa.experiments.landmark_pool.select_whitening`) the rows are the first stage,
the paper's untrained affinity re-ranker (raw and centred, L chosen on the same inner held-out folds of
the training pool as the whitening: learned without a third of its landmarks, scored on their LOO
queries), CSA trained on Lite0, CSA trained on Lite0/1/2 stacked (the paper's augmented model) and a
transfer row (the Lite0 model re-ranking Lite2's lists).  Each run returns long-format per-query APs;
:mod:`csa.experiments.paper_table` turns them into the table with landmark-level intervals.
"""
from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import pandas as pd
import torch

from csa.compare.affinity_baseline import affinity_cosine
from csa.compare.runner import run_comparison
from csa.compare.tuning import GRIDS, select_setting_pooled
from csa.data.layout import save_clusters, save_train_features
from csa.descriptors.whiten import whitened_name
from csa.experiments.landmark_pool import (WHITENING_CANDIDATES, City, PoolPart, _pool_arrays, choose_whitening,
                                           city_pool, fit_whitening, held_out_benchmarks, select_whitening,
                                           whiten_city)
from csa.experiments.held_out import TEST_TOPK, landmark_folds
from csa.rerank import rerank
from csa.training.config import TrainConfig
from csa.training.train import run_training

__all__ = ["UNTRAINED_L", "BACKBONE_FEATURES", "train_on_pool", "pick_untrained_l", "untrained_label",
           "untrained_methods", "evaluation_set", "evaluate_rows", "untrained_rows", "cross_city_setup",
           "cross_city_runs", "pooled_folds", "pooled_setup", "pooled_runs"]

#: Anchor lengths L tried for the untrained affinity re-rankers (chosen on the training pool's inner held-out
#: folds): the grid the comparison notebooks use for them (csa.compare.tuning.GRIDS).
UNTRAINED_L = tuple(GRIDS["affinity cosine"][1])
#: The descriptor sets of the three backbones (Lite0 first: the lists CSA re-ranks).
BACKBONE_FEATURES = ("lite0-gem", "lite1-gem", "lite2-gem")
#: The backbone whose lists the transfer row re-ranks with the Lite0 model.
TRANSFER_FEATURE = "lite2-gem"


def train_on_pool(pool: Sequence[PoolPart], features: Sequence[str], whitenings: Mapping[str, Any], recipe: str,
                  seed: int = 0, workdir: str | Path | None = None,
                  overrides: Mapping[str, Any] | None = None) -> torch.nn.Module:
    """Train CSA (``recipe``, CPU) on the pool's rows; several ``features`` are stacked as more samples.

    ``whitenings`` maps each feature to the whitening learned on this pool (or ``None``).  The pool is
    written as a temporary trainset (its photos' landmarks as clusters, photos without one as their own
    cluster: neighbours, never training queries under the demo recipes).  ``overrides`` change single
    recipe fields (e.g. ``num_epochs`` for a quick check).
    """
    with tempfile.TemporaryDirectory(prefix="csa-pool-", dir=workdir) as tmp:
        clusters = None
        for name in features:
            x, clusters = _pool_arrays(pool, name)
            w = whitenings.get(name)
            x = w.apply(x) if w is not None else x
            save_train_features(tmp, "pool", name, x, x[:1])
        save_clusters(tmp, "pool", {"train": {"cluster": clusters.tolist()}, "val": {"cluster": [0]}})
        config = TrainConfig.from_recipe(recipe, **dict(overrides or {}), data_root=tmp, trainset="pool", feature_names=list(features),
                                         output_dir=str(Path(tmp, "run")), device="cpu", num_workers=0,
                                         progress=False, seed=seed)
        return run_training(config)["model"].eval()


def _untrained(centred: bool, anchor_len: int) -> Callable:
    return lambda q, d, r: affinity_cosine(q, d, r, topk=min(TEST_TOPK, d.shape[0]),
                                           anchor_len=min(anchor_len, d.shape[0]), centred=centred)


def _csa(model: torch.nn.Module) -> Callable:
    return lambda q, d, r: rerank(model, q, d, r, topk=min(TEST_TOPK, d.shape[0]),
                                  anchor_len=model.config["anchor_len"], progress=False)


def pick_untrained_l(pool: Sequence[PoolPart], feature: str, variant: str,
                     n_folds: int = 3) -> tuple[dict[str, int], pd.DataFrame]:
    """L of the raw and the centred untrained re-ranker for descriptor ``variant`` (a whitening candidate),
    chosen on the training ``pool``'s inner held-out folds, as the whitening is
    (:func:`csa.experiments.landmark_pool.held_out_benchmarks`: the whitening learned on the inner-train
    landmarks only, the inner-held-out landmarks' LOO queries scored); the best query-weighted Medium mAP
    over :data:`UNTRAINED_L` wins (:func:`csa.compare.tuning.select_setting_pooled`), ties: the smaller L.

    Returns ``({"raw": L, "centred": L}, table)``: one row per re-ranker and L with its held-out Medium
    mAP, the number of held-out queries, whether it was chosen and whether it is the grid's top value.
    """
    benchmarks = [(b.qvecs, b.dbvecs, b.gnd) for b in held_out_benchmarks(pool, feature, variant, n_folds)]
    best, tables = {}, []
    for centred in (False, True):
        name = "centred" if centred else "raw"
        candidates = {length: _untrained(centred, length) for length in UNTRAINED_L}
        best[name], table = select_setting_pooled(candidates, benchmarks)
        tables.append(table.rename(columns={"value": "L", "medium_map": "held_out_medium"}).assign(
            reranker=f"untrained {name}", queries=sum(len(b[2]) for b in benchmarks),
            grid_top=lambda t: t["L"] == max(UNTRAINED_L)))
    return best, pd.concat(tables, ignore_index=True)[["reranker", "L", "queries", "held_out_medium", "chosen", "grid_top"]]


def untrained_label(lengths: Mapping[str, int]) -> str:
    """The ``untrained_l`` column of the per-query APs: ``"raw L, centred L"``."""
    return f"raw {lengths['raw']}, centred {lengths['centred']}"


def untrained_methods(lengths: Mapping[str, int]) -> dict[str, Callable]:
    """The raw and the centred untrained re-ranker at their chosen L (rows ``untrained raw`` / ``centred``)."""
    return {"untrained raw": _untrained(False, lengths["raw"]), "untrained centred": _untrained(True, lengths["centred"])}


def evaluation_set(city: City, feature: str, whitening: Any, keep: np.ndarray | None) -> tuple:
    """``(queries, database, gnd, query landmarks)`` of a test: the official queries (``keep`` None) or the
    LOO queries ``keep``, in the city's database whitened by ``whitening`` (learned on the training pool)."""
    db, q = whiten_city(city, feature, whitening)
    if keep is None:
        return q, db, city.gnd, city.query_landmark
    return db[city.loo_rows[keep]], db, [city.loo_gnd[i] for i in keep], city.loo_landmark[keep]


def evaluate_rows(qvecs: np.ndarray, dbvecs: np.ndarray, gnd: list[dict], landmarks: np.ndarray,
                  methods: Mapping[str, Callable], columns: Mapping[str, Any]) -> pd.DataFrame:
    """Per-query Medium / Hard AP of the first stage and ``methods``: one row per (method, query)."""
    table = run_comparison(qvecs, dbvecs, gnd, methods, n_boot=1, progress=False)
    rows = []
    for method, aps in table.attrs["aps"].items():
        for i, (m, h) in enumerate(zip(aps["medium"], aps["hard"])):
            rows.append({**columns, "method": method, "query": i, "landmark": int(landmarks[i]),
                         "medium_ap": m, "hard_ap": h})
    return pd.DataFrame(rows)


Test = tuple[City, str, "np.ndarray | None"]


def _variant_rows(pool: Sequence[PoolPart], tests: Sequence[Test], variant: str, recipe: str, augmented: bool,
                  seed: int, columns: Mapping[str, Any]) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Train the Lite0 (and, if ``augmented``, the stacked Lite0/1/2) model of one descriptor variant on
    ``pool`` and evaluate every test (city, benchmark, LOO query indices or None for official queries).
    Returns ``(per-query APs, the untrained re-rankers' L selection table)``."""
    whitenings = {f: fit_whitening(pool, f, variant) for f in BACKBONE_FEATURES}
    lengths, l_table = pick_untrained_l(pool, BACKBONE_FEATURES[0], variant)
    single = train_on_pool(pool, BACKBONE_FEATURES[:1], whitenings, recipe, seed)
    stacked = train_on_pool(pool, BACKBONE_FEATURES, whitenings, recipe, seed) if augmented else None
    kind = (WHITENING_CANDIDATES[variant] or (None,))[0]
    frames = []
    for city, benchmark, keep in tests:
        for feature in (BACKBONE_FEATURES[0], TRANSFER_FEATURE):
            qv, db, gnd, lms = evaluation_set(city, feature, whitenings[feature], keep)
            if feature == TRANSFER_FEATURE:
                methods = {"CSA (Lite0 model, transfer)": _csa(single)}
            else:
                methods = {**untrained_methods(lengths), "CSA": _csa(single)}
                if stacked is not None:
                    methods["CSA augmented (Lite0/1/2)"] = _csa(stacked)
            frames.append(evaluate_rows(qv, db, gnd, lms, methods,
                                        {**columns, "benchmark": benchmark, "whitening": variant,
                                         "descriptors": whitened_name(feature, kind),
                                         "untrained_l": untrained_label(lengths)}))
    return pd.concat(frames, ignore_index=True), l_table.assign(**columns, whitening=variant)


def untrained_rows(pool: Sequence[PoolPart], tests: Sequence[Test], variant: str,
                   columns: Mapping[str, Any]) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The first-stage and untrained re-rankers' per-query APs of one descriptor variant (Lite0's lists; no
    training), with L chosen by :func:`pick_untrained_l` on ``pool``; the rows :func:`_variant_rows` gives
    for those methods.  Returns ``(per-query APs, L selection table)``."""
    whitening = fit_whitening(pool, BACKBONE_FEATURES[0], variant)
    lengths, l_table = pick_untrained_l(pool, BACKBONE_FEATURES[0], variant)
    kind = (WHITENING_CANDIDATES[variant] or (None,))[0]
    frames = []
    for city, benchmark, keep in tests:
        qv, db, gnd, lms = evaluation_set(city, BACKBONE_FEATURES[0], whitening, keep)
        frames.append(evaluate_rows(qv, db, gnd, lms, untrained_methods(lengths),
                                    {**columns, "benchmark": benchmark, "whitening": variant,
                                     "descriptors": whitened_name(BACKBONE_FEATURES[0], kind),
                                     "untrained_l": untrained_label(lengths)}))
    return pd.concat(frames, ignore_index=True), l_table.assign(**columns, whitening=variant)


def cross_city_setup(train_city: City, test_city: City) -> tuple[list[PoolPart], list[Test]]:
    """The cross-city training pool (``train_city``'s trainset) and tests (``test_city``'s official and LOO queries)."""
    loo = test_city.dataset.replace("-mini", "-mini-loo")
    return [city_pool(train_city)], [(test_city, test_city.dataset, None),
                                     (test_city, loo, np.arange(len(test_city.loo_gnd)))]


def cross_city_runs(train_city: City, test_city: City, recipe: str, variants: Sequence[str] | None = None,
                    augmented: bool = True, seed: int = 0) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    """Cross-city rows: train on ``train_city``'s trainset, test ``test_city``'s official and LOO queries.

    Returns ``(per-query APs, whitening selection table, untrained L selection table)``; ``variants``
    defaults to ``none`` and the best whitened candidate on the training city's held-out landmarks.  The
    augmented model is trained for the variant the selection chose (whitened or not) only, to keep the run
    within the demo's CPU budget.
    """
    pool, tests = cross_city_setup(train_city, test_city)
    selection = select_whitening(pool, BACKBONE_FEATURES[0])
    chosen = choose_whitening(selection)
    variants = variants or ["none", choose_whitening(selection, [c for c in WHITENING_CANDIDATES if c != "none"])]
    columns = {"protocol": "cross-city", "trained_on": train_city.dataset, "fold": -1, "selected": chosen}
    runs = [_variant_rows(pool, tests, v, recipe, augmented and v == chosen, seed, columns) for v in variants]
    return (pd.concat([r[0] for r in runs], ignore_index=True), selection.assign(trained_on=train_city.dataset, fold=-1),
            pd.concat([r[1] for r in runs], ignore_index=True))


def pooled_folds(cities: Sequence[City], n_folds: int = 4) -> list[list[tuple[int, int]]]:
    """Both cities' landmarks as (city index, landmark id), dealt into ``n_folds`` folds of similar image count."""
    keys = [(c, int(lm)) for c, city in enumerate(cities) for lm in city.image_landmark if lm >= 0]
    codes = {k: i for i, k in enumerate(dict.fromkeys(keys))}
    folds = landmark_folds([codes[k] for k in keys], n_folds)
    return [sorted(k for k, code in codes.items() if code in fold) for fold in folds]


def pooled_setup(cities: Sequence[City], n_folds: int) -> list[tuple[list[PoolPart], list[Test]]]:
    """Per pooled fold: the training pool (both cities without the fold's landmarks) and the tests (the
    fold's landmarks' LOO queries in their own city)."""
    out = []
    for held in pooled_folds(cities, n_folds):
        pool = [city_pool(city, [lm for c, lm in held if c == i]) for i, city in enumerate(cities)]
        tests = [(city, city.dataset.replace("-mini", "-mini-loo"),
                  np.flatnonzero(np.isin(city.loo_landmark, [lm for c, lm in held if c == i])))
                 for i, city in enumerate(cities)]
        out.append((pool, [t for t in tests if t[2].size]))
    return out


def pooled_runs(cities: Sequence[City], recipe: str = "demo", n_folds: int = 3, augmented: bool = True,
                seed: int = 0, folds: Sequence[int] | None = None,
                progress: bool = True) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    """Pooled rows: per fold, train on both cities' photos outside the fold (whitening and the untrained
    re-rankers' L chosen on held-out landmarks of that training pool), test the fold's landmarks' LOO
    queries in their own city.  Returns ``(per-query APs, whitening selection, untrained L selection)``."""
    frames, selections, lengths = [], [], []
    for f, (pool, tests) in enumerate(pooled_setup(cities, n_folds)):
        if folds is not None and f not in folds:
            continue
        selection = select_whitening(pool, BACKBONE_FEATURES[0])
        chosen = choose_whitening(selection)
        whitened = choose_whitening(selection, [c for c in WHITENING_CANDIDATES if c != "none"])
        columns = {"protocol": "pooled", "trained_on": "both cities", "fold": f, "selected": chosen}
        for variant in ("none", whitened):
            aps, l_table = _variant_rows(pool, tests, variant, recipe, augmented and variant == chosen, seed, columns)
            frames.append(aps)
            lengths.append(l_table)
            if progress:
                print(f"pooled fold {f} ({variant}) done", flush=True)
        selections.append(selection.assign(fold=f))
    return tuple(pd.concat(x, ignore_index=True) for x in (frames, selections, lengths))
