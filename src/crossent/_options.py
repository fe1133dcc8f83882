"""Options of the softmax family, shared by every code path (torch, Triton, linear, parallel)."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from typing import Literal

import torch

Reduction = Literal["none", "sum", "mean"]
Backend = Literal["auto", "native", "torch", "triton"]
GammaSchedule = Callable[[torch.Tensor], "torch.Tensor | float"]


@dataclass(frozen=True, eq=False)
class RowGamma:
    """A focal schedule already evaluated: one focusing parameter per row, (R,) in the
    accumulation dtype. The registered operator (:mod:`crossent._ops`) takes the schedule's
    values, not the callable; kernels read ``rows`` instead of calling a schedule."""

    rows: torch.Tensor

    def __call__(self, p: torch.Tensor) -> torch.Tensor:
        return self.rows


@dataclass(frozen=True)
class StepGamma:
    r"""A step schedule of the focusing parameter: ``below`` where the true-class probability
    :math:`p` is under ``threshold``, else ``above``,

    .. math:: \gamma(p) = \begin{cases} \text{below} & p < \text{threshold} \\
              \text{above} & \text{otherwise} \end{cases}

    Callable like any schedule (``StepGamma(0.2, 5.0, 3.0)(p)``); being a value rather than
    a function, the native kernel evaluates it per row inside its own pass, where any other
    schedule needs a first pass over the logits for :math:`p`. ``name`` is what reprs and
    error messages call it; ``doc``, when given, is the instance's own ``__doc__`` (what
    ``inspect.getdoc`` and the API docs show for a named schedule such as ``crossent.flsd53``).

    >>> import torch
    >>> StepGamma(0.2, 5.0, 3.0)(torch.tensor([0.1, 0.2, 0.9]))
    tensor([5., 3., 3.])
    """

    threshold: float
    below: float
    above: float
    name: str = field(default="", compare=False)
    doc: str = field(default="", compare=False, repr=False)

    def __post_init__(self) -> None:
        for what in ("threshold", "below", "above"):
            v = getattr(self, what)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
                raise ValueError(f"StepGamma {what} must be a finite number, got {v!r}")
            object.__setattr__(self, what, float(v))
        if self.below < 0 or self.above < 0:
            raise ValueError(f"StepGamma gammas must be >= 0, got below={self.below}, above={self.above}")
        if self.doc:
            object.__setattr__(self, "__doc__", self.doc)

    @property
    def __name__(self) -> str:
        return self.name or f"StepGamma({self.threshold}, {self.below}, {self.above})"

    def __call__(self, p: torch.Tensor) -> torch.Tensor:
        return torch.where(p < self.threshold, self.below, self.above).to(p.dtype)


@dataclass(frozen=True)
class SoftmaxOptions:
    """Validated hyper-parameters of the one softmax formulation (see :func:`crossent.cross_entropy`).

    ``gamma`` is a float or a schedule: a callable mapping the detached true-class
    probability of each sample to its focusing parameter.
    """

    ignore_index: int = -100
    label_smoothing: float = 0.0
    gamma: float | GammaSchedule = 0.0
    z_loss: float = 0.0
    softcap: float | None = None
    confidence_penalty: float = 0.0
    poly1: float = 0.0

    @property
    def focal(self) -> bool:
        """True when the focal factor (1 - q)^gamma is not identically 1."""
        return callable(self.gamma) or self.gamma != 0.0

    @property
    def regularised(self) -> bool:
        return bool(self.z_loss or self.confidence_penalty or self.poly1)

    def active(self) -> frozenset[str]:
        """The options in use: every field whose value is not its default (a focal schedule is
        ``"gamma_schedule"``). A field added to this class shows up here by itself, so a backend
        whose allow-list does not name it falls back instead of silently ignoring it."""
        return _active(self, {"gamma": "gamma_schedule"})


@dataclass(frozen=True)
class BinaryOptions:
    """Validated hyper-parameters of the one sigmoid (binary / multi-label) formulation.

    See :func:`crossent.binary_cross_entropy`. ``alpha`` is None when the class-balance factor is
    disabled (a negative ``alpha`` is normalised to None); ``ignore_index`` is None when no
    target value is masked. ``clip`` is the probability shift of the asymmetric loss (0 outside it).
    ``poly1`` is the weight of the Poly-1 term ``w * alpha_t * (1 - p_t)`` (Leng et al. 2022);
    ``detach_focal_weight`` treats the focal weight ``alpha_t * (1 - p_t)**gamma_t`` as a
    constant in the gradient (Ridnik et al. 2021's ``disable_torch_grad_focal_loss``).
    """

    label_smoothing: float = 0.0
    gamma_pos: float = 0.0
    gamma_neg: float = 0.0
    alpha: float | None = None
    clip: float = 0.0
    ignore_index: float | None = None
    poly1: float = 0.0
    detach_focal_weight: bool = False

    @property
    def focal(self) -> bool:
        """True when the focal factor (1 - p_t)^gamma_t is not identically 1."""
        return self.gamma_pos != 0.0 or self.gamma_neg != 0.0

    def active(self) -> frozenset[str]:
        """The options in use (fields whose value is not the default); see
        :meth:`SoftmaxOptions.active`."""
        return _active(self, {})


@dataclass(frozen=True)
class SoftmaxCall:
    """One validated call of the softmax family, as every backend's kernel receives it: the
    logits, the target (int64 indices or float probabilities), class weights in the
    accumulation dtype, the options, the reduction, whether to form the gradient, whether
    to write it into the logits, and an optional (R, 3) buffer for the per-row statistics of
    ``return_aux`` (:func:`crossent._formula.row_statistics`), filled in the same pass by the
    kernels of :data:`crossent._ops.AUX_BACKENDS`."""

    logits: torch.Tensor
    target: torch.Tensor
    weight: torch.Tensor | None
    opts: SoftmaxOptions
    reduction: Reduction
    need_grad: bool
    inplace_backward: bool = False
    stats: torch.Tensor | None = None


@dataclass(frozen=True)
class BinaryCall:
    """One validated call of the sigmoid family, as every backend's kernel receives it."""

    logits: torch.Tensor
    target: torch.Tensor
    weight: torch.Tensor | None
    pos_weight: torch.Tensor | None
    opts: BinaryOptions
    reduction: Reduction
    need_grad: bool


def _active(opts: SoftmaxOptions | BinaryOptions, callables: dict[str, str]) -> frozenset[str]:
    out = set()
    for f in fields(opts):
        value = getattr(opts, f.name)
        if f.name in callables and callable(value):
            out.add(callables[f.name])
        elif value != f.default:
            out.add(f.name)
    return frozenset(out)


def covers(capabilities: tuple[frozenset[str], ...], used: frozenset[str]) -> bool:
    """Whether a backend computes a call: its allow-list is a tuple of option sets, each of
    which the backend computes together, and the options in use must all lie in one of them."""
    return any(used <= allowed for allowed in capabilities)


#: Every option of the softmax family (the torch-op path computes all of them together).
SOFTMAX_ALL = frozenset(
    {f.name for f in fields(SoftmaxOptions)} | {"gamma_schedule", "weight"}
)
#: Every option of the sigmoid family.
BINARY_ALL = frozenset({f.name for f in fields(BinaryOptions)} | {"weight", "pos_weight"})
