"""Options of the softmax family, shared by every code path (torch, Triton, linear, parallel)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import torch

Reduction = Literal["none", "sum", "mean"]
Backend = Literal["auto", "torch", "triton"]
GammaSchedule = Callable[[torch.Tensor], "torch.Tensor | float"]


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
