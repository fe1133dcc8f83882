"""Time the input checks of the calibration metrics where they read the whole input: the
detection of logits against probabilities, and the half-precision tolerance on rows off one.

Run: ``python benchmarks/bench_checks.py [--n 200000] [--c 1000] [--rounds 3] [--src OTHER/src]``.

Cases, on one thread (``OMP_NUM_THREADS=1``), float32 (N, C):

- ``nll`` of logits with ``from_logits=None`` (the detection reads them) and with
  ``from_logits=True`` (it does not): the difference is the detection's cost;
- ``ece`` of probabilities rounded to bfloat16 and widened back to float32 (``.float()``), rows
  off one by up to ~3e-3, which get half precision's tolerance once every value is checked to
  be a half type's.

Each case in a fresh process per source tree: the median of ``--repeats`` calls and the rise of
the peak resident memory over the data's. With ``--src``, another checkout's ``src`` (an
earlier commit in a ``git worktree``) runs the same cases, interleaved round by round.
"""

from __future__ import annotations

import argparse

import torch

from _shared import in_tree, timed_in_process, tree_arguments, tree_header, tree_table

CASES = ("nll, from_logits=None", "nll, from_logits=True", "ece, bfloat16 values in float32")


def one(case: str, n: int, c: int, repeats: int) -> dict[str, float]:
    """Run ``case`` in this process."""
    from crossent import calibration as cal

    g = torch.Generator().manual_seed(0)
    y = torch.randint(0, c, (n,), generator=g)
    if case.startswith("nll"):
        x = torch.randn(n, c, generator=g) * 3.0
        kw = {"from_logits": True} if case.endswith("True") else {}
        return timed_in_process(lambda: cal.nll(x, y, **kw), repeats)  # type: ignore[arg-type]
    p = torch.softmax(torch.randn(n, c, generator=g) * 4.0, 1).bfloat16().float()
    return timed_in_process(lambda: cal.ece(p, y), repeats)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--n", type=int, default=200_000, help="rows")
    parser.add_argument("--c", type=int, default=1_000, help="classes")
    tree_arguments(parser, "calls", 3)
    args = parser.parse_args()
    tree_header(args, 1, "calls", f"{args.n:,} x {args.c:,} float32; ")

    def run(src: str, case: str) -> dict[str, float]:
        return in_tree(src, "bench_checks", f"one({case!r}, {args.n}, {args.c}, {args.repeats})", 1)

    tree_table(CASES, run, args.src, args.rounds, "case")


if __name__ == "__main__":
    main()
