"""Thin ``torch.nn.Module`` wrappers around :mod:`crossent.functional`.

Each module stores its options and class weights (as a buffer, so ``.to(device)`` moves them)
and calls the functional form; see the functions for the math.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from crossent import functional as F
from crossent._options import Backend, GammaSchedule, Reduction

__all__ = ["CrossEntropyLoss", "FocalLoss"]


class CrossEntropyLoss(torch.nn.Module):
    """Module form of :func:`crossent.cross_entropy` (a drop-in for ``torch.nn.CrossEntropyLoss``)."""

    weight: Tensor | None

    def __init__(
        self,
        weight: Tensor | None = None,
        *,
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
    ) -> None:
        super().__init__()
        # Validate now, so a bad option fails at construction rather than at the first batch.
        F.check_reduction(reduction)
        F.make_softmax_options(
            ignore_index=ignore_index, label_smoothing=label_smoothing, gamma=gamma,
            z_loss=z_loss, softcap=softcap, confidence_penalty=confidence_penalty, poly1=poly1,
        )
        self.register_buffer("weight", None if weight is None else torch.as_tensor(weight))
        self.ignore_index = ignore_index
        self.label_smoothing = label_smoothing
        self.gamma = gamma
        self.z_loss = z_loss
        self.softcap = softcap
        self.confidence_penalty = confidence_penalty
        self.poly1 = poly1
        self.reduction = reduction
        self.inplace_backward = inplace_backward
        self.backend = backend

    def forward(self, logits: Tensor, target: Tensor) -> Tensor:
        return F.cross_entropy(
            logits, target, weight=self.weight, ignore_index=self.ignore_index,
            label_smoothing=self.label_smoothing, gamma=self.gamma, z_loss=self.z_loss,
            softcap=self.softcap, confidence_penalty=self.confidence_penalty, poly1=self.poly1,
            reduction=self.reduction, inplace_backward=self.inplace_backward, backend=self.backend,
        )

    def extra_repr(self) -> str:
        parts = [f"reduction={self.reduction!r}"]
        for name in ("label_smoothing", "gamma", "z_loss", "softcap", "confidence_penalty", "poly1"):
            value = getattr(self, name)
            if value not in (0.0, None):
                parts.append(f"{name}={getattr(value, '__name__', value)!r}")
        if self.ignore_index != -100:
            parts.append(f"ignore_index={self.ignore_index}")
        return ", ".join(parts)


class FocalLoss(CrossEntropyLoss):
    """Module form of :func:`crossent.focal_loss`: :class:`CrossEntropyLoss` with ``gamma=2``."""

    def __init__(self, weight: Tensor | None = None, *, gamma: float | GammaSchedule = 2.0, **options: Any) -> None:
        super().__init__(weight, gamma=gamma, **options)
