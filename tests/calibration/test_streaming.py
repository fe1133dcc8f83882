"""CalibrationMeter: streaming over batches and gloo ranks equals the one-shot functions."""

from __future__ import annotations

import contextlib
import os
from typing import Any

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from _helpers import gloo_world_and_pair
from crossent import calibration as cal
from crossent.calibration.streaming import CalibrationMeter


def dataset(kind: str, n: int, seed: int, dtype: Any = np.float64) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    if kind == "multiclass":
        return (rng.normal(size=(n, 6)) * 3).astype(dtype), rng.integers(0, 6, n)
    if kind == "binary":
        z = rng.normal(size=n) * 2
        return z.astype(dtype), (rng.random(n) < 1 / (1 + np.exp(-0.5 * z))).astype(np.int64)
    z = rng.normal(size=(n, 3)) * 2
    return z.astype(dtype), (rng.random((n, 3)) < 0.4).astype(np.int64)


def one_shot(z: np.ndarray, y: np.ndarray, binning: str, ignore: int | None) -> dict[str, float]:
    kw: dict[str, Any] = {"from_logits": True, "ignore_index": ignore}
    return {
        "ece": cal.ece(z, y, binning=binning, **kw),  # type: ignore[arg-type]
        "classwise_ece": cal.classwise_ece(z, y, **kw),
        "brier": cal.brier(z, y, **kw),
        "nll": cal.nll(z, y, **kw),
        "accuracy": cal.accuracy(z, y, **kw),
    }


def check(meter: CalibrationMeter, want: dict[str, float], count: int) -> None:
    got = meter.compute()
    assert got["count"] == count
    for key, value in want.items():
        assert got[key] == pytest.approx(value, rel=1e-12, abs=1e-15), key


CASES = [
    (kind, binning, ignore)
    for kind in ("multiclass", "binary", "multilabel")
    for binning in ("width", "mass")
    for ignore in (None, -100)
]


@pytest.mark.parametrize(("kind", "binning", "ignore"), CASES)
def test_batches_equal_one_shot(kind: str, binning: str, ignore: int | None) -> None:
    z, y = dataset(kind, 701, seed=len(kind))
    if ignore is not None:
        y = y.copy()
        y.reshape(-1)[::7] = ignore
    meter = CalibrationMeter(binning=binning, ignore_index=ignore, from_logits=True)  # type: ignore[arg-type]
    for start, stop in ((0, 1), (1, 100), (100, 100), (100, 523), (523, 701)):  # uneven, one empty
        if stop > start:
            meter.update(torch.from_numpy(z[start:stop]), torch.from_numpy(y[start:stop]))
    count = int((y != ignore).sum()) if ignore is not None else y.size
    want = one_shot(z, y, binning, ignore)
    check(meter, want, count)
    meter.reset()
    with pytest.raises(RuntimeError, match="no samples"):
        meter.compute()


def test_float32_and_probabilities_detected() -> None:
    z, y = dataset("multiclass", 500, seed=3, dtype=np.float32)
    m = CalibrationMeter()
    m.update(z, y)  # logits detected on the first batch
    assert m.from_logits is True
    assert m.compute()["ece"] == cal.ece(z, y, from_logits=True)  # same bins, same order: bit-equal
    p = torch.softmax(torch.from_numpy(z), 1).numpy()
    mp_ = CalibrationMeter(classwise=False)
    mp_.update(p[:200], y[:200])
    mp_.update(p[200:], y[200:])
    assert mp_.from_logits is False
    got = mp_.compute()
    assert got["ece"] == pytest.approx(cal.ece(p, y), rel=1e-12)
    assert got["brier"] == pytest.approx(cal.brier(p, y), rel=1e-6)
    assert np.isnan(got["classwise_ece"])


@pytest.mark.parametrize("path", ["native", "torch"])
@pytest.mark.parametrize("source", ["logits", "probs"])
@pytest.mark.parametrize("binning", ["width", "mass"])
def test_batches_below_and_above_2m_rows_add_their_classwise_sums_alike(
    path: str, source: str, binning: str
) -> None:
    """A batch of fewer than 2 M rows adds its classwise sums into the meter's own by a second
    pass over its validated rows; larger ones make theirs and add them. Batches of 1, 2 M - 1,
    2 M and 5 M rows (M = 10) in any mix equal the one-shot functions on all rows, and a small
    batch that a bad row makes refused leaves the meter as it was, to the bit."""
    from crossent.backends import native

    m_bins, k = 10, 7
    rng = np.random.default_rng(3)
    sizes = [1, 2 * m_bins - 1, 2 * m_bins, 5 * m_bins, 3, 2 * m_bins - 1]
    z = rng.normal(size=(sum(sizes), k)) * 3
    x = z if source == "logits" else torch.softmax(torch.from_numpy(z), 1).numpy()
    y = rng.integers(0, k, sum(sizes))
    logits = source == "logits"
    with native.disabled() if path == "torch" else contextlib.nullcontext():
        meter = CalibrationMeter(n_bins=m_bins, binning=binning, from_logits=logits)
        start = 0
        for i, size in enumerate(sizes):
            meter.update(x[start : start + size], y[start : start + size])
            start += size
            if i == 1:
                before = meter.state_dict()
                bad = x[:5].copy()
                bad[3, 2] = np.nan
                with pytest.raises(ValueError, match="row 3 contains NaN"):
                    meter.update(bad, y[:5])
                after = meter.state_dict()
                assert before.keys() == after.keys()
                for key, value in before.items():
                    assert np.array_equal(np.asarray(value), np.asarray(after[key])), key
        got = meter.compute()
        kw = {"n_bins": m_bins, "from_logits": logits}
        want_cw = cal.classwise_ece(x, y, **kw)
        want_ece = cal.ece(x, y, binning=binning, **kw)
    assert got["classwise_ece"] == pytest.approx(want_cw, rel=1e-12, abs=1e-15)
    assert got["ece"] == pytest.approx(want_ece, rel=1e-12, abs=1e-15)
    assert got["count"] == sum(sizes)


def test_a_meters_own_sums_take_only_their_size() -> None:
    """The kernel adds a batch's classwise sums into given arrays only of the right size, dtype
    and layout (it would write past a smaller one)."""
    from crossent.backends import native

    if not native.available():
        pytest.skip("no native build")
    x, y = torch.randn(4, 3, dtype=torch.float64), torch.tensor([0, 1, 2, 0])
    good = (torch.zeros(3 * 5, dtype=torch.float64), torch.zeros(3 * 5, dtype=torch.float64))
    r = native.calibration_rows(x, y, from_logits=True, n_bins=5, cw_into=good)
    assert r.cw_p is good[0] and float(good[1].sum()) == 4.0
    for bad in [(torch.zeros(14, dtype=torch.float64), good[1]), (good[0], torch.zeros(15)),
                (good[0], torch.zeros(30, dtype=torch.float64)[::2])]:
        with pytest.raises(ValueError, match="cw_into must be two contiguous float64 CPU tensors of 15"):
            native.calibration_rows(x, y, from_logits=True, n_bins=5, cw_into=bad)
    with pytest.raises(ValueError, match="cw_into"):
        native.calibration_rows(x, y, from_logits=True, n_bins=5, classwise=False, cw_into=good)


