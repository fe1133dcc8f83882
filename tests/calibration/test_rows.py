"""row_statistics: the native kernel and the torch-op path against a float64 NumPy reference,
bins at their edges, threads, layouts and hostile rows."""

from __future__ import annotations

import contextlib
import ctypes
import itertools
import math
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest
import torch

from crossent import calibration as cal
from crossent.backends import native
from crossent.calibration import _inputs as cal_inputs
from crossent.calibration._rows import RowStatistics, row_statistics, top_sums

PATHS = ("native", "torch")
DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)


@contextlib.contextmanager
def path(name: str) -> Iterator[None]:
    if name == "torch":
        with native.disabled():
            yield
        return
    if not native.available():
        pytest.skip("the native kernels are not built on this machine")
    yield


def reference(x: torch.Tensor, y: np.ndarray, from_logits: bool, n_bins: int) -> dict[str, np.ndarray]:
    """Float64 NumPy: softmax, top label, NLL, Brier and the classwise bins by searchsorted."""
    z = x.to(torch.float64).numpy()
    n, k = z.shape
    if from_logits:
        e = np.exp(z - z.max(1, keepdims=True))
        p = e / e.sum(1, keepdims=True)
    else:
        p = z
    py = p[np.arange(n), y]
    out = {
        "conf": p.max(1),
        "pred": z.argmax(1),
        "nll": -np.log(np.maximum(py, np.finfo(np.float64).tiny)),
        "brier": (p**2).sum(1) - 2 * py + 1,
    }
    if n_bins:
        inner = np.arange(1, n_bins, dtype=np.float64) / n_bins
        b = np.searchsorted(inner, p, side="left")  # (n, k)
        cw_p = np.zeros(n_bins * k)  # bin b of class c at b K + c
        np.add.at(cw_p, (b * k + np.arange(k)[None, :]).ravel(), p.ravel())
        cw_y = np.zeros(n_bins * k)
        np.add.at(cw_y, b[np.arange(n), y] * k + y, 1.0)
        out["cw_p"], out["cw_y"] = cw_p, cw_y
    return out


def data(n: int, k: int, dtype: torch.dtype, from_logits: bool, seed: int) -> tuple[torch.Tensor, np.ndarray]:
    g = torch.Generator().manual_seed(seed)
    z = torch.randn((n, k), generator=g, dtype=torch.float64) * 3
    y = torch.randint(0, k, (n,), generator=g).numpy()
    if from_logits:
        return z.to(dtype), y
    p = torch.softmax(z, 1).to(dtype)
    # renormalised in the storage dtype's precision: rows sum to one within its tolerance
    return (p.to(torch.float64) / p.to(torch.float64).sum(1, keepdim=True)).to(dtype), y


MATRIX = list(itertools.product(PATHS, (True, False), DTYPES, (0, 1, 15), (2, 37, 1000)))


