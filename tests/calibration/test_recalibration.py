"""Every recalibration method: one interface, JSON state, the fallback guard, and parity with
netcal, scikit-learn and the papers' formulas where the definitions meet."""

from __future__ import annotations

import inspect
import json
import warnings
from typing import Any

import numpy as np
import pytest
import torch

from crossent import calibration as cal

MULTICLASS = [
    cal.TemperatureScaler,
    cal.VectorScaler,
    cal.MatrixScaler,
    cal.DirichletCalibrator,
    cal.HistogramBinning,
    cal.IsotonicCalibrator,
    cal.EnsembleTemperatureScaler,
]
BINARY = [cal.PlattScaler, cal.BetaCalibrator]
SCALING = (cal.TemperatureScaler, cal.VectorScaler)  # z / T + b elementwise, as torch ops


def multiclass(n: int, c: int, seed: int, t_true: float = 2.5) -> tuple[np.ndarray, np.ndarray]:
    """Logits over-confident by ``t_true`` with labels drawn from the calibrated softmax."""
    rng = np.random.default_rng(seed)
    z = rng.normal(size=(n, c)) * 2
    p = torch.softmax(torch.from_numpy(z), 1).numpy()
    y = np.minimum((p.cumsum(1) > rng.random((n, 1))).argmax(1), c - 1)
    return z * t_true, y


def binary(n: int, seed: int, a: float = 0.4, b: float = -0.3) -> tuple[np.ndarray, np.ndarray]:
    """Scores s with P(y = 1) = sigmoid(a s + b)."""
    rng = np.random.default_rng(seed)
    s = rng.normal(size=n) * 3
    return s, (rng.random(n) < 1 / (1 + np.exp(-(a * s + b)))).astype(np.int64)


@pytest.mark.parametrize("method", MULTICLASS + BINARY, ids=lambda m: m.__name__)
def test_interface_state_and_improvement(method: type[cal.Recalibrator]) -> None:
    if method in BINARY:
        x, y = binary(800, seed=1)
    else:
        x, y = multiclass(800, 4, seed=1)
    fit, test = slice(0, 400), slice(400, None)
    c = method().fit(x[fit], y[fit])  # type: ignore[attr-defined]
    assert c.fallback is None and c.diagnostic is None and c.diagnostic_kind is None
    q = c.transform(x[test])  # type: ignore[attr-defined]
    np.testing.assert_array_equal(c.predict_proba(x[test]), q)  # type: ignore[attr-defined]
    if method in BINARY:
        assert q.shape == (x[test].shape[0],) and ((q >= 0) & (q <= 1)).all()
    else:
        np.testing.assert_allclose(q.sum(1), 1.0, rtol=1e-12)
    state = json.loads(json.dumps(c.state_dict()))
    assert state["method"] == method.name
    again = cal.from_state_dict(state)
    assert type(again) is method
    np.testing.assert_allclose(again.predict_proba(x[test]), q, rtol=1e-12)  # type: ignore[attr-defined]
    z = torch.as_tensor(c.transform_logits(x[test]))  # type: ignore[attr-defined]
    back = torch.sigmoid(z) if method in BINARY else torch.softmax(z, 1)
    np.testing.assert_allclose(back.numpy(), q, rtol=1e-9, atol=1e-12)
    qt = c.predict_proba(torch.from_numpy(x[test]).float())  # type: ignore[attr-defined]
    assert isinstance(qt, torch.Tensor)
    # calibration on held-out data: ECE better than the raw over-confident scores
    kw: dict[str, Any] = {"from_logits": True}
    assert cal.ece(q, y[test]) < cal.ece(x[test], y[test], **kw)


