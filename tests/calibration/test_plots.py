"""Reliability diagrams render headless to sensible PNGs."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import torch

from crossent.calibration import compare_reliability_diagrams, ece, reliability_diagram


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


def test_compare_aggregate_in_every_panel() -> None:
    p, y = data(seed=4)
    fig = compare_reliability_diagrams({"a": p, "b": p}, y, aggregate="mean over seeds")
    titles = [ax.get_title() for ax in fig.axes if ax.get_title()]
    assert len(titles) == 2 and all("mean over seeds" in t for t in titles)