@pytest.mark.parametrize("path", ["native", "torch"])
@pytest.mark.parametrize("bad_row", [None, 0, 150_000])
def test_detection_reads_the_batch_once_and_checks_every_row(
    monkeypatch: pytest.MonkeyPatch, path: str, bad_row: int | None
) -> None:
    """from_logits=None: the first chunk of rows tells logits apart, and the probabilities pass
    of the update itself checks the rest, so a batch of probabilities is read once; a row that is
    not a probability row anywhere in the first batch makes the meter take logits, as before."""
    from crossent.backends import native
    from crossent.calibration import _inputs, streaming

    n, k = 160_000, 8  # more rows than one chunk (2 ** 20 entries) holds
    rng = np.random.default_rng(5)
    z = rng.normal(size=(n, k)).astype(np.float32) * 2
    p = torch.softmax(torch.from_numpy(z), 1).numpy()
    y = rng.integers(0, k, n)
    if bad_row is not None:
        p[bad_row] *= 1.5  # sums to 1.5: not probabilities
    seen: list[int] = []
    calls: list[bool] = []
    looks, rows = _inputs.looks_like_probs, streaming.row_statistics

    def looks_counted(x: torch.Tensor, name: str = "predictions") -> bool:
        seen.append(int(x.shape[0]))
        return looks(x, name)

    def rows_counted(*args: Any, **kw: Any) -> Any:
        calls.append(kw["from_logits"])
        return rows(*args, **kw)

    monkeypatch.setattr(streaming, "looks_like_probs", looks_counted)
    monkeypatch.setattr(streaming, "row_statistics", rows_counted)
    m = CalibrationMeter()
    with native.disabled() if path == "torch" else contextlib.nullcontext():
        m.update(p, y)
        logits = bad_row is not None
        want = {f.__name__: f(p, y, from_logits=logits) for f in (cal.ece, cal.classwise_ece, cal.nll)}
    assert seen == [_inputs.CHUNK_ELEMENTS // k]
    if bad_row is None:
        assert m.from_logits is False and calls == [False]
    else:
        assert m.from_logits is True and calls == ([True] if bad_row == 0 else [False, True])
    got = m.compute()
    for key, value in want.items():
        assert got[key] == pytest.approx(value, rel=1e-12), key


@pytest.mark.parametrize("path", ["native", "torch"])
@pytest.mark.parametrize("bad_row", [0, 150_000])
def test_rows_off_one_anywhere_in_the_first_batch_warn_as_the_one_shot_nll(bad_row: int, path: str) -> None:
    """Entries in [0, 1] whose row sums to 1.05, in the first chunk or after it: the meter reads
    the batch as logits, as ``cal.nll`` does, and says so with the same warning."""
    from crossent.backends import native

    n, k = 160_000, 8  # more rows than one chunk (2 ** 20 entries) holds
    rng = np.random.default_rng(6)
    p = torch.softmax(torch.from_numpy(rng.normal(size=(n, k))), 1).numpy()
    y = rng.integers(0, k, n)
    p[bad_row] = 1.05 / k
    m = CalibrationMeter()
    with native.disabled() if path == "torch" else contextlib.nullcontext():
        off_one = "every entry lies in \\[0, 1\\] but a row sums to 1.05"
        with pytest.warns(cal.CalibrationWarning, match=off_one):
            m.update(p, y)
        with pytest.warns(cal.CalibrationWarning, match="a row sums to 1.05"):
            want = cal.nll(p, y)
    assert m.from_logits is True
    assert m.compute()["nll"] == pytest.approx(want, rel=1e-12)


@pytest.mark.parametrize("from_logits", [None, False, True])
@pytest.mark.parametrize("bad_row", [0, 150_000])
def test_a_bad_row_names_the_input_as_the_meter_reads_it(bad_row: int, from_logits: bool | None) -> None:
    """A NaN in the first batch of a meter that is still telling probabilities from logits is
    an error about ``logits_or_probs``, wherever the row lies; once told, about ``probs`` or
    ``logits``. The meter is left as it was."""
    n, k = 160_000, 8
    rng = np.random.default_rng(7)
    p = torch.softmax(torch.from_numpy(rng.normal(size=(n, k))), 1).numpy()
    y = rng.integers(0, k, n)
    p[bad_row, 3] = np.nan
    name = {None: "logits_or_probs", False: "probs", True: "logits"}[from_logits]
    m = CalibrationMeter(from_logits=from_logits)
    with pytest.raises(ValueError, match=f"^{name}: row {bad_row} contains NaN"):
        m.update(p, y)
    assert m.from_logits is from_logits
    with pytest.raises(RuntimeError, match="holds no samples"):
        m.compute()


def test_dyadic_sums_are_bit_exact() -> None:
    # probabilities k/64: every partial sum is exact in float64, so the order does not matter
    rng = np.random.default_rng(4)
    k = rng.integers(1, 64, size=(400, 1))
    p = np.concatenate([k / 64, 1 - k / 64], axis=1)
    y = rng.integers(0, 2, 400)
    m = CalibrationMeter(n_bins=10, from_logits=False)
    for s in range(0, 400, 33):
        m.update(p[s : s + 33], y[s : s + 33])
    assert m.compute()["ece"] == cal.ece(p, y, n_bins=10)
    assert m.compute()["classwise_ece"] == cal.classwise_ece(p, y, n_bins=10)


def test_errors() -> None:
    m = CalibrationMeter(from_logits=True)
    m.update(np.zeros((2, 3)), [0, 1])
    with pytest.raises(ValueError, match="3"):
        m.update(np.zeros((2, 4)), [0, 1])
    with pytest.raises(ValueError, match="binary"):
        m.update(np.zeros(2), [0, 1])
    with pytest.raises(ValueError, match="binning"):
        CalibrationMeter(binning="quantile")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="n_bins"):
        CalibrationMeter(n_bins=0)


# --------------------------------------------------------------------------------------------
# gloo ranks: each rank holds an uneven slice; after sync every rank has the global numbers

N_DIST = 301


def _check_ranks(rank: int, world: int, group: Any) -> None:
    cuts = np.linspace(0, N_DIST, world + 1).astype(int)
    cuts[1] = 5  # rank 0 holds 5 samples only
    lo, hi = cuts[rank], cuts[rank + 1]
    for kind in ("multiclass", "binary"):
        z, y = dataset(kind, N_DIST, seed=11)
        y = y.copy()
        y[::9] = -1
        want = {b: one_shot(z, y, b, -1) for b in ("width", "mass")}
        for binning in ("width", "mass"):
            m = CalibrationMeter(
                binning=binning,  # type: ignore[arg-type]
                num_classes=6 if kind == "multiclass" else None,
                ignore_index=-1,
                from_logits=True,
            )
            m.update(z[lo:hi], y[lo:hi])
            m.sync(group)
            check(m, want[binning], int((y != -1).sum()))
            m.sync(group)  # idempotent: reduces the local statistics again
            check(m, want[binning], int((y != -1).sum()))
    _check_class_agreement(rank, group)


