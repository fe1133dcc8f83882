"""The README's quickstart runs as written."""

from __future__ import annotations

import re
from pathlib import Path

import torch


def test_readme_quickstart_runs():
    text = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    match = re.search(r"## Quickstart\n\n```python\n(.*?)```", text, re.S)
    assert match, "README.md has no quickstart block"
    namespace: dict = {}
    exec(compile(match.group(1), "README.md quickstart", "exec"), namespace)
    assert torch.isfinite(namespace["loss"]).item()
