r"""Calibration metrics with stated conventions.

All functions take ``probs`` of shape (N, C) -- a NumPy array or a torch tensor of any float
dtype, on any device -- and integer ``labels`` of shape (N,) (booleans for C = 2). Rows of
``probs`` must lie in [0, 1] and sum to one (within 1e-3; 1e-2 for half precision, and for
float32 or float64 values that are all a half type's: a half softmax widened with ``.float()``,
``.double()`` or ``.tolist()``); pass ``from_logits=True`` to give logits instead, which
are turned into probabilities with a stable softmax. Probabilities are used as given (never
renormalised). Ties in the arg-max go to the lowest class index.
Labels equal to ``ignore_index`` (when given) are left out, with their rows.

They also take binary input, ``probs`` (N,) or (N, 1) of the positive class with 0/1
``labels`` of that shape, and multi-label input, ``probs`` (N, L) with 0/1 ``labels`` (N, L),
pooled into N L binary problems (:func:`multilabel_ece` gives one ECE per label); with
``from_logits=True`` these are sigmoid logits, so (N, C) softmax logits with one-hot labels
are measured as multi-label: pass ``labels.argmax(1)``.

Conventions
-----------
*Top label.* With :math:`\hat p_i = \max_k p_{ik}` (the confidence) and
:math:`\hat y_i = \arg\max_k p_{ik}`, the correctness is :math:`a_i = [\hat y_i = y_i]`.
For binary and multi-label input :math:`\hat p_i = p_i`, the positive class's probability,
and :math:`a_i = y_i` (torchmetrics' ``BinaryCalibrationError``, scikit-learn's
``calibration_curve``); stack ``[1 - p, p]`` for the top label of a binary problem.

*Width bins* (``binning="width"``, Guo et al. 2017; Mukhoti et al. 2020): bin
:math:`m \in \{1, \dots, M\}` is :math:`B_m = \{i : \hat p_i \in ((m-1)/M,\ m/M]\}`; a
confidence of exactly 0 goes to the first bin, exactly 1 to the last. The edges are the
correctly rounded floats ``np.arange(M + 1) / M``.

*Mass bins* (``binning="mass"``, "AdaECE", Nguyen and O'Connor 2015; Mukhoti et al. 2020):
samples are sorted by confidence and the sorted position :math:`r` goes to bin
:math:`\lfloor r M / N \rfloor`, so bin sizes differ by at most one. Equal confidences may
straddle two bins; each of them then counts with the mean outcome of all the samples of that
confidence (equal to 12 decimals: sums in another order give one confidence to within a few
ulps), so the bins depend on the data alone, not on the order of the rows (nor on how a
streaming meter's ranks shard them). With fewer samples than bins some bins are empty.

*Empty bins* are skipped by every estimator. For a bin, ``confidence`` is the mean of
:math:`\hat p_i`, ``accuracy`` the mean of :math:`a_i` and ``gap = confidence - accuracy``
(positive means over-confident).

Every binned number comes from :func:`reliability_table`, so ECE, MCE, the plots and the CLI
agree to float64 round-off.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch

from crossent.calibration._inputs import (
    ArrayLike,
    _to_tensor,
    as_labels,
    as_matrix,
    binary_nll_terms,
    binary_shaped,
    check_bool,
    check_choice,
    check_ignore_index,
    check_int,
    check_real,
    drop_ignored,
    label_array,
    looks_like_binary_probs,
    looks_like_probs,
    select,
    warn_if_probs_as_logits,
    warn_if_unnormalised,
)
from crossent.calibration._rows import row_statistics, width_bin_index, width_edges

__all__ = [
    "ReliabilityTable",
    "accuracy",
    "brier",
    "classwise_ece",
    "debiased_l2_ece",
    "ece",
    "multilabel_ece",
    "nll",
    "reliability_table",
    "smooth_ece",
]

Binning = Literal["width", "mass"]
#: mass bins: confidences equal when rounded to this many decimals are a tie (see
#: :func:`table_from_scores`)
TIE_DECIMALS = 12
Norm = Literal["l1", "l2", "max"]


#: The most bins a metric or recalibrator takes: the classwise sums hold 2 K M doubles, and
#: beyond this a bin holds no sample of any realistic evaluation set.
MAX_BINS = 100_000


def _check_n_bins(n_bins: int) -> int:
    """The ``n_bins`` option (of the metrics, the meter, the plots and histogram binning)."""
    n = check_int("n_bins", n_bins, low=1, what="a positive integer")
    if n > MAX_BINS:
        raise ValueError(
            f"n_bins={n} is more than {MAX_BINS:,} bins: pass a smaller n_bins (15 is usual)"
        )
    return n


def _check_binning(binning: Binning) -> Binning:
    """The ``binning`` option: ``"width"`` or ``"mass"``."""
    return check_choice("binning", binning, ("width", "mass"))


def _check_num_classes(num_classes: int | None) -> int | None:
    """The ``num_classes`` option: an integer >= 2, or None."""
    return check_int("num_classes", num_classes, low=2, none=True)


def _check_scores(from_logits: bool, ignore_index: int | None) -> tuple[bool, int | None]:
    """The ``from_logits`` and ``ignore_index`` options of the metrics, checked."""
    return check_bool("from_logits", from_logits), check_ignore_index(ignore_index)


@dataclass(frozen=True)
class ReliabilityTable:
    """Per-bin statistics of top-label confidence against accuracy (for binary and multi-label
    input, of the positive class's probability against the fraction of positives: see the
    module docstring).

    Arrays have one entry per bin (``n_bins`` of them, empty bins included, in increasing
    confidence). For width bins ``lower``/``upper`` are the bin edges; for mass bins they are
    the smallest and largest confidence in the bin. Empty bins have ``count == 0`` and NaN
    ``confidence``, ``accuracy`` and ``gap`` (and NaN ``lower``/``upper`` for mass bins).
    """

    lower: np.ndarray
    upper: np.ndarray
    count: np.ndarray
    confidence: np.ndarray
    accuracy: np.ndarray
    gap: np.ndarray
    n_samples: int
    binning: Binning

    @property
    def n_bins(self) -> int:
        return int(self.count.shape[0])

    def calibration_error(self, norm: Norm = "l1") -> float:
        r"""The binned calibration error of this table.

        .. math::
            \mathrm{ECE}_1 = \sum_{b} \frac{n_b}{N}\,|\mathrm{gap}_b|, \qquad
            \mathrm{ECE}_2 = \Big(\sum_{b} \frac{n_b}{N}\,\mathrm{gap}_b^2\Big)^{1/2}, \qquad
            \mathrm{MCE} = \max_{b:\,n_b>0} |\mathrm{gap}_b|,

        sums and maxima running over non-empty bins only.
        """
        norm = check_choice("norm", norm, ("l1", "l2", "max"))
        used = self.count > 0
        gap = np.abs(self.gap[used])
        weight = self.count[used] / self.n_samples
        if norm == "l1":
            return float(np.sum(weight * gap))
        if norm == "l2":
            return float(math.sqrt(np.sum(weight * gap**2)))
        return float(np.max(gap))

    def to_rows(self) -> list[dict[str, float | int | None]]:
        """One dict per bin (``None`` for NaN), for JSON and tables."""

        def clean(v: float) -> float | None:
            return None if math.isnan(v) else float(v)

        return [
            {
                "lower": clean(self.lower[b]),
                "upper": clean(self.upper[b]),
                "count": int(self.count[b]),
                "confidence": clean(self.confidence[b]),
                "accuracy": clean(self.accuracy[b]),
                "gap": clean(self.gap[b]),
            }
            for b in range(self.n_bins)
        ]


def table_from_scores(
    conf: np.ndarray, correct: np.ndarray, *, n_bins: int = 15, binning: Binning = "width"
) -> ReliabilityTable:
    """A :class:`ReliabilityTable` from per-sample confidences and 0/1 outcomes.

    ``conf`` must already lie in [0, 1]; this is the one place where binning happens.
    """
    n_bins = _check_n_bins(n_bins)
    binning = _check_binning(binning)
    conf = np.asarray(conf, dtype=np.float64)
    correct = np.asarray(correct, dtype=np.float64)
    n = conf.shape[0]
    if binning == "width":
        idx = width_bin_index(conf, n_bins)
        edges = width_edges(n_bins)
        lower, upper = edges[:-1].copy(), edges[1:].copy()
    else:
        order = np.argsort(conf, kind="stable")
        conf, correct = conf[order], correct[order]
        # A run of equal confidences split by a bin edge: each of its samples takes the run's
        # mean outcome, so that the bins it spans do not depend on the order of the rows
        # (otherwise a shuffle can move AdaECE from 0.13 to 0.16) and hold the run's accuracy,
        # as the diagram's one bar for them does.
        # Equal on a grid of 1e-12: rows that are permutations of each other have one
        # confidence, which sums in another order give to within a few ulps (the native
        # kernel's and torch's can differ by one); distinct float32 values never meet on it.
        key = np.round(conf, TIE_DECIMALS)
        new_run = np.r_[True, key[1:] != key[:-1]]
        if not new_run.all():
            run = np.cumsum(new_run) - 1
            correct = (np.bincount(run, weights=correct) / np.bincount(run))[run]
        idx = (np.arange(n, dtype=np.int64) * n_bins) // n
        b = np.arange(n_bins + 1, dtype=np.int64)
        starts = -((-b * n) // n_bins)  # ceil(b N / M): first sorted position of bin b
        lower = np.full(n_bins, np.nan)
        upper = np.full(n_bins, np.nan)
        nonempty = starts[1:] > starts[:-1]
        lower[nonempty] = conf[starts[:-1][nonempty]]
        upper[nonempty] = conf[starts[1:][nonempty] - 1]
    count = np.bincount(idx, minlength=n_bins).astype(np.int64)
    sum_conf = np.bincount(idx, weights=conf, minlength=n_bins)
    sum_acc = np.bincount(idx, weights=correct, minlength=n_bins)
    return table_from_sums(count, sum_conf, sum_acc, lower=lower, upper=upper, binning=binning)


def table_from_sums(
    count: np.ndarray,
    sum_conf: np.ndarray,
    sum_acc: np.ndarray,
    *,
    lower: np.ndarray | None = None,
    upper: np.ndarray | None = None,
    binning: Binning = "width",
) -> ReliabilityTable:
    """A :class:`ReliabilityTable` from per-bin counts and sums of confidence and outcome
    (the width-bin edges unless ``lower``/``upper`` are given)."""
    count = np.asarray(count).astype(np.int64)
    n_bins = count.shape[0]
    if lower is None or upper is None:
        edges = width_edges(n_bins)
        lower, upper = edges[:-1].copy(), edges[1:].copy()
    n = int(count.sum())
    with np.errstate(invalid="ignore", divide="ignore"):
        mean_conf = np.where(count > 0, sum_conf / count, np.nan)
        mean_acc = np.where(count > 0, sum_acc / count, np.nan)
    return ReliabilityTable(
        lower=lower,
        upper=upper,
        count=count,
        confidence=mean_conf,
        accuracy=mean_acc,
        gap=mean_conf - mean_acc,
        n_samples=int(n),
        binning=binning,
    )


def top_scores(
    probs: ArrayLike, labels: ArrayLike, from_logits: bool, ignore_index: int | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Validated confidence (float64) and outcome (0.0/1.0) per sample: the top-label
    confidence and its correctness for multiclass input, the positive-class probability and
    the 0/1 label for binary and multi-label input (see the module docstring)."""
    return _scores(*select(probs, labels, from_logits=from_logits, ignore_index=ignore_index), from_logits)


