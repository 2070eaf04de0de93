"""Tests of csa.notebook.method_figures: one axis per city, the numbers in titles, label colours, readable fonts."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from matplotlib.colors import to_hex

from csa.notebook.figures import NEGATIVE_COLOR, POSITIVE_COLOR
from csa.notebook.method_figures import (
    FONT_SIZE,
    plot_affinity_views,
    plot_ap_gains,
    plot_attention,
    plot_headline_gains,
    plot_rank_moves,
    plot_score_distributions,
)
from csa.validation import CSAInputError

LABELS = ["query", "pos", "neg", "junk", "pos"]


def _texts(fig):
    return [t for ax in fig.axes for t in [ax.title, ax.xaxis.label, ax.yaxis.label, *ax.get_xticklabels(),
                                            *ax.get_yticklabels()] if t.get_text()]


def _main_axes(fig):
    return [ax for ax in fig.axes if ax.get_label() != "<colorbar>" and ax.get_title()]


def test_affinity_views_one_panel_per_view_and_labels_checked():
    rng = np.random.default_rng(0)
    views = {"raw": rng.uniform(0.4, 1, (5, 4)), "centred": rng.normal(size=(5, 4)), "whitened": rng.normal(size=(5, 4))}
    fig = plot_affinity_views(views, LABELS)
    assert [ax.get_title() for ax in _main_axes(fig)] == ["raw (5 x 4)", "centred (5 x 4)", "whitened (5 x 4)"]
    assert fig.get_figwidth() <= 9.0
    assert min(t.get_fontsize() for t in _texts(fig)) >= FONT_SIZE - 0.5
    with pytest.raises(CSAInputError, match="labels"):
        plot_affinity_views(views, LABELS[:3])


def test_affinity_views_grouped_by_label_permute_rows_and_anchors():
    a = np.arange(20, dtype=float).reshape(5, 4)
    fig = plot_affinity_views({"raw": a}, LABELS, group_by_label=True)
    shown = np.asarray(_main_axes(fig)[0].images[0].get_array())
    # rows: query 0, positives 1 and 4, junk 3, negative 2; anchors (tokens 0..3): query 0, pos 1, junk 3, neg 2
    np.testing.assert_array_equal(shown, a[[0, 1, 4, 3, 2]][:, [0, 1, 3, 2]])
    # more anchors than tokens (L - 1 > K): the anchors' own labels order the columns
    wide = np.arange(15, dtype=float).reshape(3, 5)
    fig = plot_affinity_views({"raw": wide}, ["query", "neg", "pos"], group_by_label=True,
                              anchor_labels=["query", "neg", "pos", "junk", "pos"])
    shown = np.asarray(_main_axes(fig)[0].images[0].get_array())
    np.testing.assert_array_equal(shown, wide[[0, 2, 1]][:, [0, 2, 4, 3, 1]])
    with pytest.raises(CSAInputError, match="anchor_labels"):
        plot_affinity_views({"raw": wide}, ["query", "neg", "pos"])


def test_attention_two_rows_per_block_and_query_row_values():
    att = np.full((1, 2, 5, 5), 0.2)
    att[0, :, 0] = [0.05, 0.6, 0.15, 0.1, 0.1]
    fig = plot_attention([att, att], LABELS)
    assert len(_main_axes(fig)) == 4
    bottom = [ax for ax in fig.axes if ax.get_title().startswith("block 1: what")][0]
    # the positives' points carry the query row's weights at positions 1 and 4
    pos = [c for c in bottom.collections if to_hex(c.get_facecolor()[0]) == POSITIVE_COLOR][0]
    np.testing.assert_allclose(pos.get_offsets(), [[1, 0.6], [4, 0.1]])


def test_score_distributions_one_row_per_city():
    df = pd.DataFrame({"label": ["pos", "neg", "neg", "junk"], "first_stage": [0.9, 0.5, 0.6, 1.0],
                       "csa": [0.9, -0.9, -0.8, 1.0]})
    fig = plot_score_distributions({"Oxford": df, "Paris": df})
    titles = [ax.get_title() for ax in fig.axes]
    assert len(titles) == 4 and sum(t.startswith("Paris") for t in titles) == 2


def test_rank_moves_title_gives_the_shares():
    moves = pd.DataFrame({"rank_before": [1, 5, 9, 20], "rank_after": [1, 2, 12, 3]})
    fig = plot_rank_moves({"Oxford": moves, "Paris": moves.iloc[:2]})
    titles = [ax.get_title() for ax in fig.axes]
    assert titles[0].startswith("Oxford: 4 positives") and "up 50%, down 25%, kept 25%" in titles[0]
    assert "up 50%, down 0%, kept 50%" in titles[1]
    assert all(ax.get_xscale() == "log" and ax.get_yscale() == "log" for ax in fig.axes)


def test_ap_gains_bars_coloured_by_sign_and_interval_shaded():
    gains = pd.DataFrame({"gain": [-2.0, 0.0, 1.0, 4.0], "outcome": ["hurt", "unchanged", "helped", "helped"]})
    fig = plot_ap_gains({"Oxford": gains}, intervals={"Oxford": (-0.5, 2.0)})
    ax = fig.axes[0]
    assert "helped 50%, hurt 25%" in ax.get_title()
    colors = [to_hex(p.get_facecolor()) for p in ax.patches[:4]]
    assert colors[0] == NEGATIVE_COLOR and colors[2] == colors[3] == POSITIVE_COLOR
    assert any("[-0.5, +2.0]" in t.get_text() for t in ax.get_legend().get_texts())


def test_headline_gains_one_axis_per_city_with_intervals_written():
    table = pd.DataFrame({"city": ["Oxford", "Oxford", "Paris"], "benchmark": ["official", "LOO", "LOO"],
                          "medium_gain": [0.9, 1.5, 3.6], "medium_gain_low": [-1.1, -0.2, 2.2],
                          "medium_gain_high": [4.2, 2.6, 4.7]})
    fig = plot_headline_gains(table)
    assert [ax.get_title() for ax in fig.axes] == ["Oxford", "Paris"]
    notes = [t.get_text() for t in fig.axes[0].texts]
    assert "+1.5 [-0.2, +2.6]" in notes and "+0.9 [-1.1, +4.2]" in notes
    with pytest.raises(CSAInputError, match="city"):
        plot_headline_gains(table.drop(columns="city"))


def test_every_figure_fits_the_page_with_readable_text():
    """At most 9 inches (900 px at 100 dpi, shown in a ~680 px column) and no text under 11 pt (>= 10 px)."""
    df = pd.DataFrame({"label": ["pos", "neg"], "first_stage": [0.9, 0.5], "csa": [0.9, -0.9]})
    moves = pd.DataFrame({"rank_before": [1, 5], "rank_after": [2, 1]})
    gains = pd.DataFrame({"gain": [-1.0, 2.0], "outcome": ["hurt", "helped"]})
    table = pd.DataFrame({"city": ["A", "B"], "benchmark": ["x", "x"], "medium_gain": [1.0, 2.0],
                          "medium_gain_low": [0.0, 1.0], "medium_gain_high": [2.0, 3.0]})
    cities = ["Oxford", "Paris", "Rome"]
    figures = [plot_affinity_views({k: np.eye(5, 4) for k in ("raw", "centred", "whitened")}, LABELS),
               plot_attention([np.full((1, 2, 5, 5), 0.2)] * 3, LABELS),
               plot_score_distributions({c: df for c in cities}), plot_rank_moves({c: moves for c in cities}),
               plot_ap_gains({c: gains for c in cities}), plot_headline_gains(table)]
    for fig in figures:
        fig.canvas.draw()
        assert fig.get_figwidth() <= 9.0
        sizes = [t.get_fontsize() for t in fig.findobj(lambda a: hasattr(a, "get_fontsize") and hasattr(a, "get_text"))
                 if t.get_text().strip()]
        assert sizes and min(sizes) >= 11
