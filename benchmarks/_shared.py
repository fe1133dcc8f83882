"""Pieces the benchmark scripts share: CPU peak memory from the profiler, interleaved timing, the
machine's CPU model, the eager sigmoid focal loss and integer options.

Timing is ``crossent bench``'s harness (:mod:`crossent.bench`): warm-up, rounds interleaved in a
new shuffled order each round, the machine's load measured over the same span; a busy machine
or a noisy case prints the same warnings as ``crossent bench`` (on stderr, so the scripts'
markdown tables on stdout stay clean).

The scripts run as ``python benchmarks/bench_*.py``, which puts this folder on ``sys.path``:
they import this module as ``_shared``.

CPU peak memory: ``torch.profiler.profile(profile_memory=True)`` records every allocation and
free of the CPU allocator as a ``[memory]`` event with a signed byte count; the events are
sorted by time and the peak is the maximum of their running sum (:func:`cpu_peak_bytes`).
:func:`validate_cpu_peak` checks the method on a lone ``torch.empty`` of known size.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Hashable, Sequence
from typing import TypeVar

import numpy as np
import torch
import torch.nn.functional as F

from crossent.bench import Clock, LoadMonitor, reliability_warnings, summarize
from crossent.bench import interleaved_times as _harness_times

K = TypeVar("K", bound=Hashable)


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def add_int_options(parser: argparse.ArgumentParser, **defaults: int) -> None:
    """One ``--NAME`` integer option per keyword, with its default (sizes, repeat counts)."""
    for name, default in defaults.items():
        parser.add_argument(f"--{name}", type=int, default=default)


# ------------------------------------------------------------------------------- memory


def cpu_peak_bytes(fn: Callable[[], object]) -> int:
    """Peak of the running sum of CPU allocator events during ``fn()`` (bytes)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    events.sort(key=lambda e: e.start_ns())
    cur = peak = 0
    for e in events:
        cur += e.nbytes()
        peak = max(peak, cur)
    return peak


def validate_cpu_peak(size: int = 64 << 20) -> None:
    """Raise unless :func:`cpu_peak_bytes` of a lone ``torch.empty`` of ``size`` bytes is ``size``."""

    def lone() -> None:
        x = torch.empty(size, dtype=torch.uint8)
        del x

    got = cpu_peak_bytes(lone)
    if got != size:
        raise RuntimeError(f"profiler memory method is off: torch.empty({size}) peaked at {got}")


# ------------------------------------------------------------------------------- timing


def backward_steps(
    cases: dict[str, tuple[torch.Tensor, Callable[[torch.Tensor], torch.Tensor]]],
) -> dict[str, Callable[[], None]]:
    """One forward+backward closure per case ``name: (leaf, loss_fn)`` (it clears the leaf's
    ``.grad``), each called once as its warm-up."""
    steps = {}
    for name, (x, fn) in cases.items():

        def step(x: torch.Tensor = x, fn: Callable[[torch.Tensor], torch.Tensor] = fn) -> None:
            fn(x).backward()
            x.grad = None

        steps[name] = step
        step()  # warm-up
    return steps


def interleaved_times(
    steps: dict[K, Callable[[], object]], repeats: int, *, device: str = "cpu", warmup: int = 1,
    before: Callable[[K], object] | None = None, flush_l2: bool = False, clock: Clock = "wall",
    one_thread: str = "OMP_NUM_THREADS=1",
) -> dict[K, list[float]]:
    """Times (ms) of every step over ``repeats`` rounds (:func:`crossent.bench.interleaved_times`:
    one warm-up call each, then the steps interleaved round by round in a new shuffled order each
    round, ``random.Random(0)``; on CUDA, CUDA events, with ``before`` and ``flush_l2`` untimed;
    on the CPU the wall clock or, ``clock="cpu"``, the process's CPU time).
    Warnings on the machine's load and on cases whose rounds spread more than 10% go to stderr,
    with ``one_thread``, how the script runs on one thread (a script with its own option names
    it; torch reads the variable in every script)."""
    with LoadMonitor() as monitor:
        times = _harness_times(steps, repeats, device=device, warmup=warmup, before=before,
                               flush_l2=flush_l2, clock=clock)
    spreads = {name: summarize(ts).spread for name, ts in times.items()}
    for line in reliability_warnings(spreads, monitor.result, one_thread=one_thread):
        print(f"warning: {line}", file=sys.stderr)
    return times


