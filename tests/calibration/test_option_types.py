"""The options of the public calibration API are checked for their type, not coerced.

Generated from one table: every public constructor and function of
:mod:`crossent.calibration` (and the options of ``TemperatureScaler.fit`` and
``ReliabilityTable.calibration_error``) with the kind of each of its options. For every
option, each bad value on its own -- a string such as ``"no"``, a float such as 2.5 (or 10.0)
where an integer is due, ``True``/``False`` where an integer is due, ``1``/``0`` where
``True``/``False`` is due, ``None`` where it is not allowed, a value out of range -- raises
``TypeError`` (a wrong type) or ``ValueError`` (a value out of range, and not a
``TypeError``), with a one-line message that names the option and shows the value given.
Every good value -- NumPy integers, NumPy bools, NumPy strings, the Python values and the
defaults -- works and gives what the Python value gives. A recalibrator state whose options
are of the wrong type fails to load with the one-line state error, naming the option.
"""

from __future__ import annotations

import copy
import inspect
import json
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import pytest
import torch

from crossent import calibration as cal

pytestmark = pytest.mark.filterwarnings("ignore::crossent.calibration.CalibrationWarning")

_rng = np.random.default_rng(7)
Z = _rng.normal(size=(24, 3)) * 3  # multiclass logits, every class present
Y = np.arange(24) % 3
P = torch.softmax(torch.from_numpy(Z), 1).numpy()
ML = _rng.random((24, 3))  # multi-label scores and 0/1 labels
MY = (_rng.random((24, 3)) > 0.5).astype(np.int64)
BP = 1.0 / (1.0 + np.exp(-_rng.normal(size=24) * 2))  # binary probabilities (also fine as logits)
BY = (_rng.random(24) < BP).astype(np.int64)
BY[:2] = (0, 1)
TABLE = cal.reliability_table(P, Y, n_bins=5)


@dataclass(frozen=True)
class Kind:
    """An option's kind: bad values with the error each raises, and good values with the
    Python value each must act as."""

    bad: tuple[tuple[Any, type[Exception]], ...]
    good: tuple[tuple[Any, Any], ...]


BOOL = Kind(
    bad=(("no", TypeError), ("False", TypeError), (1, TypeError), (0, TypeError), (2.5, TypeError),
         (None, TypeError), (np.int64(1), TypeError)),
    good=((np.bool_(True), True), (np.bool_(False), False)),
)
BOOL_OR_NONE = Kind(
    bad=(("no", TypeError), ("None", TypeError), (1, TypeError), (0, TypeError), (0.0, TypeError)),
    good=((np.bool_(True), True), (np.bool_(False), False), (None, None)),
)
COUNT = Kind(  # an integer >= 1: n_bins, max_iter
    bad=(("10", TypeError), (2.5, TypeError), (10.0, TypeError), (np.float64(10.0), TypeError),
         (True, TypeError), (False, TypeError), (None, TypeError), (0, ValueError), (-3, ValueError)),
    good=((np.int64(7), 7), (np.uint8(7), 7)),
)
NUM_CLASSES = Kind(  # an integer >= 2 or None (the data have 3 classes)
    bad=(("3", TypeError), (2.5, TypeError), (3.0, TypeError), (True, TypeError), (1, ValueError),
         (0, ValueError)),
    good=((np.int64(3), 3), (np.int8(3), 3), (None, None)),
)
IGNORE_INDEX = Kind(  # any integer, or None
    bad=(("no", TypeError), ("-100", TypeError), (2.5, TypeError), (-1.0, TypeError), (True, TypeError),
         (False, TypeError), (np.float64(1.0), TypeError)),
    good=((np.int64(1), 1), (np.int32(-1), -1), (None, None)),
)
LOW_COUNT = Kind(  # an integer >= 0
    bad=(("10", TypeError), (2.5, TypeError), (True, TypeError), (None, TypeError), (-1, ValueError)),
    good=((np.int64(3), 3), (0, 0)),
)


