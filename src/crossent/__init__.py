"""crossent: the cross-entropy family of classification losses, fused, combinable, calibrated.

Losses (one formulation each for the softmax and the sigmoid family, every option combinable):

- :func:`cross_entropy`, :func:`focal_loss`, :data:`flsd53` -- softmax family
- :func:`binary_cross_entropy`, :func:`sigmoid_focal_loss`, :func:`asymmetric_loss` -- sigmoid family
- :func:`linear_cross_entropy` -- ``hidden @ weight.T`` + CE without materialising the logits
- :func:`class_weights`, :func:`logit_adjustment` -- class-imbalance helpers
- :func:`entropy`, :func:`kl_divergence` -- of categorical distributions, from logits or probabilities

Submodules: :mod:`crossent.nn` (modules), :mod:`crossent.reference` (NumPy float64 spec),
:mod:`crossent.calibration`, :mod:`crossent.experiments`, :mod:`crossent.distributed`.
"""

from __future__ import annotations

import importlib
from typing import Any

from crossent import nn, reference
from crossent._aux import CrossEntropyAux
from crossent._options import StepGamma
from crossent._version import __version__
from crossent.divergence import entropy, kl_divergence
from crossent.functional import cross_entropy, flsd53, focal_loss
from crossent.imbalance import class_weights, logit_adjustment

__all__ = [
    "CrossEntropyAux",
    "StepGamma",
    "__version__",
    "class_weights",
    "cross_entropy",
    "entropy",
    "flsd53",
    "focal_loss",
    "kl_divergence",
    "logit_adjustment",
    "nn",
    "reference",
]

_OPTIONAL = {
    # name -> module; imported on first use (they pull matplotlib or torch.distributed)
    "calibration": "crossent.calibration",
    "experiments": "crossent.experiments",
    "distributed": "crossent.distributed",
}
_OPTIONAL_FUNCTIONS = {
    "binary_cross_entropy": "crossent.functional",
    "sigmoid_focal_loss": "crossent.functional",
    "asymmetric_loss": "crossent.functional",
    "linear_cross_entropy": "crossent.functional",
}


def __getattr__(name: str) -> Any:
    if name in _OPTIONAL:
        return importlib.import_module(_OPTIONAL[name])
    if name in _OPTIONAL_FUNCTIONS:
        return getattr(importlib.import_module(_OPTIONAL_FUNCTIONS[name]), name)
    raise AttributeError(f"module 'crossent' has no attribute {name!r}")
