"""``crossent bench``: time and memory of crossent against PyTorch and friends.

Providers: ``crossent`` (on the CPU its native kernel); ``crossent-ops`` (crossent's torch-op
path, ``backend="torch"``); ``torch`` (eager ``F.cross_entropy``; for focal, the naive
composition below); ``naive`` (log_softmax, gather, pow: how focal / smoothing are usually
written); ``compile`` (``torch.compile`` of the torch provider); ``liger`` (Liger-Kernel's
cross entropy, CUDA only, when installed). Variants: ``ce``, ``focal`` (gamma 2), ``ls``
(smoothing 0.1).

Reports the median time of forward only and forward+backward, peak extra memory of one
forward+backward, achieved bandwidth and its fraction of the floor. The floor of a fused loss
is to read the logits once and write the gradient once: 2 x N x C x bytes (forward only:
N x C x bytes). Peak memory on the CPU is the kernel's high-water mark of resident memory
(VmHWM, reset through /proc/self/clear_refs) minus the resident memory before the call; on
CUDA it is ``torch.cuda.max_memory_allocated`` minus the allocation before the call.
"""

from __future__ import annotations

import argparse
import csv
import ctypes
import gc
import json
import platform
import random
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

import crossent

__all__ = ["BenchResult", "add_arguments", "machine_info", "main", "peak_extra_memory", "time_median"]

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
VARIANTS: dict[str, dict] = {"ce": {}, "focal": {"gamma": 2.0}, "ls": {"label_smoothing": 0.1}}
DEFAULT_SHAPES = {
    "cpu": "2048x32000,65536x80,65536x1000",
    "cuda": "65536x80,65536x1000,2048x32000,8192x32000,2048x128256,8192x128256",
}


@dataclass
class BenchResult:
    provider: str
    variant: str
    N: int
    C: int
    dtype: str
    device: str
    fwd_ms: float | None
    fwd_bwd_ms: float | None
    peak_extra_mib: float | None
    gb_per_s: float | None
    floor_fraction: float | None


# ----------------------------------------------------------------------------- measuring


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def time_median(fn: Callable[[], object], device: str, *, repeats: int = 7, warmup: int = 2) -> float:
    """Median wall time of ``fn`` in milliseconds (CUDA: synchronised around each call)."""
    for _ in range(warmup):
        fn()
    _sync(device)
    times = []
    for _ in range(repeats):
        _sync(device)
        t0 = time.perf_counter()
        fn()
        _sync(device)
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def _proc_status(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key):
                return int(line.split()[1]) * 1024
    raise OSError(f"{key} not in /proc/self/status")


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
    try:
        import os

        info["cores"] = str(os.cpu_count())
    except Exception:  # pragma: no cover
        pass
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


def naive_loss(x: torch.Tensor, y: torch.Tensor, gamma: float = 0.0, label_smoothing: float = 0.0):
    """How focal loss and smoothing are usually written: an autograd graph of eager ops."""
    logp = F.log_softmax(x.float(), dim=1)
    logp_y = logp.gather(1, y[:, None]).squeeze(1)
    nll = -logp_y
    if gamma:
        nll = (1 - logp_y.exp()).pow(gamma) * nll
    if label_smoothing:
        nll = (1 - label_smoothing) * nll - label_smoothing * logp.mean(dim=1)
    return nll.mean()


