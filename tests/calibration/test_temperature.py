"""Temperature and vector scaling: recovery of a known T, dense-grid optimality, robustness."""

from __future__ import annotations

import math
import warnings
from typing import Any

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import crossent.calibration._inputs as inputs
from crossent import calibration as cal
from crossent.calibration import TemperatureScaler, accuracy, ece, nll


def calibrated_logits(n: int, c: int, seed: int, scale: float = 2.0) -> tuple[np.ndarray, ...]:
    """Logits z and labels drawn from softmax(z): calibrated by construction."""
    rng = np.random.default_rng(seed)
    z = rng.normal(size=(n, c)) * scale
    p = torch.softmax(torch.from_numpy(z), 1).numpy()
    y = (p.cumsum(1) > rng.random((n, 1))).argmax(1)
    y = np.minimum(y, c - 1)
    return z, y


def grid_nll(z: np.ndarray, y: np.ndarray, temps: np.ndarray) -> np.ndarray:
    zt = torch.from_numpy(z)[None] / torch.from_numpy(temps)[:, None, None]
    lse = torch.logsumexp(zt, dim=2)
    zy = zt[:, torch.arange(len(y)), torch.from_numpy(y)]
    return (lse - zy).mean(1).numpy()


@pytest.mark.parametrize("t_true", [0.5, 1.7, 4.0])
def test_recovers_known_temperature(t_true: float) -> None:
    z, y = calibrated_logits(40000, 10, seed=1)
    scaler = TemperatureScaler().fit(z * t_true, y)
    assert scaler.temperature == pytest.approx(t_true, rel=0.02)
    assert isinstance(scaler.temperature, float)
    assert scaler.n_iter_ <= 12  # Newton: a handful of passes


def test_float32_input_matches_float64() -> None:
    z, y = calibrated_logits(5000, 8, seed=2)
    t64 = TemperatureScaler().fit(z * 2.5, y).temperature
    t32 = TemperatureScaler().fit((z * 2.5).astype(np.float32), y).temperature
    tt = TemperatureScaler().fit(torch.from_numpy(z * 2.5).float(), torch.from_numpy(y)).temperature
    assert t32 == pytest.approx(t64, rel=1e-4)
    assert tt == pytest.approx(t64, rel=1e-4)


def test_matches_dense_grid_minimum() -> None:
    rng = np.random.default_rng(3)
    z = rng.normal(size=(500, 5)) * 3
    y = rng.integers(0, 5, 500)
    y[:200] = z[:200].argmax(1)  # partly informative logits
    scaler = TemperatureScaler().fit(z, y)
    log_grid = np.linspace(math.log(1e-2), math.log(1e2), 4001)
    values = grid_nll(z, y, np.exp(log_grid))
    best = int(np.argmin(values))
    assert abs(math.log(scaler.temperature) - log_grid[best]) <= log_grid[1] - log_grid[0]
    fitted = float(grid_nll(z, y, np.array([scaler.temperature]))[0])
    assert fitted <= values[best] + 1e-12
    assert fitted == pytest.approx(nll(scaler.transform_logits(z), y, from_logits=True), rel=1e-12)


@pytest.mark.parametrize("t_true", [0.3, 3.0])
def test_converges_from_any_start(t_true: float) -> None:
    z, y = calibrated_logits(3000, 6, seed=4)
    fits = [
        TemperatureScaler().fit(z * t_true, y, init_temperature=t0).temperature
        for t0 in (0.01, 0.05, 1.0, 20.0, 100.0, 1e6)
    ]
    np.testing.assert_allclose(fits, fits[2], rtol=1e-7)


def raw(**kwargs: float) -> TemperatureScaler:
    """The bare fit: degenerate cases keep their bound instead of falling back to T = 1."""
    return TemperatureScaler(fallback_to_identity=False, **kwargs)  # type: ignore[arg-type]


