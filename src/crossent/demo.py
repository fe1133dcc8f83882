"""``crossent demo``: CE, label smoothing and focal loss on one example, with their gradients."""

from __future__ import annotations

import argparse
from typing import Any

import torch

import crossent
from crossent._extras import require

__all__ = ["add_arguments", "main"]


#: (row name, options of :func:`crossent.cross_entropy`)
LOSSES: list[tuple[str, dict[str, Any]]] = [
    ("cross-entropy", {}),
    ("label smoothing 0.1", {"label_smoothing": 0.1}),
    ("focal gamma 2", {"gamma": 2.0}),
    ("focal FLSD-53", {"gamma": crossent.flsd53}),
    ("confidence penalty 0.1", {"confidence_penalty": 0.1}),
    ("z-loss 1e-2", {"z_loss": 1e-2}),
    ("poly-1 eps 1", {"poly1": 1.0}),
]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--classes", type=int, default=5, help="number of classes (default 5)")


def main(args: argparse.Namespace) -> int:
    console = require("rich.console", "crossent demo's table")
    table_module = require("rich.table", "crossent demo's table")
    if not 2 <= args.classes <= 1_000_000:
        raise ValueError(f"--classes must be >= 2 and <= 1000000, got {args.classes}")
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(args.classes, generator=gen) * 2
    target = torch.tensor(int(logits.argmax()))  # a confident, correct prediction
    q_y = torch.softmax(logits, 0)[target].item()
    title = f"one sample, {args.classes} classes, true class {int(target)} with q_y = {q_y:.3f}"
    table = table_module.Table(title=title)
    table.add_column("loss")
    table.add_column("value", justify="right")
    table.add_column("d loss / d z_y", justify="right")
    table.add_column("|grad| of the rest", justify="right")
    for name, kw in LOSSES:
        z = logits.clone().requires_grad_()
        loss = crossent.cross_entropy(z, target, **kw)
        loss.backward()
        g = z.grad
        assert g is not None
        rest = torch.cat([g[: int(target)], g[int(target) + 1 :]]).norm().item()
        table.add_row(name, f"{loss.item():.4f}", f"{g[target].item():+.4f}", f"{rest:.4f}")
    console.Console().print(table)
    return 0
