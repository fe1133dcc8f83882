"""Binary / multi-label (sigmoid) family: BCE, sigmoid focal loss, asymmetric loss."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
import torch.nn.functional as TF

import crossent
import crossent.backends.torch_ops.binary as cpu_binary
from _helpers import poly1_partners
from crossent import functional as CF
from crossent import nn as cnn
from crossent import reference as R

# every test runs on both CPU implementations (tests/conftest.py)
pytestmark = pytest.mark.usefixtures("cpu_path")

F64 = torch.float64


def _rand(*shape, scale=3.0, dtype=F64, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=g, dtype=F64) * scale).to(dtype)


def _targets(*shape, soft=False, seed=1):
    g = torch.Generator().manual_seed(seed)
    if soft:
        return torch.rand(shape, generator=g, dtype=F64)
    return torch.randint(0, 2, shape, generator=g).to(F64)


def _loss_and_grad(fn, x, t, grad_output=None, **kw):
    x = x.detach().clone().requires_grad_(True)
    loss = fn(x, t, **kw)
    if grad_output is None:
        loss.sum().backward()
    else:
        loss.backward(grad_output)
    return loss.detach(), x.grad


def _torchvision_focal(x, t, alpha=0.25, gamma=2.0):
    """torchvision.ops.sigmoid_focal_loss (reduction "none"), written out from the paper."""
    p = torch.sigmoid(x)
    ce = TF.binary_cross_entropy_with_logits(x, t, reduction="none")
    p_t = p * t + (1 - p) * (1 - t)
    loss = ce * ((1 - p_t) ** gamma)
    if alpha is not None and alpha >= 0:
        alpha_t = alpha * t + (1 - alpha) * (1 - t)
        loss = alpha_t * loss
    return loss


def _ridnik_asl(x, y, gamma_pos, gamma_neg, clip):
    """Ridnik et al. 2021 reference code (AsymmetricLossOptimized), elementwise, hard targets."""
    xs_pos = torch.sigmoid(x)
    xs_neg = 1 - xs_pos
    if clip is not None and clip > 0:
        xs_neg = (xs_neg + clip).clamp(max=1)
    los_pos = y * torch.log(xs_pos.clamp(min=1e-300))
    los_neg = (1 - y) * torch.log(xs_neg.clamp(min=1e-300))
    loss = los_pos + los_neg
    pt = xs_pos * y + xs_neg * (1 - y)
    gamma = gamma_pos * y + gamma_neg * (1 - y)
    return -loss * torch.pow(1 - pt, gamma)


# --------------------------------------------------------------------------------------------
# against PyTorch and the formulas


@pytest.mark.parametrize("shape", [(17,), (9, 6), (3, 4, 5, 2), ()])
@pytest.mark.parametrize("reduction", ["none", "sum", "mean"])
@pytest.mark.parametrize("dtype", [F64, torch.float32])
@pytest.mark.parametrize("soft", [False, True])
def test_matches_torch_bce_with_logits(shape, reduction, dtype, soft):
    x = _rand(*shape, dtype=dtype)
    t = _targets(*shape, soft=soft).to(dtype)
    C = shape[-1] if shape else 1
    w = torch.rand(shape[1:] if len(shape) > 1 else (), dtype=dtype) + 0.2
    pw = torch.rand(C, dtype=dtype) * 3 if shape else torch.tensor(2.0, dtype=dtype)
    go = torch.rand(shape, dtype=dtype) if reduction == "none" else None
    kw = dict(weight=w, pos_weight=pw, reduction=reduction)
    loss, grad = _loss_and_grad(CF.binary_cross_entropy, x, t, go, **kw)
    ref_loss, ref_grad = _loss_and_grad(TF.binary_cross_entropy_with_logits, x, t, go, **kw)
    tol = dict(rtol=1e-10, atol=1e-12) if dtype == F64 else dict(rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(loss, ref_loss.to(loss.dtype), **tol)
    torch.testing.assert_close(grad, ref_grad, **tol)


def test_weight_broadcast_shapes():
    x, t = _rand(4, 3, 5), _targets(4, 3, 5, soft=True)
    for w_shape in [(5,), (3, 1), (4, 1, 1), (1, 3, 5), (4, 3, 5)]:
        w = torch.rand(w_shape, dtype=F64)
        a, ga = _loss_and_grad(CF.binary_cross_entropy, x, t, weight=w)
        b, gb = _loss_and_grad(TF.binary_cross_entropy_with_logits, x, t, weight=w)
        torch.testing.assert_close(a, b)
        torch.testing.assert_close(ga, gb)


def _options_grid():
    cases = [
        dict(gamma_pos=0.0, gamma_neg=0.0),
        dict(gamma_pos=2.0, gamma_neg=2.0, alpha=0.25),
        dict(gamma_pos=0.5, gamma_neg=0.5, alpha=0.9, label_smoothing=0.2),
        dict(gamma_pos=0.0, gamma_neg=4.0, clip=0.05),
        dict(gamma_pos=1.0, gamma_neg=0.3, clip=0.3, alpha=0.6, label_smoothing=0.1),
        dict(gamma_pos=3.0, gamma_neg=1.5, ignore_index=-1),
    ]
    return cases


def _check_options_against_reference(opts, reduction, soft, weights, **new):
    """asymmetric_loss with one case of the options grid (and ``new``), hard or soft targets,
    with or without weights, against the float64 reference: loss and gradient."""
    x, t = _rand(23, 6), _targets(23, 6, soft=soft)
    if opts.get("ignore_index") is not None:
        t[::4, 1] = opts["ignore_index"]
    extra = {}
    if weights:
        extra = dict(weight=torch.rand(6, dtype=F64) + 0.1, pos_weight=torch.rand(6, dtype=F64) * 4)
    go = torch.rand(23, 6, dtype=F64) if reduction == "none" else torch.tensor(1.7, dtype=F64)
    loss, grad = _loss_and_grad(
        CF.asymmetric_loss, x, t, go, gamma_pos=opts["gamma_pos"], gamma_neg=opts["gamma_neg"],
        clip=opts.get("clip", 0.0), alpha=opts.get("alpha"), ignore_index=opts.get("ignore_index"),
        label_smoothing=opts.get("label_smoothing", 0.0), reduction=reduction, **extra, **new,
    )
    ref_loss, ref_grad = R.binary_loss(
        x.numpy(), t.numpy(), reduction=reduction, grad_output=go.numpy(),
        **{k: v.numpy() for k, v in extra.items()}, **opts, **new,
    )
    np.testing.assert_allclose(loss.numpy(), ref_loss, rtol=1e-10, atol=1e-13)
    np.testing.assert_allclose(grad.numpy(), ref_grad, rtol=1e-9, atol=1e-13)


@pytest.mark.parametrize("opts", _options_grid())
@pytest.mark.parametrize("reduction", ["none", "sum", "mean"])
@pytest.mark.parametrize("soft", [False, True])
@pytest.mark.parametrize("weights", [False, True])
def test_matches_reference(opts, reduction, soft, weights):
    _check_options_against_reference(opts, reduction, soft, weights)


@pytest.mark.parametrize("alpha", [0.25, None, -1.0, 0.0, 1.0])
@pytest.mark.parametrize("gamma", [0.0, 0.5, 2.0, 3.7])
def test_sigmoid_focal_matches_torchvision_formula(alpha, gamma):
    x, t = _rand(31, 8), _targets(31, 8, soft=True)
    t[:10] = t[:10].round()
    go = torch.rand(31, 8, dtype=F64)
    a, ga = _loss_and_grad(
        crossent.sigmoid_focal_loss, x, t, go, alpha=alpha, gamma=gamma, reduction="none"
    )
    b, gb = _loss_and_grad(_torchvision_focal, x, t, go, alpha=alpha, gamma=gamma)
    torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(ga, gb, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize(("gp", "gn", "clip"), [(0.0, 4.0, 0.05), (1.0, 2.0, 0.2), (0.5, 0.5, 0.0)])
def test_asymmetric_matches_ridnik_code(gp, gn, clip):
    x, y = _rand(40, 9), _targets(40, 9)
    a, ga = _loss_and_grad(
        crossent.asymmetric_loss, x, y, gamma_pos=gp, gamma_neg=gn, clip=clip, reduction="none"
    )
    b, gb = _loss_and_grad(_ridnik_asl, x, y, gamma_pos=gp, gamma_neg=gn, clip=clip)
    torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(ga, gb, rtol=1e-9, atol=1e-12)


def test_split_form_for_hard_targets():
    """The p_t form equals the paper's split form: positives and negatives separately."""
    x, y = _rand(50, 4), _targets(50, 4)
    alpha, gp, gn, c = 0.3, 1.5, 3.0, 0.1
    loss = crossent.asymmetric_loss(
        x, y, gamma_pos=gp, gamma_neg=gn, clip=c, alpha=alpha, reduction="none"
    )
    p = torch.sigmoid(x)
    pm = (p - c).clamp_min(0)
    pos = -alpha * (1 - p) ** gp * torch.log(p)
    neg = -(1 - alpha) * pm**gn * torch.log1p(-pm)
    torch.testing.assert_close(loss, torch.where(y == 1, pos, neg))


