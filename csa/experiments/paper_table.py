"""The paper's table on the demo, assembled from per-query APs with landmark-level intervals, and its cache.

:func:`paper_table` turns the long per-query APs of :mod:`csa.experiments.pooled` into one row per
(protocol, benchmark, descriptors, method): Medium / Hard mAP and the gain over the first stage of the
same descriptors, with a paired bootstrap that resamples landmarks (all LOO photos of a landmark share
their positives, so they are one unit; :func:`csa.stats.paired_bootstrap_gain` with ``groups``).
:func:`paper_comparisons` gives the paired differences the paper's claims rest on (CSA minus the best
untrained re-ranker, augmented minus single-backbone CSA).  Pooled folds are concatenated: every LOO
query is tested once, by the model that did not train on its landmark.  :func:`run_or_load` reads the
cached results when their fingerprint (the compact descriptor sets' digests and the settings) matches,
and otherwise runs every protocol (about an hour on two CPU cores) and writes them.
:func:`refresh_untrained` re-chooses the untrained re-rankers' L of cached results and recomputes only
their rows (no training), for a change of that selection alone.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import pandas as pd

from csa.compare.published import FIRST_STAGE, published_table
from csa.descriptors.compact import compact_path
from csa.fileio import atomic_write, fingerprint, sha256_file
from csa.stats import count_groups, paired_bootstrap_gain
from csa.validation import CSAInputError

__all__ = ["PAPER_METHODS", "DEFAULT_SETTINGS", "paper_table", "paper_comparisons", "published_rows", "results_fingerprint",
           "run_or_load", "refresh_untrained"]

#: The published rows printed beside the demo table (csa.compare.published).
PAPER_METHODS = (FIRST_STAGE, "affinity cosine (L = 512)", "CSA", "CSA (augmented training)")
#: The runs behind the committed results: the three backbones' compact sets, each cross-city direction
#: (trained on, tested on, the recipe chosen on the training city), the pooled protocol's recipe and folds,
#: and how the untrained re-rankers' L is chosen (csa.experiments.pooled.pick_untrained_l).
DEFAULT_SETTINGS: Mapping[str, Any] = {
    "features": ["lite0-gem", "lite1-gem", "lite2-gem"],
    "cross_city": [["rparis6k-mini", "roxford5k-mini", "demo-paris"], ["roxford5k-mini", "rparis6k-mini", "demo-oxford"]],
    "pooled_recipe": "demo",
    "pooled_folds": 3,
    "seed": 0,
    "untrained_l": "inner held-out folds (3) of the training pool: whitening learned on the inner-train landmarks, "
                   "L in (32, 64, 128, 256, 512) scored on the inner-held-out landmarks' LOO queries",
}
_KEYS = ["protocol", "benchmark", "whitening", "descriptors"]
_TRANSFER = "CSA (Lite0 model, transfer)"


def _with_units(aps: pd.DataFrame) -> pd.DataFrame:
    """Add ``unit`` (the landmark as an independent unit: its city's benchmark and its id there), then merge
    the pooled folds' benchmarks of both cities into one ``pooled LOO`` benchmark."""
    aps = aps.assign(unit=aps["benchmark"] + ":" + aps["landmark"].astype(str))
    return aps.assign(benchmark=aps["benchmark"].where(aps["protocol"] != "pooled", "pooled LOO"))


def _groups(frame: pd.DataFrame) -> np.ndarray:
    return frame["unit"].to_numpy()


def _paired(frame: pd.DataFrame, new: str, base: str, n_boot: int) -> dict[str, Any] | None:
    """Paired landmark-bootstrap difference of two methods' Medium / Hard APs on the same queries."""
    a = frame[frame["method"] == new].sort_values(["fold", "unit", "query"], kind="stable")
    b = frame[frame["method"] == base].sort_values(["fold", "unit", "query"], kind="stable")
    if a.empty or b.empty or len(a) != len(b):
        return None
    out = {"queries": len(a), "landmarks": count_groups(_groups(a))}
    for proto in ("medium", "hard"):
        gain, low, high = paired_bootstrap_gain(a[f"{proto}_ap"], b[f"{proto}_ap"], n_boot=n_boot, groups=_groups(a))
        out.update({f"{proto}_gain": gain, f"{proto}_low": low, f"{proto}_high": high})
    return out


def _interval(row: Mapping[str, Any], proto: str) -> str:
    g, lo, hi = row[f"{proto}_gain"], row[f"{proto}_low"], row[f"{proto}_high"]
    return f"{g:+.1f} [{lo:+.1f}, {hi:+.1f}]" + (" *" if lo > 0 or hi < 0 else "")


def paper_table(aps: pd.DataFrame, n_boot: int = 10000) -> pd.DataFrame:
    """One row per (protocol, benchmark, whitening, descriptors, method): mAPs and the landmark-level
    interval of the gain over the first stage of the same descriptors (``*``: the interval excludes 0)."""
    aps = _with_units(aps)
    rows = []
    for key, frame in aps.groupby(_KEYS, sort=False):
        for method in dict.fromkeys(frame["method"]):
            sub = frame[frame["method"] == method]
            row = dict(zip(_KEYS, key), method=method, queries=len(sub),
                       landmarks=count_groups(_groups(sub)),
                       medium=sub["medium_ap"].mean(), hard=sub["hard_ap"].mean())
            paired = _paired(frame, method, FIRST_STAGE, n_boot) if method != FIRST_STAGE else None
            if paired:
                row.update({k: v for k, v in paired.items() if k not in ("queries", "landmarks")})
                row.update(medium_vs_first=_interval(paired, "medium"), hard_vs_first=_interval(paired, "hard"))
            rows.append(row)
    return pd.DataFrame(rows)


def paper_comparisons(aps: pd.DataFrame, n_boot: int = 10000) -> pd.DataFrame:
    """The paired differences behind the paper's claims, per (protocol, benchmark, whitening): CSA minus
    each untrained re-ranker and minus the better of the two on this benchmark, augmented minus
    single-backbone CSA (landmark-level intervals)."""
    aps = _with_units(aps)
    rows = []
    for key, frame in aps.groupby(_KEYS, sort=False):
        methods = list(dict.fromkeys(frame["method"]))
        untrained = [m for m in methods if m.startswith("untrained")]
        best = max(untrained, key=lambda m: frame.loc[frame["method"] == m, "medium_ap"].mean(), default=None)
        pairs = [("CSA", m, f"CSA minus {m}") for m in untrained]
        if best:
            pairs.append(("CSA", best, "CSA minus the best untrained (on this benchmark)"))
        if "CSA augmented (Lite0/1/2)" in methods:
            pairs += [("CSA augmented (Lite0/1/2)", "CSA", "augmented minus single-backbone CSA"),
                      ("CSA augmented (Lite0/1/2)", best, "augmented minus the best untrained")]
        for new, base, what in pairs:
            paired = _paired(frame, new, base, n_boot)
            if paired:
                rows.append({**dict(zip(_KEYS, key)), "comparison": what, **paired,
                             "medium": _interval(paired, "medium"), "hard": _interval(paired, "hard")})
    return pd.DataFrame(rows, columns=[*_KEYS, "comparison", "queries", "landmarks", "medium_gain", "medium_low",
                                       "medium_high", "hard_gain", "hard_low", "hard_high", "medium", "hard"])


def published_rows() -> pd.DataFrame:
    """The paper's published rows (ROxf / RPar, Medium / Hard) for the shape of the table."""
    return published_table(list(PAPER_METHODS))


def results_fingerprint(root: str | os.PathLike, settings: Mapping[str, Any]) -> str:
    """Fingerprint of a run: the compact descriptor sets' sha256 and the experiment ``settings``."""
    digests = {name: sha256_file(compact_path(root, name)) for name in settings["features"]}
    return fingerprint({"descriptors": digests, "settings": dict(settings)})


def _parts(settings: Mapping[str, Any]) -> list[str]:
    return [f"cross-city-{train}" for train, _, _ in settings["cross_city"]] + \
        [f"pooled-fold{f}" for f in range(settings["pooled_folds"])]


_FILES = ("paper_aps.csv", "paper_whitening.csv", "paper_untrained_l.csv")


def _run_part(part: str, cities: Mapping[str, Any], settings: Mapping[str, Any]) -> tuple[pd.DataFrame, ...]:
    from csa.experiments.pooled import cross_city_runs, pooled_runs

    if part.startswith("cross-city-"):
        train, test, recipe = next(c for c in settings["cross_city"] if part == f"cross-city-{c[0]}")
        aps, sel, lengths = cross_city_runs(cities[train], cities[test], recipe, seed=settings["seed"])
        return aps, sel.assign(protocol="cross-city"), lengths
    fold = int(part.removeprefix("pooled-fold"))
    aps, sel, lengths = pooled_runs(list(cities.values()), settings["pooled_recipe"], settings["pooled_folds"],
                                    seed=settings["seed"], folds=[fold])
    return aps, sel.assign(protocol="pooled", trained_on="both cities"), lengths


def _write_results(out_dir: Path, frames: Sequence[pd.DataFrame], stamp: Mapping[str, Any]) -> None:
    """Write the result files atomically, the fingerprint last."""
    out_dir.mkdir(parents=True, exist_ok=True)
    for frame, name in zip(frames, _FILES):
        with atomic_write(out_dir / name, "w") as f:
            frame.to_csv(f, index=False)
    with atomic_write(out_dir / "paper_aps.fingerprint.json", "w") as f:
        json.dump(dict(stamp), f, indent=1)
        f.write("\n")


def run_or_load(root: str | os.PathLike, out_dir: str | os.PathLike, settings: Mapping[str, Any],
                recompute: bool = False, run_missing: bool = True,
                order: Sequence[str] | None = None) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame, dict]:
    """``(per-query APs, whitening selections, untrained L selections, info)``: read ``<out_dir>/paper_aps.csv``,
    ``paper_whitening.csv`` and ``paper_untrained_l.csv`` when their fingerprint matches ``settings`` and the
    descriptors; else run both cross-city directions (:func:`csa.experiments.pooled.cross_city_runs`) and
    every pooled fold (:func:`~csa.experiments.pooled.pooled_runs`) and write them (atomically, fingerprint last).

    Each direction and fold is kept under ``<root>/cache/paper/<fingerprint>/`` as it finishes, so an
    interrupted run resumes where it stopped; ``recompute`` ignores the final files, not those parts;
    ``run_missing=False`` writes the final files from the finished parts only; ``order`` runs the missing
    parts in that order (names as in ``info['parts']``; the results keep the settings' order).  ``info`` has
    ``recomputed`` (bool), ``parts`` (those in the results) and ``missing`` (those not run).
    """
    out_dir = Path(out_dir)
    digest = results_fingerprint(root, settings)
    stamp = out_dir / "paper_aps.fingerprint.json"
    files = [out_dir / name for name in _FILES]
    if not recompute and stamp.is_file() and all(f.is_file() for f in files):
        info = json.loads(stamp.read_text())
        if info.get("fingerprint") == digest:
            return (*(pd.read_csv(f) for f in files), {"recomputed": False, "parts": info["parts"],
                                                       "missing": info["missing"]})
    cache = Path(root, "cache", "paper", digest[:16])
    cache.mkdir(parents=True, exist_ok=True)
    cities: dict[str, Any] = {}
    all_parts = _parts(settings)
    if order is not None and set(order) != set(all_parts):
        raise CSAInputError(f"order must list every run once: {all_parts}")
    for part in order or all_parts:
        paths = [cache / f"{part}_{name.removeprefix('paper_')}" for name in _FILES]
        if run_missing and not all(p.is_file() for p in paths):
            if not cities:
                cities = _load_cities(root, settings)
            for frame, path in zip(_run_part(part, cities, settings), paths):
                with atomic_write(path, "w") as f:
                    frame.to_csv(f, index=False)
    parts: list[list[pd.DataFrame]] = [[], [], []]
    done, missing = [], []
    for part in all_parts:
        paths = [cache / f"{part}_{name.removeprefix('paper_')}" for name in _FILES]
        if not all(p.is_file() for p in paths):
            missing.append(part)
            continue
        for frames, path in zip(parts, paths):
            frames.append(pd.read_csv(path))
        done.append(part)
    results = [pd.concat(f, ignore_index=True) if f else pd.DataFrame() for f in parts]
    _write_results(out_dir, results, {"fingerprint": digest, "settings": dict(settings), "parts": done, "missing": missing})
    return (*results, {"recomputed": True, "parts": done, "missing": missing})