@pytest.mark.parametrize("method", MULTICLASS + BINARY, ids=lambda m: m.__name__)
def test_separable_validation_falls_back(method: type[cal.Recalibrator], tmp_path: Any) -> None:
    if method in BINARY:
        x = np.array([-3.0, -1.0, 2.0, 4.0, -2.0, 1.5])
        y = (x > 0).astype(np.int64)
    else:
        rng = np.random.default_rng(2)
        x = rng.normal(size=(60, 3))
        y = x.argmax(1)  # every top-1 prediction correct
    with pytest.warns(cal.CalibrationWarning, match="separable.*falling back"):
        c = method().fit(x, y)  # type: ignore[attr-defined]
    assert c.fallback is not None and "separable" in c.fallback and c.diagnostic_kind == "separable"
    assert c.fallback.count("separable") == 1 and c.fallback.count("stopped at") <= 1
    if method in (cal.TemperatureScaler, cal.EnsembleTemperatureScaler):  # T driven to t_min
        assert c.fallback.endswith("and stopped at the lower bound t_min=0.01")
    ident = torch.sigmoid(torch.from_numpy(x)) if method in BINARY else torch.softmax(torch.from_numpy(x), 1)
    np.testing.assert_allclose(c.predict_proba(x), ident.numpy(), rtol=1e-12)  # type: ignore[attr-defined]
    cal.save(c, tmp_path / "c.json")
    assert cal.load(tmp_path / "c.json").fallback == c.fallback
    assert cal.load(tmp_path / "c.json").diagnostic_kind == "separable"
    # the kept fit runs to its iteration cap on separable data: keep the cap small here
    cap = {"max_iter": 10} if "max_iter" in inspect.signature(method).parameters else {}
    with pytest.warns(cal.CalibrationWarning, match="keeping the fit"):
        kept = method(fallback_to_identity=False, **cap).fit(x, y)  # type: ignore[attr-defined, call-arg]
    assert kept.fallback is None and kept.diagnostic is not None and kept.diagnostic_kind == "separable"


@pytest.mark.parametrize("method", [cal.TemperatureScaler, cal.EnsembleTemperatureScaler],
                         ids=lambda m: m.__name__)
def test_a_bound_reached_is_named_once(method: type[cal.Recalibrator]) -> None:
    """Always confidently wrong: the NLL falls as T grows, so T stops at t_max; the ensemble
    names the bound its temperature reached, not its temperature's whole diagnostic."""
    z = np.array([[5.0, 0.0], [0.0, 5.0], [4.0, -1.0]])
    with pytest.warns(cal.CalibrationWarning, match="falling back"):
        c = method().fit(z, [1, 0, 1])  # type: ignore[attr-defined]
    assert c.fallback == "the fit stopped at the upper bound t_max=100"
    assert c.diagnostic_kind == "bound"


def test_breast_cancer_like_case() -> None:
    """A separable validation set drives T to its bound; the guard restores T = 1 and the test
    NLL stays at the identity's instead of blowing up."""
    rng = np.random.default_rng(3)
    n = 400
    y = rng.integers(0, 2, n)
    z = np.stack([-(2 * y - 1) * 3.0, (2 * y - 1) * 3.0], 1) + rng.normal(size=(n, 2)) * 1.2
    val = np.flatnonzero(z.argmax(1) == y)[:113]  # a separable validation set of 113
    test = np.setdiff1d(np.arange(n), val)
    with pytest.warns(cal.CalibrationWarning):
        kept = cal.TemperatureScaler(fallback_to_identity=False).fit(z[val], y[val])
    assert kept.temperature == pytest.approx(0.01)
    with pytest.warns(cal.CalibrationWarning, match="t_min=0.01"):
        safe = cal.TemperatureScaler().fit(z[val], y[val])
    assert safe.temperature == 1.0 and "separable" in str(safe.fallback)
    before = cal.nll(z[test], y[test], from_logits=True)
    assert cal.nll(safe.transform_logits(z[test]), y[test], from_logits=True) == pytest.approx(before)
    assert cal.nll(kept.transform_logits(z[test]), y[test], from_logits=True) > 3 * before


