r"""Public PyTorch functions: validation, one fused autograd node per call, backend dispatch.

Softmax family
--------------
One formulation covers cross-entropy, label smoothing, class weights, focal loss (and
per-sample focal schedules), z-loss, logit soft-capping, the confidence penalty and Poly-1.
See :func:`cross_entropy` for the math.
"""

from __future__ import annotations

import functools
import importlib.util
import math
from typing import Any

import torch
from torch import Tensor

from crossent._cpu.softmax import softmax_cross_entropy as _torch_softmax_ce
from crossent._options import Backend, GammaSchedule, Reduction, SoftmaxOptions

__all__ = ["cross_entropy", "flsd53", "focal_loss", "linear_cross_entropy"]

_REDUCTIONS = ("none", "sum", "mean")
_BACKENDS = ("auto", "torch", "triton")


# --------------------------------------------------------------------------------------------
# validation (shared with the linear and distributed front doors)


def _compiling() -> bool:
    return torch.compiler.is_compiling()


def _check_finite_number(name: str, value: Any, *, min_value: float | None = None) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a float, got {type(value).__name__}")
    v = float(value)
    if not math.isfinite(v):
        raise ValueError(f"{name} must be finite, got {value}")
    if min_value is not None and v < min_value:
        raise ValueError(f"{name} must be >= {min_value}, got {value}")
    return v


def make_softmax_options(
    *,
    ignore_index: int,
    label_smoothing: float,
    gamma: float | GammaSchedule,
    z_loss: float,
    softcap: float | None,
    confidence_penalty: float,
    poly1: float,
) -> SoftmaxOptions:
    """Validate the scalar options of the softmax family (each error names its argument)."""
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, int):
        raise TypeError(f"ignore_index must be an int, got {type(ignore_index).__name__}")
    eps = _check_finite_number("label_smoothing", label_smoothing, min_value=0.0)
    if eps > 1.0:
        raise ValueError(f"label_smoothing must lie in [0, 1], got {label_smoothing}")
    if not callable(gamma):
        gamma = _check_finite_number("gamma", gamma)
        if gamma < 0:
            raise ValueError(f"gamma must be >= 0 (0 is plain cross-entropy), got {gamma}")
    if softcap is not None:
        softcap = _check_finite_number("softcap", softcap)
        if softcap <= 0:
            raise ValueError(f"softcap must be > 0 or None (no capping), got {softcap}")
    return SoftmaxOptions(
        ignore_index=ignore_index,
        label_smoothing=eps,
        gamma=gamma,
        z_loss=_check_finite_number("z_loss", z_loss, min_value=0.0),
        softcap=softcap,
        confidence_penalty=_check_finite_number("confidence_penalty", confidence_penalty, min_value=0.0),
        poly1=_check_finite_number("poly1", poly1),
    )


def check_reduction(reduction: str) -> None:
    if reduction not in _REDUCTIONS:
        raise ValueError(f"reduction must be one of {_REDUCTIONS}, got {reduction!r}")


def check_logits(logits: Any, name: str = "logits") -> None:
    if not isinstance(logits, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(logits).__name__}")
    if not logits.is_floating_point():
        raise TypeError(
            f"{name} must be a floating-point tensor (float32, float64, float16 or bfloat16), "
            f"got {logits.dtype}; convert with {name}.float()"
        )


def check_class_target(
    target: Tensor, num_classes: int, ignore_index: int, expected_shape: tuple[int, ...]
) -> None:
    """Index targets: integer dtype, the logits' shape without the class dim, values in [0, C)."""
    if target.dtype == torch.bool:
        raise TypeError("target must hold int64 class indices or float probabilities, got bool")
    if tuple(target.shape) != expected_shape:
        raise ValueError(
            f"target of class indices must have shape {expected_shape} (the logits' shape without "
            f"the class dim), got {tuple(target.shape)}"
        )
    if _compiling() or target.numel() == 0:
        return  # data-dependent checks would break the graph; indices are trusted there
    bad = ((target < 0) | (target >= num_classes)) & (target != ignore_index)
    if bool(bad.any()):
        first = int(target[bad].reshape(-1)[0])
        raise ValueError(
            f"target holds class index {first} outside [0, {num_classes}) that is not "
            f"ignore_index={ignore_index}"
        )


