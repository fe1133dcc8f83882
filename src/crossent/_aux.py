r"""The auxiliary outputs of ``return_aux=True`` (:func:`crossent.cross_entropy`,
:func:`crossent.linear_cross_entropy`), assembled from the per-row statistics that the fused pass
writes beside the loss (:func:`crossent._formula.row_statistics`): no second read of the logits.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from crossent._formula import STAT_ENTROPY, STAT_HIT, STAT_LSE, inverse_or_zero, reduce

__all__ = ["CrossEntropyAux", "assemble_aux"]


class CrossEntropyAux(NamedTuple):
    r"""What a training loop logs beside the loss, computed in the loss's own pass.

    All fields are detached (no gradient flows through them) and in the accumulation dtype
    (fp32, or fp64 for fp64 logits). A sample counts when its target is not ``ignore_index``
    (every sample of a probability target counts).

    Attributes:
        lse: per sample, the log-partition :math:`\operatorname{lse}(u) = \log \sum_k e^{u_k}`
            of the (soft-capped) logits, of the per-sample loss's shape; 0 where the target
            is ignored. Large values are what the z-loss (Chowdhery et al. 2022) penalises.
        z_loss: the z-loss term's share of the returned loss,
            :math:`\lambda_z \sum_i s_i \operatorname{lse}(u_i)^2` reduced exactly as the loss is
            (same sample weights, same mean denominator; per sample for ``reduction="none"``);
            0 when ``z_loss=0``. ``loss - z_loss`` is the rest of the objective.
        accuracy: the fraction of counted samples whose most probable class is the target (for
            probability targets: the target's most probable class), ties to the first index
            (Liger-Kernel's token accuracy). 0 when no sample counts.
        entropy: the mean over counted samples of the prediction's entropy
            :math:`H(q) = -\sum_k q_k \log q_k` (nats): the quantity whose decrease marks
            over-confidence (Pereyra et al. 2017; Mukhoti et al. 2020). 0 when no sample counts.
    """

    lse: Tensor
    z_loss: Tensor
    accuracy: Tensor
    entropy: Tensor


def assemble_aux(
    stats: Tensor,
    valid: Tensor | None,
    z_rows: Tensor | None,
    reduction: str,
    denom: Tensor | None,
    shape: tuple[int, ...],
) -> CrossEntropyAux:
    r"""The :class:`CrossEntropyAux` of a call from its (R, 3) row statistics.

    Args:
        stats: (R, 3) from :func:`crossent._formula.row_statistics` (any content at rows that
            do not count: they are masked here, with ``where``, so a nan there stays out).
        valid: (R,) bool, the samples that count; None when all do.
        z_rows: (R,) the z-loss coefficient of each sample, :math:`\lambda_z` times the
            sample's weights in the loss (``lse**2`` is applied here); None without z-loss.
        reduction: the loss's reduction.
        denom: the loss's mean denominator (``reduction="mean"``).
        shape: the per-sample loss's shape (``reduction="none"``).
    """
    stats = stats.detach()
    acc = stats.dtype
    lse = stats[:, STAT_LSE]
    count = stats.new_tensor(float(lse.numel())) if valid is None else valid.sum().to(acc)

    def masked(x: Tensor) -> Tensor:
        return x if valid is None else torch.where(valid, x, 0.0)

    lse = masked(lse)
    accuracy = masked(stats[:, STAT_HIT]).sum() * inverse_or_zero(count)
    entropy = masked(stats[:, STAT_ENTROPY]).sum() * inverse_or_zero(count)
    if z_rows is None:
        z = torch.zeros(shape if reduction == "none" else (), dtype=acc, device=stats.device)
    else:
        z = reduce(masked(z_rows.detach().to(acc) * lse.square()), reduction,
                   lambda: denom if denom is not None else count)
        if reduction == "none":
            z = z.reshape(shape)
    return CrossEntropyAux(lse=lse.reshape(shape), z_loss=z, accuracy=accuracy, entropy=entropy)
