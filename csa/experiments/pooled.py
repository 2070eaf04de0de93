"""The paper's table on the demo: cross-city and pooled protocols, per-query APs of every row.

Two protocols, both judged on landmarks a model never trained on:

* **cross-city** (:func:`cross_city_runs`): a model trains on one city's trainset and re-ranks the other
  city's official queries and LOO queries (as the rest of the demo);
* **pooled** (:func:`pooled_runs`): the landmarks of both cities are dealt into folds; a model trains on
  both cities' photos outside a fold and re-ranks the LOO queries of the fold's landmarks in their own
  city's database.  Every landmark is held out once, so about twenty landmarks are test units.

For each benchmark and descriptor variant (GeM, and GeM whitened by the candidate chosen on held-out
*training* landmarks, :func:`csa.experiments.landmark_pool.select_whitening`) the rows are the first stage,
the paper's untrained affinity re-ranker (raw and centred, L chosen on the training pool's own LOO
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
from csa.compare.tuning import select_setting_pooled
from csa.data.layout import save_clusters, save_train_features
from csa.descriptors.whiten import whitened_name
from csa.experiments.landmark_pool import (WHITENING_CANDIDATES, City, PoolPart, _pool_arrays, choose_whitening,
                                           city_pool, fit_whitening, select_whitening, whiten_city)
from csa.experiments.held_out import TEST_TOPK, landmark_folds
from csa.rerank import rerank
from csa.training.config import TrainConfig
from csa.training.train import run_training

__all__ = ["UNTRAINED_L", "BACKBONE_FEATURES", "train_on_pool", "pick_untrained_l", "evaluate_rows",
           "cross_city_runs", "pooled_folds", "pooled_runs"]

#: Anchor lengths L tried for the untrained affinity re-rankers (chosen on the training pool's LOO queries).
UNTRAINED_L = (32, 64, 128)
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


def pick_untrained_l(benchmarks: Sequence[tuple[np.ndarray, np.ndarray, list[dict]]]) -> dict[str, int]:
    """L of the raw and the centred untrained re-ranker with the best query-weighted Medium mAP on the
    training pool's own LOO ``benchmarks`` ((queries, database, gnd) each), over :data:`UNTRAINED_L`
    (:func:`csa.compare.tuning.select_setting_pooled`); ties: the smaller L."""
    best = {}
    for centred in (False, True):
        candidates = {length: _untrained(centred, length) for length in UNTRAINED_L}
        best["centred" if centred else "raw"] = select_setting_pooled(candidates, benchmarks)[0]
    return best


def _pool_loo(pool: Sequence[PoolPart], feature: str, whitening: Any) -> list[tuple]:
    """The LOO queries of the pool's landmarks, each in its own city's (whitened) database."""
    out = []
    for part in pool:
        keep = np.flatnonzero(np.isin(part.city.loo_landmark, np.unique(part.landmarks[part.landmarks >= 0])))
        db, _ = whiten_city(part.city, feature, whitening)
        out.append((db[part.city.loo_rows[keep]], db, [part.city.loo_gnd[i] for i in keep]))
    return out


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


def _variant_rows(pool: Sequence[PoolPart], tests: Sequence[tuple[City, str, np.ndarray | None]], variant: str,
                  recipe: str, augmented: bool, seed: int, columns: Mapping[str, Any]) -> pd.DataFrame:
    """Train the Lite0 (and, if ``augmented``, the stacked Lite0/1/2) model of one descriptor variant on
    ``pool`` and evaluate every test (city, benchmark, LOO query indices or None for official queries)."""
    whitenings = {f: fit_whitening(pool, f, variant) for f in BACKBONE_FEATURES}
    lengths = pick_untrained_l(_pool_loo(pool, BACKBONE_FEATURES[0], whitenings[BACKBONE_FEATURES[0]]))
    single = train_on_pool(pool, BACKBONE_FEATURES[:1], whitenings, recipe, seed)
    stacked = train_on_pool(pool, BACKBONE_FEATURES, whitenings, recipe, seed) if augmented else None
    kind = (WHITENING_CANDIDATES[variant] or (None,))[0]
    frames = []
    for city, benchmark, keep in tests:
        for feature in (BACKBONE_FEATURES[0], TRANSFER_FEATURE):
            db, q = whiten_city(city, feature, whitenings[feature])
            if keep is None:
                qv, gnd, lms = q, city.gnd, city.query_landmark
            else:
                qv, gnd, lms = db[city.loo_rows[keep]], [city.loo_gnd[i] for i in keep], city.loo_landmark[keep]
            if feature == TRANSFER_FEATURE:
                methods = {"CSA (Lite0 model, transfer)": _csa(single)}
            else:
                methods = {"untrained raw": _untrained(False, lengths["raw"]),
                           "untrained centred": _untrained(True, lengths["centred"]), "CSA": _csa(single)}
                if stacked is not None:
                    methods["CSA augmented (Lite0/1/2)"] = _csa(stacked)
            frames.append(evaluate_rows(qv, db, gnd, lms, methods,
                                        {**columns, "benchmark": benchmark, "whitening": variant,
                                         "descriptors": whitened_name(feature, kind),
                                         "untrained_l": f"raw {lengths['raw']}, centred {lengths['centred']}"}))
    return pd.concat(frames, ignore_index=True)


def cross_city_runs(train_city: City, test_city: City, recipe: str, variants: Sequence[str] | None = None,
                    augmented: bool = True, seed: int = 0) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Cross-city rows: train on ``train_city``'s trainset, test ``test_city``'s official and LOO queries.

    Returns ``(per-query APs, whitening selection table)``; ``variants`` defaults to ``none`` and the best
    whitened candidate on the training city's held-out landmarks.  The augmented model is trained for the
    variant the selection chose (whitened or not) only, to keep the run within the demo's CPU budget.
    """
    pool = [city_pool(train_city)]
    selection = select_whitening(pool, BACKBONE_FEATURES[0])
    chosen = choose_whitening(selection)
    variants = variants or ["none", choose_whitening(selection, [c for c in WHITENING_CANDIDATES if c != "none"])]
    loo = test_city.dataset.replace("-mini", "-mini-loo")
    tests = [(test_city, test_city.dataset, None), (test_city, loo, np.arange(len(test_city.loo_gnd)))]
    columns = {"protocol": "cross-city", "trained_on": train_city.dataset, "fold": -1, "selected": chosen}
    frames = [_variant_rows(pool, tests, v, recipe, augmented and v == chosen, seed, columns) for v in variants]
    return pd.concat(frames, ignore_index=True), selection.assign(trained_on=train_city.dataset, fold=-1)


