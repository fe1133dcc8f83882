"""Distributed contracts under hostile calls (issue 16, items 5 and 10), on gloo (CPU).

- A step whose targets are all ignored on every rank: ``normalized_loss`` is 0 with a zero
  gradient, not NaN (one process, and two).
- Vocab-parallel cross-entropy checks at the start of a call, with one small ``all_gather``,
  that the ranks' slices tile the vocabulary exactly and that every rank holds the same number
  of tokens: a broken contract raises one clear ``ValueError`` on every rank (no wrong loss,
  no hang, no gloo abort), and the group stays usable for the next, valid call.

Every check of one world size runs in one ``torch.multiprocessing.spawn`` (the spawn helpers
and data of ``tests/test_distributed.py``); the workers assert.
"""

from __future__ import annotations

import datetime
import os
from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import crossent
import test_distributed as td
from _helpers import gloo_world_and_pair
from crossent import distributed as cd

V, N, H, IGN = td.V, td.N, td.H, td.IGN


def _raises_everywhere(match: str, fn: Any, *args: Any, group: Any = None, **kwargs: Any) -> None:
    """``fn`` raises ValueError matching ``match`` on this rank; then the group still works."""
    with pytest.raises(ValueError, match=match):
        fn(*args, group=group, **kwargs)
    ok = torch.ones(1)
    dist.all_reduce(ok, group=group)  # every rank got here: none is stuck in the bad call
    assert float(ok) == dist.get_world_size(group)


