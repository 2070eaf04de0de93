"""Tests of csa.notebook.figures and csa.training.curves: label rule, example selection rule, and the structure of the figures."""
from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.text import Text
from matplotlib.colors import to_hex
from matplotlib.patches import Rectangle

from csa.notebook.figures import (
    JUNK_COLOR,
    NEGATIVE_COLOR,
    POSITIVE_COLOR,
    QUERY_COLOR,
    label_ranked,
    plot_ablation,
    plot_map_vs_time,
    spread_positions,
    plot_topk_grid,
    select_examples,
)
from csa.training.curves import plot_training_curves
from csa.validation import CSAInputError

# A hand-made ground truth entry: database images 0..9.
GND = {"bbx": [1, 2, 30, 40], "easy": [0, 3], "hard": [5], "junk": [7]}
RANKED = [5, 0, 9, 7, 3, 1]


def test_label_ranked_medium_protocol():
    # Medium: positives = easy + hard = {0, 3, 5}; junk = {7}.
    assert label_ranked(RANKED, GND) == ["pos", "pos", "neg", "junk", "pos", "neg"]


def test_label_ranked_easy_and_hard_protocols():
    # Easy: positives = {0, 3}; junk = junk + hard = {7, 5}.
    assert label_ranked(RANKED, GND, protocol="easy") == ["junk", "pos", "neg", "junk", "pos", "neg"]
    # Hard: positives = {5}; junk = junk + easy = {7, 0, 3}.
    assert label_ranked(np.array(RANKED), GND, protocol="Hard") == ["pos", "junk", "neg", "junk", "junk", "neg"]


def test_label_ranked_rejects_bad_protocol_and_gnd():
    with pytest.raises(CSAInputError, match="protocol"):
        label_ranked(RANKED, GND, protocol="difficult")
    with pytest.raises(CSAInputError, match="junk"):
        label_ranked(RANKED, {"easy": [0], "hard": []})


def test_select_examples_rule_gain_ties_and_nan():
    before = [10.0, 50.0, 20.0, 30.0, 40.0, np.nan, 60.0, 70.0]
    after = [30.0, 40.0, 40.0, 35.0, 20.0, 90.0, 60.0, 50.0]
    # gains: +20, -10, +20, +5, -20, nan, 0, -20
    successes, failures = select_examples(before, after, n=2)
    assert successes == [0, 2]  # tie at +20 broken by smaller query index
    assert failures == [4, 7]  # tie at -20 broken by smaller query index
    successes, failures = select_examples(before, after, n=10)
    assert successes == [0, 2, 3]  # zero gain (query 6) and NaN (query 5) never picked
    assert failures == [4, 7, 1]


def test_select_examples_skips_queries_whose_top_k_does_not_change():
    before = [10.0, 50.0, 20.0, 30.0, 40.0, np.nan, 60.0, 70.0]
    after = [30.0, 40.0, 40.0, 35.0, 20.0, 90.0, 60.0, 50.0]
    # query 0 (+20) and query 4 (-20) gain or lose only below the shown top-k: their figures would repeat
    visible = [False, True, True, True, False, True, True, True]
    successes, failures = select_examples(before, after, n=2, visible=visible)
    assert successes == [2, 3]
    assert failures == [7, 1]
    with pytest.raises(CSAInputError, match="one bool per query"):
        select_examples(before, after, visible=[True, False])


def test_select_examples_input_errors():
    with pytest.raises(CSAInputError, match="same queries"):
        select_examples([1.0, 2.0], [1.0])
    assert select_examples([5.0, 5.0], [5.0, 5.0], n=3) == ([], [])


def _grid_figure(k=4, title="query 3: AP 20.0 -> 55.0"):
    rng = np.random.default_rng(0)
    images = {f"img{i}": rng.random((12 + i, 16, 3)) for i in range(k + 2)}
    query = rng.random((50, 40, 3))
    before = [f"img{i}" for i in range(k)]
    after = [f"img{i}" for i in reversed(range(k))]
    labels_before = (["pos", "neg", "junk", "neg"] * k)[:k]
    labels_after = (["neg", "pos", "pos", "junk"] * k)[:k]
    fig = plot_topk_grid(query, [5, 6, 25, 30], before, after, labels_before, labels_after, images.__getitem__,
                         k=k, title=title)
    return fig, labels_before, labels_after