def _check_class_agreement(rank: int, group: Any) -> None:
    """Without num_classes, the classwise sums' size comes from the ranks that measured a batch:
    rank 1 sees padding only and rank 2 nothing, and both take rank 0's K. Where no rank knows
    K, or the ranks disagree on it, every rank raises the same error (none is left waiting in a
    collective)."""
    z, y = dataset("multiclass", 40, seed=3)
    for binning in ("width", "mass"):
        m = CalibrationMeter(binning=binning, ignore_index=-1, from_logits=True)  # type: ignore[arg-type]
        if rank == 0:
            m.update(z, y)
        elif rank == 1:
            m.update(z, np.full(40, -1))
        m.sync(group)
        check(m, one_shot(z, y, binning, None), 40)
    with pytest.raises(RuntimeError, match="no rank has measured a batch"):
        CalibrationMeter(ignore_index=-1).sync(group)
    m = CalibrationMeter(from_logits=True)
    m.update(z if rank == 0 else z[:, :4], y % 4)
    with pytest.raises(ValueError, match="4 to 6 classes"):
        m.sync(group)
    m = CalibrationMeter(classwise=False, from_logits=True)  # no classwise sums: K is not needed
    if rank == 0:
        m.update(z, y)
    m.sync(group)
    assert m.compute()["count"] == 40
    _check_disagreements(rank, group)


def _check_disagreements(rank: int, group: Any) -> None:
    """What one meter refuses between its batches, or meters of other options, every rank
    refuses in sync() with the same error, its statistics unchanged, and the next collective
    of every rank is in step (the sync after it gives everyone's numbers)."""
    z, y = dataset("multiclass", 40, seed=4)
    zb, yb = dataset("binary", 40, seed=4)
    p = torch.softmax(torch.from_numpy(z), 1).numpy()
    first = rank == 0
    cases: list[tuple[dict[str, Any], Any, Any, str]] = [
        ({"n_bins": 10 if first else 12, "classwise": False}, z, y, "differ in n_bins"),
        ({"classwise": first, "num_classes": 6}, z, y, "differ in classwise"),
        ({"binning": "mass" if first else "width"}, z, y, "differ in binning"),
        ({"ignore_index": -1 if first else None}, z, y, "differ in ignore_index"),
        ({"ignore_index": -1 if first else -100}, z, y, "differ in ignore_index"),
        ({"classwise": False}, z if first else z[:, :4], y % 4, "4 to 6 classes"),
        ({"classwise": False}, zb if first else z[:, :2], yb if first else y % 2, "binary batches and"),
        ({}, z if first else p, y, "logits and others as probabilities"),
        ({}, zb if first else 1 / (1 + np.exp(-zb)), yb, "logits and others as probabilities"),
    ]
    for options, scores, labels, message in cases:
        m = CalibrationMeter(**options)
        m.update(scores, labels)
        before = m.compute()
        with pytest.raises(ValueError, match=message):
            m.sync(group)
        np.testing.assert_equal(m.compute(), before)  # NaN classwise ECE where none is kept
    m = CalibrationMeter(from_logits=True)  # the collectives are still in step
    m.update(z, y)
    m.sync(group)
    assert m.compute()["count"] == 40 * dist.get_world_size(group)


def _worker(rank: int, world: int, init_method: str) -> None:
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=init_method, rank=rank, world_size=world)
    gloo_world_and_pair(lambda group: _check_ranks(rank, world if group is None else 2, group))


def test_gloo_sync_world_sizes_3_and_2(tmp_path: Any) -> None:
    mp.spawn(_worker, args=(3, f"file://{tmp_path / 'store'}"), nprocs=3, join=True)


