r"""Post-hoc recalibration methods beyond temperature scaling, all with one interface.

``fit(val_logits, val_labels) -> self``; ``transform(logits)`` (and its alias
``predict_proba``) gives calibrated probabilities, as netcal's ``transform`` does;
``transform_logits(logits)`` calibrated logits (``log`` of the probabilities for the methods
that are not affine in the logits, so that ``softmax(transform_logits(z)) == transform(z)`` for
every multiclass method; the binary ones give the positive class's (N,) logits, whose
``sigmoid`` is ``transform(z)``); ``state_dict()`` is JSON-ready
(:func:`~crossent.calibration.save`, :func:`~crossent.calibration.load`). Every fit is
checked by the guard of :mod:`crossent.calibration._base` and falls back to the identity map
(with a :class:`~crossent.calibration.CalibrationWarning` and ``fallback`` set) when it is
degenerate, unless ``fallback_to_identity=False``.

Multiclass methods take (N, C) logits and integer labels (N,) (or (N, 1), (1, N));
:class:`PlattScaler` and :class:`BetaCalibrator` take binary (N,) or (N, 1) logits of the
positive class (``from_logits=False`` for probabilities), or (N, 2) logits, and 0/1 labels of
the same forms.

Tensors and arrays. ``transform``, ``predict_proba`` and ``transform_logits`` return the
input's type: a tensor on its device, or a NumPy array, in its (floating) dtype. The methods
here compute in float64 on the CPU: a tensor comes back **detached from the autograd graph**
(no gradient reaches logits that require grad), a NumPy array in its floating dtype (float64
for integers and lists), and NaN or +inf logits are refused. Temperature and vector
scaling (:mod:`crossent.calibration.temperature`) are torch ops on a tensor instead: they keep
its autograd graph, and NaN stays NaN. An empty batch transforms to an empty one, (0, C) or
(0,). Every ``fit`` runs with autograd on, so it works inside ``torch.no_grad()`` and
``torch.inference_mode()`` blocks (on tensors made there too), and leaves the mode as it was.

Masked logits. A logit of -inf (a class the model rules out, as ``F.cross_entropy`` takes
it) has probability 0 before and after recalibration: temperature and vector scaling,
histogram binning, isotonic regression and ensemble temperature scaling fit and transform
such logits (a class masked in every validation row does not count as absent, and the
one-vs-rest maps keep a masked class at 0). A row without a finite logit, or whose label is
masked, is refused by every fit; matrix and Dirichlet scaling, whose maps mix the classes'
logits, refuse -inf by name.

Logits, not probabilities. The multiclass methods take logits only; a fit given rows that look
like probabilities (entries in [0, 1], rows summing to 1) warns with a
:class:`~crossent.calibration.CalibrationWarning`: pass ``log(p)``, whose softmax is ``p``.

Validation labels that miss classes. Labels that are all one class make every fit degenerate
(a map that gives that class probability 1 everywhere fits them perfectly, and every other
class gets probability 0): every method warns and falls back to the identity, with
``diagnostic_kind == "separable"``. When some classes of C >= 3 have no sample but two or more
have, the methods differ:

* temperature scaling and :class:`EnsembleTemperatureScaler` share their parameters over the
  classes, so the fit is determined by the present ones and is used as it is, without a
  warning;
* :class:`~crossent.calibration.VectorScaler`, :class:`MatrixScaler` and
  :class:`DirichletCalibrator` have parameters per class, fitted jointly through the softmax:
  an absent class's probability is driven towards 0 (its bias down), limited only by the
  regularisation and ``max_iter``, so the validation set counts as separable: the whole map
  falls back to the identity (the softmax couples the classes, so an absent class's
  parameters cannot be reset alone);
* :class:`HistogramBinning` and :class:`IsotonicCalibrator` fit one map per class, and an
  absent class's map would give it probability 0 (an infinite NLL on any test sample of it):
  those classes alone keep the identity, their softmax probability, renormalised with the
  calibrated others, and a :class:`~crossent.calibration.CalibrationWarning` names them. The
  present classes keep their fit (``diagnostic_kind == "separable"``, ``fallback`` stays
  ``None``).

With ``fallback_to_identity=False`` each of these cases that warns keeps the raw fit (and warns).

Separated classes of the one-vs-rest maps. :class:`HistogramBinning` and
:class:`IsotonicCalibrator` count a validation set as separable not when every top-1 prediction
is correct (an accurate, underconfident model has finite fits that calibrate it) but when every
class's one-vs-rest problem is separated: its map is 0 or 1 on every validation sample, and
would give a test sample of it probability 0 wherever only other classes' samples fell. Then
the whole map falls back to the identity; when only some classes are separated, those classes
alone use the identity, as absent classes do (``identity_classes`` lists both).

Binary scores that a threshold splits into the two classes make :class:`PlattScaler` and
:class:`BetaCalibrator` diverge (the slope grows without bound): they warn and fall back. Scores
split but for ties at the threshold, where both classes sit (quasi-complete separation, common
with scores that take few values), diverge too, yet the fit calibrates the tied value, which
the identity does not: it is kept, with a warning that the map is a step there (right where new
scores take the same few values, overconfident on any score between the classes), and
``diagnostic`` says so (``diagnostic_kind == "separable"``, ``fallback`` stays ``None``).

Conventions against netcal (Küppers et al. 2020) where the definitions meet:

* :class:`HistogramBinning` and :class:`IsotonicCalibrator` are netcal's one-vs-rest
  ``HistogramBinning`` and ``IsotonicRegression`` on the softmax probabilities, rows
  renormalised. Histogram bins here are ((m-1)/M, m/M] (netcal fits on [a, b) bins and
  applies (a, b]); an empty bin maps to its centre, as in netcal.
* :class:`PlattScaler` is the maximum-likelihood logistic fit :math:`\sigma(a z + b)` without
  Platt's target smoothing (netcal's ``LogisticCalibration`` on binary input, scikit-learn's
  unpenalised ``LogisticRegression``).
* :class:`BetaCalibrator` is the "abm" beta calibration of Kull et al. 2017 with
  :math:`a, b \ge 0` enforced as in the authors' ``betacal`` package (netcal's
  ``BetaCalibration`` leaves the signs free).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from typing import Any, ClassVar, Literal, TypeVar

import numpy as np
import torch
import torch.nn.functional as F

from crossent.calibration import _inputs
from crossent.calibration._base import (
    UNCONVERGED_GRAD,
    CalibrationWarning,
    Recalibrator,
    absent_how,
    absent_unmasked,
    check_fit_logits,
    check_masked_rows,
    class_count_error,
    label_separation,
    params_finite,
    short_repr,
    state_array,
    state_error,
    state_value,
    warn_if_few_samples,
    warn_if_probabilities,
    warn_if_unconverged,
)
from crossent.calibration._inputs import (
    _caller_level,
    _to_tensor,
    as_labels,
    as_matrix,
    check_bool,
    check_choice,
    check_int,
    check_real,
    iter_chunks,
    label_array,
    sum_atol,
)
from crossent.calibration.metrics import _check_n_bins, width_bin_index, width_edges
from crossent.calibration.temperature import TemperatureScaler

# The public names are re-exported by crossent.calibration, whose __all__ lists them.

A = TypeVar("A", np.ndarray, torch.Tensor)

#: the most classes matrix and Dirichlet scaling fit: C (C + 1) parameters, a C x C weight
#: matrix (8 GB at C = 32,000) and a Newton step's or L-BFGS's copies of it
MAX_MATRIX_CLASSES = 2000


def _multiclass(logits: Any, labels: Any, owner: str, *, masked_ok: bool) -> tuple[torch.Tensor, np.ndarray]:
    """The validation logits (float64) and labels of a fit by ``owner`` (the class name);
    masked logits (-inf) where ``masked_ok`` (see :func:`~crossent.calibration._base.check_fit_logits`)."""
    z = as_matrix(logits, "logits")
    y = as_labels(labels, z.shape[0], z.shape[1])
    z64 = z.to(torch.float64)
    check_fit_logits(z64, y, owner, masked_ok=masked_ok)
    warn_if_probabilities(z, owner)
    return z64, y


#: the NumPy floating types that torch holds as they are (others are computed in float64)
_NUMPY_FLOATS: dict[type, torch.dtype] = {np.float16: torch.float16, np.float32: torch.float32,
                                          np.float64: torch.float64}


def _like(out: np.ndarray, x: Any) -> Any:
    """``out`` (float64) as the type of ``x``: a tensor on its device in its floating dtype
    (float32 for an integer tensor), or NumPy in the floating dtype of an array (float64 for
    integer arrays and lists), as temperature and vector scaling return."""
    if isinstance(x, torch.Tensor):
        return torch.from_numpy(out).to(device=x.device, dtype=x.dtype if x.is_floating_point()
                                         else torch.float32)
    if isinstance(x, np.ndarray) and x.dtype.kind == "f":
        return out.astype(x.dtype, copy=False)
    return out


class _Diverged(Exception):
    """Raised inside an L-BFGS closure whose parameters are no longer finite."""


def _lbfgs(params: list[torch.Tensor], loss_fn: Any, max_iter: int, tol: float = 1e-6) -> torch.optim.LBFGS:
    """Minimise ``loss_fn()`` over ``params`` by L-BFGS with a strong-Wolfe line search, to a
    gradient of ``tol`` (1e-6 for the C x C maps, where the softmax leaves directions nearly
    flat and the probabilities converge long before the parameters).

    Parameters that stop being finite cannot come back (every step from NaN is NaN, and the
    line search's comparisons with NaN are all false, so L-BFGS would run on to ``max_iter``):
    the fit stops there, and the guard (:meth:`Recalibrator._guard`) falls back to the
    identity. A non-finite loss at finite parameters (a trial step of the line search) goes on."""
    opt = torch.optim.LBFGS(params, lr=1.0, max_iter=max_iter, tolerance_grad=tol,
                            tolerance_change=tol * 1e-4, history_size=20, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        if not all(bool(torch.isfinite(p).all()) for p in params):
            raise _Diverged
        opt.zero_grad()
        loss = loss_fn()
        loss.backward()
        return loss

    try:
        opt.step(closure)
    except _Diverged:
        pass
    return opt


#: Matrix and Dirichlet scaling take Newton steps with the exact Hessian while a Hessian costs at
#: most this many multiply-adds (N P^2 for N samples and P = C (C + 1) parameters) and P is at
#: most :data:`NEWTON_MAX_PARAMS`; larger problems take L-BFGS. Newton's steps do not depend on
#: how the features are scaled or offset, where L-BFGS slows down on the Dirichlet features
#: log p (large and negative) and on overconfident logits: on an overfit 10-class model's
#: validation set L-BFGS stopped 0.0008-0.27 nats above the optimum of the ODIR objective after
#: 200 steps, Newton reached it in 7-16. Dirichlet fits on one core
#: (``benchmarks/bench_recalibration.py``, BENCHMARKS.md): C = 10, N = 50,000 (6e8 multiply-adds
#: a Hessian) 0.6 s by Newton against 1.8 s by L-BFGS, C = 20, N = 20,000 (3.5e9) 1.3 s against
#: 1.7 s; beyond the limit, C = 40, N = 5,000 (1.3e10) took 5.3 s against 1.2 s (a one-off run).
NEWTON_MAX_WORK = 1e10
NEWTON_MAX_PARAMS = 2_000
#: Newton stops once the largest entry of the objective's gradient is below this.
NEWTON_GRAD_TOL = 1e-10


#: entries of A (see :func:`_affine_hessian`) per chunk of rows: 32 MiB of float64
HESSIAN_CHUNK_ENTRIES = 1 << 22


def _affine_hessian(p: torch.Tensor, xt: torch.Tensor) -> torch.Tensor:
    r"""The Hessian of the mean NLL of :math:`\operatorname{softmax}(\Theta \tilde x_i)` in
    :math:`\Theta` (C, F), flattened row-major, from the softmax ``p`` (N, C) of every row and
    the features ``xt`` (N, F): the block diagonal :math:`\frac1N \sum_i p_{ij} \tilde x_i
    \tilde x_i^T` less :math:`\frac1N A^T A`, :math:`A_{i,(j,a)} = p_{ij} \tilde x_{ia}` (see
    :func:`_newton_affine`), summed over chunks of rows of A (:data:`HESSIAN_CHUNK_ENTRIES`). :math:`A^T A` is
    symmetric: only its row blocks' parts on and below the diagonal are multiplied (about
    half the multiply-adds of the whole product), and mirrored above it."""
    n, k = p.shape
    n_feat = xt.shape[1]
    n_par = k * n_feat
    rows = max(1, HESSIAN_CHUNK_ENTRIES // n_par)
    width = max(64, -(-n_par // 8))  # parameters a row block
    blocks = [(i0, min(i0 + width, n_par)) for i0 in range(0, n_par, width)]
    h = torch.zeros(n_par, n_par, dtype=torch.float64)
    for start in range(0, n, rows):
        pc, xc = p[start : start + rows], xt[start : start + rows]
        a = (pc[:, :, None] * xc[:, None, :]).reshape(-1, n_par)
        for i0, i1 in blocks:
            h[i0:i1, :i1] -= a[:, i0:i1].T @ a[:, :i1]
        for j in range(k):
            block = slice(j * n_feat, (j + 1) * n_feat)
            h[block, block] += (xc * pc[:, j : j + 1]).T @ xc
    for i0, i1 in blocks:
        h[:i0, i0:i1] = h[i0:i1, :i0].T
    return h / n


def _newton_affine(
    x: torch.Tensor, y: torch.Tensor, penalty: torch.Tensor, max_iter: int
) -> tuple[torch.Tensor, int, float]:
    r"""Minimise :math:`f(\Theta) = \frac1N \sum_i -\log \operatorname{softmax}(\Theta \tilde x_i)_{y_i}
    + \frac12 \sum \pi \odot \Theta^2` over :math:`\Theta = [W \mid b]` (C, F + 1), with
    :math:`\tilde x_i = (x_i, 1)` and the penalty weights :math:`\pi` (``penalty``, the
    quadratic term's Hessian), from the identity map, by Newton's method with a backtracking
    (Armijo) line search. The objective is convex; its Hessian is

    .. math::
        H_{(j,a),(l,c)} = \frac1N \sum_i p_{ij} ([j = l] - p_{il})\, \tilde x_{ia} \tilde x_{ic}
            + \pi_{ja} [(j, a) = (l, c)],

    summed over chunks of rows as the block diagonal :math:`\sum_i p_{ij} \tilde x_i \tilde x_i^T`
    less :math:`A^T A` with :math:`A_{i,(j,a)} = p_{ij} \tilde x_{ia}` (:func:`_affine_hessian`),
    and solved by Cholesky where the damped Hessian is positive definite. The softmax leaves the
    directions that add one vector to every row of :math:`\Theta` flat, and an unpenalised
    diagonal keeps some of them flat: a tiny multiple of the identity keeps the solve defined
    there (the gradient has no part in them). It has converged at a gradient below
    :data:`NEWTON_GRAD_TOL`, or at a step that changed the objective by its round-off. Returns
    :math:`\Theta`, the steps taken and the largest entry of the gradient where the fit
    stopped; parameters that stop being finite end the fit (the guard falls back)."""
    n, k = x.shape
    f64 = torch.float64
    xt = torch.cat([x, torch.ones(n, 1, dtype=f64)], 1)
    n_feat = k + 1
    n_par = k * n_feat
    theta = torch.cat([torch.eye(k, dtype=f64), torch.zeros(k, 1, dtype=f64)], 1)

    def value(th: torch.Tensor) -> float:
        return float(F.cross_entropy(xt @ th.T, y) + 0.5 * (penalty * th.square()).sum())

    def gradient(th: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The softmax of every row and the objective's gradient at ``th``."""
        p = torch.softmax(xt @ th.T, 1)
        return p, (p - F.one_hot(y, k).to(f64)).T @ xt / n + penalty * th

    grad_max, steps, damping, converged = math.inf, 0, 0.0, False
    f = value(theta)
    while steps < max_iter:
        steps += 1
        p, g = gradient(theta)
        grad_max = float(g.abs().max())
        if not math.isfinite(grad_max):  # the objective overflows (features near 1e308): no usable map
            theta = torch.full_like(theta, math.nan)
            break
        if grad_max < NEWTON_GRAD_TOL:
            converged = True
            break
        h = _affine_hessian(p, xt)
        h += torch.diag(penalty.reshape(-1))
        scale = max(float(h.diagonal().abs().max()), 1e-300)
        accepted = False
        while damping <= 1e12 * scale and not accepted:
            # Levenberg-Marquardt: where the step is no descent or its line search fails (a
            # Hessian of saturated softmax rows, summed in float64, can lose its positivity), a
            # larger multiple of the identity turns the step towards the gradient's
            system = h + torch.eye(n_par, dtype=f64) * (damping + 1e-12 * scale)
            # Cholesky where the damped Hessian is positive definite (as convexity makes it but
            # for round-off): half the work of LU, which takes the other systems
            rhs = g.reshape(-1, 1)
            try:
                step = torch.cholesky_solve(rhs, torch.linalg.cholesky(system)).reshape(k, n_feat)
            except torch.linalg.LinAlgError:
                step = torch.linalg.solve(system, rhs).reshape(k, n_feat)
            slope = float((g * step).sum())
            t = 1.0
            while slope > 0 and t >= 1e-4 and not accepted:  # Armijo: a sufficient decrease
                trial = theta - t * step
                f_new = value(trial)
                accepted = f_new <= f - 1e-4 * t * slope
                t *= 0.5
            damping = damping / 10 if accepted else max(10 * damping, 1e-8 * scale)
        if not accepted:
            break  # no step lowers the objective: as low as float64 lets it go
        decrease = f - f_new
        theta, f = trial, f_new
        if decrease <= 1e-15 * max(1.0, abs(f)):
            converged = True  # at the optimum to the float64 round-off of the objective
            break
    if not converged and bool(torch.isfinite(theta).all()):  # the gradient where the fit stopped
        grad_max = float(gradient(theta)[1].abs().max())
    return theta, steps, grad_max


class _MulticlassRecalibrator(Recalibrator):
    """Shared parts of the (N, C)-logit methods: the guard, ``transform_logits``/``predict_proba``."""

    #: for the maps with parameters per class: what the fit does with a class that has no
    #: validation sample (the guard then counts the set as separable); ``None`` for the maps
    #: whose parameters are shared or one-vs-rest
    _absent_consequence: ClassVar[str | None] = None
    #: whether the map has parameters per class, so that it takes logits of the classes it was
    #: fitted on only; the maps of shared parameters (ensemble temperature scaling, like
    #: temperature scaling) apply to any number of classes
    _per_class: ClassVar[bool] = True
    #: whether the fit and transform take masked logits (-inf); maps that mix the classes'
    #: logits (matrix and Dirichlet scaling) do not
    _masked_ok: ClassVar[bool] = True
    #: the number of classes of the fit: logits of another are refused even where the map
    #: fell back to the identity, whose parameters do not say it (None once a state is loaded)
    _n_classes: int | None = None
    #: the fewest rows of a chunk of :meth:`_rows_out` (a map that loops over the classes in
    #: Python pays that loop per chunk)
    _min_chunk_rows: ClassVar[int] = 1

    def _probs64(self, z: torch.Tensor) -> np.ndarray:
        raise NotImplementedError

    def _rows_out(self, logits: Any, fn: Callable[[np.ndarray], np.ndarray]) -> Any:
        """``fn`` of the calibrated probabilities (float64, (n, C) to (n, C)), in the input's type
        (:func:`_like`'s rule); an empty batch gives (0, C). The logits are refused where NaN or
        +inf (a bin or a fitted map would turn NaN into a finite probability, or give NaN rows),
        and where masked (-inf) as :func:`~crossent.calibration._base.check_masked_rows` says.

        Every map is one of rows, so the rows go through it by chunks of about
        :data:`~crossent.calibration._inputs.CHUNK_ELEMENTS` entries (``_min_chunk_rows`` rows
        at least) into an output allocated once in its final dtype: the float64 temporaries are
        a chunk's, not the whole batch's (a batch of 2,000 x 32,000 logits would otherwise make
        several of 512 MB)."""
        self._check_fitted()
        t = as_matrix(logits, "logits", empty_ok=True)
        if self._per_class and self._n_classes is not None and t.shape[1] != self._n_classes:
            raise class_count_error(t.shape[1], self._n_classes)
        check_masked_rows(t, type(self).__name__, masked_ok=self._masked_ok)
        dtype = torch.float64
        if isinstance(logits, torch.Tensor):
            dtype = logits.dtype if logits.is_floating_point() else torch.float32
        elif isinstance(logits, np.ndarray) and logits.dtype.kind == "f":
            dtype = _NUMPY_FLOATS.get(logits.dtype.newbyteorder("=").type, torch.float64)
        out = torch.empty(tuple(t.shape), dtype=dtype)
        step = max(self._min_chunk_rows, _inputs.CHUNK_ELEMENTS // max(1, t.shape[1]))
        for start in range(0, t.shape[0], step):
            block = t[start : start + step].to(torch.float64)
            out[start : start + step] = torch.from_numpy(fn(self._probs64(block)))
        if isinstance(logits, torch.Tensor):
            return out.to(logits.device)
        res = out.numpy()
        if isinstance(logits, np.ndarray) and logits.dtype.kind == "f" and res.dtype != logits.dtype:
            return res.astype(logits.dtype)  # big-endian or extended precision, as given
        return res

    def predict_proba(self, logits: A) -> A:
        """Calibrated probabilities (N, C), of the input's type."""
        return self._rows_out(logits, lambda p: p)  # type: ignore[no-any-return]

    def transform_logits(self, logits: A) -> A:
        """Calibrated logits: the log of :meth:`predict_proba` (probabilities of 0 give
        ``log`` of the smallest normal float64)."""
        tiny = np.finfo(np.float64).tiny
        return self._rows_out(logits, lambda p: np.log(np.maximum(p, tiny)))  # type: ignore[no-any-return]

    def _separation(self, z: torch.Tensor, y: np.ndarray) -> tuple[bool, str | None, str | None]:
        """Whether the validation set is separable for this map, how, and what that does to
        the fit (:func:`~crossent.calibration._base.label_separation`)."""
        top1 = bool((z.argmax(1) == torch.from_numpy(y)).all())
        return label_separation(top1, y, z.shape[1], absent_consequence=self._absent_consequence, logits=z)

    def _check_fit(
        self, z: torch.Tensor, y: np.ndarray, at_bound: str | None = None, *, note: str | None = None,
        separation: tuple[bool, str | None, str | None] | None = None,
    ) -> None:
        """The guard on the validation data. ``note``: a problem the fit has already handled
        (absent classes of a one-vs-rest map), the diagnostic when the guard finds none;
        ``separation``: :meth:`_separation`'s answer where the fit has it already."""
        yt = torch.from_numpy(y)
        self._n_classes = z.shape[1]
        nll_id = float((torch.logsumexp(z, 1) - z.gather(1, yt[:, None])[:, 0]).mean())
        p = self._probs64(z)
        nll_fit = float(-np.log(np.maximum(p[np.arange(len(y)), y], np.finfo(np.float64).tiny)).mean())
        separable, how, consequence = self._separation(z, y) if separation is None else separation
        self._guard(nll_id, nll_fit, len(y), at_bound=at_bound, separable=separable,
                    n_classes=z.shape[1], separable_how=how, separable_consequence=consequence)
        if self.diagnostic is None and note is not None:
            self.diagnostic, self.diagnostic_kind = note, "separable"

    def _read_identity_classes(self, params: dict[str, Any], n_classes: int | None) -> list[int]:
        """``params["identity_classes"]`` of a loaded state, checked (a missing key, as in states
        written before it existed, is no class): distinct classes of ``range(n_classes)``, or
        none when the whole map is the identity (``n_classes`` ``None``)."""
        owner, where = self._state_owner(), "state['params']['identity_classes']"
        if n_classes is None:
            value = state_value(params, "identity_classes", owner=owner, expected="", default=[])
            if not (isinstance(value, (list, tuple)) and len(value) == 0):
                raise state_error(owner, where, "an empty list when the whole map is the identity"
                                  " (its other parameter null)", short_repr(value))
            return []
        classes = state_array(params, "identity_classes", owner=owner, shape=(None,), integer=True,
                              ge=0, le=n_classes - 1, default=[])
        unique, counts = np.unique(classes, return_counts=True)
        if (counts > 1).any():
            raise state_error(owner, where, "a list of distinct classes",
                              f"{classes.tolist()} (class {int(unique[counts > 1][0])} more than once)")
        return [int(c) for c in classes]

    def _n_classes_param(self, identity: bool) -> dict[str, int]:
        """The state's ``n_classes`` of a one-vs-rest map that is the identity (its other
        parameter null), which alone does not show the number of classes of the fit."""
        return {"n_classes": self._n_classes} if identity and self._n_classes is not None else {}

    def _read_n_classes(self, params: dict[str, Any], n_classes: int | None) -> None:
        """``params["n_classes"]`` of a loaded state of a one-vs-rest map (see
        :meth:`_n_classes_param`): a whole number >= 2, equal to ``n_classes`` (the map's own)
        where the map gives it; missing or null in states written before it existed. Sets
        ``_n_classes``, so that logits of another number of classes are refused after a load
        as after the fit."""
        value = state_value(params, "n_classes", owner=self._state_owner(), expected="", default=None)
        if value is None:
            self._n_classes = n_classes
            return
        due = ("a whole number >= 2 or null" if n_classes is None
               else f"{n_classes} (the map's classes) or null")
        if not isinstance(value, int) or isinstance(value, bool):
            raise state_error(self._state_owner(), "state['params']['n_classes']", due,
                              short_repr(value), TypeError)
        if value < 2 or (n_classes is not None and value != n_classes):
            raise state_error(self._state_owner(), "state['params']['n_classes']", due, short_repr(value))
        self._n_classes = value


# --------------------------------------------------------------------------------------------
# matrix and Dirichlet scaling



class MatrixScaler(_MulticlassRecalibrator):
    r"""Matrix scaling (Guo et al. 2017) with the ODIR regulariser of Kull et al. 2019.

    .. math::
        \hat p = \operatorname{softmax}(W f(z) + b), \qquad
        \min_{W, b}\ \frac1N\sum_i -\log \hat p_{i y_i}
            + \frac{\lambda}{K(K-1)}\sum_{j \ne k} W_{jk}^2 + \frac{\mu}{K}\sum_k b_k^2

    with :math:`f(z) = z` (the logits). Off-diagonal and intercept regularisation (ODIR,
    Kull et al. 2019, *Beyond temperature scaling: Obtaining well-calibrated multi-class
    probabilities with Dirichlet calibration*) leaves the diagonal free, so the fit can
    still rescale every class. ``reg_off_diagonal`` is :math:`\lambda`, ``reg_bias``
    :math:`\mu`; the paper picks both by cross-validation. Fitted from :math:`W = I, b = 0`
    (the identity), in float64, by Newton's method with the exact Hessian (damped where a step
    would not descend) up to :data:`NEWTON_MAX_PARAMS` parameters and :data:`NEWTON_MAX_WORK`
    multiply-adds a Hessian, which reaches the optimum in about 5-50 steps on logits of
    ordinary scale, overconfident ones (x10, x100) included; by L-BFGS beyond (``max_iter``
    bounds the steps of either). Logits scaled far from that (below 1e-6 or above 1e6) can stop
    short of the optimum, with a warning where the gradient is left above 1e-2, and a fit
    without the bias penalty (``reg_bias=0``) on logits with a large common offset takes a
    hundred or more steps.

    A class :math:`k` with no validation sample only lowers the NLL as
    :math:`\hat p_{ik} \to 0`: the fit drives row :math:`k` of :math:`W f(z) + b` down,
    limited only by the regulariser and ``max_iter`` (for :class:`DirichletCalibrator`, whose
    features :math:`\log p_{ik}` are negative, the free diagonal :math:`W_{kk}` alone does it
    without bound). The guard counts such a validation set as separable: it warns and falls
    back to the identity (``fallback_to_identity=False`` keeps the fit and warns), as it does
    for labels that are all one class.

    The :math:`K(K + 1)` parameters overfit small validation sets, which no check on those
    sets sees (the validation NLL falls, the test NLL rises): the fit warns below
    :data:`~crossent.calibration._base.OVERFIT_SAMPLES_PER_PARAMETER` samples a parameter
    (1,100 for K = 10), and judging it on held-out data, as ``crossent calibrate`` does, is the
    cure.
    """

    _absent_consequence = ("so the fit drives their probabilities towards 0, limited only by"
                           " the regularisation and max_iter")

    name = "matrix"
    _masked_ok = False

    def __init__(
        self,
        *,
        reg_off_diagonal: float = 1e-2,
        reg_bias: float = 1e-2,
        max_iter: int = 200,
        fallback_to_identity: bool = True,
    ) -> None:
        super().__init__(fallback_to_identity=fallback_to_identity)
        regs = []
        for arg, value in (("reg_off_diagonal", reg_off_diagonal), ("reg_bias", reg_bias)):
            reg = check_real(arg, value, what="a finite number >= 0")
            if not (reg >= 0 and math.isfinite(reg)):
                raise ValueError(f"{arg} must be a finite number >= 0, got {value!r}")
            regs.append(reg)
        self.reg_off_diagonal, self.reg_bias = regs
        self.max_iter = check_int("max_iter", max_iter, low=1)
        self.weight: np.ndarray | None = None
        self.bias: np.ndarray | None = None

    def _features(self, z: torch.Tensor) -> torch.Tensor:
        return z

    def fit(self, logits: Any, labels: Any) -> MatrixScaler:
        """Fit on validation logits (N, C) and labels (N,); returns ``self``."""
        z, y = _multiclass(logits, labels, type(self).__name__, masked_ok=self._masked_ok)
        k = z.shape[1]
        if k > MAX_MATRIX_CLASSES:
            raise ValueError(
                f"{type(self).__name__} fits C (C + 1) = {k * (k + 1):,} parameters for C = {k} classes,"
                f" a Hessian or weight matrix of {8 * k * k / 2**30:.1f} GiB or more: it is for up to"
                f" {MAX_MATRIX_CLASSES:,} classes; TemperatureScaler or VectorScaler scale a vocabulary"
            )
        x = self._features(z)
        n_params = k * (k + 1)
        warn_if_few_samples(type(self).__name__, z.shape[0], n_params, k, "TemperatureScaler or VectorScaler")
        yt = torch.from_numpy(y)
        off = 1.0 - torch.eye(k, dtype=torch.float64)
        alpha, beta = self.reg_off_diagonal / (k * (k - 1)), self.reg_bias / k
        w = torch.eye(k, dtype=torch.float64)
        b = torch.zeros(k, dtype=torch.float64)
        if self.fallback_to_identity and self._separation(z, y)[0]:
            pass  # separable: the guard below restores the identity, so skip the optimiser
        elif n_params <= NEWTON_MAX_PARAMS and z.shape[0] * n_params**2 <= NEWTON_MAX_WORK:
            # the penalty's Hessian: 2 alpha on the off-diagonal weights, 2 beta on the biases
            penalty = torch.cat([2 * alpha * off, torch.full((k, 1), 2 * beta, dtype=torch.float64)], 1)
            theta, steps, grad = _newton_affine(x, yt, penalty, self.max_iter)
            w, b = theta[:, :k], theta[:, k]
            # a large gradient left: out of steps, or stalled (no step lowers the objective in
            # float64, or none by more than its round-off, which a huge objective makes large)
            if grad > UNCONVERGED_GRAD and params_finite(theta.numpy()):
                why, fix = f"after max_iter={self.max_iter} Newton steps", "raise max_iter"
                if steps < self.max_iter:
                    why = f"after {steps} Newton steps (no step lowered the objective more)"
                    fix = "rescale the logits, whose scale is extreme"
                warnings.warn(
                    f"{type(self).__name__}: the fit stopped {why} with a gradient of {grad:.3g}, far from"
                    f" its optimum; {fix}", CalibrationWarning, stacklevel=_caller_level(),
                )
        else:  # L-BFGS on (W, b) as the objective states them (centring the features slows it)
            w.requires_grad_(True)
            b.requires_grad_(True)

            def loss() -> torch.Tensor:
                nll = F.cross_entropy(x @ w.T + b, yt)
                return nll + alpha * (w * off).square().sum() + beta * b.square().sum()

            opt = _lbfgs([w, b], loss, self.max_iter)
            if params_finite(w.detach().numpy()):
                warn_if_unconverged(opt, self.max_iter, type(self).__name__)
        self.weight = w.detach().numpy().copy()
        self.bias = b.detach().numpy().copy()
        self._fitted = True
        self._check_fit(z, y)
        return self

    def _probs64(self, z: torch.Tensor) -> np.ndarray:
        assert self.weight is not None and self.bias is not None
        if z.shape[1] != self.weight.shape[0]:
            raise class_count_error(z.shape[1], self.weight.shape[0])
        s = self._features(z) @ torch.from_numpy(self.weight).T + torch.from_numpy(self.bias)
        return np.asarray(torch.softmax(s, 1).numpy())

    def _set_identity(self, n_classes: int) -> None:
        self.weight = np.eye(n_classes)
        self.bias = np.zeros(n_classes)

    def _params(self) -> dict[str, Any]:
        return {"weight": self.weight, "bias": self.bias}

    def _set_params(self, params: dict[str, Any]) -> None:
        owner, dims = self._state_owner(), dict[str, tuple[int, str]]()  # W (C, C), b (C,)
        weight = state_array(params, "weight", owner=owner, shape=("C", "C"), dims=dims, min_size=2)
        self.bias = state_array(params, "bias", owner=owner, shape=("C",), dims=dims)
        self.weight = weight

    def _options(self) -> dict[str, Any]:
        return {**super()._options(), "reg_off_diagonal": self.reg_off_diagonal,
                "reg_bias": self.reg_bias, "max_iter": self.max_iter}


class DirichletCalibrator(MatrixScaler):
    r"""Dirichlet calibration (Kull et al. 2019): matrix scaling of the log-probabilities,
    :math:`\hat p = \operatorname{softmax}(W \log \operatorname{softmax}(z) + b)`, with the
    same ODIR regulariser as :class:`MatrixScaler` (the paper's "Dir-ODIR"). It is the
    multinomial logistic regression on :math:`\log p` that the paper derives from Dirichlet
    class-conditional densities; with :math:`W = I, b = 0` it is the identity.
    """

    name = "dirichlet"

    def _features(self, z: torch.Tensor) -> torch.Tensor:
        return torch.log_softmax(z, 1)


# --------------------------------------------------------------------------------------------
# histogram binning and isotonic regression (one-vs-rest on the softmax probabilities)


def _normalise(q: np.ndarray, fallback: np.ndarray, z: torch.Tensor) -> np.ndarray:
    """Rows of ``q`` divided by their sums; a row summing to zero keeps ``fallback``'s row. A
    masked class (logit -inf in ``z``) keeps probability 0: a one-vs-rest map would give it its
    first bin's value, though the model rules it out."""
    masked = (z == -math.inf).numpy()
    if masked.any():
        q = np.where(masked, 0.0, q)
    s = q.sum(1, keepdims=True)
    zero = s[:, 0] <= 0
    out = np.divide(q, np.where(s > 0, s, 1.0))
    out[zero] = fallback[zero]
    return out


class _OneVsRestRecalibrator(_MulticlassRecalibrator):
    r"""Shared parts of the one-vs-rest maps on the softmax probabilities (histogram binning,
    isotonic regression): a map :math:`g_k` per class, fitted to the 0/1 targets
    :math:`[y_i = k]` on :math:`p_{ik}`, rows renormalised.

    Separation. A class's map is degenerate when it takes only the values 0 and 1 on the
    validation samples: its one-vs-rest problem is *separated* (histogram binning: every bin
    the samples reach holds samples of the class only, or none of it; isotonic regression:
    every sample of the class has a higher :math:`p_{ik}` than every other sample). The map is
    then a classifier with nothing left to calibrate, and it gives a test sample of the class
    probability 0 wherever only other classes' samples fell, an infinite NLL that its
    validation NLL of 0 hides. Every top-1 prediction being correct, the test of the other
    multiclass methods, is neither necessary nor sufficient: an accurate but underconfident
    model has top-1 predictions all correct while each class's positives and negatives
    overlap in :math:`p_{ik}` (the fits are finite, and calibrate).

    * When every class with a validation sample is separated, the guard counts the set as
      separable: the whole map falls back to the identity.
    * When some are, those classes alone keep the identity, :math:`q_{ik} = p_{ik}` before
      the renormalisation, as classes with no validation sample do (``identity_classes``
      lists both), and a :class:`~crossent.calibration.CalibrationWarning` names them
      (``diagnostic_kind == "separable"``, ``fallback`` stays ``None``). Their softmax
      probability is 0 only where the model's is, so no test sample of theirs gets an
      infinite NLL from their map, while the overlapping classes keep the calibration they
      gain. A whole fallback would give that gain up; a kept 0/1 map is right only where the
      separation holds beyond the validation set, which those samples cannot show, and costs
      about 708 nats (``-log`` of the smallest normal float64) for each test sample where it
      does not. On 4 classes with class 0 separated on 400 validation samples by chance
      (margins of 6 for classes 0 and 1, 0.8 for the others) the identity for it cut the test
      NLL of histogram binning from 2.32 to 0.66 (the identity's: 0.60); where class 0 is
      separated in the population too (2,000 samples, margin 7, the others underconfident)
      it cost 0.2 nats (0.64 to 0.84, against the identity's 0.87).

    ``fallback_to_identity=False`` keeps the 0/1 maps (and warns).
    """

    #: what the map of a class with no validation sample gives it
    _absent_zero: ClassVar[str] = ""
    #: how a class's one-vs-rest problem is separated for this map, of "the class"
    _separated_what: ClassVar[str] = ""
    #: where the map of a separated class gives a test sample of it probability 0
    _separated_zero: ClassVar[str] = ""

    def _separated(self, p: np.ndarray, y: np.ndarray) -> np.ndarray:
        """Per class (C,), whether it has a validation sample and its map takes only the
        values 0 and 1 on the validation probabilities ``p`` (N, C) and labels ``y``."""
        raise NotImplementedError

    def _separation(self, z: torch.Tensor, y: np.ndarray) -> tuple[bool, str | None, str | None]:
        """:meth:`_separation_of` the classes :meth:`_separated` finds."""
        return self._separation_of(self._separated(torch.softmax(z, 1).numpy(), y), z, y)

    def _separation_of(
        self, separated: np.ndarray, z: torch.Tensor, y: np.ndarray
    ) -> tuple[bool, str | None, str | None]:
        """Separable when the labels are all one class, or when every class with a validation
        sample has a separated one-vs-rest problem (``separated``, per class; see the class
        docstring)."""
        n_classes = z.shape[1]
        one = label_separation(False, y, n_classes)
        if one[0]:
            return one
        absent = absent_unmasked(y, n_classes, z)
        if int(separated.sum()) + absent.size < n_classes:
            return False, None, None
        if absent.size:
            how = (f"every class with a validation sample has a separated one-vs-rest problem (for each,"
                   f" {self._separated_what}), and {absent_how(absent, n_classes)} no validation sample")
        else:
            how = f"every class's one-vs-rest problem is separated: for each, {self._separated_what}"
        consequence = ("so every class's map takes only the values 0 and 1 on the validation samples and"
                       f" gives a test sample of the class probability 0 {self._separated_zero} (an infinite"
                       " NLL)")
        return True, how, consequence

    def _identity_one_vs_rest(
        self, separated_classes: np.ndarray, y: np.ndarray, z: torch.Tensor
    ) -> tuple[np.ndarray, str | None]:
        """The classes whose maps become the identity (none with ``fallback_to_identity=False``):
        those with no validation sample and those with a separated one-vs-rest problem, unless
        the guard speaks for them all (labels of one class, or every class with a sample
        separated: the whole map falls back); and the problem in words (``None`` if none).
        Warns when there is a problem. A class masked in every row of the logits ``z`` is not
        absent (:func:`~crossent.calibration._base.absent_unmasked`); ``separated_classes``: per
        class, :meth:`_separated`'s answer."""
        n_classes = z.shape[1]
        absent = absent_unmasked(y, n_classes, z)
        if absent.size >= n_classes - 1:
            return absent[:0], None
        separated = np.flatnonzero(separated_classes)
        if absent.size + separated.size in (0, n_classes):
            return absent[:0], None
        parts = []
        if absent.size:
            its, maps, give, them = (("its", "map", "gives", "it") if absent.size == 1
                                     else ("their", "maps", "give", "them"))
            parts.append(f"{absent_how(absent, n_classes)} no validation sample, so {its} one-vs-rest {maps}"
                         f" {give} {them} probability 0 {self._absent_zero} (an infinite NLL on any test"
                         f" sample of {them})")
        if separated.size:
            its, maps, take, give, them = (("its", "map", "takes", "gives", "it") if separated.size == 1
                                           else ("their", "maps", "take", "give", "them"))
            parts.append(f"{absent_how(separated, n_classes)} a separated one-vs-rest problem ("
                         f"{self._separated_what}), so {its} {maps} {take} only the values 0 and 1 on"
                         f" the validation samples and {give} a test sample of {them} probability 0"
                         f" {self._separated_zero} (an infinite NLL)")
        problem = "; ".join(parts)
        which = "it" if absent.size + separated.size == 1 else "them"
        if self.fallback_to_identity:
            action = ("using the identity (the softmax probability, renormalised with the other"
                      f" classes) for {which}; pass fallback_to_identity=False to keep the fit")
        else:
            action = "keeping the fit (fallback_to_identity=False)"
        warnings.warn(f"{type(self).__name__}: {problem}; {action}", CalibrationWarning,
                      stacklevel=_caller_level())
        if not self.fallback_to_identity:
            return absent[:0], problem
        return np.union1d(absent, separated), problem


def _separated_bins(count: np.ndarray, hits: np.ndarray) -> np.ndarray:
    """Per class, from its bins' samples ``count`` and its own ``hits`` (C, M): a sample of it,
    and every reached bin holds only samples of it or none."""
    return np.asarray(((hits == 0) | (hits == count)).all(1) & (hits.sum(1) > 0))


class HistogramBinning(_OneVsRestRecalibrator):
    r"""Histogram binning (Zadrozny and Elkan 2001, *Obtaining calibrated probability estimates
    from decision trees and naive Bayesian classifiers*), one-vs-rest on the softmax
    probabilities.

    For every class :math:`k` the probability :math:`p_{ik}` falls in a width bin
    ((m-1)/M, m/M]; the calibrated value is the frequency of class :math:`k` among the
    validation samples in that bin, :math:`\theta_{km} = |\{i \in B_{km} : y_i = k\}| /
    |B_{km}|` (the bin centre for an empty bin), and the rows are renormalised to sum to one.

    A class with no validation sample would get :math:`\theta_{km} = 0` in every bin the
    validation data reach. When some classes (but not all others) are absent, their maps are
    the identity instead, :math:`q_{ik} = p_{ik}` before the renormalisation, listed in
    ``identity_classes``, and a :class:`~crossent.calibration.CalibrationWarning` names them
    (``diagnostic_kind == "separable"``; ``fallback_to_identity=False`` keeps the zeros).
    Labels that are all one class fall back to the identity map as a whole.

    A class whose every reached bin says "always" or "never" (:math:`\theta_{km} \in \{0, 1\}`
    wherever :math:`|B_{km}| > 0`) has a separated one-vs-rest problem: its map is the identity
    too, and when every class with a sample is separated the whole map falls back
    (``diagnostic_kind == "separable"``; see :class:`_OneVsRestRecalibrator` for why, and why
    every top-1 prediction being correct is not the test here).

    Like netcal's and scikit-learn's, the map gives probability 0 wherever no validation
    sample of the class fell (a bin with no sample of it): a test sample of that class
    there has an NLL of about 708 (log of the smallest normal float64) and lifts the mean NLL
    far above the identity's, which no check on the validation data can see. Judge it on
    held-out data (``crossent calibrate`` compares every method there), or prefer a
    parametric map where the NLL matters.
    """

    name = "histogram"
    _absent_zero = "in every bin the validation samples reach"
    _separated_what = "each bin the validation samples reach holds samples of the class only, or none of it"
    _separated_zero = "in any bin that only samples of other classes reached"

    def __init__(self, n_bins: int = 15, *, fallback_to_identity: bool = True) -> None:
        super().__init__(fallback_to_identity=fallback_to_identity)
        self.n_bins = _check_n_bins(n_bins)
        self.bin_values: np.ndarray | None = None  # (C, M)
        #: the classes whose map is the identity (no validation sample of them, or a separated
        #: one-vs-rest problem)
        self.identity_classes: list[int] = []

    def _counts(self, p: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Per class and bin (C, M): the validation samples :math:`|B_{km}|`, and those of class
        :math:`k` among them."""
        n, k = p.shape
        m = self.n_bins
        idx = width_bin_index(p, m) + np.arange(k) * m  # (N, C): bin of class k at k M + b
        count = np.bincount(idx.reshape(-1), minlength=k * m).reshape(k, m)
        hits = np.bincount(idx[np.arange(n), y], minlength=k * m).reshape(k, m)
        return count, hits

    def _separated(self, p: np.ndarray, y: np.ndarray) -> np.ndarray:
        r"""Per class: a sample of it, and every reached bin holds only samples of it or none
        (:math:`\theta_{km} \in \{0, 1\}` wherever :math:`|B_{km}| > 0`)."""
        return _separated_bins(*self._counts(p, y))

    def fit(self, logits: Any, labels: Any) -> HistogramBinning:
        """Fit on validation logits (N, C) and labels (N,); returns ``self``."""
        z, y = _multiclass(logits, labels, type(self).__name__, masked_ok=self._masked_ok)
        p = torch.softmax(z, 1).numpy()
        count, hits = self._counts(p, y)
        centre = (width_edges(self.n_bins)[:-1] + width_edges(self.n_bins)[1:]) / 2
        self.bin_values = np.where(count > 0, hits / np.maximum(count, 1), centre)
        separated = _separated_bins(count, hits)
        identity, note = self._identity_one_vs_rest(separated, y, z)
        self.identity_classes = [int(c) for c in identity]
        self._fitted = True
        self._check_fit(z, y, note=note, separation=self._separation_of(separated, z, y))
        return self

    def _probs64(self, z: torch.Tensor) -> np.ndarray:
        if self.bin_values is None:  # the identity (after a fallback)
            return np.asarray(torch.softmax(z, 1).numpy())
        k, m = self.bin_values.shape
        if z.shape[1] != k:
            raise class_count_error(z.shape[1], k)
        p = torch.softmax(z, 1).numpy()
        q = np.take_along_axis(self.bin_values.T, width_bin_index(p, m), axis=0)
        if self.identity_classes:
            q[:, self.identity_classes] = p[:, self.identity_classes]
        return _normalise(q, p, z)

    def _set_identity(self, n_classes: int) -> None:
        self.bin_values = None
        self.identity_classes = []

    def _params(self) -> dict[str, Any]:
        return {"bin_values": self.bin_values, "identity_classes": list(self.identity_classes),
                **self._n_classes_param(self.bin_values is None)}

    def _set_params(self, params: dict[str, Any]) -> None:
        owner = self._state_owner()
        expected = f"a C x {self.n_bins} nested list of numbers in [0, 1], or null (the identity)"
        if state_value(params, "bin_values", owner=owner, expected=expected) is None:
            self.identity_classes = self._read_identity_classes(params, None)
            self._read_n_classes(params, None)
            self.bin_values = None
            return
        dims = {"M": (self.n_bins, "the n_bins option")}  # (C, M): a frequency per class and bin
        values = state_array(params, "bin_values", owner=owner, shape=("C", "M"), dims=dims,
                             min_size=2, ge=0.0, le=1.0)
        self.identity_classes = self._read_identity_classes(params, values.shape[0])
        self._read_n_classes(params, values.shape[0])
        self.bin_values = values

    def _options(self) -> dict[str, Any]:
        return {**super()._options(), "n_bins": self.n_bins}


class IsotonicCalibrator(_OneVsRestRecalibrator):
    r"""Isotonic regression (Zadrozny and Elkan 2002, *Transforming classifier scores into
    accurate multiclass probability estimates*), one-vs-rest on the softmax probabilities:
    for every class the non-decreasing step function :math:`g_k` minimising
    :math:`\sum_i (g_k(p_{ik}) - [y_i = k])^2` (pool-adjacent-violators, scikit-learn's
    ``IsotonicRegression`` with ``out_of_bounds="clip"``), rows renormalised. As netcal's
    ``IsotonicRegression``. Needs scikit-learn (the ``run`` extra).

    A class with no validation sample would get :math:`g_k \equiv 0`. When some classes (but
    not all others) are absent, their maps are the identity instead, :math:`g_k(p) = p` (the
    knots ``([0, 1], [0, 1])``), before the renormalisation, and a
    :class:`~crossent.calibration.CalibrationWarning` names them (``diagnostic_kind ==
    "separable"``; ``fallback_to_identity=False`` keeps the zeros), and ``identity_classes``
    lists them. Labels that are all one class fall back to the identity map as a whole.

    A class whose samples all have a higher :math:`p_{ik}` than every other sample (positives
    and negatives do not overlap, so :math:`g_k` is a 0/1 step on the validation samples) has
    a separated one-vs-rest problem: its map is the identity too, and when every class with a
    sample is separated the whole map falls back (``diagnostic_kind == "separable"``; see
    :class:`_OneVsRestRecalibrator` for why, and why every top-1 prediction being correct is
    not the test here).

    As with :class:`HistogramBinning` (see there for what it does to the test NLL), the map
    gives probability 0 wherever no validation sample of the class fell: here an isotonic step
    below every sample of it.
    """

    name = "isotonic"
    _absent_zero = "everywhere"
    _separated_what = "every sample of the class has a higher probability of it than every other sample"
    _separated_zero = "up to the highest probability of the class among the other classes' samples"

    def __init__(self, *, fallback_to_identity: bool = True) -> None:
        super().__init__(fallback_to_identity=fallback_to_identity)
        self.knots: list[tuple[np.ndarray, np.ndarray]] | None = None  # (x, y) per class
        #: the classes whose map is the identity (no validation sample of them, or a separated
        #: one-vs-rest problem)
        self.identity_classes: list[int] = []

    def _separated(self, p: np.ndarray, y: np.ndarray) -> np.ndarray:
        """Per class: a sample of it, and its samples' probabilities all above the other
        samples' (a tie mixes the labels, which the fit pools to a value strictly inside
        (0, 1))."""
        out = np.zeros(p.shape[1], dtype=bool)
        for k in range(p.shape[1]):
            own = y == k
            if own.any():
                out[k] = bool(own.all()) or float(p[~own, k].max()) < float(p[own, k].min())
        return out

    def fit(self, logits: Any, labels: Any) -> IsotonicCalibrator:
        """Fit on validation logits (N, C) and labels (N,); returns ``self``."""
        from crossent._extras import require

        iso = require("sklearn.isotonic", "isotonic calibration")
        z, y = _multiclass(logits, labels, type(self).__name__, masked_ok=self._masked_ok)
        p = torch.softmax(z, 1).numpy()
        separated = self._separated(p, y)
        identity, note = self._identity_one_vs_rest(separated, y, z)
        # the classes whose map becomes the identity are not fitted (at a vocabulary's size,
        # most classes have no validation sample)
        use_identity = np.zeros(p.shape[1], dtype=bool)
        use_identity[identity] = True
        self.knots = []
        for k in range(p.shape[1]):
            if use_identity[k]:  # g(p) = p on [0, 1]: linear interpolation between (0, 0) and (1, 1)
                self.knots.append((np.array([0.0, 1.0]), np.array([0.0, 1.0])))
                continue
            reg = iso.IsotonicRegression(y_min=0.0, y_max=1.0, increasing=True, out_of_bounds="clip")
            reg.fit(p[:, k], (y == k).astype(np.float64))
            self.knots.append((np.asarray(reg.X_thresholds_), np.asarray(reg.y_thresholds_)))
        self.identity_classes = [int(c) for c in identity]
        self._fitted = True
        self._check_fit(z, y, note=note, separation=self._separation_of(separated, z, y))
        return self

    #: a transform interpolates each class's knots in a Python loop per chunk: chunks of 512
    #: rows at least keep that loop's cost small per row at many classes (2^20 entries are 32
    #: rows of 32,000 classes)
    _min_chunk_rows: ClassVar[int] = 512

    def _probs64(self, z: torch.Tensor) -> np.ndarray:
        p = torch.softmax(z, 1).numpy()
        if self.knots is None:
            return p
        if z.shape[1] != len(self.knots):
            raise class_count_error(z.shape[1], len(self.knots))
        # scikit-learn predicts by linear interpolation between its thresholds, clipped
        q = np.stack([np.interp(p[:, k], x, v) for k, (x, v) in enumerate(self.knots)], 1)
        return _normalise(q, p, z)

    def _set_identity(self, n_classes: int) -> None:
        self.knots = None
        self.identity_classes = []

    def _params(self) -> dict[str, Any]:
        knots = None if self.knots is None else [[x.tolist(), v.tolist()] for x, v in self.knots]
        return {"knots": knots, "identity_classes": list(self.identity_classes),
                **self._n_classes_param(knots is None)}

    def _set_params(self, params: dict[str, Any]) -> None:
        """The knots of a state are what scikit-learn's fit leaves (``X_thresholds_`` and
        ``y_thresholds_``, its duplicate scores merged): per class, x strictly increasing and
        y non-decreasing, both in [0, 1]."""
        owner, where = self._state_owner(), "state['params']['knots']"
        pair = "a pair [x, y] of lists of one length of numbers in [0, 1], x increasing, y non-decreasing"
        expected = f"a list of C >= 2 knots, each {pair}, or null (the identity)"
        knots = state_value(params, "knots", owner=owner, expected=expected)
        if knots is None:
            self.identity_classes = self._read_identity_classes(params, None)
            self._read_n_classes(params, None)
            self.knots = None
            return
        if not isinstance(knots, (list, tuple)) or len(knots) < 2:
            found = short_repr(knots) if not isinstance(knots, (list, tuple)) else f"a list of {len(knots)}"
            raise state_error(owner, where, expected, found,
                              ValueError if isinstance(knots, (list, tuple)) else TypeError)
        read = []
        for k, xy in enumerate(knots):  # g_k: linear interpolation between its (x, y) thresholds
            at = f"{where}[{k}]"
            if not isinstance(xy, (list, tuple)) or len(xy) != 2:
                found = f"a list of {len(xy)}" if isinstance(xy, (list, tuple)) else short_repr(xy)
                raise state_error(owner, at, pair, found,
                                  ValueError if isinstance(xy, (list, tuple)) else TypeError)
            dims = dict[str, tuple[int, str]]()
            x = state_array(xy, 0, owner=owner, where=at, shape=("L",), dims=dims, min_size=1, ge=0.0, le=1.0,
                            increasing="strictly")
            v = state_array(xy, 1, owner=owner, where=at, shape=("L",), dims=dims, ge=0.0, le=1.0,
                            increasing="weakly")
            read.append((x, v))
        self.identity_classes = self._read_identity_classes(params, len(read))
        self._read_n_classes(params, len(read))
        self.knots = read


# --------------------------------------------------------------------------------------------
# ensemble temperature scaling


def _uniform(z: torch.Tensor) -> torch.Tensor:
    """The uniform distribution over each row's classes, ``1/K``; over the classes not masked
    (logit -inf: ruled out by the model) where a row masks some."""
    live = (z != -math.inf).to(z.dtype)
    return live / live.sum(1, keepdim=True)


class EnsembleTemperatureScaler(_MulticlassRecalibrator):
    r"""Ensemble temperature scaling (Zhang, Kailkhura and Han 2020, *Mix-n-Match:
    Ensemble and Compositional Methods for Uncertainty Calibration in Deep Learning*).

    .. math::
        \hat p = w_1 \operatorname{softmax}(z / T) + w_2 \operatorname{softmax}(z)
            + w_3 \frac{1}{K}, \qquad w \in \Delta^2,

    with :math:`T \in [0.01, 100]` from temperature scaling (NLL) and the weights minimising
    the validation ``loss``: ``"mse"`` (the squared error to the one-hot label, the default of
    the authors' code) or ``"nll"``. The weights are the softmax of three free parameters
    (L-BFGS).

    Labels that are all one class make the fit degenerate: it warns and falls back to the
    identity (``diagnostic_kind == "separable"``). Classes without a validation sample, when
    two or more others have samples, need nothing special: the temperature and the weights are
    shared by all classes. In a row with masked classes (logit -inf) the uniform term is
    uniform over the others, so that the masked keep probability 0.
    """

    name = "ensemble_temperature"
    _per_class = False  # T and the weights are shared; the uniform term is 1/K of the logits given
    #: the bounds of the temperature (those of the inner :class:`TemperatureScaler`)
    _t_bounds: ClassVar[tuple[float, float]] = (1e-2, 1e2)

    def __init__(self, *, loss: Literal["mse", "nll"] = "mse", fallback_to_identity: bool = True) -> None:
        super().__init__(fallback_to_identity=fallback_to_identity)
        self.loss = check_choice("loss", loss, ("mse", "nll"))
        self.temperature: float | None = None
        self.weights: np.ndarray | None = None

    def fit(self, logits: Any, labels: Any) -> EnsembleTemperatureScaler:
        """Fit on validation logits (N, C) and labels (N,); returns ``self``."""
        z, y = _multiclass(logits, labels, type(self).__name__, masked_ok=self._masked_ok)
        with warnings.catch_warnings():  # the ensemble's own guard speaks for the whole map
            warnings.simplefilter("ignore")
            t_min, t_max = self._t_bounds
            ts = TemperatureScaler(t_min=t_min, t_max=t_max, fallback_to_identity=False).fit(z, y)
        t = float(ts.temperature)
        # Both losses of p = sum_j w_j A_j (A: the three components) need only small sums of
        # them, taken once over chunks of rows: sum_i ||p_i - e_{y_i}||^2 = w'Gw - 2 w'h + N with
        # G_jk = sum_ic A_jic A_kic and h_j = sum_i A_{j,i,y_i}, and the NLL the labels'
        # entries A_{j,i,y_i}; not the (3, N, C) components themselves (4.5 GB at 2,000 x 32,000).
        n = z.shape[0]
        yt = torch.from_numpy(y)
        gram = torch.zeros(3, 3, dtype=torch.float64)
        at_y = torch.empty(n, 3, dtype=torch.float64)
        for start, stop in iter_chunks(z):
            block = z[start:stop]
            comps = torch.stack([torch.softmax(block / t, 1), torch.softmax(block, 1), _uniform(block)])
            gram += torch.einsum("jnc,knc->jk", comps, comps)
            at_y[start:stop] = comps.gather(2, yt[start:stop].expand(3, -1)[:, :, None])[:, :, 0].T
        h = at_y.sum(0)
        a = torch.tensor([1.0, 0.0, 0.0], dtype=torch.float64, requires_grad=True)

        def loss() -> torch.Tensor:
            w = torch.softmax(a, 0)
            if self.loss == "mse":
                return (w @ gram @ w - 2.0 * (w @ h) + n) / n
            return -torch.log((at_y @ w).clamp_min(1e-300)).mean()

        _lbfgs([a], loss, 200)
        self.temperature = t
        self.weights = torch.softmax(a.detach(), 0).numpy().copy()
        self._fitted = True
        self._check_fit(z, y, at_bound=ts._bound_reached())
        return self

    def _probs64(self, z: torch.Tensor) -> np.ndarray:
        assert self.weights is not None and self.temperature is not None
        w = self.weights
        p = w[0] * torch.softmax(z / self.temperature, 1) + w[1] * torch.softmax(z, 1) + w[2] * _uniform(z)
        return np.asarray(p.numpy())

    def _set_identity(self, n_classes: int) -> None:
        self.temperature = 1.0
        self.weights = np.array([0.0, 1.0, 0.0])

    def _params(self) -> dict[str, Any]:
        return {"temperature": self.temperature, "weights": self.weights}

    def _set_params(self, params: dict[str, Any]) -> None:
        owner = self._state_owner()
        t_min, t_max = self._t_bounds
        temperature = float(state_array(params, "temperature", owner=owner, ge=t_min, le=t_max,
                                        note="the bounds of the fit"))
        w = state_array(params, "weights", owner=owner, shape=(3,), ge=0.0)
        if not abs(float(w.sum()) - 1.0) <= 1e-6:  # softmax weights: a point of the simplex
            raise state_error(owner, "state['params']['weights']", "3 numbers >= 0 summing to 1",
                              f"{w.tolist()} (sum {float(w.sum())!r})")
        self.temperature, self.weights = temperature, w

    def _options(self) -> dict[str, Any]:
        return {**super()._options(), "loss": self.loss}


# --------------------------------------------------------------------------------------------
# binary: Platt and beta calibration


class _BinaryRecalibrator(Recalibrator):
    """Shared parts of the binary methods: input handling, guard, ``transform_logits``."""

    #: the length of ``coef`` (the slopes, then the intercept)
    _n_coef: ClassVar[int] = 2
    #: how many of the slopes the fit keeps >= 0
    _n_nonnegative: ClassVar[int] = 0

    def __init__(self, *, from_logits: bool | None = None, fallback_to_identity: bool = True) -> None:
        super().__init__(fallback_to_identity=fallback_to_identity)
        given = check_bool("from_logits", from_logits, none=True)
        #: ``None`` (the default) reads logits, and warns when (N,) scores look like probabilities
        self._from_logits_given = given is not None
        self.from_logits = True if given is None else given
        self.coef: np.ndarray | None = None

    def _scores(self, x: Any, *, fitting: bool = False) -> torch.Tensor:
        """Positive-class logits (float64, 1-D) from (N,) or (N, 1) logits/probabilities or (N, 2);
        ``fitting``: warn when (N, 2) logits look like probabilities."""
        raw = _to_tensor(x, "scores")  # real numbers only, dense, not ragged
        t = raw.to(torch.float64)
        one_score = t.ndim == 1 or (t.ndim == 2 and t.shape[1] == 1)  # not the two columns of (N, 2)
        if t.ndim == 2 and t.shape[1] == 1:  # a one-logit head's column
            t = t[:, 0]
        if t.ndim == 2 and t.shape[1] == 2:
            if fitting and self.from_logits and bool(torch.isfinite(t).all()):
                warn_if_probabilities(t, type(self).__name__, hint=" or from_logits=False")
            if not self.from_logits:  # column 1 is read: the rows must be distributions [1 - p, p]
                off = (t.sum(1) - 1).abs()
                tol = sum_atol(raw.dtype)
                if bool((off > tol).any()):  # NaN passes here and is refused below
                    i = int(torch.nonzero(off > tol)[0, 0])
                    raise ValueError(
                        f"scores: row {i} of the (N, 2) probabilities sums to {float(t[i].sum()):.6g}, not 1"
                        f" (tolerance {tol:g}); pass (N,) probabilities of class 1, or from_logits=True"
                        " for logits"
                    )
            t = t[:, 1] - t[:, 0] if self.from_logits else t[:, 1]
        if t.ndim != 1:
            raise ValueError(f"{type(self).__name__} takes binary scores of shape (N,), (N, 1) or (N, 2),"
                             f" got shape {tuple(t.shape)}")
        if fitting and t.numel() == 0:
            raise ValueError("scores must be non-empty: a fit needs samples")
        if not bool(torch.isfinite(t).all()):
            raise ValueError("scores must be finite (no NaN or infinity)")
        if self.from_logits:
            if (fitting and one_score and not self._from_logits_given and float(t.min()) >= 0
                    and float(t.max()) <= 1 and float(t.min()) < float(t.max())):
                warnings.warn(
                    f"{type(self).__name__}: every score lies in [0, 1], as probabilities do, but"
                    " they are read as logits; pass from_logits=False if they are probabilities,"
                    " or from_logits=True to read them as logits without this warning",
                    CalibrationWarning,
                    stacklevel=_caller_level(),
                )
            return t
        if t.numel() and (float(t.min()) < 0 or float(t.max()) > 1):
            raise ValueError("probabilities must lie in [0, 1]; pass from_logits=True for logits")
        return torch.logit(t, eps=1e-15)

    def _features(self, s: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def _logit(self, s: torch.Tensor) -> torch.Tensor:
        assert self.coef is not None
        return self._features(s) @ torch.from_numpy(self.coef[:-1]) + float(self.coef[-1])

    def transform_logits(self, logits: A) -> A:
        """Calibrated positive-class logits (N,)."""
        self._check_fitted()
        return _like(self._logit(self._scores(logits)).numpy(), logits)  # type: ignore[no-any-return]

    def predict_proba(self, logits: A) -> A:
        """Calibrated positive-class probabilities (N,)."""
        self._check_fitted()
        return _like(torch.sigmoid(self._logit(self._scores(logits))).numpy(), logits)  # type: ignore[no-any-return]

    def _fit_logistic(self, x: torch.Tensor, y: torch.Tensor) -> np.ndarray:
        """Maximum-likelihood logistic regression on features ``x`` (N, d) with an intercept:
        coefficients then intercept."""
        w = torch.zeros(x.shape[1] + 1, dtype=torch.float64, requires_grad=True)

        def loss() -> torch.Tensor:
            return F.binary_cross_entropy_with_logits(x @ w[:-1] + w[-1], y)

        _lbfgs([w], loss, 500, tol=1e-12)  # two or three parameters: converge fully
        return w.detach().numpy().copy()

    def _labels(self, labels: Any, scores: Any, n: int) -> torch.Tensor:
        """The 0/1 labels, one per score: shape (N,), or (N, 1) or (1, N) as the multiclass
        methods take them; ``scores`` (the argument as given) and their ``n`` rows name the
        expected shape. Labels of another shape are refused, whatever their size: flattening
        them would pair labels and scores by their memory order."""
        y = label_array(labels)
        one_per_score = y.shape == (n,) or y.shape in ((n, 1), (1, n))
        if not one_per_score:
            shape = tuple(scores.shape) if hasattr(scores, "shape") else np.shape(scores)
            raise ValueError(
                f"labels (the validation labels) have shape {y.shape} but the scores have shape"
                f" {shape}: pass one 0/1 label per score, of shape ({n},)"
            )
        y = y.reshape(-1)
        if y.dtype.kind not in "biuf":
            raise TypeError(f"labels must hold 0/1 outcomes, got dtype {y.dtype}")
        bad = ~np.isin(y, (0, 1))
        if bad.any():
            i = int(np.flatnonzero(bad)[0])
            raise ValueError(f"labels of a binary problem must be 0 or 1; entry {i} is {y[i].item()!r}")
        return torch.from_numpy(y.astype(np.float64))

    def _check_fit(self, s: torch.Tensor, y: torch.Tensor) -> None:
        nll_id = float(F.binary_cross_entropy_with_logits(s, y))
        nll_fit = float(F.binary_cross_entropy_with_logits(self._logit(s), y))
        # A logistic fit on the score diverges whenever some threshold splits the classes, in
        # either direction, and when there is one class only: its slope or intercept has no
        # finite optimum.
        pos, neg = s[y == 1], s[y == 0]
        how = None
        # Ties at the threshold (quasi-complete separation: one score value holds both classes,
        # the rest one class each) leave the slope without a finite optimum too, but the fit
        # still calibrates the tied value, which the identity does not: where new scores take
        # the same few values it is the better map, where they fall between the classes a far
        # worse one. It is kept, with a warning that says which. (A map held non-decreasing, as
        # beta calibration's a, b >= 0 hold it, cannot follow positives below the tie: its fit
        # stays finite, on its bound.)
        tie = None
        if pos.numel() == 0 or neg.numel() == 0:
            how = f"all {s.shape[0]} labels are {0 if pos.numel() == 0 else 1}"
        else:
            pos_lo, pos_hi, neg_lo, neg_hi = (float(v) for v in (pos.min(), pos.max(), neg.min(), neg.max()))
            if pos_lo > neg_hi:
                how = "a threshold on the score splits the two classes"
            elif pos_hi < neg_lo:
                how = "a threshold on the score splits the two classes, the positives below it"
            elif pos_lo >= neg_hi:
                tie = pos_lo
            elif pos_hi <= neg_lo and self._n_nonnegative == 0:
                tie = pos_hi
        kept = None
        n_tied = 0 if tie is None else int((s == tie).sum())
        if tie is not None and n_tied < s.shape[0]:  # constant scores: nothing to split, no divergence
            words = ", ".join(f"{c:.4g}" for c in np.asarray(self.coef))
            p_tie = 1.0 / (1.0 + math.exp(-tie))
            at = f"probability {p_tie:.4g}"
            if self.from_logits:
                at = f"logit {tie:.4g} ({at})"
            kept = (
                f"the validation set is separable but for ties (a threshold at the {at} splits"
                f" the two classes, except for the {n_tied} samples at that score, which hold both), so"
                f" the coefficients have no finite optimum (coef [{words}] where the fit stopped):"
                " the map is a step at that score, right for the tied value, overconfident on any score"
                " between the classes"
            )
        self._guard(nll_id, nll_fit, s.shape[0], at_bound=None, separable=how is not None, n_classes=2,
                    separable_how=how, kept=kept,
                    kept_advice="it beats the identity where new scores take the same few values; compare"
                    " the two on held-out data (crossent calibrate does) before using it")

    def _params(self) -> dict[str, Any]:
        return {"coef": self.coef}

    def _set_params(self, params: dict[str, Any]) -> None:
        owner = self._state_owner()
        coef = state_array(params, "coef", owner=owner, shape=(self._n_coef,))
        k = self._n_nonnegative
        if (coef[:k] < 0).any():
            raise state_error(owner, "state['params']['coef']",
                              f"{self._n_coef} finite numbers, the first {k} >= 0", str(coef.tolist()))
        self.coef = coef

    def _options(self) -> dict[str, Any]:
        return {**super()._options(), "from_logits": self.from_logits}


class PlattScaler(_BinaryRecalibrator):
    r"""Platt scaling (Platt 1999, *Probabilistic outputs for support vector machines and
    comparisons to regularized likelihood methods*): :math:`\hat p = \sigma(a z + b)` on the
    positive-class logit :math:`z`, fitted by maximum likelihood (no target smoothing).
    ``coef`` is ``[a, b]``; ``from_logits=False`` takes probabilities :math:`p` and uses
    :math:`z = \operatorname{logit}(p)`."""

    name = "platt"

    def _features(self, s: torch.Tensor) -> torch.Tensor:
        return s[:, None]

    def fit(self, logits: Any, labels: Any) -> PlattScaler:
        """Fit on validation scores (N,) (or (N, 1), or (N, 2) logits) and 0/1 labels (N,) (or (N, 1),
        (1, N)); returns ``self``."""
        s = self._scores(logits, fitting=True)
        y = self._labels(labels, logits, s.shape[0])
        self.coef = self._fit_logistic(self._features(s), y)
        self._fitted = True
        self._check_fit(s, y)
        return self

    def _set_identity(self, n_classes: int) -> None:
        self.coef = np.array([1.0, 0.0])


class BetaCalibrator(_BinaryRecalibrator):
    r"""Beta calibration (Kull, Silva Filho and Flach 2017, *Beta calibration: a
    well-founded and easily implemented improvement on logistic calibration for binary
    classifiers*), the three-parameter "abm" family:

    .. math::
        \hat p = \sigma\big(a \log p - b \log(1 - p) + c\big), \qquad a, b \ge 0,

    with :math:`\log p = -\operatorname{softplus}(-z)` and
    :math:`-\log(1 - p) = \operatorname{softplus}(z)` from the logit (no clipping). A
    maximum-likelihood logistic fit on the two features; if a coefficient comes out
    negative it is fixed at 0 and the other refitted, as in the authors' ``betacal``; if that
    one comes out negative too (scores that fall as the positive rate rises), both are 0 and
    :math:`c` is the log-odds of the positive rate (``betacal`` keeps the negative one).
    ``coef`` is ``[a, b, c]``; the identity is ``[1, 1, 0]``.
    """

    name = "beta"
    _n_coef = 3
    _n_nonnegative = 2  # a, b >= 0

    def _features(self, s: torch.Tensor) -> torch.Tensor:
        return torch.stack([-F.softplus(-s), F.softplus(s)], 1)

    def fit(self, logits: Any, labels: Any) -> BetaCalibrator:
        """Fit on validation scores (N,) (or (N, 1), or (N, 2) logits) and 0/1 labels (N,) (or (N, 1),
        (1, N)); returns ``self``."""
        s = self._scores(logits, fitting=True)
        y = self._labels(labels, logits, s.shape[0])
        x = self._features(s)
        coef = self._fit_logistic(x, y)
        if coef[0] < 0 or coef[1] < 0:
            keep = 1 if coef[0] < 0 else 0
            sub = self._fit_logistic(x[:, keep : keep + 1], y)
            coef = np.zeros(3)
            if sub[0] >= 0:
                coef[keep], coef[2] = sub[0], sub[1]
            else:  # both slopes held at 0: the intercept alone, the log-odds of the positive rate
                coef[2] = self._fit_logistic(x[:, :0], y)[0]
        self.coef = coef
        self._fitted = True
        self._check_fit(s, y)
        return self

    def _set_identity(self, n_classes: int) -> None:
        self.coef = np.array([1.0, 1.0, 0.0])