def test_plot_topk_grid_structure_colours_and_box():
    k = 4
    fig, labels_before, labels_after = _grid_figure(k)
    axes = fig.axes
    assert len(axes) == 1 + 2 * k
    query_ax = axes[0]
    boxes = [p for p in query_ax.patches if isinstance(p, Rectangle)]
    assert len(boxes) == 1
    box = boxes[0]
    assert to_hex(box.get_edgecolor()) == QUERY_COLOR
    assert (box.get_x(), box.get_y(), box.get_width(), box.get_height()) == (5.0, 6.0, 20.0, 24.0)
    assert query_ax.get_title() == "query"
    colour = {"pos": POSITIVE_COLOR, "neg": NEGATIVE_COLOR, "junk": JUNK_COLOR}
    expected = [colour[lab] for lab in labels_before] + [colour[lab] for lab in labels_after]
    for ax, want in zip(axes[1:], expected):
        assert {to_hex(s.get_edgecolor()) for s in ax.spines.values()} == {want}
    assert [ax.get_title() for ax in axes[1:]] == [str(r) for r in range(1, k + 1)] * 2
    assert "before" in axes[1].get_ylabel() and "1/4 positive" in axes[1].get_ylabel()
    assert "after" in axes[1 + k].get_ylabel() and "2/4 positive" in axes[1 + k].get_ylabel()
    assert fig._suptitle.get_text() == "query 3: AP 20.0 -> 55.0"


def test_plot_topk_grid_rejects_short_lists_and_bad_labels():
    with pytest.raises(CSAInputError, match="need 10"):
        plot_topk_grid(np.zeros((4, 4)), None, ["a"] * 3, ["a"] * 10, ["pos"] * 3, ["pos"] * 10, lambda n: np.zeros((4, 4)))
    with pytest.raises(CSAInputError, match="unknown label"):
        plot_topk_grid(np.zeros((4, 4)), None, ["a"] * 2, ["a"] * 2, ["pos", "tp"], ["pos"] * 2,
                       lambda n: np.zeros((4, 4)), k=2)


def test_plot_training_curves_panels_and_data():
    history = pd.DataFrame({
        "epoch": [1, 2, 3], "loss": [3.0, 2.0, 1.5], "contrastive": [2.0, 1.5, 1.2],
        "reconstruction": [1.0, 0.9, 0.8], "lr": [0.01, 0.1, 0.05], "val_loss": [3.1, 2.2, 1.9],
    })
    fig = plot_training_curves(history)
    titles = [ax.get_title() for ax in fig.axes]
    assert titles == ["total loss", "contrastive loss", "reconstruction loss", "learning rate"]
    assert len(fig.axes[0].lines) == 2  # train + validation
    np.testing.assert_allclose(fig.axes[3].lines[0].get_ydata(), [0.01, 0.1, 0.05])
    # a list of per-epoch dicts works too, epochs default to 1..E
    rows = history.drop(columns=["epoch", "val_loss"]).to_dict("records")
    fig = plot_training_curves(rows)
    np.testing.assert_allclose(fig.axes[1].lines[0].get_xdata(), [1, 2, 3])
    with pytest.raises(CSAInputError, match="lr"):
        plot_training_curves(history.drop(columns=["lr"]))


def test_spread_positions_keep_order_and_gap():
    values = np.array([5.0, 1.0, 5.1, 5.05, 9.0])
    placed = spread_positions(values, gap=0.5)
    assert list(np.argsort(placed, kind="stable")) == list(np.argsort(values, kind="stable"))
    assert np.diff(np.sort(placed)).min() >= 0.5 - 1e-9
    assert abs(placed.mean() - values.mean()) < 1e-9                  # centred on the points
    np.testing.assert_allclose(spread_positions([1.0, 3.0], gap=0.5), [1.0, 3.0])   # far apart: unchanged


