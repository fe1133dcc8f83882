r"""NumPy float64 reference for the binary / multi-label (sigmoid) family: the spec.

Written straight from the formulas, element by element in float64 (vectorised NumPy), and
independent of the fused torch and Triton code that is tested against it.

With logit :math:`x`, :math:`p = \sigma(x)`, target :math:`t` smoothed to
:math:`t' = t (1 - \varepsilon) + \varepsilon / 2`, clip :math:`c` (asymmetric loss; 0 otherwise),
:math:`p_m = \max(p - c, 0)`, element weight :math:`w` and positive weight :math:`w_+`:

.. math::

    b &= -\bigl[w_+ t' \log p + (1 - t') \log(1 - p_m)\bigr] \\
    p_t &= p\, t' + (1 - p_m)(1 - t') \\
    \gamma_t &= \gamma_+ t' + \gamma_- (1 - t'), \qquad
    \alpha_t = \alpha t' + (1 - \alpha)(1 - t') \;\; (1 \text{ if } \alpha \text{ is None}) \\
    L &= w\, \alpha_t\, (1 - p_t)^{\gamma_t}\, b + w\, \alpha_t\, \epsilon_1 (1 - p_t)

The last term is the Poly-1 term (Leng et al. 2022, *PolyLoss*, ICLR), with
:math:`\epsilon_1` = ``poly1`` (no :math:`w_+`, no focal factor); its derivative is
:math:`w \alpha_t \epsilon_1 D` with :math:`D = d(1 - p_t)/dx = -t' s + (1 - t') [p > c]\, s`,
:math:`s = p (1 - p)`. With ``detach_focal_weight`` (Ridnik et al. 2021's
``disable_torch_grad_focal_loss``) the focal weight :math:`\alpha_t (1 - p_t)^{\gamma_t}` is a
constant in the gradient: the loss is unchanged and its derivative is
:math:`w \alpha_t (1 - p_t)^{\gamma_t}\, db/dx` (plus the Poly-1 term's).

Sigmoid focal loss (Lin et al. 2017, torchvision's form) is :math:`\gamma_+ = \gamma_-`,
:math:`c = 0`; the asymmetric loss (Ridnik et al. 2021) has :math:`c > 0` and separate
:math:`\gamma_\pm`; :math:`\gamma = 0`, :math:`\alpha` None is ``binary_cross_entropy_with_logits``.
"""

from __future__ import annotations

from typing import Any, Literal

import numpy as np

__all__ = ["asymmetric_loss", "binary_cross_entropy", "binary_loss", "sigmoid_focal_loss"]

Reduction = Literal["none", "sum", "mean"]


def _elementwise(
    x: np.ndarray,
    t: np.ndarray,
    w: np.ndarray,
    pw: np.ndarray,
    *,
    eps: float,
    gamma_pos: float,
    gamma_neg: float,
    alpha: float | None,
    clip: float,
    poly1: float = 0.0,
    detach_focal_weight: bool = False,
) -> tuple[np.ndarray, np.ndarray]:
    """Per-element loss L and dL/dx (arrays of x's shape)."""
    t = t * (1.0 - eps) + eps / 2.0
    log_p = -np.logaddexp(0.0, -x)  # log sigma(x)
    log_q = -np.logaddexp(0.0, x)  # log(1 - sigma(x)) = log sigma(-x)
    p, q = np.exp(log_p), np.exp(log_q)
    s = p * q  # dp/dx
    if clip > 0:
        pm = np.maximum(p - clip, 0.0)
        one_minus_pm = np.minimum(q + clip, 1.0)  # as in Ridnik et al.'s code
        log_one_minus_pm = np.log(one_minus_pm)
        m = (p > clip).astype(np.float64)
    else:
        pm, one_minus_pm, log_one_minus_pm, m = p, q, log_q, np.ones_like(p)
    b = -(pw * t * log_p + (1.0 - t) * log_one_minus_pm)
    # d/dx of b: d log p/dx = 1 - p, d log(1 - p_m)/dx = -m s / (1 - p_m) (= -p when clip = 0)
    dn = m * s / one_minus_pm if clip > 0 else p
    db = -pw * t * q + (1.0 - t) * dn

    one_minus_pt = t * q + (1.0 - t) * pm  # 1 - p_t
    gam = gamma_pos * t + gamma_neg * (1.0 - t)
    a_t = np.ones_like(t) if alpha is None else alpha * t + (1.0 - alpha) * (1.0 - t)
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        factor = np.where(gam == 0, 1.0, np.power(one_minus_pt, gam))
        # d(1 - p_t)/dx = -t s + (1 - t) m s; the focal term's derivative
        # gamma (1 - p_t)^(gamma - 1) d(1 - p_t)/dx, written with (1 - p_t)^gamma / (1 - p_t)
        # and taken as its limit 0 where 1 - p_t = 0 (then d(1 - p_t)/dx = 0 and b = 0 too).
        d_omp = s * (m * (1.0 - t) - t)
        dfactor = np.where(
            (gam == 0) | (one_minus_pt == 0), 0.0, gam * factor * d_omp / one_minus_pt
        )
    if detach_focal_weight:  # the focal weight a_t (1 - p_t)^gamma is a constant
        dfactor = np.zeros_like(dfactor)
    # Poly-1 (Leng et al. 2022): + poly1 (1 - p_t), derivative poly1 d(1 - p_t)/dx
    loss = w * a_t * (factor * b + poly1 * one_minus_pt)
    grad = w * a_t * (dfactor * b + factor * db + poly1 * d_omp)
    return loss, grad