@pytest.mark.filterwarnings("ignore::crossent.calibration.CalibrationWarning")
def test_bounds_hold_on_degenerate_data() -> None:
    # separable with a margin: the NLL keeps falling as T -> 0, so T = t_min
    z = np.array([[5.0, 0.0], [0.0, 5.0], [4.0, -1.0]])
    assert raw().fit(z, [0, 1, 0]).temperature == pytest.approx(1e-2)
    assert raw().fit(z, [0, 1, 0]).diagnostic_kind == "separable"
    # always confidently wrong: the NLL falls as T -> inf, so T = t_max
    wrong = raw().fit(z, [1, 0, 1])
    assert wrong.temperature == pytest.approx(1e2)
    assert wrong.diagnostic_kind == "bound" and "t_max" in str(wrong.diagnostic)
    # constant logits: the NLL does not depend on T; T stays where it starts
    flat = np.zeros((4, 3))
    assert raw().fit(flat, [0, 1, 2, 0]).temperature == 1.0
    custom = raw(t_min=0.5, t_max=2.0).fit(z, [0, 1, 0])
    assert custom.temperature == pytest.approx(0.5)
    single = raw().fit(np.array([[1.0, 0.0]]), [1])
    assert single.temperature == pytest.approx(100.0)


@pytest.mark.filterwarnings("ignore::crossent.calibration.CalibrationWarning")
@settings(max_examples=30, deadline=None)
@given(
    st.integers(1, 30),
    st.integers(2, 5),
    st.floats(0.01, 50.0),
    st.floats(1e-3, 1e3),
    st.integers(0, 2**31 - 1),
)
def test_temperature_always_positive_and_bounded(
    n: int, c: int, scale: float, init: float, seed: int
) -> None:
    rng = np.random.default_rng(seed)
    z = rng.normal(size=(n, c)) * scale
    y = rng.integers(0, c, n)
    t = raw().fit(z, y, init_temperature=init).temperature
    assert 1e-2 <= t <= 1e2
    grid = np.exp(np.linspace(math.log(1e-2), math.log(1e2), 801))
    values = grid_nll(z, y, grid)
    assert float(grid_nll(z, y, np.array([t]))[0]) <= values.min() + 1e-9


def test_accuracy_unchanged_and_types_preserved() -> None:
    z, y = calibrated_logits(2000, 7, seed=5)
    scaler = TemperatureScaler().fit(z * 3, y)
    out = scaler.transform_logits((z * 3).astype(np.float32))
    assert isinstance(out, np.ndarray) and out.dtype == np.float32
    assert accuracy(out, y, from_logits=True) == accuracy(z * 3, y, from_logits=True)
    np.testing.assert_array_equal(out.argmax(1), (z * 3).argmax(1))
    zt = torch.from_numpy(z * 3).float().requires_grad_()
    outt = scaler.transform_logits(zt)
    assert isinstance(outt, torch.Tensor) and outt.dtype == torch.float32
    outt.sum().backward()
    assert zt.grad is not None
    probs = scaler.predict_proba(z * 3)
    np.testing.assert_allclose(probs.sum(1), 1.0, rtol=1e-12)
    np.testing.assert_allclose(
        probs, torch.softmax(torch.from_numpy(z * 3 / scaler.temperature), 1).numpy(), rtol=1e-10
    )
    assert nll(probs, y) < nll(z * 3, y, from_logits=True)
    assert ece(probs, y) < ece(z * 3, y, from_logits=True)


def test_ece_objective() -> None:
    z, y = calibrated_logits(4000, 5, seed=6)
    scaler = TemperatureScaler().fit(z * 2, y, objective="ece", n_bins=15)
    t = scaler.temperature
    got = ece(scaler.transform_logits(z * 2), y, from_logits=True)
    grid = np.exp(np.linspace(math.log(1e-2), math.log(1e2), 33))
    grid_best = min(ece(z * 2 / g, y, from_logits=True) for g in grid)
    assert got <= grid_best + 1e-12
    assert t == pytest.approx(2.0, rel=0.1)
    assert got <= ece(z * 2 / TemperatureScaler().fit(z * 2, y).temperature, y, from_logits=True)


