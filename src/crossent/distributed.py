r"""Cross-entropy beyond one device, on ``torch.distributed`` (gloo on CPU, NCCL on GPU).

Two problems, two tools.

Vocab-parallel cross-entropy
----------------------------
With the output layer sharded by columns across the ranks of a tensor-parallel group, rank
:math:`r` holds the logits of the contiguous vocabulary slice :math:`[s_r, s_r + V_r)` for the
*same* tokens as every other rank of the group (splits may be uneven). The global softmax needs
only a few numbers per row from every rank, so the loss is exact with per-row collectives and
no rank ever sees the full (N, V) logits:

1. ``all_reduce(MAX)`` of the local row maxima :math:`m_r` gives the global max :math:`m`.
2. One ``all_reduce(SUM)`` of a stacked (N, k) tensor of per-row partial sums, with
   :math:`e_j = \exp(u_j - m)`:

   - :math:`\sum_j e_j` (always) -> :math:`\operatorname{lse} = m + \log \sum_j e_j`;
   - :math:`u_y` (always; 0 on the ranks that do not own class :math:`y`);
   - :math:`\sum_j u_j` or :math:`\sum_j w_j u_j` (label smoothing, unweighted / weighted);
   - :math:`\sum_j e_j u_j` (confidence penalty: :math:`H = \operatorname{lse} - \sum_j q_j u_j`).

   After it every rank knows :math:`\operatorname{lse}` and
   :math:`q_y = e^{u_y - \operatorname{lse}}`, which is all that focal loss on the target
   term, focal schedules (``gamma=crossent.flsd53`` maps :math:`q_y`), z-loss, soft-capping
   (elementwise, local) and Poly-1 need.
3. Only focal loss *with* label smoothing has a focal factor on every class:
   :math:`L = \sum_k a_k (1-q_k)^\gamma \ell_k` and its gradient's row term
   :math:`\sum_k a_k g_k` need :math:`\operatorname{lse}` first, so they take a second fused
   ``all_reduce(SUM)`` of an (N, 2) tensor.

So the forward pass costs **2 all-reduces** (3 for focal + label smoothing) and the backward
pass **none**: the forward computes this rank's slice of the gradient (the softmax over the
global lse, the target's column on its owner rank), saves it, and the backward only scales it
by ``grad_output`` -- exactly as :func:`crossent.cross_entropy` does on one device. The loss is
replicated: every rank returns the same value and must call ``backward`` with the same
``grad_output``.

The vocabulary slice comes from ``vocab_sizes`` (every rank's local size, in group-rank order),
from ``vocab_start_index`` + ``vocab_size``, or, when nothing is given, from the local sizes,
which every call exchanges in **one** ``all_gather`` of a small row per rank (counted apart
from the loss's all-reduces). That gather also checks the group's contract at the start of
the call: the slices tile ``[0, V)`` exactly and every rank holds the same number of tokens;
a broken contract raises the same ``ValueError`` on every rank instead of a wrong loss or a
hang in the next collective.

Exact global normalisation
--------------------------
With data parallelism over :math:`R` ranks and :math:`M` gradient-accumulation micro-batches,
the quantity to minimise is the mean over all valid tokens of the step,
:math:`J = \sum_{r,m} S_{r,m} / \sum_{r,m} n_{r,m}` (:math:`S` the summed loss of a micro-batch,
:math:`n` its number of valid tokens, or its sum of class weights :math:`w_{y_i}`). The usual
loop back-propagates the mean of means
:math:`\frac{1}{RM}\sum_{r,m} S_{r,m}/n_{r,m}`, which weighs a token of a short micro-batch
more than a token of a long one: it equals :math:`J` only when every :math:`n_{r,m}` is the
same (the gradient-accumulation bug found in many trainers in 2024). The fix is to count first
(:func:`global_valid_count`, one all-reduce per step) and to back-propagate
:math:`S_{r,m} / n \cdot R` for every micro-batch (:func:`normalized_loss`), where
:math:`n = \sum_{r,m} n_{r,m}` and the factor :math:`R` undoes DDP's division of the summed
gradients by the world size.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from crossent import functional as _functional
from crossent._formula import (
    Terms,
    focal_terms,
    gamma_for_rows,
    inverse_or_zero,
    regulariser_terms,
    target_terms,
)
from crossent._ops import scale_saved_grad
from crossent._options import GammaSchedule, Reduction, SoftmaxOptions
from crossent.backends.torch_ops.linear import _CUDA_BUDGET_MIN, LinearCrossEntropyFunction, chunk_rows
from crossent.functional import (
    check_class_target,
    check_logits,
    check_reduction,
    cross_entropy,
    make_softmax_options,
    prepare_weight,
)

__all__ = [
    "copy_to_tensor_parallel_region",
    "global_valid_count",
    "normalized_loss",
    "split_vocab",
    "vocab_parallel_cross_entropy",
    "vocab_parallel_linear_cross_entropy",
    "vocab_partition",
]

ProcessGroup = Any  # torch.distributed.ProcessGroup (or None: the default group)


# --------------------------------------------------------------------------------------------
# process groups and the vocabulary partition


def _world_size(group: ProcessGroup | None) -> int:
    """The size of ``group``; 1 when torch.distributed is unavailable or not initialised."""
    if not (dist.is_available() and dist.is_initialized()):
        if group is not None:
            raise RuntimeError("a process group was given but torch.distributed is not initialised")
        return 1
    return dist.get_world_size(group)


def split_vocab(vocab_size: int, world_size: int) -> list[int]:
    """Contiguous split of ``vocab_size`` classes over ``world_size`` ranks, as even as possible.

    The first ``vocab_size % world_size`` ranks get one class more, e.g. 11 over 3 -> [4, 4, 3].
    """
    if vocab_size < 0 or world_size < 1:
        raise ValueError(
            f"need vocab_size >= 0 and world_size >= 1, got {vocab_size}, {world_size}"
        )
    base, extra = divmod(vocab_size, world_size)
    return [base + (1 if r < extra else 0) for r in range(world_size)]


def vocab_partition(
    local_vocab_size: int,
    group: ProcessGroup | None = None,
    *,
    vocab_sizes: Sequence[int] | None = None,
    vocab_start_index: int | None = None,
    vocab_size: int | None = None,
    device: torch.device | str | None = None,
) -> tuple[int, int]:
    """``(vocab_start_index, global vocab_size)`` of this rank's contiguous vocabulary slice.

    From ``vocab_sizes`` (every rank's local size, in group-rank order) or from
    ``vocab_start_index`` and ``vocab_size`` without communication; otherwise from one
    ``all_gather`` of the local sizes over ``group`` (``device``: where that tensor lives; it
    must be a CUDA device for NCCL).
    """
    world = _world_size(group)
    rank = dist.get_rank(group) if world > 1 else 0
    if vocab_sizes is not None:
        sizes = [int(v) for v in vocab_sizes]
        if len(sizes) != world:
            raise ValueError(f"vocab_sizes has {len(sizes)} entries for a group of {world} ranks")
        if any(v < 0 for v in sizes):
            raise ValueError(f"vocab_sizes must be >= 0, got {sizes}")
        if sizes[rank] != local_vocab_size:
            raise ValueError(
                f"vocab_sizes[{rank}] = {sizes[rank]} but this rank's logits have "
                f"{local_vocab_size} classes"
            )
        start, total = sum(sizes[:rank]), sum(sizes)
        if vocab_start_index is not None and vocab_start_index != start:
            raise ValueError(
                f"vocab_start_index={vocab_start_index} contradicts vocab_sizes ({start})"
            )
        if vocab_size is not None and vocab_size != total:
            raise ValueError(f"vocab_size={vocab_size} contradicts sum(vocab_sizes) = {total}")
        return start, total
    if (vocab_start_index is None) != (vocab_size is None):
        raise ValueError("pass vocab_start_index and vocab_size together (or vocab_sizes)")
    if vocab_start_index is not None and vocab_size is not None:
        if not 0 <= vocab_start_index <= vocab_start_index + local_vocab_size <= vocab_size:
            raise ValueError(
                f"the slice [{vocab_start_index}, {vocab_start_index + local_vocab_size}) does "
                f"not lie in a vocabulary of {vocab_size} classes"
            )
        return int(vocab_start_index), int(vocab_size)
    if world == 1:
        return 0, local_vocab_size
    mine = torch.tensor([local_vocab_size], dtype=torch.int64, device=device)
    gathered = [torch.empty_like(mine) for _ in range(world)]
    dist.all_gather(gathered, mine, group=group)
    sizes = [int(t.item()) for t in gathered]
    return sum(sizes[:rank]), sum(sizes)


def _describe_slices(rows: list[list[int]]) -> str:
    return ", ".join(f"rank {r}: [{row[1]}, {row[1] + row[2]})" for r, row in enumerate(rows))


def _checked_partition(
    local_vocab_size: int,
    n_tokens: int,
    group: ProcessGroup | None = None,
    *,
    vocab_sizes: Sequence[int] | None = None,
    vocab_start_index: int | None = None,
    vocab_size: int | None = None,
    device: torch.device | str | None = None,
) -> tuple[int, int]:
    """:func:`vocab_partition` for a vocab-parallel call, with the group's contract checked.

    The ranks exchange one small int64 row each,
    ``(given, start, local size, vocab_size, tokens, bad)``, in **one** ``all_gather`` (the
    one :func:`vocab_partition` makes anyway to derive the slices), and every rank checks the
    same gathered table: the slices ``[start, start + size)`` tile ``[0, V)`` exactly (no
    overlap, no gap, one ``V``), and every rank holds the same number of tokens. A broken
    contract raises the same ``ValueError`` on every rank, before any collective whose size
    depends on the tokens (which would otherwise hang, or abort in gloo with nothing that names
    the cause); a rank whose own slice arguments are invalid raises its own error, and the
    others one that names it.
    """
    world = _world_size(group)
    if world == 1:
        return vocab_partition(
            local_vocab_size, group, vocab_sizes=vocab_sizes, vocab_start_index=vocab_start_index,
            vocab_size=vocab_size, device=device,
        )
    given = vocab_sizes is not None or vocab_start_index is not None or vocab_size is not None
    local_error: ValueError | None = None
    start = total = -1
    if given:
        try:  # the local checks of vocab_partition (no collective on these branches)
            start, total = vocab_partition(
                local_vocab_size, group if vocab_sizes is not None else None,
                vocab_sizes=vocab_sizes, vocab_start_index=vocab_start_index, vocab_size=vocab_size,
            )
        except ValueError as err:
            local_error = err
    mine = torch.tensor(
        [int(given), start, local_vocab_size, total, n_tokens, int(local_error is not None)],
        dtype=torch.int64, device=device,
    )
    gathered = [torch.empty_like(mine) for _ in range(world)]
    dist.all_gather(gathered, mine, group=group)
    rows = torch.stack(gathered).cpu().tolist()
    rank = dist.get_rank(group)
    what = "vocab-parallel cross-entropy"
    bad = [r for r, row in enumerate(rows) if row[5]]
    if bad:
        if local_error is not None:
            raise local_error
        raise ValueError(
            f"{what}: rank(s) {bad} rejected their vocabulary slice arguments (see the error there)"
        )
    if len({row[0] for row in rows}) > 1:
        raise ValueError(
            f"{what}: ranks {[r for r, row in enumerate(rows) if row[0]]} pass vocab_start_index and "
            f"vocab_size, the others do not; every rank must describe its slice the same way"
        )
    tokens = [row[4] for row in rows]
    if len(set(tokens)) > 1:
        by_rank = ", ".join(f"rank {r}: {n}" for r, n in enumerate(tokens))
        raise ValueError(
            f"{what}: the ranks hold different numbers of tokens ({by_rank}); every rank of the "
            "group must pass the logits of the same tokens (its own vocabulary slice)"
        )
    if not given:
        sizes = [row[2] for row in rows]
        return sum(sizes[:rank]), sum(sizes)
    totals = {row[3] for row in rows}
    if len(totals) > 1:
        by_rank = ", ".join(f"rank {r}: {row[3]}" for r, row in enumerate(rows))
        raise ValueError(f"{what}: the ranks disagree on vocab_size ({by_rank})")
    V = rows[0][3]
    pos, prev = 0, None
    for r, row in sorted(enumerate(rows), key=lambda item: (item[1][1], item[0])):
        lo, hi = row[1], row[1] + row[2]
        if lo == hi:
            continue
        if lo < pos:
            raise ValueError(
                f"{what}: the vocabulary slices overlap (ranks {prev} and {r} on [{lo}, {min(hi, pos)})); "
                f"they must tile [0, {V}) exactly. Slices: {_describe_slices(rows)}"
            )
        if lo > pos:
            raise ValueError(
                f"{what}: no rank holds classes [{pos}, {lo}); the slices must tile [0, {V}) exactly. "
                f"Slices: {_describe_slices(rows)}"
            )
        pos, prev = hi, r
    if pos != V:
        raise ValueError(
            f"{what}: no rank holds classes [{pos}, {V}); the slices must tile [0, {V}) exactly. "
            f"Slices: {_describe_slices(rows)}"
        )
    return start, total


# --------------------------------------------------------------------------------------------
# vocab-parallel cross-entropy


def _all_reduce(t: Tensor, op: Any, group: ProcessGroup | None) -> Tensor:
    dist.all_reduce(t, op=op, group=group)
    return t


def _vocab_parallel_forward(
    x: Tensor,
    target: Tensor,
    weight: Tensor | None,
    opts: SoftmaxOptions,
    reduction: Reduction,
    start: int,
    V: int,
    group: ProcessGroup | None,
    need_grad: bool,
) -> tuple[Tensor, Tensor | None]:
    """Loss (reduced as asked) and this rank's (R, V_local) gradient slice, or None.

    ``x``: (R, V_local) local logits; ``target``: (R,) int64 global ids; ``weight``: the full
    (V,) class weights in the accumulation dtype. Gradient assembly as in the one-device kernel
    (:mod:`crossent.backends.torch_ops.softmax`): ``G = q*rowc + rowconst + dense - onehot_y*sparse``.
    """
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    R, Vl = x.shape
    dev = x.device
    u = x.to(acc)
    th = None
    if opts.softcap is not None:
        th = torch.tanh(u / opts.softcap)  # elementwise: each rank caps its own columns
        u = th * opts.softcap
    w_loc = weight[start : start + Vl] if weight is not None else None

    # (1) the global row max
    if Vl:
        m = u.amax(dim=1, keepdim=True)
    else:
        m = torch.full((R, 1), -torch.inf, dtype=acc, device=dev)
    m = _all_reduce(m.contiguous(), dist.ReduceOp.MAX, group)
    m = torch.where(torch.isfinite(m), m, 0.0)  # rows with no logits at all (R > 0, V = 0)

    e = torch.exp(u - m)
    valid = (target != opts.ignore_index).unsqueeze(1)
    y = torch.where(valid, target.unsqueeze(1), 0)
    y_loc = y - start
    own = valid & (y_loc >= 0) & (y_loc < Vl)
    y_loc = torch.where(own, y_loc, 0)
    ownf = own.to(acc)
    eps = float(opts.label_smoothing)

    # (2) one fused all-reduce of every per-row partial sum
    cols = [e.sum(dim=1, keepdim=True)]
    cols.append(u.gather(1, y_loc) * ownf if Vl else torch.zeros((R, 1), dtype=acc, device=dev))
    if eps:
        cols.append(u.sum(dim=1, keepdim=True) if w_loc is None else (u @ w_loc).unsqueeze(1))
    if opts.confidence_penalty:  # 0 log 0 = 0: a masked (-inf) class has e = 0 and adds 0
        cols.append(torch.where(e != 0, e * u, 0.0).sum(dim=1, keepdim=True))
    sums = _all_reduce(torch.cat(cols, dim=1), dist.ReduceOp.SUM, group)
    sum_e = sums[:, 0:1]
    lse = torch.log(sum_e) + m
    ell_y = lse - sums[:, 1:2]
    k = 2
    if eps:
        u_dot = sums[:, k : k + 1]
        k += 1
    if opts.confidence_penalty:
        eu = sums[:, k : k + 1]
        k += 1
    q = e.div_(sum_e)

    validf = valid.to(acc)
    w_y = validf if weight is None else weight[y] * validf
    s = w_y
    focal = opts.focal
    gam = gamma_for_rows(opts, torch.exp(-ell_y)) if focal else 0.0
    dense: Tensor | None = None

    # The coefficients from the global row statistics: the same functions as on one device.
    if eps == 0.0 or not focal:
        w_sum = float(V) if weight is None else weight.sum()
        terms = target_terms(ell_y, lse, u_dot if eps else None, w_y, validf, gam, opts, V, w_sum)
    else:
        # focal + smoothing: a focal factor on every class; (3) a second fused all-reduce
        a_y = w_y * (1.0 - eps)
        ones = torch.ones((1, Vl), dtype=acc, device=dev)
        a = (eps / V) * validf * (w_loc.unsqueeze(0) if w_loc is not None else ones)
        a = a.expand(R, Vl).clone()
        if Vl:
            a.scatter_add_(1, y_loc, a_y * ownf)
        ell = lse - u
        factor, kappa = focal_terms(ell, gam)
        f_loc = (a * factor * ell).sum(dim=1, keepdim=True)  # this rank's share of the loss
        ag = factor.mul_(kappa).mul_(a).neg_()  # a_k g_k, g = q df/dq
        part = torch.cat([f_loc, ag.sum(dim=1, keepdim=True)], dim=1)
        part = _all_reduce(part, dist.ReduceOp.SUM, group)
        terms = Terms(loss=part[:, 0:1], rowc=-part[:, 1:2])
        dense = ag if need_grad else None
    entropy = lse - eu / sum_e if opts.confidence_penalty else None
    terms = regulariser_terms(terms, s, lse, opts, V, q_y=torch.exp(-ell_y), entropy=entropy)
    if opts.confidence_penalty and need_grad:
        qu = torch.where(q != 0, q * u, 0.0) * (s * opts.confidence_penalty)
        dense = qu if dense is None else dense + qu
    rowc, sparse = terms.rowc, terms.sparse
    rowconst = None
    if terms.uniform is not None:
        if w_loc is None:
            rowconst = -terms.uniform
        elif need_grad:
            dense = -(terms.uniform * w_loc) if dense is None else dense - terms.uniform * w_loc

    losses = terms.loss.squeeze(1)
    if reduction == "mean":
        denom = w_y.sum()  # the same tokens on every rank: no collective
        scale = inverse_or_zero(denom)
        out = losses.sum() * scale
    elif reduction == "sum":
        scale, out = None, losses.sum()
    else:
        scale, out = None, losses

    grad: Tensor | None = None
    if need_grad:
        G = q.mul_(torch.as_tensor(rowc, dtype=acc, device=dev))
        if rowconst is not None:
            G.add_(rowconst)
        if dense is not None:
            G.add_(dense)
        if sparse is not None and Vl:
            G.scatter_add_(1, y_loc, -(sparse * ownf))
        if th is not None:
            G.mul_(1.0 - th.square())
        if scale is not None:
            G.mul_(scale)
        grad = G.to(x.dtype)
    return out, grad


class _VocabParallelCrossEntropyFunction(torch.autograd.Function):
    """One autograd node: collectives in forward only; backward scales the saved slice."""

    @staticmethod
    def forward(
        ctx: Any,
        logits: Tensor,
        target: Tensor,
        weight: Tensor | None,
        opts: SoftmaxOptions,
        reduction: Reduction,
        start: int,
        vocab_size: int,
        group: ProcessGroup | None,
    ) -> Tensor:
        loss, grad = _vocab_parallel_forward(
            logits.detach(), target, weight, opts, reduction, start, vocab_size, group,
            ctx.needs_input_grad[0],
        )
        if grad is not None:
            ctx.save_for_backward(grad)
        return loss

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx: Any, grad_output: Tensor) -> tuple[Tensor | None, ...]:
        (grad,) = ctx.saved_tensors
        return (scale_saved_grad(ctx, grad, grad_output), *([None] * 7))


def vocab_parallel_cross_entropy(
    local_logits: Tensor,
    target: Tensor,
    *,
    group: ProcessGroup | None = None,
    vocab_sizes: Sequence[int] | None = None,
    vocab_start_index: int | None = None,
    vocab_size: int | None = None,
    weight: Tensor | None = None,
    ignore_index: int = -100,
    label_smoothing: float = 0.0,
    gamma: float | GammaSchedule = 0.0,
    z_loss: float = 0.0,
    softcap: float | None = None,
    confidence_penalty: float = 0.0,
    poly1: float = 0.0,
    reduction: Reduction = "mean",
) -> Tensor:
    r""":func:`crossent.cross_entropy` over a vocabulary sharded across the ranks of ``group``.

    Rank :math:`r` passes the logits of its contiguous slice :math:`[s_r, s_r + V_r)` of the
    global vocabulary of :math:`V` classes (uneven splits allowed, see :func:`split_vocab`),
    for the same tokens as every other rank of the group. The loss is the same number, with
    the same gradient slices, as :func:`crossent.cross_entropy` on the gathered (N, V) logits,
    for every option of the softmax family; label smoothing spreads :math:`\varepsilon / V`
    over the *global* vocabulary.

    Collectives per call (see the module docstring for the math): forward 1 ``all_reduce(MAX)``
    + 1 fused ``all_reduce(SUM)`` -- plus one more fused ``all_reduce(SUM)`` only for focal
    loss (``gamma`` non-zero or a schedule) combined with label smoothing; backward none. One
    small ``all_gather``: it derives or checks the slices
    (they must tile ``[0, V)`` exactly) and checks that every rank holds the same number of
    tokens, raising the same ``ValueError`` on every rank otherwise. With no initialised
    process group, or a group of one rank, this is exactly :func:`crossent.cross_entropy`.

    Args:
        local_logits: (V_local,), (N, V_local) or (..., V_local) float logits, class dim *last*
            (the layout of a sharded output projection).
        target: int tensor of global class ids in [0, V) (or ``ignore_index``), of the logits'
            shape without the last dim; identical on every rank of the group. Probability
            targets are not supported here (use :func:`crossent.cross_entropy`).
        group: the tensor-parallel process group (None: the default group).
        vocab_sizes, vocab_start_index, vocab_size: the partition, see :func:`vocab_partition`.
        weight: the *full* (V,) class weights, the same on every rank (V floats; each rank
            needs :math:`w_y` of targets it does not own and :math:`\sum_k w_k`).
        ignore_index, label_smoothing, gamma, z_loss, softcap, confidence_penalty, poly1, reduction:
            as in :func:`crossent.cross_entropy`. The "mean" denominator
            :math:`\sum_i w_{y_i}` needs no collective: every rank holds the same tokens.

    Returns:
        The loss, replicated on every rank (reduction "none": the target's shape). Call
        ``backward`` on every rank with the same ``grad_output``.
    """
    check_logits(local_logits, "local_logits")
    check_reduction(reduction)
    opts = make_softmax_options(
        ignore_index=ignore_index,
        label_smoothing=label_smoothing,
        gamma=gamma,
        z_loss=z_loss,
        softcap=softcap,
        confidence_penalty=confidence_penalty,
        poly1=poly1,
    )
    if local_logits.ndim == 0:
        raise ValueError("local_logits must have a class dimension (the last one)")
    if not isinstance(target, Tensor):
        raise TypeError(f"target must be a torch.Tensor, got {type(target).__name__}")
    if target.is_floating_point() or target.is_complex():
        raise TypeError(
            "vocab_parallel_cross_entropy takes integer class ids (global ids in [0, V)); "
            "probability targets are not supported on a sharded vocabulary"
        )
    if target.device != local_logits.device:
        raise ValueError(f"target is on {target.device} but logits are on {local_logits.device}")
    Vl = local_logits.shape[-1]
    lead = tuple(local_logits.shape[:-1])
    start, V = _checked_partition(
        Vl, math.prod(lead), group, vocab_sizes=vocab_sizes, vocab_start_index=vocab_start_index,
        vocab_size=vocab_size, device=local_logits.device,
    )
    check_class_target(target, V, ignore_index, lead)
    options: dict[str, Any] = dict(
        weight=weight, ignore_index=ignore_index, label_smoothing=label_smoothing, gamma=gamma,
        z_loss=z_loss, softcap=softcap, confidence_penalty=confidence_penalty, poly1=poly1,
    )
    rows = 1
    for d in lead:
        rows *= d
    x = local_logits.reshape(rows, Vl)
    t = target.reshape(rows).long()
    if _world_size(group) == 1:
        if Vl != V:
            raise ValueError(f"a single rank holds {Vl} of {V} classes")
        loss: Tensor = cross_entropy(x, t, reduction=reduction, **options)
    else:
        w = prepare_weight(weight, V, local_logits)
        loss = _VocabParallelCrossEntropyFunction.apply(x, t, w, opts, reduction, start, V, group)
    return loss.reshape(lead) if reduction == "none" else loss


# --------------------------------------------------------------------------------------------
# column-parallel linear head + vocab-parallel cross-entropy


class _CopyToTensorParallelRegion(torch.autograd.Function):
    """Identity in forward; ``all_reduce(SUM)`` of the gradient in backward.

    A column-parallel layer computes ``hidden @ W_r.T`` on every rank from the same ``hidden``;
    ``d hidden`` is the sum over ranks of ``d logits_r @ W_r``.
    """

    @staticmethod
    def forward(ctx: Any, x: Tensor, group: ProcessGroup | None) -> Tensor:
        ctx.group = group
        return x.view_as(x)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None]:
        g = grad.contiguous().clone()
        dist.all_reduce(g, op=dist.ReduceOp.SUM, group=ctx.group)
        return g, None


def copy_to_tensor_parallel_region(x: Tensor, group: ProcessGroup | None = None) -> Tensor:
    """Identity whose backward all-reduces (sums) the gradient over ``group``."""
    if _world_size(group) == 1:
        return x
    out: Tensor = _CopyToTensorParallelRegion.apply(x, group)
    return out


def _vocab_parallel_chunk(
    z: Tensor,
    target: Tensor,
    class_weight: Tensor | None,
    opts: SoftmaxOptions,
    scale: Tensor | None,
    *,
    start: int,
    vocab_size: int,
    group: ProcessGroup | None,
) -> tuple[Tensor, Tensor | None]:
    """The chunk kernel of the vocab-parallel head, for the chunk loop of the linear path.

    ``z`` (B, V_local): this rank's slice of a chunk's logits. The loss and this rank's slice of
    ``scale * dL/dz`` come from :func:`_vocab_parallel_forward`, with its 2 (or 3) all-reduces.
    The loop then forms ``dH_c = G_c W_loc`` (this rank's *partial* sum over its vocabulary
    slice), ``dW_loc += G_c^T H_c`` and ``db_loc += sum_rows G_c``.
    """
    losses, G = _vocab_parallel_forward(
        z, target, class_weight, opts, "none", start, vocab_size, group, scale is not None
    )
    if G is not None:
        assert scale is not None  # the gradient is only computed when a scale is given
        G.mul_(scale.to(G.dtype))
    return losses, G


def _all_reduce_grad_hidden(dH: Tensor, *, group: ProcessGroup | None) -> Tensor:
    """The column-parallel head's backward collective: d hidden = sum over ranks of G_r W_r."""
    dH = dH.contiguous()
    dist.all_reduce(dH, op=dist.ReduceOp.SUM, group=group)
    return dH


def vocab_parallel_linear_cross_entropy(
    hidden: Tensor,
    local_weight: Tensor,
    target: Tensor,
    *,
    local_bias: Tensor | None = None,
    group: ProcessGroup | None = None,
    vocab_sizes: Sequence[int] | None = None,
    vocab_start_index: int | None = None,
    vocab_size: int | None = None,
    weight: Tensor | None = None,
    ignore_index: int = -100,
    label_smoothing: float = 0.0,
    gamma: float | GammaSchedule = 0.0,
    z_loss: float = 0.0,
    softcap: float | None = None,
    confidence_penalty: float = 0.0,
    poly1: float = 0.0,
    reduction: Reduction = "mean",
    chunk_size: int | None = None,
) -> Tensor:
    r"""Column-parallel output projection + :func:`vocab_parallel_cross_entropy`, chunked.

    Rank :math:`r` holds the rows :math:`W_r` (V_r, H) of the (V, H) output weight for its
    vocabulary slice (and ``local_bias`` (V_r,)); ``hidden`` (..., H) and ``target`` are the
    same on every rank. The loss is that of :func:`vocab_parallel_cross_entropy` on the local
    logits ``hidden @ local_weight.T + local_bias`` (the other keyword arguments are its own),
    but those (N, V_r) logits are never held: as in :func:`crossent.linear_cross_entropy`, the
    non-ignored tokens are processed in chunks, and each chunk's local logits, vocab-parallel
    statistics and logits-gradient slice :math:`G_c` are turned at once into
    :math:`\partial H_c = G_c W_r` (a partial sum over this rank's classes),
    :math:`\partial W_r \mathrel{+}= G_c^\top H_c` and :math:`\partial b_r \mathrel{+}=
    \mathbf 1^\top G_c`. The "mean" denominator :math:`\sum_i w_{y_i}` is computed once, over
    all the tokens, before the loop.

    Gradients: ``local_weight`` and ``local_bias`` get this rank's slice of the full gradient;
    ``hidden`` gets :math:`\sum_r \partial L / \partial \text{logits}_r \, W_r`, the sum over
    ranks, through one ``all_reduce(SUM)`` in backward (the column-parallel head's collective,
    as :func:`copy_to_tensor_parallel_region` would do).

    Collectives per call, with :math:`C = \lceil n_{\text{valid}} / \text{chunk\_size} \rceil`
    chunks (ignored tokens are dropped first; every target ignored: :math:`C = 0`):

    - forward: per chunk the all-reduces of :func:`vocab_parallel_cross_entropy`, i.e.
      :math:`2C` (:math:`3C` for focal loss with label smoothing) -- the total grows with the
      number of chunks, so a larger ``chunk_size`` means fewer, larger messages;
    - backward: exactly **1** (``d hidden``) for a "mean" or "sum" loss, whose gradients are
      accumulated in the forward and only scaled by ``grad_output``. Reduction ``"none"`` (a
      per-token ``grad_output`` cannot be folded into :math:`\partial W_r` afterwards) and a
      second backward (``retain_graph=True``) recompute the chunk loop in backward: its
      :math:`2C` (or :math:`3C`) all-reduces, then the 1 of ``d hidden``;
    - one small ``all_gather``, which derives or checks the
      slices and checks the ranks' token counts (see :func:`vocab_parallel_cross_entropy`).

    Args:
        chunk_size: tokens per chunk; must be the same on every rank of the group. None: the
            budget rule of :func:`crossent.backends.torch_ops.linear.chunk_rows`, applied to the *widest*
            slice (``max(vocab_sizes)``, else :math:`\lceil V / R \rceil`) with a budget that is
            the same on every rank (the CPU default; on CUDA the rule's 64 MiB floor, since
            free memory differs between devices), so every rank runs the same number of chunks
            and hence of collectives.
        weight: the full (V,) class weights, as in :func:`vocab_parallel_cross_entropy`.
        Other arguments: as in :func:`vocab_parallel_cross_entropy`.

    With no process group or a group of one rank this is :func:`crossent.linear_cross_entropy`
    (``weight`` is passed as its ``class_weight``). Targets are class indices on any number of
    ranks: a float (probability) target raises ``TypeError``.
    """
    check_logits(hidden, "hidden")
    check_logits(local_weight, "local_weight")
    check_reduction(reduction)
    if hidden.ndim < 1 or local_weight.ndim != 2 or hidden.shape[-1:] != local_weight.shape[1:]:
        raise ValueError(
            f"local_weight must have shape (V_local, {hidden.shape[-1] if hidden.ndim else '?'}), "
            f"got {tuple(local_weight.shape)}"
        )
    if chunk_size is not None and (
        isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1
    ):
        raise ValueError(f"chunk_size must be a positive int or None, got {chunk_size!r}")
    Vl = local_weight.shape[0]
    # Index targets only, on one rank as on many (linear_cross_entropy would take probabilities
    # on a single rank; a sharded vocabulary cannot).
    if not isinstance(target, Tensor):
        raise TypeError(f"target must be a torch.Tensor, got {type(target).__name__}")
    if target.is_floating_point() or target.is_complex():
        raise TypeError(
            "vocab_parallel_linear_cross_entropy takes integer class ids (global ids in [0, V)); "
            f"probability targets are not supported on a sharded vocabulary, got {target.dtype}"
        )
    loss_opts: dict[str, Any] = dict(
        ignore_index=ignore_index, label_smoothing=label_smoothing, gamma=gamma, z_loss=z_loss,
        softcap=softcap, confidence_penalty=confidence_penalty, poly1=poly1, reduction=reduction,
    )
    world = _world_size(group)
    start, V = _checked_partition(
        Vl, math.prod(hidden.shape[:-1]), group, vocab_sizes=vocab_sizes,
        vocab_start_index=vocab_start_index, vocab_size=vocab_size, device=hidden.device,
    )
    if world == 1:
        if V != Vl:
            raise ValueError(f"a single rank holds {Vl} of {V} classes")
        single: Tensor = _functional.linear_cross_entropy(
            hidden, local_weight, target, bias=local_bias, class_weight=weight,
            chunk_size=chunk_size, **loss_opts,
        )
        return single

    opts = make_softmax_options(**{k: v for k, v in loss_opts.items() if k != "reduction"})
    if local_weight.dtype != hidden.dtype or local_weight.device != hidden.device:
        raise TypeError(
            f"local_weight must have hidden's dtype and device ({hidden.dtype}, "
            f"{hidden.device}), got ({local_weight.dtype}, {local_weight.device})"
        )
    if local_bias is not None:
        check_logits(local_bias, "local_bias")
        if tuple(local_bias.shape) != (Vl,):
            raise ValueError(f"local_bias must have shape ({Vl},), got {tuple(local_bias.shape)}")
        if local_bias.dtype != hidden.dtype or local_bias.device != hidden.device:
            raise TypeError(
                f"local_bias must have hidden's dtype and device ({hidden.dtype}, "
                f"{hidden.device}), got ({local_bias.dtype}, {local_bias.device})"
            )
    if target.device != hidden.device:
        raise ValueError(f"target is on {target.device} but hidden is on {hidden.device}")
    lead = tuple(hidden.shape[:-1])
    check_class_target(target, V, ignore_index, lead)
    w = prepare_weight(weight, V, hidden)
    acc = torch.float64 if hidden.dtype == torch.float64 else torch.float32
    half = local_weight.dtype in (torch.float16, torch.bfloat16)
    wgrad_dtype = acc if half else local_weight.dtype
    if chunk_size is None:
        widest = max(vocab_sizes) if vocab_sizes is not None else -(-V // world)
        budget = None if hidden.device.type == "cpu" else _CUDA_BUDGET_MIN
        chunk_size = chunk_rows(
            max(1, int(widest)), hidden.dtype, hidden.device, wgrad_dtype, budget=budget
        )
    h2 = hidden.reshape(-1, hidden.shape[-1])
    t1 = target.reshape(-1).long()
    # The chunk loop and autograd node of the linear path, with the vocab-parallel chunk kernel
    # (forward: its all-reduces per chunk) and one all-reduce of d hidden in backward. A second
    # backward (retain_graph) or reduction "none" recomputes the chunks, collectives included.
    loss: Tensor = LinearCrossEntropyFunction.apply(
        h2, local_weight, local_bias, t1, w, opts, reduction, chunk_size, wgrad_dtype,
        functools.partial(_vocab_parallel_chunk, start=start, vocab_size=V, group=group),
        functools.partial(_all_reduce_grad_hidden, group=group),
    )
    return loss.reshape(lead) if reduction == "none" else loss


# --------------------------------------------------------------------------------------------
# exact global normalisation over ranks and micro-batches


def global_valid_count(
    targets_of_the_step: Tensor | Sequence[Tensor],
    ignore_index: int = -100,
    weight: Tensor | None = None,
    group: ProcessGroup | None = None,
) -> Tensor:
    r"""The number of valid targets of a whole optimiser step, over micro-batches and ranks.

    :math:`n = \sum_{r}\sum_{m}\sum_i [y_{r,m,i} \ne \text{ignore\_index}]`, or with class
    ``weight`` :math:`\sum w_{y}` over those targets (the denominator of a weighted "mean").
    Pass this rank's index targets of every micro-batch of the step; one ``all_reduce(SUM)``
    over ``group`` (none without an initialised process group). Returns a float64 scalar on
    the targets' device (exact for counts below :math:`2^{53}`), the same on every rank.
    Use it with :func:`normalized_loss`.
    """
    if isinstance(targets_of_the_step, Tensor):
        targets_of_the_step = [targets_of_the_step]
    targets = list(targets_of_the_step)
    if not targets:
        raise ValueError("targets_of_the_step is empty: pass the targets of every micro-batch")
    device = targets[0].device
    total = torch.zeros((), dtype=torch.float64, device=device)
    w = None if weight is None else weight.detach().to(device=device, dtype=torch.float64)
    for t in targets:
        if t.is_floating_point() or t.is_complex():
            raise TypeError("global_valid_count counts index targets (integer class ids)")
        t = t.reshape(-1)
        valid = t != ignore_index
        if w is None:
            total = total + valid.sum()
        else:
            total = total + (w[torch.where(valid, t, 0).long()] * valid).sum()
    if _world_size(group) > 1:
        dist.all_reduce(total, op=dist.ReduceOp.SUM, group=group)
    return total


def normalized_loss(
    logits: Tensor,
    target: Tensor,
    global_count: Tensor | float,
    *,
    world_size: int | None = None,
    group: ProcessGroup | None = None,
    **options: Any,
) -> Tensor:
    r"""A micro-batch's share of the step's exact global mean, ready for DDP: ``sum / n * R``.

    ``cross_entropy(logits, target, reduction="sum", **options) / global_count * world_size``.

    Why: the step's objective is :math:`J = \frac{1}{n}\sum_{r,m} S_{r,m}` with :math:`S_{r,m}`
    the summed loss of micro-batch :math:`m` on rank :math:`r` and :math:`n` from
    :func:`global_valid_count` (same ``ignore_index`` and ``weight`` as here). Back-propagating
    :math:`S_{r,m}/n` on every micro-batch accumulates, on rank :math:`r`,
    :math:`\frac1n \sum_m \nabla S_{r,m}`; DDP then all-reduces with SUM and **divides by the
    world size** :math:`R`, giving :math:`\frac{1}{nR}\sum_{r,m}\nabla S_{r,m} = \nabla J / R`.
    Multiplying each loss by :math:`R` makes the result exactly :math:`\nabla J`, the
    full-batch mean gradient, however unevenly valid tokens fall over micro-batches and ranks.
    (The value printed per rank is then :math:`R` times its share; the sum over ranks and
    micro-batches of ``loss / R`` is :math:`J`.)

    Args:
        logits, target, options: as in :func:`crossent.cross_entropy` (``reduction`` is fixed).
        global_count: :math:`n` from :func:`global_valid_count`. A count of 0 (every target
            of the step ignored on every rank) gives a loss of 0 with a zero gradient.
        world_size: the number of ranks DDP averages over; None: the size of ``group`` (the
            default group), 1 without an initialised process group. Pass 1 when nothing
            averages the gradients (a single process, or a hand-written SUM all-reduce).
    """
    if "reduction" in options:
        raise TypeError("normalized_loss sums per micro-batch; do not pass reduction")
    R = _world_size(group) if world_size is None else int(world_size)
    S: Tensor = cross_entropy(logits, target, reduction="sum", **options)
    n = torch.as_tensor(global_count, device=S.device).to(S.dtype)
    # A step with nothing to count (every target ignored on every rank) is a loss of 0 with a
    # zero gradient, as the one-device "mean" (not 0/0 = nan).
    inv = inverse_or_zero(n)
    return S * (inv * R) if R != 1 else S * inv
