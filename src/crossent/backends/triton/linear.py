r"""Blockwise linear + cross-entropy in Triton: the logits never leave the chip.

Wijmans et al. 2024, *Cut Your Losses in Large-Vocabulary Language Models* (Cut Cross-Entropy).
For a block of ``BLOCK_M`` tokens the forward kernel walks the vocabulary in tiles of
``BLOCK_V`` classes; each logits tile ``Z = H_m W_v^T + b_v`` is a ``tl.dot`` over D kept in
registers and folded into an online log-sum-exp (running max ``m`` and sum ``s``, rescaled by
``exp(m_old - m_new)``), together with the target logit ``z_y`` and ``sum_k w_k z_k`` (label
smoothing). Only three floats per token reach memory.

From these statistics :func:`crossent._formula.target_terms` and
:func:`~crossent._formula.regulariser_terms` (the formulation's one torch form) give each
token's loss and the coefficients of its logits gradient
``G_k = r (c q_k - u w_k - a [k = y])`` with ``q = exp(z - lse)`` and the row factor ``r``
(``grad_output``, divided by the mean's denominator); for plain smoothed CE
``L = a_y (lse - z_y) + u (lse * sum_k w_k - sum_k w_k z_k)``, ``a = a_y = w_y (1 - eps)``,
``u = eps / V``, ``c = a_y + u sum_k w_k``; focal terms, schedules, z-loss and Poly-1 change
only ``c``, ``a`` and the loss. The backward kernel recomputes each (token block, vocabulary tile) of logits,
forms ``G`` on chip and adds ``G W_v`` to ``dH`` and ``G^T H_m`` to ``dW`` with fp32 atomics;
the forward matmul is paid twice (four matmuls in all, against three for the chunked path),
the price of storing nothing of size V.

Gradient filtering (``filter_eps > 0``, off by default): a tile whose ``|G|`` never exceeds
``filter_eps`` is skipped (CCE's trick: most of a large vocabulary's softmax underflows
bf16). The error it introduces is bounded by ``filter_eps`` per skipped entry of ``G``;
``tests/test_linear_triton.py`` measures it.

Covered here: index targets with ``ignore_index``, label smoothing, class weights, focal gamma
and schedules (without smoothing), z-loss, Poly-1, every reduction, bias, fp32/bf16/fp16
inputs. Softcap, the confidence penalty, focal with smoothing (they need per-class terms in the
kernel) and probability (soft) targets
dispatch to the chunked torch path
(:mod:`crossent.backends.torch_ops.linear`), as does any input on a device Triton cannot run on; with
``backend="triton"`` they raise.

The kernels also run under ``TRITON_INTERPRET=1`` on CPU tensors (the variable must be set
before this module is imported: ``triton.jit`` reads it when decorating).
"""

from __future__ import annotations

import os
from typing import Any

import torch
from torch import Tensor

from crossent._formula import gamma_for_rows, inverse_or_zero, regulariser_terms, target_terms
from crossent._options import Reduction, SoftmaxOptions, covers
from crossent.backends.triton import LINEAR_CAPABILITIES

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - exercised on machines without triton
    triton = None

__all__ = ["supports", "triton_linear_cross_entropy", "try_triton_linear_cross_entropy"]


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def supports(opts: SoftmaxOptions, hidden: Tensor, target: Tensor | None = None) -> bool:
    """True when the Triton kernels implement these options for this input (and ``target``:
    class indices only; probability targets are not implemented)."""
    if target is not None and target.is_floating_point():
        return False
    if triton is None or hidden.dtype == torch.float64:
        return False
    if not (hidden.is_cuda or (_interpreting() and hidden.device.type == "cpu")):
        return False
    return covers(LINEAR_CAPABILITIES, opts.active())


