"""``crossent bench``: time and memory of crossent against PyTorch and friends.

Providers: ``crossent`` (on the CPU its native kernel); ``crossent-ops`` (crossent's torch-op
path, ``backend="torch"``); ``torch`` (eager ``F.cross_entropy``; for focal, the naive
composition below); ``naive`` (log_softmax, gather, pow: how focal / smoothing are usually
written); ``compile`` (``torch.compile`` of the torch provider); ``liger`` (Liger-Kernel's
cross entropy, CUDA only, when installed). Variants: ``ce``, ``focal`` (gamma 2), ``ls``
(smoothing 0.1).

Reports the median time of forward only and forward+backward over interleaved rounds in shuffled
order (after two warm-up calls), each with its spread (interquartile range in % of the median),
peak extra memory of one forward+backward, achieved bandwidth and its fraction of the floor; and
a ``warning:`` line when the machine's load during the run or a row's spread makes the ratios
unreliable (see :class:`LoadMonitor`, :func:`reliability_warnings`). The floor of a fused loss
is to read the logits once and write the gradient once: 2 x N x C x bytes (forward only:
N x C x bytes). Peak memory on the CPU is the kernel's high-water mark of resident memory
(VmHWM, reset through /proc/self/clear_refs) minus the resident memory before the call; on
CUDA it is ``torch.cuda.max_memory_allocated`` minus the allocation before the call.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import ctypes
import gc
import json
import math
import os
import platform
import random
import statistics
import sys
import time
from collections.abc import Callable, Hashable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path
from typing import Any, Literal, TypeVar

import torch
import torch.nn.functional as F

import crossent
from crossent._extras import MissingExtraError, require

__all__ = [
    "BenchResult",
    "LoadMonitor",
    "MachineLoad",
    "Timing",
    "add_arguments",
    "frozen_heap",
    "interleaved_times",
    "machine_info",
    "main",
    "peak_extra_memory",
    "reliability_warnings",
    "summarize",
    "text_table",
    "time_median",
]

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
#: a loss of (logits, target), as each provider is called
LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
K = TypeVar("K", bound=Hashable)
VARIANTS: dict[str, dict[str, Any]] = {"ce": {}, "focal": {"gamma": 2.0}, "ls": {"label_smoothing": 0.1}}
DEFAULT_SHAPES = {
    "cpu": "2048x32000,65536x80,65536x1000",
    "cuda": "65536x80,65536x1000,2048x32000,8192x32000,2048x128256,8192x128256",
}


@dataclass
class BenchResult:
    """One (provider, variant, shape, dtype) case: medians over the interleaved rounds, their
    interquartile range in % of the median, peak extra memory, bandwidth against the copy floor."""

    provider: str
    variant: str
    N: int
    C: int
    dtype: str
    device: str
    fwd_ms: float
    fwd_bwd_ms: float
    peak_extra_mib: float | None
    gb_per_s: float
    floor_fraction: float
    fwd_iqr_pct: float = 0.0  # interquartile range of the rounds, % of the median
    fwd_bwd_iqr_pct: float = 0.0


# ----------------------------------------------------------------------------- measuring
#
# The harness shared by ``crossent bench`` and the scripts in benchmarks/: every case is warmed up,
# then timed once per round, the cases in a new shuffled order each round; a case's figure is the
# median of its rounds with the interquartile range as its spread. The machine's load is measured
# over the same span, so a busy machine (another job, a shared CI runner) is reported beside the
# numbers instead of silently inflating them.

#: a row whose interquartile range exceeds this fraction of its median is flagged as noisy
SPREAD_LIMIT = 0.10
#: other processes busy on more than this fraction of the CPUs during a run make its figures suspect
BUSY_LIMIT = 0.25
#: a hypervisor taking more than this fraction of the CPUs (steal time) makes them suspect too
STEAL_LIMIT = 0.10


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()




#: bytes written between timed GPU calls to evict the L2 cache (50 MB on an H100, 60 MB on an H200)
L2_FLUSH_BYTES = 256 << 20


#: what a CPU call is timed by: the wall clock, or the CPU time of the process (every thread)
Clock = Literal["wall", "cpu"]


def _time_once(
    fn: Callable[[], object], device: str, flush: torch.Tensor | None, clock: Clock = "wall"
) -> float:
    """Milliseconds of one call: CUDA events around it on the GPU (after the optional L2 flush,
    which is outside the events); on the CPU the wall clock, or with ``clock="cpu"`` the CPU
    time of the process summed over its threads (``time.process_time``)."""
    if device != "cuda":
        now = time.process_time if clock == "cpu" else time.perf_counter
        t0 = now()
        fn()
        return (now() - t0) * 1e3
    if flush is not None:
        flush.zero_()
    start = torch.cuda.Event(enable_timing=True)
    end = torch.cuda.Event(enable_timing=True)
    start.record()
    fn()
    end.record()
    end.synchronize()
    return float(start.elapsed_time(end))


def time_median(fn: Callable[[], object], device: str, *, repeats: int = 7, warmup: int = 2) -> float:
    """Median time of ``fn`` in milliseconds, each call timed as in :func:`interleaved_times`
    (CUDA events on the GPU, the wall clock on the CPU)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        _sync(device)
        times.append(_time_once(fn, device, None))
    return statistics.median(times)


