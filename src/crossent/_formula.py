r"""The torch-language pieces of the one formulation that every torch-side path shares.

The loss of the softmax family (see :func:`crossent.cross_entropy`) is written once per
language: in C (``backends/native/_kernels_body.h``), in Triton (``backends/triton/softmax.py``)
and in torch ops.
In torch ops these helpers hold the parts that are not specific to a schedule of passes: the
focal factor in log space, a focal schedule evaluated per row, the mean's denominator and the
rule that a zero denominator gives a zero loss and gradient. The torch-op path, the chunked
linear path, the vocabulary-parallel path and the registered operators' composites all call
them; none writes its own.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

from crossent._options import RowGamma, SoftmaxOptions

__all__ = [
    "Terms",
    "acc_dtype",
    "focal_terms",
    "gamma_for_rows",
    "inverse_or_zero",
    "mean_denominator",
    "reduce",
    "regulariser_terms",
    "row_statistics",
    "target_terms",
]

MeanBy = Literal["weight", "count"]


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """The accumulation dtype: fp32 for fp32/fp16/bf16 inputs, fp64 for fp64 (gradcheck)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def inverse_or_zero(denom: Tensor) -> Tensor:
    """``1 / denom``, and 0 where ``denom`` is 0: a "mean" over nothing (every target ignored,
    an empty batch, all weights 0) is a loss of 0 with a zero gradient, not 0/0 = nan."""
    tiny = torch.finfo(denom.dtype).tiny
    return torch.where(denom > 0, 1.0 / denom.clamp_min(tiny), 0.0)


def reduce(rows: Tensor, reduction: str, denom: Callable[[], Tensor]) -> Tensor:
    """Per-sample losses reduced: as they are (``"none"``), summed, or summed and divided by
    ``denom()`` (evaluated only for a mean) with the zero-denominator rule."""
    if reduction == "none":
        return rows
    total = rows.sum()
    return total if reduction == "sum" else total * inverse_or_zero(denom())


def mean_denominator(
    target: Tensor,
    weight: Tensor | None,
    ignore_index: int,
    acc: torch.dtype,
    rows: int,
    sample_weight: Tensor | None = None,
    by: MeanBy = "weight",
) -> Tensor:
    r"""The denominator of ``reduction="mean"``.

    ``by="weight"`` (PyTorch's weighted mean): :math:`\sum_i v_i\, w_{y_i}` over samples with
    validity :math:`v_i` (0 for ``ignore_index``) and sample weights (1 without
    ``sample_weight``); for probability targets :math:`\sum_i` of the sample weights, i.e. the
    number of rows. ``by="count"``: the number of non-ignored samples (Keras's
    ``sum_over_batch_size`` for sample weights, and the weighted-CE mean of Cui et al. 2019).
    """
    if target.is_floating_point():
        if by == "count" or sample_weight is None:
            return torch.tensor(float(rows), dtype=acc, device=target.device)
        return sample_weight.to(acc).sum()
    valid = target != ignore_index
    if by == "count":
        return valid.sum().to(acc)
    s = valid.to(acc) if weight is None else weight[torch.where(valid, target, 0)].to(acc) * valid
    if sample_weight is not None:
        s = s * sample_weight.to(acc)
    return s.sum()


def focal_terms(ell: Tensor, gamma: Tensor | float) -> tuple[Tensor, Tensor]:
    r"""Focal factor :math:`(1-q)^\gamma` and :math:`\kappa = 1 + \gamma q \ell / (1 - q)` from ℓ = -log q.

    The loss term is :math:`f = (1-q)^\gamma \ell` and :math:`q\,df/dq = -(1-q)^\gamma \kappa`.
    Computed in log space: ``1 - q = -expm1(-ℓ)`` keeps precision as q -> 1 (plain ``1 - q``
    rounds to 0 there), the power is ``exp(γ log(1 - q))``, and the ratio
    :math:`\ell / (1-q) \to 1` replaces :math:`(1-q)^{\gamma - 1}`, which overflows for
    γ in (0, 1) at q -> 1 (where the true gradient is finite).
    """
    one_minus_q = torch.expm1(-ell).neg_()
    if isinstance(gamma, Tensor):
        # 0 * log(0) is nan: a per-sample gamma of exactly 0 must give a factor of exactly 1.
        factor = torch.where(gamma == 0, 1.0, torch.exp(gamma * torch.log(one_minus_q)))
    else:
        factor = torch.exp(torch.log(one_minus_q).mul_(gamma))
    ratio = torch.where(one_minus_q > 0, ell / one_minus_q, 1.0)
    # q ell / (1 - q) -> 0 as q -> 0: a masked class (ell = inf) gives 0, not 0 * inf
    q_ratio = torch.where(torch.isposinf(ell), 0.0, torch.exp(-ell).mul_(ratio))
    kappa = q_ratio.mul_(gamma).add_(1.0)
    return factor, kappa


