"""Triton softmax kernels under TRITON_INTERPRET=1 on the CPU, against ``crossent.reference``.

The variable must be set before the module defining the kernels is imported (``triton.jit``
reads it when it decorates); if another test file imported that module first, it is reloaded
here. The public ``crossent.cross_entropy`` is routed to the Triton backend by patching the
dispatcher, so the autograd node and ``grad_output`` scaling are covered too. Shapes are tiny
and odd: C = 37 runs as three ragged chunks of 16 ("chunked") or one padded chunk of 64 with
several rows per program ("one_chunk").
"""

from __future__ import annotations

import os

os.environ["TRITON_INTERPRET"] = "1"

import textwrap

import numpy as np
import pytest
import torch

pytest.importorskip("triton")

import crossent
import crossent.backends.triton._common as tcommon
from _helpers import softmax_reference
from _triton_setup import compile_for_sm90, interpreted_module, interpreter_guard, triton_backend_fixture
from crossent import functional
from crossent._options import SoftmaxCall

IN_PROCESS, tsoftmax = interpreted_module("softmax", "_softmax_ce_kernel")
_interpreter_in_process, test_rerun_in_subprocess = interpreter_guard(IN_PROCESS, __file__)

# the interpreter runs the kernels in NumPy, which warns where the kernels rely on IEEE
# inf/nan arithmetic that a select then discards (log(0) in the focal factor of q = 1, ...)
pytestmark = pytest.mark.filterwarnings("ignore:.*encountered in:RuntimeWarning")

C = 37
MODES = {"chunked": {"block_c": 16, "block_r": 1}, "one_chunk": {"block_c": 64, "block_r": 4}}
# routes crossent.cross_entropy to the Triton kernels with the mode's block sizes
triton_backend = triton_backend_fixture(tsoftmax, "softmax_cross_entropy", MODES)


def _logits(*shape, scale=3.0, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=g, dtype=torch.float64) * scale).to(dtype)


def _index_target(n, ignore_row=True, seed=1):
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, C, (n,), generator=g)
    y[0] = 3
    if ignore_row and n > 1:
        y[1] = -100
    return y


def _prob_target(*shape, seed=2):
    g = torch.Generator().manual_seed(seed)
    return torch.softmax(torch.randn(*shape, generator=g) * 2, dim=1)


def _run(x, t, grad_output=None, **kw):
    xg = x.detach().clone().requires_grad_(True)
    loss = crossent.cross_entropy(xg, t, **kw)
    go = torch.ones_like(loss) if grad_output is None else grad_output.to(loss.dtype)
    loss.backward(go)
    return loss.detach(), xg.grad


def _check(x, t, grad_output=None, rtol=2e-5, atol=2e-6, grad_rtol=None, grad_atol=None, **kw):
    loss, grad = _run(x, t, grad_output, **kw)
    rloss, rgrad = softmax_reference(x, t, grad_output, **kw)
    assert loss.dtype == torch.float32
    assert grad.dtype == x.dtype and grad.shape == x.shape
    torch.testing.assert_close(loss.double(), rloss, rtol=rtol, atol=atol)
    torch.testing.assert_close(
        grad.double(), rgrad, rtol=grad_rtol or rtol, atol=grad_atol or atol
    )
    return loss, grad


WEIGHT = torch.linspace(0.25, 2.0, C)
#: every option at once
EVERYTHING = {
    "weight": WEIGHT, "label_smoothing": 0.1, "gamma": 1.5, "z_loss": 1e-3,
    "softcap": 5.0, "confidence_penalty": 0.2, "poly1": 0.7,
}

INDEX_CASES = {
    "plain": {},
    "weight": {"weight": WEIGHT},
    "smoothing": {"label_smoothing": 0.1},
    "smoothing_weight": {"label_smoothing": 0.2, "weight": WEIGHT},
    "focal": {"gamma": 2.0},
    "focal_small_gamma": {"gamma": 0.5, "weight": WEIGHT},
    "focal_smoothing": {"gamma": 2.0, "label_smoothing": 0.1, "weight": WEIGHT},
    "schedule": {"gamma": crossent.flsd53},
    "schedule_smoothing": {"gamma": crossent.flsd53, "label_smoothing": 0.1},
    "z_loss": {"z_loss": 1e-2, "weight": WEIGHT},
    "softcap": {"softcap": 4.0},
    "confidence_penalty": {"confidence_penalty": 0.3},
    "poly1": {"poly1": 1.5},
    "poly1_smoothing": {"poly1": -0.5, "label_smoothing": 0.1},
    "everything": EVERYTHING,
}

