"""Hostile numbers on every CPU path (issue 16): masked (-inf) and NaN logits in ignored and
counted rows for every loss and option, in-place gradients over storage that cannot hold them,
float ignore values that are not exact in fp32, and schedules or weights of the wrong kind.

Every case runs on both CPU paths (``cpu_path``: the native kernels, then the torch-op path)
and is compared with a float64 composition of PyTorch ops (``F.cross_entropy`` /
``F.binary_cross_entropy_with_logits`` where their semantics meet ours): finite where the
composition is finite, infinite where it is, NaN exactly where PyTorch gives NaN.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import crossent
from crossent import reference

pytestmark = pytest.mark.usefixtures("cpu_path")

IGN = -100
N, C = 6, 5
#: class indices: rows 1 and 3 are ignored
TARGET = torch.tensor([0, IGN, 2, IGN, 4, 1])
WEIGHT = torch.tensor([0.5, 1.5, 1.0, 2.0, 0.8], dtype=torch.float64)

# --------------------------------------------------------------------------------------------
# the softmax family: each option alone

CE_OPTIONS: dict[str, dict[str, Any]] = {
    "none": {},
    "label_smoothing": {"label_smoothing": 0.1},
    "gamma": {"gamma": 2.0},
    "flsd53": {"gamma": crossent.flsd53},
    "weight": {"weight": WEIGHT},
    "z_loss": {"z_loss": 1e-2},
    "softcap": {"softcap": 3.0},
    "confidence_penalty": {"confidence_penalty": 0.3},
    "poly1": {"poly1": 1.0},
}
#: where the hostile values go
WHERES = ("inf_counted", "inf_ignored", "nan_ignored", "nan_counted")


def _logits(where: str) -> torch.Tensor:
    x = torch.randn(N, C, generator=torch.Generator().manual_seed(16), dtype=torch.float64)
    if where == "inf_counted":  # masked classes of counted rows, never their target
        x[0, 3] = -math.inf
        x[2, 0] = x[2, 4] = -math.inf
        x[:, 1] = torch.where(TARGET == 1, x[:, 1], -math.inf)  # a class masked in every other row
    elif where == "inf_ignored":
        x[1] = -math.inf  # a whole ignored row: its softmax alone is nan
        x[3, 2] = -math.inf
    elif where == "nan_ignored":
        x[1] = math.nan
        x[3, 0] = math.nan
    else:  # nan_counted: PyTorch gives nan for that row (and the mean), finite elsewhere
        x[2, 1] = math.nan
    return x


def _ce_expected(x: torch.Tensor, opts: dict[str, Any], reduction: str) -> torch.Tensor:
    """The float64 composition: F.cross_entropy for the options it has, else the formula of
    crossent.cross_entropy in PyTorch ops, with 0 log 0 = 0 and ignored rows read as 0."""
    valid = TARGET != IGN
    xs = torch.where(valid[:, None], x, 0.0)
    y = torch.where(valid, TARGET, 0)
    if set(opts) <= {"label_smoothing", "weight"}:
        return F.cross_entropy(xs, TARGET, ignore_index=IGN, reduction=reduction, **opts)
    u = xs if "softcap" not in opts else opts["softcap"] * torch.tanh(xs / opts["softcap"])
    logq = torch.log_softmax(u, dim=1)
    q = logq.exp()
    logq_y = logq.gather(1, y[:, None]).squeeze(1)
    q_y = logq_y.exp()
    gamma = opts.get("gamma", 0.0)
    if callable(gamma):
        gamma = gamma(q_y.detach())
    rows = -logq_y * (1.0 - q_y) ** gamma if (callable(opts.get("gamma")) or gamma) else -logq_y
    rows = rows + opts.get("z_loss", 0.0) * torch.logsumexp(u, dim=1) ** 2
    if "confidence_penalty" in opts:
        safe = torch.where(q > 0, logq, 0.0)  # 0 log 0 = 0, with a finite gradient
        rows = rows + opts["confidence_penalty"] * (q * safe).sum(dim=1)  # - beta H
    rows = rows + opts.get("poly1", 0.0) * (1.0 - q_y)
    rows = torch.where(valid, rows, 0.0)
    if reduction == "none":
        return rows
    return rows.sum() / valid.sum()


@pytest.mark.parametrize("where", WHERES)
@pytest.mark.parametrize("option", list(CE_OPTIONS))
def test_softmax_masked_and_nan(option: str, where: str) -> None:
    opts = CE_OPTIONS[option]
    x64 = _logits(where).requires_grad_(True)
    expected = _ce_expected(x64, opts, "mean")
    expected.backward()
    expected_rows = _ce_expected(x64.detach(), opts, "none")
    for dtype, tol in ((torch.float32, dict(rtol=2e-5, atol=2e-6)), (torch.float64, {})):
        kw = {k: (v.to(dtype) if isinstance(v, torch.Tensor) else v) for k, v in opts.items()}
        x = x64.detach().to(dtype).requires_grad_(True)
        loss = crossent.cross_entropy(x, TARGET, ignore_index=IGN, **kw)
        loss.backward()
        rows = crossent.cross_entropy(x.detach(), TARGET, ignore_index=IGN, reduction="none", **kw)
        msg = f"{option}, {where}, {dtype}"
        torch.testing.assert_close(rows.double(), expected_rows, equal_nan=True, msg=msg, **tol)
        torch.testing.assert_close(loss.double(), expected.detach(), equal_nan=True, msg=msg, **tol)
        torch.testing.assert_close(x.grad.double(), x64.grad, equal_nan=True, msg=msg, **tol)
        if where != "nan_counted":
            assert torch.isfinite(x.grad).all(), msg
        else:
            assert x.grad[2].isnan().all() and torch.isfinite(x.grad[[0, 1, 3, 4, 5]]).all(), msg


# --------------------------------------------------------------------------------------------
# the sigmoid family

BIN_IGN = -1.0
BINARY_LOSSES: dict[str, Callable[..., torch.Tensor]] = {
    "binary_cross_entropy": crossent.binary_cross_entropy,
    "sigmoid_focal_loss": crossent.sigmoid_focal_loss,
    "asymmetric_loss": crossent.asymmetric_loss,
}


def _binary_case(where: str) -> tuple[torch.Tensor, torch.Tensor, float | None]:
    g = torch.Generator().manual_seed(3)
    x = torch.randn(N, C, generator=g, dtype=torch.float64) * 2.0
    t = torch.randint(0, 2, (N, C), generator=g).double()
    t[0, 0], t[0, 1], t[1, 0], t[1, 1] = 0.0, 0.0, 1.0, 1.0
    ignore: float | None = None
    if where == "inf_counted":  # masked negatives and saturated positives: loss and gradient 0
        x[0, 0] = x[0, 1] = -math.inf
        x[1, 0] = math.inf
    elif where == "nan_counted":
        x[2, 2] = math.nan
    else:
        ignore = BIN_IGN
        t[3, 1] = t[4, 2] = t[5, 4] = BIN_IGN
        bad = -math.inf if where == "inf_ignored" else math.nan
        x[3, 1] = x[4, 2] = bad
        x[5, 4] = math.inf if where == "inf_ignored" else math.nan
    return x, t, ignore


def _binary_expected(loss: str, x: torch.Tensor, t: torch.Tensor, reduction: str) -> torch.Tensor:
    """Float64 composition: F.binary_cross_entropy_with_logits where it is defined, else the
    formula with the side without target mass left out (PyTorch's 0 * inf is nan at a masked
    negative, x = -inf with t = 0, whose loss is 0)."""
    valid = t != BIN_IGN
    xs = torch.where(valid, x, 0.0)
    ts = torch.where(valid, t, 0.0)
    if loss == "binary_cross_entropy" and not torch.isinf(x[valid]).any():
        el = F.binary_cross_entropy_with_logits(xs, ts, reduction="none")
    else:
        p = torch.sigmoid(xs)
        pos = -F.logsigmoid(xs)  # -log p
        if loss == "asymmetric_loss":  # gamma_pos 0, gamma_neg 4, clip 0.05
            pm = (p - 0.05).clamp_min(0.0)
            neg = pm**4 * -torch.log1p(-pm)
        else:
            neg = -F.logsigmoid(-xs)  # -log(1 - p)
        el = torch.where(ts != 0, ts * pos, 0.0) + torch.where(ts != 1, (1 - ts) * neg, 0.0)
        if loss == "sigmoid_focal_loss":  # alpha 0.25, gamma 2 (torchvision's formula)
            p_t = p * ts + (1 - p) * (1 - ts)
            el = (0.25 * ts + 0.75 * (1 - ts)) * (1 - p_t) ** 2 * el
    el = torch.where(valid, el, 0.0)
    return el if reduction == "none" else el.sum() / valid.sum()


@pytest.mark.parametrize("where", WHERES)
@pytest.mark.parametrize("loss_name", list(BINARY_LOSSES))
def test_binary_masked_and_nan(loss_name: str, where: str) -> None:
    x64, t, ignore = _binary_case(where)
    x64.requires_grad_(True)
    expected = _binary_expected(loss_name, x64, t, "mean")
    expected.backward()
    expected_el = _binary_expected(loss_name, x64.detach(), t, "none")
    fn = BINARY_LOSSES[loss_name]
    for dtype, tol in ((torch.float32, dict(rtol=2e-5, atol=2e-6)), (torch.float64, {})):
        x = x64.detach().to(dtype).requires_grad_(True)
        kw = {} if ignore is None else {"ignore_index": ignore}
        loss = fn(x, t.to(dtype), **kw)
        loss.backward()
        el = fn(x.detach(), t.to(dtype), reduction="none", **kw)
        msg = f"{loss_name}, {where}, {dtype}"
        torch.testing.assert_close(el.double(), expected_el, equal_nan=True, msg=msg, **tol)
        torch.testing.assert_close(loss.double(), expected.detach(), equal_nan=True, msg=msg, **tol)
        torch.testing.assert_close(x.grad.double(), x64.grad, equal_nan=True, msg=msg, **tol)
        nan_at = torch.zeros(N, C, dtype=torch.bool)
        if where == "nan_counted":
            nan_at[2, 2] = True
        assert torch.equal(x.grad.isnan(), nan_at), msg


# --------------------------------------------------------------------------------------------
# item 6: the confidence penalty with masked classes, against the reference too


def test_confidence_penalty_masked_class_matches_reference() -> None:
    x = torch.randn(4, 6, generator=torch.Generator().manual_seed(6), dtype=torch.float64)
    x[:, 2] = -math.inf
    y = torch.tensor([0, 1, 3, 5])
    weight = torch.tensor([0.5, 1.5, 1.0, 2.0, 0.8, 1.2], dtype=torch.float64)
    cases: list[dict[str, Any]] = [
        {"confidence_penalty": 0.3},
        {"confidence_penalty": 0.3, "weight": weight},
        {"confidence_penalty": 0.5, "softcap": 4.0},
    ]
    for kw in cases:
        np_kw = {k: (v.numpy() if isinstance(v, torch.Tensor) else v) for k, v in kw.items()}
        ref_loss, ref_grad = reference.cross_entropy(x.numpy(), y.numpy(), **np_kw)
        assert np.isfinite(ref_loss) and np.isfinite(ref_grad).all()
        # the float64 composition: CE - beta H with 0 log 0 = 0
        xc = x.clone().requires_grad_(True)
        u = xc if "softcap" not in kw else kw["softcap"] * torch.tanh(xc / kw["softcap"])
        logq = torch.log_softmax(u, dim=1)
        w_y = torch.ones(4, dtype=torch.float64) if "weight" not in kw else kw["weight"][y]
        H = -(logq.exp() * torch.where(logq.exp() > 0, logq, 0.0)).sum(dim=1)
        comp = (w_y * (-logq.gather(1, y[:, None]).squeeze(1) - kw["confidence_penalty"] * H)).sum()
        comp = comp / w_y.sum()
        comp.backward()
        np.testing.assert_allclose(ref_loss, comp.item(), rtol=1e-12)
        np.testing.assert_allclose(ref_grad, xc.grad.numpy(), rtol=1e-10, atol=1e-14)
        for dtype, tol in ((torch.float32, 2e-5), (torch.float64, 1e-10)):
            xd = x.to(dtype).clone().requires_grad_(True)
            wkw = {k: (v.to(dtype) if isinstance(v, torch.Tensor) else v) for k, v in kw.items()}
            loss = crossent.cross_entropy(xd, y, **wkw)
            loss.backward()
            assert torch.isfinite(loss) and torch.isfinite(xd.grad).all(), (kw, dtype)
            np.testing.assert_allclose(loss.item(), ref_loss, rtol=tol)
            np.testing.assert_allclose(xd.grad.double().numpy(), ref_grad, rtol=tol, atol=tol)



# --------------------------------------------------------------------------------------------
# item 7: NaN logits in ignored rows, every layout the torch-op path takes


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("layout", ["rows", "spatial", "channels_last", "last_dim"])
def test_nan_in_ignored_rows_is_ignored(layout: str, reduction: str) -> None:
    g = torch.Generator().manual_seed(7)
    if layout == "rows":
        x = torch.randn(8, 5, generator=g)
        y = torch.randint(0, 5, (8,), generator=g)
        y[[1, 4]] = 255
        x[1] = math.nan
        x[4, 2] = math.nan
        kw: dict[str, Any] = {}
    elif layout == "last_dim":
        x = torch.randn(2, 4, 5, generator=g)
        y = torch.randint(0, 5, (2, 4), generator=g)
        y[0, 1] = y[1, 3] = 255
        x[0, 1] = math.nan
        x[1, 3, 0] = math.nan
        kw = {"class_dim": -1}
    else:  # segmentation: (N, C, H, W) with ignore_index = 255
        x = torch.randn(2, 5, 3, 4, generator=g)
        if layout == "channels_last":
            x = x.contiguous(memory_format=torch.channels_last)
        y = torch.randint(0, 5, (2, 3, 4), generator=g)
        y[0, 1, 2] = y[1, 0, 0] = 255
        x[0, :, 1, 2] = math.nan
        x[1, 3, 0, 0] = math.nan
        kw = {}
    x.requires_grad_(True)
    xr = x.detach().clone().requires_grad_(True)
    keep = (y != 255).unsqueeze(-1 if layout == "last_dim" else 1)
    for opts in ({}, {"label_smoothing": 0.1}, {"weight": torch.rand(5, generator=g) + 0.5}):
        x.grad = xr.grad = None
        loss = crossent.cross_entropy(x, y, ignore_index=255, reduction=reduction, **opts, **kw)
        # F.cross_entropy ignores the rows' loss but not their gradient (nan there): it sees
        # zeros in their place, so that their gradient is the 0 that crossent gives
        xr_in = torch.where(keep, xr, 0.0)
        xr_in = xr_in.movedim(-1, 1) if layout == "last_dim" else xr_in
        assert torch.equal(
            F.cross_entropy(x.detach().movedim(-1, 1) if layout == "last_dim" else x.detach(), y,
                            ignore_index=255, reduction=reduction, **opts),
            F.cross_entropy(xr_in.detach(), y, ignore_index=255, reduction=reduction, **opts),
        )
        ref = F.cross_entropy(xr_in, y, ignore_index=255, reduction=reduction, **opts)
        loss.sum().backward()
        ref.sum().backward()
        assert torch.isfinite(loss).all() and torch.isfinite(x.grad).all(), (layout, opts)
        torch.testing.assert_close(loss, ref, rtol=2e-5, atol=2e-6)
        torch.testing.assert_close(x.grad, xr.grad, rtol=2e-5, atol=2e-6)


def test_nan_in_ignored_rows_with_a_schedule_and_unweighted_z_loss() -> None:
    x = torch.randn(6, 5, generator=torch.Generator().manual_seed(8), dtype=torch.float64)
    y = torch.tensor([0, 1, IGN, 3, IGN, 2])
    x[2] = math.nan
    x[4, 1] = -math.inf
    keep = y != IGN
    for kw in (
        {"gamma": lambda p: 5.0 * (1.0 - p)},  # nan in, nan out: must not see the ignored rows
        {"z_loss": 1e-2, "z_loss_weighted": False},
        {"z_loss": 1e-2, "z_loss_weighted": False, "sample_weight": torch.rand(6, dtype=torch.float64)},
    ):
        xa = x.clone().requires_grad_(True)
        loss = crossent.cross_entropy(xa, y, ignore_index=IGN, **kw)
        loss.backward()
        xb = x[keep].clone().requires_grad_(True)
        kb = dict(kw)
        if "sample_weight" in kb:
            kb["sample_weight"] = kb["sample_weight"][keep]
        ref = crossent.cross_entropy(xb, y[keep], ignore_index=IGN, **kb)
        ref.backward()
        torch.testing.assert_close(loss, ref)
        torch.testing.assert_close(xa.grad[keep], xb.grad)
        assert not xa.grad[~keep].any()


# --------------------------------------------------------------------------------------------
# item 1: inplace_backward over storage the gradient cannot own


def _inplace_cases() -> dict[str, Callable[[torch.Tensor], torch.Tensor]]:
    return {
        "expand": lambda w: (w[:1] * 1).expand(6, 7),
        "transpose": lambda w: (w.reshape(7, 6) * 1).t(),
        "strided_slice": lambda w: (torch.cat([w, w], dim=1) * 1)[:, ::2],
        "as_strided_overlap": lambda w: (w * 1).as_strided((6, 7), (1, 1)),
        "column_slice": lambda w: (torch.cat([w, w], dim=1) * 1)[:, 3:10],
    }


@pytest.mark.parametrize("case", list(_inplace_cases()))
@pytest.mark.parametrize("options", [{}, {"label_smoothing": 0.1, "gamma": 2.0}, {"z_loss": 1e-2}])
def test_inplace_backward_on_storage_it_cannot_own(case: str, options: dict[str, Any]) -> None:
    y = torch.tensor([0, 3, 6, 2, 5, 1])
    make = _inplace_cases()[case]

    def grad_of(fn: Callable[[torch.Tensor], torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        w = torch.randn(6, 7, generator=torch.Generator().manual_seed(1), requires_grad=True)
        loss = fn(make(w))
        loss.backward()
        return loss.detach(), w.grad

    want_loss, want = grad_of(lambda x: crossent.cross_entropy(x, y, backend="torch", **options))
    if not options:
        ref_loss, ref = grad_of(lambda x: F.cross_entropy(x, y))
        torch.testing.assert_close(want_loss, ref_loss)
        torch.testing.assert_close(want, ref)
    got_loss, got = grad_of(lambda x: crossent.cross_entropy(x, y, inplace_backward=True, **options))
    torch.testing.assert_close(got_loss, want_loss, rtol=2e-6, atol=2e-6)
    torch.testing.assert_close(got, want, rtol=2e-6, atol=2e-6)


def test_inplace_backward_still_writes_in_place_when_it_can() -> None:
    x = torch.randn(5, 4, requires_grad=True)
    y = torch.tensor([0, 1, 2, 3, 0])
    want = torch.autograd.grad(F.cross_entropy(x, y), x)[0]
    z = x * 1
    crossent.cross_entropy(z, y, inplace_backward=True).backward()
    torch.testing.assert_close(x.grad, want)
    torch.testing.assert_close(z.detach(), want)  # the gradient was written over the logits


# --------------------------------------------------------------------------------------------
# item 8: a float ignore value that is not exact in the target's dtype


@pytest.mark.parametrize("t_dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_binary_float_ignore_value_compares_in_the_target_dtype(
    t_dtype: torch.dtype, reduction: str
) -> None:
    g = torch.Generator().manual_seed(12)
    x = torch.randn(3, 4, generator=g, requires_grad=True)
    t = torch.randint(0, 2, (3, 4), generator=g).to(t_dtype)
    t[0, :2] = 0.3
    t[2, 3] = 0.3
    keep = t != 0.3  # torch's comparison: 0.3 rounded to the target's dtype
    assert int(keep.sum()) == 9
    loss = crossent.binary_cross_entropy(x, t, ignore_index=0.3, reduction=reduction)
    loss.sum().backward()
    xr = x.detach().clone().requires_grad_(True)
    ref = F.binary_cross_entropy_with_logits(
        xr, torch.where(keep, t, 0).float(), weight=keep.float(), reduction="none"
    )
    ref = ref if reduction == "none" else ref.sum() if reduction == "sum" else ref.sum() / 9
    ref.sum().backward()
    torch.testing.assert_close(loss, ref)
    torch.testing.assert_close(x.grad, xr.grad)


# --------------------------------------------------------------------------------------------
# item 12: schedules and weights of the wrong kind


@pytest.mark.parametrize(
    ("schedule", "error"),
    [
        (lambda p: None, TypeError),
        (lambda p: "3", TypeError),
        (lambda p: torch.ones(2, p.numel()), ValueError),
        (lambda p: torch.ones(p.numel() + 1), ValueError),
        (lambda p: p.to(torch.complex64), TypeError),
        (lambda p: p > 0.5, TypeError),
        (lambda p: [1.0, 2.0], ValueError),
    ],
)
def test_gamma_schedule_of_the_wrong_kind_names_gamma_and_schedule(
    schedule: Callable[[torch.Tensor], Any], error: type[Exception]
) -> None:
    x = torch.randn(5, 4, requires_grad=True)
    y = torch.tensor([0, 1, 2, 3, 0])
    with pytest.raises(error, match=r"gamma schedule <lambda> "):
        crossent.cross_entropy(x, y, gamma=schedule)
    with pytest.raises(error, match=r"gamma schedule <lambda> "):
        crossent.linear_cross_entropy(torch.randn(5, 3), torch.randn(4, 3), y, gamma=schedule)


def test_gamma_schedule_errors_name_the_function() -> None:
    def my_schedule(p: torch.Tensor) -> None:
        return None

    with pytest.raises(TypeError, match="gamma schedule my_schedule returned NoneType"):
        crossent.cross_entropy(torch.randn(3, 4), torch.tensor([0, 1, 2]), gamma=my_schedule)
    with pytest.raises(ValueError, match=r"gamma schedule <lambda> returned a negative or non-finite"):
        crossent.cross_entropy(torch.randn(3, 4), torch.tensor([0, 1, 2]), gamma=lambda p: -p)


def test_complex_weights_and_counts_are_refused() -> None:
    x = torch.randn(4, 3)
    y = torch.tensor([0, 1, 2, 0])
    w = torch.tensor([1.0 + 2.0j, 1.0, 1.0])
    with pytest.raises(TypeError, match=r"^weight must be a real tensor"):
        crossent.cross_entropy(x, y, weight=w)
    with pytest.raises(TypeError, match=r"^class_weight must be a real tensor"):
        crossent.linear_cross_entropy(torch.randn(4, 2), torch.randn(3, 2), y, class_weight=w)
    for counts in (w, [1 + 1j, 2.0, 3.0], np.array([3.0, 1j])):
        with pytest.raises(TypeError, match="counts must be real numbers"):
            crossent.class_weights(counts)
        with pytest.raises(TypeError, match="counts must be real numbers"):
            crossent.logit_adjustment(counts)
