"""Training loop, evaluation, determinism and aggregation on a tiny config."""

from __future__ import annotations

import math
from dataclasses import replace

import numpy as np
import pytest
import torch

from crossent.experiments._metrics import bootstrap_sd, calibration_metrics, focal_bound
from crossent.experiments.datasets import TaskData
from crossent.experiments.losses import IMBALANCED_LOSSES, parse_loss
from crossent.experiments.runner import (
    StudyConfig,
    aggregate,
    clearly_different,
    fit_prior_corrected_temperature,
    fit_temperature,
    run_study,
    train_one,
)

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
    assert len(result.runs) == len(IMBALANCED_LOSSES) * 2
    assert calls
    rows = aggregate(result)
    assert len(rows) == len(IMBALANCED_LOSSES)
    ce = next(r for r in rows if r["loss"] == "ce")
    runs = result.runs_for("blobs", "ce")
    eces = [r.record["test"]["ece"] for r in runs]
    assert ce["n_seeds"] == 2
    assert math.isclose(ce["ece"][0], float(np.mean(eces)))
    assert math.isclose(ce["ece"][1], float(np.std(eces, ddof=1)))
    # 95% half-width: Student t with 1 degree of freedom, and the bootstrap part
    boots = [r.record["boot"]["test"]["ece"] for r in runs]
    h_seed = 12.706 * np.std(eces, ddof=1) / np.sqrt(2)
    h_boot = 1.96 * np.sqrt(np.sum(np.square(boots))) / 2
    assert math.isclose(ce["ece"][2], float(np.hypot(h_seed, h_boot)))
    assert "tail_recall" in ce and 0 <= ce["tail_recall"][0] <= 1
    # imbalanced: post-hoc logit adjustment arms; the logit-adjusted loss raises tail recall
    assert {"balanced_acc_la", "tail_recall_la", "ece_lats", "temperature_la"} <= set(ce)
    la = next(r for r in rows if r["loss"] == "la-ce")
    assert la["tail_recall"][0] >= ce["tail_recall"][0]
    # focal models carry the bound check, which holds on every test sample
    focal = next(r for r in rows if r["loss"] == "focal-3")
    assert focal["bound_holds"][0] == 1.0 and focal["bound_gap"][0] > 0


def test_config_validation() -> None:
    for bad in ({"seeds": []}, {"epochs": 0}, {"tasks": ["cifar"]}, {"losses": ["mse"]},
                {"model": "resnet"}, {"lr": -1.0}):
        with pytest.raises(ValueError):
            StudyConfig(**bad).validate()  # type: ignore[arg-type]
    assert StudyConfig(quick=True).epochs_for("mnist1d") < StudyConfig().epochs_for("mnist1d")
    assert StudyConfig(data="x.csv").epochs_for("digits") == StudyConfig().epochs_for("user")


def test_seeds_vary_the_split_of_bundled_tasks() -> None:
    cfg = StudyConfig(tasks=["digits"], losses=["ce"], seeds=[0, 1], epochs=1, hidden=8)
    result = run_study(cfg)
    a, b = result.runs
    assert a.test_labels is not None and b.test_labels is not None
    assert not np.array_equal(a.test_labels, b.test_labels)  # different test splits
    same = run_study(replace(cfg, split_per_seed=False))
    np.testing.assert_array_equal(same.runs[0].test_labels, same.runs[1].test_labels)


def test_distillation_students_use_their_seed_teacher(blobs: TaskData) -> None:
    distill = replace(blobs, name="distill", teacher_task="blobs")
    cfg = StudyConfig(losses=["ce", "kd-ce", "kd-ls-0.1"], seeds=[0], **TINY)
    result = run_study(cfg, tasks={"blobs": blobs, "distill": distill})
    got = [(r.record["task"], r.record["loss"]) for r in result.runs]
    # blobs runs CE only (students belong to the distillation task); the LS teacher is
    # trained on demand and not reported
    assert got == [("blobs", "ce"), ("distill", "ce"), ("distill", "kd-ce"), ("distill", "kd-ls-0.1")]
    kd = result.runs_for("distill", "kd-ce")[0].record
    assert kd["test"]["acc"] > 0.8
    with pytest.raises(ValueError, match="soft targets"):
        train_one(blobs, parse_loss("kd-ce"), 0, StudyConfig(**TINY))
    with pytest.raises(ValueError, match="'distill' task only"):
        run_study(StudyConfig(losses=["kd-ce"], seeds=[0], **TINY), tasks={"blobs": blobs})


