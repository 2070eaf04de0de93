"""Compare re-rankers under one protocol: same first stage, revisited mAP, timing, paired bootstrap.

:func:`run_comparison` evaluates every method on the same first-stage ranking and reports
Easy / Medium / Hard mAP, Medium mP@10, CPU time per query and the paired-bootstrap interval of
each method's Medium and Hard gain over the first stage (queries resampled jointly, so the
interval is about the *difference*, not two independent noises).  :func:`default_methods` gives
the baselines of :mod:`csa.baselines` (and CSA when a model is given) with the papers' defaults;
:data:`PUBLISHED` holds the published numbers for the same methods.
"""
from __future__ import annotations

import time
from functools import partial
from typing import Any, Callable, Mapping, Sequence

import pandas as pd
from tqdm import tqdm

from csa import baselines
from csa.evaluate import evaluate_revisited
from csa.search import first_stage
from csa.stats import paired_bootstrap_gain
from csa.validation import CSAInputError, check_descriptors, check_gnd, check_ranks

__all__ = ["run_comparison", "default_methods", "summary_table", "published_table", "PUBLISHED", "FIRST_STAGE", "COLUMNS"]

FIRST_STAGE = "first stage"

#: Columns of the table returned by :func:`run_comparison` (mAP / mP@10 / gains in percent points).
COLUMNS = ["method", "easy_map", "medium_map", "hard_map", "medium_mp@10", "ms_per_query",
           "medium_gain", "medium_gain_low", "medium_gain_high",
           "hard_gain", "hard_gain_low", "hard_gain_high"]

Method = Callable[[Any, Any, Any], Any]


def run_comparison(qvecs: Any, dbvecs: Any, gnd: Sequence[dict], methods: Mapping[str, Method],
                   first_stage_ranks: Any = None, n_boot: int = 10000, seed: int = 0, level: float = 0.95,
                   progress: bool = True) -> pd.DataFrame:
    """Evaluate ``methods`` (name -> ``f(qvecs, dbvecs, ranks) -> ranks``) against the first stage.

    ``gnd`` is the raw revisitop ground truth (list of {'easy', 'hard', 'junk'}, one per query, or the
    whole dict with a 'gnd' key).  ``first_stage_ranks`` (N or K, Q) defaults to the exact cosine
    ranking of the whole database (:func:`csa.search.first_stage`); every method receives it.
    Returns one row per method, the first-stage row first, with the columns :data:`COLUMNS`:
    mAPs and mP@10 in percent; ``ms_per_query`` = wall time of the method call
    (``time.perf_counter``, on this CPU, excluding the first stage) divided by Q — for the first
    stage, the time of the search when it is computed here, else NaN; gains = method minus first
    stage in mAP points with the ``level`` percentile-bootstrap interval over ``n_boot`` joint
    resamples of the queries (:func:`csa.stats.paired_bootstrap_gain`, same ``seed`` for every
    method, queries without positives excluded).  The first-stage row has gain 0 [0, 0].
    """
    if isinstance(gnd, dict) and "gnd" in gnd:
        gnd = gnd["gnd"]
    qvecs, dbvecs = check_descriptors(qvecs, dbvecs, normalize="warn")
    n_q, n_db = qvecs.shape[0], dbvecs.shape[0]
    check_gnd(gnd, n_db=n_db)
    if len(gnd) != n_q:
        raise CSAInputError(f"gnd has {len(gnd)} queries but qvecs has {n_q} rows; they must describe the "
                            f"same queries in the same order")
    if not isinstance(methods, Mapping) or not methods:
        raise CSAInputError("methods must be a non-empty dict {name: f(qvecs, dbvecs, ranks) -> ranks}")
    for name, method in methods.items():
        if name == FIRST_STAGE:
            raise CSAInputError(f"the method name {FIRST_STAGE!r} is reserved for the baseline row; rename it")
        if not callable(method):
            raise CSAInputError(f"methods[{name!r}] is not callable: {method!r}")
    first_ms = float("nan")
    if first_stage_ranks is None:
        start = time.perf_counter()
        first_stage_ranks = first_stage(qvecs, dbvecs)
        first_ms = 1000.0 * (time.perf_counter() - start) / n_q
    check_ranks(first_stage_ranks, n_db, n_q)

    base = evaluate_revisited(first_stage_ranks, gnd)
    rows = [_row(FIRST_STAGE, base, base, first_ms, n_boot, seed, level)]
    for name, method in tqdm(list(methods.items()), desc="methods", disable=not progress):
        start = time.perf_counter()
        ranks = method(qvecs, dbvecs, first_stage_ranks)
        ms = 1000.0 * (time.perf_counter() - start) / n_q
        rows.append(_row(name, evaluate_revisited(ranks, gnd), base, ms, n_boot, seed, level))
    return pd.DataFrame(rows, columns=COLUMNS)


