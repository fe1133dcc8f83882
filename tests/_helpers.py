"""Helpers shared by several test files (imported as ``_helpers``: pytest puts tests/ on the path)."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

import crossent
from crossent import reference as ref


def softmax_reference(
    x: torch.Tensor, t: torch.Tensor, grad_output: torch.Tensor | None = None, **kw: Any
) -> tuple[torch.Tensor, torch.Tensor]:
    """``crossent.reference.cross_entropy`` in float64 on torch inputs: ``(loss, grad)`` tensors.

    ``weight`` and ``grad_output`` are taken as float64 arrays, a probability target too
    (class indices as they are), and ``gamma=crossent.flsd53`` as the reference's schedule.
    """
    kw = dict(kw)
    if kw.get("weight") is not None:
        kw["weight"] = kw["weight"].double().numpy()
    if kw.get("gamma") is crossent.flsd53:
        kw["gamma"] = ref.flsd53
    go = None if grad_output is None else grad_output.double().numpy()
    t_np = t.double().numpy() if t.is_floating_point() else t.numpy()
    loss, grad = ref.cross_entropy(x.double().numpy(), t_np, grad_output=go, **kw)
    return torch.from_numpy(np.asarray(loss)), torch.from_numpy(grad)


def poly1_partners(label_smoothing: float, ignore_index: float) -> dict[str, dict[str, Any]]:
    """The options the sigmoid family's Poly-1 tests combine the Poly-1 term with, by name
    (``"w"`` and ``"pw"`` stand for the weight tensors a test draws)."""
    return {
        "gamma": dict(gamma_pos=2.0, gamma_neg=0.7),
        "alpha": dict(alpha=0.3),
        "clip": dict(clip=0.1),
        "smoothing": dict(label_smoothing=label_smoothing),
        "weights": dict(weight="w", pos_weight="pw"),
        "ignore_index": dict(ignore_index=ignore_index),
    }
