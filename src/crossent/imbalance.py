"""Helpers for class imbalance: class-balanced weights and logit adjustment."""

from __future__ import annotations

from typing import Literal

import numpy as np
import torch

__all__ = ["class_weights", "logit_adjustment"]


def _counts_array(counts: torch.Tensor | np.ndarray | list[int] | list[float]) -> np.ndarray:
    arr = np.asarray(counts.detach().cpu() if isinstance(counts, torch.Tensor) else counts)
    if arr.ndim != 1 or arr.size == 0:
        raise ValueError(
            f"counts must be a non-empty 1-D sequence of per-class counts, got shape {arr.shape}"
        )
    if np.iscomplexobj(arr):
        raise TypeError(f"counts must be real numbers, got dtype {arr.dtype}")
    if not np.issubdtype(arr.dtype, np.number):
        raise TypeError(f"counts must be numeric, got dtype {arr.dtype}")
    arr = arr.astype(np.float64)
    if not np.all(np.isfinite(arr)) or np.any(arr < 0):
        raise ValueError("counts must be finite and >= 0")
    return arr


def class_weights(
    counts: torch.Tensor | np.ndarray | list[int] | list[float],
    *,
    method: Literal["effective_number", "inverse", "inverse_sqrt"] = "effective_number",
    beta: float = 0.999,
) -> torch.Tensor:
    r"""Per-class weights for a loss's ``weight=`` argument, normalised to sum to C.

    ``"effective_number"`` (Cui et al. 2019, *Class-Balanced Loss Based on Effective Number
    of Samples*): the effective number of samples of a class with :math:`n_c` examples is
    :math:`E_c = (1 - \beta^{n_c}) / (1 - \beta)`, and its weight is :math:`1 / E_c`.
    ``"inverse"`` uses :math:`1 / n_c`, ``"inverse_sqrt"`` :math:`1 / \sqrt{n_c}`.
    All are rescaled so that :math:`\sum_c w_c = C`.

    A class with a count of zero gets weight 0 (it has no examples to weigh; giving it an
    infinite weight would be meaningless), and the others are normalised to sum to C.

    Returns a float32 tensor of shape (C,).
    """
    n = _counts_array(counts)
    if method not in ("effective_number", "inverse", "inverse_sqrt"):
        raise ValueError(
            f"method must be 'effective_number', 'inverse' or 'inverse_sqrt', got {method!r}"
        )
    if method == "effective_number" and not (0.0 <= beta < 1.0):
        raise ValueError(f"beta must lie in [0, 1), got {beta}")
    present = n > 0
    if not present.any():
        raise ValueError("counts are all zero: at least one class needs examples")
    w = np.zeros_like(n)
    if method == "effective_number":
        # (1 - beta) / (1 - beta^n): -expm1(n log beta) keeps precision for beta -> 1.
        w[present] = (1.0 - beta) / -np.expm1(n[present] * np.log(beta)) if beta > 0 else 1.0
    elif method == "inverse":
        w[present] = 1.0 / n[present]
    else:
        w[present] = 1.0 / np.sqrt(n[present])
    w *= n.size / w.sum()
    return torch.as_tensor(w, dtype=torch.float32)


def logit_adjustment(
    counts: torch.Tensor | np.ndarray | list[int] | list[float], *, tau: float = 1.0
) -> torch.Tensor:
    r"""Log-prior offsets :math:`\tau \log \pi_c` (Menon et al. 2021, *Long-tail learning via
    logit adjustment*).

    Add them to the logits inside the loss during training (logit-adjusted loss), or subtract
    them from the logits at prediction time (post-hoc adjustment)::

        loss = crossent.cross_entropy(logits + crossent.logit_adjustment(counts), y)

    Classes with a count of zero get the prior of half an example (an offset that is very
    negative but finite), so no offset is ``-inf``.

    Returns a float32 tensor of shape (C,).
    """
    n = _counts_array(counts)
    if not np.isfinite(tau):
        raise ValueError(f"tau must be finite, got {tau}")
    if n.sum() <= 0:
        raise ValueError("counts are all zero: at least one class needs examples")
    prior = np.where(n > 0, n, 0.5) / n.sum()
    return torch.as_tensor(tau * np.log(prior), dtype=torch.float32)