def test_worse_than_identity_falls_back() -> None:
    # calibrated logits: the ECE-minimising T (Mukhoti et al. 2020) has a worse NLL than T = 1
    rng = np.random.default_rng(0)
    z = rng.normal(size=(300, 3)) * 2
    p = torch.softmax(torch.from_numpy(z), 1).numpy()
    y = np.minimum((p.cumsum(1) > rng.random((300, 1))).argmax(1), 2)
    with pytest.warns(cal.CalibrationWarning, match="keeping"):
        kept = cal.TemperatureScaler(fallback_to_identity=False).fit(z, y, objective="ece")
    assert kept.temperature != 1.0
    nll_kept = cal.nll(kept.transform_logits(z), y, from_logits=True)
    assert nll_kept > cal.nll(z, y, from_logits=True)  # the premise
    with pytest.warns(cal.CalibrationWarning, match="worse than the identity"):
        c = cal.TemperatureScaler().fit(z, y, objective="ece")
    assert c.temperature == 1.0 and "worse" in str(c.fallback) and c.diagnostic_kind == "nll"
    assert kept.diagnostic_kind == "nll"


# --------------------------------------------------------------------------------------------
# parity and formulas


def test_matrix_and_dirichlet_kkt_and_identity() -> None:
    """At the optimum the gradient of the ODIR objective vanishes; Dirichlet is matrix
    scaling of log-softmax inputs."""
    z, y = multiclass(300, 3, seed=5)
    m = cal.MatrixScaler(reg_off_diagonal=0.1, reg_bias=0.05).fit(z, y)
    w = torch.tensor(m.weight, requires_grad=True)
    b = torch.tensor(m.bias, requires_grad=True)
    zt = torch.from_numpy(z)
    off = 1 - torch.eye(3, dtype=torch.float64)
    obj = (torch.nn.functional.cross_entropy(zt @ w.T + b, torch.from_numpy(y))
           + 0.1 * (w * off).square().sum() / 6 + 0.05 * b.square().sum() / 3)
    obj.backward()
    assert float(w.grad.abs().max()) < 1e-5 and float(b.grad.abs().max()) < 1e-5  # type: ignore[union-attr]
    d = cal.DirichletCalibrator(reg_off_diagonal=0.1, reg_bias=0.05).fit(z, y)
    logp = torch.log_softmax(zt, 1).numpy()
    m2 = cal.MatrixScaler(reg_off_diagonal=0.1, reg_bias=0.05).fit(logp, y)
    np.testing.assert_allclose(d.predict_proba(z), m2.predict_proba(logp), atol=1e-6)


def test_histogram_binning_hand_computed() -> None:
    # two classes, 4 bins; p1 = 0.1, 0.2, 0.6, 0.7, 0.9: bins 0, 0, 2, 2, 3
    p1 = np.array([0.1, 0.2, 0.6, 0.7, 0.9])
    z = np.log(np.stack([1 - p1, p1], 1))
    y = np.array([0, 1, 1, 1, 1])
    h = cal.HistogramBinning(n_bins=4, fallback_to_identity=False).fit(z, y)
    assert h.bin_values is not None
    np.testing.assert_allclose(h.bin_values[1], [0.5, 0.375, 1.0, 1.0])  # bin 1 empty: centre
    np.testing.assert_allclose(h.bin_values[0], [0.0, 0.0, 0.625, 0.5])  # p0 = .9 .8 .4 .3 .1


def test_ensemble_temperature_formula() -> None:
    z, y = multiclass(800, 4, seed=6)
    e = cal.EnsembleTemperatureScaler().fit(z, y)
    assert e.weights is not None and e.temperature is not None
    assert e.weights.sum() == pytest.approx(1.0) and (e.weights >= 0).all()
    assert e.temperature == pytest.approx(cal.TemperatureScaler().fit(z, y).temperature)
    zt = torch.from_numpy(z)
    want = (e.weights[0] * torch.softmax(zt / e.temperature, 1) + e.weights[1] * torch.softmax(zt, 1)
            + e.weights[2] / 4)
    np.testing.assert_allclose(e.predict_proba(z), want.numpy(), rtol=1e-12)


