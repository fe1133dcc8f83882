r"""Fused linear + softmax cross-entropy in torch ops, chunked over tokens (any device).

The logits :math:`Z = H W^\top + b` of a language-model head are N x V; for N = 8192 tokens and
a V = 128,256 vocabulary they take 4 GB in fp32, and their gradient as much again. This module
never holds them: the (non-ignored) tokens are processed in chunks of ``B`` rows, and for each
chunk

1. ``Z_c = H_c W^T + b`` (a B x V matmul; the matmul accumulates in fp32, the result has the
   inputs' dtype, exactly as the unfused ``hidden @ weight.T`` would round it);
2. :func:`crossent.backends.torch_ops.softmax.softmax_rows` turns ``Z_c`` into the per-token losses and
   writes ``G_c = s * dL/dZ_c`` *into the same buffer* (``s`` is the reduction's scale, e.g.
   ``1 / sum_i w_{y_i}`` for a mean, computed once for the whole batch beforehand);
3. the chunk's gradient is consumed at once: ``dH_c = G_c W``, ``dW += G_c^T H_c``,
   ``db += sum_rows G_c``; then the buffer is reused by the next chunk.

Every option of the softmax family (label smoothing, class weights, focal gamma and its
schedules, z-loss, softcap, confidence penalty, Poly-1) comes from ``softmax_rows``, so the
fused path is the unfused one up to the summation order of the matmuls. This is the chunked
scheme of Liger-Kernel's fused linear cross-entropy; the blockwise variant that keeps the
log-sum-exp on chip is Wijmans et al. 2024, *Cut Your Losses in Large-Vocabulary Language
Models* (see :mod:`crossent.backends.triton.linear` when present).

Probability targets: a float (N, V) target is sliced chunk by chunk alongside the hidden rows
(:func:`target_rows`; a (..., V) tensor whose leading dims do not flatten to a view has its
chunk's rows gathered) and ``softmax_rows`` casts each block to the accumulation dtype, so the
user's N x V tensor is never copied. Every row counts (no ignore-row selection) and a "mean"
divides by N.

Memory. Besides ``dH`` (N x D) and ``dW`` (V x D) the only buffers are chunk-sized:
:func:`chunk_rows` picks ``B = max(1, budget // (V * bytes_per_entry))``, where
``bytes_per_entry`` is the logits' element size on the CPU (softmax_rows then runs on
sub-blocks of :data:`CPU_SOFTMAX_ELEMENTS` entries, so its fp32 temporaries are a few MiB)
and the element size plus 3 fp32 temporaries (12 bytes) elsewhere (softmax_rows runs on the
whole chunk there), plus 4 bytes when the weight gradient is accumulated in fp32 for
half-precision inputs (an fp32 copy of the chunk's gradient). The budget defaults to
:data:`CPU_BUDGET_BYTES` on the CPU (:data:`CPU_HALF_BUDGET_BYTES` for fp16/bf16) and to
1/16 of the free device memory, clamped to
[64 MiB, 1 GiB], on CUDA.

Backward. For a ``"mean"`` or ``"sum"`` loss the forward pass already holds ``dH, dW, db`` for
``grad_output = 1``; backward scales them in place and hands them over (no copy). A
per-token ``grad_output`` (``reduction="none"``) cannot be folded in after the fact (``dW``
sums over tokens), so then the forward computes only the losses (one matmul) and backward
recomputes each chunk's logits with the per-token factors (three matmuls): one extra matmul
in exchange for never storing anything but the inputs. A second backward through the same
graph (``retain_graph=True``) also recomputes.
"""

from __future__ import annotations

from collections.abc import Callable
from types import SimpleNamespace
from typing import Any

import torch
from torch import Tensor

from crossent._formula import acc_dtype, inverse_or_zero, mean_denominator, row_statistics
from crossent._options import Reduction, SoftmaxOptions
from crossent.backends.torch_ops.softmax import softmax_rows

__all__ = [
    "CPU_BUDGET_BYTES",
    "CPU_SOFTMAX_ELEMENTS",
    "LinearCrossEntropyFunction",
    "chunk_rows",
    "linear_cross_entropy_rows",
    "softmax_chunk",
    "target_rows",
]

