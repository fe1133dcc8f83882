"""The dense paths (a term per class: focal with label smoothing, focal with probability targets,
the confidence penalty, softcap; the asymmetric loss with gamma_neg != gamma_pos) on the native
kernel and the torch-op path, against the float64 reference on every cell of an option matrix
(each option alone, every pair, the full mix), in float64 and in fp32.

fp32 tolerances: the kernels sum in float partial sums added in double and use polynomial
exp/log (relative error ~1e-7 each), so losses agree to ~1e-5 relative and gradients to ~1e-4
of the gradient's largest entry."""

from __future__ import annotations

import itertools
import os

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import crossent
from crossent import reference as R
from crossent.backends import native

F64 = torch.float64

#: option families of the softmax family; one value of each enters a cell. The focal family has
#: several values: an integer gamma (multiplications), a non-integer one above and below 1 (exp
#: and log), and a schedule (FLSD-53: a gamma per row).
FAMILIES: dict[str, list[dict]] = {
    "focal": [{"gamma": 2.0}, {"gamma": 2.5}, {"gamma": 0.5}, {"gamma": crossent.flsd53}],
    "smoothing": [{"label_smoothing": 0.1}],
    "weight": [{"weighted": True}],
    "z_loss": [{"z_loss": 1e-3}],
    "softcap": [{"softcap": 6.0}],
    "confidence": [{"confidence_penalty": 0.2}],
    "poly1": [{"poly1": 1.0}],
}


def _cells() -> list[dict]:
    """Each option alone, every pair of families (each focal value with each other family), and
    the full mix (once per focal value)."""
    names = list(FAMILIES)
    cells: list[dict] = []
    for name in names:
        cells += [dict(v) for v in FAMILIES[name]]
    for a, b in itertools.combinations(names, 2):
        cells += [{**va, **vb} for va in FAMILIES[a] for vb in FAMILIES[b]]
    for focal in FAMILIES["focal"]:
        mix: dict = {}
        for name in names:
            mix.update(focal if name == "focal" else FAMILIES[name][0])
        cells.append(mix)
    return cells


CELLS = _cells()


def _cell_id(kw: dict) -> str:
    return "+".join(f"{k}={getattr(v, '__name__', v)}" for k, v in kw.items())


def _reference(x, target, kw, weight, reduction="sum", grad_output=None):
    ref_kw = {k: v for k, v in kw.items() if k not in ("gamma", "weighted")}
    gamma = kw.get("gamma", 0.0)
    if callable(gamma):
        def gamma(p, schedule=gamma):  # the schedule on NumPy values
            return schedule(torch.from_numpy(np.asarray(p, dtype=np.float64))).numpy()
    return R.cross_entropy(
        x.double().numpy(), target.numpy() if not target.is_floating_point() else target.double().numpy(),
        weight=None if weight is None else weight.double().numpy(), gamma=gamma,
        reduction=reduction, grad_output=grad_output, **ref_kw,
    )


def _run(x, target, kw, weight, backend, reduction="sum", grad_output=None):
    kw = {k: v for k, v in kw.items() if k != "weighted"}
    xg = x.detach().clone().requires_grad_(True)
    loss = crossent.cross_entropy(xg, target, weight=weight, backend=backend, reduction=reduction, **kw)
    loss.backward(torch.ones_like(loss) if grad_output is None else grad_output)
    return loss.detach().double().numpy(), xg.grad.double().numpy()


def _inputs(kind: str, dtype: torch.dtype, seed: int, N: int = 6, C: int = 11):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(N, C, generator=g, dtype=F64) * 3).to(dtype)
    if kind == "index":
        target = torch.randint(0, C, (N,), generator=g)
        target[1] = -100  # an ignored row
        x[2, target[2]] += 12  # a confident row: q_y -> 1, where 1 - q needs care
    else:
        target = torch.softmax(torch.randn(N, C, generator=g, dtype=F64) * 2, dim=1).to(
            F64 if dtype == F64 else torch.float32
        )
        target[3] = 0.0
        target[3, 4] = 1.0  # a one-hot row
        x[3, 4] += 12
    return x, target


def _assert_close(got, ref, dtype):
    loss, grad = got
    ref_loss, ref_grad = ref
    if dtype == F64:
        np.testing.assert_allclose(loss, ref_loss, rtol=1e-9, atol=1e-12)
        np.testing.assert_allclose(grad, ref_grad, rtol=1e-8, atol=1e-12)
    else:
        np.testing.assert_allclose(loss, ref_loss, rtol=2e-5, atol=1e-6)
        scale = max(float(np.abs(ref_grad).max()), 1e-30)
        np.testing.assert_allclose(grad, ref_grad, rtol=1e-3, atol=1e-4 * scale)


needs_native = pytest.mark.skipif(
    os.environ.get("CROSSENT_NATIVE") == "0" or not native.available(),
    reason="native kernels unavailable or turned off",
)


