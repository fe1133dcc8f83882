"""Issue-6 GPU benchmark: crossent's Triton kernels against torch, torch.compile and Liger-Kernel.

Every provider runs in the same process on the same inputs (index targets, mean reduction):

- ``crossent`` -- ``crossent.cross_entropy(..., backend="triton")`` (CE, focal gamma 2,
  smoothing 0.1), and ``crossent inplace`` (``inplace_backward=True``, as Liger does);
- ``torch`` -- eager ``F.cross_entropy`` (with ``label_smoothing`` for the smoothing row);
- ``compile`` -- ``torch.compile(F.cross_entropy)``;
- ``liger`` -- Liger-Kernel's ``LigerCrossEntropyLoss`` when ``liger_kernel`` is importable;
- ``copy`` -- ``dst.copy_(logits)``: one read and one write of the logits, the measured
  bandwidth floor of a fused loss (the "2-pass floor": read the logits, write the gradient).

and, with ``--binary``, the sigmoid family (``crossent.binary_cross_entropy`` against
``F.binary_cross_entropy_with_logits`` eager and compiled).

Reported per shape: the median of forward only (no gradient) and of forward+backward over
``--repeats`` rounds of the shared harness (``_shared.interleaved_times``, which is
``crossent bench``'s: warm-up, every case once per round in a new shuffled order; on CUDA each
call timed by CUDA events, the L2 cache flushed and the logits restored before it, outside the
timed region), the peak extra memory of one forward+backward
(``torch.cuda.max_memory_allocated`` minus the memory allocated before it), the achieved
bandwidth ``2 N C bytes / t`` and ``t / t_copy``, the multiple of the floor.

Checks of issue 6 at the end (N=8192, C=128256, bf16 by default): crossent CE forward+backward
within 1.25x of the copy floor and <= 1.75 ms; faster than Liger and torch.compile; focal and
smoothing within 1.1x of crossent CE.

Usage:
    python benchmarks/bench_triton.py --device cuda [--shapes 8192x128256,8192x128,8192x256]
        [--dtype bf16] [--repeats 20] [--binary] [--sweep] [--out FILE.md]

``--sweep`` also times the crossent CE kernel over block sizes and warp counts (the defaults
of ``crossent.backends.triton.softmax.launch_config`` are untuned until this has run on hardware).
Without a CUDA device the script prints one line and exits 0.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from _shared import interleaved_times

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
DEFAULT_SHAPES = "8192x128256,8192x32000,8192x128,8192x256,1024x1000"
TARGET_SHAPE = (8192, 128256)


@dataclass
class Row:
    provider: str
    variant: str
    N: int
    C: int
    fwd_ms: float | None
    fwd_bwd_ms: float | None
    peak_mib: float | None
    gb_s: float | None
    x_floor: float | None


def peak_mib(fn: Callable[[], object], before: Callable[[], object]) -> float:
    before()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**20


def softmax_providers(variant: str) -> dict[str, Callable]:
    """name -> loss(x, y) for one variant ("ce", "focal", "ls"); missing providers left out."""
    import crossent

    kw = {"ce": {}, "focal": {"gamma": 2.0}, "ls": {"label_smoothing": 0.1}}[variant]
    out: dict[str, Callable] = {
        "crossent": lambda x, y: crossent.cross_entropy(x, y, backend="triton", **kw),
        "crossent inplace": lambda x, y: crossent.cross_entropy(
            x, y, backend="triton", inplace_backward=True, **kw
        ),
    }
    if variant == "focal":
        return out
    ls = kw.get("label_smoothing", 0.0)
    out["torch"] = lambda x, y: F.cross_entropy(x, y, label_smoothing=ls)
    compiled = torch.compile(lambda x, y: F.cross_entropy(x, y, label_smoothing=ls))
    out["compile"] = compiled
    try:
        from liger_kernel.transformers import LigerCrossEntropyLoss
    except ImportError:
        pass
    else:
        liger = LigerCrossEntropyLoss(label_smoothing=ls)
        out["liger"] = lambda x, y: liger(x, y)
    return out


Loss = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def measure(
    cases: dict[tuple[str, str], Loss], x0: torch.Tensor, y: torch.Tensor, repeats: int
) -> list[Row]:
    """Forward and forward+backward of every ``(provider, variant): loss`` on ``x0``, and the
    copy floor, interleaved in one run; then each case's peak memory on its own (CUDA only:
    on the CPU, where the tests run this function, the peak is left out)."""
    device = x0.device.type
    N, C = x0.shape
    x = x0.clone().requires_grad_(True)
    dst = torch.empty_like(x0)

    def restore(_: object = None) -> None:
        x.grad = None
        with torch.no_grad():
            x.copy_(x0)  # an in-place backward (Liger, crossent inplace) overwrote it

    steps: dict[tuple[str, str, str], Callable[[], object]] = {("copy (floor)", "-", "fwd_bwd"): (
        lambda: dst.copy_(x0))}
    for (name, variant), fn in cases.items():
        # detached under no_grad: crossent's autograd node decides on computing the gradient
        # from needs_input_grad, which stays True under no_grad
        def fwd(fn: Loss = fn) -> None:
            with torch.no_grad():
                fn(x.detach(), y)

        def fwd_bwd(fn: Loss = fn) -> None:
            fn(x, y).backward()

        steps[(name, variant, "fwd")] = fwd
        steps[(name, variant, "fwd_bwd")] = fwd_bwd
    times = interleaved_times(steps, repeats, device=device, warmup=3, before=restore, flush_l2=True)
    med = {k: statistics.median(v) for k, v in times.items()}
    floor = med[("copy (floor)", "-", "fwd_bwd")]
    nbytes = 2 * N * C * x0.element_size()
    rows = []
    for (name, variant), fn in cases.items():
        t_fb = med[(name, variant, "fwd_bwd")]
        mem = peak_mib(lambda fn=fn: fn(x, y).backward(), restore) if device == "cuda" else None
        rows.append(Row(name, variant, N, C, med[(name, variant, "fwd")], t_fb, mem,
                        nbytes / t_fb / 1e6, t_fb / floor))
    rows.append(Row("copy (floor)", "-", N, C, None, floor, None, nbytes / floor / 1e6, 1.0))
    return rows


def sweep(x0: torch.Tensor, y: torch.Tensor, repeats: int) -> list[tuple[int, int, int, float]]:
    """Forward+backward ms of the crossent CE kernel per (BLOCK_C, BLOCK_R, num_warps)."""
    from crossent._options import SoftmaxCall, SoftmaxOptions
    from crossent.backends.triton import softmax as ts

    C = x0.shape[1]
    opts = SoftmaxOptions()
    results = []
    if C <= ts.MAX_ONE_CHUNK:
        bc = 1 << (C - 1).bit_length()
        grid = [(bc, br, w) for br in (1, 2, 4, 8, 16, 32) for w in (2, 4, 8, 16)
                if br * bc <= 16384]
    else:
        grid = [(bc, 1, w) for bc in (2048, 4096, 8192, 16384, 32768) for w in (4, 8, 16, 32)]
    runs: dict[tuple[int, int, int], Callable[[], object]] = {}
    for bc, br, w in grid:
        def run(bc: int = bc, br: int = br, w: int = w) -> None:
            ts.softmax_cross_entropy(SoftmaxCall(x0, y, None, opts, "mean", True), block_c=bc,
                                     block_r=br, num_warps=w)
        try:
            run()  # compiles; a configuration the GPU cannot hold fails here
        except Exception as err:  # e.g. out of shared memory / registers
            print(f"  sweep BLOCK_C={bc} BLOCK_R={br} warps={w}: {type(err).__name__}")
        else:
            runs[(bc, br, w)] = run
    times = interleaved_times(runs, repeats, device="cuda", flush_l2=True)
    results = [(bc, br, w, statistics.median(times[(bc, br, w)])) for bc, br, w in runs]
    return sorted(results, key=lambda r: r[3])


def binary_rows(shapes: list[tuple[int, int]], dtype: torch.dtype, repeats: int) -> list[Row]:
    import crossent

    rows = []
    for N, C in shapes:
        x0 = torch.randn(N, C, device="cuda", dtype=dtype)
        t = (torch.rand(N, C, device="cuda") < 0.1).to(dtype)
        provs: dict[str, Loss] = {
            "crossent": lambda x, t: crossent.binary_cross_entropy(x, t, backend="triton"),
            "crossent focal": lambda x, t: crossent.binary_cross_entropy(
                x, t, gamma=2.0, alpha=0.25, backend="triton"),
            "torch": F.binary_cross_entropy_with_logits,
            "compile": torch.compile(F.binary_cross_entropy_with_logits),
        }
        rows += measure({(name, "binary"): fn for name, fn in provs.items()}, x0, t, repeats)
    return rows


def table(rows: list[Row]) -> str:
    def f(v: float | None, fmt: str) -> str:
        return "-" if v is None else format(v, fmt)

    lines = [
        "| provider | variant | N | C | fwd ms | fwd+bwd ms | peak extra MiB | GB/s | x floor |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r.provider} | {r.variant} | {r.N} | {r.C} | {f(r.fwd_ms, '.3f')} | "
            f"{f(r.fwd_bwd_ms, '.3f')} | {f(r.peak_mib, '.0f')} | {f(r.gb_s, '.0f')} | "
            f"{f(r.x_floor, '.2f')} |"
        )
    return "\n".join(lines)


def checks(rows: list[Row], dtype_name: str) -> list[str]:
    """The issue-6 targets on the target shape, as PASS/FAIL lines."""
    N, C = TARGET_SHAPE
    at = {(r.provider, r.variant): r for r in rows if (r.N, r.C) == (N, C)}
    ce = at.get(("crossent", "ce"))
    if ce is None or ce.fwd_bwd_ms is None:
        return [f"(target shape {N}x{C} not measured: no checks)"]
    t = ce.fwd_bwd_ms
    out = [f"target shape {N}x{C} {dtype_name}, crossent CE forward+backward {t:.3f} ms"]

    def line(ok: bool, text: str) -> None:
        out.append(f"{'PASS' if ok else 'FAIL'}: {text}")

    line(ce.x_floor is not None and ce.x_floor <= 1.25, f"within 1.25x of the copy floor "
         f"({ce.x_floor:.2f}x)")
    line(t <= 1.75, f"<= 1.75 ms ({t:.3f} ms)")
    for other in ("liger", "compile"):
        r = at.get((other, "ce"))
        if r is not None and r.fwd_bwd_ms is not None:
            line(t < r.fwd_bwd_ms, f"faster than {other} ({r.fwd_bwd_ms:.3f} ms)")
        else:
            out.append(f"SKIP: {other} not measured")
    for variant in ("focal", "ls"):
        r = at.get(("crossent", variant))
        if r is not None and r.fwd_bwd_ms is not None:
            ratio = r.fwd_bwd_ms / t
            line(ratio <= 1.1, f"crossent {variant} within 1.1x of CE ({ratio:.2f}x)")
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda")
    p.add_argument("--shapes", default=DEFAULT_SHAPES, help="comma-separated NxC")
    p.add_argument("--dtype", default="bf16", choices=list(DTYPES))
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--binary", action="store_true", help="also the sigmoid family")
    p.add_argument("--sweep", action="store_true", help="also sweep the CE kernel's tiles")
    p.add_argument("--out", help="also write the markdown report to this file")
    args = p.parse_args()
    if args.device != "cuda" or not torch.cuda.is_available():
        print("bench_triton.py needs a CUDA device (run with --device cuda on a GPU machine); "
              "nothing measured.")
        return 0
    import triton

    dtype = DTYPES[args.dtype]
    shapes = [tuple(int(v) for v in s.lower().split("x")) for s in args.shapes.split(",")]
    gen = torch.Generator(device="cuda").manual_seed(0)
    rows: list[Row] = []
    sweeps: list[str] = []
    for N, C in shapes:
        x0 = torch.randn(N, C, device="cuda", dtype=dtype, generator=gen)
        y = torch.randint(0, C, (N,), device="cuda", generator=gen)
        cases = {(name, variant): fn for variant in ("ce", "focal", "ls")
                 for name, fn in softmax_providers(variant).items()}
        try:
            rows += measure(cases, x0, y, args.repeats)
        except Exception as err:  # report and go on to the next shape (e.g. out of memory)
            print(f"{N}x{C}: {type(err).__name__}: {err}", file=sys.stderr)
        torch.cuda.empty_cache()
        if args.sweep:
            best = sweep(x0, y, args.repeats)[:5]
            sweeps.append(f"{N}x{C}: " + "; ".join(
                f"BLOCK_C={bc} BLOCK_R={br} warps={w}: {ms:.3f} ms" for bc, br, w, ms in best))
        del x0, y
        torch.cuda.empty_cache()
    if args.binary:
        rows += binary_rows([(65536, 80), (8192, 1000)], dtype, args.repeats)

    props = torch.cuda.get_device_properties(0)
    header = (f"{props.name}, torch {torch.__version__}, triton {triton.__version__}, "
              f"{args.dtype}, median of {args.repeats}")
    report = "\n".join([header, "", table(rows), "", *checks(rows, args.dtype)])
    if sweeps:
        report += "\n\nSweep (fastest 5, forward+backward):\n" + "\n".join(sweeps)
    print(report)
    if args.out:
        with open(args.out, "w") as fh:
            fh.write(report + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