def interleaved_times(
    steps: Mapping[K, Callable[[], object]], repeats: int, *, device: str = "cpu", warmup: int = 1,
    seed: int = 0, before: Callable[[K], object] | None = None, flush_l2: bool = False, clock: Clock = "wall",
) -> dict[K, list[float]]:
    """Times (ms) of every step over ``repeats`` rounds.

    Each step first runs ``warmup`` times (caches, lazy initialisation, ``torch.compile``); then
    each round runs every step once, in a new shuffled order (``random.Random(seed)``): slow phases
    of the machine hit all steps alike, so the ratios between them are measured in the same run,
    and no step always follows the same one (one that frees much memory can slow the next down).

    ``before(name)``, when given, runs before every call of step ``name`` (warm-up included),
    untimed: restoring inputs that an in-place step overwrote, clearing gradients. On ``"cuda"``
    each call is timed by CUDA events, so the time is the device's; ``flush_l2=True`` also writes
    :data:`L2_FLUSH_BYTES` before each timed call, so that no step finds its inputs in the L2
    cache left warm by the step before it. On the CPU the time is the wall clock, or with
    ``clock="cpu"`` the process's CPU time over all its threads: on a virtual machine whose
    hypervisor steals much of its CPUs' time (:class:`MachineLoad` ``stolen``) it leaves the
    stolen time out, where the wall clock charges it to whichever step was running; it also
    leaves out time spent waiting (a thread blocked, a pool idle), so it measures work, not
    latency.
    """
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    if clock not in ("wall", "cpu"):
        raise ValueError(f"clock must be 'wall' or 'cpu', got {clock!r}")
    if clock == "cpu" and device == "cuda":
        raise ValueError("clock='cpu' times CPU work; CUDA steps are timed by CUDA events")
    items = list(steps.items())
    for name, step in items:
        for _ in range(warmup):
            if before is not None:
                before(name)
            step()
    _sync(device)
    flush = (
        torch.empty(L2_FLUSH_BYTES, dtype=torch.uint8, device="cuda")
        if flush_l2 and device == "cuda" else None
    )
    times: dict[K, list[float]] = {name: [] for name, _ in items}
    order = random.Random(seed)
    for _ in range(repeats):
        for name, step in order.sample(items, len(items)):
            if before is not None:
                before(name)
            _sync(device)
            times[name].append(_time_once(step, device, flush, clock))
    return times


@dataclass(frozen=True)
class Timing:
    """The rounds of one case: median, quartiles and extremes (ms)."""

    median_ms: float
    q1_ms: float
    q3_ms: float
    min_ms: float
    max_ms: float
    rounds: int

    @property
    def spread(self) -> float:
        """Interquartile range over the median (0.05 = the middle half of the rounds within 5%)."""
        return (self.q3_ms - self.q1_ms) / self.median_ms if self.median_ms > 0 else math.inf


def summarize(times_ms: Sequence[float]) -> Timing:
    """Median, quartiles (inclusive method) and extremes of the rounds of one case.

    >>> t = summarize([1.0, 2.0, 3.0, 4.0, 100.0])
    >>> (t.median_ms, t.q1_ms, t.q3_ms, t.max_ms)
    (3.0, 2.0, 4.0, 100.0)
    >>> round(t.spread, 3)
    0.667
    """
    if not times_ms:
        raise ValueError("summarize needs at least one time")
    ts = sorted(float(t) for t in times_ms)
    med = statistics.median(ts)
    q1, q3 = (med, med) if len(ts) < 2 else statistics.quantiles(ts, n=4, method="inclusive")[::2]
    return Timing(median_ms=med, q1_ms=q1, q3_ms=q3, min_ms=ts[0], max_ms=ts[-1], rounds=len(ts))


