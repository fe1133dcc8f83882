"""The calibration parts of the report: what the reliability figures pool, and temperature
fits that fell back to T = 1. Built from hand-made logits (no training) to stay fast."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest

from crossent.experiments.datasets import TaskData
from crossent.experiments.losses import parse_loss
from crossent.experiments.report import (
    _report_md,
    _temperatures,
    automatic_reading,
    plot_reliability,
)
from crossent.experiments.runner import (
    RunResult,
    StudyConfig,
    StudyResult,
    _evaluate_arms,
    aggregate,
)


def _study(separable_seeds: set[int], seeds: tuple[int, ...] = (0, 1)) -> StudyResult:
    """Two classes, CE logits per seed: calibrated ones (a sound temperature fit), or, for the
    seeds in ``separable_seeds``, a validation set whose every prediction is right (the NLL
    fit falls back to T = 1)."""
    rng = np.random.default_rng(0)
    n = 60
    y = np.arange(n) % 2
    x = np.zeros((n, 1))
    task = TaskData(name="sep", description="two classes", X_train=x, y_train=y, X_val=x,
                    y_val=y, X_test=x, y_test=y, num_classes=2)
    config = StudyConfig(losses=["ce"], seeds=list(seeds), n_bins=10)
    spec = parse_loss("ce")
    runs = []
    for seed in seeds:
        margin = np.where(y == 1, 1.0, -1.0)
        if seed in separable_seeds:
            val = 3.0 * margin + rng.normal(0.0, 0.3, n)  # every validation prediction right
        else:
            val = 3.0 * margin * np.where(rng.random(n) < 0.3, -1.0, 1.0)  # 30% wrong at 95%
        test = 2.0 * margin + rng.normal(0.0, 1.5, n)
        val_logits = np.stack([-val / 2, val / 2], 1)
        test_logits = np.stack([-test / 2, test / 2], 1)
        record = {"task": "sep", "loss": "ce", "loss_label": spec.label, "seed": seed,
                  "model": "linear", "epochs": 1, "train_acc": 0.9, "final_train_loss": 0.3,
                  "diverged": False, "time_s": 0.0}
        t = _evaluate_arms(record, spec, task, config, seed, val_logits, test_logits)
        runs.append(RunResult(record, test_logits.astype(np.float32),
                              val_logits.astype(np.float32), t, test_labels=y))
    return StudyResult(config=config, tasks={"sep": task}, runs=runs)


def test_reading_says_the_fit_fell_back_and_does_not_call_t_1_calibrated() -> None:
    result = _study({0, 1})
    assert [r.temperature for r in result.runs] == [1.0, 1.0]
    lines = automatic_reading(result, aggregate(result))["sep"]
    regime = next(s for s in lines if s.startswith("Regime"))
    assert "close to calibrated" not in regime and "fell back" in regime
    fell = [s for s in lines if s.startswith("Temperature scaling (T on validation NLL) fell")]
    assert fell, lines
    assert "2 of 2 runs" in fell[0] and "all 60 top-1 predictions are correct" in fell[0]
    assert not any(s.startswith("Temperature scaling (T on validation NLL) lowered") for s in lines)


def test_reliability_figure_names_per_seed_temperatures_and_fallbacks() -> None:
    result = _study({1})
    fig = plot_reliability(result, "sep", "ce", n_bins=10)
    titles = [ax.get_title().replace("\n", " ") for ax in fig.axes if ax.get_title()]
    t0 = result.runs[0].temperature
    assert not math.isclose(t0, 1.0)
    after = next(t for t in titles if t.startswith("after scaling"))
    assert f"T = {t0:.2f}, 1 (fell back)" in after, after
    suptitle = fig.get_suptitle()
    assert "pooled" in suptitle and "mean over seeds" in suptitle, suptitle


def test_report_md_says_figures_pool_seeds_where_tables_average(tmp_path: Path) -> None:
    result = _study({1})
    rows = aggregate(result)
    fig = tmp_path / "figures" / "reliability_sep_ce.png"
    bars = tmp_path / "figures" / "ece_sep.png"
    md = _report_md(result, rows, automatic_reading(result, rows), [bars, fig], tmp_path, None)
    figures = md.split("## Figures", 1)[1]
    assert "pooled" in figures and "mean over seeds" in figures
    assert "fell back" in figures  # the figure's T = 1 of seed 1 is explained next to it


def test_report_md_lists_each_degenerate_fit_reason_once(tmp_path: Path) -> None:
    """Seeds on one split fail the same way: one line per fit and reason, naming its runs,
    not the same sentence once per seed."""
    result = _study({0, 1, 2}, seeds=(0, 1, 2))
    rows = aggregate(result)
    md = _report_md(result, rows, automatic_reading(result, rows), [], tmp_path, None)
    part = md.split("Degenerate temperature fits", 1)[1].split("## ", 1)[0]
    items = [line for line in part.splitlines() if line.startswith("- ")]
    assert len(items) == 2, items  # the NLL fit and the ECE fit, each for all three runs
    for item in items:
        assert "sep/ce/seed0, sep/ce/seed1, sep/ce/seed2" in item
        assert item.count("all 60 top-1 predictions are correct") == 1


def test_many_seeds_give_the_range_of_t_and_the_number_that_fell_back() -> None:
    def run(t: float, fell: bool) -> RunResult:
        record = {"fallback": {"ts": "why"}} if fell else {}
        return RunResult(record, np.zeros((1, 2)), np.zeros((1, 2)), t)

    runs = [run(1.0 if i == 3 else 0.5 + i / 10, i == 3) for i in range(8)]
    assert _temperatures(runs) == "T = 0.50 to 1.20 over 8 seeds, 1 fell back to 1"
    assert _temperatures(runs[:2]) == "T = 0.50, 0.60"


def test_ece_bars_are_cut_at_zero() -> None:
    """An interval wider than its mean (two seeds) is drawn down to 0, not below: an ECE is
    never negative. The upper end stays mean + h."""
    from crossent.experiments.report import plot_ece_bars

    row = {"task": "t", "loss": "ce", "loss_label": "CE", "ece": (0.02, 0.0, 0.05),
           "ece_ts": (0.01, 0.0, 0.004), "ece_tsece": (math.nan, 0.0, math.nan)}
    fig = plot_ece_bars(None, [row], "t")  # type: ignore[arg-type]
    ax = fig.axes[0]
    ends = sorted(
        round(float(y), 9) for line in ax.lines for y in np.atleast_1d(line.get_ydata())
         if math.isfinite(float(y))
    )
    assert ends[0] == 0.0  # 2 - 5 cut at 0
    assert 7.0 in ends and 0.6 in ends and 1.4 in ends  # 2 + 5, 1 - 0.4, 1 + 0.4
    assert "cut at 0" in ax.get_title()


def test_theory_intervals_are_cut_at_zero() -> None:
    """ECE, T and the entropy are never negative: the theory figure's intervals stop at 0 (a
    helper saw T = 0.92 +- 1.20 drawn down to -0.28), the upper ends stay mean + h."""
    from crossent.experiments.report import plot_theory

    def row(loss: str, t: tuple[float, float, float]) -> dict[str, object]:
        return {"task": "t", "loss": loss, "loss_label": loss, "ece": (0.02, 0.0, 0.05),
                "temperature": t, "entropy": (0.3, 0.0, 0.1)}

    rows = [row("ce", (0.92, 0.0, 1.20)), row("focal-2", (0.63, 0.0, 0.99)), row("cp-2", (1.1, 0.0, 0.2))]
    fig = plot_theory(rows, "t")
    for ax in fig.axes:
        ends = [float(y) for line in ax.lines for y in np.atleast_1d(line.get_ydata())]
        assert min(ends) >= 0.0, ax.get_title()
    t_ends = {round(float(y), 9) for line in fig.axes[1].lines for y in np.atleast_1d(line.get_ydata())}
    assert {0.0, 2.12, 1.62, 0.9, 1.3} <= t_ends  # 0.92 + 1.20, 0.63 + 0.99, 1.1 -+ 0.2
    assert "cut at 0" in fig.get_suptitle()


@pytest.mark.parametrize(("t", "want"), [
    ((0.92, 0.13, 1.20), "not clearly over- or underconfident (the interval of T includes 1)"),
    ((0.80, 0.01, 0.05), "underconfident"),
    ((1.30, 0.02, 0.10), "overconfident"),
    ((1.02, 0.01, 0.01), "close to calibrated"),
])
def test_the_regime_judges_t_by_its_interval(t: tuple[float, float, float], want: str) -> None:
    """Over- or underconfident only where T's 95% interval excludes 1 (beyond the 0.05 of
    tolerance), as every other judgement of the report follows the interval; the reading's
    lists of T < 1 and T > 1 follow the same rule."""
    from crossent.experiments.report import _regime, _t_side

    row = {"temperature": t, "train_acc": (0.9, 0.0, 0.0), "acc": (0.8, 0.0, 0.01), "model": "MLP"}
    assert _regime(row).endswith(f"is {want}")
    assert _t_side(t) == (-1 if want == "underconfident" else 1 if want == "overconfident" else 0)


def test_one_seed_reading_gives_the_side_of_t_as_a_point_estimate() -> None:
    """From one seed T has no interval: the reading still names the side of 1 its mean lies
    on (the mean decides), but as one seed's point estimate, in the regime and in the lists
    of T < 1 / T > 1, beside the line that calls nothing clear."""
    from crossent.experiments.report import _regime, _t_side

    row = {"temperature": (0.80, math.nan, math.nan), "train_acc": (0.9, 0.0, 0.0),
           "acc": (0.8, math.nan, math.nan), "model": "MLP"}
    assert _t_side(row["temperature"]) == -1
    assert _regime(row).endswith("is underconfident going by one seed's point estimate of T")
    result = _study(set(), seeds=(0,))
    rows = aggregate(result)
    t = result.runs[0].temperature
    assert t > 1.05 and rows[0]["temperature"][0] == pytest.approx(t)
    reading = automatic_reading(result, rows)["sep"]
    assert reading[0].endswith(f"T = {t:.2f}: it does not interpolate and is overconfident going by "
                               "one seed's point estimate of T).")
    assert "T > 1 (overconfident before scaling), point estimates of one seed: CE." in reading
    assert reading[1].startswith("One seed: no interval")
    assert not any("clearly" in line or "within noise" in line for line in reading[2:])
    assert not any("means over seeds" in line for line in reading)
    # the figures say so too: no interval in the bars' title, nothing pooled in the diagram's
    from crossent.experiments.report import _figures_note, plot_ece_bars, plot_reliability

    assert plot_ece_bars(result, rows, "sep").axes[0].get_title().endswith("(one seed, no interval)")
    assert "one seed (the ECE of the tables)" in plot_reliability(result, "sep", "ce")._suptitle.get_text()
    note = _figures_note(result, [Path("ece_sep.png"), Path("reliability_sep_ce.png")])
    assert note.startswith("ECE bars: one seed's values (no interval)") and "pooled" not in note
    two = _study(set())
    two_reading = automatic_reading(two, aggregate(two))["sep"]
    assert "T > 1 beyond its interval (overconfident before scaling): CE." in two_reading


def test_one_seed_reading_of_distillation_calls_no_student_better() -> None:
    """The distillation reading with one seed gives both students' accuracies without a
    verdict: "within noise of" would be a judgement that no interval supports."""
    x = np.zeros((4, 1))
    y = np.array([0, 1, 0, 1])
    task = TaskData(name="distill", description="d", X_train=x, y_train=y, X_val=x, y_val=y,
                    X_test=x, y_test=y, num_classes=2, teacher_task="teachers")
    result = StudyResult(config=StudyConfig(seeds=[0]), tasks={"distill": task}, runs=[])
    nan = math.nan

    def row(loss: str, label: str, acc: float) -> dict[str, object]:
        return {"task": "distill", "loss": loss, "loss_label": label, "model": "mlp", "n_seeds": 1,
                "acc": [acc, nan, nan], "ece": [0.05, nan, nan], "temperature": [1.2, nan, nan]}

    rows = [row("kd-ce", "student of CE", 0.62), row("kd-ls-0.1", "student of LS 0.1", 0.58)]
    last = automatic_reading(result, rows)["distill"][-1]
    assert last == ("The student of the label-smoothed teacher reaches 58.0% test accuracy, the "
                    "student of the CE teacher 62.0% (one seed: no interval, so neither is called "
                    "clearly better or within noise; run more --seeds).")
