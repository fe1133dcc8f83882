"""Every recalibration method: one interface, JSON state, the fallback guard, and parity with
netcal, scikit-learn and the papers' formulas where the definitions meet."""

from __future__ import annotations

import functools
import inspect
import json
import math
import warnings
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from crossent import calibration as cal
from crossent.calibration import recalibration
from crossent.calibration._base import warn_if_probabilities

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
        if method in (cal.HistogramBinning, cal.IsotonicCalibrator):  # and each class apart from the rest
            x[np.arange(60), y] += 6.0
    with pytest.warns(cal.CalibrationWarning, match="separable.*falling back"):
        c = method().fit(x, y)  # type: ignore[attr-defined]
    assert c.fallback is not None and "separable" in c.fallback and c.diagnostic_kind == "separable"
    if method in (cal.HistogramBinning, cal.IsotonicCalibrator):
        assert c.fallback.startswith("the validation set is separable (every class's one-vs-rest problem is"
                                     " separated: for each, ")
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


@pytest.mark.parametrize("mode", ["inference_mode", "no_grad", "inference_mode_on_an_ordinary_tensor"])
@pytest.mark.parametrize("method", MULTICLASS + BINARY, ids=lambda m: m.__name__)
def test_fits_under_inference_mode_and_no_grad(method: type[cal.Recalibrator], mode: str) -> None:
    """Evaluation code runs under torch.inference_mode() or torch.no_grad(): every fit works
    there and gives what it gives outside (the L-BFGS fits failed under inference mode, which
    an optimiser's closure cannot leave), on tensors made inside it too; matrix scaling at 60
    classes takes its L-BFGS path. The caller's grad mode is left as it was."""
    c = 60 if method is cal.MatrixScaler else 3
    x, y = binary(400, seed=6) if method in BINARY else multiclass(400, c, seed=6)
    if method is cal.BetaCalibrator:
        x = 1 / (1 + np.exp(-x))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", cal.CalibrationWarning)
        want = method().fit(torch.from_numpy(x), torch.from_numpy(y)).transform(x)  # type: ignore[attr-defined]
        ordinary = torch.from_numpy(x)
        ctx = torch.no_grad() if mode == "no_grad" else torch.inference_mode()
        with ctx:
            xt = ordinary if mode.endswith("tensor") else ordinary.clone()
            assert xt.is_inference() == (mode == "inference_mode")
            got = method().fit(xt, torch.from_numpy(y)).transform(x)  # type: ignore[attr-defined]
            assert not torch.is_grad_enabled()
            assert torch.is_inference_mode_enabled() == (mode != "no_grad")
    np.testing.assert_allclose(got, want, rtol=1e-9, atol=1e-12)


def test_hints_for_padding_labels_one_column_and_output_tuples() -> None:
    """What users of token models and Hugging Face pass by habit gets the fix in its error:
    labels with -100 padding (the metrics take ignore_index, a fit needs the rows dropped),
    an (N, 1) column of binary logits given to a multiclass fit (it said only "at least 2
    columns"), and a tuple of output arrays (EvalPrediction.predictions), which was stacked
    into a 3-D array and answered with a reshape hint that pairs the wrong rows with the
    labels."""
    x, y = multiclass(60, 4, seed=13)
    yp = y.copy()
    yp[::5] = -100
    padding = (r"found -100; if -100 marks samples to leave out \(padding\), pass ignore_index=-100 to the"
               r" metrics and CalibrationMeter, or drop those rows before a fit: logits\[labels != -100\]")
    for call in (lambda: cal.TemperatureScaler().fit(x, yp), lambda: cal.ece(x, yp, from_logits=True),
                 lambda: cal.HistogramBinning().fit(torch.from_numpy(x), torch.from_numpy(yp))):
        with pytest.raises(ValueError, match=padding):
            call()
    assert cal.ece(x, yp, from_logits=True, ignore_index=-100) == cal.ece(x[yp != -100], y[yp != -100],
                                                                         from_logits=True)
    for method in MULTICLASS:
        with pytest.raises(ValueError, match=r"got shape \(60, 1\); for a binary problem pass two columns"):
            method().fit(x[:, :1], (y > 1).astype(np.int64))  # type: ignore[attr-defined]
    outputs = (r"logits is a tuple of 2 arrays, the first of shape \(60, 4\): pass the scores array"
               r" itself \(a model's output tuple holds the logits first\)")
    for call in (lambda: cal.ece((x, x), y, from_logits=True), lambda: cal.VectorScaler().fit((x, x), y),
                 lambda: cal.CalibrationMeter().update((torch.from_numpy(x), torch.from_numpy(x)), y)):
        with pytest.raises(ValueError, match=outputs.replace("logits is", "(logits|logits_or_probs) is")):
            call()


@pytest.mark.parametrize("as_tensor", [False, True])
@pytest.mark.parametrize("method", MULTICLASS + BINARY, ids=lambda m: m.__name__)
def test_an_empty_batch_transforms_to_an_empty_batch(method: type[cal.Recalibrator], as_tensor: bool) -> None:
    """An empty batch (a filtered ``logits[mask]``) transforms to (0, C), or (0,) for the binary
    methods, of the input's type; most methods refused it as "logits is empty". A fit still
    needs samples."""
    x, y = binary(300, seed=7) if method in BINARY else multiclass(300, 3, seed=7)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", cal.CalibrationWarning)
        c = method().fit(x, y)  # type: ignore[attr-defined]
    empty = np.zeros((0,) if method in BINARY else (0, 3))
    e = torch.from_numpy(empty).float() if as_tensor else empty
    for out in (c.transform(e), c.transform_logits(e)):
        assert isinstance(out, torch.Tensor if as_tensor else np.ndarray)
        assert tuple(out.shape) == empty.shape
        assert out.dtype == (torch.float32 if as_tensor else np.float64)
    with pytest.raises(ValueError, match="empty"):
        method().fit(e, np.zeros(0, dtype=np.int64))  # type: ignore[attr-defined]


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


# --------------------------------------------------------------------------------------------
# validation labels that miss classes, and label shapes

#: methods whose map has parameters per class, fitted jointly through the softmax: an absent
#: class has no finite optimum, so they fall back to the identity as a whole
PER_CLASS_PARAMETERS = (cal.VectorScaler, cal.MatrixScaler, cal.DirichletCalibrator)
#: one-vs-rest methods: an absent class's own map falls back to the identity
ONE_VS_REST = (cal.HistogramBinning, cal.IsotonicCalibrator)


def softmax(x: np.ndarray) -> np.ndarray:
    return torch.softmax(torch.from_numpy(x), 1).numpy()