@dataclass(frozen=True)
class MachineLoad:
    """How busy the machine was around a measurement.

    ``loadavg`` is the 1-minute load average when the measurement started (runnable processes,
    averaged; a lagging figure). ``others_busy`` is the number of CPUs' worth of time that other
    processes used during the measurement: all busy CPU time in ``/proc/stat`` (steal excluded)
    minus this process's own (``os.times``), over the wall time. ``stolen`` is the CPUs' worth of
    time a hypervisor ran other guests on this virtual machine's CPUs while this one had work
    for them (``/proc/stat``'s steal time): on a shared VM it can inflate every time measured,
    unevenly from one round to the next. ``None`` where the system does not say.
    """

    cpus: int
    loadavg: float | None
    others_busy: float | None
    threads: int
    stolen: float | None = None

    def warnings(self) -> list[str]:
        """One line per reason the machine's load makes the timings unreliable."""
        out = []
        if self.others_busy is not None and self.others_busy > BUSY_LIMIT * self.cpus:
            out.append(
                f"other processes kept {self.others_busy:.1f} of {self.cpus} CPUs busy during the run "
                f"(this run used {self.threads} threads): the times are inflated and the ratios unreliable"
            )
        if self.stolen is not None and self.stolen > STEAL_LIMIT * self.cpus:
            out.append(
                f"the hypervisor took {self.stolen:.1f} of {self.cpus} CPUs during the run (steal time):"
                " the times are inflated, unevenly, and the ratios unreliable"
            )
        if self.loadavg is not None and self.loadavg > 0.5 * self.cpus:
            out.append(
                f"load average {self.loadavg:.2f} on {self.cpus} CPUs when the run started: the machine "
                "was busy"
            )
        return out


def parse_proc_stat(line: str) -> tuple[float, float] | None:
    """The busy and the stolen CPU time (seconds since boot) of the whole machine from the first
    line of ``/proc/stat`` ("cpu  user nice system idle iowait irq softirq steal ...", in clock
    ticks): busy is everything but idle, iowait and steal. ``None`` for another line."""
    fields = line.split()
    if not fields or fields[0] != "cpu" or len(fields) < 8:
        return None
    ticks = [int(v) for v in fields[1:9]]
    steal = ticks[7] if len(ticks) > 7 else 0
    busy = sum(ticks[:7]) - ticks[3] - ticks[4]
    hz = os.sysconf("SC_CLK_TCK")
    return busy / hz, steal / hz


def _cpu_seconds_all() -> tuple[float, float] | None:
    """:func:`parse_proc_stat` of this machine's ``/proc/stat``; ``None`` without one."""
    try:
        with open("/proc/stat") as f:
            return parse_proc_stat(f.readline())
    except OSError:
        return None


class LoadMonitor:
    """Measures :class:`MachineLoad` over a ``with`` block.

    >>> with LoadMonitor() as monitor:
    ...     _ = sum(range(1000))
    >>> monitor.result.cpus == os.cpu_count()
    True
    """

    def __init__(self) -> None:
        self.result: MachineLoad | None = None
        self._start: tuple[float, tuple[float, float] | None, float, float | None] | None = None

    def __enter__(self) -> LoadMonitor:
        try:
            loadavg: float | None = os.getloadavg()[0]
        except OSError:
            loadavg = None
        own = os.times()
        self._start = (time.monotonic(), _cpu_seconds_all(), own.user + own.system, loadavg)
        return self

    def __exit__(self, *exc: object) -> None:
        assert self._start is not None
        t0, busy0, own0, loadavg = self._start
        wall = time.monotonic() - t0
        busy1 = _cpu_seconds_all()
        own = os.times()
        others = stolen = None
        if busy0 is not None and busy1 is not None and wall > 0.05:
            others = max(0.0, (busy1[0] - busy0[0]) - (own.user + own.system - own0)) / wall
            stolen = max(0.0, busy1[1] - busy0[1]) / wall
        self.result = MachineLoad(
            cpus=os.cpu_count() or 1, loadavg=loadavg, others_busy=others, threads=torch.get_num_threads(),
            stolen=stolen,
        )


