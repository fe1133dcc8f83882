"""Thin ``torch.nn.Module`` wrappers around :mod:`crossent.functional`.

Each module stores its options and class weights (as a buffer, so ``.to(device)`` moves them)
and calls the functional form; see the functions for the math.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from crossent import functional as F
from crossent._formula import MeanBy
from crossent._options import Backend, GammaSchedule, Reduction

__all__ = [
    "AsymmetricLoss",
    "BCEWithLogitsLoss",
    "CrossEntropyLoss",
    "FocalLoss",
    "LinearCrossEntropyLoss",
    "SigmoidFocalLoss",
]


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
        class_dim: int = 1,
        reduction: Reduction = "mean",
        mean_denominator: MeanBy = "weight",
        z_loss_weighted: bool = True,
        inplace_backward: bool = False,
        backend: Backend = "auto",
    ) -> None:
        super().__init__()
        # Validate now, so a bad option fails at construction rather than at the first batch.
        F.check_reduction(reduction)
        F._check_mean_denominator(mean_denominator)
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
        self.class_dim = class_dim
        self.reduction = reduction
        self.mean_denominator = mean_denominator
        self.z_loss_weighted = z_loss_weighted
        self.inplace_backward = inplace_backward
        self.backend = backend

    def forward(self, logits: Tensor, target: Tensor, sample_weight: Tensor | None = None) -> Tensor:
        return F.cross_entropy(
            logits, target, weight=self.weight, ignore_index=self.ignore_index,
            label_smoothing=self.label_smoothing, gamma=self.gamma, z_loss=self.z_loss,
            softcap=self.softcap, confidence_penalty=self.confidence_penalty, poly1=self.poly1,
            sample_weight=sample_weight, class_dim=self.class_dim, reduction=self.reduction,
            mean_denominator=self.mean_denominator, z_loss_weighted=self.z_loss_weighted,
            inplace_backward=self.inplace_backward,
            backend=self.backend,
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

    def __init__(
        self, weight: Tensor | None = None, *, gamma: float | GammaSchedule = 2.0, **options: Any
    ) -> None:
        super().__init__(weight, gamma=gamma, **options)


class BCEWithLogitsLoss(torch.nn.Module):
    """Module form of :func:`crossent.binary_cross_entropy` (a drop-in for
    ``torch.nn.BCEWithLogitsLoss``, plus label smoothing, focal ``gamma``/``alpha``,
    ``ignore_index``, the Poly-1 term ``poly1`` and ``detach_focal_weight``). ``weight`` and
    ``pos_weight`` are buffers, so ``.to(device)`` moves them."""

    weight: Tensor | None
    pos_weight: Tensor | None

    def __init__(
        self,
        weight: Tensor | None = None,
        *,
        pos_weight: Tensor | None = None,
        label_smoothing: float = 0.0,
        gamma: float = 0.0,
        alpha: float | None = None,
        ignore_index: float | None = None,
        reduction: Reduction = "mean",
        backend: Backend = "auto",
        poly1: float = 0.0,
        detach_focal_weight: bool = False,
    ) -> None:
        super().__init__()
        # Validate now, so a bad option fails at construction rather than at the first batch.
        F.check_reduction(reduction)
        F.make_binary_options(
            label_smoothing=label_smoothing, gamma_pos=gamma, gamma_neg=gamma, alpha=alpha,
            clip=0.0, ignore_index=ignore_index, gamma_names=("gamma", "gamma"), poly1=poly1,
            detach_focal_weight=detach_focal_weight,
        )
        self.register_buffer("weight", None if weight is None else torch.as_tensor(weight))
        self.register_buffer(
            "pos_weight", None if pos_weight is None else torch.as_tensor(pos_weight)
        )
        self.label_smoothing = label_smoothing
        self.gamma = gamma
        self.alpha = alpha
        self.ignore_index = ignore_index
        self.reduction = reduction
        self.backend = backend
        self.poly1 = poly1
        self.detach_focal_weight = detach_focal_weight

    def forward(self, logits: Tensor, target: Tensor) -> Tensor:
        return F.binary_cross_entropy(
            logits, target, weight=self.weight, pos_weight=self.pos_weight,
            label_smoothing=self.label_smoothing, gamma=self.gamma, alpha=self.alpha,
            ignore_index=self.ignore_index, reduction=self.reduction, backend=self.backend,
            poly1=self.poly1, detach_focal_weight=self.detach_focal_weight,
        )

    def extra_repr(self) -> str:
        parts = [f"reduction={self.reduction!r}"]
        for name in ("label_smoothing", "gamma", "alpha", "ignore_index", "poly1",
                     "detach_focal_weight"):
            value = getattr(self, name)
            if value not in (0.0, None):
                parts.append(f"{name}={value!r}")
        return ", ".join(parts)


class SigmoidFocalLoss(BCEWithLogitsLoss):
    """Module form of :func:`crossent.sigmoid_focal_loss`: :class:`BCEWithLogitsLoss` with
    ``gamma=2`` and ``alpha=0.25``."""

    def __init__(
        self,
        weight: Tensor | None = None,
        *,
        alpha: float | None = 0.25,
        gamma: float = 2.0,
        **options: Any,
    ) -> None:
        super().__init__(weight, alpha=alpha, gamma=gamma, **options)


class AsymmetricLoss(torch.nn.Module):
    """Module form of :func:`crossent.asymmetric_loss` (Ridnik et al. 2021)."""

    weight: Tensor | None
    pos_weight: Tensor | None

    def __init__(
        self,
        weight: Tensor | None = None,
        *,
        gamma_pos: float = 0.0,
        gamma_neg: float = 4.0,
        clip: float = 0.05,
        pos_weight: Tensor | None = None,
        label_smoothing: float = 0.0,
        alpha: float | None = None,
        ignore_index: float | None = None,
        reduction: Reduction = "mean",
        backend: Backend = "auto",
        poly1: float = 0.0,
        detach_focal_weight: bool = False,
    ) -> None:
        super().__init__()
        F.check_reduction(reduction)
        F.make_binary_options(
            label_smoothing=label_smoothing, gamma_pos=gamma_pos, gamma_neg=gamma_neg,
            alpha=alpha, clip=clip, ignore_index=ignore_index, poly1=poly1,
            detach_focal_weight=detach_focal_weight,
        )
        self.register_buffer("weight", None if weight is None else torch.as_tensor(weight))
        self.register_buffer(
            "pos_weight", None if pos_weight is None else torch.as_tensor(pos_weight)
        )
        self.gamma_pos = gamma_pos
        self.gamma_neg = gamma_neg
        self.clip = clip
        self.label_smoothing = label_smoothing
        self.alpha = alpha
        self.ignore_index = ignore_index
        self.reduction = reduction
        self.backend = backend
        self.poly1 = poly1
        self.detach_focal_weight = detach_focal_weight

    def forward(self, logits: Tensor, target: Tensor) -> Tensor:
        return F.asymmetric_loss(
            logits, target, gamma_pos=self.gamma_pos, gamma_neg=self.gamma_neg, clip=self.clip,
            weight=self.weight, pos_weight=self.pos_weight, label_smoothing=self.label_smoothing,
            alpha=self.alpha, ignore_index=self.ignore_index, reduction=self.reduction,
            backend=self.backend, poly1=self.poly1, detach_focal_weight=self.detach_focal_weight,
        )

    def extra_repr(self) -> str:
        parts = [
            f"gamma_pos={self.gamma_pos!r}, gamma_neg={self.gamma_neg!r}, clip={self.clip!r}",
            f"reduction={self.reduction!r}",
        ]
        for name in ("label_smoothing", "alpha", "ignore_index", "poly1", "detach_focal_weight"):
            value = getattr(self, name)
            if value not in (0.0, None):
                parts.append(f"{name}={value!r}")
        return ", ".join(parts)


class LinearCrossEntropyLoss(torch.nn.Module):
    """Module form of :func:`crossent.linear_cross_entropy` (fused output head + loss).

    The module owns no parameters: the output projection stays in the model (e.g. its
    ``lm_head``, possibly tied to the input embedding) and is passed to ``forward``::

        loss_fn = crossent.nn.LinearCrossEntropyLoss(label_smoothing=0.1, z_loss=1e-4)
        loss = loss_fn(hidden, model.lm_head.weight, target, model.lm_head.bias)

    Class weights (``class_weight``) are a buffer, as in :class:`CrossEntropyLoss`.
    """

    class_weight: Tensor | None

    def __init__(
        self,
        class_weight: Tensor | None = None,
        *,
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
    ) -> None:
        super().__init__()
        F.check_reduction(reduction)
        F.make_softmax_options(
            ignore_index=ignore_index, label_smoothing=label_smoothing, gamma=gamma,
            z_loss=z_loss, softcap=softcap, confidence_penalty=confidence_penalty, poly1=poly1,
        )
        if chunk_size is not None and (
            isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1
        ):
            raise ValueError(f"chunk_size must be a positive int or None, got {chunk_size!r}")
        self.register_buffer(
            "class_weight", None if class_weight is None else torch.as_tensor(class_weight)
        )
        self.ignore_index = ignore_index
        self.label_smoothing = label_smoothing
        self.gamma = gamma
        self.z_loss = z_loss
        self.softcap = softcap
        self.confidence_penalty = confidence_penalty
        self.poly1 = poly1
        self.reduction = reduction
        self.chunk_size = chunk_size
        self.weight_grad_dtype = weight_grad_dtype
        self.backend = backend

    def forward(
        self, hidden: Tensor, weight: Tensor, target: Tensor, bias: Tensor | None = None
    ) -> Tensor:
        return F.linear_cross_entropy(
            hidden, weight, target, bias=bias, class_weight=self.class_weight,
            ignore_index=self.ignore_index, label_smoothing=self.label_smoothing,
            gamma=self.gamma, z_loss=self.z_loss, softcap=self.softcap,
            confidence_penalty=self.confidence_penalty, poly1=self.poly1,
            reduction=self.reduction, chunk_size=self.chunk_size,
            weight_grad_dtype=self.weight_grad_dtype, backend=self.backend,
        )

    def extra_repr(self) -> str:
        parts = [f"reduction={self.reduction!r}"]
        names = ("label_smoothing", "gamma", "z_loss", "softcap", "confidence_penalty", "poly1")
        for name in names:
            value = getattr(self, name)
            if value not in (0.0, None):
                parts.append(f"{name}={getattr(value, '__name__', value)!r}")
        if self.ignore_index != -100:
            parts.append(f"ignore_index={self.ignore_index}")
        if self.chunk_size is not None:
            parts.append(f"chunk_size={self.chunk_size}")
        return ", ".join(parts)
