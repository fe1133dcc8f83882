r"""What every recalibration method shares: one interface, a JSON state, and the guard that
keeps a fit from silently making the predictions worse (private).

The interface is ``fit(val_logits, val_labels) -> self``, ``transform(logits)`` (calibrated
probabilities, as netcal's ``transform``; ``predict_proba`` is the same, named as in
scikit-learn), ``transform_logits(logits)`` (calibrated logits: for every method
``softmax(transform_logits(z))`` -- ``sigmoid`` for the binary ones -- is ``transform(z)``) and
``state_dict()`` / ``load_state_dict()`` with JSON-serialisable values (:func:`save` and
:func:`load` write and read a file).

The guard. After a fit, :meth:`Recalibrator._guard` checks three things on the validation data:

1. the fitted map is at a bound of its parameters (a temperature at ``t_min`` or ``t_max``);
2. the validation set is separable for the predictions (every top-1 prediction is correct, so
   the likelihood keeps rising as the map sharpens and the fit is driven to a bound, or, for
   the binning methods, every bin says "always right"); a validation set whose labels are all
   one class is separable for every method (a map that gives that class probability 1
   everywhere fits it perfectly, and every other class gets probability 0), and so, for the
   maps with a parameter per class (vector, matrix and Dirichlet scaling), is one where some
   classes have no sample (:func:`absent_classes`: their probabilities are driven towards 0);
3. the validation NLL of the fitted map is worse than that of the identity map.

If one holds, a :class:`CalibrationWarning` names it; unless ``fallback_to_identity=False``
the method then becomes the identity (``T = 1``) and ``fallback`` holds the reason
(``None`` when the fit is used). ``diagnostic`` holds the reason in either case, and
``diagnostic_kind`` which of the three it is (``"bound"``, ``"separable"``, ``"nll"``).
"""

from __future__ import annotations

import json
import math
import warnings
from pathlib import Path
from typing import Any, ClassVar, Literal, TypeVar

import numpy as np
import torch

__all__ = ["CalibrationWarning", "Recalibrator", "load", "save"]

R = TypeVar("R", bound="Recalibrator")

#: Relative tolerance of "worse than the identity" on the validation NLL.
NLL_RTOL = 1e-9

#: every method by its ``state_dict()["method"]`` name, filled in by the subclasses
REGISTRY: dict[str, type[Recalibrator]] = {}


class CalibrationWarning(UserWarning):
    """A recalibration fit was degenerate (bound reached, separable data, or worse NLL)."""


def nll_of_probs(probs: np.ndarray, labels: np.ndarray) -> float:
    """Mean NLL in nats of (N, C) probabilities, or of (N,) positive-class probabilities."""
    tiny = np.finfo(np.float64).tiny
    p = np.asarray(probs, dtype=np.float64)
    if p.ndim == 1:
        py = np.where(labels == 1, p, 1.0 - p)
    else:
        py = p[np.arange(p.shape[0]), labels]
    return float(-np.log(np.maximum(py, tiny)).mean())


def absent_classes(labels: np.ndarray, n_classes: int) -> np.ndarray:
    """The classes of ``range(n_classes)`` that no entry of the integer ``labels`` holds,
    sorted (int64)."""
    counts = np.bincount(np.asarray(labels, dtype=np.int64).reshape(-1), minlength=n_classes)
    return np.flatnonzero(counts[:n_classes] == 0)


def one_class_how(labels: np.ndarray, n_classes: int) -> str | None:
    """``"all N labels are class k"`` when the labels hold one class only (of ``n_classes``
    >= 2), else ``None``: how such a validation set is separable."""
    y = np.asarray(labels).reshape(-1)
    if y.size == 0 or n_classes < 2 or not bool((y == y[0]).all()):
        return None
    return f"all {y.size} labels are class {int(y[0])}"


def absent_how(absent: np.ndarray, n_classes: int, *, shown: int = 8) -> str:
    """The classes ``absent`` of ``n_classes`` in words, as the subject of "... no validation
    sample": ``"class 2 (1 of 3 classes) has"``, ``"classes 0, 4 (2 of 5 classes) have"``,
    the first ``shown`` of them listed."""
    a = [int(k) for k in np.asarray(absent).reshape(-1)]
    listed = ", ".join(str(k) for k in a[:shown]) + (", ..." if len(a) > shown else "")
    if len(a) == 1:
        return f"class {listed} (1 of {n_classes} classes) has"
    return f"classes {listed} ({len(a)} of {n_classes} classes) have"


