r"""The torch-language pieces of the one formulation that every torch-side path shares.

The loss of the softmax family (see :func:`crossent.cross_entropy`) is written once per
language: in C (``_cpu/_kernels_body.h``), in Triton (``_triton/softmax.py``) and in torch ops.
In torch ops these helpers hold the parts that are not specific to a schedule of passes: the
focal factor in log space, a focal schedule evaluated per row, the mean's denominator and the
rule that a zero denominator gives a zero loss and gradient. The torch-op path, the chunked
linear path, the vocabulary-parallel path and the registered operators' composites all call
them; none writes its own.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor

__all__ = ["acc_dtype", "inverse_or_zero", "mean_denominator"]

MeanBy = Literal["weight", "count"]


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """The accumulation dtype: fp32 for fp32/fp16/bf16 inputs, fp64 for fp64 (gradcheck)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def inverse_or_zero(denom: Tensor) -> Tensor:
    """``1 / denom``, and 0 where ``denom`` is 0: a "mean" over nothing (every target ignored,
    an empty batch, all weights 0) is a loss of 0 with a zero gradient, not 0/0 = nan."""
    tiny = torch.finfo(denom.dtype).tiny
    return torch.where(denom > 0, 1.0 / denom.clamp_min(tiny), 0.0)


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