@pytest.mark.parametrize("method", MULTICLASS, ids=lambda m: m.__name__)
@pytest.mark.parametrize(("c", "k"), [(c, k) for c in (2, 3, 5) for k in sorted({0, c // 2, c - 1})],
                         ids=lambda v: str(v))
def test_one_class_validation_falls_back(method: type[cal.Recalibrator], c: int, k: int,
                                         tmp_path: Any) -> None:
    """Labels that are all class k: every map that gives k probability 1 fits them, and the
    other classes would get probability 0 (an infinite NLL on any test sample of them)."""
    x, _ = multiclass(80, c, seed=10 * c + k)
    fit, test = slice(0, 40), slice(40, None)
    y = np.full(40, k)
    want = f"the validation set is separable (all 40 labels are class {k}), so the fit has nothing"
    with pytest.warns(cal.CalibrationWarning, match=r"separable \(all 40 labels are class") as rec:
        cal_ = method().fit(x[fit], y)  # type: ignore[attr-defined]
    assert any(want in str(w.message) and "falling back to the identity" in str(w.message) for w in rec)
    assert cal_.fallback is not None and cal_.fallback.startswith(want)
    assert cal_.diagnostic == cal_.fallback and cal_.diagnostic_kind == "separable"
    np.testing.assert_allclose(cal_.predict_proba(x[test]), softmax(x[test]), rtol=1e-12)  # type: ignore[attr-defined]
    again = cal.from_state_dict(json.loads(json.dumps(cal_.state_dict())))
    assert again.fallback == cal_.fallback and again.diagnostic_kind == "separable"
    np.testing.assert_allclose(again.predict_proba(x[test]), softmax(x[test]), rtol=1e-12)  # type: ignore[attr-defined]
    cap = {"max_iter": 10} if "max_iter" in inspect.signature(method).parameters else {}
    with pytest.warns(cal.CalibrationWarning, match=r"all 40 labels are class .*keeping the fit"):
        kept = method(fallback_to_identity=False, **cap).fit(x[fit], y)  # type: ignore[attr-defined, call-arg]
    assert kept.fallback is None and kept.diagnostic_kind == "separable"
    assert kept.diagnostic is not None and kept.diagnostic.startswith(want)


def _one_vs_rest_reference(method: type[cal.Recalibrator], p_fit: np.ndarray, y_fit: np.ndarray,
                           p: np.ndarray, identity: tuple[int, ...]) -> np.ndarray:
    """Histogram binning (width bins ((m-1)/M, m/M], an empty bin at its centre) or
    scikit-learn's isotonic regression per class, the softmax probability for the classes
    ``identity``, rows renormalised (a row of zeros keeps the softmax row)."""
    q = p.copy()
    for k in range(p.shape[1]):
        if k in identity:
            continue
        if method is cal.HistogramBinning:
            m = 15
            bins_fit = np.clip(np.ceil(p_fit[:, k] * m).astype(int) - 1, 0, m - 1)
            hits = np.bincount(bins_fit, weights=(y_fit == k), minlength=m)
            count = np.bincount(bins_fit, minlength=m)
            theta = np.where(count > 0, hits / np.maximum(count, 1), (np.arange(m) + 0.5) / m)
            q[:, k] = theta[np.clip(np.ceil(p[:, k] * m).astype(int) - 1, 0, m - 1)]
        else:
            iso = pytest.importorskip("sklearn.isotonic")
            reg = iso.IsotonicRegression(y_min=0, y_max=1, out_of_bounds="clip")
            q[:, k] = reg.fit(p_fit[:, k], y_fit == k).predict(p[:, k])
    total = q.sum(1, keepdims=True)
    return np.where(total > 0, q / np.where(total > 0, total, 1.0), p)


@pytest.mark.parametrize("method", MULTICLASS, ids=lambda m: m.__name__)
@pytest.mark.parametrize(
    ("c", "absent"),
    [(c, absent) for c in (3, 5) for a in range(1, c - 1)
     for absent in (tuple(range(c - a, c)), tuple(range(a)))],
    ids=lambda v: str(v),
)
def test_partly_absent_classes(method: type[cal.Recalibrator], c: int, absent: tuple[int, ...],
                               tmp_path: Any) -> None:
    """Some classes (not all but one) have no validation sample. Temperature scaling and its
    ensemble share one temperature over the classes and fit as usual; the maps with per-class
    parameters fall back to the identity; the one-vs-rest maps use the identity for the absent
    classes only. Every test sample of an absent class keeps a finite NLL."""
    x, y_all = multiclass(900, c, seed=c + 7 * len(absent) + absent[0])
    fit = np.flatnonzero(~np.isin(y_all[:600], absent))
    test = np.arange(600, 900)
    x_fit, y_fit = x[fit], y_all[fit]
    assert set(np.unique(y_fit)) == set(range(c)) - set(absent)
    phrase = (f"class {absent[0]} (1 of {c} classes) has" if len(absent) == 1 else
              f"classes {', '.join(map(str, absent))} ({len(absent)} of {c} classes) have")
    phrase += " no validation sample"
    p = softmax(x[test])
    y_test = y_all[test]
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        c_ = method().fit(x_fit, y_fit)  # type: ignore[attr-defined]
    messages = [str(w.message) for w in rec if issubclass(w.category, cal.CalibrationWarning)]
    q = c_.predict_proba(x[test])  # type: ignore[attr-defined]
    if method in (cal.TemperatureScaler, cal.EnsembleTemperatureScaler):
        assert messages == [] and c_.fallback is None and c_.diagnostic is None
    elif method in PER_CLASS_PARAMETERS:
        messages = [m for m in messages if "the map can overfit" not in m]  # matrix: 600 < 10 x 30
        assert len(messages) == 1, messages
        want = f"the validation set is separable ({phrase}), so the fit drives their probabilities"
        assert want in messages[0] and "falling back to the identity" in messages[0]
        assert c_.fallback is not None and c_.fallback.startswith(want)
        assert c_.diagnostic_kind == "separable"
        np.testing.assert_allclose(q, p, rtol=1e-12)
    else:
        assert len(messages) == 1, messages
        assert messages[0].startswith(f"{method.__name__}: {phrase}")
        its = "so its one-vs-rest map gives it" if len(absent) == 1 else "so their one-vs-rest maps give them"
        assert f"{phrase}, {its} probability 0" in messages[0]
        which = "it" if len(absent) == 1 else "them"
        assert f"classes) for {which}; pass fallback_to_identity" in messages[0]
        assert c_.fallback is None and c_.diagnostic_kind == "separable"
        assert c_.diagnostic is not None and phrase in c_.diagnostic
        assert c_.identity_classes == list(absent)  # type: ignore[attr-defined]
        p_fit = softmax(x_fit)
        want = _one_vs_rest_reference(method, p_fit, y_fit, p, absent)
        np.testing.assert_allclose(q, want, rtol=1e-12)
        assert (q[:, list(absent)] > 0).all()
        again = cal.from_state_dict(json.loads(json.dumps(c_.state_dict())))
        np.testing.assert_allclose(again.predict_proba(x[test]), q, rtol=1e-12)  # type: ignore[attr-defined]
        assert again.diagnostic == c_.diagnostic
        assert again.identity_classes == list(absent)  # type: ignore[attr-defined]
        # kept: the one-vs-rest fit of an absent class gives it probability 0 wherever the
        # validation data reach (histogram: an empty bin still maps to its centre)
        with pytest.warns(cal.CalibrationWarning, match="keeping the fit"):
            kept = method(fallback_to_identity=False).fit(x_fit, y_fit)  # type: ignore[attr-defined, call-arg]
        assert kept.diagnostic_kind == "separable" and phrase in str(kept.diagnostic)
        assert kept.fallback is None and kept.identity_classes == []  # type: ignore[attr-defined]
        q_kept = kept.predict_proba(x[test])  # type: ignore[attr-defined]
        np.testing.assert_allclose(q_kept, _one_vs_rest_reference(method, p_fit, y_fit, p, ()), rtol=1e-12)
        at_zero = np.isin(y_test, absent) & (q_kept[np.arange(len(test)), y_test] == 0)
        assert at_zero.any()  # the defect the identity removes: an infinite NLL
    np.testing.assert_allclose(q.sum(1), 1.0, rtol=1e-12)
    of_absent = np.isin(y_test, absent)
    assert of_absent.any()  # the test part holds samples of the absent classes
    assert (q[np.arange(len(test)), y_test][of_absent] > 0).all()


def _nll(q: np.ndarray, y: np.ndarray) -> float:
    return float(-np.log(q[np.arange(len(y)), y]).mean())


@pytest.mark.parametrize(("method", "val_nll"),
                         [(cal.HistogramBinning, 0.3189), (cal.IsotonicCalibrator, 0.2055)],
                         ids=["HistogramBinning", "IsotonicCalibrator"])
def test_accurate_underconfident_one_vs_rest_fit_is_kept(
    method: type[cal.Recalibrator], val_nll: float
) -> None:
    """Every top-1 prediction correct but confidences about 1/3 (C = 4): each class's positives
    and negatives overlap in p_k, so no one-vs-rest map is 0/1 and the fit, which cuts the
    validation NLL from 1.108 to about a fifth or a third, is kept without a warning."""
    rng = np.random.default_rng(0)
    z = rng.normal(size=(2000, 4)) * 0.3
    y = z.argmax(1)
    p = softmax(z)
    assert abs(p.max(1).mean() - 0.3327) < 1e-4 and _nll(p, y) == pytest.approx(1.108, abs=1e-3)
    for k in range(4):  # the one-vs-rest problems overlap
        assert p[y == k, k].min() < p[y != k, k].max()
    with warnings.catch_warnings():
        warnings.simplefilter("error", cal.CalibrationWarning)
        c = method().fit(z, y)  # type: ignore[attr-defined]
    assert c.fallback is None and c.diagnostic is None and c.diagnostic_kind is None
    assert c.identity_classes == []  # type: ignore[attr-defined]
    q = c.predict_proba(z)  # type: ignore[attr-defined]
    np.testing.assert_allclose(q, _one_vs_rest_reference(method, p, y, p, ()), rtol=1e-12)
    assert _nll(q, y) == pytest.approx(val_nll, abs=1e-4)


def separated_class_0(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Logits (log-probabilities) of 4 classes where class 0 has p_0 in [0.7, 0.95] and every
    other sample p_0 in [0.01, 0.3] (its one-vs-rest problem separated, for bins of width 1/15
    and for isotonic regression), and classes 1-3 share the rest, labels drawn from it (their
    one-vs-rest problems overlap)."""
    rng = np.random.default_rng(seed)
    first = rng.random(n) < 0.25
    p0 = np.where(first, rng.uniform(0.7, 0.95, n), rng.uniform(0.01, 0.3, n))
    rest = rng.dirichlet(np.ones(3), n)
    y = np.where(first, 0, 1 + (rest.cumsum(1) > rng.random((n, 1))).argmax(1))
    return np.log(np.column_stack([p0, (1 - p0)[:, None] * rest])), y


@pytest.mark.parametrize("method", ONE_VS_REST, ids=lambda m: m.__name__)
@pytest.mark.parametrize("absent", [(), (3,)], ids=["all present", "class 3 absent"])
def test_a_separated_class_uses_the_identity(method: type[cal.Recalibrator], absent: tuple[int, ...]) -> None:
    """Class 0 alone has a separated one-vs-rest problem: its map would be 0 at p_0 <= 0.3,
    giving a held-out sample of class 0 there probability 0. Its map is the identity, as an
    absent class's is; the other classes keep their fit; one warning names them all."""
    z, y = separated_class_0(400, seed=0)
    keep = ~np.isin(y, absent)
    z, y = z[keep], y[keep]
    p = softmax(z)
    assert p[y == 0, 0].min() > 0.7 > 0.3 > p[y != 0, 0].max()
    z_test = np.log(np.array([[0.2, 0.3, 0.3, 0.2], [0.8, 0.1, 0.05, 0.05], [0.1, 0.6, 0.2, 0.1]]))
    p_test = softmax(z_test)
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        c = method().fit(z, y)  # type: ignore[attr-defined]
    messages = [str(w.message) for w in rec if issubclass(w.category, cal.CalibrationWarning)]
    assert len(messages) == 1, messages
    separated = "class 0 (1 of 4 classes) has a separated one-vs-rest problem ("
    assert separated in messages[0] and "using the identity" in messages[0]
    assert ("class 3 (1 of 4 classes) has no validation sample" in messages[0]) == bool(absent)
    assert c.fallback is None and c.diagnostic_kind == "separable" and separated in str(c.diagnostic)
    assert c.identity_classes == [0, *absent]  # type: ignore[attr-defined]
    q = c.predict_proba(z_test)  # type: ignore[attr-defined]
    np.testing.assert_allclose(q, _one_vs_rest_reference(method, p, y, p_test, (0, *absent)), rtol=1e-12)
    assert q[0, 0] > 0.05  # p_0 = 0.2: renormalised with the calibrated others
    again = cal.from_state_dict(json.loads(json.dumps(c.state_dict())))
    np.testing.assert_array_equal(again.predict_proba(z_test), q)  # type: ignore[attr-defined]
    assert again.identity_classes == [0, *absent]  # type: ignore[attr-defined]
    with pytest.warns(cal.CalibrationWarning, match="separated one-vs-rest problem.*keeping the fit"):
        kept = method(fallback_to_identity=False).fit(z, y)  # type: ignore[attr-defined, call-arg]
    assert kept.fallback is None and kept.identity_classes == []  # type: ignore[attr-defined]
    assert kept.diagnostic_kind == "separable" and separated in str(kept.diagnostic)
    q_kept = kept.predict_proba(z_test)  # type: ignore[attr-defined]
    np.testing.assert_allclose(q_kept, _one_vs_rest_reference(method, p, y, p_test, ()), rtol=1e-12)
    assert q_kept[0, 0] == 0.0 and q_kept[1, 0] > 0.5  # the 0/1 map: p_0 = 0.2 of class 0 at 0


@pytest.mark.parametrize("method", ONE_VS_REST, ids=lambda m: m.__name__)
def test_every_class_separated_but_an_absent_one_falls_back(method: type[cal.Recalibrator]) -> None:
    """Classes 0-2 separated by large margins, class 3 without a sample: the whole map falls
    back, and the reason names both."""
    rng = np.random.default_rng(4)
    z = rng.normal(size=(90, 4))
    y = np.arange(90) % 3
    z[np.arange(90), y] += 8.0
    with pytest.warns(cal.CalibrationWarning, match="separable.*falling back") as rec:
        c = method().fit(z, y)  # type: ignore[attr-defined]
    assert len([w for w in rec if issubclass(w.category, cal.CalibrationWarning)]) == 1
    assert c.fallback is not None and c.diagnostic_kind == "separable"
    assert c.fallback.startswith("the validation set is separable (every class with a validation sample has a"
                                 " separated one-vs-rest problem (for each, ")
    assert "and class 3 (1 of 4 classes) has no validation sample)" in c.fallback
    np.testing.assert_allclose(c.predict_proba(z), softmax(z), rtol=1e-12)  # type: ignore[attr-defined]


N_SHAPE = 60
#: label shapes that are not one label per score: every 2-D factorisation of N, and 3-D
BAD_LABEL_SHAPES = [(a, N_SHAPE // a) for a in range(2, N_SHAPE) if N_SHAPE % a == 0] + [
    (N_SHAPE, 1, 1), (N_SHAPE - 1,), (N_SHAPE + 1, 1)]


@pytest.mark.parametrize("method", BINARY, ids=lambda m: m.__name__)
@pytest.mark.parametrize("shape", BAD_LABEL_SHAPES, ids=str)
@pytest.mark.parametrize("as_tensor", [False, True], ids=["numpy", "torch"])
def test_binary_labels_of_another_shape_are_refused(
    method: type[cal.Recalibrator], shape: tuple[int, ...], as_tensor: bool
) -> None:
    """Labels of another shape, even of the same size, are not flattened into place."""
    s, y = binary(N_SHAPE, seed=12)
    labels = np.resize(y, shape)
    want = f"labels (the validation labels) have shape {shape} but the scores have shape ({N_SHAPE},)"
    with pytest.raises(ValueError, match=rf"^{want.replace('(', '[(]').replace(')', '[)]')}"):
        method().fit(s, torch.from_numpy(labels) if as_tensor else labels)  # type: ignore[attr-defined]


@pytest.mark.parametrize("method", BINARY, ids=lambda m: m.__name__)
def test_binary_labels_of_one_column_or_row_are_accepted(method: type[cal.Recalibrator]) -> None:
    """(N, 1) and (1, N) labels are one label per score, as the multiclass methods take them."""
    s, y = binary(N_SHAPE, seed=12)
    flat = method().fit(s, y)  # type: ignore[attr-defined]
    for labels in (y[:, None], y[None, :], torch.from_numpy(y[:, None])):
        np.testing.assert_array_equal(method().fit(s, labels).coef, flat.coef)  # type: ignore[attr-defined]
    two = np.stack([np.zeros_like(s), s], 1)  # (N, 2) logits: the shape in the error is theirs
    with pytest.raises(ValueError, match=r"have shape \(6, 10\) but the scores have shape \(60, 2\)"):
        method().fit(two, y.reshape(6, 10))  # type: ignore[attr-defined]
    with pytest.raises(TypeError, match="labels must hold 0/1 outcomes"):
        method().fit(s, y.astype(str))  # type: ignore[attr-defined]


@pytest.mark.parametrize("method", MULTICLASS, ids=lambda m: m.__name__)
def test_multiclass_label_shapes(method: type[cal.Recalibrator]) -> None:
    """(N, 1) and (1, N) labels are taken as (N,); labels of any other shape are refused."""
    x, y = multiclass(N_SHAPE, 3, seed=13)
    flat = method().fit(x, y).predict_proba(x)  # type: ignore[attr-defined]
    for labels in (y[:, None], y[None, :]):
        np.testing.assert_array_equal(method().fit(x, labels).predict_proba(x), flat)  # type: ignore[attr-defined]
    for shape in BAD_LABEL_SHAPES:
        with pytest.raises(ValueError, match="labels"):
            method().fit(x, np.resize(y, shape))  # type: ignore[attr-defined]


# A non-default option of every method: the options are part of what the state restores
# (``from_logits`` changes what transform does with its input). A few L-BFGS steps keep the
# fits of the tests below fast.
NON_DEFAULT: dict[type[cal.Recalibrator], dict[str, Any]] = {
    cal.TemperatureScaler: {"t_min": 0.5},
    cal.VectorScaler: {"t_max": 50.0, "max_iter": 5},
    cal.MatrixScaler: {"reg_bias": 0.1, "max_iter": 5},
    cal.DirichletCalibrator: {"reg_off_diagonal": 0.1, "max_iter": 5},
    cal.HistogramBinning: {"n_bins": 10},
    cal.IsotonicCalibrator: {"fallback_to_identity": False},
    cal.EnsembleTemperatureScaler: {"loss": "nll"},
    cal.PlattScaler: {"from_logits": False},
    cal.BetaCalibrator: {"from_logits": False},
}


@pytest.mark.parametrize("method", MULTICLASS + BINARY, ids=lambda m: m.__name__)
def test_load_state_dict_restores_the_options(method: type[cal.Recalibrator]) -> None:
    """A default-built instance that loads a state takes the state's options, so it
    transforms as the fitted one did (bit for bit, also through JSON) and its state is the
    same."""
    if method in BINARY:
        s, y = binary(120, seed=14)
        x: np.ndarray = 1 / (1 + np.exp(-s))  # probabilities: fitted with from_logits=False
    else:
        x, y = multiclass(120, 3, seed=14)
    fitted = method(**NON_DEFAULT[method]).fit(x, y)  # type: ignore[attr-defined]
    state = json.loads(json.dumps(fitted.state_dict()))
    loaded = method().load_state_dict(state)
    assert loaded.state_dict() == fitted.state_dict()
    np.testing.assert_array_equal(loaded.transform(x), fitted.transform(x))  # type: ignore[attr-defined]


def test_load_state_dict_restores_the_method_of_a_temperature_scaler() -> None:
    x, y = multiclass(120, 3, seed=15)
    vector = cal.TemperatureScaler("vector").fit(x, y)
    loaded = cal.TemperatureScaler().load_state_dict(vector.state_dict())
    assert loaded.method == "vector" and loaded.state_dict() == vector.state_dict()
    with pytest.raises(ValueError, match="method must be 'temperature' or 'vector'"):
        state = vector.state_dict()
        cal.TemperatureScaler().load_state_dict({**state, "options": {**state["options"], "method": "x"}})


def test_beta_with_both_slopes_negative_fits_the_base_rate() -> None:
    """Scores that fall as the positive rate rises: both coefficients are held at 0 and the
    intercept is the maximum-likelihood constant, the log-odds of the positive rate (not the
    intercept of a fit whose slope was negative)."""
    s, y = binary(400, seed=16, a=-1.0, b=1.0)
    c = cal.BetaCalibrator().fit(s, y)
    assert c.coef is not None
    np.testing.assert_allclose(c.coef, [0.0, 0.0, math.log(y.mean() / (1 - y.mean()))], atol=1e-6)
    np.testing.assert_allclose(c.predict_proba(s), y.mean(), rtol=1e-6)


@pytest.mark.parametrize("method", MULTICLASS + BINARY, ids=lambda m: m.__name__)
def test_probabilities_passed_as_logits_warn(method: type[cal.Recalibrator]) -> None:
    """Rows that lie in [0, 1] and sum to one are probabilities, not logits: the fit warns
    and says to pass their log (made an error here, so the fit stops there). Their log, and
    logits, do not look like probabilities."""
    x, y = multiclass(60, 2 if method in BINARY else 3, seed=17)
    with warnings.catch_warnings():
        warnings.simplefilter("error", cal.CalibrationWarning)
        with pytest.raises(cal.CalibrationWarning, match=r"logits look like probabilities.*log"):
            method().fit(softmax(x), y)  # type: ignore[attr-defined]
        for z in (np.log(softmax(x)), x, np.abs(x) / np.abs(x).sum(1, keepdims=True) + 1e-2):
            warn_if_probabilities(torch.from_numpy(z), method.__name__)


@pytest.mark.parametrize("method", SCALING, ids=lambda m: m.__name__)
@pytest.mark.parametrize("as_tensor", [False, True], ids=["numpy", "torch"])
def test_half_precision_probabilities_do_not_overflow(
    method: type[cal.Recalibrator], as_tensor: bool
) -> None:
    """float16 logits of 1e4 at T = 0.1 overflow float16 as z / T; the probabilities are
    computed in float32 and stored as float16, as the float32 ones rounded."""
    z = np.array([[1e4, 0.0, -1e4], [1.0, 2.0, 3.0]], dtype=np.float16)
    c = method().load_state_dict(  # type: ignore[attr-defined]
        {"method": method.name, "params": {"temperature": 0.1 if method is cal.TemperatureScaler
                                           else [0.1] * 3, "bias": None if method is
                                           cal.TemperatureScaler else [0.0] * 3}}
    )
    half = c.transform(torch.from_numpy(z) if as_tensor else z)
    want = c.transform(z.astype(np.float32)).astype(np.float16)
    assert half.dtype == (torch.float16 if as_tensor else np.float16)
    np.testing.assert_array_equal(np.asarray(half), want)


@functools.cache
def _fitted_on_normal_logits(method: type[cal.Recalibrator]) -> tuple[cal.Recalibrator, np.ndarray]:
    """``method`` fitted on 200 random logits (binary: scores), and those logits."""
    rng = np.random.default_rng(31)
    binary = method in BINARY
    z = rng.normal(size=(200,) if binary else (200, 4)) * 2
    y = (rng.random(200) < 0.5).astype(np.int64) if binary else rng.integers(0, 4, 200)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", cal.CalibrationWarning)
        return method().fit(z, y), z


FLOAT_DTYPES = [np.float16, np.float32, np.float64,
                torch.float16, torch.bfloat16, torch.float32, torch.float64]


@pytest.mark.parametrize("method", MULTICLASS + BINARY, ids=lambda m: m.__name__)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
def test_outputs_keep_the_input_dtype(method: type[cal.Recalibrator], dtype: Any) -> None:
    """Every method returns its input's floating dtype, NumPy as torch (a float32 array of
    1M x 1000 logits gives 4 GB of probabilities, not 8): the float64 result of the same input
    to the dtype's precision (temperature and vector scaling compute half precision in float32,
    so they round twice). Integer and list input give float64 (float32 for an integer tensor)."""
    c, z = _fitted_on_normal_logits(method)
    tensor = isinstance(dtype, torch.dtype)
    x = torch.from_numpy(z).to(dtype) if tensor else z.astype(dtype)
    exact = torch.from_numpy(z).to(dtype).double().numpy() if tensor else z.astype(dtype).astype(np.float64)
    for fn in ("transform", "transform_logits"):
        got = getattr(c, fn)(x)
        assert got.dtype == dtype, (fn, got.dtype)
        want = torch.from_numpy(np.asarray(getattr(c, fn)(exact))).to(dtype) if tensor else (
            np.asarray(getattr(c, fn)(exact)).astype(dtype))
        eps = float(torch.finfo(dtype).eps) if tensor else float(np.finfo(dtype).eps)
        got64 = np.asarray(got.float() if tensor else got, dtype=np.float64)
        want64 = np.asarray(want.float() if tensor else want, dtype=np.float64)
        np.testing.assert_allclose(got64, want64, rtol=2 * eps, atol=2 * eps * max(1.0, np.abs(want64).max()))
    assert c.transform(z.tolist()).dtype == np.float64
    assert c.transform(np.round(z * 10).astype(np.int64)).dtype == np.float64


@pytest.mark.parametrize("method", MULTICLASS + BINARY, ids=lambda m: m.__name__)
def test_docstring_states_formula_paper_and_gradient(method: type[cal.Recalibrator]) -> None:
    """Every method's docstring carries its formula and its paper (year), and the module
    says which methods keep the autograd graph of a tensor input (the scaling methods) and
    which return a detached tensor (the others), as they do."""
    import re

    doc = inspect.getdoc(method) or ""
    assert ":math:" in doc or ".. math::" in doc
    assert re.search(r"\b(19|20)\d\d\b", doc)
    mod = inspect.getdoc(inspect.getmodule(cal.MatrixScaler)) or ""
    assert "autograd" in mod
    x, y = binary(60, seed=18) if method in BINARY else multiclass(60, 3, seed=18)
    options = {k: v for k, v in NON_DEFAULT[method].items() if k != "from_logits"}
    c = method(**options).fit(x, y)  # type: ignore[attr-defined]
    out = c.transform(torch.from_numpy(x).requires_grad_())  # type: ignore[attr-defined]
    assert out.requires_grad == (method in SCALING)


@pytest.mark.parametrize("poison", ["nan", "inf"])
def test_lbfgs_stops_once_the_parameters_are_not_finite(poison: str) -> None:
    """Parameters that turn NaN or infinite end the L-BFGS fit at once (every later step would
    stay non-finite, and the line search's comparisons with NaN never end it before max_iter);
    the guard then falls back. A finite problem runs as before, to its minimum."""
    from crossent.calibration.recalibration import _lbfgs

    p = torch.ones(2, dtype=torch.float64, requires_grad=True)
    calls = 0

    def diverging() -> torch.Tensor:
        nonlocal calls
        calls += 1
        return (p * float(poison)).sum()  # its gradient is non-finite: the first step poisons p

    _lbfgs([p], diverging, max_iter=200)
    assert not torch.isfinite(p).all()
    assert calls <= 2, calls  # before: 251 evaluations, to max_iter * 5 / 4

    q = torch.zeros(2, dtype=torch.float64, requires_grad=True)
    target = torch.tensor([0.5, -2.0], dtype=torch.float64)
    _lbfgs([q], lambda: (q - target).square().sum(), max_iter=200)
    torch.testing.assert_close(q.detach(), target)


CHUNK_CASES = [(m, "nll") for m in MULTICLASS + BINARY] + [(cal.TemperatureScaler, "ece")]


@pytest.mark.parametrize("dtype", [np.float64, np.float32], ids=["float64", "float32"])
@pytest.mark.parametrize(("method", "objective"), CHUNK_CASES,
                         ids=[f"{m.__name__}-{o}" for m, o in CHUNK_CASES])
def test_a_fit_over_several_chunks_equals_the_fit_in_one(
    method: type[cal.Recalibrator], objective: str, dtype: type, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Large inputs are read in chunks of about ``CHUNK_ELEMENTS`` entries (a fit's NLL, its
    gradient and the guard's NLLs summed over them); a fit over many chunks gives the fit over
    one. (Vector scaling's fit once ran its second chunk's backward through the first chunk's
    freed graph.)"""
    from crossent.calibration import _inputs

    if method in BINARY:
        x, y = binary(600, seed=21)
    else:
        x, y = multiclass(600, 5, seed=21)
    x = x.astype(dtype)
    kw: dict[str, Any] = {"objective": objective} if objective == "ece" else {}
    whole = method().fit(x, y, **kw)  # type: ignore[attr-defined]
    monkeypatch.setattr(_inputs, "CHUNK_ELEMENTS", 240)  # 48 rows (240 binary) per chunk
    chunked = method().fit(x, y, **kw)  # type: ignore[attr-defined]
    assert whole.fallback is None and chunked.fallback is None
    np.testing.assert_allclose(chunked.predict_proba(x), whole.predict_proba(x), rtol=1e-6, atol=1e-9)  # type: ignore[attr-defined]


CONTAINERS: dict[str, Any] = {
    "numpy-float64": lambda z: z,
    "numpy-float32": lambda z: z.astype(np.float32),
    "numpy-float16": lambda z: z.astype(np.float16),
    "numpy-float32-big-endian": lambda z: z.astype(">f4"),
    "numpy-longdouble": lambda z: z.astype(np.longdouble),
    "list": lambda z: z.tolist(),
    "torch-float32": lambda z: torch.from_numpy(z).float(),
    "torch-bfloat16": lambda z: torch.from_numpy(z).bfloat16(),
    "torch-int64": lambda z: torch.from_numpy(np.round(z)).long(),
}


@pytest.mark.parametrize("output", ["transform", "transform_logits"])
@pytest.mark.parametrize("container", list(CONTAINERS))
@pytest.mark.parametrize("method", MULTICLASS, ids=lambda m: m.__name__)
def test_a_transform_over_several_chunks_equals_the_transform_in_one(
    method: type[cal.Recalibrator], container: str, output: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A transform reads its rows by chunks into an output allocated once in the input's type
    (the float64 temporaries are a chunk's): the same numbers, type and dtype as one read,
    an empty batch included."""
    from crossent.calibration import _inputs

    z, y = multiclass(300, 5, seed=8)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        c = method(fallback_to_identity=False).fit(z, y)  # type: ignore[call-arg]
    x = CONTAINERS[container](z[100:])
    apply = getattr(c, output)
    whole = apply(x)
    monkeypatch.setattr(_inputs, "CHUNK_ELEMENTS", 40)  # 8 rows per chunk
    if method not in SCALING:  # elementwise in the input's dtype, not by chunks
        monkeypatch.setattr(method, "_min_chunk_rows", 1)  # isotonic's 512 at least
    chunked = apply(x)
    assert type(chunked) is type(whole) and chunked.shape == (200, 5)
    assert chunked.dtype == whole.dtype
    if isinstance(x, torch.Tensor):
        assert whole.dtype == (x.dtype if x.is_floating_point() else torch.float32)
        torch.testing.assert_close(chunked, whole, rtol=0, atol=0)
        # the same values computed in float64 (temperature and vector scaling compute in the
        # input's dtype, float32 at least: documented)
        want = torch.from_numpy(apply(x.double().numpy()))
        rtol = 2**-8 if x.dtype == torch.bfloat16 else 2**-20 if method in SCALING else 2**-23
        torch.testing.assert_close(whole.double(), want, rtol=rtol, atol=rtol * float(want.abs().max()))
        return
    assert whole.dtype == (x.dtype if isinstance(x, np.ndarray) else np.float64)
    np.testing.assert_array_equal(chunked, whole)
    empty = apply(x[:0] if isinstance(x, np.ndarray) else np.zeros((0, 5)))
    assert empty.shape == (0, 5)


@pytest.mark.parametrize("stage", ["fit", "transform"])
@pytest.mark.parametrize("case", ["nan after a masked row", "a masked row before an empty one", "+inf"])
@pytest.mark.parametrize("method", MULTICLASS, ids=lambda m: m.__name__)
def test_the_bad_row_named_is_that_of_one_read_of_all_rows(
    method: type[cal.Recalibrator], case: str, stage: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Logits are checked by chunks of rows; the row an error names is the first bad row of the
    whole input, whatever the chunks (vector scaling's fit once named a chunk's row, 404 for
    row 2,500), and NaN is named before a masked row that comes earlier, as one read does."""
    from crossent.calibration import _inputs

    z, y = multiclass(120, 5, seed=2)
    col = (y + 1) % 5  # never a label's column
    if case == "nan after a masked row":
        z[5, col[5]] = -np.inf
        z[70, col[70]] = np.nan
        want = {True: "row 70 contains NaN", False: "row 70 contains NaN"}
    elif case == "a masked row before an empty one":
        z[50, col[50]] = -np.inf
        z[90] = -np.inf
        want = {True: "row 90 has no finite logit", False: "row 50 holds -inf"}
    else:
        z[99, col[99]] = np.inf
        want = {True: "row 99 contains NaN or infinite", False: "row 99 contains NaN or infinite"}
    if stage == "transform" and method in SCALING:
        pytest.skip("an elementwise op in the input's dtype, unchecked (documented): NaN gives NaN")
    masked_ok = method in MASKED_OK
    clean, _ = multiclass(120, 5, seed=2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fitted = method().fit(clean, y)  # type: ignore[attr-defined]

    def message() -> str:
        with pytest.raises(ValueError) as err:
            if stage == "fit":
                method().fit(z, y)  # type: ignore[attr-defined]
            else:
                fitted.transform(z)
        return str(err.value)

    whole = message()
    monkeypatch.setattr(_inputs, "CHUNK_ELEMENTS", 40)  # 8 rows per chunk
    assert message() == whole
    assert want[masked_ok] in whole, whole


@pytest.mark.parametrize("method", MULTICLASS, ids=lambda m: m.__name__)
@pytest.mark.parametrize("separable", [False, True], ids=["fitted", "fallen back"])
def test_logits_of_other_classes_are_refused_fitted_or_fallen_back(
    method: type[cal.Recalibrator], separable: bool
) -> None:
    """A map with parameters per class refuses logits of another number of classes whether its
    fit was used or fell back to the identity (whose parameters no longer say the number): a
    pipeline that feeds it the wrong logits is told either way. Temperature and ensemble
    temperature scaling share their parameters over the classes and apply to any number."""
    z, y = multiclass(400, 4, seed=3)
    labels = z.argmax(1) if separable else y
    if separable and method in ONE_VS_REST:  # every class's one-vs-rest problem separated too
        z[np.arange(400), labels] += 30.0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        c = method().fit(z, labels)  # type: ignore[attr-defined]
    assert (c.fallback is not None) == separable
    other = np.random.default_rng(0).normal(size=(5, 3))
    if method in (cal.TemperatureScaler, cal.EnsembleTemperatureScaler):
        assert c.transform(other).shape == (5, 3)  # type: ignore[attr-defined]
        return
    with pytest.raises(ValueError, match="logits have 3 classes but the map was fitted on 4"):
        c.transform(other)  # type: ignore[attr-defined]
    assert c.transform(z[:5]).shape == (5, 4)  # type: ignore[attr-defined]
    loaded = method().load_state_dict(c.state_dict())  # type: ignore[attr-defined]
    if not separable:  # a loaded fit's parameters carry the number
        with pytest.raises(ValueError, match="fitted on 4"):
            loaded.transform(other)


@pytest.mark.parametrize("method", BINARY, ids=lambda m: m.__name__)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32, torch.int32, torch.bool])
def test_binary_labels_of_any_torch_dtype(method: type[cal.Recalibrator], dtype: torch.dtype) -> None:
    """0/1 targets cast to the model's dtype (bfloat16, which NumPy has no type for, included)
    fit the same map as int64 labels."""
    s, y = binary(500, seed=4)
    want = method().fit(s, y)  # type: ignore[attr-defined]
    got = method().fit(torch.from_numpy(s), torch.from_numpy(y).to(dtype))  # type: ignore[attr-defined]
    np.testing.assert_array_equal(got.coef, want.coef)


@pytest.mark.parametrize("method", [cal.PlattScaler, cal.BetaCalibrator])
def test_only_strict_separation_falls_back_for_platt_and_beta(method: Any) -> None:
    """A threshold that splits the classes falls back; scores tied at the threshold with both
    classes there (quasi-complete separation, as of scores taking few values) keep the fit,
    with a warning, as it calibrates the tied value where the identity does not: on fresh data
    of that kind its NLL beats the identity's."""
    s = np.array([0.1, 0.3, 0.6, 0.8])
    y = np.array([0, 0, 1, 1])
    with pytest.warns(cal.CalibrationWarning, match="threshold on the score splits"):
        c = method(from_logits=False).fit(s, y)
    assert c.diagnostic_kind == "separable" and c.fallback is not None
    with pytest.warns(cal.CalibrationWarning, match="positives below it"):
        method(from_logits=False).fit(s[::-1].copy(), y)
    rng = np.random.default_rng(6)

    def draw(n: int) -> tuple[np.ndarray, np.ndarray]:
        low = rng.random(n) < 0.4
        return np.where(low, 0.2, 0.8), np.where(low, 0, rng.random(n) < 0.5).astype(int)

    sv, yv = draw(200)
    st, yt = draw(2000)
    ties = r"separable but for ties \(a threshold at the probability 0.8 "
    with pytest.warns(cal.CalibrationWarning, match=ties):
        c = method(from_logits=False).fit(sv, yv)
    assert c.diagnostic_kind == "separable" and c.fallback is None
    assert "keeping the fit" not in (c.diagnostic or "")
    q = np.clip(np.asarray(c.transform(st)), 1e-12, 1 - 1e-12)
    fit_nll = -np.mean(yt * np.log(q) + (1 - yt) * np.log(1 - q))
    id_nll = -np.mean(yt * np.log(st) + (1 - yt) * np.log(1 - st))
    assert fit_nll < id_nll


@pytest.mark.parametrize("method", [cal.PlattScaler, cal.BetaCalibrator])
def test_ties_at_the_threshold_of_continuous_scores_warn_that_the_map_is_a_step(method: Any) -> None:
    """Quantised scores, each class on its own side of 0 but for ties at 0: the coefficients
    diverge and the map is a step at 0, which on overlapping test scores gives a test NLL far
    above the identity's. The fit is kept (the identity is no safer for scores that take few
    values) but never silently: the warning names the tie, the step and the held-out check,
    and ``diagnostic`` says it, without ``fallback``."""
    rng = np.random.default_rng(0)
    s = np.concatenate([np.round(rng.uniform(-3, 0, 500), 1), np.round(rng.uniform(0, 3, 500), 1)])
    y = np.r_[np.zeros(500), np.ones(500)].astype(int)
    with pytest.warns(cal.CalibrationWarning) as caught:
        c = method(from_logits=True).fit(s, y)
    (message,) = [str(w.message) for w in caught]
    n_tied = int((s == 0).sum())
    assert (f"at the logit 0 (probability 0.5) splits the two classes, except for the {n_tied} samples"
            in message)
    assert "the map is a step at that score" in message and "keeping the fit" in message
    assert "held-out data" in message
    assert c.fallback is None and c.diagnostic_kind == "separable" and "step" in (c.diagnostic or "")
    st = rng.normal(size=4000) * 1.5  # overlapping classes: the step is far worse than the identity
    yt = (rng.random(4000) < 1 / (1 + np.exp(-st))).astype(int)
    q = np.clip(np.asarray(c.transform(st)), 1e-300, 1 - 1e-16)
    assert -np.mean(yt * np.log(q) + (1 - yt) * np.log(1 - q)) > 5.0
    state = json.loads(json.dumps(c.state_dict()))
    assert method().load_state_dict(state).diagnostic == c.diagnostic


def test_ties_with_the_positives_below_diverge_for_platt_only() -> None:
    """Positives below a tie: Platt's slope runs to minus infinity (the ties warning), while
    beta calibration, held non-decreasing by a, b >= 0, stops on its bound at a constant map:
    finite, not a step, and no ties warning."""
    s = np.array([0.1, 0.2, 0.5, 0.5, 0.8, 0.9])
    y = np.array([1, 1, 1, 0, 0, 0])
    with pytest.warns(cal.CalibrationWarning, match="separable but for ties .* at the probability 0.5 "):
        platt = cal.PlattScaler(from_logits=False).fit(s, y)
    assert platt.coef is not None and platt.coef[0] < -5
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        beta = cal.BetaCalibrator(from_logits=False).fit(s, y)
    assert not [w for w in caught if "separable but for ties" in str(w.message)]
    assert beta.diagnostic is None and beta.fallback is None
    np.testing.assert_allclose(beta.predict_proba(np.array([0.1, 0.5, 0.9])), 0.5, atol=1e-6)


@pytest.mark.parametrize("method", MULTICLASS + BINARY, ids=lambda m: m.__name__)
def test_a_fit_on_meta_tensors_is_refused_by_name(method: Any) -> None:
    """Logits or labels on the meta device (a shape, no values) are refused by name."""
    shape = (20,) if method in BINARY else (20, 3)
    z, y = torch.randn(shape), torch.arange(20) % (2 if method in BINARY else 3)
    for logits, labels in ((z.to("meta"), y), (z, y.to("meta"))):
        with pytest.raises(ValueError, match="is a tensor on the meta device, which holds no values"):
            method().fit(logits, labels)


@pytest.mark.parametrize("method", [cal.PlattScaler, cal.BetaCalibrator])
def test_binary_methods_refuse_scores_that_are_not_real_arrays(method: Any) -> None:
    """Complex, string and bool scores, ragged lists and sparse tensors are refused by name,
    as the multiclass methods refuse them, not cast or passed to NumPy's internals."""
    y = np.array([0, 1, 0, 1])
    for bad in (np.array([1 + 5j, -2j, 0.5, 3]), np.array(["0.5", "2", "1", "3"]),
                np.array([True, False, True, False])):
        with pytest.raises(TypeError, match="scores must be a numeric array"):
            method().fit(bad, y)
    with pytest.raises(ValueError, match="scores is ragged"):
        method().fit([[0.1, 0.2], [0.3]], [0, 1])
    with pytest.raises(TypeError, match=r"scores is a sparse_coo tensor; pass scores\.to_dense\(\)"):
        method().fit(torch.tensor([0.1, 2.0, -1.0, 0.5]).to_sparse(), y)
    fitted = method(from_logits=False).fit(np.array([0.2, 0.6, 0.4, 0.9, 0.7, 0.3]),
                                           np.array([0, 1, 1, 1, 0, 0]))
    with pytest.raises(TypeError, match="numeric"):
        fitted.transform(np.array([True, False]))


@pytest.mark.parametrize("method", [cal.PlattScaler, cal.BetaCalibrator])
def test_binary_probabilities_read_as_logits_warn(method: Any) -> None:
    """(N,) scores all in [0, 1] fitted with the default from_logits=True are probably
    probabilities: a warning names from_logits=False, as the (N, 2) form's does; logits and
    from_logits=False stay silent."""
    rng = np.random.default_rng(3)
    p = rng.random(300)
    y = (rng.random(300) < p).astype(int)
    with pytest.warns(cal.CalibrationWarning, match="pass from_logits=False"):
        method().fit(p, y)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        method(from_logits=False).fit(p, y)
        method().fit(np.log(p / (1 - p)), y)
        method(from_logits=True).fit(p, y)  # said explicitly: read as logits, silently
        method().fit(np.zeros(300), y)  # constant scores: nothing to tell apart


def test_the_upper_bound_names_a_larger_t_max() -> None:
    """Logits whose best temperature lies beyond t_max: the fallback's reason says which
    t_max fits it, and with that t_max the fit is kept."""
    g = torch.Generator().manual_seed(0)
    z = torch.randn(300, 4, generator=g, dtype=torch.float64) * 2
    y = torch.multinomial(torch.softmax(z, 1), 1, generator=g).squeeze(1)
    bound = (r"upper bound t_max=100; .*; the NLL's optimum lies beyond t_max: a larger bound fits it"
             r" \(TemperatureScaler\(t_max=1000\), or more\)")
    with pytest.warns(cal.CalibrationWarning, match=bound):
        t = cal.TemperatureScaler().fit(1000 * z, y)
    assert t.diagnostic_kind == "bound"
    assert t.fallback == "the fit stopped at the upper bound t_max=100"  # the reports' words: no advice
    kept = cal.TemperatureScaler(t_max=1e4).fit(1000 * z, y)
    assert kept.fallback is None and 100 < float(kept.temperature) < 1e4
    with pytest.warns(cal.CalibrationWarning) as caught:  # ETS has no t_max to raise
        cal.EnsembleTemperatureScaler().fit(1000 * z, y)
    assert not any("t_max=1000" in str(w.message) for w in caught)


def test_the_upper_bound_says_when_no_temperature_fits() -> None:
    """Logits that rank the labels below their rows' means: the NLL falls on towards uniform
    predictions and beyond (1/T < 0), so no t_max helps, and the warning says that instead of
    naming a larger one."""
    rng = np.random.default_rng(3)
    z = rng.normal(size=(500, 3))
    y = z.argmin(1)
    no_t = "upper bound t_max=100; .*; no temperature fits these logits"
    with pytest.warns(cal.CalibrationWarning, match=no_t) as caught:
        t = cal.TemperatureScaler().fit(z, y)
    assert not any("t_max=1000" in str(w.message) for w in caught)
    assert t.fallback == "the fit stopped at the upper bound t_max=100"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", cal.CalibrationWarning)
        assert cal.TemperatureScaler(t_max=1e4).fit(z, y).fallback is not None  # as it said


def _one_noise_logit(seed: int, n: int = 3000, c: int = 4) -> tuple[np.ndarray, np.ndarray]:
    """Logits whose last class's logit is noise, independent of the labels."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, c, n)
    z = rng.normal(0, 1, (n, c))
    z[np.arange(n), y] += 2.0
    z[:, c - 1] = rng.normal(0, 3, n)
    return z, y


def _long_tailed(n: int, rng: np.random.Generator, c: int = 10) -> tuple[np.ndarray, np.ndarray]:
    """Logits of a model on classes whose priors fall as k^-1.5: a few samples of the last ones."""
    prior = np.arange(1, c + 1) ** -1.5
    prior /= prior.sum()
    y = rng.choice(c, size=n, p=prior)
    mu = rng.normal(0, 1, (n, c))
    mu[np.arange(n), y] += 1.5
    return 4 * mu + rng.normal(0, 1, (n, c)) + np.log(prior), y


def test_vector_scaling_at_t_max_falls_back_and_says_whether_a_larger_bound_helps() -> None:
    """A class temperature at t_max falls back, and the warning says class by class whether a
    larger bound can help: not for a logit of noise (its NLL-optimal weight 1/T is below 0;
    the kept map is good there), yes for an informative logit on a 500x scale (T = 250 fits it)."""
    zv, yv = _one_noise_logit(0)
    zt, yt = _one_noise_logit(1)
    noise = r"upper bound t_max=100; .*no temperature fits class 3"
    with pytest.warns(cal.CalibrationWarning, match=noise) as caught:
        v = cal.VectorScaler().fit(zv, yv)
    assert not any("larger bound" in str(w.message) for w in caught)
    assert v.fallback == "the fit stopped at the upper bound t_max=100" and v.diagnostic_kind == "bound"
    with pytest.warns(cal.CalibrationWarning, match="keeping the fit"):
        kept = cal.VectorScaler(fallback_to_identity=False).fit(zv, yv)
    assert cal.nll(kept.transform(zt), yt) < 0.6 * cal.nll(zt, yt, from_logits=True)

    rng = np.random.default_rng(0)
    zv, yv = _one_noise_logit(2)
    zv[:, 3] = rng.normal(0, 1, zv.shape[0]) + 2.0 * (yv == 3)  # informative again
    zv[:, 3] *= 500.0
    larger = r"a larger bound fits class 3 \(VectorScaler\(t_max=1000\)"
    with pytest.warns(cal.CalibrationWarning, match=larger):
        cal.VectorScaler().fit(zv, yv)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        wide = cal.VectorScaler(t_max=1e4).fit(zv, yv)
    assert 100 < float(np.asarray(wide.temperature)[3]) < 1e4



def test_vector_scaling_restarts_only_where_a_bound_holds_a_temperature_back(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """L-BFGS starts again from the bounds only where the gradient there points a temperature
    inwards: a noise logit's T at t_max is its bounded optimum (one run), the long-tailed set's
    T_8 is not (a restart finds T_8 = 7)."""
    runs: list[int] = []

    class Counted(torch.optim.LBFGS):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            runs.append(1)
            super().__init__(*args, **kwargs)

    monkeypatch.setattr(torch.optim, "LBFGS", Counted)
    zv, yv = _one_noise_logit(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", cal.CalibrationWarning)
        v = cal.VectorScaler(fallback_to_identity=False).fit(zv, yv)
    assert float(np.asarray(v.temperature)[3]) == pytest.approx(100.0) and len(runs) == 1
    runs.clear()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", cal.CalibrationWarning)
        v = cal.VectorScaler().fit(*_long_tailed(100, np.random.default_rng(7)))
    assert float(np.asarray(v.temperature)[8]) == pytest.approx(6.966, rel=1e-3) and len(runs) >= 2


def test_vector_scaling_finds_temperatures_inside_the_bounds_and_warns_of_few_samples() -> None:
    """A long-tailed validation set of 100 samples (C = 10): the best temperatures within the
    bounds are inside them (T_8 = 7.0, as scipy's bounded fit finds; L-BFGS on a clamp of log T
    left it stuck at t_max, a fallback by accident), and the fit overfits the rare classes (test
    NLL several times the identity's): it warns of 100 samples for 20 parameters, as matrix
    scaling warns, and names the fit that does not overfit."""
    rng = np.random.default_rng(7)
    zv, yv = _long_tailed(100, rng)
    zt, yt = _long_tailed(5000, rng)
    few = r"VectorScaler: 20 parameters \(C = 10\) fitted on 100 validation samples: .*TemperatureScaler"
    with pytest.warns(cal.CalibrationWarning, match=few) as caught:
        v = cal.VectorScaler().fit(zv, yv)
    assert not any("t_max" in str(w.message) for w in caught)
    assert v.fallback is None and float(np.asarray(v.temperature)[8]) == pytest.approx(6.966, rel=1e-3)
    assert cal.nll(v.transform(zv), yv) == pytest.approx(0.743958, abs=1e-6)  # scipy, w in [0.01, 100]
    assert cal.nll(v.transform(zt), yt) > 3 * cal.nll(zt, yt, from_logits=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        cal.VectorScaler().fit(*_long_tailed(200, rng))  # 10 a parameter: silent


@pytest.mark.parametrize("method", [cal.MatrixScaler, cal.DirichletCalibrator, cal.VectorScaler])
def test_a_fit_far_from_its_optimum_at_max_iter_warns(
    method: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """L-BFGS that runs out of steps with a large gradient (logits scaled by 1e4) warns and
    names max_iter; an ordinary fit stays silent. Matrix and Dirichlet scaling take L-BFGS
    beyond the size Newton's method takes (here forced), Newton steps below it, which the
    scale of the logits does not slow (silent), and which warn too when max_iter is too few."""
    g = torch.Generator().manual_seed(1)
    z = torch.randn(2000, 10, generator=g, dtype=torch.float64) * 3
    y = torch.multinomial(torch.softmax(z, 1), 1, generator=g).squeeze(1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        method().fit(z, y)
    if method is cal.VectorScaler:  # its temperatures reach t_max first
        with pytest.warns(cal.CalibrationWarning, match="t_max"):
            method().fit(z * 1e4 / 3, y)
        return
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        method().fit(z * 1e4 / 3, y)  # Newton
    newton = r"max_iter=1 Newton steps with a gradient of .*raise max_iter"
    with pytest.warns(cal.CalibrationWarning, match=newton):
        method(max_iter=1).fit(z * 1e4 / 3, y)
    monkeypatch.setattr(recalibration, "NEWTON_MAX_PARAMS", 0)
    steps = r"max_iter=20 L-BFGS steps with a gradient of .*raise max_iter"
    with pytest.warns(cal.CalibrationWarning, match=steps):
        method(max_iter=20).fit(z * 1e4 / 3, y)


@pytest.mark.parametrize("method", [cal.MatrixScaler, cal.DirichletCalibrator])
def test_a_newton_fit_that_stalls_far_from_its_optimum_warns(method: Any) -> None:
    """Logits of scale 1e10 saturate every softmax: matrix scaling's Newton stops well before
    max_iter when no step lowers the objective, with a gradient in the hundreds, Dirichlet's
    runs out of steps. Both warn, naming the cause."""
    g = torch.Generator().manual_seed(0)
    z = torch.randn(2000, 5, generator=g, dtype=torch.float64) * 2
    y = torch.multinomial(torch.softmax(z, 1), 1, generator=g).squeeze(1)
    stalled = r"stopped after max_iter=200 Newton steps .* raise max_iter"
    if method is cal.MatrixScaler:
        stalled = r"after \d+ Newton steps \(no step lowered the objective more\) .* rescale the logits"
    with pytest.warns(cal.CalibrationWarning, match=stalled):
        method().fit(z * 1e10, y)


@pytest.mark.parametrize(("n", "k", "f"), [(7, 2, 3), (40, 5, 6), (300, 10, 11), (120, 12, 13), (9, 30, 4)])
def test_the_newton_hessian_is_autograds(n: int, k: int, f: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """The Hessian of matrix and Dirichlet scaling's Newton steps, built from symmetric row
    blocks of A^T A mirrored above the diagonal (one block up to 64 parameters, several beyond)
    and summed over chunks of rows (one, and chunks of 3 rows), equals autograd's Hessian of the
    mean NLL in float64."""
    g = torch.Generator().manual_seed(n + k)
    xt = torch.randn(n, f, generator=g, dtype=torch.float64)
    y = torch.randint(0, k, (n,), generator=g)
    theta = torch.randn(k, f, generator=g, dtype=torch.float64) * 0.7
    p = torch.softmax(xt @ theta.T, 1)
    want = torch.autograd.functional.hessian(
        lambda th: F.cross_entropy(xt @ th.reshape(k, f).T, y), theta.reshape(-1))
    torch.testing.assert_close(recalibration._affine_hessian(p, xt), want, rtol=1e-12, atol=1e-14)
    monkeypatch.setattr(recalibration, "HESSIAN_CHUNK_ENTRIES", 3 * k * f)  # 3 rows a chunk
    torch.testing.assert_close(recalibration._affine_hessian(p, xt), want, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("method", [cal.MatrixScaler, cal.DirichletCalibrator])
def test_a_newton_step_that_cholesky_refuses_is_solved_by_lu(
    method: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Newton's steps are solved by Cholesky, and by LU where Cholesky finds the damped Hessian
    not positive definite (round-off on saturated rows): with every Cholesky refused, the fit
    is the same."""
    z, y = multiclass(600, 6, seed=4)
    want = method().fit(z, y)
    calls = []

    def refuse(a: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        calls.append(a.shape)
        raise torch.linalg.LinAlgError("not positive definite")

    monkeypatch.setattr(torch.linalg, "cholesky", refuse)
    got = method().fit(z, y)
    assert calls and all(s == (42, 42) for s in calls)
    np.testing.assert_allclose(got.weight, want.weight, rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(got.bias, want.bias, rtol=1e-9, atol=1e-12)


def _odir_objective(method: Any, z: torch.Tensor, y: torch.Tensor, w: torch.Tensor, b: torch.Tensor,
                    lam: float, mu: float) -> torch.Tensor:
    """The objective of the MatrixScaler docstring, written out here."""
    x = torch.log_softmax(z, 1) if method is cal.DirichletCalibrator else z
    k = z.shape[1]
    off = w - torch.diag(torch.diagonal(w))
    return (F.cross_entropy(x @ w.T + b, y) + lam * off.square().sum() / (k * (k - 1))
            + mu * b.square().sum() / k)


@pytest.mark.parametrize("reg", [0.01, 1.0, 100.0])
@pytest.mark.parametrize("scale", [1.0, 10.0])
@pytest.mark.parametrize("method", [cal.MatrixScaler, cal.DirichletCalibrator])
def test_matrix_and_dirichlet_reach_the_optimum_of_their_objective(
    method: Any, scale: float, reg: float
) -> None:
    """The ODIR objective is convex: at its optimum the gradient vanishes. On logits of an
    overconfident model (scale 10: log-probabilities far below 0, the features L-BFGS crawls
    on) the fit's (W, b) have a gradient below 1e-7 whatever the regularisation, and an
    objective no higher than 200 L-BFGS steps reach (0.0008-0.27 nats above it before)."""
    g = torch.Generator().manual_seed(11)
    y = torch.randint(0, 6, (1500,), generator=g)
    z = torch.randn(1500, 6, generator=g, dtype=torch.float64)
    z[torch.arange(1500), y] += 1.5
    z *= scale
    c = method(reg_off_diagonal=reg, reg_bias=reg).fit(z, y)
    w = torch.from_numpy(c.weight).requires_grad_(True)
    b = torch.from_numpy(c.bias).requires_grad_(True)
    value = _odir_objective(method, z, y, w, b, reg, reg)
    gw, gb = torch.autograd.grad(value, [w, b])
    assert max(float(gw.abs().max()), float(gb.abs().max())) < 1e-7
    w2 = torch.eye(6, dtype=torch.float64, requires_grad=True)
    b2 = torch.zeros(6, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([w2, b2], max_iter=200, history_size=20, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = _odir_objective(method, z, y, w2, b2, reg, reg)
        loss.backward()
        return loss

    opt.step(closure)
    assert float(value) <= float(_odir_objective(method, z, y, w2, b2, reg, reg)) + 1e-12


@pytest.mark.parametrize("method", [cal.MatrixScaler, cal.DirichletCalibrator])
def test_fewer_validation_samples_than_parameters_warn(method: Any) -> None:
    """C (C + 1) parameters on fewer samples can fit them exactly, and overfit a few times as
    many: the fit warns (pointing at the caller's line) and names the counts below 10 samples
    a parameter; with enough samples it does not. On logits that need no recalibration the
    warned fit of 2 samples a parameter raises the test NLL well above the identity's."""
    g = torch.Generator().manual_seed(2)
    z = torch.randn(4000, 5, generator=g, dtype=torch.float64) * 3
    y = torch.multinomial(torch.softmax(z, 1), 1, generator=g).squeeze(1)
    y[:5] = torch.arange(5)  # every class in the small sets
    words = r"30 parameters \(C = 5\) fitted on 20 validation samples: the map can fit them exactly"
    with pytest.warns(cal.CalibrationWarning, match=words) as caught:
        method().fit(z[:20], y[:20])
    assert any(w.filename == __file__ for w in caught)
    words = r"30 parameters \(C = 5\) fitted on 60 validation samples: fewer than 10 a parameter"
    with pytest.warns(cal.CalibrationWarning, match=words):
        small = method().fit(z[:60], y[:60])
    test_z, test_y = z[2000:], y[2000:]
    nll_fit = float(F.nll_loss(torch.log(torch.as_tensor(small.transform(test_z))), test_y))
    assert nll_fit > 1.1 * float(F.cross_entropy(test_z, test_y))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        method().fit(z[:300], y[:300])
        method().fit(z[:2000], y[:2000])


@pytest.mark.parametrize("method", MULTICLASS + BINARY, ids=lambda m: m.__name__)
def test_every_fit_warning_points_at_the_callers_line(method: type[cal.Recalibrator]) -> None:
    """The warnings of a fit (probabilities given as logits, a separable set, a bound, a
    fallback) name the line that called ``fit``, whatever depth inside crossent raised them
    (``fit`` runs inside a wrapper that turns autograd on)."""
    rng = np.random.default_rng(12)
    if method in BINARY:
        s = rng.normal(size=300) * 2
        q = 1 / (1 + np.exp(-s))
        drawn = (rng.random(300) < q).astype(np.int64)
        cases = [(s, (s > 0).astype(np.int64)), (np.stack([1 - q, q], 1), drawn)]
    else:
        z = rng.normal(size=(300, 3)) * 2
        p = torch.softmax(torch.from_numpy(z), 1).numpy()
        cases = [(z, z.argmax(1)), (p, rng.integers(0, 3, 300))]
    seen = 0
    for x, y in cases:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            method().fit(x, y)  # type: ignore[attr-defined]
        ours = [w for w in caught if issubclass(w.category, cal.CalibrationWarning)]
        assert all(w.filename == __file__ for w in ours), [(w.filename, str(w.message)) for w in ours]
        seen += len(ours)
    assert seen


def test_the_nll_max_iter_warning_points_at_the_callers_line() -> None:
    """The temperature fit's max_iter warning names the line that called fit, on the NLL
    path and through the ECE objective alike."""
    g = torch.Generator().manual_seed(3)
    z = torch.randn(500, 4, generator=g, dtype=torch.float64) * 5
    y = torch.multinomial(torch.softmax(z / 3, 1), 1, generator=g).squeeze(1)
    for objective in ("nll", "ece"):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            cal.TemperatureScaler(max_iter=1).fit(z, y, objective=objective)
        hits = [w for w in caught if "max_iter=1 steps" in str(w.message)]
        assert hits, [str(w.message) for w in caught]
        assert all(w.filename == __file__ for w in hits), [w.filename for w in hits]


def test_load_of_a_file_that_is_not_json_and_save_of_another_object(tmp_path: Any) -> None:
    """A saved file cut short or empty raises ValueError naming it; save refuses what is not
    a recalibrator."""
    good = cal.TemperatureScaler().fit(*_tiny_multiclass())
    path = tmp_path / "t.json"
    cal.save(good, path)
    text = path.read_text()
    for cut in (text[: len(text) // 2], ""):
        path.write_text(cut)
        with pytest.raises(ValueError, match=f"{path} is not the JSON that crossent.calibration.save writes"):
            cal.load(path)
    with pytest.raises(TypeError, match="calibrator must be a fitted recalibrator"):
        cal.save("TemperatureScaler", path)  # type: ignore[arg-type]


def _tiny_multiclass() -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(4)
    z = rng.normal(size=(200, 3)) * 2
    return z, (_softmax_rows(z).cumsum(1) > rng.random((200, 1))).argmax(1)


def _softmax_rows(z: np.ndarray) -> np.ndarray:
    e = np.exp(z - z.max(1, keepdims=True))
    return e / e.sum(1, keepdims=True)


def test_the_shape_error_of_binary_scores_shows_two_columns_of_logits() -> None:
    """(N,) scores given to a multiclass method: the fix names two columns of logits (the log
    of stacked probabilities), which the method then takes without a warning."""
    rng = np.random.default_rng(5)
    p = rng.random(400) * 0.98 + 0.01
    y = (rng.random(400) < p).astype(int)
    with pytest.raises(ValueError, match=r"np\.log\(np\.stack\(\[1 - p, p\], axis=1\)\)"):
        cal.TemperatureScaler().fit(p, y)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        t = cal.TemperatureScaler().fit(np.log(np.stack([1 - p, p], axis=1)), y)
    assert 0.5 < float(t.temperature) < 2


def test_a_fit_out_of_evaluations_before_max_iter_warns_too() -> None:
    """L-BFGS may stop on its evaluation budget (1.25 max_iter) before max_iter steps: with a
    large gradient left that warns as running out of steps does."""
    g = torch.Generator().manual_seed(7)
    z = torch.randn(500, 4, generator=g, dtype=torch.float64) * 3
    y = torch.multinomial(torch.softmax(z, 1), 1, generator=g).squeeze(1)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(recalibration, "NEWTON_MAX_PARAMS", 0)  # the L-BFGS of larger problems
        with pytest.warns(cal.CalibrationWarning, match="max_iter=2 L-BFGS steps"):
            cal.MatrixScaler(max_iter=2).fit(z, y)


@pytest.mark.parametrize("method", [cal.HistogramBinning, cal.IsotonicCalibrator])
def test_a_fallen_back_one_vs_rest_map_keeps_its_class_count_through_its_state(method: Any) -> None:
    """After a fallback the map's parameters are null and do not show C: the state carries it,
    so the loaded map refuses logits of another number of classes as the fitted one does; a
    state without it (written before it existed) still loads, and a wrong one is refused."""
    rng = np.random.default_rng(0)
    z5, y = rng.normal(size=(200, 5)), np.zeros(200, int)  # one class only: falls back
    with pytest.warns(cal.CalibrationWarning):
        c = method().fit(z5, y)
    assert c.fallback is not None
    state = json.loads(json.dumps(c.state_dict()))
    assert state["params"]["n_classes"] == 5
    for obj in (c, cal.from_state_dict(state)):
        with pytest.raises(ValueError, match="logits have 3 classes but the map was fitted on 5"):
            obj.transform(rng.normal(size=(4, 3)))
        np.testing.assert_allclose(obj.transform(z5[:4]), torch.softmax(torch.from_numpy(z5[:4]), 1).numpy())
    old = {**state, "params": {k: v for k, v in state["params"].items() if k != "n_classes"}}
    assert np.asarray(cal.from_state_dict(old).transform(rng.normal(size=(4, 3)))).shape == (4, 3)
    for bad, error in ((1, ValueError), (2.5, TypeError), (True, TypeError), ("5", TypeError)):
        with pytest.raises(error, match=r"state\['params'\]\['n_classes'\] must be a whole number >= 2"):
            method().load_state_dict({**state, "params": {**state["params"], "n_classes": bad}})
    fitted = method().fit(z5, rng.integers(0, 5, 200))
    good = json.loads(json.dumps(fitted.state_dict()))
    assert "n_classes" not in good["params"]  # the map itself shows it
    with pytest.raises(ValueError, match=r"must be 5 \(the map's classes\) or null, got 4"):
        method().load_state_dict({**good, "params": {**good["params"], "n_classes": 4}})


# ---------------------------------------------------------------- masked logits (-inf)
MASKED_OK = (cal.TemperatureScaler, cal.VectorScaler, cal.HistogramBinning, cal.IsotonicCalibrator,
             cal.EnsembleTemperatureScaler)
MIXING = (cal.MatrixScaler, cal.DirichletCalibrator)


def _masked_logits(seed: int = 0, n: int = 600, c: int = 5) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Logits with -inf entries (masked classes) scattered over the rows, never on a label;
    the same with -1e30 in their place, which has probability 0 at every fitted parameter."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, c, n)
    z = rng.normal(size=(n, c)) * 2.0
    z[np.arange(n), y] += 2.5
    mask = rng.random((n, c)) < 0.3
    mask[np.arange(n), y] = False
    z[mask] = -np.inf
    return z, np.where(mask, -1e30, z), y


@pytest.mark.parametrize("method", MASKED_OK, ids=lambda m: m.__name__)
@pytest.mark.parametrize("as_tensor", [False, True], ids=["numpy", "torch"])
def test_masked_logits_fit_as_classes_of_probability_zero(method: type, as_tensor: bool) -> None:
    """A masked logit (-inf), as F.cross_entropy takes it, has probability 0 at every
    parameter, and keeps it after recalibration, with no warning. Temperature and vector
    scaling and isotonic regression equal their fits on the same logits with -1e30 in its
    place (whose softmax is 0 there too). Histogram binning would give a masked class its
    first bin's value: its rows are renormalised without them. The ensemble's uniform term is
    uniform over the classes not masked."""
    z, z_far, y = _masked_logits()
    masked = np.isinf(z)
    wrap = torch.from_numpy if as_tensor else np.asarray
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        got = method().fit(wrap(z), wrap(y))
        p = np.asarray(got.transform(wrap(z)))
    assert got.fallback is None
    assert (p[masked] == 0).all() and np.allclose(p.sum(1), 1.0, rtol=1e-12)
    if method is cal.EnsembleTemperatureScaler:
        w, sz, live = got.weights, torch.from_numpy(z), ~masked
        want = (w[0] * torch.softmax(sz / got.temperature, 1).numpy() + w[1] * torch.softmax(sz, 1).numpy()
                + w[2] * live / live.sum(1, keepdims=True))
        np.testing.assert_allclose(p, want, rtol=1e-12, atol=1e-15)
        return
    far = method().fit(z_far, y)
    want = far.transform(z_far)
    if method is cal.HistogramBinning:
        assert (want[masked] > 0).all()
        want = np.where(masked, 0.0, want)
        want /= want.sum(1, keepdims=True)
    np.testing.assert_allclose(p, want, rtol=1e-12, atol=1e-15)
    if method in SCALING:
        np.testing.assert_allclose(got.temperature, far.temperature, rtol=1e-12)


@pytest.mark.parametrize("method", MASKED_OK, ids=lambda m: m.__name__)
def test_a_class_masked_throughout_is_not_absent(method: type) -> None:
    """A class masked in every validation row (a token no label uses) has no sample, yet it
    has probability 0 at any parameters: no warning, no diagnostic, and the fit of the other
    classes is the fit without that column (vector scaling fell back as for an absent class;
    the one-vs-rest maps warned of it)."""
    z, _, y = _masked_logits(n=800, c=4)
    z = np.concatenate([z, np.full((z.shape[0], 1), -np.inf)], 1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        got = method().fit(z, y)
    want = method().fit(z[:, :4], y)
    assert got.fallback is None and got.diagnostic_kind is None
    p = got.transform(z)
    assert (p[:, 4] == 0).all()
    np.testing.assert_allclose(p[:, :4], want.transform(z[:, :4]), rtol=1e-9, atol=1e-15)


@pytest.mark.parametrize("method", MULTICLASS, ids=lambda m: m.__name__)
def test_fits_refuse_masked_labels_nan_and_inf_by_row(method: type) -> None:
    """Every fit names the row: NaN or +inf, a row masked throughout, and a label whose own
    logit is -inf (no map gives it a probability above 0); the mixing maps also name masked
    logits, and the fits that take them."""
    z, _, y = _masked_logits(c=5)
    z = np.where(np.isinf(z), 0.0, z) if method in MIXING else z
    for value, match in ((np.nan, "row 7 contains NaN or infinite values"),
                         (np.inf, "row 7 contains NaN or infinite values")):
        bad = z.copy()
        bad[7, 0] = value
        with pytest.raises(ValueError, match=match):
            method().fit(bad, y)
    bad = z.copy()
    bad[7, y[7]] = -np.inf
    want = (rf"row 7 holds -inf \(a masked class\): {method.__name__} maps every class's logit"
            if method in MIXING else rf"row 7 masks its label \(class {y[7]} has logit -inf\)")
    with pytest.raises(ValueError, match=want):
        method().fit(bad, y)
    if method not in MIXING:
        bad = z.copy()
        bad[7] = -np.inf
        with pytest.raises(ValueError, match="row 7 has no finite logit"):
            method().fit(bad, y)
    else:
        fitted = method().fit(z, y)
        bad = z.copy()
        bad[3, 1] = -np.inf
        with pytest.raises(ValueError, match=r"row 3 holds -inf .* TemperatureScaler, VectorScaler"):
            fitted.transform(bad)


@pytest.mark.parametrize("method", SCALING, ids=lambda m: m.__name__)
def test_logits_on_a_tiny_scale_reach_t_min_and_say_a_smaller_bound_fits(method: type) -> None:
    """Logits times 1e-8 want T near 1e-8: both scalings stop at t_min, fall back and name a
    smaller bound (vector scaling stopped at T ~ 1 without a word: its gradient from T = 1 was
    1e-8); with that bound they fit, as well as the one temperature or better."""
    g = np.random.default_rng(4)
    y = g.integers(0, 4, 1000)
    z = g.normal(size=(1000, 4))
    z[np.arange(1000), y] += 1.5
    tiny = z * 1e-8
    with pytest.warns(cal.CalibrationWarning) as caught:
        fitted = method().fit(tiny, y)
    which = "it" if method is cal.TemperatureScaler else "classes 0, 1, 2, 3"
    assert fitted.fallback is not None and "lower bound t_min=0.01" in fitted.fallback
    assert any(f"a smaller bound fits {which} ({method.__name__}(t_min=0.001), or less" in str(w.message)
               for w in caught), [str(w.message) for w in caught]
    small = method(t_min=1e-12).fit(tiny, y)
    one = cal.TemperatureScaler(t_min=1e-12).fit(z, y)
    assert small.fallback is None
    t_small = np.atleast_1d(small.temperature).min()
    np.testing.assert_allclose(t_small, 1e-8 * float(one.temperature), rtol=0.5)
    nll_small = cal.nll(small.transform(tiny), y)
    assert nll_small <= cal.nll(one.transform(z), y) + 1e-9 and nll_small < 0.9 * np.log(4)


@pytest.mark.parametrize("method", SCALING, ids=lambda m: m.__name__)
@pytest.mark.parametrize("as_tensor", [False, True], ids=["numpy", "torch"])
def test_scaling_refuses_one_column_as_the_other_methods_do(method: type, as_tensor: bool) -> None:
    """(N, 1) logits are no classification: temperature scaling returned a column of ones and
    vector scaling spoke of "1 classes"; both now say what they need, as the other methods."""
    z, y = np.random.default_rng(0).normal(size=(200, 3)), np.arange(200) % 3
    fitted = method().fit(z, y)
    one = z[:, :1]
    need = r"logits must be 2-D \(N, C\) with C >= 2 classes, got shape \(200, 1\)"
    with pytest.raises(ValueError, match=need):
        fitted.transform(torch.from_numpy(one) if as_tensor else one)


@pytest.mark.parametrize("method", BINARY, ids=lambda m: m.__name__)
def test_two_column_probabilities_must_be_distributions(method: type) -> None:
    """(N, 2) probabilities are read by their column 1, so each row must be [1 - p, p]: a row
    [p, p] was taken silently (column 0 ignored); within the row-sum tolerance they fit as the
    (N,) probabilities of class 1 do."""
    rng = np.random.default_rng(0)
    p = rng.uniform(0.05, 0.95, 300)
    y = (rng.random(300) < p**1.5).astype(int)
    two = np.stack([1 - p, p], 1)
    got = method(from_logits=False).fit(two, y)
    want = method(from_logits=False).fit(p, y)
    np.testing.assert_allclose(got.coef, want.coef, rtol=1e-12)
    np.testing.assert_allclose(got.transform(two), want.transform(p), rtol=1e-12)
    bad = two.copy()
    bad[4] = [p[4], p[4]]
    with pytest.raises(ValueError, match=r"scores: row 4 of the \(N, 2\) probabilities sums to .*, not 1"):
        method(from_logits=False).fit(bad, y)
    with pytest.raises(ValueError, match="row 4 of the"):
        got.transform(bad)


def test_vector_scaling_with_an_absent_class_falls_back_without_fitting() -> None:
    """A class with no validation sample makes vector scaling fall back whatever the fit, so
    none is run (a vocabulary's classes took minutes, then were thrown away); kept with
    fallback_to_identity=False, it is fitted."""
    x, y = multiclass(300, 4, seed=3)
    keep = y != 2
    with pytest.warns(cal.CalibrationWarning, match=r"class 2 \(1 of 4 classes\) has no validation sample"):
        fell = cal.VectorScaler().fit(x[keep], y[keep])
    assert fell.fallback is not None and fell.n_iter_ == 0
    np.testing.assert_array_equal(fell.temperature, np.ones(4))
    with pytest.warns(cal.CalibrationWarning, match="keeping the fit"):
        kept = cal.VectorScaler(fallback_to_identity=False).fit(x[keep], y[keep])
    assert kept.n_iter_ > 0 and kept.bias is not None and kept.bias[2] < -1.0
    bad = x[keep].copy()
    bad[5, 1] = np.nan  # checked though no fit runs
    with pytest.raises(ValueError, match="logits: row 5 contains NaN or infinite values"):
        cal.VectorScaler().fit(bad, y[keep])


@pytest.mark.parametrize("method", MIXING, ids=lambda m: m.__name__)
def test_matrix_scaling_refuses_a_vocabulary_before_allocating_it(method: type) -> None:
    """C (C + 1) parameters for 32,000 classes asked for 8 GB matrices; beyond
    MAX_MATRIX_CLASSES the fit is refused by name, pointing at the scalings that fit a
    vocabulary."""
    k = recalibration.MAX_MATRIX_CLASSES + 1
    x = np.random.default_rng(0).normal(size=(4, k))
    with pytest.raises(ValueError, match=rf"C = {k} classes, .* GiB .* TemperatureScaler or VectorScaler"):
        method().fit(x, np.arange(4))


def test_isotonic_transforms_chunks_of_512_rows_at_least(monkeypatch: pytest.MonkeyPatch) -> None:
    """Isotonic regression interpolates each class's knots in a Python loop per chunk: at many
    classes a chunk of 2^20 entries holds few rows, so its chunks hold 512 rows at least (at
    32,000 classes, 32 rows a chunk made 5 million calls for 2,540 rows); the other maps take
    chunks of the entries' size."""
    z, y = multiclass(1200, 5, seed=3)
    c = cal.IsotonicCalibrator().fit(z[:600], y[:600])
    whole = c.transform(z)
    seen: list[int] = []
    probs = cal.IsotonicCalibrator._probs64

    def counted(self: Any, block: torch.Tensor) -> np.ndarray:
        seen.append(block.shape[0])
        return probs(self, block)

    monkeypatch.setattr(cal.IsotonicCalibrator, "_probs64", counted)
    from crossent.calibration import _inputs

    monkeypatch.setattr(_inputs, "CHUNK_ELEMENTS", 40)
    np.testing.assert_array_equal(c.transform(z), whole)
    assert seen == [512, 512, 176]


def test_isotonic_fits_only_the_classes_whose_map_is_not_the_identity(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Classes with no validation sample (most of a vocabulary's) or a separated one-vs-rest
    problem get the identity map whatever their fit: they are not fitted, and every class's
    knots are those of fitting all and replacing theirs."""
    iso = pytest.importorskip("sklearn.isotonic")
    rng = np.random.default_rng(4)
    z = rng.normal(size=(300, 40)) * 2
    y = rng.integers(0, 8, 300)  # classes 8-39 absent
    z[np.arange(300), y] += 1.0
    z[y == 3, 3] += 30.0  # class 3 separated
    calls: list[int] = []
    fit = iso.IsotonicRegression.fit

    def counted(self: Any, x: Any, target: Any, *args: Any, **kw: Any) -> Any:
        calls.append(int(np.asarray(target).sum()))
        return fit(self, x, target, *args, **kw)

    monkeypatch.setattr(iso.IsotonicRegression, "fit", counted)
    with pytest.warns(cal.CalibrationWarning, match="no validation sample"):
        c = cal.IsotonicCalibrator().fit(z, y)
    assert c.identity_classes == [3, *range(8, 40)]
    assert len(calls) == 7
    p = torch.softmax(torch.from_numpy(z), 1).numpy()
    for k, (x, v) in enumerate(c.knots):
        if k in c.identity_classes:
            want_x, want_v = np.array([0.0, 1.0]), np.array([0.0, 1.0])
        else:
            reg = iso.IsotonicRegression(y_min=0.0, y_max=1.0, increasing=True, out_of_bounds="clip")
            fit(reg, p[:, k], (y == k).astype(np.float64))
            want_x, want_v = reg.X_thresholds_, reg.y_thresholds_
        np.testing.assert_array_equal(x, want_x)
        np.testing.assert_array_equal(v, want_v)
