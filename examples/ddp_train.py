"""Data-parallel training with a vocab-parallel head and exact global loss normalisation.

Run on CPU with two processes::

    torchrun --standalone --nproc_per_node=2 examples/ddp_train.py

What it shows, on a small synthetic next-token task (vocabulary of 37 classes, split 19 / 18):

- the trunk (embedding + MLP) is replicated and trained with ``DistributedDataParallel``; each
  rank reads its own micro-batches (data parallelism);
- the output head is sharded by vocabulary: rank r holds only the rows of the output weight
  for its classes. The hidden states of every rank are all-gathered, so the head sees all the
  tokens of the micro-batch, and :func:`crossent.distributed.vocab_parallel_linear_cross_entropy`
  computes the exact softmax cross-entropy over the global vocabulary (2 all-reduces in forward,
  1 all-reduce of d_hidden in backward);
- every step accumulates 3 micro-batches whose numbers of valid (non-padding) targets differ;
  :func:`crossent.distributed.global_valid_count` counts the valid targets of the whole step
  (one all-reduce) and each micro-batch back-propagates ``sum of its losses / global count``,
  so the accumulated gradient is exactly that of the step's mean loss.

Gradient bookkeeping: the loss of a micro-batch is the *global* one, replicated on both ranks,
and rank r back-propagates into the trunk only through its own tokens, so the trunk's true
gradient is the *sum* of the ranks' gradients. DDP averages by default; a comm hook makes it
sum. (With a per-rank loss instead, :func:`crossent.distributed.normalized_loss` multiplies by
the world size to undo the average.) At the end, rank 0 gathers the head and recomputes the last
step's loss on one process with :func:`crossent.cross_entropy`: the numbers agree.
"""

from __future__ import annotations

import contextlib
import os
import sys
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel as DDP

import crossent
from crossent import distributed as cd

VOCAB = 37
HIDDEN = 32
TOKENS = 24  # per micro-batch and rank (padding included)
MICRO_BATCHES = 3
STEPS = 40
IGNORE = -100


class _GatherTokens(torch.autograd.Function):
    """all_gather of every rank's hidden states in forward; this rank's rows in backward.

    The incoming gradient is already the sum over ranks (the vocab-parallel head all-reduces
    d_hidden), so the backward only slices it: no collective.
    """

    @staticmethod
    def forward(ctx: Any, h: Tensor) -> Tensor:
        world, rank = dist.get_world_size(), dist.get_rank()
        parts = [torch.empty_like(h) for _ in range(world)]
        dist.all_gather(parts, h.contiguous())
        ctx.rows, ctx.rank = h.shape[0], rank
        return torch.cat(parts)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> Tensor:
        return grad[ctx.rank * ctx.rows : (ctx.rank + 1) * ctx.rows]


def _sum_hook(process_group, bucket):  # no annotations: DDP checks them, and they are strings here
    """DDP comm hook: all-reduce the gradients with SUM (DDP's default divides by the world)."""
    fut = dist.all_reduce(bucket.buffer(), group=process_group, async_op=True).get_future()
    return fut.then(lambda f: f.value()[0])


