"""Figures for notebooks and the book: top-k grids, example selection, training and comparison plots.

Every function returns a :class:`matplotlib.figure.Figure` built without pyplot's global state, so
it can be shown in a notebook (it is the cell's value), saved with ``fig.savefig(path)`` or closed by
dropping the reference; nothing accumulates in ``plt``.

Colour code of :func:`plot_topk_grid` (the convention of the CSA paper's qualitative figure):
orange box = the query's region of interest, green border = positive, red border = false positive,
grey border = junk (ignored by the evaluation protocol).
"""
from __future__ import annotations

import os
import textwrap
from collections.abc import Callable, Mapping, Sequence
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.figure import Figure
from matplotlib.patches import Patch, Rectangle

from csa.evaluate import PROTOCOL_SETS
from csa.validation import CSAInputError

__all__ = [
    "plot_method_bars",
    "POSITIVE_COLOR",
    "NEGATIVE_COLOR",
    "JUNK_COLOR",
    "QUERY_COLOR",
    "label_ranked",
    "select_examples",
    "plot_topk_grid",
    "plot_query_examples",
    "plot_query_positives",
    "plot_map_vs_time",
    "spread_positions",
    "plot_ablation",
]

POSITIVE_COLOR = "#2ca02c"
NEGATIVE_COLOR = "#d62728"
JUNK_COLOR = "#9e9e9e"
QUERY_COLOR = "#ff7f0e"
_LABEL_COLORS = {"pos": POSITIVE_COLOR, "neg": NEGATIVE_COLOR, "junk": JUNK_COLOR}

def label_ranked(ranked_db_indices: Sequence[int], gnd_entry: Mapping[str, Any], protocol: str = "medium") -> list[str]:
    """Label each ranked database index ``'pos'``, ``'neg'`` or ``'junk'`` under a revisited protocol.

    ``gnd_entry`` is one query's ground truth (keys ``easy``, ``hard``, ``junk``).  Easy: positives =
    easy, junk = junk + hard; Medium: positives = easy + hard, junk = junk; Hard: positives = hard,
    junk = junk + easy.  Everything else is a negative.
    """
    key = str(protocol).lower()
    if key not in PROTOCOL_SETS:
        raise CSAInputError(f"unknown protocol {protocol!r}: use 'easy', 'medium' or 'hard'")
    missing = [k for k in ("easy", "hard", "junk") if k not in gnd_entry]
    if missing:
        raise CSAInputError(
            f"gnd_entry lacks the key(s) {missing}: pass one query's revisited ground truth, e.g. gnd['gnd'][q]"
        )
    ok_keys, junk_keys = PROTOCOL_SETS[key]
    positives = {int(i) for k in ok_keys for i in np.asarray(gnd_entry[k]).ravel()}
    junk = {int(i) for k in junk_keys for i in np.asarray(gnd_entry[k]).ravel()}
    labels = []
    for index in np.asarray(ranked_db_indices).ravel():
        i = int(index)
        labels.append("pos" if i in positives else "junk" if i in junk else "neg")
    return labels


