r"""Fused softmax cross-entropy family in torch ops: one forward pass computes loss and gradient.

This is the torch path: it runs on any device, and is the fast path on the CPU. The logits are
processed in blocks of rows small enough to stay in the CPU's cache (about 1 MiB); for each
block one read of the logits yields the max, the sum of exponentials, the loss and the
gradient, written once into the gradient buffer. Each torch op is vectorised and multithreaded
over the block, so there is no Python loop over samples and no N x C temporary besides the
gradient. On other devices and under ``torch.compile`` the whole tensor is one block (the
compiler or the Triton kernels fuse the passes there).

Notation (see :func:`crossent.cross_entropy`): ``u`` the (soft-capped) logits, ``q = softmax(u)``,
``ell_k = lse(u) - u_k = -log q_k``, ``a_k = w_k t~_k`` the weighted smoothed target, ``s`` the
sample weight (``w_y``, or 1 for probability targets). The gradient w.r.t. u is assembled as

    G = q * rowc + rowconst + dense - onehot_y * sparse

with per-row scalars ``rowc``, ``rowconst``, ``sparse`` and an optional dense (R, C) term, so
the common cases (plain CE, focal, smoothing) cost one pass over the block in cache.
"""

from __future__ import annotations

import functools
from dataclasses import replace

import torch
from torch import Tensor

from crossent._formula import (
    Terms,
    acc_dtype,
    focal_terms,
    gamma_for_rows,
    inverse_or_zero,
    mean_denominator,
    regulariser_terms,
    row_statistics,
    target_terms,
)
from crossent._options import RowGamma, SoftmaxCall, SoftmaxOptions
from crossent.backends.torch_ops._memory import empty_hugepage

__all__ = ["BLOCK_ELEMENTS", "focal_terms", "softmax_cross_entropy", "softmax_rows"]

#: Elements per block of rows on the CPU (fp32: 8 MiB, within a typical L3). The fused softmax
#: keeps each row in cache by itself; the block only has to keep the follow-up multiply out of
#: DRAM, while larger blocks mean fewer of the per-block small ops (about 25 per block).
BLOCK_ELEMENTS = 1 << 21
#: The same for fp16/bf16 input, whose blocks are staged in an fp32 buffer that should stay in
#: cache (fp32: 4 MiB; measured best among 1, 2, 4 and 8 MiB).
HALF_BLOCK_ELEMENTS = 1 << 20


def _compiling() -> bool:
    return torch.compiler.is_compiling()


def index_rows(
    target: Tensor, weight: Tensor | None, ignore_index: int, acc: torch.dtype
) -> tuple[Tensor, Tensor, Tensor]:
    """(R, 1) columns for index targets: safe class index, validity (0/1), weight w_y (0 if ignored)."""
    valid = (target != ignore_index).unsqueeze(1)
    y = torch.where(valid, target.unsqueeze(1), 0)
    validf = valid.to(acc)
    w_y = validf if weight is None else weight[y] * validf
    return y, validf, w_y


def _softmax_into(x: Tensor, out: Tensor | None) -> Tensor:
    """softmax over dim 1 by ATen's fused kernel (one read of the row, one write), into ``out``."""
    if out is None or _compiling():
        return torch.softmax(x, dim=1)
    return torch._softmax(x, 1, False, out=out)


#: Below this true-class probability, -log(q_y) from the softmax output loses digits
#: (fp32 subnormals start at 1.2e-38), so those rows get an exact log-sum-exp instead.
_Q_TINY = 1e-30


