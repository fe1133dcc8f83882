"""Calibration metrics: hand-computed cases, bin edges, parity with torchmetrics/sklearn."""

from __future__ import annotations

import math
import re
import warnings
from typing import Any

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import crossent.calibration._inputs as inputs
from crossent import calibration
from crossent.calibration import accuracy, brier, classwise_ece, ece, nll, reliability_table, smooth_ece
from crossent.calibration.metrics import (
    smooth_ece_from_scores,
    table_from_scores,
    width_bin_index,
)


def top_rows(conf: list[float], n_classes: int = 5) -> np.ndarray:
    """Probability rows whose top class is 0 with the given confidence (ties go to 0)."""
    c = np.asarray(conf, dtype=np.float64)[:, None]
    rest = np.repeat((1.0 - c) / (n_classes - 1), n_classes - 1, axis=1)
    return np.concatenate([c, rest], axis=1)


def labels_for(correct: list[int]) -> np.ndarray:
    return np.where(np.asarray(correct) == 1, 0, 1)


def random_probs(n: int, c: int, seed: int = 0, scale: float = 2.0) -> tuple[np.ndarray, ...]:
    rng = np.random.default_rng(seed)
    z = rng.normal(size=(n, c)) * scale
    p = torch.softmax(torch.from_numpy(z), 1).numpy()
    y = rng.integers(0, c, size=n)
    return z, p, y


# ---------------------------------------------------------------- hand-computed ECE
def test_ece_width_bins_hand_computed_edges_and_one() -> None:
    # M = 5: 0.2 and 0.4 lie on edges and belong to the bins they close ((m-1)/M, m/M];
    # 1.0 goes to the last bin.
    probs = top_rows([0.2, 0.4, 0.5, 1.0])
    labels = labels_for([1, 0, 1, 1])
    table = reliability_table(probs, labels, n_bins=5)
    assert table.count.tolist() == [1, 1, 1, 0, 1]
    expected = (abs(0.2 - 1) + abs(0.4 - 0) + abs(0.5 - 1) + 0.0) / 4
    assert ece(probs, labels, n_bins=5) == pytest.approx(expected, abs=1e-15)  # 0.425
    # with [lo, hi) bins it would have been 0.225: the convention matters
    assert ece(probs, labels, n_bins=5, norm="max") == pytest.approx(0.8)
    l2 = math.sqrt((0.8**2 + 0.4**2 + 0.5**2) / 4)
    assert ece(probs, labels, n_bins=5, norm="l2") == pytest.approx(l2)


def test_zero_confidence_goes_to_first_bin() -> None:
    idx = width_bin_index(np.array([0.0, 1e-12, 0.2, 0.2000001, 1.0]), 5)
    assert idx.tolist() == [0, 0, 0, 1, 4]
    table = table_from_scores(np.array([0.0, 0.1]), np.array([0.0, 0.0]), n_bins=5)
    assert table.count.tolist() == [2, 0, 0, 0, 0]
    assert table.calibration_error() == pytest.approx(0.05)


def test_every_edge_lands_in_the_bin_it_closes() -> None:
    m = 15
    edges = np.arange(m + 1) / m
    idx = width_bin_index(edges, m)
    assert idx.tolist() == [0, *range(m)]


