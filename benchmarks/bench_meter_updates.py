"""Time a classwise ``CalibrationMeter`` fed the same rows in small and in large updates.

Run: ``python benchmarks/bench_meter_updates.py [--c 10000] [--bins 100] [--rounds 3] [--src OTHER/src]``.

80,000 rows of float32 logits over ``--c`` classes, ``--bins`` width bins, the default meter
(classwise sums on): in 10,000 updates of 8 rows, in 40 of 2,000, and in one, then
``compute()``. The classwise sums are 2 C M numbers however few rows an update holds. One
thread; a fresh process per case and source tree: the median of ``--repeats`` runs, and the
rise of the peak resident memory over the data's. With ``--src``, another checkout's ``src``
(an earlier commit in a ``git worktree``) runs the same cases, interleaved round by round.
"""

from __future__ import annotations

import argparse

import torch

from _shared import in_tree, timed_in_process, tree_arguments, tree_header, tree_table

CASES = ("10,000 updates of 8 rows", "40 updates of 2,000 rows", "1 update of 80,000 rows")


def one(case: str, c: int, bins: int, repeats: int) -> dict[str, float]:
    """Feed the meter as ``case`` says, in this process."""
    from crossent import calibration as cal

    g = torch.Generator().manual_seed(0)
    n = 80_000
    z = torch.randn(n, c, generator=g) * 3.0
    y = torch.randint(0, c, (n,), generator=g)
    step = n // int(case.split()[0].replace(",", ""))

    def run() -> None:
        meter = cal.CalibrationMeter(n_bins=bins, from_logits=True)
        for start in range(0, n, step):
            meter.update(z[start : start + step], y[start : start + step])
        meter.compute()

    return timed_in_process(run, repeats)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--c", type=int, default=10_000, help="classes")
    parser.add_argument("--bins", type=int, default=100, help="width bins")
    tree_arguments(parser, "runs", 1)
    args = parser.parse_args()
    tree_header(args, 1, "runs", f"80,000 x {args.c:,} float32 logits, {args.bins} bins; ")

    def run(src: str, case: str) -> dict[str, float]:
        return in_tree(src, "bench_meter_updates", f"one({case!r}, {args.c}, {args.bins}, {args.repeats})", 1)

    tree_table(CASES, run, args.src, args.rounds, "updates")


if __name__ == "__main__":
    main()
