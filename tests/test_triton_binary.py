"""Triton sigmoid-family kernel under TRITON_INTERPRET=1 on the CPU, against the reference.

As in ``test_triton_softmax.py``: the interpreter variable is set before the kernel module is
imported (reloaded if another file imported it first), and the public functions are routed to
the Triton backend by patching the dispatcher, in two tile modes: small ragged tiles (2 x 4)
and the default tile.
"""

from __future__ import annotations

import os

os.environ["TRITON_INTERPRET"] = "1"


import numpy as np
import pytest
import torch

pytest.importorskip("triton")

from _triton_setup import compile_for_sm90, interpreted_module, interpreter_guard, triton_backend_fixture
from crossent import functional
from crossent._options import BinaryCall
from crossent.reference import binary as refb

IN_PROCESS, tbinary = interpreted_module("binary", "_binary_ce_kernel")
_interpreter_in_process, test_rerun_in_subprocess = interpreter_guard(IN_PROCESS, __file__)

# NumPy (the interpreter) warns on IEEE inf/nan arithmetic that a select then discards
pytestmark = pytest.mark.filterwarnings("ignore:.*encountered in:RuntimeWarning")

MODES = {"small_tiles": {"block_m": 2, "block_k": 4}, "default": {}}
# routes the sigmoid family to the Triton kernel with the mode's tile
triton_backend = triton_backend_fixture(tbinary, "binary_cross_entropy", MODES)


def _logits(*shape, scale=3.0, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=g, dtype=torch.float64) * scale).to(dtype)


def _labels(*shape, seed=1):
    return torch.randint(0, 2, shape, generator=torch.Generator().manual_seed(seed)).float()


def _soft(*shape, seed=2):
    return torch.rand(*shape, generator=torch.Generator().manual_seed(seed))


def _np(v):
    return None if v is None else v.double().numpy()


def _check(x, t, grad_output=None, rtol=2e-5, atol=2e-6, grad_rtol=None, grad_atol=None,
           **kw):
    """asymmetric_loss takes every option of the family (clip=0 by default here)."""
    kw = {"gamma_pos": 0.0, "gamma_neg": 0.0, "clip": 0.0, **kw}
    xg = x.detach().clone().requires_grad_(True)
    loss = functional.asymmetric_loss(xg, t, **kw)
    go = torch.ones_like(loss) if grad_output is None else grad_output.to(loss.dtype)
    loss.backward(go)
    rkw = dict(kw, weight=_np(kw.get("weight")), pos_weight=_np(kw.get("pos_weight")))
    rloss, rgrad = refb.binary_loss(
        x.double().numpy(), t.double().numpy(), grad_output=_np(grad_output), **rkw
    )
    assert loss.dtype == torch.float32
    assert xg.grad.dtype == x.dtype and xg.grad.shape == x.shape
    torch.testing.assert_close(loss.double(), torch.from_numpy(np.asarray(rloss)), rtol=rtol,
                               atol=atol)
    torch.testing.assert_close(xg.grad.double(), torch.from_numpy(rgrad),
                               rtol=grad_rtol or rtol, atol=grad_atol or atol)
    return loss.detach(), xg.grad


CASES = {
    "plain": {},
    "smoothing": {"label_smoothing": 0.2},
    "class_weights": {"weight": torch.linspace(0.5, 2, 7), "pos_weight": torch.linspace(3, 1, 7)},
    "sample_weights": {"weight": torch.rand(5, 1, generator=torch.Generator().manual_seed(4))},
    "focal": {"gamma_pos": 2.0, "gamma_neg": 2.0, "alpha": 0.25},
    "focal_small_gamma": {"gamma_pos": 0.5, "gamma_neg": 0.5},
    "asymmetric": {"gamma_pos": 0.0, "gamma_neg": 4.0, "clip": 0.05},
    "everything": {
        "gamma_pos": 1.0, "gamma_neg": 3.0, "clip": 0.1, "alpha": 0.3, "label_smoothing": 0.1,
        "weight": torch.rand(5, 7, generator=torch.Generator().manual_seed(5)),
        "pos_weight": torch.linspace(0.5, 2, 7), "ignore_index": -1.0,
    },
}


@pytest.mark.parametrize("case", list(CASES))
def test_options_hard_and_soft_targets(triton_backend, case):
    x = _logits(5, 7)
    t = _labels(5, 7)
    if "ignore_index" in CASES[case]:
        t[0, :3] = -1.0
    _check(x, t, **CASES[case])
    _check(x, _soft(5, 7), reduction="sum", **{k: v for k, v in CASES[case].items()
                                                 if k != "ignore_index"})


@pytest.mark.parametrize("reduction", ["none", "sum", "mean"])
def test_reductions_grad_output_and_broadcast(triton_backend, reduction):
    x = _logits(2, 3, 5)
    go = torch.randn(2, 3, 5) if reduction == "none" else torch.tensor(-1.5)
    w = torch.rand(3, 1, generator=torch.Generator().manual_seed(6))
    _check(x, _labels(2, 3, 5), grad_output=go, reduction=reduction, weight=w,
           pos_weight=torch.linspace(1, 2, 5), gamma_pos=2.0, gamma_neg=2.0)


