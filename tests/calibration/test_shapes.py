"""Binary (N,), multi-label (N, L) and ignore_index inputs of the metrics, against
torchmetrics, scikit-learn and the stacked / sliced equivalents."""

from __future__ import annotations

import contextlib
import functools
import warnings
from typing import Any

import numpy as np
import pytest
import torch

from crossent import calibration as cal


def binary_case(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    p = rng.beta(0.7, 0.9, size=n)
    return p, (rng.random(n) < p**1.5).astype(np.int64)


@pytest.mark.parametrize(("seed", "n_bins", "norm"), [
    (s, m, norm) for s in (0, 1) for m in (5, 15) for norm in ("l1", "l2", "max")
])
def test_binary_ece_matches_torchmetrics(seed: int, n_bins: int, norm: str) -> None:
    tmc = pytest.importorskip("torchmetrics.functional.classification")
    p, y = binary_case(500, seed)
    want = tmc.binary_calibration_error(torch.from_numpy(p), torch.from_numpy(y), n_bins=n_bins, norm=norm)
    got = cal.ece(p, y, n_bins=n_bins, norm=norm)  # type: ignore[arg-type]
    assert got == pytest.approx(float(want), abs=1e-6)  # torchmetrics works in float32


def test_binary_reliability_matches_sklearn_curve() -> None:
    calibration = pytest.importorskip("sklearn.calibration")
    p, y = binary_case(800, 2)
    frac, mean = calibration.calibration_curve(y, p, n_bins=10, strategy="uniform")
    table = cal.reliability_table(p, y, n_bins=10)
    used = table.count > 0
    np.testing.assert_allclose(table.accuracy[used], frac, rtol=1e-12)
    np.testing.assert_allclose(table.confidence[used], mean, rtol=1e-12)


def test_binary_metrics_against_formulas_and_logits() -> None:
    metrics = pytest.importorskip("sklearn.metrics")
    p, y = binary_case(300, 3)
    assert cal.brier(p, y) == pytest.approx(metrics.brier_score_loss(y, p), rel=1e-12)
    assert cal.nll(p, y) == pytest.approx(metrics.log_loss(y, p), rel=1e-12)
    assert cal.accuracy(p, y) == np.mean((p > 0.5) == y)
    z = np.log(p) - np.log1p(-p)
    assert cal.ece(z, y, from_logits=True) == pytest.approx(cal.ece(p, y), abs=1e-12)
    assert cal.nll(z, y) == pytest.approx(cal.nll(p, y), rel=1e-9)  # logits detected
    stacked = np.stack([1 - p, p], 1)
    assert cal.classwise_ece(p, y) == pytest.approx(cal.classwise_ece(stacked, y), rel=1e-12)
    assert cal.brier(stacked, y) == pytest.approx(2 * cal.brier(p, y), rel=1e-12)


def test_multilabel_pooled_and_per_label() -> None:
    rng = np.random.default_rng(4)
    p = rng.random((400, 3))
    y = (rng.random((400, 3)) < p**2).astype(np.int64)
    per = cal.multilabel_ece(p, y, average="none")
    assert isinstance(per, np.ndarray) and per.shape == (3,)
    for j in range(3):
        assert per[j] == cal.ece(p[:, j], y[:, j])
    assert cal.multilabel_ece(p, y) == pytest.approx(per.mean())
    assert cal.ece(p, y) == cal.ece(p.reshape(-1), y.reshape(-1))
    assert cal.multilabel_ece(p, y, average="pooled") == cal.ece(p, y)
    tmc = pytest.importorskip("torchmetrics.functional.classification")
    want = tmc.binary_calibration_error(torch.from_numpy(p.reshape(-1)), torch.from_numpy(y.reshape(-1)))
    assert cal.ece(p, y) == pytest.approx(float(want), abs=1e-6)


def test_multilabel_label_wholly_ignored() -> None:
    """A label whose every entry is ignored has no ECE: NaN per label, left out of the macro
    mean; the others equal the ECE of their kept entries. All ignored is an error."""
    rng = np.random.default_rng(14)
    p = rng.random((50, 3))
    y = (rng.random((50, 3)) < p).astype(np.int64)
    y[:, 1] = -1
    y[:5, 2] = -1
    per = cal.multilabel_ece(p, y, average="none", ignore_index=-1)
    assert isinstance(per, np.ndarray) and np.isnan(per[1])
    assert per[0] == cal.ece(p[:, 0], y[:, 0])
    assert per[2] == cal.ece(p[5:, 2], y[5:, 2])
    assert cal.multilabel_ece(p, y, ignore_index=-1) == pytest.approx((per[0] + per[2]) / 2, rel=1e-15)
    with pytest.raises(ValueError, match="every entry of labels equals ignore_index"):
        cal.multilabel_ece(p, np.full_like(y, -1), ignore_index=-1)


FUNCTIONS = [cal.ece, cal.classwise_ece, cal.brier, cal.accuracy, cal.smooth_ece, cal.debiased_l2_ece]


@pytest.mark.parametrize(("fn", "kind"), [
    (fn, kind) for fn in FUNCTIONS for kind in ("multiclass", "binary", "multilabel")
    if not (kind == "multilabel" and fn is cal.classwise_ece)  # classwise is for one problem
])
def test_ignore_index_equals_slicing(fn: Any, kind: str) -> None:
    rng = np.random.default_rng(5)
    if kind == "multiclass":
        z = rng.normal(size=(200, 4)) * 2
        y = rng.integers(0, 4, 200)
    elif kind == "binary":
        z = rng.normal(size=200) * 2
        y = rng.integers(0, 2, 200)
    else:
        z = rng.normal(size=(200, 3)) * 2
        y = rng.integers(0, 2, (200, 3))
    masked = y.copy()
    masked.reshape(-1)[::5] = -100
    keep = masked != -100
    got = fn(z, masked, from_logits=True, ignore_index=-100)
    want = fn(z[keep], y[keep], from_logits=True)
    assert got == pytest.approx(want, rel=1e-12)
    assert cal.nll(z, masked, ignore_index=-100) == pytest.approx(cal.nll(z[keep], y[keep]), rel=1e-12)


def test_shape_errors() -> None:
    with pytest.raises(ValueError, match="0 or 1"):
        cal.ece(np.array([0.2, 0.7]), np.array([0, 2]))
    with pytest.raises(ValueError, match=r"must lie in \[0, 1\].*from_logits"):
        cal.ece(np.array([0.2, 1.7]), np.array([0, 1]))
    with pytest.raises(ValueError, match="shape"):
        cal.ece(np.array([0.2, 0.7, 0.1]), np.array([0, 1]))
    with pytest.raises(ValueError, match="average"):
        cal.multilabel_ece(np.zeros((2, 2)), np.zeros((2, 2)), average="micro")  # type: ignore[arg-type]


@pytest.mark.parametrize("fn", [cal.ece, cal.classwise_ece, cal.brier, cal.nll, cal.accuracy])
def test_empty_binary_input_says_why(fn: Any) -> None:
    """No samples at all, and every label ignored, are two messages; the first does not talk
    of an ignore_index that was never given."""
    for kw in ({}, {"ignore_index": -100}):
        with pytest.raises(ValueError, match="is empty: it needs at least one sample") as err:
            fn(np.empty(0), np.empty(0, np.int64), **kw)
        assert "ignore_index" not in str(err.value)
    with pytest.raises(ValueError, match="after dropping the labels equal to ignore_index=-100"):
        fn(np.array([0.2, 0.7]), np.array([-100, -100]), ignore_index=-100)


@pytest.mark.parametrize("fn", [cal.ece, cal.classwise_ece, cal.brier, cal.nll, cal.accuracy])
def test_binary_labels_one_per_score(fn: Any) -> None:
    """Binary (N,) scores take labels (N,), (N, 1) or (1, N); labels of another shape with the
    same size are refused, not flattened against the scores."""
    rng = np.random.default_rng(3)
    p = rng.uniform(size=100)
    y = (rng.uniform(size=100) < p).astype(np.int64)
    want = fn(p, y)
    for shape in ((100, 1), (1, 100)):
        assert fn(p, y.reshape(shape)) == pytest.approx(want, rel=1e-12)
    for shape in ((10, 10), (4, 25), (100, 1, 1)):
        with pytest.raises(ValueError, match=rf"labels have shape \({shape[0]}, "):
            fn(p, y.reshape(shape))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.bool, torch.int8])
