"""The ops floors in one run, on the CPU: eager and ``torch.compile``, softmax, binary and linear.

Three sections, each timed in the same process, forward+backward (every case is a closure that
computes the loss, calls ``.backward()`` and clears the leaves' ``.grad``):

1. softmax, N=2048, C=32,000, fp32: ``F.cross_entropy`` eager and compiled, ``crossent.cross_entropy``
   eager and compiled for CE, focal (gamma 2) and label smoothing 0.1;
2. binary, N=65,536, C=80, fp32: ``crossent.sigmoid_focal_loss`` against the eager
   torchvision-style composition;
3. linear, N=2048, D=1024, V=32,000: ``crossent.linear_cross_entropy``, the unfused
   ``F.cross_entropy(h @ W.T, y)`` and PyTorch's ``F.linear_cross_entropy`` (chunked, with
   ``options=torch.nn.LinearCrossEntropyOptions()``) where it exists; fp32, then the same three
   under ``torch.autocast("cpu", dtype=torch.bfloat16)`` with fp32 leaves.

"Compiled" is ``torch.compile(fn, fullgraph=True, backend="inductor")``, warmed with two calls
(eager cases: one). Within a section the cases are interleaved round by round in a shuffled order
(``random.Random(0)``, a new order each round), so slow phases of the machine hit all cases alike
and every ratio is taken between medians of the same run. Peak extra memory: the CPU allocator's
events from ``torch.profiler`` summed in time order (``_shared.cpu_peak_bytes``, checked on a
lone ``torch.empty`` first); it includes the gradients.

If the projected run time exceeds ``--budget-s`` (measured from the warm-up calls), the slowest
section runs fewer rounds, and the report says so.

Usage::

    python benchmarks/bench_ops.py [--repeats 9] [--quick] [--out FILE] [--budget-s 480]
"""

from __future__ import annotations

import argparse
import gc
import math
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

import crossent
from _shared import cpu_peak_bytes, eager_sigmoid_focal, interleaved_times, validate_cpu_peak
from crossent.bench import machine_info

ALPHA, GAMMA, SMOOTHING = 0.25, 2.0, 0.1
FULL = {"softmax": (2048, 32_000), "binary": (65_536, 80), "linear": (2048, 1024, 32_000)}
QUICK = {"softmax": (64, 1000), "binary": (1024, 80), "linear": (64, 64, 1000)}


# -------------------------------------------------------------------------------- cases


@dataclass
class Case:
    name: str
    step: Callable[[], torch.Tensor] | None  # forward+backward, clears .grad, returns the loss
    compiled: bool = False
    error: str | None = None
    warm_ms: float = 0.0  # the last warm-up call
    loss: float | None = None
    times: list[float] = field(default_factory=list)
    peak: int | None = None

    @property
    def ok(self) -> bool:
        return self.error is None and bool(self.times)

    @property
    def median(self) -> float | None:
        return statistics.median(self.times) if self.ok else None


@dataclass
class Section:
    key: str
    title: str
    shape: str
    baseline: dict[str, str]  # case name -> the case it is compared against
    cases: list[Case]
    repeats: int = 0
    note: str = ""
    grad_bytes: int = 0  # the gradients of the leaves, which every provider must produce

    def __getitem__(self, name: str) -> Case:
        return next(c for c in self.cases if c.name == name)

    def round_ms(self) -> float:
        return sum(c.warm_ms for c in self.cases if c.error is None)


def make_step(
    loss_fn: Callable[[], torch.Tensor], leaves: tuple[torch.Tensor, ...], autocast: torch.dtype | None = None
) -> Callable[[], torch.Tensor]:
    def step() -> torch.Tensor:
        if autocast is None:
            loss = loss_fn()
        else:
            with torch.autocast("cpu", dtype=autocast):
                loss = loss_fn()
        loss.backward()
        for leaf in leaves:
            leaf.grad = None
        return loss.detach()

    return step


def compiled(fn: Callable) -> Callable:
    return torch.compile(fn, fullgraph=True, backend="inductor")


