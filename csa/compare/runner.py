"""Compare re-rankers under one protocol: same first stage, revisited mAP, timing, paired bootstrap.

:func:`run_comparison` evaluates every method on the same first-stage ranking and reports
Easy / Medium / Hard mAP, Medium mP@10, CPU time per query and the paired-bootstrap interval of
each method's Medium and Hard gain over the first stage (queries resampled jointly, so the
interval is about the *difference*, not two independent noises).  With ``groups`` (one landmark id per
query, :func:`query_landmarks`) the interval resamples whole landmarks, the independent unit, and the
per-query interval is kept as a labelled second column.  :func:`summary_table` makes it
readable; :func:`gain_between` measures one method against another (not the first stage) on the same
queries; :func:`first_stage_report` gives one dataset's first stage with intervals and chance level.
:func:`compare_benchmark` is the one comparison loop: it takes a loaded
:class:`csa.data.benchmark.Benchmark`, in memory or streamed (+R1M), which :func:`run_comparison` and
:func:`run_comparison_large` build from arrays.
"""
from __future__ import annotations

import os
import time
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import pandas as pd
from tqdm import tqdm

from csa.compare.published import FIRST_STAGE
from csa.data.benchmark import Benchmark
from csa.data.demo import group_queries
from csa.evaluate import format_revisited, random_ranking_map, PROTOCOLS
from csa.stats import bootstrap_map_ci, check_groups, count_groups, paired_bootstrap_gain
from csa.validation import CSAInputError, gnd_list

__all__ = ["run_comparison", "run_comparison_large", "compare_benchmark", "summary_table", "gain_between", "format_gain",
           "first_stage_report", "query_landmarks", "COLUMNS", "QUERY_COLUMNS"]

#: Columns of the table returned by :func:`run_comparison` (mAP / mP@10 / gains in percent points).
COLUMNS = ["method", "easy_map", "medium_map", "hard_map", "medium_mp@10", "ms_per_query",
           "medium_gain", "medium_gain_low", "medium_gain_high",
           "hard_gain", "hard_gain_low", "hard_gain_high", "offline_s"]
#: Columns added after :data:`COLUMNS` when ``groups`` is given: the number of landmarks (the unit of the
#: gain intervals above) and the per-query intervals of the same gains.
QUERY_COLUMNS = ["landmarks", "medium_gain_query_low", "medium_gain_query_high",
                 "hard_gain_query_low", "hard_gain_query_high"]

Method = Callable[[Any, Any, Any], Any]


def run_comparison(qvecs: Any, dbvecs: Any, gnd: Sequence[dict], methods: Mapping[str, Method],
                   first_stage_ranks: Any = None, n_boot: int = 10000, seed: int = 0, level: float = 0.95,
                   progress: bool = True, settings: Mapping[str, Mapping[str, Any]] | None = None,
                   groups: Any = None) -> pd.DataFrame:
    """Evaluate ``methods`` (name -> ``f(qvecs, dbvecs, ranks) -> ranks``) against the first stage.

    ``gnd`` is the raw revisitop ground truth (list of {'easy', 'hard', 'junk'}, one per query, or the
    whole dict with a 'gnd' key).  ``first_stage_ranks`` (N or K, Q) defaults to the exact cosine
    ranking of the whole database (:func:`csa.search.first_stage`); every method receives it.
    Returns one row per method, the first-stage row first, with the columns :data:`COLUMNS`:
    mAPs and mP@10 in percent; ``ms_per_query`` = wall time of the method call
    (``time.perf_counter``, on this CPU, excluding the first stage) divided by Q — for the first
    stage, the time of the search when it is computed here, else NaN; ``offline_s`` = seconds of
    database-side work done once before any query (a method's ``offline(dbvecs)``, e.g. αDBA's
    augmentation), NaN for methods without any; gains = method minus first
    stage in mAP points with the ``level`` percentile-bootstrap interval over ``n_boot`` joint
    resamples of the queries (:func:`csa.stats.paired_bootstrap_gain`, same ``seed`` for every
    method, queries without positives excluded).  The first-stage row has gain 0 [0, 0].
    ``settings`` (method name -> {column: value}, e.g. ``{'CSA': {'topk': 128, 'anchor_len': 64}}``)
    adds those values as columns after ``method`` (empty for the other rows).
    ``groups`` (one landmark id per query, e.g. :func:`query_landmarks`) makes the gain intervals resample
    whole landmarks (:func:`csa.stats.paired_bootstrap_gain` with ``groups``) and appends
    :data:`QUERY_COLUMNS`: the number of landmarks and the per-query intervals, labelled as such.
    ``table.attrs["aps"]`` keeps every row's per-query APs ({method: {protocol: array}}) and
    ``table.attrs["groups"]`` the landmark ids (or None) for :func:`gain_between`.
    """
    return compare_benchmark(Benchmark.from_arrays(qvecs, dbvecs, gnd), methods, first_stage_ranks=first_stage_ranks,
                             n_boot=n_boot, seed=seed, level=level, progress=progress, settings=settings, groups=groups)