@pytest.mark.parametrize(("where", "from_logits", "dtype", "n_bins", "k"), MATRIX)
def test_matches_float64_reference(
    where: str, from_logits: bool, dtype: torch.dtype, n_bins: int, k: int
) -> None:
    x, y = data(67, k, dtype, from_logits, seed=k + n_bins)
    with path(where):
        r = row_statistics(x, torch.from_numpy(y), from_logits=from_logits, name="x", n_bins=n_bins,
                           top=n_bins > 0)
    want = reference(x, y, from_logits, n_bins)
    exact = dtype == torch.float64 or not from_logits  # the probabilities are the input's own values
    rel = 1e-12 if dtype == torch.float64 else 2e-6
    np.testing.assert_allclose(r.conf, want["conf"], rtol=rel, atol=0)
    np.testing.assert_array_equal(r.pred, want["pred"])
    assert r.nll is not None and r.brier is not None
    np.testing.assert_allclose(r.nll, want["nll"], rtol=rel, atol=1e-6 if rel > 1e-12 else 1e-13)
    np.testing.assert_allclose(r.brier, want["brier"], rtol=rel, atol=1e-6 if rel > 1e-12 else 1e-13)
    if not n_bins:
        assert r.cw_p is None and r.cw_y is None and r.top is None
        return
    assert r.top is not None
    m = n_bins
    top = top_sums(want["conf"], (want["pred"] == y).astype(np.float64), want["nll"], want["brier"], m)
    if exact:  # the same confidences in the same bins
        np.testing.assert_array_equal(r.top[:m], top[:m])
        np.testing.assert_array_equal(r.top[2 * m : 3 * m], top[2 * m : 3 * m])
    else:  # a confidence from float exponentials within round-off of an edge may change bins
        assert np.abs(r.top[:m] - top[:m]).sum() <= 2
    assert r.top[:m].sum() == 67
    np.testing.assert_allclose(r.top[m : 2 * m].sum(), want["conf"].sum(), rtol=rel)
    assert r.top[2 * m : 3 * m].sum() == (want["pred"] == y).sum()
    np.testing.assert_allclose(r.top[3 * m :], top[3 * m :], rtol=rel, atol=1e-6 if rel > 1e-12 else 1e-13)
    assert r.cw_p is not None and r.cw_y is not None
    if exact:  # the same doubles in the same bins: the sums agree to round-off
        np.testing.assert_array_equal(r.cw_y.numpy(), want["cw_y"])
        np.testing.assert_allclose(r.cw_p.numpy(), want["cw_p"], rtol=1e-12, atol=1e-13)
    else:  # p from float exponentials: a value within round-off of an edge may change bins
        got = float((r.cw_p - r.cw_y).abs().sum())
        assert got == pytest.approx(float(np.abs(want["cw_p"] - want["cw_y"]).sum()), rel=1e-4)


def scaled_reference(x: torch.Tensor, y: np.ndarray, beta: float) -> dict[str, np.ndarray]:
    """Float64 NumPy: the NLL of softmax(beta z) and the mean and variance of z under it."""
    z = x.to(torch.float64).numpy()
    n = z.shape[0]
    a = beta * z
    lse = a.max(1) + np.log(np.exp(a - a.max(1, keepdims=True)).sum(1))
    p = np.exp(a - lse[:, None])
    zy = z[np.arange(n), y]
    mean = (p * z).sum(1)
    return {"conf": p.max(1), "nll": lse - beta * zy, "dmean": mean - zy,
            "dvar": (p * (z - mean[:, None]) ** 2).sum(1)}


SCALED = list(itertools.product(PATHS, DTYPES, (0.37, 1.0, 4.0), (2, 37, 1000)))


