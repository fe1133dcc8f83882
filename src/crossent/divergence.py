r"""Entropy and KL divergence of categorical distributions, with :func:`cross_entropy`'s conventions.

For a target distribution :math:`t` and a prediction :math:`q = \mathrm{softmax}(z)` over
:math:`C` classes,

.. math::

    H(t) = -\sum_k t_k \log t_k, \qquad
    \mathrm{KL}(t \,\|\, q) = \sum_k t_k (\log t_k - \log q_k), \qquad
    \mathrm{CE}(t, q) = -\sum_k t_k \log q_k = \mathrm{KL}(t \,\|\, q) + H(t),

with :math:`0 \log 0 = 0`. The last identity is what makes these two functions the
vocabulary of the calibration literature: label smoothing is cross-entropy against the
mixture :math:`(1-\varepsilon)\,\mathrm{onehot}(y) + \varepsilon/C`, the confidence penalty
(Pereyra et al. 2017) is :math:`\mathrm{CE} - \beta H(q)`, and focal loss upper-bounds it
with :math:`\beta = \gamma` (Mukhoti et al. 2020, *Calibrating Deep Neural Networks using
Focal Loss*): :math:`\mathrm{FL}_\gamma \ge \mathrm{CE} - \gamma H(q)`.

Both functions take logits by default (``input_is_logits=True``; log-probabilities are
logits too, since ``log_softmax`` leaves them unchanged) or probabilities
(``input_is_logits=False``), are computed from ``log_softmax`` (no ``log`` of a rounded
softmax), are differentiable in every argument, and accept any batch shape with the class
dimension at ``class_dim`` (default 1, as :func:`torch.nn.functional.cross_entropy`).
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor

__all__ = ["entropy", "kl_divergence"]

Reduction = Literal["none", "sum", "mean"]


def _check_common(x: Tensor, name: str, class_dim: int, reduction: str) -> int:
    if not isinstance(x, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got {x.dtype}")
    if x.ndim == 0:
        raise ValueError(f"{name} must have a class dimension, got a 0-d tensor")
    if reduction not in ("none", "sum", "mean"):
        raise ValueError(f"reduction must be 'none', 'sum' or 'mean', got {reduction!r}")
    if x.ndim == 1:
        return 0  # a single distribution (C,), as cross_entropy's unbatched input
    if not -x.ndim <= class_dim < x.ndim:
        raise ValueError(
            f"class_dim={class_dim} is out of range for {name} of shape {tuple(x.shape)}"
        )
    return class_dim % x.ndim


def _log_probs(x: Tensor, dim: int, is_logits: bool) -> Tensor:
    # log_softmax subtracts the maximum before exponentiating: no overflow, and log q_k is
    # exact even where q_k underflows to 0 in floating point.
    return torch.log_softmax(x, dim=dim) if is_logits else torch.log(x)


def _plogp(p: Tensor, log_p: Tensor) -> Tensor:
    """:math:`p \\log p` with :math:`0 \\log 0 = 0`, and a finite (zero) gradient there."""
    return p * log_p.masked_fill(p == 0, 0.0)


def _reduce(per_sample: Tensor, reduction: str, valid: Tensor | None = None) -> Tensor:
    if reduction == "none":
        return per_sample
    if reduction == "sum":
        return per_sample.sum()
    if valid is None:
        return per_sample.mean() if per_sample.numel() else per_sample.sum()
    count = valid.sum()
    return per_sample.sum() / count.clamp(min=1).to(per_sample.dtype)


def entropy(
    input: Tensor,
    *,
    input_is_logits: bool = True,
    class_dim: int = 1,
    reduction: Reduction = "mean",
) -> Tensor:
    r"""Shannon entropy (nats) of each categorical distribution, :math:`H(q) = -\sum_k q_k \log q_k`.

    Args:
        input: logits (default) or probabilities (``input_is_logits=False``), shape (C,),
            (N, C) or (N, C, d1, ..., dk), the classes at ``class_dim``.
        input_is_logits: ``True``: :math:`q = \mathrm{softmax}(\text{input})`, computed as
            :math:`-\sum_k q_k \log q_k` with :math:`\log q` from ``log_softmax``;
            ``False``: ``input`` holds probabilities (each row summing to 1, not checked).
        class_dim: the class dimension (default 1; -1 for (..., C)).
        reduction: ``"none"`` (one value per distribution, the input's shape without the
            class dim), ``"sum"`` or ``"mean"`` (over the distributions).

    :math:`0 \log 0 = 0`: a class of probability 0 (or logit ``-inf``) contributes nothing,
    with a zero gradient.

    >>> import torch
    >>> round(float(entropy(torch.zeros(4))), 6)  # uniform over 4 classes: log 4
    1.386294
    >>> entropy(torch.tensor([[1.0, 0.0]]), input_is_logits=False).item()
    0.0
    """
    dim = _check_common(input, "input", class_dim, reduction)
    log_q = _log_probs(input, dim, input_is_logits)
    q = log_q.exp() if input_is_logits else input
    return _reduce(-_plogp(q, log_q).sum(dim), reduction)


def kl_divergence(
    input: Tensor,
    target: Tensor,
    *,
    input_is_logits: bool = True,
    log_target: bool = False,
    class_dim: int = 1,
    ignore_index: int = -100,
    reduction: Reduction = "mean",
) -> Tensor:
    r"""KL divergence of the prediction from the target, :math:`\mathrm{KL}(t \,\|\, q)`, per sample.

    .. math::
        \mathrm{KL}(t \,\|\, q) = \sum_k t_k \log t_k - \sum_k t_k \log q_k
            = \mathrm{CE}(t, q) - H(t),

    summed over the classes; ``reduction="mean"`` averages over the samples (what
    :func:`torch.nn.functional.kl_div` calls ``"batchmean"``; its ``"mean"`` divides by the
    number of elements instead, which is not a KL divergence).

    Args:
        input: the prediction: logits (default) or probabilities (``input_is_logits=False``),
            shape (C,), (N, C) or (N, C, d1, ..., dk), the classes at ``class_dim``.
            ``F.kl_div``'s log-probability input is covered by the default: log-probabilities
            are valid logits.
        target: the reference distribution :math:`t`: probabilities of the input's shape
            (default), log-probabilities with ``log_target=True`` (as ``F.kl_div``), or class
            indices of the input's shape without the class dim (then :math:`t` is one-hot,
            :math:`H(t) = 0` and the KL divergence equals cross-entropy).
        input_is_logits: whether ``input`` holds logits (``True``) or probabilities.
        log_target: whether a floating-point ``target`` holds log-probabilities.
        class_dim: the class dimension (default 1; -1 for (..., C)).
        ignore_index: class-index targets equal to it contribute 0 and are left out of the
            mean (as :func:`cross_entropy`).
        reduction: ``"none"``, ``"sum"`` or ``"mean"`` (over the samples).

    Both arguments receive gradients (a distillation target usually comes detached).
    :math:`0 \log 0 = 0`: classes where the target is 0 contribute nothing, even where the
    prediction is 0 too.

    >>> import torch
    >>> kl_divergence(torch.zeros(1, 3), torch.full((1, 3), 1 / 3)).abs().item() < 1e-7
    True
    """
    dim = _check_common(input, "input", class_dim, reduction)
    if not isinstance(target, Tensor):
        raise TypeError(f"target must be a torch.Tensor, got {type(target).__name__}")
    log_q = _log_probs(input, dim, input_is_logits)
    if not target.is_floating_point():
        if target.dtype == torch.bool or target.is_complex():
            raise TypeError(f"target must hold class indices (int) or probabilities, got {target.dtype}")
        if log_target:
            raise ValueError("log_target=True needs a floating-point target, got class indices")
        expected = input.shape[:dim] + input.shape[dim + 1 :]
        if target.shape != expected:
            raise ValueError(
                f"class-index target must have shape {tuple(expected)} (the input's shape "
                f"without class_dim), got {tuple(target.shape)}"
            )
        valid = target != ignore_index
        n_classes = input.shape[dim]
        bad = valid & ((target < 0) | (target >= n_classes))
        if bool(bad.any()):
            raise ValueError(
                f"target holds class indices outside [0, {n_classes}) "
                f"(e.g. {int(target[bad][0])}); use ignore_index for samples to skip"
            )
        safe = target.masked_fill(~valid, 0).unsqueeze(dim)
        per_sample = -log_q.gather(dim, safe).squeeze(dim).masked_fill(~valid, 0.0)
        return _reduce(per_sample, reduction, valid)
    if target.shape != input.shape:
        raise ValueError(
            f"a probability target must have the input's shape {tuple(input.shape)}, "
            f"got {tuple(target.shape)}"
        )
    if log_target:
        log_t = target
        t = target.exp()
    else:
        t = target
        log_t = torch.log(target)
    # t log t - t log q, each product 0 where t = 0 (whatever log q is there)
    per_sample = (_plogp(t, log_t) - _plogp(t, log_q)).sum(dim)
    return _reduce(per_sample, reduction)
