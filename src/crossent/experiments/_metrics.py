r"""Per-run metrics: accuracy family (here) and calibration (from :mod:`crossent.calibration`).

Calibration metrics, all on the test set, all from :mod:`crossent.calibration`:

- ``nll``: mean negative log-likelihood of the true class.
- ``brier``: multiclass Brier score :math:`\frac1n\sum_i \sum_k (q_{ik} - y_{ik})^2` (0..2).
- ``ece``: expected calibration error of the top-label confidence, ``n_bins`` equal-width
  bins (15 unless ``--n-bins`` says otherwise; Guo et al. 2017),
  :math:`\sum_b \frac{|B_b|}{n} |\mathrm{acc}(B_b) - \mathrm{conf}(B_b)|`.
- ``adaece``: the same with ``n_bins`` equal-mass bins (adaptive ECE, Mukhoti et al. 2020).
- ``cw_ece``: classwise ECE, the mean over classes of the ECE of :math:`q_{\cdot k}`
  against :math:`[y = k]` (Kull et al. 2019).

Accuracy family, computed here (they are not calibration metrics):

- ``acc``: top-1 accuracy. ``balanced_acc``: mean per-class recall.
- ``macro_f1``: unweighted mean over classes of the per-class F1 (a class never predicted
  and absent has F1 0, as in scikit-learn with ``zero_division=0``).
- ``tail_recall``: mean recall over the tail classes, the :math:`\lfloor K/3 \rfloor`
  classes (at least one) with the fewest training examples.

Uncertainty over test points (:func:`bootstrap_sd`): the standard deviation of a metric
over bootstrap resamples of the test set (Efron 1979), vectorised over the resamples.

The theory (:func:`focal_bound`, :func:`mean_entropy`): the mean entropy of the predictions,
and for a focal model the per-sample check of :math:`\mathrm{FL}_\gamma \ge \mathrm{CE} -
\gamma H(q)` (Mukhoti et al. 2020) on its own test logits.
"""

from __future__ import annotations

import warnings
from typing import Any

import numpy as np
import torch

__all__ = [
    "ACCURACY_METRICS",
    "CALIBRATION_METRICS",
    "METRICS",
    "accuracy_metrics",
    "bootstrap_sd",
    "calibration_metrics",
    "focal_bound",
    "mean_entropy",
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


#: Metrics that :func:`bootstrap_sd` resamples.
BOOTSTRAP_METRICS: tuple[str, ...] = ("acc", "balanced_acc", "tail_recall", "nll", "ece")


def bootstrap_sd(
    logits: np.ndarray,
    labels: np.ndarray,
    train_counts: np.ndarray,
    *,
    n_boot: int = 200,
    n_bins: int = 15,
    seed: int = 0,
) -> dict[str, float]:
    r"""Bootstrap standard deviation over test points of acc, balanced acc, tail recall, NLL, ECE.

    ``n_boot`` resamples of the test set with replacement (index matrix ``(n_boot, n)``); each
    metric is computed for all resamples at once with ``bincount`` over offset keys
    ``b * bins + bin``. ECE is the width-binned top-label ECE of :func:`calibration_metrics`.
    Classes absent from a resample are left out of its balanced accuracy and tail recall.
    """
    z = np.asarray(logits, dtype=np.float64)
    y = np.asarray(labels, dtype=np.int64)
    n, k = z.shape
    probs = softmax(z)
    conf = probs.max(axis=1)
    correct = (probs.argmax(axis=1) == y).astype(np.float64)
    log_q = z - z.max(axis=1, keepdims=True)
    log_q = log_q - np.log(np.exp(log_q).sum(axis=1, keepdims=True))
    nll = -log_q[np.arange(n), y]
    # bin b holds confidences in (b/B, (b+1)/B], as crossent.calibration.ece
    bins = np.clip(np.ceil(conf * n_bins).astype(np.int64) - 1, 0, n_bins - 1)
    idx = np.random.default_rng(seed).integers(0, n, size=(n_boot, n))
    rows = np.arange(n_boot)[:, None]

    def per_group(groups: np.ndarray, n_groups: int, weights: np.ndarray) -> np.ndarray:
        keys = (rows * n_groups + groups[idx]).ravel()
        return np.bincount(keys, weights=weights[idx].ravel(),
                           minlength=n_boot * n_groups).reshape(n_boot, n_groups)

    gap = np.abs(per_group(bins, n_bins, correct) - per_group(bins, n_bins, conf)).sum(1) / n
    support = per_group(y, k, np.ones(n))
    hits = per_group(y, k, correct)
    with np.errstate(invalid="ignore", divide="ignore"):
        recall = np.where(support > 0, hits / support, np.nan)
    tail = tail_classes(train_counts)
    with warnings.catch_warnings():  # a resample without any tail class: NaN, left out below
        warnings.simplefilter("ignore", RuntimeWarning)
        balanced = np.nanmean(recall, axis=1)
        tail_recall = np.nanmean(recall[:, tail], axis=1)
    out = {
        "acc": correct[idx].mean(axis=1),
        "balanced_acc": balanced,
        "tail_recall": tail_recall,
        "nll": nll[idx].mean(axis=1),
        "ece": gap,
    }
    return {m: float(np.nanstd(v, ddof=1)) for m, v in out.items()}


def mean_entropy(logits: np.ndarray) -> float:
    """Mean entropy (nats) of the predicted distributions, :func:`crossent.entropy`."""
    import crossent

    return float(crossent.entropy(torch.as_tensor(logits, dtype=torch.float64)))


def focal_bound(
    logits: np.ndarray, labels: np.ndarray, gamma: float | str
) -> dict[str, float]:
    r"""Check :math:`\mathrm{FL}_\gamma \ge \mathrm{CE} - \gamma H(q)` on every sample.

    Returns ``holds`` (the fraction of samples where it holds, up to a float64 rounding
    tolerance of :math:`10^{-9}(1 + \mathrm{CE})`), ``gap`` (the mean of
    :math:`\mathrm{FL} - (\mathrm{CE} - \gamma H)`, in nats) and ``gap_rel`` (the mean gap
    over the mean :math:`\gamma H`, the share of the entropy bonus that focal loss does not
    pay). ``gamma="flsd53"`` uses the per-sample :math:`\gamma` of FLSD-53.
    """
    import crossent

    z = torch.as_tensor(logits, dtype=torch.float64)
    y = torch.as_tensor(labels, dtype=torch.int64)
    if gamma == "flsd53":
        g = crossent.flsd53(torch.softmax(z, 1).gather(1, y[:, None]).squeeze(1))
        fl = crossent.focal_loss(z, y, gamma=crossent.flsd53, reduction="none")
    else:
        g = torch.full((len(y),), float(gamma), dtype=torch.float64)
        fl = crossent.focal_loss(z, y, gamma=float(gamma), reduction="none")
    ce = crossent.cross_entropy(z, y, reduction="none")
    gh = g * crossent.entropy(z, reduction="none")
    gap = fl - (ce - gh)
    holds = gap >= -1e-9 * (1 + ce)
    return {
        "holds": float(holds.double().mean()),
        "gap": float(gap.mean()),
        "gap_rel": float(gap.mean() / gh.mean()) if float(gh.mean()) > 0 else float("nan"),
    }