def test_vector_scaling() -> None:
    z, y = calibrated_logits(6000, 4, seed=7)
    t_true = np.array([0.7, 1.0, 2.0, 3.0])
    b_true = np.array([0.3, -0.2, 0.1, -0.2])
    observed = (z - b_true) * t_true  # so that observed / t_true + b_true = z
    scaler = TemperatureScaler(method="vector").fit(observed, y)
    assert isinstance(scaler.temperature, np.ndarray) and scaler.temperature.shape == (4,)
    assert scaler.bias is not None and abs(scaler.bias.mean()) < 1e-12
    np.testing.assert_allclose(scaler.temperature, t_true, rtol=0.1)
    np.testing.assert_allclose(scaler.bias, b_true - b_true.mean(), atol=0.1)
    scalar = TemperatureScaler().fit(observed, y)
    assert nll(scaler.transform_logits(observed), y, from_logits=True) < nll(
        scalar.transform_logits(observed), y, from_logits=True
    )
    assert np.all(scaler.temperature > 0)
    out = scaler.transform_logits(torch.from_numpy(observed))
    assert isinstance(out, torch.Tensor)
    with pytest.raises(ValueError, match="classes"):
        scaler.transform_logits(observed[:, :3])
    with pytest.raises(ValueError, match="objective='nll'"):
        TemperatureScaler(method="vector").fit(observed, y, objective="ece")


@pytest.mark.parametrize("objective", ["nll", "ece"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_native_and_torch_paths_fit_the_same_temperature(objective: str, dtype: torch.dtype) -> None:
    """The fit's passes (row_statistics with an inverse temperature and moments) on the native
    kernel and on torch ops."""
    from crossent.backends import native

    if not native.available():
        pytest.skip("the native kernels are not built on this machine")
    z, y = calibrated_logits(3000, 20, seed=9)
    x = torch.from_numpy(z * 2.5).to(dtype)
    got = TemperatureScaler().fit(x, y, objective=objective)  # type: ignore[arg-type]
    with native.disabled():
        want = TemperatureScaler().fit(x, y, objective=objective)  # type: ignore[arg-type]
    rel = 1e-9 if dtype == torch.float64 else 1e-4
    assert got.temperature == pytest.approx(want.temperature, rel=rel)
    assert got.temperature == pytest.approx(2.5, rel=0.1)


def test_chunked_fit_matches(monkeypatch: pytest.MonkeyPatch) -> None:
    z, y = calibrated_logits(600, 5, seed=8)
    ref = TemperatureScaler().fit(z * 2, y).temperature
    monkeypatch.setattr(inputs, "CHUNK_ELEMENTS", 64)
    assert TemperatureScaler().fit(z * 2, y).temperature == pytest.approx(ref, rel=1e-12)


def test_errors() -> None:
    with pytest.raises(RuntimeError, match="not fitted"):
        _ = TemperatureScaler().temperature
    with pytest.raises(ValueError, match="method"):
        TemperatureScaler(method="matrix")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="t_min"):
        TemperatureScaler(t_min=0.0)
    z = np.zeros((3, 2))
    with pytest.raises(ValueError, match="objective"):
        TemperatureScaler().fit(z, [0, 1, 0], objective="brier")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="init_temperature"):
        TemperatureScaler().fit(z, [0, 1, 0], init_temperature=-1.0)
    with pytest.raises(ValueError, match="row 1 contains NaN"):
        TemperatureScaler().fit(np.array([[0.0, 1.0], [np.nan, 0.0]]), [0, 1])
    with pytest.raises(ValueError, match="labels"):
        TemperatureScaler().fit(z, [0, 1])
    assert "temperature=" in repr(TemperatureScaler().fit(z, [0, 1, 0]))