PROB_CASES = {
    "plain": {},
    "smoothing_weight": {"label_smoothing": 0.1, "weight": WEIGHT},
    "focal": {"gamma": 2.0},
    "schedule_weight": {"gamma": crossent.flsd53, "weight": WEIGHT, "label_smoothing": 0.05},
    "regularisers": {"z_loss": 1e-2, "softcap": 3.0, "confidence_penalty": 0.1, "poly1": 1.0},
    "everything": dict(EVERYTHING, gamma=0.5),
}


@pytest.mark.parametrize(
    ("kind", "case"), [("index", c) for c in INDEX_CASES] + [("prob", c) for c in PROB_CASES]
)
def test_index_and_probability_targets(triton_backend, kind, case):
    """Every case of INDEX_CASES on 5 rows of class indices, of PROB_CASES on 3 rows of
    probabilities."""
    if kind == "index":
        x, t, kw = _logits(5, C), _index_target(5), INDEX_CASES[case]
    else:
        x, t, kw = _logits(3, C), _prob_target(3, C), PROB_CASES[case]
    _check(x, t, **kw)


@pytest.mark.parametrize("reduction", ["none", "sum", "mean"])
def test_kdim_reductions_and_grad_output(triton_backend, reduction):
    x = _logits(2, C, 3)
    y = torch.randint(0, C, (2, 3), generator=torch.Generator().manual_seed(3))
    y[1, 0] = -100
    go = torch.randn(2, 3) if reduction == "none" else torch.tensor(0.75)
    kw = {"reduction": reduction, "weight": WEIGHT, "label_smoothing": 0.1, "gamma": 2.0}
    _check(x, y, grad_output=go, **kw)
    _check(x, _prob_target(2, C, 3), grad_output=go, reduction=reduction, poly1=0.5)


def test_one_dim_logits(triton_backend):
    x = _logits(C)
    _check(x, torch.tensor(7), gamma=2.0, label_smoothing=0.1)
    _check(x, torch.tensor(7), reduction="none", grad_output=torch.tensor(-2.0), z_loss=1e-2)
    _check(x, _prob_target(1, C)[0], confidence_penalty=0.2)


def test_non_contiguous_logits(triton_backend):
    x = _logits(C, 4).t()  # class stride 4, row stride 1
    _check(x, _index_target(4), label_smoothing=0.1, weight=WEIGHT)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision(triton_backend, dtype):
    x = _logits(3, C, dtype=dtype)
    kw = {"label_smoothing": 0.1, "gamma": 2.0, "z_loss": 1e-3}
    # the reference sees the same rounded logits; the gradient is rounded once to `dtype`
    _check(x, _index_target(3), rtol=1e-4, atol=1e-5, grad_rtol=1e-2, grad_atol=1e-4, **kw)


def test_all_rows_ignored(triton_backend):
    x = _logits(3, C)
    y = torch.full((3,), -100)
    for kw in ({}, {"weight": WEIGHT, "label_smoothing": 0.1, "gamma": 2.0, "poly1": 1.0}):
        loss, grad = _run(x, y, **kw)
        assert loss.item() == 0.0 and torch.count_nonzero(grad) == 0
    zero_w = torch.zeros(C)
    loss, grad = _run(x, _index_target(3), weight=zero_w)
    assert loss.item() == 0.0 and torch.count_nonzero(grad) == 0


def test_extreme_logits(triton_backend):
    x = _logits(3, C, scale=1.0)
    x[0, 3] = 1e4  # q_y = 1 exactly in fp32
    x[2, :] = -1e4
    x[2, 5] = 50.0
    y = torch.tensor([3, 5, 0])
    for kw in ({}, {"gamma": 0.5}, {"gamma": 2.0, "label_smoothing": 0.1}, {"z_loss": 1e-4}):
        loss, grad = _check(x, y, rtol=1e-4, atol=1e-5, **kw)
        assert torch.isfinite(loss) and torch.isfinite(grad).all()
    _check(x, y, softcap=30.0, rtol=1e-4, atol=1e-5)


def test_inplace_backward_and_forward_only():
    opts = functional.make_softmax_options(
        ignore_index=-100, label_smoothing=0.1, gamma=2.0, z_loss=0.0, softcap=None,
        confidence_penalty=0.1, poly1=0.0,
    )
    x = _logits(3, C)
    y = _index_target(3)
    loss, grad = tsoftmax.softmax_cross_entropy(SoftmaxCall(x, y, None, opts, "mean", True), block_c=16)
    buf = x.clone()
    loss2, grad2 = tsoftmax.softmax_cross_entropy(SoftmaxCall(buf, y, None, opts, "mean", True, True),
                                                  block_c=16)
    assert grad2.data_ptr() == buf.data_ptr()
    torch.testing.assert_close(grad2, grad, rtol=0, atol=0)
    torch.testing.assert_close(loss2, loss, rtol=0, atol=0)
    loss3, grad3 = tsoftmax.softmax_cross_entropy(SoftmaxCall(x, y, None, opts, "sum", False))
    assert grad3 is None
    torch.testing.assert_close(loss3, loss * 2, rtol=1e-6, atol=1e-6)  # 2 non-ignored rows