def _row(name: str, result: dict, base: dict, ms: float, n_boot: int, seed: int, level: float) -> dict:
    row = {"method": name, "easy_map": result["easy"]["map"], "medium_map": result["medium"]["map"],
           "hard_map": result["hard"]["map"], "medium_mp@10": result["medium"]["mp@k"][10],
           "ms_per_query": ms}
    for proto in ("medium", "hard"):
        gain, low, high = paired_bootstrap_gain(result[proto]["aps"], base[proto]["aps"], n_boot=n_boot,
                                                seed=seed, level=level)
        row.update({f"{proto}_gain": gain, f"{proto}_gain_low": low, f"{proto}_gain_high": high})
    return row


def default_methods(model: Any = None, *, topk: int = 1024, anchor_len: int = 512, n_db: int | None = None,
                    device: Any = None, batch_size: int = 8) -> dict[str, Method]:
    """The compared methods with the papers' default parameters (see each function's docstring).

    Keys: 'AQE', 'αQE', 'αDBA', 'αDBA+αQE', 'diffusion', 'k-reciprocal', 'affinity cosine',
    'affinity cosine (centred)', and with a CSA ``model``: 'CSA', 'αQE+CSA' (the paper's GSS+CSA
    style row: αQE re-query, then CSA on its top-K) and 'diffusion+CSA'.  CSA runs through
    :func:`csa.rerank.rerank` with ``topk`` and the model's own anchor length.
    ``n_db`` (the database size) caps every depth parameter (n, truncation, k, topk, k1) so that
    the defaults also run on small databases; without it the paper values are used as they are.
    """
    def cap(value: int, limit: int | None) -> int:
        return value if limit is None else max(1, min(value, limit))

    k_topk = cap(topk, n_db)
    n_qe = cap(50, n_db)
    n_dba = cap(50, None if n_db is None else n_db - 1)
    truncation = cap(1000, n_db)
    methods: dict[str, Method] = {
        "AQE": partial(baselines.aqe, n=cap(2, n_db)),
        "αQE": partial(baselines.alpha_qe, n=n_qe, alpha=3.0),
        "αDBA": partial(baselines.alpha_dba, n=n_dba, alpha=3.0),
        "αDBA+αQE": baselines.compose(baselines.AugmentDatabase(n=n_dba, alpha=3.0),
                                      partial(baselines.alpha_qe, n=n_qe, alpha=3.0)),
        "diffusion": partial(baselines.diffusion, k=cap(50, truncation - 1), truncation=truncation,
                             alpha=0.99, gamma=3.0, iterations=20, query_k=cap(10, truncation)),
        "k-reciprocal": partial(baselines.k_reciprocal, k1=cap(20, k_topk), k2=6, lambda_value=0.3,
                                topk=k_topk),
        "affinity cosine": partial(baselines.affinity_cosine, topk=k_topk,
                                   anchor_len=cap(anchor_len, None if n_db is None else n_db + 1)),
        "affinity cosine (centred)": partial(baselines.affinity_cosine, topk=k_topk, centred=True,
                                             anchor_len=cap(anchor_len, None if n_db is None else n_db + 1)),
    }
    if model is not None:
        from csa.rerank import rerank

        model_anchor_len = int(getattr(model, "config", {}).get("anchor_len", anchor_len))
        csa_step = partial(_csa, rerank, model, topk=k_topk, anchor_len=model_anchor_len, device=device,
                           batch_size=batch_size)
        methods["CSA"] = csa_step
        methods["αQE+CSA"] = baselines.compose(methods["αQE"], csa_step)
        methods["diffusion+CSA"] = baselines.compose(methods["diffusion"], csa_step)
    return methods


def _csa(rerank: Callable, model: Any, qvecs: Any, dbvecs: Any, ranks: Any, **kwargs: Any) -> Any:
    return rerank(model, qvecs, dbvecs, ranks, progress=False, **kwargs)


_CSA_TABLE = "CSA repository README table (MCC-WH/CSA), R101-GeM gl18 descriptors"
_CSA_LOG = "CSA repository README test log (MCC-WH/CSA), K=1024"
_SSR_TABLE = "SSR paper table (Shen et al., NeurIPS 2021), comparable features"


