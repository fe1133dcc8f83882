"""The softmax family: fused torch path vs the float64 reference, PyTorch, identities, hostile input."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import crossent
from _helpers import softmax_reference
from crossent import reference as ref
from crossent.backends import native
from crossent.backends.torch_ops import softmax as cpu_softmax

# every test runs on both CPU implementations (tests/conftest.py)
pytestmark = pytest.mark.usefixtures("cpu_path")


def _fused(logits, target, grad_output=None, **kw):
    x = logits.detach().clone().requires_grad_(True)
    loss = crossent.cross_entropy(x, target, **kw)
    go = torch.ones_like(loss) if grad_output is None else grad_output
    (g,) = torch.autograd.grad(loss, x, go)
    return loss.detach(), g


def _targets(kind: str, shape_x: tuple[int, ...], C: int, gen: torch.Generator) -> torch.Tensor:
    if kind == "index":
        tshape = () if len(shape_x) == 1 else (shape_x[0], *shape_x[2:])
        t = torch.randint(0, C, tshape, generator=gen)
        if t.ndim:
            t.view(-1)[::3] = -100  # some ignored rows
        return t
    p = torch.rand(shape_x, generator=gen, dtype=torch.float64)
    dim = 0 if len(shape_x) == 1 else 1
    return p / p.sum(dim=dim, keepdim=True)


OPTION_GRID = {
    "label_smoothing": [0.0, 0.15],
    "gamma": [0.0, 0.5, 2.0, crossent.flsd53],
    "weighted": [False, True],
    "extras": [
        {},
        {"z_loss": 1e-2},
        {"softcap": 4.0},
        {"confidence_penalty": 0.3},
        {"poly1": -0.7},
        {"z_loss": 1e-3, "softcap": 3.0, "confidence_penalty": 0.1, "poly1": 1.0},
    ],
}


@pytest.mark.parametrize("kind", ["index", "prob"])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_fused_matches_reference_over_every_combination(kind, reduction):
    gen = torch.Generator().manual_seed(1)
    C = 7
    x = torch.randn(9, C, generator=gen, dtype=torch.float64) * 3
    t = _targets(kind, tuple(x.shape), C, gen)
    w = torch.rand(C, generator=gen, dtype=torch.float64) + 0.2
    for eps, gamma, weighted, extras in itertools.product(*OPTION_GRID.values()):
        kw = dict(
            label_smoothing=eps, gamma=gamma, weight=w if weighted else None, reduction=reduction, **extras
        )
        go = torch.rand(9, generator=gen, dtype=torch.float64) + 0.5 if reduction == "none" else None
        loss, grad = _fused(x, t, go, **kw)
        rloss, rgrad = softmax_reference(x, t, go, **kw)
        torch.testing.assert_close(loss, rloss, rtol=1e-10, atol=1e-12, msg=str(kw))
        torch.testing.assert_close(grad, rgrad, rtol=1e-9, atol=1e-12, msg=str(kw))


@pytest.mark.parametrize(
    "shape", [(5,), (4, 6), (3, 5, 4), (2, 3, 4, 2)], ids=["1d", "2d", "3d", "4d"]
)
@pytest.mark.parametrize("kind", ["index", "prob"])
def test_layouts_match_reference(shape, kind):
    gen = torch.Generator().manual_seed(2)
    C = shape[0] if len(shape) == 1 else shape[1]
    x = torch.randn(shape, generator=gen, dtype=torch.float64)
    t = _targets(kind, shape, C, gen)
    for kw in ({}, {"gamma": 1.5, "label_smoothing": 0.1, "z_loss": 0.01}, {"reduction": "none"}):
        go = None
        if kw.get("reduction") == "none":
            shape_out = x.shape[:1] + x.shape[2:] if x.ndim > 1 else ()
            go = torch.rand(shape_out, generator=gen, dtype=torch.float64)
        loss, grad = _fused(x, t, go, **kw)
        rloss, rgrad = softmax_reference(x, t, go, **kw)
        torch.testing.assert_close(loss, rloss, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(grad, rgrad, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("eps", [0.0, 0.2])
@pytest.mark.parametrize("shape", [(8, 5), (3, 5, 2, 3)])
def test_matches_pytorch_on_overlapping_options(reduction, weighted, eps, shape):
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(shape, generator=gen)
    C = shape[1]
    t = torch.randint(0, C, (shape[0], *shape[2:]), generator=gen)
    t.view(-1)[1::4] = 3 if C > 3 else 0
    t.view(-1)[::5] = -1
    w = torch.rand(C, generator=gen) + 0.1 if weighted else None
    kw = dict(weight=w, label_smoothing=eps, reduction=reduction, ignore_index=-1)
    a = x.clone().requires_grad_()
    b = x.clone().requires_grad_()
    la = crossent.cross_entropy(a, t, **kw)
    lb = F.cross_entropy(b, t, **kw)
    go = torch.rand_like(lb) + 0.5
    (la * go).sum().backward()
    (lb * go).sum().backward()
    torch.testing.assert_close(la, lb, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(a.grad, b.grad, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("weighted", [False, True])
def test_probability_targets_match_pytorch(reduction, weighted):
    gen = torch.Generator().manual_seed(4)
    x = torch.randn(6, 4, 3, generator=gen, dtype=torch.float64)
    t = torch.softmax(torch.randn(6, 4, 3, generator=gen, dtype=torch.float64), dim=1)
    w = torch.rand(4, generator=gen, dtype=torch.float64) if weighted else None
    a = x.clone().requires_grad_()
    b = x.clone().requires_grad_()
    la = crossent.cross_entropy(a, t, weight=w, label_smoothing=0.1, reduction=reduction)
    lb = F.cross_entropy(b, t, weight=w, label_smoothing=0.1, reduction=reduction)
    la.sum().backward()
    lb.sum().backward()
    torch.testing.assert_close(la, lb)
    torch.testing.assert_close(a.grad, b.grad)


@pytest.mark.parametrize(
    "kw",
    [
        {},
        {"gamma": 0.3, "label_smoothing": 0.2},
        {"gamma": crossent.flsd53, "poly1": -1.0, "reduction": "none"},
        {"softcap": 2.0, "confidence_penalty": 0.5, "z_loss": 0.1, "reduction": "sum"},
        {"gamma": 2.0, "softcap": 5.0, "label_smoothing": 0.1, "poly1": 2.0, "confidence_penalty": 0.2},
    ],
)
def test_gradcheck_float64(kw):
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(5, 4, generator=gen, dtype=torch.float64, requires_grad=True)
    y = torch.tensor([0, 3, -100, 1, 2])
    w = torch.rand(4, generator=gen, dtype=torch.float64) + 0.5
    assert torch.autograd.gradcheck(lambda z: crossent.cross_entropy(z, y, weight=w, **kw), (x,))
    p = torch.softmax(torch.randn(5, 4, generator=gen, dtype=torch.float64), 1)
    assert torch.autograd.gradcheck(lambda z: crossent.cross_entropy(z, p, **kw), (x,))


def test_gradcheck_kdim_none_reduction():
    gen = torch.Generator().manual_seed(6)
    x = torch.randn(2, 3, 4, generator=gen, dtype=torch.float64, requires_grad=True)
    y = torch.randint(0, 3, (2, 4), generator=gen)
    assert torch.autograd.gradcheck(
        lambda z: crossent.cross_entropy(z, y, reduction="none", gamma=1.0, label_smoothing=0.1), (x,)
    )


# ------------------------------------------------------------------------------ identities


def test_identities():
    gen = torch.Generator().manual_seed(7)
    x = torch.randn(10, 6, generator=gen, dtype=torch.float64)
    y = torch.randint(0, 6, (10,), generator=gen)
    base_l, base_g = _fused(x, y)
    for kw in ({"gamma": 0.0}, {"label_smoothing": 0.0}, {"weight": torch.ones(6, dtype=torch.float64)},
               {"z_loss": 0.0, "confidence_penalty": 0.0, "poly1": 0.0}):
        l, g = _fused(x, y, **kw)
        assert torch.equal(l, base_l) and torch.equal(g, base_g), kw
    # uniform weights are a no-op for a mean, also with regularisers
    kw = dict(gamma=2.0, label_smoothing=0.1, z_loss=0.1, confidence_penalty=0.2, poly1=0.5)
    l1, g1 = _fused(x, y, **kw)
    l2, g2 = _fused(x, y, weight=torch.full((6,), 3.0, dtype=torch.float64), **kw)
    torch.testing.assert_close(l1, l2)
    torch.testing.assert_close(g1, g2)
    # focal_loss is cross_entropy with gamma
    l3 = crossent.focal_loss(x, y, gamma=3.0)
    torch.testing.assert_close(l3, crossent.cross_entropy(x, y, gamma=3.0))
    # one-hot probability targets == index targets
    l4, g4 = _fused(x, F.one_hot(y, 6).double(), gamma=2.0, label_smoothing=0.1, poly1=1.0)
    l5, g5 = _fused(x, y, gamma=2.0, label_smoothing=0.1, poly1=1.0)
    torch.testing.assert_close(l4, l5)
    torch.testing.assert_close(g4, g5)


def test_focal_ratio_is_the_focal_factor():
    gen = torch.Generator().manual_seed(8)
    x = torch.randn(20, 5, generator=gen, dtype=torch.float64)
    y = torch.randint(0, 5, (20,), generator=gen)
    ce = crossent.cross_entropy(x, y, reduction="none")
    fl = crossent.cross_entropy(x, y, gamma=2.5, reduction="none")
    q_y = torch.softmax(x, 1).gather(1, y[:, None]).squeeze(1)
    torch.testing.assert_close(fl / ce, (1 - q_y) ** 2.5)


def test_masked_equals_sliced():
    gen = torch.Generator().manual_seed(9)
    x = torch.randn(12, 5, generator=gen, dtype=torch.float64)
    y = torch.randint(0, 5, (12,), generator=gen)
    keep = torch.rand(12, generator=gen) > 0.4
    ym = torch.where(keep, y, -100)
    w = torch.rand(5, generator=gen, dtype=torch.float64)
    kw = dict(weight=w, gamma=1.5, label_smoothing=0.1, z_loss=0.01, poly1=0.3)
    lm, gm = _fused(x, ym, **kw)
    ls, gs = _fused(x[keep], y[keep], **kw)
    torch.testing.assert_close(lm, ls)
    torch.testing.assert_close(gm[keep], gs)
    assert torch.all(gm[~keep] == 0)


def test_moving_the_class_dim_changes_nothing():
    gen = torch.Generator().manual_seed(10)
    x = torch.randn(3, 4, 5, 6, generator=gen, dtype=torch.float64)  # classes at dim 1
    y = torch.randint(0, 4, (3, 5, 6), generator=gen)
    kw = dict(gamma=2.0, label_smoothing=0.1, reduction="none")
    l1, g1 = _fused(x, y, **kw)
    x2 = x.movedim(1, -1).reshape(-1, 4)
    l2, g2 = _fused(x2, y.reshape(-1), **kw)
    torch.testing.assert_close(l1.reshape(-1), l2)
    torch.testing.assert_close(g1.movedim(1, -1).reshape(-1, 4), g2)


def test_blocking_changes_nothing(monkeypatch, torch_path):
    gen = torch.Generator().manual_seed(11)
    x = torch.randn(37, 11, generator=gen)
    y = torch.randint(0, 11, (37,), generator=gen)
    y[::5] = -100
    w = torch.rand(11, generator=gen)
    for kw in (
        dict(gamma=crossent.flsd53, label_smoothing=0.05),  # the general schedule
        dict(label_smoothing=0.05, weight=w),  # coefficients known up front
        dict(),
    ):
        for xx in (x, x.bfloat16()):
            with monkeypatch.context() as m:
                l1, g1 = _fused(xx, y, **kw)
                for name in ("BLOCK_ELEMENTS", "LINEAR_BLOCK_ELEMENTS", "HALF_BLOCK_ELEMENTS"):
                    m.setattr(cpu_softmax, name, 11 * 4)  # blocks of 4 rows, ragged tail
                l2, g2 = _fused(xx, y, **kw)
            torch.testing.assert_close(l1, l2)
            torch.testing.assert_close(g1, g2)


# --------------------------------------------------------------------------- hostile inputs


@pytest.mark.parametrize("dtype,big", [(torch.float32, 1e4), (torch.float16, 6e4), (torch.bfloat16, 1e4)])
@pytest.mark.parametrize("gamma", [0.0, 0.25, 0.5, 2.0, crossent.flsd53])
def test_extreme_logits_are_finite(dtype, big, gamma):
    gen = torch.Generator().manual_seed(12)
    x = (torch.randint(-1, 2, (16, 9), generator=gen) * big).to(dtype)
    y = torch.randint(0, 9, (16,), generator=gen)
    y[:4] = x[:4].float().argmax(1)  # q_y -> 1 exactly: the gamma < 1 singularity
    for kw in ({}, {"label_smoothing": 0.1}, {"z_loss": 1e-4, "poly1": 1.0, "confidence_penalty": 0.1},
               {"softcap": 30.0}):
        xx = x.clone().requires_grad_()
        loss = crossent.cross_entropy(xx, y, gamma=gamma, **kw)
        loss.backward()
        assert torch.isfinite(loss), kw
        assert torch.isfinite(xx.grad).all(), kw
        assert loss.dtype == torch.float32 and xx.grad.dtype == dtype


def test_extreme_logits_match_reference():
    x = torch.tensor([[1e4, -1e4, 0.0], [-1e4, 1e4, 5e3], [3.0, 1e4, -2.0]])
    y = torch.tensor([1, 1, 1])
    for gamma in (0.0, 0.5, 2.0):
        loss, grad = _fused(x, y, gamma=gamma, reduction="none")
        rloss, rgrad = softmax_reference(x, y, gamma=gamma, reduction="none")
        torch.testing.assert_close(loss.double(), rloss, rtol=1e-5, atol=1e-3)
        torch.testing.assert_close(grad.double(), rgrad, rtol=1e-5, atol=1e-6)


def test_half_precision_matches_fp32():
    gen = torch.Generator().manual_seed(13)
    x = torch.randn(64, 50, generator=gen) * 4
    y = torch.randint(0, 50, (64,), generator=gen)
    kw = dict(gamma=2.0, label_smoothing=0.1)
    l32, _ = _fused(x, y, **kw)
    for dtype, tol in ((torch.bfloat16, 2e-2), (torch.float16, 2e-3)):
        xh = x.to(dtype)
        lh, gh = _fused(xh, y, **kw)
        l_ref, g_ref = _fused(xh.float(), y, **kw)  # same rounded inputs in fp32
        assert lh.dtype == torch.float32 and gh.dtype == dtype
        torch.testing.assert_close(lh, l_ref, rtol=1e-6, atol=1e-6)  # fp32 accumulation
        torch.testing.assert_close(gh.float(), g_ref, rtol=tol, atol=tol * 1e-2)
        torch.testing.assert_close(lh, l32, rtol=tol, atol=tol)


def test_all_rows_ignored_and_empty_batch():
    x = torch.randn(4, 3, requires_grad=True)
    loss = crossent.cross_entropy(x, torch.full((4,), -100), label_smoothing=0.1, gamma=2.0, z_loss=0.1)
    loss.backward()
    assert loss.item() == 0.0 and torch.all(x.grad == 0)
    assert torch.isnan(F.cross_entropy(x, torch.full((4,), -100)))  # the documented difference
    e = torch.randn(0, 3, requires_grad=True)
    for red in ("mean", "sum"):
        loss = crossent.cross_entropy(e, torch.zeros(0, dtype=torch.long), reduction=red)
        loss.backward()
        assert loss.item() == 0.0 and e.grad.shape == (0, 3)
    assert crossent.cross_entropy(e, torch.zeros(0, dtype=torch.long), reduction="none").shape == (0,)


def test_single_class_and_large_vocabulary():
    x = torch.randn(5, 1, requires_grad=True)
    loss = crossent.cross_entropy(x, torch.zeros(5, dtype=torch.long), gamma=2.0, label_smoothing=0.1)
    loss.backward()
    assert loss.item() == 0.0 and torch.all(x.grad == 0)
    gen = torch.Generator().manual_seed(14)
    x = torch.randn(3, 50_000, generator=gen, dtype=torch.float64)
    y = torch.tensor([0, 49_999, 123])
    for kw in ({}, {"gamma": 2.0, "label_smoothing": 0.1}):
        loss, grad = _fused(x, y, **kw)
        rloss, rgrad = softmax_reference(x, y, **kw)
        torch.testing.assert_close(loss, rloss)
        torch.testing.assert_close(grad, rgrad)


def test_grad_output_not_one_and_retain_graph():
    gen = torch.Generator().manual_seed(15)
    x = torch.randn(6, 4, generator=gen, dtype=torch.float64, requires_grad=True)
    y = torch.randint(0, 4, (6,), generator=gen)
    loss = crossent.cross_entropy(x, y, gamma=1.0)
    (3.5 * loss).backward(retain_graph=True)
    g1 = x.grad.clone()
    x.grad = None
    (-2.0 * loss).backward()  # second backward through the same node rescales exactly
    torch.testing.assert_close(x.grad, g1 * (-2.0 / 3.5))
    _, rg = softmax_reference(x.detach(), y, gamma=1.0)
    torch.testing.assert_close(g1, 3.5 * rg)


def test_inplace_backward_gives_the_same_gradients():
    gen = torch.Generator().manual_seed(16)
    h = torch.randn(7, 5, generator=gen, requires_grad=True)
    W = torch.randn(4, 5, generator=gen, requires_grad=True)
    y = torch.randint(0, 4, (7,), generator=gen)
    for kw in ({}, {"gamma": 2.0, "label_smoothing": 0.1, "softcap": 3.0, "confidence_penalty": 0.1}):
        crossent.cross_entropy(h @ W.T, y, **kw).backward()
        gh, gw = h.grad.clone(), W.grad.clone()
        h.grad = W.grad = None
        crossent.cross_entropy(h @ W.T, y, inplace_backward=True, **kw).backward()
        torch.testing.assert_close(h.grad, gh)
        torch.testing.assert_close(W.grad, gw)
        h.grad = W.grad = None


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(9, 6), (3, 6, 4)])
def test_no_grad_forward_matches(dtype, shape):
    gen = torch.Generator().manual_seed(17)
    x = torch.randn(shape, generator=gen).to(dtype)
    y = torch.randint(0, 6, (shape[0], *shape[2:]), generator=gen)
    y.view(-1)[0] = -100
    for kw in ({}, {"gamma": 2.0}, {"label_smoothing": 0.1, "z_loss": 0.1}, {"reduction": "none"}):
        with torch.no_grad():
            a = crossent.cross_entropy(x, y, **kw)
        b, _ = _fused(x, y, **kw)
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_one_fused_node_and_torch_compile_fullgraph(backend):
    gen = torch.Generator().manual_seed(18)
    x = torch.randn(8, 5, generator=gen, requires_grad=True)
    y = torch.randint(0, 5, (8,), generator=gen)
    loss = crossent.cross_entropy(x, y, gamma=2.0, label_smoothing=0.1)
    assert "crossent_softmax_ce" in type(loss.grad_fn).__name__  # the registered operator
    parents = [f for f, _ in loss.grad_fn.next_functions if f is not None]
    assert len(parents) == 1 and type(parents[0]).__name__ == "AccumulateGrad"  # straight to the leaf

    def f(z, t):
        return crossent.cross_entropy(z, t, gamma=crossent.flsd53, label_smoothing=0.1, z_loss=1e-3) * 2.0

    compiled = torch.compile(f, fullgraph=True, backend=backend)
    a = x.detach().clone().requires_grad_()
    b = x.detach().clone().requires_grad_()
    la, lb = f(a, y), compiled(b, y)
    la.backward()
    lb.backward()
    torch.testing.assert_close(la, lb)
    torch.testing.assert_close(a.grad, b.grad)


def test_nn_modules():
    gen = torch.Generator().manual_seed(19)
    x = torch.randn(6, 4, generator=gen)
    y = torch.randint(0, 4, (6,), generator=gen)
    w = torch.rand(4, generator=gen)
    m = crossent.nn.CrossEntropyLoss(w, label_smoothing=0.1)
    torch.testing.assert_close(m(x, y), F.cross_entropy(x, y, weight=w, label_smoothing=0.1))
    fm = crossent.nn.FocalLoss(gamma=crossent.flsd53)
    torch.testing.assert_close(fm(x, y), crossent.cross_entropy(x, y, gamma=crossent.flsd53))
    assert "gamma='flsd53'" in repr(fm)
    assert "weight" in dict(m.named_buffers())


# ------------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    "kwargs,target,exc,match",
    [
        ({}, torch.tensor([0, 5]), ValueError, "class index 5 outside"),
        ({}, torch.tensor([0, -3]), ValueError, "ignore_index"),
        ({}, torch.tensor([0, 1, 2]), ValueError, "target of class indices must have shape"),
        ({}, torch.rand(2, 4), ValueError, "logits' shape"),
        ({}, -torch.rand(2, 5), ValueError, "probabilities must be >= 0"),
        ({}, torch.tensor([True, False]), TypeError, "bool"),
        ({"weight": -torch.ones(5)}, torch.tensor([0, 1]), ValueError, "weight must be finite and >= 0"),
        ({"weight": torch.ones(4)}, torch.tensor([0, 1]), ValueError, r"weight must have shape \(5,\)"),
        ({"gamma": -1.0}, torch.tensor([0, 1]), ValueError, "gamma must be >= 0"),
        ({"label_smoothing": 1.5}, torch.tensor([0, 1]), ValueError, "label_smoothing"),
        ({"label_smoothing": -0.1}, torch.tensor([0, 1]), ValueError, "label_smoothing"),
        ({"reduction": "avg"}, torch.tensor([0, 1]), ValueError, "reduction must be one of"),
        ({"softcap": 0.0}, torch.tensor([0, 1]), ValueError, "softcap"),
        ({"z_loss": float("nan")}, torch.tensor([0, 1]), ValueError, "z_loss must be finite"),
        ({"gamma": lambda p: -p}, torch.tensor([0, 1]), ValueError, "gamma schedule"),
        ({"backend": "cuda"}, torch.tensor([0, 1]), ValueError, "backend must be one of"),
    ],
)
def test_bad_input_raises_a_clear_error(kwargs, target, exc, match):
    x = torch.randn(2, 5)
    with pytest.raises(exc, match=match):
        crossent.cross_entropy(x, target, **kwargs)


def test_integer_logits_rejected():
    with pytest.raises(TypeError, match="floating-point"):
        crossent.cross_entropy(torch.ones(2, 3, dtype=torch.long), torch.tensor([0, 1]))
    with pytest.raises(TypeError, match=r"torch\.Tensor"):
        crossent.cross_entropy(np.ones((2, 3)), torch.tensor([0, 1]))


def test_flsd53_schedule():
    p = torch.tensor([0.0, 0.1, 0.199, 0.2, 0.5, 1.0])
    assert crossent.flsd53(p).tolist() == [5.0, 5.0, 5.0, 3.0, 3.0, 3.0]
    np.testing.assert_array_equal(ref.flsd53(p.numpy()), crossent.flsd53(p).numpy())


def test_inference_skips_the_gradient_work(monkeypatch, cpu_path):
    allocations: list[tuple[int, ...]] = []
    module, name = (native, "empty_hugepage") if cpu_path == "native" else (cpu_softmax, "_empty")
    original = getattr(module, name)

    def spy(*args, **kwargs):  # the allocator of the gradient buffer
        shape = args[0] if cpu_path == "torch" else args
        allocations.append(tuple(shape))
        return original(*args, **kwargs)

    monkeypatch.setattr(module, name, spy)
    x = torch.randn(4, 5, requires_grad=True)
    y = torch.tensor([0, 1, 2, 3])
    for kw in ({}, {"gamma": 2.0}):
        with torch.no_grad():
            crossent.cross_entropy(x, y, **kw)
        crossent.cross_entropy(x.detach(), y, **kw)
        assert allocations == []
    crossent.cross_entropy(x, y)
    assert allocations == [(4, 5)]
