"""Time ``ece``, the streaming ``CalibrationMeter`` and ``TemperatureScaler.fit`` on
1,000,000 x 1,000 float32 logits.

Run: ``python benchmarks/bench_calibration.py [--n 1000000] [--c 1000] [--repeats 5]``.
Prints a markdown table with the machine it ran on. The one-shot ``ece`` and the meter
(``update`` over batches of ``--batch`` rows, then ``compute``) are timed in interleaved rounds
(:func:`_shared.interleaved_times`: a new shuffled order every round), so a busy phase of a
shared machine hits both alike; the table gives the medians and the median of the per-round
ratios. The meters are made as users make them, ``from_logits`` detected on the first batch.
The default meter (classwise bins on, every one of the N C probabilities binned) is
timed in the same rounds, beside the one-shot ``ece`` + ``classwise_ece`` it replaces. Needs
about 4.5 GB of memory for the default size (the logits, turned into
probabilities in place for the last rows). A second table times the meter as an evaluation
loop feeds it, 200 batches of 256 x 1,000 and of 64 x 10 (:func:`small_batches`).
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

from _shared import add_int_options, cpu_model, interleaved_times
from crossent.bench import Clock
from crossent.calibration import CalibrationMeter, TemperatureScaler, classwise_ece, ece


def meter_run(x: np.ndarray, y: np.ndarray, batch: int, *, classwise: bool) -> float:
    """The meter as users make it: ``from_logits`` left to the detection on the first batch."""
    m = CalibrationMeter(classwise=classwise)
    for start in range(0, x.shape[0], batch):
        m.update(x[start : start + batch], y[start : start + batch])
    return m.compute()["ece"]


def compare(
    label: str, x: np.ndarray, y: np.ndarray, batch: int, repeats: int, from_logits: bool,
    clock: Clock = "wall",
) -> list[tuple[str, float, str]]:
    """Interleaved rounds of the one-shot ``ece``, the meter without and with classwise bins,
    and the one-shot ``ece`` + ``classwise_ece`` (what the default meter computes besides)."""
    kw = {"from_logits": from_logits}
    want = ece(x, y, **kw)  # type: ignore[arg-type]
    want_cw = classwise_ece(x, y, **kw)  # type: ignore[arg-type]
    steps = {
        "ece": lambda: ece(x, y, **kw),  # type: ignore[arg-type]
        "meter": lambda: meter_run(x, y, batch, classwise=False),
        "meter+classwise": lambda: meter_run(x, y, batch, classwise=True),
        "ece+classwise_ece": lambda: (ece(x, y, **kw), classwise_ece(x, y, **kw)),  # type: ignore[arg-type]
    }
    times = interleaved_times(steps, repeats, clock=clock)
    med = {k: statistics.median(v) / 1e3 for k, v in times.items()}

    def ratio(a: str, b: str) -> float:
        return statistics.median(u / v for u, v in zip(times[a], times[b], strict=True))

    for classwise in (False, True):  # same bins, sums to round-off
        m = CalibrationMeter(classwise=classwise)
        for start in range(0, x.shape[0], batch):
            m.update(x[start : start + batch], y[start : start + batch])
        assert m.from_logits is from_logits
        got = m.compute()
        assert abs(got["ece"] - want) <= 1e-12, (got, want)
        if classwise:
            assert abs(got["classwise_ece"] - want_cw) <= 1e-12 * max(1.0, want_cw), (got, want_cw)
    nb = -(-x.shape[0] // batch)
    flag = ", from_logits=True" if from_logits else ""
    return [
        (f"`ece({label}, labels{flag})`", med["ece"], f"ECE = {want:.4f}"),
        (f"`CalibrationMeter(classwise=False)`: {nb} updates + compute", med["meter"],
         f"**{ratio('meter', 'ece'):.2f}x** the one-shot `ece`; same ECE to 1e-12; also NLL, Brier,"
         " accuracy"),
        (f"`CalibrationMeter()` (default, classwise on): {nb} updates + compute", med["meter+classwise"],
         f"**{ratio('meter+classwise', 'ece'):.2f}x** the one-shot `ece`, "
         f"{ratio('meter+classwise', 'ece+classwise_ece'):.2f}x `ece` + `classwise_ece`; bins all"
         f" {x.shape[0] * x.shape[1]:,} probabilities; same classwise ECE to 1e-12"),
        (f"`ece(...)` + `classwise_ece({label}, labels{flag})`", med["ece+classwise_ece"],
         f"classwise ECE = {want_cw:.5f}"),
    ]


def small_batches(repeats: int, clock: Clock = "wall") -> list[tuple[str, float, str]]:
    """An evaluation loop's batches: the default meter over 200 batches of 256 x 1,000 and of
    64 x 10 logits or probabilities, against the one-shot ``ece`` on the same rows and, where it
    is installed, torchmetrics' ``MulticlassCalibrationError`` (15 width bins; it keeps every
    confidence and bins them in ``compute``), in the same interleaved rounds."""
    try:
        from torchmetrics.classification import MulticlassCalibrationError as metric
    except ImportError:
        metric = None  # type: ignore[assignment,misc]
    out = []
    gen = torch.Generator().manual_seed(1)
    for batch, c in ((256, 1_000), (64, 10)):
        n = 200 * batch
        z = torch.randn((n, c), generator=gen) * 3.0
        y = torch.randint(0, c, (n,), generator=gen)
        for label, x, from_logits in (("logits", z, True), ("probs", torch.softmax(z, 1), False)):
            parts = [(x[s : s + batch], y[s : s + batch]) for s in range(0, n, batch)]

            def meter(parts: list[tuple[torch.Tensor, torch.Tensor]] = parts) -> float:
                m = CalibrationMeter()
                for xb, yb in parts:
                    m.update(xb, yb)
                return m.compute()["ece"]

            def one_shot(x: torch.Tensor = x, y: torch.Tensor = y, fl: bool = from_logits) -> float:
                return ece(x, y, from_logits=fl)

            steps: dict[str, Callable[[], object]] = {"ece": one_shot, "meter": meter}
            if metric is not None:
                def torchmetrics_run(parts: list[tuple[torch.Tensor, torch.Tensor]] = parts,
                                     c: int = c) -> float:
                    m = metric(num_classes=c, n_bins=15)  # softmaxes rows not in [0, 1]
                    for xb, yb in parts:
                        m.update(xb, yb)
                    return float(m.compute())

                steps["torchmetrics"] = torchmetrics_run
            times = interleaved_times(steps, repeats, clock=clock)
            med = {k: statistics.median(v) / 1e3 for k, v in times.items()}

            def ratio(a: str, b: str, times: dict[str, list[float]] = times) -> float:
                return statistics.median(u / v for u, v in zip(times[a], times[b], strict=True))

            shape = f"200 batches of {batch} x {c:,} {label}"
            note = f"**{ratio('meter', 'ece'):.2f}x** the one-shot `ece`"
            if "torchmetrics" in med:
                note += f", {ratio('meter', 'torchmetrics'):.2f}x torchmetrics"
                out.append((f"torchmetrics `MulticlassCalibrationError`: {shape}", med["torchmetrics"], ""))
            out.append((f"`ece` on the same rows at once: {shape}", med["ece"], ""))
            out.append((f"`CalibrationMeter()`: {shape}", med["meter"], note))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    add_int_options(parser, n=1_000_000, c=1_000, repeats=5, batch=100_000, fit_repeats=1)
    parser.add_argument(
        "--clock", choices=("wall", "cpu"), default="wall",
        help="time each call by the wall clock (default) or by the process's CPU time over all its"
        " threads, which leaves out what a hypervisor steals from a virtual machine's CPUs",
    )
    args = parser.parse_args()
    n, c = args.n, args.c
    clock: Clock = args.clock
    small = small_batches(args.repeats, clock)

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
    fit_times = []
    now = time.process_time if clock == "cpu" else time.perf_counter
    for _ in range(args.fit_repeats):
        t0 = now()
        scaler = TemperatureScaler().fit(logits_np, labels_np)
        fit_times.append(now() - t0)
    rows.append(
        (
            "`TemperatureScaler().fit(logits, labels)`",
            statistics.median(fit_times),
            f"T = {scaler.temperature:.4f} (true 2.5), {scaler.n_iter_} passes, fallback {scaler.fallback}",
        )
    )
    rows += compare("logits", logits_np, labels_np, args.batch, args.repeats, from_logits=True, clock=clock)
    for start in range(0, n, step):  # probabilities in place: no second 4 GB buffer
        torch.softmax(logits[start : start + step], 1, out=logits[start : start + step])
    rows += compare("probs", logits_np, labels_np, args.batch, args.repeats, from_logits=False, clock=clock)

    timed = "" if clock == "wall" else ", CPU time of all threads"
    print(f"### Calibration: {n:,} samples x {c:,} classes, float32 (medians of {args.repeats}"
          f" interleaved rounds{timed})")
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
    print()
    print(f"### Calibration in small batches (medians of {args.repeats} interleaved rounds{timed})")
    print()
    print("| call | median time (ms) | meter against |")
    print("|---|---:|---|")
    for name, t, note in small:
        print(f"| {name} | {t * 1e3:.1f} | {note} |")


if __name__ == "__main__":
    main()