def _scores(
    kind: str, t: torch.Tensor, y: np.ndarray, rows: np.ndarray | None, from_logits: bool
) -> tuple[np.ndarray, np.ndarray]:
    """:func:`top_scores` of the output of :func:`~crossent.calibration._inputs.select`."""
    if kind == "binary":
        return t.numpy(), y.astype(np.float64)
    r = row_statistics(t, torch.from_numpy(y), from_logits=from_logits,
                       name="logits" if from_logits else "probs", scores=False, rows=rows)
    return r.conf, (r.pred == y).astype(np.float64)


def reliability_table(
    probs: ArrayLike,
    labels: ArrayLike,
    *,
    n_bins: int = 15,
    binning: Binning = "width",
    from_logits: bool = False,
    ignore_index: int | None = None,
) -> ReliabilityTable:
    """Per-bin range, count, mean confidence, accuracy and gap of the top-label prediction
    (binary and multi-label input: of the positive class's probability, accuracy being the
    fraction of positives).

    See the module docstring for the bin conventions. :func:`ece` and the reliability
    diagrams are computed from this table. Multiclass width bins are summed in the pass over
    the rows (:func:`~crossent.calibration._rows.row_statistics` with ``top``), as the
    streaming :class:`~crossent.calibration.CalibrationMeter` sums them.
    """
    n_bins = _check_n_bins(n_bins)
    binning = _check_binning(binning)
    from_logits, ignore_index = _check_scores(from_logits, ignore_index)
    kind, t, y, rows = select(probs, labels, from_logits=from_logits, ignore_index=ignore_index)
    if kind == "multiclass" and binning == "width":
        name = "logits" if from_logits else "probs"
        s = row_statistics(t, torch.from_numpy(y), from_logits=from_logits, name=name, n_bins=n_bins,
                           classwise=False, top=True, scores=False, rows=rows).top
        assert s is not None
        return table_from_sums(s[:n_bins], s[n_bins : 2 * n_bins], s[2 * n_bins : 3 * n_bins])
    return table_from_scores(*_scores(kind, t, y, rows, from_logits), n_bins=n_bins, binning=binning)