def _provider(name: str, variant: dict, device: str) -> Callable | None:
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
        return torch.compile(base, dynamic=False)
    if name == "liger":
        if device != "cuda" or "gamma" in variant:
            return None
        try:
            from liger_kernel.transformers import LigerCrossEntropyLoss
        except ImportError:
            return None
        mod = LigerCrossEntropyLoss(label_smoothing=variant.get("label_smoothing", 0.0))
        return lambda x, y: mod(x, y)
    raise ValueError(
        f"unknown provider {name!r}: choose from crossent, crossent-ops, torch, naive, compile, liger"
    )


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

        def fwd(fn: Callable = fn, x: torch.Tensor = x) -> None:
            with torch.no_grad():
                fn(x, y)

        def fwd_bwd(fn: Callable = fn, xg: torch.Tensor = xg) -> None:
            fn(xg, y).backward()
            xg.grad = None

        steps.append(((provider, variant, dtype_name), fwd, fwd_bwd))
    for _, fwd, fwd_bwd in steps:  # warm-up (and compilation for torch.compile)
        for _ in range(2):
            fwd()
            fwd_bwd()
    times: dict[tuple[str, str, str], tuple[list[float], list[float]]] = {k: ([], []) for k, _, _ in steps}
    order = random.Random(0)
    for _ in range(repeats):
        # a new order each round: no case always follows the same one (a case that frees
        # hundreds of MiB can slow the next one down)
        for key, fwd, fwd_bwd in order.sample(steps, len(steps)):
            times[key][0].append(time_median(fwd, device, repeats=1, warmup=0))
            times[key][1].append(time_median(fwd_bwd, device, repeats=1, warmup=0))
    copy_ms = {}
    for dtype_name, (x, _) in inputs.items():
        # The floor measured on this machine: one read of the logits and one write of an N x C
        # buffer is exactly a copy.
        out = torch.empty_like(x)
        copy_ms[dtype_name] = time_median(lambda out=out, x=x: out.copy_(x), device, repeats=repeats)
        del out
    results = []
    for (provider, variant, dtype_name), _, fwd_bwd in steps:
        t_fwd = statistics.median(times[(provider, variant, dtype_name)][0])
        t_fb = statistics.median(times[(provider, variant, dtype_name)][1])
        peak = peak_extra_memory(fwd_bwd, device) if memory else None
        floor_bytes = 2 * N * C * inputs[dtype_name][0].element_size()
        r = BenchResult(
            provider=provider, variant=variant, N=N, C=C, dtype=dtype_name, device=device,
            fwd_ms=round(t_fwd, 3), fwd_bwd_ms=round(t_fb, 3),
            peak_extra_mib=None if peak is None else round(peak / 2**20, 1),
            gb_per_s=round(floor_bytes / (t_fb * 1e-3) / 1e9, 2),
            floor_fraction=round(copy_ms[dtype_name] / t_fb, 3),
        )
        results.append(r)
        if progress is not None:
            progress(r)
    return results


# ------------------------------------------------------------------------------- reports


def markdown_table(results: list[BenchResult]) -> str:
    """Results with the ratio to torch eager and to crossent plain CE of the same shape/dtype."""
    head = (
        "| provider | variant | N x C | dtype | fwd ms | fwd+bwd ms | peak extra MiB | GB/s "
        "| copy floor / this | torch / this (fwd+bwd) | this / crossent-ce |\n"
        "|---|---|---|---|---:|---:|---:|---:|---:|---:|---:|\n"
    )
    key = {(r.provider, r.variant, r.N, r.C, r.dtype): r for r in results}
    rows = []
    for r in results:
        torch_r = key.get(("torch", r.variant, r.N, r.C, r.dtype))
        ce_r = key.get(("crossent", "ce", r.N, r.C, r.dtype))
        speedup = f"{torch_r.fwd_bwd_ms / r.fwd_bwd_ms:.2f}x" if torch_r else ""
        vs_ce = f"{r.fwd_bwd_ms / ce_r.fwd_bwd_ms:.2f}" if ce_r else ""
        rows.append(
            f"| {r.provider} | {r.variant} | {r.N} x {r.C} | {r.dtype} | {r.fwd_ms} | {r.fwd_bwd_ms} "
            f"| {r.peak_extra_mib} | {r.gb_per_s} | {r.floor_fraction} | {speedup} | {vs_ce} |"
        )
    return head + "\n".join(rows) + "\n"


