r"""The fused kernels as registered PyTorch operators (``torch.library.custom_op``).

Each loss family is one operator, ``crossent::softmax_ce`` and ``crossent::binary_ce``, with a
fake (meta) implementation and a registered autograd formula. That makes a crossent loss look
like a built-in to everything that inspects PyTorch programs:

- ``torch.compile`` (``fullgraph=True`` included) traces the operator as one node and calls
  the native C kernel (CPU) or the Triton kernel (CUDA) inside the compiled graph;
- ``torch.export`` records it by name (``torch.ops.crossent.softmax_ce``);
- autograd sees an ordinary node: the version counter of every input is checked, and double
  backward goes through :func:`softmax_loss_graph` / :func:`binary_loss_graph` or raises.

The forward of each operator returns the loss and, when asked, the gradient of that loss w.r.t.
the logits, computed in the same pass (the fused design: one read of the logits, one write of
the gradient). The backward only multiplies that gradient by ``grad_output``. In eager mode it
does so in place on the saved buffer, so forward+backward holds one logits-sized buffer;
``ctx.applied`` keeps a second backward through the same graph exact (see
:func:`scale_saved_grad`).

The operators take only what a schema can carry: tensors, numbers, lists of numbers and strings.
The numeric options of a call travel as one list of floats (:func:`softmax_numbers`,
:func:`binary_numbers`) rather than as an argument each: on every call torch's custom-op
autograd re-reads the operator's schema once per argument (``fill_defaults`` in
``torch._library.utils``), a cost that grows as the square of their number (130 us a call with
the 19 arguments the softmax operator had, a fifth of the forward and backward of a 64 x 10
batch on a 2-core VM). A step schedule (:class:`crossent._options.StepGamma`, e.g. ``crossent.flsd53``)
enters as its three numbers when the backend evaluates it inside its own pass
(:data:`STEP_BACKENDS`); any other focal schedule (a Python callable) is evaluated before the
operator, on the true-class probabilities that ``crossent::true_class_prob`` computes (a first
read of the logits), and enters as a per-row ``gamma_rows`` tensor.
"""

from __future__ import annotations

import importlib
import itertools
import math
import weakref
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from crossent._formula import acc_dtype, reduce
from crossent._options import (
    BinaryCall,
    BinaryOptions,
    GammaSchedule,
    RowGamma,
    SoftmaxCall,
    SoftmaxOptions,
    StepGamma,
    covers,
)

__all__ = ["binary_ce", "scale_saved_grad", "softmax_ce", "true_class_prob"]

_REDUCTION_CODES = ("none", "sum", "mean")


def _compiling() -> bool:
    return torch.compiler.is_compiling()


def _traced(*tensors: Tensor) -> bool:
    """Whether these tensors are being traced (torch.compile, AOTAutograd, make_fx, export):
    there, data-dependent shortcuts and in-place tricks on saved buffers are not allowed."""
    from torch.fx.experimental.proxy_tensor import get_proxy_mode

    return (
        _compiling()
        or any(type(t) is not Tensor for t in tensors)
        or torch._guards.detect_fake_mode() is not None
        or get_proxy_mode() is not None
    )


# --------------------------------------------------------------------------------------------
# the backward: scale the saved gradient


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
        if grad.ndim > go.ndim:  # softmax: one grad_output per row, broadcast over classes
            go = go.unsqueeze(1 if grad.ndim >= 2 else 0) if go.ndim else go
        return grad * go
    if _traced(grad, grad_output):
        # Traced (torch.compile): a functional scale, one pass over the gradient (an in-place
        # scale of the saved buffer is no cheaper there: AOTAutograd clones a mutated saved
        # tensor), into a buffer of huge pages (see scaled_grad).
        return torch.ops.crossent.scaled_grad(grad, go)
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