@pytest.mark.parametrize(
    "fn", [cal.ece, cal.classwise_ece, cal.brier, cal.nll, cal.accuracy, cal.multilabel_ece]
)
def test_binary_labels_of_any_torch_dtype(fn: Any, dtype: torch.dtype) -> None:
    """0/1 targets in the model's dtype (bfloat16 has no NumPy type) are taken as 0/1."""
    rng = np.random.default_rng(6)
    p = rng.uniform(size=(30, 3))
    y = (rng.uniform(size=(30, 3)) < p).astype(np.int64)
    assert fn(p, torch.from_numpy(y).to(dtype)) == pytest.approx(fn(p, y), rel=1e-12)


def test_multiclass_labels_in_bfloat16() -> None:
    rng = np.random.default_rng(7)
    p = torch.softmax(torch.from_numpy(rng.normal(size=(20, 4))), 1)
    y = torch.from_numpy(rng.integers(0, 4, 20))
    assert cal.ece(p, y.to(torch.bfloat16)) == cal.ece(p, y)
    assert cal.nll(p, y.to(torch.bfloat16)) == cal.nll(p, y)


def test_classwise_num_classes_is_checked_and_named() -> None:
    """num_classes must be an integer; binary and multi-label input has the two classes
    [1 - p, p], which the message says (not a shape[1] the input does not have)."""
    rng = np.random.default_rng(8)
    p = torch.softmax(torch.from_numpy(rng.normal(size=(20, 4))), 1).numpy()
    y = rng.integers(0, 4, 20)
    for bad in ("4", 4.5, True):
        with pytest.raises(ValueError, match="num_classes must be an integer"):
            cal.classwise_ece(p, y, num_classes=bad)  # type: ignore[arg-type]
    assert cal.classwise_ece(p, y, num_classes=np.int64(4)) == cal.classwise_ece(p, y)
    pm, ym = p[:, :3], (p[:, :3] > 0.25).astype(np.int64)
    with pytest.raises(ValueError, match=r"binary and multi-label.*\[1 - p, p\]"):
        cal.classwise_ece(pm, ym, num_classes=3)
    assert cal.classwise_ece(pm, ym, num_classes=2) == cal.classwise_ece(pm, ym)


