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


def _box(ax, x, y, w, h, text, kind, fontsize=10.5):
    ax.add_patch(FancyBboxPatch((x - w / 2, y - h / 2), w, h, boxstyle="round,pad=0.02,rounding_size=0.12",
                                facecolor=_FILL[kind], edgecolor=_EDGE[kind], linewidth=1.6))
    ax.text(x, y, text, ha="center", va="center", fontsize=fontsize, linespacing=1.35)


def _arrow(ax, start, end, text=None, dashed=False, text_offset=(0.0, 0.18)):
    ax.add_patch(FancyArrowPatch(start, end, arrowstyle="-|>", mutation_scale=14, linewidth=1.4,
                                 color="#444444", linestyle="--" if dashed else "-", shrinkA=2, shrinkB=2))
    if text:
        mx, my = (start[0] + end[0]) / 2 + text_offset[0], (start[1] + end[1]) / 2 + text_offset[1]
        ax.text(mx, my, text, ha="center", va="bottom", fontsize=9, color="#333333", style="italic")


def dataflow_figure() -> Figure:
    """The CSA pipeline: first stage -> affinity features -> transformer -> scores, plus the training losses."""
    fig = Figure(figsize=(12.5, 5.6))
    ax = fig.add_axes([0, 0, 1, 1])
    ax.set_xlim(0, 12.5)
    ax.set_ylim(0, 5.6)
    ax.axis("off")

    top = 4.3
    _box(ax, 1.15, top, 1.9, 1.0, "query q and\ndatabase\ndescriptors (D)", "data")
    _box(ax, 3.55, top, 2.1, 1.0, "first stage:\ncosine ranking\nof the database", "op")
    _box(ax, 6.2, top, 2.4, 1.0, "tokens: q + top-K\nanchors: q + top-(L-1)", "data")
    _box(ax, 9.05, top, 2.5, 1.0, "affinity matrix A\n(K+1) x L\nA[i, j] = cos(item i, anchor j)", "data",
         fontsize=10)
    _arrow(ax, (2.1, top), (2.5, top))
    _arrow(ax, (4.6, top), (5.0, top))
    _arrow(ax, (7.4, top), (7.8, top))

    mid = 2.45
    _box(ax, 11.25, mid, 2.1, 1.0, "topk_proj\nlinear L -> C", "op")
    _arrow(ax, (10.3, top - 0.3), (11.0, mid + 0.5))
    _box(ax, 8.6, mid, 2.5, 1.0, "depth x pre-norm\ntransformer block\n(self-attention over K+1)", "op", fontsize=10)
    _arrow(ax, (10.2, mid), (9.85, mid))
    _box(ax, 5.95, mid, 2.1, 1.0, "output tokens\nx_0, ..., x_K\n(K+1) x C", "data")
    _arrow(ax, (7.35, mid), (7.0, mid))
    _box(ax, 3.35, mid, 2.4, 1.0, "score_i = cos(x_0, x_i)\ni = 1..K", "op")
    _arrow(ax, (4.9, mid), (4.55, mid))
    _box(ax, 1.0, mid, 1.6, 1.0, "re-sorted\ntop-K; the rest\nkeeps its order", "out", fontsize=10)
    _arrow(ax, (2.15, mid), (1.8, mid))

    low = 0.7
    ax.text(0.25, 1.45, "training only", fontsize=10, color=_EDGE["loss"], fontweight="bold")
    _box(ax, 3.35, low, 2.4, 0.9, "contrastive loss\n(temperature t, labels y_i)", "loss")
    _arrow(ax, (5.5, mid - 0.5), (4.2, low + 0.45), dashed=True)
    _box(ax, 7.2, low, 2.1, 0.9, "feature_align\nlinear C -> L", "op")
    _arrow(ax, (6.4, mid - 0.5), (6.9, low + 0.45), dashed=True)
    _box(ax, 10.4, low, 2.9, 0.9, "reconstruction loss\n|| norm(A_i) - norm(align(x_i)) ||", "loss")
    _arrow(ax, (8.25, low), (8.95, low), dashed=True)
    _arrow(ax, (10.02, top - 0.5), (10.02, low + 0.45), dashed=True)
    ax.text(6.25, 0.05, "loss = contrastive + alpha * reconstruction", ha="center", fontsize=10.5,
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