# --------------------------------------------------------------------------------------------
# gradcheck and identities


@pytest.mark.parametrize(
    "kw",
    [
        dict(gamma_pos=2.0, gamma_neg=2.0, alpha=0.25),
        dict(gamma_pos=0.4, gamma_neg=0.7, label_smoothing=0.15),
        dict(gamma_pos=1.0, gamma_neg=4.0, clip=0.1, ignore_index=-1),
    ],
)
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_gradcheck(kw, reduction):
    x = _rand(5, 4, scale=2.0).requires_grad_(True)
    t = _targets(5, 4, soft=True)
    t[0, 0], t[1, 1] = 1.0, 0.0
    if "ignore_index" in kw:
        t[2, 2] = -1
    w, pw = torch.rand(4, dtype=F64) + 0.5, torch.rand(4, dtype=F64) + 0.5
    if "clip" in kw:  # keep away from the clip kink, where the derivative jumps
        p = torch.sigmoid(x.detach())
        x.data[(p - kw["clip"]).abs() < 1e-3] += 0.1

    def f(z):
        return CF.asymmetric_loss(z, t, weight=w, pos_weight=pw, reduction=reduction, **kw)

    assert torch.autograd.gradcheck(f, (x,), eps=1e-6, atol=1e-7, rtol=1e-5)


