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
