"""Log the ECE of every epoch with a torchmetrics ``Metric`` built on ``CalibrationMeter``.

``CalibrationMetric`` keeps the meter's sufficient statistics (bin counts, per-bin sums of
confidence and correctness, classwise bins, NLL and Brier sums) as one torchmetrics state
with ``dist_reduce_fx="sum"``, so torchmetrics (or Lightning, which calls the same
``update``/``compute``/``reset``) syncs it across ranks like any other metric: the result is
``crossent.calibration.ece`` on all the epoch's predictions (to float64 round-off: the sums are
added per batch), without gathering them.

Run: ``python examples/calibration_callback.py [--epochs 5]`` (CPU, about 10 seconds). In
Lightning, call ``metric.update(logits, y)`` in ``validation_step`` and
``self.log_dict(metric.compute())`` then ``metric.reset()`` in ``on_validation_epoch_end``.
"""

from __future__ import annotations

import argparse

import torch
from torchmetrics import Metric

from crossent.calibration import CalibrationMeter


class CalibrationMetric(Metric):
    """ECE, classwise ECE, Brier, NLL and accuracy of logits (N, C) against labels (N,)."""

    full_state_update = False
    higher_is_better = False

    def __init__(self, num_classes: int, n_bins: int = 15, **kwargs: object) -> None:
        super().__init__(**kwargs)  # type: ignore[arg-type]
        self.meter = CalibrationMeter(n_bins, num_classes=num_classes, from_logits=True)
        size = self.meter.statistics().numel()
        self.add_state("stats", default=torch.zeros(size, dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, logits: torch.Tensor, labels: torch.Tensor) -> None:  # type: ignore[override]
        self.meter.reset()
        self.meter.update(logits, labels)
        self.stats += self.meter.statistics().to(self.stats.device)  # type: ignore[operator]

    def compute(self) -> dict[str, float]:  # type: ignore[override]
        self.meter.load_statistics(self.stats)  # type: ignore[arg-type]
        return self.meter.compute()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=5)
    args = parser.parse_args()
    torch.manual_seed(0)
    n, d, c = 4000, 20, 5
    x = torch.randn(n, d)
    y = (x[:, :c] + 0.8 * torch.randn(n, c)).argmax(1)
    x_val = torch.randn(1000, d)
    y_val = (x_val[:, :c] + 0.8 * torch.randn(1000, c)).argmax(1)
    model = torch.nn.Sequential(torch.nn.Linear(d, 64), torch.nn.ReLU(), torch.nn.Linear(64, c))
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    metric = CalibrationMetric(num_classes=c)
    for epoch in range(args.epochs):
        for i in range(0, n, 200):
            loss = torch.nn.functional.cross_entropy(model(x[i : i + 200]), y[i : i + 200])
            opt.zero_grad()
            loss.backward()
            opt.step()
        with torch.no_grad():
            for i in range(0, 1000, 128):  # validation in batches: the metric accumulates
                metric.update(model(x_val[i : i + 128]), y_val[i : i + 128])
        m = metric.compute()
        metric.reset()
        print(f"epoch {epoch + 1}: val ECE {100 * m['ece']:.2f}%  classwise {100 * m['classwise_ece']:.2f}%"
              f"  NLL {m['nll']:.4f}  accuracy {100 * m['accuracy']:.1f}%  (N = {int(m['count'])})")


if __name__ == "__main__":
    main()
