"""Fused linear + cross-entropy (chunked torch path) against the unfused computation."""

from __future__ import annotations

import pytest
import torch

import crossent
from crossent.backends.torch_ops.linear import CPU_BUDGET_BYTES, chunk_rows

OPTIONS = {
    "plain": {},
    "smoothing": {"label_smoothing": 0.1},
    "class_weight": {"class_weight": "rand"},
    "smoothing_class_weight": {"label_smoothing": 0.2, "class_weight": "rand"},
    "focal": {"gamma": 2.0},
    "focal_fractional": {"gamma": 0.5},
    "focal_schedule": {"gamma": crossent.flsd53},
    "focal_smoothing_weight": {"gamma": 2.0, "label_smoothing": 0.1, "class_weight": "rand"},
    "z_loss": {"z_loss": 1e-2},
    "softcap": {"softcap": 3.0},
    "confidence_penalty": {"confidence_penalty": 0.2},
    "poly1": {"poly1": 1.0},
    "everything": {
        "label_smoothing": 0.1, "class_weight": "rand", "gamma": crossent.flsd53,
        "z_loss": 1e-3, "softcap": 4.0, "confidence_penalty": 0.1, "poly1": 0.5,
    },
}


def _problem(N=29, D=12, V=37, dtype=torch.float64, ignore_every=4, lead=None, seed=0):
    g = torch.Generator().manual_seed(seed)
    shape = lead if lead is not None else (N,)
    h = torch.randn(*shape, D, generator=g, dtype=torch.float64).to(dtype).requires_grad_()
    W = (torch.randn(V, D, generator=g, dtype=torch.float64) * 0.5).to(dtype).requires_grad_()
    b = (torch.randn(V, generator=g, dtype=torch.float64) * 0.1).to(dtype).requires_grad_()
    y = torch.randint(0, V, shape, generator=g)
    if ignore_every:
        y.view(-1)[::ignore_every] = -100
    cw = torch.rand(V, generator=g, dtype=torch.float64) + 0.1
    return h, W, b, y, cw


def _kwargs(opts, cw):
    kw = dict(opts)
    if kw.get("class_weight") == "rand":
        kw["class_weight"] = cw
    return kw


def _reference(h, W, b, target, reduction, kw):
    """crossent.cross_entropy on the materialised (M, V) logits (class weights renamed), for
    class indices (...) or probabilities (..., V) as the target."""
    kw = dict(kw)
    cw = kw.pop("class_weight", None)
    V = W.shape[0]
    logits = (h @ W.t() + b if b is not None else h @ W.t()).reshape(-1, V)
    flat = target.reshape(-1, V) if target.is_floating_point() else target.reshape(-1)
    out = crossent.cross_entropy(logits, flat, weight=cw, reduction=reduction, **kw)
    return out.reshape(h.shape[:-1]) if reduction == "none" else out


def _grads(out, inputs, reduction, seed=1):
    if reduction == "none":
        g = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed), dtype=out.dtype)
    else:
        g = torch.tensor(1.7, dtype=out.dtype)
    return torch.autograd.grad(out, inputs, g)


def _assert_parity(h, W, b, target, cw, opts, reduction, atol=1e-10, rtol=1e-9, **extra):
    """linear_cross_entropy against _reference: loss, shape, dtype and every gradient."""
    kw = _kwargs(opts, cw)
    inputs = (h, W) if b is None else (h, W, b)
    ref = _reference(h, W, b, target, reduction, kw)
    got = crossent.linear_cross_entropy(h, W, target, bias=b, reduction=reduction, **kw, **extra)
    assert got.shape == ref.shape and got.dtype == ref.dtype
    if reduction == "none":
        assert got.shape == h.shape[:-1]
    torch.testing.assert_close(got, ref, atol=atol, rtol=rtol)
    for g_got, g_ref in zip(_grads(got, inputs, reduction), _grads(ref, inputs, reduction),
                            strict=True):
        assert g_got.dtype == g_ref.dtype
        torch.testing.assert_close(g_got, g_ref, atol=atol, rtol=rtol)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("name", list(OPTIONS))
def test_parity_float64_every_option(name, reduction):
    h, W, b, y, cw = _problem()
    _assert_parity(h, W, b, y, cw, OPTIONS[name], reduction, chunk_size=5)