def label_separation(
    top1_correct: bool,
    labels: np.ndarray,
    n_classes: int,
    *,
    absent_consequence: str | None = None,
) -> tuple[bool, str | None, str | None]:
    """Whether a multiclass validation set is separable for the guard, how (``None``: every
    top-1 prediction correct, the guard's default) and what that does to the fit (``None``:
    the guard's default), from ``top1_correct`` and the labels.

    Labels that are all one class make it separable for every method. Classes with no sample
    make it separable for the maps with parameters per class, which pass
    ``absent_consequence`` (what the fit does with those classes); the others (one shared
    temperature, or one-vs-rest maps that handle an absent class on their own) pass ``None``.
    """
    one = one_class_how(labels, n_classes)
    if one is not None:
        return True, one, None
    if absent_consequence is not None:
        absent = absent_classes(labels, n_classes)
        if absent.size:
            how = f"{absent_how(absent, n_classes)} no validation sample"
            if top1_correct:
                n = np.asarray(labels).size
                return True, f"all {n} top-1 predictions are correct, and {how}", None
            return True, how, absent_consequence
    return top1_correct, None, None


def warn_if_probabilities(z: torch.Tensor, owner: str, *, hint: str = "", stacklevel: int = 3) -> None:
    """Warn (:class:`CalibrationWarning`) when the (N, C) ``logits`` ``z`` given to a fit look
    like probabilities (:func:`~crossent.calibration._inputs.looks_like_probs`: every row in
    [0, 1] and summing to 1). Logits are almost never like that, and a fit on probabilities
    calibrates ``softmax(p)``, not ``p``. The first rows decide for real logits; the whole
    matrix is read only when they look like probabilities."""
    from crossent.calibration._inputs import looks_like_probs

    if not (looks_like_probs(z[:256], "logits") and looks_like_probs(z, "logits")):
        return
    warnings.warn(
        f"{owner}: the logits look like probabilities (every entry in [0, 1], every row summing"
        f" to 1), but the recalibrators take logits: pass their log (softmax(log p) = p){hint}",
        CalibrationWarning,
        stacklevel=stacklevel,
    )


def softmax_np(z: np.ndarray) -> np.ndarray:
    """Row softmax in float64."""
    z = np.asarray(z, dtype=np.float64)
    e = np.exp(z - z.max(axis=1, keepdims=True))
    return np.asarray(e / e.sum(axis=1, keepdims=True))


def to_json_value(x: Any) -> Any:
    """NumPy scalars and arrays as plain floats and (nested) lists."""
    if isinstance(x, np.ndarray):
        return x.tolist()
    if isinstance(x, (np.floating, np.integer)):
        return x.item()
    return x


