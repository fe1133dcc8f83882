"""Time each multiclass recalibration method's ``transform`` and the memory it takes.

Run: ``python benchmarks/bench_transform.py [--n 50000] [--c 1000] [--rounds 3] [--src OTHER/src]``.

Every method is fitted on the first 2,000 rows of float32 logits (N, C) of standard deviation
3 with labels drawn from their softmax, then ``transform`` maps all N rows: the median of
``--repeats`` calls, and the rise of the process's peak resident memory over what the data and
the fit took (a fresh process per method and source tree, so that one method's peak does not
hide another's). With ``--src``, the same runs on another checkout's ``src`` (an earlier commit
in a ``git worktree``), interleaved with this one's round by round, and the ratio of the two.
Prints a markdown table with the machine it ran on.
"""

from __future__ import annotations

import argparse
import warnings

import numpy as np
import torch

from _shared import in_tree, timed_in_process, tree_arguments, tree_header, tree_table

METHODS = ("TemperatureScaler", "VectorScaler", "MatrixScaler", "DirichletCalibrator", "HistogramBinning",
           "IsotonicCalibrator", "EnsembleTemperatureScaler")


def one(method: str, n: int, c: int, repeats: int) -> dict[str, float]:
    """Fit ``method`` and time its transform in this process."""
    from crossent import calibration as cal

    g = torch.Generator().manual_seed(0)
    z = torch.randn(n, c, generator=g) * 3.0
    y = torch.multinomial(torch.softmax(z, 1), 1, generator=g)[:, 0].numpy()
    x = z.numpy()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fitted = getattr(cal, method)(fallback_to_identity=False).fit(x[:2000], y[:2000])
    assert fitted.transform(x[:3]).dtype == np.float32
    return timed_in_process(lambda: fitted.transform(x), repeats)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--n", type=int, default=50_000, help="rows transformed")
    parser.add_argument("--c", type=int, default=1_000, help="classes")
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    tree_arguments(parser, "transforms", 5)
    args = parser.parse_args()
    threads = torch.get_num_threads()
    tree_header(args, threads, "transforms", f"{args.n:,} x {args.c:,} float32 logits; ")

    def run(src: str, method: str) -> dict[str, float]:
        call = f"one({method!r}, {args.n}, {args.c}, {args.repeats})"
        return in_tree(src, "bench_transform", call, threads)

    tree_table(args.methods, run, args.src, args.rounds, "method")


if __name__ == "__main__":
    main()