TEXT = Kind(  # a title: a string or None
    bad=((3, TypeError), (2.5, TypeError), (True, TypeError), (["a title"], TypeError)),
    good=((np.str_("a title"), "a title"), (None, None)),
)


def choice(*values: str) -> Kind:
    return Kind(bad=((1, TypeError), (None, TypeError), (b"x", TypeError), ("nope", ValueError),
                     (values[0].upper(), ValueError)),
                good=tuple((np.str_(v), v) for v in values))


def real(out_of_range: tuple[float, ...], good: tuple[tuple[Any, Any], ...], *, none: bool = False) -> Kind:
    """A real number, or also None (``none``); ``out_of_range`` values raise ValueError."""
    bad: tuple[tuple[Any, type[Exception]], ...] = (("1", TypeError), (True, TypeError), (False, TypeError),
                                                    ([0.5], TypeError))
    if not none:
        bad += ((None, TypeError),)
    return Kind(bad=bad + tuple((v, ValueError) for v in out_of_range),
                good=good + (((None, None),) if none else ()))


FALLBACK = {"fallback_to_identity": BOOL}
SCORES = {"from_logits": BOOL, "ignore_index": IGNORE_INDEX}
BINS = {"n_bins": COUNT, "binning": choice("width", "mass")}
T_BOUNDS = {"t_min": real((0.0, -1.0, math.nan), ((np.float64(0.05), 0.05), (np.float32(0.5), 0.5))),
            "t_max": real((0.001, math.inf), ((np.float64(50.0), 50.0), (np.int64(50), 50)))}
REGS = {name: real((-1.0, math.nan, math.inf), ((np.float64(0.1), 0.1), (np.int64(0), 0)))
        for name in ("reg_off_diagonal", "reg_bias")}


def _state(c: cal.Recalibrator, x: Any, y: Any) -> Any:
    """The fitted state, through JSON: also checks that the options are plain Python values."""
    return json.loads(json.dumps(c.fit(x, y).state_dict()))


def _options(c: cal.Recalibrator) -> Any:
    """The options of a recalibrator, through JSON (plain Python values)."""
    return json.loads(json.dumps(c._options()))


def _meter(**kw: Any) -> dict[str, float]:
    m = cal.CalibrationMeter(**kw)
    m.update(P, Y)
    m.update(P[:5], Y[:5])
    return m.compute()


def _titles(fig: Any) -> list[str]:
    return [ax.get_title() for ax in fig.axes]


@dataclass(frozen=True)
class Target:
    """A public constructor or function: ``run(**options)`` calls it on small data and returns
    what it computed (a recalibrator: its options), in a form ``np.testing.assert_equal``
    compares."""

    name: str
    run: Callable[..., Any]
    options: dict[str, Kind]
    #: the parameters of ``signature`` that are not options (data, axes, titles)
    not_options: tuple[str, ...] = ()
    #: what the options are read from (default: ``run``'s subject, named by ``name``)
    signature: Callable[..., Any] | None = None
    #: for a recalibrator (whose ``run`` gives its options): build it with the options, fit
    #: it on small data and give its state
    fit: Callable[..., Any] | None = None