@pytest.mark.parametrize("chunk_size", [1, 3, 29, 30, 1000, None])
def test_chunk_sizes(chunk_size):
    h, W, b, y, cw = _problem()
    _assert_parity(h, W, b, y, cw, OPTIONS["everything"], "mean", chunk_size=chunk_size)


@pytest.mark.parametrize(
    "N,D,V,lead",
    [(1, 5, 7, None), (1, 3, 1, None), (17, 1, 2, None), (0, 4, 11, (2, 3)), (0, 6, 13, (3, 1, 4))],
)
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_odd_shapes(N, D, V, lead, reduction):
    h, W, b, y, cw = _problem(N=N, D=D, V=V, lead=lead, ignore_every=0 if N == 1 else 3)
    _assert_parity(h, W, b, y, cw, {"label_smoothing": 0.1, "z_loss": 1e-3}, reduction,
                   chunk_size=2)


def test_no_bias_and_partial_requires_grad():
    h, W, _, y, cw = _problem()
    _assert_parity(h, W, None, y, cw, OPTIONS["focal"], "sum", chunk_size=4)
    # Only the weight needs a gradient (frozen hidden), then only the hidden.
    for need_h, need_w in [(False, True), (True, False)]:
        hh = h.detach().requires_grad_(need_h)
        WW = W.detach().requires_grad_(need_w)
        leaf = hh if need_h else WW
        ref = torch.autograd.grad(_reference(hh, WW, None, y, "mean", {}), leaf)[0]
        got = torch.autograd.grad(crossent.linear_cross_entropy(hh, WW, y, chunk_size=3), leaf)[0]
        torch.testing.assert_close(got, ref, atol=1e-12, rtol=1e-10)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_all_ignored_chunks(reduction):
    h, W, b, y, cw = _problem(N=12)
    y[:8] = -100  # the first two chunks of 4 are entirely ignored
    _assert_parity(h, W, b, y, cw, {"label_smoothing": 0.1}, reduction, chunk_size=4)
    y[:] = -100  # nothing left: loss 0, zero gradients (cross_entropy's convention for mean)
    out = crossent.linear_cross_entropy(h, W, y, bias=b, reduction=reduction, chunk_size=4)
    assert torch.all(out == 0)
    grads = torch.autograd.grad(out.sum(), (h, W, b))
    assert all(torch.all(g == 0) for g in grads)


def test_ignored_tokens_cost_no_matmul(monkeypatch):
    import crossent.backends.torch_ops.linear as lin

    h, W, b, y, _ = _problem(N=20, ignore_every=0)
    y[5:] = -100
    seen = []
    orig = lin.linear_cross_entropy_rows

    def spy(hidden, *args, **kwargs):
        seen.append(hidden.shape[0])
        return orig(hidden, *args, **kwargs)

    monkeypatch.setattr(lin, "linear_cross_entropy_rows", spy)
    crossent.linear_cross_entropy(h, W, y, bias=b).backward()
    assert seen == [5]


def test_grad_output_scaling_and_retain_graph():
    h, W, b, y, cw = _problem()
    kw = {"gamma": 1.5, "class_weight": cw}
    ref = _reference(h, W, b, y, "mean", kw)
    ref_g = torch.autograd.grad(3.0 * ref, (h, W, b))
    got = crossent.linear_cross_entropy(h, W, y, bias=b, chunk_size=6, **kw)
    first = [g.clone() for g in torch.autograd.grad(3.0 * got, (h, W, b), retain_graph=True)]
    second = torch.autograd.grad(-0.5 * got, (h, W, b))  # recomputed from the saved inputs
    for f, s, r in zip(first, second, ref_g, strict=True):
        torch.testing.assert_close(f, r, atol=1e-12, rtol=1e-10)
        torch.testing.assert_close(s, r * (-0.5 / 3.0), atol=1e-12, rtol=1e-10)