ONE_COLUMN_FNS = [cal.ece, cal.classwise_ece, cal.brier, cal.nll, cal.accuracy, cal.debiased_l2_ece,
                  cal.smooth_ece, lambda p, y, **kw: cal.reliability_table(p, y, **kw).count.tolist()]


@pytest.mark.parametrize("fn", ONE_COLUMN_FNS)
@pytest.mark.parametrize("label_shape", [(120,), (120, 1), (1, 120)])
@pytest.mark.parametrize("from_logits", [False, True])
@pytest.mark.parametrize("ignore_index", [None, -100])
@pytest.mark.parametrize("tensor", [False, True])
def test_one_column_scores_are_binary_scores(
    fn: Any, label_shape: tuple[int, ...], from_logits: bool, ignore_index: int | None, tensor: bool
) -> None:
    """An (N, 1) column (a one-logit head's output, as BCEWithLogitsLoss takes it) is the
    binary (N,) scores it holds, with labels (N,), (N, 1) or (1, N): the same value as the
    (N,) scores, for every metric, from probabilities and logits, with ignored labels."""
    rng = np.random.default_rng(12)
    p = rng.uniform(0.02, 0.98, size=120)
    y = (rng.uniform(size=120) < p).astype(np.int64)
    if ignore_index is not None:
        y[::7] = ignore_index
    s = np.log(p) - np.log1p(-p) if from_logits else p
    kw: dict[str, Any] = {"ignore_index": ignore_index}
    if fn is not cal.nll:
        kw["from_logits"] = from_logits
    want = fn(s, y, **kw)
    col, lab = s[:, None], y.reshape(label_shape)
    got = fn(torch.from_numpy(col), torch.from_numpy(lab), **kw) if tensor else fn(col, lab, **kw)
    assert got == want