def ece(
    probs: ArrayLike,
    labels: ArrayLike,
    *,
    n_bins: int = 15,
    binning: Binning = "width",
    norm: Norm = "l1",
    from_logits: bool = False,
    ignore_index: int | None = None,
) -> float:
    r"""Top-label expected calibration error (Guo et al. 2017, *On Calibration of Modern
    Neural Networks*; Naeini et al. 2015).

    .. math::
        \mathrm{ECE} = \sum_{b=1}^{M} \frac{|B_b|}{N}\,
            \Big|\frac{1}{|B_b|}\sum_{i \in B_b} \hat p_i
                 - \frac{1}{|B_b|}\sum_{i \in B_b} a_i\Big|

    ``binning="width"`` uses the bins ((m-1)/M, m/M] (0 goes to the first bin);
    ``binning="mass"`` uses equal-count bins, which gives AdaECE (Mukhoti et al. 2020,
    *Calibrating Deep Neural Networks using Focal Loss*). ``norm="l2"`` returns the root of
    the mass-weighted mean squared gap (RMSCE) and ``norm="max"`` the maximum calibration
    error (MCE) over non-empty bins. Empty bins are skipped. Vectorised: one pass over the
    rows in chunks, no Python loop over samples.

    Binary input -- ``probs`` (N,) of the positive class and 0/1 ``labels`` (N,) -- measures
    the calibration of that probability, :math:`\hat p_i = p_i`, :math:`a_i = y_i` (the
    convention of torchmetrics' ``BinaryCalibrationError`` and scikit-learn's
    ``calibration_curve``); stack ``[1 - p, p]`` for the top-label version. Multi-label
    ``probs`` (N, L) with 0/1 ``labels`` (N, L) pool the N L binary problems (for one number
    per label see :func:`multilabel_ece`). With ``from_logits=True`` these are sigmoid
    logits, so the logits of a softmax model with one-hot (N, C) labels are measured as C N
    binary problems: pass the class indices, ``labels.argmax(1)`` (probability rows summing to
    one with one-hot labels warn). Labels equal to ``ignore_index`` are left out.
    """
    norm = check_choice("norm", norm, ("l1", "l2", "max"))
    table = reliability_table(
        probs, labels, n_bins=n_bins, binning=binning, from_logits=from_logits,
        ignore_index=ignore_index,
    )
    return table.calibration_error(norm)


