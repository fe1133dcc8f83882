"""examples/calibration_callback.py: the torchmetrics adapter equals the one-shot metrics."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import pytest
import torch

from crossent import calibration as cal

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "calibration_callback.py"


def load() -> ModuleType:
    pytest.importorskip("torchmetrics")
    spec = importlib.util.spec_from_file_location("calibration_callback", EXAMPLE)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_metric_over_batches_equals_one_shot() -> None:
    example = load()
    g = torch.Generator().manual_seed(0)
    z = torch.randn(500, 4, generator=g, dtype=torch.float64) * 3
    y = torch.randint(0, 4, (500,), generator=g)
    metric = example.CalibrationMetric(num_classes=4, n_bins=10)
    for i in range(0, 500, 70):
        metric.update(z[i : i + 70], y[i : i + 70])
    got = metric.compute()
    assert got["count"] == 500
    assert got["ece"] == pytest.approx(cal.ece(z, y, n_bins=10, from_logits=True), rel=1e-12)
    want_cw = cal.classwise_ece(z, y, n_bins=10, from_logits=True)
    assert got["classwise_ece"] == pytest.approx(want_cw, rel=1e-12)
    assert got["nll"] == pytest.approx(cal.nll(z, y), rel=1e-12)
    metric.reset()
    metric.update(z[:10], y[:10])
    assert metric.compute()["count"] == 10


def test_example_runs(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    example = load()
    monkeypatch.setattr(sys, "argv", ["calibration_callback.py", "--epochs", "1"])
    example.main()
    out = capsys.readouterr().out
    assert out.startswith("epoch 1: val ECE ") and "(N = 1000)" in out
