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
import json
import os
import platform
import statistics
import subprocess
import sys

import numpy as np
import torch

from _shared import cpu_model

CASES = ("nll, from_logits=None", "nll, from_logits=True", "ece, bfloat16 values in float32")
HERE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "src")


def one(case: str, n: int, c: int, repeats: int) -> dict[str, float]:
    """Run ``case`` in this process."""
    import resource
    import time

    from crossent import calibration as cal

    g = torch.Generator().manual_seed(0)
    y = torch.randint(0, c, (n,), generator=g)
    if case.startswith("nll"):
        x = torch.randn(n, c, generator=g) * 3.0
        kw = {"from_logits": True} if case.endswith("True") else {}

        def call() -> float:
            return cal.nll(x, y, **kw)  # type: ignore[arg-type]
    else:
        x = torch.softmax(torch.randn(n, c, generator=g) * 4.0, 1).bfloat16().float()

        def call() -> float:
            return cal.ece(x, y)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        call()
        times.append(time.perf_counter() - t0)
    rise = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before
    return {"seconds": statistics.median(times), "rss_mib": rise / 1024.0}


def run(src: str, case: str, args: argparse.Namespace) -> dict[str, float]:
    """:func:`one` in a fresh process on one thread with ``src`` first on its path."""
    code = (f"import sys; sys.path[:0] = [{src!r}, {os.path.dirname(os.path.abspath(__file__))!r}];"
            f" import json, bench_checks as b;"
            f" print(json.dumps(b.one({case!r}, {args.n}, {args.c}, {args.repeats})))")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env)
    return json.loads(out.stdout.strip().splitlines()[-1])  # type: ignore[no-any-return]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--n", type=int, default=200_000, help="rows")
    parser.add_argument("--c", type=int, default=1_000, help="classes")
    parser.add_argument("--repeats", type=int, default=3, help="calls timed per process (median)")
    parser.add_argument("--rounds", type=int, default=3, help="processes per case and tree (median)")
    parser.add_argument("--src", default=None, help="another checkout's src folder to compare with")
    args = parser.parse_args()
    trees = [os.path.abspath(HERE)] + ([os.path.abspath(args.src)] if args.src else [])
    print(f"- CPU: {cpu_model()}, one thread of {os.cpu_count()} logical cores")
    print(f"- torch {torch.__version__}, numpy {np.__version__}, Python {platform.python_version()}")
    print(f"- {args.n:,} x {args.c:,} float32; medians of {args.repeats} calls a process, then of"
          f" {args.rounds} processes a case and tree")
    print()
    head, rule = "| case | this tree: s / peak RSS rise MiB |", "|---|---:|"
    if args.src:
        head += " other tree: s / MiB | this / other (time) |"
        rule += "---:|---:|"
    print(head)
    print(rule)
    for case in CASES:
        got: dict[str, list[dict[str, float]]] = {t: [] for t in trees}
        for _ in range(args.rounds):
            for tree in trees:
                got[tree].append(run(tree, case, args))
        cells = [(statistics.median(r["seconds"] for r in got[t]),
                  statistics.median(r["rss_mib"] for r in got[t])) for t in trees]
        row = f"| {case} | {cells[0][0]:.3f} / {cells[0][1]:.0f} |"
        if args.src:
            row += f" {cells[1][0]:.3f} / {cells[1][1]:.0f} | {cells[0][0] / cells[1][0]:.2f}x |"
        print(row, flush=True)


if __name__ == "__main__":
    main()