def classwise_ece(
    probs: ArrayLike,
    labels: ArrayLike,
    *,
    num_classes: int | None = None,
    n_bins: int = 15,
    from_logits: bool = False,
    ignore_index: int | None = None,
) -> float:
    r"""Class-wise ECE: marginal calibration of every class, averaged over classes
    (Kull et al. 2019, *Beyond temperature scaling*; Nixon et al. 2019, *Measuring
    Calibration in Deep Learning*, "SCE").

    .. math::
        \mathrm{cwECE} = \frac{1}{K}\sum_{k=1}^{K}\sum_{b=1}^{M} \frac{|B_{kb}|}{N}
            \Big|\overline{p_{\cdot k}}^{\,B_{kb}} - \overline{[y = k]}^{\,B_{kb}}\Big|,
        \qquad B_{kb} = \{i : p_{ik} \in ((b-1)/M,\ b/M]\}

    with the same width bins as :func:`ece`, over *all* N samples for every class. ``K`` is
    ``probs.shape[1]`` (a class absent from ``labels`` still counts, never
    ``max(labels) + 1``); ``num_classes``, if given, must equal it. Binary and multi-label
    scores are measured as the two classes :math:`[1 - p, p]` of every (pooled) entry: ``K = 2``.
    """
    n_bins = _check_n_bins(n_bins)
    num_classes = _check_num_classes(num_classes)
    from_logits, ignore_index = _check_scores(from_logits, ignore_index)
    name = "logits" if from_logits else "probs"
    kind, t, y_np, rows = select(probs, labels, from_logits=from_logits, ignore_index=ignore_index)
    if kind == "binary":  # the two columns [1 - p, p]
        if num_classes not in (None, 2):
            raise ValueError(
                f"num_classes={num_classes}, but binary and multi-label input is measured as the"
                " two classes [1 - p, p]: pass num_classes=2 or leave it out"
            )
        t, from_logits = torch.stack([1.0 - t, t], dim=1), False
    n, k = t.shape
    if num_classes is not None and num_classes != k:
        raise ValueError(
            f"num_classes={num_classes} does not match {name}.shape[1]={k};"
            " give one column per class"
        )
    r = row_statistics(t, torch.from_numpy(y_np), from_logits=from_logits, name=name, n_bins=n_bins,
                       scores=False, rows=rows)
    assert r.cw_p is not None and r.cw_y is not None
    # (|B|/N) |mean p - mean y| = |sum p - sum y| / N for every (class, bin).
    return float((r.cw_p - r.cw_y).abs().sum() / (n * k))