@pytest.mark.parametrize("m", [1, 2, 3, 5, 7, 10, 13, 15, 20, 49, 100, 1000])
def test_width_bin_index_is_the_search_it_replaces(m: int) -> None:
    """Every edge, its float64 and float32 neighbours, out-of-range, infinite, NaN and random
    values, in (n,) and (n, k) shapes: the same bin as np.searchsorted on the inner edges."""
    rng = np.random.default_rng(m)
    edges = np.arange(m + 1) / m
    e32 = edges.astype(np.float32)
    values = np.concatenate([
        edges, np.nextafter(edges, -np.inf), np.nextafter(edges, np.inf),
        e32, np.nextafter(e32, np.float32(2)), np.nextafter(e32, np.float32(-1)),
        [np.nan, np.inf, -np.inf, -1.0, 2.0, -0.0, 5e-324, 1e300, -1e300],
        rng.random(5000), rng.random(1000) ** 20,
    ]).astype(np.float64)
    rng.shuffle(values)
    want = np.searchsorted(edges[1:-1], values, side="left")
    got = width_bin_index(values, m)
    assert got.dtype == np.intp and np.array_equal(got, want)
    assert values.size >= 2048  # the arithmetic bins (smaller inputs take the search itself)
    square = values[: values.shape[0] // 4 * 4].reshape(-1, 4)
    assert np.array_equal(width_bin_index(square, m), np.searchsorted(edges[1:-1], square, side="left"))
    small = values[:100]
    assert np.array_equal(width_bin_index(small, m), np.searchsorted(edges[1:-1], small, side="left"))


def test_all_in_one_bin_and_single_sample() -> None:
    probs = top_rows([0.91, 0.92, 0.93, 0.94])
    labels = labels_for([1, 1, 0, 1])
    gap = abs(np.mean([0.91, 0.92, 0.93, 0.94]) - 0.75)
    for norm in ("l1", "l2", "max"):
        assert ece(probs, labels, n_bins=10, norm=norm) == pytest.approx(gap)
    one = top_rows([0.7])
    assert ece(one, [0]) == pytest.approx(0.3)
    assert ece(one, [1]) == pytest.approx(0.7)
    assert ece(one, [1], binning="mass") == pytest.approx(0.7)  # 14 of 15 mass bins empty
    table = reliability_table(one, [0], binning="mass")
    assert int(table.count.sum()) == 1 and int((table.count > 0).sum()) == 1


def test_adaece_hand_computed() -> None:
    conf = [0.9, 0.55, 0.7, 0.6]
    probs = np.stack([conf, 1 - np.asarray(conf)], axis=1)
    labels = np.array([0, 1, 0, 0])  # correct: 0.9 yes, 0.55 no, 0.7 yes, 0.6 yes
    # sorted: (0.55, 0), (0.6, 1) | (0.7, 1), (0.9, 1)
    expected = 0.5 * abs(0.575 - 0.5) + 0.5 * abs(0.8 - 1.0)
    assert ece(probs, labels, n_bins=2, binning="mass") == pytest.approx(expected)
    table = reliability_table(probs, labels, n_bins=2, binning="mass")
    assert table.lower.tolist() == [0.55, 0.7] and table.upper.tolist() == [0.6, 0.9]
    assert table.count.tolist() == [2, 2]


def test_mass_bins_are_equal_count() -> None:
    _, p, y = random_probs(1003, 4, seed=3)
    table = reliability_table(p, y, binning="mass", n_bins=10)
    assert table.count.max() - table.count.min() <= 1
    assert table.count.sum() == 1003
    assert np.all(np.diff(table.lower) >= 0)


def test_reliability_table_fields() -> None:
    probs = top_rows([0.2, 0.4, 0.5, 1.0])
    table = reliability_table(probs, labels_for([1, 0, 1, 1]), n_bins=5)
    assert isinstance(table, calibration.ReliabilityTable)
    assert table.n_bins == 5 and table.n_samples == 4
    np.testing.assert_allclose(table.lower, [0, 0.2, 0.4, 0.6, 0.8])
    np.testing.assert_allclose(table.upper, [0.2, 0.4, 0.6, 0.8, 1.0])
    assert math.isnan(table.confidence[3]) and math.isnan(table.gap[3])
    np.testing.assert_allclose(table.gap[[0, 1, 2, 4]], [0.2 - 1, 0.4, 0.5 - 1, 0.0])
    rows = table.to_rows()
    assert rows[3]["count"] == 0 and rows[3]["accuracy"] is None
    assert rows[1] == pytest.approx(
        {"lower": 0.2, "upper": 0.4, "count": 1, "confidence": 0.4, "accuracy": 0.0, "gap": 0.4}
    )


# ---------------------------------------------------------------- classwise
def test_classwise_ece_hand_computed_with_absent_class_and_zero_one() -> None:
    probs = np.array([[1.0, 0.0, 0.0], [0.5, 0.5, 0.0], [0.0, 0.25, 0.75]])
    labels = np.array([0, 1, 1])  # class 2 never occurs
    # M = 2: class 0 -> 0.5/3, class 1 -> 1.25/3, class 2 -> 0.75/3; averaged over K = 3.
    expected = (0.5 + 1.25 + 0.75) / 9
    assert classwise_ece(probs, labels, n_bins=2) == pytest.approx(expected)
    assert classwise_ece(probs, labels, n_bins=2, num_classes=3) == pytest.approx(expected)
    assert expected != pytest.approx((0.5 + 1.25) / 6)  # what max(label)+1 would give
    with pytest.raises(ValueError, match="num_classes"):
        classwise_ece(probs, labels, num_classes=2)


def test_classwise_ece_matches_per_class_binary_ece() -> None:
    _, p, y = random_probs(400, 4, seed=1)
    per_class = []
    for k in range(4):
        table = table_from_scores(p[:, k], (y == k).astype(float), n_bins=10)
        per_class.append(table.calibration_error())
    assert classwise_ece(p, y, n_bins=10) == pytest.approx(np.mean(per_class), abs=1e-12)


# ---------------------------------------------------------------- debiased, smooth
def test_debiased_l2_ece_hand_computed() -> None:
    probs = top_rows([0.8, 0.8, 0.8, 0.8])
    labels = labels_for([1, 1, 1, 0])
    est = 0.05**2 - 0.75 * 0.25 / 3
    assert calibration.debiased_l2_ece(probs, labels, n_bins=1, squared=True) == pytest.approx(est)
    assert calibration.debiased_l2_ece(probs, labels, n_bins=1) == 0.0  # sqrt(max(est, 0))
    wrong = top_rows([0.9, 0.9])
    assert calibration.debiased_l2_ece(wrong, [1, 1], n_bins=1) == pytest.approx(0.9)


def test_debiased_l2_below_plugin_and_close_for_large_n() -> None:
    _, p, _ = random_probs(20000, 5, seed=2)
    rng = np.random.default_rng(7)
    y = (p.cumsum(1) > rng.random((20000, 1))).argmax(1)  # calibrated labels
    plug = ece(p, y, binning="mass", norm="l2")
    deb = calibration.debiased_l2_ece(p, y)
    assert deb <= plug
    assert deb < 0.01 < plug + 0.01


def test_smooth_ece_constant_sign_residual_is_mean_residual() -> None:
    probs = np.array([[0.8, 0.2]] * 5)
    value, sigma = smooth_ece_from_scores(np.full(5, 0.8), np.ones(5))
    assert value == pytest.approx(0.2, abs=1e-6)
    assert sigma == pytest.approx(0.2, abs=1e-6)  # the fixed point
    assert smooth_ece(probs, [0] * 5) == pytest.approx(0.2, abs=1e-6)
    assert smooth_ece(probs, [0] * 5, sigma=0.05) == pytest.approx(0.2, abs=1e-9)


def test_smooth_ece_cancelling_residuals_and_single_sample() -> None:
    probs = np.array([[0.5, 0.5], [0.5, 0.5]])
    assert smooth_ece(probs, [0, 1]) == pytest.approx(0.0, abs=1e-9)
    assert smooth_ece(np.array([[0.3, 0.7]]), [0]) == pytest.approx(0.7, abs=1e-6)
    assert smooth_ece(np.array([[1.0, 0.0]]), [0]) == pytest.approx(0.0, abs=1e-9)


def brute_force_smece(f: np.ndarray, y: np.ndarray, sigma: float) -> float:
    t = np.linspace(0, 1, 20001)[:, None]
    ks = np.arange(-5, 6)[None, None, :] * 2.0
    phi = lambda d: np.exp(-0.5 * (d / sigma) ** 2) / (sigma * math.sqrt(2 * math.pi))  # noqa: E731
    kern = phi(t[..., None] - f[None, :, None] - ks) + phi(t[..., None] + f[None, :, None] - ks)
    integrand = np.abs((kern.sum(-1) * (y - f)[None, :]).mean(1))
    return float(np.trapezoid(integrand, t[:, 0]))


@pytest.mark.parametrize("sigma", [0.04, 0.15, 0.6])
def test_smooth_ece_matches_quadrature_of_the_definition(sigma: float) -> None:
    rng = np.random.default_rng(5)
    f = np.concatenate([rng.uniform(0.3, 1.0, 60), [0.0, 1.0]])
    y = (rng.random(62) < f**1.5).astype(float)
    got = smooth_ece_from_scores(f, y, sigma)[0]
    assert got == pytest.approx(brute_force_smece(f, y, sigma), rel=2e-3, abs=1e-5)


def test_smooth_ece_fixed_point_and_scale() -> None:
    _, p, y = random_probs(3000, 6, seed=4, scale=3.0)
    conf = p.max(1)
    correct = (p.argmax(1) == y).astype(float)
    value, sigma = smooth_ece_from_scores(conf, correct)
    assert value == pytest.approx(sigma, abs=1e-6)
    assert value == pytest.approx(smooth_ece(p, y), abs=1e-12)
    # a badly miscalibrated model: smooth ECE is close to the binned ECE
    assert abs(value - ece(p, y)) < 0.05


# ---------------------------------------------------------------- brier, nll, accuracy
def test_brier_nll_accuracy_hand_computed() -> None:
    p = np.array([[0.7, 0.2, 0.1], [0.1, 0.8, 0.1]])
    y = np.array([0, 2])
    assert brier(p, y) == pytest.approx((0.14 + 1.46) / 2)
    assert nll(p, y) == pytest.approx(-(math.log(0.7) + math.log(0.1)) / 2)
    assert accuracy(p, y) == 0.5
    assert brier(np.eye(3)[[1, 2]], [0, 0]) == pytest.approx(2.0)  # the top of the 0-2 range
    assert brier(np.eye(3), [0, 1, 2]) == 0.0


def test_nll_logits_and_auto_detection() -> None:
    z, p, y = random_probs(200, 7, seed=8)
    expected = nll(p, y, from_logits=False)
    assert nll(z, y) == pytest.approx(expected, rel=1e-12)  # detected as logits
    assert nll(z, y, from_logits=True) == pytest.approx(expected, rel=1e-12)
    assert nll(p, y) == pytest.approx(expected, rel=1e-12)  # detected as probs
    assert math.isfinite(nll(np.array([[1.0, 0.0]]), [1], from_logits=False))


def test_accuracy_ties_go_to_lowest_index() -> None:
    assert accuracy(np.array([[0.5, 0.5]]), [0]) == 1.0
    assert accuracy(np.array([[0.5, 0.5]]), [1]) == 0.0


# ---------------------------------------------------------------- parity
@pytest.mark.parametrize("norm", ["l1", "l2", "max"])
def test_parity_with_torchmetrics(norm: str) -> None:
    from torchmetrics.functional.classification import multiclass_calibration_error

    _, p, y = random_probs(600, 5, seed=11, scale=1.5)
    # torchmetrics bins are [lo, hi) in float32: keep confidences well away from the edges
    edges = np.arange(16) / 15
    far = np.min(np.abs(p.max(1)[:, None] - edges[None, :]), axis=1) > 1e-5
    p, y = p[far], y[far]
    assert far.sum() > 590
    ref = multiclass_calibration_error(
        torch.from_numpy(p), torch.from_numpy(y), num_classes=5, n_bins=15, norm=norm
    )
    assert ece(p, y, norm=norm) == pytest.approx(float(ref), abs=2e-6)


def test_parity_with_sklearn_calibration_curve() -> None:
    from sklearn.calibration import calibration_curve

    _, p, y = random_probs(800, 4, seed=12)
    conf = p.max(1)
    correct = (p.argmax(1) == y).astype(int)
    prob_true, prob_pred = calibration_curve(correct, conf, n_bins=10, strategy="uniform")
    table = reliability_table(p, y, n_bins=10)
    used = table.count > 0
    np.testing.assert_allclose(table.accuracy[used], prob_true, rtol=0, atol=1e-12)
    np.testing.assert_allclose(table.confidence[used], prob_pred, rtol=0, atol=1e-12)


def test_parity_with_sklearn_brier_and_log_loss() -> None:
    from sklearn.metrics import brier_score_loss, log_loss

    _, p, y = random_probs(300, 6, seed=13)
    labels = list(range(6))
    # multiclass: sklearn keeps the [0, 2] sum-over-classes score, which is what we report
    assert brier(p, y) == pytest.approx(brier_score_loss(y, p, labels=labels), rel=1e-12)
    assert nll(p, y) == pytest.approx(log_loss(y, p, labels=labels), rel=1e-10)
    # binary: sklearn's default halves it to the [0, 1] score of the positive class
    _, p2, y2 = random_probs(300, 2, seed=14)
    assert brier(p2, y2) == pytest.approx(2 * brier_score_loss(y2, p2[:, 1]), rel=1e-12)
    assert brier(p2, y2) == pytest.approx(
        brier_score_loss(y2, p2, labels=[0, 1], scale_by_half=False), rel=1e-12
    )


# ---------------------------------------------------------------- inputs
def test_torch_and_numpy_inputs_agree() -> None:
    z, p, y = random_probs(500, 5, seed=15)
    ref = ece(p, y)
    assert ece(torch.from_numpy(p), torch.from_numpy(y)) == pytest.approx(ref, abs=1e-15)
    pt = torch.from_numpy(p).float().requires_grad_()
    assert ece(pt, y) == pytest.approx(ref, abs=1e-6)
    assert ece(torch.from_numpy(z), y, from_logits=True) == pytest.approx(ref, abs=1e-12)
    assert ece(z.astype(np.float32), y, from_logits=True) == pytest.approx(ref, abs=1e-5)
    assert ece(torch.from_numpy(p).half(), y) == pytest.approx(ref, abs=1e-2)
    assert ece(torch.from_numpy(p).bfloat16(), y) == pytest.approx(ref, abs=2e-2)
    assert brier(torch.from_numpy(z), y, from_logits=True) == pytest.approx(brier(p, y))
    assert classwise_ece(z, y, from_logits=True) == pytest.approx(classwise_ece(p, y))
    assert ece(p.tolist(), y.tolist()) == pytest.approx(ref)
    ro = p.copy()
    ro.setflags(write=False)
    assert ece(ro, y) == ref


def test_chunked_computation_matches(monkeypatch: pytest.MonkeyPatch) -> None:
    z, p, y = random_probs(400, 7, seed=16)
    ref = [ece(p, y), classwise_ece(p, y), brier(p, y), nll(z, y), smooth_ece(p, y)]
    monkeypatch.setattr(inputs, "CHUNK_ELEMENTS", 50)  # 7 rows per chunk
    got = [ece(p, y), classwise_ece(p, y), brier(p, y), nll(z, y), smooth_ece(p, y)]
    np.testing.assert_allclose(got, ref, rtol=1e-12)
    bad = p.copy()
    bad[377] = np.nan
    with pytest.raises(ValueError, match="row 377"):
        ece(bad, y)


def _meter(x: object, y: np.ndarray, **kw: object) -> list[float]:
    m = calibration.CalibrationMeter(**kw)  # type: ignore[arg-type]
    for start in range(0, 400, 150):
        m.update(x[start : start + 150], y[start : start + 150])  # type: ignore[index]
    return [float(v) for v in m.compute().values()]


# every metric, each of its input forms on its own (logits, probabilities, ignore_index, mass
# bins, binary, multi-label): name -> (function of x, y, keyword arguments); the inputs of a case
# are made by _chunk_case
CHUNKED_METRICS = {
    "ece": lambda x, y, **kw: ece(x, y, **kw),
    "ece-mass": lambda x, y, **kw: ece(x, y, binning="mass", **kw),
    "ece-l2": lambda x, y, **kw: ece(x, y, norm="l2", **kw),
    "classwise_ece": lambda x, y, **kw: classwise_ece(x, y, **kw),
    "debiased_l2_ece": lambda x, y, **kw: calibration.debiased_l2_ece(x, y, **kw),
    "smooth_ece": lambda x, y, **kw: smooth_ece(x, y, **kw),
    "brier": lambda x, y, **kw: brier(x, y, **kw),
    "nll": lambda x, y, **kw: nll(x, y, **kw),
    "accuracy": lambda x, y, **kw: accuracy(x, y, **kw),
    "reliability_table": lambda x, y, **kw: [
        *(np.nan_to_num(np.asarray(v, dtype=np.float64)).tolist()
          for v in vars(reliability_table(x, y, **kw)).values()
          if isinstance(v, np.ndarray))
    ],
    "meter": lambda x, y, **kw: _meter(x, y, **kw),
    "meter-mass": lambda x, y, **kw: _meter(x, y, binning="mass", **kw),
    "multilabel_ece": lambda x, y, **kw: [
        calibration.multilabel_ece(x, y, average=a, **kw) for a in ("pooled", "macro")
    ],
}
CHUNK_FORMS = ["probs", "logits", "logits-float32", "tensor", "ignore_index", "binary", "multilabel"]


def _chunk_case(form: str) -> tuple[object, np.ndarray, dict[str, object]]:
    z, p, y = random_probs(400, 7, seed=17)
    if form == "probs":
        return p, y, {}
    if form == "logits":
        return z, y, {"from_logits": True}
    if form == "logits-float32":
        return z.astype(np.float32), y, {"from_logits": True}
    if form == "tensor":
        return torch.from_numpy(p), y, {}
    if form == "ignore_index":
        y = y.copy()
        y[::5] = -100
        return p, y, {"ignore_index": -100}
    if form == "binary":
        return p[:, 0], (y == 0).astype(np.int64), {}
    rng = np.random.default_rng(18)  # multilabel: (N, L) probabilities, 0/1 labels
    return p, (rng.random(p.shape) < p).astype(np.int64), {}


@pytest.mark.parametrize("form", CHUNK_FORMS)
@pytest.mark.parametrize("metric", list(CHUNKED_METRICS))
def test_every_metric_over_many_chunks_equals_one_chunk(
    metric: str, form: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Inputs above ``CHUNK_ELEMENTS`` entries are read in chunks of rows; every metric, in each
    of its input forms, gives over chunks of 7 rows what it gives over one chunk (to 1e-12: the
    float partial sums are added in another order)."""
    fn = CHUNKED_METRICS[metric]
    x, y, kw = _chunk_case(form)
    try:
        want = fn(x, y, **kw)
    except (TypeError, ValueError) as error:  # refused alike over chunks
        monkeypatch.setattr(inputs, "CHUNK_ELEMENTS", 50)
        with pytest.raises(type(error), match=re.escape(str(error))):
            fn(x, y, **kw)
        return
    monkeypatch.setattr(inputs, "CHUNK_ELEMENTS", 50)  # 7 rows per chunk
    got = fn(x, y, **kw)
    np.testing.assert_allclose(np.asarray(got, dtype=np.float64), np.asarray(want, dtype=np.float64),
                               rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize(
    ("probs", "labels", "error", "match"),
    [
        (np.array([[0.5, 0.6]]), [0], ValueError, "row 0 sums to 1.1.*from_logits=True"),
        (np.array([[1.5, -0.5]]), [0], ValueError, r"outside \[0, 1\].*from_logits"),
        (np.array([[0.5, 0.5], [np.nan, 1.0]]), [0, 0], ValueError, "row 1 contains NaN"),
        (np.array([[0.5, 0.5]]), [2], ValueError, r"labels must lie in \[0, 1\]"),
        (np.array([[0.5, 0.5]]), [-1], ValueError, "labels must lie"),
        (np.array([[0.5, 0.5]]), [0, 1], ValueError, "labels has 2 entries.*1 rows"),
        (np.array([0.5, 0.5]), [0], ValueError, r"labels have shape \(1,\).*binary problem takes"),
        (np.zeros((0, 3)), [], ValueError, "empty"),
        (np.zeros((2, 0)), [0, 1], ValueError, "at least 2 columns"),
        (np.array([["a", "b"]]), [0], TypeError, "numeric"),
        (np.array([[0.5, 0.5]]), [0.5], ValueError, "integer"),
        (np.array([[0.5, 0.5]]), np.array([[0, 1], [1, 0]]), ValueError, "1-D"),
    ],
)
def test_input_errors(probs: np.ndarray, labels: object, error: type, match: str) -> None:
    with pytest.raises(error, match=match):
        ece(probs, labels)


def test_argument_errors() -> None:
    p, y = np.array([[0.5, 0.5]]), [0]
    with pytest.raises(ValueError, match="n_bins"):
        ece(p, y, n_bins=0)
    for fn in (ece, classwise_ece):  # a huge count is refused by name, not a MemoryError
        with pytest.raises(ValueError, match="n_bins=1000000000 is more than"):
            fn(p, y, n_bins=10**9)
    with pytest.raises(ValueError, match="n_bins=1000000000 is more than"):
        calibration.CalibrationMeter(n_bins=10**9)
    with pytest.raises(ValueError, match="norm"):
        ece(p, y, norm="l3")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="binning"):
        ece(p, y, binning="quantile")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="sigma"):
        smooth_ece(p, y, sigma=-1.0)
    with pytest.raises(ValueError, match=r"logits.*row 0"):
        ece(np.array([[np.inf, 0.0]]), y, from_logits=True)


def test_probability_tolerance() -> None:
    p = np.array([[0.5, 0.5 + 5e-4]])
    assert ece(p, [1]) == pytest.approx(abs(0.5005 - 1))
    assert ece(np.array([[1 + 1e-7, -1e-7]]), [0]) == pytest.approx(0.0, abs=1e-6)


# ---------------------------------------------------------------- properties
@settings(max_examples=40, deadline=None)
@given(
    st.integers(1, 40),
    st.integers(2, 6),
    st.integers(1, 20),
    st.integers(0, 2**31 - 1),
)
def test_properties(n: int, c: int, m: int, seed: int) -> None:
    _, p, y = random_probs(n, c, seed=seed, scale=3.0)
    l1, l2, mx = (ece(p, y, n_bins=m, norm=k) for k in ("l1", "l2", "max"))
    assert 0.0 <= l1 <= l2 + 1e-12 <= mx + 2e-12 <= 1.0 + 2e-12
    ada = ece(p, y, n_bins=m, binning="mass")
    assert 0.0 <= ada <= 1.0
    assert 0.0 <= classwise_ece(p, y, n_bins=m) <= 1.0
    assert 0.0 <= smooth_ece(p, y) <= 1.0
    assert 0.0 <= brier(p, y) <= 2.0
    perm = np.random.default_rng(seed).permutation(n)
    assert ece(p[perm], y[perm], n_bins=m) == pytest.approx(l1, abs=1e-12)
    table = reliability_table(p, y, n_bins=m)
    assert int(table.count.sum()) == n


# ---------------------------------------------------------------- masked logits (-inf)
_MASKED_METRICS = {
    "ece": lambda z, y: ece(z, y, from_logits=True),
    "ece_mass": lambda z, y: ece(z, y, from_logits=True, binning="mass"),
    "classwise_ece": lambda z, y: classwise_ece(z, y, from_logits=True),
    "brier": lambda z, y: brier(z, y, from_logits=True),
    "nll": lambda z, y: nll(z, y, from_logits=True),
    "accuracy": lambda z, y: accuracy(z, y, from_logits=True),
    "smooth_ece": lambda z, y: smooth_ece(z, y, from_logits=True),
}


def _meter(binning: str) -> object:
    def run(z: torch.Tensor, y: torch.Tensor) -> dict[str, float]:
        m = calibration.CalibrationMeter(binning=binning)  # from_logits detected: -inf is no probability
        for s in range(0, z.shape[0], 70):
            m.update(z[s : s + 70], y[s : s + 70])
        return m.compute()
    return run


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=str)
@pytest.mark.parametrize("front", [*_MASKED_METRICS, "meter_width", "meter_mass"])
def test_masked_logits_measure_as_classes_of_probability_zero(
    front: str, dtype: torch.dtype, cpu_path: str
) -> None:
    """-inf logits (masked classes, as F.cross_entropy takes them) have probability 0: every
    metric and the meter give what they give with -1e30 in their place, and the NLL is
    F.cross_entropy's; a row without a finite logit is refused by name."""
    g = torch.Generator().manual_seed(3)
    z = (torch.randn(300, 7, generator=g, dtype=torch.float64) * 2).to(dtype)
    y = torch.randint(0, 7, (300,), generator=g)
    mask = torch.rand(300, 7, generator=g) < 0.4
    mask[torch.arange(300), y] = False
    masked, far = z.masked_fill(mask, -math.inf), z.masked_fill(mask, -1e30)
    fn = _meter(front[6:]) if front.startswith("meter") else _MASKED_METRICS[front]
    got, want = fn(masked, y), fn(far, y)
    if isinstance(got, dict):
        for key in want:
            assert got[key] == pytest.approx(want[key], rel=1e-12, abs=1e-15), key
    else:
        assert got == pytest.approx(want, rel=1e-12, abs=1e-15)
    if front == "nll":
        ref = float(torch.nn.functional.cross_entropy(masked.double(), y))
        assert got == pytest.approx(ref, rel=1e-6 if dtype != torch.float64 else 1e-12)
    bad = masked.clone()
    bad[11] = -math.inf
    with pytest.raises(ValueError, match=r"row 11 has no finite logit \(every entry is -inf\)"):
        fn(bad, y)


_LOGITS_FRONTS = {  # accuracy does not warn: softmax keeps the argmax
    **{k: v for k, v in _MASKED_METRICS.items() if k != "accuracy"},
    "nll_ignore_index": lambda p, y: nll(p, y, from_logits=True, ignore_index=-100),
    "reliability_table": lambda p, y: reliability_table(p, y, from_logits=True),
    "meter": lambda p, y: _meter_of_logits(p, y),
}


def _meter_of_logits(p: torch.Tensor, y: torch.Tensor) -> None:
    m = calibration.CalibrationMeter(from_logits=True)
    for s in range(0, p.shape[0], 100):
        m.update(p[s : s + 100], y[s : s + 100])


@pytest.mark.parametrize("front", list(_LOGITS_FRONTS))
def test_probabilities_given_as_logits_warn_once_at_the_callers_line(front: str) -> None:
    """Rows in [0, 1] summing to 1, given with from_logits=True, are softmaxed again (an ECE of
    0.07 where the probabilities give 0.57): one CalibrationWarning, at the caller's line (the
    meter's on its first batch only); real logits give none."""
    g = torch.Generator().manual_seed(0)
    p = torch.softmax(torch.randn(500, 5, generator=g) * 3, 1)
    y = torch.randint(0, 5, (500,), generator=g)
    with pytest.warns(calibration.CalibrationWarning, match="these look like probabilities") as caught:
        _LOGITS_FRONTS[front](p, y)
    assert len([w for w in caught if "look like probabilities" in str(w.message)]) == 1
    assert all(w.filename == __file__ for w in caught)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _LOGITS_FRONTS[front](torch.log(p) + 1.0, y)


@pytest.mark.parametrize("half", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("front", ["ece", "classwise_ece", "brier", "nll", "meter"])
def test_half_precision_probabilities_widened_to_float32_keep_their_tolerance(
    front: str, half: torch.dtype, cpu_path: str
) -> None:
    """Probabilities of a half-precision softmax (rows off one by ~3e-3) widened with
    ``.float()``, as NumPy needs for bfloat16, measure as the half tensor does (they were refused
    for float32's 1e-3, and a default meter read them as logits: ECE 0.05 for 0.34); float32
    rows off one by as much that are not half-valued are still refused."""
    g = torch.Generator().manual_seed(0)
    p = torch.softmax(torch.randn(512, 10, generator=g, dtype=torch.float64) * 3, 1).to(half)
    y = torch.randint(0, 10, (512,), generator=g)
    if half == torch.bfloat16:  # float16's rows are off by 3e-4, within float32's tolerance too
        assert float((p.double().sum(1) - 1).abs().max()) > 1e-3

    def measure(x: object) -> float:
        if front == "meter":
            m = calibration.CalibrationMeter()
            m.update(x, y)
            return float(m.compute()["ece"])
        return float(getattr(calibration, front)(x, y))

    want = measure(p)
    assert measure(p.float()) == pytest.approx(want, rel=1e-12)
    assert measure(p.float().numpy()) == pytest.approx(want, rel=1e-12)
    # widened to float64 (.double(), .tolist()): refused, and read as logits by a default meter;
    # measured in float64, to the float32 pass's round-off
    assert measure(p.double()) == pytest.approx(want, rel=1e-7)
    assert measure(p.double().numpy()) == pytest.approx(want, rel=1e-7)
    assert measure(p.float().tolist()) == pytest.approx(want, rel=1e-7)
    off64 = torch.softmax(p.double().log(), 1)  # float64 values of no half type, as far off one
    off64[:, 0] = (off64[:, 0] + 3e-3).clamp_max(1.0)
    with pytest.raises(ValueError, match=r"sums to .* not 1 \(tolerance 0\.001\)"):
        getattr(calibration, "ece" if front == "meter" else front)(off64, y, from_logits=False)
    off = torch.softmax(p.float().log(), 1)  # float32 values of no half type,
    off[:, 0] = (off[:, 0] + 3e-3).clamp_max(1.0)  # as far off one
    with pytest.raises(ValueError, match=r"sums to .* not 1 \(tolerance 0\.001\)"):
        getattr(calibration, "ece" if front == "meter" else front)(off, y, from_logits=False)


def test_the_half_precision_tolerance_is_the_whole_blocks_and_says_so() -> None:
    """The half type's tolerance applies where every value of the rows read is a half type's,
    and the error says so; one row of dyadic values among float32 ones does not get it (it
    did, and the error then named the other row against 0.001). Masked logits given as
    probabilities are refused with the hint to pass from_logits=True; accuracy, which softmax
    does not change, does not warn of probabilities given as logits."""
    y = np.array([0, 1])
    half_rows = np.array([[0.5, 0.5, 0.0078125], [0.25, 0.75, 0.0]], dtype=np.float32)
    assert ece(half_rows, y) == pytest.approx(0.375)
    wider = half_rows.copy()
    wider[0, 2] = 0.015625  # 1.0156: beyond half precision's tolerance too
    beyond = r"row 0 sums to 1\.01562, not 1 \(tolerance 0\.01, that of half precision"
    with pytest.raises(ValueError, match=beyond):
        ece(wider, y)
    mixed = np.array([[0.5, 0.5, 0.0078125], [0.3, 0.702, 0.0]], dtype=np.float32)
    with pytest.raises(ValueError, match=r"row 0 sums to 1\.00781, not 1 \(tolerance 0\.001\);"):
        ece(mixed, y)
    masked = np.array([[-0.7, -0.7, -np.inf], [-1.4, -0.3, -np.inf]])
    with pytest.raises(ValueError, match=r"probs: row 0 contains NaN or infinite values; pass from_logits="):
        ece(masked, y)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert accuracy(half_rows, y, from_logits=True) == 1.0  # row 0's tie goes to class 0


@pytest.mark.parametrize("storage", [np.float32, np.float64])
def test_the_half_precision_tolerance_is_judged_over_every_chunk(
    storage: type, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Whether every value is a half type's is judged chunk by chunk (no mask of the whole
    input) and holds only if it holds in every chunk: rows of dyadic values off one by 0.0078
    pass in any chunking; one row of other values in the last chunk takes the tolerance back to
    the storage's for all rows."""
    monkeypatch.setattr(inputs, "CHUNK_ELEMENTS", 6)  # 2 rows of 3 per chunk
    half_rows = np.tile(np.array([[0.5, 0.5, 0.0078125], [0.25, 0.75, 0.0]], dtype=storage), (5, 1))
    y = np.tile([0, 1], 5)
    assert ece(half_rows, y) == pytest.approx(0.375)
    mixed = half_rows.copy()
    mixed[9] = [0.3, 0.7, 0.0]  # sums to one; not a half type's values
    with pytest.raises(ValueError, match=r"row 0 sums to 1\.00781, not 1 \(tolerance 0\.001\);"):
        ece(mixed, y)


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_scores_in_0_1_with_a_non_finite_entry_do_not_warn_as_unnormalised(bad: float) -> None:
    """The warning that rows in [0, 1] not summing to one are read as logits looks at the range
    in one read (no mask of the whole input): NaN or an infinite entry is for the checks to
    name, not the warning."""
    p = np.array([[0.2, 0.3, 0.1], [0.4, 0.4, 0.1]])
    p[1, 2] = bad
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        if bad == -math.inf:  # a masked class of logits: measured, no warning
            assert math.isfinite(nll(p, np.array([0, 1])))
        else:
            with pytest.raises(ValueError, match="row 1 contains NaN or infinite values"):
                nll(p, np.array([0, 1]))


@pytest.mark.parametrize("kind", ["binary", "multiclass"])
def test_mass_bins_depend_on_the_data_not_on_the_order_of_rows(kind: str) -> None:
    """600 of 1,000 samples at one confidence fill several mass bins: each of those bins has the
    tie's accuracy, so AdaECE, its table and a meter fed the rows in any order or batching are
    the same (a shuffle moved AdaECE from 0.13 to 0.16)."""
    rng = np.random.default_rng(0)
    conf = np.concatenate([np.full(600, 0.5 if kind == "binary" else 0.6), rng.uniform(0.6, 1.0, 400)])
    hit = rng.random(1000) < np.where(np.arange(1000) < 600, 0.3, 0.8)
    if kind == "binary":
        p, y = conf, hit.astype(int)
    else:
        p = np.stack([conf, 1 - conf], 1)  # class 0 on top
        y = np.where(hit, 0, 1)
    want = ece(p, y, binning="mass")
    table = reliability_table(p, y, binning="mass")
    tie = table.lower == table.upper
    assert tie.sum() >= 8
    np.testing.assert_allclose(table.accuracy[tie], float(hit[:600].mean()), rtol=1e-12)
    for seed in range(4):
        order = np.random.default_rng(seed).permutation(1000)
        assert ece(p[order], y[order], binning="mass") == pytest.approx(want, rel=1e-12)
        m = calibration.CalibrationMeter(binning="mass", n_bins=15)
        for s in range(0, 1000, 170):
            m.update(p[order][s : s + 170], y[order][s : s + 170])
        assert m.compute()["ece"] == pytest.approx(want, rel=1e-12)


@pytest.mark.parametrize("front", ["ece", "classwise_ece", "brier", "nll", "accuracy", "meter"])
def test_big_endian_float8_and_boolean_inputs(front: str) -> None:
    """Big-endian NumPy scores (read from a file) measure as native ones (torch refused them
    with its own message on byte order); float8 logits measure as their float32 values (the
    detection of logits failed in torch: no isfinite for float8); boolean labels of a binary
    (N, 2) problem are classes 0 and 1 (they were refused), and of more classes are refused by
    name with what to pass."""

    def measure(x: object, y: object, **kw: Any) -> float:
        if front == "meter":
            m = calibration.CalibrationMeter(**kw)
            m.update(x, y)
            return float(m.compute()["ece"])
        return float(getattr(calibration, front)(x, y, **kw))

    rng = np.random.default_rng(0)
    z = rng.normal(size=(200, 3)) * 2
    y = rng.integers(0, 3, 200)
    want = measure(z, y, from_logits=True)
    assert measure(z.astype(">f8"), y, from_logits=True) == want
    assert measure(z.astype(">f4"), y.astype(">i8"), from_logits=True) == measure(z.astype("<f4"), y,
                                                                                   from_logits=True)
    detect = {} if front in ("meter", "nll") else {"from_logits": True}  # the meter and nll detect logits
    for f8 in (torch.float8_e4m3fn, torch.float8_e5m2):
        z8 = torch.from_numpy(z).to(f8)
        assert measure(z8, y, **detect) == pytest.approx(measure(z8.float(), y, from_logits=True), rel=1e-12)
    p2 = torch.softmax(torch.from_numpy(z[:, :2]), 1)
    hit = torch.from_numpy(y % 2 == 1)
    assert measure(p2, hit) == measure(p2, hit.long())
    assert measure(p2.numpy(), hit.numpy()) == measure(p2.numpy(), hit.long().numpy())
    with pytest.raises(TypeError, match=r"labels hold booleans \(classes 0 and 1\) but the predictions have"
                                        r" 3 classes; pass integer class indices in \[0, 2\]"):
        measure(torch.softmax(torch.from_numpy(z), 1), hit)


def test_flipped_views_with_one_row_are_read_as_any_flipped_view() -> None:
    """A flipped NumPy view with a size-1 axis (one row of np.flip, a [::-1][:1] slice, a
    flipped single label) was passed to torch as it was and refused with torch's own message on
    negative strides (NumPy calls such a view contiguous): it measures as its copy does."""
    p = np.array([[0.2, 0.8], [0.6, 0.4]])
    cases = [
        (lambda: ece(np.flip(p, 0)[1:], [1]), lambda: ece(p[:1].copy(), [1])),
        (lambda: brier(np.array([0.3, 0.7])[::-1][:1], [1]), lambda: brier(np.array([0.7]), [1])),
        (lambda: ece(np.flip(np.array([[0.3], [0.7]]), 1), [1, 0]),
         lambda: ece(np.array([[0.3], [0.7]]), [1, 0])),
        (lambda: ece(p[:1], np.array([0, 1])[::-1][:1]), lambda: ece(p[:1], np.array([1]))),
    ]
    for got, want in cases:
        assert got() == want()
    m = calibration.CalibrationMeter()
    m.update(np.flip(p, 0)[1:], np.array([1]))
    assert m.compute()["ece"] == ece(p[:1].copy(), [1])


def test_rows_that_are_permutations_of_each_other_tie_in_mass_bins_on_either_path() -> None:
    """Two rows whose logits are permutations of each other have one confidence, which the
    native kernel and torch sum to within an ulp of each other: mass bins treat them as a tie
    on both paths (AdaECE 0.5 natively, 0.07 on the torch path), and relabelling the classes
    changes nothing."""
    from crossent.backends import native

    z = np.array([[-0.5, 2.0, 3.5, 4.0], [3.5, -0.5, 4.0, 2.0]])
    y = np.array([0, 2])
    got = ece(z, y, from_logits=True, binning="mass", n_bins=2)
    with native.disabled():
        assert ece(z, y, from_logits=True, binning="mass", n_bins=2) == pytest.approx(got, rel=1e-12)
    perm = [2, 0, 3, 1]
    relabelled = ece(z[:, perm], np.argsort(perm)[y], from_logits=True, binning="mass", n_bins=2)
    assert relabelled == pytest.approx(got, rel=1e-12)
    conf = 1.0 / np.exp(z - z.max(1, keepdims=True)).sum(1)
    assert got == pytest.approx(abs(conf[0] - 0.5), rel=1e-12)  # one bin of both: accuracy 1/2