def run_comparison_large(qvecs: Any, db: Any, gnd: Sequence[dict], methods: Mapping[str, Method], depth: int,
                         n_boot: int = 10000, seed: int = 0, level: float = 0.95, chunk_size: int = 8192,
                         batch_size: int = 8, progress: bool = True,
                         settings: Mapping[str, Mapping[str, Any]] | None = None, groups: Any = None) -> pd.DataFrame:
    """:func:`run_comparison` over a database too large for memory (e.g. +R1M distractors, memory-mapped).

    The first stage streams ``db`` once (:func:`csa.largescale.first_stage_large`) and keeps the top
    ``depth`` of every query plus the full-ranking positions of its ground truth; each method re-ranks
    those short lists from their rows only (:func:`csa.largescale.rerank_large`, blocks of
    ``batch_size`` queries), so ``depth`` must cover what every method reads (CSA: max(K, L-1)).
    The evaluation is exact (positions below the re-ranked top are the first stage's). Same table as
    :func:`run_comparison` (``groups``: landmark-level intervals); the first-stage ``ms_per_query`` is the
    streaming search.
    """
    return compare_benchmark(Benchmark.from_arrays(qvecs, db, gnd, streamed=True), methods, depth=depth,
                             n_boot=n_boot, seed=seed, level=level, chunk_size=chunk_size, batch_size=batch_size,
                             progress=progress, settings=settings, groups=groups)


def compare_benchmark(bench: Benchmark, methods: Mapping[str, Method], depth: int | None = None,
                      first_stage_ranks: Any = None, n_boot: int = 10000, seed: int = 0, level: float = 0.95,
                      chunk_size: int = 8192, batch_size: int = 8, progress: bool = True,
                      settings: Mapping[str, Mapping[str, Any]] | None = None, groups: Any = None) -> pd.DataFrame:
    """The table of :func:`run_comparison` for a loaded :class:`csa.data.benchmark.Benchmark`, in memory or streamed.

    In memory every method gets the whole first-stage ranking (or ``first_stage_ranks``) and a method with an
    ``offline`` step is prepared first (``offline_s``); streamed (+R1M) the first stage keeps the top ``depth``
    rows (database chunks of ``chunk_size``) and every method re-ranks them block by block of ``batch_size``
    queries (:func:`run_comparison_large`).  The first-stage ``ms_per_query`` is the search when computed here.
    """
    _check_methods(methods)
    first_ms = float("nan")
    if first_stage_ranks is None:
        start = time.perf_counter()
        first = bench.first_stage(depth=depth, chunk_size=chunk_size, progress=progress)
        first_ms = 1000.0 * (time.perf_counter() - start) / bench.n_queries
    else:
        first = bench.first_stage_from(first_stage_ranks)
    groups = _check_groups(groups, bench.n_queries)
    prepare = None if bench.streamed else (lambda method: method.offline(bench.dbvecs))
    return _comparison_table(methods, lambda method: bench.rerank(method, first, batch_size), first.evaluate,
                             first.evaluate(), first_ms, bench.n_queries, n_boot, seed, level, progress, settings,
                             prepare, groups)


def _check_methods(methods: Mapping[str, Method]) -> None:
    if not isinstance(methods, Mapping) or not methods:
        raise CSAInputError("methods must be a non-empty dict {name: f(qvecs, dbvecs, ranks) -> ranks}")
    for name, method in methods.items():
        if name == FIRST_STAGE:
            raise CSAInputError(f"the method name {FIRST_STAGE!r} is reserved for the baseline row; rename it")
        if not callable(method):
            raise CSAInputError(f"methods[{name!r}] is not callable: {method!r}")


def _check_groups(groups: Any, n_q: int) -> list | None:
    ids = check_groups(groups, n_q)
    return None if ids is None else ids.tolist()  # a plain list: pandas compares attrs when frames are concatenated