def check_prob_target(target: Tensor, logits_shape: tuple[int, ...]) -> None:
    if tuple(target.shape) != logits_shape:
        raise ValueError(
            f"target of class probabilities must have the logits' shape {logits_shape}, got "
            f"{tuple(target.shape)} (for class indices pass an integer tensor)"
        )
    if not _compiling() and target.numel() and bool((target < 0).any()):
        raise ValueError("target probabilities must be >= 0 (got a negative entry)")


def prepare_weight(weight: Tensor | None, num_classes: int, like: Tensor) -> Tensor | None:
    """Class weights: 1-D, length C, finite, >= 0; returned in the accumulation dtype."""
    if weight is None:
        return None
    if not isinstance(weight, Tensor):
        raise TypeError(f"weight must be a torch.Tensor of shape ({num_classes},) or None")
    if weight.ndim != 1 or weight.shape[0] != num_classes:
        raise ValueError(
            f"weight must have shape ({num_classes},) (one weight per class), got {tuple(weight.shape)}"
        )
    if not weight.is_floating_point():
        weight = weight.float()
    if not _compiling() and bool(((weight < 0) | ~torch.isfinite(weight)).any()):
        raise ValueError("weight must be finite and >= 0 for every class")
    acc = torch.float64 if like.dtype == torch.float64 else torch.float32
    return weight.detach().to(device=like.device, dtype=acc)


def _num_classes(logits: Tensor) -> int:
    if logits.ndim == 0:
        raise ValueError("logits must have a class dimension: shape (C,), (N, C) or (N, C, d1, ...)")
    return logits.shape[0] if logits.ndim == 1 else logits.shape[1]


def _index_target_shape(logits: Tensor) -> tuple[int, ...]:
    return () if logits.ndim == 1 else (logits.shape[0], *logits.shape[2:])


# --------------------------------------------------------------------------------------------
# backends


@functools.cache
def _triton_available() -> bool:
    return importlib.util.find_spec("triton") is not None and torch.cuda.is_available()


def _pick_backend(logits: Tensor, backend: Backend) -> str:
    if backend not in _BACKENDS:
        raise ValueError(f"backend must be one of {_BACKENDS}, got {backend!r}")
    if backend == "torch":
        return "torch"
    triton_ok = logits.is_cuda and _triton_available()
    if backend == "triton":
        if not triton_ok:
            raise ValueError(
                "backend='triton' needs a CUDA tensor and the triton package (pip install triton); "
                "use backend='torch' or 'auto'"
            )
        return "triton"
    return "triton" if triton_ok else "torch"


def _softmax_kernel(backend: str):
    if backend == "triton":
        from crossent._triton.softmax import softmax_cross_entropy as triton_softmax_ce

        return triton_softmax_ce
    return _torch_softmax_ce


class _SoftmaxCrossEntropyFunction(torch.autograd.Function):
    """One autograd node for the whole softmax family.

    The forward pass computes the loss and, while each row is in cache, the gradient of the
    loss w.r.t. the logits (the only N x C buffer). The backward pass only scales it by
    ``grad_output``, in place.
    """

    @staticmethod
    def forward(
        ctx: Any,
        logits: Tensor,
        target: Tensor,
        weight: Tensor | None,
        opts: SoftmaxOptions,
        reduction: Reduction,
        inplace_backward: bool,
        backend: str,
    ) -> Tensor:
        need_grad = ctx.needs_input_grad[0]
        loss, grad = _softmax_kernel(backend)(
            logits, target, weight, opts, reduction, need_grad, inplace_backward
        )
        ctx.reduction = reduction
        ctx.class_dim_last = logits.ndim == 1
        if grad is not None:
            ctx.save_for_backward(grad)
        return loss

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx: Any, grad_output: Tensor) -> tuple[Tensor | None, ...]:
        (grad,) = ctx.saved_tensors
        return scale_saved_grad(ctx, grad, grad_output), None, None, None, None, None, None