if triton is not None:

    @triton.jit
    def _fwd_kernel(
        H, W, B, Y, CW, LSE, ZY, WZ,
        M, V, D,
        stride_hm, stride_wv,
        HAS_BIAS: tl.constexpr, HAS_CW: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr,
    ):
        pid = tl.program_id(0)
        # int64 indices: rows * stride and cols * stride pass 2^31 once N*D or V*D does
        rows = pid.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
        rmask = rows < M
        y = tl.load(Y + rows, mask=rmask, other=0)
        m_i = tl.full((BLOCK_M,), float("-inf"), tl.float32)
        s_i = tl.zeros((BLOCK_M,), tl.float32)
        zy = tl.zeros((BLOCK_M,), tl.float32)
        wz = tl.zeros((BLOCK_M,), tl.float32)
        for v0 in range(0, V, BLOCK_V):
            cols = v0 + tl.arange(0, BLOCK_V).to(tl.int64)
            cmask = cols < V
            acc = tl.zeros((BLOCK_M, BLOCK_V), tl.float32)
            for d0 in range(0, D, BLOCK_D):
                ds = d0 + tl.arange(0, BLOCK_D)
                dmask = ds < D
                h = tl.load(H + rows[:, None] * stride_hm + ds[None, :],
                            mask=rmask[:, None] & dmask[None, :], other=0.0)
                w = tl.load(W + cols[:, None] * stride_wv + ds[None, :],
                            mask=cmask[:, None] & dmask[None, :], other=0.0)
                acc = tl.dot(h, tl.trans(w), acc)
            if HAS_BIAS:
                acc += tl.load(B + cols, mask=cmask, other=0.0).to(tl.float32)[None, :]
            # The logits are rounded to the inputs' dtype, as the unfused hidden @ weight.T.
            z = acc.to(H.dtype.element_ty).to(tl.float32)
            z = tl.where(cmask[None, :], z, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(z, 1))
            s_i = s_i * tl.exp(m_i - m_new) + tl.sum(tl.exp(z - m_new[:, None]), 1)
            m_i = m_new
            zf = tl.where(cmask[None, :], z, 0.0)
            zy += tl.sum(tl.where(cols[None, :] == y[:, None], zf, 0.0), 1)
            if HAS_CW:
                cw = tl.load(CW + cols, mask=cmask, other=0.0)
                wz += tl.sum(zf * cw[None, :], 1)
            else:
                wz += tl.sum(zf, 1)
        tl.store(LSE + rows, m_i + tl.log(s_i), mask=rmask)
        tl.store(ZY + rows, zy, mask=rmask)
        tl.store(WZ + rows, wz, mask=rmask)

    @triton.jit
    def _bwd_kernel(
        H, W, B, Y, CW, LSE, RC, RU, RA,
        DH, DW, DB,
        M, V, D,
        stride_hm, stride_wv,
        filter_eps,
        HAS_BIAS: tl.constexpr, HAS_CW: tl.constexpr,
        NEED_H: tl.constexpr, NEED_W: tl.constexpr, NEED_B: tl.constexpr,
        FILTER: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr,
    ):
        pid_m = tl.program_id(0)
        pid_v = tl.program_id(1)
        # int64 indices: rows * stride and cols * stride pass 2^31 once N*D or V*D does
        rows = pid_m.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
        rmask = rows < M
        cols = pid_v.to(tl.int64) * BLOCK_V + tl.arange(0, BLOCK_V)
        cmask = cols < V
        acc = tl.zeros((BLOCK_M, BLOCK_V), tl.float32)
        for d0 in range(0, D, BLOCK_D):
            ds = d0 + tl.arange(0, BLOCK_D)
            dmask = ds < D
            h = tl.load(H + rows[:, None] * stride_hm + ds[None, :],
                        mask=rmask[:, None] & dmask[None, :], other=0.0)
            w = tl.load(W + cols[:, None] * stride_wv + ds[None, :],
                        mask=cmask[:, None] & dmask[None, :], other=0.0)
            acc = tl.dot(h, tl.trans(w), acc)
        if HAS_BIAS:
            acc += tl.load(B + cols, mask=cmask, other=0.0).to(tl.float32)[None, :]
        z = acc.to(H.dtype.element_ty).to(tl.float32)
        lse = tl.load(LSE + rows, mask=rmask, other=0.0)
        rc = tl.load(RC + rows, mask=rmask, other=0.0)  # r * c
        ru = tl.load(RU + rows, mask=rmask, other=0.0)  # r * u
        ra = tl.load(RA + rows, mask=rmask, other=0.0)  # r * a_y
        y = tl.load(Y + rows, mask=rmask, other=-1)
        if HAS_CW:
            cw = tl.load(CW + cols, mask=cmask, other=0.0)
        else:
            cw = tl.where(cmask, 1.0, 0.0)
        q = tl.exp(z - lse[:, None])
        g = rc[:, None] * q - ru[:, None] * cw[None, :]
        g -= tl.where(cols[None, :] == y[:, None], ra[:, None], 0.0)
        g = tl.where(rmask[:, None] & cmask[None, :], g, 0.0)
        go = True
        if FILTER:
            go = tl.max(tl.max(tl.abs(g), 1), 0) > filter_eps
        if go:
            if NEED_B:
                tl.atomic_add(DB + cols, tl.sum(g, 0), mask=cmask)
            gl = g.to(H.dtype.element_ty)
            for d0 in range(0, D, BLOCK_D):
                ds = d0 + tl.arange(0, BLOCK_D)
                dmask = ds < D
                if NEED_H:
                    w = tl.load(W + cols[:, None] * stride_wv + ds[None, :],
                                mask=cmask[:, None] & dmask[None, :], other=0.0)
                    dh = tl.dot(gl, w)
                    tl.atomic_add(DH + rows[:, None] * D + ds[None, :], dh,
                                  mask=rmask[:, None] & dmask[None, :])
                if NEED_W:
                    h = tl.load(H + rows[:, None] * stride_hm + ds[None, :],
                                mask=rmask[:, None] & dmask[None, :], other=0.0)
                    dw = tl.dot(tl.trans(gl), h)
                    tl.atomic_add(DW + cols[:, None] * D + ds[None, :], dw,
                                  mask=cmask[:, None] & dmask[None, :])


