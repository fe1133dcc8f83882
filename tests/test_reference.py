"""Property tests of the float64 reference itself (the spec everything else is tested against)."""

from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from crossent import reference as ref

options = st.fixed_dictionaries(
    {
        "label_smoothing": st.sampled_from([0.0, 0.1, 0.5]),
        "gamma": st.sampled_from([0.0, 0.3, 1.0, 2.5]),
        "z_loss": st.sampled_from([0.0, 0.01]),
        "confidence_penalty": st.sampled_from([0.0, 0.2]),
        "poly1": st.sampled_from([0.0, -1.0, 1.0]),
        "softcap": st.sampled_from([None, 3.0]),
    }
)


@st.composite
def problems(draw):
    n = draw(st.integers(1, 4))
    c = draw(st.integers(2, 6))
    seed = draw(st.integers(0, 2**31 - 1))
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, c)) * draw(st.sampled_from([0.5, 2.0, 5.0]))
    y = rng.integers(0, c, size=n)
    w = rng.uniform(0.2, 2.0, size=c) if draw(st.booleans()) else None
    return x, y, w


@settings(max_examples=40, deadline=None)
@given(problems(), options)
def test_reference_gradient_matches_finite_differences(problem, opts):
    x, y, w = problem
    _, grad = ref.cross_entropy(x, y, weight=w, reduction="sum", **opts)
    h = 1e-6
    num = np.zeros_like(x)
    for idx in np.ndindex(*x.shape):
        xp, xm = x.copy(), x.copy()
        xp[idx] += h
        xm[idx] -= h
        lp, _ = ref.cross_entropy(xp, y, weight=w, reduction="sum", **opts)
        lm, _ = ref.cross_entropy(xm, y, weight=w, reduction="sum", **opts)
        num[idx] = (lp - lm) / (2 * h)
    np.testing.assert_allclose(grad, num, rtol=1e-5, atol=1e-7)


@settings(max_examples=40, deadline=None)
@given(problems(), st.floats(-50, 50), st.sampled_from([0.0, 0.1]), st.sampled_from([0.0, 2.0]))
def test_shift_invariance_and_nonnegativity(problem, shift, eps, gamma):
    x, y, w = problem
    l1, g1 = ref.cross_entropy(x, y, weight=w, label_smoothing=eps, gamma=gamma, reduction="none")
    l2, _ = ref.cross_entropy(x + shift, y, weight=w, label_smoothing=eps, gamma=gamma, reduction="none")
    np.testing.assert_allclose(l1, l2, rtol=1e-9, atol=1e-9)
    assert np.all(l1 >= 0)
    np.testing.assert_allclose(g1.sum(axis=1), 0.0, atol=1e-12)  # softmax gradients sum to 0


@settings(max_examples=30, deadline=None)
@given(problems(), st.sampled_from([0.0, 0.2]))
def test_plain_ce_is_kl_plus_entropy(problem, eps):
    x, y, _ = problem
    c = x.shape[1]
    loss, _ = ref.cross_entropy(x, y, label_smoothing=eps, reduction="none")
    t = np.full(x.shape, eps / c)
    t[np.arange(len(y)), y] += 1 - eps
    logq = ref.log_softmax(x)
    with np.errstate(divide="ignore", invalid="ignore"):
        kl = np.sum(np.where(t > 0, t * (np.log(t) - logq), 0.0), axis=1)
        ent = -np.sum(np.where(t > 0, t * np.log(t), 0.0), axis=1)
    np.testing.assert_allclose(loss, kl + ent, rtol=1e-10, atol=1e-12)  # CE = KL(t||q) + H(t)


@given(st.floats(0.0, 700.0), st.sampled_from([0.1, 0.5, 0.9, 1.0, 2.0]))
def test_focal_factor_gradient_is_finite_and_consistent(ell, gamma):
    f, g = ref.focal_factor_grad(np.array([ell]), gamma)
    assert np.all(np.isfinite(f)) and np.all(np.isfinite(g))
    q = np.exp(-ell)
    if 1e-6 < q < 1 - 1e-6:  # compare with the textbook form where it is well conditioned
        textbook = -((1 - q) ** gamma) - gamma * q * (1 - q) ** (gamma - 1) * ell
        np.testing.assert_allclose(g, textbook, rtol=1e-8)
