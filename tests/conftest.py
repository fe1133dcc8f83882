"""Test-session set-up shared by every test file.

Triton kernels run on CPU tensors under Triton's interpreter, which triton reads when it is
first imported: set it before anything (torch.compile included) can import triton.

Under pytest-xdist each worker gets an equal share of the cores for its OpenMP threads (torch's
and the native kernels', which use torch's pool), and so do the Python processes the tests
start, which inherit the variable. Two workers on two cores with two threads each would run
four busy teams on two cores; the suite takes about a sixth less time without that. The tests
of the threaded paths set their thread counts themselves (``torch.set_num_threads``).
"""

import os
from collections.abc import Iterator

import pytest

os.environ.setdefault("TRITON_INTERPRET", "1")
if "PYTEST_XDIST_WORKER_COUNT" in os.environ:  # set in each worker, before it imports torch
    _share = (os.cpu_count() or 1) // max(1, int(os.environ["PYTEST_XDIST_WORKER_COUNT"]))
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, _share)))


@pytest.fixture(params=["native", "torch"])
def cpu_path(request: pytest.FixtureRequest) -> Iterator[str]:
    """Run a test on each CPU implementation: the native kernels, then the torch-op path.

    Test modules of the loss families use it for every test (``pytestmark``), so that both
    paths are held to the same reference, identities and hostile inputs.
    """
    from crossent.backends import native

    if request.param == "native":
        if os.environ.get("CROSSENT_NATIVE") == "0":
            pytest.skip("native kernels turned off by CROSSENT_NATIVE=0")
        assert native.available(), "the native kernels failed to build (see the RuntimeWarning)"
        yield "native"
    else:
        with native.disabled():
            yield "torch"


@pytest.fixture
def torch_path() -> Iterator[None]:
    """Force the torch-op path (for tests of its blocking and buffers)."""
    from crossent.backends import native

    with native.disabled():
        yield
