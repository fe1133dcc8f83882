"""``return_aux=True``: the log-sum-exp, z-loss term, accuracy and entropy equal the same quantities
computed from materialised logits, on every layout, target kind, option and reduction; the loss
and its gradient are unchanged by asking for them."""

from __future__ import annotations

import itertools

import pytest
import torch

import crossent
from crossent import CrossEntropyAux

LAYOUTS = ("1d", "2d", "spatial", "last")
OPTIONS: dict[str, dict] = {
    "default": {},
    "smoothing": {"label_smoothing": 0.1},
    "focal": {"gamma": 2.0},
    "flsd53_smoothing": {"gamma": crossent.flsd53, "label_smoothing": 0.1},
    "z_loss": {"z_loss": 0.01},
    "z_loss_unweighted": {"z_loss": 0.01, "z_loss_weighted": False, "weight": "w"},
    "weight": {"weight": "w", "z_loss": 0.01},
    "softcap": {"softcap": 3.0, "z_loss": 0.01},
    "confidence_penalty": {"confidence_penalty": 0.1},
    "sample_weight": {"sample_weight": "sw", "z_loss": 0.01},
    "count_mean": {"mean_denominator": "count", "weight": "w", "z_loss": 0.01},
}
C = 7


def _case(layout: str, prob: bool, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    shape = {"1d": (C,), "2d": (10, C), "spatial": (3, C, 2, 2), "last": (2, 5, C)}[layout]
    x = (torch.randn(shape, generator=g) * 3).to(torch.float64)
    cdim = -1 if layout == "last" else (0 if layout == "1d" else 1)
    sample_shape = tuple(s for i, s in enumerate(shape) if i != cdim % len(shape))
    if prob:
        t = torch.rand(shape, generator=g, dtype=torch.float64)
        t = t / t.sum(cdim, keepdim=True)
    else:
        t = torch.randint(0, C, sample_shape, generator=g)
        if t.ndim:
            t.view(-1)[:: 3] = -100  # some ignored samples
    return x, t, cdim, sample_shape


def _expected(x, t, cdim, opts, reduction, backend):
    """The aux quantities from materialised logits, by torch ops."""
    u = x.movedim(cdim, -1)
    if opts.get("softcap") is not None:
        u = torch.tanh(u / opts["softcap"]) * opts["softcap"]
    lse = torch.logsumexp(u, -1)
    q = torch.softmax(u, -1)
    H = -(q * torch.log_softmax(u, -1)).sum(-1)
    if t.is_floating_point():
        valid = torch.ones_like(lse, dtype=torch.bool)
        hit = u.argmax(-1) == t.movedim(cdim, -1).argmax(-1)
    else:
        valid = t != -100
        hit = u.argmax(-1) == t
    n = valid.sum()
    acc = ((hit & valid).sum() / n).to(x.dtype)
    ent = torch.where(valid, H, 0.0).sum() / n
    kw = {k: v for k, v in opts.items()}
    kw["class_dim"] = cdim if x.ndim > 1 else 1
    with_z = crossent.cross_entropy(x, t, reduction=reduction, backend=backend, **kw)
    kw["z_loss"] = 0.0
    without_z = crossent.cross_entropy(x, t, reduction=reduction, backend=backend, **kw)
    return torch.where(valid, lse, 0.0), with_z - without_z, acc, ent


def _materialise(opts: dict, sample_shape, dtype) -> dict:
    out = dict(opts)
    if out.get("weight") == "w":
        out["weight"] = torch.linspace(0.5, 2.0, C, dtype=dtype)
    if out.get("sample_weight") == "sw":
        out["sample_weight"] = torch.linspace(0.0, 1.5, max(1, int(torch.Size(sample_shape).numel()))
                                              ).reshape(sample_shape).to(dtype)
    return out


CASES = [
    (layout, prob, name, reduction, backend)
    for layout, prob, name, reduction, backend in itertools.product(
        LAYOUTS, (False, True), OPTIONS, ("mean", "sum", "none"), ("auto", "torch")
    )
    # probability targets have no ignore_index and no class-weighted z-loss split
    if not (prob and name in ("z_loss_unweighted", "count_mean"))
]


@pytest.mark.parametrize(("layout", "prob", "name", "reduction", "backend"), CASES)
def test_aux_equals_materialised(layout, prob, name, reduction, backend):
    x, t, cdim, sample_shape = _case(layout, prob)
    opts = _materialise(OPTIONS[name], sample_shape, x.dtype)
    kw = dict(opts, class_dim=cdim if x.ndim > 1 else 1)
    xa = x.clone().requires_grad_()
    loss, aux = crossent.cross_entropy(xa, t, reduction=reduction, backend=backend, return_aux=True, **kw)
    assert isinstance(aux, CrossEntropyAux)
    lse, z, acc, ent = _expected(x, t, cdim, opts, reduction, backend)
    torch.testing.assert_close(aux.lse, lse)
    torch.testing.assert_close(aux.z_loss, z, atol=1e-10, rtol=1e-7)
    torch.testing.assert_close(aux.accuracy, acc)
    torch.testing.assert_close(aux.entropy, ent)
    assert not any(f.requires_grad for f in aux)
    # the loss and its gradient are those of the call without return_aux
    xb = x.clone().requires_grad_()
    plain = crossent.cross_entropy(xb, t, reduction=reduction, backend=backend, **kw)
    torch.testing.assert_close(loss, plain)
    loss.sum().backward()
    plain.sum().backward()
    torch.testing.assert_close(xa.grad, xb.grad)


def test_aux_inplace_backward_and_compile():
    x, t, _, _ = _case("2d", False, seed=3)
    x = x.float()
    ref = crossent.cross_entropy(x, t, z_loss=1e-2, return_aux=True)[1]
    xi = x.clone().requires_grad_()
    z = xi * 1.0
    _, aux = crossent.cross_entropy(z, t, z_loss=1e-2, return_aux=True, inplace_backward=True)
    for a, b in zip(aux, ref, strict=True):
        torch.testing.assert_close(a, b)
    torch._dynamo.reset()
    f = torch.compile(lambda x, t: crossent.cross_entropy(x, t, z_loss=1e-2, return_aux=True), fullgraph=True)
    xc = x.clone().requires_grad_()
    loss, aux = f(xc, t)
    loss.backward()
    for a, b in zip(aux, ref, strict=True):
        torch.testing.assert_close(a, b)
    assert torch.isfinite(xc.grad).all()


def test_aux_under_torch_func():
    x, t, _, _ = _case("2d", False, seed=4)
    ref = crossent.cross_entropy(x, t, return_aux=True)[1]
    aux_box = []

    def f(z):
        loss, aux = crossent.cross_entropy(z, t, return_aux=True)
        aux_box.append(aux)
        return loss

    torch.func.grad(f)(x)
    torch.testing.assert_close(aux_box[0].accuracy, ref.accuracy)
    torch.testing.assert_close(aux_box[0].entropy, ref.entropy)


def test_aux_all_ignored_and_bad_flag():
    x = torch.randn(4, C)
    _, aux = crossent.cross_entropy(x, torch.full((4,), -100), z_loss=0.1, return_aux=True)
    assert aux.accuracy.item() == 0.0 and aux.entropy.item() == 0.0 and aux.z_loss.item() == 0.0
    assert torch.equal(aux.lse, torch.zeros(4))
    with pytest.raises(TypeError, match="return_aux"):
        crossent.cross_entropy(x, torch.zeros(4, dtype=torch.long), return_aux=1)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("prob", [False, True])
@pytest.mark.parametrize("name", ["default", "z_loss", "weight", "softcap", "smoothing"])
def test_linear_aux_equals_materialised(reduction, prob, name):
    g = torch.Generator().manual_seed(1)
    h = torch.randn(3, 5, 8, generator=g, dtype=torch.float64)
    W = torch.randn(C, 8, generator=g, dtype=torch.float64)
    if prob:
        y = torch.softmax(torch.randn(3, 5, C, generator=g, dtype=torch.float64), -1)
    else:
        y = torch.randint(0, C, (3, 5), generator=g)
        y[0, :2] = -100
    opts = _materialise(OPTIONS[name], (3, 5), h.dtype)
    lin_opts = {("class_weight" if k == "weight" else k): v for k, v in opts.items()}
    loss, aux = crossent.linear_cross_entropy(h, W, y, reduction=reduction, return_aux=True, chunk_size=4,
                                              **lin_opts)
    ref_loss, ref = crossent.cross_entropy(h @ W.T, y, class_dim=-1, reduction=reduction, return_aux=True,
                                           **opts)
    torch.testing.assert_close(loss, ref_loss)
    for a, b in zip(aux, ref, strict=True):
        torch.testing.assert_close(a, b)


def test_linear_aux_shift_and_triton_refused():
    g = torch.Generator().manual_seed(2)
    h = torch.randn(2, 6, 8, generator=g)
    W = torch.randn(C, 8, generator=g)
    y = torch.randint(0, C, (2, 6), generator=g)
    _, aux = crossent.linear_cross_entropy(h, W, y, shift=True, return_aux=True)
    _, ref = crossent.cross_entropy((h @ W.T)[:, :-1], y[:, 1:], class_dim=-1, return_aux=True)
    torch.testing.assert_close(aux.accuracy, ref.accuracy)
    torch.testing.assert_close(aux.entropy, ref.entropy)
    torch.testing.assert_close(aux.lse[:, :-1], ref.lse)
    with pytest.raises(ValueError, match="return_aux"):
        crossent.linear_cross_entropy(h, W, y, return_aux=True, backend="triton")


def test_linear_aux_under_autocast():
    """bf16 autocast: the chunked head's aux equals cross_entropy's on the autocast logits."""
    g = torch.Generator().manual_seed(5)
    h = torch.randn(2, 9, 16, generator=g)
    W = torch.randn(C, 16, generator=g)
    y = torch.randint(0, C, (2, 9), generator=g)
    y[1, :4] = -100
    with torch.autocast("cpu", dtype=torch.bfloat16):
        _, aux = crossent.linear_cross_entropy(h, W, y, z_loss=1e-2, return_aux=True, chunk_size=5)
        logits = h @ W.T
    assert logits.dtype == torch.bfloat16
    _, ref = crossent.cross_entropy(logits, y, class_dim=-1, z_loss=1e-2, return_aux=True)
    for a, b in zip(aux, ref, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