@pytest.mark.parametrize("where", PATHS)
@pytest.mark.parametrize("from_logits", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("margin", [0.5, 3.0, 8.0, 16.0, 30.0])
def test_confident_rows_keep_the_relative_precision_of_nll_and_brier(
    where: str, from_logits: bool, dtype: torch.dtype, margin: float
) -> None:
    """Rows whose label holds most of the probability: the NLL and Brier score are small, and
    the forms -log p_y = m + log s - z_y and q - 2 p_y + 1 would cancel to the round-off of the
    float sums (a Brier of 8.9e-8 read as 6.0e-8 once). Each row's values keep the relative
    precision of the storage dtype against float64 computed from the other entries."""
    g = torch.Generator().manual_seed(int(margin * 10))
    n, k = 64, 50
    z = torch.randn((n, k), generator=g, dtype=torch.float64)
    y = torch.randint(0, k, (n,), generator=g)
    z[torch.arange(n), y] += margin
    if from_logits:
        x = z.to(dtype)
        e = torch.exp(x.double() - x.double().max(1, keepdim=True).values)
    else:
        x = torch.softmax(z, 1).to(dtype)
        e = x.double()
    s = e.sum(1)
    e_y = e[torch.arange(n), y]
    others = e.scatter(1, y[:, None], 0.0)
    s_ex, q_ex = others.sum(1), others.square().sum(1)
    if from_logits:
        want_nll, want_brier = torch.log1p(s_ex / e_y), (q_ex + s_ex.square()) / s.square()
    else:
        want_nll, want_brier = -torch.log(e_y), q_ex + (1 - e_y).square()
    with path(where):
        r = row_statistics(x, y, from_logits=from_logits, name="x")
    rtol = 3e-6 if dtype == torch.float32 else 1e-11
    np.testing.assert_allclose(r.nll, want_nll.numpy(), rtol=rtol, atol=0)
    np.testing.assert_allclose(r.brier, want_brier.numpy(), rtol=rtol, atol=0)


@pytest.mark.parametrize(("where", "dtype", "beta", "k"), SCALED)
def test_inverse_temperature_and_moments_match_float64_reference(
    where: str, dtype: torch.dtype, beta: float, k: int
) -> None:
    """``scale`` (temperature scaling's inverse temperature) and ``moments`` (its Newton step)."""
    x, y = data(67, k, dtype, True, seed=k + 7)
    with path(where):
        r = row_statistics(x, torch.from_numpy(y), from_logits=True, name="x", scale=beta, moments=True)
    want = scaled_reference(x, y, beta)
    tol = {"rtol": 1e-12, "atol": 1e-12} if dtype == torch.float64 else {"rtol": 1e-5, "atol": 1e-5}
    np.testing.assert_allclose(r.conf, want["conf"], **tol)
    np.testing.assert_array_equal(r.pred, x.to(torch.float64).numpy().argmax(1))
    for key in ("nll", "dmean", "dvar"):
        np.testing.assert_allclose(getattr(r, key), want[key], **tol, err_msg=key)


@pytest.mark.parametrize("where", PATHS)
def test_moments_are_the_derivatives_of_the_nll(where: str) -> None:
    """Sum of dmean = d/d(beta) of the summed NLL, sum of dvar = d/d(beta) of the sum of dmean
    (central differences in float64)."""
    x, y = data(300, 50, torch.float64, True, seed=11)
    yt = torch.from_numpy(y)

    def at(beta: float) -> RowStatistics:
        with path(where):
            return row_statistics(x, yt, from_logits=True, name="x", scale=beta, moments=True)

    h = 1e-5
    for beta in (0.3, 1.0, 2.5):
        mid, up, down = at(beta), at(beta + h), at(beta - h)
        assert mid.dmean is not None and mid.dvar is not None and up.nll is not None and down.nll is not None
        assert up.dmean is not None and down.dmean is not None
        slope = float(up.nll.sum() - down.nll.sum()) / (2 * h)
        curvature = float(up.dmean.sum() - down.dmean.sum()) / (2 * h)
        assert float(mid.dmean.sum()) == pytest.approx(slope, rel=1e-7)
        assert float(mid.dvar.sum()) == pytest.approx(curvature, rel=1e-7)


@pytest.mark.parametrize("where", PATHS)
def test_scale_and_moments_reject_what_they_cannot_take(where: str) -> None:
    x, y = data(5, 4, torch.float32, True, seed=0)
    yt = torch.from_numpy(y)
    with path(where):
        for bad in (0.0, -1.0, float("nan"), float("inf")):
            with pytest.raises(ValueError, match="scale must be a finite positive inverse temperature"):
                row_statistics(x, yt, from_logits=True, name="x", scale=bad)
        p = torch.softmax(x, 1)
        with pytest.raises(ValueError, match="scale and moments are for logits"):
            row_statistics(p, yt, from_logits=False, name="x", moments=True)
        big = torch.full((3, 4), 3e38)  # finite; z - max overflows to -inf in float
        big[:, 0] = -3e38
        r = row_statistics(big, yt[:3], from_logits=True, name="x", scale=0.5, moments=True)
        for key in ("nll", "dmean", "dvar"):
            assert np.isfinite(getattr(r, key)).all(), key


@pytest.mark.parametrize("where", PATHS)
@pytest.mark.parametrize("n_bins", [1, 2, 3, 7, 10, 15, 20, 100])
def test_entries_at_the_edges_bin_like_searchsorted(where: str, n_bins: int) -> None:
    """Entries exactly at b/M and one ulp to either side, in float64 and float32 rows."""
    edges = np.arange(n_bins + 1, dtype=np.float64) / n_bins
    vals = np.concatenate([edges, np.nextafter(edges, 2.0), np.nextafter(edges, -1.0)])
    vals = vals[(vals >= 0) & (vals <= 1)]
    for dtype in (np.float64, np.float32):
        v = vals.astype(dtype)
        x = np.stack([v, (1 - v.astype(np.float64)).astype(dtype)], 1)
        y = np.arange(v.shape[0]) % 2
        with path(where):
            r = row_statistics(torch.from_numpy(x), torch.from_numpy(y), from_logits=False, name="x",
                               n_bins=n_bins, scores=False)
        want = reference(torch.from_numpy(x), y, False, n_bins)
        assert r.cw_p is not None and r.cw_y is not None
        np.testing.assert_array_equal(r.cw_y.numpy(), want["cw_y"])
        np.testing.assert_allclose(r.cw_p.numpy(), want["cw_p"], rtol=1e-14, atol=1e-15)


@pytest.mark.parametrize("from_logits", [True, False])
def test_threads_and_layouts_do_not_change_the_sums(from_logits: bool) -> None:
    x, y = data(3001, 53, torch.float32, from_logits, seed=5)
    yt = torch.from_numpy(y)

    def run(t: torch.Tensor) -> RowStatistics:
        return row_statistics(t, yt, from_logits=from_logits, name="x", n_bins=15, top=True)

    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)  # a team of two, whatever the session's count (tests/conftest.py)
        base = run(x)
        torch.set_num_threads(1)
        one = run(x)
    finally:
        torch.set_num_threads(before)
    strided = run(torch.empty((53, 3001), dtype=torch.float32).copy_(x.T).T)  # column-major rows
    padded = run(torch.zeros((3001, 64), dtype=torch.float32)[:, :53].copy_(x))  # a row stride of 64
    for other in (one, strided, padded):
        np.testing.assert_array_equal(other.conf, base.conf)
        np.testing.assert_array_equal(other.pred, base.pred)
        assert other.cw_p is not None and base.cw_p is not None and other.cw_y is not None
        np.testing.assert_allclose(other.cw_p.numpy(), base.cw_p.numpy(), rtol=1e-12, atol=1e-13)
        np.testing.assert_array_equal(other.cw_y.numpy(), base.cw_y.numpy())
        assert other.top is not None and base.top is not None
        np.testing.assert_allclose(other.top, base.top, rtol=1e-12)
        np.testing.assert_array_equal(other.top[:15], base.top[:15])