@torch.library.custom_op("crossent::scaled_grad", mutates_args=())
def scaled_grad(grad: Tensor, factor: Tensor) -> Tensor:
    """``grad * factor`` (``factor`` 0-d) into a new buffer: on the CPU one of transparent huge
    pages, which a fresh logits-sized buffer needs (its 4 KiB page faults would cost as much as
    the multiply). The backward of a traced fused loss."""
    if grad.device.type == "cpu":
        from crossent.backends.torch_ops._memory import empty_hugepage

        out = empty_hugepage(*grad.shape, dtype=grad.dtype)
        return torch.mul(grad, factor.to(grad.dtype), out=out)
    return grad * factor.to(grad.dtype)


@scaled_grad.register_fake
def _(grad, factor):
    return torch.empty_like(grad, memory_format=torch.contiguous_format)


# --------------------------------------------------------------------------------------------
# softmax family


#: The numbers of a softmax-family call, in the order of the operator's ``numbers`` list
#: (:func:`softmax_numbers`); ``ignore_index`` is an argument of its own, an exact integer.
SOFTMAX_NUMBERS = ("label_smoothing", "gamma", "z_loss", "softcap", "confidence_penalty", "poly1",
                   "step_threshold", "step_below", "step_above")


def _none_as_nan(x: float | None) -> float:
    """An optional number in a list of floats: None as NaN (the options are validated finite)."""
    return math.nan if x is None else float(x)


def _nan_as_none(x: float) -> float | None:
    return None if math.isnan(x) else x


def softmax_numbers(opts: SoftmaxOptions, step: StepGamma | None) -> list[float]:
    """The ``numbers`` of :func:`softmax_ce` for ``opts`` (:data:`SOFTMAX_NUMBERS`): a focal
    schedule enters as ``gamma`` 0 (the rows' values come as ``gamma_rows``) or, as ``step``,
    its three numbers; a negative ``step_threshold`` is no step."""
    gamma = 0.0 if callable(opts.gamma) else float(opts.gamma)
    st = (-1.0, 0.0, 0.0) if step is None else (step.threshold, step.below, step.above)
    return [float(opts.label_smoothing), gamma, float(opts.z_loss), _none_as_nan(opts.softcap),
            float(opts.confidence_penalty), float(opts.poly1), *map(float, st)]


def _softmax_opts_of(ignore_index: int, numbers: list[float], gamma_rows: Tensor | None) -> SoftmaxOptions:
    """The options of a call from the operator's arguments (the inverse of :func:`softmax_numbers`)."""
    if len(numbers) != len(SOFTMAX_NUMBERS):
        raise ValueError(f"crossent::softmax_ce takes {len(SOFTMAX_NUMBERS)} numbers {SOFTMAX_NUMBERS},"
                         f" got {len(numbers)}")
    eps, gamma, z_loss, softcap, cp, poly1, st, sb, sa = numbers
    return _softmax_opts(ignore_index, eps, gamma, gamma_rows, z_loss, _nan_as_none(softcap), cp, poly1,
                         st, sb, sa)


def _softmax_opts(
    ignore_index: int, label_smoothing: float, gamma: float, gamma_rows: Tensor | None,
    z_loss: float, softcap: float | None, confidence_penalty: float, poly1: float,
    step_threshold: float = -1.0, step_below: float = 0.0, step_above: float = 0.0,
) -> SoftmaxOptions:
    g: float | GammaSchedule = gamma
    if gamma_rows is not None:
        g = RowGamma(gamma_rows)
    elif step_threshold >= 0:
        g = StepGamma(step_threshold, step_below, step_above)
    return SoftmaxOptions(
        ignore_index=ignore_index, label_smoothing=label_smoothing, gamma=g,
        z_loss=z_loss, softcap=softcap, confidence_penalty=confidence_penalty, poly1=poly1,
    )


#: The kernels that fill ``SoftmaxCall.stats`` (the per-row statistics of ``return_aux``); a
#: call that asks for them runs on the torch-op path otherwise.
AUX_BACKENDS = frozenset({"native", "torch", "triton"})
#: The backends whose kernels evaluate a step schedule (:class:`StepGamma`) per row in their own
#: pass; for the others the front door evaluates it first, like any schedule. (Should the native
#: kernel not take a call after all, the torch-op path evaluates the step as a schedule.)
STEP_BACKENDS = frozenset({"native"})