def _comparison_table(methods: Mapping[str, Method], run: Callable[[Method], Any], evaluate: Callable[[Any], dict],
                      base: dict, first_ms: float, n_q: int, n_boot: int, seed: int, level: float, progress: bool,
                      settings: Mapping[str, Mapping[str, Any]] | None,
                      prepare: Callable[[Any], Any] | None = None, groups: list | None = None) -> pd.DataFrame:
    """The rows of a comparison: the first stage (``base``), then each method run, timed and evaluated.

    With ``prepare``, a method that has an ``offline`` step (database-side work done once before any
    query, e.g. αDBA's augmentation) is prepared first and that time reported apart (``offline_s``).
    """
    rows = [_row(FIRST_STAGE, base, base, first_ms, n_boot, seed, level, float("nan"), groups)]
    aps = {FIRST_STAGE: _per_query_aps(base)}
    for name, method in tqdm(list(methods.items()), desc="methods", disable=not progress):
        offline_s = float("nan")
        if prepare is not None and callable(getattr(method, "offline", None)):
            start = time.perf_counter()
            prepared = prepare(method)
            if prepared is not None:
                offline_s, method = time.perf_counter() - start, prepared
        start = time.perf_counter()
        ranks = run(method)
        ms = 1000.0 * (time.perf_counter() - start) / n_q
        result = evaluate(ranks)
        rows.append(_row(name, result, base, ms, n_boot, seed, level, offline_s, groups))
        aps[name] = _per_query_aps(result)
    table = pd.DataFrame(rows, columns=COLUMNS + (QUERY_COLUMNS if groups is not None else []))
    table.attrs["aps"] = aps
    table.attrs["groups"] = groups
    extra = list(dict.fromkeys(key for values in (settings or {}).values() for key in values))
    for position, key in enumerate(extra, start=1):
        table.insert(position, key, [(settings or {}).get(name, {}).get(key) for name in table["method"]])
    return table


def _per_query_aps(result: dict) -> dict:
    # plain lists: pandas compares the attrs of concatenated frames, which numpy arrays cannot answer
    return {proto: [float(ap) for ap in result[proto]["aps"]] for proto in PROTOCOLS}


def gain_between(table: pd.DataFrame, new: str, base: str, protocol: str = "medium", n_boot: int = 10000,
                 seed: int = 0, level: float = 0.95, unit: str = "auto") -> tuple[float, float, float]:
    """(gain, lower, upper) in mAP points of method ``new`` over method ``base`` of one comparison table.

    Both rows come from the same :func:`run_comparison` call, so their queries are the same and the
    interval is a paired bootstrap (:func:`csa.stats.paired_bootstrap_gain`), e.g. whether CSA beats an
    untrained re-ranker rather than the first stage.  ``unit``: 'landmarks' resamples whole landmarks
    (the table must have been made with ``groups``), 'queries' resamples queries, 'auto' (default)
    takes landmarks when the table has them.
    """
    if unit not in ("auto", "landmarks", "queries"):
        raise CSAInputError(f"unit must be 'auto', 'landmarks' or 'queries', not {unit!r}")
    groups = table.attrs.get("groups")
    if unit == "landmarks" and groups is None:
        raise CSAInputError("this table has no landmark ids; make it with run_comparison(..., groups=...) "
                            "or pass unit='queries'")
    groups = None if unit == "queries" else groups
    aps = table.attrs.get("aps")
    if not aps:
        raise CSAInputError("this table has no per-query APs (table.attrs['aps']); pass a table returned by "
                            "run_comparison or run_comparison_large, before any concat or copy that drops attrs")
    for name in (new, base):
        if name not in aps:
            raise CSAInputError(f"no method {name!r} in this table; it has {sorted(aps)}")
    if protocol not in PROTOCOLS:
        raise CSAInputError(f"protocol must be one of {list(PROTOCOLS)}, not {protocol!r}")
    return paired_bootstrap_gain(aps[new][protocol], aps[base][protocol], n_boot=n_boot, seed=seed, level=level,
                                 groups=groups)


def query_landmarks(gnd: Any) -> np.ndarray:
    """Landmark id of every query of a benchmark (0..n-1), the unit of a landmark-level interval.

    ``gnd`` is the revisitop ground truth (dict or its 'gnd' list).  Queries whose positive sets
    overlap (IoU >= 0.3, :func:`csa.data.demo.group_queries`) are one landmark: they share their
    positives, so their APs are not independent.
    """
    gnd = gnd_list(gnd)
    if not gnd:
        raise CSAInputError("the ground truth has no queries; nothing to group into landmarks")
    return group_queries(gnd)


