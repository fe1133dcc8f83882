"""Triton linear + cross-entropy kernels under TRITON_INTERPRET=1 on tiny CPU shapes.

``triton.jit`` reads TRITON_INTERPRET when it decorates a kernel, so the checks run in a fresh
interpreter with the variable set before anything imports triton.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

pytest.importorskip("triton")

SCRIPT = textwrap.dedent(
    """
    import os
    os.environ["TRITON_INTERPRET"] = "1"
    import torch
    import crossent

    def grads(out, inputs, seed):
        g = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed))
        return torch.autograd.grad(out, inputs, g if out.ndim else 1.3 * torch.ones(()))

    def case(N, D, V, reduction, opts, bias=True, ignore=4, seed=0, lead=None):
        gen = torch.Generator().manual_seed(seed)
        shape = lead or (N,)
        h = torch.randn(*shape, D, generator=gen).requires_grad_()
        W = torch.randn(V, D, generator=gen).requires_grad_()
        b = torch.randn(V, generator=gen).requires_grad_() if bias else None
        y = torch.randint(0, V, shape, generator=gen)
        if ignore:
            y.view(-1)[::ignore] = -100
        kw = dict(opts)
        if kw.pop("class_weight", False):
            kw["class_weight"] = torch.rand(V, generator=gen) + 0.1
        inputs = tuple(t for t in (h, W, b) if t is not None)
        out = crossent.linear_cross_entropy(h, W, y, bias=b, reduction=reduction,
                                            backend="triton", **kw)
        logits = h @ W.t() + (b if b is not None else 0)
        cw = kw.pop("class_weight", None)
        ref = crossent.cross_entropy(logits.reshape(-1, V), y.reshape(-1), weight=cw,
                                     reduction=reduction, **kw)
        ref = ref.reshape(y.shape) if reduction == "none" else ref
        torch.testing.assert_close(out, ref, atol=1e-4, rtol=1e-4)
        for g, r in zip(grads(out, inputs, 1), grads(ref, inputs, 1), strict=True):
            torch.testing.assert_close(g, r, atol=1e-4, rtol=1e-4)

    for reduction in ("mean", "sum", "none"):
        case(37, 20, 50, reduction, {})
        case(37, 20, 50, reduction, {"label_smoothing": 0.1, "class_weight": True})
        # the coefficients of crossent._formula: focal, schedules, z-loss, Poly-1, combined
        case(29, 12, 40, reduction, {"gamma": 2.0})
        case(29, 12, 40, reduction, {"gamma": crossent.flsd53, "z_loss": 1e-2})
        case(29, 12, 40, reduction, {"poly1": 0.7, "label_smoothing": 0.1, "class_weight": True})
        case(29, 12, 40, reduction, {"gamma": 0.5, "z_loss": 1e-3, "poly1": -0.3,
                                     "class_weight": True})
    case(1, 5, 7, "mean", {"label_smoothing": 0.2}, ignore=0)          # N = 1, V < one tile
    case(0, 17, 33, "none", {}, bias=False, lead=(2, 9))               # 3-D hidden, no bias
    case(16, 16, 40, "mean", {}, ignore=1)                             # every token ignored

    # Gradient filtering: off is exact (above); on, the error of each gradient is bounded by
    # filter_eps times the L1 mass of the operand it multiplies over the skipped entries.
    gen = torch.Generator().manual_seed(3)
    N, D, V = 16, 16, 512
    h = torch.randn(N, D, generator=gen).requires_grad_()
    W = (5 * torch.randn(V, D, generator=gen)).requires_grad_()  # peaked softmax
    y = (h @ W.t()).argmax(1).detach()  # a confident, mostly right model: G is sparse
    lce = crossent.linear_cross_entropy
    exact = torch.autograd.grad(lce(h, W, y, reduction="sum", backend="triton"), (h, W))
    eps = 1e-3
    out = lce(h, W, y, reduction="sum", backend="triton", grad_filter_eps=eps)
    filt = torch.autograd.grad(out, (h, W))
    err_h = (filt[0] - exact[0]).abs().max().item()
    err_w = (filt[1] - exact[1]).abs().max().item()
    bound_h = eps * W.detach().abs().sum(0).max().item()
    bound_w = eps * h.detach().abs().sum(0).max().item()
    assert err_h <= bound_h and err_w <= bound_w, (err_h, bound_h, err_w, bound_w)
    assert err_h > 0 or err_w > 0, "no tile was filtered: the check is vacuous"
    print(f"filter eps={eps}: max |d_hidden err| {err_h:.2e} (bound {bound_h:.2e}), "
          f"max |d_weight err| {err_w:.2e} (bound {bound_w:.2e})")

    # Options the kernels do not cover raise with backend="triton" (auto runs the chunked path).
    try:
        crossent.linear_cross_entropy(h, W, y, backend="triton", softcap=5.0)
    except ValueError as err:
        assert "softcap" in str(err)
    else:
        raise AssertionError("softcap on backend='triton' should raise")
    try:
        crossent.linear_cross_entropy(h, W, y, backend="triton", gamma=2.0, label_smoothing=0.1)
    except ValueError as err:
        assert "label_smoothing" in str(err)
    else:
        raise AssertionError("focal with smoothing on backend='triton' should raise")
    print("OK")
    """
)


def test_triton_linear_under_interpreter():
    env = dict(os.environ, TRITON_INTERPRET="1")
    proc = subprocess.run(
        [sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "OK" in proc.stdout
