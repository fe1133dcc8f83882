"""Set-up shared by the test files that run a Triton kernel module under TRITON_INTERPRET=1.

``triton.jit`` reads the variable when it decorates a kernel, so a test file sets it before it
imports triton. If another test file imported the kernel module first (compiled mode), it is
reloaded here. If triton itself was imported without the variable, its own library (``tl.sum``,
...) is compiled-only and no kernel can run interpreted in this process: the file then re-runs
itself in a subprocess (``test_rerun_in_subprocess``) and skips everything else.

A test file binds what these factories return at module level, under the names given::

    IN_PROCESS, tsoftmax = interpreted_module("softmax", "_softmax_ce_kernel")
    _interpreter_in_process, test_rerun_in_subprocess = interpreter_guard(IN_PROCESS, __file__)
    triton_backend = triton_backend_fixture(tsoftmax, "softmax_cross_entropy", MODES)
"""

from __future__ import annotations

import importlib
import os
import subprocess
import sys
from collections.abc import Callable, Iterator
from types import ModuleType
from typing import Any

import pytest

import crossent.backends.triton._common as tcommon
from crossent import functional


def interpreted_module(name: str, kernel: str) -> tuple[bool, ModuleType]:
    """``crossent.backends.triton.<name>`` with its kernels built for the interpreter, and whether the
    interpreter can run in this process (``kernel`` names one of the module's kernels).

    ``crossent.backends.triton._common`` is reloaded with it; a reload re-runs a module in place, so
    the callers' references to either module stay valid.
    """
    module = importlib.import_module(f"crossent.backends.triton.{name}")
    in_process = tcommon.interpreter_usable()
    if in_process and not tcommon.interpreted(getattr(module, kernel)):
        importlib.reload(tcommon)
        module = importlib.reload(module)
    return in_process, module


def interpreter_guard(in_process: bool, path: str) -> tuple[Callable[..., Any], Callable[[], None]]:
    """An autouse fixture that skips the file's tests where the interpreter cannot run in this
    process, and the test that then re-runs the file (``path``) in a subprocess."""

    @pytest.fixture(autouse=True)
    def _interpreter_in_process(request: pytest.FixtureRequest) -> None:
        if not in_process and request.node.name != "test_rerun_in_subprocess":
            pytest.skip("triton was imported without TRITON_INTERPRET: see test_rerun_in_subprocess")

    def test_rerun_in_subprocess() -> None:
        if in_process:
            pytest.skip("the interpreter runs in this process")
        env = dict(os.environ, TRITON_INTERPRET="1")
        r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", path],
                           env=env, capture_output=True, text=True, timeout=900)
        assert r.returncode == 0, r.stdout[-5000:] + r.stderr[-2000:]

    return _interpreter_in_process, test_rerun_in_subprocess


def triton_backend_fixture(module: ModuleType, entry: str, modes: dict[str, dict[str, int]]):
    """A fixture, parametrized over ``modes``, that routes the public functions to the Triton
    backend (by patching the dispatcher) and calls ``module.<entry>`` with the mode's tile
    arguments; it yields the list of calls and fails a test that never reached the kernel."""

    @pytest.fixture(params=list(modes))
    def triton_backend(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> Iterator[list]:
        calls: list[int] = []
        original = getattr(module, entry)

        def patched(*args: Any, **kwargs: Any) -> Any:
            calls.append(1)
            return original(*args, **kwargs, **modes[request.param])

        monkeypatch.setattr(functional, "_pick_backend", lambda logits, backend: "triton")
        monkeypatch.setattr(module, entry, patched)
        yield calls
        assert calls, "the Triton kernel was not called"

    return triton_backend


#: run before a script of compile_for_sm90: exit status 3 where Triton has no NVIDIA backend
_NVIDIA_BACKEND_OR_EXIT_3 = """
import sys
try:
    from triton.backends.nvidia import compiler  # noqa: F401
except Exception:
    sys.exit(3)
"""


def compile_for_sm90(script: str) -> None:
    """Run ``script``, which lowers kernels for an H100 (sm_90) with ``compile_for_cuda`` and
    prints "compiled", in a fresh interpreter without TRITON_INTERPRET (no GPU needed); skip
    where Triton's NVIDIA backend is not available."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    r = subprocess.run([sys.executable, "-c", _NVIDIA_BACKEND_OR_EXIT_3 + script], env=env,
                       capture_output=True, text=True, timeout=600)
    if r.returncode == 3:
        pytest.skip("Triton's NVIDIA backend is not available")
    assert r.returncode == 0 and "compiled" in r.stdout, r.stderr[-3000:]
