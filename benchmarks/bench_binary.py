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
import platform
import random
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch._C._profiler import _EventType
from torch.profiler import ProfilerActivity, profile

import crossent
from crossent._cpu import native

ALPHA, GAMMA = 0.25, 2.0


def eager_focal(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """torchvision.ops.sigmoid_focal_loss, op for op (reduction "mean")."""
    p = torch.sigmoid(x)
    ce = F.binary_cross_entropy_with_logits(x, t, reduction="none")
    p_t = p * t + (1 - p) * (1 - t)
    loss = ce * ((1 - p_t) ** GAMMA)
    alpha_t = ALPHA * t + (1 - ALPHA) * (1 - t)
    loss = alpha_t * loss
    return loss.mean()


def crossent_focal(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    return crossent.sigmoid_focal_loss(x, t, alpha=ALPHA, gamma=GAMMA)


def crossent_focal_ops(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    return crossent.sigmoid_focal_loss(x, t, alpha=ALPHA, gamma=GAMMA, backend="torch")


def step(loss_fn: Callable, x: torch.Tensor, t: torch.Tensor) -> None:
    x.grad = None
    loss_fn(x, t).backward()


def peak_cpu_bytes(fn: Callable[[], None]) -> int:
    """Maximum of the running sum of CPU allocations minus frees while ``fn`` runs."""
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events: list[tuple[int, int]] = []

    def walk(e) -> None:
        if e.tag == _EventType.Allocation and str(e.extra_fields.device).startswith("cpu"):
            events.append((e.start_time_ns, e.extra_fields.alloc_size))
        for c in e.children:
            walk(c)

    for root in prof.profiler.kineto_results.experimental_event_tree():
        walk(root)
    running = peak = 0
    for _, size in sorted(events):
        running += size
        peak = max(peak, running)
    return peak


def interleaved_ms(fns: list[Callable[[], None]], repeats: int, warmup: int = 2) -> list[float]:
    """Median wall time (ms) of each function, the functions interleaved run by run (shuffled)."""
    for _ in range(warmup):
        for fn in fns:
            fn()
    times: list[list[float]] = [[] for _ in fns]
    order = random.Random(0)
    for _ in range(repeats):
        # a new order each round: no implementation always follows the same one
        for k, fn in order.sample(list(enumerate(fns)), len(fns)):
            t0 = time.perf_counter()
            fn()
            times[k].append(time.perf_counter() - t0)
    return [1e3 * statistics.median(ts) for ts in times]


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=65_536)
    ap.add_argument("--c", type=int, default=80)
    ap.add_argument("--repeats", type=int, default=9)
    ap.add_argument(
        "--threads", type=lambda v: [int(k) for k in v.split(",")], default=[1, 2],
        help="comma-separated torch thread counts to time (default 1,2)",
    )
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "binary.md")
    args = ap.parse_args()
    N, C = args.n, args.c

    # The memory method, checked: a lone N x C fp32 buffer must read N*C*4 bytes.
    probe = peak_cpu_bytes(lambda: torch.empty(N, C))
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
        peaks[name] = peak_cpu_bytes(lambda fn=fn: step(fn, x, t))
    x.grad = None
    rows = []
    for threads in args.threads:
        torch.set_num_threads(threads)
        times = interleaved_ms([lambda fn=fn: step(fn, x, t) for _, fn in impls], args.repeats)
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