def test_plot_map_vs_time_log_axis_and_labels():
    df = pd.DataFrame({"method": ["first stage", "CSA"], "ms_per_query": [0.2, 3.0], "map_medium": [67.3, 78.2],
                       "dataset": ["ROxf", "ROxf"]})
    fig = plot_map_vs_time(df, hue="dataset")
    ax = fig.axes[0]
    assert ax.get_xscale() == "log"
    assert sorted(t.get_text() for t in ax.texts) == ["CSA", "first stage"]
    # one panel per benchmark; clumped points get labels that do not overlap
    rng = np.random.default_rng(0)
    many = pd.DataFrame({"method": [f"method {i}" for i in range(12)] * 2,
                         "ms_per_query": np.r_[rng.uniform(1, 1.3, 12), rng.uniform(1, 30, 12)],
                         "map_medium": np.r_[rng.uniform(20, 21, 12), rng.uniform(60, 90, 12)],
                         "dataset": ["Oxford"] * 12 + ["Paris"] * 12})
    fig = plot_map_vs_time(many, hue="dataset")
    assert [a.get_title(loc="left") for a in fig.axes] == ["Oxford", "Paris"]
    FigureCanvasAgg(fig).draw()
    renderer = fig.canvas.get_renderer()
    for axis in fig.axes:
        boxes = [Text.get_window_extent(t, renderer) for t in axis.texts]   # the text, not its leader line
        assert len(boxes) == 12
        overlaps = [(i, j) for i in range(12) for j in range(i + 1, 12) if boxes[i].overlaps(boxes[j])]
        assert not overlaps, f"labels overlap on {axis.get_title(loc='left')}: {overlaps}"
    with pytest.raises(CSAInputError, match="<= 0"):
        plot_map_vs_time(df.assign(ms_per_query=[0.0, 1.0]))
    with pytest.raises(CSAInputError, match="not in the table"):
        plot_map_vs_time(df, y="map_hard")


def test_plot_ablation_one_line_per_hue_sorted_by_x():
    df = pd.DataFrame({"topk": [256, 128, 256, 128], "map": [2.0, 1.0, 4.0, 3.0], "anchor_len": [64, 64, 128, 128]})
    fig = plot_ablation(df, x="topk", y="map", hue="anchor_len")
    lines = fig.axes[0].lines
    assert len(lines) == 2
    np.testing.assert_allclose(lines[0].get_xdata(), [128, 256])
    np.testing.assert_allclose(lines[0].get_ydata(), [1.0, 2.0])
    assert lines[1].get_label() == "anchor_len = 128"
    assert not math.isnan(lines[1].get_ydata()[0])


def test_plot_ablation_draws_the_baseline_and_shades_the_interval():
    df = pd.DataFrame({"topk": [64, 32], "map": [30.0, 25.0], "low": [28.0, 20.0], "high": [33.0, 27.0]})
    fig = plot_ablation(df, x="topk", y="map", ci=("low", "high"), baseline=21.5)
    ax = fig.axes[0]
    dashed = [line for line in ax.lines if line.get_linestyle() == "--"]
    assert len(dashed) == 1 and np.allclose(dashed[0].get_ydata(), 21.5)
    assert "first stage (21.5)" in [t.get_text() for t in ax.get_legend().get_texts()]
    band = ax.collections[0].get_paths()[0].vertices
    assert band[:, 1].min() == 20.0 and band[:, 1].max() == 33.0


