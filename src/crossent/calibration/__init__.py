"""Calibration toolkit: metrics with stated conventions, temperature scaling, diagrams.

Metrics (NumPy arrays or torch tensors; ``probs`` (N, C) and integer ``labels`` (N,)):
:func:`ece` (ECE / AdaECE / RMSCE / MCE), :func:`classwise_ece`, :func:`debiased_l2_ece`,
:func:`smooth_ece`, :func:`brier`, :func:`nll`, :func:`accuracy` and
:func:`reliability_table`, which every binned number is computed from.

Post-hoc calibration: :class:`TemperatureScaler` (temperature or vector scaling).

Plots (matplotlib is imported on first use): :func:`reliability_diagram`,
:func:`compare_reliability_diagrams`.

The ``crossent calibrate`` command lives in :mod:`crossent.calibration.cli`.
"""

from __future__ import annotations

from crossent.calibration.metrics import (
    ReliabilityTable,
    accuracy,
    brier,
    classwise_ece,
    debiased_l2_ece,
    ece,
    nll,
    reliability_table,
    smooth_ece,
)
from crossent.calibration.plots import compare_reliability_diagrams, reliability_diagram
from crossent.calibration.temperature import TemperatureScaler

__all__ = [
    "ReliabilityTable",
    "TemperatureScaler",
    "accuracy",
    "brier",
    "classwise_ece",
    "compare_reliability_diagrams",
    "debiased_l2_ece",
    "ece",
    "nll",
    "reliability_diagram",
    "reliability_table",
    "smooth_ece",
]