def _load_cities(root: str | os.PathLike, settings: Mapping[str, Any]) -> dict[str, Any]:
    from csa.experiments.landmark_pool import load_city

    return {d: load_city(root, d, settings["features"]) for d in ("roxford5k-mini", "rparis6k-mini")}


_CASE = ["protocol", "trained_on", "fold", "whitening"]
_UNTRAINED = ("untrained raw", "untrained centred")


def _case_setups(cities: Mapping[str, Any], settings: Mapping[str, Any]) -> dict[tuple[str, str, int], tuple]:
    """(protocol, trained on, fold) -> (training pool, tests) for every run of ``settings``."""
    from csa.experiments.pooled import cross_city_setup, pooled_setup

    setups = {("cross-city", train, -1): cross_city_setup(cities[train], cities[test])
              for train, test, _ in settings["cross_city"]}
    for f, setup in enumerate(pooled_setup(list(cities.values()), settings["pooled_folds"])):
        setups[("pooled", "both cities", f)] = setup
    return setups


def _replace_untrained(old: pd.DataFrame, new: pd.DataFrame) -> pd.DataFrame:
    """``old`` (one case's rows) with the untrained rows' APs and every row's ``untrained_l`` taken from
    ``new``; the first-stage rows of both must agree (same descriptors, same whitening), up to the near-ties
    that another thread count can swap."""
    keys = ["benchmark", "descriptors", "method", "query"]
    fresh = new.set_index(keys)
    first = old[old["method"] == "first stage"].set_index(keys).index.intersection(fresh.index)
    gap = np.abs(old.set_index(keys).loc[first, ["medium_ap", "hard_ap"]] - fresh.loc[first, ["medium_ap", "hard_ap"]])
    gap = gap.to_numpy(dtype=float)
    # Another thread count rounds float32 similarities differently and can swap near-tied neighbours (a few
    # queries move by hundredths of an AP point); other descriptors or whitening move most queries by points.
    if len(first) == 0 or np.isnan(gap).all() or np.nanmean(gap) > 0.01 or np.nanmax(gap) > 1.0:
        raise CSAInputError("the recomputed first stage does not match the recorded one: the results were made "
                            "from other descriptors or whitening; rerun run_or_load(..., recompute=True)")
    out = old.set_index(keys)
    rows = out.index[out.index.get_level_values("method").isin(_UNTRAINED)]
    out.loc[rows, ["medium_ap", "hard_ap"]] = fresh.loc[rows, ["medium_ap", "hard_ap"]].to_numpy()
    out["untrained_l"] = new["untrained_l"].iloc[0]
    return out.reset_index()[list(old.columns)]