def test_identities():
    x, t = _rand(20, 7), _targets(20, 7, soft=True)
    w, pw = torch.rand(7, dtype=F64), torch.rand(7, dtype=F64) * 2
    bce = TF.binary_cross_entropy_with_logits(x, t, weight=w, pos_weight=pw, reduction="none")
    kw = dict(weight=w, pos_weight=pw, reduction="none")
    # gamma 0 (and alpha None / negative) is BCE
    torch.testing.assert_close(crossent.binary_cross_entropy(x, t, gamma=0.0, **kw), bce)
    torch.testing.assert_close(crossent.sigmoid_focal_loss(x, t, gamma=0.0, alpha=None, **kw), bce)
    torch.testing.assert_close(crossent.sigmoid_focal_loss(x, t, gamma=0.0, alpha=-1.0, **kw), bce)
    # ASL with gamma_neg = gamma_pos = 0 and clip 0 is BCE
    asl = crossent.asymmetric_loss(x, t, gamma_pos=0.0, gamma_neg=0.0, clip=0.0, **kw)
    torch.testing.assert_close(asl, bce)
    # ASL with equal gammas and clip 0 is the sigmoid focal loss
    torch.testing.assert_close(
        crossent.asymmetric_loss(x, t, gamma_pos=2.0, gamma_neg=2.0, clip=0.0, alpha=0.3, **kw),
        crossent.sigmoid_focal_loss(x, t, gamma=2.0, alpha=0.3, **kw),
    )
    # alpha = 0.5 is half the unweighted loss
    torch.testing.assert_close(
        crossent.sigmoid_focal_loss(x, t, alpha=0.5, **kw),
        0.5 * crossent.sigmoid_focal_loss(x, t, alpha=None, **kw),
    )
    # label smoothing is BCE on t' = t (1 - eps) + eps / 2
    eps = 0.2
    torch.testing.assert_close(
        crossent.binary_cross_entropy(x, t, label_smoothing=eps, **kw),
        TF.binary_cross_entropy_with_logits(
            x, t * (1 - eps) + eps / 2, weight=w, pos_weight=pw, reduction="none"
        ),
    )


@pytest.mark.parametrize("reduction", ["none", "sum", "mean"])
def test_masked_equals_sliced(reduction):
    x, t = _rand(12, 5), _targets(12, 5, soft=True)
    t[3:7] = -100.0
    x[4, 2] = float("nan")  # masked garbage stays out
    kw = dict(gamma=1.5, alpha=0.4, reduction=reduction)
    loss, grad = _loss_and_grad(crossent.binary_cross_entropy, x, t, ignore_index=-100, **kw)
    keep = torch.ones(12, dtype=torch.bool)
    keep[3:7] = False
    ls, gs = _loss_and_grad(crossent.binary_cross_entropy, x[keep], t[keep], **kw)
    if reduction == "none":
        torch.testing.assert_close(loss[keep], ls)
        assert (loss[~keep] == 0).all()
    else:
        torch.testing.assert_close(loss, ls)
    torch.testing.assert_close(grad[keep], gs)
    assert (grad[~keep] == 0).all()


def test_all_masked_and_empty_mean_is_zero():
    x = _rand(4, 3).requires_grad_(True)
    t = torch.full((4, 3), -1.0, dtype=F64)
    loss = crossent.binary_cross_entropy(x, t, ignore_index=-1, gamma=2.0)
    loss.backward()
    assert loss.item() == 0.0 and (x.grad == 0).all()
    e = torch.zeros(0, 5, requires_grad=True)
    loss = crossent.sigmoid_focal_loss(e, torch.zeros(0, 5))
    loss.backward()
    assert loss.item() == 0.0 and e.grad.shape == (0, 5)


def test_integer_and_bool_targets_with_ignore_index():
    x = _rand(6, 4)
    y = torch.randint(0, 2, (6, 4))
    y[0, 0] = -1
    a = crossent.binary_cross_entropy(x, y, ignore_index=-1, reduction="sum")
    b = crossent.binary_cross_entropy(x, y.to(F64), ignore_index=-1.0, reduction="sum")
    torch.testing.assert_close(a, b)
    yb = torch.rand(6, 4) > 0.5
    torch.testing.assert_close(
        crossent.binary_cross_entropy(x, yb), TF.binary_cross_entropy_with_logits(x, yb.to(F64))
    )


# --------------------------------------------------------------------------------------------
# numerics: hostile inputs, dtypes, blocks