def test_one_column_scores_in_the_meter_and_the_binary_recalibrators() -> None:
    """The meter (from_logits detected as for (N,) scores: in [0, 1] is probabilities) and
    Platt and beta calibration take the (N, 1) column as the (N,) scores."""
    rng = np.random.default_rng(13)
    p = rng.uniform(0.02, 0.98, size=200)
    y = (rng.uniform(size=200) < p).astype(np.int64)
    z = np.log(p) - np.log1p(-p)
    for s in (p, z):
        want = cal.CalibrationMeter()
        want.update(s[:100], y[:100])
        want.update(s[100:], y[100:])
        got = cal.CalibrationMeter()
        got.update(torch.from_numpy(s[:100, None]).float(), torch.from_numpy(y[:100, None]).float())
        got.update(s[100:, None], y[100:])
        assert got.from_logits == want.from_logits == (s is z)
        w = want.compute()
        for key, value in got.compute().items():  # float32 scores of the first half: rounded
            assert value == pytest.approx(w[key], rel=1e-6, abs=1e-7), key
    for method in (cal.PlattScaler, cal.BetaCalibrator):
        want_c = method().fit(z, y)
        got_c = method().fit(z[:, None], y[:, None])
        np.testing.assert_array_equal(got_c.coef, want_c.coef)
        np.testing.assert_array_equal(got_c.transform(z[:, None]), want_c.transform(z))


def test_one_column_labels_must_match_and_3d_scores_say_what_to_pass() -> None:
    """(N, 1) scores with labels of another count say what binary input takes; (N, C, d)
    scores are refused with the shapes that are taken, not advice to stack [1 - p, p]."""
    p = np.array([[0.2], [0.9]])
    for fn in (cal.ece, cal.nll):
        with pytest.raises(ValueError, match=r"labels have shape \(3,\).*\(N,\) or \(N, 1\) scores"):
            fn(p, [0, 1, 1])
        with pytest.raises(ValueError, match=r"\(N,\) or \(N, 1\) scores.*\(N, L\)") as err:
            fn(np.zeros((2, 3, 4)), np.zeros((2, 4), np.int64))
        assert "np.stack" not in str(err.value)
    with pytest.raises(ValueError, match="at least 2 columns"):
        cal.ece(np.zeros((2, 0)), [0, 1])


@pytest.mark.parametrize(
    "call",
    [
        lambda p, y: cal.ece(p, y),
        lambda p, y: cal.brier(p, y),
        lambda p, y: cal.nll(p, y),
        lambda p, y: cal.multilabel_ece(p, y, average="pooled"),
        lambda p, y: cal.CalibrationMeter().update(p, y),
    ],
    ids=["ece", "brier", "nll", "multilabel_ece", "meter"],
)
def test_one_hot_labels_of_softmax_rows_warn_at_the_callers_line(call: Any) -> None:
    """(N, C) softmax rows with one-hot labels are measured as multi-label, as documented, but
    are far more likely a multiclass problem: a warning names labels.argmax(1), pointing at the
    caller's line. Sigmoid scores with one-hot labels and softmax rows with real multi-label
    labels do not warn."""
    import warnings

    rng = np.random.default_rng(14)
    p = torch.softmax(torch.from_numpy(rng.normal(size=(60, 4))), 1).numpy()
    y = rng.integers(0, 4, 60)
    one_hot = np.eye(4, dtype=np.int64)[y]
    with pytest.warns(UserWarning, match=r"one-hot.*labels\.argmax\(1\)") as record:
        call(p, one_hot)
    assert record[0].filename == __file__
    sigmoid = 1 / (1 + np.exp(-rng.normal(size=(60, 4))))
    multi = (rng.random((60, 4)) < 0.4).astype(np.int64)
    multi[:, 0] = 1 - multi[:, 1]  # no row without a label, some with two
    multi[0, :2] = 1
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        call(sigmoid, one_hot)
        call(p, multi)


