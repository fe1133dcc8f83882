"""crossent.entropy / crossent.kl_divergence: reference values, PyTorch where semantics meet,
and the identities that tie the cross-entropy family together (CE = KL + H, label smoothing
as a mixture with the uniform, focal loss >= CE - gamma * H)."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

import crossent
from crossent import entropy, kl_divergence


def _np_entropy(p: np.ndarray) -> np.ndarray:
    with np.errstate(divide="ignore", invalid="ignore"):
        return -np.where(p > 0, p * np.log(p), 0.0).sum(-1)


def _np_kl(t: np.ndarray, q: np.ndarray) -> np.ndarray:
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(t > 0, t * (np.log(t) - np.log(q)), 0.0).sum(-1)


def _softmax(z: np.ndarray) -> np.ndarray:
    e = np.exp(z - z.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


SHAPES = [(7,), (5, 3), (4, 6, 2), (2, 5, 3, 2)]  # (C,), (N, C), (N, C, d), (N, C, d1, d2)


def _logits(shape: tuple[int, ...], seed: int, scale: float = 3.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return scale * torch.randn(shape, generator=g, dtype=torch.float64)


def _rows(x: torch.Tensor) -> np.ndarray:
    """(..., C) rows of a tensor whose classes are at dim 1 (or dim 0 when 1-D)."""
    a = x.detach().numpy()
    return a if a.ndim == 1 else np.moveaxis(a, 1, -1)


@pytest.mark.parametrize(("shape", "reduction", "as_probs"),
                         list(itertools.product(SHAPES, ["none", "sum", "mean"], [False, True])))
def test_entropy_matches_reference(shape: tuple[int, ...], reduction: str, as_probs: bool) -> None:
    z = _logits(shape, seed=len(shape))
    dim = 0 if z.ndim == 1 else 1
    x = torch.softmax(z, dim) if as_probs else z
    got = entropy(x, input_is_logits=not as_probs, reduction=reduction)  # type: ignore[arg-type]
    ref = _np_entropy(_softmax(_rows(z)))
    ref = {"none": ref, "sum": ref.sum(), "mean": ref.mean()}[reduction]
    np.testing.assert_allclose(got.numpy(), ref, rtol=1e-12, atol=1e-12)
    if z.ndim == 2:  # torch.distributions agrees row by row
        expect = torch.distributions.Categorical(logits=z).entropy()
        if reduction == "none":
            torch.testing.assert_close(got, expect)


@pytest.mark.parametrize(("shape", "reduction", "log_target"),
                         list(itertools.product(SHAPES, ["none", "sum", "mean"], [False, True])))
def test_kl_matches_reference_and_kl_div(shape: tuple[int, ...], reduction: str,
                                         log_target: bool) -> None:
    z = _logits(shape, seed=1)
    dim = 0 if z.ndim == 1 else 1
    t = torch.softmax(_logits(shape, seed=2), dim)
    tgt = t.log() if log_target else t
    got = kl_divergence(z, tgt, log_target=log_target, reduction=reduction)  # type: ignore[arg-type]
    ref = _np_kl(_rows(t), _softmax(_rows(z)))
    ref_r = {"none": ref, "sum": ref.sum(), "mean": ref.mean()}[reduction]
    np.testing.assert_allclose(got.numpy(), ref_r, rtol=1e-10, atol=1e-12)
    # PyTorch's kl_div: input log-probabilities, summed over the classes per sample
    kd = F.kl_div(torch.log_softmax(z, dim), tgt, reduction="none", log_target=log_target).sum(dim)
    if reduction == "none":
        torch.testing.assert_close(got, kd)
    if reduction == "mean" and z.ndim == 2:
        torch.testing.assert_close(got, F.kl_div(torch.log_softmax(z, 1), tgt, reduction="batchmean",
                                                 log_target=log_target))
    # probabilities as input give the same numbers
    same = kl_divergence(torch.softmax(z, dim), tgt, input_is_logits=False, log_target=log_target,
                         reduction=reduction)  # type: ignore[arg-type]
    torch.testing.assert_close(same, got)


def test_class_dim_last_equals_moved() -> None:
    z = _logits((3, 4, 6), seed=3)  # classes last
    t = torch.softmax(_logits((3, 4, 6), seed=4), -1)
    moved_z, moved_t = z.movedim(-1, 1), t.movedim(-1, 1)
    torch.testing.assert_close(entropy(z, class_dim=-1, reduction="none"),
                               entropy(moved_z, reduction="none"))
    torch.testing.assert_close(kl_divergence(z, t, class_dim=-1, reduction="none"),
                               kl_divergence(moved_z, moved_t, reduction="none"))


def test_index_targets_are_cross_entropy_with_ignore_index() -> None:
    for shape in [(6, 5), (3, 5, 4)]:
        z = _logits(shape, seed=5)
        y = torch.randint(0, 5, (shape[0], *shape[2:]), generator=torch.Generator().manual_seed(0))
        y.view(-1)[::3] = -100
        for red in ("none", "sum", "mean"):
            torch.testing.assert_close(kl_divergence(z, y, reduction=red),  # type: ignore[arg-type]
                                       F.cross_entropy(z, y, reduction=red))


def test_zero_probabilities_and_extreme_logits() -> None:
    # 0 log 0 = 0: a one-hot distribution has entropy 0 and KL to itself 0, with finite grads
    t = torch.tensor([[1.0, 0.0, 0.0], [0.5, 0.5, 0.0]], dtype=torch.float64, requires_grad=True)
    h = entropy(t, input_is_logits=False, reduction="none")
    torch.testing.assert_close(h, torch.tensor([0.0, np.log(2.0)], dtype=torch.float64))
    z = torch.tensor([[0.0, -torch.inf, -torch.inf], [0.0, 0.0, -torch.inf]], dtype=torch.float64,
                     requires_grad=True)
    kl = kl_divergence(z, t, reduction="sum")
    torch.testing.assert_close(kl, torch.tensor(0.0, dtype=torch.float64), atol=1e-12, rtol=0)
    (kl + entropy(z, reduction="sum")).backward()
    assert torch.isfinite(z.grad).all()
    # logits of +-100 in float32: finite values and gradients
    big = torch.tensor([[100.0, -100.0, 0.0], [-100.0, -100.0, 100.0]], requires_grad=True)
    val = entropy(big) + kl_divergence(big, torch.softmax(big.detach().flip(1), 1))
    val.backward()
    assert torch.isfinite(val) and torch.isfinite(big.grad).all()


def test_gradcheck_float64() -> None:
    z = _logits((4, 5), seed=6, scale=1.0).requires_grad_()
    t = torch.softmax(_logits((4, 5), seed=7, scale=1.0), 1).requires_grad_()
    assert torch.autograd.gradcheck(lambda a: entropy(a, reduction="none"), (z,))
    assert torch.autograd.gradcheck(lambda a, b: kl_divergence(a, b, reduction="none"), (z, t))
    assert torch.autograd.gradcheck(
        lambda a, b: kl_divergence(a, b.log(), log_target=True, class_dim=-1), (z, t)
    )
    p = torch.softmax(_logits((3, 4), seed=8, scale=1.0), 1).requires_grad_()
    assert torch.autograd.gradcheck(lambda a: entropy(a, input_is_logits=False), (p,))


@pytest.mark.parametrize(
    ("call", "err", "match"),
    [
        (lambda: entropy(torch.zeros(2, 3), reduction="batchmean"), ValueError, "reduction"),  # type: ignore[arg-type]
        (lambda: entropy(torch.zeros(2, 3, dtype=torch.int64)), TypeError, "floating-point"),
        (lambda: entropy(torch.tensor(1.0)), ValueError, "class dimension"),
        (lambda: entropy(torch.zeros(2, 3), class_dim=4), ValueError, "class_dim"),
        (lambda: entropy([[0.0, 1.0]]), TypeError, "torch.Tensor"),  # type: ignore[arg-type]
        (lambda: kl_divergence(torch.zeros(2, 3), torch.zeros(2, 4)), ValueError, "shape"),
        (lambda: kl_divergence(torch.zeros(2, 3), torch.tensor([0, 3])), ValueError, "outside"),
        (lambda: kl_divergence(torch.zeros(2, 3), torch.tensor([0])), ValueError, "shape"),
        (lambda: kl_divergence(torch.zeros(2, 3), torch.tensor([0, 1]), log_target=True),
         ValueError, "log_target"),
    ],
)
def test_errors_name_the_argument(call, err: type[Exception], match: str) -> None:
    with pytest.raises(err, match=match):
        call()


# ------------------------------------------------------------------ identities (Hypothesis)

_settings = settings(max_examples=60, deadline=None)
_classes = st.integers(2, 12)
_rows_n = st.integers(1, 8)
_scale = st.floats(0.01, 30.0)


def _case(seed: int, n: int, c: int, scale: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    z = scale * torch.randn(n, c, generator=g, dtype=torch.float64)
    t = torch.softmax(scale * torch.randn(n, c, generator=g, dtype=torch.float64), 1)
    y = torch.randint(0, c, (n,), generator=g)
    return z, t, y


@_settings
@given(seed=st.integers(0, 2**31), n=_rows_n, c=_classes, scale=_scale)
def test_cross_entropy_is_kl_plus_entropy(seed: int, n: int, c: int, scale: float) -> None:
    z, t, _ = _case(seed, n, c, scale)
    ce = crossent.cross_entropy(z, t, reduction="none")
    torch.testing.assert_close(
        ce, kl_divergence(z, t, reduction="none") + entropy(t, input_is_logits=False, reduction="none"),
        rtol=1e-10, atol=1e-10,
    )
    assert (kl_divergence(z, t, reduction="none") >= -1e-12).all()  # Gibbs' inequality


@_settings
@given(seed=st.integers(0, 2**31), n=_rows_n, c=_classes, scale=_scale, eps=st.floats(0.0, 1.0))
def test_label_smoothing_is_a_mixture_with_the_uniform(seed: int, n: int, c: int, scale: float,
                                                       eps: float) -> None:
    z, _, y = _case(seed, n, c, scale)
    smoothed = crossent.cross_entropy(z, y, label_smoothing=eps, reduction="none")
    mixture = (1 - eps) * F.one_hot(y, c).double() + eps / c
    uniform = torch.full_like(z, 1.0 / c)
    # CE against the mixture target = the mixture of the two CEs = KL(mixture || q) + H(mixture)
    torch.testing.assert_close(smoothed, crossent.cross_entropy(z, mixture, reduction="none"),
                               rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(
        smoothed,
        (1 - eps) * crossent.cross_entropy(z, y, reduction="none")
        + eps * crossent.cross_entropy(z, uniform, reduction="none"),
        rtol=1e-10, atol=1e-10,
    )
    torch.testing.assert_close(
        smoothed,
        kl_divergence(z, mixture, reduction="none")
        + entropy(mixture, input_is_logits=False, reduction="none"),
        rtol=1e-10, atol=1e-10,
    )


@_settings
@given(seed=st.integers(0, 2**31), n=_rows_n, c=_classes, scale=_scale,
       gamma=st.one_of(st.floats(0.0, 1.0), st.floats(1.0, 20.0)))
def test_focal_loss_bounds_entropy_regularised_ce(seed: int, n: int, c: int, scale: float,
                                                  gamma: float) -> None:
    """FL_gamma >= CE - gamma * H(q) (Mukhoti et al. 2020, eq. 2), for every gamma >= 0."""
    z, _, y = _case(seed, n, c, scale)
    fl = crossent.focal_loss(z, y, gamma=gamma, reduction="none")
    ce = crossent.cross_entropy(z, y, reduction="none")
    h = entropy(z, reduction="none")
    assert (fl >= ce - gamma * h - 1e-9 * (1 + ce)).all()
    # and the bound's right side is the confidence-penalty loss with beta = gamma
    torch.testing.assert_close(
        crossent.cross_entropy(z, y, confidence_penalty=gamma, reduction="none"), ce - gamma * h,
        rtol=1e-9, atol=1e-9,
    )
    # gamma = 0: equality (focal loss is CE)
    if gamma == 0.0:
        torch.testing.assert_close(fl, ce)
