"""The capability matrix: every option (alone and in pairs) x target kind x layout x backend.

Each backend declares what it computes as an allow-list (``crossent.backends.native``,
``crossent.backends.triton``). Every call must either run on the backend it was routed to and give the
float64 reference's loss and gradient, or fall back to the torch-op path and give them there:
an option a backend does not list is never dropped.
"""

from __future__ import annotations

import itertools
import math
from typing import Any

import numpy as np
import pytest
import torch

import crossent
from crossent import functional
from crossent._options import BINARY_ALL, SOFTMAX_ALL, BinaryOptions, SoftmaxOptions, covers
from crossent.backends import native
from crossent.backends import triton as _triton
from crossent.reference import binary as RB
from crossent.reference import softmax as RS

C = 5
VALUES: dict[str, Any] = {
    "ignore_index": 2,
    "label_smoothing": 0.15,
    "gamma": 1.5,
    "gamma_schedule": crossent.flsd53,
    "z_loss": 0.02,
    "softcap": 2.5,
    "confidence_penalty": 0.1,
    "poly1": 0.7,
    "weight": np.linspace(0.5, 1.5, C),
}
LAYOUTS = {"(N,C)": (6, C), "(C,)": (C,), "(N,C,d)": (2, C, 3)}


def _option_sets() -> list[tuple[str, ...]]:
    names = sorted(VALUES)
    assert set(names) == SOFTMAX_ALL, "every option of SoftmaxOptions must be in the matrix"
    pairs = [p for p in itertools.combinations(names, 2) if set(p) != {"gamma", "gamma_schedule"}]
    return [(), *((n,) for n in names), *pairs]


def _kwargs(names: tuple[str, ...]) -> dict[str, Any]:
    kw: dict[str, Any] = {}
    for n in names:
        kw["gamma" if n == "gamma_schedule" else n] = VALUES[n]
    return kw


def _inputs(shape: tuple[int, ...], prob: bool) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(sum(shape))
    x = torch.randn(shape, generator=gen, dtype=torch.float64) * 2
    if prob:
        t = torch.randn(shape, generator=gen, dtype=torch.float64)
        return x, torch.softmax(t, 0 if len(shape) == 1 else 1)
    tshape = () if len(shape) == 1 else (shape[0], *shape[2:])
    y = torch.randint(0, C, tshape, generator=gen)
    if y.ndim:
        y.view(-1)[0] = 2  # an ignored row when ignore_index=2
    return x, y


def _count_cpu_kernel_calls(monkeypatch: pytest.MonkeyPatch, torch_module: Any, entry: str) -> dict[str, int]:
    """Counts the calls of ``entry`` on the native module and on ``torch_module`` (the torch-op
    path): the operators look the kernels up at call time."""
    calls = {"native": 0, "torch": 0}
    for name, module in (("native", native), ("torch", torch_module)):
        fn = getattr(module, entry)

        def counted(*a: Any, _fn: Any = fn, _n: str = name, **k: Any) -> Any:
            calls[_n] += 1
            return _fn(*a, **k)

        monkeypatch.setattr(module, entry, counted)
    return calls


@pytest.fixture
def routed(monkeypatch: pytest.MonkeyPatch) -> dict[str, int]:
    """Counts which softmax kernel ran."""
    from crossent.backends.torch_ops import softmax as torch_softmax

    return _count_cpu_kernel_calls(monkeypatch, torch_softmax, "softmax_cross_entropy")


