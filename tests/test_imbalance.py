"""class_weights (Cui et al. 2019) and logit_adjustment (Menon et al. 2021)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import crossent


def test_effective_number_weights_by_hand():
    counts = [100, 10, 1]
    beta = 0.9
    raw = [(1 - beta) / (1 - beta**n) for n in counts]  # 1 / E_c
    expected = [3 * r / sum(raw) for r in raw]
    w = crossent.class_weights(counts, beta=beta)
    assert w.dtype == torch.float32 and w.shape == (3,)
    np.testing.assert_allclose(w.numpy(), expected, rtol=1e-6)
    assert math.isclose(float(w.sum()), 3.0, rel_tol=1e-6)


def test_inverse_and_inverse_sqrt():
    w = crossent.class_weights(torch.tensor([4, 1, 1]), method="inverse")
    np.testing.assert_allclose(w.numpy(), np.array([0.25, 1, 1]) * 3 / 2.25, rtol=1e-6)
    w = crossent.class_weights([4, 1], method="inverse_sqrt")
    np.testing.assert_allclose(w.numpy(), np.array([0.5, 1.0]) * 2 / 1.5, rtol=1e-6)


def test_beta_limits():
    # beta -> 1 tends to inverse frequency; beta = 0 gives uniform weights
    near_one = crossent.class_weights([1000, 10], beta=1 - 1e-9)
    inverse = crossent.class_weights([1000, 10], method="inverse")
    np.testing.assert_allclose(near_one.numpy(), inverse.numpy(), rtol=1e-4)
    np.testing.assert_allclose(crossent.class_weights([1000, 10], beta=0.0).numpy(), [1.0, 1.0])


def test_zero_counts_get_weight_zero_and_the_rest_sum_to_c():
    w = crossent.class_weights([10, 0, 5], method="inverse")
    assert w[1] == 0
    np.testing.assert_allclose(float(w.sum()), 3.0, rtol=1e-6)
    np.testing.assert_allclose(w[0] / w[2], 0.5, rtol=1e-6)


@pytest.mark.parametrize(
    "counts,kw,exc,match",
    [
        ([0, 0], {}, ValueError, "all zero"),
        ([1, -1], {}, ValueError, ">= 0"),
        ([[1, 2]], {}, ValueError, "1-D"),
        ([1, 2], {"method": "log"}, ValueError, "method must be"),
        ([1, 2], {"beta": 1.0}, ValueError, r"beta must lie in \[0, 1\)"),
        (["a", "b"], {}, TypeError, "numeric"),
    ],
)
def test_class_weights_errors(counts, kw, exc, match):
    with pytest.raises(exc, match=match):
        crossent.class_weights(counts, **kw)


def test_logit_adjustment_is_tau_log_prior():
    counts = [60, 30, 10]
    adj = crossent.logit_adjustment(counts, tau=2.0)
    np.testing.assert_allclose(adj.numpy(), 2.0 * np.log(np.array(counts) / 100), rtol=1e-6)
    # a zero count gets the prior of half an example: finite, below every other class
    adj0 = crossent.logit_adjustment([10, 0])
    assert torch.isfinite(adj0).all() and adj0[1] < adj0[0]
    np.testing.assert_allclose(float(adj0[1]), math.log(0.5 / 10), rtol=1e-6)


def test_logit_adjusted_loss_shifts_the_optimum_towards_the_prior():
    # with adjusted logits z + tau log pi, the loss is minimised by z = log p(y|x) - log pi:
    # a balanced classifier. On a constant input the optimal raw logits become uniform.
    counts = torch.tensor([90.0, 10.0])
    adj = crossent.logit_adjustment(counts)
    y = torch.tensor([0] * 90 + [1] * 10)
    z = torch.zeros(2, requires_grad=True)
    opt = torch.optim.LBFGS([z], max_iter=100)

    def closure():
        opt.zero_grad()
        loss = crossent.cross_entropy((z + adj).expand(100, 2), y)
        loss.backward()
        return loss

    opt.step(closure)
    assert abs(float((z[0] - z[1]).detach())) < 1e-3