SEQUENCE_FRONT_DOORS = {
    "CalibrationMeter.update": lambda x, y: cal.CalibrationMeter().update(x, y),
    "ece": lambda x, y: cal.ece(x, y, from_logits=True),
    "classwise_ece": lambda x, y: cal.classwise_ece(x, y, from_logits=True),
    "nll": lambda x, y: cal.nll(x, y, from_logits=True),
    "reliability_table": lambda x, y: cal.reliability_table(x, y, from_logits=True),
    **{f"{m.__name__}.fit": functools.partial(lambda m, x, y: m().fit(x, y), m)
       for m in (cal.TemperatureScaler, cal.VectorScaler, cal.MatrixScaler, cal.HistogramBinning,
                 cal.IsotonicCalibrator, cal.EnsembleTemperatureScaler)},
}


@pytest.mark.parametrize("form", ["tensor", "numpy"])
@pytest.mark.parametrize("door", list(SEQUENCE_FRONT_DOORS))
def test_sequence_scores_are_refused_with_the_reshape_that_fixes_them(door: str, form: str) -> None:
    """(B, T, C) logits of a sequence model with (B, T) labels: refused, naming the reshape
    to (B T, C) and (B T,), and the move of the class dim of (N, C, H, W) scores; the reshaped
    call runs."""
    call = SEQUENCE_FRONT_DOORS[door]
    g = torch.Generator().manual_seed(3)
    x, y = torch.randn(4, 30, 6, generator=g) * 3, torch.randint(0, 6, (4, 30), generator=g)
    if form == "numpy":
        x, y = x.numpy(), y.numpy()  # type: ignore[assignment]
    fix = (r"got shape \(4, 30, 6\); .*\.reshape\(-1, 6\) and labels\.reshape\(-1\); for \(N, C, d1, \.\.\.\)"
           r" .*np\.moveaxis\(.*, 1, -1\), then reshape\(-1, 30\)")
    with pytest.raises(ValueError, match=fix):
        call(x, y)
    with warnings.catch_warnings():  # random labels: a fit may fall back, which is beside the point
        warnings.simplefilter("ignore", cal.CalibrationWarning)
        call(x.reshape(-1, 6), y.reshape(-1))


def _meter_update(x: Any, y: Any, *, from_logits: bool = False, ignore_index: int | None = None) -> None:
    cal.CalibrationMeter(from_logits=from_logits, ignore_index=ignore_index).update(x, y)


ROW_CHECKED = [cal.ece, cal.classwise_ece, cal.brier, cal.nll, cal.accuracy, cal.smooth_ece,
               cal.debiased_l2_ece, cal.reliability_table, _meter_update]