def _check_against_reference(x: torch.Tensor, t: torch.Tensor, kw: dict[str, Any], **call: Any) -> None:
    tkw = {k: (torch.as_tensor(v) if isinstance(v, np.ndarray) else v) for k, v in kw.items()}
    xg = x.clone().requires_grad_()
    loss = crossent.cross_entropy(xg, t, **tkw, **call)
    loss.backward()
    rkw = {k: (RS.flsd53 if v is crossent.flsd53 else v) for k, v in kw.items()}
    ref_loss, ref_grad = RS.cross_entropy(x.numpy(), t.numpy(), **rkw)
    np.testing.assert_allclose(loss.detach().numpy(), ref_loss, rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(xg.grad.numpy(), ref_grad, rtol=1e-8, atol=1e-11)


@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("target_kind", ["index", "prob"])
@pytest.mark.parametrize("names", _option_sets(), ids=lambda n: "+".join(n) or "none")
def test_cpu_backends_compute_or_fall_back(names, target_kind, layout, routed):
    if target_kind == "prob" and "ignore_index" in names:
        pytest.skip("ignore_index applies to class indices only")
    x, t = _inputs(LAYOUTS[layout], target_kind == "prob")
    kw = _kwargs(names)
    opts = SoftmaxOptions(**{k: v for k, v in kw.items() if k != "weight"})
    w = torch.as_tensor(kw["weight"]) if "weight" in kw else None
    expect_native = native.available() and native.supports_softmax(x, t, opts, w)
    used = opts.active() | ({"weight"} if w is not None else set())
    assert used == frozenset(names)
    # the allow-list alone decides on these contiguous float64 inputs
    assert expect_native == covers(native.SOFTMAX_CAPABILITIES[target_kind], used) or (
        layout == "(N,C,d)" and target_kind == "prob"
    )
    _check_against_reference(x, t, kw)  # backend="auto"
    assert routed["native"] == int(expect_native)
    assert routed["torch"] == int(not expect_native)
    if expect_native:
        _check_against_reference(x, t, kw, backend="native")
    else:
        with pytest.raises(ValueError, match="does not cover"):
            _check_against_reference(x, t, kw, backend="native")
    _check_against_reference(x, t, kw, backend="torch")


@pytest.mark.parametrize("names", _option_sets(), ids=lambda n: "+".join(n) or "none")
def test_triton_computes_or_falls_back(names, monkeypatch):
    """The Triton softmax kernel under the interpreter (CPU tensors), routed as on CUDA."""
    pytest.importorskip("triton")
    from crossent.backends.triton import softmax as tsoftmax

    calls: list[int] = []
    original = tsoftmax.softmax_cross_entropy

    def counted(*a: Any, **k: Any) -> Any:
        calls.append(1)
        return original(*a, **k)

    monkeypatch.setattr(functional, "_pick_backend", lambda logits, backend: "triton")
    monkeypatch.setattr(tsoftmax, "softmax_cross_entropy", counted)
    x, t = _inputs((6, C), False)
    kw = _kwargs(names)
    xf = x.float()
    tkw = {k: (torch.as_tensor(v) if isinstance(v, np.ndarray) else v) for k, v in kw.items()}
    xg = xf.clone().requires_grad_()
    loss = crossent.cross_entropy(xg, t, **tkw)
    loss.backward()
    rkw = {k: (RS.flsd53 if v is crossent.flsd53 else v) for k, v in kw.items()}
    ref_loss, ref_grad = RS.cross_entropy(xf.double().numpy(), t.numpy(), **rkw)
    np.testing.assert_allclose(loss.detach().numpy(), ref_loss, rtol=2e-5, atol=1e-6)
    np.testing.assert_allclose(xg.grad.numpy(), ref_grad, rtol=2e-4, atol=2e-6)
    used = frozenset(names)
    assert bool(calls) == covers(_triton.SOFTMAX_CAPABILITIES, used)


BINARY_VALUES: dict[str, Any] = {
    "label_smoothing": 0.1, "gamma_pos": 1.0, "gamma_neg": 3.0, "alpha": 0.3, "clip": 0.05,
    "ignore_index": -1.0, "weight": np.linspace(0.5, 1.5, C), "pos_weight": np.linspace(2.0, 0.5, C),
    "poly1": -0.6, "detach_focal_weight": True,
}


def _binary_sets() -> list[tuple[str, ...]]:
    names = sorted(BINARY_VALUES)
    assert set(names) == BINARY_ALL, "every option of BinaryOptions must be in the matrix"
    return [(), *((n,) for n in names), *itertools.combinations(names, 2)]


@pytest.fixture
def binary_routed(monkeypatch: pytest.MonkeyPatch) -> dict[str, int]:
    """Counts which sigmoid kernel ran."""
    from crossent.backends.torch_ops import binary as torch_binary

    return _count_cpu_kernel_calls(monkeypatch, torch_binary, "binary_cross_entropy")


@pytest.mark.parametrize("names", _binary_sets(), ids=lambda n: "+".join(n) or "none")
@pytest.mark.parametrize("backend", ["auto", "native", "torch"])
def test_binary_backends_compute_or_fall_back(names, backend, binary_routed):
    gen = torch.Generator().manual_seed(9)
    x = torch.randn(6, C, generator=gen, dtype=torch.float64) * 2
    t = torch.rand(6, C, generator=gen, dtype=torch.float64)
    kw = {n: BINARY_VALUES[n] for n in names}
    if "ignore_index" in kw:
        t[0, 1] = -1.0
    opts = BinaryOptions(**{k: v for k, v in kw.items() if k not in ("weight", "pos_weight")})
    assert opts.active() | {n for n in ("weight", "pos_weight") if n in kw} == frozenset(names)
    tkw = {k: (torch.as_tensor(v) if isinstance(v, np.ndarray) else v) for k, v in kw.items()}
    xg = x.clone().requires_grad_()
    if backend == "native" and not native.available():
        pytest.skip("no native kernels")
    w, pw = (torch.as_tensor(kw[n]) if n in kw else None for n in ("weight", "pos_weight"))
    expect_native = native.available() and native.supports_binary(x, t, w, pw, opts)
    assert expect_native == (native.available() and covers(native.BINARY_CAPABILITIES, frozenset(names)))
    # the native kernel computes every option but these two
    assert expect_native == (native.available() and not {"poly1", "detach_focal_weight"} & set(names))
    call = dict(
        gamma_pos=tkw.pop("gamma_pos", 0.0), gamma_neg=tkw.pop("gamma_neg", 0.0),
        clip=tkw.pop("clip", 0.0), backend=backend, **tkw,
    )
    if backend == "native" and not expect_native:
        with pytest.raises(ValueError, match="does not cover"):
            crossent.asymmetric_loss(xg, t, **call)
        return
    loss = crossent.asymmetric_loss(xg, t, **call)
    loss.backward()
    ran_native = backend != "torch" and expect_native
    assert binary_routed == {"native": int(ran_native), "torch": int(not ran_native)}
    rest = {k: v for k, v in kw.items() if k not in ("gamma_pos", "gamma_neg", "clip")}
    ref_loss, ref_grad = RB.asymmetric_loss(
        x.numpy(), t.numpy(), gamma_pos=kw.get("gamma_pos", 0.0), gamma_neg=kw.get("gamma_neg", 0.0),
        clip=kw.get("clip", 0.0), **rest,
    )
    np.testing.assert_allclose(loss.detach().numpy(), ref_loss, rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(xg.grad.numpy(), ref_grad, rtol=1e-8, atol=1e-11)


@pytest.mark.parametrize(
    "names", [("poly1",), ("detach_focal_weight",), ("clip", "detach_focal_weight", "gamma_neg", "poly1")],
    ids="+".join,
)
def test_binary_triton_leaves_poly1_and_detach_to_the_torch_path(names, monkeypatch):
    """Routed as on CUDA, a call the Triton allow-list does not cover runs on the torch-op path
    ("auto"), a forced "triton" raises, and the operator called directly with backend "triton"
    does not hand it to the kernel either."""
    pytest.importorskip("triton")
    from crossent.backends.triton import binary as tbinary

    assert not covers(_triton.BINARY_CAPABILITIES, frozenset(names))
    assert covers(_triton.BINARY_CAPABILITIES, BINARY_ALL - {"poly1", "detach_focal_weight"})
    calls: list[int] = []
    monkeypatch.setattr(tbinary, "binary_cross_entropy", lambda *a, **k: calls.append(1))
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(6, C, generator=gen, dtype=torch.float64) * 2
    t = torch.rand(6, C, generator=gen, dtype=torch.float64)
    kw = {n: BINARY_VALUES[n] for n in names}
    call = dict(gamma_pos=0.0, gamma_neg=kw.pop("gamma_neg", 0.0), clip=kw.pop("clip", 0.0), **kw)
    ref_loss, ref_grad = RB.asymmetric_loss(x.numpy(), t.numpy(), **call)
    monkeypatch.setattr(functional, "_pick_backend", lambda logits, backend: "triton")
    xg = x.clone().requires_grad_()
    loss = crossent.asymmetric_loss(xg, t, **call)
    loss.backward()
    np.testing.assert_allclose(loss.detach().numpy(), ref_loss, rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(xg.grad.numpy(), ref_grad, rtol=1e-8, atol=1e-11)
    with pytest.raises(ValueError, match="does not cover"):
        crossent.asymmetric_loss(x, t, backend="triton", **call)
    numbers = [0.0, 0.0, call["gamma_neg"], math.nan, call["clip"], math.nan, kw.get("poly1", 0.0)]
    direct, _ = torch.ops.crossent.binary_ce(
        x, t, None, None, numbers, "mean", False, "triton", kw.get("detach_focal_weight", False),
    )
    np.testing.assert_allclose(direct.numpy(), ref_loss, rtol=1e-9, atol=1e-12)
    assert not calls
