r"""NumPy float64 reference for the softmax cross-entropy family: the spec.

Everything here is written straight from the formulas, row by row in float64, independent of
the fused torch and Triton code that is tested against it. It is slow on purpose.

With logits :math:`z \in \mathbb{R}^C`, ``u = s tanh(z / s)`` when ``softcap = s`` is set
(else ``u = z``), :math:`q = \mathrm{softmax}(u)`, :math:`\ell_k = -\log q_k = \mathrm{lse}(u) - u_k`,
a target distribution :math:`t` (one-hot for a class index) smoothed to
:math:`\tilde t = (1 - \varepsilon) t + \varepsilon / C`, class weights :math:`w` and the sample
weight :math:`s = w_y` (index targets; 1 for probability targets), the per-sample loss is

.. math::

    L = \sum_k w_k \tilde t_k (1 - q_k)^{\gamma} \ell_k
        + s\,\lambda_z\,\mathrm{lse}(u)^2 - s\,\beta\,H(q)
        + s\,\epsilon_1 (1 - \textstyle\sum_k \tilde t_k q_k)

and the gradient is derived by hand below.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal

import numpy as np

__all__ = ["cross_entropy", "flsd53", "focal_factor_grad", "log_softmax", "per_sample_loss_and_grad"]

Reduction = Literal["none", "sum", "mean"]


def flsd53(p: np.ndarray) -> np.ndarray:
    """FLSD-53 (Mukhoti et al. 2020): gamma 5 where the true-class probability p < 0.2, else 3."""
    return np.where(np.asarray(p) < 0.2, 5.0, 3.0)


def log_softmax(u: np.ndarray) -> np.ndarray:
    """log q = u - lse(u), with the max subtracted before exponentiating."""
    m = u.max(axis=-1, keepdims=True)
    out: np.ndarray = u - (m + np.log(np.exp(u - m).sum(axis=-1, keepdims=True)))
    return out


def focal_factor_grad(ell: np.ndarray, gamma: np.ndarray | float) -> tuple[np.ndarray, np.ndarray]:
    r"""f(q) = (1-q)^γ (-log q) and g = q df/dq, both as functions of ℓ = -log q.

    .. math::
        g = -(1-q)^\gamma \left(1 + \gamma\, q\, \frac{\ell}{1-q}\right)

    ``1 - q = -expm1(-ℓ)`` is exact when q -> 1, and ``ℓ / (1 - q) -> 1`` there, so g stays
    finite for γ in (0, 1) where :math:`(1-q)^{\gamma-1}` alone would overflow.
    """
    ell = np.asarray(ell, dtype=np.float64)
    gamma = np.asarray(gamma, dtype=np.float64)
    q = np.exp(-ell)
    one_minus_q = -np.expm1(-ell)
    with np.errstate(divide="ignore", invalid="ignore"):
        ratio = np.where(one_minus_q > 0, ell / one_minus_q, 1.0)
        factor = np.where(gamma == 0, 1.0, np.power(one_minus_q, gamma))
        q_ratio = np.where(q > 0, q * ratio, 0.0)  # q l / (1 - q) -> 0 as q -> 0 (l = inf)
    f = factor * ell
    g = -factor * (1.0 + gamma * q_ratio)
    return f, g


def per_sample_loss_and_grad(
    z: np.ndarray,
    t: np.ndarray,
    *,
    w: np.ndarray,
    s: float,
    eps: float,
    gamma: float,
    z_loss: float,
    softcap: float | None,
    confidence_penalty: float,
    poly1: float,
) -> tuple[float, np.ndarray]:
    """Loss of one sample and its gradient w.r.t. the logits z (shape (C,)).

    t is the (unsmoothed) target distribution, w the class weights, s the sample weight.
    """
    C = z.shape[0]
    if softcap is not None:
        u = softcap * np.tanh(z / softcap)
        du_dz = 1.0 - np.tanh(z / softcap) ** 2
    else:
        u, du_dz = z, np.ones_like(z)
    logq = log_softmax(u)
    q = np.exp(logq)
    ell = -logq
    m = u.max()
    lse = m + np.log(np.exp(u - m).sum())
    tt = (1.0 - eps) * t + eps / C
    a = w * tt

    # Focal / CE part: L = sum_k a_k f_k;  dL/du_j = a_j g_j - q_j sum_k a_k g_k
    f, g = focal_factor_grad(ell, gamma)
    # 0 log 0 = 0: a class without target mass adds nothing, even a masked one (u = -inf, f = inf)
    with np.errstate(invalid="ignore"):
        loss = float(np.sum(np.where(a != 0, a * f, 0.0)))
    grad = a * g - q * np.sum(a * g)

    if z_loss:
        loss += s * z_loss * lse**2
        grad = grad + s * z_loss * 2.0 * lse * q  # d lse / du = q
    if confidence_penalty:
        with np.errstate(invalid="ignore"):  # q = 0 where ell = inf: those terms are 0
            H = float(np.sum(np.where(q > 0, q * ell, 0.0)))
            dH = np.where(q > 0, q * (H - ell), 0.0)  # dH/du_j = -q_j (log q_j + H)
        loss -= s * confidence_penalty * H
        grad = grad + s * confidence_penalty * dH
    if poly1:
        P = float(np.sum(tt * q))
        loss += s * poly1 * (1.0 - P)
        grad = grad - s * poly1 * q * (tt - P)  # dP/du_j = q_j (t~_j - P)
    return loss, grad * du_dz


def cross_entropy(
    logits: np.ndarray,
    target: np.ndarray,
    *,
    weight: np.ndarray | None = None,
    ignore_index: int = -100,
    label_smoothing: float = 0.0,
    gamma: float | Callable[[np.ndarray], np.ndarray] = 0.0,
    z_loss: float = 0.0,
    softcap: float | None = None,
    confidence_penalty: float = 0.0,
    poly1: float = 0.0,
    reduction: Reduction = "mean",
    grad_output: np.ndarray | float | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Reference loss and gradient, same semantics as :func:`crossent.cross_entropy`.

    Returns ``(loss, grad)`` where ``grad`` is the gradient of ``sum(grad_output * loss)`` w.r.t.
    ``logits`` (``grad_output`` defaults to ones of the loss's shape). Layouts as PyTorch:
    (C,), (N, C) or (N, C, d1, ..., dk); integer targets are class indices, float targets
    class probabilities of the logits' shape.

    "mean" divides by the sum of ``w[y_i]`` over non-ignored samples (index targets) or by the
    number of samples (probability targets), as PyTorch does; a zero denominator gives 0.
    """
    x = np.asarray(logits, dtype=np.float64)
    tgt = np.asarray(target)
    index_target = np.issubdtype(tgt.dtype, np.integer)
    if x.ndim == 1:
        x2, out_shape = x[None, :], ()
        t2 = tgt.reshape(1) if index_target else tgt[None, :]
    else:
        C0 = x.shape[1]
        x2 = np.moveaxis(x, 1, -1).reshape(-1, C0)
        out_shape = (x.shape[0], *x.shape[2:])
        t2 = tgt.reshape(-1) if index_target else np.moveaxis(tgt, 1, -1).reshape(-1, C0)
    R, C = x2.shape
    w = np.ones(C) if weight is None else np.asarray(weight, dtype=np.float64)

    losses = np.zeros(R)
    grads = np.zeros((R, C))
    sample_w = np.zeros(R)
    for i in range(R):
        if index_target:
            if int(t2[i]) == ignore_index:
                continue
            t = np.zeros(C)
            t[int(t2[i])] = 1.0
            s = float(w[int(t2[i])])
        else:
            t = np.asarray(t2[i], dtype=np.float64)
            s = 1.0
        sample_w[i] = s
        if callable(gamma):
            u = softcap * np.tanh(x2[i] / softcap) if softcap is not None else x2[i]
            p_true = np.sum(t * np.exp(log_softmax(u)))  # unsmoothed true-class probability
            g_i = float(np.asarray(gamma(np.asarray(p_true))))
        else:
            g_i = float(gamma)
        losses[i], grads[i] = per_sample_loss_and_grad(
            x2[i], t, w=w, s=s, eps=label_smoothing, gamma=g_i, z_loss=z_loss,
            softcap=softcap, confidence_penalty=confidence_penalty, poly1=poly1,
        )

    if reduction == "none":
        loss = losses.reshape(out_shape)
        go_rows = np.ones(R) if grad_output is None else np.broadcast_to(grad_output, out_shape).reshape(-1)
        grad = grads * go_rows[:, None]
    elif reduction in ("sum", "mean"):
        if reduction == "sum":
            scale = 1.0
        else:
            denom = sample_w.sum() if index_target else float(R)
            scale = 1.0 / denom if denom > 0 else 0.0
        loss = np.asarray(losses.sum() * scale)
        go = 1.0 if grad_output is None else float(np.asarray(grad_output))
        grad = grads * (scale * go)
    else:
        raise ValueError(f"reduction must be 'none', 'sum' or 'mean', got {reduction!r}")

    if x.ndim == 1:
        grad = grad.reshape(C)
    else:
        grad = np.moveaxis(grad.reshape(*out_shape, C), -1, 1)
    return loss, grad