def evaluates_step(gamma: object, backend: str) -> bool:
    """Whether ``gamma`` enters the operator as a step (its three numbers) on ``backend``: a
    :class:`StepGamma` with a threshold >= 0 (the operator's "no step" is a negative one; a
    negative threshold, under which no probability falls, is evaluated as any schedule)."""
    return isinstance(gamma, StepGamma) and gamma.threshold >= 0 and backend in STEP_BACKENDS


def _softmax_backend(
    backend: str, logits: Tensor, target: Tensor, opts: SoftmaxOptions, weight: Tensor | None,
    aux: bool = False,
) -> str:
    """The kernel that runs, decided on the real tensors: a layout the native kernel does not
    take (which a traced graph can hand over), or statistics it does not compute, go to the
    torch-op path, with the same values."""
    from crossent.backends import native

    if aux and backend not in AUX_BACKENDS:
        return "torch"
    if backend == "native" and not native.supports_softmax(logits, target, opts, weight):
        return "torch"
    return backend


_KERNEL_MODULES = {
    "native": "crossent.backends.native",
    "triton": "crossent.backends.triton.{family}",
    "torch": "crossent.backends.torch_ops.{family}",
}


def _kernel(backend: str, family: str) -> Callable[..., tuple[Tensor, Tensor | None]]:
    """A backend's kernel of a family (``"softmax"`` or ``"binary"``), looked up at call time
    (tests count the calls by replacing a module's function)."""
    module = importlib.import_module(_KERNEL_MODULES[backend].format(family=family))
    return getattr(module, f"{family}_cross_entropy")


@torch.library.custom_op("crossent::softmax_ce", mutates_args=())
def softmax_ce(
    logits: Tensor,
    target: Tensor,
    weight: Tensor | None,
    gamma_rows: Tensor | None,
    ignore_index: int,
    numbers: list[float],
    reduction: str,
    need_grad: bool,
    backend: str,
    hold: bool = False,
    aux: bool = False,
) -> tuple[Tensor, Tensor, Tensor]:
    """The softmax family's loss, (``need_grad``) the gradient of that loss w.r.t. ``logits``
    and (``aux``) the per-row statistics of ``return_aux``.

    ``numbers`` are the numeric options (:data:`SOFTMAX_NUMBERS`, :func:`softmax_numbers`).
    ``backend`` is ``"native"``, ``"torch"`` or ``"triton"``; ``gamma_rows`` (R,) replaces the
    scalar ``gamma`` when given; a ``step_threshold`` >= 0 replaces it by the step schedule
    ``step_below`` where the row's true-class probability is under ``step_threshold``, else
    ``step_above`` (:class:`crossent._options.StepGamma`), evaluated by the kernel itself.
    The gradient is contiguous, of the logits' shape and dtype, with
    the mean's 1/denominator folded in; without ``need_grad`` it is an empty tensor. With
    ``hold`` (under torch.compile, with ``need_grad``) the second output is instead a
    one-element int64 handle to the gradient, held aside for :func:`held_grad`. The statistics
    are (R, 3) in the accumulation dtype (:func:`crossent._formula.row_statistics`: lse,
    entropy, argmax hit), computed in the same pass; an empty tensor without ``aux``.
    """
    opts = _softmax_opts_of(ignore_index, numbers, gamma_rows)
    chosen = _softmax_backend(backend, logits, target, opts, weight, aux)
    stats = stats_buffer(logits, aux)
    loss, grad = _kernel(chosen, "softmax")(
        SoftmaxCall(logits, target, weight, opts, reduction, need_grad,  # type: ignore[arg-type]
                    stats=stats if aux else None)
    )
    if grad is None:
        return loss, logits.new_empty(0), stats
    return (loss, _hold(grad.contiguous()) if hold else grad.contiguous(), stats)