def test_bootstrap_and_bound_helpers() -> None:
    rng = np.random.default_rng(0)
    z = 3 * rng.normal(size=(400, 6))
    y = rng.integers(0, 6, 400)
    sd = bootstrap_sd(z, y, np.arange(1, 7), n_boot=300)
    # the bootstrap std of accuracy is close to the binomial sqrt(p(1-p)/n)
    acc = float(np.mean(z.argmax(1) == y))
    assert abs(sd["acc"] - np.sqrt(acc * (1 - acc) / 400)) < 0.004
    assert 0 < sd["ece"] < 0.05 and sd["nll"] > 0
    # one resample equal to the identity reproduces crossent.calibration's ECE binning
    ece = calibration_metrics(z, y, 6)["ece"]
    probs = np.exp(z - z.max(1, keepdims=True))
    probs /= probs.sum(1, keepdims=True)
    conf, correct = probs.max(1), (probs.argmax(1) == y)
    bins = np.clip(np.ceil(conf * 15).astype(int) - 1, 0, 14)
    mine = sum(abs(correct[bins == b].sum() - conf[bins == b].sum()) for b in range(15)) / 400
    assert math.isclose(mine, ece, rel_tol=1e-9)
    for g in (0.5, 1.0, 3.0, "flsd53"):
        b = focal_bound(z, y, g)
        assert b["holds"] == 1.0 and b["gap"] >= 0
    # the prior-corrected temperature: with a uniform prior it is the NLL temperature
    t_nll, reason, kind = fit_temperature(z, y)
    assert reason is None and kind is None
    assert math.isclose(fit_prior_corrected_temperature(z, y, np.zeros(6)), t_nll, rel_tol=1e-4)
    # and it minimises the NLL of z / T - log(prior)
    log_prior = np.log(np.array([0.5, 0.2, 0.1, 0.1, 0.05, 0.05]))
    t = fit_prior_corrected_temperature(z, y, log_prior)

    def nll(temp: float) -> float:
        u = z / temp - log_prior
        return float(np.mean(np.log(np.exp(u).sum(1)) - u[np.arange(400), y]))

    assert nll(t) <= min(nll(t * 1.01), nll(t / 1.01))
    assert clearly_different([0.5, 0.0, 0.01], [0.4, 0.0, 0.01])
    assert not clearly_different([0.5, 0.0, 0.1], [0.4, 0.0, 0.1])


def test_fit_temperature_records_the_guards_reason_per_objective() -> None:
    """The NLL fit names why it fell back; the ECE fit, kept as fitted, names a separable set
    but not a validation NLL above T = 1's (expected of a fit to another objective)."""
    rng = np.random.default_rng(0)
    z = rng.normal(size=(300, 3)) * 2
    p = torch.softmax(torch.from_numpy(z), 1).numpy()
    y = np.minimum((p.cumsum(1) > rng.random((300, 1))).argmax(1), 2)  # calibrated logits
    t_ece, reason, kind = fit_temperature(z, y, objective="ece")
    assert t_ece != 1.0 and reason is None and kind is None
    sep = np.eye(3)[np.arange(60) % 3] * 4 + rng.normal(size=(60, 3)) * 0.1
    ys = np.arange(60) % 3
    t, reason, kind = fit_temperature(sep, ys)
    assert t == 1.0 and reason is not None and "separable" in reason and kind == "separable"
    t_ece, reason, kind = fit_temperature(sep, ys, objective="ece")
    assert t_ece < 1.0 and reason is not None and "separable" in reason and kind == "separable"
    wrong = np.array([[5.0, 0.0], [0.0, 5.0], [4.0, -1.0]])  # confidently wrong: T runs to t_max
    t, reason, kind = fit_temperature(wrong, np.array([1, 0, 1]))
    assert (t, reason, kind) == (1.0, "the fit stopped at the upper bound t_max=100", "bound")