def pooled_folds(cities: Sequence[City], n_folds: int = 4) -> list[list[tuple[int, int]]]:
    """Both cities' landmarks as (city index, landmark id), dealt into ``n_folds`` folds of similar image count."""
    keys = [(c, int(lm)) for c, city in enumerate(cities) for lm in city.image_landmark if lm >= 0]
    codes = {k: i for i, k in enumerate(dict.fromkeys(keys))}
    folds = landmark_folds([codes[k] for k in keys], n_folds)
    return [sorted(k for k, code in codes.items() if code in fold) for fold in folds]


def pooled_runs(cities: Sequence[City], recipe: str = "demo", n_folds: int = 3, augmented: bool = True,
                seed: int = 0, folds: Sequence[int] | None = None, progress: bool = True) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Pooled rows: per fold, train on both cities' photos outside the fold (whitening chosen on held-out
    landmarks of that training pool), test the fold's landmarks' LOO queries in their own city."""
    frames, selections = [], []
    for f, held in enumerate(pooled_folds(cities, n_folds)):
        if folds is not None and f not in folds:
            continue
        pool = [city_pool(city, [lm for c, lm in held if c == i]) for i, city in enumerate(cities)]
        selection = select_whitening(pool, BACKBONE_FEATURES[0])
        chosen = choose_whitening(selection)
        whitened = choose_whitening(selection, [c for c in WHITENING_CANDIDATES if c != "none"])
        tests = [(city, city.dataset.replace("-mini", "-mini-loo"),
                  np.flatnonzero(np.isin(city.loo_landmark, [lm for c, lm in held if c == i])))
                 for i, city in enumerate(cities)]
        tests = [t for t in tests if t[2].size]
        columns = {"protocol": "pooled", "trained_on": "both cities", "fold": f, "selected": chosen}
        for variant in ("none", whitened):
            frames.append(_variant_rows(pool, tests, variant, recipe, augmented and variant == chosen, seed, columns))
            if progress:
                print(f"pooled fold {f} ({variant}) done", flush=True)
        selections.append(selection.assign(fold=f))
    return pd.concat(frames, ignore_index=True), pd.concat(selections, ignore_index=True)
