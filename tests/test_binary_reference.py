"""Properties of the NumPy reference of the sigmoid family (hypothesis and generated grids)."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from _helpers import poly1_partners
from crossent import reference as R

finite = st.floats(-8.0, 8.0, allow_nan=False)
unit = st.floats(0.0, 1.0, allow_nan=False)


@st.composite
def problems(draw):
    n = draw(st.integers(1, 6))
    x = np.array(draw(st.lists(finite, min_size=n, max_size=n)))
    t = np.array(draw(st.lists(unit, min_size=n, max_size=n)))
    opts = dict(
        label_smoothing=draw(st.floats(0.0, 0.5)),
        gamma_pos=draw(st.floats(0.0, 4.0)),
        gamma_neg=draw(st.floats(0.0, 4.0)),
        alpha=draw(st.one_of(st.none(), st.floats(0.0, 1.0))),
        clip=draw(st.sampled_from([0.0, 0.05, 0.2])),
        pos_weight=draw(st.floats(0.1, 3.0)),
    )
    return x, t, opts


@settings(max_examples=60, deadline=None)
@given(problems())
def test_reference_gradient_matches_central_differences(problem):
    x, t, opts = problem
    p = 1.0 / (1.0 + np.exp(-x))
    if opts["clip"] and np.any(np.abs(p - opts["clip"]) < 1e-4):
        return  # the clip kink: no derivative there
    _, grad = R.binary_loss(x, t, reduction="sum", **opts)
    h = 1e-6
    for i in range(x.size):
        e = np.zeros_like(x)
        e[i] = h
        up, _ = R.binary_loss(x + e, t, reduction="sum", **opts)
        dn, _ = R.binary_loss(x - e, t, reduction="sum", **opts)
        np.testing.assert_allclose(grad[i], (up - dn) / (2 * h), rtol=1e-4, atol=1e-6)


@settings(max_examples=60, deadline=None)
@given(problems())
def test_reference_loss_is_finite_and_non_negative(problem):
    x, t, opts = problem
    loss, grad = R.binary_loss(x * 1e3, t, reduction="none", **opts)
    assert np.all(np.isfinite(loss)) and np.all(np.isfinite(grad))
    assert np.all(loss >= 0)


@settings(max_examples=40, deadline=None)
@given(problems())
def test_reference_gamma_zero_is_bce(problem):
    x, t, _ = problem
    loss, _ = R.binary_cross_entropy(x, t, reduction="none")
    p = 1.0 / (1.0 + np.exp(-x))
    np.testing.assert_allclose(loss, -(t * np.log(p) + (1 - t) * np.log1p(-p)), rtol=1e-9)


# --------------------------------------------------------------------------------------------
# Poly-1 term and the detached focal weight

#: the options the Poly-1 term is combined with (alone, and every pair of them)
POLY_WITH = poly1_partners(label_smoothing=0.2, ignore_index=-1.0)
POLY_SETS = [(), *((n,) for n in POLY_WITH), *itertools.combinations(POLY_WITH, 2), tuple(POLY_WITH)]


def _poly_problem(names, seed, shape=(5, 4)):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=shape) * 2.5
    t = rng.uniform(size=shape)
    t.flat[::3] = np.round(t.flat[::3])  # hard and soft targets
    opts: dict = {}
    for n in names:
        opts.update(POLY_WITH[n])
    if "weight" in opts:
        opts["weight"] = rng.uniform(0.2, 2.0, size=shape[-1])
        opts["pos_weight"] = rng.uniform(0.2, 3.0, size=shape[-1])
    if "ignore_index" in opts:
        t.flat[1::5] = -1.0
    if "clip" in opts:  # keep away from the clip kink, where the derivative jumps
        p = 1.0 / (1.0 + np.exp(-x))
        x = np.where(np.abs(p - opts["clip"]) < 1e-3, x + 0.1, x)
    return x, t, opts


def _central_differences(fn, x, h=1e-6):
    g = np.zeros_like(x)
    for i in range(x.size):
        e = np.zeros_like(x)
        e.flat[i] = h
        g.flat[i] = (fn(x + e) - fn(x - e)) / (2 * h)
    return g


@pytest.mark.parametrize("reduction", ["sum", "mean"])
@pytest.mark.parametrize("poly1", [1.0, -0.6, 2.5])
@pytest.mark.parametrize("names", POLY_SETS, ids=lambda n: "+".join(n) or "alone")
def test_poly1_gradient_matches_central_differences(names, poly1, reduction):
    x, t, opts = _poly_problem(names, seed=len(names) * 7 + int(abs(poly1) * 10))
    _, grad = R.binary_loss(x, t, poly1=poly1, reduction=reduction, **opts)

    def f(z):
        return float(R.binary_loss(z, t, poly1=poly1, reduction=reduction, **opts)[0])

    np.testing.assert_allclose(grad, _central_differences(f, x), rtol=1e-6, atol=1e-7)


@settings(max_examples=60, deadline=None)
@given(problems(), st.floats(-3.0, 3.0, allow_nan=False))
def test_poly1_gradient_property(problem, poly1):
    """Hypothesis: the analytic Poly-1 gradient against central differences, every option."""
    x, t, opts = problem
    p = 1.0 / (1.0 + np.exp(-x))
    if opts["clip"] and np.any(np.abs(p - opts["clip"]) < 1e-4):
        return  # the clip kink: no derivative there
    _, grad = R.binary_loss(x, t, poly1=poly1, reduction="sum", **opts)

    def f(z):
        return float(R.binary_loss(z, t, poly1=poly1, reduction="sum", **opts)[0])

    np.testing.assert_allclose(grad, _central_differences(f, x), rtol=1e-4, atol=1e-6)


@settings(max_examples=60, deadline=None)
@given(problems(), st.floats(-3.0, 3.0, allow_nan=False))
def test_poly1_term_is_w_alpha_one_minus_pt(problem, poly1):
    """The Poly-1 loss minus the plain loss is w alpha_t poly1 (1 - p_t), p_t the clipped one."""
    x, t, opts = problem
    base, _ = R.binary_loss(x, t, reduction="none", **opts)
    with_poly, _ = R.binary_loss(x, t, poly1=poly1, reduction="none", **opts)
    p = 1.0 / (1.0 + np.exp(-x))
    ts = t * (1 - opts["label_smoothing"]) + opts["label_smoothing"] / 2
    pm = np.maximum(p - opts["clip"], 0.0)
    a = opts["alpha"]
    a_t = 1.0 if a is None else a * ts + (1 - a) * (1 - ts)
    np.testing.assert_allclose(
        with_poly - base, a_t * poly1 * (ts * (1 - p) + (1 - ts) * pm), rtol=1e-9, atol=1e-12
    )
    zero, gzero = R.binary_loss(x, t, poly1=0.0, reduction="none", **opts)
    _, gbase = R.binary_loss(x, t, reduction="none", **opts)
    np.testing.assert_array_equal(zero, base)
    np.testing.assert_array_equal(gzero, gbase)


@settings(max_examples=60, deadline=None)
@given(problems(), st.floats(-3.0, 3.0, allow_nan=False))
def test_detach_focal_weight_in_the_reference(problem, poly1):
    """Same loss; the gradient is the full one minus the focal weight's own derivative, which is
    w a_t F' b = the gradient of the loss with b held constant; with gamma = 0 it is unchanged."""
    x, t, opts = problem
    full, gfull = R.binary_loss(x, t, poly1=poly1, reduction="none", **opts)
    det, gdet = R.binary_loss(x, t, poly1=poly1, detach_focal_weight=True, reduction="none", **opts)
    np.testing.assert_array_equal(det, full)
    # the part dropped: d/dx of w a_t (1 - p_t)^gamma_t at fixed b, by central differences
    p = 1.0 / (1.0 + np.exp(-x))
    if opts["clip"] and np.any(np.abs(p - opts["clip"]) < 1e-4):
        return
    ts = t * (1 - opts["label_smoothing"]) + opts["label_smoothing"] / 2
    a = opts["alpha"]
    a_t = 1.0 if a is None else a * ts + (1 - a) * (1 - ts)
    gam = opts["gamma_pos"] * ts + opts["gamma_neg"] * (1 - ts)

    def focal(z):
        pz = 1.0 / (1.0 + np.exp(-z))
        return a_t * (ts * (1 - pz) + (1 - ts) * np.maximum(pz - opts["clip"], 0.0)) ** gam

    h = 1e-6
    dfocal = (focal(x + h) - focal(x - h)) / (2 * h)
    b, _ = R.binary_loss(  # the BCE term b alone
        x, t, label_smoothing=opts["label_smoothing"], clip=opts["clip"],
        pos_weight=opts["pos_weight"], reduction="none",
    )
    np.testing.assert_allclose(gfull - gdet, dfocal * b, rtol=1e-4, atol=1e-6)
    zero = dict(opts, gamma_pos=0.0, gamma_neg=0.0)
    _, g0 = R.binary_loss(x, t, poly1=poly1, reduction="none", **zero)
    _, g0d = R.binary_loss(x, t, poly1=poly1, detach_focal_weight=True, reduction="none", **zero)
    np.testing.assert_array_equal(g0d, g0)
