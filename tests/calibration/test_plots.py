"""Reliability diagrams render headless to sensible PNGs."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pytest
import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.colors import to_rgba

from crossent.calibration import compare_reliability_diagrams, ece, reliability_diagram

if TYPE_CHECKING:
    from matplotlib.backends.backend_agg import RendererAgg
    from matplotlib.figure import Figure
    from matplotlib.transforms import Bbox


def data(n: int = 800, c: int = 5, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    z = rng.normal(size=(n, c)) * 3
    return torch.softmax(torch.from_numpy(z), 1).numpy(), rng.integers(0, c, n)


def check_png(path: Path) -> None:
    import matplotlib.image as mpimg

    raw = path.read_bytes()
    assert raw[:8] == b"\x89PNG\r\n\x1a\n"
    assert 10_000 < len(raw) < 2_000_000
    img = mpimg.imread(path)
    h, w = img.shape[:2]
    assert 300 <= h <= 2000 and 300 <= w <= 4000
    ink = (img[..., :3].mean(-1) < 0.9).mean()  # something other than white background
    assert 0.02 < ink < 0.9


def test_reliability_diagram_png(tmp_path: Path) -> None:
    p, y = data()
    fig = reliability_diagram(p, y, n_bins=10)
    assert f"ECE = {100 * ece(p, y, n_bins=10):.2f}%" in fig.axes[0].get_title()
    assert len(fig.axes) == 2  # the bars and the confidence histogram underneath
    fig.savefig(tmp_path / "d.png", dpi=80)
    check_png(tmp_path / "d.png")


def test_reliability_diagram_into_given_axes_and_mass_bins(tmp_path: Path) -> None:
    from matplotlib.figure import Figure

    p, y = data(seed=1)
    fig = Figure(figsize=(8, 4))
    ax1, ax2 = fig.subplots(1, 2)
    out = reliability_diagram(p, y, ax=ax1, title="left")
    assert out is fig
    reliability_diagram(np.log(p), y, ax=ax2, binning="mass", from_logits=True)
    assert "AdaECE" in ax2.get_title() and "left: ECE" in ax1.get_title()
    fig.savefig(tmp_path / "two.png", dpi=80)
    check_png(tmp_path / "two.png")


def test_compare_before_after(tmp_path: Path) -> None:
    p, y = data(seed=2)
    q = torch.softmax(torch.log(torch.from_numpy(p)) / 3.0, 1).numpy()
    fig = compare_reliability_diagrams({"before": p, "after (T=3)": q}, y)
    titles = [ax.get_title() for ax in fig.axes]
    assert any(t.startswith("before: ECE") for t in titles)
    assert any(t.startswith("after (T=3): ECE") for t in titles)
    fig.savefig(tmp_path / "cmp.png", dpi=80)
    check_png(tmp_path / "cmp.png")


def test_matplotlib_imported_lazily() -> None:
    code = (
        "import sys, crossent.calibration, crossent.calibration.cli;"
        "assert 'matplotlib' not in sys.modules, 'matplotlib imported eagerly'"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


def test_legend_counts_low_count_bins_and_aggregate() -> None:
    rng = np.random.default_rng(3)
    conf = np.concatenate([rng.uniform(0.61, 0.69, 300), [0.95, 0.97], rng.uniform(0.71, 0.79, 50)])
    # the first group is under-confident (accuracy 0.8 at confidence 0.65)
    correct = np.concatenate([rng.random(300) < 0.8, [1, 0], rng.random(50) < 0.3])
    p = np.stack([conf, 1 - conf], 1)
    y = np.where(correct, 0, 1)
    fig = reliability_diagram(p, y, n_bins=10, aggregate="pooled over 3 seeds")
    ax = fig.axes[0]
    assert "pooled over 3 seeds" in ax.get_title()
    labels = [t.get_text() for t in ax.get_legend().get_texts()]
    assert labels == ["perfect calibration", "accuracy", "gap: confidence > accuracy",
                      "gap: accuracy > confidence", "bin with < 10 samples"]
    counts = sorted(int(t.get_text()) for t in ax.texts)
    assert counts == [2, 50, 300]  # bins (0.6, 0.7], (0.7, 0.8], (0.9, 1]
    assert 2 in counts  # the bin of two samples is shown, drawn faint
    faint = [b for b in ax.patches if b.get_alpha() is not None and b.get_alpha() < 0.5
             and b.get_facecolor()[2] > 0.5 and b.get_height() > 0]
    assert faint, "the low-count bin is not drawn faint"


@pytest.mark.parametrize("n_bins", [10, 15])
def test_counts_of_one_digit_stay_level(n_bins: int) -> None:
    """With more than 12 bins the counts are turned upright to fit, but a count of one digit
    stays level: an 8 on its side reads as an infinity sign."""
    rng = np.random.default_rng(4)
    conf = np.concatenate([rng.uniform(0.21, 0.25, 8), rng.uniform(0.61, 0.65, 300)])
    y = np.where(rng.random(conf.size) < conf, 0, 1)
    fig = reliability_diagram(np.stack([conf, 1 - conf], 1), y, n_bins=n_bins)
    rotation = {t.get_text(): t.get_rotation() for t in fig.axes[0].texts}
    assert rotation["8"] == 0
    assert rotation["300"] == (90 if n_bins > 12 else 0)


def test_compare_aggregate_in_every_panel() -> None:
    p, y = data(seed=4)
    fig = compare_reliability_diagrams({"a": p, "b": p}, y, aggregate="mean over seeds")
    titles = [ax.get_title() for ax in fig.axes if ax.get_title()]
    assert len(titles) == 2 and all("mean over seeds" in t for t in titles)


def _drawn(fig: Figure) -> tuple[RendererAgg, Bbox]:
    """Lay the figure out and draw it as savefig does; the renderer and the figure's bounds."""
    fig.set_dpi(40)  # the layout is the same at any dpi; fewer pixels draw faster
    canvas = FigureCanvasAgg(fig)
    canvas.draw()
    return canvas.get_renderer(), fig.bbox


