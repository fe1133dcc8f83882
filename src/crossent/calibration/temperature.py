r"""Temperature scaling and vector scaling (Guo et al. 2017, *On Calibration of Modern Neural
Networks*).

Temperature scaling divides the logits by one scalar :math:`T > 0` fitted on held-out data:

.. math::
    \hat T = \arg\min_{T \in [T_{\min}, T_{\max}]} \frac{1}{N}\sum_{i=1}^N
        \Big(\operatorname{logsumexp}_k \frac{z_{ik}}{T} - \frac{z_{i y_i}}{T}\Big).

In the inverse temperature :math:`s = 1/T` the objective
:math:`L(s) = \frac1N\sum_i \operatorname{logsumexp}_k(s z_{ik}) - s z_{iy_i}` is convex, with

.. math::
    L'(s) = \frac1N\sum_i \big(\mathbb E_{p_i(s)}[z_i] - z_{iy_i}\big), \qquad
    L''(s) = \frac1N\sum_i \operatorname{Var}_{p_i(s)}[z_i] \ \ge 0,

where :math:`p_i(s) = \operatorname{softmax}(s z_i)`; the gradient with respect to
:math:`\log T` is :math:`-s L'(s)`. The fit is a safeguarded Newton iteration on
:math:`L'(s) = 0` inside the bracket :math:`[1/T_{\max}, 1/T_{\min}]`, falling back to a
geometric bisection of the bracket whenever a Newton step leaves it. Because :math:`L'` is
monotone the bracket always contains the minimiser, so the iteration converges from any
start, and the result lies in :math:`[T_{\min}, T_{\max}]` -- in particular :math:`T > 0`.
If the minimiser is beyond a bound (for instance, separable data drive :math:`T \to 0`) the
bound is returned. Each iteration is one read of the rows by the calibration kernel
(:func:`~crossent.calibration._rows.row_statistics` with ``moments``: float32 arithmetic for
float32 input, with float64 sums over rows; float64 otherwise), so a (10^6, 10^3) matrix needs
no copy. The guard's two NLLs (at T = 1 and at the fit) are two such passes over the rows as
they are; where they differ by less than :data:`GUARD_MARGIN`, too little for float32 passes
to tell, they are taken again on chunks of rows converted to float64, as vector scaling's are
(by torch ops).

``objective="ece"`` minimises the top-label ECE instead (the convention of Mukhoti et al.
2020) by search: a grid over :math:`\log T`, a finer grid around its best point, a
golden-section refinement, the NLL temperature, then a scan of 257 temperatures within 10 %
of the best (in :math:`\log T`), whose confidences are interpolated between 17 passes over
the rows (``_scan_ece``: about 95 passes in all, where a pass per temperature would make
332). The ECE jumps where a confidence crosses a bin edge, so the result is the best
temperature tried, which a finer scan may still beat slightly.

``method="vector"`` fits vector scaling, :math:`z'_{ik} = z_{ik}/T_k + b_k`, with per-class
temperatures and biases by L-BFGS on the NLL (the biases are centred to mean zero, which does
not change the probabilities). Unlike temperature scaling it can change the arg-max.

A fit that stops at a bound of :math:`T`, a separable validation set (every top-1 prediction
correct: the NLL then falls all the way to :math:`T \to 0`, and the sharpened predictions are
catastrophically over-confident on new data), or a validation NLL worse than at :math:`T = 1`
warns with :class:`~crossent.calibration.CalibrationWarning` and falls back to :math:`T = 1`;
``fallback`` names the reason (``None`` when the fit is used). ``fallback_to_identity=False``
keeps the fit (and still warns). At ``t_max`` the warning says whether a larger bound can
help (the NLL's slope in :math:`1/T` at :math:`1/T = 0` tells; class by class for vector
scaling).

Validation labels that are all one class count as separable for both methods (a map that
gives that class probability 1 fits them, and the other classes get probability 0). Classes
with no validation sample, when two or more others have samples, count as separable for
vector scaling only: the bias of an absent class is driven down without bound (limited only
by ``max_iter``), while the one temperature is shared by all classes and determined by the
present ones.
"""

from __future__ import annotations

import functools
import math
import warnings
from collections.abc import Callable
from typing import Literal, TypeVar

import numpy as np
import torch

from crossent.calibration import _inputs
from crossent.calibration._base import (
    CalibrationWarning,
    Recalibrator,
    absent_unmasked,
    check_label_unmasked,
    check_masked_rows,
    class_count_error,
    label_separation,
    short_repr,
    state_array,
    state_error,
    state_value,
    warn_if_few_samples,
    warn_if_probabilities,
    warn_if_unconverged,
)
from crossent.calibration._inputs import (
    ArrayLike,
    _caller_level,
    as_labels,
    as_matrix,
    check_choice,
    check_int,
    check_real,
    check_real_scores,
    iter_chunks,
)
from crossent.calibration._rows import row_statistics
from crossent.calibration.metrics import _check_n_bins, table_from_scores

__all__ = ["TemperatureScaler", "VectorScaler"]

A = TypeVar("A", np.ndarray, torch.Tensor)

_GOLDEN = (math.sqrt(5.0) - 1.0) / 2.0


