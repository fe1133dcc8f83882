"""Helpers shared by several test files (imported as ``_helpers``: pytest puts tests/ on the path)."""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

import crossent
from crossent import reference as ref


def softmax_reference(
    x: torch.Tensor, t: torch.Tensor, grad_output: torch.Tensor | None = None, **kw: Any
) -> tuple[torch.Tensor, torch.Tensor]:
    """``crossent.reference.cross_entropy`` in float64 on torch inputs: ``(loss, grad)`` tensors.

    ``weight`` and ``grad_output`` are taken as float64 arrays, a probability target too
    (class indices as they are), and ``gamma=crossent.flsd53`` as the reference's schedule.
    """
    kw = dict(kw)
    if kw.get("weight") is not None:
        kw["weight"] = kw["weight"].double().numpy()
    if kw.get("gamma") is crossent.flsd53:
        kw["gamma"] = ref.flsd53
    go = None if grad_output is None else grad_output.double().numpy()
    t_np = t.double().numpy() if t.is_floating_point() else t.numpy()
    loss, grad = ref.cross_entropy(x.double().numpy(), t_np, grad_output=go, **kw)
    return torch.from_numpy(np.asarray(loss)), torch.from_numpy(grad)


def poly1_partners(label_smoothing: float, ignore_index: float) -> dict[str, dict[str, Any]]:
    """The options the sigmoid family's Poly-1 tests combine the Poly-1 term with, by name
    (``"w"`` and ``"pw"`` stand for the weight tensors a test draws)."""
    return {
        "gamma": dict(gamma_pos=2.0, gamma_neg=0.7),
        "alpha": dict(alpha=0.3),
        "clip": dict(clip=0.1),
        "smoothing": dict(label_smoothing=label_smoothing),
        "weights": dict(weight="w", pos_weight="pw"),
        "ignore_index": dict(ignore_index=ignore_index),
    }


def gloo_world_and_pair(check: Callable[[Any], None]) -> None:
    """In a spawned gloo worker whose world has 3 ranks: ``check(None)`` on the whole world, then
    ``check(pair)`` on ranks 0 and 1 (world size 2 without a second spawn: each costs seconds),
    then leave through ``os._exit(0)`` (gloo's teardown is flaky; see tests/test_distributed.py)."""
    import torch.distributed as dist

    try:
        check(None)
        pair = dist.new_group([0, 1])
        if dist.get_rank() < 2:
            check(pair)
        dist.barrier()
    except BaseException:
        dist.destroy_process_group()
        raise
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
