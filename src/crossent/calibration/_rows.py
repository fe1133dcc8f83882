r"""Per-row statistics of (N, C) logits or probabilities: the one pass behind every multiclass metric.

:func:`row_statistics` gives, for every row with its label, the top-label confidence and
prediction, the NLL and Brier score of the label and, optionally, the classwise width-bin sums
of all N C probabilities. :func:`~crossent.calibration.ece`, ``classwise_ece``, ``brier``,
``nll``, ``accuracy`` and the streaming :class:`~crossent.calibration.CalibrationMeter` all
call it, so the meter puts every sample in the bin the one-shot functions put it in.

From logits :math:`z`, with :math:`m = \max_k z_k`, :math:`e_k = \exp(z_k - m)` and
:math:`s = \sum_k e_k` (one exponential per entry):

.. math::
    \hat p = 1 / s, \qquad -\log p_y = m + \log s - z_y, \qquad
    \sum_k (p_k - [y = k])^2 = \frac{\sum_k e_k^2}{s^2} - \frac{2 e_y}{s} + 1,

and where :math:`p_y > 1/2`, whose NLL and Brier score those forms would cancel to the float
sums' round-off, :math:`\log(1 + s'/e_y)` and :math:`(q' + s'^2)/s^2` from the other entries'
sum :math:`s'` and sum of squares :math:`q'` (one more read of the row, in cache),

and the classwise bins take :math:`p_k = e_k \cdot (1 / s)` in float64. On the CPU the native
kernel (``ce_calibration`` in ``crossent/backends/native/_kernels_body.h``) does this in one
read of each row; elsewhere (no compiler, ``CROSSENT_NATIVE=0``) the same formulas run as torch
ops on chunks of rows. Within a process every caller takes the same path.

The classwise sums only look up the bin of entries above the first edge 1/M, of which a row has
fewer than M; every other entry adds to its class's first bin.

With an inverse temperature :math:`\beta` (``scale``) every statistic is that of
:math:`\operatorname{softmax}(\beta z)`, and ``moments`` adds the mean and variance of :math:`z`
under it, the NLL's derivatives in :math:`\beta`: each Newton step of
:class:`~crossent.calibration.TemperatureScaler` is one pass.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np
import torch

from crossent.backends import native
from crossent.calibration._inputs import RANGE_ATOL, _chunk, check_rows, chunks, iter_chunks, sum_atol

__all__ = ["RowStatistics", "classwise_sums", "row_statistics", "top_sums", "width_bin_index", "width_edges"]


def width_edges(n_bins: int) -> np.ndarray:
    """The M + 1 edges ``m / M`` of the width bins, correctly rounded."""
    return np.arange(n_bins + 1, dtype=np.float64) / n_bins


_SEARCH_BELOW = 2048  # values: np.searchsorted below this size, the arithmetic bin from it


def width_bin_index(values: np.ndarray, n_bins: int) -> np.ndarray:
    r"""Bin of each value for the width bins ((m-1)/M, m/M], 0 going to the first bin: the
    number of inner edges below it, ``np.searchsorted(width_edges(M)[1:-1], values, "left")``
    (NaN going to the last bin, as there).

    Computed without a search: :math:`\lfloor v M \rfloor` clamped to [0, M - 1] is at most one
    off (one rounding in the product, one in each edge), so one step down where the guessed
    bin's lower edge is not below ``v`` and one step up where the next edge is below it give
    the exact count, the same comparisons against the same edges as the search (and as
    ``width_bin`` in the native kernel), at a third of its cost. Below 2,048 values the search
    itself is faster (fewer NumPy calls) and is used.
    """
    v = np.asarray(values, dtype=np.float64)
    edges = width_edges(n_bins)
    if v.size < _SEARCH_BELOW:
        return np.searchsorted(edges[1:-1], v, side="left")
    guess = v * n_bins
    np.fmax(guess, 0.0, out=guess)  # fmax, fmin: NaN becomes 0 here and M - 1 below
    np.fmin(guess, n_bins - 1.0, out=guess)
    b = guess.astype(np.intp)
    b -= (b > 0) & (edges[b] >= v)
    b += (b < n_bins - 1) & (edges[b + 1] < v)
    nan = np.isnan(v)
    if nan.any():
        b[nan] = n_bins - 1
    return b


class RowStatistics(NamedTuple):
    """What :func:`row_statistics` returns (float64 unless noted). A named tuple: made once per
    call, so that a small batch's call costs little more than the kernel's."""

    conf: np.ndarray  #: (N,) top-label confidence
    pred: np.ndarray  #: (N,) int64 first arg-max (lowest index on ties)
    nll: np.ndarray | None  #: (N,) -log p_y (``scores=True``)
    brier: np.ndarray | None  #: (N,) sum_k (p_k - [y = k])^2 (``scores=True``)
    cw_p: torch.Tensor | None  #: (M K,) sum of p_k per (bin b, class k) at b K + k (``classwise``)
    cw_y: torch.Tensor | None  #: (M K,) count of labels k per (bin of p_k, class k)
    dmean: np.ndarray | None = None  #: (N,) E_p[z] - z_y (``moments``)
    dvar: np.ndarray | None = None  #: (N,) Var_p[z] (``moments``)
    #: (3 M + 2,) ``top``: per width bin of the confidence the count, the sum of confidences and
    #: the number correct (:func:`top_sums`); then the sums of the NLL and the Brier score
    top: np.ndarray | None = None


def row_statistics(
    t: torch.Tensor,
    y: torch.Tensor,
    *,
    from_logits: bool,
    name: str,
    n_bins: int = 0,
    classwise: bool = True,
    top: bool = False,
    scores: bool = True,
    scale: float = 1.0,
    moments: bool = False,
    rows: np.ndarray | None = None,
    cw_into: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> RowStatistics:
    r"""Validated per-row statistics of ``t`` (N, C) with int64 labels ``y`` (N,) in range.

    With ``n_bins`` M > 0: the classwise width-bin sums (``classwise``) and, with ``top``, the
    sums of the top-label width bins and of the scores (:attr:`RowStatistics.top`: what the
    width-bin ECE and the streaming meter keep, summed in the pass itself on the native path).

    Logits only: ``scale`` is an inverse temperature :math:`\beta > 0`, every statistic then
    being that of :math:`p = \operatorname{softmax}(\beta z)` (the NLL
    :math:`\beta (m - z_y) + \log \sum_k e^{\beta (z_k - m)}`), and ``moments`` adds
    :math:`\mathbb E_p[z] - z_y` and :math:`\operatorname{Var}_p[z]`, the per-row first and
    second derivatives of the NLL in :math:`\beta` (temperature scaling's Newton step).

    Raises ``ValueError`` naming the first row that holds NaN or infinity, and for
    probabilities (``from_logits=False``) the first row outside [0, 1] or not summing to one;
    ``rows`` gives the input's number of each row of ``t`` where ``ignore_index`` dropped some
    (:func:`~crossent.calibration._inputs.select`), so that the error names the user's row.

    ``cw_into``: two float64 tensors of C M entries (bin-major, as :attr:`RowStatistics.cw_p`)
    to which the classwise sums are added, and which are returned as ``cw_p`` and ``cw_y``: a
    streaming meter's own sums. They may be added to before a bad row is found, so the rows
    passed with them must have been validated already.
    """
    if not from_logits and (scale != 1.0 or moments):
        raise ValueError("scale and moments are for logits (from_logits=True)")
    if not (math.isfinite(scale) and scale > 0.0):
        raise ValueError(f"scale must be a finite positive inverse temperature, got {scale!r}")
    if top and n_bins <= 0:
        raise ValueError("top needs n_bins > 0")
    classwise = classwise and n_bins > 0
    if cw_into is not None and not classwise:
        raise ValueError("cw_into needs the classwise sums (classwise=True, n_bins > 0)")
    impl = _row_statistics_native if native.available() else _row_statistics_torch
    return impl(t, y, from_logits=from_logits, name=name, n_bins=n_bins, classwise=classwise,
                top=top, scores=scores, scale=float(scale), moments=moments, rows=rows, cw_into=cw_into)


def top_sums(
    conf: np.ndarray, correct: np.ndarray, nll: np.ndarray | None, brier: np.ndarray | None, n_bins: int
) -> np.ndarray:
    """(3 M + 2,): per width bin of ``conf`` the count, the sum of ``conf`` and of ``correct``
    (0/1); then the sums of ``nll`` and ``brier`` (0 where None)."""
    idx = width_bin_index(conf, n_bins)
    out = np.zeros(3 * n_bins + 2)
    out[:n_bins] = np.bincount(idx, minlength=n_bins)
    out[n_bins : 2 * n_bins] = np.bincount(idx, weights=conf, minlength=n_bins)
    out[2 * n_bins : 3 * n_bins] = np.bincount(idx, weights=correct, minlength=n_bins)
    out[3 * n_bins] = 0.0 if nll is None else nll.sum()
    out[3 * n_bins + 1] = 0.0 if brier is None else brier.sum()
    return out


def _row_statistics_native(
    t: torch.Tensor, y: torch.Tensor, *, from_logits: bool, name: str, n_bins: int, classwise: bool,
    top: bool, scores: bool, scale: float, moments: bool, rows: np.ndarray | None,
    cw_into: tuple[torch.Tensor, torch.Tensor] | None,
) -> RowStatistics:
    """:func:`row_statistics` by the native kernel: in one call on ``t`` itself, its outputs
    returned as they are, or, for a layout or dtype the kernel does not take (columns not
    contiguous, float16 without compiler support), on chunks of rows made contiguous in the
    compute dtype, so that no full-size copy is made and the path depends on the build alone,
    not on the input. The kernel counts the rows that fail the checks of
    :func:`~crossent.calibration._inputs.check_rows` on its own outputs; those run (and name the
    first bad row) only where it found any."""
    limits = (-RANGE_ATOL, 1 + RANGE_ATOL, sum_atol(t.dtype))

    def call(block: torch.Tensor, start: int, stop: int) -> native.CalibrationRows:
        yb = y if start == 0 and stop == y.shape[0] else y[start:stop]
        r = native.calibration_rows(block, yb, from_logits=from_logits, n_bins=n_bins,
                                    classwise=classwise, top=top, scores=scores, scale=scale, moments=moments,
                                    limits=limits, cw_into=cw_into)
        if r.suspects:
            rowmin = None if r.rowmin is None else torch.from_numpy(r.rowmin)
            check_rows(block, torch.from_numpy(r.rowsum), rowmin, torch.from_numpy(r.conf),
                       from_logits=from_logits, name=name, start=start, storage=t.dtype, rows=rows)
        return r

    if native.supports_calibration(t):  # the kernel's outputs as they are
        r = call(t, 0, t.shape[0])
        return RowStatistics(conf=r.conf, pred=r.pred, nll=r.nll, brier=r.brier, cw_p=r.cw_p, cw_y=r.cw_y,
                             dmean=r.dmean, dvar=r.dvar, top=r.top)
    n, k = t.shape
    conf = np.empty(n)
    pred = np.empty(n, dtype=np.int64)
    nll = np.empty(n) if scores else None
    brier = np.empty(n) if scores else None
    cw_p = torch.zeros(k * n_bins, dtype=torch.float64) if classwise and cw_into is None else None
    cw_y = torch.zeros(k * n_bins, dtype=torch.float64) if classwise and cw_into is None else None
    dmean = np.empty(n) if moments else None
    dvar = np.empty(n) if moments else None
    sums = np.zeros(3 * n_bins + 2) if top else None
    for start, stop in iter_chunks(t):
        r = call(_chunk(t, start, stop).contiguous(), start, stop)
        conf[start:stop], pred[start:stop] = r.conf, r.pred
        if nll is not None and brier is not None and r.nll is not None and r.brier is not None:
            nll[start:stop], brier[start:stop] = r.nll, r.brier
        if cw_p is not None and cw_y is not None and r.cw_p is not None and r.cw_y is not None:
            cw_p += r.cw_p
            cw_y += r.cw_y
        if dmean is not None and dvar is not None and r.dmean is not None and r.dvar is not None:
            dmean[start:stop], dvar[start:stop] = r.dmean, r.dvar
        if sums is not None and r.top is not None:
            sums += r.top
    if cw_into is not None:  # the chunks added to them themselves
        cw_p, cw_y = cw_into
    return RowStatistics(conf=conf, pred=pred, nll=nll, brier=brier, cw_p=cw_p, cw_y=cw_y, dmean=dmean,
                         dvar=dvar, top=sums)


def _row_statistics_torch(
    t: torch.Tensor, y: torch.Tensor, *, from_logits: bool, name: str, n_bins: int, classwise: bool,
    top: bool, scores: bool, scale: float, moments: bool, rows: np.ndarray | None,
    cw_into: tuple[torch.Tensor, torch.Tensor] | None,
) -> RowStatistics:
    """:func:`row_statistics` as torch ops over chunks of rows (the same formulas; the sums of
    ``top`` from the per-row values)."""
    n, k = t.shape
    f64 = torch.float64
    conf = torch.empty(n, dtype=f64)
    pred = torch.empty(n, dtype=torch.int64)
    nll = torch.empty(n, dtype=f64) if scores or top else None
    brier = torch.empty(n, dtype=f64) if scores or top else None
    cw_p, cw_y = (None, None) if not classwise else cw_into if cw_into is not None else (
        torch.zeros(k * n_bins, dtype=f64), torch.zeros(k * n_bins, dtype=f64))
    dmean = torch.empty(n, dtype=f64) if moments else None
    dvar = torch.empty(n, dtype=f64) if moments else None
    for start, stop, block in chunks(t, from_logits=from_logits, name=name, rows=rows):
        yb = y[start:stop, None]
        at_y = block.gather(1, yb)[:, 0].to(f64)
        if from_logits:
            m, idx = block.max(dim=1)
            d = block - m[:, None]
            e = (d * scale).exp_() if scale != 1.0 else d.exp()
            s = e.sum(1).to(f64)
            inv = torch.reciprocal(s)
            conf[start:stop] = inv
            if dmean is not None and dvar is not None:
                live = e > 0  # e = 0 where z - m overflows to -inf: those entries add 0
                mean_d = torch.where(live, e * d, 0.0).sum(1).to(f64) * inv
                dmean[start:stop] = mean_d - (at_y - m.to(f64))
                dev = d - mean_d.to(d.dtype)[:, None]
                dvar[start:stop] = torch.where(live, e * dev * dev, 0.0).sum(1).to(f64) * inv
            if nll is not None and brier is not None:
                # from the other entries themselves (see sums_but in the kernel): the Brier score
                # (q' + s'^2) / s^2 for every row, the NLL log1p(s' / e_y) where p_y > 1/2
                e_y = e.gather(1, yb)[:, 0].to(f64)
                others = e.scatter(1, yb, 0.0)
                s_ex = others.sum(1).to(f64)
                q_ex = torch.linalg.vector_norm(others, dim=1).to(f64).square()
                nll[start:stop] = torch.where(e_y * inv > 0.5, torch.log1p(s_ex / e_y),
                                              scale * (m.to(f64) - at_y) + torch.log(s))
                brier[start:stop] = (q_ex + s_ex.square()) * inv.square()
            p = e.to(f64).mul_(inv[:, None]) if cw_p is not None else None
        else:
            pmax, idx = block.max(dim=1)
            conf[start:stop] = pmax.to(f64)
            if nll is not None and brier is not None:
                nll[start:stop] = -torch.log(at_y.clamp_min(float(torch.finfo(f64).tiny)))
                # sum_{k != y} p_k^2 + (1 - p_y)^2 for every row (see sums_but in the kernel)
                q_ex = torch.linalg.vector_norm(block.scatter(1, yb, 0.0), dim=1).to(f64).square()
                brier[start:stop] = q_ex + (1.0 - at_y).square()
            p = block.to(f64) if cw_p is not None else None
        pred[start:stop] = idx
        if p is not None and cw_p is not None and cw_y is not None:
            classwise_sums(p, y[start:stop], n_bins, cw_p, cw_y)
    conf_n, pred_n = conf.numpy(), pred.numpy()
    nll_n = None if nll is None else nll.numpy()
    brier_n = None if brier is None else brier.numpy()
    sums = None
    if top:
        sums = top_sums(conf_n, (pred_n == y.numpy()).astype(np.float64), nll_n, brier_n, n_bins)
    return RowStatistics(
        conf=conf_n, pred=pred_n, nll=nll_n if scores else None, brier=brier_n if scores else None,
        cw_p=cw_p, cw_y=cw_y, dmean=None if dmean is None else dmean.numpy(),
        dvar=None if dvar is None else dvar.numpy(), top=sums,
    )


def classwise_sums(
    p: torch.Tensor, y: torch.Tensor, n_bins: int, sum_p: torch.Tensor, sum_y: torch.Tensor
) -> None:
    """Add to ``sum_p`` and ``sum_y`` (M K, float64, bin ``b`` of class ``k`` at ``b K + k``)
    the float64 probabilities ``p`` (n, K) and the one-hot labels ``y`` that fall in each
    class's width bin.

    Only the entries above the first edge 1/M need a bin lookup: a row of probabilities has
    fewer than M of them. The first bin of each class gets the sum of the others.
    """
    k = p.shape[1]
    edges = width_edges(n_bins)
    pn = np.ascontiguousarray(p.detach().cpu().numpy(), dtype=np.float64)
    big_mask = pn > edges[1]
    flat = np.flatnonzero(big_mask)
    cols = flat % k
    big = pn.reshape(-1)[flat]
    out_p = sum_p.numpy()  # a view: the float64 CPU tensors are updated in place
    out_p += np.bincount(width_bin_index(big, n_bins) * k + cols, weights=big, minlength=k * n_bins)
    out_p[:k] += np.add.reduce(np.where(big_mask, 0.0, pn), axis=0)
    yn = y.cpu().numpy()
    py = pn[np.arange(pn.shape[0]), yn]
    sum_y.numpy()[:] += np.bincount(width_bin_index(py, n_bins) * k + yn, minlength=k * n_bins)