@pytest.mark.parametrize("storage", [torch.float32, torch.float64, torch.bfloat16])
def test_the_kernel_counts_every_row_check_rows_rejects(storage: torch.dtype) -> None:
    """The native path runs the row checks only where the kernel counted a suspect row: rows
    at, inside and just outside each tolerance, in both orders of rows, against the checks of
    check_rows on the kernel's own per-row outputs."""
    if not native.available():
        pytest.skip("the native kernels are not built on this machine")
    tol = cal_inputs.sum_atol(storage)
    atol = cal_inputs.RANGE_ATOL
    good = torch.full((8,), 1 / 8, dtype=torch.float64)

    def row(**where: float) -> torch.Tensor:
        r = good.clone()
        for k, v in where.items():
            r[int(k[1:])] = v
        return r

    cases = {
        "fine": good,
        "inside the sum's tolerance": row(c0=1 / 8 + tol / 4, c1=1 / 8 + tol / 4),
        "over the sum's tolerance": row(c0=1 / 8 + 2 * tol),
        "under the sum's tolerance": row(c0=1 / 8 - 2 * tol),
        "below zero": row(c0=-4 * atol, c1=1 / 8 + 4 * atol),
        "above one": row(c0=1 + 4 * atol, c1=0.0, c2=0.0, c3=0.0, c4=0.0, c5=0.0, c6=0.0, c7=-4 * atol),
        "nan": row(c3=float("nan")),
        "inf": row(c3=float("inf")),
    }
    bad = {"over the sum's tolerance", "under the sum's tolerance", "below zero", "above one", "nan", "inf"}
    for name, r in cases.items():
        for first in (True, False):
            x = (torch.stack([r, good, good]) if first else torch.stack([good, good, r])).to(storage)
            y = torch.zeros(3, dtype=torch.int64)
            rows = native.calibration_rows(x, y, from_logits=False, limits=(-atol, 1 + atol, tol))
            assert rows.rowmin is not None
            try:
                cal_inputs.check_rows(x, torch.from_numpy(rows.rowsum), torch.from_numpy(rows.rowmin),
                                      torch.from_numpy(rows.conf), from_logits=False, name="p", start=0,
                                      storage=storage)
            except ValueError:
                rejected = True
            else:
                rejected = False
            assert rows.suspects == rejected, name
            assert rejected == (name in bad) or "tolerance" in name, name  # sums: as rounded in storage
            if rejected:
                with pytest.raises(ValueError, match=f"p: row {0 if first else 2} "):
                    row_statistics(x, y, from_logits=False, name="p", n_bins=15, top=True)
    # logits: a sum that overflows is a suspect that the checks let through
    big = torch.full((2, 4), 3e38)
    rows = native.calibration_rows(big, torch.zeros(2, dtype=torch.int64), from_logits=True)
    assert rows.suspects == 2
    row_statistics(big, torch.zeros(2, dtype=torch.int64), from_logits=True, name="z", n_bins=15, top=True)
    # masked logits (-inf) with a finite max are valid rows, not suspects: no second read of
    # them in every pass (a temperature fit on masked vocabulary logits ran 12x slower); NaN,
    # +inf and a row masked throughout are
    z = torch.tensor([[0.0, -math.inf, 1.0], [-math.inf, 2.0, -math.inf], [0.0, math.nan, -math.inf],
                      [0.0, math.inf, -math.inf], [-math.inf] * 3])
    y = torch.zeros(5, dtype=torch.int64)
    for float_dtype in (torch.float32, torch.float64):
        rows = native.calibration_rows(z[:2].to(float_dtype), y[:2], from_logits=True)
        assert rows.suspects == 0 and np.isfinite(rows.conf).all()
        assert native.calibration_rows(z.to(float_dtype), y, from_logits=True).suspects == 3