def softmax_rows(
    x: Tensor,
    target: Tensor,
    weight: Tensor | None,
    opts: SoftmaxOptions,
    grad_out: Tensor | None,
    grad_scale: Tensor | float = 1.0,
    scratch: Tensor | None = None,
    rows: tuple[Tensor, Tensor, Tensor] | None = None,
) -> Tensor:
    """Per-row loss of a block of rows, and (optionally) its gradient written into ``grad_out``.

    Args:
        x: (R, C) logits of any float dtype (read only, any strides; may alias ``grad_out``).
        target: (R,) int64 class indices or (R, C) float probabilities.
        weight: (C,) class weights in the accumulation dtype, or None.
        opts: validated options.
        grad_out: (R, C) buffer receiving ``grad_scale * d loss_r / d x_r``; None for forward only.
        grad_scale: scalar multiplying the gradient (1 / denominator for a mean).
        scratch: optional fp32 buffer of at least (R, C) for staging half-precision rows
            (allocated once per call by the driver instead of once per block).
        rows: optional ``index_rows(target, ...)`` of this block, computed once per call by the
            driver (each small per-block op costs microseconds; there are hundreds of blocks).

    Returns:
        (R,) per-row losses in the accumulation dtype (fp32, or fp64 for fp64 input).
    """
    acc = acc_dtype(x.dtype)
    R, C = x.shape
    index = not target.is_floating_point()
    eps = float(opts.label_smoothing)
    focal = opts.focal
    need_grad = grad_out is not None

    if index:
        y, validf, w_y = rows if rows is not None else index_rows(target, weight, opts.ignore_index, acc)
        s = w_y  # sample weight: ignored rows weigh 0
    else:
        s = torch.ones((R, 1), dtype=acc, device=x.device)

    # Sparse fast path (index targets; no softcap, no confidence penalty, no focal+smoothing):
    # every term of the gradient is q * (per-row scalar) plus per-row constants and a scatter at
    # y, so q itself can live in the gradient buffer and one in-place multiply finishes it.
    sparse_path = (
        index and opts.softcap is None and not opts.confidence_penalty and (eps == 0.0 or not focal)
    )
    th = None
    u = x
    q: Tensor | None  # None only on the sparse path without a gradient (q is not needed then)
    if sparse_path:
        u_y = x.gather(1, y).to(acc)

        def row_sums(z: Tensor) -> Tensor:  # for the uniform part of the smoothed target
            return z.sum(dim=1, keepdim=True, dtype=acc) if weight is None else (z.to(acc) @ weight)[:, None]

        # With inplace_backward the gradient overwrites x: take the row sums before that.
        aliased = grad_out is not None and grad_out.data_ptr() == x.data_ptr()
        u_sum = row_sums(x) if eps and (aliased or not need_grad) else None
        if need_grad or scratch is not None:
            # The fused softmax is about twice as fast as logsumexp here, so inference runs it
            # too, into a reused scratch block instead of the gradient buffer.
            if x.dtype == acc:
                if grad_out is not None:
                    q = _softmax_into(x, grad_out)
                else:
                    assert scratch is not None  # inference comes here only with a scratch block
                    q = _softmax_into(x, scratch[:R])
            else:  # fp16/bf16: stage the block in fp32 (accumulation), softmax in place
                q = scratch[:R].copy_(x) if scratch is not None else x.to(acc)
                if eps and u_sum is None:
                    u_sum = row_sums(q)  # the fp32 copy, before the softmax overwrites it
                q = _softmax_into(q, q)
            if eps and u_sum is None:
                u_sum = row_sums(x)  # the block was just read by the softmax: a cache hit
            q_y = q.gather(1, y)
            ell_y = torch.log(q_y).neg_()
            tiny = q_y < _Q_TINY
            if _compiling() or bool(tiny.any()):
                # exact lse for rows whose true-class probability underflows (hostile logits)
                lse_exact = torch.logsumexp(x.to(acc), dim=1, keepdim=True)
                ell_y = torch.where(tiny, lse_exact - u_y, ell_y)
            lse = u_y + ell_y
            if not need_grad:
                q = None
        else:
            q = None
            lse = torch.logsumexp(x.to(acc), dim=1, keepdim=True)
            ell_y = lse - u_y
    else:
        u = x.to(acc)  # a view when x is already fp32/fp64: nothing below writes into u
        if opts.softcap is not None:
            th = torch.tanh(u / opts.softcap)  # u = c tanh(z / c): bounded logits (Gemma 2)
            u = th * opts.softcap
        # log-sum-exp with the row max subtracted: exp never overflows, the largest term is 1.
        m = u.amax(dim=1, keepdim=True)
        q = torch.sub(u, m).exp_()
        sum_e = q.sum(dim=1, keepdim=True)
        lse = torch.log(sum_e).add_(m)
        q.div_(sum_e)
        if index:
            u_y = u.gather(1, y)
            ell_y = lse - u_y

    # Per-row pieces of the gradient w.r.t. u (crossent._formula.Terms):
    #   G = q * rowc - uniform * w + dense - onehot_y * sparse
    dense: Tensor | None = None
    rowc: Tensor | float
    if index:
        # a schedule sees 1 at ignored rows (whatever their logits hold), as on the native path
        gam = gamma_for_rows(opts, torch.where(validf > 0, torch.exp(-ell_y), 1.0)) if focal else 0.0
        if sparse_path:
            w_sum = float(C) if weight is None else weight.sum()
            terms = target_terms(ell_y, lse, u_sum, w_y, validf, gam, opts, C, w_sum)
        else:
            # Focal with smoothing (or softcap / confidence penalty): dense target mass.
            a_y = w_y * (1.0 - eps) if eps else w_y
            a = (eps / C) * validf * (weight if weight is not None else torch.ones_like(u[:1]))
            a = a.expand(R, C).clone()
            a.scatter_add_(1, y, a_y)
            loss, rowc, dense = _dense_focal(u, lse, a, gam, need_grad) if focal else _dense_ce(
                u, lse, a, need_grad
            )
            terms = Terms(loss=loss, rowc=rowc)
    else:
        assert q is not None  # not the sparse path
        t = target.to(acc)
        tt = t * (1.0 - eps) + eps / C if eps else t
        a = tt if weight is None else tt * weight
        if focal:
            gam = gamma_for_rows(opts, (t * q).sum(dim=1, keepdim=True))
            loss, rowc, dense = _dense_focal(u, lse, a, gam, need_grad)
        else:
            loss, rowc, dense = _dense_ce(u, lse, a, need_grad)
        terms = Terms(loss=loss, rowc=rowc)

    # Regularisers, each scaled by the sample weight s; their dense parts are added here.
    entropy = p_mass = None
    if opts.confidence_penalty:
        assert q is not None  # not the sparse path
        # 0 log 0 = 0: a masked class (u = -inf) has q = 0 and adds nothing (q * u would be nan)
        qu = torch.where(q != 0, q * u, 0.0)
        entropy = lse - qu.sum(dim=1, keepdim=True)
        if need_grad:
            qu.mul_(s * opts.confidence_penalty)
            dense = qu if dense is None else dense.add_(qu)
    if opts.poly1 and not index:
        assert q is not None  # not the sparse path
        qt = q * tt
        p_mass = qt.sum(dim=1, keepdim=True)
        if need_grad:
            qt.mul_(-opts.poly1)
            dense = qt if dense is None else dense.add_(qt)
    terms = regulariser_terms(
        terms, s, lse, opts, C, q_y=torch.exp(-ell_y) if index else None, entropy=entropy,
        p_mass=p_mass,
    )
    loss, rowc, sparse = terms.loss, terms.rowc, terms.sparse
    rowconst = outer = None
    if terms.uniform is not None:
        if weight is None:
            rowconst = -terms.uniform
        else:
            outer = (-terms.uniform, weight)

    if grad_out is not None:
        assert q is not None  # computed whenever a gradient is
        if sparse is not None and sparse is rowc:
            # plain CE / focal: G = rowc * (q - onehot_y); ignored rows have rowc = 0
            q.scatter_add_(1, y, _minus_ones(R, acc, x.device))
        elif sparse is not None:
            # Subtract the target column from q before the final multiply, in fp32:
            # G = rowc * (q - onehot_y * sparse / rowc). Doing it first keeps 1 - q_y exact where
            # q_y -> 1, and lets the multiply below write the (possibly bf16) gradient directly.
            rowc_t = torch.as_tensor(rowc, dtype=acc, device=x.device).expand(R, 1)
            ratio = torch.where(rowc_t != 0, sparse / rowc_t, 0.0)
            q.scatter_add_(1, y, ratio.neg_())
            residual = torch.where(rowc_t != 0, 0.0, sparse)  # rows with rowc == 0 (poly1 only)
            if bool(_compiling() or (residual != 0).any()):
                dense_sparse = torch.zeros_like(q).scatter_(1, y, residual.neg())
                dense = dense_sparse if dense is None else dense.add_(dense_sparse)
        # Fold grad_scale into the per-row scalars: q is scaled once.
        G = q.mul_(rowc * grad_scale)
        if rowconst is not None:
            G.add_(rowconst * grad_scale)
        if outer is not None:
            G.addcmul_(outer[0] * grad_scale, outer[1])
        if dense is not None:
            G.add_(dense.mul_(grad_scale))
        if th is not None:
            G.mul_(1.0 - th.square())  # d/dz [c tanh(z/c)] = 1 - tanh^2
        if G is not grad_out:
            grad_out.copy_(G)  # rounded once, to the logits' dtype
    return loss.reshape(R)


