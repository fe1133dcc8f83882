"""The native CPU kernels (crossent/backends/native/_kernels.c): build, dispatch, and agreement with the
torch-op path and the reference on the cases the shared suites do not reach (wide rows, every
dtype, threads, broadcast patterns, the build's fallback). test_softmax.py and test_binary.py
run in full on both paths too."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import crossent
from crossent import reference as R
from crossent._options import SoftmaxCall, SoftmaxOptions
from crossent.backends import native

pytestmark = pytest.mark.skipif(
    os.environ.get("CROSSENT_NATIVE") == "0", reason="native kernels turned off by CROSSENT_NATIVE=0"
)

F64 = torch.float64


def _grad(fn, x, *args, backend, grad_output=None, **kw):
    x = x.detach().clone().requires_grad_(True)
    loss = fn(x, *args, backend=backend, **kw)
    loss.backward(grad_output if grad_output is not None else torch.ones_like(loss))
    return loss.detach(), x.grad


def test_builds_and_is_picked_for_cpu_tensors(monkeypatch):
    assert native.available()
    calls = []
    original = native.softmax_cross_entropy
    monkeypatch.setattr(native, "softmax_cross_entropy", lambda *a: calls.append(1) or original(*a))
    x, y = torch.randn(3, 5), torch.tensor([0, 4, 2])
    crossent.cross_entropy(x, y)
    assert calls == [1]
    crossent.cross_entropy(x, y, backend="torch")
    crossent.cross_entropy(torch.randn(3, 5, 2), torch.rand(3, 5, 2))  # 3-D soft targets: torch ops
    crossent.cross_entropy(torch.randn(3, 2, 5).transpose(1, 2), torch.zeros(3, 2, dtype=torch.long))
    assert calls == [1]
    # the dense paths: focal with smoothing, focal with probability targets
    crossent.cross_entropy(x, y, gamma=2.0, label_smoothing=0.1)
    crossent.cross_entropy(x, torch.softmax(torch.randn(3, 5), 1), gamma=2.5)
    assert calls == [1, 1, 1]


@pytest.mark.parametrize(
    ("call", "match"),
    [
        (lambda: crossent.cross_entropy(torch.randn(3, 5).t(), torch.tensor([0, 1, 2, 0, 1]),
                                        backend="native"), "does not cover"),
        (lambda: crossent.cross_entropy(torch.randn(3, 5, 2), torch.rand(3, 5, 2), backend="native"),
         "does not cover"),
        (lambda: crossent.binary_cross_entropy(torch.randn(4, 3).t(), torch.ones(3, 4),
                                               backend="native"), "does not cover"),
    ],
)
def test_explicit_native_backend_refuses_what_it_does_not_cover(call, match):
    with pytest.raises(ValueError, match=match):
        call()


SOFTMAX_OPTIONS = [
    {},
    {"label_smoothing": 0.1},
    {"gamma": 2.0},
    {"gamma": 0.5},
    {"gamma": crossent.flsd53},
    {"z_loss": 1e-3, "poly1": 1.0},
    {"softcap": 4.0, "confidence_penalty": 0.2},
    {"label_smoothing": 0.2, "z_loss": 1e-2, "confidence_penalty": 0.1, "poly1": 0.5, "softcap": 8.0},
    {"gamma": 1.5, "z_loss": 1e-3, "poly1": 2.0, "softcap": 5.0, "confidence_penalty": 0.1},
]


@pytest.mark.parametrize("kw", SOFTMAX_OPTIONS)
@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_softmax_wide_rows_match_the_reference(kw, weighted, reduction):
    """C = 5,003 > the kernel's 2,048-term partial sums; fp32 logits of scale 10, ignored rows,
    per-sample grad_output: the fp32 kernel (polynomial exp) against the float64 reference."""
    N, C = 7, 5003
    g = torch.Generator().manual_seed(1)
    x = torch.randn(N, C, generator=g) * 10
    y = torch.randint(0, C, (N,), generator=g)
    y[2] = -100
    w = torch.rand(C, generator=g, dtype=F64) + 0.5 if weighted else None
    go = torch.rand(N, generator=g) if reduction == "none" else None
    loss, grad = _grad(crossent.cross_entropy, x, y, backend="native", weight=w, reduction=reduction,
                       grad_output=go, **kw)
    ref_kw = {k: v for k, v in kw.items() if k != "gamma"}
    gamma = kw.get("gamma", 0.0)
    ref_loss, ref_grad = R.cross_entropy(
        x.double().numpy(), y.numpy(), weight=None if w is None else w.numpy(), reduction=reduction,
        gamma=(lambda p: crossent.flsd53(torch.from_numpy(p)).numpy()) if callable(gamma) else gamma,
        grad_output=None if go is None else go.double().numpy(), **ref_kw,
    )
    np.testing.assert_allclose(loss.double().numpy(), ref_loss, rtol=2e-5, atol=1e-6)
    np.testing.assert_allclose(grad.double().numpy(), ref_grad, rtol=1e-3, atol=2e-8)


@pytest.mark.parametrize("shape", [(2, 5, 3), (3, 7, 4, 5), (1, 4, 1000), (2, 3000, 3), (2, 3, 1, 1)])
@pytest.mark.parametrize("dtype", [F64, torch.float32, torch.bfloat16])
@pytest.mark.parametrize(
    "kw", [{}, {"label_smoothing": 0.1, "weighted": True}, {"gamma": 2.0}, {"gamma": crossent.flsd53},
           {"softcap": 3.0, "confidence_penalty": 0.1, "z_loss": 1e-3, "poly1": 1.0}],
)
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_spatial_logits_equal_torch_path(shape, dtype, kw, reduction):
    """(N, C, d1, ...) logits: tiles of positions transposed in cache (C = 3,000 gives tiles of
    10 positions; 1,000 positions with C = 4 give one tile of 1,000)."""
    g = torch.Generator().manual_seed(0)
    N, C = shape[:2]
    x = (torch.randn(shape, generator=g, dtype=F64) * 3).to(dtype)
    y = torch.randint(0, C, (N, *shape[2:]), generator=g)
    y.view(-1)[::3] = -100
    kw = dict(kw)
    if kw.pop("weighted", False):
        kw["weight"] = torch.rand(C, generator=g, dtype=F64) + 0.5
    assert native.supports_softmax(x, y, SoftmaxOptions())
    a = _grad(crossent.cross_entropy, x, y, backend="native", reduction=reduction, **kw)
    assert a[1].is_contiguous() and a[1].shape == x.shape
    # against the torch-op path in float64 on the same (rounded) logits: the float kernels'
    # errors, not the torch path's (whose fp32 1 - q_y is the less accurate of the two)
    b = _grad(crossent.cross_entropy, x.double(), y, backend="torch", reduction=reduction, **kw)
    if dtype == F64:
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    else:
        grad_rtol = 3e-5 if dtype == torch.float32 else 8e-3  # bf16: the gradient's rounding
        torch.testing.assert_close(a[0].double(), b[0], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(a[1].double(), b[1], rtol=grad_rtol, atol=1e-8)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("kw", [{}, {"label_smoothing": 0.1}, {"gamma": 2.0}, {"softcap": 3.0}])
def test_softmax_half_precision_equals_torch_path(dtype, kw):
    x = (torch.randn(9, 3001) * 4).to(dtype)
    y = torch.randint(0, 3001, (9,))
    loss_n, grad_n = _grad(crossent.cross_entropy, x, y, backend="native", **kw)
    loss_t, grad_t = _grad(crossent.cross_entropy, x, y, backend="torch", **kw)
    assert grad_n.dtype == dtype and loss_n.dtype == torch.float32
    torch.testing.assert_close(loss_n, loss_t, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grad_n.float(), grad_t.float(), rtol=1.6e-2, atol=1e-7)


@pytest.mark.parametrize("kw", [{"label_smoothing": 0.1}, {"z_loss": 1e-3}, {"softcap": 3.0}, {"gamma": 2.0}])
def test_probability_targets_and_inplace_backward(kw):
    g = torch.Generator().manual_seed(3)
    x = torch.randn(6, 301, generator=g)
    p = torch.softmax(torch.randn(6, 301, generator=g), dim=1)
    y = torch.randint(0, 301, (6,), generator=g)
    if "gamma" not in kw:  # focal with probability targets takes the torch path
        a = _grad(crossent.cross_entropy, x, p, backend="native", **kw)
        b = _grad(crossent.cross_entropy, x, p, backend="torch", **kw)
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)
    for dtype in (torch.float32, torch.bfloat16):
        ref = _grad(crossent.cross_entropy, x.to(dtype), y, backend="native", **kw)
        leaf = x.to(dtype).clone().requires_grad_(True)
        z = leaf * 1  # in place on a non-leaf, as in a model
        loss = crossent.cross_entropy(z, y, inplace_backward=True, backend="native", **kw)
        loss.backward()
        torch.testing.assert_close(loss.detach(), ref[0])
        torch.testing.assert_close(leaf.grad, ref[1])


def test_hostile_softmax_rows():
    """+-1e4 logits, masked (-inf) vocabulary entries, a row whose target probability underflows."""
    x = torch.randn(5, 2500)
    x[0, :] = 1e4
    x[1, 7] = 1e4
    x[2, 100:] = -float("inf")
    x[3, 0] = -1e4
    y = torch.tensor([3, 8, 5, 0, 4])
    for kw in ({}, {"gamma": 0.5}, {"label_smoothing": 0.1}):
        loss, grad = _grad(crossent.cross_entropy, x, y, backend="native", reduction="none", **kw)
        assert torch.isfinite(grad).all()
        if "label_smoothing" not in kw:  # smoothing puts mass on the -inf entries: an infinite loss
            assert torch.isfinite(loss).all()
        ref_loss, ref_grad = _grad(crossent.cross_entropy, x.double(), y, backend="torch",
                                   reduction="none", **kw)
        finite = torch.isfinite(ref_loss)
        torch.testing.assert_close(loss[finite].double(), ref_loss[finite], rtol=1e-6, atol=1e-4)
        torch.testing.assert_close(grad.double(), ref_grad, rtol=1e-4, atol=1e-7)
    # q_y = e^-1e4 underflows: the loss comes from lse - u_y, not from log(q_y)
    expected = torch.nn.functional.cross_entropy(x[3:4].double(), y[3:4])
    assert float(crossent.cross_entropy(x[3:4], y[3:4])) == pytest.approx(float(expected), rel=1e-7)


def test_threads_do_not_change_the_result():
    x, y = torch.randn(64, 4001), torch.randint(0, 4001, (64,))
    xb, tb = torch.randn(300, 700), torch.rand(300, 700)
    before = torch.get_num_threads()
    out = []
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            out.append(_grad(crossent.cross_entropy, x, y, backend="native", label_smoothing=0.1)
                       + _grad(crossent.sigmoid_focal_loss, xb, tb, backend="native"))
    finally:
        torch.set_num_threads(before)
    torch.testing.assert_close(out[0], out[1], rtol=1e-6, atol=0)  # binary sums: partial order
    assert torch.equal(out[0][1], out[1][1]) and torch.equal(out[0][3], out[1][3])  # gradients: bitwise


@pytest.mark.parametrize(
    ("shape", "wshape", "covered"),
    [
        ((6, 5), (), True),
        ((6, 5), (5,), True),
        ((6, 5), (6, 1), True),
        ((6, 5), (6, 5), True),
        ((4, 3, 5), (3, 1), True),
        ((4, 3, 5), (4, 3, 1), True),
        ((4, 3, 5), (1, 3, 5), True),
        ((4, 3, 5), (4, 1, 5), False),  # varies on dims 0 and 2 only: not a repetition
        ((2, 3000), (3000,), True),     # runs longer than the kernel's segments
    ],
)
def test_binary_weight_broadcast_patterns(shape, wshape, covered):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(shape, generator=g) * 3
    t = torch.rand(shape, generator=g)
    w = torch.rand(wshape, generator=g) + 0.1
    pw = torch.rand(shape[-1], generator=g) * 3
    assert native.supports_binary(x, t, w, pw) == covered
    kw = dict(weight=w, pos_weight=pw, gamma=1.5, alpha=0.3, reduction="none")
    a = _grad(crossent.binary_cross_entropy, x, t, backend="auto", **kw)
    ref_loss, ref_grad = R.binary_cross_entropy(
        x.double().numpy(), t.double().numpy(), weight=w.double().numpy(), pos_weight=pw.double().numpy(),
        gamma=1.5, alpha=0.3, reduction="none",
    )
    np.testing.assert_allclose(a[0].numpy(), ref_loss, rtol=2e-5, atol=1e-7)
    np.testing.assert_allclose(a[1].numpy(), ref_grad, rtol=2e-4, atol=1e-7)


@pytest.mark.parametrize("tdtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16, torch.uint8,
                                    torch.bool, torch.int64])
def test_binary_target_dtypes(tdtype):
    x = torch.randn(50, 7)
    t = (torch.rand(50, 7) < 0.3).to(tdtype)
    a = _grad(crossent.sigmoid_focal_loss, x, t, backend="native")
    b = _grad(crossent.sigmoid_focal_loss, x, t, backend="torch")
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-8)


def test_binary_exp_and_log_across_the_float_range():
    """The fp32 kernel's polynomial exp/log against float64 over logits from -120 to 120 (the
    exponent range of fp32 and beyond), for BCE and a focal gamma < 1, both targets."""
    x = torch.linspace(-120, 120, 20001)
    for t in (torch.zeros_like(x), torch.ones_like(x), torch.full_like(x, 0.3)):
        for kw in ({}, {"gamma": 0.5, "alpha": 0.25}, {"gamma": 2.0}):
            loss, grad = _grad(
                crossent.binary_cross_entropy, x, t, backend="native", reduction="none", **kw
            )
            ref_loss, ref_grad = R.binary_cross_entropy(
                x.double().numpy(), t.double().numpy(), reduction="none", **kw
            )
            np.testing.assert_allclose(loss.numpy(), ref_loss, rtol=3e-6, atol=1e-37)
            # a soft target's gradient crosses 0 (at p = t): relative error is meaningless there
            atol = 1e-9 if t[0] == 0.3 else 1e-37
            np.testing.assert_allclose(grad.numpy(), ref_grad, rtol=3e-5, atol=atol)


def _run(code: str, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, timeout=300,
        env={**os.environ, **env},
    )


CHECK = """
    import warnings
    import torch, crossent
    from crossent.backends import native
    x, y = torch.randn(4, 9, requires_grad=True), torch.tensor([1, 2, 3, 8])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ok = native.available()
        loss = crossent.cross_entropy(x, y, label_smoothing=0.1)
    loss.backward()
    ref = torch.nn.functional.cross_entropy(x.detach(), y, label_smoothing=0.1)
    assert abs(float(loss) - float(ref)) < 1e-6
    print(ok, [str(w.message)[:60] for w in caught])