def select_examples(aps_before: Sequence[float], aps_after: Sequence[float], n: int = 2,
                    visible: Sequence[bool] | None = None) -> tuple[list[int], list[int]]:
    """Pick the queries to show: ``(successes, failures)``, each a list of at most ``n`` query indices.

    Rule: gain = AP after - AP before.  Successes are the queries with the largest strictly positive
    gains, largest first; failures the queries with the largest strictly negative gains (AP losses),
    largest loss first.  Equal gains are ordered by query index (smaller first).  Queries whose AP is
    NaN in either array (no positive under the protocol) are never picked; with ``visible`` (one bool
    per query: does the shown top-k change, e.g. its labels differ), neither are queries whose figure
    would look the same before and after.  If fewer than ``n`` queries qualify, the list is shorter.
    """
    before = np.asarray(aps_before, dtype=np.float64).ravel()
    after = np.asarray(aps_after, dtype=np.float64).ravel()
    if before.shape != after.shape:
        raise CSAInputError(
            f"aps_before has {before.size} entries but aps_after has {after.size}: pass per-query APs "
            "of the same queries in the same order"
        )
    if int(n) < 0:
        raise CSAInputError(f"n must be >= 0, got {n}")
    gain = after - before
    index = np.arange(gain.size)
    valid = ~np.isnan(gain)
    if visible is not None:
        shown = np.asarray(visible, dtype=bool).ravel()
        if shown.shape != gain.shape:
            raise CSAInputError(f"visible has {shown.size} entries for {gain.size} queries: pass one bool per query")
        valid &= shown
    up = index[valid & (gain > 0)]
    down = index[valid & (gain < 0)]
    # np.lexsort sorts by the last key first: primary = gain, secondary = query index.
    successes = up[np.lexsort((up, -gain[up]))][: int(n)]
    failures = down[np.lexsort((down, gain[down]))][: int(n)]
    return [int(i) for i in successes], [int(i) for i in failures]


def _frame_axes(ax, color: str, width: float = 4.0) -> None:
    """Hide ticks and draw a coloured border (the axes' spines) around an image axes."""
    ax.set_xticks([])
    ax.set_yticks([])
    for spine in ax.spines.values():
        spine.set_visible(True)
        spine.set_edgecolor(color)
        spine.set_linewidth(width)


def _check_topk_rows(k: int, before_names: Sequence[Any], after_names: Sequence[Any],
                     labels_before: Sequence[str], labels_after: Sequence[str]) -> int:
    """``k`` as an int after checking that both rankings have ``k`` names and known labels."""
    k = int(k)
    if k < 1:
        raise CSAInputError(f"k must be >= 1, got {k}")
    for what, names, labels in (("before", before_names, labels_before), ("after", after_names, labels_after)):
        if len(names) < k or len(labels) < k:
            raise CSAInputError(
                f"need {k} names and labels for the '{what}' row, got {len(names)} names and {len(labels)} "
                f"labels: pass longer lists or a smaller k"
            )
        bad = sorted({str(lab) for lab in list(labels)[:k]} - set(_LABEL_COLORS))
        if bad:
            raise CSAInputError(f"unknown label(s) {bad} in labels_{what}: use 'pos', 'neg' or 'junk' (see label_ranked)")
    return k