def stats_buffer(logits: Tensor, aux: bool) -> Tensor:
    """The (R, 3) buffer of ``return_aux``'s row statistics in the accumulation dtype, or an
    empty tensor without ``aux`` (the operator's third output is then empty)."""
    return logits.new_empty((_rows(logits), 3) if aux else (0,), dtype=acc_dtype(logits.dtype))


def _rows(logits: Tensor) -> int:
    """R, the number of rows (samples times positions) of (C,), (N, C) or (N, C, d...) logits."""
    return 1 if logits.ndim == 1 else math.prod((logits.shape[0], *logits.shape[2:]))


def _softmax_loss_shape(logits: Tensor, reduction: str) -> tuple[int, ...]:
    if reduction != "none" or logits.ndim == 1:
        return ()
    return (logits.shape[0], *logits.shape[2:])


@softmax_ce.register_fake
def _(logits, target, weight, gamma_rows, ignore_index, numbers, reduction, need_grad, backend, hold=False,
      aux=False):
    acc = acc_dtype(logits.dtype)
    loss = logits.new_empty(_softmax_loss_shape(logits, reduction), dtype=acc)
    stats = stats_buffer(logits, aux)
    if hold and need_grad:
        return loss, torch.empty(1, dtype=torch.int64), stats
    return loss, logits.new_empty(logits.shape if need_grad else (0,)), stats


def _softmax_setup(ctx: Any, inputs: tuple[Any, ...], output: tuple[Tensor, Tensor, Tensor]) -> None:
    (logits, target, weight, gamma_rows, ignore_index, numbers, reduction, need_grad, _backend,
     *rest) = inputs
    hold = rest[:1]
    _, grad, stats = output
    ctx.mark_non_differentiable(grad, stats)
    ctx.set_materialize_grads(False)  # no zero-filled N x C "gradient" of the grad output
    ctx.need_grad = need_grad
    ctx.held = bool(hold and hold[0] and need_grad)  # grad is then the handle
    ctx.reduction = reduction
    ctx.opts = _softmax_opts_of(ignore_index, numbers, gamma_rows)
    # The logits are kept (not copied) for a double backward, which recomputes q from them.
    ctx.save_for_backward(grad, logits, target, weight)


# --------------------------------------------------------------------------------------------
# torch.compile: the gradient held aside instead of saved
#
# A traced backward cannot scale the saved gradient in place (AOTAutograd clones a mutated saved
# tensor) and so pays one more pass over it; with a scalar grad_output of 1, the usual
# loss.backward(), that pass is a third of the loss's time. So under torch.compile the fused
# forward hands the gradient to a side table and returns a one-element handle; the backward
# operator takes the gradient out of the table (it is then nobody else's: scaled in place, and
# stolen by AccumulateGrad without a copy). Neither operator returns an alias of its inputs. The
# table entry goes when the handle does (a forward without a backward leaks nothing).

_HELD: dict[int, Tensor] = {}
_KEYS = itertools.count(1)


def _hold(grad: Tensor) -> Tensor:
    key = next(_KEYS)
    _HELD[key] = grad
    handle = torch.tensor([key], dtype=torch.int64)
    weakref.finalize(handle, _HELD.pop, key, None)
    return handle


@torch.library.custom_op("crossent::held_grad", mutates_args=())
def held_grad(handle: Tensor, factor: Tensor, like: Tensor) -> Tensor:
    """The gradient that :func:`softmax_ce` with ``hold`` set aside, times ``factor`` (0-d, or one per
    sample for reduction "none"), in place: it is this call's alone."""
    grad = _HELD.pop(int(handle[0]), None)
    if grad is None:
        raise RuntimeError(
            "crossent: under torch.compile the fused loss's gradient is handed over at the first "
            "backward; a second backward through the same graph (retain_graph=True) needs the "
            "loss recomputed, or the loss outside the compiled region"
        )
    f = factor.to(grad.dtype)
    if f.ndim:
        return grad.mul_(f.unsqueeze(1) if grad.ndim >= 2 else f)
    if factor.device.type != "cpu" or f.item() != 1.0:
        grad.mul_(f)
    return grad