@pytest.mark.parametrize("where", PATHS)
def test_many_classes(where: str) -> None:
    """A vocabulary-sized row (per-thread sums of K M entries) against the reference."""
    x, y = data(24, 50_000, torch.float32, True, seed=1)
    with path(where):
        r = row_statistics(x, torch.from_numpy(y), from_logits=True, name="x", n_bins=15)
    want = reference(x, y, True, 15)
    np.testing.assert_allclose(r.conf, want["conf"], rtol=2e-6)
    assert r.cw_p is not None and r.cw_y is not None
    assert float(r.cw_p.sum()) == pytest.approx(24.0, rel=1e-6)  # every probability, once
    np.testing.assert_array_equal(r.cw_y.numpy(), want["cw_y"])


@pytest.mark.parametrize("where", PATHS)
def test_hostile_rows(where: str) -> None:
    y = torch.tensor([0, 1, 2])
    z = torch.zeros((3, 4))
    with path(where):
        for bad in (float("nan"), float("inf")):
            zb = z.clone()
            zb[1, 3] = bad
            with pytest.raises(ValueError, match="logits: row 1 contains NaN or infinite values"):
                row_statistics(zb, y, from_logits=True, name="logits", n_bins=15)
        zb = z.clone()
        zb[1] = float("-inf")  # every class masked: no probability
        with pytest.raises(ValueError, match=r"logits: row 1 has no finite logit \(every entry is -inf\)"):
            row_statistics(zb, y, from_logits=True, name="logits", n_bins=15)
        zb[1, :3] = 0.0  # a masked class: probability 0, the other three a third each
        r = row_statistics(zb, y, from_logits=True, name="logits", n_bins=15)
        np.testing.assert_allclose(r.conf, [0.25, 1 / 3, 0.25], rtol=1e-6)
        np.testing.assert_allclose(r.nll, [np.log(4), np.log(3), np.log(4)], rtol=1e-6)  # type: ignore[arg-type]
        big = torch.full((3, 4), 3e38)  # finite, though the row sums overflow in float
        big[:, 0] = -3e38
        r = row_statistics(big, y, from_logits=True, name="logits", n_bins=15)
        np.testing.assert_allclose(r.conf, 1 / 3, rtol=1e-6)
        assert np.isfinite(r.nll).all() and np.isfinite(r.brier).all()  # type: ignore[arg-type]
        p = torch.full((3, 4), 0.25)
        p[2] = torch.tensor([1.5, -0.5, 0.0, 0.0])
        with pytest.raises(ValueError, match=r"probs: row 2 has values outside \[0, 1\]"):
            row_statistics(p, y, from_logits=False, name="probs")
        p[2] = torch.tensor([0.5, 0.2, 0.0, 0.0])
        with pytest.raises(ValueError, match=r"probs: row 2 sums to 0\.7, not 1"):
            row_statistics(p, y, from_logits=False, name="probs")


