"""NumPy float64 reference implementations with analytic gradients: the spec.

Every fused path (torch CPU, Triton, linear+CE, vocab-parallel) is tested against these.
They loop over samples in float64 and favour being obviously right over being fast.
"""

from crossent.reference.binary import (
    asymmetric_loss,
    binary_cross_entropy,
    binary_loss,
    sigmoid_focal_loss,
)
from crossent.reference.softmax import cross_entropy, flsd53, focal_factor_grad, log_softmax

__all__ = [
    "asymmetric_loss",
    "binary_cross_entropy",
    "binary_loss",
    "cross_entropy",
    "flsd53",
    "focal_factor_grad",
    "log_softmax",
    "sigmoid_focal_loss",
]
