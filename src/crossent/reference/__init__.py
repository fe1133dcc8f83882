"""NumPy float64 reference implementations with analytic gradients: the spec.

Every fused path (torch CPU, Triton, linear+CE, vocab-parallel) is tested against these.
They loop over samples in float64 and favour being obviously right over being fast.
"""

from crossent.reference.softmax import cross_entropy, flsd53, focal_factor_grad, log_softmax

__all__ = ["cross_entropy", "flsd53", "focal_factor_grad", "log_softmax"]
