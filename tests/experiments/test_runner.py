"""Training loop, evaluation, determinism and aggregation on a tiny config."""

from __future__ import annotations

import math

import numpy as np
import torch

from crossent.experiments.datasets import TaskData
from crossent.experiments.losses import parse_loss
from crossent.experiments.runner import StudyConfig, aggregate, run_study, train_one

TINY = {"epochs": 8, "batch_size": 32, "hidden": 32, "lr": 3e-3}


def _strip_time(record: dict) -> dict:
    return {k: v for k, v in record.items() if k != "time_s"}


def test_train_one_tiny(blobs: TaskData) -> None:
    cfg = StudyConfig(**TINY)
    threads = torch.get_num_threads()
    res = train_one(blobs, parse_loss("ce"), 0, cfg)
    assert torch.get_num_threads() == threads  # restored
    rec = res.record
    assert rec["epochs"] == 8 and not rec["diverged"]
    assert rec["train_acc"] > 0.9 and rec["test"]["acc"] > 0.8
    for block in ("test", "test_ts"):
        for k, v in rec[block].items():
            assert math.isfinite(v), (block, k)
    assert rec["temperature"] > 0
    assert rec["test"]["acc"] == rec["test_ts"]["acc"]  # scaling keeps the arg-max
    assert res.test_logits.shape == (len(blobs.y_test), 3)
    assert 0 <= rec["test"]["ece"] <= 1 and 0 <= rec["test"]["brier"] <= 2


def test_same_seed_same_numbers(blobs: TaskData) -> None:
    cfg = StudyConfig(**TINY)
    for name in ("ce", "flsd-53"):
        a = train_one(blobs, parse_loss(name), 3, cfg)
        b = train_one(blobs, parse_loss(name), 3, cfg)
        assert _strip_time(a.record) == _strip_time(b.record)
        np.testing.assert_array_equal(a.test_logits, b.test_logits)
    c = train_one(blobs, parse_loss("ce"), 4, cfg)
    assert not np.array_equal(a.test_logits, c.test_logits)


def test_study_and_aggregate(blobs_imbalanced: TaskData) -> None:
    cfg = StudyConfig(seeds=[0, 1], **TINY)
    calls: list[int] = []

    class FakeProgress:
        def add_task(self, *a, **k):
            return len(calls)

        def update(self, *a, **k):
            calls.append(1)

        def reset(self, *a, **k):
            pass

        def advance(self, *a, **k):
            pass

    result = run_study(cfg, tasks={"blobs": blobs_imbalanced}, progress=FakeProgress())
    # imbalanced task: the balanced grid plus weighted-ce and cb-focal, 2 seeds each
    assert len(result.runs) == 10 * 2
    assert calls
    rows = aggregate(result)
    assert len(rows) == 10
    ce = next(r for r in rows if r["loss"] == "ce")
    eces = [r.record["test"]["ece"] for r in result.runs_for("blobs", "ce")]
    assert ce["n_seeds"] == 2
    assert math.isclose(ce["ece"][0], float(np.mean(eces)))
    assert math.isclose(ce["ece"][1], float(np.std(eces, ddof=1)))
    assert "tail_recall" in ce and 0 <= ce["tail_recall"][0] <= 1


def test_config_validation() -> None:
    import pytest

    for bad in ({"seeds": []}, {"epochs": 0}, {"tasks": ["cifar"]}, {"losses": ["mse"]},
                {"model": "cnn"}, {"lr": -1.0}):
        with pytest.raises(ValueError):
            StudyConfig(**bad).validate()  # type: ignore[arg-type]
    assert StudyConfig(quick=True).epochs_for("mnist1d") < StudyConfig().epochs_for("mnist1d")
    assert StudyConfig(data="x.csv").epochs_for("digits") == StudyConfig().epochs_for("user")
