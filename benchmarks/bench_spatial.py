"""Segmentation-shaped logits (N, C, H, W) on the CPU, forward+backward: crossent's native
kernel (position-vectorised tiles for few classes) and its torch-op path against
``F.cross_entropy``, the cases interleaved round by round.

Usage: python benchmarks/bench_spatial.py [--shapes 16x21x128x128,8x150x64x64] [--repeats 9]
"""

from __future__ import annotations

import argparse
import statistics

import torch
import torch.nn.functional as F

import crossent
from _shared import backward_steps, interleaved_times
from crossent.bench import machine_info, peak_extra_memory


def run_shape(text: str, repeats: int) -> None:
    """Print the table rows of one N x C x H x W shape."""
    shape = tuple(int(v) for v in text.split("x"))
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(shape, generator=gen).requires_grad_()
    xb = x.detach().bfloat16().requires_grad_()
    y = torch.randint(0, shape[1], (shape[0], *shape[2:]), generator=gen)
    y.view(-1)[::17] = -100  # some ignored pixels, as in real masks
    cases = {
        "F.cross_entropy (eager)": (x, lambda x: F.cross_entropy(x, y)),
        "crossent CE": (x, lambda x: crossent.cross_entropy(x, y)),
        "crossent CE, torch-op path": (x, lambda x: crossent.cross_entropy(x, y, backend="torch")),
        "crossent label smoothing 0.1": (x, lambda x: crossent.cross_entropy(x, y, label_smoothing=0.1)),
        "crossent focal gamma=2": (x, lambda x: crossent.cross_entropy(x, y, gamma=2.0)),
        "crossent CE bf16": (xb, lambda x: crossent.cross_entropy(x, y)),
    }
    steps = backward_steps(cases)
    times = interleaved_times(steps, repeats)
    base = statistics.median(times["F.cross_entropy (eager)"])
    for name, step in steps.items():
        t = statistics.median(times[name])
        mem = peak_extra_memory(step, "cpu")
        mib = "" if mem is None else f"{mem / 2**20:.0f}"
        print(f"| {text} | {name} | {t:.1f} | {base / t:.2f}x | {mib} |")



def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shapes", default="16x21x128x128,8x150x64x64,4x19x256x256")
    p.add_argument("--repeats", type=int, default=9)
    args = p.parse_args()
    info = machine_info("cpu")
    print("machine: " + ", ".join(f"{k}={v}" for k, v in info.items()))
    print(f"forward+backward, median of {args.repeats} interleaved rounds; mean reduction\n")
    print("| N x C x H x W | provider | fwd+bwd (ms) | vs F.cross_entropy | peak extra (MiB) |")
    print("|---|---|---:|---:|---:|")
    for text in args.shapes.split(","):
        run_shape(text, args.repeats)

if __name__ == "__main__":
    main()