def debiased_l2_ece(
    probs: ArrayLike,
    labels: ArrayLike,
    *,
    squared: bool = False,
    n_bins: int = 15,
    binning: Binning = "mass",
    from_logits: bool = False,
    ignore_index: int | None = None,
) -> float:
    r"""Debiased estimator of the top-label L2 calibration error (Kumar, Liang and Ma 2019,
    *Verified Uncertainty Calibration*).

    .. math::
        \widehat{\mathrm{CE}^2} = \sum_{b} \frac{n_b}{N}\Big[(\bar p_b - \bar a_b)^2
            - \frac{\bar a_b (1 - \bar a_b)}{n_b - 1}\Big]

    The subtracted term is the unbiased estimate of the variance of :math:`\bar a_b`, which
    the plug-in :math:`(\bar p_b - \bar a_b)^2` over-counts. A bin holding a single sample
    admits no variance estimate and contributes its plug-in term. Bins are equal-mass by
    default, as in the paper. With ``squared=True`` the estimate of the *squared* error is
    returned as is (it is unbiased, so it can be slightly negative for a calibrated model);
    by default the result is :math:`\sqrt{\max(\widehat{\mathrm{CE}^2}, 0)}`, comparable with
    ``ece(..., norm="l2")``.
    """
    squared = check_bool("squared", squared)
    table = reliability_table(
        probs, labels, n_bins=n_bins, binning=binning, from_logits=from_logits,
        ignore_index=ignore_index,
    )
    used = table.count > 0
    nb = table.count[used].astype(np.float64)
    acc = table.accuracy[used]
    correction = np.where(nb > 1, acc * (1 - acc) / np.maximum(nb - 1, 1), 0.0)
    est = float(np.sum(nb / table.n_samples * (table.gap[used] ** 2 - correction)))
    return est if squared else math.sqrt(max(est, 0.0))


#: Grid points per unit interval for the smooth ECE (the circle of length 2 gets twice this).
_SMECE_GRID = 4096