@pytest.mark.parametrize("where", PATHS)
def test_meter_equals_one_shot_on_either_path(where: str) -> None:
    x, y = data(2503, 40, torch.float32, True, seed=9)
    with path(where):
        m = cal.CalibrationMeter(from_logits=True)
        for s in range(0, 2503, 600):
            m.update(x[s : s + 600], y[s : s + 600])
        got = m.compute()
        want = {
            "ece": cal.ece(x, y, from_logits=True),
            "classwise_ece": cal.classwise_ece(x, y, from_logits=True),
            "brier": cal.brier(x, y, from_logits=True),
            "nll": cal.nll(x, y, from_logits=True),
            "accuracy": cal.accuracy(x, y, from_logits=True),
        }
    for key, value in want.items():
        assert got[key] == pytest.approx(value, rel=1e-12, abs=1e-15), key
    with native.disabled():
        other = cal.classwise_ece(x, y, from_logits=True)
    assert got["classwise_ece"] == pytest.approx(other, rel=1e-4)  # the two paths, to float round-off


def _cpu_has(*flags: str) -> bool:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    have = next((ln.split(":", 1)[1].split() for ln in text.splitlines() if ln.startswith("flags")), [])
    return all(f in have for f in flags)


#: the builds of the classwise pass: the body's portable loop, and the intrinsics of each ISA
BUILDS = {
    "portable": (["-DCE_PORTABLE"], ()),
    "avx2": (["-mavx2", "-mfma", "-mno-avx512f"], ("avx2", "fma")),
    "avx512": (["-mavx2", "-mfma", "-mavx512f", "-mavx512dq"], ("avx512f", "avx512dq")),
}


@pytest.fixture(scope="module")
def build_library(tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], ctypes.CDLL]:
    """The library of a build of :data:`BUILDS`, compiled once per module; skips where this
    CPU cannot run it."""
    built: dict[str, ctypes.CDLL] = {}

    def get(build: str) -> ctypes.CDLL:
        cc = native._compiler()
        if cc is None or not native.available():
            pytest.skip("no C compiler, or the native kernels are not built")
        flags, cpu = BUILDS[build]
        if not _cpu_has(*cpu):
            pytest.skip(f"this CPU lacks {', '.join(cpu)}")
        if build not in built:
            src = Path(native.__file__).parent / "_kernels.c"
            so = tmp_path_factory.mktemp("builds") / f"{build}.so"
            subprocess.run([cc, "-O1", *flags, "-fopenmp-simd", "-fno-math-errno", "-fno-trapping-math",
                            "-shared", "-fPIC", "-pthread", "-o", str(so), str(src)], check=True,
                           capture_output=True)
            built[build] = ctypes.CDLL(str(so))
            built[build].ce_calibration_f32.restype = ctypes.c_int
        return built[build]

    return get