def _blocks(hidden: Tensor) -> tuple[int, int, int]:
    if hidden.device.type == "cpu":  # interpreter: small tiles
        return 16, 32, 16
    return 64, 128, 64


class _TritonLinearCE(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx: Any,
        hidden: Tensor,
        weight: Tensor,
        bias: Tensor | None,
        target: Tensor,
        class_weight: Tensor | None,
        opts: SoftmaxOptions,
        reduction: Reduction,
        filter_eps: float,
    ) -> Tensor:
        N, D = hidden.shape
        V = weight.shape[0]
        dev = hidden.device
        hidden = hidden.contiguous()
        weight = weight.contiguous()
        valid = target != opts.ignore_index
        rows = valid.nonzero().squeeze(1)
        h_v = hidden.index_select(0, rows)
        t_v = target.index_select(0, rows)
        M = h_v.shape[0]
        f32 = torch.float32
        lse = torch.empty(M, dtype=f32, device=dev)
        zy = torch.empty_like(lse)
        wz = torch.empty_like(lse)
        BM, BV, BD = _blocks(hidden)
        dummy = lse
        if M:
            _fwd_kernel[(triton.cdiv(M, BM),)](
                h_v, weight, bias if bias is not None else dummy, t_v,
                class_weight if class_weight is not None else dummy, lse, zy, wz,
                M, V, D, h_v.stride(0), weight.stride(0),
                HAS_BIAS=bias is not None, HAS_CW=class_weight is not None,
                BLOCK_M=BM, BLOCK_V=BV, BLOCK_D=BD,
            )
        # Coefficients from the row statistics: the formulation's torch form (crossent._formula).
        w_y = torch.ones_like(lse) if class_weight is None else class_weight[t_v].to(f32)
        sum_w = float(V) if class_weight is None else class_weight.sum().to(f32)
        col = lse.unsqueeze(1), zy.unsqueeze(1), wz.unsqueeze(1), w_y.unsqueeze(1)
        lse1, zy1, wz1, w_y1 = col
        ell_y = lse1 - zy1
        q_y = torch.exp(-ell_y)
        gam = gamma_for_rows(opts, q_y) if opts.focal else 0.0
        terms = target_terms(ell_y, lse1, wz1, w_y1, torch.ones_like(w_y1), gam, opts, V, sum_w)
        terms = regulariser_terms(terms, w_y1, lse1, opts, V, q_y=q_y)
        losses = terms.loss.reshape(-1)
        assert terms.sparse is not None  # target_terms always sets it for class indices
        coef = torch.stack([  # per row: c (times q), u (times w), a (at the target)
            torch.as_tensor(terms.rowc, dtype=f32, device=dev).expand(M, 1).reshape(-1),
            (terms.uniform if terms.uniform is not None else torch.zeros_like(w_y1)).reshape(-1),
            terms.sparse.reshape(-1),
        ])
        if reduction == "mean":
            scale = inverse_or_zero(w_y.sum())
        else:
            scale = torch.ones((), dtype=f32, device=dev)
        ctx.save_for_backward(h_v, weight, bias, t_v, class_weight, lse, coef, rows, scale)
        ctx.meta = (filter_eps, hidden.dtype, hidden.shape)
        if reduction == "none":
            return torch.zeros(N, dtype=f32, device=dev).index_copy_(0, rows, losses)
        total = losses.sum()
        return total * scale if reduction == "mean" else total

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx: Any, grad_output: Tensor) -> tuple[Tensor | None, ...]:
        h_v, weight, bias, t_v, class_weight, lse, coef, rows, scale = ctx.saved_tensors
        filter_eps, dtype, hshape = ctx.meta
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        need_b = need_b and bias is not None
        M, D = h_v.shape
        V = weight.shape[0]
        dev = h_v.device
        go = grad_output.float()
        r = go.index_select(0, rows) if go.ndim else (go * scale).expand(M)
        rc, ru, ra = (r * coef).unbind(0)
        f32 = torch.float32
        dh = torch.zeros((M, D), dtype=f32, device=dev) if need_h else None
        dw = torch.zeros((V, D), dtype=f32, device=dev) if need_w else None
        db = torch.zeros(V, dtype=f32, device=dev) if need_b else None
        BM, BV, BD = _blocks(h_v)
        if M and (need_h or need_w or need_b):
            dummy = lse
            _bwd_kernel[(triton.cdiv(M, BM), triton.cdiv(V, BV))](
                h_v, weight, bias if bias is not None else dummy, t_v,
                class_weight if class_weight is not None else dummy,
                lse, rc.contiguous(), ru.contiguous(), ra.contiguous(),
                dh if dh is not None else dummy, dw if dw is not None else dummy,
                db if db is not None else dummy,
                M, V, D, h_v.stride(0), weight.stride(0), float(filter_eps),
                HAS_BIAS=bias is not None, HAS_CW=class_weight is not None,
                NEED_H=need_h, NEED_W=need_w, NEED_B=need_b, FILTER=filter_eps > 0,
                BLOCK_M=BM, BLOCK_V=BV, BLOCK_D=BD,
            )
        d_hidden = None
        if dh is not None:  # need_h
            d_hidden = torch.zeros(hshape, dtype=dtype, device=dev)
            d_hidden.index_copy_(0, rows, dh.to(dtype))
        return (
            d_hidden,
            dw.to(weight.dtype) if dw is not None else None,
            db.to(bias.dtype) if db is not None else None,
            None, None, None, None, None,
        )