def scale_saved_grad(ctx: Any, grad: Tensor, grad_output: Tensor) -> Tensor:
    """Multiply the gradient saved by a fused forward by ``grad_output``.

    For a reduced (scalar) loss the saved buffer is scaled in place and returned as the input's
    gradient, so forward+backward holds one N x C buffer; ``ctx.applied`` remembers the factor
    already applied, so a second backward through the same graph (``retain_graph=True``) rescales
    by the ratio and stays exact. A ``grad_output`` of exactly 1 (the usual ``loss.backward()``)
    costs nothing on the CPU. A per-sample ``grad_output`` (reduction "none") may hold zeros that
    cannot be undone, so it gets a new buffer and the saved one stays intact.
    """
    go = grad_output.to(grad.dtype)
    if grad_output.ndim:  # per-sample grad_output of reduction="none"
        return grad * (go.unsqueeze(1) if grad.ndim >= 2 else go)
    if _compiling():
        return grad * go  # the compiler plans its own buffers
    applied = getattr(ctx, "applied", None)
    if applied is None:
        if grad_output.device.type == "cpu" and grad_output.item() == 1.0:
            return grad
        factor = go
    else:
        if bool(applied == 0):
            raise RuntimeError(
                "crossent: a second backward through a loss whose first backward had "
                "grad_output 0 is not supported; recompute the loss"
            )
        factor = go / applied
    # .data: an in-place update of the saved buffer that autograd's version counter does not
    # see; correctness on re-entry is kept by ctx.applied instead.
    grad.data.mul_(factor)
    ctx.applied = go.clone()
    return grad


