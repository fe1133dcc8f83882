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
2. the validation set is separable for the predictions: for the maps of the logits
   (temperature, vector, matrix, Dirichlet and ensemble scaling) every top-1 prediction is
   correct, so the likelihood keeps rising as the map sharpens and the fit is driven to a
   bound; for the one-vs-rest maps (histogram binning, isotonic regression) every class's
   one-vs-rest problem is separated, so every class's map is 0 or 1 on the validation samples
   (every bin says "always" or "never"; the isotonic fit is a 0/1 step) and gives a test
   sample probability 0 wherever only other classes' samples fell (those maps use the
   identity for the separated classes alone when only some are; see
   ``recalibration._OneVsRestRecalibrator``); a validation set whose labels are all
   one class is separable for every method (a map that gives that class probability 1
   everywhere fits it perfectly, and every other class gets probability 0), and so, for the
   maps with a parameter per class (vector, matrix and Dirichlet scaling), is one where some
   classes have no sample (:func:`absent_classes`: their probabilities are driven towards 0);
3. the validation NLL of the fitted map is worse than that of the identity map.

If one holds, a :class:`CalibrationWarning` names it; unless ``fallback_to_identity=False``
the method then becomes the identity (``T = 1``) and ``fallback`` holds the reason
(``None`` when the fit is used). ``diagnostic`` holds the reason in either case, and
``diagnostic_kind`` which of the three it is (``"bound"``, ``"separable"``, ``"nll"``).
A fit whose parameters are not finite (a diverged fit) becomes the identity even with
``fallback_to_identity=False`` (its ``diagnostic_kind`` is ``"nll"`` unless another check
found a problem): it has no usable map to keep, and every saved state loads.
"""

from __future__ import annotations

import functools
import json
import math
import warnings
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, ClassVar, Literal, TypeVar

import numpy as np
import torch

from crossent.calibration._inputs import _caller_level, check_bool, iter_chunks, shown_option

__all__ = ["CalibrationWarning", "Recalibrator", "load", "save"]

R = TypeVar("R", bound="Recalibrator")

#: Relative tolerance of "worse than the identity" on the validation NLL.
NLL_RTOL = 1e-9

#: every method by its ``state_dict()["method"]`` name, filled in by the subclasses
REGISTRY: dict[str, type[Recalibrator]] = {}


class CalibrationWarning(UserWarning):
    """A number may not mean what it seems: a recalibration fit was degenerate (bound reached,
    separable data, or worse NLL), or the input is read in a way it may not have been meant
    (rows off one read as logits, one-hot labels of a softmax read as multi-label)."""


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


def absent_unmasked(labels: np.ndarray, n_classes: int, logits: torch.Tensor | None) -> np.ndarray:
    """:func:`absent_classes` less those whose validation ``logits`` are -inf in every row
    (masked throughout): such a class has probability 0 at any parameters, so its absence
    costs nothing."""
    absent = absent_classes(labels, n_classes)
    if absent.size and logits is not None:
        masked = (logits[:, torch.from_numpy(absent)] == -math.inf).all(0).numpy()
        absent = absent[~masked]
    return absent


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
    logits: torch.Tensor | None = None,
) -> tuple[bool, str | None, str | None]:
    """Whether a multiclass validation set is separable for the guard, how (``None``: every
    top-1 prediction correct, the guard's default) and what that does to the fit (``None``:
    the guard's default), from ``top1_correct`` and the labels.

    Labels that are all one class make it separable for every method. Classes with no sample
    make it separable for the maps with parameters per class, which pass
    ``absent_consequence`` (what the fit does with those classes); the others (one shared
    temperature, or one-vs-rest maps that handle an absent class on their own) pass ``None``.
    A class whose validation ``logits`` are -inf in every row (masked throughout) has
    probability 0 at any parameters: its absence costs nothing and is not counted.
    """
    one = one_class_how(labels, n_classes)
    if one is not None:
        return True, one, None
    if absent_consequence is not None:
        absent = absent_unmasked(labels, n_classes, logits)
        if absent.size:
            how = f"{absent_how(absent, n_classes)} no validation sample"
            if top1_correct:
                n = np.asarray(labels).size
                return True, f"all {n} top-1 predictions are correct, and {how}", None
            return True, how, absent_consequence
    return top1_correct, None, None


#: the largest gradient entry an L-BFGS fit may end with at ``max_iter`` without a warning
#: (typical fits that run out of steps end near 1e-3; a fit far from its optimum, such as one on
#: logits scaled by 1e4, at 0.1 or more)
UNCONVERGED_GRAD = 1e-2


#: :class:`~crossent.calibration.MatrixScaler`, :class:`~crossent.calibration.DirichletCalibrator`
#: (C (C + 1) parameters) and :class:`~crossent.calibration.VectorScaler` (2 C) warn below this
#: many validation samples per parameter. On logits that need no recalibration (labels drawn
#: from their softmax; C = 5 and 10, default regularisation, three draws) the test NLL of a
#: matrix fit was 35-85 % above the identity's with 2 samples a parameter, 7-13 % with 5 and
#: 3-5 % with 10; a vector fit on a long-tailed validation set of 100 samples (5 a parameter,
#: C = 10) had a test NLL of 9.9 against the identity's 1.65.
OVERFIT_SAMPLES_PER_PARAMETER = 10


def warn_if_few_samples(owner: str, n_samples: int, n_params: int, n_classes: int, prefer: str) -> None:
    """Warn (:class:`CalibrationWarning`, at the caller's line) when ``n_params`` parameters are
    fitted on fewer than :data:`OVERFIT_SAMPLES_PER_PARAMETER` samples each: they can fit fewer
    samples than parameters exactly (a validation NLL near 0, a test NLL many times the
    identity's) and overfit a few times as many, which no check on the validation data sees."""
    if n_samples >= OVERFIT_SAMPLES_PER_PARAMETER * n_params:
        return
    how = ("the map can fit them exactly and overfit" if n_samples < n_params else
           f"fewer than {OVERFIT_SAMPLES_PER_PARAMETER} a parameter, the map can overfit them")
    warnings.warn(
        f"{owner}: {n_params} parameters (C = {n_classes}) fitted on {n_samples} validation samples:"
        f" {how}; prefer {prefer}, or check the fit on held-out data (crossent calibrate does)",
        CalibrationWarning,
        stacklevel=_caller_level(),
    )


def warn_if_unconverged(opt: torch.optim.LBFGS, max_iter: int, owner: str) -> None:
    """Warn (:class:`CalibrationWarning`) when the L-BFGS ``opt`` used its ``max_iter`` steps
    (or its evaluations) and its parameters' last gradient is still above
    :data:`UNCONVERGED_GRAD`."""
    group = opt.param_groups[0]
    state = opt.state[group["params"][0]]
    # out of steps, or of function evaluations (max_eval, 1.25 max_iter by default), first
    spent = (int(state.get("n_iter", 0)) >= max_iter
             or int(state.get("func_evals", 0)) >= int(group["max_eval"]))
    grads = [p.grad for g in opt.param_groups for p in g["params"] if p.grad is not None]
    worst = max((float(g.abs().max()) for g in grads), default=0.0)
    if spent and worst > UNCONVERGED_GRAD:
        warnings.warn(
            f"{owner}: the fit stopped after max_iter={max_iter} L-BFGS steps with a gradient of"
            f" {worst:.3g}, far from its optimum; raise max_iter (e.g. max_iter={10 * max_iter})",
            CalibrationWarning,
            stacklevel=_caller_level(),
        )


#: the fits that take masked logits (-inf, a class of probability 0 at any parameters)
MASKED_LOGITS_OK = ("TemperatureScaler, VectorScaler, HistogramBinning, IsotonicCalibrator and"
                    " EnsembleTemperatureScaler")


def check_fit_logits(z: torch.Tensor, y: np.ndarray, owner: str, *, masked_ok: bool) -> None:
    """Refuse (``ValueError``, naming the first bad row) validation logits ``z`` (N, C) as
    :func:`check_masked_rows` does, and a row whose label is masked, which no map gives a
    probability above 0 (its NLL is infinite at every parameter)."""
    check_masked_rows(z, owner, masked_ok=masked_ok)
    check_label_unmasked(z, y)


def check_masked_rows(z: torch.Tensor, owner: str, *, masked_ok: bool) -> None:
    """Refuse (``ValueError``, naming the first bad row) logits ``z`` (N, C) with NaN or +inf,
    and with -inf (a masked class, as ``F.cross_entropy`` takes it) where ``owner`` cannot take
    it: anywhere for a map that mixes the classes' logits (``masked_ok`` false: ``-inf`` times
    a weight of either sign is undefined), and for every map in a row without a finite logit.

    Read once, by chunks of rows (:func:`~crossent.calibration._inputs.iter_chunks`), so that
    the masks are a chunk's, not the whole matrix's: the first row of each problem is noted as
    the chunks pass, and the error is the first problem's in the order above, that of one read
    of the whole matrix."""

    def first(rows: torch.Tensor, start: int) -> int | None:
        return start + int(torch.nonzero(rows)[0, 0]) if bool(rows.any()) else None

    bad = masked = empty = None
    for start, stop in iter_chunks(z):
        chunk = z[start:stop]
        finite = torch.isfinite(chunk)
        if bool(finite.all()):
            continue
        neg_inf = chunk == -math.inf
        bad = first(~(finite | neg_inf).all(1), start)
        if bad is not None:  # NaN or +inf: named before anything else, and no row is earlier
            break
        if masked is None and not masked_ok:
            masked = first(neg_inf.any(1), start)
        if empty is None:
            empty = first(neg_inf.all(1), start)
    if bad is not None:
        raise ValueError(f"logits: row {bad} contains NaN or infinite values")
    if masked is not None:
        raise ValueError(
            f"logits: row {masked} holds -inf (a masked class): {owner} maps every class's logit"
            f" through weights of either sign, which -inf makes undefined; {MASKED_LOGITS_OK} take"
            " masked logits"
        )
    if empty is not None:
        raise ValueError(f"logits: row {empty} has no finite logit (every entry is -inf)")


def check_label_unmasked(z: torch.Tensor, y: np.ndarray) -> None:
    """Refuse (``ValueError``) a row of the validation logits ``z`` whose label's logit is -inf:
    one read of the N labels' entries (the rest of a row is checked where it is read)."""
    at_y = z[torch.arange(z.shape[0]), torch.as_tensor(y, dtype=torch.int64)] == -math.inf
    if bool(at_y.any()):
        i = int(torch.nonzero(at_y)[0, 0])
        if bool((z[i] == -math.inf).all()):
            raise ValueError(f"logits: row {i} has no finite logit (every entry is -inf)")
        raise ValueError(
            f"logits: row {i} masks its label (class {int(y[i])} has logit -inf): no map gives it a"
            " probability above 0; drop the row or leave its label unmasked"
        )


def warn_if_probabilities(z: torch.Tensor, owner: str, *, hint: str = "") -> None:
    """Warn (:class:`CalibrationWarning`) when the (N, C) ``logits`` ``z`` given to a fit look
    like probabilities (:func:`~crossent.calibration._inputs.logits_look_like_probs`: every row
    in [0, 1] and summing to 1). Logits are almost never like that, and a fit on probabilities
    calibrates ``softmax(p)``, not ``p``."""
    from crossent.calibration._inputs import logits_look_like_probs

    if not logits_look_like_probs(z, "logits"):
        return
    warnings.warn(
        f"{owner}: the logits look like probabilities (every entry in [0, 1], every row summing"
        f" to 1), but the recalibrators take logits: pass their log (softmax(log p) = p){hint}",
        CalibrationWarning,
        stacklevel=_caller_level(),
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


def params_finite(value: Any) -> bool:
    """Whether every number of ``value`` (fitted parameters: numbers, arrays, and lists, tuples
    and dicts of them; ``None`` and strings hold none) is finite."""
    if value is None or isinstance(value, str):
        return True
    if isinstance(value, Mapping):
        return all(params_finite(v) for v in value.values())
    if isinstance(value, (list, tuple)):
        return all(params_finite(v) for v in value)
    return bool(np.isfinite(np.asarray(value, dtype=np.float64)).all())


def class_count_error(found: int, fitted: int) -> ValueError:
    """The error of logits with ``found`` classes given to a map fitted on ``fitted``."""
    return ValueError(f"logits have {found} classes but the map was fitted on {fitted}: pass (N, {fitted})"
                      " logits, of the classes it was fitted on")


# ------------------------------------------------------------------------------- loading states
#: what every error about a loaded state ends with
STATE_FIX = "pass what state_dict() returned (or save() wrote), unedited"

_MISSING: Any = object()


def short_repr(x: Any, width: int = 60) -> str:
    """``x`` for a one-line message: its type and a repr cut to ``width`` characters."""
    r = shown_option(x, width)
    return r if isinstance(x, (int, float)) and not isinstance(x, bool) else f"{type(x).__name__} {r}"


def state_error(owner: str, where: str, expected: str, found: str,
                error: type[Exception] = ValueError) -> Exception:
    """The one-line error of a state that cannot be loaded: whose state (``owner``), which key
    (``where``, e.g. ``state['params']['weight']``), what it must be and what it is."""
    return error(f"cannot load the state of {owner}: {where} must be {expected}, got {found}; {STATE_FIX}")


def state_value(container: Mapping[str, Any], key: str, *, owner: str, expected: str,
                where: str = "state['params']", default: Any = _MISSING) -> Any:
    """``container[key]`` of a loaded state (``where`` names the container), ``default`` when
    it is missing, else a :class:`ValueError` saying what was ``expected``."""
    if key in container:
        return container[key]
    if default is not _MISSING:
        return default
    raise state_error(owner, f"{where}[{key!r}]", expected, "nothing (the key is missing)")


def state_array(
    container: Mapping[str, Any] | Sequence[Any],
    key: str | int,
    *,
    owner: str,
    where: str = "state['params']",
    shape: tuple[int | str | None, ...] = (),
    dims: dict[str, tuple[int, str]] | None = None,
    min_size: int = 0,
    integer: bool = False,
    ge: float | None = None,
    gt: float | None = None,
    le: float | None = None,
    slack: float = 0.0,
    exempt: float | None = None,
    increasing: Literal["strictly", "weakly"] | None = None,
    note: str = "",
    default: Any = _MISSING,
) -> np.ndarray:
    """The numeric param ``container[key]`` of a state read back from JSON, checked: a float64
    array (int64 with ``integer``) of ``shape``, finite, within ``ge`` / ``gt`` / ``le``.

    ``shape`` holds an int per axis (that length), ``None`` (any length) or a name: a name
    already in ``dims`` must have its length there (``dims[name] = (length, where it came
    from)``), a new one is bound in ``dims`` once the whole array passes, and must be at least
    ``min_size``. ``()`` is a single number. ``where`` names the container in the messages
    (the default: ``state['params']``); ``default`` is returned as the value of a missing key.

    ``slack`` widens ``ge`` and ``le`` by that fraction of their size (a bound reached through
    ``exp(log(bound))`` can land an ulp beyond it); ``exempt`` is a value accepted whatever
    the bounds. ``increasing`` (1-D only) asks for entries that rise (``"strictly"``) or never
    fall (``"weakly"``) along the list. ``note`` says where the bounds come from (or what the
    exempt value is), in the messages.

    A missing key, a wrong shape, a non-finite, out-of-range or out-of-order value raises
    :class:`ValueError`, a value that is not numbers (a string, ``None``, ``true`` or ``false``
    -- also among numbers, which NumPy would read as 1 and 0 --, a dict) :class:`TypeError`;
    the one-line message names ``owner``, the key, what was expected and what was found
    (:func:`state_error`).
    """
    path = f"{where}[{key!r}]"
    dims = {} if dims is None else dims
    kind = "integers" if integer else "finite numbers"
    bounds = ""
    if ge is not None and le is not None:
        bounds = f" in [{ge:g}, {le:g}]"
    elif gt is not None or ge is not None:
        bounds = f" > {gt:g}" if gt is not None else f" >= {ge:g}"
    elif le is not None:
        bounds = f" <= {le:g}"
    if bounds and exempt is not None:
        bounds += f" or {exempt:g}"
    if increasing is not None:
        bounds += ", strictly increasing" if increasing == "strictly" else ", non-decreasing"
    names = [d if isinstance(d, str) else ("any number of" if d is None else str(d)) for d in shape]
    if not shape:
        expected = ("an integer" if integer else "a finite number") + bounds
    elif len(shape) == 1:
        expected = f"a list of {names[0]} {kind}{bounds}".replace("any number of ", "")
    else:
        expected = f"a {' x '.join(names)} nested list of {kind}{bounds}"
    notes = [f"{d} = {dims[d][0]} from {dims[d][1]}" for d in dict.fromkeys(shape)
             if isinstance(d, str) and d in dims]
    notes += [f"{d} >= {min_size}" for d in dict.fromkeys(shape)
              if isinstance(d, str) and d not in dims and min_size > 0]
    notes += [note] if note else []
    if notes:
        expected += f" ({'; '.join(notes)})"

    def fail(found: str, error: type[Exception] = ValueError) -> Exception:
        return state_error(owner, path, expected, found, error)

    if isinstance(container, Mapping):
        value = state_value(container, str(key), owner=owner, expected=expected, where=where,
                            default=default)
    else:
        value = container[int(key)]
    if value is None or isinstance(value, (str, bytes, bool, Mapping)):
        raise fail("null" if value is None else short_repr(value), TypeError)
    try:
        arr = np.asarray(value)
    except (ValueError, TypeError):
        raise fail("a ragged nested list (rows of different lengths)") from None
    # The entries as given are checked where NumPy may have hidden one: every entry when the
    # array is not numeric (all true/false, or NumPy made every entry a string when one is),
    # else the entries read as 0 or 1 (NumPy reads true and false among numbers as 1 and 0).
    if arr.dtype.kind not in "iuf":
        suspects = np.arange(arr.size)
    elif arr.ndim and not isinstance(value, np.ndarray):
        suspects = np.flatnonzero((arr == 0) | (arr == 1))
    else:
        suspects = np.arange(0)
    if suspects.size:
        items = np.asarray(value, dtype=object)
        entries = items.reshape(-1)[suspects].tolist()
        numbers = (int, float, np.integer, np.floating)
        first = None if set(map(type, entries)) <= {int, float} else next(  # type(True) is bool
            (i for i, item in enumerate(entries) if isinstance(item, bool) or not isinstance(item, numbers)),
            None)
        if first is not None:
            item = entries[first]
            index = np.unravel_index(int(suspects[first]), items.shape)
            at = path + "".join(f"[{i}]" for i in index)
            raise fail(f"{'null' if item is None else short_repr(item)} at {at}", TypeError)
    if arr.dtype.kind not in "iuf":
        try:
            arr = arr.astype(np.float64)
        except OverflowError:
            raise fail("an integer too large for a float64") from None
    if arr.ndim != len(shape):
        raise fail(f"the number {arr.item()!r}" if arr.ndim == 0 else f"a list of shape {arr.shape}")
    bound = dict(dims)
    for d, n in zip(shape, arr.shape, strict=True):
        if isinstance(d, int) and n != d:
            raise fail(f"a list of shape {arr.shape}")
        if isinstance(d, str):
            if d not in bound:
                if n < min_size:
                    raise fail(f"a list of shape {arr.shape}")
                bound[d] = (n, path)
            elif bound[d][0] != n:
                raise fail(f"a list of shape {arr.shape}")
    out = arr.astype(np.float64)
    bad = ~np.isfinite(out)
    if integer:
        bad |= out != np.round(out)
    if ge is not None:
        bad |= out < ge - slack * abs(ge)
    if gt is not None:
        bad |= out <= gt
    if le is not None:
        bad |= out > le + slack * abs(le)
    if exempt is not None:
        bad &= out != exempt
    if bad.any():
        index = np.unravel_index(int(np.flatnonzero(bad)[0]), out.shape) if out.ndim else ()
        at = f" at {path}" + "".join(f"[{i}]" for i in index) if out.ndim else ""
        raise fail(f"{arr[index].item()!r}{at}")
    if increasing is not None:
        step = np.diff(out)
        wrong = np.flatnonzero(step <= 0 if increasing == "strictly" else step < 0)
        if wrong.size:
            i = int(wrong[0])
            raise fail(f"{out[i].item()!r} at {path}[{i}] then {out[i + 1].item()!r}")
    dims.update(bound)
    return out.astype(np.int64) if integer else out


def _fit_with_autograd(fit: Callable[..., R]) -> Callable[..., R]:
    """``fit`` run with autograd on, wherever it is called: several fits minimise by L-BFGS,
    which needs gradients, and evaluation code often runs under ``torch.no_grad()`` or
    ``torch.inference_mode()``. Tensors made under inference mode cannot be saved for backward,
    so such inputs are cloned first (outside it, the clone is an ordinary tensor)."""

    def ordinary(a: Any) -> Any:
        return a.clone() if isinstance(a, torch.Tensor) and a.is_inference() else a

    @functools.wraps(fit)
    def run(self: R, *args: Any, **kwargs: Any) -> R:
        with torch.inference_mode(False), torch.enable_grad():
            return fit(self, *map(ordinary, args), **{k: ordinary(v) for k, v in kwargs.items()})

    return run


class Recalibrator:
    """Base class of the recalibration methods (see the module docstring)."""

    #: the name in ``state_dict()["method"]``
    name: ClassVar[str] = ""

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if cls.name:
            REGISTRY[cls.name] = cls
        if "fit" in cls.__dict__:  # every method's own fit, under autograd (see _fit_with_autograd)
            cls.fit = _fit_with_autograd(cls.__dict__["fit"])  # type: ignore[method-assign]

    def __init__(self, *, fallback_to_identity: bool = True) -> None:
        self.fallback_to_identity = check_bool("fallback_to_identity", fallback_to_identity)
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
        """Check and set the fitted parameters of a loaded state (the options and ``fallback``
        of the state are already set)."""
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
        advice: str | None = None,
        kept: str | None = None,
        kept_advice: str | None = None,
    ) -> None:
        """Check the fit against the identity on the validation data (their mean NLLs
        ``nll_id`` and ``nll_fit`` over ``n_samples``); warn, and fall back unless told not to.
        A fit whose parameters are not finite (a diverged fit) always falls back: it has no
        usable map to keep, and its state could not be loaded.
        ``separable_how`` says how a separable set is separable (by default: every top-1
        prediction correct), ``separable_consequence`` what that does to the fit (by default:
        "so the fit has nothing to calibrate against"). ``advice`` (for a fit stopped at a
        bound) ends the warning, not ``fallback``: a library call's fix, which the commands'
        reports do not offer. ``kept`` is a degenerate fit that is kept whatever
        ``fallback_to_identity`` says, where the identity is no safer (quasi-complete separation
        of a binary fit): it warns, with ``kept_advice``, and sets ``diagnostic`` (kind
        ``"separable"``) but not ``fallback``, unless a check above finds more."""
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
        diverged = not params_finite(self._params())
        if diverged:
            why = "the fitted parameters are not finite (NaN or infinite: the fit diverged)"
            problem = why if problem is None else f"{problem}, and {why}"
            kind = kind or "nll"  # as a rule, non-finite parameters give a NaN or infinite NLL
        if problem is None and kept is not None:
            self.diagnostic, self.diagnostic_kind, self.fallback = kept, "separable", None
            tail = f"; {kept_advice}" if kept_advice else ""
            warnings.warn(f"{type(self).__name__}: {kept}; keeping the fit{tail}", CalibrationWarning,
                          stacklevel=_caller_level())
            return
        self.diagnostic = problem
        self.diagnostic_kind = kind
        self.fallback = None
        if problem is None:
            return
        t1 = " (T = 1)" if getattr(self, "method", None) == "temperature" else ""
        if self.fallback_to_identity or diverged:
            self.fallback = problem
            self._set_identity(n_classes)
            action = f"falling back to the identity map{t1}; pass fallback_to_identity=False to keep the fit"
            if diverged:
                action = (f"falling back to the identity map{t1} whatever fallback_to_identity says:"
                          " a map with non-finite parameters is not usable, nor could its state be loaded")
        else:
            action = "keeping the fit (fallback_to_identity=False)"
        tail = f"; {advice}" if advice and kind == "bound" else ""
        warnings.warn(
            f"{type(self).__name__}: {problem}; {action}{tail}", CalibrationWarning,
            stacklevel=_caller_level(),
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

    def _state_owner(self) -> str:
        """Whose state a loading error is about: the method's name and the class."""
        return f"{self.name!r} ({type(self).__name__})"

    def load_state_dict(self: R, state: dict[str, Any]) -> R:
        """Restore the options and the fitted parameters of :meth:`state_dict`; returns
        ``self``. The state's options replace the ones this instance was built with (they
        are part of the fitted map: ``from_logits`` says what :meth:`transform` takes).

        Every part of the state is checked before anything changes: a missing key, an array
        of the wrong shape, a NaN or a value out of its range raises :class:`ValueError`, a
        value of the wrong type :class:`TypeError`, and the instance stays as it was."""
        _check_state_type(state)
        if state.get("method") != self.name:
            raise ValueError(
                f"state is for method {state.get('method')!r}, not {self.name!r};"
                " use crossent.calibration.from_state_dict(state) to build the right class"
            )
        owner = self._state_owner()
        options = state.get("options")
        options = {} if options is None else options
        if not isinstance(options, Mapping):
            raise state_error(owner, "state['options']", "a dict of the constructor's options",
                              short_repr(options), TypeError)
        current = self._options()
        for key, value in options.items():  # JSON true/false where a number is due, or not
            if key in current and isinstance(current[key], bool) != isinstance(value, bool):
                due = ("true or false" if isinstance(current[key], bool) else
                       "a number" if isinstance(current[key], (int, float)) else "a string")
                raise state_error(owner, f"state['options'][{key!r}]", due,
                                  "null" if value is None else short_repr(value), TypeError)
        try:  # built afresh, so the constructor checks them; then copied over
            fresh = type(self)(**options) if options else self
        except (TypeError, ValueError) as err:
            raise state_error(owner, "state['options']", f"options {type(self).__name__} takes",
                              f"{short_repr(dict(options), 200)} ({err})", type(err)) from None
        params = state.get("params")
        if "params" not in state:
            raise state_error(owner, "state['params']", "a dict of the fitted parameters",
                              "nothing (the state has no 'params' mapping)")
        if not isinstance(params, Mapping):
            raise state_error(owner, "state['params']", "a dict of the fitted parameters",
                              "null" if params is None else short_repr(params), TypeError)
        for key in ("fallback", "diagnostic"):
            if not isinstance(state.get(key), (str, type(None))):
                raise state_error(owner, f"state[{key!r}]", "a string or null", short_repr(state[key]),
                                  TypeError)
        if state.get("diagnostic_kind") not in (None, "separable", "bound", "nll"):
            raise state_error(owner, "state['diagnostic_kind']", "'separable', 'bound', 'nll' or null",
                              short_repr(state["diagnostic_kind"]))
        before = dict(vars(self))
        try:
            for key in options:
                setattr(self, key, getattr(fresh, key))
            self.fallback = state.get("fallback")  # _set_params reads the options and fallback
            self.diagnostic = state.get("diagnostic")
            self.diagnostic_kind = state.get("diagnostic_kind")
            vars(self).pop("_n_classes", None)  # the fit's class count: the loaded params carry theirs
            self._set_params(dict(params))  # checks every param (state_array) before setting any
        except BaseException:
            vars(self).clear()
            vars(self).update(before)
            raise
        self._fitted = True
        return self


def _check_state_type(state: Any) -> None:
    if not isinstance(state, Mapping):
        raise TypeError(
            f"cannot load a recalibrator state: the state must be a dict (what state_dict() returns),"
            f" got {'null' if state is None else short_repr(state)}; {STATE_FIX}"
        )


def from_state_dict(state: dict[str, Any]) -> Recalibrator:
    """The recalibrator a :meth:`Recalibrator.state_dict` describes, fitted. A state that does
    not describe one (edited, truncated, of another version) raises :class:`ValueError` or
    :class:`TypeError` naming the key (:meth:`Recalibrator.load_state_dict`)."""
    _check_state_type(state)
    method = state.get("method")
    if not isinstance(method, str) or method not in REGISTRY:
        raise ValueError(f"cannot load a recalibrator state: unknown method {short_repr(method)} in"
                         f" state['method']; known: {', '.join(sorted(REGISTRY))}; {STATE_FIX}")
    return REGISTRY[method]().load_state_dict(state)


def save(calibrator: Recalibrator, path: str | Path) -> None:
    """Write ``calibrator.state_dict()`` to ``path`` as JSON."""
    if not isinstance(calibrator, Recalibrator):
        raise TypeError(
            f"calibrator must be a fitted recalibrator of crossent.calibration (TemperatureScaler, ...),"
            f" got {type(calibrator).__name__}"
        )
    Path(path).write_text(json.dumps(calibrator.state_dict(), indent=2) + "\n")


def load(path: str | Path) -> Recalibrator:
    """Read a recalibrator written by :func:`save`. A file that is not JSON (empty, cut
    short) raises :class:`ValueError` naming it."""
    text = Path(path).read_text()
    try:
        state = json.loads(text)
    except json.JSONDecodeError as err:
        raise ValueError(
            f"{path} is not the JSON that crossent.calibration.save writes ({err.msg}: line {err.lineno},"
            f" column {err.colno}); is it empty or cut short? Save the calibrator again"
        ) from None
    return from_state_dict(state)