def reliability_warnings(
    spreads: Mapping[str, float], load: MachineLoad | None, *, one_thread: str = "--threads 1"
) -> list[str]:
    """The warnings to print beside a table measured under ``load``: the machine's load, and every
    row whose spread (interquartile range over median, :attr:`Timing.spread`) exceeds
    :data:`SPREAD_LIMIT` (ratios involving those rows are unreliable). ``one_thread`` is how the
    caller's command line runs on one thread (``crossent bench``'s option by default).

    >>> quiet = MachineLoad(cpus=8, loadavg=0.1, others_busy=0.0, threads=8)
    >>> reliability_warnings({"a": summarize([1.0, 1.01, 1.02]).spread}, quiet)
    []
    >>> busy = MachineLoad(cpus=2, loadavg=3.0, others_busy=1.9, threads=2)
    >>> len(reliability_warnings({"a": summarize([1.0, 2.0, 9.0]).spread}, busy))
    4
    """
    out = [] if load is None else list(load.warnings())
    noisy = [f"{name} (IQR {100 * spread:.0f}% of the median)" for name, spread in spreads.items()
             if not spread <= SPREAD_LIMIT]
    if noisy:
        out.append(
            f"{len(noisy)} row(s) spread more than {100 * SPREAD_LIMIT:.0f}% between rounds, "
            "their ratios are unreliable: " + "; ".join(noisy)
        )
    if out:
        out.append(f"for trustworthy numbers: an idle machine, more --repeats, or {one_thread}"
                   " on a shared one")
    return out


def _proc_status(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key):
                return int(line.split()[1]) * 1024
    raise OSError(f"{key} not in /proc/self/status")


@contextlib.contextmanager
def frozen_heap() -> Iterator[None]:
    """Within the block, leave the objects alive at its start out of every garbage collection
    (:func:`gc.freeze`), so that :func:`peak_extra_memory`'s ``gc.collect()`` looks only at what
    the measurements made: milliseconds, where a full collection with torch and
    ``torch._dynamo`` loaded takes about 0.2 s, once per measured case."""
    gc.collect()
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()


def peak_extra_memory(fn: Callable[[], object], device: str) -> float | None:
    """Peak memory (bytes) allocated by ``fn`` beyond what was resident before it."""
    gc.collect()
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        fn()
        torch.cuda.synchronize()
        return float(torch.cuda.max_memory_allocated() - base)
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)  # give freed heap pages back first
        base = _proc_status("VmRSS:")
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset the resident-set high-water mark (Linux >= 4.0)
        fn()
        return float(_proc_status("VmHWM:") - base)
    except OSError:
        return None


def machine_info(device: str) -> dict[str, str]:
    info = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "crossent": crossent.__version__,
        "threads": str(torch.get_num_threads()),
    }
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    info["cpu"] = cpu
    if device == "cpu":
        from crossent.backends import native

        info["native kernels"] = native.describe()
    info["cores"] = str(os.cpu_count())
    if device == "cuda":
        info["gpu"] = torch.cuda.get_device_name()
        info["cuda"] = str(torch.version.cuda)
        try:
            import triton

            info["triton"] = triton.__version__
        except ImportError:
            pass
    return info


# ------------------------------------------------------------------------------ providers


def naive_loss(
    x: torch.Tensor, y: torch.Tensor, gamma: float = 0.0, label_smoothing: float = 0.0
) -> torch.Tensor:
    """How focal loss and smoothing are usually written: an autograd graph of eager ops."""
    logp = F.log_softmax(x.float(), dim=1)
    logp_y = logp.gather(1, y[:, None]).squeeze(1)
    nll = -logp_y
    if gamma:
        nll = (1 - logp_y.exp()).pow(gamma) * nll
    if label_smoothing:
        nll = (1 - label_smoothing) * nll - label_smoothing * logp.mean(dim=1)
    return nll.mean()


def _provider(name: str, variant: dict[str, Any], device: str) -> LossFn | None:
    if name == "crossent":
        return lambda x, y: crossent.cross_entropy(x, y, **variant)
    if name == "crossent-ops":
        return lambda x, y: crossent.cross_entropy(x, y, backend="torch", **variant)
    if name == "torch":
        if "gamma" in variant:
            return lambda x, y: naive_loss(x, y, **variant)
        return lambda x, y: F.cross_entropy(x, y, **variant)
    if name == "naive":
        return lambda x, y: naive_loss(x, y, **variant)
    if name == "compile":
        base = _provider("torch", variant, device)
        assert base is not None
        compiled: LossFn = torch.compile(base, dynamic=False)
        return compiled
    if name == "liger":
        if device != "cuda" or "gamma" in variant:
            return None
        try:
            from liger_kernel.transformers import LigerCrossEntropyLoss
        except ImportError:
            return None
        mod = LigerCrossEntropyLoss(label_smoothing=variant.get("label_smoothing", 0.0))
        return lambda x, y: torch.as_tensor(mod(x, y))
    raise ValueError(
        f"unknown provider {name!r}: choose from crossent, crossent-ops, torch, naive, compile, liger"
    )