def _inside(inner: Bbox, outer: Bbox, tol: float = 1.0) -> bool:
    return (inner.x0 >= outer.x0 - tol and inner.y0 >= outer.y0 - tol
            and inner.x1 <= outer.x1 + tol and inner.y1 <= outer.y1 + tol)


def test_legend_hides_no_bar_of_an_underconfident_model() -> None:
    """Accuracy 1 at every confidence: the bars fill the upper left, where the legend sat."""
    conf = np.linspace(0.34, 0.99, 400)
    p = np.stack([conf, (1 - conf) / 2, (1 - conf) / 2], 1)
    fig = reliability_diagram(p, np.zeros(400, dtype=int), n_bins=10)
    renderer, bounds = _drawn(fig)
    for ax in fig.axes:
        legend = ax.get_legend()
        box = legend.get_window_extent(renderer)
        assert _inside(box, bounds), "legend cut off"
        for bar in ax.patches:
            if bar.get_height() > 0:
                assert not box.overlaps(bar.get_window_extent(renderer)), "legend hides a bar"


def test_long_titles_stay_inside_the_saved_figure() -> None:
    p, y = data(seed=5)
    long = "focal loss γ=3 with label smoothing 0.1 and a warm-up schedule over 30 epochs"
    for fig in (reliability_diagram(p, y, title=long, aggregate="pooled over 10 seeds"),
                compare_reliability_diagrams({long: p, "after " + long: p}, y,
                                             aggregate="pooled over 10 seeds")):
        renderer, bounds = _drawn(fig)
        titles = [ax.title for ax in fig.axes if ax.get_title()]
        assert titles
        for t in titles:
            assert _inside(t.get_window_extent(renderer), bounds), t.get_text()
        assert all("10 seeds" in t.get_text() for t in titles)


def test_legend_swatches_look_like_the_drawn_gaps() -> None:
    """The gap bars are drawn over the accuracy bar (under-confident) or above it on white
    (over-confident): each legend swatch has the colour the bars show."""
    rng = np.random.default_rng(6)
    conf = np.concatenate([rng.uniform(0.41, 0.49, 200), rng.uniform(0.81, 0.89, 200)])
    correct = np.concatenate([rng.random(200) < 0.9, rng.random(200) < 0.5])
    p = np.stack([conf, (1 - conf) / 2, (1 - conf) / 2], 1)
    fig = reliability_diagram(p, np.where(correct, 0, 1), n_bins=10)
    ax = fig.axes[0]
    swatches = {t.get_text(): h for t, h in
                zip(ax.get_legend().get_texts(), ax.get_legend().legend_handles, strict=True)}
    for label, hatch in (("gap: confidence > accuracy", "//"),
                         ("gap: accuracy > confidence", "\\\\")):
        drawn = [b for b in ax.patches if b.get_hatch() == hatch and b.get_height() > 0]
        assert drawn, label
        want = to_rgba(swatches[label].get_facecolor())
        assert want[3] == 1.0, label
        for b in drawn:  # opaque, so what is underneath does not change the colour
            assert to_rgba(b.get_facecolor()) == pytest.approx(want), label


