"""Triton kernels for CUDA tensors.

What each kernel computes, as allow-lists (:func:`crossent._options.covers`): a call whose
options are not all named falls back to the torch-op path (``backend="auto"``) or raises
(``backend="triton"``). The lists live here, not in the kernel modules, so that they can be read
without importing triton.
"""

from crossent._options import BINARY_ALL, SOFTMAX_ALL

#: :mod:`crossent._triton.softmax`: every option, index and probability targets, every layout.
SOFTMAX_CAPABILITIES = (SOFTMAX_ALL,)
#: :mod:`crossent._triton.binary`: every option of the sigmoid family but the Poly-1 term and
#: the detached focal weight (those calls run on the torch-op path).
BINARY_CAPABILITIES = (BINARY_ALL - {"poly1", "detach_focal_weight"},)
#: :mod:`crossent._triton.linear`: cross-entropy with class weights, ignore_index and smoothing.
LINEAR_CAPABILITIES = (frozenset({"ignore_index", "label_smoothing", "weight"}),)