def test_plot_method_bars_draws_one_panel_per_dataset_with_interval_bars():
    import pandas as pd

    from csa.notebook.figures import plot_method_bars

    rows = []
    for ds in ("a", "b"):
        rows.append(dict(dataset=ds, method="first stage", medium_map=20.0, hard_map=10.0, medium_gain=0.0,
                         medium_gain_low=0.0, medium_gain_high=0.0, hard_gain=0.0, hard_gain_low=0.0,
                         hard_gain_high=0.0))
        rows.append(dict(dataset=ds, method="CSA", medium_map=25.0, hard_map=12.0, medium_gain=5.0,
                         medium_gain_low=1.0, medium_gain_high=9.0, hard_gain=2.0, hard_gain_low=-1.0,
                         hard_gain_high=4.0))
    fig = plot_method_bars(pd.DataFrame(rows))
    axes = fig.get_axes()
    assert [ax.get_title() for ax in axes] == ["a", "b"]
    heights = sorted(p.get_height() for p in axes[0].patches)
    assert heights == [10.0, 12.0, 20.0, 25.0]
    # the CSA Medium error bar spans its mAP shifted by the gain interval: [21, 29]
    segments = [seg for coll in axes[0].collections for seg in coll.get_segments()]
    spans = sorted((round(float(s[:, 1].min()), 6), round(float(s[:, 1].max()), 6)) for s in segments)
    assert (21.0, 29.0) in spans and (9.0, 14.0) in spans
    with pytest.raises(CSAInputError, match="lacks the column"):
        plot_method_bars(pd.DataFrame(rows).drop(columns=["hard_gain_low"]))


def test_plot_query_examples_picks_by_rule_and_draws_images_from_disk(tmp_path):
    from PIL import Image

    from csa.notebook.figures import plot_query_examples

    names = [f"db{i}" for i in range(12)]
    for name in names + ["q0", "q1", "q2", "q3"]:
        Image.new("RGB", (24, 16), (10 * len(name), 80, 120)).save(tmp_path / f"{name}.jpg")
    gt = {"imlist": names, "qimlist": ["q0", "q1", "q2", "q3"],
          "gnd": [{"bbx": [1, 1, 10, 10], "easy": [0], "hard": [], "junk": []}] * 4}
    before = np.tile(np.arange(12)[:, None], (1, 4))
    after = before.copy()
    after[[0, 1], 0] = [1, 0]      # the positive moves from rank 1 to rank 2 (and back for query 2)
    after[[0, 3], 2] = [3, 0]
    # query 3 gains the most, but only below the top-10: its two rows would look the same, it is not shown
    examples = plot_query_examples(gt, tmp_path, before, after, [50.0, 20.0, 40.0, 10.0], [60.0, 20.0, 10.0, 90.0],
                                   n=2, k=10)
    assert [(kind, q) for kind, q, _ in examples] == [("success", 0), ("failure", 2)]
    fig = examples[0][2]
    assert "success: query 0 (q0)" in fig._suptitle.get_text() and len(fig.axes) == 21   # query + 2 x 10


def test_plot_query_positives_one_row_per_benchmark_with_box_and_positive_names(tmp_path):
    from PIL import Image

    from csa.notebook.figures import QUERY_COLOR, plot_query_positives
    from csa.validation import CSAInputError

    for name in ["q0", "a", "b", "c"]:
        Image.new("RGB", (24, 16), (40, 80, 120)).save(tmp_path / f"{name}.jpg")
    gt = {"imlist": ["a", "b", "c"], "qimlist": ["q0"],
          "gnd": [{"bbx": [2, 3, 12, 9], "easy": [2], "hard": [0], "junk": [1]}]}
    fig = plot_query_positives({"one": (gt, tmp_path), "two": (gt, tmp_path)}, n_positives=3, title="demo")
    assert len(fig.axes) == 2 * 4 and fig._suptitle.get_text() == "demo"
    titles = [ax.get_title() for ax in fig.axes[:4]]
    assert titles == ["query: q0", "positive: c", "positive: a", ""]     # easy then hard; junk never shown
    box = fig.axes[0].patches[0]
    assert (box.get_x(), box.get_y(), box.get_width(), box.get_height()) == (2.0, 3.0, 10.0, 6.0)
    assert to_hex(box.get_edgecolor()) == QUERY_COLOR
    with pytest.raises(CSAInputError, match="empty"):
        plot_query_positives({})
