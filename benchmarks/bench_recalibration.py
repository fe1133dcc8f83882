"""Time the matrix and Dirichlet scaling fits, Newton's method against L-BFGS, and say how close
each gets to the optimum of the ODIR objective.

Run: ``python benchmarks/bench_recalibration.py [--repeats 3] [--scale 1 10]``.

:class:`~crossent.calibration.MatrixScaler` and :class:`~crossent.calibration.DirichletCalibrator`
take Newton steps with the exact Hessian up to ``NEWTON_MAX_PARAMS`` parameters and
``NEWTON_MAX_WORK`` multiply-adds a Hessian, L-BFGS beyond. This script fits each size twice,
as shipped and with L-BFGS forced (``NEWTON_MAX_PARAMS = 0``), on logits of a model whose
labels its argmax gets right about as often as a trained one's, times ``--scale`` (10: an
overconfident model, whose log-probabilities L-BFGS crawls on). Per fit: the median time of
``--repeats`` fits on one thread, the objective above the better of the two fits, and the
largest entry of the objective's gradient at the fit (0 at the optimum: the objective is
convex). Prints a markdown table with the machine it ran on.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time
import warnings

import numpy as np
import torch
import torch.nn.functional as F

from _shared import cpu_model
from crossent.calibration import CalibrationWarning, DirichletCalibrator, MatrixScaler, recalibration

SIZES = ((50_000, 10), (20_000, 20), (5_000, 40))


def data(n: int, c: int, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    y = torch.randint(0, c, (n,), generator=g)
    z = torch.randn(n, c, generator=g, dtype=torch.float64)
    z[torch.arange(n), y] += 1.5
    return z * scale, y


def objective(
    method: type[MatrixScaler], z: torch.Tensor, y: torch.Tensor, fit: MatrixScaler
) -> tuple[float, float]:
    """The ODIR objective of ``fit`` (the class docstring's formula, written out) and the
    largest entry of its gradient."""
    x = torch.log_softmax(z, 1) if method is DirichletCalibrator else z
    k = z.shape[1]
    w = torch.from_numpy(fit.weight).requires_grad_(True)  # type: ignore[arg-type]
    b = torch.from_numpy(fit.bias).requires_grad_(True)  # type: ignore[arg-type]
    off = w - torch.diag(torch.diagonal(w))
    value = (F.cross_entropy(x @ w.T + b, y) + fit.reg_off_diagonal * off.square().sum() / (k * (k - 1))
             + fit.reg_bias * b.square().sum() / k)
    gw, gb = torch.autograd.grad(value, [w, b])
    return float(value.detach()), max(float(gw.abs().max()), float(gb.abs().max()))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repeats", type=int, default=3, help="fits timed per cell (median)")
    parser.add_argument("--scale", type=float, nargs="+", default=[1.0, 10.0], help="logit scales")
    args = parser.parse_args()
    torch.set_num_threads(1)
    shipped_limit = recalibration.NEWTON_MAX_PARAMS
    rows = []
    for method in (MatrixScaler, DirichletCalibrator):
        for scale in args.scale:
            for n, c in SIZES:
                z, y = data(n, c, scale)
                cells = {}
                for solver, limit in (("shipped", shipped_limit), ("L-BFGS", 0)):
                    recalibration.NEWTON_MAX_PARAMS = limit
                    times = []
                    for _ in range(args.repeats):
                        t0 = time.perf_counter()
                        with warnings.catch_warnings():
                            warnings.simplefilter("ignore", CalibrationWarning)
                            fit = method().fit(z, y)
                        times.append(time.perf_counter() - t0)
                    cells[solver] = (statistics.median(times), *objective(method, z, y, fit))
                recalibration.NEWTON_MAX_PARAMS = shipped_limit
                p = c * (c + 1)
                newton = n * p**2 <= recalibration.NEWTON_MAX_WORK and p <= shipped_limit
                best = min(v for _, v, _ in cells.values())
                rows.append((method.__name__, scale, n, c, "Newton" if newton else "L-BFGS", cells, best))
    print(f"### Matrix and Dirichlet scaling fits (median of {args.repeats}, one thread)")
    print()
    print(f"- CPU: {cpu_model()}, {os.cpu_count()} logical cores visible")
    print(f"- torch {torch.__version__}, numpy {np.__version__}, Python {platform.python_version()}")
    print()
    print("| method | logit scale | N x C | shipped solver | shipped: s / above best / max gradient |"
          " L-BFGS: s / above best / max gradient |")
    print("|---|---:|---|---|---|---|")
    for name, scale, n, c, solver, cells, best in rows:
        parts = [f"{t:.2f} / {v - best:.1e} / {g:.1e}" for t, v, g in (cells["shipped"], cells["L-BFGS"])]
        print(f"| {name} | {scale:g} | {n:,} x {c} | {solver} | {parts[0]} | {parts[1]} |")


if __name__ == "__main__":
    main()