def plot_topk_grid(
    query_image: Any,
    query_bbx: Sequence[float] | None,
    before_names: Sequence[Any],
    after_names: Sequence[Any],
    labels_before: Sequence[str],
    labels_after: Sequence[str],
    image_loader: Callable[[Any], Any],
    k: int = 10,
    title: str | None = None,
    row_titles: tuple[str, str] = ("before re-ranking", "after re-ranking"),
    thumb_inches: float = 1.1,
    per_row: int = 5,
) -> Figure:
    """Query (left, with an orange box) and its top-``k`` results before (upper block) and after (lower block).

    Each ranking is laid out ``per_row`` thumbnails to a row (two rows of five for k = 10); with the
    default ``thumb_inches`` the figure is about 8 inches wide, the width of a book page, so its text
    is shown at about its nominal size (no label under ~13 px at 1280 px).  ``query_image`` and whatever ``image_loader(name)``
    returns may be a PIL image or an array accepted by ``imshow``.  ``query_bbx`` is ``[x1, y1, x2, y2]``
    in the pixels of ``query_image`` (scale the ground truth's box if the image was resized) or None.
    ``labels_*`` come from :func:`label_ranked`; each result gets a green (positive), red (false
    positive) or grey (junk) border and its rank as title.
    """
    k = _check_topk_rows(k, before_names, after_names, labels_before, labels_after)
    per_row = max(1, min(int(per_row), k))

    rows = -(-k // per_row)            # grid rows per ranking
    query_cols = 2                     # the query takes two thumbnail columns and every row
    height_ratios = [1.0] * rows + [0.18] + [1.0] * rows
    fig = Figure(figsize=(thumb_inches * (per_row + query_cols + 0.3),
                          thumb_inches * (2 * rows + 0.18) + (1.25 if title else 0.75)))
    grid = fig.add_gridspec(2 * rows + 1, per_row + query_cols + 1, width_ratios=[1.0] * query_cols + [0.3] + [1.0] * per_row,
                            height_ratios=height_ratios, wspace=0.08, hspace=0.3)
    ax_query = fig.add_subplot(grid[:, :query_cols])
    ax_query.imshow(query_image)
    if query_bbx is not None:
        x1, y1, x2, y2 = (float(v) for v in query_bbx)
        ax_query.add_patch(Rectangle((x1, y1), x2 - x1, y2 - y1, fill=False, edgecolor=QUERY_COLOR, linewidth=3.0))
    _frame_axes(ax_query, QUERY_COLOR, width=1.5)
    ax_query.set_title("query", fontsize=12, fontweight="bold", color=QUERY_COLOR)

    for block, (names, labels, row_title) in enumerate(
        ((before_names, labels_before, row_titles[0]), (after_names, labels_after, row_titles[1]))
    ):
        n_pos = sum(1 for lab in list(labels)[:k] if lab == "pos")
        for rank in range(k):
            r = block * (rows + 1) + rank // per_row
            ax = fig.add_subplot(grid[r, query_cols + 1 + rank % per_row])
            ax.imshow(image_loader(names[rank]))
            _frame_axes(ax, _LABEL_COLORS[str(labels[rank])])
            ax.set_title(str(rank + 1), fontsize=10, pad=2)
            if rank % per_row == 0:
                ax.set_ylabel(f"{row_title}\n{n_pos}/{k} positive" if rank == 0 else "", fontsize=10, labelpad=4)
    legend = [Patch(facecolor="none", edgecolor=c, linewidth=2.5, label=name)
              for name, c in (("positive", POSITIVE_COLOR), ("false positive", NEGATIVE_COLOR), ("junk", JUNK_COLOR))]
    fig.legend(handles=legend, loc="upper right", ncol=1, fontsize=10, frameon=False, borderaxespad=0.2)
    if title:
        fig.suptitle(title, fontsize=11.5, fontweight="bold", x=0.01, ha="left", linespacing=1.3)
    fig.subplots_adjust(left=0.01, right=0.995, bottom=0.02, top=0.8 if title else 0.88)
    return fig


@lru_cache(maxsize=512)
def _load_rgb(path: str) -> Any:
    from PIL import Image

    with Image.open(path) as im:
        return im.convert("RGB")


def plot_query_examples(gt: Mapping[str, Any], image_dir: str | os.PathLike, before: Any, after: Any,
                        aps_before: Sequence[float], aps_after: Sequence[float], n: int = 2, k: int = 10,
                        protocol: str = "medium", dataset: str = "") -> list[tuple[str, int, Figure]]:
    """Top-``k`` before/after figures of the queries :func:`select_examples` picks: ``[(kind, query, fig)]``.

    ``gt`` is the revisitop dict (``imlist``, ``qimlist``, ``gnd``), images are
    ``<image_dir>/<name>.jpg``, ``before`` / ``after`` are (N, Q) rankings and ``aps_*`` their
    per-query APs under ``protocol``.  Successes come first (``kind='success'``), then failures;
    either list may be shorter than ``n`` (e.g. no query lost AP).  Only queries whose top-``k`` labels
    change are shown (a gain made entirely below rank ``k`` would give two identical rows).
    """
    before, after = np.asarray(before), np.asarray(after)
    changed = [label_ranked(before[:k, q], g, protocol) != label_ranked(after[:k, q], g, protocol)
               for q, g in enumerate(gt["gnd"])]
    successes, failures = select_examples(aps_before, aps_after, n=n, visible=changed)
    image_dir = Path(image_dir)

    def load(name: str) -> Any:
        return _load_rgb(str(image_dir / f"{name}.jpg"))

    out = []
    for kind, queries in (("success", successes), ("failure", failures)):
        for q in queries:
            entry = gt["gnd"][q]
            fig = plot_topk_grid(
                load(gt["qimlist"][q]), entry["bbx"], [gt["imlist"][i] for i in before[:k, q]],
                [gt["imlist"][i] for i in after[:k, q]], label_ranked(before[:k, q], entry, protocol),
                label_ranked(after[:k, q], entry, protocol), load, k=k,
                title=(f"{dataset}, {kind}: query {q} ({gt['qimlist'][q]})\n{protocol} AP "
                       f"{aps_before[q]:.1f} -> {aps_after[q]:.1f}"))
            out.append((kind, q, fig))
    return out


def plot_query_positives(benchmarks: Mapping[str, tuple[Mapping[str, Any], str | os.PathLike]], query: int = 0,
                         n_positives: int = 4, title: str | None = None) -> Figure:
    """One row per benchmark: its query ``query`` (ground-truth box in orange) and its first Medium positives.

    ``benchmarks`` maps a name to ``(gt, image_dir)``: the revisitop dict (``imlist``, ``qimlist``,
    ``gnd``) and the folder of its ``<name>.jpg`` photos.
    """
    if not benchmarks:
        raise CSAInputError("benchmarks is empty: pass {name: (gt, image_dir)} for at least one benchmark")
    fig = Figure(figsize=(3.0 * (n_positives + 1), 3.0 * len(benchmarks)))
    axes = fig.subplots(len(benchmarks), n_positives + 1, squeeze=False)
    for row, (gt, image_dir) in zip(axes, benchmarks.values()):
        entry = gt["gnd"][query]
        row[0].imshow(_load_rgb(str(Path(image_dir, f"{gt['qimlist'][query]}.jpg"))))
        x1, y1, x2, y2 = (float(v) for v in entry["bbx"])
        row[0].add_patch(Rectangle((x1, y1), x2 - x1, y2 - y1, fill=False, edgecolor=QUERY_COLOR, linewidth=3.0))
        row[0].set_title(f"query: {gt['qimlist'][query]}", fontsize=9)
        positives = list(entry["easy"]) + list(entry["hard"])
        for ax, idx in zip(row[1:], positives[:n_positives]):
            ax.imshow(_load_rgb(str(Path(image_dir, f"{gt['imlist'][idx]}.jpg"))))
            ax.set_title(f"positive: {gt['imlist'][idx]}", fontsize=9)
        for ax in row:
            ax.axis("off")
    if title:
        fig.suptitle(title, fontsize=12)
    fig.tight_layout()
    return fig


def spread_positions(values: Sequence[float], gap: float) -> np.ndarray:
    """Label positions near ``values`` that keep their order and are at least ``gap`` apart (one
    uniform shift keeps them centred on the values)."""
    values = np.asarray(values, dtype=np.float64)
    order = np.argsort(values, kind="stable")
    placed = values[order].copy()
    for i in range(1, placed.size):
        placed[i] = max(placed[i], placed[i - 1] + gap)
    placed -= (placed - values[order]).mean() if placed.size else 0.0
    out = np.empty_like(placed)
    out[order] = placed
    return out


def _labelled_scatter(ax, part: Any, x: str, y: str, label: str, color: str, height_pt: float,
                      fontsize: float) -> None:
    """Points with their labels to the right, spread vertically so no two labels overlap."""
    ax.scatter(part[x], part[y], s=50, color=color, zorder=3, edgecolor="white", linewidth=0.8)
    ys = np.asarray(part[y], dtype=float)
    low, high = float(ys.min()), float(ys.max())
    pad = max(high - low, 1.0) * (0.08 + 0.6 * fontsize * len(ys) / max(height_pt, 1.0))
    ax.set_ylim(low - pad, high + pad)
    per_pt = (2 * pad + high - low) / height_pt                  # data units per point on this axis
    label_y = spread_positions(ys, gap=1.25 * fontsize * per_pt)
    for (_, row), ly in zip(part.iterrows(), label_y):
        dy = (ly - row[y]) / per_pt
        ax.annotate(str(row[label]), (row[x], row[y]), textcoords="offset points", xytext=(9, dy), va="center",
                    fontsize=fontsize, arrowprops=dict(arrowstyle="-", color="#999999", linewidth=0.6,
                                                       shrinkA=0, shrinkB=3) if abs(dy) > 2 else None)


def plot_map_vs_time(
    df: Any,
    x: str = "ms_per_query",
    y: str = "map_medium",
    label: str = "method",
    hue: str | None = None,
    title: str = "accuracy vs. cost of re-ranking",
    fontsize: float = 10.5,
) -> Figure:
    """mAP against milliseconds per query (log x axis), every point labelled with its method.

    ``df`` is a DataFrame with columns ``x``, ``y`` and ``label``; ``hue`` (e.g. ``'dataset'``) gives one
    panel per value, each with its own mAP axis (benchmarks differ by tens of points).  Labels sit to the
    right of their points and are spread vertically so that none overlaps another; the figure is a page
    wide, so its text shows at about its nominal size.
    """
    for col in [x, y, label] + ([hue] if hue else []):
        if col not in df.columns:
            raise CSAInputError(f"column {col!r} not in the table (columns: {list(df.columns)}); pass x=, y=, label=")
    if (np.asarray(df[x], dtype=float) <= 0).any():
        raise CSAInputError(f"column {x!r} has values <= 0, which a log axis cannot show: time must be positive")
    groups = [(None, df)] if hue is None else list(df.groupby(hue, sort=False))
    panel_h = max(2.6, 0.28 * max(len(part) for _, part in groups) + 0.8)
    fig = Figure(figsize=(8.4, panel_h * len(groups) + 0.6))
    axes = fig.subplots(len(groups), 1, squeeze=False)[:, 0]
    fig.subplots_adjust(left=0.09, right=0.98, top=1 - 0.8 / fig.get_figheight(), bottom=0.5 / fig.get_figheight(),
                        hspace=0.45)
    xs = np.asarray(df[x], dtype=float)
    for i, ((key, part), ax) in enumerate(zip(groups, axes)):
        height_pt = ax.get_position().height * fig.get_figheight() * 72
        _labelled_scatter(ax, part, x, y, label, f"C{i}", height_pt, fontsize)
        ax.set_xscale("log")
        ax.set_xlim(xs.min() / 1.5, xs.max() * 12)                 # room for the labels of the slowest points
        ax.set_ylabel(y.replace("_", " "), fontsize=11)
        ax.tick_params(labelsize=10.5)
        ax.grid(alpha=0.3, which="both")
        if key is not None:
            ax.set_title(str(key), fontsize=12, fontweight="bold", loc="left")
    axes[-1].set_xlabel("time per query (ms, log scale)", fontsize=11)
    fig.suptitle(title, fontsize=12, fontweight="bold", y=1 - 0.15 / fig.get_figheight(), va="top")
    return fig


def plot_ablation(df: Any, x: str, y: str, hue: str | None = None, title: str | None = None,
                  ci: tuple[str, str] | None = None, xlabel: str | None = None, ylabel: str | None = None,
                  baseline: float | None = None, baseline_label: str = "first stage") -> Figure:
    """Line plot of ``y`` against ``x``, one line per value of ``hue``; ``ci=(low_col, high_col)`` shades an
    interval; ``baseline`` draws a dashed reference line (e.g. the first stage's mAP); ``xlabel`` / ``ylabel``
    name the axes with their units (default: the column names)."""
    for col in [x, y] + ([hue] if hue else []) + (list(ci) if ci else []):
        if col not in df.columns:
            raise CSAInputError(f"column {col!r} not in the table (columns: {list(df.columns)})")
    fig = Figure(figsize=(7.0, 4.5), layout="constrained")
    ax = fig.subplots()
    groups = [(None, df)] if hue is None else list(df.groupby(hue, sort=True))
    for i, (key, part) in enumerate(groups):
        part = part.sort_values(x)
        ax.plot(part[x], part[y], marker="o", color=f"C{i}", label=None if key is None else f"{hue} = {key}")
        if ci:
            ax.fill_between(part[x], part[ci[0]], part[ci[1]], color=f"C{i}", alpha=0.15, linewidth=0)
    if baseline is not None:
        ax.axhline(baseline, color="0.4", linestyle="--", linewidth=1.2, label=f"{baseline_label} ({baseline:.1f})")
    ax.set_xlabel(xlabel or x.replace("_", " "))
    ax.set_ylabel(ylabel or y.replace("_", " "))
    ax.set_title(title or f"{y.replace('_', ' ')} vs. {x.replace('_', ' ')}", fontsize=12, fontweight="bold")
    ax.grid(alpha=0.3)
    if hue is not None or baseline is not None:
        ax.legend(fontsize=9, frameon=False)
    return fig


def plot_method_bars(df: Any, protocols: Sequence[str] = ("medium", "hard"), title: str | None = None) -> Figure:
    """Grouped bars of mAP per method, one panel (row) per dataset (rows of a :func:`csa.compare.runner.run_comparison`
    table with a ``dataset`` column); the error bar of each non-baseline bar is its 95% paired-bootstrap
    interval of the gain over the first stage, drawn around the method's mAP."""
    needed = ["dataset", "method"] + [f"{p}_{c}" for p in protocols for c in ("map", "gain_low", "gain_high", "gain")]
    missing = [c for c in needed if c not in df.columns]
    if missing:
        raise CSAInputError(f"the table lacks the column(s) {missing}; pass the output of run_comparison with a "
                            "'dataset' column")
    datasets = list(dict.fromkeys(df["dataset"]))
    fig = Figure(figsize=(9.0, 3.4 * len(datasets) + 0.4), layout="constrained")
    axes = np.atleast_1d(fig.subplots(len(datasets), 1, squeeze=False)[:, 0])
    width = 0.8 / len(protocols)
    for ax, dataset in zip(axes, datasets):
        part = df[df["dataset"] == dataset].reset_index(drop=True)
        x = np.arange(len(part))
        top = 0.0
        for j, proto in enumerate(protocols):
            values = part[f"{proto}_map"].to_numpy(float)
            gain = part[f"{proto}_gain"].to_numpy(float)
            low = values - (gain - part[f"{proto}_gain_low"].to_numpy(float))
            high = values + (part[f"{proto}_gain_high"].to_numpy(float) - gain)
            err = np.clip(np.vstack([values - low, high - values]), 0.0, None)  # an interval may miss its estimate
            top = max(top, float(np.nanmax(high)))
            ax.bar(x + (j - (len(protocols) - 1) / 2) * width, values, width, yerr=err, capsize=3,
                   color=f"C{j}", label=f"{proto.capitalize()} mAP")
        ax.set_xticks(x)
        ax.set_xticklabels([textwrap.fill(str(m), 22) for m in part["method"]], fontsize=9)
        ax.set_ylabel("mAP (%)")
        ax.set_title(str(dataset), fontsize=12, fontweight="bold")
        ax.grid(alpha=0.3, axis="y")
        ax.set_ylim(0, min(100.0, top * 1.1 + 1))
        ax.legend(fontsize=9, frameon=False, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    if title:
        fig.suptitle(title, fontsize=13, fontweight="bold")
    return fig
