"""Sigmoid focal loss forward+backward: crossent's fused node vs an eager torchvision-style
composition, at the detection shape N = 65,536, C = 80, fp32, on the CPU.

Time: median wall time of forward+backward over ``--repeats`` runs after warm-up.
Memory: peak extra CPU memory of one forward+backward (inputs excluded, the logits' gradient
included), from the profiler's allocation and free events, summed in time order; the method is
checked first on a lone ``torch.empty(N, C)``, which must read N*C*4 bytes.

Usage: python benchmarks/bench_binary.py [--repeats 9] [--threads 1,2] [--out PATH]
"""

from __future__ import annotations

import argparse
import os
import statistics
from collections.abc import Callable
from pathlib import Path

import torch

import crossent
from _shared import add_int_options, cpu_model, cpu_peak_bytes, eager_sigmoid_focal, interleaved_times
from crossent.backends import native

ALPHA, GAMMA = 0.25, 2.0


def eager_focal(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """torchvision.ops.sigmoid_focal_loss, op for op (reduction "mean")."""
    return eager_sigmoid_focal(x, t, ALPHA, GAMMA)


def crossent_focal(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    return crossent.sigmoid_focal_loss(x, t, alpha=ALPHA, gamma=GAMMA)


def crossent_focal_ops(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    return crossent.sigmoid_focal_loss(x, t, alpha=ALPHA, gamma=GAMMA, backend="torch")


def step(loss_fn: Callable, x: torch.Tensor, t: torch.Tensor) -> None:
    x.grad = None
    loss_fn(x, t).backward()


def interleaved_ms(fns: dict[str, Callable[[], None]], repeats: int, warmup: int = 2) -> list[float]:
    """Median wall time (ms) of each function after ``warmup`` rounds, the functions interleaved
    run by run in a shuffled order (``_shared.interleaved_times``)."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times = interleaved_times(fns, repeats, one_thread="--threads 1")
    return [statistics.median(ts) for ts in times.values()]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_int_options(ap, n=65_536, c=80, repeats=9)
    ap.add_argument(
        "--threads", type=lambda v: [int(k) for k in v.split(",")], default=[1, 2],
        help="comma-separated torch thread counts to time (default 1,2)",
    )
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "binary.md")
    args = ap.parse_args()
    N, C = args.n, args.c

    # The memory method, checked: a lone N x C fp32 buffer must read N*C*4 bytes.
    probe = cpu_peak_bytes(lambda: torch.empty(N, C))
    assert probe == N * C * 4, f"memory probe read {probe} bytes, expected {N * C * 4}"

    g = torch.Generator().manual_seed(0)
    x = (torch.randn(N, C, generator=g) * 2 - 3).requires_grad_(True)  # mostly negatives
    t = (torch.rand(N, C, generator=g) < 0.02).float()  # ~2% positives, as in detection

    # Same loss and gradient first.
    step(crossent_focal, x, t)
    g_ce = x.grad.clone()
    step(eager_focal, x, t)
    torch.testing.assert_close(g_ce, x.grad, rtol=1e-4, atol=1e-9)
    x.grad = None

    impls = (
        ("eager (torchvision-style)", eager_focal),
        ("crossent", crossent_focal),
        ("crossent, torch-op path", crossent_focal_ops),
    )
    peaks = {}
    for name, fn in impls:
        x.grad = None
        peaks[name] = cpu_peak_bytes(lambda fn=fn: step(fn, x, t))
    x.grad = None
    rows = []
    for threads in args.threads:
        torch.set_num_threads(threads)
        times = interleaved_ms({name: lambda fn=fn: step(fn, x, t) for name, fn in impls}, args.repeats)
        base_ms = times[0]
        for (name, _), ms in zip(impls, times, strict=True):
            peak = peaks[name]
            rows.append(
                f"| {name} | {threads} | {ms:.1f} | {base_ms / ms:.2f}x | {peak / 2**20:.1f} | "
                f"{peak / (N * C * 4):.2f} | {peak / peaks[impls[0][0]]:.2f} |"
            )
    lines = [
        f"### Sigmoid focal loss, forward+backward, N={N:,}, C={C}, fp32, CPU",
        "",
        f"Machine: {cpu_model()}, {os.cpu_count()} cores, native kernels: {native.describe()}, "
        f"torch {torch.__version__}. alpha={ALPHA}, gamma={GAMMA}, reduction mean, ~2% positives. "
        f"Median of {args.repeats} runs after 2 warm-ups, the implementations interleaved "
        "run by run in a shuffled order so that any background load hits them alike (the ratio "
        "is the figure to read). Peak "
        "memory: extra CPU bytes during one forward+backward (inputs excluded, the logits' "
        "gradient included), from the profiler's allocation/free events summed in time order "
        f"(the method reads exactly N*C*4 = {N * C * 4 / 2**20:.1f} MiB for a lone "
        "`torch.empty(N, C)`).",
        "",
        "| implementation | torch threads | time (ms) | speed-up | peak extra memory (MiB) | "
        "x logits size | vs eager |",
        "|---|---:|---:|---:|---:|---:|---:|",
        *rows,
        "",
    ]
    text = "\n".join(lines)
    print(text)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)


if __name__ == "__main__":
    main()
