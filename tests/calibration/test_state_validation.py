"""A recalibrator state read back from JSON is checked when it is loaded: every state that
``state_dict()`` writes loads and transforms exactly as the fitted object did, and every
corrupted one (generated from the real states: each key removed, each array truncated,
reshaped or given a NaN, a string, true or false or a value out of its range, a temperature
outside the state's bounds, isotonic knots out of order) fails at load time with a one-line
``ValueError``/``TypeError`` that names the key. A state meeting logits of another number of
classes fails at ``transform`` naming both counts, and a fit that diverges leaves a state
that loads."""

from __future__ import annotations

import copy
import functools
import importlib.util
import json
import math
import re
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from crossent import calibration as cal

# every method, by an id: how to build it, and whether it takes binary scores (N,)
FACTORIES: dict[str, tuple[Callable[..., cal.Recalibrator], bool]] = {
    "temperature": (lambda **kw: cal.TemperatureScaler(**kw), False),
    "temperature-vector": (lambda **kw: cal.TemperatureScaler("vector", max_iter=30, **kw), False),
    "vector": (lambda **kw: cal.VectorScaler(max_iter=30, **kw), False),
    "matrix": (lambda **kw: cal.MatrixScaler(max_iter=30, **kw), False),
    "dirichlet": (lambda **kw: cal.DirichletCalibrator(max_iter=30, **kw), False),
    "histogram": (lambda **kw: cal.HistogramBinning(n_bins=8, **kw), False),
    "isotonic": (lambda **kw: cal.IsotonicCalibrator(**kw), False),
    "ensemble": (lambda **kw: cal.EnsembleTemperatureScaler(**kw), False),
    "platt": (lambda **kw: cal.PlattScaler(**kw), True),
    "platt-probs": (lambda **kw: cal.PlattScaler(from_logits=False, **kw), True),
    "beta": (lambda **kw: cal.BetaCalibrator(**kw), True),
    "beta-probs": (lambda **kw: cal.BetaCalibrator(from_logits=False, **kw), True),
}
METHODS = list(FACTORIES)
C = 4  # classes of the multiclass data
HAVE_SKLEARN = importlib.util.find_spec("sklearn") is not None  # for IsotonicCalibrator

#: the fits whose states are checked: a real fit, the identity a fallback leaves, (for
#: multiclass data) a fit whose labels miss a class (per-class identity maps, or a fallback),
#: and the degenerate fit kept by fallback_to_identity=False (separable binary data, or a
#: missing class)
VARIANTS = ["fit", "identity", "absent-class", "kept"]
CASES = [(m, v) for m in METHODS for v in VARIANTS if not (v == "absent-class" and FACTORIES[m][1])]

#: params a state may lack: identity_classes (states written before it existed), and the
#: bias of one temperature (None)
OPTIONAL = {("histogram", "identity_classes"), ("isotonic", "identity_classes"), ("temperature", "bias")}
#: params whose outer length is the number of classes, which nothing else in the state fixes
FREE_LENGTH = {"bin_values", "knots", "identity_classes"}


