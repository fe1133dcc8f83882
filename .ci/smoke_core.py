"""Smoke test of a core-only install of crossent (numpy + torch, no extras).

Imports crossent and runs every loss (forward and backward, against PyTorch where the two meet),
every module, the divergences, the imbalance helpers and the calibration metrics, then checks
that a feature needing an extra fails with one line naming it.

``python .ci/smoke_core.py``: in a fresh virtual environment holding only the wheel and its core
dependencies (CI); the optional modules must be absent.
``python .ci/smoke_core.py --block``: in any environment; the optional modules are made
unimportable first, as if they were not installed: a meta-path finder answers for them with a
loader that raises ``ModuleNotFoundError`` (a finder that raised at once would also break
``importlib.util.find_spec`` probes, which torch makes at import time for its own reasons).
"""

from __future__ import annotations

import contextlib
import importlib.abc
import importlib.machinery
import importlib.util
import io
import sys
import tempfile

OPTIONAL = ("matplotlib", "rich", "sklearn", "mnist1d", "transformers", "triton", "mpl_toolkits")


class _Block(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Makes the optional top-level modules (and their submodules) unimportable."""

    def find_spec(
        self, name: str, path: object = None, target: object = None
    ) -> importlib.machinery.ModuleSpec | None:
        if name.split(".")[0] in OPTIONAL:
            return importlib.machinery.ModuleSpec(name, self, origin=None)
        return None

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> None:
        raise ModuleNotFoundError(f"No module named {spec.name!r} (blocked: a core-only install)",
                                  name=spec.name)

    def exec_module(self, module: object) -> None:  # never reached: create_module raises
        raise ModuleNotFoundError(module)


def main() -> None:
    if "--block" in sys.argv:
        sys.meta_path.insert(0, _Block())
    else:
        present = [m for m in OPTIONAL if importlib.util.find_spec(m) is not None]
        assert not present, f"not a core-only environment: {present} installed"

    import numpy as np
    import torch
    import torch.nn.functional as F

    import crossent
    import crossent.calibration as cal
    import crossent.distributed
    import crossent.nn as cnn

    assert crossent.distributed.__all__
    loaded = sorted(m for m in sys.modules if m.split(".")[0] in OPTIONAL)
    assert not loaded, f"importing crossent loaded optional modules: {loaded}"

    gen = torch.Generator().manual_seed(0)
    N, C, D = 16, 7, 5
    z = torch.randn(N, C, generator=gen, dtype=torch.float64)
    y = torch.randint(0, C, (N,), generator=gen)
    yb = torch.randint(0, 2, (N, C), generator=gen).double()

    def check(name: str, got: torch.Tensor, want: torch.Tensor | None = None) -> None:
        assert torch.isfinite(got).all(), f"{name}: not finite"
        if want is not None:
            torch.testing.assert_close(got, want, msg=f"{name}: differs from PyTorch")
        print(f"  {name}: {float(got):.6f}")

    print("losses (forward, backward):")
    losses: dict[str, tuple[torch.Tensor, object, torch.Tensor | None]] = {}
    x = z.clone().requires_grad_()
    losses["cross_entropy"] = (x, crossent.cross_entropy(x, y, label_smoothing=0.1),
                               F.cross_entropy(z, y, label_smoothing=0.1))
    x = z.clone().requires_grad_()
    losses["focal_loss gamma=0"] = (x, crossent.focal_loss(x, y, gamma=0.0), F.cross_entropy(z, y))
    x = z.clone().requires_grad_()
    losses["binary_cross_entropy"] = (x, crossent.binary_cross_entropy(x, yb),
                                      F.binary_cross_entropy_with_logits(z, yb))
    x = z.clone().requires_grad_()
    losses["sigmoid_focal_loss"] = (x, crossent.sigmoid_focal_loss(x, yb), None)
    x = z.clone().requires_grad_()
    losses["asymmetric_loss"] = (x, crossent.asymmetric_loss(x, yb), None)
    h = torch.randn(N, D, generator=gen, dtype=torch.float64, requires_grad=True)
    w = torch.randn(C, D, generator=gen, dtype=torch.float64)
    losses["linear_cross_entropy"] = (h, crossent.linear_cross_entropy(h, w, y),
                                      F.cross_entropy(h.detach() @ w.T, y))
    x = z.clone().requires_grad_()
    p = torch.softmax(z, 1)
    losses["entropy"] = (x, crossent.entropy(x), -(p * p.log()).sum(1).mean())
    x = z.clone().requires_grad_()
    q = torch.softmax(z.flip(0), 1)
    losses["kl_divergence"] = (x, crossent.kl_divergence(x, q, input_is_logits=True),
                               (q * (q.log() - torch.log_softmax(z, 1))).sum(1).mean())
    for name, (leaf, loss, want) in losses.items():
        assert isinstance(loss, torch.Tensor)
        check(name, loss.detach(), want)
        loss.backward()
        assert leaf.grad is not None and torch.isfinite(leaf.grad).all(), f"{name}: bad gradient"

    print("modules:")
    for name in cnn.__all__:
        module = getattr(cnn, name)
        x = z.clone().requires_grad_()
        if name == "LinearCrossEntropyLoss":
            loss = module()(h.detach().requires_grad_(), w, y)
        elif name in ("CrossEntropyLoss", "FocalLoss"):
            loss = module()(x, y)
        else:
            loss = module()(x, yb)
        loss.backward()
        check(name, loss.detach())

    counts = [50, 20, 5, 1, 3, 8, 2]
    assert crossent.class_weights(counts).shape == (C,)
    assert crossent.logit_adjustment(counts).shape == (C,)

    print("calibration metrics:")
    probs = torch.softmax(z, 1).numpy()
    labels = y.numpy()
    for name in ("ece", "classwise_ece", "debiased_l2_ece", "smooth_ece", "brier", "nll", "accuracy"):
        value = getattr(cal, name)(probs, labels)
        assert np.isfinite(value), name
        print(f"  {name}: {value:.6f}")
    assert abs(cal.accuracy(probs, labels) - float((probs.argmax(1) == labels).mean())) < 1e-12
    table = cal.reliability_table(probs, labels)
    assert int(table.count.sum()) == N
    scaler = cal.TemperatureScaler().fit(z.numpy(), labels)
    assert np.isfinite(scaler.temperature)

    print("a feature needing an extra:")
    try:
        cal.reliability_diagram(probs, labels)
    except ImportError as exc:  # MissingExtraError names the extra; a bare ImportError still fails
        message = str(exc)
        assert "\n" not in message and "pip install 'crossent[plot]'" in message, message
        print(f"  reliability_diagram: {type(exc).__name__}: {message}")
    else:
        raise AssertionError("reliability_diagram ran without matplotlib")
    from crossent.cli import main as cli

    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        rc = cli(["demo"])
    line = err.getvalue().strip()
    assert rc == 2 and "\n" not in line and "pip install 'crossent[cli]'" in line, (rc, line)
    print(f"  crossent demo: exit {rc}: {line}")
    with tempfile.TemporaryDirectory() as tmp:
        np.save(f"{tmp}/logits.npy", z.numpy())
        np.save(f"{tmp}/labels.npy", labels)
        err = io.StringIO()
        with contextlib.redirect_stderr(err):
            rc = cli(["calibrate", f"{tmp}/logits.npy", "--labels", f"{tmp}/labels.npy",
                      "--out", f"{tmp}/out"])
    last = err.getvalue().strip().splitlines()[-1]
    ok = last.startswith("crossent calibrate: error:") and "pip install 'crossent[" in last
    assert rc == 2 and ok, (rc, last)
    print(f"  crossent calibrate: exit {rc}: {last}")
    print(f"crossent {crossent.__version__}: core-only smoke test passed")


if __name__ == "__main__":
    main()