def golden_section(
    f: Callable[[float], float], a: float, b: float, *, max_iter: int = 80, tol: float = 0.0
) -> tuple[float, float]:
    """Golden-section search for a minimum of ``f`` on ``[a, b]`` (exact for a unimodal ``f``):
    each step keeps the sub-interval around the lower of two interior points, which shrinks the
    bracket by the golden ratio and reuses one point. Stops after ``max_iter`` steps or when the
    bracket is at most ``tol`` wide; returns the final bracket."""
    c, d = b - _GOLDEN * (b - a), a + _GOLDEN * (b - a)
    fc, fd = f(c), f(d)
    for _ in range(max_iter):
        if b - a <= tol:
            break
        if fc <= fd:
            b, d, fd = d, c, fc
            c = b - _GOLDEN * (b - a)
            fc = f(c)
        else:
            a, c, fc = c, d, fd
            d = a + _GOLDEN * (b - a)
            fd = f(d)
    return a, b


def _nll_derivatives(z: torch.Tensor, y: np.ndarray, s: float) -> tuple[float, float, float]:
    """Mean NLL of softmax(s z) and its first two derivatives in s: one read of the rows
    (:func:`~crossent.calibration._rows.row_statistics` with ``moments``)."""
    r = row_statistics(z, torch.from_numpy(y), from_logits=True, name="logits", scale=s, moments=True)
    assert r.nll is not None and r.dmean is not None and r.dvar is not None
    # per-row values are O(1); their float64 sums over rows keep the total accurate
    n = z.shape[0]
    return float(r.nll.sum()) / n, float(r.dmean.sum()) / n, float(r.dvar.sum()) / n


def _top_conf_at(z: torch.Tensor, y: np.ndarray, t: float) -> np.ndarray:
    """Top-label confidence of softmax(z / t) for every row."""
    yt = torch.from_numpy(y)
    return row_statistics(z, yt, from_logits=True, name="logits", scores=False, scale=1.0 / t).conf


#: Where the guard's two mean NLLs (at T = 1 and at the fit) from float32, float16 or bfloat16
#: rows differ by at most this much (relative to max(1, |NLL|)), it takes them again in float64.
#: A row's NLL from the float32 pass, b (m - z_y) + log s, errs by the relative error of s: the
#: exponentials' arguments b (z - m) rounded in float32 (at most 1.2e-7 E_p[|b (z - m)|] <=
#: 1.2e-7 log C, as s >= 1) and float partial sums of at most 256 terms a lane (1.5e-5): 2e-5 at
#: most, five times below the margin (measured: 4e-7 at most, for C from 10 to 100,000).
GUARD_MARGIN = 1e-4

#: the dense scan that ends the ECE objective's search: this many temperatures, evenly spaced
#: in log T within this half-width of the best point found before
ECE_SCAN_POINTS = 257
ECE_SCAN_HALF_WIDTH = 0.1
#: the scan's confidences are interpolated in log T between this many exact passes (Chebyshev
#: points of the scan's interval), see :func:`_scan_ece`
ECE_SCAN_NODES = 17