def _sklearn_logistic(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    lm = pytest.importorskip("sklearn.linear_model")
    reg = lm.LogisticRegression(C=np.inf, tol=1e-12, max_iter=10_000).fit(x, y)
    return np.concatenate([reg.coef_[0], reg.intercept_])


@pytest.mark.parametrize("seed", [0, 2])
def test_platt_and_beta_match_sklearn(seed: int) -> None:
    s, y = binary(700, seed=seed, a=0.3 + 0.2 * seed, b=0.1 * seed - 0.2)
    platt = cal.PlattScaler().fit(s, y)
    np.testing.assert_allclose(platt.coef, _sklearn_logistic(s[:, None], y), rtol=1e-5, atol=1e-6)
    beta = cal.BetaCalibrator().fit(s, y)
    feats = np.stack([-np.logaddexp(0, -s), np.logaddexp(0, s)], 1)  # log p, -log(1 - p)
    np.testing.assert_allclose(beta.coef, _sklearn_logistic(feats, y), rtol=1e-5, atol=1e-6)
    p = 1 / (1 + np.exp(-s))
    from_probs = cal.BetaCalibrator(from_logits=False).fit(p, y)
    np.testing.assert_allclose(from_probs.coef, beta.coef, rtol=1e-4, atol=1e-6)


def test_beta_sign_constraint() -> None:
    # outcomes that fall with p near 0 and rise near 1 symmetrically need a < 0 unconstrained
    rng = np.random.default_rng(7)
    s = rng.normal(size=600) * 3
    y = (rng.random(600) < np.where(s < 0, 0.3, 0.8)).astype(np.int64)
    y[s < -4] = 1
    beta = cal.BetaCalibrator(fallback_to_identity=False).fit(s, y)
    assert beta.coef is not None and beta.coef[0] >= 0 and beta.coef[1] >= 0


def test_isotonic_matches_sklearn() -> None:
    iso = pytest.importorskip("sklearn.isotonic")
    z, y = multiclass(500, 3, seed=8)
    c = cal.IsotonicCalibrator().fit(z[:300], y[:300])
    p = torch.softmax(torch.from_numpy(z), 1).numpy()
    q = np.stack([
        iso.IsotonicRegression(y_min=0, y_max=1, out_of_bounds="clip")
        .fit(p[:300, k], y[:300] == k).predict(p[300:, k]) for k in range(3)
    ], 1)
    want = q / q.sum(1, keepdims=True)
    np.testing.assert_allclose(c.predict_proba(z[300:]), want, rtol=1e-12)


# netcal (optional dev dependency): histogram binning and isotonic regression agree exactly;
# netcal's scaling methods are fitted by a stochastic optimiser, so they agree to 1e-2.
def test_netcal_binning_parity() -> None:
    binning = pytest.importorskip("netcal.binning")
    z, y = multiclass(600, 3, seed=9)
    p = torch.softmax(torch.from_numpy(z), 1).numpy()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = binning.HistogramBinning(bins=10).fit(p[:400], y[:400]).transform(p[400:])
        iso = binning.IsotonicRegression().fit(p[:400], y[:400]).transform(p[400:])
    ours = cal.HistogramBinning(n_bins=10).fit(z[:400], y[:400]).predict_proba(z[400:])
    np.testing.assert_allclose(ours, ref, rtol=1e-6, atol=1e-9)
    ours_iso = cal.IsotonicCalibrator().fit(z[:400], y[:400]).predict_proba(z[400:])
    np.testing.assert_allclose(ours_iso, iso, rtol=1e-6, atol=1e-9)


def test_netcal_scaling_parity() -> None:
    scaling = pytest.importorskip("netcal.scaling")
    z, y = multiclass(1000, 4, seed=10)
    p = torch.softmax(torch.from_numpy(z), 1).numpy()
    s, yb = binary(1000, seed=11)
    ps = 1 / (1 + np.exp(-s))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ts = scaling.TemperatureScaling().fit(p, y).transform(p)
        platt = scaling.LogisticCalibration().fit(ps, yb).transform(ps)
        beta = scaling.BetaCalibration().fit(ps, yb).transform(ps)
    # netcal fits by a first-order optimiser to about 1e-5: agreement to 1e-4
    np.testing.assert_allclose(cal.TemperatureScaler().fit(z, y).predict_proba(z), ts, atol=1e-4)
    np.testing.assert_allclose(cal.PlattScaler().fit(s, yb).predict_proba(s), platt, atol=1e-4)
    ours_beta = cal.BetaCalibrator().fit(s, yb)
    assert ours_beta.coef is not None and (ours_beta.coef[:2] > 0).all()  # where the conventions meet
    np.testing.assert_allclose(ours_beta.predict_proba(s), beta, atol=1e-4)


@pytest.mark.parametrize("method", MULTICLASS + BINARY, ids=lambda m: m.__name__)
def test_negative_strides(method: type[cal.Recalibrator]) -> None:
    """np.flip views (negative strides, which torch refuses) fit and transform as their copies."""
    x, y = binary(300, seed=4) if method in BINARY else multiclass(300, 3, seed=4)
    a = method().fit(np.flip(x, 0), np.flip(y)).transform(np.flip(x, 0))  # type: ignore[attr-defined]
    b = method().fit(x[::-1].copy(), y[::-1].copy()).transform(x[::-1].copy())  # type: ignore[attr-defined]
    np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize("method", [m for m in MULTICLASS if m not in SCALING],
                         ids=lambda m: m.__name__)
def test_transform_refuses_non_finite_logits(method: type[cal.Recalibrator]) -> None:
    """A bin or a fitted map would turn NaN into a finite probability or give a NaN row.
    (Temperature and vector scaling map z to z / T + b elementwise, as torch ops do, on any
    device and differentiably: NaN stays NaN there.)"""
    x, y = multiclass(300, 3, seed=5)
    c = method().fit(x, y)  # type: ignore[attr-defined]
    for bad in (np.nan, np.inf):
        z = x[:4].copy()
        z[2, 1] = bad
        for call in (c.predict_proba, c.transform, c.transform_logits):  # type: ignore[attr-defined]
            with pytest.raises(ValueError, match="logits: row 2 contains NaN or infinite"):
                call(z)


def test_option_and_state_errors() -> None:
    assert cal.HistogramBinning(n_bins=np.int64(10)).n_bins == 10
    with pytest.raises(ValueError, match="n_bins must be a positive integer"):
        cal.HistogramBinning(n_bins=2.5)  # type: ignore[arg-type]
    with pytest.raises(RuntimeError, match="VectorScaler is not fitted"):
        _ = cal.VectorScaler().temperature
    with pytest.raises(ValueError, match="no 'params' mapping"):
        cal.from_state_dict({"method": "temperature"})
    assert cal.CalibrationMeter(num_classes=np.int64(4)).num_classes == 4
    for bad in (2.5, "4", True):
        with pytest.raises(ValueError, match="num_classes must be an integer >= 2"):
            cal.CalibrationMeter(num_classes=bad)  # type: ignore[arg-type]


@pytest.mark.parametrize("method", BINARY, ids=lambda m: m.__name__)
@pytest.mark.parametrize(
    ("x", "y", "how"),
    [
        ([-2.0, -1.0, 1.0, 2.0], [1, 1, 0, 0], "the positives below it"),  # reversed scores
        ([0.5, 1.0, 2.0, 3.0], [0, 0, 1, 1], "a threshold on the score splits"),  # threshold not at 0
        ([-1.0, 0.3, 2.0, -0.7, 1.1], [0, 0, 0, 0, 0], "all 5 labels are 0"),
    ],
    ids=["reversed", "shifted", "one-class"],
)
def test_binary_fits_without_a_finite_optimum_fall_back(
    method: type[cal.Recalibrator], x: list[float], y: list[int], how: str
) -> None:
    """Every case where the logistic fit has no finite optimum is named and falls back."""
    with pytest.warns(cal.CalibrationWarning, match="separable.*falling back"):
        c = method().fit(np.array(x), np.array(y))  # type: ignore[attr-defined]
    assert c.diagnostic_kind == "separable" and how in c.fallback
    s = torch.from_numpy(np.array(x))
    np.testing.assert_allclose(c.predict_proba(np.array(x)), torch.sigmoid(s).numpy(), rtol=1e-12)  # type: ignore[attr-defined]
