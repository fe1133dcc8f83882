"""The cost of one loss call at small shapes on the CPU, where the Python and dispatch around the
kernel, not the kernel, take the time: forward + backward, eager.

Cases (fp32, ``reduction="mean"``): ``crossent.cross_entropy`` against ``F.cross_entropy`` at
64 x 10 and 256 x 1,000 (class-index targets); ``crossent.binary_cross_entropy`` against
``F.binary_cross_entropy_with_logits`` at 256 x 1. One step is ``calls`` loss calls, each with
its ``.backward()`` (the leaf's ``.grad`` accumulates; nothing else is cleared), timed as a whole;
the steps are interleaved round by round in a shuffled order (``_shared.interleaved_times``), and
the table gives the median per call and the ratio of medians of the same run.

``--src DIR`` imports crossent from ``DIR`` (another checkout's ``src``) instead of the installed
one, so that two versions can be timed in alternating runs of this script.

Usage::

    python benchmarks/bench_overhead.py [--repeats 9] [--calls 500] [--src DIR]
"""

from __future__ import annotations

import argparse
import statistics
import sys
from collections.abc import Callable


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=9, help="rounds (default 9)")
    parser.add_argument("--calls", type=int, default=500, help="loss calls per timed step (default 500)")
    parser.add_argument("--src", default=None, help="import crossent from this directory")
    args = parser.parse_args(argv)
    if args.repeats < 1 or args.calls < 1:
        parser.error("--repeats and --calls must be >= 1")
    if args.src:
        sys.path.insert(0, args.src)

    import torch
    import torch.nn.functional as F

    import crossent
    from _shared import interleaved_times
    from crossent.bench import machine_info

    gen = torch.Generator().manual_seed(0)

    def softmax_pair(n: int, c: int) -> dict[str, Callable[[], object]]:
        x = torch.randn(n, c, generator=gen).requires_grad_()
        y = torch.randint(0, c, (n,), generator=gen)
        return {f"crossent.cross_entropy {n} x {c}": lambda: crossent.cross_entropy(x, y).backward(),
                f"F.cross_entropy {n} x {c}": lambda: F.cross_entropy(x, y).backward()}

    xb = torch.randn(256, 1, generator=gen).requires_grad_()
    tb = torch.rand(256, 1, generator=gen)
    cases: dict[str, Callable[[], object]] = {
        **softmax_pair(64, 10),
        **softmax_pair(256, 1000),
        "crossent.binary_cross_entropy 256 x 1": lambda: crossent.binary_cross_entropy(xb, tb).backward(),
        "F.binary_cross_entropy_with_logits 256 x 1":
            lambda: F.binary_cross_entropy_with_logits(xb, tb).backward(),
    }

    def repeated(fn: Callable[[], object]) -> Callable[[], None]:
        def step() -> None:
            for _ in range(args.calls):
                fn()
        return step

    times = interleaved_times({k: repeated(f) for k, f in cases.items()}, args.repeats)
    per_call = {k: statistics.median(ts) * 1e3 / args.calls for k, ts in times.items()}  # ms -> us
    print(", ".join(f"{k}: {v}" for k, v in machine_info("cpu").items()))
    print(f"crossent from {crossent.__file__}")
    print(f"\nmedian of {args.repeats} rounds of {args.calls} calls, forward + backward, per call\n")
    print("| case | us per call | crossent / torch |")
    print("|---|---:|---:|")
    names = list(cases)
    for ours, theirs in zip(names[::2], names[1::2], strict=True):
        print(f"| `{ours}` | {per_call[ours]:.1f} | {per_call[ours] / per_call[theirs]:.2f}x |")
        print(f"| `{theirs}` | {per_call[theirs]:.1f} | |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