def test_reduction_none_grad_output_with_zeros():
    h, W, b, y, _ = _problem()
    go = torch.randn(y.shape, dtype=torch.float64)
    go[::3] = 0.0
    ref = torch.autograd.grad(_reference(h, W, b, y, "none", {"z_loss": 0.1}), (h, W, b), go)
    out = crossent.linear_cross_entropy(h, W, y, bias=b, reduction="none", z_loss=0.1)
    got = torch.autograd.grad(out, (h, W, b), go)
    for g, r in zip(got, ref, strict=True):
        torch.testing.assert_close(g, r, atol=1e-12, rtol=1e-10)


def test_gradient_accumulates_into_existing_grad():
    h, W, b, y, _ = _problem()
    for _ in range(2):
        crossent.linear_cross_entropy(h, W, y, bias=b, chunk_size=7).backward()
    hr, Wr, br = (t.detach().clone().requires_grad_() for t in (h, W, b))
    (2 * _reference(hr, Wr, br, y, "mean", {})).backward()
    for t, r in [(h, hr), (W, Wr), (b, br)]:
        torch.testing.assert_close(t.grad, r.grad, atol=1e-12, rtol=1e-10)


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_gradcheck(reduction):
    h, W, b, y, cw = _problem(N=5, D=3, V=4, ignore_every=3)
    opts = {"label_smoothing": 0.1, "gamma": 1.5, "z_loss": 1e-2, "softcap": 2.0}

    def f(h, W, b):
        return crossent.linear_cross_entropy(h, W, y, bias=b, class_weight=cw,
                                             reduction=reduction, chunk_size=2, **opts)

    assert torch.autograd.gradcheck(f, (h, W, b))


def _assert_bf16_close(h, W, b, target, kw, wgrad, ref_dtype):
    """bf16 leaves: an fp32 loss and bf16 gradients (chunks of 16 rows, the weight's gradient
    accumulated in ``wgrad``), close to _reference on the same values in ``ref_dtype``."""
    got = crossent.linear_cross_entropy(h, W, target, bias=b, chunk_size=16, weight_grad_dtype=wgrad,
                                        **kw)
    assert got.dtype == torch.float32
    g_got = torch.autograd.grad(got, (h, W, b))
    assert [g.dtype for g in g_got] == [torch.bfloat16] * 3
    leaves = tuple(x.detach().to(ref_dtype).requires_grad_() for x in (h, W, b))
    ref = _reference(*leaves, target, "mean", kw)
    g_ref = torch.autograd.grad(ref, leaves)
    torch.testing.assert_close(got.to(ref_dtype), ref, atol=2e-2, rtol=1e-2)
    tol = 3e-2 if wgrad is None else 6e-2
    for g, r in zip(g_got, g_ref, strict=True):
        assert (g.to(ref_dtype) - r).abs().max().item() <= tol * r.abs().max().item()


@pytest.mark.parametrize("wgrad", [None, torch.bfloat16])
@pytest.mark.parametrize("name", ["plain", "everything"])
def test_bf16_close_to_unfused(name, wgrad):
    """bf16 inputs: compared with the unfused loss on the same bf16 inputs, computed in fp64."""
    h, W, b, y, cw = _problem(N=64, D=32, V=300, dtype=torch.bfloat16)
    _assert_bf16_close(h, W, b, y, _kwargs(OPTIONS[name], cw), wgrad, torch.float64)


def test_bf16_weight_grad_fp32_accumulation_is_more_accurate():
    h, W, _, y, _ = _problem(N=256, D=16, V=64, dtype=torch.bfloat16, ignore_every=0)
    h64, W64 = h.detach().double(), W.detach().double().requires_grad_()
    (g_ref,) = torch.autograd.grad(_reference(h64, W64, None, y, "sum", {}), W64)

    def err(dtype):
        out = crossent.linear_cross_entropy(h, W, y, reduction="sum", chunk_size=1,
                                            weight_grad_dtype=dtype)
        (g,) = torch.autograd.grad(out, W)
        return (g.double() - g_ref).abs().max().item()

    assert err(None) <= err(torch.bfloat16)


def test_float32_matches_torch_cross_entropy():
    h, W, b, y, _ = _problem(N=40, D=16, V=50, dtype=torch.float32)
    ref = torch.nn.functional.cross_entropy(h @ W.t() + b, y, label_smoothing=0.1)
    got = crossent.linear_cross_entropy(h, W, y, bias=b, label_smoothing=0.1, chunk_size=8)
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)
    for g, r in zip(torch.autograd.grad(got, (h, W, b)), torch.autograd.grad(ref, (h, W, b)),
                    strict=True):
        torch.testing.assert_close(g, r, atol=1e-5, rtol=1e-4)