@pytest.mark.parametrize("dtype", [torch.float32, F64])
@pytest.mark.parametrize(
    "kw",
    [
        dict(gamma_pos=0.0, gamma_neg=0.0, clip=0.0),
        dict(gamma_pos=0.5, gamma_neg=0.5, alpha=0.25, clip=0.0),
        dict(gamma_pos=0.2, gamma_neg=0.9, clip=0.05, label_smoothing=0.1),
        dict(gamma_pos=0.0, gamma_neg=4.0, clip=0.05),
        dict(gamma_pos=2.0, gamma_neg=2.0, alpha=0.25, clip=0.0),
    ],
)
def test_hostile_logits_are_finite(dtype, kw):
    vals = [-1e4, -200.0, -105.0, -90.0, -30.0, -17.0, 0.0, 17.0, 30.0, 90.0, 105.0, 200.0, 1e4]
    x = torch.tensor(vals, dtype=dtype).repeat_interleave(4)
    t = torch.tensor([0.0, 1.0, 0.5, 1e-6], dtype=dtype).repeat(len(vals))
    loss, grad = _loss_and_grad(crossent.asymmetric_loss, x, t, reduction="none", **kw)
    assert torch.isfinite(loss).all() and torch.isfinite(grad).all()
    ref_loss, ref_grad = R.asymmetric_loss(
        x.double().numpy(), t.double().numpy(), reduction="none", **kw
    )
    assert np.isfinite(ref_loss).all() and np.isfinite(ref_grad).all()
    tol = dict(rtol=1e-9, atol=1e-12) if dtype == F64 else dict(rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(loss.double().numpy(), ref_loss, **tol)
    np.testing.assert_allclose(grad.double().numpy(), ref_grad, **tol)


@pytest.mark.parametrize("gamma", [0.1, 0.5, 0.9])
def test_gamma_below_one_at_confident_predictions(gamma):
    """(1 - p_t)^(gamma - 1) blows up as p_t -> 1; the gradient must not.

    The hard-target fast path is accurate to fp32 epsilon in absolute terms there; the general
    path (here forced by gamma_neg != gamma_pos) keeps relative accuracy.
    """
    x = torch.tensor([10.0, 20.0, 40.0, 80.0, 100.0, 1e3, 1e4])
    xd = x.double()
    q = torch.sigmoid(-xd)
    # d/dx of (1-p)^g log(1/p) at t = 1: -(1-p)^g (g p log(1/p) + (1-p)), exact in float64
    expect = -(q**gamma) * (gamma * torch.sigmoid(xd) * TF.softplus(-xd) + q)
    for sign, t in ((1.0, torch.ones(7)), (-1.0, torch.zeros(7))):
        loss, grad = _loss_and_grad(
            crossent.sigmoid_focal_loss, sign * x, t, gamma=gamma, alpha=None, reduction="none"
        )
        assert torch.isfinite(loss).all() and torch.isfinite(grad).all()
        torch.testing.assert_close(grad.double(), sign * expect, rtol=1e-4, atol=1e-7)
        loss, grad = _loss_and_grad(
            crossent.asymmetric_loss, sign * x, t, gamma_pos=gamma, gamma_neg=gamma + 1e-9,
            clip=0.0, reduction="none",
        )
        assert torch.isfinite(loss).all() and torch.isfinite(grad).all()
        torch.testing.assert_close(grad.double(), sign * expect, rtol=1e-4, atol=1e-30)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision(dtype):
    x, t = _rand(64, 10, dtype=torch.float32), _targets(64, 10, soft=True).float()
    xh = x.to(dtype)
    loss, grad = _loss_and_grad(crossent.sigmoid_focal_loss, xh, t.to(dtype))
    assert loss.dtype == torch.float32 and grad.dtype == dtype
    ref_loss, ref_grad = R.sigmoid_focal_loss(
        xh.double().numpy(), t.to(dtype).double().numpy()
    )
    np.testing.assert_allclose(loss.item(), ref_loss, rtol=1e-5)
    np.testing.assert_allclose(grad.double().numpy(), ref_grad, rtol=2e-2, atol=1e-6)
    l64 = crossent.binary_cross_entropy(x.double(), t.double())
    assert l64.dtype == F64


@pytest.mark.parametrize("reduction", ["none", "mean"])
def test_blocks_match_one_block(monkeypatch, reduction, torch_path):
    """Multi-block paths (including broadcast weights indexed per block) agree with one block."""
    x, t = _rand(6, 5, 7, 3), _targets(6, 5, 7, 3, soft=True)
    t[1, 2] = -1
    kw = dict(
        weight=torch.rand(5, 1, 1, dtype=F64), pos_weight=torch.rand(3, dtype=F64) * 2,
        gamma_pos=1.0, gamma_neg=3.0, clip=0.05, ignore_index=-1, reduction=reduction,
    )
    whole, gwhole = _loss_and_grad(crossent.asymmetric_loss, x, t, **kw)
    for block in (1, 2, 5, 20, 64, 400):
        monkeypatch.setattr(cpu_binary, "BLOCK_ELEMENTS", block)
        loss, grad = _loss_and_grad(crossent.asymmetric_loss, x, t, **kw)
        torch.testing.assert_close(loss, whole)
        torch.testing.assert_close(grad, gwhole)


def test_blocks_cover_every_element_once():
    for shape, block in [((7,), 3), ((4, 5, 6), 7), ((3, 100), 40), ((2, 3, 4), 1), ((), 1)]:
        seen = torch.zeros(shape, dtype=torch.int64)
        for idx in cpu_binary._blocks(shape, block):
            seen[idx] += 1
            assert seen[idx].numel() <= max(block, 1)
        assert (seen == 1).all()


# --------------------------------------------------------------------------------------------
# autograd node, modules, errors


def test_one_fused_node_and_backward_scaling():
    x = _rand(8, 3).requires_grad_(True)
    t = _targets(8, 3)
    loss = crossent.sigmoid_focal_loss(x, t)
    assert "crossent_binary_ce" in type(loss.grad_fn).__name__  # the registered operator
    assert loss.grad_fn.next_functions[0][0].variable is x
    (3.0 * loss).backward(retain_graph=True)
    g3 = x.grad.clone()
    x.grad = None
    loss.backward()  # a second backward rescales the saved gradient exactly
    torch.testing.assert_close(g3, 3.0 * x.grad)
    with torch.no_grad():
        assert crossent.binary_cross_entropy(x, t).grad_fn is None


def test_nn_modules():
    x, t = _rand(10, 4), _targets(10, 4, soft=True)
    w, pw = torch.rand(4, dtype=F64), torch.rand(4, dtype=F64)
    m = cnn.BCEWithLogitsLoss(w, pos_weight=pw)
    torch.testing.assert_close(m(x, t), torch.nn.BCEWithLogitsLoss(w, pos_weight=pw)(x, t))
    assert set(m.state_dict()) == {"weight", "pos_weight"}
    torch.testing.assert_close(
        cnn.SigmoidFocalLoss(reduction="sum")(x, t),
        crossent.sigmoid_focal_loss(x, t, reduction="sum"),
    )
    asl = cnn.AsymmetricLoss(gamma_neg=2.0, clip=0.1)
    torch.testing.assert_close(asl(x, t), crossent.asymmetric_loss(x, t, gamma_neg=2.0, clip=0.1))
    assert "clip=0.1" in repr(asl) and "alpha=0.25" in repr(cnn.SigmoidFocalLoss())
    with pytest.raises(ValueError, match="alpha"):
        cnn.SigmoidFocalLoss(alpha=2.0)
    with pytest.raises(ValueError, match="clip"):
        cnn.AsymmetricLoss(clip=1.0)


@pytest.mark.parametrize(
    ("kwargs", "exc", "match"),
    [
        (dict(target=torch.full((3, 2), 1.5)), ValueError, r"target must lie in \[0, 1\].*1.5"),
        (dict(target=torch.full((3, 2), -0.5)), ValueError, r"\[0, 1\]"),
        (dict(target=torch.full((3, 2), float("nan"))), ValueError, r"\[0, 1\]"),
        (dict(target=torch.full((3, 2), -2.0), ignore_index=-1), ValueError, "ignore_index=-1"),
        (dict(target=torch.zeros(3, 3)), ValueError, "logits' shape"),
        (dict(target=torch.zeros(3)), ValueError, "logits' shape"),
        (dict(target=[0, 1]), TypeError, "target must be a torch.Tensor"),
        (dict(alpha=1.5), ValueError, r"alpha must lie in \[0, 1\]"),
        (dict(alpha="a"), TypeError, "alpha"),
        (dict(gamma=-1.0), ValueError, "gamma must be >= 0"),
        (dict(gamma=float("inf")), ValueError, "gamma must be finite"),
        (dict(label_smoothing=1.5), ValueError, "label_smoothing"),
        (dict(reduction="avg"), ValueError, "reduction"),
        (dict(weight=torch.ones(3)), ValueError, "weight of shape"),
        (dict(weight=torch.full((2,), -1.0)), ValueError, "weight must be finite and >= 0"),
        (dict(pos_weight=torch.ones(4)), ValueError, "pos_weight.*last dim"),
        (dict(pos_weight=[1.0, 2.0]), TypeError, "pos_weight must be a torch.Tensor"),
        (dict(ignore_index=float("nan")), ValueError, "ignore_index"),
        (dict(logits=torch.zeros(3, 2, dtype=torch.int64)), TypeError, "floating-point"),
        (dict(backend="cuda"), ValueError, "backend"),
    ],
)
def test_errors(kwargs, exc, match):
    args = dict(logits=torch.zeros(3, 2), target=torch.zeros(3, 2))
    args.update(kwargs)
    with pytest.raises(exc, match=match):
        crossent.binary_cross_entropy(args.pop("logits"), args.pop("target"), **args)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(clip=1.0), r"clip must lie in \[0, 1\)"),
        (dict(clip=-0.1), "clip must be >= 0"),
        (dict(gamma_neg=-1.0), "gamma_neg must be >= 0"),
        (dict(gamma_pos=-0.5), "gamma_pos must be >= 0"),
    ],
)
def test_asymmetric_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        crossent.asymmetric_loss(torch.zeros(2, 2), torch.zeros(2, 2), **kwargs)


