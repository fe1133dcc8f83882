"""Reliability diagrams (Niculescu-Mizil and Caruana 2005; the layout of Guo et al. 2017).

matplotlib is imported inside the functions, and figures are built as bare
:class:`matplotlib.figure.Figure` objects (no pyplot state, nothing to close), so the
functions work headless with the Agg backend: ``fig.savefig("diagram.png")``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING

import numpy as np

from crossent._extras import require
from crossent.calibration._inputs import ArrayLike
from crossent.calibration.metrics import (
    Binning,
    table_from_scores,
    top_scores,
    width_bin_index,
    width_edges,
)

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

__all__ = ["compare_reliability_diagrams", "reliability_diagram"]


#: Bins holding fewer samples than this are drawn faint with a dotted edge.
LOW_COUNT = 10


def _draw(
    ax: Axes,
    hax: Axes,
    conf: np.ndarray,
    correct: np.ndarray,
    *,
    n_bins: int,
    binning: Binning,
    title: str | None,
    aggregate: str | None,
    low_count: int,
) -> None:
    from matplotlib.patches import Patch

    table = table_from_scores(conf, correct, n_bins=n_bins, binning=binning)
    used = table.count > 0
    lower, upper = table.lower[used], table.upper[used]
    width = np.maximum(upper - lower, 0.004)
    acc, mean_conf, count = table.accuracy[used], table.confidence[used], table.count[used]
    low = count < low_count
    ax.plot([0, 1], [0, 1], linestyle="--", color="0.45", linewidth=1)
    for mask, alpha, style in ((~low, 1.0, "solid"), (low, 0.35, "dotted")):
        ax.bar(lower[mask], acc[mask], width=width[mask], align="edge", color="C0", alpha=alpha,
               edgecolor="black", linestyle=style, linewidth=0.6)
        over = mask & (mean_conf > acc)  # over-confident: the gap sits above the accuracy bar
        ax.bar(lower[over], (mean_conf - acc)[over], bottom=acc[over], width=width[over],
               align="edge", color="C3", alpha=0.3 * alpha, edgecolor="C3", hatch="//",
               linestyle=style, linewidth=0.6)
        under = mask & (acc > mean_conf)  # under-confident: the gap is the top of the bar
        ax.bar(lower[under], (acc - mean_conf)[under], bottom=mean_conf[under],
               width=width[under], align="edge", color="C2", alpha=0.3 * alpha, edgecolor="C2",
               hatch="\\\\", linestyle=style, linewidth=0.6)
    for x, w, n in zip(lower, width, count, strict=True):  # the count strip along the bottom
        ax.text(x + w / 2, 0.01, str(int(n)), ha="center", va="bottom", fontsize=6,
                rotation=90 if n_bins > 12 else 0, color="black" if n >= low_count else "C3")
    handles = [
        ax.lines[0],
        Patch(facecolor="C0", edgecolor="black", label="accuracy"),
        Patch(facecolor="C3", alpha=0.3, edgecolor="C3", hatch="//",
              label="gap: confidence > accuracy"),
        Patch(facecolor="C2", alpha=0.3, edgecolor="C2", hatch="\\\\",
              label="gap: accuracy > confidence"),
        Patch(facecolor="C0", alpha=0.35, edgecolor="black", linestyle="dotted",
              label=f"bin with < {low_count} samples"),
    ]
    ax.lines[0].set_label("perfect calibration")
    ax.legend(handles=handles, loc="upper left", fontsize="x-small", framealpha=0.9,
              title="numbers: samples per bin", title_fontsize="x-small")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_ylabel("accuracy")
    ax.tick_params(labelbottom=False)
    name = f"{title}: " if title else ""
    kind = "AdaECE" if binning == "mass" else "ECE"
    detail = f"{n_bins} {binning} bins, N = {table.n_samples}"
    if aggregate:
        detail += f", {aggregate}"
    ax.set_title(
        f"{name}{kind} = {100 * table.calibration_error('l1'):.2f}%\n({detail})",
        fontsize="medium",
    )

    edges = width_edges(n_bins)
    frac = np.bincount(width_bin_index(conf, n_bins), minlength=n_bins) / conf.shape[0]
    hax.bar(
        edges[:-1],
        frac,
        width=np.diff(edges),
        align="edge",
        color="0.6",
        edgecolor="black",
        linewidth=0.5,
    )
    hax.axvline(float(conf.mean()), color="C3", linewidth=1.2, label="mean confidence")
    hax.axvline(float(correct.mean()), color="C0", linestyle="--", linewidth=1.2, label="accuracy")
    hax.set_xlim(0, 1)
    hax.set_ylim(0, max(float(frac.max()) * 1.15, 1e-3))
    hax.set_xlabel("confidence")
    hax.set_ylabel("fraction")
    hax.legend(loc="upper left", fontsize="x-small", framealpha=0.9)


def reliability_diagram(
    probs: ArrayLike,
    labels: ArrayLike,
    *,
    n_bins: int = 15,
    ax: Axes | None = None,
    binning: Binning = "width",
    from_logits: bool = False,
    title: str | None = None,
    aggregate: str | None = None,
    low_count: int = LOW_COUNT,
) -> Figure:
    """Reliability diagram of the top-label confidence; returns the matplotlib Figure.

    Bars show the accuracy per bin, the hatched red bar on top of each the gap to its mean
    confidence, and the dashed diagonal perfect calibration. Underneath, a histogram gives the
    fraction of samples per confidence bin with the mean confidence and the accuracy marked.
    The title carries the ECE (AdaECE for ``binning="mass"``) computed from the same
    :func:`~crossent.calibration.reliability_table` as :func:`~crossent.calibration.ece`,
    and ``aggregate`` if given (say how the data were combined, e.g. ``"pooled over
    seeds"``, wherever a table next to the figure averages per-seed numbers instead). The
    over-confident gap is hatched red, the under-confident one hatched green; the number at
    the foot of every bar is its sample count, and bins with fewer than ``low_count``
    samples are drawn faint with a dotted edge.

    With ``ax`` the diagram is drawn into that axes (its lower part is split off for the
    histogram) and ``ax.figure`` is returned; otherwise a new figure is made.
    """
    Figure = require("matplotlib.figure", "reliability diagrams").Figure

    conf, correct = top_scores(probs, labels, from_logits)
    if ax is None:
        fig = Figure(figsize=(5.0, 5.8), layout="constrained")
        ax, hax = fig.subplots(2, 1, sharex=True, gridspec_kw={"height_ratios": [3, 1]})
    else:
        from mpl_toolkits.axes_grid1 import make_axes_locatable

        fig = ax.figure  # type: ignore[assignment]  # a Figure: ax is not in a SubFigure here
        hax = make_axes_locatable(ax).append_axes("bottom", size="33%", pad=0.12, sharex=ax)
    _draw(ax, hax, conf, correct, n_bins=n_bins, binning=binning, title=title,
          aggregate=aggregate, low_count=low_count)
    return fig


def compare_reliability_diagrams(
    probs_by_name: Mapping[str, ArrayLike],
    labels: ArrayLike,
    *,
    n_bins: int = 15,
    binning: Binning = "width",
    from_logits: bool = False,
    aggregate: str | None = None,
    low_count: int = LOW_COUNT,
) -> Figure:
    """Side-by-side reliability diagrams on one figure, e.g. before and after temperature
    scaling: ``compare_reliability_diagrams({"before": p, "after (T=1.7)": q}, labels)``.

    Every panel is drawn as in :func:`reliability_diagram`, against the same ``labels``;
    ``aggregate`` (e.g. ``"pooled over seeds"``) is printed in every panel's title.
    """
    Figure = require("matplotlib.figure", "reliability diagrams").Figure

    if not probs_by_name:
        raise ValueError("probs_by_name is empty: give at least one {name: probs} entry")
    panels = [(name, *top_scores(p, labels, from_logits)) for name, p in probs_by_name.items()]
    k = len(panels)
    fig = Figure(figsize=(4.8 * k, 5.8), layout="constrained")
    axes = fig.subplots(2, k, sharex=True, squeeze=False, gridspec_kw={"height_ratios": [3, 1]})
    for j, (name, conf, correct) in enumerate(panels):
        _draw(axes[0, j], axes[1, j], conf, correct, n_bins=n_bins, binning=binning, title=name,
              aggregate=aggregate, low_count=low_count)
    return fig