def test_float64_falls_back_to_torch():
    opts = functional.make_softmax_options(
        ignore_index=-100, label_smoothing=0.0, gamma=0.0, z_loss=0.0, softcap=None,
        confidence_penalty=0.0, poly1=0.0,
    )
    x = _logits(3, C, dtype=torch.float64)
    loss, grad = tsoftmax.softmax_cross_entropy(SoftmaxCall(x, _index_target(3), None, opts, "mean", True))
    assert loss.dtype == torch.float64 and grad.dtype == torch.float64


def test_launch_config():
    assert tsoftmax.launch_config(128)[:2] == (128, 16)
    assert tsoftmax.launch_config(256)[:2] == (256, 8)
    assert tsoftmax.launch_config(50_000)[:2] == (tsoftmax.CHUNK, 1)
    with pytest.raises(ValueError, match="power of 2"):
        tsoftmax.launch_config(37, block_c=24)


def test_chunked_multi_row_programs():
    """Ragged rows and ragged chunks in one program (BLOCK_R = 2, BLOCK_C = 16, N = 5)."""
    x = _logits(5, C)
    y = _index_target(5)
    for kw in ({"weight": WEIGHT, "label_smoothing": 0.1, "confidence_penalty": 0.1},
               {"gamma": 2.0, "label_smoothing": 0.1, "poly1": 1.0, "softcap": 4.0}):
        opts = functional.make_softmax_options(
            ignore_index=-100, label_smoothing=kw.get("label_smoothing", 0.0),
            gamma=kw.get("gamma", 0.0), z_loss=0.0, softcap=kw.get("softcap"),
            confidence_penalty=kw.get("confidence_penalty", 0.0), poly1=kw.get("poly1", 0.0),
        )
        w = kw.get("weight")
        loss, grad = tsoftmax.softmax_cross_entropy(SoftmaxCall(x, y, w, opts, "none", True),
                                                    block_c=16, block_r=2)
        rkw = {k: v for k, v in kw.items() if k != "weight"}
        rloss, rgrad = softmax_reference(x, y, reduction="none", weight=w, **rkw)
        torch.testing.assert_close(loss.double(), rloss, rtol=2e-5, atol=2e-6)
        torch.testing.assert_close(grad.double(), rgrad, rtol=2e-5, atol=2e-6)


_COMPILE_SCRIPT = textwrap.dedent(
    """
    from crossent.backends.triton import softmax as sm
    from crossent.backends.triton._common import compile_for_cuda

    k = sm._softmax_ce_kernel
    types = {n: "i64" if n.startswith("stride") else "i32" for n in k.arg_names}
    types.update(X="*bf16", T="*i64", W="*fp32", GAMMA="*fp32", SCALE="*fp32", LOSS="*fp32",
                 G="*bf16", STATS="*fp32")
    for n in ("cf", "one_minus_eps", "uniform", "gamma", "z_loss", "cap", "beta", "poly1"):
        types[n] = "fp32"
    flags = ["PROB_TARGET", "HAS_WEIGHT", "SMOOTHING", "FOCAL", "SCHEDULE", "DENSE", "Z_LOSS",
             "SOFTCAP", "CP", "POLY1", "NEED_GRAD", "AUX", "ONE_CHUNK"]
    configs = [
        (dict(NEED_GRAD=True, ONE_CHUNK=True), 16, 128, 4, "*i64"),
        (dict(NEED_GRAD=True, HAS_WEIGHT=True, SMOOTHING=True, FOCAL=True, Z_LOSS=True,
              SOFTCAP=True, CP=True, POLY1=True, AUX=True), 1, 4096, 16, "*i64"),
        (dict(NEED_GRAD=True, PROB_TARGET=True, FOCAL=True, SCHEDULE=True, DENSE=True,
              SMOOTHING=True, POLY1=True, CP=True, AUX=True, ONE_CHUNK=True), 8, 256, 8, "*bf16"),
    ]
    for on, br, bc, warps, ttype in configs:
        cfg = {f: f in on for f in flags}
        # as Triton specialises a 2-D launch: S, the spatial and class strides equal 1
        cfg.update(BLOCK_R=br, BLOCK_C=bc, S=1, stride_xs=1, stride_xc=1, stride_gs=1,
                   stride_gc=1)
        ck = compile_for_cuda(k, dict(types, T=ttype), cfg, num_warps=warps)
        assert ".entry" in ck.asm["ptx"] and ck.asm["cubin"], on
    kp = sm._softmax_ptrue_kernel
    types = {n: "i64" if n.startswith("stride") else "i32" for n in kp.arg_names}
    types.update(X="*fp16", T="*fp32", P="*fp32", cap="fp32")
    compile_for_cuda(kp, types, dict(PROB_TARGET=True, SOFTCAP=True, BLOCK_R=1, BLOCK_C=4096))
    print("compiled")
    """
)