def test_binary_input_axes_name_the_positive_class() -> None:
    """(N,) positive-class probabilities are binned as such, not as top-label confidences."""
    rng = np.random.default_rng(7)
    pb = rng.random(300)
    fig = reliability_diagram(pb, (rng.random(300) < pb).astype(int))
    ax, hax = fig.axes[:2]
    assert ax.get_ylabel() == "fraction of positives"
    assert hax.get_xlabel() == "predicted probability of the positive class"
    fig = reliability_diagram(np.stack([1 - pb, pb], 1), (rng.random(300) < pb).astype(int))
    assert fig.axes[0].get_ylabel() == "accuracy"
    assert fig.axes[1].get_xlabel() == "confidence"


def test_mean_lines_at_1_are_drawn_over_the_right_edge() -> None:
    """Every prediction right: the accuracy mark of the histogram (a dashed C0 line at 1)
    lies on the right spine and must show there, not be clipped away or painted over."""
    rng = np.random.default_rng(5)
    y = rng.integers(0, 3, 200)
    p = np.full((200, 3), 0.01)
    p[np.arange(200), y] = 0.98
    fig = reliability_diagram(p, y, n_bins=10)
    canvas = FigureCanvasAgg(fig)
    canvas.draw()
    img = np.asarray(canvas.buffer_rgba())[..., :3].astype(float) / 255
    hax = fig.axes[1]
    box = hax.get_window_extent()
    height = img.shape[0]
    x = round(box.x1)
    rows = slice(int(height - box.y1) + 2, int(height - box.y0) - 2)  # pixel rows run downwards
    blue = np.array(to_rgba("C0")[:3])
    on_spine = np.abs(img[rows, x] - blue).max(-1) < 0.25  # the spine's own pixel column
    assert on_spine.mean() > 0.3, "no C0 dashes over the right spine"


def _bars(fig: Figure) -> list[tuple[float, float]]:
    """(x, height) of every bar drawn on the figure's axes, in drawing order."""
    return [(p.get_x(), p.get_height()) for ax in fig.axes for p in ax.patches if hasattr(p, "get_height")]


@pytest.mark.parametrize("binning", ["width", "mass"])
@pytest.mark.parametrize("which", ["one", "compare"])
def test_ignore_index_draws_the_diagram_of_the_kept_samples(which: str, binning: str) -> None:
    """Labels equal to ``ignore_index`` (-100 of a segmentation or language model) are left out,
    as by the metrics: the same title (its ECE and N) and bars as the diagram of the kept rows."""
    p, y = data(600, seed=9)
    yi = y.copy()
    yi[::4] = -100
    keep = yi != -100

    def draw(probs: np.ndarray, labels: np.ndarray, **kw: object) -> Figure:
        if which == "one":
            return reliability_diagram(probs, labels, binning=binning, **kw)  # type: ignore[arg-type]
        return compare_reliability_diagrams({"a": probs}, labels, binning=binning, **kw)  # type: ignore[arg-type]

    got, want = draw(p, yi, ignore_index=-100), draw(p[keep], y[keep])
    assert [ax.get_title() for ax in got.axes] == [ax.get_title() for ax in want.axes]
    assert "N = 450" in got.axes[0].get_title()
    assert len(_bars(want)) > 15 and _bars(got) == _bars(want)
    with pytest.raises(ValueError, match="labels"):
        draw(p, yi)  # -100 is no class without ignore_index


@pytest.mark.parametrize("ax", ["foo", 3, np.zeros(2)], ids=["str", "int", "array"])
def test_ax_that_is_not_axes_is_refused_naming_it(ax: object) -> None:
    """``ax`` is checked with the other options, before anything is drawn: an AttributeError
    from inside matplotlib named nothing."""
    rng = np.random.default_rng(0)
    p = rng.dirichlet(np.ones(3), 20)
    with pytest.raises(TypeError, match="ax must be a matplotlib Axes or None"):
        reliability_diagram(p, rng.integers(0, 3, 20), ax=ax)  # type: ignore[arg-type]


