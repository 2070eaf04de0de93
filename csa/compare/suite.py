"""One comparison per benchmark: the same re-rankers, planned per benchmark, in one table each.

The notebooks compare re-rankers on several demo benchmarks in turn.  :func:`compare_on_benchmarks` loads
each benchmark once (:class:`csa.data.benchmark.Benchmark`, optionally with +R1M distractors), asks
``plan_for(benchmark)`` for its methods, their settings and the depth a streamed first stage must keep
(:class:`MethodPlan`), and runs :func:`csa.compare.runner.compare_benchmark` with landmark-level intervals.
"""
from __future__ import annotations

import os
from typing import Any, Callable, Iterable, Mapping, NamedTuple

import pandas as pd

from csa.compare.runner import compare_benchmark
from csa.data.benchmark import Benchmark
from csa.validation import CSAInputError

__all__ = ["MethodPlan", "compare_on_benchmarks"]


class MethodPlan(NamedTuple):
    """What to compare on one benchmark: ``methods`` (name -> ``f(qvecs, dbvecs, ranks) -> ranks``), their
    ``settings`` (name -> {column: value}, shown as columns) and ``depth``, the first-stage rows every method
    reads (needed only with distractors: CSA max(K, L-1))."""

    methods: Mapping[str, Callable[[Any, Any, Any], Any]]
    settings: Mapping[str, Mapping[str, Any]] | None = None
    depth: int | None = None


def compare_on_benchmarks(data_root: str | os.PathLike, feature_name: str, datasets: Iterable[str],
                          plan_for: Callable[[Benchmark], MethodPlan | tuple], r1m: str | os.PathLike | None = None,
                          n_boot: int = 10000, batch_size: int = 8, count_queries: bool = False,
                          progress: bool = False) -> list[pd.DataFrame]:
    """One comparison table per dataset of ``datasets``, in order, with a ``dataset`` column first.

    Every table is :func:`csa.compare.runner.compare_benchmark`'s, with intervals over the landmarks of the
    benchmark's queries (:meth:`csa.data.benchmark.Benchmark.landmarks`) and ``attrs`` kept for
    :func:`csa.compare.runner.gain_between`; ``count_queries`` adds a ``queries`` column after ``method``.
    ``r1m`` (a ``.npy`` of distractor descriptors; empty or None: none) is appended to every database and the
    first stage streamed; ``batch_size`` queries are then re-ranked together.
    """
    tables = []
    for dataset in datasets:
        bench = Benchmark.load(data_root, dataset, feature_name, r1m=r1m or None)
        plan = plan_for(bench)
        if not isinstance(plan, tuple):
            raise CSAInputError(f"plan_for({dataset!r}) must return a MethodPlan (methods, settings, depth), "
                                f"got {type(plan).__name__}")
        plan = MethodPlan(*plan)
        table = compare_benchmark(bench, plan.methods, depth=plan.depth, n_boot=n_boot, batch_size=batch_size,
                                  progress=progress, settings=plan.settings, groups=bench.landmarks())
        table.insert(0, "dataset", dataset)
        if count_queries:
            table.insert(2, "queries", bench.n_queries)
        tables.append(table)
    return tables
