"""The book's query browser: per-query records (top-k and positives before and after CSA) and their thumbnails.

:func:`build_query_browser` ranks every query of each demo benchmark with the first stage, re-ranks it
with the benchmark's CSA checkpoint (the same calls and APs as notebooks 3 and 4), and writes into one
folder what the static page ``book/query_browser.md`` reads: ``data.html`` (the records as JSON inside a
``<script type="application/json">`` element, embedded into the page at build time) and
``thumbs/<photo folder>/<name>.jpg`` (small JPEG thumbnails of every photo the page shows).

A record holds, for one query: its Medium and Hard AP before and after, its top-``k`` before and after
(database indices with one label letter each: ``e`` easy positive, ``h`` hard positive, ``j`` junk,
``n`` negative, as the Medium protocol sees them), where each of them stands in the other ranking
(``moved``: 1-based rank after of the top-``k`` before, rank before of the top-``k`` after), and every
Medium positive's 1-based rank in the full ranking before and after re-ranking (:func:`positive_ranks`).
"""
from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from PIL import Image

from csa.checkpoint import load_model
from csa.data.demo import LOO_BASE, image_folder
from csa.data.layout import load_gnd, load_test_features
from csa.device import resolve_device
from csa.evaluate import evaluate_revisited
from csa.fileio import atomic_write
from csa.rerank import rerank
from csa.search import first_stage
from csa.validation import CSAInputError

__all__ = ["BROWSER_PROTOCOLS", "DATA_FILE", "THUMBS_DIR", "benchmark_label", "rank_labels", "positive_ranks",
           "query_records", "benchmark_rankings", "write_thumbnails", "write_browser_data", "build_query_browser"]

#: The protocols whose APs the page shows.
BROWSER_PROTOCOLS = ("medium", "hard")
#: File names inside the browser's folder.
DATA_FILE = "data.html"
THUMBS_DIR = "thumbs"
_CITY_NAMES = {"roxford5k-mini": "Oxford", "rparis6k-mini": "Paris"}


def benchmark_label(dataset: str) -> str:
    """A reader's name for a demo benchmark, e.g. ``'Paris, leave-one-out queries'``."""
    base = LOO_BASE.get(dataset, dataset)
    city = _CITY_NAMES.get(base, base)
    return f"{city}, {'leave-one-out' if dataset in LOO_BASE else 'official'} queries"


def rank_labels(ranked: Sequence[int], entry: Mapping[str, Any]) -> str:
    """One letter per ranked database index: ``e``/``h`` easy/hard positive, ``j`` junk, ``n`` negative."""
    easy = {int(i) for i in np.asarray(entry["easy"]).ravel()}
    hard = {int(i) for i in np.asarray(entry["hard"]).ravel()}
    junk = {int(i) for i in np.asarray(entry["junk"]).ravel()}
    return "".join("e" if i in easy else "h" if i in hard else "j" if i in junk else "n"
                   for i in (int(x) for x in np.asarray(ranked).ravel()))


def _rank_of_each(ranking: np.ndarray) -> np.ndarray:
    """``where[i]`` = 1-based rank of database image ``i`` in a full ranking."""
    where = np.empty(ranking.size, dtype=np.int64)
    where[ranking] = np.arange(1, ranking.size + 1)
    return where


def positive_ranks(before: Sequence[int], after: Sequence[int], entry: Mapping[str, Any]) -> dict[str, Any]:
    """Where the Medium positives are: ``{'before': [...], 'after': [...], 'kind': 'ehe...'}``, 1-based ranks in
    the full rankings (junk counted as listed), one entry per positive (``e`` easy, ``h`` hard), ordered by
    rank before."""
    before, after = np.asarray(before).ravel(), np.asarray(after).ravel()
    if before.shape != after.shape or np.unique(before).size != before.size:
        raise CSAInputError("before and after must be two full rankings of the same database (distinct indices)")
    where_before, where_after = _rank_of_each(before), _rank_of_each(after)
    rows = sorted((int(where_before[i]), int(where_after[i]), kind) for kind, key in (("e", "easy"), ("h", "hard"))
                  for i in np.asarray(entry[key], dtype=np.int64).ravel())
    return {"before": [r[0] for r in rows], "after": [r[1] for r in rows], "kind": "".join(r[2] for r in rows)}