def _bad_input(case: str) -> tuple[np.ndarray, np.ndarray, bool, str]:
    """Ten samples whose first three labels are ignored and whose sixth kept one (the input's
    row or entry 6) is bad: scores, labels, from_logits and the message's start."""
    rng = np.random.default_rng(11)
    z = rng.normal(size=(10, 4))
    y: np.ndarray = np.array([-100, -100, -100, 0, 1, 2, 3, 0, 1, 2])
    if case == "logits with NaN":
        z[6, 1] = np.nan
        return z, y, True, "row 6 contains NaN"
    if case == "probabilities off one":
        p = np.exp(z) / np.exp(z).sum(1, keepdims=True)
        p[6] *= 1.2
        return p, y, False, "row 6 sums to 1.2"
    if case == "probabilities outside [0, 1]":
        p = np.exp(z) / np.exp(z).sum(1, keepdims=True)
        p[6, 0] = -0.5
        return p, y, False, r"row 6 has values outside \[0, 1\]"
    if case == "a label not an integer":
        return z, np.where(np.arange(10) == 6, 1.5, y), True, "entry 6 is 1.5"
    yb = np.where(y >= 0, y % 2, y)
    pb = rng.random(10)
    if case == "binary score NaN":
        pb[6] = np.nan
        return pb, yb, False, "entry 6 is NaN"
    assert case == "binary label not 0/1"
    return pb, np.where(np.arange(10) == 6, 2, yb), False, "entry 6 is 2"


@pytest.mark.parametrize("case", ["logits with NaN", "probabilities off one", "probabilities outside [0, 1]",
                                  "a label not an integer", "binary score NaN", "binary label not 0/1"])
@pytest.mark.parametrize("fn", ROW_CHECKED, ids=lambda f: f.__name__)
@pytest.mark.parametrize("path", ["native", "torch"])
def test_errors_name_the_inputs_row_where_ignore_index_dropped_rows_before_it(
    fn: Any, case: str, path: str
) -> None:
    """The row (or entry) an error names is the input's, not its place among the rows left
    after ``ignore_index``: token-level evaluation with padding must find the bad one."""
    from crossent.backends import native

    x, y, from_logits, message = _bad_input(case)
    with native.disabled() if path == "torch" else contextlib.nullcontext():
        with pytest.raises(ValueError, match=message):
            fn(x, y, from_logits=from_logits, ignore_index=-100)
        keep = y != -100  # the same rows without the ignored ones: numbered from 0
        with pytest.raises(ValueError, match=message.replace("6", "3")):
            fn(x[keep], y[keep], from_logits=from_logits)


@pytest.mark.parametrize("average", ["pooled", "macro", "none"])
@pytest.mark.parametrize("bad", ["score NaN", "label 2"])
def test_multilabel_errors_name_the_row_and_label_in_every_average(average: str, bad: str) -> None:
    """A bad entry of (N, L) multi-label input is named (row, label), whichever the average:
    one label's column alone would give its row as an entry of the flattened input."""
    p, y = np.full((5, 3), 0.5), np.zeros((5, 3), dtype=np.int64)
    if bad == "score NaN":
        p[3, 2] = np.nan
    else:
        y[3, 2] = 2
    with pytest.raises(ValueError, match=r"entry \(3, 2\) is"):
        cal.multilabel_ece(p, y, average=average)  # type: ignore[arg-type]
    y[0, :] = -1  # the first row ignored: the names stay the input's
    with pytest.raises(ValueError, match=r"entry \(3, 2\) is"):
        cal.multilabel_ece(p, y, average=average, ignore_index=-1)  # type: ignore[arg-type]


@pytest.mark.parametrize("average", ["pooled", "macro", "none"])
def test_multilabel_input_without_labels_is_empty_not_ignored(average: str) -> None:
    with pytest.raises(ValueError, match="is empty: it needs at least one sample") as err:
        cal.multilabel_ece(np.zeros((5, 0)), np.zeros((5, 0), dtype=np.int64), average=average)  # type: ignore[arg-type]
    assert "ignore_index" not in str(err.value)


def test_one_hot_labels_of_a_softmax_warn_as_a_calibration_warning() -> None:
    rng = np.random.default_rng(2)
    z = rng.normal(size=(50, 4))
    p = np.exp(z) / np.exp(z).sum(1, keepdims=True)
    with pytest.warns(cal.CalibrationWarning, match="one-hot rows"):
        cal.ece(p, np.eye(4, dtype=np.int64)[rng.integers(0, 4, 50)])
