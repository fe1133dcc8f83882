r"""Per-run metrics: accuracy family (here) and calibration (from :mod:`crossent.calibration`).

Calibration metrics, all on the test set, all from :mod:`crossent.calibration`:

- ``nll``: mean negative log-likelihood of the true class.
- ``brier``: multiclass Brier score :math:`\frac1n\sum_i \sum_k (q_{ik} - y_{ik})^2` (0..2).
- ``ece``: expected calibration error of the top-label confidence, 15 equal-width bins
  (Guo et al. 2017), :math:`\sum_b \frac{|B_b|}{n} |\mathrm{acc}(B_b) - \mathrm{conf}(B_b)|`.
- ``adaece``: the same with 15 equal-mass bins (adaptive ECE, Mukhoti et al. 2020).
- ``cw_ece``: classwise ECE, the mean over classes of the ECE of :math:`q_{\cdot k}`
  against :math:`[y = k]` (Kull et al. 2019).

Accuracy family, computed here (they are not calibration metrics):

- ``acc``: top-1 accuracy. ``balanced_acc``: mean per-class recall.
- ``macro_f1``: unweighted mean over classes of the per-class F1 (a class never predicted
  and absent has F1 0, as in scikit-learn with ``zero_division=0``).
- ``tail_recall``: mean recall over the tail classes, the :math:`\lfloor K/3 \rfloor`
  classes (at least one) with the fewest training examples.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

__all__ = [
    "ACCURACY_METRICS",
    "CALIBRATION_METRICS",
    "METRICS",
    "accuracy_metrics",
    "calibration_metrics",
    "softmax",
    "tail_classes",
]

ACCURACY_METRICS: tuple[str, ...] = ("acc", "balanced_acc", "macro_f1", "tail_recall")
CALIBRATION_METRICS: tuple[str, ...] = ("nll", "brier", "ece", "adaece", "cw_ece")
METRICS: tuple[str, ...] = (*ACCURACY_METRICS, *CALIBRATION_METRICS)


def softmax(logits: np.ndarray) -> np.ndarray:
    """Row-wise softmax in float64."""
    z = np.asarray(logits, dtype=np.float64)
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def tail_classes(train_counts: np.ndarray) -> np.ndarray:
    """The ``max(1, K // 3)`` classes with the fewest training examples (stable order)."""
    counts = np.asarray(train_counts)
    k = max(1, len(counts) // 3)
    order = np.argsort(counts, kind="stable")
    return np.sort(order[:k])


def accuracy_metrics(
    pred: np.ndarray, labels: np.ndarray, num_classes: int, train_counts: np.ndarray
) -> dict[str, float]:
    """Accuracy, balanced accuracy, macro-F1 and tail-class recall of hard predictions."""
    pred = np.asarray(pred)
    labels = np.asarray(labels)
    cm = np.zeros((num_classes, num_classes), dtype=np.int64)
    np.add.at(cm, (labels, pred), 1)
    tp = np.diag(cm).astype(np.float64)
    support = cm.sum(axis=1).astype(np.float64)
    predicted = cm.sum(axis=0).astype(np.float64)
    present = support > 0
    recall = np.divide(tp, support, out=np.zeros_like(tp), where=support > 0)
    precision = np.divide(tp, predicted, out=np.zeros_like(tp), where=predicted > 0)
    denom = precision + recall
    f1 = np.divide(2 * precision * recall, denom, out=np.zeros_like(tp), where=denom > 0)
    f1_classes = present | (predicted > 0)
    tail = tail_classes(train_counts)
    tail = tail[present[tail]]
    return {
        "acc": float(tp.sum() / max(len(labels), 1)),
        "balanced_acc": float(recall[present].mean()) if present.any() else float("nan"),
        "macro_f1": float(f1[f1_classes].mean()) if f1_classes.any() else float("nan"),
        "tail_recall": float(recall[tail].mean()) if len(tail) else float("nan"),
    }


def calibration_metrics(
    logits: np.ndarray, labels: np.ndarray, num_classes: int, *, n_bins: int = 15
) -> dict[str, float]:
    """NLL, Brier, ECE, AdaECE and classwise ECE from :mod:`crossent.calibration`."""
    from crossent import calibration as cal

    z = np.asarray(logits, dtype=np.float64)
    y = np.asarray(labels, dtype=np.int64)
    probs = softmax(z)
    out: dict[str, Any] = {
        "nll": cal.nll(z, y, from_logits=True),
        "brier": cal.brier(probs, y),
        "ece": cal.ece(probs, y, n_bins=n_bins, binning="width"),
        "adaece": cal.ece(probs, y, n_bins=n_bins, binning="mass"),
        "cw_ece": cal.classwise_ece(probs, y, num_classes=num_classes, n_bins=n_bins),
    }
    return {k: _to_float(v) for k, v in out.items()}


def _to_float(v: Any) -> float:
    if isinstance(v, torch.Tensor):
        return float(v.detach().cpu().double().item())
    return float(v)