def _data(method: str, variant: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Validation scores, labels, and test scores for ``method``'s ``variant`` (small)."""
    rng = np.random.default_rng(0)
    if FACTORIES[method][1]:
        s = rng.normal(size=400) * 3
        y = (rng.random(400) < 1 / (1 + np.exp(-(0.4 * s - 0.3)))).astype(np.int64)
        if variant in ("identity", "kept"):  # a threshold splits the classes: separable
            y = (s > 0).astype(np.int64)
        if method.endswith("-probs"):
            s = 1 / (1 + np.exp(-s))
        return s[:200], y[:200], s[200:]
    z = rng.normal(size=(400, C)) * 2
    p = torch.softmax(torch.from_numpy(z), 1).numpy()
    y = np.minimum((p.cumsum(1) > rng.random((400, 1))).argmax(1), C - 1)
    z = z * 2.5  # over-confident logits
    if variant == "identity":  # every top-1 prediction correct: separable
        y = z.argmax(1)
        if method in ("histogram", "isotonic"):  # and every class's one-vs-rest problem separated
            z[np.arange(400), y] += 30.0
    elif variant in ("absent-class", "kept"):
        y = np.where(y == C - 1, 0, y)
    elif variant == "noise":  # labels independent of the logits: temperatures at t_max
        y = np.random.default_rng(1).integers(0, C, 400)
    return z[:200], y[:200], z[200:]


@functools.cache
def fitted(method: str, variant: str, options: tuple[tuple[str, Any], ...] = ()
           ) -> tuple[cal.Recalibrator, str, np.ndarray]:
    """The fitted calibrator (built with ``options`` besides its own), its state as JSON text,
    and test scores. The ``kept`` and ``noise`` variants keep degenerate fits."""
    if method == "isotonic":
        pytest.importorskip("sklearn.isotonic")
    x, y, x_test = _data(method, variant)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", cal.CalibrationWarning)
        kw = {"fallback_to_identity": False} if variant in ("kept", "noise") else {}
        c = FACTORIES[method][0](**kw, **dict(options)).fit(x, y)  # type: ignore[attr-defined]
    return c, json.dumps(c.state_dict()), x_test


def state_of(method: str, variant: str = "fit", options: tuple[tuple[str, Any], ...] = ()) -> dict[str, Any]:
    """A fresh copy of the state, as read back from JSON."""
    return json.loads(fitted(method, variant, options)[1])  # type: ignore[no-any-return]


# --------------------------------------------------------------------------------------------
# (1) every real state round-trips exactly


@pytest.mark.parametrize(("method", "variant"), CASES, ids=[f"{m}-{v}" for m, v in CASES])
def test_real_state_round_trips_exactly(method: str, variant: str, tmp_path: Path) -> None:
    c, text, x = fitted(method, variant)
    state = json.loads(text)
    if variant == "fit":
        assert c.fallback is None
    if variant == "identity":
        assert c.fallback is not None
    expected = c.transform(x)  # type: ignore[attr-defined]
    again = cal.from_state_dict(state)
    assert type(again) is type(c)
    np.testing.assert_array_equal(again.transform(x), expected)  # type: ignore[attr-defined]
    np.testing.assert_array_equal(again.transform_logits(x), c.transform_logits(x))  # type: ignore[attr-defined]
    xt = torch.from_numpy(x)
    assert torch.equal(again.transform(xt), c.transform(xt))  # type: ignore[attr-defined]
    assert again.state_dict() == state
    # load_state_dict on a fresh instance, and save/load through a file
    other = FACTORIES[method][0]().load_state_dict(copy.deepcopy(state))  # options replaced
    np.testing.assert_array_equal(other.transform(x), expected)  # type: ignore[attr-defined]
    cal.save(c, tmp_path / "c.json")
    np.testing.assert_array_equal(cal.load(tmp_path / "c.json").transform(x), expected)  # type: ignore[attr-defined]
    for key in ("fallback", "diagnostic", "diagnostic_kind"):
        assert getattr(again, key) == getattr(c, key)


def test_the_variants_cover_the_special_states() -> None:
    """The round trips above include the states with None and identity parts."""
    pytest.importorskip("sklearn.isotonic")
    assert state_of("histogram", "identity")["params"]["bin_values"] is None
    assert state_of("isotonic", "identity")["params"]["knots"] is None
    assert state_of("histogram", "absent-class")["params"]["identity_classes"] == [C - 1]
    assert state_of("isotonic", "absent-class")["params"]["identity_classes"] == [C - 1]
    assert state_of("temperature")["params"]["bias"] is None
    assert state_of("ensemble", "identity")["params"]["weights"] == [0.0, 1.0, 0.0]
    assert state_of("platt-probs")["options"]["from_logits"] is False
    assert state_of("histogram", "kept")["params"]["identity_classes"] == []
    assert state_of("histogram", "kept")["params"]["bin_values"][C - 1][0] == 0.0  # the zeros kept
    for method in METHODS:
        assert fitted(method, "kept")[0].diagnostic_kind in ("separable", "bound", "nll", None)


def test_the_message_points_at_the_entry() -> None:
    for bad, error in (("x", TypeError), (None, TypeError), (math.nan, ValueError)):
        state = state_of("matrix")
        state["params"]["weight"][1][2] = bad
        with pytest.raises(error, match=re.escape("at state['params']['weight'][1][2]")):
            cal.from_state_dict(state)


@pytest.mark.parametrize(("method", "key"), sorted(OPTIONAL))
def test_a_state_without_an_optional_param_still_loads(method: str, key: str) -> None:
    """States written before ``identity_classes`` existed load as no identity classes; one
    temperature without its (None) bias loads as it."""
    c, _, x = fitted(method, "absent-class")
    state = state_of(method, "absent-class")
    del state["params"][key]
    again = cal.from_state_dict(state)
    if key == "identity_classes":
        assert again.identity_classes == []  # type: ignore[attr-defined]
    else:
        np.testing.assert_array_equal(again.transform(x), c.transform(x))  # type: ignore[attr-defined]


# --------------------------------------------------------------------------------------------
# (2) corrupted states fail at load time, naming the key

Mutation = Callable[[dict[str, Any]], None]


def _at(tree: Any, path: tuple[int, ...]) -> Any:
    for i in path:
        tree = tree[i]
    return tree


def _set_param(key: str, path: tuple[int, ...], value: Any) -> Mutation:
    def mutate(state: dict[str, Any]) -> None:
        if path:
            _at(state["params"][key], path[:-1])[path[-1]] = value
        else:
            state["params"][key] = value

    return mutate


def _first_leaf(v: Any) -> tuple[int, ...] | None:
    """The path to the first number of a nested list, None if it has none."""
    path: tuple[int, ...] = ()
    while isinstance(v, list):
        if not v:
            return None
        v, path = v[0], (*path, 0)
    return path


def generic_corruptions(method: str) -> list[tuple[str, str, Mutation]]:
    """(case id, the key the error names, mutation) for every param of the real state."""
    params = state_of(method)["params"]
    out: list[tuple[str, str, Mutation]] = []
    for key, v in params.items():

        def drop(state: dict[str, Any], key: str = key) -> None:
            del state["params"][key]

        if (method, key) not in OPTIONAL:
            out.append(("missing", key, drop))
        out += [("string", key, _set_param(key, (), "oops")), ("dict", key, _set_param(key, (), {})),
                ("bool", key, _set_param(key, (), True))]
        if v is None:
            continue
        out.append(("wrapped", key, _set_param(key, (), [v])))
        leaf = _first_leaf(v)
        if leaf is not None:
            for name, bad in (("nan", math.nan), ("inf", math.inf), ("-inf", -math.inf),
                              ("str", "x"), ("none", None), ("list", [1.0])):
                out.append((f"{name}-inserted", key, _set_param(key, leaf, bad)))
        # truncated and extended at every depth along the first path (the outer length only
        # where something else fixes the number of classes)
        node, path = v, ()
        while isinstance(node, list) and node:
            if path or key not in FREE_LENGTH:
                out.append((f"truncated-{len(path)}", key, _set_param(key, path, node[:-1])))
                out.append((f"extended-{len(path)}", key, _set_param(key, path, [*node, node[-1]])))
            node, path = node[0], (*path, 0)
        if isinstance(v, list) and v and isinstance(v[0], list) and not isinstance(v[0][0], list):
            out.append(("columns-dropped", key, _set_param(key, (), [row[:-1] for row in v])))
            out.append(("flattened", key, _set_param(key, (), [a for row in v for a in row])))
    return out


def _reverse_first_knots(state: dict[str, Any]) -> None:
    pair = state["params"]["knots"][0]
    pair[0] = pair[0][::-1]


def _set_option(name: str, value: Any) -> Mutation:
    def mutate(state: dict[str, Any]) -> None:
        state["options"][name] = value

    return mutate


#: values out of range, and states whose params disagree, per method
SPECIFIC: dict[str, list[tuple[str, str, Mutation]]] = {
    "temperature": [("zero", "temperature", _set_param("temperature", (), 0.0)),
                    ("negative", "temperature", _set_param("temperature", (), -2.0)),
                    ("vector-temperature", "temperature", _set_param("temperature", (), [1.0] * C)),
                    ("bias-given", "bias", _set_param("bias", (), [0.0] * C))],
    "temperature-vector": [("zero", "temperature", _set_param("temperature", (1,), 0.0)),
                           ("negative", "temperature", _set_param("temperature", (1,), -1.0)),
                           ("scalar", "temperature", _set_param("temperature", (), 1.5)),
                           ("no-bias", "bias", _set_param("bias", (), None))],
    "vector": [("zero", "temperature", _set_param("temperature", (0,), 0.0)),
               ("one-class", "temperature", _set_param("temperature", (), [1.0])),
               ("no-bias", "bias", _set_param("bias", (), None))],
    "matrix": [("3x2", "weight", _set_param("weight", (), [[1.0, 0.0]] * 3)),
               ("1x1", "weight", _set_param("weight", (), [[1.0]])),
               ("scalar", "weight", _set_param("weight", (), 1.0)),
               ("bias-2d", "bias", _set_param("bias", (), [[0.0] * C]))],
    "dirichlet": [("3x2", "weight", _set_param("weight", (), [[1.0, 0.0]] * 3))],
    "histogram": [("above-1", "bin_values", _set_param("bin_values", (0, 0), 1.5)),
                  ("below-0", "bin_values", _set_param("bin_values", (1, 2), -0.25)),
                  ("n_bins", "bin_values", _set_option("n_bins", 10)),
                  ("one-class", "bin_values", _set_param("bin_values", (), [[0.5] * 8])),
                  ("class-too-big", "identity_classes", _set_param("identity_classes", (), [C])),
                  ("class-negative", "identity_classes", _set_param("identity_classes", (), [-1])),
                  ("class-fraction", "identity_classes", _set_param("identity_classes", (), [1.5])),
                  ("class-twice", "identity_classes", _set_param("identity_classes", (), [1, 1])),
                  ("classes-2d", "identity_classes", _set_param("identity_classes", (), [[1]]))],
    "isotonic": [("x-above-1", "knots", _set_param("knots", (0, 0, -1), 1.5)),
                 ("x-below-0", "knots", _set_param("knots", (0, 0, 0), -0.5)),
                 ("v-above-1", "knots", _set_param("knots", (1, 1, -1), 2.0)),
                 ("v-below-0", "knots", _set_param("knots", (1, 1, 0), -0.1)),
                 ("unsorted", "knots", _reverse_first_knots),
                 ("empty-pair", "knots", _set_param("knots", (2,), [[], []])),
                 ("pair-of-3", "knots", _set_param("knots", (2,), [[0.0, 1.0]] * 3)),
                 ("not-a-pair", "knots", _set_param("knots", (2,), 0.5)),
                 ("one-class", "knots", _set_param("knots", (), [[[0.0, 1.0], [0.0, 1.0]]])),
                 ("x-v-lengths", "knots", _set_param("knots", (0,), [[0.0, 0.5, 1.0], [0.0, 1.0]])),
                 ("class-too-big", "identity_classes", _set_param("identity_classes", (), [C]))],
    "ensemble": [("negative-weight", "weights", _set_param("weights", (), [-0.1, 1.0, 0.1])),
                 ("sum-not-1", "weights", _set_param("weights", (), [0.5, 0.5, 0.5])),
                 ("two-weights", "weights", _set_param("weights", (), [0.5, 0.5])),
                 ("zero-temperature", "temperature", _set_param("temperature", (), 0.0)),
                 ("negative-temperature", "temperature", _set_param("temperature", (), -1.0))],
    "platt": [("3-coefs", "coef", _set_param("coef", (), [1.0, 1.0, 0.0])),
              ("huge", "coef", _set_param("coef", (0,), 1e400))],
    "platt-probs": [("3-coefs", "coef", _set_param("coef", (), [1.0, 1.0, 0.0]))],
    "beta": [("2-coefs", "coef", _set_param("coef", (), [1.0, 0.0])),
             ("negative-a", "coef", _set_param("coef", (0,), -1.0)),
             ("negative-b", "coef", _set_param("coef", (1,), -0.5))],
    "beta-probs": [("negative-a", "coef", _set_param("coef", (0,), -1.0))],
}

CORRUPTIONS = [
    (method, case, key, mutate)
    for method in METHODS
    if method != "isotonic" or HAVE_SKLEARN
    for case, key, mutate in [*generic_corruptions(method), *SPECIFIC[method]]
]


def _check_message(err: BaseException, method: str, where: str) -> None:
    msg = str(err)
    assert "\n" not in msg
    assert where in msg
    assert repr(state_of(method)["method"]) in msg
    assert "state_dict()" in msg


@pytest.mark.parametrize(
    ("method", "key", "mutate"),
    [(m, k, f) for m, _, k, f in CORRUPTIONS],
    ids=[f"{m}-{k}-{case}" for m, case, k, _ in CORRUPTIONS],
)
def test_a_corrupted_state_fails_at_load_naming_the_key(method: str, key: str, mutate: Mutation,
                                                        tmp_path: Path) -> None:
    state = state_of(method)
    mutate(state)
    where = f"state['params']['{key}']"
    with pytest.raises((ValueError, TypeError), match=re.escape(where)) as info:
        cal.from_state_dict(copy.deepcopy(state))
    _check_message(info.value, method, where)
    # load_state_dict on a fitted instance refuses it too, and leaves the instance as it was
    c, _, x = fitted(method, "fit")
    before = c.transform(x)  # type: ignore[attr-defined]
    target = cal.from_state_dict(state_of(method))
    with pytest.raises((ValueError, TypeError), match=re.escape(where)):
        target.load_state_dict(copy.deepcopy(state))
    np.testing.assert_array_equal(target.transform(x), before)  # type: ignore[attr-defined]
    assert target.state_dict() == state_of(method)
    # and so does load() of a file holding it
    (tmp_path / "c.json").write_text(json.dumps(state))
    with pytest.raises((ValueError, TypeError), match=re.escape(where)):
        cal.load(tmp_path / "c.json")


# --------------------------------------------------------------------------------------------
# (3) hostile states


@pytest.mark.parametrize("state", [None, [], "temperature", 3, [("method", "temperature")]],
                         ids=repr)
def test_a_state_that_is_not_a_dict(state: Any) -> None:
    with pytest.raises(TypeError, match=r"state must be a dict.*state_dict\(\)"):
        cal.from_state_dict(state)
    with pytest.raises(TypeError, match=r"state must be a dict.*state_dict\(\)"):
        cal.TemperatureScaler().load_state_dict(state)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("params", [None, [], "oops", 3, [[1.0, 2.0]]], ids=repr)
def test_params_that_are_not_a_dict(method: str, params: Any) -> None:
    state = state_of(method)
    state["params"] = params
    with pytest.raises((TypeError, ValueError), match=re.escape("state['params']")) as info:
        cal.from_state_dict(state)
    _check_message(info.value, method, "state['params']")
    with pytest.raises((TypeError, ValueError), match=re.escape("state['params']")):
        FACTORIES[method][0]().load_state_dict(state)


@pytest.mark.parametrize("method", METHODS)
def test_a_state_without_params(method: str) -> None:
    state = state_of(method)
    del state["params"]
    with pytest.raises((TypeError, ValueError), match=re.escape("state['params']")):
        cal.from_state_dict(state)
    with pytest.raises((TypeError, ValueError), match=re.escape("state['params']")):
        FACTORIES[method][0]().load_state_dict(state)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize(
    ("key", "value", "error"),
    [("fallback", 3, TypeError), ("fallback", ["no"], TypeError), ("fallback", {"a": 1}, TypeError),
     ("diagnostic", 2.5, TypeError), ("diagnostic_kind", "weird", ValueError),
     ("diagnostic_kind", 1, ValueError), ("options", [], TypeError), ("options", "x", TypeError),
     ("options", {"no_such_option": 1}, TypeError)],
    ids=lambda v: repr(v) if not isinstance(v, type) else v.__name__,
)
def test_the_other_keys_of_a_state(method: str, key: str, value: Any, error: type[Exception]) -> None:
    state = state_of(method)
    state[key] = value
    with pytest.raises(error, match=re.escape(f"state['{key}']")) as info:
        cal.from_state_dict(state)
    _check_message(info.value, method, f"state['{key}']")
    with pytest.raises(error, match=re.escape(f"state['{key}']")):
        FACTORIES[method][0]().load_state_dict(state)


@pytest.mark.parametrize("method", [None, "nope", 3], ids=repr)
def test_an_unknown_method(method: Any) -> None:
    state = state_of("temperature")
    state["method"] = method
    with pytest.raises(ValueError, match="method"):
        cal.from_state_dict(state)


# --------------------------------------------------------------------------------------------
# (4) values that read as numbers but are not what a fit leaves


def _refused(state: dict[str, Any], method: str, error: type[Exception], fragments: tuple[str, ...],
             tmp_path: Path, variant: str = "fit", options: tuple[tuple[str, Any], ...] = ()) -> None:
    """``state`` (edited from the one of ``fitted(method, variant, options)``) fails with
    ``error``, a one-line message holding every fragment: in from_state_dict, in load(), and in
    load_state_dict of a loaded calibrator, which stays as it was."""
    with pytest.raises(error) as info:
        cal.from_state_dict(copy.deepcopy(state))
    msg = str(info.value)
    assert "\n" not in msg
    assert "state_dict()" in msg
    for fragment in fragments:
        assert fragment in msg
    (tmp_path / "c.json").write_text(json.dumps(state))
    with pytest.raises(error, match=re.escape(fragments[0])):
        cal.load(tmp_path / "c.json")
    c, text, x = fitted(method, variant, options)
    target = cal.from_state_dict(json.loads(text))
    with pytest.raises(error) as again:
        target.load_state_dict(copy.deepcopy(state))
    assert all(fragment in str(again.value) for fragment in fragments)
    np.testing.assert_array_equal(target.transform(x), c.transform(x))  # type: ignore[attr-defined]
    assert target.state_dict() == json.loads(text)


def _last_leaf(v: Any) -> tuple[int, ...] | None:
    """The path to the last number of a nested list, None if it has none."""
    path: tuple[int, ...] = ()
    while isinstance(v, list):
        if not v:
            return None
        v, path = v[-1], (*path, len(v) - 1)
    return path


def bool_cases() -> list[tuple[str, str, str, tuple[int, ...], bool]]:
    """(method, variant, key, path, value): true and false at the first and the last number of
    every param (a single number: as the param), each param from the first fit that holds a
    number in it (identity_classes: the absent-class fit)."""
    out: list[tuple[str, str, str, tuple[int, ...], bool]] = []
    for method in METHODS:
        if method == "isotonic" and not HAVE_SKLEARN:
            continue
        seen: set[str] = set()
        for variant in ("fit", "absent-class"):
            if variant == "absent-class" and FACTORIES[method][1]:
                continue
            for key, v in state_of(method, variant)["params"].items():
                paths = {p for p in (_first_leaf(v), _last_leaf(v)) if p is not None}
                if v is None or key in seen or not paths:
                    continue
                seen.add(key)
                out += [(method, variant, key, p, value) for p in sorted(paths) for value in (True, False)]
    return out


BOOLS = bool_cases()


@pytest.mark.parametrize(
    ("method", "variant", "key", "path", "value"),
    BOOLS,
    ids=[f"{m}-{k}{''.join(f'[{i}]' for i in p)}-{v}" for m, _, k, p, v in BOOLS],
)
def test_true_or_false_among_numbers_is_a_type_error(method: str, variant: str, key: str,
                                                     path: tuple[int, ...], value: bool,
                                                     tmp_path: Path) -> None:
    """JSON true and false are not numbers, also inside a list of numbers (where NumPy would
    read them as 1 and 0)."""
    state = state_of(method, variant)
    _set_param(key, path, value)(state)
    at = f"state['params']['{key}']" + "".join(f"[{i}]" for i in path)
    _refused(state, method, TypeError, (at, f"got bool {value!r}"), tmp_path, variant)


def option_kind_cases() -> list[tuple[str, str, Any]]:
    """(method, option, value): true/false for every numeric option, a number or a string
    for every true/false one."""
    out: list[tuple[str, str, Any]] = []
    for method in METHODS:
        if method == "isotonic" and not HAVE_SKLEARN:
            continue
        for name, v in state_of(method)["options"].items():
            if isinstance(v, bool):
                out += [(method, name, bad) for bad in (1, 0, "false")]
            elif isinstance(v, (int, float)):
                out += [(method, name, bad) for bad in (True, False)]
    return out


OPTION_KINDS = option_kind_cases()


@pytest.mark.parametrize(("method", "name", "value"), OPTION_KINDS,
                         ids=[f"{m}-{n}-{v!r}" for m, n, v in OPTION_KINDS])
def test_an_option_of_the_wrong_kind_is_a_type_error(method: str, name: str, value: Any,
                                                     tmp_path: Path) -> None:
    """A true/false option is not 1, 0 or "false" (the constructor would read "false" as
    true), a numeric option is not true or false."""
    state = state_of(method)
    state["options"][name] = value
    due = "a number" if isinstance(value, bool) else "true or false"
    _refused(state, method, TypeError, (f"state['options']['{name}']", f"must be {due}"), tmp_path)


CUSTOM: tuple[tuple[str, Any], ...] = (("t_min", 2.0), ("t_max", 10.0))
#: the methods whose temperatures are bounded by t_min and t_max options
TEMPERATURES = ["temperature", "temperature-vector", "vector"]


def _drop_fallback(state: dict[str, Any]) -> None:
    state["fallback"] = None


def bound_cases() -> list[tuple[str, str, tuple[tuple[str, Any], ...], str, Mutation, type[Exception],
                                tuple[str, ...]]]:
    """(method, variant, options, case id, mutation, error, fragments of the message): a
    temperature out of the state's bounds (1, the identity, only where the state records a
    fallback), and bounds the constructor refuses."""
    out: list[tuple[str, str, tuple[tuple[str, Any], ...], str, Mutation, type[Exception],
                    tuple[str, ...]]] = []
    for method in TEMPERATURES:
        path: tuple[int, ...] = () if method == "temperature" else (1,)
        at = "state['params']['temperature']" + "".join(f"[{i}]" for i in path)

        def set_t(value: float, path: tuple[int, ...] = path) -> Mutation:
            return _set_param("temperature", path, value)

        out += [
            (method, "fit", (), "below-t_min", set_t(0.005), ValueError, (at, "in [0.01, 100]", "got 0.005")),
            (method, "fit", (), "above-t_max", set_t(150.0), ValueError, (at, "in [0.01, 100]", "got 150.0")),
            (method, "noise", CUSTOM, "below-custom-t_min", set_t(1.5), ValueError,
             (at, "in [2, 10] (", "got 1.5")),
            (method, "noise", CUSTOM, "above-custom-t_max", set_t(10.5), ValueError,
             (at, "in [2, 10] (", "got 10.5")),
            (method, "noise", CUSTOM, "one-without-fallback", set_t(1.0), ValueError,
             (at, "in [2, 10] (", "got 1.0")),
            (method, "identity", CUSTOM, "fallback-not-one", set_t(1.5), ValueError,
             (at, "in [2, 10] or 1 (", "got 1.5")),
            (method, "identity", CUSTOM, "fallback-removed", _drop_fallback, ValueError,
             ("state['params']['temperature']", "in [2, 10] (", "got 1.0")),
        ]
        for name, value in (("t_min", 0.0), ("t_min", -1.0), ("t_min", 100.0), ("t_min", 200.0),
                            ("t_max", math.inf), ("t_min", math.nan), ("t_max", 0.001)):
            out.append((method, "fit", (), f"option-{name}-{value}", _set_option(name, value), ValueError,
                        ("state['options']", "need 0 < t_min < t_max < inf")))
    at = "state['params']['temperature']"
    out += [("ensemble", "fit", (), "below-t_min", _set_param("temperature", (), 0.005), ValueError,
             (at, "in [0.01, 100]", "got 0.005")),
            ("ensemble", "fit", (), "above-t_max", _set_param("temperature", (), 150.0), ValueError,
             (at, "in [0.01, 100]", "got 150.0"))]
    return out


BOUNDS = bound_cases()


@pytest.mark.parametrize(
    ("method", "variant", "options", "mutate", "error", "fragments"),
    [(m, v, o, f, e, fr) for m, v, o, _, f, e, fr in BOUNDS],
    ids=[f"{m}-{case}" for m, _, _, case, _, _, _ in BOUNDS],
)
def test_a_temperature_out_of_the_states_bounds_is_refused(
    method: str, variant: str, options: tuple[tuple[str, Any], ...], mutate: Mutation,
    error: type[Exception], fragments: tuple[str, ...], tmp_path: Path,
) -> None:
    state = state_of(method, variant, options)
    mutate(state)
    _refused(state, method, error, fragments, tmp_path, variant, options)


#: fits at a bound, and fallbacks to T = 1 outside custom bounds
BOUNDED = [(m, v, o) for m in TEMPERATURES for v in ("fit", "identity", "kept", "noise")
           for o in (CUSTOM, (("t_max", 0.5),))] + [(m, "noise", ()) for m in [*TEMPERATURES, "ensemble"]]


@pytest.mark.parametrize(("method", "variant", "options"), BOUNDED,
                         ids=[f"{m}-{v}-{dict(o)}" for m, v, o in BOUNDED])
def test_the_states_of_bounded_fits_round_trip(method: str, variant: str,
                                               options: tuple[tuple[str, Any], ...]) -> None:
    """Every temperature the library saves loads: in [t_min, t_max] (vector scaling's
    ``exp(log t_max)`` may be an ulp above), or 1 after a fallback, wherever the bounds are."""
    c, text, x = fitted(method, variant, options)
    state = json.loads(text)
    t = np.atleast_1d(np.asarray(state["params"]["temperature"], dtype=np.float64))
    t_min, t_max = state["options"].get("t_min", 1e-2), state["options"].get("t_max", 1e2)
    if state["fallback"] is not None:
        assert (t == 1.0).all()
    else:
        assert ((t >= t_min * (1 - 1e-12)) & (t <= t_max * (1 + 1e-12))).all()
    again = cal.from_state_dict(state)
    np.testing.assert_array_equal(again.transform(x), c.transform(x))  # type: ignore[attr-defined]
    assert again.state_dict() == state


def test_the_bounded_fits_cover_the_edge_states() -> None:
    """The round trips above include T = 1 below t_min and above t_max, and a vector
    temperature an ulp above t_max."""
    assert state_of("temperature", "identity", CUSTOM)["params"]["temperature"] == 1.0
    assert state_of("vector", "identity", (("t_max", 0.5),))["params"]["temperature"] == [1.0] * C
    assert max(state_of("vector", "noise")["params"]["temperature"]) > 100.0


ISOTONIC_ORDER = [
    ("y-falls", [[0.1, 0.5, 0.9], [0.2, 0.6, 0.4]],
     ("state['params']['knots'][2][1]", "non-decreasing",
      "got 0.6 at state['params']['knots'][2][1][1] then 0.4")),
    ("y-falls-to-start", [[0.1, 0.5, 0.9], [0.3, 0.3, 0.0]],
     ("state['params']['knots'][2][1]", "non-decreasing",
      "got 0.3 at state['params']['knots'][2][1][1] then 0.0")),
    ("x-tie", [[0.1, 0.5, 0.5], [0.2, 0.3, 0.4]],
     ("state['params']['knots'][2][0]", "strictly increasing",
      "got 0.5 at state['params']['knots'][2][0][1] then 0.5")),
    ("x-falls", [[0.1, 0.6, 0.5], [0.2, 0.3, 0.4]],
     ("state['params']['knots'][2][0]", "strictly increasing",
      "got 0.6 at state['params']['knots'][2][0][1] then 0.5")),
]


@pytest.mark.parametrize(("knots", "fragments"), [(k, f) for _, k, f in ISOTONIC_ORDER],
                         ids=[case for case, _, _ in ISOTONIC_ORDER])
def test_isotonic_knots_out_of_order_are_refused(knots: list[list[float]], fragments: tuple[str, ...],
                                                 tmp_path: Path) -> None:
    """An isotonic fit's thresholds x are strictly increasing (scikit-learn merges duplicate
    scores), its values y never fall."""
    pytest.importorskip("sklearn.isotonic")
    state = state_of("isotonic")
    state["params"]["knots"][2] = knots
    _refused(state, "isotonic", ValueError, fragments, tmp_path)


def _isotonic_data(case: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Validation logits and labels, and test logits, of an awkward kind for isotonic fits."""
    rng = np.random.default_rng(2)
    z = rng.normal(size=(300, C)) * 3
    y = rng.integers(0, C, 300)
    if case == "ties":  # few distinct rows: tied probabilities
        z = rng.integers(-2, 3, size=(300, C)).astype(np.float64)
    elif case == "constant":  # every probability 1 / C
        z = np.zeros_like(z)
    elif case == "two-rows":
        z = np.where(rng.random((300, 1)) < 0.5, z[:1], z[1:2])
    elif case == "never-seen":
        y = np.where(y == C - 1, 0, y)
    elif case == "saturated":  # probabilities within float64 resolution of 0 and 1
        z = z * 40
    elif case == "tiny":
        z, y = z[:3], y[:3]
    elif case == "one-class":
        y = np.zeros_like(y)
    return z, y, rng.normal(size=(50, C)) * 3


ISOTONIC_DATA = ["ties", "constant", "two-rows", "never-seen", "saturated", "tiny", "one-class"]


@pytest.mark.parametrize("keep", [False, True], ids=["fallback", "kept"])
@pytest.mark.parametrize("case", ISOTONIC_DATA)
def test_isotonic_states_of_awkward_data_round_trip(case: str, keep: bool) -> None:
    """What the fit leaves satisfies what loading checks: x strictly increasing, y
    non-decreasing, both in [0, 1], on ties, constant scores, a class never seen..."""
    pytest.importorskip("sklearn.isotonic")
    z, y, z_test = _isotonic_data(case)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", cal.CalibrationWarning)
        c = cal.IsotonicCalibrator(fallback_to_identity=not keep).fit(z, y)
    state = json.loads(json.dumps(c.state_dict()))
    for x, v in state["params"]["knots"] or []:
        assert (np.diff(x) > 0).all() and (np.diff(v) >= 0).all()
        assert min(x + v) >= 0.0 and max(x + v) <= 1.0
    again = cal.from_state_dict(state)
    np.testing.assert_array_equal(again.transform(z_test), c.transform(z_test))
    np.testing.assert_array_equal(again.transform(z), c.transform(z))
    assert again.state_dict() == state


# --------------------------------------------------------------------------------------------
# (5) a state meets logits of another number of classes; fits that diverge

#: the methods with parameters per class
PER_CLASS = ["temperature-vector", "vector", "matrix", "dirichlet", "histogram", "isotonic"]


def _other_width(x: np.ndarray, width: int) -> np.ndarray:
    return np.concatenate([x] * 3, 1)[:, :width]


@pytest.mark.parametrize("width", [2, C - 1, C + 1])
@pytest.mark.parametrize("method", PER_CLASS)
def test_logits_of_another_width_name_both_class_counts(method: str, width: int) -> None:
    """transform and transform_logits, on arrays and tensors, of the fitted calibrator and of
    its loaded state, refuse logits of another number of classes in one line naming both."""
    c, text, x = fitted(method, "fit")
    loaded = cal.from_state_dict(json.loads(text))
    wrong = _other_width(x, width)
    for calibrator in (c, loaded):
        for logits in (wrong, wrong.astype(np.float32), wrong.astype(np.float16), torch.from_numpy(wrong)):
            for apply in (calibrator.transform, calibrator.transform_logits):  # type: ignore[attr-defined]
                with pytest.raises(ValueError) as info:
                    apply(logits)
                msg = str(info.value)
                assert "\n" not in msg
                assert f"logits have {width} classes but the map was fitted on {C}" in msg
                assert f"pass (N, {C}) logits" in msg


@pytest.mark.parametrize("method", ["histogram", "isotonic"])
def test_a_state_of_fewer_classes_refuses_the_logits_at_transform(method: str) -> None:
    """Nothing else in a binning state fixes the number of classes: a state of C - 1 classes
    loads, and names both counts when it meets C-class logits."""
    x = fitted(method, "fit")[2]
    state = state_of(method)
    key = "bin_values" if method == "histogram" else "knots"
    state["params"][key] = state["params"][key][:-1]
    loaded = cal.from_state_dict(state)
    np.testing.assert_array_equal(loaded.transform(x[:, :-1]).shape, (x.shape[0], C - 1))  # type: ignore[attr-defined]
    with pytest.raises(ValueError, match=re.escape(f"logits have {C} classes but the map was fitted on"
                                                   f" {C - 1}: pass (N, {C - 1}) logits")):
        loaded.transform(x)  # type: ignore[attr-defined]


def _diverging(method: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Validation scores on which ``method``'s optimiser overflows (NaN parameters), and
    ordinary test scores."""
    rng = np.random.default_rng(3)
    if FACTORIES[method][1]:
        s = rng.normal(size=40) * 3
        return s * 1e150, (s > 0).astype(np.int64), rng.normal(size=20) * 3
    z = rng.normal(size=(40, C)) * 2
    return z * 1e307, rng.integers(0, C, 40), rng.normal(size=(20, C)) * 2


DIVERGING = [("matrix", False), ("matrix", True), ("dirichlet", False), ("dirichlet", True),
             ("platt", True), ("beta", True)]


@pytest.mark.parametrize(("method", "keep"), DIVERGING,
                         ids=[f"{m}-{'kept' if k else 'fallback'}" for m, k in DIVERGING])
def test_a_diverged_fit_falls_back_and_its_state_round_trips(method: str, keep: bool) -> None:
    """A fit whose parameters come out NaN or infinite becomes the identity even with
    fallback_to_identity=False: its state is strict JSON, loads, and transforms the same."""
    x, y, x_test = _diverging(method)
    factory = FACTORIES[method][0]
    with pytest.warns(cal.CalibrationWarning, match="not finite") as record:
        c = factory(fallback_to_identity=not keep).fit(x, y)  # type: ignore[attr-defined]
    if keep:
        assert any("whatever fallback_to_identity says" in str(w.message) for w in record)
    assert c.fallback is not None and "not finite" in c.fallback
    assert c.diagnostic == c.fallback
    assert c.diagnostic_kind in ("separable", "nll")
    identity = factory()  # type: ignore[attr-defined]
    identity._set_identity(C)
    identity._fitted = True
    np.testing.assert_array_equal(c.transform(x_test), identity.transform(x_test))  # type: ignore[attr-defined]
    state = json.loads(json.dumps(c.state_dict(), allow_nan=False))
    again = cal.from_state_dict(state)
    np.testing.assert_array_equal(again.transform(x_test), c.transform(x_test))  # type: ignore[attr-defined]
    assert again.state_dict() == state
    c.load_state_dict(c.state_dict())
    np.testing.assert_array_equal(c.transform(x_test), again.transform(x_test))  # type: ignore[attr-defined]