@functools.lru_cache(maxsize=32)  # bounded: batch sizes vary
def _minus_ones_cached(R: int, dtype: torch.dtype, device: torch.device) -> Tensor:
    return torch.full((R, 1), -1.0, dtype=dtype, device=device)


def _minus_ones(R: int, dtype: torch.dtype, device: torch.device) -> Tensor:
    if _compiling():
        return torch.full((R, 1), -1.0, dtype=dtype, device=device)
    return _minus_ones_cached(R, dtype, device)


def _dense_ce(u: Tensor, lse: Tensor, a: Tensor, need_grad: bool) -> tuple[Tensor, Tensor, Tensor | None]:
    """CE with dense target mass a (R, C): L = sum a ell = lse sum(a) - sum a u; G = q sum(a) - a."""
    a_sum = a.sum(dim=1, keepdim=True)
    # a class without target mass adds nothing, even a masked one (u = -inf): 0 log 0 = 0
    loss = a_sum * lse - torch.where(a != 0, a * u, 0.0).sum(dim=1, keepdim=True)
    return loss, a_sum, (a.neg() if need_grad else None)


def _dense_focal(
    u: Tensor, lse: Tensor, a: Tensor, gam: Tensor | float, need_grad: bool
) -> tuple[Tensor, Tensor, Tensor | None]:
    """Focal terms when the target mass a (R, C) is dense: loss, rowc and dense of G.

    L = sum_k a_k f_k with f = (1-q)^gamma ell;  dL/du_j = a_j g_j - q_j sum_k a_k g_k,
    g = q df/dq = -(1-q)^gamma kappa.
    """
    ell = torch.sub(lse, u)
    factor, kappa = focal_terms(ell, gam)
    loss = torch.where(a != 0, a * factor * ell, 0.0).sum(dim=1, keepdim=True)  # 0 log 0 = 0
    if not need_grad:
        return loss, torch.zeros_like(lse), None
    ag = factor.mul_(kappa).mul_(a).neg_()  # a * g
    return loss, -ag.sum(dim=1, keepdim=True), ag


