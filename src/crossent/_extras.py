"""Optional dependencies: import one, or say in one line which extra installs it.

The core install is numpy and torch. Plots (matplotlib), rich tables and the experiment runner's
data (scikit-learn, mnist1d) come with extras; a feature that needs one calls :func:`require`
where it first uses the module, so a core-only install imports every loss and metric.
"""

from __future__ import annotations

import importlib
from types import ModuleType

#: the extra that provides each optional top-level module
EXTRA_OF: dict[str, str] = {
    "matplotlib": "plot",
    "rich": "cli",
    "sklearn": "run",
    "mnist1d": "run",
    "transformers": "hf",
    "triton": "gpu",
}


class MissingExtraError(ImportError):
    """An optional dependency is not installed; the message names the extra that provides it."""


def require(module: str, feature: str) -> ModuleType:
    """Import ``module`` for ``feature``, or raise :class:`MissingExtraError` naming the extra.

    >>> require("math", "arithmetic").sqrt(4.0)
    2.0
    """
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        top = module.split(".")[0]
        extra = EXTRA_OF.get(top, "all")
        raise MissingExtraError(
            f"{feature} needs {top}, which is not installed: pip install 'crossent[{extra}]'"
        ) from exc
