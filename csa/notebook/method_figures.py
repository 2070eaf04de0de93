"""Pictures of what CSA computes: affinity heatmaps, attention, score distributions, rank moves, gains.

The data come from :mod:`csa.notebook.method_views`; every function returns a
:class:`matplotlib.figure.Figure` built without pyplot's global state (see :mod:`csa.notebook.figures`).
Text is at least 11 pt and figures at most 9 inches wide (900 pixels at the notebooks' 100 dpi), so on a
1280-pixel page, where the book's text column is about 680 pixels wide, no label falls under 10 pixels;
plots over several cities give each city its own axis.  Colours follow the top-k grids: green
positive, red negative, grey junk, orange the query.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import matplotlib
import numpy as np
from matplotlib.colors import ListedColormap
from matplotlib.figure import Figure
from matplotlib.patches import Patch

from csa.notebook.figures import JUNK_COLOR, NEGATIVE_COLOR, POSITIVE_COLOR, QUERY_COLOR
from csa.validation import CSAInputError

__all__ = ["FONT_SIZE", "plot_affinity_views", "plot_attention", "plot_score_distributions", "plot_rank_moves",
           "plot_ap_gains", "plot_headline_gains"]

#: Base font size (points) of every figure here.
FONT_SIZE = 12
_STYLE = {"font.size": FONT_SIZE, "axes.titlesize": FONT_SIZE + 1, "axes.labelsize": FONT_SIZE,
          "xtick.labelsize": FONT_SIZE - 0.5, "ytick.labelsize": FONT_SIZE - 0.5, "legend.fontsize": FONT_SIZE - 0.5}
_ORDER = ("query", "pos", "neg", "junk")
_COLORS = {"query": QUERY_COLOR, "pos": POSITIVE_COLOR, "neg": NEGATIVE_COLOR, "junk": JUNK_COLOR}
_NAMES = {"query": "query", "pos": "positive", "neg": "negative", "junk": "junk"}


def _check_labels(labels: Sequence[str], n: int, what: str) -> np.ndarray:
    lab = np.asarray(list(labels))
    if lab.shape != (n,) or not set(lab) <= set(_ORDER):
        raise CSAInputError(f"{what} needs {n} labels from {_ORDER} (one per token, query first), got "
                            f"{lab.size}: build them with csa.notebook.method_views.token_labels")
    return lab


def _label_strip(ax: Any, labels: np.ndarray, where: str) -> None:
    """A thin coloured strip along the left (rows) or top (columns) of a heatmap axis."""
    codes = np.array([_ORDER.index(v) for v in labels])[None]
    cmap = ListedColormap([_COLORS[k] for k in _ORDER])
    if where == "left":
        strip = ax.inset_axes([-0.045, 0.0, 0.035, 1.0])
        ax.tick_params(axis="y", pad=14)
        strip.imshow(codes.T, aspect="auto", cmap=cmap, vmin=0, vmax=len(_ORDER) - 1, interpolation="nearest")
    else:
        strip = ax.inset_axes([0.0, 1.015, 1.0, 0.04])
        strip.imshow(codes, aspect="auto", cmap=cmap, vmin=0, vmax=len(_ORDER) - 1, interpolation="nearest")
    strip.set_axis_off()


def _label_legend(fig: Figure, present: set[str], **kwargs: Any) -> None:
    handles = [Patch(color=_COLORS[k], label=_NAMES[k]) for k in _ORDER if k in present]
    fig.legend(handles=handles, ncol=len(handles), frameon=False, **kwargs)


def plot_affinity_views(views: Mapping[str, np.ndarray], labels: Sequence[str], title: str | None = None,
                        group_by_label: bool = False, anchor_labels: Sequence[str] | None = None) -> Figure:
    """Heatmaps of one query's (K+1, L) affinity matrix, one panel per view (e.g. raw, centred, whitened).

    Rows are the tokens (query first, then the candidates in first-stage order), columns the anchors
    (the query and the top L-1); the strips on the left and on top colour each row / anchor by its
    label (``labels``: K+1 labels from :func:`csa.notebook.method_views.token_labels`; ``anchor_labels``: the
    L anchors' labels, by default the first L of ``labels``, as when L - 1 <= K).  Each panel has
    its own colour scale, clipped at the 1st / 99th percentile (raw) or at the 99th percentile of the
    absolute values (the others), so the self-similarity diagonal does not flatten the rest.
    ``group_by_label=True`` reorders rows and anchors by label (query, positives, junk, negatives; first-stage
    order within a label), so blocks of positives show as blocks.
    """
    if not views:
        raise CSAInputError("views is empty: pass {name: (K+1, L) array}, e.g. from affinity_views")
    first = next(iter(views.values()))
    lab = _check_labels(labels, first.shape[0], "plot_affinity_views")
    if anchor_labels is None and first.shape[1] > lab.size:
        raise CSAInputError(f"L = {first.shape[1]} anchors but only K+1 = {lab.size} labelled tokens: pass "
                            "anchor_labels=token_labels(ranks, gnd_entry, query, L - 1)")
    col_lab = _check_labels(lab[: first.shape[1]] if anchor_labels is None else anchor_labels, first.shape[1],
                            "anchor_labels")
    rows, cols = np.arange(lab.size), np.arange(first.shape[1])
    if group_by_label:
        rank = {"query": 0, "pos": 1, "junk": 2, "neg": 3}
        rows = np.argsort([rank[v] for v in lab], kind="stable")
        cols = np.argsort([rank[v] for v in col_lab], kind="stable")
    views = {name: np.asarray(a)[rows][:, cols] for name, a in views.items()}
    col_lab, lab = col_lab[cols], lab[rows]
    with matplotlib.rc_context(_STYLE):
        fig = Figure(figsize=(min(9.0, 3.2 * len(views)), 4.2), layout="constrained")
        axes = np.atleast_1d(fig.subplots(1, len(views)))
        for ax, (name, a) in zip(axes, views.items()):
            a = np.asarray(a)
            im = ax.imshow(a, aspect="auto", cmap="viridis" if name == "raw" else "RdBu_r", interpolation="nearest",
                           **(_percentiles(a) if name == "raw" else _symmetric(a)))
            _label_strip(ax, lab, "left")
            _label_strip(ax, col_lab, "top")
            ax.set_title(f"{name} ({a.shape[0]} x {a.shape[1]})", pad=14)
            order = " (by label)" if group_by_label else ""
            ax.set_xlabel(f"anchor{order}")
            ax.set_ylabel(f"token{order}", labelpad=4)
            fig.colorbar(im, ax=ax, shrink=0.85, pad=0.02)
        _label_legend(fig, set(lab), loc="outside lower center")
        if title:
            fig.suptitle(title, fontweight="bold")
    return fig


def _percentiles(a: np.ndarray) -> dict[str, float]:
    low, high = np.percentile(a, [1, 99])
    return {"vmin": float(low), "vmax": float(high)}


def _symmetric(a: np.ndarray) -> dict[str, float]:
    v = float(np.percentile(np.abs(a), 99)) or 1.0
    return {"vmin": -v, "vmax": v}


def plot_attention(maps: Sequence[Any], labels: Sequence[str], title: str | None = None) -> Figure:
    """Every block's attention (mean over heads) for one query: the full map (top) and the query token's row.

    ``maps`` come from :func:`csa.notebook.method_views.attention_maps` (one (B, H, K+1, K+1) tensor
    per block; the first sample is drawn).  Top row: token-to-token weights with label strips (log
    colour scale, row i = what token i draws from).  Bottom row: the query token's weight on each
    token by first-stage position, coloured by label, with the uniform weight 1 / (K+1) dashed.
    """
    from matplotlib.colors import LogNorm

    if not maps:
        raise CSAInputError("maps is empty: pass attention_maps(model, affinity)")
    atts = [np.asarray(m[0], dtype=np.float64).mean(axis=0) for m in maps]     # (K+1, K+1) per block
    lab = _check_labels(labels, atts[0].shape[0], "plot_attention")
    positions = np.arange(lab.size)
    with matplotlib.rc_context(_STYLE):
        fig = Figure(figsize=(min(9.0, 4.6 * len(atts)), 8.4), layout="constrained")
        axes = fig.subplots(2, len(atts), squeeze=False, height_ratios=[1.15, 1.0])
        for b, att in enumerate(atts):
            top, bottom = axes[0, b], axes[1, b]
            im = top.imshow(att, aspect="auto", cmap="magma", interpolation="nearest",
                            norm=LogNorm(vmin=max(att.min(), 1e-5), vmax=att.max()))
            _label_strip(top, lab, "left")
            _label_strip(top, lab, "top")
            top.set_xlabel("attended token (0 = query)")
            top.set_ylabel("attending token (0 = query)", labelpad=4)
            top.set_title(f"block {b + 1} of {len(atts)}: weights, mean over heads", pad=14)
            fig.colorbar(im, ax=top, shrink=0.85, pad=0.02)
            for kind in _ORDER:
                sel = lab == kind
                if sel.any():
                    bottom.scatter(positions[sel], att[0][sel], s=24 if kind != "query" else 70, color=_COLORS[kind],
                                   label=_NAMES[kind], zorder=3 if kind == "pos" else 2)
            bottom.axhline(1.0 / lab.size, color="0.4", linestyle="--", linewidth=1, label="uniform 1/(K+1)")
            bottom.set_yscale("log")
            bottom.set_xlabel("first-stage position (0 = the query itself)")
            bottom.set_ylabel("weight of the query token")
            bottom.set_title(f"block {b + 1}: what the query token draws from")
            bottom.grid(alpha=0.3, which="both")
        handles, names = axes[1, 0].get_legend_handles_labels()
        fig.legend(handles, names, ncol=len(names), frameon=False, loc="outside lower center")
        if title:
            fig.suptitle(title, fontweight="bold")
    return fig


def plot_score_distributions(tables: Mapping[str, Any], bins: int = 60) -> Figure:
    """Histograms of positives' and negatives' scores, first stage (left) vs CSA (right), one row per city.

    ``tables`` maps a city to :func:`csa.notebook.method_views.candidate_scores` (junk rows are left
    out).  Densities are normalised per label, the count axis is logarithmic so both tails show.
    """
    if not tables:
        raise CSAInputError("tables is empty: pass {city: candidate_scores(...)}")
    with matplotlib.rc_context(_STYLE):
        fig = Figure(figsize=(9.0, 3.4 * len(tables) + 0.5), layout="constrained")
        axes = fig.subplots(len(tables), 2, squeeze=False)
        for row, (city, df) in zip(axes, tables.items()):
            for ax, column, name in zip(row, ("first_stage", "csa"), ("first stage: cosine of descriptors",
                                                                        "CSA: cosine of output tokens")):
                values = df[column].to_numpy(float)
                edges = np.linspace(values.min(), values.max(), bins + 1)
                for kind in ("neg", "pos"):
                    part = df.loc[df["label"] == kind, column].to_numpy(float)
                    ax.hist(part, bins=edges, density=True, alpha=0.55, color=_COLORS[kind],
                            label=f"{_NAMES[kind]} ({part.size:,})")
                ax.set_yscale("log")
                ax.set_title(f"{city} - {name}")
                ax.set_xlabel("score")
                ax.set_ylabel("density (log)")
                ax.grid(alpha=0.3)
                ax.legend(frameon=False, loc="best")
    return fig


def _city_panels(n: int, height: float, **subplots: Any) -> tuple[Figure, np.ndarray]:
    """A figure of ``n`` panels side by side (one per city), at most 9 inches wide; call inside ``_STYLE``."""
    fig = Figure(figsize=(min(9.0, 4.6 * n), height), layout="constrained")
    return fig, np.atleast_1d(fig.subplots(1, n, **subplots))


def plot_rank_moves(moves: Mapping[str, Any], topk: int | None = None) -> Figure:
    """Each positive's list position before vs after CSA (log axes), one axis per city.

    ``moves`` maps a city to :func:`csa.notebook.method_views.positive_rank_moves`.  Points below the
    diagonal moved up; the title gives the share of positives moved up, down and kept.
    """
    if not moves:
        raise CSAInputError("moves is empty: pass {city: positive_rank_moves(...)}")
    with matplotlib.rc_context(_STYLE):
        fig, axes = _city_panels(len(moves), 4.8)
        for ax, (city, df) in zip(axes, moves.items()):
            before, after = df["rank_before"].to_numpy(float), df["rank_after"].to_numpy(float)
            top = max(before.max(), after.max()) * 1.3
            ax.scatter(before, after, s=6, alpha=0.25, color=POSITIVE_COLOR, linewidths=0)
            ax.plot([1, top], [1, top], color="0.3", linewidth=1, linestyle="--", label="unchanged")
            if topk:
                ax.axhline(topk, color="0.6", linewidth=0.8, linestyle=":")
            ax.set_xscale("log")
            ax.set_yscale("log")
            ax.set_xlim(0.8, top)
            ax.set_ylim(0.8, top)
            up, down = float(np.mean(after < before)), float(np.mean(after > before))
            ax.set_title(f"{city}: {len(df):,} positives\nup {100 * up:.0f}%, down {100 * down:.0f}%, "
                         f"kept {100 * (1 - up - down):.0f}%")
            ax.set_xlabel("position before (first stage)")
            ax.set_ylabel("position after CSA")
            ax.grid(alpha=0.3, which="major")
            ax.legend(frameon=False, loc="upper left")
    return fig


def plot_ap_gains(gains: Mapping[str, Any], intervals: Mapping[str, tuple[float, float]] | None = None) -> Figure:
    """Per-query AP gain sorted from the largest loss to the largest gain, one axis per city.

    ``gains`` maps a city to :func:`csa.notebook.method_views.ap_gains`; the title gives the share of
    queries helped and hurt; the dashed line is the mean gain (= the mAP gain) and ``intervals`` (city ->
    (low, high), e.g. the landmark-level 95% interval of the comparison) shades its interval.
    """
    if not gains:
        raise CSAInputError("gains is empty: pass {city: ap_gains(...)}")
    with matplotlib.rc_context(_STYLE):
        fig, axes = _city_panels(len(gains), 4.2)
        for ax, (city, df) in zip(axes, gains.items()):
            g = df["gain"].to_numpy(float)
            colors = np.where(g > 0, POSITIVE_COLOR, np.where(g < 0, NEGATIVE_COLOR, JUNK_COLOR))
            ax.bar(np.arange(g.size), g, width=1.0, color=colors, linewidth=0)
            ax.axhline(0, color="0.2", linewidth=0.8)
            ax.axhline(g.mean(), color="0.2", linewidth=1.2, linestyle="--", label=f"mean {g.mean():+.2f}")
            if intervals and city in intervals:
                low, high = intervals[city]
                ax.axhspan(low, high, color="C0", alpha=0.25, label=f"95% interval [{low:+.1f}, {high:+.1f}]")
            shares = df["outcome"].value_counts(normalize=True)
            ax.set_title(f"{city}: {g.size} queries\nhelped {100 * shares.get('helped', 0):.0f}%, "
                         f"hurt {100 * shares.get('hurt', 0):.0f}%")
            ax.set_xlabel("queries, sorted by gain")
            ax.set_ylabel("Medium AP gain (points)")
            ax.grid(alpha=0.3, axis="y")
            ax.legend(frameon=False, loc="upper left")
    return fig


def plot_headline_gains(table: Any, protocol: str = "medium") -> Figure:
    """CSA's mAP gain over the first stage per benchmark, with 95% intervals, one axis per city.

    ``table`` holds one row per benchmark with columns ``city``, ``benchmark``, ``<protocol>_gain``,
    ``<protocol>_gain_low`` / ``_high`` (interval over landmarks, thick) and optionally
    ``<protocol>_gain_query_low`` / ``_high`` (over queries, thin), as :func:`csa.compare.runner.run_comparison`
    writes them.
    """
    need = ["city", "benchmark", f"{protocol}_gain", f"{protocol}_gain_low", f"{protocol}_gain_high"]
    missing = [c for c in need if c not in table.columns]
    if missing:
        raise CSAInputError(f"the table lacks the column(s) {missing}; add 'city' and 'benchmark' to the CSA rows "
                            "of run_comparison")
    cities = list(dict.fromkeys(table["city"]))
    with matplotlib.rc_context(_STYLE):
        fig, axes = _city_panels(len(cities), 1.8 + 1.1 * table.groupby("city").size().max(), sharex=True)
        for ax, city in zip(axes, cities):
            part = table[table["city"] == city].reset_index(drop=True)
            y = np.arange(len(part))[::-1]
            g = part[f"{protocol}_gain"].to_numpy(float)
            lo, hi = part[f"{protocol}_gain_low"].to_numpy(float), part[f"{protocol}_gain_high"].to_numpy(float)
            if f"{protocol}_gain_query_low" in part:
                qlo = part[f"{protocol}_gain_query_low"].to_numpy(float)
                qhi = part[f"{protocol}_gain_query_high"].to_numpy(float)
                ax.errorbar(g, y + 0.18, xerr=np.clip([g - qlo, qhi - g], 0, None), fmt="none", ecolor="0.55",
                            elinewidth=1.2, capsize=3, label="95% interval, queries")
            ax.errorbar(g, y, xerr=np.clip([g - lo, hi - g], 0, None), fmt="o", color="C0", elinewidth=2.5,
                        capsize=4, markersize=7, label="95% interval, landmarks")
            for yi, gi, l, h in zip(y, g, lo, hi):
                ax.annotate(f"{gi:+.1f} [{l:+.1f}, {h:+.1f}]", (gi, yi), textcoords="offset points", xytext=(0, -16),
                            ha="center", fontsize=FONT_SIZE - 1)
            ax.axvline(0, color="0.3", linewidth=1, linestyle="--")
            ax.set_yticks(y)
            ax.set_yticklabels(part["benchmark"])
            ax.set_ylim(-0.8, len(part) - 0.4)
            ax.set_title(city)
            ax.set_xlabel(f"{protocol.capitalize()} mAP gain over the first stage (points)")
            ax.grid(alpha=0.3, axis="x")
        handles, names = axes[0].get_legend_handles_labels()
        fig.legend(handles, names, ncol=len(names), frameon=False, loc="outside lower center")
    return fig