def _check_contracts(group: Any) -> None:
    """Every check, on the ranks of ``group`` (the whole world, or a subgroup of it)."""
    rank, world = dist.get_rank(group), dist.get_world_size(group)
    sizes = cd.split_vocab(V, world)
    start, end = sum(sizes[:rank]), sum(sizes[: rank + 1])
    full, target = td._data(21)
    local = full[:, start:end].clone()

    # the ranges given by start and size, in any rank order, that tile [0, V): one all_gather
    order = list(range(world))[::-1]  # rank r holds the slice of rank world-1-r
    r_sizes = [sizes[o] for o in order]
    r_start = sum(r_sizes[:rank])
    mine = full[:, r_start : r_start + r_sizes[rank]].clone().requires_grad_(True)
    with td._count() as c:
        loss = cd.vocab_parallel_cross_entropy(
            mine, target, vocab_start_index=r_start, vocab_size=V, label_smoothing=0.1, group=group
        )
    assert c["all_gather"] == 1 and c["all_reduce"] == 2, c
    ref_full = full.clone().requires_grad_(True)
    ref = crossent.cross_entropy(ref_full, target, label_smoothing=0.1)
    loss.backward()
    ref.backward()
    torch.testing.assert_close(loss, ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(mine.grad, ref_full.grad[:, r_start : r_start + r_sizes[rank]])

    # overlapping slices: every rank but the first starts one class early
    lo = max(0, start - 1)
    over = full[:, lo:end].clone()
    _raises_everywhere(
        r"vocab-parallel cross-entropy: the vocabulary slices overlap \(ranks \d and \d on \[",
        cd.vocab_parallel_cross_entropy, over, target, vocab_start_index=lo, vocab_size=V,
        group=group,
    )
    # a gap: the last rank leaves out the last class
    cut = end - 1 if rank == world - 1 else end
    _raises_everywhere(
        rf"no rank holds classes \[{V - 1}, {V}\); the slices must tile \[0, {V}\) exactly",
        cd.vocab_parallel_cross_entropy, full[:, start:cut].clone(), target,
        vocab_start_index=start, vocab_size=V, group=group,
    )
    # ranks that disagree on the vocabulary size
    _raises_everywhere(
        r"the ranks disagree on vocab_size \(rank 0: 11, rank 1: 12",
        cd.vocab_parallel_cross_entropy, local, target, vocab_start_index=start,
        vocab_size=V + (rank > 0), group=group,
    )
    # different numbers of tokens: with the slice derived from the group, and given
    rows = N - rank
    msg = r"the ranks hold different numbers of tokens \(rank 0: 7, rank 1: 6"
    _raises_everywhere(msg, cd.vocab_parallel_cross_entropy, local[:rows], target[:rows], group=group)
    _raises_everywhere(
        msg, cd.vocab_parallel_cross_entropy, local[:rows], target[:rows],
        vocab_start_index=start, vocab_size=V, group=group,
    )
    sizes = cd.split_vocab(V, dist.get_world_size(group))  # and with the sizes given
    _raises_everywhere(
        msg, cd.vocab_parallel_cross_entropy, local[:rows], target[:rows], vocab_sizes=sizes,
        group=group,
    )
    g = torch.Generator().manual_seed(5)
    hidden = torch.randn(N, H, generator=g, dtype=torch.float64)
    W = torch.randn(V, H, generator=g, dtype=torch.float64)
    _raises_everywhere(
        msg, cd.vocab_parallel_linear_cross_entropy, hidden[:rows], W[start:end], target[:rows],
        group=group,
    )
    # one rank's own arguments are wrong: its error there, a pointer to it elsewhere
    bad = world - 1
    if rank == bad:
        _raises_everywhere(
            r"does not lie in a vocabulary of", cd.vocab_parallel_cross_entropy, local, target,
            vocab_start_index=V, vocab_size=V, group=group,
        )
    else:
        _raises_everywhere(
            rf"rank\(s\) \[{bad}\] rejected their vocabulary slice arguments",
            cd.vocab_parallel_cross_entropy, local, target, vocab_start_index=start, vocab_size=V,
            group=group,
        )
    # some ranks describe their slice, others do not
    kw = {"vocab_start_index": start, "vocab_size": V} if rank == 0 else {}
    _raises_everywhere(
        r"ranks \[0\] pass vocab_start_index and vocab_size, the others do not",
        cd.vocab_parallel_cross_entropy, local, target, **kw, group=group,
    )

    # after all of that, a valid call on the same group
    again = local.clone().requires_grad_(True)
    loss = cd.vocab_parallel_cross_entropy(again, target, gamma=2.0, group=group)
    torch.testing.assert_close(loss, crossent.cross_entropy(full, target, gamma=2.0), rtol=1e-12, atol=0)

    # item 5: every target of the step ignored on every rank -> 0, with a zero gradient
    ignored = torch.full((4,), IGN)
    n = cd.global_valid_count([ignored, ignored[:2]], IGN, group=group)
    assert float(n) == 0.0
    x = torch.randn(4, V, dtype=torch.float64, requires_grad=True)
    loss = cd.normalized_loss(x, ignored, n, group=group, ignore_index=IGN)
    loss.backward()
    assert float(loss.detach()) == 0.0 and torch.equal(x.grad, torch.zeros_like(x)), (loss, x.grad)


def _worker(rank: int, world: int, init_method: str) -> None:
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    torch.set_num_threads(1)
    # a short timeout: a rank left waiting in a collective fails the test instead of hanging it
    dist.init_process_group(
        "gloo", init_method=init_method, rank=rank, world_size=world,
        timeout=datetime.timedelta(seconds=60),
    )
    td._install_counters()
    gloo_world_and_pair(_check_contracts)


def test_contracts_multiprocess_gloo(tmp_path: Any) -> None:
    """World 3, then its first two ranks as a group of 2, in one spawn."""
    mp.spawn(_worker, args=(3, f"file://{tmp_path / 'store'}"), nprocs=3, join=True)


# --------------------------------------------------------------------------------------------
# one process


@pytest.mark.parametrize("weight", [None, "w"])
def test_normalized_loss_with_every_target_ignored_is_zero(weight: str | None) -> None:
    assert not (dist.is_available() and dist.is_initialized())
    w = td._weight() if weight else None
    targets = [torch.full((3,), IGN), torch.full((5,), IGN)]
    n = cd.global_valid_count(targets, IGN, weight=w)
    assert float(n) == 0.0
    for world_size in (None, 1, 4):
        x = torch.randn(3, V, dtype=torch.float64, requires_grad=True)
        loss = cd.normalized_loss(x, targets[0], n, world_size=world_size, weight=w, ignore_index=IGN)
        loss.backward()
        assert float(loss.detach()) == 0.0 and not x.grad.isnan().any() and not x.grad.any()
    # the ordinary case is unchanged: the sum over micro-batches is the full-batch mean
    y = torch.tensor([0, IGN, 4])
    n = cd.global_valid_count([y], IGN, weight=w)
    x = torch.randn(3, V, dtype=torch.float64)
    torch.testing.assert_close(
        cd.normalized_loss(x, y, n, weight=w, ignore_index=IGN),
        crossent.cross_entropy(x, y, weight=w, ignore_index=IGN),
    )


def test_single_process_partition_checks_are_unchanged() -> None:
    x = torch.randn(3, 4, dtype=torch.float64)
    y = torch.tensor([0, 1, 3])
    torch.testing.assert_close(
        cd.vocab_parallel_cross_entropy(x, y, vocab_start_index=0, vocab_size=4),
        crossent.cross_entropy(x, y),
    )
    with pytest.raises(ValueError, match="a single rank holds 4 of 9"):
        cd.vocab_parallel_cross_entropy(x, y, vocab_start_index=0, vocab_size=9)
