"""A retrained demo model against its released weights: the weights' difference and both models' test mAPs.

Notebook 2 retrains both cross-city models; :func:`compare_retrained` says whether the new weights equal the
released ones (:func:`csa.training.release.compare_to_release`) and re-ranks the test city's benchmarks with
both, so a difference in weights is read as a difference in mAP.
"""
from __future__ import annotations

import os
from typing import Any

from csa.checkpoint import load_model
from csa.experiments.held_out import csa_gain, held_out_benchmark, test_benchmarks
from csa.training.release import compare_to_release, released_checkpoint

__all__ = ["compare_retrained"]


def compare_retrained(root: str | os.PathLike, trainset: str, checkpoint: str | os.PathLike,
                      n_boot: int = 200) -> list[dict[str, Any]]:
    """A retrained model of ``trainset`` against its released weights: one row per test benchmark with
    whether the weights are identical, their largest difference and both models' CSA Medium mAP."""
    released = released_checkpoint(root, trainset)
    same = compare_to_release(checkpoint, released)
    models = {"retrained": load_model(checkpoint), "released": load_model(released)}
    rows = []
    for benchmark in test_benchmarks(trainset):
        data = held_out_benchmark(root, benchmark)
        medium = {name: csa_gain(model, *data, n_boot=n_boot)["csa_medium"] for name, model in models.items()}
        rows.append({"trainset": trainset, "benchmark": benchmark, "identical weights": same["identical"],
                     "max |weight difference|": same["max_abs_diff"],
                     "retrained: CSA Medium": medium["retrained"], "released: CSA Medium": medium["released"],
                     "difference": medium["retrained"] - medium["released"]})
    return rows