@pytest.mark.parametrize("given", ["list", "pairs", "array", "int key"])
def test_probs_by_name_that_is_not_a_mapping_of_titles_is_refused(given: str) -> None:
    """``compare_reliability_diagrams`` takes {title: probs}: a list, a list of pairs or an
    array is refused naming ``probs_by_name``, not with an AttributeError or NumPy's "truth
    value of an array is ambiguous"."""
    rng = np.random.default_rng(0)
    p = rng.dirichlet(np.ones(3), 20)
    arg = {"list": [p, p], "pairs": [("a", p)], "array": np.stack([p, p]), "int key": {1: p}}[given]
    with pytest.raises(TypeError, match="probs_by_name"):
        compare_reliability_diagrams(arg, rng.integers(0, 3, 20))  # type: ignore[arg-type]


@pytest.mark.parametrize("layout", ["constrained", "tight", None])
def test_given_axes_in_a_laid_out_figure_keep_every_label_inside(layout: str | None) -> None:
    """A diagram drawn into a caller's subplot, in a figure with constrained layout, with
    tight_layout or with neither: the histogram's axis label and tick labels, and the title,
    lie inside the saved figure (the subplot's cell is split, so the layout sees both axes)."""
    from matplotlib.figure import Figure

    p, y = data(seed=7)
    fig = Figure(figsize=(9, 4), layout=layout if layout == "constrained" else None)
    axes = fig.subplots(1, 2)
    for ax in axes:
        assert reliability_diagram(p, y, ax=ax) is fig
    if layout == "tight":
        fig.tight_layout()
    renderer, bounds = _drawn(fig)
    assert len(fig.axes) == 4
    for ax in fig.axes:
        for artist in (ax.xaxis.label, ax.yaxis.label, ax.title, *ax.get_xticklabels()):
            if artist.get_visible() and artist.get_text():
                assert _inside(artist.get_window_extent(renderer), bounds), artist.get_text()


def test_given_axes_in_a_subfigure_return_the_root_figure(tmp_path: Path) -> None:
    """An axes inside a SubFigure: the Figure that can be saved is returned."""
    from matplotlib.figure import Figure

    p, y = data(seed=8)
    fig = Figure(figsize=(9, 4))
    ax = fig.subfigures(1, 2)[0].subplots()
    out = reliability_diagram(p, y, ax=ax)
    assert out is fig
    out.savefig(tmp_path / "sub.png", dpi=60)
    assert (tmp_path / "sub.png").stat().st_size > 1000


def test_titles_are_not_wrapped_inside_math() -> None:
    """A long title with $...$ spans wraps between them, so every line keeps its math
    balanced (a line with an odd number of $ is drawn as plain text)."""
    p, y = data(seed=9)
    title = (r"CE with label smoothing $\epsilon=0.1$ and focal loss $\gamma = 2$"
             r" with z-loss $\lambda = 10^{-4}$")
    fig = reliability_diagram(p, y, title=title)
    text = fig.axes[0].get_title()
    assert "\n" in text
    assert all(line.count("$") % 2 == 0 for line in text.split("\n")), text
    assert r"$\gamma = 2$" in text and r"$\lambda = 10^{-4}$" in text


def test_mass_bins_of_one_repeated_confidence_are_one_visible_bar() -> None:
    """360 of 600 rows at confidence exactly 1.0 fill six mass bins of width 0 at 1.0: they
    are drawn as one bar inside the axes, labelled with their summed count, and the title's
    AdaECE is the one of the table (unchanged)."""
    p, y = data(n=600, seed=10)
    p[:360] = np.eye(p.shape[1])[y[:360]]
    fig = reliability_diagram(p, y, binning="mass", n_bins=10)
    ax = fig.axes[0]
    counts = [t.get_text() for t in ax.texts]
    assert "360" in counts and counts.count("60") == 4
    bars = [b for b in ax.patches if b.get_height() > 0 and b.get_x() >= 0.9]
    assert bars
    assert all(b.get_x() + b.get_width() <= 1.0 + 1e-12 and b.get_width() >= 0.02 - 1e-12 for b in bars)
    assert f"AdaECE = {100 * ece(p, y, n_bins=10, binning='mass'):.2f}%" in ax.get_title()


