"""Time the matrix and Dirichlet scaling fits that take Newton steps, against another checkout.

Run: ``python benchmarks/bench_newton.py [--rounds 3] [--src OTHER/src]``.

The sizes Newton's method takes (``NEWTON_MAX_PARAMS`` and ``NEWTON_MAX_WORK`` in
``crossent/calibration/recalibration.py``), up to the largest: C = 44 classes (1,980
parameters) at N = 2,550 rows, 1e10 multiply-adds a Hessian. Logits with the label's raised
by 1.5, times the logit scale (10: an overconfident model), as in ``bench_recalibration.py``.
One thread; a fresh process per case and source tree: the median of ``--repeats`` fits, and
the rise of the peak resident memory over the data's. With ``--src``, another checkout's
``src`` (an earlier commit in a ``git worktree``) fits the same cases, interleaved round by
round, with the ratio of the two times.
"""

from __future__ import annotations

import argparse
import warnings

import torch

from _shared import in_tree, timed_in_process, tree_arguments, tree_header, tree_table

CASES = tuple(f"{m} {n} x {c}, scale {s}" for m in ("MatrixScaler", "DirichletCalibrator")
              for n, c, s in ((50_000, 10, 10), (20_000, 20, 1), (5_000, 30, 10), (2_550, 44, 1)))


def one(case: str, repeats: int) -> dict[str, float]:
    """Fit ``case`` (as :data:`CASES` names it) in this process."""
    from crossent import calibration as cal

    method, rows, _, classes, _, scale = case.replace(",", "").split()
    n, c = int(rows), int(classes)
    g = torch.Generator().manual_seed(0)
    y = torch.randint(0, c, (n,), generator=g)
    z = torch.randn(n, c, generator=g, dtype=torch.float64)
    z[torch.arange(n), y] += 1.5
    z *= float(scale)

    def fit() -> None:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            getattr(cal, method)().fit(z, y)

    return timed_in_process(fit, repeats)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    tree_arguments(parser, "fits", 3)
    args = parser.parse_args()
    tree_header(args, 1, "fits")

    def run(src: str, case: str) -> dict[str, float]:
        return in_tree(src, "bench_newton", f"one({case!r}, {args.repeats})", 1)

    tree_table(CASES, run, args.src, args.rounds, "fit")


if __name__ == "__main__":
    main()
