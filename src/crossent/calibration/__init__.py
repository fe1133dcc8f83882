"""Calibration toolkit: metrics with stated conventions, temperature scaling, diagrams.

Metrics (NumPy arrays or torch tensors; ``probs`` (N, C) and integer ``labels`` (N,)):
:func:`ece` (ECE / AdaECE / RMSCE / MCE), :func:`classwise_ece`, :func:`debiased_l2_ece`,
:func:`smooth_ece`, :func:`brier`, :func:`nll`, :func:`accuracy` and
:func:`reliability_table`, which every binned number is computed from.

Streaming: :class:`CalibrationMeter` accumulates ECE, classwise ECE, Brier, NLL and accuracy
over batches and all-reduces them over ``torch.distributed`` ranks.

Inputs: multiclass (N, C) with integer labels, binary (N,) positive-class scores (or an
(N, 1) column of them) and multi-label (N, L) with 0/1 labels of the same shape;
``ignore_index`` drops labels. One-hot labels beside softmax rows are multi-label input by that
rule; a warning says so and names ``labels.argmax(1)``, the multiclass form. Beside logits
(``from_logits=True``: sigmoid logits there) nothing tells one-vs-rest sigmoids from a softmax,
so no warning comes: pass the class indices for a softmax model.

Post-hoc recalibration, one interface (``fit``, ``transform`` to probabilities,
``transform_logits``, ``state_dict``; :func:`save`/:func:`load` as JSON):
:class:`TemperatureScaler` (NLL or ECE objective), :class:`VectorScaler`, :class:`MatrixScaler`,
:class:`DirichletCalibrator`, :class:`HistogramBinning`, :class:`IsotonicCalibrator`,
:class:`EnsembleTemperatureScaler`, and for binary scores :class:`PlattScaler` and
:class:`BetaCalibrator`. A degenerate fit warns (:class:`CalibrationWarning`) and falls back
to the identity; ``fallback`` says why.

Plots (matplotlib is imported on first use): :func:`reliability_diagram`,
:func:`compare_reliability_diagrams`.

The ``crossent calibrate`` command lives in :mod:`crossent.calibration.cli`.
"""

from __future__ import annotations

from crossent.calibration._base import CalibrationWarning, Recalibrator, from_state_dict, load, save
from crossent.calibration.metrics import (
    ReliabilityTable,
    accuracy,
    brier,
    classwise_ece,
    debiased_l2_ece,
    ece,
    multilabel_ece,
    nll,
    reliability_table,
    smooth_ece,
)
from crossent.calibration.plots import compare_reliability_diagrams, reliability_diagram
from crossent.calibration.recalibration import (
    BetaCalibrator,
    DirichletCalibrator,
    EnsembleTemperatureScaler,
    HistogramBinning,
    IsotonicCalibrator,
    MatrixScaler,
    PlattScaler,
)
from crossent.calibration.streaming import CalibrationMeter
from crossent.calibration.temperature import TemperatureScaler, VectorScaler

__all__ = [
    "BetaCalibrator",
    "CalibrationMeter",
    "CalibrationWarning",
    "DirichletCalibrator",
    "EnsembleTemperatureScaler",
    "HistogramBinning",
    "IsotonicCalibrator",
    "MatrixScaler",
    "PlattScaler",
    "Recalibrator",
    "ReliabilityTable",
    "TemperatureScaler",
    "VectorScaler",
    "accuracy",
    "brier",
    "classwise_ece",
    "compare_reliability_diagrams",
    "debiased_l2_ece",
    "ece",
    "from_state_dict",
    "load",
    "multilabel_ece",
    "nll",
    "reliability_diagram",
    "reliability_table",
    "save",
    "smooth_ece",
]