def _schedule_name(schedule: object) -> str:
    name = getattr(schedule, "__name__", None)
    return str(name) if name else type(schedule).__name__


def gamma_for_rows(opts: SoftmaxOptions, p_true: Tensor) -> Tensor | float:
    """The focusing parameter per row: a float, or the schedule applied to p (shape (R, 1)).

    A schedule must return a real tensor with one gamma per sample, or a single real number;
    anything else (None, a string, a complex or boolean tensor, the wrong number of values)
    raises a ``TypeError`` / ``ValueError`` that names ``gamma`` and the schedule."""
    if not callable(opts.gamma):
        return float(opts.gamma)
    if isinstance(opts.gamma, RowGamma):  # evaluated before the operator; validated there
        return opts.gamma.rows.reshape(-1, 1).to(p_true.dtype)
    schedule = opts.gamma
    g = schedule(p_true.detach().reshape(-1))
    where = f"gamma schedule {_schedule_name(schedule)}"
    wanted = "it must return a real tensor with one gamma per sample (or one real number)"
    if isinstance(g, Tensor):
        if g.is_complex() or g.dtype == torch.bool:
            raise TypeError(f"{where} returned a tensor of dtype {g.dtype}; {wanted}")
    elif g is None or isinstance(g, (bool, str, bytes, complex)):
        raise TypeError(f"{where} returned {type(g).__name__}; {wanted}")
    try:
        g = torch.as_tensor(g, dtype=p_true.dtype, device=p_true.device)
    except (TypeError, ValueError, RuntimeError) as err:
        raise TypeError(f"{where} returned {type(g).__name__} ({err}); {wanted}") from None
    if g.numel() == 1:
        g = g.reshape(1, 1).expand_as(p_true)
    elif g.numel() == p_true.numel() and (g.ndim <= 1 or g.squeeze().ndim <= 1):
        g = g.reshape(-1, 1)
    else:
        raise ValueError(
            f"{where} returned shape {tuple(g.shape)} for {p_true.numel()} samples: {wanted} "
            "(it maps a 1-D tensor of true-class probabilities elementwise)"
        )
    # (a nan gamma where p itself is nan, from nan logits, is the nan that the loss carries anyway)
    if not torch.compiler.is_compiling() and bool(
        ((g < 0) | (~torch.isfinite(g) & ~torch.isnan(p_true))).any()
    ):
        raise ValueError(f"{where} returned a negative or non-finite gamma; gamma must be >= 0")
    return g


@dataclass
class Terms:
    r"""A block of rows' loss and the per-row coefficients of its gradient w.r.t. ``u``:

    .. math:: G = q \cdot \text{rowc} - \text{uniform} \cdot w - \text{onehot}_y \cdot
              \text{sparse} + \text{dense}

    (``w`` the class weights, or ones; ``dense`` is kept by the caller, which owns the (R, C)
    buffers). Each field is (R, 1) or a float 0.
    """

    loss: Tensor
    rowc: Tensor | float = 0.0
    sparse: Tensor | None = None
    uniform: Tensor | None = None


def target_terms(
    ell_y: Tensor, lse: Tensor, u_dot: Tensor | None, w_y: Tensor, validf: Tensor,
    gamma: Tensor | float, opts: SoftmaxOptions, C: int, w_sum: Tensor | float,
) -> Terms:
    r"""The target part for class indices when it needs no per-class factor (no focal term
    together with label smoothing): from per-row statistics only.

    - :math:`a_y (1 - q_y)^\gamma \ell_y` with :math:`a_y = (1 - \varepsilon) w_y`; its
      gradient is :math:`a_y (1 - q_y)^\gamma \kappa_y (q - \text{onehot}_y)`
      (:func:`focal_terms`; :math:`\gamma = 0` is cross-entropy);
    - smoothing's uniform part :math:`\frac{\varepsilon}{C} \sum_k w_k \ell_k =
      \frac{\varepsilon}{C} (\operatorname{lse} \sum_k w_k - \sum_k w_k u_k)`
      (``u_dot`` :math:`= \sum_k w_k u_k`, ``w_sum`` :math:`= \sum_k w_k` over all C classes),
      gradient :math:`\frac{\varepsilon}{C} (q \sum_k w_k - w)`.
    """
    eps = float(opts.label_smoothing)
    a_y = w_y * (1.0 - eps) if eps else w_y
    if opts.focal:
        factor_y, kappa_y = focal_terms(ell_y, gamma)
        loss = a_y * factor_y * ell_y
        coef = a_y * factor_y * kappa_y
    else:
        loss = a_y * ell_y
        coef = a_y
    terms = Terms(loss=loss, rowc=coef, sparse=coef)
    if eps:
        assert u_dot is not None  # the caller passes u_dot whenever label smoothing is on
        ue = eps / C * validf
        terms.loss = loss + ue * (lse * w_sum - u_dot)
        terms.rowc = coef + ue * w_sum
        terms.uniform = ue
    return terms