def _ranks_of(images: np.ndarray, ranking: np.ndarray) -> list[int]:
    """1-based rank of each of ``images`` in the full ``ranking``."""
    return _rank_of_each(ranking)[np.asarray(images)].tolist()


def _ap(value: float) -> float | None:
    """An AP in percent for JSON: two decimals, None where the query has no positive under the protocol."""
    return None if math.isnan(value) else round(float(value), 2)


def query_records(dataset: str, gt: Mapping[str, Any], before: np.ndarray, after: np.ndarray, k: int = 10,
                  sizes: Sequence[tuple[int, int]] | None = None) -> list[dict]:
    """One record per query of a benchmark from its full (N, Q) rankings before and after re-ranking.

    APs are :func:`csa.evaluate.evaluate_revisited`'s (percent, two decimals; None without positives).
    ``sizes`` (width, height of each query photo) turns the query box into fractions of the photo.
    """
    before, after = np.asarray(before), np.asarray(after)
    n_db, n_q = len(gt["imlist"]), len(gt["qimlist"])
    if before.shape != (n_db, n_q) or after.shape != (n_db, n_q):
        raise CSAInputError(f"rankings must be full ({n_db}, {n_q}) arrays for {dataset}, got {before.shape} and "
                            f"{after.shape}: rank the whole database before and after re-ranking")
    aps = {when: evaluate_revisited(ranks, gt) for when, ranks in (("before", before), ("after", after))}
    records = []
    for q, entry in enumerate(gt["gnd"]):
        record = {"b": dataset, "q": q, "name": gt["qimlist"][q],
                  "ap": {p: [_ap(aps["before"][p]["aps"][q]), _ap(aps["after"][p]["aps"][q])]
                         for p in BROWSER_PROTOCOLS},
                  "top": {"before": before[:k, q].tolist(), "after": after[:k, q].tolist()},
                  "labels": {"before": rank_labels(before[:k, q], entry), "after": rank_labels(after[:k, q], entry)},
                  "moved": {"before": _ranks_of(before[:k, q], after[:, q]),
                            "after": _ranks_of(after[:k, q], before[:, q])},
                  "positives": positive_ranks(before[:, q], after[:, q], entry)}
        if sizes is not None:
            w, h = sizes[q]
            x1, y1, x2, y2 = (float(v) for v in entry["bbx"])
            record["box"] = [round(x1 / w, 4), round(y1 / h, 4), round(x2 / w, 4), round(y2 / h, 4)]
        records.append(record)
    return records


def benchmark_rankings(data_root: str | os.PathLike, dataset: str, checkpoint: str | os.PathLike, topk: int = 128,
                       feature_name: str = "lite0-gem", device: str = "auto", batch_size: int = 8
                       ) -> tuple[dict, np.ndarray, np.ndarray]:
    """``(ground truth, first-stage ranking, CSA ranking)`` of one benchmark, as notebooks 3 and 4 compute them."""
    dev = resolve_device(device)
    gt = load_gnd(data_root, dataset)
    feats = load_test_features(data_root, dataset, feature_name)
    model = load_model(checkpoint, device=dev)
    before = first_stage(feats.query, feats.db)
    after = rerank(model, feats.query, feats.db, before, topk=min(int(topk), feats.db.shape[0]),
                   anchor_len=model.config["anchor_len"], batch_size=batch_size, device=dev, progress=False)
    return gt, np.asarray(before), np.asarray(after)


def _photo_size(path: Path) -> tuple[int, int]:
    with Image.open(path) as im:      # reads the header only
        return im.size


def _longest_side(path: Path) -> int:
    return max(_photo_size(path))


def _write_thumbnail(src: Path, dst: Path, size: int) -> None:
    with Image.open(src) as im:
        im.draft("RGB", (size, size))          # JPEG: decode at a reduced scale, much faster
        small = im.convert("RGB")
        small.thumbnail((size, size), Image.Resampling.LANCZOS)
    with atomic_write(dst, "wb") as f:
        small.save(f, format="JPEG", quality=80, optimize=True)


