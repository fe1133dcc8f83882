r"""Triton kernels for the softmax cross-entropy family (CUDA tensors).

Same contract and math as :mod:`crossent.backends.torch_ops.softmax` (read its docstring for the notation):
``u`` the (soft-capped) logits, ``q = softmax(u)``, ``ell_k = lse(u) - u_k``, the weighted
smoothed target ``a_k = w_k t~_k``, the sample weight ``s`` (``w_y``, 0 for ignored rows; 1 for
probability targets), and the gradient w.r.t. ``u`` assembled per row as

    G_k = q_k rowc + rowconst + dense_k - [k = y] sparse

and, with a soft cap, the gradient w.r.t. the raw logits ``z`` is ``G_k (1 - tanh^2(z_k / c))``.

The gradient of the (reduced) loss is computed in the forward pass, already multiplied by the
mean's 1/denominator, and saved for the backward pass (which only scales it by grad_output).

Kernel structure
----------------
One program handles ``BLOCK_R`` rows (1 for large vocabularies, several for small C) and loops
over the classes in ``BLOCK_C`` chunks. Row offsets are int64: ``N * C`` exceeds 2^31 at LM
sizes (8192 tokens x 262k vocabulary = 2.1e9 elements), and an int32 offset would wrap. Every
input dtype (fp32, fp16, bf16) is accumulated in fp32; the gradient is rounded once, to the
logits' dtype, when it is stored.

- pass 1 (one read): online max / sum-exp (``d = sum exp(u - m)``, rescaled by
  ``exp(m_old - m_new)`` when the max grows), and the other row sums the loss needs, all
  online: ``sum u`` (smoothing), ``sum w``, ``u.w`` (smoothing with weights), ``sum e u``
  (confidence penalty: ``sum q u = sum e u / d``), ``sum a``, ``sum a u`` (probability targets),
  ``sum t~ e`` (Poly-1 with probability targets). ``u_y`` is one gathered load per row.
- the loss and the per-row gradient coefficients from those sums;
- pass 2 (one read, one write): recompute ``q`` and write the gradient.

Dense focal terms (focal with label smoothing, or focal with probability targets) need the
per-class factor ``(1 - q_k)^gamma``, hence lse, before their sums: pass 1 (lse), pass 2 (loss
and ``A = sum_k a_k g_k``), pass 3 (gradient ``a_j g_j - q_j A + ...``).

Reads of the logits per feature (``C > BLOCK_C``, the vocabulary-sized case):

========================================================  ======  ======
feature                                                   reads   writes
========================================================  ======  ======
CE, weights, ignore_index, smoothing, focal (index),       2       1
z-loss, softcap, confidence penalty, Poly-1, prob. targets
focal with smoothing, focal with probability targets       3       1
focal schedule (callable gamma)                            +1      0
forward only (``need_grad=False``)                         1 (2*)  0
========================================================  ======  ======

(* dense focal.) When the whole row fits one chunk (``C <= 8192`` by default) it is loaded once
into registers and every pass reuses it: 1 read and 1 write for every feature (+1 read for a
schedule).

Focal schedules (callable ``gamma``): a first kernel (:func:`_softmax_ptrue_kernel`, one read)
stores the detached true-class probability of every row (``q_y``; ``sum_k t_k q_k`` for
probability targets, unsmoothed); the schedule is called on that (R,) device tensor in Python
and validated as in the torch path; the main kernel then reads one gamma per row.

``inplace_backward``: the gradient overwrites the logits. Safe: a program owns its rows; every
pass reads a chunk before writing it (elementwise, the same thread), and the gathered ``u_y``
and every row sum are read in pass 1, before any write.

Float64 logits (gradcheck) and empty inputs are delegated to the torch path
(:func:`crossent.backends.torch_ops.softmax.softmax_cross_entropy`) on the same device: the kernels accumulate
in fp32 (their scalar arguments are fp32), so fp64 would not keep its precision.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from crossent._formula import gamma_for_rows, inverse_or_zero, mean_denominator
from crossent._options import RowGamma, SoftmaxCall
from crossent.backends.torch_ops.softmax import softmax_cross_entropy as _torch_softmax_ce
from crossent.backends.triton._common import expm1, next_pow2, tanh

__all__ = ["launch_config", "softmax_cross_entropy"]

#: Largest class count processed as one register-resident chunk (1 read of the logits).
MAX_ONE_CHUNK = 8192
#: Chunk width of the class loop when the row does not fit one chunk.
CHUNK = 8192
#: Elements per program tile when several rows share a program (small C).
TILE = 2048


# --------------------------------------------------------------------------------------------
# jit helpers


@triton.jit
def _load_u(X, xrow, cols, stride_xc, rmask, cmask, cap, inv_cap, SOFTCAP: tl.constexpr):
    """Load a (BLOCK_R, BLOCK_C) chunk of logits as fp32 and apply the soft cap.

    Returns ``(u, dudz)``: ``u = cap * tanh(z / cap)`` and ``du/dz = 1 - tanh^2`` with SOFTCAP
    (else ``u = z`` and ``dudz`` is ``z``, unused). Masked entries read 0 (so ``u = 0`` there).
    """
    mask = rmask[:, None] & cmask[None, :]
    ptrs = X + xrow[:, None] + cols[None, :].to(tl.int64) * stride_xc
    z = tl.load(ptrs, mask=mask, other=0.0).to(tl.float32)
    if SOFTCAP:
        th = tanh(z * inv_cap)
        u = th * cap
        dudz = 1.0 - th * th
    else:
        u = z
        dudz = z
    return u, dudz


@triton.jit
def _focal_terms(ell, gam, PER_ROW: tl.constexpr):
    r"""Focal factor ``(1-q)^gamma`` and ``kappa = 1 + gamma q ell / (1-q)`` from ``ell = -log q``.

    Log space as :func:`crossent._formula.focal_terms`: ``1 - q = -expm1(-ell)``, the power
    is ``exp(gamma log(1-q))``, and ``ell / (1-q) -> 1`` replaces ``(1-q)^(gamma-1)`` (finite
    gradient for gamma in (0, 1) as q -> 1). With PER_ROW (a schedule) a gamma of exactly 0
    gives a factor of exactly 1 (not ``exp(0 * -inf) = nan``).
    """
    one_minus_q = -expm1(-ell)
    factor = tl.exp(gam * tl.log(one_minus_q))
    if PER_ROW:
        factor = tl.where(gam == 0.0, 1.0, factor)
    safe = tl.where(one_minus_q > 0.0, one_minus_q, 1.0)
    ratio = tl.where(one_minus_q > 0.0, ell / safe, 1.0)
    q = tl.exp(-ell)
    kappa = 1.0 + gam * tl.where(q != 0.0, q * ratio, 0.0)  # q ell / (1 - q) -> 0 as q -> 0
    return factor, kappa


@triton.jit
def _target_terms(
    ell_y, lse, u_dot, s, validf, gam, one_minus_eps, uniform, w_sum,
    FOCAL: tl.constexpr, SCHEDULE: tl.constexpr, SMOOTHING: tl.constexpr,
):
    r"""The target part of a row for class indices without a per-class focal factor, from the
    row's statistics: the Triton form of :func:`crossent._formula.target_terms` (the
    regularisers follow in the kernel, as :func:`crossent._formula.regulariser_terms`).

    Returns ``(loss, rowc, uniform_coef, sparse)`` of
    ``G = q rowc - uniform_coef w - [k = y] sparse`` (``w`` the class weights, or ones).
    """
    a_y = s * one_minus_eps
    if FOCAL:
        fac_y, kap_y = _focal_terms(ell_y, gam, SCHEDULE)
        loss = a_y * fac_y * ell_y
        coef = a_y * fac_y * kap_y
    else:
        loss = a_y * ell_y
        coef = a_y
    rowc = coef
    sparse = coef
    ue = tl.zeros_like(lse)
    if SMOOTHING:
        # (eps/C) sum_k w_k ell_k = (eps/C)(lse sum w - u.w); grad (eps/C)(q sum w - w)
        ue = uniform * validf
        loss += ue * (lse * w_sum - u_dot)
        rowc += ue * w_sum
    return loss, rowc, ue, sparse


@triton.jit
def _target_mass(
    T, trow, cols, stride_tc, rmask, cmask, W, y, a_y, validf, one_minus_eps, uniform,
    PROB_TARGET: tl.constexpr, HAS_WEIGHT: tl.constexpr, SMOOTHING: tl.constexpr,
):
    """Chunk of the weighted smoothed target ``a = w * t~`` and of ``t~`` (0 at padding columns).

    Index targets: ``a_k = (eps/C) w_k + [k = y] w_y (1 - eps)`` (times 0 for ignored rows), and
    ``t~`` is not formed (the second value is ``a``). Probability targets:
    ``t~ = (1 - eps) t + eps / C``, ``a = w t~``.
    """
    cm = cmask[None, :]
    if HAS_WEIGHT:
        wk = tl.load(W + cols, mask=cmask, other=0.0)[None, :]
    else:
        wk = 1.0
    if PROB_TARGET:
        mask = rmask[:, None] & cm
        t = tl.load(T + trow[:, None] + cols[None, :].to(tl.int64) * stride_tc, mask=mask,
                    other=0.0).to(tl.float32)
        if SMOOTHING:
            tt = tl.where(cm, t * one_minus_eps + uniform, 0.0)
        else:
            tt = t
        a = tt * wk
    else:
        a = tl.where(cm, (uniform * validf)[:, None] * wk, 0.0)
        a = a + tl.where(cols[None, :] == y[:, None], a_y[:, None], 0.0)
        tt = a
    return a, tt


# --------------------------------------------------------------------------------------------
# kernels


@triton.jit
def _softmax_ce_kernel(
    X, stride_xn, stride_xs, stride_xc,
    T, stride_tn, stride_ts, stride_tc,
    W, GAMMA, SCALE, LOSS,
    G, stride_gn, stride_gs, stride_gc,
    STATS,
    R, C, S, ignore_index,
    cf, one_minus_eps, uniform, gamma, z_loss, cap, beta, poly1,
    PROB_TARGET: tl.constexpr, HAS_WEIGHT: tl.constexpr, SMOOTHING: tl.constexpr,
    FOCAL: tl.constexpr, SCHEDULE: tl.constexpr, DENSE: tl.constexpr, Z_LOSS: tl.constexpr,
    SOFTCAP: tl.constexpr, CP: tl.constexpr, POLY1: tl.constexpr, NEED_GRAD: tl.constexpr,
    AUX: tl.constexpr, ONE_CHUNK: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
):
    r"""Per-row loss and gradient of the softmax family for BLOCK_R rows.

    The logits are an (N, C, S) strided view; row ``r = n S + j`` is ``X[n, :, j]``
    (S = 1 for (C,) / (N, C) inputs).

    Args:
        X: logits (fp32/fp16/bf16); strides ``stride_xn``, ``stride_xs``, ``stride_xc`` of the
            (N, C, S) view, in elements.
        T: targets: (R,) contiguous int64 class indices, or (N, C, S) probabilities (any float
            dtype) with strides ``stride_tn``, ``stride_ts``, ``stride_tc`` (unused for indices).
        W: (C,) fp32 class weights (read when HAS_WEIGHT).
        GAMMA: (R,) fp32 focusing parameter per row (read when SCHEDULE).
        SCALE: pointer to one fp32: the factor of the gradient (1/denominator for a mean, 0
            when the denominator is 0, else 1).
        LOSS: (R,) fp32 output, the unreduced loss of every row.
        G: gradient output (the logits' dtype), an (N, C, S) view with strides
            ``stride_gn``, ``stride_gs``, ``stride_gc``; may be X itself (inplace_backward).
        STATS: (R, 3) fp32 output of ``return_aux`` (written when AUX): lse, the entropy
            ``H = lse - sum q u`` and 1.0 where the first argmax of u is the target class
            (for probability targets, the first argmax of the target), from pass 1.
        R, C, S: rows (N * S), classes, spatial size.
        ignore_index: index targets equal to it give loss 0 and gradient 0.
        cf: float(C). one_minus_eps: 1 - label_smoothing. uniform: label_smoothing / C.
        gamma: focal gamma (when FOCAL and not SCHEDULE). z_loss: lambda_z. cap: softcap c
            (1.0 when unused). beta: confidence penalty. poly1: epsilon_1.
        PROB_TARGET: T holds probabilities. HAS_WEIGHT: W is used. SMOOTHING: eps > 0.
        FOCAL: gamma != 0 or a schedule. SCHEDULE: per-row gamma from GAMMA.
        DENSE: FOCAL and (SMOOTHING or PROB_TARGET): per-class focal terms, 3 passes.
        Z_LOSS, SOFTCAP, CP, POLY1: the regularisers / soft cap are active.
        NEED_GRAD: write G. ONE_CHUNK: C <= BLOCK_C, the row stays in registers.
        BLOCK_R: rows per program. BLOCK_C: classes per chunk (a power of 2).
    """
    pid = tl.program_id(0)
    # int64 before any multiplication: R * C and row * stride can exceed 2^31.
    rows = pid.to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    rmask = rows < R
    n = rows // S
    j = rows - n * S
    xrow = n * stride_xn + j * stride_xs
    trow = n * stride_tn + j * stride_ts
    offs = tl.arange(0, BLOCK_C)
    inv_cap = 1.0 / cap

    # ---- per-row target data (index targets)
    if PROB_TARGET:
        validf = rmask.to(tl.float32)
        y = rows  # unused
        s = tl.full([BLOCK_R], 1.0, tl.float32)
    else:
        yraw = tl.load(T + rows, mask=rmask, other=ignore_index)
        valid = (yraw != ignore_index) & rmask
        y = tl.where(valid, yraw, 0)
        validf = valid.to(tl.float32)
        if HAS_WEIGHT:
            s = tl.load(W + y, mask=valid, other=0.0) * validf
        else:
            s = validf
        zy = tl.load(X + xrow + y * stride_xc, mask=rmask, other=0.0).to(tl.float32)
        if SOFTCAP:
            u_y = tanh(zy * inv_cap) * cap
        else:
            u_y = zy
    if SCHEDULE:
        gam = tl.load(GAMMA + rows, mask=rmask, other=0.0)
        gam2 = gam[:, None]
    else:
        gam = gamma
        gam2 = gamma

    if ONE_CHUNK:
        u0, dudz0 = _load_u(X, xrow, offs, stride_xc, rmask, offs < C, cap, inv_cap, SOFTCAP)

    # ---- pass 1: online max / sum-exp and the row sums
    m = tl.full([BLOCK_R], -float("inf"), tl.float32)
    d = tl.zeros([BLOCK_R], tl.float32)
    su = tl.zeros([BLOCK_R], tl.float32)  # sum u                  (smoothing, index)
    suw = tl.zeros([BLOCK_R], tl.float32)  # sum u w               (smoothing + weights)
    wsum = tl.zeros([BLOCK_R], tl.float32)  # sum w                (smoothing + weights)
    seu = tl.zeros([BLOCK_R], tl.float32)  # sum e u, e = exp(u - m) (confidence penalty, aux)
    amax = tl.zeros([BLOCK_R], tl.int64)  # first argmax of u                     (aux)
    tmax = tl.full([BLOCK_R], -float("inf"), tl.float32)  # max of the target    (aux, prob.)
    targ = tl.zeros([BLOCK_R], tl.int64)  # its first argmax                      (aux, prob.)
    asum = tl.zeros([BLOCK_R], tl.float32)  # sum a                (probability targets)
    sau = tl.zeros([BLOCK_R], tl.float32)  # sum a u               (probability targets)
    set_ = tl.zeros([BLOCK_R], tl.float32)  # sum e t~             (Poly-1, prob. targets)
    for c0 in range(0, C, BLOCK_C):
        cols = c0 + offs
        cmask = cols < C
        if ONE_CHUNK:
            u = u0
        else:
            u, _dudz = _load_u(X, xrow, cols, stride_xc, rmask, cmask, cap, inv_cap, SOFTCAP)
        um = tl.where(cmask[None, :], u, -float("inf"))
        cmax = tl.max(um, axis=1)
        if AUX:
            # online first argmax: a later chunk takes over only with a strictly larger max
            amax = tl.where(cmax > m, c0 + tl.argmax(um, axis=1).to(tl.int64), amax)
            if PROB_TARGET:
                tk = tl.load(T + trow[:, None] + cols[None, :].to(tl.int64) * stride_tc,
                             mask=rmask[:, None] & cmask[None, :], other=-float("inf")).to(tl.float32)
                tc = tl.max(tk, axis=1)
                targ = tl.where(tc > tmax, c0 + tl.argmax(tk, axis=1).to(tl.int64), targ)
                tmax = tl.maximum(tmax, tc)
        m_new = tl.maximum(m, cmax)
        alpha = tl.exp(m - m_new)
        e = tl.exp(um - m_new[:, None])  # 0 at padding columns
        d = d * alpha + tl.sum(e, axis=1)
        if CP or AUX:
            seu = seu * alpha + tl.sum(tl.where(e != 0.0, e * u, 0.0), axis=1)  # 0 log 0 = 0
        if PROB_TARGET:
            if not FOCAL or POLY1:
                a, tt = _target_mass(T, trow, cols, stride_tc, rmask, cmask, W, y, s, validf,
                                     one_minus_eps, uniform, PROB_TARGET, HAS_WEIGHT, SMOOTHING)
                if not FOCAL:
                    asum += tl.sum(a, axis=1)
                    sau += tl.sum(tl.where(a != 0, a * u, 0.0), axis=1)
                if POLY1:
                    set_ = set_ * alpha + tl.sum(e * tt, axis=1)
        else:
            if SMOOTHING and not DENSE:
                if HAS_WEIGHT:
                    wk = tl.load(W + cols, mask=cmask, other=0.0)
                    suw += tl.sum(u * wk[None, :], axis=1)
                    wsum += tl.sum(wk, axis=0)
                else:
                    su += tl.sum(u, axis=1)
        m = m_new
    lse = m + tl.log(d)
    if AUX:
        hit = (amax == targ) if PROB_TARGET else (amax == y)
        tl.store(STATS + rows * 3, lse, mask=rmask)
        tl.store(STATS + rows * 3 + 1, lse - seu / d, mask=rmask)
        tl.store(STATS + rows * 3 + 2, hit.to(tl.float32), mask=rmask)

    # ---- loss and gradient coefficients of each row
    zero = tl.zeros([BLOCK_R], tl.float32)
    rowconst = zero  # added to every class (smoothing without weights)
    dw = zero  # coefficient of w_k (smoothing with weights)
    sparse = zero  # subtracted at the target class
    if PROB_TARGET:
        a_y = zero
        if FOCAL:
            loss = zero
            rowc = zero
        else:
            loss = asum * lse - sau
            rowc = asum
    else:
        ell_y = lse - u_y
        a_y = s * one_minus_eps
        if DENSE:
            loss = zero
            rowc = zero
        else:
            if HAS_WEIGHT:
                u_dot = suw
                w_tot = wsum
            else:
                u_dot = su
                w_tot = zero + cf
            loss, rowc, ue, sparse = _target_terms(
                ell_y, lse, u_dot, s, validf, gam, one_minus_eps, uniform, w_tot,
                FOCAL, SCHEDULE, SMOOTHING,
            )
            if HAS_WEIGHT:
                dw = -ue
            else:
                rowconst = -ue

    # ---- pass 2 of the dense focal terms: L = sum a f, A = sum a g (g = q df/dq)
    if DENSE:
        lsum = zero
        A = zero
        for c0 in range(0, C, BLOCK_C):
            cols = c0 + offs
            cmask = cols < C
            if ONE_CHUNK:
                u = u0
            else:
                u, dudz = _load_u(X, xrow, cols, stride_xc, rmask, cmask, cap, inv_cap, SOFTCAP)
            a, tt = _target_mass(T, trow, cols, stride_tc, rmask, cmask, W, y, a_y, validf,
                                 one_minus_eps, uniform, PROB_TARGET, HAS_WEIGHT, SMOOTHING)
            ell = lse[:, None] - u
            fac, kap = _focal_terms(ell, gam2, SCHEDULE)
            lsum += tl.sum(tl.where(cmask[None, :] & (a != 0), a * fac * ell, 0.0), axis=1)
            A += tl.sum(tl.where(cmask[None, :], a * fac * kap, 0.0), axis=1)  # = -sum a g
        loss += lsum
        rowc += A

    # ---- regularisers, each scaled by the sample weight s
    if Z_LOSS:
        # z-loss (PaLM): lambda lse^2, d/du = 2 lambda lse q
        loss += s * z_loss * lse * lse
        rowc += s * (2.0 * z_loss) * lse
    cpc = zero
    if CP:
        # -beta H(q), H = lse - sum q u; d(-beta H)/du = beta q (H - lse) + beta q u
        squ = seu / d
        loss -= s * beta * (lse - squ)
        rowc -= s * beta * squ
        cpc = s * beta
    if POLY1:
        # Poly-1: eps1 (1 - P), P = sum t~ q; dP/du = q (t~ - P)
        if PROB_TARGET:
            P = set_ / d
            loss += poly1 * (1.0 - P)
            rowc += poly1 * P
        else:
            q_y = tl.exp(-ell_y)
            P = q_y * one_minus_eps + uniform
            loss += s * poly1 * (1.0 - P)
            rowc += s * poly1 * (P - uniform)
            sparse += s * poly1 * one_minus_eps * q_y
    # ignored rows add nothing, whatever their logits hold (where, not a weight of 0: nan, inf)
    loss = tl.where(validf > 0, loss, 0.0)
    tl.store(LOSS + rows, loss, mask=rmask)

    # ---- last pass: the gradient G = q rowc + rowconst + dense - [k = y] sparse
    if NEED_GRAD:
        scale = tl.load(SCALE)
        grow = n * stride_gn + j * stride_gs
        for c0 in range(0, C, BLOCK_C):
            cols = c0 + offs
            cmask = cols < C
            if ONE_CHUNK:
                u = u0
                dudz = dudz0
            else:
                u, dudz = _load_u(X, xrow, cols, stride_xc, rmask, cmask, cap, inv_cap, SOFTCAP)
            q = tl.exp(u - lse[:, None])
            g = q * rowc[:, None]
            if PROB_TARGET:
                if not FOCAL or POLY1:
                    a, tt = _target_mass(T, trow, cols, stride_tc, rmask, cmask, W, y, a_y,
                                         validf, one_minus_eps, uniform, PROB_TARGET,
                                         HAS_WEIGHT, SMOOTHING)
                    if not FOCAL:
                        g -= a
                    if POLY1:
                        g -= poly1 * q * tt
            else:
                if SMOOTHING and not DENSE:
                    if HAS_WEIGHT:
                        wk = tl.load(W + cols, mask=cmask, other=0.0)
                        g += dw[:, None] * wk[None, :]
                    else:
                        g += rowconst[:, None]
                g -= tl.where(cols[None, :] == y[:, None], sparse[:, None], 0.0)
            if DENSE:
                a, tt = _target_mass(T, trow, cols, stride_tc, rmask, cmask, W, y, a_y, validf,
                                     one_minus_eps, uniform, PROB_TARGET, HAS_WEIGHT, SMOOTHING)
                fac, kap = _focal_terms(lse[:, None] - u, gam2, SCHEDULE)
                g -= a * fac * kap  # a_k g_k
            if CP:
                g += cpc[:, None] * tl.where(q != 0.0, q * u, 0.0)
            if SOFTCAP:
                g *= dudz
            g = tl.where(validf[:, None] > 0, g * scale, 0.0)
            mask = rmask[:, None] & cmask[None, :]
            ptrs = G + grow[:, None] + cols[None, :].to(tl.int64) * stride_gc
            tl.store(ptrs, g.to(G.dtype.element_ty), mask=mask)


@triton.jit
def _softmax_ptrue_kernel(
    X, stride_xn, stride_xs, stride_xc,
    T, stride_tn, stride_ts, stride_tc,
    P, R, C, S, ignore_index, cap,
    PROB_TARGET: tl.constexpr, SOFTCAP: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """Detached true-class probability of each row, the input of a focal schedule (one read).

    ``P[r] = q_y`` for index targets (``y`` clamped to 0 for ignored rows, whose loss is 0
    anyway), ``sum_k t_k q_k`` (unsmoothed) for probability targets. Arguments as in
    :func:`_softmax_ce_kernel`; P is an (R,) fp32 output.
    """
    pid = tl.program_id(0)
    rows = pid.to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    rmask = rows < R
    n = rows // S
    j = rows - n * S
    xrow = n * stride_xn + j * stride_xs
    trow = n * stride_tn + j * stride_ts
    offs = tl.arange(0, BLOCK_C)
    inv_cap = 1.0 / cap
    m = tl.full([BLOCK_R], -float("inf"), tl.float32)
    d = tl.zeros([BLOCK_R], tl.float32)
    st = tl.zeros([BLOCK_R], tl.float32)
    for c0 in range(0, C, BLOCK_C):
        cols = c0 + offs
        cmask = cols < C
        u, _dudz = _load_u(X, xrow, cols, stride_xc, rmask, cmask, cap, inv_cap, SOFTCAP)
        um = tl.where(cmask[None, :], u, -float("inf"))
        m_new = tl.maximum(m, tl.max(um, axis=1))
        alpha = tl.exp(m - m_new)
        e = tl.exp(um - m_new[:, None])
        d = d * alpha + tl.sum(e, axis=1)
        if PROB_TARGET:
            mask = rmask[:, None] & cmask[None, :]
            t = tl.load(T + trow[:, None] + cols[None, :].to(tl.int64) * stride_tc, mask=mask,
                        other=0.0).to(tl.float32)
            st = st * alpha + tl.sum(e * t, axis=1)
        m = m_new
    if PROB_TARGET:
        p = st / d
    else:
        yraw = tl.load(T + rows, mask=rmask, other=ignore_index)
        y = tl.where((yraw != ignore_index) & rmask, yraw, 0)
        zy = tl.load(X + xrow + y * stride_xc, mask=rmask, other=0.0).to(tl.float32)
        if SOFTCAP:
            u_y = tanh(zy * inv_cap) * cap
        else:
            u_y = zy
        p = tl.exp(u_y - (m + tl.log(d)))
    tl.store(P + rows, p, mask=rmask)


# --------------------------------------------------------------------------------------------
# host side


def launch_config(
    C: int, block_c: int | None = None, block_r: int | None = None, num_warps: int | None = None
) -> tuple[int, int, int]:
    """``(BLOCK_C, BLOCK_R, num_warps)`` for C classes; any value given is kept.

    Rows of up to :data:`MAX_ONE_CHUNK` classes are one register-resident chunk, packed
    ``TILE // BLOCK_C`` rows per program (at most 16) so that small-C programs still move a
    useful amount of data; larger vocabularies loop over :data:`CHUNK`-wide chunks, one row per
    program. These defaults are not tuned on hardware yet: ``benchmarks/bench_triton.py
    --sweep`` times the alternatives.
    """
    if block_c is None:
        p = next_pow2(C)
        block_c = p if p <= MAX_ONE_CHUNK else CHUNK
    if block_c & (block_c - 1):
        raise ValueError(f"block_c must be a power of 2, got {block_c}")
    if block_r is None:
        block_r = max(1, min(16, TILE // block_c)) if block_c >= C else 1
    if num_warps is None:
        num_warps = max(4, min(16, block_r * block_c // 256))
    return block_c, block_r, num_warps


def _view3(x: Tensor, N: int, C: int, S: int) -> Tensor:
    """(N, C, S) view of (C,), (N, C) or (N, C, d1..dk) data (a copy only if not viewable)."""
    return x.reshape(N, C, S)


def _strides(x3: Tensor) -> tuple[int, int, int]:
    """Kernel stride order of an (N, C, S) view: (row n, spatial s, class c)."""
    sn, sc, ss = x3.stride()
    return sn, ss, sc


def softmax_cross_entropy(
    call: SoftmaxCall,
    *,
    block_c: int | None = None,
    block_r: int | None = None,
    num_warps: int | None = None,
) -> tuple[Tensor, Tensor | None]:
    """Loss (reduced) and the gradient of that loss w.r.t. ``logits`` (or None), by Triton.

    The contract of :func:`crossent.backends.torch_ops.softmax.softmax_cross_entropy`: layouts (C,), (N, C),
    (N, C, d1..dk); ``grad`` has the logits' dtype and shape, with the mean's 1/denominator
    folded in; a zero denominator gives loss 0 and a zero gradient; the loss is fp32. With
    ``inplace_backward`` (1-D/2-D logits) the gradient is written into ``logits``.

    ``block_c``, ``block_r``, ``num_warps`` override :func:`launch_config` (tests, tuning).
    """
    logits, target, weight, opts = call.logits, call.target, call.weight, call.opts
    reduction, need_grad, inplace_backward = call.reduction, call.need_grad, call.inplace_backward
    if logits.dtype == torch.float64 or logits.numel() == 0:
        return _torch_softmax_ce(call)
    index = not target.is_floating_point()
    squeeze = logits.ndim == 1
    C = logits.shape[0] if squeeze else logits.shape[1]
    N = 1 if squeeze else logits.shape[0]
    S = 1
    for dim in logits.shape[2:]:
        S *= dim
    R = N * S
    dev = logits.device

    x3 = _view3(logits, N, C, S)
    if index:
        t_arg = target.reshape(-1).to(torch.long).contiguous()
        t_strides = (0, 0, 0)
    else:
        t_arg = _view3(target, N, C, S)
        t_strides = _strides(t_arg)
    w_arg = None
    if weight is not None:
        w_arg = weight.detach().to(device=dev, dtype=torch.float32).contiguous()

    if reduction == "mean":
        denom = mean_denominator(t_arg if index else target, w_arg, opts.ignore_index,
                             torch.float32, R)
        # All rows ignored (or zero weight): loss 0 and zero gradient instead of 0/0.
        scale = inverse_or_zero(denom)
    else:
        scale = torch.ones((), dtype=torch.float32, device=dev)
    scale = scale.to(device=dev, dtype=torch.float32).reshape(1)

    BLOCK_C, BLOCK_R, warps = launch_config(C, block_c, block_r, num_warps)
    grid = (triton.cdiv(R, BLOCK_R),)
    eps = float(opts.label_smoothing)
    softcap = opts.softcap
    schedule = callable(opts.gamma)
    focal = opts.focal

    gamma_arg = None
    if isinstance(opts.gamma, RowGamma):
        gamma_arg = opts.gamma.rows.to(device=dev, dtype=torch.float32).reshape(-1).contiguous()
    elif schedule:
        p_true = torch.empty(R, dtype=torch.float32, device=dev)
        _softmax_ptrue_kernel[grid](
            x3, *_strides(x3), t_arg, *t_strides, p_true, R, C, S, opts.ignore_index,
            float(softcap) if softcap is not None else 1.0,
            PROB_TARGET=not index, SOFTCAP=softcap is not None,
            BLOCK_R=BLOCK_R, BLOCK_C=min(BLOCK_C, CHUNK), num_warps=warps,
        )
        gamma_rows = gamma_for_rows(opts, p_true.unsqueeze(1))
        assert isinstance(gamma_rows, Tensor)  # a schedule gives one gamma per row
        gamma_arg = gamma_rows.reshape(-1)
        gamma_arg = gamma_arg.to(torch.float32).contiguous()

    grad_arg: Tensor
    grad: Tensor | None = None
    if need_grad:
        if inplace_backward and logits.ndim <= 2:
            grad_arg, grad = x3, logits  # each chunk is read before it is overwritten
        else:
            grad_arg = torch.empty((N, C, S), dtype=logits.dtype, device=dev)
            grad = grad_arg.reshape(logits.shape)
    else:
        grad_arg = x3  # never written (NEED_GRAD=False)

    losses = torch.empty(R, dtype=torch.float32, device=dev)
    stats = call.stats
    if stats is not None and not stats.is_contiguous():
        raise ValueError("the return_aux statistics buffer must be contiguous (R, 3)")
    _softmax_ce_kernel[grid](
        x3, *_strides(x3),
        t_arg, *t_strides,
        w_arg if w_arg is not None else losses,
        gamma_arg if gamma_arg is not None else losses,
        scale, losses,
        grad_arg, *_strides(grad_arg),
        stats if stats is not None else losses,
        R, C, S, opts.ignore_index,
        float(C), 1.0 - eps, eps / C,
        0.0 if callable(opts.gamma) else float(opts.gamma),
        float(opts.z_loss), float(softcap) if softcap is not None else 1.0,
        float(opts.confidence_penalty), float(opts.poly1),
        PROB_TARGET=not index, HAS_WEIGHT=w_arg is not None, SMOOTHING=eps > 0.0,
        FOCAL=focal, SCHEDULE=schedule, DENSE=focal and (eps > 0.0 or not index),
        Z_LOSS=opts.z_loss > 0.0, SOFTCAP=softcap is not None,
        CP=opts.confidence_penalty > 0.0, POLY1=opts.poly1 != 0.0, NEED_GRAD=bool(need_grad),
        AUX=stats is not None,
        ONE_CHUNK=BLOCK_C >= C, BLOCK_R=BLOCK_R, BLOCK_C=BLOCK_C, num_warps=warps,
    )

    if reduction == "none":
        loss = losses.reshape(()) if squeeze else losses.reshape(N, *logits.shape[2:])
    elif reduction == "sum":
        loss = losses.sum()
    else:
        loss = losses.sum() * scale.reshape(())
    return loss, grad