#: Default bytes for the chunk-sized buffers on the CPU (32 MiB: 262 rows of a 32k vocabulary
#: in fp32, enough rows for the matmuls to run at full speed).
CPU_BUDGET_BYTES = 32 << 20
#: The same for fp16/bf16 inputs (autocast): 30 MiB, counted at 6 bytes per entry (the chunk
#: and its fp32 staging), so 160 rows of a 32k vocabulary (measured at 32k x 1024 bf16: 1.02x
#: the unfused step's time, 0.11 of its extra memory beyond the gradients; next to the
#: half-precision copy of the weight that autocast makes anyway, the chunk stays small).
CPU_HALF_BUDGET_BYTES = 30 << 20
#: Entries of the gradient widened to fp32 at a time for a half-precision ``dW`` accumulation.
WGRAD_SLICE_ELEMENTS = 1 << 20
#: Elements per softmax_rows call on the CPU (fp32: 4 MiB per temporary). Smaller blocks stay in
#: cache but pay Python overhead per call; measured on a shared 2-core EPYC, 1-2 Mi elements
#: were as fast as a whole 512 x 32k chunk, 256 Ki elements clearly slower.
CPU_SOFTMAX_ELEMENTS = 1 << 20
_CUDA_BUDGET_MIN = 64 << 20
_CUDA_BUDGET_MAX = 1 << 30


