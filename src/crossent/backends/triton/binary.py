r"""Triton kernel for the binary / multi-label (sigmoid) cross-entropy family (CUDA tensors).

Same contract and math as :mod:`crossent.backends.torch_ops.binary` (its docstring derives the gradient).
Per element, with :math:`p = \sigma(x)`, :math:`q = 1 - p = \sigma(-x)`, the smoothed target
:math:`t' = t (1 - \varepsilon) + \varepsilon / 2`, the clip :math:`c`,
:math:`p_m = \max(p - c, 0)`, :math:`m = [p > c]`, :math:`s = p q`:

.. math::

    b &= w_+ t' \,\mathrm{softplus}(-x) + (1 - t')\,\ell_n, \quad
        \ell_n = \mathrm{softplus}(x) \;(c = 0), \; -\log(1 - p_m) \;(c > 0) \\
    1 - p_t &= t' q + (1 - t') p_m, \quad
        \gamma_t = \gamma_+ t' + \gamma_- (1 - t'), \quad
        \alpha_t = \alpha t' + (1 - \alpha)(1 - t') \\
    L &= w\, \alpha_t\, (1 - p_t)^{\gamma_t}\, b \\
    \frac{dL}{dx} &= w\, \alpha_t\, (1 - p_t)^{\gamma_t}
        \Bigl[\gamma_t \frac{D}{1 - p_t} b + b'\Bigr], \quad
        D = s\,[m (1 - t') - t'], \quad
        b' = (1 - t') \frac{m s}{q + c} - w_+ t' q

(:math:`b' = (1 - t') p - w_+ t' q` for :math:`c = 0`). Entries whose target equals
``ignore_index`` give loss and gradient 0.

Kernel structure: one read of logits and targets (and the weights), one write of the gradient
(and of the per-element loss for ``reduction="none"``; otherwise one partial sum per program,
added up by torch). Every dtype is computed in fp32, int64 offsets throughout.

Broadcast weights: ``weight`` and ``pos_weight`` broadcast to the logits' shape (per class
``(C,)``, per sample ``(N, 1)``, full, ...). The host coalesces the logits' shape against the
weights' expanded strides into at most 3 dims ``(D0, D1, D2)``; the kernel sees the logits as a
contiguous ``(M, K) = (D0 D1, D2)`` matrix of ``(BLOCK_M, BLOCK_K)`` tiles and addresses a
weight as ``i0 s0 + i1 s1 + k s2`` with ``(i0, i1) = divmod(row, D1)`` (one division per row,
none per element). Patterns needing more than 3 dims (rare) materialise the weight.

Float64 logits (gradcheck) and empty inputs are delegated to the torch path on the same
device, as in :mod:`crossent.backends.triton.softmax`. Targets are compared with ``ignore_index`` and
used in fp32 (the torch path also computes in fp32; float64 targets are rounded first).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from crossent._formula import inverse_or_zero
from crossent._options import BinaryCall
from crossent.backends.torch_ops.binary import binary_cross_entropy as _torch_binary_ce
from crossent.backends.triton._common import log1p, next_pow2

__all__ = ["binary_cross_entropy", "coalesce"]

#: Elements per program tile.
TILE = 1024


@triton.jit
def _softplus(x):
    """log(1 + exp(x)) without overflow: max(x, 0) + log1p(exp(-|x|))."""
    return tl.maximum(x, 0.0) + log1p(tl.exp(-tl.abs(x)))


@triton.jit
def _binary_ce_kernel(
    X, T, W, PW, SCALE, LOSS, PART, G,
    M, K, D1, ws0, ws1, ws2, pws0, pws1, pws2, n_kblocks,
    ignore_index, one_minus_eps, half_eps, gamma_pos, gamma_neg, alpha, clip,
    HAS_IGNORE: tl.constexpr, SMOOTHING: tl.constexpr, HAS_WEIGHT: tl.constexpr,
    HAS_POS_WEIGHT: tl.constexpr, HAS_ALPHA: tl.constexpr, FOCAL: tl.constexpr,
    ASYM_GAMMA: tl.constexpr, CLIP: tl.constexpr, NEED_GRAD: tl.constexpr,
    STORE_LOSS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr,
):
    r"""Loss and gradient of the sigmoid family on one (BLOCK_M, BLOCK_K) tile.

    Args:
        X: logits (fp32/fp16/bf16), contiguous, seen as (M, K).
        T: targets of the logits' shape, contiguous (float, int or uint8 for bool).
        W, PW: fp32 weight / pos_weight, addressed ``i0 ws0 + i1 ws1 + k ws2`` (resp. pws*)
            with ``(i0, i1) = divmod(row, D1)``; read when HAS_WEIGHT / HAS_POS_WEIGHT.
        SCALE: pointer to one fp32 multiplying the gradient (1/count for a mean, else 1).
        LOSS: fp32 per-element loss output (when STORE_LOSS, i.e. reduction "none").
        PART: fp32 per-program partial sum of the loss (when not STORE_LOSS).
        G: gradient output (the logits' dtype), contiguous (M, K) (when NEED_GRAD).
        M, K: rows and columns of the contiguous view. D1: rows per index i0.
        n_kblocks: cdiv(K, BLOCK_K); the program id is split as (row block, column block).
        ignore_index: target value that masks an entry (HAS_IGNORE), compared in fp32.
        one_minus_eps, half_eps: smoothing t' = t (1 - eps) + eps / 2 (SMOOTHING).
        gamma_pos, gamma_neg: focusing parameters (FOCAL; ASYM_GAMMA when they differ).
        alpha: balance factor (HAS_ALPHA). clip: probability shift c (CLIP when c > 0).
        BLOCK_M, BLOCK_K: tile shape (powers of 2).
    """
    pid = tl.program_id(0)
    pm_ = pid // n_kblocks
    pk = pid - pm_ * n_kblocks
    rows = pm_.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pk.to(tl.int64) * BLOCK_K + tl.arange(0, BLOCK_K)
    rmask = rows < M
    cmask = cols < K
    mask = rmask[:, None] & cmask[None, :]
    offs = rows[:, None] * K + cols[None, :]  # int64: M K can exceed 2^31

    x = tl.load(X + offs, mask=mask, other=0.0).to(tl.float32)
    traw = tl.load(T + offs, mask=mask, other=0).to(tl.float32)
    if HAS_IGNORE:
        valid = mask & (traw != ignore_index)
        t = tl.where(valid, traw, 0.0)
    else:
        valid = mask
        t = traw
    if SMOOTHING:
        t = t * one_minus_eps + half_eps
    if HAS_WEIGHT or HAS_POS_WEIGHT:
        i0 = rows // D1
        i1 = rows - i0 * D1
    if HAS_WEIGHT:
        w = tl.load(W + (i0 * ws0 + i1 * ws1)[:, None] + cols[None, :] * ws2, mask=mask,
                    other=0.0)
    if HAS_POS_WEIGHT:
        pw = tl.load(PW + (i0 * pws0 + i1 * pws1)[:, None] + cols[None, :] * pws2, mask=mask,
                     other=0.0)

    ell_p = _softplus(-x)  # -log p, exact as p -> 0
    p = tl.sigmoid(x)
    q = tl.sigmoid(-x)  # 1 - p without cancellation as p -> 1
    if CLIP:
        pmv = tl.maximum(p - clip, 0.0)
        ell_n = -log1p(-pmv)  # -log(1 - p_m)
    else:
        pmv = p
        ell_n = _softplus(x)  # -log(1 - p)
    if HAS_POS_WEIGHT:
        b = (1.0 - t) * ell_n + t * (pw * ell_p)
    else:
        b = (1.0 - t) * ell_n + t * ell_p

    # multiplier w alpha_t
    if HAS_ALPHA:
        mult = t * (2.0 * alpha - 1.0) + (1.0 - alpha)
        if HAS_WEIGHT:
            mult = mult * w
    else:
        if HAS_WEIGHT:
            mult = w
        else:
            mult = 1.0

    if FOCAL:
        if ASYM_GAMMA:
            gam = t * (gamma_pos - gamma_neg) + gamma_neg
        else:
            gam = gamma_pos
        denom = (1.0 - t) * pmv + t * q  # 1 - p_t, a convex combination: no cancellation
        # pow with 0^0 = 1: a gamma_t of 0 gives exactly 1 even where 1 - p_t underflows
        factor = tl.where(gam == 0.0, 1.0, tl.exp(gam * tl.log(denom)))
        loss = factor * b
    else:
        loss = b
    loss = tl.where(valid, loss * mult, 0.0)
    if STORE_LOSS:
        tl.store(LOSS + offs, loss, mask=mask)
    else:
        tl.store(PART + pid, tl.sum(tl.sum(loss, axis=1), axis=0))

    if NEED_GRAD:
        s = p * q  # dp/dx
        if HAS_POS_WEIGHT:
            npq = -(pw * q)
        else:
            npq = -q
        if CLIP:
            mf = (pmv > 0.0).to(tl.float32)  # the clip kink: dp_m/dx = m s
            db = (1.0 - t) * (s / (q + clip) * mf) + t * npq
        else:
            db = (1.0 - t) * p + t * npq
        if FOCAL:
            if CLIP:
                D = s * (mf * (1.0 - t) - t)
            else:
                D = s * (1.0 - 2.0 * t)
            # gamma_t (1-p_t)^(gamma_t - 1) D b as gamma_t F (D / (1-p_t)) b: a bounded ratio
            ratio = D / tl.maximum(denom, 1.1754943508222875e-38) * b
            g = (gam * ratio + db) * factor
        else:
            g = db
        g = tl.where(valid, g * mult, 0.0) * tl.load(SCALE)
        tl.store(G + offs, g.to(G.dtype.element_ty), mask=mask)


def coalesce(shape: tuple[int, ...], strides: list[tuple[int, ...]]) -> list[tuple[int, list[int]]]:
    """Merge the dims of a contiguous tensor of ``shape`` that every strided operand allows.

    ``strides`` are the operands' strides over ``shape`` (e.g. an expanded weight's, with 0 on
    broadcast dims). Dims of size 1 are dropped; dims d, d+1 merge when, for every operand,
    ``stride[d] == stride[d+1] * shape[d+1]``. Returns ``[(size, [stride per operand]), ...]``
    from outermost to innermost (the contiguous logits always allow a merge).
    """
    out: list[tuple[int, list[int]]] = []
    for d, size in enumerate(shape):
        if size == 1:
            continue
        sts = [int(st[d]) for st in strides]
        if out:
            psize, psts = out[-1]
            if all(ps == s * size for ps, s in zip(psts, sts, strict=True)):
                out[-1] = (psize * size, sts)
                continue
        out.append((size, sts))
    return out


def _layout(
    shape: tuple[int, ...], weights: list[Tensor | None]
) -> tuple[tuple[int, int, int], list[Tensor | None], list[tuple[int, int, int]]]:
    """(D0, D1, D2), the weight tensors to pass and their 3 strides each."""
    present = [w.expand(shape) if w is not None else None for w in weights]
    strided = [w for w in present if w is not None]
    dims = coalesce(shape, [w.stride() for w in strided])
    if len(dims) > 3:  # an unusual broadcast pattern: materialise the weights
        present = [w.contiguous() if w is not None else None for w in present]
        strided = [w for w in present if w is not None]
        dims = coalesce(shape, [w.stride() for w in strided])
    while len(dims) < 3:
        dims.insert(0, (1, [0] * len(strided)))
    sizes = (dims[0][0], dims[1][0], dims[2][0])
    out_strides: list[tuple[int, int, int]] = []
    i = 0
    for w in present:
        if w is None:
            out_strides.append((0, 0, 0))
        else:
            out_strides.append((dims[0][1][i], dims[1][1][i], dims[2][1][i]))
            i += 1
    return sizes, present, out_strides


def binary_cross_entropy(
    call: BinaryCall,
    *,
    block_m: int | None = None,
    block_k: int | None = None,
    num_warps: int = 4,
) -> tuple[Tensor, Tensor | None]:
    """Loss (reduced per ``reduction``) and its gradient w.r.t. ``logits`` (or None), by Triton.

    The contract of :func:`crossent.backends.torch_ops.binary.binary_cross_entropy`: any shape; ``weight``
    and ``pos_weight`` broadcast to it; the loss is fp32 (of the logits' shape for "none"); the
    gradient of that (summed) loss has the logits' dtype and shape, with the mean's 1/count
    folded in (0 when every entry is masked). ``block_m``/``block_k`` override the tile.
    """
    logits, target, weight, pos_weight = call.logits, call.target, call.weight, call.pos_weight
    opts, reduction, need_grad = call.opts, call.reduction, call.need_grad
    if logits.dtype == torch.float64 or logits.numel() == 0:
        return _torch_binary_ce(call)
    shape = tuple(logits.shape)
    dev = logits.device
    x = logits.contiguous()
    t = target.contiguous()
    if t.dtype == torch.bool:
        t = t.view(torch.uint8)
    elif t.dtype == torch.float64:
        t = t.float()
    ws = [None if w is None else w.detach().to(device=dev, dtype=torch.float32)
          for w in (weight, pos_weight)]
    (D0, D1, D2), (w_arg, pw_arg), (wst, pwst) = _layout(shape, ws)
    M, K = D0 * D1, D2

    has_ignore = opts.ignore_index is not None
    if reduction == "mean":
        if opts.ignore_index is not None:
            count = (target != opts.ignore_index).sum().to(torch.float32)
        else:
            count = torch.tensor(float(logits.numel()), device=dev)
        # every entry masked: loss 0 and zero gradient instead of 0/0
        scale = inverse_or_zero(count)
    else:
        scale = torch.ones((), dtype=torch.float32, device=dev)
    scale = scale.to(device=dev, dtype=torch.float32).reshape(1)

    BLOCK_K = block_k or min(next_pow2(K), TILE)
    BLOCK_M = block_m or max(1, min(TILE // BLOCK_K, next_pow2(M)))
    n_kblocks = triton.cdiv(K, BLOCK_K)
    grid = (triton.cdiv(M, BLOCK_M) * n_kblocks,)

    store_loss = reduction == "none"
    loss_buf = torch.empty(shape if store_loss else grid, dtype=torch.float32, device=dev)
    grad = torch.empty(shape, dtype=logits.dtype, device=dev) if need_grad else None
    eps = float(opts.label_smoothing)
    gp, gn = float(opts.gamma_pos), float(opts.gamma_neg)
    _binary_ce_kernel[grid](
        x, t,
        w_arg if w_arg is not None else scale,
        pw_arg if pw_arg is not None else scale,
        scale, loss_buf, loss_buf, grad if grad is not None else x,
        M, K, D1, *wst, *pwst, n_kblocks,
        float(opts.ignore_index) if opts.ignore_index is not None else 0.0, 1.0 - eps, eps / 2.0, gp, gn,
        float(opts.alpha) if opts.alpha is not None else 0.0, float(opts.clip),
        HAS_IGNORE=has_ignore, SMOOTHING=eps > 0.0, HAS_WEIGHT=w_arg is not None,
        HAS_POS_WEIGHT=pw_arg is not None, HAS_ALPHA=opts.alpha is not None,
        FOCAL=opts.focal, ASYM_GAMMA=gp != gn, CLIP=opts.clip > 0.0,
        NEED_GRAD=bool(need_grad), STORE_LOSS=store_loss,
        BLOCK_M=BLOCK_M, BLOCK_K=BLOCK_K, num_warps=num_warps,
    )
    if store_loss:
        loss = loss_buf
    elif reduction == "sum":
        loss = loss_buf.sum()
    else:
        loss = loss_buf.sum() * scale.reshape(())
    return loss, grad