def make_batch(step: int, m: int, rank: int) -> tuple[Tensor, Tensor]:
    """Synthetic next-token data: y = (7 x + 3) mod V, 10 % label noise, a random pad length."""
    g = torch.Generator().manual_seed(1000 * step + 10 * m + rank)
    x = torch.randint(0, VOCAB, (TOKENS,), generator=g)
    y = (7 * x + 3) % VOCAB
    noise = torch.rand(TOKENS, generator=g) < 0.1
    y = torch.where(noise, torch.randint(0, VOCAB, (TOKENS,), generator=g), y)
    pad = int(torch.randint(0, TOKENS // 2, (), generator=g))
    y[TOKENS - pad :] = IGNORE  # padding: a different number of valid targets per micro-batch
    return x, y


def main() -> None:
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(0)

    trunk = DDP(nn.Sequential(nn.Embedding(VOCAB, HIDDEN), nn.Linear(HIDDEN, HIDDEN), nn.GELU()))
    trunk.register_comm_hook(None, _sum_hook)
    sizes = cd.split_vocab(VOCAB, world)
    start, end = sum(sizes[:rank]), sum(sizes[: rank + 1])
    full_head = torch.randn(VOCAB, HIDDEN) / HIDDEN**0.5  # same seed on every rank
    head = nn.Parameter(full_head[start:end].clone())  # this rank's vocabulary rows only
    opt = torch.optim.Adam([*trunk.parameters(), head], lr=3e-2)
    if rank == 0:
        print(f"world {world}, vocabulary {VOCAB} split {sizes}, {MICRO_BATCHES} micro-batches")

    for step in range(STEPS):
        batches = [make_batch(step, m, rank) for m in range(MICRO_BATCHES)]
        n = cd.global_valid_count([y for _, y in batches], IGNORE)  # one all-reduce per step
        step_loss = 0.0
        opt.zero_grad(set_to_none=True)
        for m, (x, y) in enumerate(batches):
            last = m == MICRO_BATCHES - 1
            # DDP all-reduces the trunk's gradients once per step, on the last micro-batch
            with trunk.no_sync() if not last else contextlib.nullcontext():
                h = _GatherTokens.apply(trunk(x))  # every rank's tokens
                y_all = _all_gather_rows(y)  # and their targets
                loss = cd.vocab_parallel_linear_cross_entropy(
                    h, head, y_all, vocab_sizes=sizes, ignore_index=IGNORE, reduction="sum"
                ) / n.float()
                loss.backward()
            step_loss += float(loss.detach())
        opt.step()
        if rank == 0 and (step % 5 == 0 or step == STEPS - 1):
            print(f"step {step:3d}  valid targets {int(n):3d}  loss {step_loss:.4f}")

    # Check: the last step's loss recomputed on one process, with the gathered head.
    parts = [torch.empty(s, HIDDEN) for s in sizes]
    _gather_uneven(parts, head.detach())
    with torch.no_grad():
        last_step = [
            [make_batch(STEPS - 1, m, r) for r in range(world)] for m in range(MICRO_BATCHES)
        ]
        xs = [torch.cat([x for x, _ in mb]) for mb in last_step]
        ys = [torch.cat([y for _, y in mb]) for mb in last_step]
        module = trunk.module
        dist_loss = sum(
            float(
                cd.vocab_parallel_linear_cross_entropy(
                    module(x), head, y, vocab_sizes=sizes, ignore_index=IGNORE, reduction="sum"
                )
            )
            for x, y in zip(xs, ys, strict=True)
        ) / float(n)
        one = crossent.cross_entropy(
            module(torch.cat(xs)) @ torch.cat(parts).T, torch.cat(ys), ignore_index=IGNORE
        )
    if rank == 0:
        print(
            f"final step, after training: vocab-parallel loss {dist_loss:.6f}, "
            f"one-process cross_entropy {float(one):.6f}, |diff| {abs(dist_loss - float(one)):.1e}"
        )
    dist.destroy_process_group()


def _all_gather_rows(t: Tensor) -> Tensor:
    parts = [torch.empty_like(t) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, t.contiguous())
    return torch.cat(parts)


def _gather_uneven(parts: list[Tensor], mine: Tensor) -> None:
    """all_gather of shards of different lengths: pad to the longest, then trim."""
    longest = max(p.shape[0] for p in parts)
    padded = torch.zeros(longest, mine.shape[1])
    padded[: mine.shape[0]] = mine
    out = [torch.empty_like(padded) for _ in parts]
    dist.all_gather(out, padded)
    for p, o in zip(parts, out, strict=True):
        p.copy_(o[: p.shape[0]])


if __name__ == "__main__":
    if sys.platform.startswith("linux"):
        os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")  # one machine: gloo over loopback
    main()