def _fwd_and_fwd_bwd(
    fn: LossFn, x: torch.Tensor, xg: torch.Tensor, y: torch.Tensor
) -> tuple[Callable[[], None], Callable[[], None]]:
    """The two timed steps of one case: a forward without autograd, and forward+backward on the
    leaf ``xg`` (its ``.grad`` cleared after each)."""

    def fwd() -> None:
        with torch.no_grad():
            fn(x, y)

    def fwd_bwd() -> None:
        fn(xg, y).backward()
        xg.grad = None

    return fwd, fwd_bwd


def run_shape(
    cases: list[tuple[str, str, str]], N: int, C: int, device: str, *, repeats: int, memory: bool,
    progress: Callable[[BenchResult], None] | None = None,
) -> list[BenchResult]:
    """Time every (provider, variant, dtype) case of one shape, interleaved round by round.

    Each round times every case once (forward only, then forward+backward), in a shuffled order,
    so slow phases of the machine hit all cases alike and the ratios between rows are measured in
    the same run.
    Inputs are shared per dtype; the copy floor is timed once per dtype.
    """
    gen = torch.Generator(device=device).manual_seed(0)
    base = torch.randn(N, C, device=device, generator=gen)
    y = torch.randint(0, C, (N,), device=device, generator=gen)
    inputs: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    steps: list[tuple[tuple[str, str, str], Callable[[], None], Callable[[], None]]] = []
    for provider, variant, dtype_name in cases:
        fn = _provider(provider, VARIANTS[variant], device)
        if fn is None:
            continue
        if dtype_name not in inputs:
            x = base.to(DTYPES[dtype_name])
            inputs[dtype_name] = (x, x.clone().requires_grad_(True))
        x, xg = inputs[dtype_name]
        steps.append(((provider, variant, dtype_name), *_fwd_and_fwd_bwd(fn, x, xg, y)))
    timed: dict[tuple[tuple[str, str, str], str], Callable[[], object]] = {}
    for key, fwd, fwd_bwd in steps:
        timed[key, "fwd"] = fwd
        timed[key, "fwd_bwd"] = fwd_bwd
    # warm-up twice (and compilation for torch.compile), then interleaved, shuffled rounds
    times = {k: summarize(v) for k, v in interleaved_times(timed, repeats, device=device, warmup=2).items()}
    copy_ms = {}
    for dtype_name, (x, _) in inputs.items():
        # The floor measured on this machine: one read of the logits and one write of an N x C
        # buffer is exactly a copy.
        out = torch.empty_like(x)
        copy_ms[dtype_name] = time_median(partial(out.copy_, x), device, repeats=repeats)
        del out
    results = []
    for key, _, fwd_bwd in steps:
        provider, variant, dtype_name = key
        t_fwd, t_fb = times[key, "fwd"], times[key, "fwd_bwd"]
        peak = peak_extra_memory(fwd_bwd, device) if memory else None
        floor_bytes = 2 * N * C * inputs[dtype_name][0].element_size()
        r = BenchResult(
            provider=provider, variant=variant, N=N, C=C, dtype=dtype_name, device=device,
            fwd_ms=round(t_fwd.median_ms, 3), fwd_bwd_ms=round(t_fb.median_ms, 3),
            peak_extra_mib=None if peak is None else round(peak / 2**20, 1),
            gb_per_s=round(floor_bytes / (t_fb.median_ms * 1e-3) / 1e9, 2),
            floor_fraction=round(copy_ms[dtype_name] / t_fb.median_ms, 3),
            fwd_iqr_pct=round(100 * t_fwd.spread, 1), fwd_bwd_iqr_pct=round(100 * t_fb.spread, 1),
        )
        results.append(r)
        if progress is not None:
            progress(r)
    return results


# ------------------------------------------------------------------------------- reports


def _ratio_columns(results: list[BenchResult]) -> list[tuple[str, str]]:
    """Per result: torch eager over this (forward+backward), and this over crossent plain CE of the
    same shape and dtype; a ratio involving a row whose spread exceeds :data:`SPREAD_LIMIT` ends in
    ``?``."""
    key = {(r.provider, r.variant, r.N, r.C, r.dtype): r for r in results}
    limit = 100 * SPREAD_LIMIT

    def ratio(a: BenchResult | None, b: BenchResult | None, fmt: str) -> str:
        if a is None or b is None:
            return ""
        unsure = a.fwd_bwd_iqr_pct > limit or b.fwd_bwd_iqr_pct > limit
        return format(a.fwd_bwd_ms / b.fwd_bwd_ms, fmt) + ("?" if unsure else "")

    return [
        (
            ratio(key.get(("torch", r.variant, r.N, r.C, r.dtype)), r, ".2f"),
            ratio(r, key.get(("crossent", "ce", r.N, r.C, r.dtype)), ".2f"),
        )
        for r in results
    ]