def _coefficients_known(opts: SoftmaxOptions) -> bool:
    """True when the gradient is ``rowc * q + rowconst (+ outer) - a_y onehot_y`` with per-row
    coefficients known from the target (CE with any mix of class weights, ignore_index and
    smoothing) or from the row's own q_y alone (focal without smoothing, schedules included).
    z-loss, Poly-1, the confidence penalty and softcap take the general schedule.
    """
    if opts.z_loss or opts.poly1 or opts.confidence_penalty or opts.softcap is not None:
        return False
    return not (opts.focal and opts.label_smoothing)


#: Rows per block of the schedule below: each block costs only about six small ops, so blocks
#: can be small enough (fp32: 2 MiB at C = 32,000) for the second read of the block, the
#: smoothing's row sum, to hit the cache.
LINEAR_BLOCK_ELEMENTS = 1 << 19
#: Focal blocks (fp32) carry ~15 more small per-row ops: 8 MiB blocks amortise them (measured
#: best among 2, 4 and 8 MiB at C = 32,000).
FOCAL_BLOCK_ELEMENTS = 1 << 21


def rows_of(opts: SoftmaxOptions, r0: int, r1: int) -> SoftmaxOptions:
    """``opts`` for rows [r0, r1) of a call: a per-row gamma is sliced to the block."""
    if isinstance(opts.gamma, RowGamma):
        return replace(opts, gamma=RowGamma(opts.gamma.rows[r0:r1]))
    return opts


