"""The demo's held-out protocol: train on one city's landmarks (or some of them), score on landmarks never seen.

The demo trains on one city and tests on the other, so every choice can be made with the *training* city's
photos only.  :func:`landmark_folds` deals a trainset's landmarks into folds of about equal image counts;
:func:`subset_trainset` writes a trainset without some landmarks (or with them unlabelled);
:func:`held_out_benchmark` keeps the leave-one-out queries of chosen landmarks; :func:`csa_gain` scores a
model on a benchmark (Medium / Hard mAP, gain over the first stage with landmark-level intervals);
:func:`train_and_test` trains one demo model and scores it on the test city.  Recipe selection
(:mod:`csa.experiments.selection`), seed sweeps (:mod:`csa.experiments.seeds`) and learning curves
(:mod:`csa.experiments.learning_curve`) are built from these.
"""
from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import torch

from csa.compare.runner import query_landmarks, run_comparison
from csa.data.demo import CITIES, FEATURE_NAME
from csa.data.layout import clusters_path, load_clusters, load_gnd, load_test_features, load_train_features, \
    save_clusters, save_train_features
from csa.fileio import check_output_file, load_pickle
from csa.rerank import rerank
from csa.training.config import TrainConfig
from csa.training.recipes import GRID
from csa.training.train import run_training
from csa.validation import CSAInputError, check_float, check_int

__all__ = ["TEST_TOPK", "TRAIN_TO_TEST", "TRAIN_TO_OWN", "check_experiment", "landmark_sizes", "landmark_folds",
           "subset_trainset", "held_out_benchmark", "csa_gain", "test_benchmarks", "train_demo_model",
           "train_and_test"]

#: Re-ranking depth K at test time, for every demo measurement.
TEST_TOPK = 128

#: Training set -> the benchmark its model is tested on (the other city).
TRAIN_TO_TEST = {"rparis6k-mini-train": "roxford5k-mini", "roxford5k-mini-train": "rparis6k-mini"}
#: Training set -> its own city's benchmark (where held-out landmarks are scored).
TRAIN_TO_OWN = {city["trainset"]: dataset for dataset, city in CITIES.items()}


def check_experiment(root: str | os.PathLike, trainset: str, out: str | os.PathLike | None = None,
                     n_folds: int | None = None, seeds: Sequence[int] | None = None,
                     fractions: Sequence[float] | None = None, setting: str | None = None) -> None:
    """Check the arguments of a selection, seed sweep or learning curve before any training starts.

    ``out`` (the CSV to write) must be a writable file path; ``n_folds`` at least 2 and at most the
    number of landmarks; ``seeds`` distinct non-negative integers; ``fractions`` distinct shares in (0, 1];
    ``setting`` a name of :data:`GRID`.  Raises one :class:`CSAInputError` naming the argument.
    """
    if trainset not in TRAIN_TO_TEST:
        raise CSAInputError(f"unknown trainset {trainset!r}; choose one of {list(TRAIN_TO_TEST)}")
    if not clusters_path(root, trainset).is_file():
        raise CSAInputError(f"no trainset {trainset!r} under {os.fspath(root)}; build the demo first "
                            f"(csa demo build, csa demo extract) or give the demo data root")
    if out is not None:
        check_output_file(out, "--out")
    if setting is not None and setting not in GRID:
        raise CSAInputError(f"unknown setting {setting!r}; choose one of {list(GRID)}")
    if n_folds is not None:
        n_folds = check_int("the number of folds (--folds)", n_folds, 2)
        landmarks = len(landmark_sizes(load_clusters(root, trainset, "train")))
        if n_folds > landmarks:
            raise CSAInputError(f"{n_folds} folds for {landmarks} landmarks of {trainset}; use at most {landmarks}")
    if seeds is not None:
        seeds = [check_int("a seed (--seeds)", s, 0) for s in seeds]
        if not seeds or len(set(seeds)) != len(seeds):
            raise CSAInputError(f"seeds must be a non-empty list of distinct integers, got {seeds}")
    if fractions is not None:
        shares = [check_float("a fraction of the training landmarks (--fractions)", f, 0.0, 1.0, low_open=True)
                  for f in fractions]
        if not shares or len(set(shares)) != len(shares):
            raise CSAInputError(f"fractions must be distinct shares of the training landmarks in (0, 1], e.g. "
                                f"0.25 0.5 1.0; got {list(fractions)}")


def landmark_sizes(clusters: Sequence[int]) -> dict[int, int]:
    """Image count of every landmark, i.e. of every cluster with more than one image (ids ascending)."""
    ids, counts = np.unique(np.asarray(clusters), return_counts=True)
    return {int(i): int(c) for i, c in zip(ids, counts) if c > 1}


def landmark_folds(clusters: Sequence[int], n_folds: int = 3) -> list[set[int]]:
    """Landmark clusters (those with more than one image) dealt into ``n_folds`` folds of similar image count.

    Largest landmark first, each into the fold with the fewest images so far (ties: lowest fold).
    """
    landmarks = sorted(((c, i) for i, c in landmark_sizes(clusters).items()), key=lambda t: (-t[0], t[1]))
    if len(landmarks) < n_folds:
        raise CSAInputError(f"only {len(landmarks)} landmarks for {n_folds} folds; use fewer folds")
    folds: list[set[int]] = [set() for _ in range(n_folds)]
    sizes = [0] * n_folds
    for count, cluster in landmarks:
        k = int(np.argmin(sizes))
        folds[k].add(cluster)
        sizes[k] += count
    return folds