def refresh_untrained(root: str | os.PathLike, out_dir: str | os.PathLike,
                      settings: Mapping[str, Any]) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Re-choose the untrained re-rankers' L of the committed results with
    :func:`csa.experiments.pooled.pick_untrained_l` and recompute only their per-query APs (no training).

    The results in ``out_dir`` must belong to ``settings`` apart from its ``untrained_l`` entry (same
    descriptors, runs and seeds); the CSA rows are kept as they are.  Writes ``paper_aps.csv``,
    ``paper_untrained_l.csv`` and a fingerprint of ``settings`` (atomically, fingerprint last), so
    :func:`run_or_load` reads them.  Returns ``(per-query APs, L selection table)``.
    """
    from csa.experiments.pooled import untrained_rows

    out_dir = Path(out_dir)
    stamp = json.loads((out_dir / "paper_aps.fingerprint.json").read_text())
    before = {k: v for k, v in settings.items() if k != "untrained_l"}
    if stamp.get("fingerprint") != results_fingerprint(root, {**before, **{k: v for k, v in stamp["settings"].items()
                                                                         if k == "untrained_l"}}):
        raise CSAInputError(f"the results in {out_dir} were not made with these settings and descriptors; "
                            "run run_or_load(..., recompute=True) instead")
    aps = pd.read_csv(out_dir / _FILES[0])
    setups = _case_setups(_load_cities(root, settings), settings)
    frames, tables = [], []
    for case, old in aps.groupby(_CASE, sort=False):
        protocol, trained_on, fold, variant = case
        pool, tests = setups[(protocol, trained_on, int(fold))]
        columns = {"protocol": protocol, "trained_on": trained_on, "fold": int(fold), "selected": old["selected"].iloc[0]}
        new, table = untrained_rows(pool, tests, variant, columns)
        frames.append(_replace_untrained(old, new))
        tables.append(table)
    aps, lengths = pd.concat(frames, ignore_index=True), pd.concat(tables, ignore_index=True)
    _write_results(out_dir, [aps, pd.read_csv(out_dir / _FILES[1]), lengths],
                   {"fingerprint": results_fingerprint(root, settings), "settings": dict(settings),
                    "parts": stamp["parts"], "missing": stamp["missing"]})
    return aps, lengths