TARGETS: list[Target] = [
    # metrics
    Target("reliability_table", lambda **kw: cal.reliability_table(P, Y, **kw).to_rows(),
           {**BINS, **SCORES}),
    Target("ece", lambda **kw: cal.ece(P, Y, **kw),
           {**BINS, "norm": choice("l1", "l2", "max"), **SCORES}),
    Target("classwise_ece", lambda **kw: cal.classwise_ece(P, Y, **kw),
           {"num_classes": NUM_CLASSES, "n_bins": COUNT, **SCORES}),
    Target("debiased_l2_ece", lambda **kw: cal.debiased_l2_ece(P, Y, **kw),
           {"squared": BOOL, **BINS, **SCORES}),
    Target("smooth_ece", lambda **kw: cal.smooth_ece(P, Y, **kw),
           {"sigma": real((-1.0, math.inf, math.nan), ((np.float64(0.1), 0.1), (np.int64(0), 0)), none=True),
            **SCORES}),
    Target("brier", lambda **kw: cal.brier(P, Y, **kw), SCORES),
    Target("nll", lambda **kw: cal.nll(P, Y, **kw),
           {"from_logits": BOOL_OR_NONE, "ignore_index": IGNORE_INDEX}),
    Target("accuracy", lambda **kw: cal.accuracy(P, Y, **kw), SCORES),
    Target("multilabel_ece", lambda **kw: cal.multilabel_ece(ML, MY, **kw),
           {"average": choice("pooled", "macro", "none"), **BINS, **SCORES}),
    Target("ReliabilityTable.calibration_error", lambda **kw: TABLE.calibration_error(**kw),
           {"norm": choice("l1", "l2", "max")}, signature=cal.ReliabilityTable.calibration_error),
    # streaming
    Target("CalibrationMeter", _meter,
           {**BINS, "num_classes": NUM_CLASSES, "ignore_index": IGNORE_INDEX, "from_logits": BOOL_OR_NONE,
            "classwise": BOOL}),
    # plots
    Target("reliability_diagram", lambda **kw: _titles(cal.reliability_diagram(P, Y, **kw)),
           {**BINS, "from_logits": BOOL, "low_count": LOW_COUNT, "ignore_index": IGNORE_INDEX,
            "title": TEXT, "aggregate": TEXT},
           not_options=("ax",)),
    Target("compare_reliability_diagrams",
           lambda **kw: _titles(cal.compare_reliability_diagrams({"a": P}, Y, **kw)),
           {**BINS, "from_logits": BOOL, "low_count": LOW_COUNT, "ignore_index": IGNORE_INDEX,
            "aggregate": TEXT}),
    # recalibrators: run gives the options; fit, one fit with the options given
    Target("Recalibrator", lambda **kw: _options(cal.Recalibrator(**kw)), FALLBACK),
    Target("TemperatureScaler", lambda **kw: _options(cal.TemperatureScaler(**kw)),
           {"method": choice("temperature", "vector"), **T_BOUNDS, "max_iter": COUNT, **FALLBACK},
           fit=lambda **kw: _state(cal.TemperatureScaler(**kw), Z, Y)),
    Target("TemperatureScaler.fit", lambda **kw: cal.TemperatureScaler().fit(Z, Y, **kw).state_dict(),
           {"objective": choice("nll", "ece"), "n_bins": COUNT,
            "init_temperature": real((0.0, -1.0, math.inf), ((np.float64(2.0), 2.0), (np.int64(2), 2)))},
           signature=cal.TemperatureScaler.fit),
    Target("VectorScaler", lambda **kw: _options(cal.VectorScaler(**kw)),
           {**T_BOUNDS, "max_iter": COUNT, **FALLBACK},
           fit=lambda **kw: _state(cal.VectorScaler(**kw), Z, Y)),
    Target("MatrixScaler", lambda **kw: _options(cal.MatrixScaler(**kw)),
           {**REGS, "max_iter": COUNT, **FALLBACK}, fit=lambda **kw: _state(cal.MatrixScaler(**kw), Z, Y)),
    Target("DirichletCalibrator", lambda **kw: _options(cal.DirichletCalibrator(**kw)),
           {**REGS, "max_iter": COUNT, **FALLBACK},
           fit=lambda **kw: _state(cal.DirichletCalibrator(**kw), Z, Y)),
    Target("HistogramBinning", lambda **kw: _options(cal.HistogramBinning(**kw)),
           {"n_bins": COUNT, **FALLBACK}, fit=lambda **kw: _state(cal.HistogramBinning(**kw), Z, Y)),
    Target("IsotonicCalibrator", lambda **kw: _options(cal.IsotonicCalibrator(**kw)), FALLBACK,
           fit=lambda **kw: _state(cal.IsotonicCalibrator(**kw), Z, Y)),
    Target("EnsembleTemperatureScaler", lambda **kw: _options(cal.EnsembleTemperatureScaler(**kw)),
           {"loss": choice("mse", "nll"), **FALLBACK},
           fit=lambda **kw: _state(cal.EnsembleTemperatureScaler(**kw), Z, Y)),
    Target("PlattScaler", lambda **kw: _options(cal.PlattScaler(**kw)),
           {"from_logits": BOOL_OR_NONE, **FALLBACK}, fit=lambda **kw: _state(cal.PlattScaler(**kw), BP, BY)),
    Target("BetaCalibrator", lambda **kw: _options(cal.BetaCalibrator(**kw)),
           {"from_logits": BOOL_OR_NONE, **FALLBACK},
           fit=lambda **kw: _state(cal.BetaCalibrator(**kw), BP, BY)),
]

