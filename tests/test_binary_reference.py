"""Properties of the NumPy reference of the sigmoid family (hypothesis)."""

from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

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
