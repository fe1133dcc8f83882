r"""Public PyTorch functions: validation, one fused autograd node per call, backend dispatch.

Softmax family
--------------
One formulation covers cross-entropy, label smoothing, class weights, focal loss (and
per-sample focal schedules), z-loss, logit soft-capping, the confidence penalty and Poly-1.
See :func:`cross_entropy` for the math.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import math
from collections.abc import Callable, Iterator
from dataclasses import replace
from typing import TYPE_CHECKING, Any, Literal, TypedDict, cast, overload

import torch
from torch import Tensor

from crossent import _ops
from crossent._aux import CrossEntropyAux, assemble_aux
from crossent._formula import MeanBy, acc_dtype, gamma_for_rows, inverse_or_zero, reduce
from crossent._formula import mean_denominator as mean_denominator_of
from crossent._options import (
    Backend,
    BinaryOptions,
    GammaSchedule,
    Reduction,
    SoftmaxCall,
    SoftmaxOptions,
    StepGamma,
    covers,
)
from crossent.backends import native as _native
from crossent.backends import triton as _triton

if TYPE_CHECKING:
    from typing_extensions import Unpack

__all__ = [
    "CrossEntropyAux",
    "asymmetric_loss",
    "binary_cross_entropy",
    "cross_entropy",
    "flsd53",
    "focal_loss",
    "linear_cross_entropy",
    "sigmoid_focal_loss",
]

_REDUCTIONS = ("none", "sum", "mean")
_BACKENDS = ("auto", "native", "torch", "triton")


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
    lo, hi = target.aminmax()  # one pass: the common case, every index in range, ends here
    if int(lo) >= 0 and int(hi) < num_classes:
        return
    bad = ((target < 0) | (target >= num_classes)) & (target != ignore_index)
    if bool(bad.any()):
        first = int(target[bad].reshape(-1)[0])
        raise ValueError(
            f"target holds class index {first} outside [0, {num_classes}) that is not "
            f"ignore_index={ignore_index}"
        )


def check_prob_target(target: Tensor, logits_shape: tuple[int, ...]) -> None:
    """The shape of a probability target (its sign: :func:`check_prob_sign`)."""
    if tuple(target.shape) != logits_shape:
        raise ValueError(
            f"target of class probabilities must have the logits' shape {logits_shape}, got "
            f"{tuple(target.shape)} (for class indices pass an integer tensor)"
        )


def check_prob_sign(target: Tensor) -> None:
    """No negative probability target. One reduction (amin), not a boolean tensor and a second
    pass (any); the native kernel makes the same check in its own read of the targets instead."""
    if not _compiling() and target.numel() and bool(target.detach().amin() < 0):
        raise ValueError("target probabilities must be >= 0 (got a negative entry)")


def prepare_weight(weight: Tensor | None, num_classes: int, like: Tensor) -> Tensor | None:
    """Class weights: 1-D, length C, finite, >= 0; returned in the accumulation dtype."""
    if weight is None:
        return None
    if not isinstance(weight, Tensor):
        raise TypeError(f"weight must be a torch.Tensor of shape ({num_classes},) or None")
    if weight.is_complex():
        raise TypeError(f"weight must be a real tensor, got {weight.dtype}")
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
    """The device-level choice: "triton" (CUDA), "native" (CPU) or "torch" (anything)."""
    if backend not in _BACKENDS:
        raise ValueError(f"backend must be one of {_BACKENDS}, got {backend!r}")
    if backend == "torch":
        return "torch"
    if backend == "native":
        if logits.device.type != "cpu" or not _native.available():
            raise ValueError(
                "backend='native' needs a CPU tensor and the native kernels, which build with a C "
                "compiler on first use (see crossent.backends.native); use backend='auto' or 'torch'"
            )
        return "native"
    triton_ok = logits.is_cuda and _triton_available()
    if backend == "triton":
        if not triton_ok:
            raise ValueError(
                "backend='triton' needs a CUDA tensor and the triton package (pip install triton); "
                "use backend='torch' or 'auto'"
            )
        return "triton"
    if triton_ok:
        return "triton"
    if logits.device.type == "cpu" and _native.available():
        return "native"
    return "torch"


def _covered(chosen: str, backend: Backend, covered: Callable[[str], bool], family: str) -> str:
    """Keep ``chosen`` when its allow-list covers the call; else the torch-op path (``"auto"``)
    or, for a forced backend, an error."""
    if chosen == "torch" or covered(chosen):
        return chosen
    if backend == chosen:
        raise ValueError(
            f"backend={backend!r} does not cover this {family} call (see the capabilities of "
            f"crossent.backends.native and crossent.backends.triton: options, dtypes and layouts); use "
            f"backend='auto', which falls back to the torch-op path"
        )
    return "torch"


class _InplaceSoftmaxFunction(torch.autograd.Function):
    """``inplace_backward=True`` in eager mode: the gradient is written into the logits' own
    storage, which a registered operator may not return. The write bumps the logits' version
    counter, so an op that saved them for its backward raises instead of using the gradient
    as its input."""

    @staticmethod
    def forward(
        ctx: Any, logits: Tensor, target: Tensor, weight: Tensor | None, opts: SoftmaxOptions,
        reduction: Reduction, backend: str, aux: bool,
    ) -> tuple[Tensor, Tensor]:
        chosen = _ops._softmax_backend(backend, logits, target, opts, weight, aux)
        stats = _ops.stats_buffer(logits, aux)
        loss, grad = _ops._kernel(chosen, "softmax")(
            SoftmaxCall(logits, target, weight, opts, reduction, True, True, stats if aux else None)
        )
        torch.autograd.graph.increment_version(logits)  # kernels write through raw pointers
        ctx.save_for_backward(grad)
        ctx.mark_non_differentiable(stats)
        return loss, stats

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx: Any, grad_output: Tensor, _grad_stats: Tensor | None) -> tuple[Tensor | None, ...]:
        (grad,) = ctx.saved_tensors
        return _ops.scale_saved_grad(ctx, grad, grad_output), None, None, None, None, None, None


def _inplace_writable(logits: Tensor) -> bool:
    """Whether ``inplace_backward`` may write the gradient over ``logits``: a contiguous tensor
    whose elements are distinct memory locations inside its storage. An expanded (stride-0),
    transposed, strided or otherwise overlapping view is not (the gradient would land on shared
    or foreign elements: wrong values, or a heap corrupted beyond the view); such logits get
    an ordinary gradient buffer instead. It is a memory option: nothing is said."""
    if not logits.is_contiguous() or logits.is_conj() or logits.is_neg():
        return False
    if logits.numel() == 0:
        return True
    try:
        if torch._debug_has_internal_overlap(logits) != 0:  # 0: none; 1: overlap; 2: unknown
            return False
        end = (logits.storage_offset() + logits.numel()) * logits.element_size()
        return end <= logits.untyped_storage().nbytes()
    except (RuntimeError, NotImplementedError):  # a tensor without a plain storage (a wrapper)
        return False


def _functorch_active(logits: Tensor) -> bool:
    """Whether ``logits`` is wrapped by a ``torch.func`` transform (grad, vmap, jacrev, ...)."""
    if _compiling():  # torch.compile traces the operator; it handles its own transforms
        return False
    return torch._C._functorch.is_functorch_wrapped_tensor(logits)


@contextlib.contextmanager
def _functorch_error(option: str) -> Iterator[None]:
    """Turn PyTorch's error for an operator without a functorch rule into one naming ``option``."""
    try:
        yield
    except RuntimeError as err:
        if "functorch transforms" not in str(err):
            raise
        raise RuntimeError(
            f"crossent: torch.func.grad/vjp/jacrev/hessian are implemented for cross-entropy "
            f"with label_smoothing, weight, ignore_index and z_loss (and the sigmoid family "
            f"without gamma and clip); this loss uses {option}. Use loss.backward() or "
            f"torch.autograd.grad, which support every option."
        ) from None