def test_triton_backend_falls_back_or_refuses_on_cpu():
    x, t = torch.zeros(2, 2), torch.zeros(2, 2)
    with pytest.raises(ValueError, match="triton"):
        crossent.binary_cross_entropy(x, t, backend="triton")


def test_combinations_smoke():
    x, t = _rand(7, 3), _targets(7, 3, soft=True)
    for eps, gamma, alpha in itertools.product((0.0, 0.1), (0.0, 0.7, 2.0), (None, 0.25)):
        loss, grad = _loss_and_grad(
            crossent.binary_cross_entropy, x, t, label_smoothing=eps, gamma=gamma, alpha=alpha
        )
        ref_loss, ref_grad = R.binary_cross_entropy(
            x.numpy(), t.numpy(), label_smoothing=eps, gamma=gamma, alpha=alpha
        )
        np.testing.assert_allclose(loss.numpy(), ref_loss, rtol=1e-10)
        np.testing.assert_allclose(grad.numpy(), ref_grad, rtol=1e-9, atol=1e-14)


@pytest.mark.parametrize("gamma", [0.0, 0.7, 2.0, 3.0])
@pytest.mark.parametrize("alpha", [None, 0.25])
@pytest.mark.parametrize("weights", [False, True])
@pytest.mark.parametrize("block", [7, 1 << 18])
def test_hard_target_fast_path(monkeypatch, gamma, alpha, weights, block, torch_path):
    """0/1 targets take the fast path (scratch buffers reused across blocks); same results."""
    monkeypatch.setattr(cpu_binary, "BLOCK_ELEMENTS", block)
    x, t = _rand(9, 5, 4), _targets(9, 5, 4)
    extra = {}
    if weights:
        extra = dict(weight=torch.rand(5, 1, dtype=F64), pos_weight=torch.rand(4, dtype=F64) * 3)
    for reduction in ("none", "mean"):
        go = torch.rand(9, 5, 4, dtype=F64) if reduction == "none" else None
        loss, grad = _loss_and_grad(
            crossent.binary_cross_entropy, x, t, go, gamma=gamma, alpha=alpha,
            reduction=reduction, **extra,
        )
        ref_loss, ref_grad = R.binary_cross_entropy(
            x.numpy(), t.numpy(), gamma=gamma, alpha=alpha, reduction=reduction,
            grad_output=None if go is None else go.numpy(),
            **{k: v.numpy() for k, v in extra.items()},
        )
        np.testing.assert_allclose(loss.numpy(), ref_loss, rtol=1e-10, atol=1e-14)
        np.testing.assert_allclose(grad.numpy(), ref_grad, rtol=1e-8, atol=1e-14)
    # float32 and float16 through the same path
    for dtype in (torch.float32, torch.float16):
        loss, grad = _loss_and_grad(
            crossent.binary_cross_entropy, x.to(dtype), t.to(dtype), gamma=gamma, alpha=alpha,
            **{k: v.to(dtype) for k, v in extra.items()},
        )
        assert loss.dtype == torch.float32 and grad.dtype == dtype
        ref_loss, ref_grad = R.binary_cross_entropy(
            x.to(dtype).double().numpy(), t.numpy(), gamma=gamma, alpha=alpha,
            **{k: v.to(dtype).double().numpy() for k, v in extra.items()},
        )
        np.testing.assert_allclose(loss.item(), ref_loss, rtol=1e-5)
        np.testing.assert_allclose(grad.double().numpy(), ref_grad, rtol=1e-2, atol=1e-7)


