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
import json
import os
import platform
import statistics
import subprocess
import sys

import numpy as np
import torch

from _shared import cpu_model

METHODS = ("TemperatureScaler", "VectorScaler", "MatrixScaler", "DirichletCalibrator", "HistogramBinning",
           "IsotonicCalibrator", "EnsembleTemperatureScaler")
HERE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "src")


def one(method: str, n: int, c: int, repeats: int) -> dict[str, float]:
    """Fit ``method`` and time its transform in this process."""
    import resource
    import time
    import warnings

    from crossent import calibration as cal

    g = torch.Generator().manual_seed(0)
    z = torch.randn(n, c, generator=g) * 3.0
    y = torch.multinomial(torch.softmax(z, 1), 1, generator=g)[:, 0].numpy()
    x = z.numpy()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fitted = getattr(cal, method)(fallback_to_identity=False).fit(x[:2000], y[:2000])
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        p = fitted.transform(x)
        times.append(time.perf_counter() - t0)
        assert p.shape == (n, c) and p.dtype == np.float32
        del p
    rise = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before
    return {"seconds": statistics.median(times), "rss_mib": rise / 1024.0}


def run(src: str, method: str, args: argparse.Namespace) -> dict[str, float]:
    """:func:`one` in a fresh process with ``src`` first on its path."""
    code = (f"import sys; sys.path[:0] = [{src!r}, {os.path.dirname(os.path.abspath(__file__))!r}];"
            f" import json, bench_transform as b;"
            f" print(json.dumps(b.one({method!r}, {args.n}, {args.c}, {args.repeats})))")
    env = {**os.environ, "OMP_NUM_THREADS": str(torch.get_num_threads())}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env)
    return json.loads(out.stdout.strip().splitlines()[-1])  # type: ignore[no-any-return]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--n", type=int, default=50_000, help="rows transformed")
    parser.add_argument("--c", type=int, default=1_000, help="classes")
    parser.add_argument("--repeats", type=int, default=5, help="transforms timed per process (median)")
    parser.add_argument("--rounds", type=int, default=3, help="processes per method and tree (median)")
    parser.add_argument("--src", default=None, help="another checkout's src folder to compare with")
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    args = parser.parse_args()
    trees = [os.path.abspath(HERE)] + ([os.path.abspath(args.src)] if args.src else [])
    print(f"- CPU: {cpu_model()}, {os.cpu_count()} logical cores, torch threads {torch.get_num_threads()}")
    print(f"- torch {torch.__version__}, numpy {np.__version__}, Python {platform.python_version()}")
    print(f"- {args.n:,} x {args.c:,} float32 logits; medians of {args.repeats} transforms a process,"
          f" then of {args.rounds} processes a method and tree")
    print()
    head = "| method | this tree: s / peak RSS rise MiB |"
    rule = "|---|---:|"
    if args.src:
        head += " other tree: s / MiB | this / other (time) |"
        rule += "---:|---:|"
    print(head)
    print(rule)
    for method in args.methods:
        got: dict[str, list[dict[str, float]]] = {t: [] for t in trees}
        for _ in range(args.rounds):
            for tree in trees:
                got[tree].append(run(tree, method, args))
        cells = []
        for tree in trees:
            s = statistics.median(r["seconds"] for r in got[tree])
            m = statistics.median(r["rss_mib"] for r in got[tree])
            cells.append((s, m))
        row = f"| {method} | {cells[0][0]:.3f} / {cells[0][1]:.0f} |"
        if args.src:
            row += f" {cells[1][0]:.3f} / {cells[1][1]:.0f} | {cells[0][0] / cells[1][0]:.2f}x |"
        print(row, flush=True)


if __name__ == "__main__":
    main()
