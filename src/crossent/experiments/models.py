"""Models for ``crossent run``: a linear classifier and a 2-layer ReLU MLP (2 x 256)."""

from __future__ import annotations

from typing import Literal

from torch import nn

__all__ = ["ModelKind", "build_model"]

ModelKind = Literal["linear", "mlp"]


def build_model(
    kind: ModelKind,
    in_features: int,
    num_classes: int,
    *,
    hidden: int = 256,
    depth: int = 2,
) -> nn.Module:
    """A fresh model; its initialisation follows the current ``torch`` RNG state.

    ``"linear"``: multinomial logistic regression, ``Linear(d, K)``.
    ``"mlp"``: ``depth`` hidden layers of width ``hidden`` with ReLU, then ``Linear(h, K)``;
    the default 2 x 256 reaches 100% train accuracy on MNIST-1D within 60 epochs of Adam.
    """
    if in_features < 1 or num_classes < 2:
        raise ValueError(f"need in_features >= 1 and num_classes >= 2, got {in_features}, "
                         f"{num_classes}")
    if kind == "linear":
        return nn.Linear(in_features, num_classes)
    if kind == "mlp":
        if depth < 1 or hidden < 1:
            raise ValueError(f"need depth >= 1 and hidden >= 1, got {depth}, {hidden}")
        layers: list[nn.Module] = []
        width = in_features
        for _ in range(depth):
            layers += [nn.Linear(width, hidden), nn.ReLU()]
            width = hidden
        layers.append(nn.Linear(width, num_classes))
        return nn.Sequential(*layers)
    raise ValueError(f"unknown model {kind!r} (choose 'linear' or 'mlp')")