def _linear_coefficient_rows(
    logits: Tensor,
    rows: tuple[Tensor, Tensor, Tensor],
    weight: Tensor | None,
    opts: SoftmaxOptions,
    grad_buf: Tensor,
    scale: Tensor,
    scratch: Tensor | None,
    losses: Tensor,
) -> None:
    """The schedule of :func:`softmax_rows` for CE / smoothing / weights on 2-D CPU logits.

    Same formulas, ordered so that the per-row coefficients are computed once for all rows
    before the block loop and the per-row losses once after it; each block then runs: (row sum)
    -> fused softmax into the gradient buffer -> gather q_y -> scatter -> multiply (-> add).
    """
    acc = losses.dtype
    N, C = logits.shape
    y, validf, w_y = rows
    eps = float(opts.label_smoothing)
    a_y = w_y * (1.0 - eps) if eps else w_y
    u_y = logits.gather(1, y).to(acc)
    rowc = a_y
    rowconst = outer_a = None
    w_sum: Tensor | float = 0.0
    if eps:
        ue = eps / C * validf
        w_sum = float(C) if weight is None else weight.sum()
        rowc = a_y + ue * w_sum
        if weight is None:
            rowconst = (-ue * scale).to(acc)
        else:
            outer_a = -ue * scale
    # G = rowc (q - onehot_y * a_y / rowc) + rowconst: subtract first, then one multiply
    ratio = torch.where(rowc != 0, a_y / torch.where(rowc != 0, rowc, 1.0), 0.0).neg_()
    rowc_s = rowc * scale
    focal = opts.focal
    factor_y = torch.empty((N, 1), dtype=acc) if focal else None
    q_y = torch.empty((N, 1), dtype=acc)
    u_sum = torch.empty((N, 1), dtype=acc) if eps else None
    half = logits.dtype != acc
    # focal adds ~15 small per-row ops to each block: larger blocks amortise them
    elements = HALF_BLOCK_ELEMENTS if half else FOCAL_BLOCK_ELEMENTS if focal else LINEAR_BLOCK_ELEMENTS
    n_block = max(1, elements // max(1, C))
    for n0 in range(0, N, n_block):
        n1 = min(N, n0 + n_block)
        xb, gb, yb = logits[n0:n1], grad_buf[n0:n1], y[n0:n1]
        if half:
            assert scratch is not None  # the driver allocates it for half precision
            q = scratch[: n1 - n0].copy_(xb)  # fp32 staging
            src = q
        else:
            q, src = gb, xb
        if u_sum is not None:  # eps: the uniform part of the smoothed target needs sum_k w_k u_k
            torch.sum(src, dim=1, keepdim=True, out=u_sum[n0:n1]) if weight is None else torch.mv(
                src.to(acc), weight, out=u_sum[n0:n1, 0]
            )
        q = _softmax_into(src, q)
        torch.gather(q, 1, yb, out=q_y[n0:n1])
        q.scatter_add_(1, yb, ratio[n0:n1])
        if factor_y is not None:  # focal
            # coef = a_y (1-q_y)^gamma kappa from this block's q_y; where q_y underflows the
            # factor and kappa are 1 to working precision, so clamping -log q_y is harmless
            # here (the loss below uses the exact value).
            qb = q_y[n0:n1]
            gam = gamma_for_rows(rows_of(opts, n0, n1), qb)
            factor, kappa = focal_terms(torch.log(qb.clamp_min(_Q_TINY)).neg_(), gam)
            factor_y[n0:n1] = factor
            q.mul_(factor.mul_(kappa).mul_(rowc_s[n0:n1]))
        else:
            q.mul_(rowc_s[n0:n1])
        if rowconst is not None:
            q.add_(rowconst[n0:n1])
        elif outer_a is not None:
            assert weight is not None  # outer_a is set only with class weights
            q.addcmul_(outer_a[n0:n1], weight)
        if half:
            gb.copy_(q)  # rounded once, to the logits' dtype
    ell_y = torch.log(q_y).neg_()
    tiny = (q_y < _Q_TINY).squeeze(1)
    if bool(tiny.any()):  # exact lse where q_y underflows (hostile logits); x is intact here
        idx = tiny.nonzero().squeeze(1)
        lse_exact = torch.logsumexp(logits[idx].to(acc), dim=1, keepdim=True)
        ell_y[idx] = lse_exact - u_y[idx]
    loss = a_y * ell_y if factor_y is None else a_y * factor_y * ell_y
    if u_sum is not None:  # eps
        loss = loss + ue * ((u_y + ell_y) * w_sum - u_sum)
    losses.copy_(loss.reshape(-1))



def _slice_rows(rows: tuple[Tensor, Tensor, Tensor], r0: int, r1: int) -> tuple[Tensor, Tensor, Tensor]:
    """Rows [r0, r1) of :func:`index_rows`' columns."""
    y, validf, w_y = rows
    return y[r0:r1], validf[r0:r1], w_y[r0:r1]


def _empty(shape: tuple[int, ...], like: Tensor) -> Tensor:
    if like.device.type == "cpu" and not _compiling():
        return empty_hugepage(*shape, dtype=like.dtype)
    return torch.empty(shape, dtype=like.dtype, device=like.device)


def _zero_ignored_rows(
    valid: Tensor, losses: Tensor, grad_buf: Tensor | None, C: int, spatial: bool
) -> None:
    """Rows whose target is ``ignore_index`` contribute nothing, whatever their logits hold
    (nan, inf): their loss and gradient are set to 0 (``where``, not a product with a weight
    of 0, which keeps a nan), as ``F.cross_entropy`` and the native kernels do."""
    losses.masked_fill_(~valid, 0.0)
    if grad_buf is None:
        return
    rows = grad_buf.view(-1, C) if spatial else grad_buf
    if _compiling() or rows.device.type != "cpu":
        rows.masked_fill_(~valid.unsqueeze(1), 0.0)
        return
    ignored = (~valid).nonzero().squeeze(1)  # only the ignored rows are touched
    if ignored.numel():
        rows.index_fill_(0, ignored, 0.0)


def softmax_cross_entropy(call: SoftmaxCall) -> tuple[Tensor, Tensor | None]:
    """Loss (reduced) and the gradient of that loss w.r.t. ``logits`` (or None).

    Handles the layouts (C,), (N, C), (N, C, d1..dk). The gradient buffer is the only N x C
    allocation; with ``inplace_backward`` it is ``logits`` itself (1-D/2-D logits only).
    """
    logits, target, weight, opts = call.logits, call.target, call.weight, call.opts
    reduction, need_grad, inplace_backward = call.reduction, call.need_grad, call.inplace_backward
    acc = acc_dtype(logits.dtype)
    squeeze = logits.ndim == 1
    if squeeze:
        logits = logits.unsqueeze(0)
        target = target.reshape(1) if not target.is_floating_point() else target.unsqueeze(0)
    N, C = logits.shape[0], logits.shape[1]
    spatial = logits.shape[2:]
    per_n = 1
    for d in spatial:
        per_n *= d
    R = N * per_n
    flat_target = target.reshape(-1) if not target.is_floating_point() else None

    if reduction == "mean":
        denom = mean_denominator(
            flat_target if flat_target is not None else target, weight, opts.ignore_index, acc, R
        )
        scale = inverse_or_zero(denom)
    else:
        scale = torch.ones((), dtype=acc, device=logits.device)

    grad_buf: Tensor | None = None
    if need_grad:
        if inplace_backward:
            grad_buf = logits  # rows are read into temporaries before their gradient is written
        elif spatial:
            grad_buf = _empty((N, *spatial, C), logits)
        else:
            grad_buf = _empty(tuple(logits.shape), logits)

    losses = torch.empty(R, dtype=acc, device=logits.device)
    if _compiling() or logits.device.type != "cpu":
        n_block = N
    else:
        n_block = max(1, BLOCK_ELEMENTS // max(1, C * per_n))
    scratch = None
    if logits.device.type == "cpu" and not _compiling() and (not need_grad or acc != logits.dtype):
        if acc != logits.dtype:  # half precision stages each block in fp32: keep it in cache
            n_block = max(1, HALF_BLOCK_ELEMENTS // max(1, C * per_n))
        # fp32 staging (half precision) or the softmax of an inference call: one block, reused
        scratch = torch.empty((min(N, n_block) * per_n, C), dtype=acc)
    all_rows = (
        index_rows(flat_target, weight, opts.ignore_index, acc) if flat_target is not None else None
    )
    stats = call.stats
    linear_rows = (
        need_grad and not spatial and not inplace_backward and flat_target is not None
        and logits.device.type == "cpu" and not _compiling() and _coefficients_known(opts)
        and stats is None
    )
    if linear_rows:
        assert all_rows is not None and grad_buf is not None  # index targets, need_grad
        _linear_coefficient_rows(logits, all_rows, weight, opts, grad_buf, scale, scratch, losses)
    for n0 in range(0, 0 if linear_rows else N, max(n_block, 1)):
        n1 = min(N, n0 + n_block)
        if spatial:
            xb = logits[n0:n1].movedim(1, -1).reshape(-1, C)  # a block-sized copy
            if flat_target is not None:
                tb = target[n0:n1].reshape(-1)
            else:
                tb = target[n0:n1].movedim(1, -1).reshape(-1, C)
            gb = grad_buf[n0:n1].view(-1, C) if grad_buf is not None else None
        else:
            xb, tb = logits[n0:n1], target[n0:n1]
            gb = grad_buf[n0:n1] if grad_buf is not None else None
        if stats is not None:  # from the block in cache, before its gradient may overwrite it
            row_statistics(xb, tb, opts.softcap, stats[n0 * per_n : n1 * per_n])
        losses[n0 * per_n : n1 * per_n] = softmax_rows(
            xb, tb, weight, rows_of(opts, n0 * per_n, n1 * per_n), gb, scale, scratch,
            None if all_rows is None else _slice_rows(all_rows, n0 * per_n, n1 * per_n),
        )

    if flat_target is not None:
        _zero_ignored_rows(flat_target != opts.ignore_index, losses, grad_buf, C, bool(spatial))

    if reduction == "none":
        loss = losses.reshape(()) if squeeze else losses.reshape(N, *spatial)
    elif reduction == "sum":
        loss = losses.sum()
    else:
        loss = losses.sum() * scale

    grad: Tensor | None = None
    if grad_buf is not None:
        grad = grad_buf.movedim(-1, 1) if spatial else grad_buf
        if squeeze:
            grad = grad.squeeze(0)
    return loss, grad