def _published() -> pd.DataFrame:
    rows = []
    csa_table = {  # method: (ROxf, ROxf+R1M, RPar, RPar+R1M), each (Medium, Hard)
        FIRST_STAGE: ((67.3, 44.3), (49.5, 25.7), (80.6, 61.5), (57.3, 29.8)),
        "affinity cosine": ((72.0, 51.1), (52.8, 30.5), (82.9, 66.8), (66.5, 43.4)),
        "CSA": ((78.2, 59.1), (61.5, 38.2), (88.2, 75.3), (71.6, 51.0)),
        "CSA (augmented training)": ((80.3, 62.4), (62.8, 39.4), (90.0, 78.6), (73.0, 53.0)),
    }
    for method, values in csa_table.items():
        for dataset, (medium, hard) in zip(("roxford5k", "roxford5k+r1m", "rparis6k", "rparis6k+r1m"), values):
            rows.append((method, dataset, medium, hard, _CSA_TABLE))
    rows += [("CSA", "roxford5k", 77.92, 58.43, _CSA_LOG), ("CSA", "rparis6k", 87.2, 74.41, _CSA_LOG)]
    ssr_table = {  # method: ((ROxf Medium, Hard), (RPar Medium, Hard))
        "αQE": ((68.2, 44.0), (84.3, 67.2)),
        "AQE": ((70.8, 48.0), (85.3, 68.8)),
        "k-reciprocal": ((72.1, 50.7), (87.9, 74.8)),
        "diffusion (regional)": ((69.0, 44.7), (89.5, 80.0)),
        "SSR": ((75.6, 54.2), (84.4, 67.8)),
        "LAttQE": ((73.4, 49.6), (86.3, 70.6)),
    }
    for method, (oxf, par) in ssr_table.items():
        rows.append((method, "roxford5k", oxf[0], oxf[1], _SSR_TABLE))
        rows.append((method, "rparis6k", par[0], par[1], _SSR_TABLE))
    return pd.DataFrame(rows, columns=["method", "dataset", "medium_map", "hard_map", "source"])


#: Published Medium / Hard mAP (%) for the compared methods, one row per (method, dataset, source).
PUBLISHED: pd.DataFrame = _published()


def _gain_text(row: Mapping[str, Any], protocol: str) -> str:
    if row["method"] == FIRST_STAGE:
        return ""
    gain, low, high = (row[f"{protocol}_gain{s}"] for s in ("", "_low", "_high"))
    return f"{gain:+.1f} [{low:+.1f}, {high:+.1f}]" + (" *" if low > 0 or high < 0 else "")


def summary_table(results: pd.DataFrame) -> pd.DataFrame:
    """A compact, readable view of :func:`run_comparison` rows (with an optional ``dataset`` column).

    mAPs rounded to 0.1; gains as ``+g [low, high]`` with ``*`` when the 95% interval excludes 0 (the
    gain is beyond bootstrap noise); time per query in ms.
    """
    view = pd.DataFrame({
        **({"dataset": results["dataset"]} if "dataset" in results.columns else {}),
        "method": results["method"],
        "E": results["easy_map"].round(1),
        "M": results["medium_map"].round(1),
        "H": results["hard_map"].round(1),
        "mP@10 (M)": results["medium_mp@10"].round(1),
        "M gain [95% CI]": results.apply(_gain_text, axis=1, protocol="medium"),
        "H gain [95% CI]": results.apply(_gain_text, axis=1, protocol="hard"),
        "ms / query": results["ms_per_query"].round(1),
    })
    return view.set_index(["dataset", "method"] if "dataset" in view.columns else ["method"])


def published_table(methods: Sequence[str] | None = None) -> pd.DataFrame:
    """:data:`PUBLISHED` as one row per method and one ``Medium / Hard`` column per benchmark."""
    table = PUBLISHED if methods is None else PUBLISHED[PUBLISHED["method"].isin(list(methods))]
    table = table.drop_duplicates(["method", "dataset"])  # the CSA table first, the README log after it
    cells = table.assign(value=table["medium_map"].map("{:.1f}".format) + " / " + table["hard_map"].map("{:.1f}".format))
    wide = cells.pivot(index="method", columns="dataset", values="value").fillna("")
    order = [c for c in ("roxford5k", "roxford5k+r1m", "rparis6k", "rparis6k+r1m") if c in wide.columns]
    names = list(dict.fromkeys(table["method"]))
    wide = wide.loc[names, order]
    wide.columns = [f"{c} (M / H)" for c in order]
    return wide