# ------------------------------------------------------------------- source trees compared

#: this checkout's ``src``
SRC = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "src")


def tree_arguments(parser: argparse.ArgumentParser, what: str, repeats: int) -> None:
    """The options of the scripts that compare source trees: ``--repeats`` (``what`` timed per
    process), ``--rounds`` and ``--src``."""
    parser.add_argument("--repeats", type=int, default=repeats, help=f"{what} timed per process (median)")
    parser.add_argument("--rounds", type=int, default=3, help="processes per case and tree (median)")
    parser.add_argument("--src", default=None, help="another checkout's src folder to compare with")


def tree_header(args: argparse.Namespace, threads: int, what: str, data: str = "") -> None:
    """The machine, the versions and what each cell of :func:`tree_table` is a median of."""
    cores = os.cpu_count()
    print(f"- CPU: {cpu_model()}, " + (f"one thread of {cores} logical cores" if threads == 1
                                       else f"{cores} logical cores, torch threads {threads}"))
    print(f"- torch {torch.__version__}, numpy {np.__version__}, Python {platform.python_version()}")
    print(f"- {data}medians of {args.repeats} {what} a process, then of {args.rounds} processes a case"
          " and tree")
    print()


def in_tree(src: str, module: str, call: str, threads: int) -> dict[str, float]:
    """``module.call`` (a call expression on a script of this folder, whose result is a dict of
    numbers) evaluated in a fresh process with ``src`` first on its path and ``threads``
    OpenMP threads: an earlier commit's ``src`` (a ``git worktree``) runs the same code as
    this one's, and one case's peak memory does not hide another's."""
    code = (f"import sys; sys.path[:0] = [{src!r}, {os.path.dirname(os.path.abspath(__file__))!r}];"
            f" import json, {module} as m; print(json.dumps(m.{call}))")
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env)
    return json.loads(out.stdout.strip().splitlines()[-1])  # type: ignore[no-any-return]


def tree_table(cases: Sequence[str], run: Callable[[str, str], dict[str, float]], other: str | None,
               rounds: int, first_column: str) -> None:
    """Print a markdown table of ``run(src, case)``'s ``seconds`` and ``rss_mib`` (medians over
    ``rounds``) for this checkout and, with ``other``, another checkout's ``src``, the two
    interleaved round by round, with the ratio of their times."""
    trees = [os.path.abspath(SRC)] + ([os.path.abspath(other)] if other else [])
    head, rule = f"| {first_column} | this tree: s / peak RSS rise MiB |", "|---|---:|"
    if other:
        head += " other tree: s / MiB | this / other (time) |"
        rule += "---:|---:|"
    print(head)
    print(rule)
    for case in cases:
        got: dict[str, list[dict[str, float]]] = {t: [] for t in trees}
        for _ in range(rounds):
            for tree in trees:
                got[tree].append(run(tree, case))
        cells = [(statistics.median(r["seconds"] for r in got[t]),
                  statistics.median(r["rss_mib"] for r in got[t])) for t in trees]
        row = f"| {case} | {cells[0][0]:.3f} / {cells[0][1]:.0f} |"
        if other:
            row += f" {cells[1][0]:.3f} / {cells[1][1]:.0f} | {cells[0][0] / cells[1][0]:.2f}x |"
        print(row, flush=True)


def timed_in_process(call: Callable[[], object], repeats: int) -> dict[str, float]:
    """The median time of ``repeats`` calls and the rise of the process's peak resident memory
    over what it held before them (MiB)."""
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        call()
        times.append(time.perf_counter() - t0)
    rise = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before
    return {"seconds": statistics.median(times), "rss_mib": rise / 1024.0}


# --------------------------------------------------------------------------------- losses


def eager_sigmoid_focal(x: torch.Tensor, t: torch.Tensor, alpha: float, gamma: float) -> torch.Tensor:
    """torchvision.ops.sigmoid_focal_loss, op for op (reduction "mean")."""
    p = torch.sigmoid(x)
    ce = F.binary_cross_entropy_with_logits(x, t, reduction="none")
    p_t = p * t + (1 - p) * (1 - t)
    loss = ce * ((1 - p_t) ** gamma)
    alpha_t = alpha * t + (1 - alpha) * (1 - t)
    return (alpha_t * loss).mean()