def test_weights_needing_materialisation(triton_backend):
    # expanded strides (0, 5, 0, 1) do not coalesce below 4 dims
    x = _logits(2, 3, 4, 5)
    w = torch.rand(3, 1, 5, generator=torch.Generator().manual_seed(7))
    _check(x, _labels(2, 3, 4, 5), weight=w, gamma_pos=1.0, gamma_neg=1.0)
    assert len(tbinary.coalesce((2, 3, 4, 5), [w.expand(2, 3, 4, 5).stride()])) == 4


def test_one_dim_and_integer_and_bool_targets(triton_backend):
    x = _logits(9)
    t = torch.tensor([1, 0, -100, 1, 1, 0, -100, 0, 1])
    _check(x, t, ignore_index=-100, alpha=0.25, gamma_pos=2.0, gamma_neg=2.0)
    tb = t == 1
    xg = x.clone().requires_grad_(True)
    loss = functional.binary_cross_entropy(xg, tb, gamma=1.0)
    loss.backward()
    rloss, rgrad = refb.binary_cross_entropy(x.double().numpy(), tb.double().numpy(), gamma=1.0)
    torch.testing.assert_close(loss.double(), torch.tensor(float(rloss), dtype=torch.float64))
    torch.testing.assert_close(xg.grad.double(), torch.from_numpy(rgrad))


def test_all_masked_mean_is_zero(triton_backend):
    x = _logits(3, 4)
    t = torch.full((3, 4), -1.0)
    xg = x.clone().requires_grad_(True)
    loss = functional.binary_cross_entropy(xg, t, ignore_index=-1.0, gamma=2.0)
    loss.backward()
    assert loss.item() == 0.0 and torch.count_nonzero(xg.grad) == 0


def test_extreme_logits(triton_backend):
    x = torch.tensor([[1e4, -1e4, 30.0, -30.0, 0.0, 17.0, -17.0]])
    t = torch.tensor([[1.0, 0.0, 1.0, 0.0, 1.0, 0.0, 1.0]])
    for kw in ({}, {"gamma_pos": 0.5, "gamma_neg": 0.5}, {"gamma_neg": 4.0, "clip": 0.05},
               {"label_smoothing": 0.1, "gamma_pos": 2.0, "gamma_neg": 2.0}):
        loss, grad = _check(x, t, rtol=1e-4, atol=1e-6, **kw)
        assert torch.isfinite(loss) and torch.isfinite(grad).all()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision(triton_backend, dtype):
    x = _logits(5, 7, dtype=dtype)
    _check(x, _soft(5, 7), rtol=1e-4, atol=1e-5, grad_rtol=1e-2, grad_atol=1e-5,
           gamma_pos=2.0, gamma_neg=1.0, clip=0.05, alpha=0.25)


def test_forward_only_and_float64_fallback():
    opts = functional.make_binary_options(
        label_smoothing=0.0, gamma_pos=2.0, gamma_neg=2.0, alpha=None, clip=0.0,
        ignore_index=None,
    )
    x = _logits(3, 4)
    loss, grad = tbinary.binary_cross_entropy(BinaryCall(x, _labels(3, 4), None, None, opts, "mean", False))
    assert grad is None and loss.dtype == torch.float32
    loss64, grad64 = tbinary.binary_cross_entropy(
        BinaryCall(x.double(), _labels(3, 4).double(), None, None, opts, "mean", True)
    )
    assert loss64.dtype == torch.float64 and grad64.dtype == torch.float64
    torch.testing.assert_close(loss64.float(), loss)


_COMPILE_SCRIPT = """
from crossent.backends.triton import binary as tb
from crossent.backends.triton._common import compile_for_cuda

k = tb._binary_ce_kernel
types = {n: "i64" for n in k.arg_names}
types.update(X="*bf16", T="*fp32", W="*fp32", PW="*fp32", SCALE="*fp32", LOSS="*fp32",
             PART="*fp32", G="*bf16", M="i32", K="i32", D1="i32", n_kblocks="i32")
for n in ("ignore_index", "one_minus_eps", "half_eps", "gamma_pos", "gamma_neg", "alpha", "clip"):
    types[n] = "fp32"
flags = ["HAS_IGNORE", "SMOOTHING", "HAS_WEIGHT", "HAS_POS_WEIGHT", "HAS_ALPHA", "FOCAL",
         "ASYM_GAMMA", "CLIP", "NEED_GRAD", "STORE_LOSS"]
for on in ({"NEED_GRAD"}, set(flags)):
    cfg = {f: f in on for f in flags}
    cfg.update(BLOCK_M=8, BLOCK_K=128)
    ck = compile_for_cuda(k, types, cfg)
    assert ".entry" in ck.asm["ptx"] and ck.asm["cubin"]
print("compiled")
"""


def test_kernel_compiles_for_sm90():
    """The interpreter is lenient; lower the kernel for an H100 (sm_90), no GPU needed."""
    compile_for_sm90(_COMPILE_SCRIPT)