@held_grad.register_fake
def _(handle, factor, like):
    return torch.empty_like(like, memory_format=torch.contiguous_format)


def _fused_backward(
    ctx: Any, grad_loss: Tensor | None, graph: Callable[[], Tensor], saved: tuple[Tensor, Tensor],
    n_inputs: int,
) -> tuple[Any, ...]:
    """The backward of a fused operator: the saved gradient times ``grad_output``, or, for a
    double backward (``create_graph=True``), the gradient of the composite ``graph()``."""
    grad, logits = saved
    nones = (None,) * (n_inputs - 1)
    if grad_loss is None:  # an undefined grad_output is a zero one
        return (None, *nones)
    if not ctx.need_grad:
        raise RuntimeError(
            "crossent: this loss was computed without its gradient (grad mode was off, or the "
            "logits did not require grad when it was called); recompute it with grad enabled"
        )
    if torch.is_grad_enabled() and (logits.requires_grad or grad_loss.requires_grad):
        # create_graph=True: a gradient that is itself differentiable (Hessians, gradient
        # penalties, torch.func.hessian).
        with torch.enable_grad():
            loss = graph()
            return (graph_grad(loss, logits, grad_loss.to(loss.dtype)), *nones)
    if getattr(ctx, "held", False):  # grad is the handle of a gradient held aside
        return (torch.ops.crossent.held_grad(grad, grad_loss, logits), *nones)
    if ctx.reduction == "none" and grad.ndim == grad_loss.ndim:
        # a grad_output per element (sigmoid family): a new buffer keeps the saved one intact
        return (grad * grad_loss.to(grad.dtype), *nones)
    return (scale_saved_grad(ctx, grad, grad_loss), *nones)


def _softmax_backward(
    ctx: Any, grad_loss: Tensor, _grad_grad: Tensor | None, _grad_stats: Tensor | None
) -> tuple[Any, ...]:
    grad, logits, target, weight = ctx.saved_tensors
    return _fused_backward(
        ctx, grad_loss,
        lambda: softmax_loss_graph(logits, target, weight, ctx.opts, ctx.reduction),
        (grad, logits), 11,
    )


softmax_ce.register_autograd(_softmax_backward, setup_context=_softmax_setup)


def composite_unsupported(opts: SoftmaxOptions) -> str | None:
    """The first option (if any) that :func:`softmax_loss_graph` does not compute."""
    if opts.focal:
        return "gamma (focal loss)"
    if opts.softcap is not None:
        return "softcap"
    if opts.confidence_penalty:
        return "confidence_penalty"
    if opts.poly1:
        return "poly1"
    return None


def _higher_order_error(what: str, bad: str) -> RuntimeError:
    return RuntimeError(
        f"crossent: {what} is implemented for cross-entropy with label_smoothing, weight, "
        f"ignore_index and z_loss (and for the sigmoid family without gamma and clip); this loss "
        f"uses {bad}. Drop that option, or compute this loss with torch.nn.functional ops."
    )