def _row(name: str, result: dict, base: dict, ms: float, n_boot: int, seed: int, level: float,
         offline_s: float, groups: list | None = None) -> dict:
    row = {"method": name, "easy_map": result["easy"]["map"], "medium_map": result["medium"]["map"],
           "hard_map": result["hard"]["map"], "medium_mp@10": result["medium"]["mp@k"][10],
           "ms_per_query": ms, "offline_s": offline_s}
    for proto in ("medium", "hard"):
        gain, low, high = paired_bootstrap_gain(result[proto]["aps"], base[proto]["aps"], n_boot=n_boot,
                                                seed=seed, level=level, groups=groups)
        row.update({f"{proto}_gain": gain, f"{proto}_gain_low": low, f"{proto}_gain_high": high})
        if groups is not None:
            _, q_low, q_high = paired_bootstrap_gain(result[proto]["aps"], base[proto]["aps"], n_boot=n_boot,
                                                     seed=seed, level=level)
            row.update({f"{proto}_gain_query_low": q_low, f"{proto}_gain_query_high": q_high})
    if groups is not None:
        row["landmarks"] = count_groups(groups)
    return row


def format_gain(gain: float, low: float, high: float) -> str:
    """``+g [low, high]`` to 0.1 point, ending in an asterisk when the interval excludes 0 (beyond bootstrap noise)."""
    return f"{gain:+.1f} [{low:+.1f}, {high:+.1f}]" + (" *" if low > 0 or high < 0 else "")


def _gain_text(row: Mapping[str, Any], protocol: str, interval: str = "") -> str:
    if row["method"] == FIRST_STAGE:
        return ""
    return format_gain(*(row[f"{protocol}_gain{s}"] for s in ("", f"{interval}_low", f"{interval}_high")))


def summary_table(results: pd.DataFrame) -> pd.DataFrame:
    """A compact, readable view of :func:`run_comparison` rows (with an optional ``dataset`` column).

    mAPs rounded to 0.1; gains as ``+g [low, high]`` with ``*`` when the 95% interval excludes 0 (the
    gain is beyond bootstrap noise); time per query in ms.  A table made with landmark ids shows the
    landmark-level interval first, with the number of landmarks, and the per-query one after it.
    """
    by_landmark = "landmarks" in results.columns and results["landmarks"].notna().any()
    unit = "landmarks" if by_landmark else "queries"
    view = pd.DataFrame({
        **({"dataset": results["dataset"]} if "dataset" in results.columns else {}),
        "method": results["method"],
        "E": results["easy_map"].round(1),
        "M": results["medium_map"].round(1),
        "H": results["hard_map"].round(1),
        "mP@10 (M)": results["medium_mp@10"].round(1),
        **({"landmarks": results["landmarks"]} if by_landmark else {}),
        f"M gain [95% CI, {unit}]": results.apply(_gain_text, axis=1, protocol="medium"),
        f"H gain [95% CI, {unit}]": results.apply(_gain_text, axis=1, protocol="hard"),
        **({"M gain [95% CI, queries]": results.apply(_gain_text, axis=1, protocol="medium", interval="_query")}
           if by_landmark else {}),
        "ms / query": results["ms_per_query"].round(1),
        **({"offline s": results["offline_s"].round(2)} if results.get("offline_s") is not None
           and results["offline_s"].notna().any() else {}),
    })
    return view.set_index(["dataset", "method"] if "dataset" in view.columns else ["method"])


def first_stage_report(data_root: str | os.PathLike, dataset: str, feature_name: str, n_boot: int = 10000,
                       n_random: int = 100, seed: int = 0) -> tuple[dict, str]:
    """First-stage results of ``dataset``: revisited E/M/H mAP and mP@k, 95% bootstrap intervals over queries,
    and the random-ranking level; returns (numbers, printable text)."""
    bench = Benchmark.load(data_root, dataset, feature_name)
    res = bench.first_stage().evaluate()
    chance = random_ranking_map(bench.gnd, bench.n_db, n_random, seed)
    lines = [format_revisited(dataset, res, method=f"first stage ({feature_name})")]
    numbers = {"results": res, "random": chance, "ci": {}}
    for level in PROTOCOLS:
        _, lo, hi = bootstrap_map_ci(res[level]["aps"], n_boot=n_boot, seed=seed)
        numbers["ci"][level] = (lo, hi)
        lines.append(f"  {level:6s} mAP {res[level]['map']:6.2f}  95% CI [{lo:6.2f}, {hi:6.2f}]  "
                     f"random ranking {chance[level]:5.2f}")
    return numbers, "\n".join(lines)