def cross_entropy(
    logits: Tensor,
    target: Tensor,
    *,
    weight: Tensor | None = None,
    ignore_index: int = -100,
    label_smoothing: float = 0.0,
    gamma: float | GammaSchedule = 0.0,
    z_loss: float = 0.0,
    softcap: float | None = None,
    confidence_penalty: float = 0.0,
    poly1: float = 0.0,
    reduction: Reduction = "mean",
    inplace_backward: bool = False,
    backend: Backend = "auto",
) -> Tensor:
    r"""Softmax cross-entropy and its family, fused into one autograd node.

    With logits :math:`z`, the (optionally soft-capped) logits
    :math:`u = c \tanh(z / c)` (``softcap = c``; else :math:`u = z`), :math:`q = \mathrm{softmax}(u)`,
    the target distribution :math:`t` (one-hot for a class index) smoothed towards uniform,
    :math:`\tilde t = (1 - \varepsilon) t + \varepsilon / C`, class weights :math:`w` and the
    sample weight :math:`s = w_{y}` (1 for probability targets), the per-sample loss is

    .. math::

        L = \sum_k w_k \tilde t_k (1 - q_k)^{\gamma} (-\log q_k)
            \;+\; s\,\lambda_z \operatorname{lse}(u)^2
            \;-\; s\,\beta\, H(q)
            \;+\; s\,\epsilon_1 \bigl(1 - \textstyle\sum_k \tilde t_k q_k\bigr)

    - :math:`\gamma = 0, \varepsilon = 0` is exactly cross-entropy (``F.cross_entropy``),
      :math:`\varepsilon > 0` is label smoothing (Szegedy et al. 2016), :math:`\gamma > 0` the
      focal loss (Lin et al. 2017; Mukhoti et al. 2020 for calibration);
    - ``z_loss`` :math:`\lambda_z` (Chowdhery et al. 2022, PaLM) keeps the log-partition near 0;
    - ``softcap`` :math:`c` bounds the logits (Gemma 2);
    - ``confidence_penalty`` :math:`\beta` (Pereyra et al. 2017) rewards entropy
      :math:`H(q) = -\sum_k q_k \log q_k`;
    - ``poly1`` :math:`\epsilon_1` is the Poly-1 loss (Leng et al. 2022), which reduces to
      :math:`\epsilon_1 (1 - q_y)` without smoothing.

    A class weight weighs the whole sample: the regularisers are scaled by :math:`s = w_y`, so
    with a "mean" reduction uniform weights change nothing.

    Args:
        logits: (C,), (N, C) or (N, C, d1, ..., dk) float tensor (class dim at 1, as PyTorch).
        target: class indices, int tensor of the logits' shape without the class dim, or class
            probabilities, float tensor of the logits' shape. No gradient flows to the target.
        weight: (C,) non-negative class weights.
        ignore_index: index targets equal to it contribute nothing (loss and gradient 0).
        label_smoothing: :math:`\varepsilon \in [0, 1]`.
        gamma: focusing parameter :math:`\gamma \ge 0`, or a schedule: a callable that maps the
            detached true-class probability of each sample (a 1-D tensor,
            :math:`\sum_k t_k q_k` for probability targets, unsmoothed) to a per-sample
            :math:`\gamma` (tensor of that shape, or a scalar), e.g. :func:`flsd53`. It is
            called on blocks of rows, so it must act elementwise.
        z_loss, softcap, confidence_penalty, poly1: see above (``softcap=None`` disables).
        reduction: ``"none"`` (per-sample losses of the target's shape), ``"sum"``, or ``"mean"``:
            the sum divided by :math:`\sum_i w_{y_i}` over non-ignored samples for index targets
            (PyTorch's weighted mean), by the number of samples for probability targets.
        inplace_backward: write the gradient into ``logits``' own storage instead of a new
            buffer (saves N x C memory; 1-D/2-D logits). Unsafe when ``logits`` is needed after
            this call (a later read, another loss on the same logits, an op that saved them
            for its backward, or a leaf whose ``.grad`` would alias it); autograd's version
            counter catches most of these, not all.
        backend: ``"auto"`` (Triton for CUDA tensors when triton is importable, else torch),
            ``"torch"`` or ``"triton"``.

    Returns:
        The loss: float32 for float32/float16/bfloat16 logits (accumulation is always fp32),
        float64 for float64. The gradient has the logits' dtype.

    Differences from ``torch.nn.functional.cross_entropy`` (values and gradients otherwise match
    it to float tolerance): a "mean" whose denominator is 0 (every target ignored, or an empty
    batch) returns 0 with a zero gradient instead of NaN; bad inputs raise ``ValueError`` /
    ``TypeError`` naming the argument instead of a device-side assert.

    Example::

        >>> logits = torch.randn(8, 5, requires_grad=True)
        >>> y = torch.randint(0, 5, (8,))
        >>> loss = crossent.cross_entropy(logits, y, label_smoothing=0.1, gamma=2.0)
        >>> loss.backward()
    """
    check_logits(logits)
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
    C = _num_classes(logits)
    if not isinstance(target, Tensor):
        raise TypeError(f"target must be a torch.Tensor, got {type(target).__name__}")
    if target.device != logits.device:
        raise ValueError(f"target is on {target.device} but logits are on {logits.device}")
    if target.is_floating_point():
        check_prob_target(target, tuple(logits.shape))
        target = target.detach()
    elif target.is_complex():
        raise TypeError("target must hold int64 class indices or float probabilities, got complex")
    else:
        check_class_target(target, C, ignore_index, _index_target_shape(logits))
        target = target.long()
    w = prepare_weight(weight, C, logits)
    if inplace_backward and logits.ndim > 2:
        raise ValueError("inplace_backward needs 1-D or 2-D logits; reshape (N, C, d...) to (M, C)")
    chosen = _pick_backend(logits, backend)
    return _SoftmaxCrossEntropyFunction.apply(
        logits, target, w, opts, reduction, bool(inplace_backward), chosen
    )


def focal_loss(
    logits: Tensor, target: Tensor, *, gamma: float | GammaSchedule = 2.0, **options: Any
) -> Tensor:
    r"""Focal loss (Lin et al. 2017): :func:`cross_entropy` with :math:`\gamma = 2` by default.

    :math:`L = -\sum_k w_k \tilde t_k (1 - q_k)^\gamma \log q_k`. Every other option of
    :func:`cross_entropy` applies. Mukhoti et al. 2020 show focal loss improves calibration;
    pass ``gamma=crossent.flsd53`` for their sample-dependent schedule.
    """
    return cross_entropy(logits, target, gamma=gamma, **options)


def flsd53(p: Tensor) -> Tensor:
    """FLSD-53 (Mukhoti et al. 2020, *Calibrating Deep Neural Networks using Focal Loss*).

    A sample-dependent focusing parameter: gamma = 5 when the true-class probability
    p < 0.2, and gamma = 3 otherwise. Pass it as ``gamma=crossent.flsd53``.
    """
    return torch.where(p < 0.2, 5.0, 3.0).to(p.dtype)