def _schedule_rows(logits: Tensor, target: Tensor, opts: SoftmaxOptions, backend: str) -> Tensor:
    """A focal schedule evaluated per row, on the true-class probabilities (detached)."""
    p = torch.ops.crossent.true_class_prob(logits, target, opts.ignore_index, opts.softcap, backend)
    gamma = gamma_for_rows(opts, p.unsqueeze(1))
    assert isinstance(gamma, Tensor)  # a schedule gives one gamma per row
    return gamma.reshape(-1)


class _FormulaOptions(TypedDict, total=False):
    """The options of the one softmax formulation, shared by the typed overloads below."""

    ignore_index: int
    label_smoothing: float
    gamma: float | GammaSchedule
    z_loss: float
    softcap: float | None
    confidence_penalty: float
    poly1: float
    reduction: Reduction
    backend: Backend


class CrossEntropyOptions(_FormulaOptions, total=False):
    """The keyword options of :func:`cross_entropy` (for its typed overloads)."""

    weight: Tensor | None
    sample_weight: Tensor | None
    class_dim: int
    mean_denominator: MeanBy
    z_loss_weighted: bool
    inplace_backward: bool


@overload
def cross_entropy(
    logits: Tensor, target: Tensor, *, return_aux: Literal[False] = ...,
    **options: Unpack[CrossEntropyOptions],
) -> Tensor: ...