@pytest.mark.parametrize("path", ["native", "torch"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("separable", [False, True])
@pytest.mark.parametrize("t", [1.7, 1.00001])
def test_guard_measures_float64_nlls_on_either_path(
    path: str, dtype: torch.dtype, separable: bool, t: float, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The guard's two mean NLLs (identity, fitted T) and its separability test equal
    log_softmax in float64: to 1e-12 from float64 rows (passes over float64 chunks), and from
    float32 or bfloat16 rows to their passes' round-off (GUARD_MARGIN / 5) where the two NLLs
    differ by more than GUARD_MARGIN (T = 1.7: two passes over the rows as they are), to 1e-12
    where they are closer (T = 1.00001, or separable rows whose NLLs are both near 0: taken
    again over float64 chunks)."""
    import contextlib

    from crossent.backends import native
    from crossent.calibration import temperature

    if path == "native" and not native.available():
        pytest.skip("the native kernels are not built on this machine")
    z, y = calibrated_logits(500, 7, seed=3)
    if separable:
        z[np.arange(500), y] += 50.0
    x = torch.from_numpy(z * 2.5).to(dtype)
    seen: dict[str, object] = {}
    passes: list[torch.dtype] = []

    def capture(nll_id: float, nll_fit: float, n: int, **kw: object) -> None:
        seen.update(nll_id=nll_id, nll_fit=nll_fit, n=n, **kw)

    def counted(rows: torch.Tensor, *args: Any, **kw: Any) -> Any:
        passes.append(rows.dtype)
        return real(rows, *args, **kw)

    real = temperature.row_statistics
    scaler = TemperatureScaler()
    scaler._set_params({"temperature": t})
    monkeypatch.setattr(scaler, "_guard", capture)
    monkeypatch.setattr(temperature, "row_statistics", counted)
    monkeypatch.setattr(inputs, "CHUNK_ELEMENTS", 700)  # several chunks
    with native.disabled() if path == "torch" else contextlib.nullcontext():
        scaler._check_fit(x, y)
    x64 = x.to(torch.float64)
    yt = torch.from_numpy(y)[:, None]
    want = {key: float(-torch.log_softmax(x64 / s, 1).gather(1, yt).mean())
            for key, s in (("nll_id", 1.0), ("nll_fit", t))}
    close = abs(want["nll_fit"] - want["nll_id"]) <= temperature.GUARD_MARGIN * max(1.0, abs(want["nll_id"]))
    assert close is (separable or t != 1.7)
    chunks = [torch.float64] * 2 * 5  # 100 rows a chunk
    assert passes == (chunks if dtype == torch.float64 else [dtype] * 2 + (chunks if close else []))
    rel = 1e-12 if dtype == torch.float64 or close else temperature.GUARD_MARGIN / 5
    for key in want:
        assert seen[key] == pytest.approx(want[key], rel=rel, abs=1e-15)
    assert seen["separable"] is bool((x64.argmax(1) == yt[:, 0]).all())
    assert seen["separable"] is separable and seen["n"] == 500


def test_running_out_of_steps_warns() -> None:
    """A fit stopped by max_iter before the NLL's derivative vanished says so; the default
    converges on the same data without a warning."""
    rng = np.random.default_rng(13)
    z = rng.normal(size=(500, 5)) * 6
    p = torch.softmax(torch.from_numpy(z / 3), 1).numpy()
    y = (p.cumsum(1) > rng.random((500, 1))).argmax(1)
    with pytest.warns(cal.CalibrationWarning, match="max_iter=2 steps without converging"):
        cal.TemperatureScaler(max_iter=2).fit(z, y)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        c = cal.TemperatureScaler().fit(z, y)
    assert c.n_iter_ < c.max_iter and abs(c.temperature - 3.0) < 0.5


@pytest.mark.parametrize("method", ["temperature", "vector"])
@pytest.mark.parametrize(
    "bad",
    ["complex tensor", "bool tensor", "complex array", "string array"],
)
def test_transform_refuses_what_is_not_real_numbers(method: str, bad: str) -> None:
    """A fitted scaler's transform takes real logits as the fit and the metrics do: complex
    logits lost their imaginary part in a cast (with only the cast's warning) and bools became
    0/1 logits; both are refused, naming ``logits``. Integer logits are numbers, and work."""
    z, y = calibrated_logits(300, 3, seed=2)
    scaler = TemperatureScaler(method=method).fit(z * 2, y)  # type: ignore[arg-type]
    x: Any = {
        "complex tensor": torch.from_numpy(z).to(torch.complex64),
        "bool tensor": torch.from_numpy(z > 0),
        "complex array": z.astype(np.complex128),
        "string array": z.astype(str),
    }[bad]
    for call in (scaler.transform_logits, scaler.transform):
        with pytest.raises(TypeError, match="logits must"):
            call(x)
    ints = torch.from_numpy(np.round(z * 3).astype(np.int64))
    np.testing.assert_allclose(scaler.transform_logits(ints).numpy(),
                               scaler.transform_logits(ints.double()).numpy(), rtol=1e-6)


@pytest.mark.parametrize("seed", [20, 24])
def test_the_ece_objective_finds_the_lowest_ece_near_its_optimum(seed: int) -> None:
    """The ECE is a step-like function of T, where a local search can stop in a dip beside a
    lower one (seed 24: 0.0443 where T = 1.062 gives 0.0373). The fit's dense final scan finds
    the lowest validation ECE of a fine grid within 50 % of its T, to 1e-3."""
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(400, 10, generator=g)
    y = torch.randint(0, 10, (400,), generator=g)
    z[torch.arange(400), y] += 2.0
    z = (z * 2.0).double()
    t = float(cal.TemperatureScaler(fallback_to_identity=False).fit(z, y, objective="ece").temperature)
    grid = np.exp(np.linspace(math.log(t / 1.5), math.log(t * 1.5), 801))
    lowest = min(cal.ece(z / s, y, from_logits=True) for s in grid)
    assert cal.ece(z / t, y, from_logits=True) <= lowest + 1e-3


SCAN_DATA = [(1.0, 10, False), (5.0, 100, False), (30.0, 10, False), (5.0, 50, True)]


@pytest.mark.parametrize("n_bins", [5, 15])
@pytest.mark.parametrize("t_centre", [0.3, 2.5, 40.0])
@pytest.mark.parametrize(("scale", "classes", "masked"), SCAN_DATA)
def test_the_ece_scan_interpolates_the_passes_it_replaces(
    scale: float, classes: int, masked: bool, t_centre: float, n_bins: int
) -> None:
    """The ECE objective's final scan takes the confidences at its 257 temperatures from a
    Chebyshev interpolant in log T of 17 exact passes: on float64 logits every scan point's
    ECE equals that of its own pass to 1e-13, masked classes (-inf) included."""
    from crossent.calibration import temperature as tm
    from crossent.calibration.metrics import table_from_scores

    g = torch.Generator().manual_seed(classes + int(scale))
    z = torch.randn(600, classes, generator=g, dtype=torch.float64) * scale
    if masked:
        z[torch.rand(600, classes, generator=g) < 0.3] = -math.inf
        z[:, 0] = torch.randn(600, generator=g, dtype=torch.float64)
    y = torch.multinomial(torch.softmax(z / 2.5, 1), 1, generator=g)[:, 0].numpy()
    correct = (z.argmax(1).numpy() == y).astype(np.float64)
    centre = math.log(t_centre)
    half = tm.ECE_SCAN_HALF_WIDTH
    xs = sorted({float(x) for x in np.linspace(centre - half, centre + half, tm.ECE_SCAN_POINTS)})
    seen: dict[float, float] = {}
    assert tm._scan_ece(z, y, correct, xs, n_bins, seen) == tm.ECE_SCAN_NODES
    assert sorted(seen) == xs
    for x in xs[::8]:
        conf = tm._top_conf_at(z, y, math.exp(x))
        want = table_from_scores(conf, correct, n_bins=n_bins).calibration_error("l1")
        assert seen[x] == pytest.approx(want, rel=0, abs=1e-13), x


def test_an_ece_scan_of_one_temperature_takes_one_pass() -> None:
    """A scan whose points all clip to one bound of T (the best point found at t_min) takes that
    temperature's one pass."""
    from crossent.calibration import temperature as tm
    from crossent.calibration.metrics import table_from_scores

    z, y = calibrated_logits(300, 4, seed=2)
    zt = torch.from_numpy(z)
    correct = (z.argmax(1) == y).astype(np.float64)
    seen: dict[float, float] = {}
    x = math.log(0.01)
    assert tm._scan_ece(zt, y, correct, [x], 15, seen) == 1
    want = table_from_scores(tm._top_conf_at(zt, y, 0.01), correct, n_bins=15).calibration_error("l1")
    assert seen == {x: want}


def test_the_ece_objective_takes_about_a_third_of_the_passes() -> None:
    """The fit with the ECE objective makes its coarse, fine and golden-section passes, the NLL
    fit's and the scan's 17 (332 passes before the scan was interpolated), and finds the same
    temperature as a scan of a pass per point would (the lowest of the tried ECEs)."""
    from crossent.calibration import temperature as tm

    z, y = calibrated_logits(3000, 6, seed=9)
    scaler = TemperatureScaler().fit(z * 2, y, objective="ece")
    assert scaler.n_iter_ < 33 + 17 + 60 + tm.ECE_SCAN_NODES
    t = float(scaler.temperature)
    zt = torch.from_numpy(z * 2)
    grid = np.linspace(math.log(t) - 0.05, math.log(t) + 0.05, 41)
    best = min(ece(zt / math.exp(x), y, from_logits=True) for x in grid)
    assert ece(zt / t, y, from_logits=True) <= best + 1e-12