# --------------------------------------------------------------------------------------------
# Poly-1 term (Leng et al. 2022) and the detached focal weight (Ridnik et al. 2021)

NEW_OPTIONS = {
    "poly1": dict(poly1=0.8),
    "poly1_negative": dict(poly1=-0.5),
    "detach": dict(detach_focal_weight=True),
    "poly1+detach": dict(poly1=1.3, detach_focal_weight=True),
}


@pytest.mark.parametrize("new", list(NEW_OPTIONS))
@pytest.mark.parametrize("opts", _options_grid())
@pytest.mark.parametrize("reduction", ["none", "mean"])
@pytest.mark.parametrize("soft", [False, True])
@pytest.mark.parametrize("weights", [False, True])
def test_poly1_and_detach_match_reference(new, opts, reduction, soft, weights):
    """Each new option alone and both together, over the options grid (hard targets take the
    fast path where it applies)."""
    _check_options_against_reference(opts, reduction, soft, weights, **NEW_OPTIONS[new])


@pytest.mark.parametrize("new", list(NEW_OPTIONS))
@pytest.mark.parametrize("front", ["binary_cross_entropy", "sigmoid_focal_loss"])
def test_poly1_and_detach_front_doors(new, front):
    x, t = _rand(7, 3), _targets(7, 3, soft=True)
    t[:3] = t[:3].round()
    for eps, gamma, alpha in itertools.product((0.0, 0.1), (0.0, 0.7, 2.0), (None, 0.25)):
        kw = dict(label_smoothing=eps, gamma=gamma, alpha=alpha, **NEW_OPTIONS[new])
        loss, grad = _loss_and_grad(getattr(crossent, front), x, t, **kw)
        ref_loss, ref_grad = getattr(R, front)(x.numpy(), t.numpy(), **kw)
        np.testing.assert_allclose(loss.numpy(), ref_loss, rtol=1e-10)
        np.testing.assert_allclose(grad.numpy(), ref_grad, rtol=1e-9, atol=1e-14)


POLY_WITH = poly1_partners(label_smoothing=0.15, ignore_index=-1)
POLY_SETS = [(), *((n,) for n in POLY_WITH), tuple(POLY_WITH)]


@pytest.mark.parametrize("names", POLY_SETS, ids=lambda n: "+".join(n) or "alone")
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_poly1_gradcheck(names, reduction):
    kw: dict = dict(gamma_pos=0.0, gamma_neg=0.0, clip=0.0, poly1=0.9)
    for n in names:
        kw.update(POLY_WITH[n])
    x = _rand(5, 4, scale=2.0).requires_grad_(True)
    t = _targets(5, 4, soft=True)
    t[0, 0], t[1, 1] = 1.0, 0.0
    if "ignore_index" in kw:
        t[2, 2] = -1
    if "weight" in kw:
        kw["weight"], kw["pos_weight"] = torch.rand(4, dtype=F64) + 0.5, torch.rand(4, dtype=F64) + 0.5
    if kw["clip"]:  # keep away from the clip kink, where the derivative jumps
        p = torch.sigmoid(x.detach())
        x.data[(p - kw["clip"]).abs() < 1e-3] += 0.1

    def f(z):
        return CF.asymmetric_loss(z, t, reduction=reduction, **kw)

    assert torch.autograd.gradcheck(f, (x,), eps=1e-6, atol=1e-7, rtol=1e-5)


