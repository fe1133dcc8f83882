"""Options of the softmax family, shared by every code path (torch, Triton, linear, parallel)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
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


@dataclass(frozen=True)
class BinaryOptions:
    """Validated hyper-parameters of the one sigmoid (binary / multi-label) formulation.

    See :func:`crossent.binary_cross_entropy`. ``alpha`` is None when the class-balance factor is
    disabled (a negative ``alpha`` is normalised to None); ``ignore_index`` is None when no
    target value is masked. ``clip`` is the probability shift of the asymmetric loss (0 outside it).
    """

    label_smoothing: float = 0.0
    gamma_pos: float = 0.0
    gamma_neg: float = 0.0
    alpha: float | None = None
    clip: float = 0.0
    ignore_index: float | None = None

    @property
    def focal(self) -> bool:
        """True when the focal factor (1 - p_t)^gamma_t is not identically 1."""
        return self.gamma_pos != 0.0 or self.gamma_neg != 0.0