def softmax_loss_graph(
    logits: Tensor, target: Tensor, weight: Tensor | None, opts: SoftmaxOptions, reduction: str
) -> Tensor:
    r"""The softmax-family loss as differentiable torch ops, for what the fused kernel's
    saved gradient cannot give: a double backward (``create_graph=True``, Hessians, gradient
    penalties) and the ``torch.func`` transforms.

    With the weighted smoothed target mass :math:`a_k = w_k \tilde t_k` of a row (0 for an
    ignored row), the sample weight :math:`s` and :math:`\lambda_z` the z-loss weight:

    .. math:: L = \sum_k a_k (\operatorname{lse}(z) - z_k) + \lambda_z s \operatorname{lse}(z)^2

    Its gradient :math:`A q - a + 2 \lambda_z s\, \mathrm{lse}\, q` (:math:`A = \sum_k a_k`)
    is the fused kernel's; autograd differentiates it once more through ``logsumexp``, which
    gives the softmax Hessian :math:`\operatorname{diag}(q) - q q^\top` times
    :math:`A + 2 \lambda_z s\,\mathrm{lse}`, plus :math:`2 \lambda_z s\, q q^\top`. Focal,
    softcap, the confidence penalty and Poly-1 raise (see :func:`composite_unsupported`).
    """
    bad = composite_unsupported(opts)
    if bad is not None:
        raise _higher_order_error("a second derivative (or a torch.func transform)", bad)
    acc = acc_dtype(logits.dtype)
    squeeze = logits.ndim == 1
    z = logits.unsqueeze(0) if squeeze else logits
    C = z.shape[1]
    zr = z.movedim(1, -1).reshape(-1, C).to(acc)  # rows (R, C)
    eps = float(opts.label_smoothing)
    wvec = weight.to(acc) if weight is not None else torch.ones(C, dtype=acc, device=z.device)
    if target.is_floating_point():
        t = (target.unsqueeze(0) if squeeze else target).movedim(1, -1).reshape(-1, C).to(acc)
        t = t * (1.0 - eps) + eps / C
        s = torch.ones(zr.shape[0], dtype=acc, device=z.device)
        denom = torch.tensor(float(zr.shape[0]), dtype=acc, device=z.device)
    else:
        y = target.reshape(-1)
        valid = y != opts.ignore_index
        y_safe = torch.where(valid, y, 0)
        t = torch.nn.functional.one_hot(y_safe, C).to(acc) * (1.0 - eps) + eps / C
        t = t * valid.unsqueeze(1)
        s = wvec[y_safe] * valid
        denom = s.sum()
    a = t * wvec
    lse = torch.logsumexp(zr, dim=1)
    rows = a.sum(dim=1) * lse - (a * zr).sum(dim=1)
    if opts.z_loss:
        rows = rows + opts.z_loss * s * lse.square()
    if reduction == "none":
        rows = rows.reshape(()) if squeeze else rows.reshape(z.shape[0], *z.shape[2:])
    return reduce(rows, reduction, lambda: denom)


def graph_grad(loss_graph: Tensor, logits: Tensor, grad_loss: Tensor) -> Tensor:
    """The gradient of ``loss_graph`` w.r.t. ``logits``, itself differentiable (a double
    backward's first derivative)."""
    (g,) = torch.autograd.grad(loss_graph, logits, grad_outputs=grad_loss, create_graph=True)
    return g


# --------------------------------------------------------------------------------------------
# the statistics a focal schedule needs


@torch.library.custom_op("crossent::true_class_prob", mutates_args=())
def true_class_prob(
    logits: Tensor, target: Tensor, ignore_index: int, softcap: float | None, backend: str
) -> Tensor:
    r"""Per row, the probability that a focal schedule is evaluated at: :math:`q_y` for class
    indices (1 at ignored rows), :math:`\sum_k t_k q_k` for probabilities; (R,) in the
    accumulation dtype, where R is the number of rows (samples times positions)."""
    from crossent.backends import native

    opts = SoftmaxOptions(ignore_index=ignore_index, softcap=softcap)
    if backend == "native" and native.supports_softmax(logits, target, opts):
        return native.true_class_prob(logits, target, opts)
    acc = acc_dtype(logits.dtype)
    z = logits.unsqueeze(0) if logits.ndim == 1 else logits
    C = z.shape[1]
    u = z.movedim(1, -1).reshape(-1, C).to(acc)
    if softcap is not None:
        u = torch.tanh(u / softcap) * softcap
    lse = torch.logsumexp(u, dim=1, keepdim=True)
    if target.is_floating_point():
        t = (target.unsqueeze(0) if logits.ndim == 1 else target).movedim(1, -1).reshape(-1, C)
        return (torch.exp(u - lse) * t.to(acc)).sum(dim=1)
    y = target.reshape(-1, 1)
    ignored = y == ignore_index
    p = torch.exp(u.gather(1, torch.where(ignored, 0, y)) - lse)
    return torch.where(ignored, 1.0, p).reshape(-1)  # 1 at ignored rows, as the native pass