@overload
def cross_entropy(
    logits: Tensor, target: Tensor, *, return_aux: Literal[True],
    **options: Unpack[CrossEntropyOptions],
) -> tuple[Tensor, CrossEntropyAux]: ...


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
    sample_weight: Tensor | None = None,
    class_dim: int = 1,
    reduction: Reduction = "mean",
    mean_denominator: MeanBy = "weight",
    z_loss_weighted: bool = True,
    inplace_backward: bool = False,
    backend: Backend = "auto",
    return_aux: bool = False,
) -> Tensor | tuple[Tensor, CrossEntropyAux]:
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
        sample_weight: per-sample weights :math:`v_i \ge 0` of the logits' shape without the
            class dim (Keras's ``sample_weight``): sample i's loss and gradient are multiplied
            by :math:`v_i`. Computed from the kernel's per-sample losses, so backward allocates
            one more logits-sized buffer.
        class_dim: the class dimension of ``logits`` (default 1, as PyTorch; -1 for (..., C)
            logits such as a language model's (B, T, V), taken as rows without a copy; any
            other dim is moved to 1 by a view). The target has the logits' shape without it.
        reduction: ``"none"`` (per-sample losses of the target's shape), ``"sum"``, or ``"mean"``:
            the sum divided by ``mean_denominator``.
        mean_denominator: ``"weight"`` (default, PyTorch's weighted mean):
            :math:`\sum_i v_i w_{y_i}` over non-ignored samples for index targets (the number
            of samples for probability targets, or :math:`\sum_i v_i` with ``sample_weight``);
            ``"count"``: the number of non-ignored samples (Keras's ``sum_over_batch_size``;
            the weighted-CE mean of Cui et al. 2019). A zero denominator gives 0.
        z_loss_weighted: with the default True the z-loss is a term of each sample's loss,
            weighted like it by :math:`s = w_y`. False gives Liger-Kernel's semantics: the
            z-loss :math:`\lambda_z \operatorname{lse}(u)^2` of every non-ignored sample
            without the class weight (times ``sample_weight`` if given), and a "mean" divides
            that part by the number of non-ignored samples, while the cross-entropy part keeps
            ``mean_denominator``. It is computed beside the kernel, by ``torch.logsumexp``.
        inplace_backward: write the gradient into ``logits``' own storage instead of a new
            buffer (saves N x C memory; 1-D/2-D logits). Logits that are not contiguous or
            whose elements share memory (``expand``, a transpose, a strided slice) cannot hold
            it: they get an ordinary gradient buffer. Unsafe when ``logits`` is needed after
            this call (a later read, another loss on the same logits, an op that saved them
            for its backward, or a leaf whose ``.grad`` would alias it); autograd's version
            counter catches most of these, not all.
        backend: ``"auto"`` (Triton for CUDA tensors when triton is importable; the native
            kernel for CPU tensors it covers, see :mod:`crossent.backends.native`; else the torch-op
            path), ``"native"``, ``"torch"`` (torch ops, any device) or ``"triton"``.
        return_aux: also return a :class:`CrossEntropyAux`: the log-sum-exp per sample, the
            z-loss term, the accuracy and the mean entropy of the prediction, computed in the
            loss's own pass (the native kernel's passes over each row, the first pass of the
            Triton kernel, the torch-op path's blocks in cache; ``crossent._ops.AUX_BACKENDS``
            lists the kernels that write them, any other runs on the torch-op path).

    Returns:
        The loss: float32 for float32/float16/bfloat16 logits (accumulation is always fp32),
        float64 for float64. The gradient has the logits' dtype. With ``return_aux``, the
        pair ``(loss, aux)``.

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
    by = _check_mean_denominator(mean_denominator)
    if not isinstance(z_loss_weighted, bool):
        raise TypeError(f"z_loss_weighted must be a bool, got {type(z_loss_weighted).__name__}")
    if not isinstance(return_aux, bool):
        raise TypeError(f"return_aux must be a bool, got {type(return_aux).__name__}")
    opts = make_softmax_options(
        ignore_index=ignore_index,
        label_smoothing=label_smoothing,
        gamma=gamma,
        z_loss=z_loss,
        softcap=softcap,
        confidence_penalty=confidence_penalty,
        poly1=poly1,
    )
    if not isinstance(target, Tensor):
        raise TypeError(f"target must be a torch.Tensor, got {type(target).__name__}")
    logits, target, lead = _class_dim_to_1(logits, target, class_dim)
    C = _num_classes(logits)
    if target.device != logits.device:
        raise ValueError(f"target is on {target.device} but logits are on {logits.device}")
    if target.is_floating_point():
        check_prob_target(target, tuple(logits.shape))  # the sign: below
        target = target.detach()
    elif target.is_complex():
        raise TypeError("target must hold int64 class indices or float probabilities, got complex")
    else:
        check_class_target(target, C, ignore_index, _index_target_shape(logits))
        target = target.long()
    w = prepare_weight(weight, C, logits)
    sw = _prepare_sample_weight(sample_weight, logits, lead)
    z_apart = 0.0
    if not z_loss_weighted and opts.z_loss:
        z_apart, opts = opts.z_loss, replace(opts, z_loss=0.0)
    if inplace_backward and logits.ndim > 2:
        raise ValueError("inplace_backward needs 1-D or 2-D logits; reshape (N, C, d...) to (M, C)")
    chosen = _pick_backend(logits, backend)

    def covered(chosen: str) -> bool:
        if chosen == "native":
            return _native.supports_softmax(logits, target, opts, w)
        return covers(_triton.SOFTMAX_CAPABILITIES, opts.active() | ({"weight"} if w is not None else set()))

    chosen = _covered(chosen, backend, covered, "softmax")
    need_grad = torch.is_grad_enabled() and logits.requires_grad
    if target.is_floating_point() and (chosen != "native" or inplace_backward or _functorch_active(logits)):
        # elsewhere the native kernel checks the sign in its own read of the targets (raising
        # before any result is returned; inplace_backward would have written the logits)
        check_prob_sign(target)
    # Sample weights and a count denominator reduce the kernel's per-sample or summed loss here.
    kernel_reduction = reduction
    if sw is not None:
        kernel_reduction = "none"
    elif reduction == "mean" and by == "count":
        kernel_reduction = "sum"
    loss: Tensor
    stats: Tensor | None
    if (
        inplace_backward and need_grad and not _compiling() and kernel_reduction == reduction
        and _inplace_writable(logits)
    ):
        loss, stats = _InplaceSoftmaxFunction.apply(logits, target, w, opts, reduction, chosen, return_aux)
    elif _functorch_active(logits):
        # torch.func transforms (grad, vjp, jacrev, hessian, vmap) need a composite of torch ops
        unsupported = _ops.composite_unsupported(opts)
        if unsupported is None:
            loss = _ops.softmax_loss_graph(logits, target, w, opts, kernel_reduction)
            stats = _stats_of(logits, target, opts) if return_aux else None
        else:
            with _functorch_error(unsupported):
                loss, stats = _softmax_op(
                    logits, target, w, opts, kernel_reduction, need_grad, chosen, return_aux
                )
    else:
        loss, stats = _softmax_op(logits, target, w, opts, kernel_reduction, need_grad, chosen, return_aux)
    if kernel_reduction != reduction or sw is not None:
        if sw is not None:
            loss = loss * sw
            if reduction != "none":
                loss = loss.sum()
        if reduction == "mean":
            rows = target.numel() if not target.is_floating_point() else target.numel() // max(C, 1)
            denom = mean_denominator_of(target, w, opts.ignore_index, loss.dtype, rows, sw, by)
            loss = loss * inverse_or_zero(denom)
    if z_apart:
        loss = loss + _unweighted_z_loss(logits, target, opts, sw, reduction, z_apart)
    if reduction == "none" and lead is not None:
        loss = loss.reshape(lead)
    if not return_aux:
        return loss
    assert stats is not None
    per_sample = lead if lead is not None else _ops._softmax_loss_shape(logits, "none")
    return loss, _softmax_aux(stats, target, w, sw, opts, z_apart, reduction, by, per_sample)


def _stats_of(logits: Tensor, target: Tensor, opts: SoftmaxOptions) -> Tensor:
    """The row statistics of ``return_aux`` by torch ops on the whole logits (the composite
    path of the ``torch.func`` transforms, which runs no fused kernel)."""
    from crossent._formula import row_statistics

    z = logits.detach()
    z = z.unsqueeze(0) if z.ndim == 1 else z
    C = z.shape[1]
    rows = z.movedim(1, -1).reshape(-1, C)
    t = target.reshape(-1) if not target.is_floating_point() else (
        (target.unsqueeze(0) if logits.ndim == 1 else target).movedim(1, -1).reshape(-1, C)
    )
    out = rows.new_empty((rows.shape[0], 3), dtype=acc_dtype(z.dtype))
    return row_statistics(rows, t, opts.softcap, out)


def _softmax_aux(
    stats: Tensor, target: Tensor, w: Tensor | None, sw: Tensor | None, opts: SoftmaxOptions,
    z_apart: float, reduction: Reduction, by: MeanBy, shape: tuple[int, ...],
) -> CrossEntropyAux:
    """The aux outputs of :func:`cross_entropy`, with the loss's own weights and denominator."""
    acc = stats.dtype
    rows = stats.shape[0]
    valid = None if target.is_floating_point() else target.reshape(-1) != opts.ignore_index
    z_rows = denom = None
    lam = z_apart or opts.z_loss
    if lam:
        if z_apart or valid is None or w is None:
            z_rows = torch.full((rows,), lam, dtype=acc, device=stats.device)
        else:  # weighted like the sample's loss: s = w_y
            z_rows = lam * w[torch.where(valid, target.reshape(-1), 0)].to(acc)
        if sw is not None:
            z_rows = z_rows * sw.reshape(-1)
        if reduction == "mean" and not z_apart:
            denom = mean_denominator_of(target, w, opts.ignore_index, acc, rows, sw, by)
    return assemble_aux(stats, valid, z_rows, reduction, denom, shape)


def _unweighted_z_loss(
    logits: Tensor, target: Tensor, opts: SoftmaxOptions, sw: Tensor | None, reduction: Reduction,
    z_loss: float,
) -> Tensor:
    """The z-loss without the class weight (``z_loss_weighted=False``): per sample
    ``z_loss * lse(u)^2`` where the target is not ignored, a "mean" over their count."""
    acc = acc_dtype(logits.dtype)
    u = logits.to(acc)
    class_dim = 0 if logits.ndim == 1 else 1
    valid = None if target.is_floating_point() else target != opts.ignore_index
    if valid is not None:  # ignored rows read as 0: their nan or inf reach neither loss nor gradient
        u = torch.where(valid.unsqueeze(class_dim), u, 0.0)
    if opts.softcap is not None:
        u = torch.tanh(u / opts.softcap) * opts.softcap
    lse = torch.logsumexp(u, dim=class_dim)
    if valid is None:
        valid = torch.ones_like(lse)
    rows = z_loss * torch.where(valid.bool(), lse.square(), 0.0)
    if sw is not None:
        rows = rows * sw
    return reduce(rows, reduction, lambda: valid.sum().to(acc))


def _check_mean_denominator(by: Any) -> MeanBy:
    if by not in ("weight", "count"):
        raise ValueError(
            f"mean_denominator must be 'weight' (sum of the weights of non-ignored samples, "
            f"PyTorch's weighted mean) or 'count' (number of non-ignored samples), got {by!r}"
        )
    return cast(MeanBy, by)


def _class_dim_to_1(
    logits: Tensor, target: Tensor, class_dim: Any
) -> tuple[Tensor, Tensor, tuple[int, ...] | None]:
    """Logits with the class dim at 1, as the kernels take them, and the per-sample shape to
    give a ``reduction="none"`` loss back (None when nothing moved).

    A last class dim, (..., C) as a language model's logits, becomes rows (M, C) by a reshape,
    a view of contiguous logits: the fast row kernels, no transpose. Any other dim moves to 1.
    """
    if isinstance(class_dim, bool) or not isinstance(class_dim, int):
        raise TypeError(f"class_dim must be an int, got {type(class_dim).__name__}")
    nd = max(logits.ndim, 1)
    if logits.ndim <= 1 and class_dim == 1:
        return logits, target, None  # the default: PyTorch's convention, (C,) has its classes at 0
    if not -nd <= class_dim < nd:
        raise ValueError(
            f"class_dim={class_dim} is out of range for logits with {logits.ndim} dims "
            f"(shape {tuple(logits.shape)}); valid: {-nd} to {nd - 1}"
        )
    cd = class_dim % nd
    if (logits.ndim <= 2 and cd == nd - 1) or cd == 1:
        return logits, target, None
    prob = target.is_floating_point()
    if cd == logits.ndim - 1:
        C = logits.shape[-1]
        lead = tuple(logits.shape[:-1])
        if prob:
            if tuple(target.shape) != tuple(logits.shape):
                raise ValueError(
                    f"target of class probabilities must have the logits' shape "
                    f"{tuple(logits.shape)}, got {tuple(target.shape)}"
                )
            target = target.reshape(-1, C)
        else:
            if tuple(target.shape) != lead:
                raise ValueError(
                    f"target of class indices must have shape {lead} (the logits' shape without "
                    f"class_dim={class_dim}), got {tuple(target.shape)}"
                )
            target = target.reshape(-1)
        return logits.reshape(-1, C), target, lead
    lead = tuple(logits.shape[:cd]) + tuple(logits.shape[cd + 1 :])
    moved = logits.movedim(cd, 1)
    if prob:
        target = target.movedim(cd, 1) if target.ndim == logits.ndim else target
    return moved, target, lead


def _prepare_sample_weight(
    sample_weight: object, logits: Tensor, user_shape: tuple[int, ...] | None
) -> Tensor | None:
    """Per-sample weights: the logits' shape without the class dim (``user_shape`` when the
    class dim was moved), finite, >= 0; returned in the kernels' per-sample shape."""
    if sample_weight is None:
        return None
    shape = () if logits.ndim == 1 else (logits.shape[0], *logits.shape[2:])
    if not isinstance(sample_weight, Tensor):
        raise TypeError(
            f"sample_weight must be a torch.Tensor of shape {user_shape or shape} (one weight per "
            f"sample) or None, got {type(sample_weight).__name__}"
        )
    if user_shape is not None and tuple(sample_weight.shape) == user_shape:
        sample_weight = sample_weight.reshape(shape)  # as the logits' rows were
        user_shape = None
    if tuple(sample_weight.shape) != (user_shape or shape):
        raise ValueError(
            f"sample_weight must have shape {user_shape or shape} (one weight per sample: the "
            f"logits' shape without the class dim), got {tuple(sample_weight.shape)}"
        )
    if sample_weight.device != logits.device:
        raise ValueError(f"sample_weight is on {sample_weight.device} but logits are on {logits.device}")
    if not sample_weight.is_floating_point():
        sample_weight = sample_weight.float()
    if not _compiling() and bool(((sample_weight < 0) | ~torch.isfinite(sample_weight)).any()):
        raise ValueError("sample_weight must be finite and >= 0 for every sample")
    return sample_weight.detach().to(acc_dtype(logits.dtype))


def _shift_targets(target: Any, ignore_index: int) -> Tensor:
    """``target[..., 1:]`` padded with ``ignore_index`` at the end: position t scores t + 1."""
    if not isinstance(target, Tensor):
        raise TypeError(f"target must be a torch.Tensor, got {type(target).__name__}")
    if target.is_floating_point() or target.is_complex() or target.dtype == torch.bool:
        raise TypeError(f"shift=True needs class-index targets, got {target.dtype}")
    if target.ndim < 1:
        raise ValueError("shift=True needs targets with a sequence dim, got a 0-d tensor")
    pad = torch.full_like(target[..., :1], ignore_index)
    return torch.cat([target[..., 1:], pad], dim=-1)


def _softmax_op(
    logits: Tensor, target: Tensor, w: Tensor | None, opts: SoftmaxOptions, reduction: Reduction,
    need_grad: bool, chosen: str, aux: bool = False,
) -> tuple[Tensor, Tensor | None]:
    """The registered operator's loss and (``aux``) its row statistics.

    A step schedule (:class:`~crossent._options.StepGamma`, e.g. :data:`flsd53`) goes to the
    native kernel as its three numbers, evaluated per row in the kernel's own pass; any other
    schedule, or a step on another backend, is evaluated here on the true-class probabilities
    (one more pass over the logits) and enters as per-row ``gamma_rows``."""
    step = opts.gamma if isinstance(opts.gamma, StepGamma) else None
    step = step if _ops.evaluates_step(step, chosen) else None
    gamma_rows = None
    if callable(opts.gamma) and step is None:
        gamma_rows = _schedule_rows(logits, target, opts, chosen)
    # traced on the CPU: the gradient is held aside, not saved (see crossent._ops._hold)
    hold = need_grad and _compiling() and logits.device.type == "cpu"
    loss, _, stats = torch.ops.crossent.softmax_ce(
        logits, target, w, gamma_rows, opts.ignore_index, _ops.softmax_numbers(opts, step), reduction,
        need_grad, chosen, hold, aux,
    )
    return loss, (stats if aux else None)


def focal_loss(
    logits: Tensor, target: Tensor, *, gamma: float | GammaSchedule = 2.0, **options: Any
) -> Tensor:
    r"""Focal loss (Lin et al. 2017): :func:`cross_entropy` with :math:`\gamma = 2` by default.

    :math:`L = -\sum_k w_k \tilde t_k (1 - q_k)^\gamma \log q_k`. Every other option of
    :func:`cross_entropy` applies. Mukhoti et al. 2020 show focal loss improves calibration;
    pass ``gamma=crossent.flsd53`` for their sample-dependent schedule.
    """
    loss: Tensor = cross_entropy(logits, target, gamma=gamma, **options)  # options: Any
    return loss


flsd53 = StepGamma(0.2, 5.0, 3.0, name="flsd53", doc="""\
FLSD-53 (Mukhoti et al. 2020, *Calibrating Deep Neural Networks using Focal Loss*).

A sample-dependent focusing parameter: gamma = 5 when the true-class probability
p < 0.2, and gamma = 3 otherwise. Pass it as ``gamma=crossent.flsd53``; ``flsd53(p)`` maps a
tensor of probabilities to its gammas. A :class:`~crossent._options.StepGamma`, which the
native CPU kernel evaluates inside its own pass.
""")


# --------------------------------------------------------------------------------------------
# binary and multi-label (sigmoid) family


def make_binary_options(
    *,
    label_smoothing: float,
    gamma_pos: float,
    gamma_neg: float,
    alpha: float | None,
    clip: float,
    ignore_index: float | None,
    gamma_names: tuple[str, str] = ("gamma_pos", "gamma_neg"),
    poly1: float = 0.0,
    detach_focal_weight: bool = False,
) -> BinaryOptions:
    """Validate the scalar options of the sigmoid family (each error names its argument)."""
    if not isinstance(detach_focal_weight, bool):
        raise TypeError(
            f"detach_focal_weight must be a bool, got {type(detach_focal_weight).__name__}"
        )
    eps = _check_finite_number("label_smoothing", label_smoothing, min_value=0.0)
    if eps > 1.0:
        raise ValueError(f"label_smoothing must lie in [0, 1], got {label_smoothing}")
    gammas = []
    for name, value in zip(gamma_names, (gamma_pos, gamma_neg), strict=True):
        g = _check_finite_number(name, value)
        if g < 0:
            raise ValueError(f"{name} must be >= 0 (0 is plain binary cross-entropy), got {value}")
        gammas.append(g)
    a: float | None = None
    if alpha is not None:
        a = _check_finite_number("alpha", alpha)
        if a > 1.0:
            raise ValueError(
                f"alpha must lie in [0, 1] (the weight of positives; None or a negative value "
                f"disables it), got {alpha}"
            )
        if a < 0:
            a = None  # torchvision's convention: alpha < 0 disables the balance factor
    c = _check_finite_number("clip", clip, min_value=0.0)
    if c >= 1.0:
        raise ValueError(f"clip must lie in [0, 1) (0 disables probability shifting), got {clip}")
    ii: float | None = None
    if ignore_index is not None:
        ii = _check_finite_number("ignore_index", ignore_index)
        if isinstance(ignore_index, int):
            ii = ignore_index  # exact comparison with integer targets
    return BinaryOptions(
        label_smoothing=eps, gamma_pos=gammas[0], gamma_neg=gammas[1], alpha=a, clip=c,
        ignore_index=ii, poly1=_check_finite_number("poly1", poly1),
        detach_focal_weight=detach_focal_weight,
    )


def check_binary_target(target: object, logits: Tensor, ignore_index: float | None) -> Tensor:
    """Targets of the sigmoid family: the logits' shape and device, values in [0, 1].

    Float (probabilities or 0/1 labels), integer or bool. Entries equal to ``ignore_index`` are
    exempt from the range check. Returns the detached target.
    """
    if not isinstance(target, Tensor):
        raise TypeError(f"target must be a torch.Tensor, got {type(target).__name__}")
    if target.is_complex():
        raise TypeError("target must hold 0/1 labels or probabilities in [0, 1], got complex")
    if target.device != logits.device:
        raise ValueError(f"target is on {target.device} but logits are on {logits.device}")
    if tuple(target.shape) != tuple(logits.shape):
        raise ValueError(
            f"target must have the logits' shape {tuple(logits.shape)} (one 0/1 label or "
            f"probability per logit), got {tuple(target.shape)}; for class indices use "
            "crossent.cross_entropy"
        )
    target = target.detach()
    if _compiling() or target.dtype == torch.bool or target.numel() == 0:
        return target  # data-dependent checks would break the graph; targets are trusted there
    flat = target.reshape(-1)
    step = 1 << 20  # in chunks: the check allocates no logits-sized temporaries
    for i in range(0, flat.numel(), step):
        tb = flat[i : i + step]
        lo, hi = tb.aminmax()  # one pass; a nan propagates and fails the test below
        if bool((lo >= 0) & (hi <= 1)):
            continue
        bad = ~((tb >= 0) & (tb <= 1))  # also catches nan
        if ignore_index is not None:
            bad &= tb != ignore_index
        if bool(bad.any()):
            first = tb[bad][0].item()
            extra = "" if ignore_index is None else f" that is not ignore_index={ignore_index}"
            raise ValueError(
                f"target must lie in [0, 1] (0/1 labels or probabilities), got {first}{extra}"
            )
    return target


def prepare_binary_weight(name: str, weight: object, logits: Tensor, hint: str = "") -> Tensor | None:
    """Element or class weights that broadcast to the logits' shape: finite, >= 0, in the
    accumulation dtype on the logits' device."""
    if weight is None:
        return None
    if not isinstance(weight, Tensor):
        raise TypeError(
            f"{name} must be a torch.Tensor that broadcasts to the logits' shape, or None; got "
            f"{type(weight).__name__}"
        )
    if weight.is_complex():
        raise TypeError(f"{name} must be a real tensor, got complex")
    try:
        shape = tuple(torch.broadcast_shapes(weight.shape, logits.shape))
    except RuntimeError:
        shape = None
    if shape != tuple(logits.shape):
        raise ValueError(
            f"{name} of shape {tuple(weight.shape)} must broadcast to the logits' shape "
            f"{tuple(logits.shape)}{hint}"
        )
    if not weight.is_floating_point():
        weight = weight.float()
    if not _compiling() and bool(((weight < 0) | ~torch.isfinite(weight)).any()):
        raise ValueError(f"{name} must be finite and >= 0 everywhere")
    acc = torch.float64 if logits.dtype == torch.float64 else torch.float32
    return weight.detach().to(device=logits.device, dtype=acc)


def _binary_loss(
    logits: Tensor,
    target: Tensor,
    weight: Tensor | None,
    pos_weight: Tensor | None,
    opts: BinaryOptions,
    reduction: Reduction,
    backend: Backend,
) -> Tensor:
    check_logits(logits)
    check_reduction(reduction)
    target = check_binary_target(target, logits, opts.ignore_index)
    w = prepare_binary_weight("weight", weight, logits)
    pw = prepare_binary_weight(
        "pos_weight", pos_weight, logits,
        " (it is aligned to the last dim: shape (C,) gives one weight per class)",
    )
    chosen = _pick_backend(logits, backend)

    def binary_covered(chosen: str) -> bool:
        if chosen == "native":
            return _native.supports_binary(logits, target, w, pw, opts)
        used = opts.active() | {n for n, t in (("weight", w), ("pos_weight", pw)) if t is not None}
        return covers(_triton.BINARY_CAPABILITIES, used)

    chosen = _covered(chosen, backend, binary_covered, "sigmoid")
    need_grad = torch.is_grad_enabled() and logits.requires_grad
    if _functorch_active(logits) and not (opts.focal or opts.clip):
        return _ops.binary_loss_graph(logits, target, w, pw, opts, reduction)
    with _functorch_error("gamma" if opts.focal else "clip"):
        loss: Tensor
        loss, _ = torch.ops.crossent.binary_ce(
            logits, target, w, pw, _ops.binary_numbers(opts), reduction, need_grad, chosen,
            opts.detach_focal_weight,
        )
    return loss


def binary_cross_entropy(
    logits: Tensor,
    target: Tensor,
    *,
    weight: Tensor | None = None,
    pos_weight: Tensor | None = None,
    label_smoothing: float = 0.0,
    gamma: float = 0.0,
    alpha: float | None = None,
    ignore_index: float | None = None,
    reduction: Reduction = "mean",
    backend: Backend = "auto",
    poly1: float = 0.0,
    detach_focal_weight: bool = False,
) -> Tensor:
    r"""Binary / multi-label cross-entropy on logits and its focal family, in one autograd node.

    Per element, with logit :math:`x`, :math:`p = \sigma(x)`, the target :math:`t \in [0, 1]`
    smoothed towards 1/2, :math:`t' = t (1 - \varepsilon) + \varepsilon / 2` (the K = 2 case of
    the softmax smoothing), element weight :math:`w` and positive weight :math:`w_+`:

    .. math::

        b &= -\bigl[w_+ t' \log p + (1 - t') \log(1 - p)\bigr] \\
        p_t &= p\, t' + (1 - p)(1 - t'), \qquad
        \alpha_t = \alpha t' + (1 - \alpha)(1 - t') \\
        L &= w\, \alpha_t\, (1 - p_t)^{\gamma}\, b + w\, \alpha_t\, \epsilon_1 (1 - p_t)

    - :math:`\gamma = 0`, ``alpha=None`` is exactly ``F.binary_cross_entropy_with_logits``
      (same ``weight`` and ``pos_weight`` broadcasting, "mean" over elements);
    - :math:`\gamma > 0` is the focal loss (Lin et al. 2017, *Focal Loss for Dense Object
      Detection*) in the :math:`p_t` form of torchvision's ``sigmoid_focal_loss``, which also
      covers soft targets; :math:`\alpha_t` is its class-balance factor (``alpha=None`` or a
      negative ``alpha`` disables it);
    - :func:`asymmetric_loss` is the same formula with separate :math:`\gamma_\pm` and a shifted
      negative probability;
    - :math:`\epsilon_1` (``poly1``, 0 by default) is the Poly-1 term of Leng et al. 2022
      (*PolyLoss: A Polynomial Expansion Perspective of Classification Loss Functions*, ICLR),
      the first polynomial coefficient of the loss, here :math:`(1 - p_t)` under
      :math:`w \alpha_t` only (no :math:`w_+`, no focal factor; the paper's focal variant
      uses :math:`(1 - p_t)^{\gamma + 1}` instead), with the derivative
      :math:`d(1 - p_t)/dx = -t' p (1 - p) + (1 - t')\, p (1 - p)`. With :math:`\gamma = 0`,
      ``alpha=None`` it is Poly-1 BCE, :math:`b + \epsilon_1 (1 - p_t)`; a negative
      :math:`\epsilon_1` is allowed;
    - ``detach_focal_weight=True`` treats the focal weight :math:`\alpha_t (1 - p_t)^\gamma` as
      a constant in the gradient (Ridnik et al. 2021's ``disable_torch_grad_focal_loss``): the
      loss is unchanged, its gradient is :math:`w \alpha_t (1 - p_t)^\gamma\, db/dx` (plus the
      Poly-1 term's). With :math:`\gamma = 0` it changes nothing.

    For hard targets this is the familiar split form: :math:`-w \alpha w_+ (1 - p)^\gamma \log p`
    for :math:`t = 1`, :math:`-w (1 - \alpha) p^\gamma \log(1 - p)` for :math:`t = 0`.

    Numerics: :math:`\log p = -\operatorname{softplus}(-x)`, the focal factor from
    :math:`1 - p_t = t'\sigma(-x) + (1 - t')\sigma(x)` (no cancellation), and the gradient
    with :math:`(1 - p_t)^{\gamma - 1}` rewritten as a bounded ratio, so loss and gradient are
    finite at logits of :math:`\pm 10^4` and for :math:`\gamma \in (0, 1)` at
    :math:`p_t \to 1`. The derivation is in :mod:`crossent.backends.torch_ops.binary`.

    Args:
        logits: float tensor of any shape: (N,) binary, (N, C) multi-label, (N, C, H, W), ...
        target: tensor of the logits' shape: 0/1 labels (float, int or bool) or probabilities
            in [0, 1]. No gradient flows to the target.
        weight: non-negative weights that broadcast to the logits' shape (per element, per
            class (C,), per sample (N, 1), ...).
        pos_weight: non-negative weight of the positive term, broadcast against the logits
            (shape (C,) weighs the positives of each class, aligned to the last dim).
        label_smoothing: :math:`\varepsilon \in [0, 1]`.
        gamma: focusing parameter :math:`\gamma \ge 0`.
        alpha: balance factor in [0, 1], or None / negative to disable.
        ignore_index: entries whose target equals it contribute nothing (loss and gradient
            0) and are left out of the "mean" count; None masks nothing.
        reduction: ``"none"`` (the logits' shape), ``"sum"``, or ``"mean"`` over the unmasked
            elements.
        backend: ``"auto"`` (Triton for CUDA tensors when available; the native kernel on the
            CPU when it covers the call; else the torch-op path), ``"native"``, ``"torch"`` or
            ``"triton"``. The native and Triton kernels do not compute ``poly1`` and
            ``detach_focal_weight``: ``"auto"`` runs such calls on the torch-op path, a forced
            ``"native"`` / ``"triton"`` raises ``ValueError``.
        poly1: :math:`\epsilon_1`, the Poly-1 coefficient (a finite float, may be negative).
        detach_focal_weight: a bool; True stops the gradient through the focal weight.

    Returns:
        The loss: float32 for float32/float16/bfloat16 logits (accumulation is always fp32),
        float64 for float64. The gradient has the logits' dtype.

    Differences from ``F.binary_cross_entropy_with_logits``: a "mean" with nothing to average
    (empty, or every entry masked) is 0 with a zero gradient instead of NaN; targets outside
    [0, 1] and weights that do not broadcast to the logits' shape raise ``ValueError``.

    Example::

        >>> logits = torch.randn(8, 80, requires_grad=True)
        >>> y = torch.randint(0, 2, (8, 80)).float()
        >>> loss = crossent.binary_cross_entropy(logits, y, gamma=2.0, alpha=0.25)
        >>> loss.backward()
    """
    opts = make_binary_options(
        label_smoothing=label_smoothing, gamma_pos=gamma, gamma_neg=gamma, alpha=alpha, clip=0.0,
        ignore_index=ignore_index, gamma_names=("gamma", "gamma"), poly1=poly1,
        detach_focal_weight=detach_focal_weight,
    )
    return _binary_loss(logits, target, weight, pos_weight, opts, reduction, backend)


def sigmoid_focal_loss(
    logits: Tensor,
    target: Tensor,
    *,
    alpha: float | None = 0.25,
    gamma: float = 2.0,
    **options: Any,
) -> Tensor:
    r"""Sigmoid focal loss (Lin et al. 2017): :func:`binary_cross_entropy` with
    :math:`\gamma = 2`, :math:`\alpha = 0.25` by default.

    :math:`L = -\alpha_t (1 - p_t)^\gamma \log p_t` for hard targets, the formula of
    torchvision's ``sigmoid_focal_loss`` (:math:`p_t = p t + (1 - p)(1 - t)`,
    :math:`\alpha_t = \alpha t + (1 - \alpha)(1 - t)`; ``alpha=None`` or negative disables it).
    Every other option of :func:`binary_cross_entropy` applies (``poly1``,
    ``detach_focal_weight`` included). Unlike torchvision, the default ``reduction`` is
    ``"mean"``.
    """
    return binary_cross_entropy(logits, target, alpha=alpha, gamma=gamma, **options)


def asymmetric_loss(
    logits: Tensor,
    target: Tensor,
    *,
    gamma_pos: float = 0.0,
    gamma_neg: float = 4.0,
    clip: float = 0.05,
    weight: Tensor | None = None,
    pos_weight: Tensor | None = None,
    label_smoothing: float = 0.0,
    alpha: float | None = None,
    ignore_index: float | None = None,
    reduction: Reduction = "mean",
    backend: Backend = "auto",
    poly1: float = 0.0,
    detach_focal_weight: bool = False,
) -> Tensor:
    r"""Asymmetric loss for multi-label classification (Ridnik et al. 2021, *Asymmetric Loss
    For Multi-Label Classification*), fused like :func:`binary_cross_entropy`.

    Negatives use the shifted probability :math:`p_m = \max(p - c, 0)` (``clip`` :math:`= c`),
    which discards easy negatives outright, and positives and negatives have their own focusing
    parameters. With the smoothed target :math:`t'` and everything else as in
    :func:`binary_cross_entropy`:

    .. math::

        b &= -\bigl[w_+ t' \log p + (1 - t') \log(1 - p_m)\bigr] \\
        1 - p_t &= t' (1 - p) + (1 - t')\, p_m, \qquad
        \gamma_t = \gamma_+ t' + \gamma_- (1 - t') \\
        L &= w\, \alpha_t\, (1 - p_t)^{\gamma_t}\, b + w\, \alpha_t\, \epsilon_1 (1 - p_t)

    For hard targets: :math:`L_+ = -(1 - p)^{\gamma_+} \log p`,
    :math:`L_- = -p_m^{\gamma_-} \log(1 - p_m)`, as in the paper. ``gamma_pos = gamma_neg = 0``
    with ``clip = 0`` is plain binary cross-entropy. The gradient is 0 w.r.t. a negative's logit
    where :math:`p \le c` (the kink of the clip).

    :math:`\epsilon_1` (``poly1``) is the Poly-1 term of Leng et al. 2022 (see
    :func:`binary_cross_entropy`), here with the clipped :math:`1 - p_t`, so its derivative is
    :math:`d(1 - p_t)/dx = -t' p (1 - p) + (1 - t') [p > c]\, p (1 - p)`.
    ``detach_focal_weight=True`` is the training setting ``disable_torch_grad_focal_loss`` of
    Ridnik et al.'s code: the asymmetric focal weight :math:`\alpha_t (1 - p_t)^{\gamma_t}` is a
    constant in the gradient, which becomes :math:`w \alpha_t (1 - p_t)^{\gamma_t}\, db/dx`
    (plus the Poly-1 term's); the loss value is unchanged.

    Args:
        gamma_pos, gamma_neg: focusing parameters :math:`\gamma_\pm \ge 0` (paper: 0 and 4).
        clip: probability margin :math:`c \in [0, 1)` (paper: 0.05); 0 disables shifting.
        poly1: the Poly-1 coefficient :math:`\epsilon_1` (a finite float, may be negative).
        detach_focal_weight: a bool; True stops the gradient through the focal weight.
        Others: as :func:`binary_cross_entropy` (``alpha`` defaults to None here).
    """
    opts = make_binary_options(
        label_smoothing=label_smoothing, gamma_pos=gamma_pos, gamma_neg=gamma_neg, alpha=alpha,
        clip=clip, ignore_index=ignore_index, poly1=poly1, detach_focal_weight=detach_focal_weight,
    )
    return _binary_loss(logits, target, weight, pos_weight, opts, reduction, backend)


# --------------------------------------------------------------------------------------------
# fused linear + cross-entropy


class LinearCrossEntropyOptions(_FormulaOptions, total=False):
    """The keyword options of :func:`linear_cross_entropy` (for its typed overloads)."""

    bias: Tensor | None
    class_weight: Tensor | None
    chunk_size: int | None
    weight_grad_dtype: torch.dtype | None
    grad_filter_eps: float
    shift: bool


@overload
def linear_cross_entropy(
    hidden: Tensor, weight: Tensor, target: Tensor, *, return_aux: Literal[False] = ...,
    **options: Unpack[LinearCrossEntropyOptions],
) -> Tensor: ...


@overload
def linear_cross_entropy(
    hidden: Tensor, weight: Tensor, target: Tensor, *, return_aux: Literal[True],
    **options: Unpack[LinearCrossEntropyOptions],
) -> tuple[Tensor, CrossEntropyAux]: ...


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
    grad_filter_eps: float = 0.0,
    shift: bool = False,
    backend: Backend = "auto",
    return_aux: bool = False,
) -> Tensor | tuple[Tensor, CrossEntropyAux]:
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

    Probability (soft) targets, as ``F.linear_cross_entropy`` and ``F.cross_entropy`` take
    them: a float ``target`` :math:`T` of shape (..., V) holds a distribution :math:`t_i` per
    token (e.g. a teacher's softmax for distillation). With :math:`q_i =
    \mathrm{softmax}(u_i)` of the token's (capped) logits :math:`z_i = W h_i + b` and
    :math:`\tilde t_i = (1 - \varepsilon) t_i + \varepsilon / V`, the token's loss is

    .. math::

        L_i = \sum_k w_k \tilde t_{ik} (1 - q_{ik})^{\gamma} (-\log q_{ik})
            + \lambda_z \operatorname{lse}(u_i)^2 - \beta H(q_i)
            + \epsilon_1 \bigl(1 - \textstyle\sum_k \tilde t_{ik} q_{ik}\bigr),

    the sample weight being 1 (a focal schedule sees :math:`\sum_k t_{ik} q_{ik}`), and a
    "mean" is :math:`\frac1N \sum_i L_i` over all N tokens. ``ignore_index`` does not apply
    (every token counts; give a token zero target mass to drop its cross-entropy term). The
    target is read chunk by chunk alongside the hidden rows and cast to the accumulation dtype
    per chunk: no copy of it is made (the target itself is N x V: the user's tensor), and no
    gradient flows to it. The Triton backend takes class indices only.

    Args:
        hidden: (..., D) float tensor (the last hidden states).
        weight: (V, D) output embedding, same dtype and device as ``hidden``.
        target: class indices, an integer tensor of ``hidden``'s shape without its last dim
            (values in [0, V) or ``ignore_index``), or class probabilities, a float tensor
            (any float dtype) of shape (..., V) (``hidden``'s leading shape plus V) with
            entries >= 0, on ``hidden``'s device.
        bias: optional (V,) output bias.
        class_weight: optional (V,) non-negative class weights (``weight=`` of
            :func:`cross_entropy`; renamed, since ``weight`` is the linear layer's here).
        ignore_index, label_smoothing, gamma, z_loss, softcap, confidence_penalty, poly1, reduction:
            as in :func:`cross_entropy`.
        chunk_size: tokens per chunk. Default: from a memory budget,
            ``max(1, budget // (V * bytes_per_entry))`` with a 32 MiB budget on the CPU
            (30 MiB for fp16/bf16 inputs and under autocast, rounded to a multiple of 32 rows)
            (``bytes_per_entry`` = the element size: the gradient overwrites the logits and the
            softmax runs on sub-blocks of 1 Mi entries) and 1/16 of the free device memory,
            clamped to [64 MiB, 1 GiB], on CUDA (``bytes_per_entry`` = element size + 12 for the
            fp32 softmax temporaries); + 4 bytes when ``dW`` accumulates in fp32 for half
            inputs. See :mod:`crossent.backends.torch_ops.linear`.
        weight_grad_dtype: dtype in which ``dW`` (and ``db``) accumulate over the chunks.
            Default: float32 for bfloat16/float16 weights (each chunk's contribution is added
            in fp32, then the sum is rounded once to the weight's dtype; costs a V x D fp32
            buffer), the weight's dtype otherwise. Pass ``torch.bfloat16`` to accumulate in
            bf16 (half the memory, rounding at every chunk).
        grad_filter_eps: Triton path only (ignored by the chunked path): skip the backward
            work of a (token block, vocabulary tile) whose logits gradient is below this in
            absolute value everywhere (Wijmans et al.'s gradient filtering). 0 (default) is
            exact; the error is bounded by ``grad_filter_eps`` per skipped entry.
        shift: the causal shift of a language model: position t is scored against
            ``target[..., t + 1]`` and the last position is ignored, as
            ``cross_entropy(logits[..., :-1, :], target[..., 1:])`` -- done on the targets
            (shifted and padded with ``ignore_index``), so ``hidden`` is neither sliced nor
            copied, and the ignored last positions cost no matmul. Class-index targets only.
        backend: ``"auto"``, ``"native"`` and ``"torch"`` run the chunked path (any device;
            its per-chunk loss is the torch-op path, whose cost is dominated by the matmuls); ``"triton"``
            the blockwise kernels of :mod:`crossent.backends.triton.linear` (CUDA, or the CPU under
            ``TRITON_INTERPRET=1``), which cover class-index targets with every option but
            softcap, the confidence penalty and focal together with smoothing (their
            allow-list, ``crossent.backends.triton.LINEAR_CAPABILITIES``), and raise for those
            and for probability targets. ``"auto"`` does not
            pick Triton yet: the kernels are verified under the interpreter but have not been
            benchmarked against the chunked path on a GPU.
        return_aux: also return a :class:`CrossEntropyAux` (per-token log-sum-exp, the z-loss
            term, token accuracy, mean entropy; see :func:`cross_entropy`), taken from each
            chunk's logits while they are in memory (the chunked path; not ``"triton"``).

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
        0 at ignored tokens. With ``return_aux``, the pair ``(loss, aux)``.

    Example::

        >>> h = torch.randn(4, 16, 64, requires_grad=True)     # (batch, seq, D)
        >>> W = torch.randn(1000, 64, requires_grad=True)      # (V, D)
        >>> y = torch.randint(0, 1000, (4, 16))
        >>> loss = crossent.linear_cross_entropy(h, W, y, label_smoothing=0.1, z_loss=1e-4)
        >>> loss.backward()
    """
    check_logits(hidden, "hidden")
    check_logits(weight, "weight")
    if not isinstance(return_aux, bool):
        raise TypeError(f"return_aux must be a bool, got {type(return_aux).__name__}")
    if return_aux and backend == "triton":
        raise ValueError(
            "return_aux is computed by the chunked path: pass backend='auto' (or 'torch'), not 'triton'"
        )
    if shift:
        target = _shift_targets(target, ignore_index)
    dev_type = hidden.device.type
    compute_dtype = None
    if torch.is_autocast_enabled(dev_type) and hidden.dtype != torch.float64:
        # As autocast treats ``hidden @ weight.T + bias``: computed in the autocast dtype (the
        # matmuls accumulate in fp32, the loss is fp32); each gradient comes back in its
        # input's dtype. The chunked path casts inside, the Triton path here.
        compute_dtype = torch.get_autocast_dtype(dev_type)
        if backend == "triton":
            with torch.autocast(dev_type, enabled=False):
                return linear_cross_entropy(
                    hidden.to(compute_dtype), weight.to(compute_dtype), target,
                    bias=None if bias is None else bias.to(compute_dtype),
                    class_weight=class_weight, ignore_index=ignore_index,
                    label_smoothing=label_smoothing, gamma=gamma, z_loss=z_loss, softcap=softcap,
                    confidence_penalty=confidence_penalty, poly1=poly1, reduction=reduction,
                    chunk_size=chunk_size, weight_grad_dtype=weight_grad_dtype,
                    grad_filter_eps=grad_filter_eps, backend=backend,
                )
        if weight.dtype != hidden.dtype:
            weight = weight.to(hidden.dtype)  # mixed leaves: both cast to compute_dtype anyway
        if bias is not None and bias.dtype != hidden.dtype:
            bias = bias.to(hidden.dtype)
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
            raise ValueError(
                f"bias must have shape ({V},) (one per class), got {tuple(bias.shape)}"
            )
        if bias.dtype != hidden.dtype or bias.device != hidden.device:
            raise TypeError(
                f"bias must have hidden's dtype and device ({hidden.dtype}, {hidden.device}), "
                f"got ({bias.dtype}, {bias.device})"
            )
    if not isinstance(target, Tensor):
        raise TypeError(f"target must be a torch.Tensor, got {type(target).__name__}")
    if target.device != hidden.device:
        raise ValueError(f"target is on {target.device} but hidden is on {hidden.device}")
    prob_target = target.is_floating_point()
    if target.is_complex():
        raise TypeError("target must hold integer class indices or float probabilities, got complex")
    if prob_target:
        # Class probabilities (..., V): checked without an N x V temporary (a min, not a mask);
        # ignore_index does not apply (ignore rows are an index-target concept).
        expected = (*hidden.shape[:-1], V)
        if tuple(target.shape) != expected:
            raise ValueError(
                f"target of class probabilities must have shape (..., V) = {expected} (hidden's "
                f"leading shape plus V), got {tuple(target.shape)} (for class indices pass an "
                f"integer tensor)"
            )
        check_prob_sign(target)
    else:
        check_class_target(target, V, ignore_index, tuple(hidden.shape[:-1]))
    if chunk_size is not None and (
        isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1
    ):
        raise ValueError(f"chunk_size must be a positive int or None, got {chunk_size!r}")
    if weight_grad_dtype is not None and weight_grad_dtype not in (
        torch.float16, torch.bfloat16, torch.float32, torch.float64
    ):
        raise ValueError(
            f"weight_grad_dtype must be a float dtype or None, got {weight_grad_dtype}"
        )
    eps_filter = _check_finite_number("grad_filter_eps", grad_filter_eps, min_value=0.0)
    if backend not in _BACKENDS:
        raise ValueError(f"backend must be one of {_BACKENDS}, got {backend!r}")
    try:
        w = prepare_weight(class_weight, V, hidden)
    except (TypeError, ValueError) as err:
        raise type(err)(str(err).replace("weight", "class_weight", 1)) from None

    from crossent.backends.torch_ops.linear import LinearCrossEntropyFunction, softmax_chunk

    lead = tuple(hidden.shape[:-1])
    h2 = hidden.reshape(-1, D)
    if prob_target:
        # Never a copy of the N x V target: a (N, V) view when the leading dims flatten to one,
        # else the (..., V) tensor itself, whose rows the chunk loop gathers per chunk. The
        # cast to the accumulation dtype happens per block, too.
        t1 = target.detach()
        if t1.ndim != 2:
            with contextlib.suppress(RuntimeError):
                t1 = t1.view(-1, V)
    else:
        t1 = target.reshape(-1).long()
    if backend == "triton":
        from crossent.backends.triton.linear import try_triton_linear_cross_entropy

        out = try_triton_linear_cross_entropy(
            h2, weight, bias, t1, w, opts, reduction, chunk_size, weight_grad_dtype,
            required=True, filter_eps=eps_filter,
        )
        if out is not None:
            return out.reshape(lead) if reduction == "none" else out
    stats = None
    if return_aux:
        stats = torch.zeros((h2.shape[0], 3), dtype=acc_dtype(compute_dtype or h2.dtype), device=h2.device)
    with torch.autocast(dev_type, enabled=False):
        loss: Tensor = LinearCrossEntropyFunction.apply(
            h2, weight, bias, t1, w, opts, reduction, chunk_size, weight_grad_dtype,
            softmax_chunk, None, compute_dtype, stats,
        )
    loss = loss.reshape(lead) if reduction == "none" else loss
    if stats is None:
        return loss
    flat = t1 if not prob_target else t1.reshape(-1, V)
    return loss, _softmax_aux(stats, flat, w, None, opts, 0.0, reduction, "weight", lead)
