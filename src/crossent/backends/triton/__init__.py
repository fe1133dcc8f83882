"""Triton kernels for CUDA tensors.

What each kernel computes, as allow-lists (:func:`crossent._options.covers`): a call whose
options are not all named falls back to the torch-op path (``backend="auto"``) or raises
(``backend="triton"``). The lists live here, not in the kernel modules, so that they can be read
without importing triton.
"""

from crossent._options import BINARY_ALL, SOFTMAX_ALL

#: :mod:`crossent.backends.triton.softmax`: every option, index and probability targets, every layout.
SOFTMAX_CAPABILITIES = (SOFTMAX_ALL,)
#: :mod:`crossent.backends.triton.binary`: every option of the sigmoid family but the Poly-1 term and
#: the detached focal weight (those calls run on the torch-op path).
BINARY_CAPABILITIES = (BINARY_ALL - {"poly1", "detach_focal_weight"},)
#: :mod:`crossent.backends.triton.linear`: class indices; no softcap, confidence penalty, or focal term
#: together with smoothing (per-class terms the kernels do not compute).
_LINEAR = SOFTMAX_ALL - {"softcap", "confidence_penalty"}
LINEAR_CAPABILITIES = (_LINEAR - {"gamma", "gamma_schedule"}, _LINEAR - {"label_smoothing"})