@true_class_prob.register_fake
def _(logits, target, ignore_index, softcap, backend):
    rows = 1 if logits.ndim == 1 else math.prod((logits.shape[0], *logits.shape[2:]))
    return logits.new_empty((rows,), dtype=acc_dtype(logits.dtype))


# --------------------------------------------------------------------------------------------
# sigmoid family


#: The numbers of a sigmoid-family call, in the order of the operator's ``numbers`` list
#: (:func:`binary_numbers`; ``alpha`` and ``ignore_index`` None as NaN).
BINARY_NUMBERS = ("label_smoothing", "gamma_pos", "gamma_neg", "alpha", "clip", "ignore_index", "poly1")


def binary_numbers(opts: BinaryOptions) -> list[float]:
    """The ``numbers`` of :func:`binary_ce` for ``opts`` (:data:`BINARY_NUMBERS`)."""
    return [float(opts.label_smoothing), float(opts.gamma_pos), float(opts.gamma_neg),
            _none_as_nan(opts.alpha), float(opts.clip), _none_as_nan(opts.ignore_index), float(opts.poly1)]


def _binary_opts_of(numbers: list[float], detach_focal_weight: bool) -> BinaryOptions:
    """The options of a call from the operator's arguments (the inverse of :func:`binary_numbers`)."""
    if len(numbers) != len(BINARY_NUMBERS):
        raise ValueError(f"crossent::binary_ce takes {len(BINARY_NUMBERS)} numbers {BINARY_NUMBERS},"
                         f" got {len(numbers)}")
    eps, gamma_pos, gamma_neg, alpha, clip, ignore_index, poly1 = numbers
    return _binary_opts(eps, gamma_pos, gamma_neg, _nan_as_none(alpha), clip, _nan_as_none(ignore_index),
                        poly1, detach_focal_weight)


def _binary_opts(
    label_smoothing: float, gamma_pos: float, gamma_neg: float, alpha: float | None, clip: float,
    ignore_index: float | None, poly1: float, detach_focal_weight: bool,
) -> BinaryOptions:
    return BinaryOptions(label_smoothing=label_smoothing, gamma_pos=gamma_pos, gamma_neg=gamma_neg,
                         alpha=alpha, clip=clip, ignore_index=ignore_index, poly1=poly1,
                         detach_focal_weight=detach_focal_weight)


def _binary_kernel(backend: str, logits: Tensor, target: Tensor, weight: Tensor | None,
                   pos_weight: Tensor | None, opts: BinaryOptions):
    from crossent.backends import native
    from crossent.backends import triton as _triton

    if backend == "native" and native.supports_binary(logits, target, weight, pos_weight, opts):
        return _kernel("native", "binary")
    used = opts.active() | {n for n, t in (("weight", weight), ("pos_weight", pos_weight)) if t is not None}
    if backend == "triton" and covers(_triton.BINARY_CAPABILITIES, used):
        return _kernel("triton", "binary")
    return _kernel("torch", "binary")


@torch.library.custom_op("crossent::binary_ce", mutates_args=())
def binary_ce(
    logits: Tensor,
    target: Tensor,
    weight: Tensor | None,
    pos_weight: Tensor | None,
    numbers: list[float],
    reduction: str,
    need_grad: bool,
    backend: str,
    detach_focal_weight: bool = False,
) -> tuple[Tensor, Tensor]:
    """The sigmoid family's loss and (``need_grad``) its gradient w.r.t. ``logits``; see
    :func:`crossent.binary_cross_entropy`. Contract as :func:`softmax_ce`; ``numbers`` are the
    numeric options (:data:`BINARY_NUMBERS`, :func:`binary_numbers`). A kernel whose allow-list
    does not name an option in use is not called (the torch-op path computes every option)."""
    opts = _binary_opts_of(numbers, detach_focal_weight)
    kernel = _binary_kernel(backend, logits, target, weight, pos_weight, opts)
    loss, grad = kernel(
        BinaryCall(logits, target, weight, pos_weight, opts, reduction, need_grad)  # type: ignore[arg-type]
    )
    if grad is None:
        return loss, logits.new_empty(0)
    return loss, grad.contiguous()