class Recalibrator:
    """Base class of the recalibration methods (see the module docstring)."""

    #: the name in ``state_dict()["method"]``
    name: ClassVar[str] = ""

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if cls.name:
            REGISTRY[cls.name] = cls

    def __init__(self, *, fallback_to_identity: bool = True) -> None:
        self.fallback_to_identity = bool(fallback_to_identity)
        #: the reason the identity map replaced the fit, or None when the fit is used
        self.fallback: str | None = None
        #: the problem the guard found, whether or not it fell back (None: none found)
        self.diagnostic: str | None = None
        #: which check found it: "separable", "bound" or "nll" (None: none found)
        self.diagnostic_kind: Literal["separable", "bound", "nll"] | None = None
        self._fitted = False

    # ----------------------------------------------------------------- to implement
    def fit(self: R, logits: Any, labels: Any) -> R:
        """Fit on validation logits and labels; returns ``self``."""
        raise NotImplementedError

    def transform_logits(self, logits: Any) -> Any:
        """Calibrated logits (``softmax``, or ``sigmoid`` for binary, gives the probabilities)."""
        raise NotImplementedError

    def transform(self, logits: Any) -> Any:
        """Calibrated probabilities, of the input's type: (N, C) for the multiclass methods,
        the positive class's (N,) for the binary ones (:meth:`predict_proba`)."""
        return self.predict_proba(logits)

    def _params(self) -> dict[str, Any]:
        """The fitted parameters, JSON-serialisable."""
        raise NotImplementedError

    def _set_params(self, params: dict[str, Any]) -> None:
        raise NotImplementedError

    def _set_identity(self, n_classes: int) -> None:
        """Make the map the identity for ``n_classes`` classes."""
        raise NotImplementedError

    def _options(self) -> dict[str, Any]:
        """Constructor keyword arguments, JSON-serialisable."""
        return {"fallback_to_identity": self.fallback_to_identity}

    def predict_proba(self, logits: Any) -> Any:
        """Calibrated probabilities (what :meth:`transform` returns)."""
        raise NotImplementedError

    # ----------------------------------------------------------------- shared
    def _check_fitted(self) -> None:
        if not self._fitted:
            raise RuntimeError(
                f"{type(self).__name__} is not fitted: call fit(logits, labels) first"
            )

    def _guard(
        self,
        nll_id: float,
        nll_fit: float,
        n_samples: int,
        *,
        at_bound: str | None,
        separable: bool,
        n_classes: int,
        separable_how: str | None = None,
        separable_consequence: str | None = None,
    ) -> None:
        """Check the fit against the identity on the validation data (their mean NLLs
        ``nll_id`` and ``nll_fit`` over ``n_samples``); warn, and fall back unless told not to.
        ``separable_how`` says how a separable set is separable (by default: every top-1
        prediction correct), ``separable_consequence`` what that does to the fit (by default:
        "so the fit has nothing to calibrate against")."""
        problem: str | None = None
        kind: Literal["separable", "bound", "nll"] | None = None
        if separable:
            kind = "separable"
            how = separable_how or f"all {n_samples} top-1 predictions are correct"
            consequence = separable_consequence or "so the fit has nothing to calibrate against"
            problem = f"the validation set is separable ({how}), {consequence}"
            if at_bound is not None:
                problem += f" and stopped at {at_bound}"
        elif at_bound is not None:
            problem = f"the fit stopped at {at_bound}"
            kind = "bound"
        elif math.isfinite(nll_id) and not nll_fit <= nll_id + NLL_RTOL * max(1.0, abs(nll_id)):
            problem = (
                f"the fitted map's validation NLL ({nll_fit:.4g}) is worse than the identity's"
                f" ({nll_id:.4g})"
            )
            kind = "nll"
        self.diagnostic = problem
        self.diagnostic_kind = kind
        self.fallback = None
        if problem is None:
            return
        if self.fallback_to_identity:
            self.fallback = problem
            self._set_identity(n_classes)
            t1 = " (T = 1)" if getattr(self, "method", None) == "temperature" else ""
            action = f"falling back to the identity map{t1}; pass fallback_to_identity=False to keep the fit"
        else:
            action = "keeping the fit (fallback_to_identity=False)"
        warnings.warn(
            f"{type(self).__name__}: {problem}; {action}", CalibrationWarning, stacklevel=4
        )

    def state_dict(self) -> dict[str, Any]:
        """The method, its options, the fitted parameters and the fallback, as JSON-ready
        values: ``json.dumps(c.state_dict())`` works, and :func:`load_state_dict` restores."""
        self._check_fitted()
        return {
            "method": self.name,
            "options": self._options(),
            "params": {k: to_json_value(v) for k, v in self._params().items()},
            "fallback": self.fallback,
            "diagnostic": self.diagnostic,
            "diagnostic_kind": self.diagnostic_kind,
        }

    def load_state_dict(self: R, state: dict[str, Any]) -> R:
        """Restore the options and the fitted parameters of :meth:`state_dict`; returns
        ``self``. The state's options replace the ones this instance was built with (they
        are part of the fitted map: ``from_logits`` says what :meth:`transform` takes)."""
        if state.get("method") != self.name:
            raise ValueError(
                f"state is for method {state.get('method')!r}, not {self.name!r};"
                " use crossent.calibration.from_state_dict(state) to build the right class"
            )
        options = state.get("options") or {}
        if options:  # built afresh, so the constructor checks them; then copied over
            fresh = type(self)(**options)
            for key in options:
                setattr(self, key, getattr(fresh, key))
        self._set_params(state["params"])
        self.fallback = state.get("fallback")
        self.diagnostic = state.get("diagnostic")
        self.diagnostic_kind = state.get("diagnostic_kind")
        self._fitted = True
        return self


def from_state_dict(state: dict[str, Any]) -> Recalibrator:
    """The recalibrator a :meth:`Recalibrator.state_dict` describes, fitted."""
    method = state.get("method")
    if method not in REGISTRY:
        raise ValueError(f"unknown method {method!r} in state; known: {', '.join(sorted(REGISTRY))}")
    if not isinstance(state.get("params"), dict):
        raise ValueError(f"the state of {method!r} has no 'params' mapping: pass what state_dict() returned")
    obj = REGISTRY[str(method)](**state.get("options", {}))
    return obj.load_state_dict(state)


def save(calibrator: Recalibrator, path: str | Path) -> None:
    """Write ``calibrator.state_dict()`` to ``path`` as JSON."""
    Path(path).write_text(json.dumps(calibrator.state_dict(), indent=2) + "\n")


def load(path: str | Path) -> Recalibrator:
    """Read a recalibrator written by :func:`save`."""
    return from_state_dict(json.loads(Path(path).read_text()))


def as_float64_numpy(x: Any) -> np.ndarray:
    """A float64 NumPy array of an array or tensor, without negative strides (torch takes none)."""
    if isinstance(x, torch.Tensor):
        return np.asarray(x.detach().cpu().to(torch.float64).numpy())
    return np.ascontiguousarray(x, dtype=np.float64)