def binary_loss(
    logits: np.ndarray,
    target: np.ndarray,
    *,
    weight: np.ndarray | None = None,
    pos_weight: np.ndarray | None = None,
    label_smoothing: float = 0.0,
    gamma_pos: float = 0.0,
    gamma_neg: float = 0.0,
    alpha: float | None = None,
    clip: float = 0.0,
    ignore_index: float | None = None,
    poly1: float = 0.0,
    detach_focal_weight: bool = False,
    reduction: Reduction = "mean",
    grad_output: np.ndarray | float | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Reference loss and gradient of the whole sigmoid family (see the module docstring).

    Returns ``(loss, grad)``, ``grad`` the gradient of ``sum(grad_output * loss)`` w.r.t.
    ``logits`` (``grad_output`` defaults to ones of the loss's shape). ``weight`` and
    ``pos_weight`` broadcast against the logits as in NumPy/PyTorch. ``alpha`` None or
    negative disables the balance factor. Entries whose target equals ``ignore_index`` count
    for nothing; "mean" divides by the number of the others (0 if there are none).
    ``poly1`` adds the Poly-1 term, ``detach_focal_weight`` drops the focal weight's own
    derivative from the gradient (see the module docstring).
    """
    x = np.asarray(logits, dtype=np.float64)
    tgt = np.asarray(target, dtype=np.float64)
    if tgt.shape != x.shape:
        raise ValueError(f"target shape {tgt.shape} != logits shape {x.shape}")
    valid = np.ones(x.shape, dtype=bool) if ignore_index is None else tgt != ignore_index
    t = np.where(valid, tgt, 0.0)
    w = np.broadcast_to(1.0 if weight is None else np.asarray(weight, np.float64), x.shape)
    pw = np.broadcast_to(1.0 if pos_weight is None else np.asarray(pos_weight, np.float64), x.shape)
    if alpha is not None and alpha < 0:
        alpha = None
    losses, grads = _elementwise(
        x, t, w, pw, eps=label_smoothing, gamma_pos=gamma_pos, gamma_neg=gamma_neg,
        alpha=alpha, clip=clip, poly1=poly1, detach_focal_weight=detach_focal_weight,
    )
    losses = np.where(valid, losses, 0.0)
    grads = np.where(valid, grads, 0.0)
    if reduction == "none":
        go = 1.0 if grad_output is None else np.broadcast_to(grad_output, x.shape)
        return losses, grads * go
    if reduction == "sum":
        scale = 1.0
    elif reduction == "mean":
        n = int(valid.sum())
        scale = 1.0 / n if n else 0.0
    else:
        raise ValueError(f"reduction must be 'none', 'sum' or 'mean', got {reduction!r}")
    go = 1.0 if grad_output is None else float(np.asarray(grad_output))
    return np.asarray(losses.sum() * scale), grads * (scale * go)


def binary_cross_entropy(
    logits: np.ndarray, target: np.ndarray, *, gamma: float = 0.0, **options: Any
) -> tuple[np.ndarray, np.ndarray]:
    """Reference of :func:`crossent.binary_cross_entropy` (``gamma`` for both signs)."""
    return binary_loss(logits, target, gamma_pos=gamma, gamma_neg=gamma, **options)


def sigmoid_focal_loss(
    logits: np.ndarray,
    target: np.ndarray,
    *,
    alpha: float | None = 0.25,
    gamma: float = 2.0,
    **options: Any,
) -> tuple[np.ndarray, np.ndarray]:
    """Reference of :func:`crossent.sigmoid_focal_loss`."""
    return binary_loss(logits, target, alpha=alpha, gamma_pos=gamma, gamma_neg=gamma, **options)


def asymmetric_loss(
    logits: np.ndarray,
    target: np.ndarray,
    *,
    gamma_pos: float = 0.0,
    gamma_neg: float = 4.0,
    clip: float = 0.05,
    **options: Any,
) -> tuple[np.ndarray, np.ndarray]:
    """Reference of :func:`crossent.asymmetric_loss` (Ridnik et al. 2021)."""
    return binary_loss(
        logits, target, gamma_pos=gamma_pos, gamma_neg=gamma_neg, clip=clip, **options
    )