#: the public names with no option to check
NO_OPTIONS = {"CalibrationWarning", "ReliabilityTable", "from_state_dict", "load", "save"}
#: the leading parameters that are data
DATA = {"self", "probs", "labels", "probs_or_logits", "probs_by_name", "logits", "kwargs"}

BAD = [(t, name, value, error)
       for t in TARGETS for name, kind in t.options.items() for value, error in kind.bad]
GOOD = [(t, name, value, same)
        for t in TARGETS for name, kind in t.options.items() for value, same in kind.good]


def _subject(t: Target) -> Callable[..., Any]:
    if t.signature is not None:
        return t.signature
    return getattr(cal, t.name)  # type: ignore[no-any-return]


def test_every_public_callable_and_option_is_in_the_table() -> None:
    covered = {t.name.split(".")[0] for t in TARGETS}
    assert set(cal.__all__) - NO_OPTIONS <= covered
    for t in TARGETS:
        params = set(inspect.signature(_subject(t)).parameters) - DATA - set(t.not_options)
        assert params == set(t.options), t.name


def _id(value: Any) -> str:
    return f"np.{type(value).__name__}({value.item()!r})" if isinstance(value, np.generic) else repr(value)


@pytest.mark.parametrize(("target", "name", "value", "error"), BAD,
                         ids=[f"{t.name}-{n}={_id(v)}" for t, n, v, _ in BAD])
def test_a_bad_option_is_refused_naming_it(target: Target, name: str, value: Any,
                                           error: type[Exception]) -> None:
    with pytest.raises(error) as info:
        target.run(**{name: value})
    msg = str(info.value)
    assert "\n" not in msg
    assert name in msg
    assert repr(value) in msg  # what was given
    if error is ValueError:  # out of range: a ValueError, not a type error
        assert not isinstance(info.value, TypeError), msg


@pytest.mark.parametrize(("target", "name", "value", "same"), GOOD,
                         ids=[f"{t.name}-{n}={_id(v)}" for t, n, v, _ in GOOD])
def test_a_good_option_acts_as_its_python_value(target: Target, name: str, value: Any, same: Any) -> None:
    np.testing.assert_equal(target.run(**{name: value}), target.run(**{name: same}))


@pytest.mark.parametrize("target", TARGETS, ids=[t.name for t in TARGETS])
def test_the_defaults_work_and_are_the_stated_ones(target: Target) -> None:
    """Every option left out is the default of the signature, passed explicitly."""
    params = inspect.signature(_subject(target)).parameters
    defaults = {name: params[name].default for name in target.options}
    np.testing.assert_equal(target.run(), target.run(**defaults))
    if target.fit is not None:
        target.fit()


FITS = [t for t in TARGETS if t.fit is not None]


@pytest.mark.parametrize("target", FITS, ids=[t.name for t in FITS])
def test_a_recalibrator_fits_alike_with_numpy_options(target: Target) -> None:
    """Every option at once as a NumPy value (the first good one of its kind) fits as the
    Python values do."""
    assert target.fit is not None
    given = {name: kind.good[0][0] for name, kind in target.options.items()}
    same = {name: kind.good[0][1] for name, kind in target.options.items()}
    np.testing.assert_equal(target.fit(**given), target.fit(**same))