def _reflected_kernel_fft(sigma: float, grid: int) -> np.ndarray:
    r"""rFFT of the reflected Gaussian kernel sampled on the circle [0, 2) of 2*grid points.

    The reflected kernel :math:`K^R_\sigma(t, f) = \sum_{k \in \mathbb Z}
    \phi_\sigma(t - f - 2k) + \phi_\sigma(t + f - 2k)` is a Gaussian wrapped on a circle of
    length 2 acting on the data mirrored at 0 and 1. The samples are positive and normalised
    to sum to one, so a constant-sign residual keeps its mass exactly.
    """
    m = 2 * grid
    d = np.arange(m, dtype=np.float64) / grid
    d = np.minimum(d, 2.0 - d)  # distance on the circle
    if sigma * grid < 1e-3:
        ker = np.zeros(m)
        ker[0] = 1.0
    else:
        images = np.arange(-3, 4, dtype=np.float64)[:, None] * 2.0
        ker = np.exp(-0.5 * ((d[None, :] - images) / sigma) ** 2).sum(0)
        ker /= ker.sum()
    return np.fft.rfft(ker)


def smooth_ece_from_scores(
    conf: np.ndarray, correct: np.ndarray, sigma: float | None = None, grid: int = _SMECE_GRID
) -> tuple[float, float]:
    """smECE and the bandwidth used, from confidences in [0, 1] and 0/1 outcomes."""
    n = conf.shape[0]
    m = 2 * grid
    resid = (correct - conf) / n
    mass = np.zeros(m)
    for pos in (conf * grid, (2.0 - conf) * grid):  # the data and its mirror image
        j = np.floor(pos)
        frac = pos - j
        j = j.astype(np.int64) % m
        mass += np.bincount(j, weights=resid * (1.0 - frac), minlength=m)
        mass += np.bincount((j + 1) % m, weights=resid * frac, minlength=m)
    spec = np.fft.rfft(mass)

    def sm(s: float) -> float:
        # The smoothed residual density integrated over [0, 1] is half the circle's integral.
        return 0.5 * float(np.abs(np.fft.irfft(spec * _reflected_kernel_fft(s, grid), n=m)).sum())

    if sigma is not None:
        return sm(sigma), sigma
    # smECE_sigma is non-increasing in sigma and at most 1, so sigma -> smECE_sigma - sigma
    # has a single root in [0, 1]: bisection.
    lo, hi = 0.0, 1.0
    while hi - lo > 1e-9:
        mid = 0.5 * (lo + hi)
        if sm(mid) > mid:
            lo = mid
        else:
            hi = mid
    s = 0.5 * (lo + hi)
    return sm(s), s


def smooth_ece(
    probs: ArrayLike,
    labels: ArrayLike,
    *,
    sigma: float | None = None,
    from_logits: bool = False,
    ignore_index: int | None = None,
) -> float:
    r"""Smooth ECE of the top-label confidence (Błasiok and Nakkiran 2023, *Smooth ECE:
    Principled Reliability Diagrams via Kernel Smoothing*).

    With residuals :math:`r_i = a_i - \hat p_i` and the reflected Gaussian kernel
    :math:`K^R_\sigma` on [0, 1],

    .. math::
        \mathrm{smECE}_\sigma = \int_0^1 \Big|\frac{1}{N}\sum_{i=1}^N
            K^R_\sigma(t, \hat p_i)\, r_i\Big|\,dt ,

    i.e. the kernel-smoothed residual :math:`\hat r(t)` integrated against the smoothed
    density of predictions. The bandwidth is the fixed point :math:`\sigma^*` with
    :math:`\mathrm{smECE}_{\sigma^*} = \sigma^*` (unique since :math:`\mathrm{smECE}_\sigma`
    is non-increasing), found by bisection on [0, 1]; the result is
    :math:`\mathrm{smECE}_{\sigma^*}`. Pass ``sigma`` to use a fixed bandwidth instead.

    The integral is computed on a grid of 4096 points per unit (linear deposit of the
    samples, FFT convolution on the mirrored circle), which is vectorised in N.
    """
    what = "a finite number >= 0 (the kernel bandwidth)"
    sigma = check_real("sigma", sigma, what=what, none=True)
    if sigma is not None and not (sigma >= 0 and math.isfinite(sigma)):
        raise ValueError(f"sigma must be {what} or None, got {sigma!r}")
    from_logits, ignore_index = _check_scores(from_logits, ignore_index)
    conf, correct = top_scores(probs, labels, from_logits, ignore_index)
    return smooth_ece_from_scores(conf, correct, sigma)[0]