#: Where issue 6 sets its floors: the CPU shape, and the GPU shape (plus the same ratios
#: elsewhere, reported without a floor).
FLOOR_SHAPES = {(2048, 32000), (8192, 128256)}


def floor_table(results: list[BenchResult]) -> str:
    """The ratios issue 6 sets floors for, per shape and dtype: torch eager CE over crossent CE,
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
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

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
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory measurement")
    parser.add_argument("--out", type=Path, default=Path("runs/bench"), help="folder for CSV, markdown, plot")


def main(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.table import Table

    if args.device == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda needs a CUDA GPU; none is visible")
    shapes = _parse_shapes(args.shapes or DEFAULT_SHAPES[args.device])
    dtypes = args.dtypes.split(",")
    for d in dtypes:
        if d not in DTYPES:
            raise ValueError(f"--dtypes: unknown dtype {d!r}; choose from {', '.join(DTYPES)}")
    variants = args.variants.split(",")
    for v in variants:
        if v not in VARIANTS:
            raise ValueError(f"--variants: unknown variant {v!r}; choose from {', '.join(VARIANTS)}")
    default_providers = (
        "crossent,torch,naive,compile,liger" if args.device == "cuda" else "crossent,crossent-ops,torch,naive"
    )
    providers = (args.providers or default_providers).split(",")
    for p in providers:
        if p not in PROVIDERS:
            raise ValueError(f"--providers: unknown provider {p!r}; choose from {', '.join(PROVIDERS)}")
    if not 1 <= args.repeats <= MAX_REPEATS:
        raise ValueError(f"--repeats must lie in 1..{MAX_REPEATS}, got {args.repeats}")
    _check_memory(shapes, dtypes, args.device)
    from crossent.cli import check_out_dir

    check_out_dir(args.out)  # before the measurements: a file in the way fails now

    console = Console()
    info = machine_info(args.device)
    console.print("machine: " + ", ".join(f"{k}={v}" for k, v in info.items()))
    results: list[BenchResult] = []

    def report(r: BenchResult) -> None:
        console.print(f"  {r.provider:12s} {r.variant:6s} {r.N}x{r.C} {r.dtype}: fwd {r.fwd_ms} ms, "
                      f"fwd+bwd {r.fwd_bwd_ms} ms, peak {r.peak_extra_mib} MiB")

    for N, C in shapes:
        cases = [
            (p, v, d) for d in dtypes for v in variants for p in providers
            # the torch provider already is the naive composition for focal
            if not (p == "naive" and v == "focal" and "torch" in providers)
        ]
        results += run_shape(cases, N, C, args.device, repeats=args.repeats, memory=not args.no_memory,
                             progress=report)

    table = Table(title=f"crossent bench ({args.device})")
    for col in ("provider", "variant", "N x C", "dtype", "fwd ms", "fwd+bwd ms", "peak MiB", "GB/s"):
        table.add_column(col)
    for r in results:
        table.add_row(r.provider, r.variant, f"{r.N}x{r.C}", r.dtype, str(r.fwd_ms), str(r.fwd_bwd_ms),
                      str(r.peak_extra_mib), str(r.gb_per_s))
    console.print(table)
    console.print(floor_table(results))

    args.out.mkdir(parents=True, exist_ok=True)
    with open(args.out / "bench.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(asdict(results[0]).keys()) if results else ["provider"])
        writer.writeheader()
        for r in results:
            writer.writerow(asdict(r))
    md = (
        "machine: " + ", ".join(f"{k}={v}" for k, v in info.items()) + "\n\n" + markdown_table(results)
        + "\n" + floor_table(results)
    )
    (args.out / "bench.md").write_text(md)
    (args.out / "machine.json").write_text(json.dumps(info, indent=2))
    if results:
        _plot(results, args.out / "bench.png")
    console.print(f"wrote {args.out}/bench.csv, bench.md, bench.png")
    return 0