def test_poly1_and_detach_identities():
    x, t = _rand(20, 7), _targets(20, 7, soft=True)
    w, pw = torch.rand(7, dtype=F64), torch.rand(7, dtype=F64) * 2
    kw = dict(weight=w, pos_weight=pw, reduction="none")
    for gp, gn, clip, alpha in itertools.product((0.0, 2.0), (0.0, 3.0), (0.0, 0.05), (None, 0.3)):
        opts = dict(gamma_pos=gp, gamma_neg=gn, clip=clip, alpha=alpha, **kw)
        base, gbase = _loss_and_grad(crossent.asymmetric_loss, x, t, **opts)
        # poly1 = 0 and detach_focal_weight = False are the defaults, bit for bit
        zero, gzero = _loss_and_grad(
            crossent.asymmetric_loss, x, t, poly1=0.0, detach_focal_weight=False, **opts
        )
        assert torch.equal(zero, base) and torch.equal(gzero, gbase)
        # the Poly-1 term is w alpha_t poly1 (1 - p_t): no pos_weight, no focal factor
        poly, _ = _loss_and_grad(crossent.asymmetric_loss, x, t, poly1=0.7, **opts)
        p = torch.sigmoid(x)
        one_minus_pt = t * (1 - p) + (1 - t) * (p - clip).clamp_min(0)
        a_t = 1.0 if alpha is None else alpha * t + (1 - alpha) * (1 - t)
        torch.testing.assert_close(poly - base, w * a_t * 0.7 * one_minus_pt)
        # detaching the focal weight keeps the loss; with gamma = 0 it keeps the gradient too
        # (to rounding: on the native path only the base call runs in the native kernel)
        det, gdet = _loss_and_grad(
            crossent.asymmetric_loss, x, t, detach_focal_weight=True, **opts
        )
        torch.testing.assert_close(det, base, rtol=1e-14, atol=1e-15)
        if gp == gn == 0.0:
            torch.testing.assert_close(gdet, gbase, rtol=1e-14, atol=1e-15)
        else:
            assert not torch.allclose(gdet, gbase)
    # Poly-1 BCE: b + poly1 (1 - p_t), as PolyLoss writes it for the sigmoid
    e = -0.4
    p = torch.sigmoid(x)
    torch.testing.assert_close(
        crossent.binary_cross_entropy(x, t, poly1=e, reduction="none"),
        TF.binary_cross_entropy_with_logits(x, t, reduction="none") + e * (t * (1 - p) + (1 - t) * p),
    )


def _detached_focal_composition(x, t, *, gamma_pos, gamma_neg, clip, alpha, label_smoothing,
                                poly1, weight, pos_weight):
    """The whole formulation in PyTorch ops, with the focal weight ``.detach()``ed."""
    ts = t * (1 - label_smoothing) + label_smoothing / 2
    p = torch.sigmoid(x)
    pm = (p - clip).clamp_min(0.0) if clip else p
    log_1m_pm = torch.log1p(-pm) if clip else -TF.softplus(x)
    b = -(pos_weight * ts * -TF.softplus(-x) + (1 - ts) * log_1m_pm)
    one_minus_pt = ts * torch.sigmoid(-x) + (1 - ts) * pm
    a_t = 1.0 if alpha is None else alpha * ts + (1 - alpha) * (1 - ts)
    gamma_t = gamma_pos * ts + gamma_neg * (1 - ts)
    focal_weight = (a_t * one_minus_pt**gamma_t).detach()
    return weight * (focal_weight * b + a_t * poly1 * one_minus_pt)


@pytest.mark.parametrize(
    ("gammas", "clip", "alpha", "eps", "poly1"),
    list(itertools.product([(2.0, 2.0), (0.0, 4.0), (1.0, 3.0)], [0.0, 0.05], [None, 0.25],
                           [0.0, 0.1], [0.0, 0.7])),
)
@pytest.mark.parametrize("soft", [False, True])
def test_detach_focal_weight_equals_detached_composition(gammas, clip, alpha, eps, poly1, soft):
    x, t = _rand(16, 5), _targets(16, 5, soft=soft)
    w, pw = torch.rand(5, dtype=F64) + 0.2, torch.rand(5, dtype=F64) * 3
    go = torch.rand(16, 5, dtype=F64)
    opts = dict(gamma_pos=gammas[0], gamma_neg=gammas[1], clip=clip, alpha=alpha,
                label_smoothing=eps, poly1=poly1, weight=w, pos_weight=pw)
    loss, grad = _loss_and_grad(
        crossent.asymmetric_loss, x, t, go, detach_focal_weight=True, reduction="none", **opts
    )
    ref_loss, ref_grad = _loss_and_grad(_detached_focal_composition, x, t, go, **opts)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(grad, ref_grad, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.float32, F64])
