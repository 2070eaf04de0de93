"""Draw the book's own figures into book/figures/ (run: python book/make_figures.py).

Only the CSA data-flow diagram lives here; figures of results come from the executed notebooks.
The SVG is written deterministically (fixed hash salt, no date) so re-running does not change it.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import matplotlib
from matplotlib.figure import Figure
from matplotlib.patches import FancyArrowPatch, FancyBboxPatch

from csa.fileio import save_figure

FIGURES = Path(__file__).resolve().parent / "figures"

_FILL = {"data": "#e8f1fb", "op": "#fdf2e3", "loss": "#fbe9e9", "out": "#e9f6ea"}
_EDGE = {"data": "#2f6db5", "op": "#d9822b", "loss": "#c0392b", "out": "#2e8b3d"}


#: Smallest font size (points) of the diagram.  The figure is drawn 8 inches wide (768 CSS px), a little
#: more than the book's text column at 1280 px (about 640 px), so no text falls under ~11 px on screen.
MIN_FONTSIZE = 10.5
WIDTH, HEIGHT = 9.6, 7.4   # layout units of the coordinates below
INCHES_PER_UNIT = 8.0 / WIDTH
COLUMNS = (1.55, 4.65, 7.75)
BOX_W, BOX_H = 2.8, 1.05


def _box(ax, x, y, text, kind, w=BOX_W, h=BOX_H, fontsize=11.5):
    ax.add_patch(FancyBboxPatch((x - w / 2, y - h / 2), w, h, boxstyle="round,pad=0.02,rounding_size=0.12",
                                facecolor=_FILL[kind], edgecolor=_EDGE[kind], linewidth=1.6))
    ax.text(x, y, text, ha="center", va="center", fontsize=max(fontsize, MIN_FONTSIZE), linespacing=1.35)


def _arrow(ax, start, end, dashed=False):
    ax.add_patch(FancyArrowPatch(start, end, arrowstyle="-|>", mutation_scale=16, linewidth=1.5,
                                 color="#444444", linestyle="--" if dashed else "-", shrinkA=2, shrinkB=2))


def dataflow_figure() -> Figure:
    """The CSA pipeline in three rows read like text (first stage -> affinity features -> transformer ->
    scores), and below them the training losses (dashed)."""
    fig = Figure(figsize=(WIDTH * INCHES_PER_UNIT, HEIGHT * INCHES_PER_UNIT))
    ax = fig.add_axes([0, 0, 1, 1])
    ax.set_xlim(0, WIDTH)
    ax.set_ylim(0, HEIGHT)
    ax.axis("off")
    c1, c2, c3 = COLUMNS
    half, edge = BOX_W / 2, BOX_H / 2
    r1, r2, r3, r4 = 6.65, 4.95, 3.25, 1.35

    _box(ax, c1, r1, "query q and\ndatabase descriptors\n(one row of D each)", "data")
    _box(ax, c2, r1, "first stage:\ncosine ranking\nof the database", "op")
    _box(ax, c3, r1, "tokens: q + top-K\nanchors: q + top-(L-1)", "data")
    _arrow(ax, (c1 + half, r1), (c2 - half, r1))
    _arrow(ax, (c2 + half, r1), (c3 - half, r1))

    _box(ax, c3, r2, "affinity matrix A\n(K+1) x L, A[i, j] =\ncos(item i, anchor j)", "data")
    _arrow(ax, (c3, r1 - edge), (c3, r2 + edge))
    _box(ax, c2, r2, "topk_proj\nlinear L -> C", "op")
    _arrow(ax, (c3 - half, r2), (c2 + half, r2))
    _box(ax, c1, r2, "depth x pre-norm\ntransformer block\n(self-attention, K+1)", "op")
    _arrow(ax, (c2 - half, r2), (c1 + half, r2))

    _box(ax, c1, r3, "output tokens\nx_0, ..., x_K\n(K+1) x C", "data")
    _arrow(ax, (c1, r2 - edge), (c1, r3 + edge))
    _box(ax, c2, r3, "score_i = cos(x_0, x_i)\ni = 1..K", "op")
    _arrow(ax, (c1 + half, r3), (c2 - half, r3))
    _box(ax, c3, r3, "re-sorted top-K;\nthe rest keeps\nits order", "out")
    _arrow(ax, (c2 + half, r3), (c3 - half, r3))

    _box(ax, c1, r4, "contrastive loss\n(temperature t,\nlabels y_i)", "loss")
    _arrow(ax, (c1, r3 - edge), (c1, r4 + edge), dashed=True)
    _box(ax, c2, r4, "feature_align\nlinear C -> L", "op")
    _arrow(ax, (c1 + 0.5, r3 - edge), (c2 - 0.5, r4 + edge), dashed=True)
    _box(ax, c3, r4, "reconstruction loss\n|| norm(A_i) -\nnorm(align(x_i)) ||", "loss")
    _arrow(ax, (c2 + half, r4), (c3 - half, r4), dashed=True)
    lane = c3 + half + 0.28   # A reaches the reconstruction loss along the right margin
    ax.plot([c3 + half, lane, lane], [r2, r2, r4], color="#444444", linestyle="--", linewidth=1.5)
    _arrow(ax, (lane, r4), (c3 + half, r4), dashed=True)
    ax.text(WIDTH / 2, 0.22, "training only (dashed): loss = contrastive + alpha * reconstruction", ha="center", fontsize=12.5,
            fontweight="bold", color=_EDGE["loss"])
    return fig


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=FIGURES, help="output folder (default book/figures)")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    with matplotlib.rc_context({"svg.hashsalt": "csa-book", "svg.fonttype": "path", "font.family": "DejaVu Sans"}):
        save_figure(dataflow_figure(), args.out / "csa_dataflow.svg", metadata={"Date": None})
    print(f"wrote {args.out / 'csa_dataflow.svg'}")


if __name__ == "__main__":
    main()