TABLE_HEAD = (
    "provider", "variant", "N x C", "dtype", "fwd ms", "IQR %", "fwd+bwd ms", "IQR %", "peak extra MiB",
    "GB/s", "copy floor / this", "torch / this", "this / crossent-ce",
)


def _table_rows(results: list[BenchResult]) -> list[list[str]]:
    return [
        [r.provider, r.variant, f"{r.N} x {r.C}", r.dtype, f"{r.fwd_ms:g}", f"{r.fwd_iqr_pct:g}",
         f"{r.fwd_bwd_ms:g}", f"{r.fwd_bwd_iqr_pct:g}",
         "" if r.peak_extra_mib is None else f"{r.peak_extra_mib:g}", f"{r.gb_per_s:g}",
         f"{r.floor_fraction:g}", speedup, vs_ce]
        for r, (speedup, vs_ce) in zip(results, _ratio_columns(results), strict=True)
    ]


def markdown_table(results: list[BenchResult]) -> str:
    """Results with their spread and the ratios to torch eager and to crossent plain CE of the same
    shape and dtype (forward+backward medians; ``?`` marks a ratio of a noisy row)."""
    lines = ["| " + " | ".join(TABLE_HEAD) + " |", "|---|---|---|---|" + "---:|" * (len(TABLE_HEAD) - 4)]
    lines += ["| " + " | ".join(row) + " |" for row in _table_rows(results)]
    return "\n".join(lines) + "\n"


def text_table(head: Sequence[str], rows: Sequence[Sequence[str]], *, left: int = 1) -> str:
    """Plain-text columns as wide as their widest cell: nothing is ever cut, at any terminal width.
    The first ``left`` columns (names) are left-aligned, the others (numbers) right-aligned.

    >>> print(text_table(["provider", "ms"], [["crossent-ops", "1.5"], ["torch", "12"]]))
    provider       ms
    ------------  ---
    crossent-ops  1.5
    torch          12
    """
    widths = [max(len(str(c)) for c in col) for col in zip(head, *rows, strict=True)]

    def line(cells: Sequence[str]) -> str:
        cells_widths = enumerate(zip(cells, widths, strict=True))
        return "  ".join(c.ljust(w) if i < left else c.rjust(w) for i, (c, w) in cells_widths).rstrip()

    return "\n".join([line(head), "  ".join("-" * w for w in widths), *(line(r) for r in rows)])


#: The shapes where crossent's performance targets apply: the CPU shape and the GPU shape (the same
#: ratios elsewhere are reported without a target).
FLOOR_SHAPES = {(2048, 32000), (8192, 128256)}


def floor_table(results: list[BenchResult]) -> str:
    """The ratios crossent sets targets (floors) for, per shape and dtype: torch eager CE over crossent CE,
    crossent focal and smoothing over crossent CE, crossent CE bf16 over fp32 (forward+backward
    medians of the same interleaved run). Floors apply at :data:`FLOOR_SHAPES`."""
    key = {(r.provider, r.variant, r.N, r.C, r.dtype): r.fwd_bwd_ms for r in results}
    rows = []
    for N, C in dict.fromkeys((r.N, r.C) for r in results):
        for dtype in dict.fromkeys(r.dtype for r in results if (r.N, r.C) == (N, C)):
            ce = key.get(("crossent", "ce", N, C, dtype))
            if ce is None:
                continue
            torch_ce = key.get(("torch", "ce", N, C, dtype))
            if torch_ce is not None:
                rows.append((N, C, f"{dtype}: torch eager CE / crossent CE", torch_ce / ce, ">=", 2.0))
            for variant in ("focal", "ls"):
                v = key.get(("crossent", variant, N, C, dtype))
                if v is not None:
                    rows.append((N, C, f"{dtype}: crossent {variant} / crossent CE", v / ce, "<=", 1.1))
        fp32, bf16 = key.get(("crossent", "ce", N, C, "fp32")), key.get(("crossent", "ce", N, C, "bf16"))
        if fp32 is not None and bf16 is not None:
            rows.append((N, C, "crossent CE bf16 / fp32", bf16 / fp32, "<=", 1.0))
    lines = [
        "| N x C | ratio (forward+backward medians) | value | floor | holds |",
        "|---|---|---:|---:|---|",
    ]
    for N, C, name, value, op, floor in rows:
        if (N, C) in FLOOR_SHAPES:
            ok = value >= floor if op == ">=" else value <= floor
            lines.append(f"| {N} x {C} | {name} | {value:.2f} | {op} {floor} | {'yes' if ok else 'no'} |")
        else:
            lines.append(f"| {N} x {C} | {name} | {value:.2f} | | |")
    return "\n".join(lines) + "\n"