@pytest.mark.parametrize("build", list(BUILDS))
@pytest.mark.parametrize("n_cols", [7, 301])
@pytest.mark.parametrize("from_logits", [True, False])
def test_each_build_equals_the_built_one(
    build_library: Callable[[str], ctypes.CDLL], from_logits: bool, n_cols: int, build: str
) -> None:
    """The classwise pass of each build (portable C; AVX2 + FMA or AVX-512 intrinsics, where
    this CPU runs them) against the library in use, which the other tests hold to the
    reference: rows shorter than one vector step (7) and with a tail (301)."""
    lib = build_library(build)
    x, y = data(700, n_cols, torch.float32, from_logits, seed=3)
    yt = torch.from_numpy(y)
    want = native.calibration_rows(x, yt, from_logits=from_logits, n_bins=15, top=True)
    got = native.calibration_rows(x, yt, from_logits=from_logits, n_bins=15, top=True, library=lib)
    np.testing.assert_allclose(got.conf, want.conf, rtol=1e-6)
    np.testing.assert_array_equal(got.pred, want.pred)
    assert got.top is not None and want.top is not None
    np.testing.assert_allclose(got.top, want.top, rtol=1e-5)
    assert float(got.top[:15].sum()) == 700
    assert got.cw_p is not None and want.cw_p is not None and got.cw_y is not None and want.cw_y is not None
    assert float(want.cw_y.sum()) == 700 and float(want.cw_y.reshape(15, n_cols)[1:].sum()) > 0
    if from_logits:  # e from differently contracted polynomials: an edge case may change bins
        assert float((got.cw_p - got.cw_y).abs().sum()) == pytest.approx(
            float((want.cw_p - want.cw_y).abs().sum()), rel=1e-5)
        want_m = native.calibration_rows(x, yt, from_logits=True, scale=0.4, moments=True)
        got_m = native.calibration_rows(x, yt, from_logits=True, scale=0.4, moments=True, library=lib)
        for key in ("nll", "dmean", "dvar"):
            np.testing.assert_allclose(getattr(got_m, key), getattr(want_m, key), rtol=1e-5,
                                       atol=2e-5, err_msg=key)
    else:
        np.testing.assert_array_equal(got.cw_y.numpy(), want.cw_y.numpy())
        np.testing.assert_allclose(got.cw_p.numpy(), want.cw_p.numpy(), rtol=1e-12, atol=1e-13)
        for key in ("brier", "rowsum", "rowmin"):
            np.testing.assert_allclose(getattr(got, key), getattr(want, key), rtol=1e-6,
                                       atol=1e-7, err_msg=key)