def _scan_ece(z: torch.Tensor, y: np.ndarray, correct: np.ndarray, xs: list[float], n_bins: int,
              seen: dict[float, float]) -> int:
    r"""The top-label ECE at every :math:`x = \log T` of ``xs`` (sorted) into ``seen``, with the
    confidences :math:`1 / s_i(T)` of the rows from :data:`ECE_SCAN_NODES` passes over them in
    place of one pass a temperature; returns the passes made.

    :math:`f_i(x) = \log s_i = \log \sum_k e^{(z_{ik} - m_i) e^{-x}}` is an entire function of
    :math:`x` whose :math:`n`-th derivative is a cumulant of :math:`(z_{ik} - m_i)/T` under the
    row's softmax, at most about :math:`R^n` for a spread :math:`R` of the scaled logits that
    holds much of the probability (the log of a ratio of counts of entries, plus a few: below
    20 for up to 10^5 classes). Its Chebyshev interpolant of degree :math:`n` on an interval of
    half-width :math:`h` errs by about :math:`2 (R h / 2)^{n+1} / (n + 1)!`: 6e-15 for
    :math:`n = 16`, :math:`h = 0.1` and :math:`R = 20`, 7e-10 for :math:`R = 40`, below the
    float32 passes' own round-off (about 1e-7) either way, so the scan's
    ECE is that of the passes it replaces but for a confidence within that round-off of a bin
    edge. The interpolant is evaluated in barycentric form (Berrut and Trefethen 2004), stable
    at any degree, in blocks of scan points that keep the (points, rows) matrix near
    :data:`~crossent.calibration._inputs.CHUNK_ELEMENTS` entries."""
    a, b = xs[0], xs[-1]
    if b > a:  # Chebyshev points of the second kind on [a, b], and their barycentric weights
        n = ECE_SCAN_NODES - 1
        nodes = (a + b) / 2 + (b - a) / 2 * np.cos(np.pi * np.arange(n + 1) / n)
        w = np.where(np.arange(n + 1) % 2 == 0, 1.0, -1.0)
        w[0] /= 2
        w[-1] /= 2
        diff = np.asarray(xs)[:, None] - nodes[None, :]
        exact = diff == 0.0
        coef = w[None, :] / np.where(exact, 1.0, diff)
        coef /= coef.sum(1, keepdims=True)  # the barycentric denominator: never 0 off the nodes
        hit = exact.any(1)
        coef[hit] = exact[hit].astype(np.float64)  # a scan point on a node takes its pass's value
    else:  # every point clipped to one bound: its one pass
        nodes, coef = np.array([a]), np.ones((len(xs), 1))
    f = np.stack([-np.log(_top_conf_at(z, y, math.exp(float(x)))) for x in nodes])
    step = max(1, _inputs.CHUNK_ELEMENTS // max(1, f.shape[1]))
    for start in range(0, len(xs), step):
        block = np.exp(-(coef[start : start + step] @ f))
        for j, conf in enumerate(block):
            seen[xs[start + j]] = table_from_scores(np.clip(conf, 0.0, 1.0), correct,
                                                    n_bins=n_bins).calibration_error("l1")
    return len(nodes)


class TemperatureScaler(Recalibrator):
    r"""Post-hoc calibration by temperature scaling (default) or vector scaling (Guo, Pleiss,
    Sun and Weinberger 2017, *On Calibration of Modern Neural Networks*):

    .. math::
        \hat p_i = \operatorname{softmax}(z_i / T), \qquad
        \hat T = \arg\min_{T \in [T_{\min}, T_{\max}]} -\frac1N \sum_{i=1}^N \log \hat p_{i y_i},

    or :math:`z'_{ik} = z_{ik} / T_k + b_k` for vector scaling (:class:`VectorScaler`). The
    fit is described in the module docstring; netcal's ``TemperatureScaling`` fits the same
    :math:`T` (on probabilities, whose log it takes).

    ``transform`` and ``transform_logits`` are torch ops on a tensor (on its device, in its
    dtype, keeping the autograd graph: differentiable in the logits; NaN stays NaN) and NumPy
    ops on an array (float32 and float16 stay so).

    Parameters
    ----------
    method:
        ``"temperature"``: one scalar :math:`T`; ``"vector"``: per-class :math:`T_k` and
        biases :math:`b_k`.
    t_min, t_max:
        Bounds on the temperature(s); the fit never leaves them.
    max_iter:
        Iteration cap of the optimiser.
    fallback_to_identity:
        On a degenerate fit (bound reached, separable validation set, validation NLL worse
        than at T = 1) use T = 1 instead (default), or keep the fit (``False``); both warn.
        Labels that are all one class make the set separable; for vector scaling, so do
        classes with no validation sample (their biases have no finite optimum).

    Attributes
    ----------
    temperature:
        ``float`` for temperature scaling, a float64 array of shape (C,) for vector scaling.
    bias:
        ``None`` for temperature scaling, a float64 array of shape (C,) for vector scaling.
    n_iter_:
        Passes over the data the fit took (NLL evaluations for vector scaling).
    fallback:
        ``None`` when the fitted temperature is used, else why T = 1 replaced it.
    diagnostic:
        The problem found with the fit (``None`` if none), also when it was kept.
    diagnostic_kind:
        Which check found it: ``"bound"``, ``"separable"`` or ``"nll"`` (a validation NLL
        worse than at T = 1); ``None`` if none.

    Examples
    --------
    Logits three times too confident (labels drawn from ``softmax(z)``, logits ``3 z``) give
    T close to 3:

    >>> g = torch.Generator().manual_seed(0)
    >>> z = torch.randn(2000, 5, generator=g) * 2
    >>> labels = torch.multinomial(torch.softmax(z, 1), 1, generator=g).squeeze(1)
    >>> scaler = TemperatureScaler().fit(3 * z, labels)
    >>> round(scaler.temperature, 1)
    3.1
    >>> probs = scaler.transform(3 * z)    # softmax(3 z / T); transform_logits gives 3 z / T
    """

    def __init__(
        self,
        method: Literal["temperature", "vector"] = "temperature",
        *,
        t_min: float = 1e-2,
        t_max: float = 1e2,
        max_iter: int = 100,
        fallback_to_identity: bool = True,
    ) -> None:
        super().__init__(fallback_to_identity=fallback_to_identity)
        self.method = check_choice("method", method, ("temperature", "vector"))
        bounds = "a number, with 0 < t_min < t_max < inf"
        self.t_min = check_real("t_min", t_min, what=bounds)
        self.t_max = check_real("t_max", t_max, what=bounds)
        if not (0 < self.t_min < self.t_max < math.inf):
            raise ValueError(f"need 0 < t_min < t_max < inf, got t_min={t_min}, t_max={t_max}")
        self.max_iter = check_int("max_iter", max_iter, low=1)
        self._temperature: float | np.ndarray | None = None
        self.bias: np.ndarray | None = None
        self.n_iter_ = 0

    def __repr__(self) -> str:
        fitted = "" if self._temperature is None else f", temperature={self._temperature!r}"
        return f"TemperatureScaler(method={self.method!r}{fitted})"

    @property
    def temperature(self) -> float | np.ndarray:
        """The fitted temperature (``float``), or per-class temperatures for vector scaling."""
        if self._temperature is None:
            raise RuntimeError(f"{type(self).__name__} is not fitted: call fit(logits, labels) first")
        return self._temperature

    # ------------------------------------------------------------------ fitting
    def fit(
        self,
        logits: ArrayLike,
        labels: ArrayLike,
        *,
        objective: Literal["nll", "ece"] = "nll",
        n_bins: int = 15,
        init_temperature: float = 1.0,
    ) -> TemperatureScaler:
        """Fit on validation ``logits`` (N, C) and integer ``labels`` (N,); returns ``self``.

        ``objective="nll"`` (default) minimises the validation NLL; ``objective="ece"``
        minimises the top-label width-binned ECE with ``n_bins`` bins (temperature scaling
        only). ``init_temperature`` is where the NLL iteration starts (clipped to the bounds);
        the result does not depend on it.

        The guard judges every fit by the validation NLL, the ECE objective's too: near
        :math:`T = 1` an ECE-fitted temperature often has a higher validation NLL than
        :math:`T = 1`, and then falls back to it; ``fallback_to_identity=False`` keeps it (with
        the warning).
        """
        objective = check_choice("objective", objective, ("nll", "ece"))
        n_bins = _check_n_bins(n_bins)
        init_temperature = check_real("init_temperature", init_temperature, what="a finite number > 0")
        if not (init_temperature > 0 and math.isfinite(init_temperature)):
            raise ValueError(
                f"init_temperature must be a finite number > 0, got {init_temperature}"
            )
        z = as_matrix(logits, "logits")
        y = as_labels(labels, z.shape[0], z.shape[1])
        warn_if_probabilities(z, type(self).__name__)
        # masked logits (-inf) are taken: probability 0 at every T (the rows' other checks are
        # those of the passes over them)
        check_label_unmasked(z, y)
        if self.method == "vector":
            if objective != "nll":
                raise ValueError("vector scaling is fitted on the NLL only: use objective='nll'")
            k = z.shape[1]
            check_masked_rows(z, type(self).__name__, masked_ok=True)  # every row, fitted or not
            warn_if_few_samples(type(self).__name__, z.shape[0], 2 * k, k, "TemperatureScaler")
            if self.fallback_to_identity and absent_unmasked(y, k, z).size:
                # a class with no sample falls back whatever the fit (_check_fit says why): no
                # fit to throw away (a vocabulary's 32,000 classes took minutes)
                self._temperature, self.bias, self.n_iter_ = np.ones(k), np.zeros(k), 0
            else:
                self._fit_vector(z, y)
        elif objective == "nll":
            self._temperature = self._fit_nll(z, y, init_temperature)
            self.bias = None
        else:
            self._temperature = self._fit_ece(z, y, n_bins)
            self.bias = None
        self._fitted = True
        self._check_fit(z, y)
        return self

    def _at_upper_bound(self) -> np.ndarray:
        """The indices of the fitted temperatures that sit on ``t_max`` (``[0]`` for the one)."""
        t = np.atleast_1d(np.asarray(self.temperature, dtype=np.float64))
        return np.flatnonzero(t >= self.t_max * (1 - 1e-9))

    def _at_lower_bound(self) -> np.ndarray:
        """The indices of the fitted temperatures that sit on ``t_min`` (``[0]`` for the one)."""
        t = np.atleast_1d(np.asarray(self.temperature, dtype=np.float64))
        return np.flatnonzero(t <= self.t_min * (1 + 1e-9))

    def _bound_reached(self) -> str | None:
        """The bound(s) of T the fitted temperature(s) sit on, in words; ``None`` if none."""
        bounds = []
        if self._at_lower_bound().size:
            bounds.append(f"the lower bound t_min={self.t_min:g}")
        if self._at_upper_bound().size:
            bounds.append(f"the upper bound t_max={self.t_max:g}")
        return " and ".join(bounds) or None

    def _scalar_nlls(self, z: torch.Tensor, y: np.ndarray, *, wide: bool) -> tuple[float, float, bool]:
        """The mean NLLs at the identity and at the fitted temperature, and whether every top-1
        prediction is right: two passes of :func:`~crossent.calibration._rows.row_statistics`,
        over the rows as they are or (``wide``) over chunks of them converted to float64."""
        yt = torch.from_numpy(y)
        nll_id = nll_fit = 0.0
        separable = True
        for start, stop in iter_chunks(z) if wide else [(0, z.shape[0])]:
            rows = z[start:stop].to(torch.float64) if wide else z
            ident = row_statistics(rows, yt[start:stop], from_logits=True, name="logits")
            at_t = row_statistics(rows, yt[start:stop], from_logits=True, name="logits",
                                  scale=1.0 / float(self.temperature))
            assert ident.nll is not None and at_t.nll is not None
            separable = separable and bool((ident.pred == y[start:stop]).all())
            nll_id += float(ident.nll.sum())
            nll_fit += float(at_t.nll.sum())
        n = z.shape[0]
        return nll_id / n, nll_fit / n, separable

    def _check_fit(self, z: torch.Tensor, y: np.ndarray) -> None:
        """The guard of :class:`~crossent.calibration._base.Recalibrator` on the validation
        data: the arg-max and the mean NLLs at the identity and at the fit, which it compares to
        a relative 1e-9. With one temperature, from :meth:`_scalar_nlls` over the rows as they
        are, and again in float64 only where the two are within :data:`GUARD_MARGIN` of each
        other (closer than lower-precision passes can tell); vector scaling's in float64 over
        chunks of rows."""
        if self.bias is None and np.ndim(self.temperature) == 0:
            wide = z.dtype == torch.float64
            nll_id, nll_fit, separable = self._scalar_nlls(z, y, wide=wide)
            if not wide and abs(nll_fit - nll_id) <= GUARD_MARGIN * max(1.0, abs(nll_id)):
                nll_id, nll_fit, separable = self._scalar_nlls(z, y, wide=True)
        else:
            yt = torch.from_numpy(y)
            nll_id = nll_fit = 0.0
            separable = True
            for start, stop in iter_chunks(z):
                yb = yt[start:stop, None]
                b64 = z[start:stop].to(torch.float64)
                separable = separable and bool((b64.argmax(1) == yb[:, 0]).all())
                nll_id += float((torch.logsumexp(b64, 1) - b64.gather(1, yb)[:, 0]).sum())
                s = self.transform_logits(b64)
                nll_fit += float((torch.logsumexp(s, 1) - s.gather(1, yb)[:, 0]).sum())
            nll_id, nll_fit = nll_id / z.shape[0], nll_fit / z.shape[0]
        n = z.shape[0]
        consequence = None
        if self.bias is not None:  # vector scaling: an absent class's bias has no finite optimum
            consequence = ("so the fit drives their probabilities towards 0 (their biases down"
                           " without bound, limited only by max_iter)")
        separable, how, consequence = label_separation(
            separable, y, z.shape[1], absent_consequence=consequence, logits=z
        )
        upper = self._at_upper_bound()
        advice = [self._upper_bound_advice(z, y, upper)] if upper.size else []
        lower = self._at_lower_bound()
        if lower.size and not separable:
            # the NLL is convex in w = 1/T: where its optimum is at t_min and the classes are not
            # separated it lies below t_min (logits on a small scale), where a smaller bound reaches
            which = f" {_classes([int(k) for k in lower])}" if self.bias is not None else " it"
            advice.append(f"a smaller bound fits{which} ({type(self).__name__}(t_min={self.t_min / 10:g}),"
                          " or less: the logits are on a small scale)")
        self._guard(
            nll_id,
            nll_fit,
            n,
            at_bound=self._bound_reached(),
            separable=separable,
            n_classes=z.shape[1],
            separable_how=how,
            separable_consequence=consequence,
            advice="; ".join(advice) or None,
        )

    def _upper_bound_advice(self, z: torch.Tensor, y: np.ndarray, upper: np.ndarray) -> str:
        r"""Whether a larger ``t_max`` can help a fit whose temperatures ``upper`` (indices; the
        one temperature: ``[0]``) stopped at it. The NLL is convex in a weight :math:`w = 1/T`,
        so its slope at :math:`w = 0`, the other parameters as fitted, tells: where it is
        :math:`\ge 0` the optimum has :math:`w \le 0`, which no temperature gives; otherwise
        it lies beyond ``t_max``. With one temperature that slope is
        :math:`\frac1N \sum_i (\bar z_i - z_{iy_i})` (uniform predictions, :math:`\bar z_i`
        the row's mean); with per-class ones, :math:`\frac1N \sum_i (p_{ik} - [y_i = k]) z_{ik}`
        for class :math:`k` (:math:`p` the map's with :math:`w_k = 0`)."""
        yt = torch.from_numpy(y)
        slope = np.zeros(upper.size)
        vector = self.bias is not None
        if vector:
            inv = torch.from_numpy(1.0 / np.asarray(self.temperature, dtype=np.float64))
            bias = torch.from_numpy(np.asarray(self.bias, dtype=np.float64))
        for start, stop in iter_chunks(z):
            b64 = z[start:stop].to(torch.float64)
            yb = yt[start:stop]
            if not vector:
                slope[0] += float((b64.mean(1) - b64.gather(1, yb[:, None])[:, 0]).sum())
                continue
            for i, k in enumerate(upper):
                w = inv.clone()
                w[k] = 0.0
                p = torch.softmax(b64 * w + bias, 1)
                slope[i] += float(((p[:, k] - (yb == int(k)).to(torch.float64)) * b64[:, k]).sum())
        larger = f"({type(self).__name__}(t_max={10 * self.t_max:g}), or more)"
        if not vector:
            if slope[0] >= 0:
                return ("no temperature fits these logits: their NLL falls all the way to uniform predictions"
                        " (T -> inf), as the labels' logits lie below their rows' means on average")
            return f"the NLL's optimum lies beyond t_max: a larger bound fits it {larger}"
        beyond = [int(k) for k, s in zip(upper, slope, strict=True) if s < 0]
        none = [int(k) for k, s in zip(upper, slope, strict=True) if s >= 0]
        parts = []
        if beyond:
            parts.append(f"a larger bound fits {_classes(beyond)} {larger}")
        if none:
            parts.append(
                f"no temperature fits {_classes(none)}: the NLL wants a weight 1/T <= 0 on"
                f" {'those logits' if len(none) > 1 else 'that logit'} (noise to the fit, or too few"
                " of its samples)"
            )
        return "; ".join(parts)

    # ------------------------------------------------------------------ state
    name = "temperature"

    def _options(self) -> dict[str, object]:
        return {
            "method": self.method,
            "t_min": self.t_min,
            "t_max": self.t_max,
            "max_iter": self.max_iter,
            "fallback_to_identity": self.fallback_to_identity,
        }

    def _params(self) -> dict[str, object]:
        return {"temperature": self.temperature, "bias": self.bias}

    def _state_owner(self) -> str:
        if self.name == "temperature" and self.method != "temperature":
            return f"'temperature' (TemperatureScaler, method={self.method!r})"
        return super()._state_owner()

    def _set_params(self, params: dict[str, object]) -> None:
        """The temperature(s) of a state lie in the state's [t_min, t_max], as the fit leaves
        them (to a relative 1e-12: vector scaling's are ``exp(log T)``), or are 1 when the
        state records a fallback to the identity (T = 1 may lie outside custom bounds)."""
        owner = self._state_owner()
        identity = 1.0 if self.fallback is not None else None
        note = "t_min and t_max of state['options']"
        note += "" if identity is None else "; 1: the identity of a fallback"
        temperatures = functools.partial(state_array, params, "temperature", owner=owner, ge=self.t_min,
                                         le=self.t_max, slack=1e-12, exempt=identity, note=note)
        if self.method == "temperature":  # one temperature T in [t_min, t_max], no bias
            t = float(temperatures())
            bias = state_value(params, "bias", owner=owner, expected="null", default=None)
            if bias is not None:
                raise state_error(owner, "state['params']['bias']",
                                  "null (method='temperature' has no bias; vector scaling is"
                                  " method='vector')", short_repr(bias))
            self._temperature, self.bias = t, None
            return
        dims: dict[str, tuple[int, str]] = {}  # vector scaling: C temperatures T_k, C biases
        temperature = temperatures(shape=("C",), dims=dims, min_size=2)
        self.bias = state_array(params, "bias", owner=owner, shape=("C",), dims=dims)
        self._temperature = temperature

    def _set_identity(self, n_classes: int) -> None:
        if self.method == "vector":
            self._temperature = np.ones(n_classes)
            self.bias = np.zeros(n_classes)
        else:
            self._temperature = 1.0
            self.bias = None

    def _fit_nll(self, z: torch.Tensor, y: np.ndarray, init: float) -> float:
        s_min, s_max = 1.0 / self.t_max, 1.0 / self.t_min  # bounds on s = 1/T
        lo, hi = s_min, s_max  # bracket: L'(lo) < 0 < L'(hi) once each end is "known"
        lo_known = hi_known = False
        self.n_iter_ = 0

        def derivatives(at: float) -> tuple[float, float]:
            self.n_iter_ += 1
            _, g, h = _nll_derivatives(z, y, at)
            if not (math.isfinite(g) and math.isfinite(h)):
                raise ValueError("logits: the NLL is not finite; check for huge values")
            return g, h

        # Relative step at which to stop: float32 sums cannot resolve L' much further.
        step_tol = 1e-12 if z.dtype == torch.float64 else 1e-6
        s = min(max(1.0 / init, s_min), s_max)
        g, h = derivatives(s)
        run, last_dir = 0, 0
        while self.n_iter_ < self.max_iter:
            if g < 0:
                lo, lo_known = s, True
            elif g > 0:
                hi, hi_known = s, True
            # Converged: flat to 1e-12 per sample in log T, or pushing against a bound.
            if abs(g) * s <= 1e-12 or (g < 0 and s >= s_max) or (g > 0 and s <= s_min):
                break
            direction = 1 if g < 0 else -1  # increase s while the NLL still decreases
            run = run + 1 if direction == last_dir else 1
            last_dir = direction
            cand = s - g / h if h > 0 else (math.inf if direction > 0 else 0.0)
            bound_known = hi_known if direction > 0 else lo_known
            if not (lo < cand < hi) or (run >= 3 and not bound_known):
                # Newton leaves the bracket, or creeps one way (exponential tails of
                # separable data): look at the unexplored bound once, else bisect.
                if not bound_known:
                    bound = s_max if direction > 0 else s_min
                    gb, _ = derivatives(bound)
                    if gb * direction <= 0:  # still decreasing towards the bound: done
                        s = bound
                        break
                    if direction > 0:
                        hi, hi_known = bound, True
                    else:
                        lo, lo_known = bound, True
                    run = 0
                if not (lo < cand < hi):
                    cand = math.sqrt(lo * hi)
            if abs(cand - s) <= step_tol * s or hi / lo - 1.0 <= step_tol:
                s = cand
                break
            s = cand
            g, h = derivatives(s)
        else:  # no break: the steps ran out before the NLL's derivative vanished
            warnings.warn(
                f"{type(self).__name__}: the NLL fit stopped after max_iter={self.max_iter} steps without"
                f" converging (T = {1.0 / s:.6g}, dNLL/d(1/T) = {g:.3g}); raise max_iter",
                CalibrationWarning,
                stacklevel=_caller_level(),  # the first frame outside crossent
            )
        return float(min(max(1.0 / s, self.t_min), self.t_max))

    def _fit_ece(self, z: torch.Tensor, y: np.ndarray, n_bins: int) -> float:
        pred = row_statistics(z, torch.from_numpy(y), from_logits=True, name="logits", scores=False).pred
        correct = (pred == y).astype(np.float64)

        def objective(log_t: float) -> float:
            conf = _top_conf_at(z, y, math.exp(log_t))
            return table_from_scores(conf, correct, n_bins=n_bins).calibration_error("l1")

        # The ECE is a rough, piecewise-smooth function of T (it jumps where a confidence
        # crosses a bin edge): a coarse grid over log T, a finer grid around its best point,
        # golden-section refinement, the NLL temperature as a further candidate, then a dense
        # scan (ECE_SCAN_POINTS over +-ECE_SCAN_HALF_WIDTH in log T) around the best point
        # seen, where a local search alone can stop in a dip next to a lower one.
        seen: dict[float, float] = {}

        def evaluate(x: float) -> float:
            if x not in seen:
                seen[x] = objective(x)
            return seen[x]

        coarse = np.linspace(math.log(self.t_min), math.log(self.t_max), 33)
        best = int(np.argmin([evaluate(float(x)) for x in coarse]))
        a, b = float(coarse[max(best - 1, 0)]), float(coarse[min(best + 1, len(coarse) - 1)])
        fine = np.linspace(a, b, 17)
        best = int(np.argmin([evaluate(float(x)) for x in fine]))
        a, b = float(fine[max(best - 1, 0)]), float(fine[min(best + 1, len(fine) - 1)])
        golden_section(evaluate, a, b, max_iter=self.max_iter, tol=1e-5)
        evaluate(math.log(self._fit_nll(z, y, 1.0)))
        centre = min(seen, key=lambda x: (seen[x], abs(x)))
        lo, hi = math.log(self.t_min), math.log(self.t_max)
        scan = sorted({float(min(max(x, lo), hi)) for x in np.linspace(
            centre - ECE_SCAN_HALF_WIDTH, centre + ECE_SCAN_HALF_WIDTH, ECE_SCAN_POINTS)} - set(seen))
        passes = len(seen)
        if scan:
            passes += _scan_ece(z, y, correct, scan, n_bins, seen)
        self.n_iter_ += passes
        best_x = min(seen, key=lambda x: (seen[x], abs(x)))
        return float(min(max(math.exp(best_x), self.t_min), self.t_max))

    def _fit_vector(self, z: torch.Tensor, y: np.ndarray) -> None:
        n, c = z.shape
        yt = torch.from_numpy(y)
        # Started from the one temperature that fits best (vector scaling with every T_k equal
        # and b = 0): from T = 1, logits on a scale far from 1 (1e-8) give a gradient so small
        # that L-BFGS stops at once, at T ~ 1, without a word. Its warnings are this fit's
        # guard's to give.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            start = math.log(self._fit_nll(z, y, 1.0))
        passes = self.n_iter_
        log_t = torch.full((c,), start, dtype=torch.float64, requires_grad=True)
        bias = torch.zeros(c, dtype=torch.float64, requires_grad=True)

        def lbfgs() -> torch.optim.LBFGS:
            return torch.optim.LBFGS([log_t, bias], lr=1.0, max_iter=self.max_iter, tolerance_grad=1e-10,
                                     tolerance_change=1e-14, history_size=20, line_search_fn="strong_wolfe")

        opt = lbfgs()
        lo, hi = math.log(self.t_min), math.log(self.t_max)
        self.n_iter_ = passes  # the rows are checked (fit)

        def closure() -> torch.Tensor:
            opt.zero_grad()
            total = 0.0
            for start, stop in iter_chunks(z):
                # a graph of its own per chunk: each backward frees the graph it ran through
                inv_t = torch.exp(-log_t.clamp(lo, hi))
                block = z[start:stop].to(torch.float64)
                # a masked logit (-inf) stays -inf at every T_k and b_k; set apart, so that its
                # product with the weight's gradient, 0 * -inf, does not make it NaN
                masked = block == -math.inf
                scaled = torch.where(masked, 0.0, block) * inv_t + bias
                loss = (
                    torch.nn.functional.cross_entropy(
                        scaled.masked_fill(masked, -math.inf), yt[start:stop], reduction="sum"
                    )
                    / n
                )
                loss.backward()
                total += float(loss.detach())
            self.n_iter_ += 1
            return torch.tensor(total, dtype=torch.float64)

        opt.step(closure)
        # The bounds are a clamp of log T: past one, a temperature's gradient is 0 and L-BFGS
        # cannot bring it back, though the best temperature within the bounds may lie inside
        # them (it stuck at t_max where T = 7 fitted better). Projected onto the bounds, where
        # the clamp passes the gradient, the fit starts again where that gradient points a
        # temperature inwards (one at its bound's optimum points outwards: no restart).
        for _ in range(3):
            with torch.no_grad():
                at_lo, at_hi = log_t <= lo, log_t >= hi
                log_t.clamp_(lo, hi)
            if not bool((at_lo | at_hi).any()):
                break
            closure()  # the gradient at the projected point
            grad = log_t.grad
            assert grad is not None
            if not bool(((at_hi & (grad > 0)) | (at_lo & (grad < 0))).any()):
                break
            opt = lbfgs()
            opt.step(closure)
        warn_if_unconverged(opt, self.max_iter, type(self).__name__)
        with torch.no_grad():
            t = torch.exp(log_t.clamp(lo, hi)).numpy().copy()
            b = (bias - bias.mean()).numpy().copy()
        self._temperature = t
        self.bias = b

    # ------------------------------------------------------------------ applying
    def transform_logits(self, logits: A) -> A:
        """Calibrated logits :math:`z / T` (or :math:`z / T_k + b_k`), same type as the input.

        NumPy in gives NumPy out (float32 stays float32), a tensor gives a tensor on its own
        device and dtype (differentiable in the input). An elementwise op, unchecked (no device
        sync): NaN gives NaN, +inf a row of NaN probabilities, -inf (a masked class) stays
        -inf; in half precision :math:`z / T` may overflow (:meth:`predict_proba` scales
        half-precision logits in float32).
        """
        temperature = self.temperature
        if isinstance(logits, torch.Tensor):
            check_real_scores(logits, "logits")  # complex would lose its imaginary part in the cast
            if logits.ndim != 2 or logits.shape[1] < 2:
                raise ValueError(
                    f"logits must be 2-D (N, C) with C >= 2 classes, got shape {tuple(logits.shape)}"
                )
            dtype = logits.dtype if logits.is_floating_point() else torch.float32
            if self.bias is None:
                return logits.to(dtype) / float(temperature)
            t = torch.as_tensor(temperature, dtype=dtype, device=logits.device)
            b = torch.as_tensor(self.bias, dtype=dtype, device=logits.device)
            self._check_classes(logits.shape[1])
            return logits.to(dtype) / t + b
        arr = np.asarray(logits)
        check_real_scores(arr, "logits")
        if arr.ndim != 2 or arr.shape[1] < 2:
            raise ValueError(f"logits must be 2-D (N, C) with C >= 2 classes, got shape {arr.shape}")
        if arr.dtype.kind != "f":
            arr = arr.astype(np.float64)
        if self.bias is None:
            return (arr / arr.dtype.type(temperature)).astype(arr.dtype, copy=False)
        self._check_classes(arr.shape[1])
        t = np.asarray(temperature, dtype=arr.dtype)
        return (arr / t + self.bias.astype(arr.dtype)).astype(arr.dtype, copy=False)

    def predict_proba(self, logits: A) -> A:
        """Calibrated probabilities ``softmax(transform_logits(logits))``, same type as the input.

        Half-precision logits are scaled and normalised in float32 and the probabilities
        stored in their dtype: :math:`z / T` overflows float16 (``1e4 / 0.1``) where the
        probabilities do not.
        """
        if isinstance(logits, torch.Tensor) and logits.dtype in (torch.float16, torch.bfloat16):
            return self.predict_proba(logits.float()).to(logits.dtype)
        if isinstance(logits, np.ndarray) and logits.dtype == np.float16:
            return self.predict_proba(logits.astype(np.float32)).astype(np.float16)
        out = self.transform_logits(logits)
        if isinstance(out, torch.Tensor):
            return torch.softmax(out, dim=1)
        # in place: transform_logits returned a new array, and a second of the batch's size
        # would cost its allocation and page faults again
        out -= out.max(axis=1, keepdims=True)
        np.exp(out, out=out)
        out /= out.sum(axis=1, keepdims=True)
        return out

    def _check_classes(self, c: int) -> None:
        assert self.bias is not None
        if c != self.bias.shape[0]:
            raise class_count_error(c, self.bias.shape[0])


def _classes(ks: list[int]) -> str:
    """Class indices in words: ``class 3``, ``classes 1, 4``, the first five and a count."""
    shown = ", ".join(str(k) for k in ks[:5]) + (f" and {len(ks) - 5} more" if len(ks) > 5 else "")
    return f"classes {shown}" if len(ks) > 1 else f"class {shown}"


class VectorScaler(TemperatureScaler):
    r"""Vector scaling (Guo et al. 2017): :math:`z'_{ik} = z_{ik} / T_k + b_k`, per-class
    temperatures and biases fitted by L-BFGS on the validation NLL.

    ``VectorScaler(**kw)`` is ``TemperatureScaler("vector", **kw)``; netcal's vector scaling
    (``LogisticCalibration`` on logits with a diagonal weight) fits the same map,
    :math:`w_k = 1/T_k`, without bounds on :math:`T_k`.

    A class :math:`k` with no validation sample only lowers the NLL as :math:`b_k \to
    -\infty`: the fit has no finite optimum, so the guard counts the validation set as
    separable, warns and falls back to the identity (``fallback_to_identity=False`` keeps the
    fit and warns), as it does for labels that are all one class.

    A class temperature at a bound falls back, as for :class:`TemperatureScaler`. At ``t_max``
    the warning says, class by class, whether a larger bound can help: where the NLL wants a
    weight :math:`1/T_k \le 0` on a class's logit (netcal's unbounded fit), no temperature
    fits it. That happens where the logit is noise to the fit, and the map that weighs it
    :math:`1/t_{max}` may then be good (``fallback_to_identity=False`` keeps it).

    The 2 C parameters overfit small validation sets, which no check on those sets sees: on a
    long-tailed set of 100 samples (C = 10, one or two samples of the rarest classes) the fit's
    test NLL was 9.9 against the identity's 1.65. The fit warns below
    :data:`~crossent.calibration._base.OVERFIT_SAMPLES_PER_PARAMETER` samples a parameter, as
    matrix scaling does.
    """

    name = "vector"

    def __init__(
        self,
        *,
        t_min: float = 1e-2,
        t_max: float = 1e2,
        max_iter: int = 100,
        fallback_to_identity: bool = True,
    ) -> None:
        super().__init__(
            "vector",
            t_min=t_min,
            t_max=t_max,
            max_iter=max_iter,
            fallback_to_identity=fallback_to_identity,
        )

    def __repr__(self) -> str:
        return "VectorScaler()" if self._temperature is None else "VectorScaler(fitted)"

    def _options(self) -> dict[str, object]:
        options = super()._options()
        del options["method"]
        return options