def write_thumbnails(names: Sequence[str], image_dir: str | os.PathLike, out_dir: str | os.PathLike,
                     size: int = 128) -> int:
    """Write ``<out_dir>/<name>.jpg`` (longest side ``size`` px) for each photo ``<image_dir>/<name>.jpg``.

    A thumbnail of that size newer than its photo is kept. Returns how many were written.
    """
    image_dir, out_dir = Path(image_dir), Path(out_dir)
    missing = [n for n in names if not (image_dir / f"{n}.jpg").is_file()]
    if missing:
        raise CSAInputError(f"{len(missing)} photo(s) missing from {image_dir} (e.g. {missing[0]}.jpg): restore the "
                            f"demo photos (git checkout data/demo/jpg) and run again")
    written = 0
    for name in sorted(set(names)):
        src, dst = image_dir / f"{name}.jpg", out_dir / f"{name}.jpg"
        if dst.is_file() and dst.stat().st_mtime >= src.stat().st_mtime and _longest_side(dst) == int(size):
            continue
        _write_thumbnail(src, dst, int(size))
        written += 1
    return written


def write_browser_data(payload: Mapping[str, Any], path: str | os.PathLike) -> Path:
    """Write ``payload`` as JSON inside ``<script type="application/json" id="qb-data">`` (atomically)."""
    text = json.dumps(payload, separators=(",", ":"), allow_nan=False).replace("</", "<\\/")
    with atomic_write(path, "w") as f:
        f.write(f'<script type="application/json" id="qb-data">{text}</script>\n')
    return Path(path)


def build_query_browser(data_root: str | os.PathLike, checkpoints: Mapping[str, str], out_dir: str | os.PathLike,
                        topk: int = 128, k: int = 10, thumb_size: int = 128, feature_name: str = "lite0-gem",
                        device: str = "auto", batch_size: int = 8) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Records and thumbnails of every query of the benchmarks in ``checkpoints`` (dataset -> checkpoint).

    Writes ``<out_dir>/data.html`` and ``<out_dir>/thumbs/``; returns ``(summary, per_query)``: one row per
    benchmark (queries, mAP before/after per protocol, thumbnails written) and one row per query.
    """
    if not checkpoints:
        raise CSAInputError("checkpoints is empty: pass {dataset: checkpoint} for at least one benchmark")
    out_dir = Path(out_dir)
    payload: dict[str, Any] = {"k": int(k), "topk": int(topk), "thumb_size": int(thumb_size),
                               "benchmarks": {}, "imlists": {}, "queries": []}
    summary = []
    for dataset, ckpt in checkpoints.items():
        gt, before, after = benchmark_rankings(data_root, dataset, ckpt, topk, feature_name, device, batch_size)
        photos = image_folder(data_root, dataset)
        sizes = [_photo_size(photos / f"{name}.jpg") for name in gt["qimlist"]]
        records = query_records(dataset, gt, before, after, k=k, sizes=sizes)
        shown = {gt["imlist"][i] for r in records for i in r["top"]["before"] + r["top"]["after"]}
        written = write_thumbnails(sorted(shown | set(gt["qimlist"])), photos, out_dir / THUMBS_DIR / photos.name,
                                   size=thumb_size)
        if payload["imlists"].setdefault(photos.name, list(gt["imlist"])) != list(gt["imlist"]):
            raise CSAInputError(f"{dataset} lists the photos of {photos} in another order than a benchmark before it: "
                                f"rebuild the demo annotations (csa demo build) so that both share one database list")
        payload["benchmarks"][dataset] = {"label": benchmark_label(dataset), "photos": photos.name,
                                          "queries": len(records), "topk": min(int(topk), before.shape[0])}
        payload["queries"].extend(records)
        scores = {when: evaluate_revisited(ranks, gt) for when, ranks in (("before", before), ("after", after))}
        summary.append({"dataset": dataset, "benchmark": benchmark_label(dataset), "queries": len(records),
                        **{f"{p.capitalize()} mAP {when}": scores[when][p]["map"]
                           for p in BROWSER_PROTOCOLS for when in scores},
                        "thumbnails written": written})
    write_browser_data(payload, out_dir / DATA_FILE)
    per_query = pd.DataFrame([{"dataset": r["b"], "query": r["q"], "name": r["name"],
                               **{f"{p}_ap_{when}": r["ap"][p][i] for p in BROWSER_PROTOCOLS
                                  for i, when in enumerate(("before", "after"))}} for r in payload["queries"]])
    return pd.DataFrame(summary), per_query
