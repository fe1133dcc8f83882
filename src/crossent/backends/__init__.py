"""The backends: where the loss of a validated call is computed.

Every backend computes the same formulation (see :func:`crossent.cross_entropy`) in three
steps, per row of logits: statistics (max, log-sum-exp, the target's logit, the row sums an
option needs) -> coefficients (the loss and the per-row scalars of the gradient, from the
statistics and the options) -> assembly (the gradient written once). The coefficients are
written once per language: :mod:`crossent._formula` (torch), ``native/_kernels_body.h`` (C),
``triton/softmax.py`` (Triton).

- :mod:`crossent.backends.torch_ops`: torch ops on cache-sized blocks of rows; any device,
  every option, and the fallback of the two others.
- :mod:`crossent.backends.native`: C kernels for CPU tensors, built on first use.
- :mod:`crossent.backends.triton`: Triton kernels for CUDA tensors.

Each kernel takes one :class:`crossent._options.SoftmaxCall` or
:class:`~crossent._options.BinaryCall`; the native and Triton backends declare what they
compute as allow-lists (``SOFTMAX_CAPABILITIES``, ...), and a call they do not cover runs on
the torch-op path.
"""
