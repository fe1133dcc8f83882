"""crossent as a PyTorch operator: torch.compile, torch.export, autocast, the version counter,
double backward and torch.func, for both loss families.

The compile matrix is generated: every option of the softmax family on its own, a few mixes,
every layout, both CPU paths; each compiled (inductor, fullgraph) call must give the eager
values and gradients, and the native kernel must have run inside the compiled graph.
"""

from __future__ import annotations

import itertools
import math
import re
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F

import crossent
from crossent.backends import native

F64 = torch.float64

SOFTMAX_OPTIONS: dict[str, dict[str, Any]] = {
    "default": {},
    "smoothing": {"label_smoothing": 0.1},
    "focal": {"gamma": 2.0},
    "flsd53": {"gamma": crossent.flsd53},
    "weight": {"weight": "w"},
    "ignore": {"ignore_index": 1},
    "z_loss": {"z_loss": 1e-3},
    "softcap": {"softcap": 3.0},
    "confidence_penalty": {"confidence_penalty": 0.2},
    "poly1": {"poly1": 1.0},
    "sum": {"reduction": "sum"},
    "none": {"reduction": "none"},
    "sample_weight": {"sample_weight": "sw"},
    "class_dim": {"class_dim": -1},
    "mean_denominator": {"mean_denominator": "count", "weight": "w"},
    "z_loss_weighted": {"z_loss_weighted": False, "z_loss": 1e-2, "weight": "w"},
    "focal+smoothing": {"gamma": 2.0, "label_smoothing": 0.1},
    "return_aux": {"return_aux": True, "z_loss": 1e-3, "ignore_index": 1},
    "all": {"gamma": 1.5, "label_smoothing": 0.1, "weight": "w", "z_loss": 1e-3, "poly1": 0.5,
            "softcap": 4.0, "confidence_penalty": 0.1},
}
LAYOUTS = {"(N,C)": (9, 6), "(C,)": (6,), "(N,C,d)": (3, 6, 4)}


def _kwargs(spec: dict[str, Any], C: int) -> dict[str, Any]:
    kw = dict(spec)
    if kw.get("weight") == "w":
        kw["weight"] = torch.linspace(0.5, 2.0, C)
    return kw


def _inputs(shape: tuple[int, ...], seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=gen) * 2
    C = shape[0] if len(shape) == 1 else shape[1]
    tshape = () if len(shape) == 1 else (shape[0], *shape[2:])
    y = torch.randint(0, C, tshape, generator=gen)
    return x, y


@pytest.fixture
def kernel_calls(monkeypatch: pytest.MonkeyPatch) -> dict[str, int]:
    """Counts the calls of the native kernels (the operators look them up at call time)."""
    calls = {"softmax": 0, "binary": 0}
    for name, fn in (("softmax", native.softmax_cross_entropy), ("binary", native.binary_cross_entropy)):
        def counted(*args: Any, _fn: Callable[..., Any] = fn, _name: str = name, **kw: Any) -> Any:
            calls[_name] += 1
            return _fn(*args, **kw)

        monkeypatch.setattr(native, f"{name}_cross_entropy", counted)
    return calls


@pytest.fixture(autouse=True)
def _fresh_dynamo() -> Iterator[None]:
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def _eager_and_compiled(f: Callable[..., torch.Tensor], x: torch.Tensor, *args: Any):
    a = x.clone().requires_grad_()
    b = x.clone().requires_grad_()
    la = f(a, *args)
    la.sum().backward()
    compiled = torch.compile(f, fullgraph=True, backend="inductor")
    lb = compiled(b, *args)
    lb.sum().backward()
    return la, a.grad, lb, b.grad