def test_kernels_compile_for_sm90():
    """The interpreter is lenient; lower the kernels for an H100 (sm_90), no GPU needed."""
    compile_for_sm90(_COMPILE_SCRIPT)


def test_math_helpers_relative_accuracy():
    """expm1 / tanh / log1p of _common against float64, over 1e-8 .. 80 in magnitude."""
    import triton
    import triton.language as tl

    @triton.jit
    def _helpers(X, E, TH, L, n, BLOCK: tl.constexpr):
        offs = tl.arange(0, BLOCK)
        mask = offs < n
        x = tl.load(X + offs, mask=mask, other=0.0)
        tl.store(E + offs, tcommon.expm1(x), mask=mask)
        tl.store(TH + offs, tcommon.tanh(x), mask=mask)
        tl.store(L + offs, tcommon.log1p(tl.abs(x)), mask=mask)

    mag = torch.logspace(-8, np.log10(80.0), 100, dtype=torch.float64)
    x = torch.cat([mag, -mag]).float()
    e, th, lp = (torch.empty_like(x) for _ in range(3))
    _helpers[(1,)](x, e, th, lp, x.numel(), BLOCK=256)
    xd = x.double()
    keep = xd > -80  # expm1 of large negatives: relative accuracy of -1 is trivial
    torch.testing.assert_close(e[keep].double(), torch.expm1(xd[keep]), rtol=4e-7, atol=0)
    torch.testing.assert_close(th.double(), torch.tanh(xd), rtol=4e-7, atol=0)
    torch.testing.assert_close(lp.double(), torch.log1p(xd.abs()), rtol=4e-7, atol=0)


@pytest.mark.parametrize("target_kind", ["index", "prob"])
@pytest.mark.parametrize("layout", ["2d", "spatial"])
@pytest.mark.parametrize(
    "opts", [{}, {"softcap": 2.0, "z_loss": 1e-2}, {"gamma": 2.0, "label_smoothing": 0.1}],
    ids=["default", "softcap+z", "focal+smoothing"],
)
def test_return_aux_in_the_kernel(triton_backend, target_kind, layout, opts):
    """return_aux's statistics come from the kernel's pass 1 (online argmax across chunks, ties
    to the first index) and equal the torch-op path's."""
    shape = (6, C) if layout == "2d" else (3, C, 2)
    x = _logits(*shape)
    x[0, 5] = x[0, 20] = x[0].max() + 1.0  # a tie across chunks: the first one wins
    if target_kind == "index":
        t = _index_target(shape[0]) if layout == "2d" else torch.randint(0, C, (3, 2))
        t.view(-1)[0] = 5
    else:
        t = _prob_target(*shape)
    _, aux = crossent.cross_entropy(x, t, return_aux=True, **opts)
    assert len(triton_backend) == 1
    # by hand, from the materialised (soft-capped) logits, rows last
    u = x.double().movedim(1, -1).reshape(-1, C)
    if "softcap" in opts:
        u = torch.tanh(u / opts["softcap"]) * opts["softcap"]
    lse = torch.logsumexp(u, 1)
    H = -(torch.softmax(u, 1) * torch.log_softmax(u, 1)).sum(1)
    if target_kind == "index":
        y = t.reshape(-1)
        valid = y != -100
    else:
        y = t.movedim(1, -1).reshape(-1, C).argmax(1)
        valid = torch.ones_like(lse, dtype=torch.bool)
    hit = (u.argmax(1) == y) & valid
    sample_shape = (shape[0], *shape[2:])
    torch.testing.assert_close(aux.lse.double(), torch.where(valid, lse, 0.0).reshape(sample_shape),
                               rtol=2e-5, atol=2e-6)
    torch.testing.assert_close(aux.entropy.double(), H[valid].mean(), rtol=2e-5, atol=2e-6)
    torch.testing.assert_close(aux.accuracy.double(), (hit.sum() / valid.sum()).double(), rtol=0, atol=1e-7)
    if "z_loss" in opts:
        want_z = opts["z_loss"] * (lse[valid] ** 2).sum() / valid.sum()
        torch.testing.assert_close(aux.z_loss.double(), want_z, rtol=2e-5, atol=2e-6)
