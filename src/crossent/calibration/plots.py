"""Reliability diagrams (Niculescu-Mizil and Caruana 2005; the layout of Guo et al. 2017).

matplotlib is imported inside the functions, and figures are built as bare
:class:`matplotlib.figure.Figure` objects (no pyplot state, nothing to close), so the
functions work headless with the Agg backend: ``fig.savefig("diagram.png")``.
"""

from __future__ import annotations

import textwrap
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

import numpy as np

from crossent._extras import require
from crossent.calibration._inputs import (
    ArrayLike,
    OptionTypeError,
    check_bool,
    check_ignore_index,
    check_int,
    select,
    shown_option,
)
from crossent.calibration.metrics import (
    Binning,
    _check_binning,
    _check_n_bins,
    _scores,
    table_from_scores,
    width_bin_index,
    width_edges,
)

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

__all__ = ["compare_reliability_diagrams", "reliability_diagram"]


#: Bins holding fewer samples than this are drawn faint with a dotted edge.
LOW_COUNT = 10

#: Opacity of the faint low-count bins, and of the gap colours' tint over white.
FAINT = 0.35
GAP_TINT = 0.35

#: Title characters per inch of axes width at the title's font size ("medium", 10 pt).
TITLE_CHARS_PER_INCH = 12.0


@dataclass(frozen=True)
class _Names:
    """What the axes show: top-label accuracy against confidence (multiclass), or the fraction
    of positives against the positive-class probability (binary and multi-label input)."""

    y: str
    x: str
    mean_x: str
    high: str  # the gap where x exceeds y
    low: str  # the gap where y exceeds x


MULTICLASS = _Names("accuracy", "confidence", "mean confidence",
                    "gap: confidence > accuracy", "gap: accuracy > confidence")
BINARY = _Names("fraction of positives", "predicted probability of the positive class",
                "mean predicted probability", "gap: predicted > observed",
                "gap: observed > predicted")


def _tint(color: str, amount: float) -> tuple[float, float, float]:
    """``color`` at opacity ``amount`` over white, as an opaque colour: the gap bars are drawn
    over the accuracy bar or over the white background, and must look like their swatch."""
    from matplotlib.colors import to_rgb

    rgb = np.asarray(to_rgb(color))
    r, g, b = (amount * rgb + (1.0 - amount)).tolist()
    return r, g, b


def _check_options(
    n_bins: int, binning: Binning, from_logits: bool, low_count: int, ignore_index: int | None
) -> tuple[int, Binning, bool, int, int | None]:
    """The options the two diagrams share, checked before any figure is made."""
    return (_check_n_bins(n_bins), _check_binning(binning),
            check_bool("from_logits", from_logits), check_int("low_count", low_count, low=0),
            check_ignore_index(ignore_index))


def _check_text(name: str, value: object) -> str | None:
    """A title-like option: a string or None."""
    if value is not None and not isinstance(value, str):
        raise OptionTypeError(f"{name} must be a string or None, got {shown_option(value)}")
    return value


def _scored(
    probs: ArrayLike, labels: ArrayLike, from_logits: bool, ignore_index: int | None
) -> tuple[np.ndarray, np.ndarray, _Names]:
    """:func:`~crossent.calibration.metrics.top_scores` and the names of what they are."""
    kind, t, y, rows = select(probs, labels, from_logits=from_logits, ignore_index=ignore_index)
    conf, correct = _scores(kind, t, y, rows, from_logits)
    return conf, correct, BINARY if kind == "binary" else MULTICLASS


def _root_figure(ax: Axes) -> Figure:
    """The Figure that holds ``ax``, through any SubFigures (whose ``figure`` is their root:
    ``get_figure(root=True)`` exists from matplotlib 3.10 only)."""
    fig = ax.figure
    while fig is not None and getattr(fig, "figure", fig) is not fig:
        fig = fig.figure
    return fig  # type: ignore[return-value]


#: the attribute of a caller's axes that holds the histogram axes split off it
_HISTOGRAM = "_crossent_histogram"

#: a stand-in for the spaces of a $...$ math span while a title is wrapped
_MATH_SPACE = "\x00"


