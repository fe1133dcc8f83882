"""Dense combinations: every option of the softmax family alone, in pairs and all together, as a
ratio to plain cross-entropy on the same shape, forward+backward; the binary family against BCE.

A cell needs a term per class when a focal term meets label smoothing or probability targets
(and for the confidence penalty and softcap); those cells are the ones this benchmark watches.
All figures of a table come from one run: the cases are interleaved round by round in a new
shuffled order (``_shared.interleaved_times``), each figure is the median of its rounds, and
only ratios between cases of the same table are compared. In a matrix, plain CE, the denominator
of every ratio, runs three times a round and its rounds are pooled.

Tables (each printed as markdown, all written to ``--out``):

1. floors: C in {100, 1000, 32000} at N C = 2^23 (``--quick``: 2^20), fp32, (N, C), index and
   probability targets: plain CE, focal 2 + smoothing 0.1, FLSD-53 + smoothing, focal 2.5 +
   smoothing, probability targets (plain, with smoothing, with focal 2);
2. the matrix at C = ``--C``: each option alone, every pair, the full mix; index and probability
   targets; fp32 and bf16; (N, C) and (N, C, H, W) logits; each with the naive autograd
   composition of the same options (``naive_softmax``) for the ">= 2x faster than naive" floor;
3. the binary family at N = 65,536, C = 80: BCE, sigmoid focal, the asymmetric loss, and the
   torchvision-style composition;
4. ``torch.exp`` and ``torch.log`` over the same number of elements, against plain CE.

The floors (fp32, forward+backward): focal 2 + smoothing and FLSD-53 + smoothing <= 1.5x CE;
focal 2.5 + smoothing <= 2.5x; probability targets (plain, smoothing, focal 2) <= 2x; every
matrix cell >= 2x faster than its naive composition; asymmetric (4, 1, clip 0.05) <= 1.5x sigmoid
focal, (2.5, 0.5) <= 2.5x.

Usage: python benchmarks/bench_dense.py [--quick] [--threads 2] [--repeats 7] [--C 1000]
       [--device cpu|cuda] [--out benchmarks/results/dense.md]
``--device cuda`` runs the same tables on the GPU (the Triton kernels).
"""

from __future__ import annotations

import argparse
import itertools
import statistics
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

import crossent
from _shared import backward_steps, eager_sigmoid_focal, interleaved_times
from crossent.bench import machine_info

Case = tuple[torch.Tensor, Callable[[torch.Tensor], torch.Tensor]]

#: times plain CE is measured in each round of a matrix, the denominator of its ratios
BASELINE_COPIES = 3

#: option families; one value of each enters a matrix cell
FAMILIES: dict[str, dict] = {
    "focal 2": {"gamma": 2.0},
    "smoothing 0.1": {"label_smoothing": 0.1},
    "weight": {"weighted": True},
    "z-loss": {"z_loss": 1e-4},
    "softcap 30": {"softcap": 30.0},
    "confidence 0.1": {"confidence_penalty": 0.1},
    "poly-1": {"poly1": 1.0},
}


def matrix_cells() -> dict[str, dict]:
    """Each option alone, every pair, the full mix (name: keyword options)."""
    cells = {name: dict(kw) for name, kw in FAMILIES.items()}
    for a, b in itertools.combinations(FAMILIES, 2):
        cells[f"{a} + {b}"] = {**FAMILIES[a], **FAMILIES[b]}
    mix: dict = {}
    for kw in FAMILIES.values():
        mix.update(kw)
    cells["all"] = mix
    return cells


def naive_softmax(x: torch.Tensor, target: torch.Tensor, weight: torch.Tensor | None = None, *,
                  gamma: float | Callable = 0.0, label_smoothing: float = 0.0, z_loss: float = 0.0,
                  softcap: float | None = None, confidence_penalty: float = 0.0,
                  poly1: float = 0.0) -> torch.Tensor:
    """The options composed with eager ops and autograd, as they are usually written: softcap,
    log_softmax, a focal factor per class, smoothed targets, class weights, z-loss, entropy,
    Poly-1; mean over samples weighted by w_y (index targets) or the row count."""
    C = x.shape[1]
    u = x.float().movedim(1, -1).reshape(-1, C)
    if softcap:
        u = softcap * torch.tanh(u / softcap)
    logq = F.log_softmax(u, dim=1)
    q = logq.exp()
    if target.is_floating_point():
        t = target.float().movedim(1, -1).reshape(-1, C)
        s = torch.ones(u.shape[0])
    else:
        y = target.reshape(-1)
        t = F.one_hot(y, C).float()
        s = weight[y] if weight is not None else torch.ones(u.shape[0])
    tt = t * (1 - label_smoothing) + label_smoothing / C if label_smoothing else t
    a = tt * weight if weight is not None else tt
    nll = -logq
    if callable(gamma):
        gamma = gamma((t * q).sum(1).detach()).reshape(-1, 1)
    if not isinstance(gamma, float) or gamma:
        nll = (1 - q).pow(gamma) * nll
    loss = (a * nll).sum(1)
    if z_loss:
        loss = loss + s * z_loss * torch.logsumexp(u, dim=1).square()
    if confidence_penalty:
        loss = loss - s * confidence_penalty * -(q * logq).sum(1)
    if poly1:
        loss = loss + s * poly1 * (1 - (tt * q).sum(1))
    return loss.sum() / s.sum()