@binary_ce.register_fake
def _(logits, target, weight, pos_weight, numbers, reduction, need_grad, backend, detach_focal_weight=False):
    shape = tuple(logits.shape) if reduction == "none" else ()
    loss = logits.new_empty(shape, dtype=acc_dtype(logits.dtype))
    return loss, logits.new_empty(logits.shape if need_grad else (0,))


def _binary_setup(ctx: Any, inputs: tuple[Any, ...], output: tuple[Tensor, Tensor]) -> None:
    (logits, target, weight, pos_weight, numbers, reduction, need_grad, _backend,
     detach_focal_weight) = inputs
    ctx.mark_non_differentiable(output[1])
    ctx.set_materialize_grads(False)  # no zero-filled "gradient" of the grad output
    ctx.need_grad = need_grad
    ctx.reduction = reduction
    ctx.opts = _binary_opts_of(numbers, detach_focal_weight)
    ctx.save_for_backward(output[1], logits, target, weight, pos_weight)


def _binary_backward(ctx: Any, grad_loss: Tensor, _grad_grad: Tensor | None) -> tuple[Any, ...]:
    grad, logits, target, weight, pos_weight = ctx.saved_tensors
    return _fused_backward(
        ctx, grad_loss,
        lambda: binary_loss_graph(logits, target, weight, pos_weight, ctx.opts, ctx.reduction),
        (grad, logits), 9,
    )


binary_ce.register_autograd(_binary_backward, setup_context=_binary_setup)


def binary_loss_graph(
    logits: Tensor, target: Tensor, weight: Tensor | None, pos_weight: Tensor | None,
    opts: BinaryOptions, reduction: str,
) -> Tensor:
    r"""The sigmoid-family loss as differentiable torch ops (see :func:`softmax_loss_graph`).
    Without the focal term and the clip, per element

    .. math:: L = w\,\alpha_t \bigl(w_+ t' \operatorname{softplus}(-x) + (1 - t')
              \operatorname{softplus}(x) + \epsilon_1 (1 - p_t)\bigr),
              \qquad 1 - p_t = t' \sigma(-x) + (1 - t') \sigma(x)

    (:math:`\epsilon_1` = ``poly1``, the Poly-1 term, computed exactly), whose second derivative
    autograd takes through ``softplus`` and ``sigmoid``. ``detach_focal_weight`` changes nothing
    without a focal term; gamma and clip raise.
    """
    if opts.focal or opts.clip:
        raise _higher_order_error(
            "a second derivative (or a torch.func transform)", "gamma" if opts.focal else "clip"
        )
    acc = acc_dtype(logits.dtype)
    x = logits.to(acc)
    t = target.to(acc)
    mask = None
    if opts.ignore_index is not None:
        mask = (target != opts.ignore_index).to(acc)
        t = t * mask
    eps = opts.label_smoothing
    t = t * (1.0 - eps) + eps / 2 if eps else t
    pw = pos_weight.to(acc) if pos_weight is not None else 1.0
    softplus = torch.nn.functional.softplus
    loss = pw * t * softplus(-x) + (1.0 - t) * softplus(x)
    if opts.poly1:  # Poly-1: + poly1 (1 - p_t), with p_m = p (no clip here)
        loss = loss + opts.poly1 * (t * torch.sigmoid(-x) + (1.0 - t) * torch.sigmoid(x))
    if opts.alpha is not None:
        loss = loss * (opts.alpha * t + (1.0 - opts.alpha) * (1.0 - t))
    if weight is not None:
        loss = loss * weight.to(acc)
    if mask is not None:
        loss = loss * mask
    return reduce(
        loss, reduction,
        lambda: mask.sum() if mask is not None else torch.tensor(float(x.numel()), dtype=acc),
    )