def regulariser_terms(
    terms: Terms, s: Tensor, lse: Tensor, opts: SoftmaxOptions, C: int, *,
    q_y: Tensor | None = None, entropy: Tensor | None = None, p_mass: Tensor | None = None,
) -> Terms:
    r"""Add the regularisers, each scaled by the sample weight :math:`s`, to ``terms``:

    - z-loss (Chowdhery et al. 2022): :math:`\lambda \operatorname{lse}^2`, gradient
      :math:`2 \lambda \operatorname{lse}\, q`;
    - confidence penalty (Pereyra et al. 2017): :math:`-\beta H(q)` with ``entropy``
      :math:`H = \operatorname{lse} - \sum_k q_k u_k`; gradient
      :math:`\beta q (H - \operatorname{lse}) + \beta q u`, whose dense part
      :math:`\beta s\, q u` the caller adds;
    - Poly-1 (Leng et al. 2022): :math:`\epsilon_1 (1 - P)`, :math:`P = \sum_k \tilde t_k q_k`,
      gradient :math:`-\epsilon_1 q (\tilde t - P)`. For class indices (``q_y``)
      :math:`P = (1 - \varepsilon) q_y + \varepsilon / C` and the :math:`\tilde t` part is
      a uniform and a one-hot term; for probabilities ``p_mass`` is :math:`P` and the dense
      :math:`-\epsilon_1 s\, q \tilde t` is the caller's.
    """
    if opts.z_loss:
        terms.loss = terms.loss + s * opts.z_loss * lse.square()
        terms.rowc = terms.rowc + s * (2.0 * opts.z_loss) * lse
    if opts.confidence_penalty:
        beta = opts.confidence_penalty
        assert entropy is not None  # the caller passes entropy whenever the penalty is on
        terms.loss = terms.loss - s * beta * entropy
        terms.rowc = terms.rowc + s * beta * (entropy - lse)
    if opts.poly1:
        e1 = opts.poly1
        eps = float(opts.label_smoothing)
        if q_y is not None:
            P = q_y * (1.0 - eps) + eps / C if eps else q_y
            terms.loss = terms.loss + s * e1 * (1.0 - P)
            terms.rowc = terms.rowc + s * e1 * (P - eps / C)
            extra = s * e1 * (1.0 - eps) * q_y
            terms.sparse = extra if terms.sparse is None else terms.sparse + extra
        else:
            assert p_mass is not None  # for probability targets the caller passes p_mass
            terms.loss = terms.loss + s * e1 * (1.0 - p_mass)
            terms.rowc = terms.rowc + s * e1 * p_mass
    return terms


#: Columns of :func:`row_statistics`' output.
STAT_LSE, STAT_ENTROPY, STAT_HIT = 0, 1, 2


def row_statistics(x: Tensor, target: Tensor, softcap: float | None, out: Tensor) -> Tensor:
    r"""Per row of a block of logits, the statistics ``return_aux`` reports, written into
    ``out`` (R, 3) in the accumulation dtype:

    - :math:`\operatorname{lse}(u) = m + \log \sum_k e^{u_k - m}` (:math:`m` the row max, so
      no exponential overflows);
    - the entropy of the prediction :math:`H(q) = \operatorname{lse}(u) - \sum_k q_k u_k`
      (a class with :math:`q_k = 0` adds nothing: :math:`0 \log 0 = 0`);
    - 1 where :math:`\arg\max_k q_k` is the target class (for probability targets: the
      target's own argmax), else 0. Ties go to the first maximum, as ``torch.argmax``.

    ``u`` is the soft-capped logit :math:`c \tanh(z / c)` when ``softcap`` is given: the
    statistics are those of the distribution the loss scores. ``x`` (R, C) is the block the
    fused pass is working on, so it is read from cache, not from memory.
    """
    acc = out.dtype
    u = x.to(acc)
    if softcap is not None:
        u = torch.tanh(u / softcap) * softcap
    m, arg = u.max(dim=1, keepdim=True)
    e = torch.sub(u, m).exp_()
    s = e.sum(dim=1, keepdim=True)
    lse = torch.log(s).add_(m)
    eu = torch.where(e != 0, e * u, 0.0).sum(dim=1, keepdim=True)
    out[:, STAT_LSE : STAT_LSE + 1] = lse
    out[:, STAT_ENTROPY : STAT_ENTROPY + 1] = lse - eu / s
    y = target.argmax(dim=1, keepdim=True) if target.is_floating_point() else target.reshape(-1, 1)
    out[:, STAT_HIT : STAT_HIT + 1] = (arg == y).to(acc)
    return out