def _plot(results: list[BenchResult], path: Path) -> None:
    """Forward+backward median against C, per provider, dtype and N (log-log), for plain CE."""
    require("matplotlib", "the benchmark's plot").use("Agg")
    plt = require("matplotlib.pyplot", "the benchmark's plot")

    fig, ax = plt.subplots(figsize=(6, 4))
    series: dict[str, list[tuple[int, float]]] = {}
    for r in results:
        if r.variant == "ce" and r.fwd_bwd_ms:
            series.setdefault(f"{r.provider} {r.dtype} N={r.N}", []).append((r.C, r.fwd_bwd_ms))
    for label, pts in sorted(series.items()):
        pts.sort()
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=label)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("classes C")
    ax.set_ylabel("forward+backward median (ms)")
    ax.set_title("cross-entropy: time vs C")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


PROVIDERS = ("crossent", "crossent-ops", "torch", "naive", "compile", "liger")
MAX_REPEATS = 10_000


def _parse_shapes(text: str) -> list[tuple[int, int]]:
    shapes = []
    for part in text.split(","):
        try:
            n, c = part.lower().split("x")
            shapes.append((int(n), int(c)))
        except ValueError:
            raise ValueError(f"--shapes takes NxC pairs separated by commas, got {part!r}") from None
        if shapes[-1][0] < 1 or shapes[-1][1] < 1:
            raise ValueError(f"--shapes: N and C must be >= 1, got {part.strip()!r}")
    return shapes


def shape_bytes(N: int, C: int, dtypes: list[str]) -> int:
    """About the peak bytes :func:`run_shape` needs for one N x C shape: the fp32 base, and per
    dtype the input, its differentiable copy, the gradient, the copy floor's output and two N x C
    temporaries of the providers (log-softmax and its gradient)."""
    per_element = 4 + sum(6 * torch.empty((), dtype=DTYPES[d]).element_size() for d in dtypes)
    return N * C * per_element


def _check_memory(shapes: list[tuple[int, int]], dtypes: list[str], device: str) -> None:
    from crossent.cli import available_memory, format_bytes

    free = available_memory(device)
    if free is None:
        return
    for N, C in shapes:
        need = shape_bytes(N, C, dtypes)
        if need > free:
            raise ValueError(
                f"--shapes {N}x{C}: needs about {format_bytes(need)} ({', '.join(dtypes)} inputs and"
                f" gradients), more than the {format_bytes(free)} available on {device}"
            )


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu"
    )
    parser.add_argument(
        "--shapes", default=None, help="NxC pairs, e.g. 2048x32000,65536x80 (default per device)"
    )
    parser.add_argument("--dtypes", default="fp32,bf16", help="comma list of fp32, bf16, fp16")
    parser.add_argument("--providers", default=None,
                        help="comma list of crossent, crossent-ops, torch, naive, compile, liger "
                             "(default: crossent,crossent-ops,torch,naive on the CPU; "
                             "crossent,torch,naive,compile,liger on cuda)")
    parser.add_argument("--variants", default="ce,focal,ls", help="comma list of ce, focal, ls")
    parser.add_argument("--repeats", type=int, default=7,
                        help="interleaved rounds per case, after two warm-up calls (default 7)")
    parser.add_argument("--threads", type=int, default=None,
                        help="CPU threads for torch (default: torch's own, usually one per core)")
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory measurement")
    parser.add_argument("--out", type=Path, default=Path("runs/bench"), help="folder for CSV, markdown, plot")


def _comma_list(text: str, flag: str, choices: Sequence[str]) -> list[str]:
    items = [t.strip() for t in text.split(",")]
    for item in items:
        if item not in choices:
            raise ValueError(f"{flag}: unknown value {item!r}; choose from {', '.join(choices)}")
    return items