def _default_budget(device: torch.device, dtype: torch.dtype = torch.float32) -> int:
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(min(_CUDA_BUDGET_MAX, max(_CUDA_BUDGET_MIN, free // 16)))
    return CPU_HALF_BUDGET_BYTES if dtype in (torch.float16, torch.bfloat16) else CPU_BUDGET_BYTES


def chunk_rows(
    vocab: int,
    dtype: torch.dtype,
    device: torch.device,
    wgrad_dtype: torch.dtype | None = None,
    budget: int | None = None,
) -> int:
    """Tokens per chunk: ``max(1, budget // (vocab * bytes_per_entry))`` (see the module doc)."""
    if budget is None:
        budget = _default_budget(device, dtype)
    per_entry = torch.empty((), dtype=dtype).element_size()
    if device.type != "cpu":
        per_entry += 12
    if wgrad_dtype is not None and wgrad_dtype != dtype:
        per_entry += torch.empty((), dtype=wgrad_dtype).element_size()
    rows = max(1, int(budget) // max(1, vocab * per_entry))
    if device.type == "cpu" and dtype in (torch.float16, torch.bfloat16) and rows >= 64:
        # half-precision CPU matmuls run markedly faster with a row count that is a multiple
        # of 32 (measured for bf16 at 32k x 1024: 128 or 160 rows 1.02-1.11x the unfused step,
        # 110 rows 1.5x)
        rows -= rows % 32
    return rows


def _accumulate_wgrad(dW: Tensor, G: Tensor, h: Tensor) -> None:
    """``dW += G^T h`` with ``dW`` possibly wider (fp32) than ``G`` and ``h`` (bf16/fp16)."""
    if dW.dtype == G.dtype:
        dW.addmm_(G.t(), h)
    else:
        # Products in the accumulation dtype: the chunk's contribution is not rounded to the
        # inputs' precision before it is added. G is widened one slice of classes at a time
        # (about WGRAD_SLICE_ELEMENTS entries), so the fp32 copy is a few MiB, not a chunk's.
        hw = h.to(dW.dtype)
        step = max(1, WGRAD_SLICE_ELEMENTS // max(1, G.shape[0]))
        for v0 in range(0, G.shape[1], step):
            v1 = min(G.shape[1], v0 + step)
            dW[v0:v1].addmm_(G[:, v0:v1].t().to(dW.dtype), hw)


#: ``kernel(z, target, class_weight, opts, scale) -> (losses, G)``: the loss of one chunk of
#: logits ``z`` (B, V) and, when ``scale`` (0-d, or (B, 1) per token) is not None, the gradient
#: ``G = scale * dL/dz`` (it may overwrite ``z``). The linear path and the vocab-parallel head
#: share the chunk loop and differ only in this kernel.
ChunkKernel = Callable[
    [Tensor, Tensor, "Tensor | None", SoftmaxOptions, "Tensor | None"], "tuple[Tensor, Tensor | None]"
]


def softmax_chunk(
    z: Tensor, target: Tensor, class_weight: Tensor | None, opts: SoftmaxOptions, scale: Tensor | None,
    stats: Tensor | None = None,
) -> tuple[Tensor, Tensor | None]:
    """The default chunk kernel: the fused softmax rows, writing the gradient over ``z``; with
    ``stats`` (B, 3) also ``return_aux``'s row statistics, from each sub-block while it is in
    cache, before its gradient overwrites it."""
    B, V = z.shape
    losses = torch.empty(B, dtype=acc_dtype(z.dtype), device=z.device)
    # softmax_rows on cache-sized sub-blocks on the CPU (its temporaries stay ~1 MiB); one call
    # per chunk elsewhere (one kernel each).
    sub = max(1, CPU_SOFTMAX_ELEMENTS // max(1, V)) if z.device.type == "cpu" else max(B, 1)
    per_row = scale is not None and scale.ndim == 2
    for s0 in range(0, B, sub):
        s1 = min(B, s0 + sub)
        zb = z[s0:s1]
        if stats is not None:
            row_statistics(zb, target[s0:s1], opts.softcap, stats[s0:s1])
        if scale is not None:
            # The gradient overwrites the logits it came from (each row is read first).
            sc = scale[s0:s1] if per_row else scale
            losses[s0:s1] = softmax_rows(zb, target[s0:s1], class_weight, opts, zb, sc)
        else:
            losses[s0:s1] = softmax_rows(zb, target[s0:s1], class_weight, opts, None)
        del zb  # a view keeps the whole chunk alive into the next chunk's matmul
    return losses, (z if scale is not None else None)


def target_rows(target: Tensor, r0: int, r1: int) -> Tensor:
    """Rows ``[r0, r1)`` of the flattened target: a slice of (M,) class indices or (M, V)
    probabilities (a view), or, for a (..., V) probability tensor whose leading dims do not
    flatten to a view (e.g. a shifted slice ``p[:, :-1]``), the chunk's rows gathered from it:
    a chunk-sized copy, never one of the whole N x V target."""
    if target.ndim <= 2:
        return target[r0:r1]
    idx = torch.arange(r0, r1, device=target.device)
    return target[torch.unravel_index(idx, tuple(target.shape[:-1]))]


def linear_cross_entropy_rows(
    hidden: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    target: Tensor,
    class_weight: Tensor | None,
    opts: SoftmaxOptions,
    row_scale: Tensor | None,
    *,
    need_hidden: bool,
    need_weight: bool,
    need_bias: bool,
    chunk_size: int,
    wgrad_dtype: torch.dtype,
    grad_hidden: Tensor | None = None,
    rows: Tensor | None = None,
    kernel: ChunkKernel = softmax_chunk,
    stats: Tensor | None = None,
) -> tuple[Tensor, Tensor | None, Tensor | None, Tensor | None]:
    """The chunk loop: per-token losses and the gradients of ``sum_i row_scale_i * loss_i``.

    Args:
        hidden: (M, D) the tokens to compute (ignored ones already dropped).
        weight: (V, D); bias: (V,) or None.
        target: (M,) int64 class indices, or class probabilities: (M, V) float, or (..., V)
            whose leading dims hold M rows (read chunk by chunk, see :func:`target_rows`;
            cast to the accumulation dtype per block by the kernel).
        class_weight: (V,) class weights in the accumulation dtype, or None.
        row_scale: None (losses only), a 0-d tensor (same factor for every token) or (M,).
        need_hidden, need_weight, need_bias: which gradients to form (with ``row_scale``).
        chunk_size: tokens per chunk.
        wgrad_dtype: dtype of the ``dW`` accumulator (and ``db``).
        grad_hidden: optional (N, D) buffer receiving ``dH``; row ``rows[i]`` gets token i's
            gradient (``rows=None``: row i). Allocated (M, D) when None.
        kernel: the chunk kernel (:data:`ChunkKernel`); the vocab-parallel head passes its own.
        stats: optional (M, 3) buffer receiving the per-token statistics of ``return_aux``
            (:func:`crossent._formula.row_statistics`); they are written by :func:`softmax_chunk`
            in its pass over each chunk, so ``kernel`` must be the default one.

    Returns:
        (losses (M,) in the accumulation dtype, dH, dW, db) with None for gradients not asked.
    """
    if stats is not None and kernel is not softmax_chunk:
        raise ValueError("return_aux statistics are written by the default chunk kernel only")
    M, _ = hidden.shape
    V = weight.shape[0]
    acc = acc_dtype(hidden.dtype)
    dev = hidden.device
    need_grad = row_scale is not None and (need_hidden or need_weight or need_bias)
    losses = torch.empty(M, dtype=acc, device=dev)
    dH = dW = db = None
    if need_grad and need_hidden:
        dH = grad_hidden
        if dH is None:
            dH = torch.empty_like(hidden, memory_format=torch.contiguous_format)
    if need_grad and need_weight:
        dW = torch.zeros(weight.shape, dtype=wgrad_dtype, device=dev)
    if need_grad and need_bias:
        db = torch.zeros(V, dtype=acc, device=dev)
    wt = weight.t()
    per_row = row_scale is not None and row_scale.ndim == 1
    for r0 in range(0, M, chunk_size):
        r1 = min(M, r0 + chunk_size)
        h = hidden[r0:r1]
        z = torch.addmm(bias, h, wt) if bias is not None else torch.mm(h, wt)  # (B, V)
        sc = None
        if need_grad:
            assert row_scale is not None  # need_grad implies it
            sc = row_scale[r0:r1].to(acc).unsqueeze(1) if per_row else row_scale
        t_c = target_rows(target, r0, r1)
        if stats is None:
            losses[r0:r1], G = kernel(z, t_c, class_weight, opts, sc)
        else:  # return_aux: the default kernel writes the statistics in its own pass
            losses[r0:r1], G = softmax_chunk(z, t_c, class_weight, opts, sc, stats[r0:r1])
        del z
        if G is None:
            continue
        if dH is not None:
            if rows is None:
                torch.mm(G, weight, out=dH[r0:r1])
            else:
                dH.index_copy_(0, rows[r0:r1], torch.mm(G, weight))
        if dW is not None:
            _accumulate_wgrad(dW, G, h)
        if db is not None:
            db.add_(G.sum(0, dtype=acc))
        del G
    return losses, dH, dW, db


class LinearCrossEntropyFunction(torch.autograd.Function):
    """One autograd node for ``cross_entropy(hidden @ weight.T + bias, target)``, chunked.

    Inputs are flattened: hidden (N, D), target (N,) class indices, or class probabilities
    (N, V) (or (..., V) with N rows when the leading dims do not flatten to a view; see
    :func:`target_rows`). Probability targets select no rows (``ignore_index`` is an
    index-target concept) and a "mean" divides by N. See the module docstring for the scheme.
    """

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
        chunk_size: int | None,
        wgrad_dtype: torch.dtype | None,
        kernel: ChunkKernel = softmax_chunk,
        reduce_grad_hidden: Callable[[Tensor], Tensor] | None = None,
        compute_dtype: torch.dtype | None = None,
        stats: Tensor | None = None,
    ) -> Tensor:
        # Autocast: the inputs are cast here, and the gradients returned in the inputs' own
        # dtypes, so an fp32 weight's gradient accumulates straight into its fp32 buffer (no
        # half-precision copy of dW on the way back).
        ctx.grad_dtypes = (hidden.dtype, weight.dtype, None if bias is None else bias.dtype)
        if compute_dtype is not None:
            hidden, weight = hidden.to(compute_dtype), weight.to(compute_dtype)
            bias = None if bias is None else bias.to(compute_dtype)
            if wgrad_dtype is None and ctx.grad_dtypes[1] == torch.float32:
                wgrad_dtype = torch.float32  # accumulate into the fp32 gradient itself
        N, _ = hidden.shape
        V = weight.shape[0]
        acc = acc_dtype(hidden.dtype)
        dev = hidden.device
        if wgrad_dtype is None:
            wgrad_dtype = acc if weight.dtype in (torch.float16, torch.bfloat16) else weight.dtype
        if chunk_size is None:
            chunk_size = chunk_rows(V, hidden.dtype, dev, wgrad_dtype)
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        need_b = need_b and bias is not None

        # Ignored tokens cost no matmul: select the valid rows once (index targets only; every
        # row of a probability target counts, and the target is read chunk by chunk in place).
        rows = None
        if not target.is_floating_point():
            valid = target != opts.ignore_index
            n_valid = int(valid.sum())
            rows = None if n_valid == N else valid.nonzero().squeeze(1)
        h_v = hidden if rows is None else hidden.index_select(0, rows)
        t_v = target if rows is None else target.index_select(0, rows)

        if reduction == "mean":
            denom = mean_denominator(target, class_weight, opts.ignore_index, acc, N)
            scale = inverse_or_zero(denom)
        else:
            scale = torch.ones((), dtype=acc, device=dev)
        store = reduction != "none" and (need_h or need_w or need_b)
        grad_hidden = None
        if store and need_h and rows is not None:
            grad_hidden = torch.zeros_like(hidden, memory_format=torch.contiguous_format)
        # return_aux: (N, 3) statistics; the kept tokens' rows are computed, the others stay 0
        kept_stats = stats if stats is None or rows is None else stats.new_zeros((len(t_v), 3))
        losses, dH, dW, db = linear_cross_entropy_rows(
            h_v, weight, bias, t_v, class_weight, opts, scale if store else None,
            need_hidden=need_h, need_weight=need_w, need_bias=need_b, chunk_size=chunk_size,
            wgrad_dtype=wgrad_dtype, grad_hidden=grad_hidden, rows=rows, kernel=kernel,
            stats=kept_stats,
        )
        if stats is not None and kept_stats is not stats:
            assert rows is not None and kept_stats is not None  # the kept rows' own buffer
            stats.zero_().index_copy_(0, rows, kept_stats)
        del h_v
        ctx.opts, ctx.chunk_size, ctx.wgrad_dtype = opts, chunk_size, wgrad_dtype
        ctx.kernel, ctx.reduce_grad_hidden = kernel, reduce_grad_hidden
        ctx.has_bias = bias is not None
        ctx.save_for_backward(hidden, weight, bias, target, class_weight, scale, rows)
        # Kept as attributes, not saved tensors: backward hands them to autograd without a copy.
        ctx.grads = (dH, dW, db) if store else None
        ctx.scalers = (SimpleNamespace(), SimpleNamespace(), SimpleNamespace())

        if reduction == "none":
            if rows is None:
                return losses
            out = torch.zeros(N, dtype=acc, device=dev)
            return out.index_copy_(0, rows, losses)
        total = losses.sum()
        return total * scale if reduction == "mean" else total

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx: Any, grad_output: Tensor) -> tuple[Tensor | None, ...]:
        from crossent._ops import scale_saved_grad

        hidden, weight, bias, target, class_weight, scale, rows = ctx.saved_tensors
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        need_b = need_b and ctx.has_bias
        grads = ctx.grads
        ctx.grads = None
        if grads is not None:
            # Scaled in place; ctx.scalers[i].applied records the factor (scale_saved_grad).
            out = [
                None if g is None else scale_saved_grad(s, g, grad_output)
                for s, g in zip(ctx.scalers, grads, strict=True)
            ]
            dH, dW, db = out
        else:
            # reduction "none" (per-token grad_output), or a second backward: recompute.
            acc = acc_dtype(hidden.dtype)
            go = grad_output.to(acc)
            if go.ndim:
                row_scale = go if rows is None else go.index_select(0, rows)
            else:
                row_scale = scale * go
            h_v = hidden if rows is None else hidden.index_select(0, rows)
            t_v = target if rows is None else target.index_select(0, rows)
            grad_hidden = None
            if need_h and rows is not None:
                grad_hidden = torch.zeros_like(hidden, memory_format=torch.contiguous_format)
            _, dH, dW, db = linear_cross_entropy_rows(
                h_v, weight, bias, t_v, class_weight, ctx.opts, row_scale,
                need_hidden=need_h, need_weight=need_w, need_bias=need_b,
                chunk_size=ctx.chunk_size, wgrad_dtype=ctx.wgrad_dtype,
                grad_hidden=grad_hidden, rows=rows, kernel=ctx.kernel,
            )
        if dH is not None and ctx.reduce_grad_hidden is not None:
            dH = ctx.reduce_grad_hidden(dH)  # e.g. the all-reduce of a column-parallel head
        h_dtype, w_dtype, b_dtype = ctx.grad_dtypes
        if dH is not None and dH.dtype != h_dtype:
            dH = dH.to(h_dtype)
        if dW is not None and dW.dtype != w_dtype:
            dW = dW.to(w_dtype)
        if db is not None and db.dtype != b_dtype:
            db = db.to(b_dtype)
        return dH, dW, db, None, None, None, None, None, None, None, None, None, None