# --------------------------------------------------------------------------------------------
# fused linear + cross-entropy (issue 7)


def linear_cross_entropy(
    hidden: Tensor,
    weight: Tensor,
    target: Tensor,
    *,
    bias: Tensor | None = None,
    class_weight: Tensor | None = None,
    ignore_index: int = -100,
    label_smoothing: float = 0.0,
    gamma: float | GammaSchedule = 0.0,
    z_loss: float = 0.0,
    softcap: float | None = None,
    confidence_penalty: float = 0.0,
    poly1: float = 0.0,
    reduction: Reduction = "mean",
    chunk_size: int | None = None,
    weight_grad_dtype: torch.dtype | None = None,
    backend: Backend = "auto",
) -> Tensor:
    r"""``cross_entropy(hidden @ weight.T + bias, target, ...)`` without materialising the logits.

    The N x V logits of a language-model head (and their gradient) are never held: tokens are
    processed in chunks; each chunk's logits :math:`Z_c = H_c W^\top + b` go through the fused
    softmax kernel, which writes :math:`G_c = \partial L / \partial Z_c` over them, and are turned
    at once into :math:`\partial H_c = G_c W`, :math:`\partial W \mathrel{+}= G_c^\top H_c`,
    :math:`\partial b \mathrel{+}= \mathbf 1^\top G_c` (the chunked scheme of Liger-Kernel; the
    blockwise one of Wijmans et al. 2024, *Cut Your Losses in Large-Vocabulary Language
    Models*, keeps even the chunk on chip). Extra memory: one chunk of logits plus the
    gradients of ``hidden``, ``weight`` and ``bias`` themselves. Tokens whose target is
    ``ignore_index`` are dropped before the matmul and cost nothing.

    Semantics: the loss and the gradients w.r.t. ``hidden``, ``weight`` and ``bias`` equal those
    of :func:`cross_entropy` on the materialised logits (float tolerance: only the summation
    order of the matmuls differs), for every option of the softmax family; see
    :func:`cross_entropy` for the math.

    Args:
        hidden: (..., D) float tensor (the last hidden states).
        weight: (V, D) output embedding, same dtype and device as ``hidden``.
        target: (...) integer class indices in [0, V) or ``ignore_index``; ``hidden``'s shape
            without its last dim.
        bias: optional (V,) output bias.
        class_weight: optional (V,) non-negative class weights (``weight=`` of
            :func:`cross_entropy`; renamed, since ``weight`` is the linear layer's here).
        ignore_index, label_smoothing, gamma, z_loss, softcap, confidence_penalty, poly1,
            reduction: as in :func:`cross_entropy`.
        chunk_size: tokens per chunk. Default: from a memory budget,
            ``max(1, budget // (V * bytes_per_entry))`` with a 64 MiB budget on the CPU
            (``bytes_per_entry`` = the element size: the gradient overwrites the logits and the
            softmax runs on cache-sized sub-blocks) and 1/16 of the free device memory,
            clamped to [64 MiB, 1 GiB], on CUDA (``bytes_per_entry`` = element size + 12 for the
            fp32 softmax temporaries); + 4 bytes when ``dW`` accumulates in fp32 for half
            inputs. See :mod:`crossent._cpu.linear`.
        weight_grad_dtype: dtype in which ``dW`` (and ``db``) accumulate over the chunks.
            Default: float32 for bfloat16/float16 weights (each chunk's contribution is added
            in fp32, then the sum is rounded once to the weight's dtype; costs a V x D fp32
            buffer), the weight's dtype otherwise. Pass ``torch.bfloat16`` to accumulate in
            bf16 (half the memory, rounding at every chunk).
        backend: ``"auto"``, ``"torch"`` (the chunked path, any device) or ``"triton"``.

    Precision: the logits of a chunk have the inputs' dtype (the matmul accumulates in fp32, as
    ``hidden @ weight.T`` does); the softmax, loss and its gradient are computed in fp32
    (fp64 for fp64 inputs); ``dH`` and ``dW`` come out in the inputs' dtypes.

    Backward: with a "mean"/"sum" reduction the gradients are formed during the forward pass
    and only scaled by ``grad_output`` in backward (three matmuls in all, as unfused). With
    ``reduction="none"`` a per-token ``grad_output`` cannot be folded in afterwards, so the
    forward computes only the losses and backward recomputes each chunk's logits: one extra
    matmul, nothing stored. A second backward (``retain_graph=True``) also recomputes.

    Returns:
        The loss (fp32 for half inputs, fp64 for fp64); for ``"none"`` of ``target``'s shape,
        0 at ignored tokens.

    Example::

        >>> h = torch.randn(4, 16, 64, requires_grad=True)     # (batch, seq, D)
        >>> W = torch.randn(1000, 64, requires_grad=True)      # (V, D)
        >>> y = torch.randint(0, 1000, (4, 16))
        >>> loss = crossent.linear_cross_entropy(h, W, y, label_smoothing=0.1, z_loss=1e-4)
        >>> loss.backward()
    """
    check_logits(hidden, "hidden")
    check_logits(weight, "weight")
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
    if hidden.ndim < 1:
        raise ValueError("hidden must have shape (..., D), got a 0-d tensor")
    if weight.ndim != 2:
        raise ValueError(f"weight must have shape (V, D), got {tuple(weight.shape)}")
    V, D = weight.shape
    if hidden.shape[-1] != D:
        raise ValueError(
            f"hidden's last dim ({hidden.shape[-1]}) must equal weight's second dim D={D} "
            f"(weight is (V, D) = {tuple(weight.shape)})"
        )
    if V == 0:
        raise ValueError("weight must have at least one row (class)")
    if weight.dtype != hidden.dtype:
        raise TypeError(f"weight has dtype {weight.dtype} but hidden has {hidden.dtype}; cast one")
    if weight.device != hidden.device:
        raise ValueError(f"weight is on {weight.device} but hidden is on {hidden.device}")
    if bias is not None:
        check_logits(bias, "bias")
        if tuple(bias.shape) != (V,):
            raise ValueError(f"bias must have shape ({V},) (one per class), got {tuple(bias.shape)}")
        if bias.dtype != hidden.dtype or bias.device != hidden.device:
            raise TypeError(
                f"bias must have hidden's dtype and device ({hidden.dtype}, {hidden.device}), "
                f"got ({bias.dtype}, {bias.device})"
            )
    if not isinstance(target, Tensor):
        raise TypeError(f"target must be a torch.Tensor, got {type(target).__name__}")
    if target.device != hidden.device:
        raise ValueError(f"target is on {target.device} but hidden is on {hidden.device}")
    if target.is_floating_point() or target.is_complex():
        raise TypeError(
            f"target must hold integer class indices (probability targets are not supported by "
            f"linear_cross_entropy), got {target.dtype}"
        )
    check_class_target(target, V, ignore_index, tuple(hidden.shape[:-1]))
    if chunk_size is not None and (
        isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1
    ):
        raise ValueError(f"chunk_size must be a positive int or None, got {chunk_size!r}")
    if weight_grad_dtype is not None and weight_grad_dtype not in (
        torch.float16, torch.bfloat16, torch.float32, torch.float64
    ):
        raise ValueError(f"weight_grad_dtype must be a float dtype or None, got {weight_grad_dtype}")
    if backend not in _BACKENDS:
        raise ValueError(f"backend must be one of {_BACKENDS}, got {backend!r}")
    try:
        w = prepare_weight(class_weight, V, hidden)
    except (TypeError, ValueError) as err:
        raise type(err)(str(err).replace("weight", "class_weight", 1)) from None

    from crossent._cpu.linear import LinearCrossEntropyFunction

    lead = tuple(hidden.shape[:-1])
    h2 = hidden.reshape(-1, D)
    t1 = target.reshape(-1).long()
    if backend == "triton" or (backend == "auto" and hidden.is_cuda and _triton_available()):
        from crossent._triton.linear import try_triton_linear_cross_entropy

        out = try_triton_linear_cross_entropy(
            h2, weight, bias, t1, w, opts, reduction, chunk_size, weight_grad_dtype,
            required=backend == "triton",
        )
        if out is not None:
            return out.reshape(lead) if reduction == "none" else out
    loss = LinearCrossEntropyFunction.apply(
        h2, weight, bias, t1, w, opts, reduction, chunk_size, weight_grad_dtype
    )
    return loss.reshape(lead) if reduction == "none" else loss