# Distinct functions (not lambdas from one loop): dynamo caches per code object.
def torch_ce(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(x, y)


def crossent_ce(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return crossent.cross_entropy(x, y)


def crossent_focal(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return crossent.cross_entropy(x, y, gamma=GAMMA)


def crossent_smoothing(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return crossent.cross_entropy(x, y, label_smoothing=SMOOTHING)


def softmax_section(N: int, C: int) -> Section:
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(N, C, generator=gen).requires_grad_()
    y = torch.randint(0, C, (N,), generator=gen)
    cases = []
    for label, fn in (
        ("F.cross_entropy", torch_ce),
        ("crossent CE", crossent_ce),
        ("crossent focal", crossent_focal),
        ("crossent smoothing", crossent_smoothing),
    ):
        cases.append(Case(f"{label} eager", make_step(lambda fn=fn: fn(x, y), (x,))))
        cfn = compiled(fn)
        cases.append(Case(f"{label} compiled", make_step(lambda cfn=cfn: cfn(x, y), (x,)), compiled=True))
    baseline = {c.name: "F.cross_entropy eager" for c in cases}
    return Section(
        "softmax", "softmax family", f"N={N}, C={C}, fp32 (focal gamma={GAMMA}, smoothing {SMOOTHING})",
        baseline, cases,
    )


def binary_section(N: int, C: int) -> Section:
    gen = torch.Generator().manual_seed(0)
    x = (torch.randn(N, C, generator=gen) * 2 - 3).requires_grad_()  # mostly negatives
    t = (torch.rand(N, C, generator=gen) < 0.02).float()  # ~2% positives, as in detection
    cases = [
        Case(
            "eager composition (torchvision-style)",
            make_step(lambda: eager_sigmoid_focal(x, t, ALPHA, GAMMA), (x,)),
        ),
        Case(
            "crossent.sigmoid_focal_loss",
            make_step(lambda: crossent.sigmoid_focal_loss(x, t, alpha=ALPHA, gamma=GAMMA), (x,)),
        ),
    ]
    baseline = {c.name: cases[0].name for c in cases}
    return Section(
        "binary", "sigmoid focal loss", f"N={N}, C={C}, fp32, alpha={ALPHA}, gamma={GAMMA}, ~2% positives",
        baseline, cases,
    )


def linear_section(N: int, D: int, V: int) -> Section:
    torch.manual_seed(0)
    h = (torch.randn(N, D) / D**0.5).requires_grad_()
    w = (torch.randn(V, D) * 0.02).requires_grad_()
    y = torch.randint(0, V, (N,))
    has_torch_lce = hasattr(F, "linear_cross_entropy") and hasattr(torch.nn, "LinearCrossEntropyOptions")
    cases, baseline = [], {}
    for tag, dtype in (("fp32", None), ("bf16 autocast", torch.bfloat16)):
        unfused = f"unfused F.cross_entropy(h @ W.T) {tag}"
        cases.append(Case(unfused, make_step(lambda: F.cross_entropy(h @ w.t(), y), (h, w), dtype)))
        cases.append(Case(
            f"crossent.linear_cross_entropy {tag}",
            make_step(lambda: crossent.linear_cross_entropy(h, w, y), (h, w), dtype),
        ))
        name = f"F.linear_cross_entropy (chunked) {tag}"
        if has_torch_lce:
            options = torch.nn.LinearCrossEntropyOptions()
            step = make_step(lambda o=options: F.linear_cross_entropy(h, w, y, options=o), (h, w), dtype)
            cases.append(Case(name, step))
        else:
            missing = f"n/a (torch {torch.__version__} has no F.linear_cross_entropy)"
            cases.append(Case(name, None, error=missing))
        baseline.update({c.name: unfused for c in cases[-3:]})
    return Section("linear", "linear + cross-entropy", f"N={N}, D={D}, V={V}; fp32 leaves", baseline, cases,
                   grad_bytes=(N * D + V * D) * 4)


# ------------------------------------------------------------------------------ running


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def warm(section: Section) -> None:
    for case in section.cases:
        if case.error is not None:
            continue
        try:
            for _ in range(2 if case.compiled else 1):
                t0 = time.perf_counter()
                case.loss = float(case.step())
                case.warm_ms = (time.perf_counter() - t0) * 1e3
        except Exception as err:  # one failing provider must not hide the others
            case.error = f"failed: {type(err).__name__}: {err}"[:120]
        log(f"  warm {section.key}: {case.name}: {case.error or f'{case.warm_ms:.1f} ms'}")


def run(section: Section) -> None:
    live = [c for c in section.cases if c.error is None]
    # crossent bench's harness: rounds interleaved in a new shuffled order each round, with a
    # warning when the machine's load or a case's spread makes the ratios unreliable (the cases
    # were warmed up by warm())
    times = interleaved_times({c.name: c.step for c in live}, section.repeats, warmup=0)
    for case in live:
        case.times = times[case.name]
    log(f"  {section.key}: {section.repeats} rounds")
    for case in live:
        gc.collect()
        case.peak = cpu_peak_bytes(case.step)


def plan(sections: list[Section], repeats: int, budget_s: float, elapsed_s: float) -> None:
    """Repeats per section; the slowest section runs fewer rounds if the run would exceed the budget."""
    for s in sections:
        s.repeats = repeats
    # each section: `repeats` timed rounds plus one round for the memory pass
    projected = elapsed_s + sum((repeats + 1) * s.round_ms() / 1e3 for s in sections)
    if budget_s <= 0 or projected <= budget_s:
        return
    slow = max(sections, key=Section.round_ms)
    rest = sum((repeats + 1) * s.round_ms() / 1e3 for s in sections if s is not slow)
    round_s = slow.round_ms() / 1e3
    fit = math.floor((budget_s - elapsed_s - rest) / round_s) - 1
    slow.repeats = max(3, min(repeats, fit))
    if slow.repeats < repeats:
        slow.note = (
            f"{slow.key} section: {slow.repeats} rounds instead of {repeats} (projected run "
            f"{projected:.0f} s > budget {budget_s:.0f} s; one round of this section ~{round_s:.1f} s)."
        )


def dynamo_graphs() -> int:
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])


# ------------------------------------------------------------------------------- report


def _ms(v: float | None) -> str:
    return "n/a" if v is None else f"{v:.1f}" if v >= 10 else f"{v:.2f}"


def section_table(s: Section) -> str:
    lines = [
        f"### {s.title}: {s.shape}",
        "",
        f"Median of {s.repeats} interleaved rounds, forward+backward.",
        "",
        "| case | median ms | min ms | loss | peak extra MiB | baseline / this (time) "
        "| this / baseline (memory) |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for c in s.cases:
        if not c.ok:
            lines.append(f"| {c.name} | {c.error} | | | | | |")
            continue
        base = s[s.baseline[c.name]]
        speed = f"{base.median / c.median:.2f}x" if base.ok else "n/a"
        mem = f"{c.peak / base.peak:.3f}" if base.ok and base.peak else "n/a"
        lines.append(
            f"| {c.name} | {_ms(c.median)} | {_ms(min(c.times))} | {c.loss:.5f} | {c.peak / 2**20:.1f} "
            f"| {speed} | {mem} |"
        )
    return "\n".join(lines) + "\n"


def floors(sm: Section, bi: Section, li: Section) -> list[tuple[str, float | None, str, float]]:
    def t(s: Section, name: str) -> float | None:
        return s[name].median

    def ratio(a: float | None, b: float | None) -> float | None:
        return None if a is None or b is None else a / b

    rows = [
        ("softmax: compiled F.cross_entropy / compiled crossent CE (time)",
         ratio(t(sm, "F.cross_entropy compiled"), t(sm, "crossent CE compiled")), ">=", 2.0),
    ]
    for label in ("CE", "focal", "smoothing"):
        rows.append((f"softmax: crossent {label} compiled / eager (time)",
                     ratio(t(sm, f"crossent {label} compiled"), t(sm, f"crossent {label} eager")), "<=", 1.1))
    rows += [
        ("softmax: F.cross_entropy eager / crossent CE eager (time)",
         ratio(t(sm, "F.cross_entropy eager"), t(sm, "crossent CE eager")), ">=", 4.0),
        ("softmax: crossent focal / CE, eager (time)",
         ratio(t(sm, "crossent focal eager"), t(sm, "crossent CE eager")), "<=", 1.1),
        ("softmax: crossent smoothing / CE, eager (time)",
         ratio(t(sm, "crossent smoothing eager"), t(sm, "crossent CE eager")), "<=", 1.1),
        ("binary: eager composition / crossent.sigmoid_focal_loss (time)",
         ratio(t(bi, "eager composition (torchvision-style)"), t(bi, "crossent.sigmoid_focal_loss")),
         ">=", 5.0),
    ]
    for tag in ("fp32", "bf16 autocast"):
        ours = li[f"crossent.linear_cross_entropy {tag}"]
        unfused = li[f"unfused F.cross_entropy(h @ W.T) {tag}"]
        theirs = li[f"F.linear_cross_entropy (chunked) {tag}"]
        mem = ours.peak / unfused.peak if ours.ok and unfused.ok and unfused.peak else None
        g = li.grad_bytes
        work = (ours.peak - g) / (unfused.peak - g) if mem is not None and unfused.peak > g else None
        rows += [
            (f"linear {tag}: crossent / unfused (peak extra memory)", mem, "<=", 0.125),
            (f"linear {tag}: crossent / unfused (peak extra memory beyond dH and dW)", work, "<=", 0.125),
            (f"linear {tag}: crossent / unfused (time)", ratio(ours.median, unfused.median), "<=", 1.1),
            (f"linear {tag}: crossent / F.linear_cross_entropy (time)",
             ratio(ours.median, theirs.median), "<", 1.0),
        ]
    return rows


def floor_table(rows: list[tuple[str, float | None, str, float]]) -> str:
    lines = ["| floor | value | required | holds |", "|---|---:|---:|---|"]
    for name, value, op, bound in rows:
        if value is None:
            holds, shown = "n/a", "n/a"
        else:
            ok = {">=": value >= bound, "<=": value <= bound, "<": value < bound}[op]
            holds, shown = ("yes" if ok else "no"), f"{value:.3f}"
        lines.append(f"| {name} | {shown} | {op} {bound:g} | {holds} |")
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------------- main


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=9, help="interleaved rounds per section (default 9)")
    ap.add_argument("--quick", action="store_true", help="tiny shapes: a smoke test, the floors mean nothing")
    ap.add_argument("--out", type=Path, default=None, help="also write the markdown report to this file")
    ap.add_argument("--budget-s", type=float, default=480.0,
                    help="target wall time (s); the slowest section runs fewer rounds to fit (0: no limit)")
    args = ap.parse_args()
    start = time.perf_counter()
    shapes = QUICK if args.quick else FULL

    validate_cpu_peak()
    sections = [
        softmax_section(*shapes["softmax"]),
        binary_section(*shapes["binary"]),
        linear_section(*shapes["linear"]),
    ]
    log("warming up (compiled cases: 2 calls, eager: 1)")
    for s in sections:
        warm(s)
    plan(sections, args.repeats, args.budget_s, time.perf_counter() - start)
    graphs = dynamo_graphs()
    for s in sections:
        log(f"timing {s.key}: {s.repeats} rounds of {sum(c.error is None for c in s.cases)} cases")
        run(s)
    recompiled = dynamo_graphs() - graphs
    wall = time.perf_counter() - start

    info = machine_info("cpu")
    quick = " - QUICK smoke-test shapes, floors not meaningful" if args.quick else ""
    lines = [
        f"## crossent ops floors (CPU){quick}",
        "",
        "machine: " + ", ".join(f"{k}={v}" for k, v in info.items()),
        "",
        f"torch {torch.__version__}, {torch.get_num_threads()} threads. Compiled: "
        "`torch.compile(fullgraph=True, backend=\"inductor\")`, 2 warm-up calls; eager: 1. Cases of a "
        "section interleaved round by round in a shuffled order (random.Random(0)); ratios are between "
        "medians of this run. Peak extra memory: torch.profiler CPU allocator events, max of the running "
        "sum (checked on a lone torch.empty), gradients included.",
        "",
    ]
    notes = [s.note for s in sections if s.note]
    if recompiled:
        notes.append(f"warning: dynamo compiled {recompiled} new graph(s) after the warm-up (recompiles).")
    if notes:
        lines += [f"Note: {n}" for n in notes] + [""]
    for s in sections:
        lines += [section_table(s)]
    lines += ["### floors", "", floor_table(floors(*sections)), f"Total wall time: {wall:.0f} s."]
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text)


if __name__ == "__main__":
    main()