def test_module():
    h, W, b, y, cw = _problem()
    mod = crossent.nn.LinearCrossEntropyLoss(cw, label_smoothing=0.1, z_loss=1e-3, chunk_size=4)
    assert "label_smoothing" in repr(mod)
    got = mod(h, W, y, b)
    ref = _reference(h, W, b, y, "mean", {"class_weight": cw, "label_smoothing": 0.1,
                                          "z_loss": 1e-3})
    torch.testing.assert_close(got, ref, atol=1e-12, rtol=1e-10)
    with pytest.raises(ValueError, match="reduction"):
        crossent.nn.LinearCrossEntropyLoss(reduction="avg")
    with pytest.raises(ValueError, match="chunk_size"):
        crossent.nn.LinearCrossEntropyLoss(chunk_size=0)


def test_chunk_rows_formula():
    cpu = torch.device("cpu")
    assert chunk_rows(32_000, torch.float32, cpu) == CPU_BUDGET_BYTES // (32_000 * 4)
    assert chunk_rows(1000, torch.float32, cpu, budget=4000 * 10) == 10
    assert chunk_rows(1000, torch.bfloat16, cpu, torch.float32, budget=6000 * 10) == 10
    assert chunk_rows(10**9, torch.float32, cpu) == 1
    assert chunk_rows(1000, torch.float32, torch.device("meta"), budget=16000 * 3) == 3


def test_validation_errors():
    h, W, b, y, cw = _problem(dtype=torch.float32)
    lce = crossent.linear_cross_entropy
    with pytest.raises(ValueError, match="hidden's last dim"):
        lce(h[:, :5], W, y)
    with pytest.raises(ValueError, match=r"weight must have shape \(V, D\)"):
        lce(h, W[0], y)
    with pytest.raises(TypeError, match="weight has dtype"):
        lce(h, W.double(), y)
    with pytest.raises(TypeError, match="hidden must be a floating-point"):
        lce(h.long(), W, y)
    with pytest.raises(ValueError, match="bias must have shape"):
        lce(h, W, y, bias=b[:3])
    with pytest.raises(ValueError, match="target of class indices must have shape"):
        lce(h, W, y[:3])
    with pytest.raises(ValueError, match="outside"):
        lce(h, W, torch.full_like(y, 37))
    with pytest.raises(ValueError, match="for class indices pass an integer tensor"):
        lce(h, W, y.float())  # a float target is read as probabilities (..., V)
    with pytest.raises(ValueError, match="chunk_size"):
        lce(h, W, y, chunk_size=0)
    with pytest.raises(ValueError, match="class_weight must have shape"):
        lce(h, W, y, class_weight=cw[:3])
    with pytest.raises(ValueError, match="label_smoothing"):
        lce(h, W, y, label_smoothing=2.0)
    with pytest.raises(ValueError, match="reduction"):
        lce(h, W, y, reduction="avg")
    with pytest.raises(ValueError, match="backend"):
        lce(h, W, y, backend="cuda")


# --------------------------------------------------------------------------------------------
# probability (soft) targets: target (..., V) of class probabilities