def brier(
    probs: ArrayLike, labels: ArrayLike, *, from_logits: bool = False, ignore_index: int | None = None
) -> float:
    r"""Multiclass Brier score, summed over classes (range 0 to 2).

    .. math::
        \mathrm{BS} = \frac{1}{N}\sum_{i=1}^{N}\sum_{k=1}^{K} (p_{ik} - [y_i = k])^2

    (Brier 1950). This is scikit-learn's multiclass ``brier_score_loss`` (which keeps the
    [0, 2] range for more than two classes); for two classes scikit-learn by default halves
    it to the binary [0, 1] score of the positive class, and this function does not.
    Binary (N,) and multi-label (N, L) input give that binary score,
    :math:`\frac1N\sum_i (p_i - y_i)^2` (range 0 to 1), pooled over labels.
    """
    from_logits, ignore_index = _check_scores(from_logits, ignore_index)
    kind, t, y_np, rows = select(probs, labels, from_logits=from_logits, ignore_index=ignore_index)
    if kind == "binary":
        return float((t - torch.from_numpy(y_np).to(torch.float64)).square().mean())
    r = row_statistics(t, torch.from_numpy(y_np), from_logits=from_logits,
                       name="logits" if from_logits else "probs", rows=rows)
    assert r.brier is not None
    return float(r.brier.sum()) / t.shape[0]


def nll(
    probs_or_logits: ArrayLike,
    labels: ArrayLike,
    *,
    from_logits: bool | None = None,
    ignore_index: int | None = None,
) -> float:
    r"""Mean negative log-likelihood of the true class, in nats.

    .. math::
        \mathrm{NLL} = -\frac{1}{N}\sum_{i=1}^{N} \log p_{i y_i}
            = \frac{1}{N}\sum_{i} \Big(\operatorname{logsumexp}_k z_{ik} - z_{i y_i}\Big)

    ``from_logits=None`` (the default) detects the input: rows in [0, 1] summing to one are
    probabilities, anything else is logits. Probabilities of exactly 0 are clipped to the
    smallest normal float64 (so the loss is large and finite, about 708 per sample). Binary
    (N,) and multi-label (N, L) input give the binary cross-entropy
    :math:`-\frac1N\sum_i y_i\log p_i + (1 - y_i)\log(1 - p_i)` (from logits
    :math:`\operatorname{softplus}(z_i) - y_i z_i`), pooled over labels; there
    ``from_logits=None`` means probabilities if every value lies in [0, 1] (within the 1e-5 of
    round-off that ``from_logits=False`` accepts).
    """
    from_logits = check_bool("from_logits", from_logits, none=True)
    ignore_index = check_ignore_index(ignore_index)
    raw = _to_tensor(probs_or_logits, "probs_or_logits")
    lab = label_array(labels)
    if binary_shaped(raw.shape, lab.shape):
        # the entries measured (ignored ones may hold any padding), for the detection and logits
        kept = drop_ignored(raw, lab, ignore_index).reshape(-1) if from_logits is not False else raw
        if from_logits is None:
            from_logits = kept.numel() > 0 and not looks_like_binary_probs(kept)
        if from_logits:
            _, _, y_np, _ = select(raw, lab, from_logits=True, ignore_index=ignore_index)
            return float(binary_nll_terms(kept, y_np, from_logits=True).mean())
        _, p, y_np, _ = select(raw, lab, from_logits=False, ignore_index=ignore_index)
        return float(binary_nll_terms(p, y_np, from_logits=False).mean())
    as_matrix(raw, "probs_or_logits", metrics=True)
    rows = None
    if ignore_index is not None:
        _, raw, _, rows = select(raw, lab, from_logits=True, ignore_index=ignore_index, check_probs=False)
        lab = lab.reshape(-1)[lab.reshape(-1) != ignore_index]
    t = as_matrix(raw, "probs_or_logits")
    y = torch.from_numpy(as_labels(lab, t.shape[0], t.shape[1]))
    if from_logits is None:
        from_logits = not looks_like_probs(t, "probs_or_logits")
        if from_logits:
            warn_if_unnormalised(t, "probs_or_logits")
    elif from_logits:
        warn_if_probs_as_logits(t, "probs_or_logits")
    r = row_statistics(t, y, from_logits=from_logits, name="probs_or_logits", rows=rows)
    assert r.nll is not None
    return float(r.nll.sum()) / t.shape[0]


