"""Options of cross_entropy computed at the front door, around the one kernel: ``sample_weight``,
``class_dim`` and ``mean_denominator``. Each alone, with the other options, on both CPU paths,
against the float64 reference (or PyTorch where the semantics overlap)."""

from __future__ import annotations

import itertools
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import crossent
from crossent.reference import softmax as R

F64 = torch.float64
pytestmark = pytest.mark.usefixtures("cpu_path")

OTHER = [
    {}, {"label_smoothing": 0.1}, {"gamma": 2.0}, {"weight": "w"}, {"z_loss": 0.01},
    {"ignore_index": 0}, {"gamma": crossent.flsd53, "label_smoothing": 0.05, "poly1": 0.5},
]
LAYOUTS = [(7, 5), (5,), (3, 5, 4), (2, 5, 3, 2)]


def _setup(shape: tuple[int, ...], kw: dict[str, Any], prob: bool = False, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=gen, dtype=F64) * 2
    C = shape[0] if len(shape) == 1 else shape[1]
    tshape = () if len(shape) == 1 else (shape[0], *shape[2:])
    if prob:
        t = torch.softmax(torch.randn(shape, generator=gen, dtype=F64), 0 if len(shape) == 1 else 1)
    else:
        t = torch.randint(0, C, tshape, generator=gen)
    sw = torch.rand(tshape, generator=gen, dtype=F64) * 2
    kw = dict(kw)
    if kw.get("weight") == "w":
        kw["weight"] = torch.linspace(0.5, 2.0, C, dtype=F64)
    return x, t, sw, kw


def _reference_rows(x: torch.Tensor, t: torch.Tensor, kw: dict[str, Any]):
    """Per-sample losses and per-sample gradients (rows) of the reference."""
    rkw = {k: (v.numpy() if isinstance(v, torch.Tensor) else v) for k, v in kw.items()}
    rkw = {k: (R.flsd53 if v is crossent.flsd53 else v) for k, v in rkw.items()}
    return R.cross_entropy(x.numpy(), t.numpy(), reduction="none", **rkw)