def _soft(lead, V, seed=0, dtype=torch.float64):
    """A (..., V) probability target: softmax rows, some entries exactly 0, a one-hot row and
    a row of total mass != 1 (cross_entropy takes any non-negative target)."""
    g = torch.Generator().manual_seed(100 + seed)
    t = torch.softmax(2.0 * torch.randn(*lead, V, generator=g, dtype=torch.float64), dim=-1)
    flat = t.view(-1, V)
    if flat.shape[0]:
        flat[:, ::5] = 0.0
        flat[0] = 0.0
        flat[0, V // 2] = 1.0
    if flat.shape[0] > 1:
        flat[-1] *= 1.7
    return t.to(dtype)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("name", list(OPTIONS))
def test_soft_parity_float64_every_option(name, reduction):
    h, W, b, _, cw = _problem()
    t = _soft((29,), 37)
    _assert_parity(h, W, b, t, cw, OPTIONS[name], reduction, chunk_size=5)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize(
    "opts",
    [{}, {"label_smoothing": 0.1}, {"class_weight": "rand"},
     {"label_smoothing": 0.2, "class_weight": "rand"}],
    ids=["plain", "smoothing", "class_weight", "smoothing_class_weight"],
)
def test_soft_matches_torch_cross_entropy(opts, reduction):
    """Where the semantics overlap, PyTorch's own probability-target cross-entropy (float64):
    ``F.cross_entropy`` on the materialised logits and, where present, ``F.linear_cross_entropy``."""
    h, W, b, _, cw = _problem(N=23)
    t = _soft((23,), 37, seed=1)
    kw = _kwargs(opts, cw)
    got = crossent.linear_cross_entropy(h, W, t, bias=b, reduction=reduction, chunk_size=4, **kw)
    ref = torch.nn.functional.cross_entropy(
        h @ W.t() + b, t, weight=kw.get("class_weight"),
        label_smoothing=kw.get("label_smoothing", 0.0), reduction=reduction,
    )
    refs = [ref]
    if hasattr(torch.nn.functional, "linear_cross_entropy"):  # PyTorch >= 2.13
        refs.append(torch.nn.functional.linear_cross_entropy(
            h, W, t, linear_bias=b, weight=kw.get("class_weight"),
            label_smoothing=kw.get("label_smoothing", 0.0), reduction=reduction,
        ))
    g_got = _grads(got, (h, W, b), reduction)
    for r in refs:
        torch.testing.assert_close(got, r, atol=1e-11, rtol=1e-10)
        for g, gr in zip(g_got, _grads(r, (h, W, b), reduction), strict=True):
            torch.testing.assert_close(g, gr, atol=1e-11, rtol=1e-10)


@pytest.mark.parametrize("chunk_size", [1, 3, 29, 30, 1000, None])
def test_soft_chunk_sizes(chunk_size):
    h, W, b, _, cw = _problem()
    t = _soft((29,), 37, seed=2)
    _assert_parity(h, W, b, t, cw, OPTIONS["everything"], "mean", chunk_size=chunk_size)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("lead", [(3, 4), (2, 1, 5), (1, 7)])
@pytest.mark.parametrize("chunk_size", [1, 5, 1000])
def test_soft_leading_shapes(lead, reduction, chunk_size):
    h, W, b, _, cw = _problem(lead=lead)
    t = _soft(lead, 37, seed=3)
    _assert_parity(h, W, b, t, cw, OPTIONS["everything"], reduction, chunk_size=chunk_size)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("chunk_size", [1, 4, 1000])
def test_soft_non_viewable_target(reduction, chunk_size):
    """A (B, T, V) target whose leading dims do not flatten to a view (the shifted slice of a
    teacher's (B, T + 1, V) probabilities; a transposed one): rows are gathered per chunk."""
    h, W, b, _, cw = _problem(lead=(3, 5))
    full = _soft((3, 6), 37, seed=4)
    for t in (full[:, :-1], _soft((5, 3), 37, seed=5).transpose(0, 1)):
        with pytest.raises(RuntimeError):
            t.view(-1, 37)
        _assert_parity(h, W, b, t, cw, {"label_smoothing": 0.1, "z_loss": 1e-2,
                                             "class_weight": "rand"}, reduction,
                            chunk_size=chunk_size)


def test_soft_target_is_never_copied(monkeypatch):
    """The chunk loop receives the user's tensor itself (or a view of it), whatever its layout
    or dtype: no N x V copy; every row is computed (no ignore-row selection)."""
    import crossent.backends.torch_ops.linear as lin

    h, W, b, _, _ = _problem(lead=(2, 6), ignore_every=0)
    seen = []
    orig = lin.linear_cross_entropy_rows

    def spy(hidden, weight, bias, target, *args, **kwargs):
        seen.append((hidden.shape[0], target.untyped_storage().data_ptr()))
        return orig(hidden, weight, bias, target, *args, **kwargs)

    monkeypatch.setattr(lin, "linear_cross_entropy_rows", spy)
    full = _soft((2, 7), 37, dtype=torch.float16)  # a half target is cast per chunk
    for t in (_soft((2, 6), 37), _soft((2, 6), 37, dtype=torch.bfloat16), full[:, 1:]):
        seen.clear()
        # ignore_index=0 selects nothing: it does not apply to probability targets
        crossent.linear_cross_entropy(h, W, t, bias=b, ignore_index=0, chunk_size=5).backward()
        assert seen == [(12, t.untyped_storage().data_ptr())]


def test_soft_target_dtypes_cast_per_chunk():
    """A float16/bfloat16/float32 target with float64 inputs: the target is cast per chunk,
    equal to the reference on the target converted once."""
    h, W, b, _, _ = _problem()
    for dtype in (torch.float16, torch.bfloat16, torch.float32):
        t = _soft((29,), 37, seed=6, dtype=dtype)
        got = crossent.linear_cross_entropy(h, W, t, bias=b, chunk_size=6, label_smoothing=0.1)
        ref = _reference(h, W, b, t.double(), "mean", {"label_smoothing": 0.1})
        torch.testing.assert_close(got, ref, atol=1e-12, rtol=1e-10)


def test_soft_ignore_index_does_not_apply():
    h, W, b, _, _ = _problem()
    t = _soft((29,), 37, seed=7)
    base = crossent.linear_cross_entropy(h, W, t, bias=b, chunk_size=4)
    for ignore_index in (0, 5, -100):
        out = crossent.linear_cross_entropy(h, W, t, bias=b, chunk_size=4, ignore_index=ignore_index)
        torch.testing.assert_close(out, base, atol=0, rtol=0)
    # a "mean" divides by the number of rows, zero-mass rows included
    t0 = t.clone()
    t0[:10] = 0.0
    s = crossent.linear_cross_entropy(h, W, t0, bias=b, reduction="sum")
    m = crossent.linear_cross_entropy(h, W, t0, bias=b, reduction="mean")
    torch.testing.assert_close(m, s / 29, atol=1e-14, rtol=1e-12)


def test_soft_no_gradient_to_target_and_grad_output():
    h, W, b, _, cw = _problem()
    t = _soft((29,), 37, seed=8).requires_grad_()
    kw = {"gamma": 1.5, "class_weight": cw, "poly1": 0.5}
    got = crossent.linear_cross_entropy(h, W, t, bias=b, chunk_size=6, **kw)
    assert torch.autograd.grad(got, t, retain_graph=True, allow_unused=True)[0] is None
    ref = _reference(h, W, b, t.detach(), "mean", kw)
    ref_g = torch.autograd.grad(3.0 * ref, (h, W, b))
    first = [g.clone() for g in torch.autograd.grad(3.0 * got, (h, W, b), retain_graph=True)]
    second = torch.autograd.grad(-0.5 * got, (h, W, b))  # recomputed from the saved inputs
    for f, s, r in zip(first, second, ref_g, strict=True):
        torch.testing.assert_close(f, r, atol=1e-12, rtol=1e-10)
        torch.testing.assert_close(s, r * (-0.5 / 3.0), atol=1e-12, rtol=1e-10)
    assert t.grad is None


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_soft_empty_batch(reduction):
    h, W, b, _, _ = _problem(N=0, lead=(0, 3))
    t = _soft((0, 3), 37)
    _assert_parity(h, W, b, t, None, {"z_loss": 1e-2}, reduction, chunk_size=2)


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_soft_gradcheck(reduction):
    h, W, b, _, cw = _problem(N=5, D=3, V=4)
    t = _soft((5,), 4, seed=9)
    opts = {"label_smoothing": 0.1, "gamma": 1.5, "z_loss": 1e-2, "softcap": 2.0,
            "confidence_penalty": 0.1, "poly1": 0.5}

    def f(h, W, b):
        return crossent.linear_cross_entropy(h, W, t, bias=b, class_weight=cw,
                                             reduction=reduction, chunk_size=2, **opts)

    assert torch.autograd.gradcheck(f, (h, W, b))


@pytest.mark.parametrize("wgrad", [None, torch.bfloat16])
@pytest.mark.parametrize("name", ["plain", "smoothing_class_weight", "everything"])
def test_soft_bf16_close_to_fp32(name, wgrad):
    """bf16 inputs against the same values in fp32 (the unfused fp32 loss)."""
    h, W, b, _, cw = _problem(N=64, D=32, V=300, dtype=torch.bfloat16)
    t = _soft((64,), 300, seed=10, dtype=torch.float32)
    _assert_bf16_close(h, W, b, t, _kwargs(OPTIONS[name], cw), wgrad, torch.float32)


def test_soft_module():
    h, W, b, _, cw = _problem()
    t = _soft((29,), 37, seed=11)
    mod = crossent.nn.LinearCrossEntropyLoss(cw, label_smoothing=0.1, chunk_size=4)
    ref = _reference(h, W, b, t, "mean", {"class_weight": cw, "label_smoothing": 0.1})
    torch.testing.assert_close(mod(h, W, t, b), ref, atol=1e-12, rtol=1e-10)


def test_soft_validation_errors():
    h, W, _, _, _ = _problem(lead=(3, 4), dtype=torch.float32)
    t = _soft((3, 4), 37, dtype=torch.float32)
    lce = crossent.linear_cross_entropy
    with pytest.raises(ValueError, match=r"must have shape \(\.\.\., V\) = \(3, 4, 37\)"):
        lce(h, W, t[..., :36])  # wrong V
    with pytest.raises(ValueError, match="target of class probabilities must have shape"):
        lce(h, W, t[:2])  # wrong leading shape
    with pytest.raises(ValueError, match="target of class probabilities must have shape"):
        lce(h, W, t.reshape(12, 37))  # flattened: the leading shape must be hidden's
    bad = t.clone()
    bad[1, 2, 3] = -1e-3
    with pytest.raises(ValueError, match=">= 0"):
        lce(h, W, bad)
    with pytest.raises(TypeError, match="complex"):
        lce(h, W, t.to(torch.complex64))
    with pytest.raises(ValueError, match="target is on"):
        lce(h, W, t.to("meta"))
    # The Triton blockwise kernels take class indices only: a clear refusal, on any device.
    with pytest.raises(ValueError, match="probability"):
        lce(h, W, t, backend="triton")
    # The vocab-parallel head keeps index targets, on one rank too.
    import crossent.distributed as cd

    with pytest.raises(TypeError, match="probability targets are not supported"):
        cd.vocab_parallel_linear_cross_entropy(h, W, t)


def test_triton_supports_refuses_probability_targets():
    from crossent._options import SoftmaxOptions
    from crossent.backends.triton.linear import supports, try_triton_linear_cross_entropy

    h, W, b, _, _ = _problem(dtype=torch.float32)
    t = _soft((29,), 37, dtype=torch.float32)
    assert not supports(SoftmaxOptions(), h, t)
    assert try_triton_linear_cross_entropy(
        h, W, b, t, None, SoftmaxOptions(), "mean", None, None, required=False
    ) is None


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("kw", [{}, {"label_smoothing": 0.1, "gamma": 1.5}, {"z_loss": 1e-3, "poly1": 0.5}],
                         ids=lambda k: "+".join(k) or "plain")
def test_shift_equals_slicing_by_hand(reduction, kw):
    """shift=True scores position t against target t + 1 without slicing the hidden states."""
    g = torch.Generator().manual_seed(31)
    h = torch.randn(3, 7, 8, dtype=torch.float64, generator=g, requires_grad=True)
    W = torch.randn(20, 8, dtype=torch.float64, generator=g, requires_grad=True)
    y = torch.randint(0, 20, (3, 7), generator=g)
    y[0, 2] = -100
    out = crossent.linear_cross_entropy(h, W, y, shift=True, reduction=reduction, chunk_size=4, **kw)
    ref = crossent.linear_cross_entropy(h[:, :-1], W, y[:, 1:], reduction=reduction, **kw)
    if reduction == "none":
        assert out.shape == y.shape and not out[:, -1].any()
        out = out[:, :-1]
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
    ga = torch.autograd.grad(out.sum(), (h, W))
    gb = torch.autograd.grad(ref.sum(), (h, W))
    for a, b in zip(ga, gb, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-11, atol=1e-12)
    with pytest.raises(TypeError, match="shift"):
        crossent.linear_cross_entropy(h, W, torch.rand(3, 7, 20, dtype=torch.float64), shift=True)