@pytest.mark.parametrize("build", list(BUILDS))
@pytest.mark.parametrize("scale", [1.0, 0.02, 37.0])
def test_each_build_on_extreme_logits(build_library: Callable[[str], ctypes.CDLL], build: str,
                                      scale: float) -> None:
    """The exponentials of each build where they leave the normal range: masked classes (-inf),
    gaps of 80-105 below the max (subnormal exponentials), of 1e4 (0), ties at the max (the first
    argmax) and rows of 33 entries (two vectors and a masked tail). Against float64 torch."""
    g = torch.Generator().manual_seed(11)
    x = torch.randn((64, 33), generator=g, dtype=torch.float64) * 2
    x[::3, 5] = -math.inf
    x[1::3, 7:20] = x[1::3, :1] - torch.linspace(80, 105, 13, dtype=torch.float64) / scale
    x[2::3, 30] = x[2::3].amax(1) + 1e4 / scale
    x[::4, 31] = x[::4, 32] = x[::4].amax(1) + 1.5
    x32 = x.float()
    y = torch.randint(0, 33, (64,), generator=g)
    y[::3] = 6
    lib = build_library(build)
    got = native.calibration_rows(x32, y, from_logits=True, scale=scale, n_bins=15, top=True, moments=True,
                                  library=lib)
    z = x32.double() * scale
    logp = torch.log_softmax(z, 1)
    np.testing.assert_allclose(got.conf, logp.amax(1).exp().numpy(), rtol=2e-6)
    np.testing.assert_array_equal(got.pred, x32.argmax(1).numpy())  # the first of tied maxima
    np.testing.assert_allclose(got.nll, -logp.gather(1, y[:, None])[:, 0].numpy(), rtol=1e-5, atol=1e-6)
    assert got.cw_p is not None and np.isfinite(got.cw_p.numpy()).all()
    assert float(got.cw_p.sum()) == pytest.approx(64.0, rel=1e-6)  # every row's probabilities
    p = logp.exp()
    xf = torch.where(p > 0, x32.double(), 0.0)  # a masked class adds nothing (not 0 * inf)
    mean = (p * xf).sum(1)
    var = (p * (xf - mean[:, None]) ** 2).sum(1)
    label = x32.double().gather(1, y[:, None])[:, 0]
    np.testing.assert_allclose(got.dmean, (mean - label).numpy(), rtol=1e-4, atol=2e-3 / scale)
    np.testing.assert_allclose(got.dvar, var.numpy(), rtol=1e-3, atol=1e-4 / scale**2)


@pytest.mark.parametrize("where", PATHS)
def test_a_rejected_batch_adds_nothing_to_the_meter(where: str) -> None:
    """A bad row past the first chunk of rows: the meter keeps nothing of that batch."""
    x, y = data(140_000, 8, torch.float32, True, seed=2)  # more rows than one chunk holds
    good, yg = x[:500], y[:500]
    with path(where):
        m = cal.CalibrationMeter(from_logits=True)
        bad = x.clone()
        bad[-1, 3] = float("nan")
        with pytest.raises(ValueError, match="logits: row 139999 contains NaN"):
            m.update(bad, y)
        m.update(good, yg)
        got = m.compute()
        assert got["count"] == 500
        assert got["classwise_ece"] == pytest.approx(cal.classwise_ece(good, yg, from_logits=True), rel=1e-12)
        assert got["ece"] == pytest.approx(cal.ece(good, yg, from_logits=True), rel=1e-12)


@pytest.mark.parametrize("where", PATHS)
def test_column_major_input_in_chunks(where: str) -> None:
    """Rows that are not contiguous are read a chunk at a time (no full-size copy): same numbers
    as the contiguous input, and a bad row named by its index in the whole input."""
    x, y = data(300_000, 8, torch.float32, True, seed=4)  # a few chunks of rows
    yt = torch.from_numpy(y)
    col = torch.empty((8, 300_000), dtype=torch.float32).copy_(x.T).T
    with path(where):
        want = row_statistics(x, yt, from_logits=True, name="x", n_bins=15, top=True)
        got = row_statistics(col, yt, from_logits=True, name="x", n_bins=15, top=True)
        col[200_000, 5] = float("nan")
        with pytest.raises(ValueError, match="x: row 200000 contains NaN"):
            row_statistics(col, yt, from_logits=True, name="x", n_bins=15)
    np.testing.assert_array_equal(got.conf, want.conf)
    np.testing.assert_array_equal(got.pred, want.pred)
    assert got.cw_p is not None and want.cw_p is not None and got.cw_y is not None and want.cw_y is not None
    np.testing.assert_allclose(got.cw_p.numpy(), want.cw_p.numpy(), rtol=1e-12)
    np.testing.assert_array_equal(got.cw_y.numpy(), want.cw_y.numpy())
    assert got.top is not None and want.top is not None  # summed over the chunks
    np.testing.assert_array_equal(got.top[:15], want.top[:15])
    np.testing.assert_allclose(got.top, want.top, rtol=1e-12)
    assert got.top[:15].sum() == 300_000
