"""Models for ``crossent run``: a linear classifier, a ReLU MLP (2 x 256) and a 1-D CNN.

The CNN is the convolutional baseline of the MNIST-1D benchmark (Greydanus 2020,
``mnist1d``'s ``ConvBase``): three ``Conv1d`` layers of 25 channels (kernel 5, 3, 3,
stride 2, padding 1) with ReLU, then a linear layer on the flattened feature map. On MNIST-1D
it reaches ~90% test accuracy in 40 epochs of Adam at lr 1e-2 (the benchmark reports ~94% after
longer training), against ~60% for the MLP: the deep model, trained to ~100% train accuracy,
whose overconfidence the calibration losses target.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import nn

__all__ = ["MODELS", "ConvNet1d", "ModelKind", "build_model", "default_lr"]

ModelKind = Literal["linear", "mlp", "cnn"]
MODELS: tuple[str, ...] = ("linear", "mlp", "cnn")


class ConvNet1d(nn.Module):
    """MNIST-1D's convolutional baseline on (N, L) signals; returns (N, num_classes) logits."""

    def __init__(self, length: int, num_classes: int, *, channels: int = 25) -> None:
        super().__init__()
        if length < 2:
            raise ValueError(f"the CNN needs signals of length >= 2, got {length}")
        out = length
        for k in (5, 3, 3):  # each Conv1d(k, stride 2, padding 1): L -> (L + 2 - k) // 2 + 1
            out = (out + 2 - k) // 2 + 1
        if out < 1:
            raise ValueError(f"signals of length {length} are too short for the CNN (need >= 3)")
        self.features = nn.Sequential(
            nn.Conv1d(1, channels, 5, stride=2, padding=1), nn.ReLU(),
            nn.Conv1d(channels, channels, 3, stride=2, padding=1), nn.ReLU(),
            nn.Conv1d(channels, channels, 3, stride=2, padding=1), nn.ReLU(),
            nn.Flatten(),
        )
        self.head = nn.Linear(channels * out, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x.unsqueeze(1)))


def default_lr(kind: str) -> float:
    """Adam's learning rate per model: 1e-2 for the CNN (MNIST-1D's baseline), else 1e-3."""
    return 1e-2 if kind == "cnn" else 1e-3


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
    ``"cnn"``: :class:`ConvNet1d`, the features read as one signal of length ``in_features``.
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
    if kind == "cnn":
        return ConvNet1d(in_features, num_classes)
    raise ValueError(f"unknown model {kind!r} (choose 'linear', 'mlp' or 'cnn')")