@pytest.mark.parametrize(
    ("config", "want"),
    [
        ("cpu:gloo,cuda:gloo", "cpu"),  # init_process_group("gloo")
        ("cpu:gloo,cuda:nccl", "cpu"),  # init_process_group() on a GPU machine
        ("cpu:mpi,cuda:mpi", "cpu"),
        ("cuda:nccl", "cuda:3"),  # init_process_group("nccl"): NCCL takes no CPU tensor
        ("xpu:xccl", "xpu:3"),
    ],
)
def test_sync_runs_its_collectives_where_the_backend_takes_tensors(
    config: str, want: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The statistics live on the CPU; an NCCL-only group gets them on the current GPU (an
    all_reduce of a CPU tensor there fails with "No backend type associated with device type
    cpu"), every group that takes CPU tensors keeps them there."""
    from crossent.calibration.streaming import _collective_device

    monkeypatch.setattr(dist, "get_backend_config", lambda group=None: config)
    for kind in ("cuda", "xpu"):
        if getattr(torch, kind, None) is not None:
            monkeypatch.setattr(getattr(torch, kind), "current_device", lambda: 3, raising=False)
    assert _collective_device(None) == torch.device(want)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU (NCCL)")
def test_nccl_sync_of_cpu_statistics(tmp_path: Any) -> None:
    """One rank of an NCCL-only group: sync moves the statistics to the GPU and back, and
    compute() gives the one-shot numbers, for both kinds of bins."""
    dist.init_process_group("nccl", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        z, y = dataset("multiclass", N_DIST, seed=11)
        for binning in ("width", "mass"):
            m = CalibrationMeter(binning=binning, num_classes=6, from_logits=True)  # type: ignore[arg-type]
            m.update(z, y)
            m.sync()
            check(m, one_shot(z, y, binning, None), N_DIST)
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("from_logits", [True, False])
@pytest.mark.parametrize("n_bins", [15, 10, 7])
def test_float32_many_classes_classwise_equals_one_shot(from_logits: bool, n_bins: int) -> None:
    """float32 with 100 classes and uneven batches: every probability lands in the bin the
    one-shot functions give it (same softmax arithmetic), so the classwise sums agree to
    float64 round-off; a few entries sit exactly on bin edges."""
    rng = np.random.default_rng(n_bins)
    z = (rng.normal(size=(3000, 100)) * 4).astype(np.float32)
    y = rng.integers(0, 100, 3000)
    x = z if from_logits else torch.softmax(torch.from_numpy(z), 1).numpy()
    if not from_logits:
        x[0] = 0.0
        x[0, :n_bins] = np.float32(1 / n_bins)  # every entry on the first edge
    meter = CalibrationMeter(n_bins=n_bins, from_logits=from_logits)
    for start, stop in ((0, 777), (777, 1500), (1500, 3000)):
        meter.update(x[start:stop], y[start:stop])
    got = meter.compute()
    kw: dict[str, Any] = {"from_logits": from_logits, "n_bins": n_bins}
    assert got["classwise_ece"] == pytest.approx(cal.classwise_ece(x, y, **kw), rel=1e-12)
    assert got["ece"] == pytest.approx(cal.ece(x, y, **kw), rel=1e-12)
    assert got["brier"] == pytest.approx(cal.brier(x, y, from_logits=from_logits), rel=1e-12)


@pytest.mark.parametrize("shape", [(40,), (20, 3)], ids=["binary", "multilabel"])
def test_binary_logits_nll_is_not_clipped(shape: tuple[int, ...]) -> None:
    """Logits far on the wrong side: the meter's NLL is softplus(z) - y z, as ``nll``'s, not
    -log of a probability clipped at the smallest float (about 708 per sample)."""
    rng = np.random.default_rng(5)
    z = rng.normal(size=shape) * 60
    y = (rng.random(shape) < 0.5).astype(np.int64)
    want = float(np.mean(np.logaddexp(0.0, z) - y * z))
    for from_logits in (True, None):
        m = CalibrationMeter(from_logits=from_logits)
        m.update(z[: len(z) // 2], y[: len(z) // 2])
        m.update(z[len(z) // 2 :], y[len(z) // 2 :])
        assert m.compute()["nll"] == pytest.approx(want, rel=1e-12)
    assert cal.nll(z, y, from_logits=True) == pytest.approx(want, rel=1e-12)


def test_detection_ignores_padding_rows() -> None:
    """Rows or entries whose label is ignore_index may hold any padding: whether the input is
    probabilities or logits is decided on what is measured."""
    rng = np.random.default_rng(0)
    p = torch.softmax(torch.from_numpy(rng.normal(size=(50, 4))), 1).numpy()
    y = rng.integers(0, 4, 50)
    p[-5:], y[-5:] = 0.0, -100
    m = CalibrationMeter(ignore_index=-100)
    m.update(p, y)
    assert m.compute()["ece"] == pytest.approx(cal.ece(p[:-5], y[:-5]), rel=1e-12)
    pb, yb = rng.uniform(size=50), rng.integers(0, 2, 50)
    pb[-3:], yb[-3:] = -1.0, -100
    k = slice(0, 47)
    want = float(-np.mean(np.where(yb[k] == 1, np.log(pb[k]), np.log1p(-pb[k]))))
    assert cal.nll(pb, yb, ignore_index=-100) == pytest.approx(want, rel=1e-12)
    m = CalibrationMeter(ignore_index=-100)
    m.update(pb, yb)
    assert m.compute()["nll"] == pytest.approx(want, rel=1e-12)


@pytest.mark.parametrize("kind", ["multiclass", "binary"])
def test_a_rejected_batch_leaves_the_meter_as_it_was(kind: str) -> None:
    """A first batch with NaN is refused; the detection it started is forgotten, so the next
    batch of probabilities is read as probabilities."""
    rng = np.random.default_rng(1)
    if kind == "multiclass":
        p = torch.softmax(torch.from_numpy(rng.normal(size=(50, 4))), 1).numpy()
        y = rng.integers(0, 4, 50)
    else:
        p, y = rng.uniform(size=50), rng.integers(0, 2, 50)
    bad = p.copy()
    bad[3] = np.nan
    m = CalibrationMeter()
    with pytest.raises(ValueError, match="NaN"):
        m.update(bad, y)
    assert m.from_logits is None
    m.update(p, y)
    assert m.compute()["ece"] == pytest.approx(cal.ece(p, y), rel=1e-12)


def test_negative_strides() -> None:
    """np.flip views (negative strides, which torch refuses) are read as their values."""
    rng = np.random.default_rng(2)
    p = torch.softmax(torch.from_numpy(rng.normal(size=(100, 4))), 1).numpy()
    y = rng.integers(0, 4, 100)
    want = cal.ece(p[::-1].copy(), y[::-1].copy())
    assert cal.ece(np.flip(p, 0), np.flip(y)) == pytest.approx(want, rel=1e-12)
    m = CalibrationMeter()
    m.update(np.flip(p, 0), np.flip(y))
    assert m.compute()["ece"] == pytest.approx(want, rel=1e-12)


@pytest.mark.parametrize("kind", ["binary", "multiclass"])
def test_a_later_batch_of_logits_names_the_meters_detection(kind: str) -> None:
    """A meter whose first batch looked like probabilities (binary logits that all fall in
    [0, 1], or rows of a softmax) refuses a later batch of logits, and the error says that the
    meter decided so and how to make it read logits (the call's own from_logits does not
    exist); the refused batch adds nothing. A meter told from_logits=False keeps the plain error."""
    g = torch.Generator().manual_seed(4)
    if kind == "binary":
        first, later = torch.rand(50, generator=g) * 0.9 + 0.05, torch.randn(50, generator=g) * 3
        y = (torch.rand(50, generator=g) < 0.5).float()
    else:
        first, later = torch.softmax(torch.randn(50, 3, generator=g), 1), torch.randn(50, 3, generator=g) * 3
        y = torch.randint(0, 3, (50,), generator=g)
    m = CalibrationMeter()
    m.update(first, y)
    want = m.compute()
    with pytest.raises(ValueError, match=r"\(this meter read its first batch as probabilities; if the scores"
                                         r" are logits, make it with CalibrationMeter\(from_logits=True\)\)"):
        m.update(later, y)
    assert m.compute() == want
    told = CalibrationMeter(from_logits=False)
    told.update(first, y)
    with pytest.raises(ValueError) as caught:
        told.update(later, y)
    assert "this meter read" not in str(caught.value)


def test_updates_inside_a_compiled_step_do_not_recompile() -> None:
    """A meter updated inside a torch.compile'd evaluation step runs eagerly there: traced, its
    per-batch Python numbers became guards, and every batch of another size recompiled the step
    (past torch's recompile limit: 32 graphs for 20 batches, several screens of warnings). The
    step compiles once per dynamic shape and the sums equal the eager ones."""
    torch.manual_seed(0)
    model = torch.nn.Linear(8, 4)
    compiled, eager = CalibrationMeter(), CalibrationMeter()
    torch._dynamo.reset()
    counts = torch._dynamo.utils.counters
    counts.clear()

    @torch.compile(backend="eager")
    def step(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        out = model(x)
        compiled.update(out, y)
        return out.sum()

    with torch.no_grad():
        for i in range(10):
            x, y = torch.randn(32 + i, 8), torch.randint(0, 4, (32 + i,))
            step(x, y)
            eager.update(model(x), y)
    assert counts["stats"]["unique_graphs"] <= 4, dict(counts["stats"])
    got, want = compiled.compute(), eager.compute()
    assert got["count"] == want["count"] == sum(32 + i for i in range(10))
    for key in ("ece", "classwise_ece", "nll", "brier"):
        assert got[key] == pytest.approx(want[key], rel=1e-12)


@pytest.mark.parametrize("binning", ["width", "mass"])
@pytest.mark.parametrize("kind", ["multiclass", "binary", "multilabel"])
def test_a_batch_failing_in_its_classwise_pass_adds_nothing(
    kind: str, binning: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Whatever step of an update fails (here the pass that gives the classwise sums), the
    statistics are those of the batches before it: no top-label bins or scores of the failed
    batch are left behind."""
    import crossent.calibration.streaming as streaming

    z, y = dataset(kind, 80, 7)
    m = CalibrationMeter(binning=binning, from_logits=True)
    m.update(z[:40], y[:40])
    want = m.compute()
    real = streaming.row_statistics

    def failing(*args: Any, **kwargs: Any) -> Any:
        if kwargs.get("classwise", True):
            raise ValueError("refused")
        return real(*args, **kwargs)

    monkeypatch.setattr(streaming, "row_statistics", failing)
    with pytest.raises(ValueError, match="refused"):
        m.update(z[40:], y[40:])
    monkeypatch.setattr(streaming, "row_statistics", real)
    assert m.compute() == want
    m.update(z[40:], y[40:])
    assert m.compute()["ece"] == pytest.approx(cal.ece(z, y, binning=binning, from_logits=True), rel=1e-12)


def test_reset_forgets_the_detected_input_kind() -> None:
    """from_logits=None detects per run of updates: after reset() (a new epoch) the next batch
    is detected afresh, so probabilities after an epoch of logits are not softmaxed again. An
    explicit from_logits stays."""
    z, y = dataset("multiclass", 60, seed=8)
    p = torch.softmax(torch.from_numpy(z), 1).numpy()
    m = CalibrationMeter()
    m.update(z, y)
    m.reset()
    assert m.from_logits is None
    m.update(p, y)
    assert m.compute()["ece"] == pytest.approx(cal.ece(p, y), rel=1e-12)
    fixed = CalibrationMeter(from_logits=True)
    fixed.reset()
    assert fixed.from_logits is True


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.bool, torch.uint8])
@pytest.mark.parametrize("kind", ["binary", "multilabel"])
def test_labels_of_any_torch_dtype(kind: str, dtype: torch.dtype) -> None:
    """0/1 targets cast to the model's dtype (bfloat16 has no NumPy type) are taken."""
    z, y = dataset(kind, 40, seed=9)
    m = CalibrationMeter(from_logits=True)
    m.update(z, torch.from_numpy(y).to(dtype))
    assert m.compute()["ece"] == pytest.approx(cal.ece(z, y, from_logits=True), rel=1e-12)


def test_labels_that_do_not_match_the_predictions_are_refused() -> None:
    """Empty or all-ignored labels add nothing only where the predictions are empty or match
    them; a batch whose labels were lost (an empty tensor) is an error, not a silent no-op."""
    z, y = dataset("multiclass", 4, seed=10)
    m = CalibrationMeter(ignore_index=-1, from_logits=True)
    m.update(np.zeros((0, 6)), np.zeros(0, np.int64))
    m.update(z, np.full(4, -1))  # all ignored: nothing to add
    with pytest.raises(ValueError, match="labels"):
        m.update(z, np.zeros(0, np.int64))
    with pytest.raises(ValueError, match="labels"):
        m.update(z, np.full(3, -1))
    m.update(z, y)
    assert m.compute()["count"] == 4


def test_binary_batches_have_two_classes() -> None:
    """Binary and multi-label batches are measured on [1 - p, p]: num_classes other than 2 is
    refused (a meter without updates would else give statistics of another length to sync)."""
    z, y = dataset("binary", 20, seed=11)
    with pytest.raises(ValueError, match="num_classes"):
        CalibrationMeter(num_classes=5, from_logits=True).update(z, y)
    m = CalibrationMeter(num_classes=2, from_logits=True)
    m.update(z, y)
    assert m.statistics().shape == CalibrationMeter(num_classes=2).statistics().shape


@pytest.mark.parametrize("kind", ["multiclass", "binary"])
def test_load_statistics_into_a_fresh_meter(kind: str) -> None:
    """The sum of two meters' statistics loads into a third with the same options, num_classes
    not given (it is read off the length), as the docstring promises."""
    z, y = dataset(kind, 90, seed=12)
    a, b = CalibrationMeter(from_logits=True), CalibrationMeter(from_logits=True)
    a.update(z[:50], y[:50])
    b.update(z[50:], y[50:])
    fresh = CalibrationMeter(from_logits=True)
    fresh.load_statistics(a.statistics() + b.statistics())
    check(fresh, one_shot(z, y, "width", None), 90)
    with pytest.raises(ValueError, match="shape"):
        CalibrationMeter().load_statistics(a.statistics()[:-1])
    with pytest.raises(ValueError, match="mass"):
        CalibrationMeter(binning="mass").load_statistics(a.statistics())


@pytest.mark.parametrize("form", ["multiclass", "binary", "multilabel"])
def test_compute_without_samples_says_why(form: str) -> None:
    """A meter with no update, or whose every label so far equals ``ignore_index``, has nothing
    to measure: ``compute`` says which, and ``reset`` forgets the ignored labels."""
    g = torch.Generator().manual_seed(5)
    x = {"multiclass": torch.randn(6, 4, generator=g), "binary": torch.rand(6, generator=g),
         "multilabel": torch.rand(6, 3, generator=g)}[form]
    y_shape = (6,) if form != "multilabel" else (6, 3)
    m = CalibrationMeter(ignore_index=-100)
    with pytest.raises(RuntimeError, match=r"holds no samples: call update\(logits, labels\) first"):
        m.compute()
    m.update(x, torch.full(y_shape, -100))
    m.update(x[:2], torch.full((2, *y_shape[1:]), -100))
    n = 8 * (3 if form == "multilabel" else 1)
    with pytest.raises(RuntimeError, match=f"all {n} labels of its updates equal ignore_index=-100"):
        m.compute()
    m.reset()
    with pytest.raises(RuntimeError, match="call update"):
        m.compute()
    labels = torch.zeros(y_shape, dtype=torch.int64)
    labels[0] = -100
    m.update(x, labels)
    assert m.compute()["count"] == (5 if form != "multilabel" else 15)


@pytest.mark.parametrize("kind", ["multiclass", "binary", "multilabel"])
def test_load_statistics_refuses_what_no_meter_makes(kind: str) -> None:
    """Statistics of another meter that happen to have the right length (5 bins of 21 classes
    read as 15 bins of 6), negative, NaN or fractional counts are refused with the reason,
    not turned into an ECE above 1 or a negative count."""
    z, y = dataset(kind, 90, seed=12)
    a = CalibrationMeter(from_logits=True)
    a.update(z, y)
    good = a.statistics()
    CalibrationMeter(from_logits=True).load_statistics(good + good)  # a sum is a sum
    bad = {"negated": -good, "nan": good * float("nan"), "half": good / 2}
    for flat in bad.values():
        with pytest.raises(ValueError, match=r"not a sum of CalibrationMeter\.statistics"):
            CalibrationMeter(from_logits=True).load_statistics(flat)
    shifted = good.clone()
    shifted[0] += 1  # one more sample in a bin than in the total
    with pytest.raises(ValueError, match="its bins count"):
        CalibrationMeter(from_logits=True).load_statistics(shifted)
    rng = np.random.default_rng(0)
    other = CalibrationMeter(n_bins=5)
    other.update(rng.normal(size=(400, 21)), rng.integers(0, 21, 400))
    assert other.statistics().shape[0] == 3 * 15 + 4 + 2 * 15 * 6
    with pytest.raises(ValueError, match="not a sum"):
        CalibrationMeter(n_bins=15).load_statistics(other.statistics())


@pytest.mark.parametrize("binning", ["width", "mass"])
def test_a_meter_of_probabilities_off_by_round_off_reloads_its_own_state(binning: str) -> None:
    """Probabilities within RANGE_ATOL of [0, 1] (a column completed as 1 - p0 - p1 in
    float32: entries of -6e-8; a confidence of 1 + 4e-6) are taken by update, so their sums
    (a classwise bin summing to -3e-6, an NLL below 0) load again, mid-stream, into a meter
    that then goes on as the first; a negative count is still refused."""
    g = torch.Generator().manual_seed(0)
    p01 = torch.softmax(torch.randn(64, 2, generator=g) * 2, 1) * (1 - 1e-9)
    p = torch.cat([p01, 1 - p01.sum(1, keepdim=True)], 1)
    p[:, 2] = torch.where(p[:, 2] > 0, p[:, 2], torch.tensor(-6e-8))
    p[0] = torch.tensor([1.000004, 0.0, 0.0])
    y = torch.randint(0, 2, (64,), generator=g)
    m = CalibrationMeter(binning=binning)
    m.update(p[:40], y[:40])
    if binning == "width":
        assert float(m.statistics().min()) < 0  # what the tolerance lets into the sums
    resumed = CalibrationMeter(binning=binning)
    resumed.load_state_dict(m.state_dict())
    if binning == "width":
        again = CalibrationMeter()
        again.load_statistics(m.statistics())
        again.update(p[40:], y[40:])
    resumed.update(p[40:], y[40:])
    m.update(p[40:], y[40:])
    assert resumed.compute() == m.compute()
    if binning == "width":
        assert again.compute() == m.compute()
        bad = m.statistics().clone()
        empty, full = int(torch.nonzero(bad[:15] == 0)[0, 0]), int(torch.nonzero(bad[:15])[0, 0])
        bad[empty], bad[full] = -1.0, bad[full] + 1.0  # the total still adds up
        with pytest.raises(ValueError, match=f"entry {empty} is negative"):
            CalibrationMeter().load_statistics(bad)


@pytest.mark.parametrize("shape", [(6,), (6, 1), (3, 2)])
def test_binary_probabilities_off_by_round_off_are_detected_as_probabilities(shape: tuple[int, ...]) -> None:
    """Binary and multi-label scores within 1e-5 of [0, 1] (what ``from_logits=False``
    accepts) are probabilities to the detection too, as rows of a multiclass batch are."""
    p = np.array([0.1, 0.2, 0.9, 1 + 1e-6, -1e-6, 0.5]).reshape(shape)
    y = np.array([0, 0, 1, 1, 0, 1]).reshape(shape if len(shape) == 2 and shape[1] > 1 else (6,))
    m = CalibrationMeter()
    m.update(p, y)
    assert m.from_logits is False
    assert m.compute()["nll"] == pytest.approx(cal.nll(p, y, from_logits=False), rel=1e-12)
    assert cal.nll(p, y) == cal.nll(p, y, from_logits=False)
    for outside in (1 + 2e-5, -2e-5):  # beyond the round-off: logits
        q = p.copy()
        q.reshape(-1)[0] = outside
        m = CalibrationMeter()
        m.update(q, y)
        assert m.from_logits is True
        assert cal.nll(q, y) == cal.nll(q, y, from_logits=True)


BAD_PADDING = [
    ("3-D scores", np.zeros((4, 3, 5)), [-100] * 4, "must be \\(N, C\\)"),
    ("other class count", np.full((4, 7), np.nan), [-100] * 4, "7 classes, the meter 3"),
    ("labels not one per row", np.zeros((2, 3)), [-100] * 6, "one per row"),
    ("empty batch of other classes", np.zeros((0, 9)), [], "9 classes, the meter 3"),
    ("binary batch in a multiclass meter", np.zeros(4), [-100] * 4, "binary but the meter holds multiclass"),
    ("binary labels of another shape", np.zeros((4, 2)), np.full((2, 4), -100), "labels have shape"),
    ("not numbers", np.array(["a", "b"]), [-100] * 2, "numeric"),
]


@pytest.mark.parametrize(("case", "x", "labels", "match"), BAD_PADDING, ids=[c[0] for c in BAD_PADDING])
def test_a_batch_with_nothing_to_measure_is_still_checked(case: str, x: Any, labels: Any, match: str) -> None:
    """A batch that is all padding (every label ignored) or empty adds nothing, but its shapes
    are checked as a measured batch's are: a wrong batch is refused when it comes, not when a
    later batch happens to hold a label. Its values are not read (padding may be NaN)."""
    m = CalibrationMeter(ignore_index=-100, from_logits=True)
    m.update(np.zeros((2, 3)), [0, 1])
    before = m.statistics()
    with pytest.raises((ValueError, TypeError), match=match):
        m.update(x, labels)
    assert torch.equal(m.statistics(), before), case
    m.update(np.full((4, 3), np.nan), [-100] * 4)  # padding of the right shape: accepted
    m.update(np.zeros((0, 3)), [])
    assert m.compute()["count"] == 2


def test_a_padding_batch_fixes_the_number_of_classes() -> None:
    """Without num_classes, a first batch that is all padding fixes the classes as a measured
    one does: a later batch of other classes is refused."""
    m = CalibrationMeter(ignore_index=-100, from_logits=True)
    m.update(np.zeros((4, 5)), [-100] * 4)
    with pytest.raises(ValueError, match="4 classes, the meter 5"):
        m.update(np.zeros((2, 4)), [0, 1])
    m.update(np.zeros((2, 5)), [0, 4])
    assert m.compute()["count"] == 2


def _saved_and_loaded(state: dict[str, Any]) -> dict[str, Any]:
    """``state`` through ``torch.save`` and ``torch.load`` (weights only), as a checkpoint."""
    import io

    buf = io.BytesIO()
    torch.save(state, buf)
    buf.seek(0)
    return torch.load(buf)  # type: ignore[no-any-return]


RESUME = [(kind, binning, source) for kind in ("multiclass", "binary", "multilabel")
          for binning in ("width", "mass") for source in ("logits", "probs")]


@pytest.mark.parametrize(("kind", "binning", "source"), RESUME)
def test_state_dict_resumes_mid_stream(kind: str, binning: str, source: str) -> None:
    """A meter saved after some batches (``torch.save`` of ``state_dict``) and loaded into a
    fresh one goes on accumulating: after the remaining batches it holds exactly what one meter
    over all of them holds, equal to the one-shot functions, with the detected input kind
    kept (the fresh meter does not detect again)."""
    z, y = dataset(kind, 300, seed=21)
    if source == "probs":
        z = torch.softmax(torch.from_numpy(z), 1).numpy() if kind == "multiclass" else 1 / (1 + np.exp(-z))
    cuts = [(0, 90), (90, 91), (91, 200), (200, 300)]
    whole = CalibrationMeter(binning=binning)  # type: ignore[arg-type]
    for a, b in cuts:
        whole.update(z[a:b], y[a:b])
    first = CalibrationMeter(binning=binning)  # type: ignore[arg-type]
    for a, b in cuts[:2]:
        first.update(z[a:b], y[a:b])
    resumed = CalibrationMeter(binning=binning)  # type: ignore[arg-type]
    resumed.load_state_dict(_saved_and_loaded(first.state_dict()))
    assert resumed.from_logits is (source == "logits")
    assert resumed.compute() == first.compute()
    for a, b in cuts[2:]:
        resumed.update(z[a:b], y[a:b])
    assert resumed.compute() == whole.compute()
    assert torch.equal(resumed.state_dict()["statistics"], whole.state_dict()["statistics"])  # type: ignore[arg-type]
    kw: dict[str, Any] = {"from_logits": source == "logits"}
    assert resumed.compute()["ece"] == pytest.approx(cal.ece(z, y, binning=binning, **kw), rel=1e-12)  # type: ignore[arg-type]


def test_load_statistics_then_update_adds_to_them() -> None:
    """Statistics loaded into a meter are its own: :meth:`statistics` returns them and later
    updates add to them (a checkpoint of width-bin statistics resumes)."""
    z, y = dataset("multiclass", 120, seed=22)
    whole = CalibrationMeter(from_logits=True)
    whole.update(z, y)
    first = CalibrationMeter(from_logits=True)
    first.update(z[:50], y[:50])
    resumed = CalibrationMeter(from_logits=True)
    resumed.load_statistics(first.statistics())
    assert torch.equal(resumed.statistics(), first.statistics())
    resumed.update(z[50:], y[50:])
    assert resumed.compute() == whole.compute()
    assert resumed.compute()["count"] == 120


def _state_variants(state: dict[str, Any]) -> list[tuple[str, dict[str, Any], str]]:
    """States that no meter with the default options makes, each with the words of its error."""
    def edit(**kw: Any) -> dict[str, Any]:
        return {**state, **kw}

    stats = state["statistics"]
    shifted = stats.clone()
    shifted[0] += 1
    return [
        ("n_bins", edit(n_bins=10), "n_bins=10"),
        ("binning", edit(binning="mass"), "binning='mass'"),
        ("num_classes", edit(num_classes=6), "num_classes=6"),
        ("ignore_index", edit(ignore_index=-100), "ignore_index=-100"),
        ("classwise", edit(classwise=False), "classwise=False"),
        ("missing key", {k: v for k, v in state.items() if k != "statistics"}, "lacks 'statistics'"),
        ("kind", edit(kind="ternary"), "kind='ternary'"),
        ("k", edit(k=-3), "k=-3"),
        ("k bool", edit(k=True), "k=True"),
        ("from_logits", edit(from_logits=1), "from_logits=1"),
        ("labels_seen", edit(labels_seen=-1), "labels_seen=-1"),
        ("statistics negated", edit(statistics=-stats), "not a sum"),
        ("statistics shifted", edit(statistics=shifted), "its bins count"),
        ("statistics short", edit(statistics=stats[:-1]), "shape"),
        ("statistics list", edit(statistics=stats.tolist()), "must be a tensor"),
        ("pairs in width bins", edit(conf=torch.tensor([0.5]), correct=torch.tensor([1], dtype=torch.uint8)),
         "only mass bins"),
    ]


def test_load_state_dict_refuses_what_no_meter_makes() -> None:
    """A state of other options, with a key missing, or with values no meter holds is refused
    with the option or the reason named, and the loading meter is left as it was."""
    z, y = dataset("multiclass", 60, seed=23)
    saved = CalibrationMeter()
    saved.update(z, y)
    state = saved.state_dict()
    target = CalibrationMeter()
    target.update(z[:10], y[:10])
    before = target.state_dict()
    for case, bad, words in _state_variants(state):
        with pytest.raises((ValueError, TypeError), match=__import__("re").escape(words)):
            target.load_state_dict(bad)
        after = target.state_dict()
        assert torch.equal(after["statistics"], before["statistics"]), case  # type: ignore[arg-type]
        assert (after["from_logits"], after["kind"], after["k"]) == (before["from_logits"], before["kind"],
                                                                      before["k"]), case
    with pytest.raises(TypeError, match="state must be a dict"):
        target.load_state_dict([1, 2])  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="from_logits"):  # the meter fixes probabilities, the state logits
        CalibrationMeter(from_logits=False).load_state_dict(state)
    mass = CalibrationMeter(binning="mass")
    mass.update(z, y)
    mstate = mass.state_dict()
    for bad, words in [({**mstate, "conf": mstate["conf"][:-1]}, "59 confidences"),  # type: ignore[index]
                       ({**mstate, "conf": mstate["conf"] + 2}, "in [0, 1]"),  # type: ignore[operator]
                       ({**mstate, "correct": mstate["correct"] * 3}, "0 or 1")]:  # type: ignore[operator]
        with pytest.raises(ValueError, match=__import__("re").escape(words)):
            CalibrationMeter(binning="mass").load_state_dict(bad)


def test_a_binary_batch_after_statistics_of_more_classes_is_refused() -> None:
    """Statistics of 6 classes fix K = 6 in a fresh meter: a binary batch (two classes) is
    then refused, not added to sums of another size."""
    z, y = dataset("multiclass", 40, seed=24)
    src = CalibrationMeter(from_logits=True)
    src.update(z, y)
    m = CalibrationMeter(from_logits=True)
    m.load_statistics(src.statistics())
    zb, yb = dataset("binary", 10, seed=24)
    with pytest.raises(ValueError, match=r"binary .* meter holds 6 classes"):
        m.update(zb, yb)
    assert m.compute() == src.compute()


def test_unnormalised_scores_in_the_unit_interval_warn() -> None:
    """Rows in [0, 1] that do not sum to one (one-vs-rest sigmoids with class labels) are read
    as logits, as documented, with a warning that says so and names the fixes; real logits,
    probabilities and an explicit from_logits=True stay silent."""
    import warnings

    g = torch.Generator().manual_seed(25)
    z = torch.randn(200, 10, generator=g) * 3
    y = torch.randint(0, 10, (200,), generator=g)
    m = CalibrationMeter()
    with pytest.warns(cal.CalibrationWarning, match=r"every entry lies in \[0, 1\] but a row sums to"):
        m.update(torch.sigmoid(z), y)
    assert m.from_logits is True
    with pytest.warns(cal.CalibrationWarning, match="normalise the rows"):
        cal.nll(torch.sigmoid(z), y)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for x, fl in ((z, None), (torch.softmax(z, 1), None), (torch.sigmoid(z), True)):
            CalibrationMeter(from_logits=fl).update(x, y)
            cal.nll(x, y, from_logits=fl)


def test_numpy_float16_is_read_as_torch_float16() -> None:
    """A float16 NumPy array gives what the same float16 tensor gives: the row-sum tolerance
    of float16 (1e-2), not float32's, so detection and values do not depend on the library."""
    p = np.array([[0.705, 0.3], [0.2, 0.8]], dtype=np.float16)  # row 0 sums to 1.0051
    y = np.array([0, 1])
    t = torch.from_numpy(p)
    assert cal.ece(p, y) == cal.ece(t, y)
    assert cal.nll(p, y) == cal.nll(t, y)
    for x in (p, t):
        m = CalibrationMeter()
        m.update(x, y)
        assert m.from_logits is False
        assert m.compute()["ece"] == cal.ece(t, y)


@pytest.mark.parametrize("where", ["scores", "labels"])
def test_ragged_and_sparse_inputs_are_refused_by_name(where: str) -> None:
    """Ragged nested lists and sparse tensors give an error naming the argument and the fix,
    not NumPy's or torch's internals."""
    good_x, good_y = [[0.5, 0.5], [0.3, 0.7]], [0, 1]
    ragged_x, ragged_y = [[0.5, 0.5], [1.0]], [[0], [1, 0]]
    x, y = (ragged_x, good_y) if where == "scores" else (good_x, ragged_y)
    name = "probs" if where == "scores" else "labels"
    with pytest.raises(ValueError, match=f"{name} (is|are) ragged"):
        cal.ece(x, y)
    with pytest.raises(ValueError, match="ragged"):
        CalibrationMeter().update(x, y)
    xs, ys = torch.tensor(good_x), torch.tensor(good_y)
    xs, ys = (xs.to_sparse(), ys) if where == "scores" else (xs, ys.to_sparse())
    with pytest.raises(TypeError, match=r"sparse_coo tensor; pass \w+\.to_dense\(\)"):
        cal.ece(xs, ys)
    with pytest.raises(TypeError, match="to_dense"):
        CalibrationMeter().update(xs, ys)


@pytest.mark.parametrize("where", ["scores", "labels"])
def test_meta_tensors_are_refused_by_name(where: str) -> None:
    """A tensor on the meta device has a shape and no values: the metrics and the meter name
    the argument, not torch's "Cannot copy out of meta tensor"."""
    x, y = torch.randn(6, 3), torch.tensor([0, 1, 2, 0, 1, 2])
    x, y = (x.to("meta"), y) if where == "scores" else (x, y.to("meta"))
    name = "logits" if where == "scores" else "labels"
    with pytest.raises(ValueError, match=f"{name} is a tensor on the meta device, which holds no values"):
        cal.ece(x, y, from_logits=True)
    with pytest.raises(ValueError, match="meta device"):
        CalibrationMeter().update(x, y)


def test_load_state_dict_sizes_by_the_state_and_keeps_a_fixed_from_logits() -> None:
    """A state loads into a meter that already holds other data (of another K, or binary),
    sized by the state's own K and kind; a state of K = 3 claiming k=4 is refused. A state
    saved before any batch (from_logits None) leaves a meter's own from_logits=True as it is."""
    z3, y3 = dataset("multiclass", 30, seed=26)
    three = CalibrationMeter(from_logits=True)
    three.update(z3[:, :3], y3 % 3)
    used = CalibrationMeter(from_logits=True)
    used.update(z3[:, :4], y3 % 4)
    used.load_state_dict(three.state_dict())
    assert used.compute() == three.compute()
    zb, yb = dataset("binary", 20, seed=26)
    binary = CalibrationMeter(from_logits=True)
    binary.update(zb, yb)
    used.load_state_dict(binary.state_dict())
    assert used.compute() == binary.compute()
    with pytest.raises(ValueError, match="shape"):
        CalibrationMeter(from_logits=True).load_state_dict({**three.state_dict(), "k": 4})
    fixed = CalibrationMeter(from_logits=True)
    fixed.load_state_dict(CalibrationMeter().state_dict())
    assert fixed.from_logits is True


def test_a_refused_load_keeps_what_sync_gave() -> None:
    """A refused load_state_dict leaves the meter as it was, the view that sync() gave
    included (here a load_statistics of another meter's sum, the same view)."""
    z, y = dataset("multiclass", 40, seed=27)
    a, b = CalibrationMeter(from_logits=True), CalibrationMeter(from_logits=True)
    a.update(z[:20], y[:20])
    b.update(z[20:], y[20:])
    a._synced = {"flat": a.statistics() + b.statistics()}  # what sync() leaves on one of two ranks
    before = a.compute()
    assert before["count"] == 40
    bad = {**a.state_dict(), "conf": torch.tensor([0.5]), "correct": torch.tensor([1], dtype=torch.uint8)}
    with pytest.raises(ValueError, match="only mass bins"):
        a.load_state_dict(bad)
    assert a.compute() == before


def test_a_state_of_numpy_integers_loads_and_empty_updates_are_named() -> None:
    """A state whose options are NumPy integers (a state built or edited with NumPy) equals
    the meter's plain ints and loads (it was refused with "n_bins=np.int64(15), this meter
    n_bins=15; make the meter with n_bins=np.int64(15)"); True still differs from 1. A meter
    given only empty batches says so in compute's error, not "call update first"."""
    rng = np.random.default_rng(0)
    z, y = rng.normal(size=(50, 4)), rng.integers(0, 4, 50)
    m = CalibrationMeter(n_bins=15, ignore_index=-100)
    m.update(z, y)
    state = dict(m.state_dict())
    state["n_bins"], state["ignore_index"] = np.int64(15), np.int32(-100)
    resumed = CalibrationMeter(n_bins=15, ignore_index=-100)
    resumed.load_state_dict(state)
    assert resumed.compute() == m.compute()
    with pytest.raises(ValueError, match="state has classwise=1, this meter classwise=True"):
        CalibrationMeter().load_state_dict({**m.state_dict(), "classwise": 1, "ignore_index": None})
    empty = CalibrationMeter()
    empty.update(np.zeros((0, 4)), np.zeros(0, dtype=np.int64))
    with pytest.raises(RuntimeError, match=r"its updates held none \(empty batches\)"):
        empty.compute()
    with pytest.raises(RuntimeError, match="call update"):
        CalibrationMeter().compute()


@pytest.mark.parametrize("then", ["multiclass", "binary", "multi-label"])
@pytest.mark.parametrize("empty_at", ["first", "between"])
def test_an_empty_1d_batch_fixes_no_kind(then: str, empty_at: str) -> None:
    """An empty (0,) batch (``np.array([])``, a rank's empty shard) adds nothing and fixes no
    kind: the meter takes multiclass, binary or multi-label batches after it (it was fixed as
    binary, and (N, C) batches were refused), and equals the one-shot functions on them."""
    rng = np.random.default_rng(2)
    if then == "multiclass":
        x, y = rng.normal(size=(40, 4)), rng.integers(0, 4, 40)
    elif then == "binary":
        x, y = rng.random(40), rng.integers(0, 2, 40)
    else:
        x, y = rng.random((40, 3)), rng.integers(0, 2, (40, 3))
    m = CalibrationMeter(n_bins=5)
    empty = (np.zeros(0), np.zeros(0, dtype=np.int64))
    if empty_at == "first":
        m.update(*empty)
    m.update(x[:20], y[:20])
    if empty_at == "between":
        before = m.state_dict()
        m.update(*empty)
        assert torch.equal(m.state_dict()["statistics"], before["statistics"])
    m.update(x[20:], y[20:])
    got = m.compute()
    want = cal.ece(x, y, n_bins=5, from_logits=then == "multiclass")
    assert got["ece"] == pytest.approx(want, rel=1e-12, abs=1e-15)
    assert got["count"] == y.size