def _wrap(text: str, ax: Axes) -> str:
    """``text`` broken into lines that fit the width of ``ax`` (a long loss name or title
    would otherwise run past the figure's edge, where savefig cuts it off), never inside a
    ``$...$`` math span (a line with an odd number of ``$`` is drawn as plain text)."""
    root = _root_figure(ax)
    width_in = ax.get_position().width * (root.get_figwidth() if root is not None else 6.4)
    chars = max(16, int(width_in * TITLE_CHARS_PER_INCH))
    parts = text.split("$")
    if len(parts) % 2 == 1:  # balanced: the odd-numbered parts are math
        parts = [part.replace(" ", _MATH_SPACE) if i % 2 else part for i, part in enumerate(parts)]
    kept = "$".join(parts)
    wrapped = "\n".join(textwrap.fill(line, chars, break_long_words=False) for line in kept.split("\n"))
    return wrapped.replace(_MATH_SPACE, " ")


def _draw(
    ax: Axes,
    hax: Axes,
    conf: np.ndarray,
    correct: np.ndarray,
    *,
    names: _Names,
    n_bins: int,
    binning: Binning,
    title: str | None,
    aggregate: str | None,
    low_count: int,
    legend: Literal["outside", "inside", "none"],
) -> None:
    from matplotlib.patches import Patch

    table = table_from_scores(conf, correct, n_bins=n_bins, binning=binning)
    used = table.count > 0
    lower, upper = table.lower[used], table.upper[used]
    acc, mean_conf, count = table.accuracy[used], table.confidence[used], table.count[used]
    # Mass bins of one repeated confidence (many rows at exactly 1.0) share their edges: one
    # bar for them all, with their summed count, the count-weighted accuracy and confidence.
    edges_used, group = np.unique(np.stack([lower, upper], 1), axis=0, return_inverse=True)
    if edges_used.shape[0] < lower.shape[0]:
        group = group.reshape(-1)
        merged = np.bincount(group, weights=count)
        acc = np.bincount(group, weights=acc * count) / merged
        mean_conf = np.bincount(group, weights=mean_conf * count) / merged
        lower, upper, count = edges_used[:, 0], edges_used[:, 1], merged
    # a bin of one value (width 0) as a bar of 0.02 centred on it, inside the axes; the bars
    # drawn widest first, so that such a bar inside a wide bin's span stays in sight
    point = ~(upper > lower)
    width = np.where(point, 0.02, np.maximum(upper - lower, 0.004))
    lower = np.clip(np.where(point, lower - 0.01, lower), 0.0, 1.0 - width)
    order = np.argsort(-width, kind="stable")
    lower, width, count = lower[order], width[order], count[order]
    acc, mean_conf = acc[order], mean_conf[order]
    low = count < low_count
    over_color, under_color = _tint("C3", GAP_TINT), _tint("C2", GAP_TINT)
    ax.plot([0, 1], [0, 1], linestyle="--", color="0.45", linewidth=1)
    for mask, alpha, style in ((~low, 1.0, "solid"), (low, FAINT, "dotted")):
        ax.bar(lower[mask], acc[mask], width=width[mask], align="edge", color="C0", alpha=alpha,
               edgecolor="black", linestyle=style, linewidth=0.6)
        over = mask & (mean_conf > acc)  # over-confident: the gap sits above the accuracy bar
        ax.bar(lower[over], (mean_conf - acc)[over], bottom=acc[over], width=width[over],
               align="edge", color=over_color, alpha=alpha, edgecolor="C3", hatch="//",
               linestyle=style, linewidth=0.6)
        under = mask & (acc > mean_conf)  # under-confident: the gap is the top of the bar
        ax.bar(lower[under], (acc - mean_conf)[under], bottom=mean_conf[under],
               width=width[under], align="edge", color=under_color, alpha=alpha,
               edgecolor="C2", hatch="\\\\", linestyle=style, linewidth=0.6)
    for x, w, n in zip(lower, width, count, strict=True):  # the count strip along the bottom
        # many bins: counts turned upright to fit, but one digit stays level (a turned 8 is an infinity sign)
        label = str(int(n))
        ax.text(x + w / 2, 0.01, label, ha="center", va="bottom", fontsize=6,
                rotation=90 if n_bins > 12 and len(label) > 1 else 0,
                color="black" if n >= low_count else "C3")
    ax.lines[0].set_label("perfect calibration")
    handles = [
        ax.lines[0],
        Patch(facecolor="C0", edgecolor="black", label=names.y),
        Patch(facecolor=over_color, edgecolor="C3", hatch="//", label=names.high),
        Patch(facecolor=under_color, edgecolor="C2", hatch="\\\\", label=names.low),
    ]
    if low_count > 0:  # below 1 no bin is marked
        handles.append(Patch(facecolor="C0", alpha=FAINT, edgecolor="black", linestyle="dotted",
                             label=f"bin with < {low_count} samples"))
    # Outside (to the right of the axes, in a figure laid out by this module) the legend
    # can hide no bar; inside a caller's axes it goes where it covers the least.
    place = ({"loc": "upper left", "bbox_to_anchor": (1.02, 1.0), "borderaxespad": 0.0}
             if legend == "outside" else {"loc": "best"})
    if legend != "none":
        ax.legend(handles=handles, fontsize="x-small", framealpha=0.9,
                  title="numbers: samples per bin", title_fontsize="x-small", **place)
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_ylabel(names.y)
    ax.tick_params(labelbottom=False)
    name = f"{title}: " if title else ""
    kind = "AdaECE" if binning == "mass" else "ECE"
    detail = f"{n_bins} {binning} bin{'s' if n_bins != 1 else ''}, N = {table.n_samples}"
    if aggregate:
        detail += f", {aggregate}"
    ax.set_title(
        _wrap(f"{name}{kind} = {100 * table.calibration_error('l1'):.2f}%\n({detail})", ax),
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
    # unclipped and over the spines: a mean of 1 (every prediction right) lies on the right edge
    marks = {"linewidth": 1.2, "clip_on": False, "zorder": 3}
    hax.axvline(float(conf.mean()), color="C3", label=names.mean_x, **marks)
    hax.axvline(float(correct.mean()), color="C0", linestyle="--", label=names.y, **marks)
    hax.set_xlim(0, 1)
    hax.set_ylim(0, max(float(frac.max()) * 1.15, 1e-3))
    hax.set_xlabel(names.x)
    hax.set_ylabel("fraction")
    if legend != "none":
        hax.legend(fontsize="x-small", framealpha=0.9, **place)


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
    ignore_index: int | None = None,
) -> Figure:
    """Reliability diagram of the top-label confidence; returns the matplotlib Figure.

    Bars show the accuracy per bin, the hatched red bar on top of each the gap to its mean
    confidence, and the dashed diagonal perfect calibration. Underneath, a histogram gives the
    fraction of samples per width bin of the confidence (width bins for ``binning="mass"``
    too: they show where the mass bins lie), with the mean confidence and the accuracy marked.
    The title carries the ECE (AdaECE for ``binning="mass"``) computed from the same
    :func:`~crossent.calibration.reliability_table` as :func:`~crossent.calibration.ece`,
    and ``aggregate`` if given (say how the data were combined, e.g. ``"pooled over
    seeds"``, wherever a table next to the figure averages per-seed numbers instead). The
    over-confident gap is hatched red, the under-confident one hatched green; the number at
    the foot of every bar is its sample count, and bins with fewer than ``low_count``
    samples are drawn faint with a dotted edge. Samples whose label equals ``ignore_index``
    are left out, as by the metrics. Binary input ((N,) positive-class
    probabilities, or multi-label (N, L)) is binned by the positive-class probability, and
    the axes say so: the fraction of positives against the predicted probability.

    Without ``ax`` a new figure is made, its legends to the right of the axes, where they
    hide no bar. With ``ax`` the diagram is drawn into that axes (its lower part is split
    off for the histogram: in a grid of subplots the cell is split in two, so that constrained
    and tight layouts make room for both), the legends inside it where they cover the least,
    and the figure that holds ``ax`` is returned. Titles are wrapped to the width of the axes.
    Drawn into the same ``ax`` again (a redraw per epoch, after ``ax.clear()``), the diagram
    reuses the histogram it split off. Mass bins that share their edges (one confidence
    repeated, such as many rows at 1.0) are drawn as one bar.
    """
    n_bins, binning, from_logits, low_count, ignore_index = _check_options(
        n_bins, binning, from_logits, low_count, ignore_index)
    title, aggregate = _check_text("title", title), _check_text("aggregate", aggregate)
    Figure = require("matplotlib.figure", "reliability diagrams").Figure
    if ax is not None and not isinstance(ax, require("matplotlib.axes", "reliability diagrams").Axes):
        raise OptionTypeError(f"ax must be a matplotlib Axes or None, got {shown_option(ax)}")

    conf, correct, names = _scored(probs, labels, from_logits, ignore_index)
    legend: Literal["outside", "inside"] = "outside" if ax is None else "inside"
    if ax is None:
        fig = Figure(figsize=(7.0, 5.8), layout="constrained")
        ax, hax = fig.subplots(2, 1, sharex=True, gridspec_kw={"height_ratios": [3, 1]})
    else:
        fig = _root_figure(ax)
        spec = ax.get_subplotspec()
        hax = getattr(ax, _HISTOGRAM, None)
        if hax is not None and hax.figure is not None and hax in hax.figure.axes:
            hax.clear()  # drawn into before (a redraw per epoch): its histogram axes again
        elif spec is not None:
            # ax's cell split in two (ax moved to the upper part): a layout engine (constrained,
            # tight) sees both axes and makes room for the histogram's labels
            cells = spec.subgridspec(2, 1, height_ratios=[3, 1], hspace=0.05)
            ax.set_subplotspec(cells[0])
            hax = ax.get_figure().add_subplot(cells[1], sharex=ax)  # type: ignore[union-attr]
        else:  # an axes placed by hand (fig.add_axes): its lower part split off
            from mpl_toolkits.axes_grid1 import make_axes_locatable

            hax = make_axes_locatable(ax).append_axes("bottom", size="33%", pad=0.12, sharex=ax)
        setattr(ax, _HISTOGRAM, hax)
    _draw(ax, hax, conf, correct, names=names, n_bins=n_bins, binning=binning, title=title,
          aggregate=aggregate, low_count=low_count, legend=legend)
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
    ignore_index: int | None = None,
) -> Figure:
    """Side-by-side reliability diagrams on one figure, e.g. before and after temperature
    scaling: ``compare_reliability_diagrams({"before": p, "after (T=1.7)": q}, labels)``.

    Every panel is drawn as in :func:`reliability_diagram`, against the same ``labels``;
    ``aggregate`` (e.g. ``"pooled over seeds"``) is printed in every panel's title. The
    legends, the same for every panel, stand once, to the right of the last panel.
    """
    n_bins, binning, from_logits, low_count, ignore_index = _check_options(
        n_bins, binning, from_logits, low_count, ignore_index)
    aggregate = _check_text("aggregate", aggregate)
    Figure = require("matplotlib.figure", "reliability diagrams").Figure

    if not isinstance(probs_by_name, Mapping):
        raise OptionTypeError(
            "probs_by_name must be a mapping {name: probs} (a dict), one panel per entry, got"
            f" {type(probs_by_name).__name__}"
        )
    bad = next((name for name in probs_by_name if not isinstance(name, str)), None)
    if bad is not None:
        raise OptionTypeError(
            f"probs_by_name's keys are the panels' titles: strings, got {shown_option(bad)}"
        )
    if not probs_by_name:
        raise ValueError("probs_by_name is empty: give at least one {name: probs} entry")
    panels = []
    for name, p in probs_by_name.items():
        try:
            panels.append((name, *_scored(p, labels, from_logits, ignore_index)))
        except (TypeError, ValueError) as e:  # which panel, where there are several
            if len(probs_by_name) == 1:
                raise
            raise type(e)(f"probs_by_name[{name!r}]: {e}") from None
    kinds = {names is BINARY: name for name, _, _, names in panels}
    if len(kinds) > 1:
        raise ValueError(
            f"probs_by_name mixes a binary panel ({kinds[True]!r}: positive-class scores, binned by"
            f" p(positive)) with a multiclass one ({kinds[False]!r}: binned by the top-label"
            " confidence); their ECEs measure different things. Give every panel the same form: the"
            " binary (N,) scores as np.stack([1 - p, p], 1), or the (N, 2) rows' p[:, 1]"
        )
    k = len(panels)
    fig = Figure(figsize=(4.8 * k + 2.0, 5.8), layout="constrained")
    axes = fig.subplots(2, k, sharex=True, squeeze=False, gridspec_kw={"height_ratios": [3, 1]})
    for j, (name, conf, correct, names) in enumerate(panels):
        _draw(axes[0, j], axes[1, j], conf, correct, names=names, n_bins=n_bins,
              binning=binning, title=name, aggregate=aggregate, low_count=low_count,
              legend="outside" if j == k - 1 else "none")
    return fig