def _grad(fn, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    xg = x.clone().requires_grad_()
    loss = fn(xg)
    loss.sum().backward()
    return loss.detach(), xg.grad


@pytest.mark.parametrize("layout", LAYOUTS, ids=str)
@pytest.mark.parametrize("other", OTHER, ids=lambda k: "+".join(k) or "plain")
@pytest.mark.parametrize("reduction", ["none", "sum", "mean"])
@pytest.mark.parametrize("by", ["weight", "count"])
def test_sample_weight_and_mean_denominator(layout, other, reduction, by):
    x, t, sw, kw = _setup(layout, other)
    for use_sw in (True, False):
        if not use_sw and by == "weight":
            continue  # the default call: covered by the family's own tests
        v = sw if use_sw else torch.ones_like(sw)
        loss, grad = _grad(lambda z, v=v, use_sw=use_sw: crossent.cross_entropy(
            z, t, sample_weight=v if use_sw else None, reduction=reduction,
            mean_denominator=by, **kw), x)
        rows, row_grads = _reference_rows(x, t, kw)
        rows, row_grads = torch.as_tensor(rows), torch.as_tensor(row_grads)
        valid = (t != kw.get("ignore_index", -100)).to(F64)
        wy = kw["weight"][torch.where(t >= 0, t, 0)] if "weight" in kw else torch.ones_like(valid)
        denom = (v * wy * valid).sum() if by == "weight" else valid.sum()
        factor = v / denom if reduction == "mean" else v  # per sample
        expect = rows * v
        if reduction == "sum":
            expect = expect.sum()
        elif reduction == "mean":
            expect = expect.sum() / denom
        torch.testing.assert_close(loss, expect, rtol=1e-10, atol=1e-12)
        # each sample's gradient row is the reference's, scaled by its factor
        per_row = factor.unsqueeze(0 if x.ndim == 1 else 1) if x.ndim > 1 else factor
        torch.testing.assert_close(grad, row_grads * per_row, rtol=1e-9, atol=1e-12)


def test_sample_weight_matches_pytorch_and_identities():
    x, t, sw, _ = _setup((9, 6), {})
    per = F.cross_entropy(x, t, reduction="none", label_smoothing=0.1)
    loss = crossent.cross_entropy(x, t, sample_weight=sw, label_smoothing=0.1, reduction="sum")
    torch.testing.assert_close(loss, (per * sw).sum())
    # uniform sample weights change nothing for either denominator's own mean
    ones = torch.ones_like(sw)
    torch.testing.assert_close(crossent.cross_entropy(x, t, sample_weight=ones * 3.0),
                               crossent.cross_entropy(x, t))
    # sample weights equal to the class weights of the targets == class weights
    w = torch.rand(6, dtype=F64) + 0.5
    torch.testing.assert_close(crossent.cross_entropy(x, t, sample_weight=w[t]),
                               F.cross_entropy(x, t, weight=w))
    # zero weights everywhere: 0, with a zero gradient
    xg = x.clone().requires_grad_()
    loss = crossent.cross_entropy(xg, t, sample_weight=torch.zeros_like(sw))
    loss.backward()
    assert loss.item() == 0.0 and not xg.grad.any()
    # probability targets: sample weights and both denominators
    xp, tp, swp, _ = _setup((6, 4), {}, prob=True)
    per = F.cross_entropy(xp, tp, reduction="none")
    torch.testing.assert_close(crossent.cross_entropy(xp, tp, sample_weight=swp),
                               (per * swp).sum() / swp.sum())
    count = crossent.cross_entropy(xp, tp, sample_weight=swp, mean_denominator="count")
    torch.testing.assert_close(count, (per * swp).sum() / 6)


@pytest.mark.parametrize("shape,class_dim", [
    ((4, 7), 1), ((4, 7), -1), ((7, 4), 0), ((3, 5, 7), -1), ((3, 5, 7), 2), ((7, 3, 5), 0),
    ((2, 3, 7, 4), 2), ((2, 3, 4, 7), -1), ((7,), 0), ((7,), -1),
])
@pytest.mark.parametrize("other", OTHER[:5], ids=lambda k: "+".join(k) or "plain")
@pytest.mark.parametrize("prob", [False, True])
def test_class_dim_equals_moving_the_axis(shape, class_dim, other, prob):
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(shape, generator=gen, dtype=F64)
    cd = class_dim % len(shape)
    C = shape[cd]
    if prob:
        t = torch.softmax(torch.randn(shape, generator=gen, dtype=F64), cd)
        t_moved = t.movedim(cd, 0 if len(shape) == 1 else 1)
    else:
        t = torch.randint(0, C, shape[:cd] + shape[cd + 1 :], generator=gen)
        t_moved = t
    kw = dict(other)
    if kw.get("weight") == "w":
        kw["weight"] = torch.linspace(0.5, 2.0, C, dtype=F64)
    for reduction in ("none", "mean"):
        a, ga = _grad(
            lambda z, r=reduction: crossent.cross_entropy(z, t, class_dim=class_dim, reduction=r, **kw), x
        )
        b, gb = _grad(lambda z, r=reduction: crossent.cross_entropy(
            z.movedim(cd, 0 if len(shape) == 1 else 1), t_moved, reduction=r, **kw), x)
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-13)
        torch.testing.assert_close(ga, gb, rtol=1e-12, atol=1e-13)


def test_class_dim_last_with_sample_weight_and_nn_module():
    gen = torch.Generator().manual_seed(4)
    x = torch.randn(2, 6, 11, dtype=F64, generator=gen)  # (B, T, V)
    y = torch.randint(0, 11, (2, 6), generator=gen)
    y[0, :2] = -100
    sw = torch.rand(2, 6, dtype=F64, generator=gen)
    crit = crossent.nn.CrossEntropyLoss(class_dim=-1, mean_denominator="count", label_smoothing=0.1)
    loss = crit(x, y, sample_weight=sw)
    per = F.cross_entropy(x.movedim(-1, 1), y, reduction="none", label_smoothing=0.1)
    torch.testing.assert_close(loss, (per * sw).sum() / (y != -100).sum())
    none = crossent.cross_entropy(x, y, class_dim=-1, reduction="none", sample_weight=sw)
    assert none.shape == (2, 6)