@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("option", list(SOFTMAX_OPTIONS))
def test_compile_fullgraph_matrix(option, layout, cpu_path, kernel_calls):
    shape = LAYOUTS[layout]
    x, y = _inputs(shape)
    kw = _kwargs(SOFTMAX_OPTIONS[option], shape[0] if len(shape) == 1 else shape[1])
    if kw.get("sample_weight") == "sw":
        kw["sample_weight"] = torch.rand(y.shape, generator=torch.Generator().manual_seed(1))
    if "class_dim" in kw:
        x = x.movedim(0 if x.ndim == 1 else 1, -1).contiguous()  # classes last, (N, d, C)

    def f(z: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        out = crossent.cross_entropy(z, t, **kw)
        if isinstance(out, tuple):  # return_aux: its (detached) values join the compared output
            loss, aux = out
            return loss * 2.0 + aux.lse.sum() + aux.z_loss.sum() + aux.accuracy + aux.entropy
        return out * 2.0

    la, ga, lb, gb = _eager_and_compiled(f, x, y)
    torch.testing.assert_close(lb, la, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(gb, ga, rtol=1e-5, atol=1e-6)
    front_door = ("weight", "reduction", "sample_weight", "class_dim", "mean_denominator",
                  "z_loss_weighted", "z_loss", "return_aux")
    covered = native.supports_softmax(x, y, crossent._options.SoftmaxOptions(
        **{k: v for k, v in kw.items() if k not in front_door}
    ))
    if cpu_path == "native" and covered and not kw.get("return_aux"):
        assert kernel_calls["softmax"] >= 2  # eager, then inside the compiled graph
    if cpu_path == "torch":
        assert kernel_calls["softmax"] == 0


@pytest.mark.parametrize("kw", [
    {}, {"gamma": 2.0, "alpha": 0.25}, {"pos_weight": "pw", "weight": "w"}, {"label_smoothing": 0.1},
    {"ignore_index": -1}, {"reduction": "none"}, {"asl": True},
], ids=lambda kw: "-".join(kw) or "default")
def test_compile_fullgraph_binary(kw, cpu_path, kernel_calls):
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(8, 5, generator=gen)
    t = (torch.rand(8, 5, generator=gen) < 0.4).float()
    kw = dict(kw)
    if kw.pop("pos_weight", None):
        kw["pos_weight"] = torch.linspace(0.5, 3.0, 5)
    if kw.get("weight") == "w":
        kw["weight"] = torch.rand(8, 1, generator=gen)
    if "ignore_index" in kw:
        t[0, :2] = -1
    loss_fn = crossent.asymmetric_loss if kw.pop("asl", False) else crossent.binary_cross_entropy

    def f(z: torch.Tensor, tt: torch.Tensor) -> torch.Tensor:
        return loss_fn(z, tt, **kw)

    la, ga, lb, gb = _eager_and_compiled(f, x, t)
    torch.testing.assert_close(lb, la)
    torch.testing.assert_close(gb, ga)
    if cpu_path == "native":
        assert kernel_calls["binary"] >= 2


def test_compiled_module_and_linear_cross_entropy():
    x, y = _inputs((16, 7))
    model = torch.nn.Sequential(torch.nn.Linear(7, 7))
    crit = crossent.nn.CrossEntropyLoss(label_smoothing=0.1)

    def step(inp: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return crit(model(inp), t)

    la, _, lb, _ = _eager_and_compiled(step, x, y)
    torch.testing.assert_close(lb, la)
    h = torch.randn(6, 5, dtype=F64, requires_grad=True)
    W = torch.randn(9, 5, dtype=F64, requires_grad=True)
    t = torch.randint(0, 9, (6,))
    ref = F.cross_entropy(h @ W.T, t)
    out = torch.compile(crossent.linear_cross_entropy)(h, W, t)
    torch.testing.assert_close(out, ref)


def test_export_round_trip(tmp_path: Path):
    class Model(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.head = torch.nn.Linear(6, 5)

        def forward(self, a: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            z = self.head(a)
            return crossent.cross_entropy(z, t, label_smoothing=0.1, gamma=2.0) + \
                crossent.sigmoid_focal_loss(z, (t[:, None] == torch.arange(5)).float())

    model = Model()
    a, t = torch.randn(8, 6), torch.randint(0, 5, (8,))
    ep = torch.export.export(model, (a, t))
    assert "crossent.softmax_ce" in ep.graph_module.code
    assert "crossent.binary_ce" in ep.graph_module.code
    path = tmp_path / "model.pt2"
    torch.export.save(ep, path)
    loaded = torch.export.load(path)
    torch.testing.assert_close(loaded.module()(a, t), model(a, t))


PUBLIC = {
    "cross_entropy": lambda z, y, m: crossent.cross_entropy(z, y, label_smoothing=0.1),
    "focal_loss": lambda z, y, m: crossent.focal_loss(z, y),
    "binary_cross_entropy": lambda z, y, m: crossent.binary_cross_entropy(z, m),
    "sigmoid_focal_loss": lambda z, y, m: crossent.sigmoid_focal_loss(z, m),
    "asymmetric_loss": lambda z, y, m: crossent.asymmetric_loss(z, m),
    "nn.CrossEntropyLoss": lambda z, y, m: crossent.nn.CrossEntropyLoss()(z, y),
    "nn.FocalLoss": lambda z, y, m: crossent.nn.FocalLoss()(z, y),
}


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("name", [*PUBLIC, "linear_cross_entropy"])
def test_autocast_every_public_function(name, dtype):
    gen = torch.Generator().manual_seed(5)
    h = torch.randn(12, 8, generator=gen)
    lin = torch.nn.Linear(8, 10)
    y = torch.randint(0, 10, (12,), generator=gen)
    multi = (y[:, None] == torch.arange(10)).float()
    with torch.autocast("cpu", dtype=dtype):
        if name == "linear_cross_entropy":
            loss = crossent.linear_cross_entropy(h, lin.weight, y, bias=lin.bias)
            ref_logits = lin(h)
            ref = F.cross_entropy(ref_logits.float(), y)
        else:
            z = lin(h)
            assert z.dtype == dtype
            loss = PUBLIC[name](z, y, multi)
            ref = PUBLIC[name](z.float(), y, multi)  # fp32 on the same rounded logits
    assert loss.dtype == torch.float32  # fp32 accumulation kept
    torch.testing.assert_close(loss, ref, rtol=2e-3, atol=2e-3)
    loss.backward()
    assert lin.weight.grad is not None and lin.weight.grad.dtype == torch.float32
    assert torch.isfinite(lin.weight.grad).all()


@pytest.mark.parametrize("backend", ["native", "torch"])
def test_inplace_backward_bumps_the_version_counter(backend):
    h = torch.randn(64, 100, requires_grad=True)
    y = torch.randint(0, 100, (64,))
    z = torch.tanh(h)  # tanh saves its output z for its backward
    loss = crossent.cross_entropy(z, y, inplace_backward=True, backend=backend)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()
    # a leaf-like input that nothing saved: the in-place gradient is exact
    x = torch.randn(8, 5)
    z = (x * 1).requires_grad_()
    yy = torch.randint(0, 5, (8,))
    leaf = x.clone().requires_grad_()
    expect = torch.autograd.grad(F.cross_entropy(leaf, yy), leaf)[0]
    crossent.cross_entropy(z, yy, inplace_backward=True, backend=backend).backward()
    torch.testing.assert_close(z.grad, expect)


SECOND_ORDER = {
    "default": {},
    "smoothing": {"label_smoothing": 0.2},
    "weight": {"weight": "w"},
    "ignore": {"ignore_index": 2},
    "z_loss": {"z_loss": 0.05},
    "sum": {"reduction": "sum"},
    "mix": {"label_smoothing": 0.1, "weight": "w", "z_loss": 0.01, "ignore_index": 0},
}


def _torch_softmax_loss(z: torch.Tensor, y: torch.Tensor, kw: dict[str, Any]) -> torch.Tensor:
    """The same loss from PyTorch's own functions (what the Hessian is checked against)."""
    kw = dict(kw)
    z_loss = kw.pop("z_loss", 0.0)
    reduction = kw.get("reduction", "mean")
    ce = F.cross_entropy(z, y, **kw)
    if not z_loss:
        return ce
    ii = kw.get("ignore_index", -100)
    w = kw.get("weight")
    valid = y != ii
    s = valid.to(z.dtype) if w is None else w[torch.where(valid, y, 0)] * valid
    zl = (z_loss * s * torch.logsumexp(z, dim=0 if z.ndim == 1 else 1).square()).sum()
    if reduction == "mean":
        zl = zl / s.sum()
    return ce + zl


@pytest.mark.parametrize("layout", ["(N,C)", "(N,C,d)"])
@pytest.mark.parametrize("option", list(SECOND_ORDER))
def test_double_backward_equals_pytorch_hessian(option, layout, cpu_path):
    shape = {"(N,C)": (5, 4), "(N,C,d)": (2, 4, 3)}[layout]
    x, y = _inputs(shape, seed=11)
    x = x.to(F64)
    kw = _kwargs(SECOND_ORDER[option], 4)
    if "weight" in kw:
        kw["weight"] = kw["weight"].to(F64)
    H = torch.autograd.functional.hessian(lambda z: crossent.cross_entropy(z, y, **kw), x)
    H_ref = torch.autograd.functional.hessian(lambda z: _torch_softmax_loss(z, y, kw), x)
    torch.testing.assert_close(H, H_ref, rtol=1e-9, atol=1e-12)
    assert H.abs().max() > 1e-3
    # a gradient penalty: grad with create_graph, then backward through it
    z = x.clone().requires_grad_()
    (g,) = torch.autograd.grad(crossent.cross_entropy(z, y, **kw), z, create_graph=True)
    g.square().sum().backward()
    z2 = x.clone().requires_grad_()
    (g2,) = torch.autograd.grad(_torch_softmax_loss(z2, y, kw), z2, create_graph=True)
    g2.square().sum().backward()
    torch.testing.assert_close(z.grad, z2.grad, rtol=1e-9, atol=1e-12)


def test_double_backward_probability_targets_and_gradcheck():
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(4, 5, dtype=F64, generator=gen, requires_grad=True)
    t = torch.softmax(torch.randn(4, 5, dtype=F64, generator=gen), 1)
    for kw in ({}, {"label_smoothing": 0.1, "weight": torch.rand(5, dtype=F64) + 0.5}, {"z_loss": 0.1}):
        assert torch.autograd.gradgradcheck(lambda z, kw=kw: crossent.cross_entropy(z, t, **kw), (x,))
    y = torch.randint(0, 5, (4,), generator=gen)
    assert torch.autograd.gradgradcheck(
        lambda z: crossent.cross_entropy(z, y, label_smoothing=0.1, reduction="none"), (x,)
    )


@pytest.mark.parametrize("option,kw", [
    ("gamma", {"gamma": 2.0}), ("gamma", {"gamma": crossent.flsd53}), ("softcap", {"softcap": 3.0}),
    ("confidence_penalty", {"confidence_penalty": 0.1}), ("poly1", {"poly1": 1.0}),
])
def test_double_backward_refuses_by_name(option, kw):
    x = torch.randn(4, 5, dtype=F64, requires_grad=True)
    y = torch.randint(0, 5, (4,))
    loss = crossent.cross_entropy(x, y, **kw)
    (g,) = torch.autograd.grad(loss, x, create_graph=False, retain_graph=True)  # first order fine
    assert torch.isfinite(g).all()
    with pytest.raises(RuntimeError, match=option):
        torch.autograd.grad(loss, x, create_graph=True)
    with pytest.raises(RuntimeError, match=option):
        torch.func.grad(lambda z: crossent.cross_entropy(z, y, **kw))(x.detach())


@pytest.mark.parametrize("kw", [{}, {"alpha": 0.3}, {"label_smoothing": 0.1}, {"ignore_index": -1}])
def test_binary_double_backward(kw):
    gen = torch.Generator().manual_seed(4)
    x = torch.randn(6, 3, dtype=F64, generator=gen)
    t = torch.rand(6, 3, dtype=F64, generator=gen)
    w, pw = torch.rand(6, 1, dtype=F64) + 0.5, torch.rand(3, dtype=F64) + 0.5
    if "ignore_index" in kw:
        t[0, 1] = -1
    assert torch.autograd.gradgradcheck(
        lambda z: crossent.binary_cross_entropy(z, t, weight=w, pos_weight=pw, **kw),
        (x.clone().requires_grad_(),),
    )
    if not kw:
        H = torch.autograd.functional.hessian(
            lambda z: crossent.binary_cross_entropy(z, t, weight=w, pos_weight=pw), x)
        H_ref = torch.autograd.functional.hessian(
            lambda z: F.binary_cross_entropy_with_logits(z, t, weight=w, pos_weight=pw), x)
        torch.testing.assert_close(H, H_ref)
    for name, loss in (("gamma", crossent.sigmoid_focal_loss), ("clip", crossent.asymmetric_loss)):
        z = x.clone().requires_grad_()
        with pytest.raises(RuntimeError, match=name):
            torch.autograd.grad(loss(z, t.clamp(0, 1)), z, create_graph=True)


def test_torch_func_transforms():
    gen = torch.Generator().manual_seed(6)
    x = torch.randn(5, 4, dtype=F64, generator=gen)
    y = torch.randint(0, 4, (5,), generator=gen)
    w = torch.rand(4, dtype=F64) + 0.5
    for kw in ({}, {"label_smoothing": 0.1, "weight": w}, {"z_loss": 0.01, "reduction": "sum"}):
        g = torch.func.grad(lambda z, kw=kw: crossent.cross_entropy(z, y, **kw))(x)
        z = x.clone().requires_grad_()
        (expect,) = torch.autograd.grad(crossent.cross_entropy(z, y, **kw), z)
        torch.testing.assert_close(g, expect)
    H = torch.func.hessian(lambda z: crossent.cross_entropy(z, y))(x)
    torch.testing.assert_close(H, torch.func.hessian(lambda z: F.cross_entropy(z, y))(x))
    batched = torch.func.vmap(lambda z: crossent.cross_entropy(z, y))(torch.stack([x, 2 * x]))
    torch.testing.assert_close(batched, torch.stack([F.cross_entropy(x, y), F.cross_entropy(2 * x, y)]))
    t = torch.rand(5, 4, dtype=F64, generator=gen)
    gb = torch.func.grad(lambda z: crossent.binary_cross_entropy(z, t))(x)
    torch.testing.assert_close(gb, torch.func.grad(lambda z: F.binary_cross_entropy_with_logits(z, t))(x))


def test_triton_kernels_index_in_int64():
    """Every Triton kernel widens its program id to int64 before it forms an offset, so that
    rows * stride cannot wrap at 2^31 (N * D or V * D past 2^31 elements)."""
    root = Path(crossent.__file__).parent / "backends" / "triton"
    for path in sorted(root.glob("*.py")):
        src = path.read_text()
        pids = re.findall(r"(\w+)\s*=\s*tl\.program_id\(", src)
        for pid in set(pids):
            for line in src.splitlines():
                uses = re.findall(rf"\b{pid}\b(\.to\(tl\.int64\))?\s*\*", line)
                for widened in uses:
                    assert widened, f"{path.name}: '{line.strip()}' multiplies {pid} in int32"
        assert not pids or "tl.int64" in src, path.name


def test_operators_pass_opcheck():
    """torch.library.opcheck: schema, fake implementation, autograd registration and
    (where traced) the AOT dispatcher agree with the real kernels."""
    x, y = _inputs((6, 5))
    x = x.requires_grad_()
    # numbers: label_smoothing, gamma, z_loss, softcap (NaN: none), confidence_penalty, poly1,
    # step_threshold (< 0: no step), step_below, step_above (crossent._ops.SOFTMAX_NUMBERS)
    numbers = [0.1, 2.0, 1e-3, math.nan, 0.0, 0.0, -1.0, 0.0, 0.0]
    args = (x, y, None, None, -100, numbers, "mean", True, "torch")
    torch.library.opcheck(torch.ops.crossent.softmax_ce.default, args)
    with_aux = (*args[:-1], "native", False, True)  # return_aux's row statistics as a third output
    torch.library.opcheck(torch.ops.crossent.softmax_ce.default, with_aux)
    # the other numbers each on their own: softcap, confidence penalty, Poly-1
    for i, value in ((3, 5.0), (4, 0.3), (5, 1.0)):
        one = [*numbers[:i], value, *numbers[i + 1:]]
        torch.library.opcheck(torch.ops.crossent.softmax_ce.default, (*args[:5], one, *args[6:]))
    # a step schedule (FLSD-53) as numbers, evaluated by the native kernel (the torch-op path
    # evaluates the same step as a schedule)
    for backend in ("native", "torch"):
        step = [0.1, 0.0, 1e-3, math.nan, 0.0, 0.0, 0.2, 5.0, 3.0]
        torch.library.opcheck(torch.ops.crossent.softmax_ce.default, (*args[:5], step, "mean", True, backend))
    t = torch.rand(6, 5)
    # label_smoothing, gamma_pos, gamma_neg, alpha, clip, ignore_index (NaN: none), poly1
    bnumbers = [0.0, 2.0, 2.0, 0.25, 0.0, math.nan, 0.0]
    bargs = (x, t, None, None, bnumbers, "mean", True, "torch")
    torch.library.opcheck(torch.ops.crossent.binary_ce.default, bargs)
    ignored = [0.0, 0.0, 0.0, math.nan, 0.0, 1.0, 0.5]  # ignore_index 1, Poly-1
    bignored = (x, t.round(), None, None, ignored, "sum", True, "torch")
    torch.library.opcheck(torch.ops.crossent.binary_ce.default, bignored)
    torch.library.opcheck(torch.ops.crossent.true_class_prob.default, (x.detach(), y, -100, None, "torch"))
    torch.library.opcheck(torch.ops.crossent.scaled_grad.default, (torch.randn(6, 5), torch.tensor(2.0)))
    # The held-gradient operator returns a fresh handle on every call, so its outputs differ
    # between eager and traced runs by design: the schema, fake and autograd checks apply.
    held = (x, y, None, None, -100, numbers, "mean", True, "native", True)
    torch.library.opcheck(torch.ops.crossent.softmax_ce.default, held,
                          test_utils=("test_schema", "test_autograd_registration", "test_faketensor"))


def test_option_grid_is_exhaustive():
    """The compile matrix names every keyword option of cross_entropy (a new option must join it)."""
    import inspect

    params = set(inspect.signature(crossent.cross_entropy).parameters) - {
        "logits", "target", "inplace_backward", "backend"
    }
    named = set(itertools.chain.from_iterable(SOFTMAX_OPTIONS.values()))
    assert params == named, params ^ named


def test_compiled_loss_hands_its_gradient_over():
    """Under torch.compile the fused gradient waits in a side table until the backward takes it
    (no extra pass over it); nothing stays behind, with or without a backward."""
    import gc

    from crossent import _ops

    x, y = _inputs((16, 9))
    f = torch.compile(lambda z, t: crossent.cross_entropy(z, t, label_smoothing=0.1), fullgraph=True)
    before = len(_ops._HELD)
    for go in (1.0, 0.5):
        a = x.clone().requires_grad_()
        loss = f(a, y)
        assert len(_ops._HELD) == before + 1
        (loss * go).backward()
        assert len(_ops._HELD) == before
        b = x.clone().requires_grad_()
        (crossent.cross_entropy(b, y, label_smoothing=0.1) * go).backward()
        torch.testing.assert_close(a.grad, b.grad)
    loss = f(x.clone().requires_grad_(), y)  # a forward without a backward
    del loss
    gc.collect()
    assert len(_ops._HELD) == before
    with torch.no_grad():
        f(x, y)
    assert len(_ops._HELD) == before


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("bias", [False, True])
def test_linear_autocast_gradients_match_unfused_autocast(dtype, bias):
    """Under autocast the chunked path computes in the autocast dtype, as ``h @ W.T`` would, and
    returns each gradient in its leaf's dtype (fp32 here), accumulated in fp32."""
    gen = torch.Generator().manual_seed(21)
    h = torch.randn(24, 16, generator=gen).requires_grad_()
    W = (torch.randn(50, 16, generator=gen) * 0.3).requires_grad_()
    b = torch.randn(50, generator=gen).requires_grad_() if bias else None
    y = torch.randint(0, 50, (24,), generator=gen)
    leaves = [t for t in (h, W, b) if t is not None]
    with torch.autocast("cpu", dtype=dtype):
        ours = crossent.linear_cross_entropy(h, W, y, bias=b, label_smoothing=0.1, chunk_size=7)
        ref = F.cross_entropy(F.linear(h, W, b).float(), y, label_smoothing=0.1)
    g_ours = torch.autograd.grad(ours, leaves)
    g_ref = torch.autograd.grad(ref, leaves)
    assert ours.dtype == torch.float32
    torch.testing.assert_close(ours, ref, rtol=1e-3, atol=1e-3)
    for a, r in zip(g_ours, g_ref, strict=True):
        assert a.dtype == torch.float32
        torch.testing.assert_close(a, r, rtol=2e-2, atol=2e-3)
