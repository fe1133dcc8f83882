"""Time ``ece`` and ``TemperatureScaler.fit`` on 1,000,000 x 1,000 float32 logits.

Run: ``python benchmarks/bench_calibration.py [--n 1000000] [--c 1000] [--repeats 3]``.
Prints a markdown table (medians of the repeats) with the machine it ran on. Needs about
4.5 GB of memory for the default size (the logits, turned into probabilities in place).
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time
from collections.abc import Callable

import numpy as np
import torch

from _shared import add_int_options, cpu_model
from crossent.calibration import TemperatureScaler, ece


def median_time(fn: Callable[[], object], repeats: int) -> tuple[float, object]:
    times, out = [], None
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    add_int_options(parser, n=1_000_000, c=1_000, repeats=3)
    args = parser.parse_args()
    n, c = args.n, args.c

    gen = torch.Generator().manual_seed(0)
    logits = torch.empty((n, c), dtype=torch.float32)
    labels = torch.empty(n, dtype=torch.int64)
    step = max(1, (1 << 22) // c)
    for start in range(0, n, step):  # calibrated logits times T = 2.5, built in chunks
        stop = min(n, start + step)
        z = torch.randn((stop - start, c), generator=gen) * 2.0
        labels[start:stop] = torch.multinomial(torch.softmax(z, 1), 1, generator=gen)[:, 0]
        logits[start:stop] = z * 2.5
    logits_np, labels_np = logits.numpy(), labels.numpy()

    rows = []
    t_fit, scaler = median_time(lambda: TemperatureScaler().fit(logits_np, labels_np), args.repeats)
    assert isinstance(scaler, TemperatureScaler)
    rows.append(
        (
            "`TemperatureScaler().fit(logits, labels)`",
            t_fit,
            f"T = {scaler.temperature:.4f} (true 2.5), {scaler.n_iter_} passes",
        )
    )
    t_ece_l, v = median_time(lambda: ece(logits_np, labels_np, from_logits=True), args.repeats)
    rows.append(("`ece(logits, labels, from_logits=True)`", t_ece_l, f"ECE = {v:.4f}"))
    for start in range(0, n, step):  # probabilities in place: no second 4 GB buffer
        torch.softmax(logits[start : start + step], 1, out=logits[start : start + step])
    t_ece_p, v = median_time(lambda: ece(logits_np, labels_np), args.repeats)
    rows.append(("`ece(probs, labels)` (includes the row checks)", t_ece_p, f"ECE = {v:.4f}"))

    print(f"### Calibration: {n:,} samples x {c:,} classes, float32 (median of {args.repeats})")
    print()
    print(
        f"- CPU: {cpu_model()}, {os.cpu_count()} logical cores visible, "
        f"torch threads {torch.get_num_threads()}"
    )
    print(
        f"- torch {torch.__version__}, numpy {np.__version__}, Python {platform.python_version()}"
    )
    print()
    print("| call | median time (s) | result |")
    print("|---|---:|---|")
    for name, t, note in rows:
        print(f"| {name} | {t:.2f} | {note} |")


if __name__ == "__main__":
    main()
