r"""Shared ``@triton.jit`` helpers and launch utilities of the Triton kernels.

``triton.language`` has ``exp`` and ``log`` but no ``expm1``, ``log1p`` or ``tanh``; the
versions here are written for fp32 accuracy where the losses need it:

- :func:`expm1` uses a degree-7 Taylor polynomial for :math:`|x| < 1/4` (remainder
  :math:`|x|^8/8! < 2\cdot 10^{-9}` relative) and ``exp(x) - 1`` elsewhere (relative error
  :math:`\le 2^{-24}/|x| \cdot 2 \le 2.4\cdot 10^{-7}`). ``1 - q = -expm1(-ℓ)`` keeps its
  relative precision when :math:`q \to 1`, where ``1 - exp(-ℓ)`` would round to 0.
- :func:`tanh` is :math:`\operatorname{sign}(x)\,(-e)/(2 + e)` with
  :math:`e = \mathrm{expm1}(-2|x|)`: no overflow for large :math:`|x|` (e -> -1) and full
  relative precision for small ones.
- :func:`log1p` is ``log(1 + x)`` corrected by the rounding of ``1 + x`` (Goldberg's trick)
  for :math:`|x|` small, exact enough for the binary family's ``softplus``.

Everything is computed in the dtype of the arguments (fp32 in every kernel of this package).

The interpreter switch: ``triton.jit`` reads ``TRITON_INTERPRET`` (through
``triton.knobs.runtime.interpret``) when it *decorates* a function, so the variable must be set
before a module defining kernels is imported; :func:`interpreted` reports which mode a kernel
was built in.
"""

from __future__ import annotations

import triton
import triton.language as tl

__all__ = [
    "compile_for_cuda",
    "expm1",
    "interpreted",
    "interpreter_usable",
    "log1p",
    "next_pow2",
    "tanh",
]


def interpreted(kernel: object) -> bool:
    """True when ``kernel`` (a ``@triton.jit`` object) runs in Triton's CPU interpreter."""
    return type(kernel).__name__ == "InterpretedFunction"


def interpreter_usable() -> bool:
    """True when Triton's own library (``tl.sum``, ``tl.sigmoid``...) was built interpreted.

    Those are ``@triton.jit`` functions decorated when ``triton`` is first imported; if that
    happened without ``TRITON_INTERPRET=1``, no kernel can run in the interpreter in this
    process (reloading a kernel module does not help).
    """
    return interpreted(tl.standard.sum)


def next_pow2(n: int) -> int:
    """Smallest power of two >= max(n, 1)."""
    return 1 << max(0, int(n) - 1).bit_length()


@triton.jit
def expm1(x):
    """exp(x) - 1 accurate to fp32 relative precision for every x (elementwise)."""
    # Horner form of x + x^2/2! + ... + x^7/7!
    p = 1.0 / 5040.0
    p = p * x + 1.0 / 720.0
    p = p * x + 1.0 / 120.0
    p = p * x + 1.0 / 24.0
    p = p * x + 1.0 / 6.0
    p = p * x + 0.5
    p = p * x + 1.0
    small = x * p
    return tl.where(tl.abs(x) < 0.25, small, tl.exp(x) - 1.0)


@triton.jit
def log1p(x):
    """log(1 + x) for x > -1, accurate for small |x| (elementwise)."""
    w = 1.0 + x
    # w - 1 is exact (Sterbenz) when w is near 1, so x / (w - 1) corrects the rounding of 1 + x.
    d = w - 1.0
    safe_d = tl.where(d == 0.0, 1.0, d)
    return tl.where(d == 0.0, x, tl.log(w) * (x / safe_d))


@triton.jit
def tanh(x):
    """tanh(x) without overflow and with full relative precision near 0 (elementwise)."""
    e = expm1(-2.0 * tl.abs(x))  # in (-1, 0]
    t = -e / (2.0 + e)
    return tl.where(x < 0.0, -t, t)


def compile_for_cuda(
    kernel: triton.runtime.JITFunction,
    types: dict[str, str],
    constexprs: dict[str, object],
    *,
    arch: int = 90,
    num_warps: int = 4,
) -> object:
    """Compile ``kernel`` ahead of time for an NVIDIA GPU of compute capability ``arch``.

    Needs no GPU (Triton ships LLVM and ptxas): the test-suite uses it to check that every
    kernel lowers for real hardware, which the interpreter does not prove. ``types`` gives the
    Triton type of each runtime argument (``"*bf16"``, ``"i64"``, ``"fp32"``...),
    ``constexprs`` the value of each ``tl.constexpr`` argument (a runtime argument may be
    listed there too, e.g. a stride of 1, as Triton's specialisation does). Returns the
    compiled kernel (``.asm["ptx"]``, ``.asm["cubin"]``). Must run without ``TRITON_INTERPRET``.
    """
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    names = kernel.arg_names
    signature = {n: ("constexpr" if n in constexprs else types[n]) for n in names}
    consts = {(names.index(n),): v for n, v in constexprs.items()}
    src = ASTSource(fn=kernel, signature=signature, constexprs=consts)
    return triton.compile(src, target=GPUTarget("cuda", arch, 32), options={"num_warps": num_warps})
