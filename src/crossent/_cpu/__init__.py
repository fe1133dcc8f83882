"""CPU kernels: the native C kernels (:mod:`crossent._cpu.native`, the fast path) and the
torch-op path (:mod:`crossent._cpu.softmax`, :mod:`crossent._cpu.binary`: any device, under
``torch.compile``, and the fallback where no C compiler is available)."""