@pytest.mark.parametrize("bad,err,match", [
    ({"class_dim": 3}, ValueError, "class_dim"), ({"class_dim": 1.0}, TypeError, "class_dim"),
    ({"sample_weight": torch.ones(3)}, ValueError, "sample_weight"),
    ({"sample_weight": torch.full((4,), -1.0)}, ValueError, "sample_weight"),
    ({"sample_weight": [1.0] * 4}, TypeError, "sample_weight"),
    ({"mean_denominator": "valid"}, ValueError, "mean_denominator"),
])
def test_errors_name_the_argument(bad, err, match):
    x, y = torch.randn(4, 5), torch.randint(0, 5, (4,))
    with pytest.raises(err, match=match):
        crossent.cross_entropy(x, y, **bad)


def test_every_mix_against_the_reference():
    """sample_weight x class_dim x mean_denominator x the family's options, float64."""
    for other, by in itertools.product(OTHER, ("weight", "count")):
        x, t, sw, kw = _setup((3, 5, 4), other, seed=5)
        xl = x.movedim(1, -1).contiguous()  # (N, d, C)
        loss = crossent.cross_entropy(xl, t, class_dim=-1, sample_weight=sw, mean_denominator=by, **kw)
        rows, _ = _reference_rows(x, t, kw)
        valid = (t != kw.get("ignore_index", -100)).to(F64)
        wy = kw["weight"][torch.where(t >= 0, t, 0)] if "weight" in kw else torch.ones_like(valid)
        denom = (sw * wy * valid).sum() if by == "weight" else valid.sum()
        expect = float((torch.as_tensor(rows) * sw).sum() / denom)
        np.testing.assert_allclose(loss.item(), expect, rtol=1e-11)
        assert torch.autograd.gradcheck(lambda z, t=t, sw=sw, kw=kw, by=by: crossent.cross_entropy(
            z, t, class_dim=-1, sample_weight=sw, mean_denominator=by, **kw), (xl.requires_grad_(),))


@pytest.mark.parametrize("reduction", ["none", "sum", "mean"])
@pytest.mark.parametrize("extra", [{}, {"label_smoothing": 0.1}, {"sample": True}, {"softcap": 3.0}],
                         ids=lambda k: "+".join(k) or "plain")
def test_unweighted_z_loss_is_liger_semantics(reduction, extra):
    """z_loss_weighted=False: weighted CE (mean over sum of weights) + unweighted z-loss
    (mean over the non-ignored count), as Liger-Kernel defines it."""
    gen = torch.Generator().manual_seed(12)
    x = torch.randn(8, 6, dtype=F64, generator=gen) * 3
    y = torch.randint(0, 6, (8,), generator=gen)
    y[:2] = -100
    w = torch.rand(6, dtype=F64, generator=gen) + 0.2
    sw = torch.rand(8, dtype=F64, generator=gen) if extra.get("sample") else None
    kw = {k: v for k, v in extra.items() if k != "sample"}
    lam = 0.05
    loss, grad = _grad(lambda z: crossent.cross_entropy(
        z, y, weight=w, z_loss=lam, z_loss_weighted=False, reduction=reduction,
        sample_weight=sw, **kw), x)
    ce, ce_grad = _grad(lambda z: crossent.cross_entropy(
        z, y, weight=w, reduction=reduction, sample_weight=sw, **kw), x)

    def z_rows(z: torch.Tensor) -> torch.Tensor:
        u = torch.tanh(z / kw["softcap"]) * kw["softcap"] if "softcap" in kw else z
        rows = lam * torch.logsumexp(u, 1).square() * (y != -100)
        return rows * sw if sw is not None else rows

    zl, z_grad = _grad(lambda z: z_rows(z) if reduction == "none" else (
        z_rows(z).sum() / ((y != -100).sum() if reduction == "mean" else 1)), x)
    torch.testing.assert_close(loss, ce + zl)
    torch.testing.assert_close(grad, ce_grad + z_grad)
    if not extra:  # without class weights, and the default denominator, both are the same
        a = crossent.cross_entropy(x, y, z_loss=lam, z_loss_weighted=False, reduction=reduction)
        b = crossent.cross_entropy(x, y, z_loss=lam, reduction=reduction)
        torch.testing.assert_close(a, b)
    with pytest.raises(TypeError, match="z_loss_weighted"):
        crossent.cross_entropy(x, y, z_loss_weighted="no")
