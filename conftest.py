"""pytest configuration shared by the test suite and the doctests of src/ (``make test`` runs
``pytest --doctest-modules src/crossent``): the docstring examples see ``torch``, ``np`` and
``crossent`` already imported, as a reader of the documentation would have them."""

from __future__ import annotations

from typing import Any

import pytest


@pytest.fixture(autouse=True)
def _doctest_names(doctest_namespace: dict[str, Any]) -> None:
    # imported here, not at the top: tests/conftest.py sets TRITON_INTERPRET before anything
    # imports crossent (triton reads it when a kernel is decorated)
    import numpy as np
    import torch

    import crossent

    doctest_namespace.update(np=np, torch=torch, crossent=crossent)