@pytest.mark.parametrize("dtype", [F64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("kind", ["index", "prob"])
@pytest.mark.parametrize("kw", CELLS, ids=_cell_id)
def test_every_cell_equals_the_reference_on_both_paths(kw, kind, dtype):
    x, target = _inputs(kind, dtype, seed=len(CELLS) + CELLS.index(kw))
    C = x.shape[1]
    weight = torch.linspace(0.5, 2.0, C, dtype=F64 if dtype == F64 else torch.float32) if kw.get("weighted") \
        else None
    ref = _reference(x, target, kw, weight)
    backends = ["torch"] + (["native"] if native.available() else [])
    for backend in backends:
        if backend == "native":
            opts = {k: v for k, v in kw.items() if k != "weighted"}
            # the dense cells run on the kernel, not on a fallback
            assert native.supports_softmax(
                x, target, crossent._options.SoftmaxOptions(**{k: v for k, v in opts.items()}), weight
            )
        _assert_close(_run(x, target, kw, weight, backend), ref, dtype)


@needs_native
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize(
    "kw",
    [{"gamma": 2.0, "label_smoothing": 0.1}, {"gamma": 2.5, "label_smoothing": 0.2},
     {"gamma": crossent.flsd53, "label_smoothing": 0.1, "weighted": True}],
    ids=_cell_id,
)
def test_dense_spatial_and_wide_rows_equal_the_torch_path(kw, dtype):
    """(N, C, H, W) logits (tiles transposed into rows) and C = 5,003 (more than one partial sum),
    reduction "none" with a grad_output: the kernel against the torch-op path in the same dtype."""
    g = torch.Generator().manual_seed(3)
    for shape in [(2, 7, 3, 4), (3, 5003)]:
        x = (torch.randn(*shape, generator=g) * 4).to(dtype)
        C = shape[1]
        y = torch.randint(0, C, (shape[0], *shape[2:]), generator=g)
        w = torch.rand(C, generator=g) + 0.5 if kw.get("weighted") else None
        go = torch.rand(y.shape, generator=g)
        a = _run(x, y, kw, w, "native", reduction="none", grad_output=go)
        b = _run(x, y, kw, w, "torch", reduction="none", grad_output=go)
        ref = _reference(x.float(), y, kw, w, reduction="none", grad_output=go.double().numpy())
        tol = 1e-2 if dtype == torch.bfloat16 else 1e-4
        for got in (a, b):
            np.testing.assert_allclose(got[0], ref[0], rtol=tol, atol=tol * 1e-2)
            scale = float(np.abs(ref[1]).max())
            np.testing.assert_allclose(got[1], ref[1], rtol=tol * 10, atol=tol * scale)


@needs_native
@settings(max_examples=30, deadline=None)
@given(
    gamma=st.floats(0.05, 6.0),
    eps=st.floats(0.0, 1.0),
    scale=st.sampled_from([0.1, 3.0, 30.0]),
    C=st.integers(2, 70),
    prob=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_dense_focal_fp32_kernel_matches_reference(gamma, eps, scale, C, prob, seed):
    """Any gamma (integer or not, below 1 too), any smoothing, logits from flat to saturated
    (scale 30: q -> 1 and 1 - q of the max from the other classes' sum)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(5, C, generator=g) * scale
    if prob:
        target = torch.softmax(torch.randn(5, C, generator=g) * 3, dim=1)
    else:
        target = torch.randint(0, C, (5,), generator=g)
    kw = {"gamma": gamma, "label_smoothing": eps}
    ref = _reference(x, target, kw, None)
    _assert_close(_run(x, target, kw, None, "native"), ref, torch.float32)


@needs_native
def test_dense_masked_classes_add_nothing():
    """A class masked with -inf logits and no target mass adds 0 to the loss and gets a zero
    gradient (0 log 0 = 0), with focal and probability targets; with smoothing (index targets)
    it has mass eps / C and an infinite loss, as in the reference."""
    x = torch.tensor([[1.0, -float("inf"), 0.5, 2.0], [0.0, -float("inf"), 3.0, -1.0]])
    t = torch.tensor([[0.2, 0.0, 0.3, 0.5], [0.0, 0.0, 1.0, 0.0]])
    for gamma in (2.0, 2.5):
        loss, grad = _run(x, t, {"gamma": gamma}, None, "native")
        ref_loss, ref_grad = _reference(x, t, {"gamma": gamma}, None)
        np.testing.assert_allclose(loss, ref_loss, rtol=2e-5)
        np.testing.assert_allclose(grad, ref_grad, rtol=1e-4, atol=1e-7)
        assert (grad[:, 1] == 0).all()
    loss, _ = _run(x, torch.tensor([0, 2]), {"gamma": 2.0, "label_smoothing": 0.1}, None, "native")
    assert np.isinf(loss)


@needs_native
def test_schedule_with_probability_targets_reads_sum_t_q():
    """A focal schedule with probability targets is evaluated at sum_k t_k q_k (the kernel's
    forward-only pass), as on the torch-op path."""
    g = torch.Generator().manual_seed(5)
    x = torch.randn(9, 6, generator=g) * 2
    t = torch.softmax(torch.randn(9, 6, generator=g) * 2, dim=1)
    p_native = native.true_class_prob(x, t, crossent._options.SoftmaxOptions())
    p_ref = (torch.softmax(x.double(), 1) * t.double()).sum(1)
    np.testing.assert_allclose(p_native.double().numpy(), p_ref.numpy(), rtol=1e-5)
    kw = {"gamma": crossent.flsd53, "label_smoothing": 0.1}
    _assert_close(_run(x, t, kw, None, "native"), _reference(x, t, kw, None), torch.float32)


# --------------------------------------------------------------------------------- binary

BINARY_CELLS = [
    {"gamma_neg": 4.0, "gamma_pos": 1.0, "clip": 0.05},
    {"gamma_neg": 4.0, "gamma_pos": 0.0, "clip": 0.0},
    {"gamma_neg": 2.5, "gamma_pos": 0.5, "clip": 0.05},
    {"gamma_neg": 3.0, "gamma_pos": 8.0, "clip": 0.1},
    {"gamma_neg": 4.0, "gamma_pos": 1.0, "clip": 0.05, "label_smoothing": 0.1},
    {"gamma_neg": 2.0, "gamma_pos": 1.0, "clip": 0.0, "alpha": 0.25, "ignore_index": -1.0},
]


@pytest.mark.parametrize("dtype", [F64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("targets", ["hard", "soft", "mixed"])
@pytest.mark.parametrize("kw", BINARY_CELLS, ids=_cell_id)
def test_asymmetric_equals_the_reference_on_both_paths(kw, targets, dtype):
    """Hard targets (all 0/1: the powers by multiplication), soft ones (exp(gamma log)) and a
    mix (segments of both kinds: 5,000 elements are three segments of the kernel)."""
    g = torch.Generator().manual_seed(11)
    x = (torch.randn(50, 100, generator=g, dtype=F64) * 4).to(dtype)
    t = (torch.rand(50, 100, generator=g, dtype=F64) < 0.3).to(dtype)
    if targets == "soft":
        t = torch.rand(50, 100, generator=g, dtype=F64).to(dtype)
    elif targets == "mixed":
        t[30:] = torch.rand(20, 100, generator=g, dtype=F64).to(dtype)
    if "ignore_index" in kw:
        t[::7, ::3] = -1.0
    x[0, :5] = torch.tensor([30.0, -30.0, 0.0, 17.0, -17.0], dtype=dtype)  # saturated sigmoids
    opts = {k: v for k, v in kw.items() if k not in ("gamma_neg", "gamma_pos", "clip")}
    ref_loss, ref_grad = R.asymmetric_loss(
        x.double().numpy(), t.double().numpy(), gamma_neg=kw["gamma_neg"], gamma_pos=kw["gamma_pos"],
        clip=kw["clip"], reduction="sum", **opts,
    )
    backends = ["torch"] + (["native"] if native.available() else [])
    for backend in backends:
        xg = x.detach().clone().requires_grad_(True)
        loss = crossent.asymmetric_loss(xg, t, gamma_neg=kw["gamma_neg"], gamma_pos=kw["gamma_pos"],
                                        clip=kw["clip"], reduction="sum", backend=backend, **opts)
        loss.backward()
        _assert_close((loss.detach().double().numpy(), xg.grad.double().numpy()), (ref_loss, ref_grad), dtype)


@needs_native
@pytest.mark.parametrize("gamma", [0.1, 0.5, 1.0, 2.5])
@pytest.mark.parametrize("kind", ["index", "prob"])
def test_dense_focal_keeps_one_minus_q_at_a_saturated_max(gamma, kind):
    """A row whose max holds q = 1 - 1e-8 (not the target's class): in fp32 1 - q rounds to 0,
    where the focal factor (1 - q)^gamma of that class is 0.16 for gamma = 0.1; but each use of
    it comes with a factor 1 - q or ell (see dense_focal in _kernels_body.h), so the loss and
    the gradient still match the reference."""
    C = 8
    x = torch.zeros(4, C)
    x[:, 5] = 20.0 + torch.arange(4.0)  # q_5 = 1 - 7 e^-20 ... 1 - 7 e^-23
    y = torch.tensor([0, 1, 2, 3])
    target = y if kind == "index" else torch.nn.functional.one_hot(y, C).float() * 0.9 + 0.1 / C
    kw = {"gamma": gamma, "label_smoothing": 0.1}
    loss, grad = _run(x, target, kw, None, "native")
    ref_loss, ref_grad = _reference(x, target, kw, None)
    np.testing.assert_allclose(loss, ref_loss, rtol=1e-5)
    np.testing.assert_allclose(grad, ref_grad, rtol=1e-4, atol=1e-6)


@needs_native
def test_vectorised_exp_and_log_meet_their_documented_error_bounds():
    """The float kernels' polynomial exp and logs (see _kernels.c): relative error below 1e-7 for
    exp over [-87, 88] and for log over the normal floats, absolute below 5e-8 on [0.5, 2];
    log_pos_f equals log_f on positive normal floats and gives about -88 at 0."""
    import ctypes

    lib = native._library()

    def run(x: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        x = np.ascontiguousarray(x, dtype=np.float32)
        e, lg, lp = np.empty_like(x), np.empty_like(x), np.empty_like(x)
        ptr = [a.ctypes.data_as(ctypes.c_void_p) for a in (x, e, lg, lp)]
        lib.ce_exp_log_f32(*ptr, ctypes.c_int64(x.size))
        return e, lg, lp

    x = np.linspace(-87, 88, 400_001, dtype=np.float32)
    e, _, _ = run(x)
    ref = np.exp(x.astype(np.float64))
    assert np.max(np.abs(e - ref) / ref) < 1e-7
    x = np.geomspace(1.2e-38, 3e38, 400_001).astype(np.float32)
    _, lg, lp = run(x)
    ref = np.log(x.astype(np.float64))
    far = np.abs(ref) > 0.5
    assert np.max(np.abs(lg - ref)[far] / np.abs(ref)[far]) < 1e-7
    np.testing.assert_array_equal(lp, lg)
    x = np.linspace(0.5, 2.0, 400_001, dtype=np.float32)
    _, lg, _ = run(x)
    assert np.max(np.abs(lg - np.log(x.astype(np.float64)))) < 5e-8
    _, lg, lp = run(np.array([0.0, np.inf, -1.0, np.nan], dtype=np.float32))
    assert lg[0] == -np.inf and lg[1] == np.inf and np.isnan(lg[2]) and np.isnan(lg[3])
    assert -89 < lp[0] < -87 and np.isnan(lp[3])


@needs_native
def test_vectorised_double_exp_is_within_one_ulp():
    """exp_d, the float64 kernels' exp (see _kernels.c): at most 1 ulp from NumPy's exp over the
    normal range and around 0, at most one unit of 2^-1074 in the subnormal range, exp(0) = 1,
    and the limits (overflow to inf, underflow to 0, NaN through) where NumPy has them."""
    import ctypes

    lib = native._library()

    def run(x: np.ndarray) -> np.ndarray:
        x = np.ascontiguousarray(x, dtype=np.float64)
        e = np.empty_like(x)
        lib.ce_exp_f64(x.ctypes.data_as(ctypes.c_void_p), e.ctypes.data_as(ctypes.c_void_p),
                       ctypes.c_int64(x.size))
        return e

    for x in (np.linspace(-708.0, 709.7, 1_000_001), np.linspace(-0.35, 0.35, 200_001)):
        ref = np.exp(x)
        assert np.max(np.abs(run(x) - ref) / np.spacing(ref)) <= 1.0
    x = np.linspace(-745.2, -708.0, 100_001)
    assert np.max(np.abs(run(x) - np.exp(x))) <= 5e-324
    edge = np.array([0.0, -0.0, 1e-300, -1e-300, 709.78, 709.79, 1e308, np.inf, -745.13, -745.14, -1e308,
                     -np.inf, np.nan])
    with np.errstate(over="ignore"):
        np.testing.assert_array_equal(run(edge), np.exp(edge))


@needs_native
@pytest.mark.parametrize("weighted", [False, True], ids=["", "weighted"])
@pytest.mark.parametrize("kind", ["index", "prob"])
@pytest.mark.parametrize("gamma", [1.0, 1.5, 2.0, 2.5, 3.0, 3.5, 4.0, 4.5, 5.0, 0.5, 1.25, 5.5])
def test_every_power_of_the_dense_pass_equals_the_reference(gamma, kind, weighted):
    """Each loop of the fp32 dense pass: a gamma that is a multiple of 1/2 in 1..5 by
    multiplications and (half-integers) one square root, any other by exp and log; with and
    without class weights, index targets (with smoothing) and probability targets."""
    x, target = _inputs(kind, torch.float32, seed=int(gamma * 10))
    kw = {"gamma": gamma, "weighted": weighted} | ({"label_smoothing": 0.1} if kind == "index" else {})
    weight = torch.linspace(0.5, 2.0, x.shape[1]) if weighted else None
    _assert_close(_run(x, target, kw, weight, "native"), _reference(x, target, kw, weight), torch.float32)