def test_compare_refuses_binary_and_multiclass_panels_together() -> None:
    """(N,) positive-class scores and (N, 2) rows are binned by different confidences: their
    panels side by side would compare two measures, so the mix is refused with the fix."""
    rng = np.random.default_rng(11)
    pb = rng.random(300)
    yb = (rng.random(300) < pb).astype(int)
    with pytest.raises(ValueError, match=r"mixes a binary panel \('before'.*multiclass one \('after'"):
        compare_reliability_diagrams({"before": pb, "after": np.stack([1 - pb, pb], 1)}, yb)
    fig = compare_reliability_diagrams({"before": pb, "after": pb ** 1.1}, yb)  # same kind: fine
    assert len(fig.axes) == 4


def test_drawing_into_the_same_axes_again_reuses_its_histogram() -> None:
    """A redraw per epoch into one axes (cleared between) keeps two axes in the figure and
    the same cell sizes; the histogram shows the latest data only."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(5, 5), layout="constrained")
    ax = fig.subplots()
    heights = []
    for epoch in range(3):
        p, y = data(seed=20 + epoch)
        ax.clear()
        reliability_diagram(p, y, ax=ax, title=f"epoch {epoch}")
        _drawn(fig)
        heights.append(ax.get_position().height)
        assert len(fig.axes) == 2
    assert max(heights) - min(heights) < 1e-6
    hax = fig.axes[1]
    assert len(hax.lines) == 2  # the mean confidence and the accuracy of the last draw only


def test_a_bin_of_one_repeated_confidence_is_drawn_on_top_centred_on_it() -> None:
    """500 of 600 scores at exactly 0.5 fill five mass bins of width 0 next to a wide bin of
    the other 100: their bar (the data's largest bin) is centred on 0.5 and drawn after the wide
    one (it was drawn first, from 0.5, under it), and its count does not sit on the other's.
    The title's AdaECE equals ``ece`` and the bars' (the tie's samples share its accuracy)."""
    rng = np.random.default_rng(0)
    p = np.concatenate([np.full(500, 0.5), rng.uniform(0.5, 1.0, 100)])
    y = (rng.random(600) < 0.2).astype(int)
    fig = reliability_diagram(p, y, n_bins=6, binning="mass")
    ax = fig.axes[0]
    blue = to_rgba("C0")[:3]
    accuracy = [b for b in ax.patches if b.get_facecolor()[:3] == pytest.approx(blue) and b.get_height() > 0]
    widths = [b.get_width() for b in accuracy]
    assert widths == sorted(widths, reverse=True) and widths[-1] == pytest.approx(0.02)
    assert accuracy[-1].get_x() == pytest.approx(0.49)
    labels = {t.get_text(): t.get_position()[0] for t in ax.texts}
    assert labels["500"] == pytest.approx(0.5) and labels["100"] > 0.7
    assert accuracy[-1].get_height() == pytest.approx(float(np.mean(y[:500])), abs=1e-12)  # the tie's
    assert f"AdaECE = {100 * ece(p, y, n_bins=6, binning='mass'):.2f}%" in ax.get_title()


def test_low_count_0_marks_no_bin_and_names_none_in_the_legend() -> None:
    p, y = data(n=300, seed=2)
    ax = reliability_diagram(p, y, low_count=0).axes[0]
    labels = [t.get_text() for t in ax.get_legend().get_texts()]
    assert labels == ["perfect calibration", "accuracy", "gap: confidence > accuracy",
                      "gap: accuracy > confidence"]


@pytest.mark.parametrize("bad", ["nan", "shape", "type"])
def test_an_error_in_one_of_several_panels_names_the_panel(bad: str) -> None:
    """``compare_reliability_diagrams`` with several panels says which one an error comes from,
    with the error's own type and words; one panel's error is the function's own."""
    p, y = data(60, seed=1)
    wrong = {"nan": np.where(np.arange(p.size).reshape(p.shape) == 7, np.nan, p), "shape": p[:30],
             "type": np.full(p.shape, "x")}[bad]
    kind = TypeError if bad == "type" else ValueError
    with pytest.raises(kind) as err:
        compare_reliability_diagrams({"before": p, "after": wrong}, y)
    assert str(err.value).startswith("probs_by_name['after']: ")
    with pytest.raises(kind) as alone:
        reliability_diagram(wrong, y)
    assert str(err.value) == "probs_by_name['after']: " + str(alone.value)