@pytest.mark.parametrize("new", list(NEW_OPTIONS))
@pytest.mark.parametrize(
    "kw",
    [
        dict(gamma_pos=0.0, gamma_neg=0.0, clip=0.0),
        dict(gamma_pos=0.5, gamma_neg=0.5, alpha=0.25, clip=0.0),
        dict(gamma_pos=0.0, gamma_neg=4.0, clip=0.05, label_smoothing=0.1),
    ],
)
def test_poly1_and_detach_hostile_logits(dtype, new, kw):
    vals = [-1e4, -105.0, -30.0, -17.0, 0.0, 17.0, 30.0, 105.0, 1e4]
    x = torch.tensor(vals, dtype=dtype).repeat_interleave(4)
    t = torch.tensor([0.0, 1.0, 0.5, 1e-6], dtype=dtype).repeat(len(vals))
    kw = dict(kw, **NEW_OPTIONS[new])
    loss, grad = _loss_and_grad(crossent.asymmetric_loss, x, t, reduction="none", **kw)
    assert torch.isfinite(loss).all() and torch.isfinite(grad).all()
    ref_loss, ref_grad = R.asymmetric_loss(
        x.double().numpy(), t.double().numpy(), reduction="none", **kw
    )
    tol = dict(rtol=1e-9, atol=1e-12) if dtype == F64 else dict(rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(loss.double().numpy(), ref_loss, **tol)
    np.testing.assert_allclose(grad.double().numpy(), ref_grad, **tol)


@pytest.mark.parametrize("new", list(NEW_OPTIONS))
def test_poly1_and_detach_leave_the_native_kernel(new, cpu_path, monkeypatch):
    """The native kernel does not compute them: "auto" runs the torch-op path, a forced
    "native" raises a ValueError naming the backend."""
    from crossent.backends import native

    calls = []
    original = native.binary_cross_entropy

    def counted(*a, **k):
        calls.append(1)
        return original(*a, **k)

    monkeypatch.setattr(native, "binary_cross_entropy", counted)
    x, t = _rand(6, 4), _targets(6, 4)
    crossent.sigmoid_focal_loss(x.clone().requires_grad_(), t, **NEW_OPTIONS[new]).backward()
    assert not calls
    crossent.sigmoid_focal_loss(x.clone().requires_grad_(), t).backward()
    assert len(calls) == int(cpu_path == "native")
    with pytest.raises(ValueError, match="backend='native'"):
        crossent.sigmoid_focal_loss(x, t, backend="native", **NEW_OPTIONS[new])


def test_poly1_double_backward_and_torch_func():
    """The composite graph computes the Poly-1 term exactly (no focal term, no clip)."""
    gen = torch.Generator().manual_seed(4)
    x = torch.randn(6, 3, dtype=F64, generator=gen)
    t = torch.rand(6, 3, dtype=F64, generator=gen)
    t[0, 1] = -1
    kw = dict(weight=torch.rand(6, 1, dtype=F64) + 0.5, pos_weight=torch.rand(3, dtype=F64) + 0.5,
              alpha=0.3, label_smoothing=0.1, ignore_index=-1, poly1=-0.7, detach_focal_weight=True)
    assert torch.autograd.gradgradcheck(
        lambda z: crossent.binary_cross_entropy(z, t, **kw), (x.clone().requires_grad_(),)
    )
    g = torch.func.grad(lambda z: crossent.binary_cross_entropy(z, t, **kw))(x)
    _, expect = _loss_and_grad(crossent.binary_cross_entropy, x, t, **kw)
    torch.testing.assert_close(g, expect)
    z = x.clone().requires_grad_()
    loss = crossent.asymmetric_loss(z, t.clamp(0, 1), poly1=0.5, detach_focal_weight=True)
    with pytest.raises(RuntimeError, match="gamma"):
        torch.autograd.grad(loss, z, create_graph=True)


def test_poly1_and_detach_nn_modules():
    x, t = _rand(10, 4), _targets(10, 4, soft=True)
    new = dict(poly1=0.6, detach_focal_weight=True)
    m = cnn.BCEWithLogitsLoss(gamma=1.5, **new)
    torch.testing.assert_close(m(x, t), crossent.binary_cross_entropy(x, t, gamma=1.5, **new))
    assert "poly1=0.6" in repr(m) and "detach_focal_weight=True" in repr(m)
    assert "poly1" not in repr(cnn.BCEWithLogitsLoss())
    assert "detach_focal_weight" not in repr(cnn.AsymmetricLoss())
    xg = x.clone().requires_grad_()
    cnn.SigmoidFocalLoss(**new)(xg, t).backward()
    _, expect = _loss_and_grad(crossent.sigmoid_focal_loss, x, t, **new)
    torch.testing.assert_close(xg.grad, expect)
    asl = cnn.AsymmetricLoss(gamma_neg=2.0, clip=0.1, **new)
    torch.testing.assert_close(asl(x, t), crossent.asymmetric_loss(x, t, gamma_neg=2.0, clip=0.1, **new))
    assert "poly1=0.6" in repr(asl) and "detach_focal_weight=True" in repr(asl)
    with pytest.raises(TypeError, match="poly1"):
        cnn.BCEWithLogitsLoss(poly1="a")
    with pytest.raises(TypeError, match="detach_focal_weight"):
        cnn.SigmoidFocalLoss(detach_focal_weight=1)
    with pytest.raises(ValueError, match="poly1"):
        cnn.AsymmetricLoss(poly1=float("inf"))


@pytest.mark.parametrize("front", ["binary_cross_entropy", "sigmoid_focal_loss", "asymmetric_loss"])
@pytest.mark.parametrize(
    ("kwargs", "exc", "match"),
    [
        (dict(poly1="a"), TypeError, "poly1 must be a float, got str"),
        (dict(poly1=True), TypeError, "poly1 must be a float, got bool"),
        (dict(poly1=None), TypeError, "poly1 must be a float"),
        (dict(poly1=float("inf")), ValueError, "poly1 must be finite"),
        (dict(poly1=float("nan")), ValueError, "poly1 must be finite"),
        (dict(detach_focal_weight=1), TypeError, "detach_focal_weight must be a bool, got int"),
        (dict(detach_focal_weight="yes"), TypeError, "detach_focal_weight must be a bool"),
        (dict(detach_focal_weight=None), TypeError, "detach_focal_weight must be a bool"),
        (dict(detach_focal_weight=np.bool_(True)), TypeError, "detach_focal_weight must be a bool"),
    ],
)
def test_poly1_and_detach_errors(front, kwargs, exc, match):
    with pytest.raises(exc, match=match):
        getattr(crossent, front)(torch.zeros(3, 2), torch.zeros(3, 2), **kwargs)


def test_compile_fullgraph_poly1_detach():
    x, t = _rand(8, 5, dtype=torch.float32), _targets(8, 5).float()

    def f(z, tt):
        return crossent.asymmetric_loss(z, tt, poly1=0.5, detach_focal_weight=True)

    a, b = x.clone().requires_grad_(), x.clone().requires_grad_()
    la = f(a, t)
    la.backward()
    lb = torch.compile(f, fullgraph=True)(b, t)
    lb.backward()
    torch.testing.assert_close(lb, la)
    torch.testing.assert_close(b.grad, a.grad)
