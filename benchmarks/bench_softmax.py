"""Issue-2 benchmark: the softmax family at N=2048, C=32,000 on the CPU, forward+backward.

Providers measured in the same run: crossent (CE, focal gamma 2, smoothing 0.1, bf16 CE; the
native kernel, and for CE also the torch-op path),
``F.cross_entropy`` eager, and the naive autograd focal loss (log_softmax, gather, pow).
Prints a markdown table and checks the floors of issues 2 and 6:

- crossent CE no slower than ``F.cross_entropy`` (issue 6: at least 2x faster);
- crossent focal and smoothing within 1.15x of crossent CE (issue 6: 1.1x);
- crossent focal at most half the peak memory of the naive focal;
- bf16 at least as fast as fp32 (issue 6).

Usage: python benchmarks/bench_softmax.py [--N 2048] [--C 32000] [--repeats 9]
"""

from __future__ import annotations

import argparse
import statistics

import torch
import torch.nn.functional as F

import crossent
from _shared import add_int_options, backward_steps, interleaved_times
from crossent.bench import machine_info, naive_loss, peak_extra_memory


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_int_options(p, N=2048, C=32000, repeats=15)
    args = p.parse_args()
    N, C = args.N, args.C
    gen = torch.Generator().manual_seed(0)
    x32 = torch.randn(N, C, generator=gen).requires_grad_()
    x16 = x32.detach().bfloat16().requires_grad_()
    y = torch.randint(0, C, (N,), generator=gen)

    cases = {
        "F.cross_entropy (eager)": (x32, lambda x: F.cross_entropy(x, y)),
        "naive focal gamma=2 (autograd)": (x32, lambda x: naive_loss(x, y, gamma=2.0)),
        "crossent CE": (x32, lambda x: crossent.cross_entropy(x, y)),
        "crossent CE, torch-op path": (x32, lambda x: crossent.cross_entropy(x, y, backend="torch")),
        "crossent focal gamma=2": (x32, lambda x: crossent.cross_entropy(x, y, gamma=2.0)),
        "crossent label smoothing 0.1": (x32, lambda x: crossent.cross_entropy(x, y, label_smoothing=0.1)),
        "crossent CE bf16": (x16, lambda x: crossent.cross_entropy(x, y)),
        "crossent focal bf16": (x16, lambda x: crossent.cross_entropy(x, y, gamma=2.0)),
    }
    # Interleave the cases round by round, in a new shuffled order each round: slow phases hit
    # all alike, and no case always follows the same one (F.cross_entropy frees 750 MiB, which
    # can slow the next case down).
    steps = backward_steps(cases)
    times = interleaved_times(steps, args.repeats)
    rows = {
        name: (statistics.median(times[name]), peak_extra_memory(step, "cpu"))
        for name, step in steps.items()
    }

    info = machine_info("cpu")
    print("machine: " + ", ".join(f"{k}={v}" for k, v in info.items()))
    print(f"shape: N={N}, C={C}, forward+backward, median of {args.repeats} interleaved rounds\n")
    print("| provider | fwd+bwd median (ms) | peak extra memory (MiB) | peak / (N x C x 4 B) |")
    print("|---|---:|---:|---:|")
    nc = N * C * 4
    for name, (t, mem) in rows.items():
        print(f"| {name} | {t:.1f} | {mem / 2**20:.0f} | {mem / nc:.2f} |")

    t = {k: v[0] for k, v in rows.items()}
    m = {k: v[1] for k, v in rows.items()}
    checks = [
        ("CE speed-up over F.cross_entropy (issue 2: >= 1, issue 6: >= 2)",
         t["F.cross_entropy (eager)"] / t["crossent CE"], 2.0, ">="),
        ("focal / CE time (issue 2: <= 1.15, issue 6: <= 1.1)",
         t["crossent focal gamma=2"] / t["crossent CE"], 1.1, "<="),
        ("smoothing / CE time (issue 2: <= 1.15, issue 6: <= 1.1)",
         t["crossent label smoothing 0.1"] / t["crossent CE"], 1.1, "<="),
        ("focal peak memory / naive focal (<= 0.5)",
         m["crossent focal gamma=2"] / m["naive focal gamma=2 (autograd)"], 0.5, "<="),
        ("bf16 / fp32 CE time (<= 1)", t["crossent CE bf16"] / t["crossent CE"], 1.0, "<="),
    ]
    print("\n| check | value | floor | holds |")
    print("|---|---:|---:|---|")
    for name, value, floor, op in checks:
        ok = value >= floor if op == ">=" else value <= floor
        print(f"| {name} | {value:.2f} | {op} {floor} | {'yes' if ok else 'NO'} |")


if __name__ == "__main__":
    main()