def _inputs(N: int, C: int, spatial: int, dtype: torch.dtype, device: str, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    shape = (N, C) if spatial == 1 else (N, C, spatial)
    x = torch.randn(*shape, generator=g).to(dtype=dtype, device=device).requires_grad_()
    y = torch.randint(0, C, (N,) if spatial == 1 else (N, spatial), generator=g).to(device)
    p = torch.softmax(torch.randn(*shape, generator=g), dim=1).to(device)
    w = (torch.rand(C, generator=g) + 0.5).to(device)
    return x, y, p, w


def _time(
    cases: dict[str, Case], repeats: int, device: str, pooled: dict[str, list[str]] | None = None
) -> dict[str, float]:
    """Median ms of every case; ``pooled`` names cases whose rounds are pooled into one figure."""
    times = interleaved_times(backward_steps(cases), repeats, device=device, one_thread="--threads 1")
    for name, parts in (pooled or {}).items():
        times[name] = [v for part in parts for v in times.pop(part)]
    return {name: statistics.median(v) for name, v in times.items()}


def _crossent(kw: dict, target: torch.Tensor, w: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor]:
    opts = {k: v for k, v in kw.items() if k != "weighted"}
    weight = w if kw.get("weighted") else None
    return lambda x: crossent.cross_entropy(x, target, weight=weight, **opts)


def _naive(kw: dict, target: torch.Tensor, w: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor]:
    opts = {k: v for k, v in kw.items() if k != "weighted"}
    weight = w if kw.get("weighted") else None
    return lambda x: naive_softmax(x, target, weight, **opts)


# --------------------------------------------------------------------------------- tables

FLOOR_CELLS = {
    "CE": ("index", {}),
    "focal 2 + smoothing 0.1": ("index", {"gamma": 2.0, "label_smoothing": 0.1}),
    "FLSD-53 + smoothing 0.1": ("index", {"gamma": crossent.flsd53, "label_smoothing": 0.1}),
    "focal 2.5 + smoothing 0.1": ("index", {"gamma": 2.5, "label_smoothing": 0.1}),
    "prob targets": ("prob", {}),
    "prob targets + smoothing 0.1": ("prob", {"label_smoothing": 0.1}),
    "prob targets + focal 2": ("prob", {"gamma": 2.0}),
}
FLOOR_LIMITS = {
    "focal 2 + smoothing 0.1": 1.5, "FLSD-53 + smoothing 0.1": 1.5, "focal 2.5 + smoothing 0.1": 2.5,
    "prob targets": 2.0, "prob targets + smoothing 0.1": 2.0, "prob targets + focal 2": 2.0,
}


def floors_table(elements: int, Cs: list[int], repeats: int, device: str) -> tuple[list[str], list[tuple]]:
    lines = ["| C | N | CE (ms) | " + " | ".join(n for n in FLOOR_CELLS if n != "CE") + " |",
             "|---:|---:|---:|" + "---:|" * (len(FLOOR_CELLS) - 1)]
    checks = []
    for C in Cs:
        N = elements // C
        x, y, p, w = _inputs(N, C, 1, torch.float32, device)
        cases = {name: (x, _crossent(kw, y if kind == "index" else p, w))
                 for name, (kind, kw) in FLOOR_CELLS.items()}
        t = _time(cases, repeats, device)
        ce = t["CE"]
        cells = []
        for name in FLOOR_CELLS:
            if name == "CE":
                continue
            r = t[name] / ce
            cells.append(f"{r:.2f}x")
            checks.append((f"{name}, C={C}", r, FLOOR_LIMITS[name], "<="))
        lines.append(f"| {C:,} | {N:,} | {ce:.1f} | " + " | ".join(cells) + " |")
    return lines, checks


def matrix_table(N: int, C: int, spatial: int, dtype: torch.dtype, kinds: list[str], cells: dict[str, dict],
                 repeats: int, device: str, naive: bool) -> tuple[list[str], list[tuple], tuple[str, float]]:
    x, y, p, w = _inputs(N, C, spatial, dtype, device)
    # Plain CE is every ratio's denominator: timed as BASELINE_COPIES cases in each round (their
    # rounds pooled), so that one unlucky draw of its place among the 100-odd cases (right after
    # a naive composition has freed its buffers, say) does not move the whole column.
    cases: dict[str, Case] = {f"CE {i}": (x, _crossent({}, y, w)) for i in range(BASELINE_COPIES)}
    for kind in kinds:
        target = y if kind == "index" else p
        for name, kw in cells.items():
            cases[f"{kind}|{name}"] = (x, _crossent(kw, target, w))
            if naive:
                cases[f"naive {kind}|{name}"] = (x, _naive(kw, target, w))
    t = _time(cases, repeats, device, pooled={"CE": [f"CE {i}" for i in range(BASELINE_COPIES)]})
    ce = t["CE"]
    head = "| cell | " + " | ".join(
        f"{k} / CE" + (f" | naive {k} / crossent {k}" if naive else "") for k in kinds) + " |"
    lines = [head, "|---|" + "---:|" * (len(kinds) * (2 if naive else 1))]
    checks = []
    worst = ("", 0.0)
    for name in cells:
        row = [name]
        for kind in kinds:
            r = t[f"{kind}|{name}"] / ce
            row.append(f"{r:.2f}x")
            if r > worst[1]:
                worst = (f"{kind} targets, {name}", r)
            if naive:
                speedup = t[f"naive {kind}|{name}"] / t[f"{kind}|{name}"]
                row.append(f"{speedup:.1f}x")
                checks.append((f"naive / crossent, {kind} targets, {name}", speedup, 2.0, ">="))
        lines.append("| " + " | ".join(row) + " |")
    lines.append(f"\nplain CE: {ce:.2f} ms; worst cell: **{worst[0]}** at {worst[1]:.2f}x CE")
    return lines, checks, worst


def binary_table(N: int, C: int, repeats: int, device: str) -> tuple[list[str], list[tuple]]:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(N, C, generator=g).to(device).requires_grad_()
    t = (torch.rand(N, C, generator=g) < 0.1).float().to(device)
    asl = crossent.asymmetric_loss
    cases: dict[str, Case] = {
        "BCE": (x, lambda x: crossent.binary_cross_entropy(x, t)),
        "F.binary_cross_entropy_with_logits": (x, lambda x: F.binary_cross_entropy_with_logits(x, t)),
        "sigmoid focal (gamma 2, alpha 0.25)": (x, lambda x: crossent.sigmoid_focal_loss(x, t)),
        "torchvision-style sigmoid focal (autograd)": (x, lambda x: eager_sigmoid_focal(x, t, 0.25, 2.0)),
        "asymmetric (4, 1, clip 0.05)": (x, lambda x: asl(x, t, gamma_neg=4, gamma_pos=1, clip=0.05)),
        "asymmetric (4, 0, clip 0)": (x, lambda x: asl(x, t, gamma_neg=4, gamma_pos=0, clip=0.0)),
        "asymmetric (2.5, 0.5, clip 0.05)": (
            x, lambda x: asl(x, t, gamma_neg=2.5, gamma_pos=0.5, clip=0.05)),
        "asymmetric (4, 1, clip 0.05), smoothing 0.1": (
            x, lambda x: asl(x, t, gamma_neg=4, gamma_pos=1, clip=0.05, label_smoothing=0.1)),
    }
    tm = _time(cases, repeats, device)
    bce, sf = tm["BCE"], tm["sigmoid focal (gamma 2, alpha 0.25)"]
    lines = ["| case | fwd+bwd (ms) | / BCE | / sigmoid focal |", "|---|---:|---:|---:|"]
    for name, v in tm.items():
        lines.append(f"| {name} | {v:.2f} | {v / bce:.2f}x | {v / sf:.2f}x |")
    checks = [
        (f"{name} / sigmoid focal", tm[name] / sf, limit, "<=")
        for name, limit in (("asymmetric (4, 1, clip 0.05)", 1.5), ("asymmetric (2.5, 0.5, clip 0.05)", 2.5))
    ]
    return lines, checks


def transcendental_table(elements: int, C: int, repeats: int, device: str) -> list[str]:
    """torch.exp and torch.log over the same number of elements (out of place, fp32), against
    the forward+backward of plain CE and of focal 2.5 + smoothing (one exp per element for CE, one
    exp and one log more per element for a non-integer gamma)."""
    x, y, _, w = _inputs(elements // C, C, 1, torch.float32, device)
    xd = x.detach()
    pos = xd.abs() + 0.5
    steps = {
        "torch.exp": lambda: torch.exp(xd),
        "torch.log": lambda: torch.log(pos),
        "torch.exp + torch.log + torch.exp": lambda: torch.exp(torch.log(torch.exp(xd))),
    }
    ce_steps = backward_steps({
        "crossent CE (fwd+bwd)": (x, _crossent({}, y, w)),
        "crossent focal 2.5 + smoothing 0.1 (fwd+bwd)": (
            x, _crossent({"gamma": 2.5, "label_smoothing": 0.1}, y, w)),
    })
    for step in steps.values():
        step()
    all_steps = {**steps, **ce_steps}
    if device == "cpu":
        times = interleaved_times(all_steps, repeats, one_thread="--threads 1")
    else:
        from crossent.bench import interleaved_times as timed

        times = timed(all_steps, repeats, device=device)
    t = {k: statistics.median(v) for k, v in times.items()}
    lines = [f"{elements:,} fp32 elements (N={elements // C:,}, C={C:,})\n",
             "| op | ms | ns / element |", "|---|---:|---:|"]
    for name, v in t.items():
        lines.append(f"| {name} | {v:.2f} | {v * 1e6 / elements:.3f} |")
    return lines


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="2^20 elements, the singles and the mix, 3 rounds")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=None)
    ap.add_argument("--C", type=int, default=1000, help="classes of the matrix")
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "dense.md")
    args = ap.parse_args()
    if args.device == "cpu":
        torch.set_num_threads(args.threads)
    elements = 2**20 if args.quick else 2**23
    repeats = args.repeats or (3 if args.quick else 7)
    Cs = [1000] if args.quick else [100, 1000, 32000]
    cells = matrix_cells()
    if args.quick:
        cells = {k: v for k, v in cells.items() if " + " not in k}

    out: list[str] = []

    def emit(text: str = "") -> None:
        print(text, flush=True)
        out.append(text)

    info = machine_info(args.device)
    emit("machine: " + ", ".join(f"{k}={v}" for k, v in info.items()))
    emit(f"torch {torch.__version__}, crossent {crossent.__version__}, device {args.device}"
         + (f", {args.threads} threads" if args.device == "cpu" else ""))
    emit(f"forward+backward, median of {repeats} interleaved rounds; ratios within one table\n")
    checks: list[tuple] = []

    emit(f"### Floors: ratio to plain CE, fp32, (N, C), N C = {elements:,}\n")
    lines, c = floors_table(elements, Cs, repeats, args.device)
    checks += c
    for line in lines:
        emit(line)

    C = args.C
    N = elements // C
    worst_all: list[tuple[str, float]] = []
    layouts = [("(N, C)", 1, N)] + ([("(N, C, H, W)", 64, max(1, N // 64))] if not args.quick else [])
    for dtype_name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        for layout, spatial, n in layouts:
            kinds = ["index", "prob"] if spatial == 1 else ["index"]
            naive = dtype == torch.float32
            sub = cells if (dtype == torch.float32 and spatial == 1) else {
                k: v for k, v in cells.items() if " + " not in k}
            which = "every pair" if len(sub) > 8 else "singles and the mix"
            emit(f"\n### Matrix: {dtype_name}, {layout} logits, C = {C:,}, "
                 f"{n * C * spatial:,} elements ({which})\n")
            lines, c, worst = matrix_table(n, C, spatial, dtype, kinds, sub, repeats, args.device, naive)
            checks += c
            worst_all.append((f"{dtype_name} {layout}: {worst[0]}", worst[1]))
            for line in lines:
                emit(line)

    emit("\n### Binary family: N = 65,536, C = 80, fp32\n")
    lines, c = binary_table(65536 if not args.quick else 16384, 80, repeats, args.device)
    checks += c
    for line in lines:
        emit(line)

    emit("\n### Transcendentals: torch.exp / torch.log over the same element count\n")
    for line in transcendental_table(elements, 1000, repeats, args.device):
        emit(line)

    emit("\n### Worst cells\n")
    for name, r in worst_all:
        emit(f"- {name}: {r:.2f}x CE")
    emit("\n### Floors\n")
    emit("| check | value | floor | holds |")
    emit("|---|---:|---:|---|")
    failed = 0
    for name, value, floor, op in checks:
        ok = value >= floor if op == ">=" else value <= floor
        failed += not ok
        emit(f"| {name} | {value:.2f} | {op} {floor} | {'yes' if ok else 'NO'} |")
    emit(f"\n{len(checks) - failed} of {len(checks)} floors hold")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(out) + "\n")
    print(f"\nwritten to {args.out}")


if __name__ == "__main__":
    main()