def triton_linear_cross_entropy(
    hidden: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    target: Tensor,
    class_weight: Tensor | None,
    opts: SoftmaxOptions,
    reduction: Reduction,
    filter_eps: float = 0.0,
) -> Tensor:
    """The Triton path on flattened inputs (hidden (N, D), target (N,)); see the module doc."""
    cw = None if class_weight is None else class_weight.to(torch.float32).contiguous()
    return _TritonLinearCE.apply(hidden, weight, bias, target, cw, opts, reduction, filter_eps)


def try_triton_linear_cross_entropy(
    hidden: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    target: Tensor,
    class_weight: Tensor | None,
    opts: SoftmaxOptions,
    reduction: Reduction,
    chunk_size: int | None,
    weight_grad_dtype: torch.dtype | None,
    *,
    required: bool,
    filter_eps: float = 0.0,
) -> Tensor | None:
    """The Triton path when it covers the call, else None (the caller runs the chunked path).

    ``chunk_size`` and ``weight_grad_dtype`` belong to the chunked path (the Triton kernels
    always accumulate in fp32 atomics); with ``required`` an unsupported call raises.
    """
    del chunk_size, weight_grad_dtype
    if target.is_floating_point():
        if required:
            raise ValueError(
                "backend='triton' takes class-index targets only: probability (soft) targets "
                "run on the chunked path (backend='auto' or 'torch')"
            )
        return None
    if not supports(opts, hidden, target):
        if required:
            raise ValueError(
                "backend='triton' needs triton, a CUDA tensor (or TRITON_INTERPRET=1 on the "
                "CPU), a non-float64 dtype, and no softcap, confidence_penalty, or gamma "
                "together with label_smoothing (those run on backend='torch' or 'auto')"
            )
        return None
    return triton_linear_cross_entropy(
        hidden, weight, bias, target, class_weight, opts, reduction, filter_eps
    )