"""


def test_turned_off_by_the_environment():
    res = _run(CHECK, CROSSENT_NATIVE="0")
    assert res.returncode == 0, res.stderr
    assert res.stdout.startswith("False []")


def test_a_failed_build_warns_once_and_falls_back(tmp_path):
    empty = tmp_path / "bin"
    empty.mkdir()
    res = _run(CHECK, PATH=str(empty), CC="", CROSSENT_CACHE_DIR=str(tmp_path / "cache"))
    assert res.returncode == 0, res.stderr
    assert res.stdout.startswith("False ['crossent: the native CPU kernels are unavailable (no C")


#: CHECK with the kernels built at -O0: the cache logic is the same, the build 6x faster than
#: at -O3 (the test session's own library is the -O3 build)
CHECK_O0 = """
    from crossent.backends import native
    native._FLAGS = tuple("-O0" if f == "-O3" else f for f in native._FLAGS)
""" + CHECK


def test_build_is_cached_by_source_and_cpu(tmp_path):
    res = _run(CHECK_O0, CROSSENT_CACHE_DIR=str(tmp_path))
    assert res.returncode == 0, res.stderr
    assert res.stdout.startswith("True []")
    built = list(tmp_path.glob("kernels-*.so"))
    assert len(built) == 1
    stamp = built[0].stat().st_mtime_ns
    assert _run(CHECK_O0, CROSSENT_CACHE_DIR=str(tmp_path)).returncode == 0
    assert built[0].stat().st_mtime_ns == stamp  # loaded, not rebuilt


def test_the_compile_marker_is_the_one_torch_sets():
    """native._assume_constant_result sets by hand what torch.compiler.assume_constant_result sets
    (so that importing crossent does not import torch._dynamo); this fails if torch changes it."""

    def theirs() -> bool:
        return True

    def ours() -> bool:
        return True

    torch.compiler.assume_constant_result(theirs)
    native._assume_constant_result(ours)
    assert vars(theirs) == vars(ours) == {"_dynamo_marked_constant": True}
    assert vars(native.available) == vars(ours)


def test_importing_crossent_leaves_dynamo_unimported():
    res = _run("import sys, crossent; print('torch._dynamo' in sys.modules)")
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == "False"


def test_schedule_sees_the_true_class_probability(monkeypatch):
    seen = []

    def schedule(p):
        seen.append(p.clone())
        return torch.full_like(p, 2.0)

    x, y = torch.randn(5, 40), torch.randint(0, 40, (5,))
    a = _grad(crossent.cross_entropy, x, y, backend="native", gamma=schedule)
    b = _grad(crossent.cross_entropy, x, y, backend="native", gamma=2.0)
    torch.testing.assert_close(a, b)
    torch.testing.assert_close(seen[0], torch.softmax(x, 1).gather(1, y[:, None]).squeeze(1))
    opts = SoftmaxOptions(gamma=lambda p: -p)
    with pytest.raises(ValueError, match="negative"):
        native.softmax_cross_entropy(SoftmaxCall(x, y, None, opts, "mean", True))


# --------------------------------------------------------------------------------------------
# property: the native kernel and the torch-op path agree on any mix of options (float64, where
# both are exact to rounding)


@st.composite
def softmax_problems(draw):
    N = draw(st.integers(1, 6))
    C = draw(st.integers(1, 9))
    prob = draw(st.booleans())
    focal = draw(st.sampled_from([0.0, 0.0, 0.3, 2.0]))
    eps = 0.0 if focal else draw(st.sampled_from([0.0, 0.1, 0.4]))
    if prob and focal:
        focal = 0.0
    kw = dict(
        label_smoothing=eps, gamma=focal,
        z_loss=draw(st.sampled_from([0.0, 1e-2])),
        softcap=draw(st.sampled_from([None, 2.5])),
        confidence_penalty=draw(st.sampled_from([0.0, 0.3])),
        poly1=draw(st.sampled_from([0.0, 1.5])),
        reduction=draw(st.sampled_from(["none", "sum", "mean"])),
    )
    spatial = () if prob else draw(st.sampled_from([(), (), (3,), (2, 5)]))  # (N, C, d...) layouts
    seed = draw(st.integers(0, 2**16))
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(N, C, *spatial, generator=g, dtype=F64) * draw(st.sampled_from([1.0, 8.0]))
    if prob:
        target = torch.softmax(torch.randn(N, C, generator=g, dtype=F64) * 3, 1)
    else:
        target = torch.randint(0, C, (N, *spatial), generator=g)
        target[torch.rand(N, *spatial, generator=g) < 0.3] = -100
    weight = torch.rand(C, generator=g, dtype=F64) + 0.2 if draw(st.booleans()) else None
    return x, target, weight, kw


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(softmax_problems())
def test_native_equals_torch_path_softmax(problem):
    x, target, weight, kw = problem
    go = torch.rand(x.shape[:1] + x.shape[2:], dtype=F64) + 0.5 if kw["reduction"] == "none" else None
    a = _grad(crossent.cross_entropy, x, target, backend="native", weight=weight, grad_output=go, **kw)
    b = _grad(crossent.cross_entropy, x, target, backend="torch", weight=weight, grad_output=go, **kw)
    torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


@st.composite
def binary_problems(draw):
    shape = draw(st.sampled_from([(7,), (3, 5), (2, 3, 4), (1,)]))
    seed = draw(st.integers(0, 2**16))
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g, dtype=F64) * draw(st.sampled_from([1.0, 10.0]))
    t = torch.rand(shape, generator=g, dtype=F64)
    if draw(st.booleans()):
        t = t.round()
    ignore = draw(st.sampled_from([None, -1.0]))
    if ignore is not None:
        t[torch.rand(shape, generator=g) < 0.3] = ignore
    kw = dict(
        label_smoothing=draw(st.sampled_from([0.0, 0.1])),
        alpha=draw(st.sampled_from([None, 0.25, 0.9])),
        ignore_index=ignore,
        reduction=draw(st.sampled_from(["none", "sum", "mean"])),
    )
    if draw(st.booleans()):
        kw["weight"] = torch.rand(shape[-1:], generator=g, dtype=F64) + 0.1
    if draw(st.booleans()):
        kw["pos_weight"] = torch.rand(shape[-1:], generator=g, dtype=F64) * 3
    fn = draw(st.sampled_from(["bce", "focal", "asl"]))
    if fn == "bce":
        return crossent.binary_cross_entropy, x, t, dict(kw, gamma=draw(st.sampled_from([0.0, 0.5, 2.0])))
    if fn == "focal":
        return crossent.sigmoid_focal_loss, x, t, dict(kw, gamma=draw(st.sampled_from([0.0, 0.7, 2.0])))
    return crossent.asymmetric_loss, x, t, dict(
        kw, gamma_pos=draw(st.sampled_from([0.0, 1.0])), gamma_neg=draw(st.sampled_from([2.0, 4.0])),
        clip=draw(st.sampled_from([0.0, 0.05])),
    )


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(binary_problems())
def test_native_equals_torch_path_binary(problem):
    fn, x, t, kw = problem
    go = torch.rand(x.shape, dtype=F64) + 0.5 if kw["reduction"] == "none" else None
    a = _grad(fn, x, t, backend="native", grad_output=go, **kw)
    b = _grad(fn, x, t, backend="torch", grad_output=go, **kw)
    torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_a_library_that_fails_to_load_gives_way_to_the_next_flags(tmp_path, monkeypatch):
    """Say -fopenmp builds but its runtime is missing at load time: the next flag set is built
    and loaded instead."""
    monkeypatch.setenv("CROSSENT_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(native, "_FLAGS", tuple("-O0" if f == "-O3" else f for f in native._FLAGS))
    real_cdll = native.ctypes.CDLL
    attempts = []

    def cdll(path, *args, **kwargs):
        attempts.append(path)
        if len(attempts) == 1:
            raise OSError("libgomp.so.1: cannot open shared object file")
        return real_cdll(path, *args, **kwargs)

    monkeypatch.setattr(native.ctypes, "CDLL", cdll)
    lib = native._load()
    assert len(attempts) == 2 and attempts[0] != attempts[1]
    assert lib.ce_has_f16() in (0, 1)
    assert len(list(tmp_path.glob("kernels-*.so"))) == 2


# --------------------------------------------------------------------------------------------
# return_aux: the kernel's row statistics equal crossent._formula.row_statistics


def _native_stats(x, t, **kw):
    """The (R, 3) statistics the native kernel writes for logits ``x`` (class dim 1)."""
    from crossent._formula import acc_dtype

    rows = 1 if x.ndim == 1 else x.numel() // x.shape[1]
    stats = torch.full((rows, 3), float("nan"), dtype=acc_dtype(x.dtype))
    opts = SoftmaxOptions(**kw)
    assert native.supports_softmax(x, t, opts)
    native.softmax_cross_entropy(SoftmaxCall(x, t, None, opts, "mean", True, stats=stats))
    return stats


def _rows_of(x, t):
    C = x.shape[1]
    rows = x.movedim(1, -1).reshape(-1, C)
    return rows, (t.movedim(1, -1).reshape(-1, C) if t.is_floating_point() else t.reshape(-1))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32, F64])
@pytest.mark.parametrize("layout", ["2d", "wide", "spatial_few", "spatial_many", "prob"])
@pytest.mark.parametrize("kw", [{}, {"softcap": 2.0}, {"label_smoothing": 0.1, "gamma": 2.0},
                                {"gamma": crossent.flsd53, "confidence_penalty": 0.2}])
def test_native_stats_equal_row_statistics(dtype, layout, kw):
    """Ties (the first index wins), soft-capping, probability targets, (N, C, d) layouts (both
    spatial kernels: few classes vectorised across positions, many transposed into rows)."""
    from crossent._formula import acc_dtype, row_statistics

    g = torch.Generator().manual_seed(7)
    C = {"spatial_many": 300, "wide": 1000}.get(layout, 11)
    shape = (4, C, 3, 2) if layout.startswith("spatial") else (12, C)
    x = (torch.randn(shape, generator=g) * 3).round().to(dtype)  # rounded: many ties
    tie = [130, 700] if layout == "wide" else [2, 5]  # wide: beyond the first block of 64
    x.movedim(1, -1).reshape(-1, C)[0, tie] = 50.0  # an exact tie at the max
    if layout == "prob":
        t = torch.softmax(torch.randn(shape, generator=g) * 2, 1).to(acc_dtype(dtype))
        t[0, [1, 4]] = 5.0  # a tie in the target's argmax
        t[1] = torch.nn.functional.one_hot(x[1].float().argmax(), C).to(t.dtype)  # a hit
    else:
        t = torch.randint(0, C, (shape[0], *shape[2:]), generator=g)
        t.view(-1)[0] = tie[0]  # the first of the tied maxima: a hit
        t.view(-1)[1] = x.movedim(1, -1).reshape(-1, C)[1].float().argmax()
        t.view(-1)[::5] = -100
    stats = _native_stats(x, t, **kw)
    rows, tr = _rows_of(x, t)
    ref = row_statistics(rows, tr, kw.get("softcap"), torch.empty_like(stats))
    keep = tr != -100 if not t.is_floating_point() else torch.ones(len(stats), dtype=torch.bool)
    tol = {"atol": 1e-5, "rtol": 1e-5} if dtype != F64 else {}
    torch.testing.assert_close(stats[keep, :2], ref[keep, :2], **tol)
    torch.testing.assert_close(stats[keep, 2], ref[keep, 2], atol=0, rtol=0)
    assert stats[keep, 2].sum() >= 1  # the planted hits are counted


def test_native_stats_all_rows_ignored_and_empty():
    x = torch.randn(5, 6)
    for layout in (x, x.reshape(5, 6, 1)):
        t = torch.full((5,) if layout.ndim == 2 else (5, 1), -100)
        _native_stats(layout, t)  # ignored rows may hold anything, but the call is sound
        loss, aux = crossent.cross_entropy(layout, t, z_loss=1e-2, return_aux=True)
        assert loss.item() == 0 and aux.accuracy.item() == 0 and aux.entropy.item() == 0
    _native_stats(torch.randn(0, 6), torch.zeros(0, dtype=torch.long))


def test_return_aux_runs_on_the_native_kernel(monkeypatch):
    calls = []
    original = native.softmax_cross_entropy
    monkeypatch.setattr(native, "softmax_cross_entropy", lambda *a: calls.append(1) or original(*a))
    x, y = torch.randn(6, 9), torch.randint(0, 9, (6,))
    loss, aux = crossent.cross_entropy(x, y, return_aux=True, z_loss=1e-3)
    assert calls == [1]
    ref_loss, ref = crossent.cross_entropy(x, y, return_aux=True, z_loss=1e-3, backend="torch")
    torch.testing.assert_close(loss, ref_loss)
    for a, b in zip(aux, ref, strict=True):
        torch.testing.assert_close(a, b)


# --------------------------------------------------------------------------------------------
# step schedules (FLSD-53) evaluated inside the kernel


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32, F64])
@pytest.mark.parametrize(
    "kw",
    [{}, {"label_smoothing": 0.1}, {"label_smoothing": 0.1, "weighted": True}, {"prob": True},
     {"spatial": True, "label_smoothing": 0.05}, {"softcap": 4.0, "z_loss": 1e-3, "poly1": 0.5},
     {"prob": True, "zero_below": True}, {"label_smoothing": 0.1, "zero_below": True}],
)
def test_step_schedule_in_kernel_equals_the_schedule_outside(monkeypatch, dtype, kw):
    """A StepGamma reaches the kernel as numbers (no true_class_prob pass) and gives the loss and
    gradient of the same schedule evaluated outside, on the torch-op path."""
    from crossent._options import StepGamma

    kw = dict(kw)
    # a step to gamma 0 mixes dense focal rows with plain cross-entropy rows in one call
    step = StepGamma(0.5, 0.0, 2.5) if kw.pop("zero_below", False) else crossent.flsd53
    g = torch.Generator().manual_seed(3)
    C = 23
    spatial, prob, weighted = kw.pop("spatial", False), kw.pop("prob", False), kw.pop("weighted", False)
    shape = (6, C, 5) if spatial else (40, C)
    x = (torch.randn(shape, generator=g) * 2.5).to(dtype)
    if prob:
        t = torch.softmax(torch.randn(shape, generator=g) * 3, 1).to(F64 if dtype == F64 else torch.float32)
    else:
        t = torch.randint(0, C, (shape[0], *shape[2:]), generator=g)
        t.view(-1)[::7] = -100
    if weighted:
        kw["weight"] = (torch.rand(C, generator=g) + 0.5).to(F64 if dtype == F64 else torch.float32)
    calls = []
    monkeypatch.setattr(native, "true_class_prob", lambda *a: calls.append(1))
    a = _grad(crossent.cross_entropy, x, t, backend="native", gamma=step, **kw)
    assert calls == []
    monkeypatch.undo()
    b = _grad(crossent.cross_entropy, x, t, backend="torch", gamma=lambda p: step(p), **kw)
    tol = {"atol": 2e-2, "rtol": 2e-2} if dtype == torch.bfloat16 else {}
    torch.testing.assert_close(a, b, **tol)


def test_step_gamma_is_a_validated_schedule():
    from crossent._options import StepGamma

    p = torch.tensor([0.0, 0.19, 0.2, 0.9], dtype=F64)
    assert crossent.flsd53(p).tolist() == [5.0, 5.0, 3.0, 3.0] and crossent.flsd53(p).dtype == F64
    assert crossent.flsd53 == StepGamma(0.2, 5.0, 3.0) and crossent.flsd53.__name__ == "flsd53"
    with pytest.raises(ValueError, match="below"):
        StepGamma(0.2, -1.0, 3.0)
    with pytest.raises(ValueError, match="threshold"):
        StepGamma(float("nan"), 1.0, 3.0)


_DENSE_KWS = [
    {"gamma": 2.0, "label_smoothing": 0.1},
    {"gamma": 2.5, "label_smoothing": 0.1},
    {"gamma": 0.7, "label_smoothing": 0.1},
    {"gamma": crossent.flsd53, "label_smoothing": 0.1},
    {"confidence_penalty": 0.2},
    {"gamma": 2.0, "label_smoothing": 0.1, "confidence_penalty": 0.2},
    {"gamma": 2.0, "label_smoothing": 0.1, "softcap": 3.0},
    {"poly1": 1.0, "label_smoothing": 0.1},
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("kind", ["index", "prob"])
@pytest.mark.parametrize("kw", _DENSE_KWS, ids=lambda kw: "+".join(f"{k}={v}" for k, v in kw.items()))
def test_inplace_backward_equals_out_of_place_on_every_pass(kw, kind, dtype):
    """The exponentials of pass 2 live in the gradient row unless that row is the logits
    themselves and a later pass still reads them (the dense pass, the confidence penalty):
    inplace_backward, where it is, gives the out-of-place result."""
    g = torch.Generator().manual_seed(7)
    x = (torch.randn(6, 301, generator=g) * 3).to(dtype)
    target = torch.randint(0, 301, (6,), generator=g)
    if kind == "prob":
        target = torch.softmax(torch.randn(6, 301, generator=g) * 2, dim=1)
    ref = _grad(crossent.cross_entropy, x, target, backend="native", **kw)
    leaf = x.clone().requires_grad_(True)
    z = leaf * 1  # in place on a non-leaf, as in a model
    loss = crossent.cross_entropy(z, target, inplace_backward=True, backend="native", **kw)
    loss.backward()
    torch.testing.assert_close(loss.detach(), ref[0])
    torch.testing.assert_close(leaf.grad, ref[1])


@pytest.mark.parametrize(
    "kw", [{}, {"label_smoothing": 0.1}, {"gamma": 2.0}, {"gamma": crossent.flsd53}, {"softcap": 5.0},
           {"poly1": 1.0}, {"confidence_penalty": 0.1}],
    ids=lambda kw: "+".join(f"{k}={v}" for k, v in kw.items()) or "plain",
)
def test_negative_probability_target_is_caught_in_the_kernels_read(kw):
    """The kernel checks t >= 0 in its one read of the targets (the front door skips its own
    pass where the kernel runs): a single negative entry in any row, on any thread, raises; a
    NaN or a -0.0 does not, as ``target.amin() < 0`` on the torch-op path."""
    g = torch.Generator().manual_seed(2)
    x = torch.randn(64, 3001, generator=g)
    t = torch.softmax(torch.randn(64, 3001, generator=g), dim=1)
    for r, c in [(0, 0), (50, 2999), (63, 1500)]:
        bad = t.clone()
        bad[r, c] = -1e-3
        with pytest.raises(ValueError, match="probabilities must be >= 0"):
            native.softmax_cross_entropy(SoftmaxCall(x, bad, None, SoftmaxOptions(**kw), "mean", True))
        for backend in ("native", "torch"):
            with pytest.raises(ValueError, match="probabilities must be >= 0"):
                crossent.cross_entropy(x.requires_grad_(), bad, backend=backend, **kw)
    odd = t.clone()
    odd[3, 4], odd[5, 6] = float("nan"), -0.0
    for backend in ("native", "torch"):
        loss = crossent.cross_entropy(x, odd, backend=backend, **kw)
        assert torch.isnan(loss)
    # inplace_backward keeps the front door's check: the logits are not written first
    bad = t.clone()
    bad[50, 2999] = -1e-3
    z = x.detach().clone().requires_grad_(True) * 1
    before = z.detach().clone()
    with pytest.raises(ValueError, match="probabilities must be >= 0"):
        crossent.cross_entropy(z, bad, inplace_backward=True, backend="native", **kw)
    torch.testing.assert_close(z.detach(), before)


@pytest.mark.parametrize("kind", ["index", "prob"])
def test_softcap_blocks_of_small_and_large_logits_equal_the_reference(kind):
    """softcap per block of 2,048 classes: a block whose |u| / c stays under 0.625 takes tanh's
    polynomial alone, one with a larger entry the whole tanh; a row of 5,000 classes mixes both
    (the first and last blocks small, the middle one with logits up to 4 c), fp32 against the
    float64 reference."""
    g = torch.Generator().manual_seed(4)
    c = 6.0
    x = torch.randn(4, 5000, generator=g) * 0.5
    x[:, 2048:4096] = torch.linspace(-4 * c, 4 * c, 2048)  # the whole range of tanh
    x[1, 4999] = 0.62 * c  # just under the polynomial's bound, in a small block
    target = torch.randint(0, 5000, (4,), generator=g)
    if kind == "prob":
        target = torch.softmax(torch.randn(4, 5000, generator=g) * 2, dim=1)
    loss, grad = _grad(crossent.cross_entropy, x, target, backend="native", softcap=c, reduction="sum")
    ref_loss, ref_grad = R.cross_entropy(
        x.double().numpy(), target.numpy() if kind == "index" else target.double().numpy(), softcap=c,
        reduction="sum",
    )
    np.testing.assert_allclose(float(loss), ref_loss, rtol=1e-6)
    np.testing.assert_allclose(grad.double().numpy(), ref_grad, rtol=1e-4, atol=1e-7 * np.abs(ref_grad).max())


@pytest.mark.parametrize("n_cols", [1, 15, 16, 17, 33, 301])
@pytest.mark.parametrize(
    "case", ["index", "entropy", "prob", "prob+weight", "prob+entropy+weight", "prob+smoothing"]
)
def test_float32_pass_of_exponentials_equals_float64_on_every_combination(case, n_cols):
    """Pass 2 of the float kernel (the exponentials and, by the options, the sums of e u for the
    entropy, of the targets a and of a u, and the min of the targets) against the double
    kernel's: loss and gradient to float round-off, for rows shorter than a vector, of whole
    vector steps and with a tail, with a masked class (logit -inf, no target mass but
    smoothing's) in every row but the one-class case."""
    g = torch.Generator().manual_seed(n_cols)
    n = 7
    x = torch.randn(n, n_cols, generator=g, dtype=F64) * 4
    if n_cols > 1:
        x[:, n_cols // 2] = -torch.inf
    kw = {}
    if "entropy" in case:
        kw["confidence_penalty"] = 0.3
    if "weight" in case:
        kw["weight"] = torch.rand(n_cols, generator=g, dtype=F64) + 0.5
    if "smoothing" in case:
        kw["label_smoothing"] = 0.1
    if case.startswith("prob"):
        t = torch.rand(n, n_cols, generator=g, dtype=F64)
        if n_cols > 1:
            t[:, n_cols // 2] = 0.0
        target = t / t.sum(1, keepdim=True)
    else:
        target = torch.randint(0, n_cols, (n,), generator=g)
        if n_cols > 1:
            target[target == n_cols // 2] = 0
    want = _grad(crossent.cross_entropy, x, target, backend="native", reduction="none", **kw)
    f32 = {k: v.float() for k, v in kw.items() if isinstance(v, torch.Tensor)}
    got = _grad(crossent.cross_entropy, x.float(), target.float() if case.startswith("prob") else target,
                backend="native", reduction="none", **{**kw, **f32})
    torch.testing.assert_close(got[0].double(), want[0], rtol=2e-6, atol=2e-6)
    torch.testing.assert_close(got[1].double(), want[1], rtol=2e-5, atol=2e-6)
    if n_cols > 1 and "smoothing" not in case:  # (smoothing gives the masked class mass eps / C)
        assert bool((got[1][:, n_cols // 2] == 0).all())
