"""A recalibrator state read back from JSON is checked when it is loaded: every state that
``state_dict()`` writes loads and transforms exactly as the fitted object did, and every
corrupted one (generated from the real states: each key removed, each array truncated,
reshaped or given a NaN, a string or a value out of its range) fails at load time with a
one-line ``ValueError``/``TypeError`` that names the key."""

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
    elif variant in ("absent-class", "kept"):
        y = np.where(y == C - 1, 0, y)
    return z[:200], y[:200], z[200:]


@functools.cache
def fitted(method: str, variant: str) -> tuple[cal.Recalibrator, str, np.ndarray]:
    """The fitted calibrator, its state as JSON text, and test scores."""
    if method == "isotonic":
        pytest.importorskip("sklearn.isotonic")
    x, y, x_test = _data(method, variant)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", cal.CalibrationWarning)
        kw = {"fallback_to_identity": False} if variant == "kept" else {}
        c = FACTORIES[method][0](**kw).fit(x, y)  # type: ignore[attr-defined]
    return c, json.dumps(c.state_dict()), x_test


def state_of(method: str, variant: str = "fit") -> dict[str, Any]:
    """A fresh copy of the state, as read back from JSON."""
    return json.loads(fitted(method, variant)[1])  # type: ignore[no-any-return]


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