def subset_trainset(root: Path, trainset: str, keep: np.ndarray, out_root: Path, name: str,
                     unlabel: np.ndarray | None = None) -> None:
    """Write trainset ``name`` under ``out_root``: the rows ``keep`` of ``trainset``'s train split, with the
    rows ``unlabel`` (if given) made clusters of their own (photos without a landmark: neighbours, never
    training queries under ``samples='with-positives'``)."""
    ann = load_pickle(clusters_path(root, trainset))
    feats = load_train_features(root, trainset, FEATURE_NAME, "train")
    clusters = np.asarray(ann["train"]["cluster"])
    if unlabel is not None:
        clusters = clusters.copy()
        clusters[unlabel] = clusters.max() + 1 + np.arange(int(unlabel.sum()))
    split = {k: [v[i] for i in np.flatnonzero(keep)] for k, v in {**ann["train"], "cluster": clusters.tolist()}.items()}
    save_clusters(out_root, name, {"train": split, "val": ann["val"]})
    save_train_features(out_root, name, FEATURE_NAME, feats[keep], load_train_features(root, trainset, FEATURE_NAME,
                                                                                          "val"))


def held_out_benchmark(root: str | os.PathLike, dataset: str, query_names: set[str] | None = None
                       ) -> tuple[np.ndarray, np.ndarray, list[dict]]:
    """``(queries, database, gnd)`` of ``dataset``, keeping only the queries named in ``query_names``."""
    gt = load_gnd(root, dataset)
    feats = load_test_features(root, dataset, FEATURE_NAME, gt)
    keep = [i for i, n in enumerate(gt["qimlist"]) if query_names is None or n in query_names]
    if not keep:
        raise CSAInputError(f"no query of {dataset} is left to evaluate")
    return feats.query[keep], feats.db, [gt["gnd"][i] for i in keep]


def csa_gain(model: torch.nn.Module, qvecs: np.ndarray, dbvecs: np.ndarray, gnd: list[dict],
             topk: int = TEST_TOPK, n_boot: int = 1000) -> dict[str, float]:
    """First-stage and CSA Medium / Hard mAP, and the CSA Medium gain with its 95% paired-bootstrap interval
    over queries (``medium_gain_low/high``) and over landmarks (``medium_gain_landmark_low/high``, with the
    number of ``test_landmarks``)."""
    k = min(topk, dbvecs.shape[0])
    method = {"CSA": lambda q, d, r: rerank(model, q, d, r, topk=k, anchor_len=model.config["anchor_len"],
                                            progress=False)}
    table = run_comparison(qvecs, dbvecs, gnd, method, n_boot=n_boot, progress=False, groups=query_landmarks(gnd))
    first, csa = table.iloc[0], table.iloc[1]
    return {"queries": len(gnd), "first_medium": first["medium_map"], "csa_medium": csa["medium_map"],
            "first_hard": first["hard_map"], "csa_hard": csa["hard_map"], "medium_gain": csa["medium_gain"],
            "medium_gain_low": csa["medium_gain_query_low"], "medium_gain_high": csa["medium_gain_query_high"],
            "test_landmarks": csa["landmarks"], "medium_gain_landmark_low": csa["medium_gain_low"],
            "medium_gain_landmark_high": csa["medium_gain_high"]}


def test_benchmarks(trainset: str) -> tuple[str, str]:
    """The benchmarks a model trained on ``trainset`` is tested on: the other city's official queries and its
    leave-one-out queries."""
    test = TRAIN_TO_TEST[trainset]
    return test, CITIES[test]["loo"]


def train_demo_model(data_root: Path, trainset: str, out: Path, seed: int,
                     overrides: Mapping[str, Any]) -> tuple[Any, float]:
    """``(model in eval mode, training seconds)``: the ``demo`` recipe with ``overrides`` on ``trainset`` (CPU)."""
    config = TrainConfig.from_recipe("demo", **{**overrides, "data_root": str(data_root), "trainset": trainset,
                                                "feature_names": [FEATURE_NAME], "output_dir": str(out),
                                                "device": "cpu", "num_workers": 0, "progress": False,
                                                "seed": seed})
    start = time.perf_counter()
    model = run_training(config)["model"].eval()
    return model, time.perf_counter() - start


def train_and_test(root: Path, trainset: str, data_root: Path, name: str, out: Path, seed: int,
                   overrides: Mapping[str, Any], columns: Mapping[str, Any]) -> list[dict]:
    """Train on trainset ``name`` of ``data_root`` (a copy of ``trainset`` or itself); one row per benchmark of
    the test city (the official queries and the leave-one-out queries) with its CSA gains, after ``columns``."""
    model, seconds = train_demo_model(data_root, name, out, seed, overrides)
    return [{"trainset": trainset, **columns, "benchmark": benchmark,
             **csa_gain(model, *held_out_benchmark(root, benchmark)), "train_seconds": seconds}
            for benchmark in test_benchmarks(trainset)]