def main(args: argparse.Namespace) -> int:
    if args.device == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda needs a CUDA GPU; none is visible")
    shapes = _parse_shapes(args.shapes or DEFAULT_SHAPES[args.device])
    try:
        dtypes = _comma_list(args.dtypes, "--dtypes", list(DTYPES))
    except ValueError as exc:
        raise ValueError(str(exc).replace("unknown value", "unknown dtype")) from None
    try:
        variants = _comma_list(args.variants, "--variants", list(VARIANTS))
    except ValueError as exc:
        raise ValueError(str(exc).replace("unknown value", "unknown variant")) from None
    default_providers = (
        "crossent,torch,naive,compile,liger" if args.device == "cuda" else "crossent,crossent-ops,torch,naive"
    )
    try:
        providers = _comma_list(args.providers or default_providers, "--providers", PROVIDERS)
    except ValueError as exc:
        raise ValueError(str(exc).replace("unknown value", "unknown provider")) from None
    if not 1 <= args.repeats <= MAX_REPEATS:
        raise ValueError(f"--repeats must lie in 1..{MAX_REPEATS}, got {args.repeats}")
    if args.threads is not None:
        if not 1 <= args.threads <= 4096:
            raise ValueError(f"--threads must lie in 1..4096, got {args.threads}")
        torch.set_num_threads(args.threads)
    _check_memory(shapes, dtypes, args.device)
    from crossent.cli import check_out_dir

    check_out_dir(args.out)  # before the measurements: a file in the way fails now

    info = machine_info(args.device)
    print("machine: " + ", ".join(f"{k}={v}" for k, v in info.items()))
    print(f"medians of {args.repeats} interleaved rounds in shuffled order (after 2 warm-up calls); "
          "IQR: interquartile range of the rounds, in % of the median")
    results: list[BenchResult] = []

    def report(r: BenchResult) -> None:
        print(f"  {r.provider} {r.variant} {r.N}x{r.C} {r.dtype}: fwd {r.fwd_ms:g} ms "
              f"(IQR {r.fwd_iqr_pct:g}%), fwd+bwd {r.fwd_bwd_ms:g} ms (IQR {r.fwd_bwd_iqr_pct:g}%)"
              + ("" if r.peak_extra_mib is None else f", peak {r.peak_extra_mib:g} MiB"), flush=True)

    with LoadMonitor() as monitor, frozen_heap():
        for N, C in shapes:
            cases = [
                (p, v, d) for d in dtypes for v in variants for p in providers
                # the torch provider already is the naive composition for focal
                if not (p == "naive" and v == "focal" and "torch" in providers)
            ]
            results += run_shape(cases, N, C, args.device, repeats=args.repeats,
                                 memory=not args.no_memory, progress=report)
    print()
    print(text_table(TABLE_HEAD, _table_rows(results), left=4))
    print()
    print(floor_table(results))
    spreads = {f"{r.provider} {r.variant} {r.N}x{r.C} {r.dtype} {phase}": pct / 100
               for r in results for phase, pct in (("fwd", r.fwd_iqr_pct), ("fwd+bwd", r.fwd_bwd_iqr_pct))}
    warnings = reliability_warnings(spreads, monitor.result)
    for line in warnings:
        print(f"warning: {line}")
    load = monitor.result
    if load is not None:
        info["load average at start"] = "unknown" if load.loadavg is None else f"{load.loadavg:.2f}"
        info["others busy (CPUs)"] = "unknown" if load.others_busy is None else f"{load.others_busy:.2f}"
        info["stolen by the hypervisor (CPUs)"] = "unknown" if load.stolen is None else f"{load.stolen:.2f}"

    args.out.mkdir(parents=True, exist_ok=True)
    with open(args.out / "bench.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(asdict(results[0]).keys()) if results else ["provider"])
        writer.writeheader()
        for r in results:
            writer.writerow(asdict(r))
    md = (
        "machine: " + ", ".join(f"{k}={v}" for k, v in info.items()) + "\n\n" + markdown_table(results)
        + "\n" + floor_table(results)
        + "".join(f"\n> warning: {line}\n" for line in warnings)
    )
    (args.out / "bench.md").write_text(md)
    (args.out / "machine.json").write_text(json.dumps(info, indent=2))
    written = "bench.csv, bench.md, machine.json"
    if results:
        try:
            _plot(results, args.out / "bench.png")
            written += ", bench.png"
        except MissingExtraError as exc:
            print(f"no plot: {exc}", file=sys.stderr)
    print(f"wrote {args.out}/: {written}", flush=True)
    return 0
