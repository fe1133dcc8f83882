"""Benchmark: fused ``crossent.linear_cross_entropy`` vs the unfused ``F.cross_entropy(h @ W.T)``.

Measures the median forward+backward time and the peak *extra* memory (everything allocated
during forward+backward above what was live before it, the gradients included) of one loss
over ``hidden (N, D)`` and ``weight (V, D)``, both requiring grad.

CPU memory: ``torch.profiler.profile(profile_memory=True)`` records every allocation and free of
the CPU allocator as a ``[memory]`` event with a signed byte count; the events are sorted by
time and the peak is the maximum of their running sum (``_shared.cpu_peak_bytes``). The method
is checked first on a lone ``torch.empty`` of known size (its peak must be exactly that size). CUDA memory:
``torch.cuda.max_memory_allocated`` minus the memory allocated before the call.

Usage::

    python benchmarks/bench_linear.py                      # CPU, N=2048 D=1024 V=32000 fp32
    python benchmarks/bench_linear.py --device cuda        # H100 shape, bf16, + Liger / CCE
    python benchmarks/bench_linear.py --out benchmarks/results/linear.md
"""

from __future__ import annotations

import argparse
import os
import statistics
from collections.abc import Callable

import torch
import torch.nn.functional as F

import crossent
from _shared import cpu_model, cpu_peak_bytes, interleaved_times, validate_cpu_peak

Provider = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def providers(device: str) -> dict[str, Provider]:
    def unfused(h, w, y):
        return F.cross_entropy(h @ w.t(), y)

    def fused(h, w, y):
        return crossent.linear_cross_entropy(h, w, y, backend="torch")

    out: dict[str, Provider] = {"unfused F.cross_entropy(h @ W.T)": unfused}
    if device == "cuda":
        out["torch.compile unfused"] = torch.compile(unfused)
    out["crossent.linear_cross_entropy (chunked)"] = fused
    if device == "cuda":
        try:
            from crossent.backends.triton import linear as _tl  # noqa: F401

            out["crossent.linear_cross_entropy (triton)"] = (
                lambda h, w, y: crossent.linear_cross_entropy(h, w, y, backend="triton")
            )
        except ImportError:
            pass
        try:
            from liger_kernel.transformers.functional import liger_fused_linear_cross_entropy

            out["Liger-Kernel fused linear CE"] = lambda h, w, y: liger_fused_linear_cross_entropy(
                h, w, y
            )
        except ImportError:
            pass
        try:
            from cut_cross_entropy import linear_cross_entropy as cce

            out["Cut Cross-Entropy"] = lambda h, w, y: cce(h, w, y)
        except ImportError:
            pass
    return out


def run_once(fn: Provider, h: torch.Tensor, w: torch.Tensor, y: torch.Tensor) -> None:
    h.grad = None
    w.grad = None
    loss = fn(h, w, y)
    loss.backward()


def measure(
    provs: dict[str, Provider], h, w, y, device: str, repeats: int
) -> dict[str, tuple[float, int] | str]:
    """Median time and peak extra memory per provider; the timed runs are interleaved across
    providers (round-robin), so load from other jobs on a shared machine hits all alike."""
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    times: dict[str, list[float]] = {}
    errors: dict[str, str] = {}
    for name, fn in provs.items():
        try:
            run_once(fn, h, w, y)  # warm-up (and compilation)
            sync()
            times[name] = []
        except Exception as err:  # an optional provider failing must not hide the others
            errors[name] = f"{type(err).__name__}: {err}"[:80]
    def step(name: str) -> Callable[[], None]:
        def timed() -> None:
            h.grad = w.grad = None
            run_once(provs[name], h, w, y)

        return timed

    # crossent bench's harness (ms): rounds interleaved in a new shuffled order each round
    ms = interleaved_times({name: step(name) for name in times}, repeats, device=device, warmup=0)
    times = {name: [t / 1e3 for t in ts] for name, ts in ms.items()}
    out: dict[str, tuple[float, int] | str] = {}
    for name, fn in provs.items():
        if name in errors:
            out[name] = errors[name]
            continue
        h.grad = w.grad = None
        if device == "cuda":
            torch.cuda.synchronize()
            torch.cuda.empty_cache()
            base = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
            run_once(fn, h, w, y)
            torch.cuda.synchronize()
            peak = torch.cuda.max_memory_allocated() - base
        else:
            peak = cpu_peak_bytes(lambda fn=fn: run_once(fn, h, w, y))
        h.grad = w.grad = None
        out[name] = (statistics.median(times[name]), peak)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--n", type=int, default=None)
    ap.add_argument("--d", type=int, default=None)
    ap.add_argument("--v", type=int, default=None)
    ap.add_argument("--dtype", default=None, choices=["float32", "bfloat16"])
    ap.add_argument("--repeats", type=int, default=None)
    ap.add_argument("--out", default=None, help="also write the markdown table to this file")
    args = ap.parse_args()
    cuda = args.device == "cuda"
    N = args.n or (8192 if cuda else 2048)
    D = args.d or (4096 if cuda else 1024)
    V = args.v or (128_256 if cuda else 32_000)
    dtype = getattr(torch, args.dtype or ("bfloat16" if cuda else "float32"))
    repeats = args.repeats or (10 if cuda else 5)

    if not cuda:
        validate_cpu_peak()
    torch.manual_seed(0)
    h = (torch.randn(N, D, device=args.device) / D**0.5).to(dtype).requires_grad_()
    w = (torch.randn(V, D, device=args.device) * 0.02).to(dtype).requires_grad_()
    y = torch.randint(0, V, (N,), device=args.device)
    lower = (N * D + V * D) * h.element_size()  # d_hidden + d_weight, in the inputs' dtype

    rows = []
    for name, res in measure(providers(args.device), h, w, y, args.device, repeats).items():
        if isinstance(res, str):
            rows.append((name, None, None, res))
        else:
            rows.append((name, res[0], res[1], ""))

    base_t, base_m = rows[0][1], rows[0][2]
    if cuda:
        machine = f"{torch.cuda.get_device_name()}, torch {torch.__version__}"
    else:
        machine = (
            f"{cpu_model()}, {os.cpu_count()} cores, torch {torch.__version__} "
            f"({torch.get_num_threads()} threads)"
        )
    mem_method = (
        "torch.cuda.max_memory_allocated - allocated before"
        if cuda
        else "torch.profiler [memory] events, max of the running sum (checked on a lone "
        "torch.empty)"
    )
    lines = [
        f"### linear + cross-entropy, {args.device}: N={N}, D={D}, V={V}, {str(dtype)[6:]}",
        "",
        f"Machine: {machine}. Peak extra memory: {mem_method}; it includes the gradients. "
        f"Lower bound d_hidden + d_weight = {lower / 2**20:.0f} MiB. Median of {repeats} "
        "forward+backward runs after one warm-up, interleaved across providers.",
        "",
        "| provider | fwd+bwd (ms) | time vs unfused | peak extra (MiB) | memory vs unfused "
        "| memory vs lower bound |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for name, t, peak, err in rows:
        if t is None:
            lines.append(f"| {name} | failed: {err} | | | | |")
            continue
        lines.append(
            f"| {name} | {t * 1e3:.0f} | {t / base_t:.2f}x | {peak / 2**20:.0f} | "
            f"{peak / base_m:.2f}x | {peak / lower:.2f}x |"
        )
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        with open(args.out, "a") as f:
            f.write(text + "\n")


if __name__ == "__main__":
    main()