def accuracy(
    probs: ArrayLike, labels: ArrayLike, *, from_logits: bool = False, ignore_index: int | None = None
) -> float:
    """Top-1 accuracy: the fraction of rows whose arg-max (lowest index on ties) is the label.
    Binary and multi-label input: the fraction with :math:`[p_i > 1/2] = y_i`."""
    from_logits, ignore_index = _check_scores(from_logits, ignore_index)
    kind, t, y, rows = select(  # no warning of probabilities: softmax keeps the argmax
        probs, labels, from_logits=from_logits, ignore_index=ignore_index, check_probs=False
    )
    if kind == "binary":
        return float(((t > 0.5).numpy() == (y == 1)).mean())
    r = row_statistics(t, torch.from_numpy(y), from_logits=from_logits,
                       name="logits" if from_logits else "probs", scores=False, rows=rows)
    return float((r.pred == y).mean())


def multilabel_ece(
    probs: ArrayLike,
    labels: ArrayLike,
    *,
    average: Literal["pooled", "macro", "none"] = "macro",
    n_bins: int = 15,
    binning: Binning = "width",
    from_logits: bool = False,
    ignore_index: int | None = None,
) -> float | np.ndarray:
    """ECE of multi-label predictions ``probs`` (N, L) against 0/1 ``labels`` (N, L).

    Every label is a binary problem whose positive-class probability is binned as in
    :func:`ece`. ``average="none"`` returns the L per-label ECEs (float64 array),
    ``"macro"`` their mean, ``"pooled"`` the ECE of all N L pairs together (what
    :func:`ece` returns for this input). With ``ignore_index``, a label whose every entry is
    ignored has no ECE: NaN in ``"none"``, left out of the ``"macro"`` mean (an error only if
    no label has an entry left).
    """
    average = check_choice("average", average, ("pooled", "macro", "none"))
    n_bins = _check_n_bins(n_bins)
    binning = _check_binning(binning)
    from_logits, ignore_index = _check_scores(from_logits, ignore_index)
    t = _to_tensor(probs, "probs")
    if t.ndim != 2:
        raise ValueError(f"probs must be 2-D (N, L) for multi-label input, got shape {tuple(t.shape)}")
    lab = label_array(labels)
    if lab.shape != tuple(t.shape):
        raise ValueError(f"labels must have the shape of probs {tuple(t.shape)}, got {lab.shape}")
    if average == "pooled" or t.numel() == 0:  # empty: ece's error
        return ece(t, lab, n_bins=n_bins, binning=binning, from_logits=from_logits, ignore_index=ignore_index)
    measured = (np.ones(t.shape[1], dtype=bool) if ignore_index is None
                else (lab != ignore_index).any(axis=0))
    if not measured.any():
        raise ValueError(f"every entry of labels equals ignore_index={ignore_index}: no label to measure")
    # one read and check of every entry, as the pooled call makes (an error names its (row,
    # label)); then each label's kept entries binned as ece bins binary input
    _, p, y, rows = select(t, lab, from_logits=from_logits, ignore_index=ignore_index)
    label = (np.arange(p.shape[0]) if rows is None else rows) % t.shape[1]
    # the entries grouped by label once, each group in its input order (a stable sort), not by
    # a mask per label, which would read all N L entries L times
    order = np.argsort(label, kind="stable")
    conf, correct = p.numpy()[order], y.astype(np.float64)[order]
    ends = np.cumsum(np.bincount(label, minlength=t.shape[1]))
    per = np.full(t.shape[1], np.nan)
    for j in np.flatnonzero(measured):
        at = slice(ends[j - 1] if j else 0, ends[j])
        table = table_from_scores(conf[at], correct[at], n_bins=n_bins, binning=binning)
        per[j] = table.calibration_error("l1")
    return per if average == "none" else float(per[measured].mean())
