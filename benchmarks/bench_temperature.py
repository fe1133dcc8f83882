"""Time ``TemperatureScaler.fit`` with the NLL and the ECE objectives, against another checkout.

Run: ``python benchmarks/bench_temperature.py [--rounds 3] [--src OTHER/src]``.

float32 logits of a model over-confident by T = 2.5 (labels drawn from the softmax of the
logits / 2.5). The ECE objective searches T (a coarse grid, a finer one, golden section, the
NLL fit, then a dense scan of 257 temperatures), the NLL objective takes Newton steps. Both
threads of the machine; a fresh process per case and source tree: the median of
``--repeats`` fits, the passes over the rows (``n_iter_``) and the rise of the peak resident
memory over the data's. With ``--src``, another checkout's ``src`` (an earlier commit in a
``git worktree``) runs the same cases, interleaved round by round.
"""

from __future__ import annotations

import argparse
import os
import warnings

import torch

from _shared import in_tree, timed_in_process, tree_arguments, tree_header, tree_table

CASES = tuple(f"{objective}, {n} x {c}" for n, c in ((100_000, 10), (20_000, 1_000))
              for objective in ("nll", "ece"))


def one(case: str, repeats: int) -> dict[str, float]:
    """Fit ``case`` (as :data:`CASES` names it) in this process."""
    from crossent import calibration as cal

    objective, rows, _, classes = case.replace(",", "").split()
    n, c = int(rows), int(classes)
    g = torch.Generator().manual_seed(0)
    z = torch.randn(n, c, generator=g) * 5.0
    y = torch.multinomial(torch.softmax(z / 2.5, 1), 1, generator=g)[:, 0]
    fitted: list[cal.TemperatureScaler] = []

    def fit() -> None:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            fitted.append(cal.TemperatureScaler().fit(z, y, objective=objective))

    out = timed_in_process(fit, repeats)
    return {**out, "passes": float(fitted[-1].n_iter_), "temperature": float(fitted[-1].temperature)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    tree_arguments(parser, "fits", 1)
    args = parser.parse_args()
    threads = torch.get_num_threads()
    tree_header(args, threads, "fits")
    fits: dict[tuple[str, str], dict[str, float]] = {}

    def run(src: str, case: str) -> dict[str, float]:
        fits[src, case] = in_tree(src, "bench_temperature", f"one({case!r}, {args.repeats})", threads)
        return fits[src, case]

    tree_table(CASES, run, args.src, args.rounds, "objective, rows x classes")
    print()
    for (src, case), got in fits.items():  # the last round's fits: the same in every round
        tree = "other tree" if args.src and src == os.path.abspath(args.src) else "this tree"
        print(f"- {case}, {tree}: T = {got['temperature']:.5f}, {got['passes']:.0f} passes")


if __name__ == "__main__":
    main()