def test_meter_from_logits_numpy_bool_is_not_read_as_logits() -> None:
    """Probabilities with ``from_logits=np.bool_(False)`` are probabilities; ``"no"`` (which the
    meter used to take as true, reading the probabilities as logits) is refused."""
    want = cal.ece(P, Y)
    assert _meter(from_logits=np.bool_(False))["ece"] == _meter(from_logits=False)["ece"]
    m = cal.CalibrationMeter(from_logits=np.bool_(False))  # type: ignore[arg-type]  # NumPy bools are taken
    m.update(P, Y)
    assert m.compute()["ece"] == pytest.approx(want, rel=1e-12)
    assert type(m.from_logits) is bool
    with pytest.raises(TypeError, match="from_logits must be True, False or None, got 'no'"):
        cal.CalibrationMeter(from_logits="no")  # type: ignore[arg-type]


def test_an_option_keeps_its_python_type() -> None:
    """NumPy values are stored as the Python ones (the states are JSON, the meter's options
    compared with ``is``)."""
    t = cal.TemperatureScaler(max_iter=np.int64(9), t_min=np.float32(0.5),
                              fallback_to_identity=np.bool_(False))  # type: ignore[arg-type]
    assert (type(t.max_iter), type(t.t_min), type(t.fallback_to_identity)) == (int, float, bool)
    m = cal.CalibrationMeter(n_bins=np.int64(4), ignore_index=np.int64(-1),
                             classwise=np.bool_(True))  # type: ignore[arg-type]
    assert (type(m.n_bins), type(m.ignore_index), type(m.classwise)) == (int, int, bool)
    assert type(cal.PlattScaler(from_logits=np.bool_(True)).from_logits) is bool  # type: ignore[arg-type]


# --------------------------------------------------------------------------------------------
# a state whose options are of the wrong type: the one-line state error

STATE_CASES: list[tuple[str, Callable[[], cal.Recalibrator], str, Any]] = [
    ("temperature", cal.TemperatureScaler, "max_iter", 2.5),
    ("temperature", cal.TemperatureScaler, "max_iter", "100"),
    ("temperature", cal.TemperatureScaler, "t_min", "0.01"),
    ("temperature", cal.TemperatureScaler, "method", 1),
    ("temperature", cal.TemperatureScaler, "fallback_to_identity", "no"),
    ("vector", cal.VectorScaler, "max_iter", 30.0),
    ("matrix", cal.MatrixScaler, "max_iter", 2.5),
    ("matrix", cal.MatrixScaler, "reg_bias", "0.1"),
    ("dirichlet", cal.DirichletCalibrator, "max_iter", 2.5),
    ("histogram", cal.HistogramBinning, "n_bins", 7.5),
    ("histogram", cal.HistogramBinning, "n_bins", "7"),
    ("ensemble", cal.EnsembleTemperatureScaler, "loss", 1),
    ("platt", cal.PlattScaler, "from_logits", "no"),
    ("beta", cal.BetaCalibrator, "from_logits", "no"),
]


@pytest.mark.parametrize(("method", "make", "name", "value"), STATE_CASES,
                         ids=[f"{m}-{n}={v!r}" for m, _, n, v in STATE_CASES])
def test_a_state_with_an_option_of_the_wrong_type_is_refused(
    method: str, make: Callable[[], cal.Recalibrator], name: str, value: Any
) -> None:
    x, y = (BP, BY) if method in ("platt", "beta") else (Z, Y)
    fitted = make().fit(x, y)
    state = fitted.state_dict()
    bad = copy.deepcopy(state)
    bad["options"][name] = value
    with pytest.raises(TypeError) as info:
        cal.from_state_dict(bad)
    msg = str(info.value)
    assert "\n" not in msg
    assert msg.startswith("cannot load the state of")
    assert "state['options']" in msg and name in msg and "state_dict()" in msg
    target = cal.from_state_dict(copy.deepcopy(state))
    with pytest.raises(TypeError):
        target.load_state_dict(bad)
    assert target.state_dict() == state  # left as it was
