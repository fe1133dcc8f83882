"""The run folder of ``crossent run``: results.json / .csv, report.md and figures.

Files written by :func:`write_run_folder`:

``results.json``   config, environment, per-run records and the aggregated rows
``results.csv``    one row per (task, loss, seed): every metric before and after scaling, their
                   bootstrap stds, the temperatures and the fits that fell back
``summary.csv``    one row per (task, loss): mean and std over seeds
``predictions.npz`` test logits of every run (``<task>/<loss>/seed<k>/logits``), test labels
                   (``<task>/<loss>/seed<k>/labels`` where a seed drew its own split, else
                   ``<task>/labels``) and fitted temperatures, for ``crossent calibrate``
``report.md``      the statistics rule, the automatic reading, the comparison with Mukhoti et
                   al. 2020 and the tables per task (mean +- 95% half-width)
``figures/``       ``reliability_<task>_<loss>.png`` (before / after temperature scaling,
                   the seeds' test predictions pooled; with ``--quick`` one per task, CE's
                   or, where CE is not run, the first loss's),
                   ``ece_<task>.png`` (ECE before / after both temperature fits per loss),
                   ``theory_<task>.png`` (focal gamma beside CE - gamma H: ECE, T and
                   predictive entropy against the strength) and ``loss_gradient_pt.png``
                   (loss and gradient magnitude against the true-class probability
                   :math:`p_t`)
"""

from __future__ import annotations

import csv
import json
import math
import platform
import re
from collections.abc import Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import torch

from crossent.calibration.plots import LOW_COUNT
from crossent.experiments._metrics import BOOTSTRAP_METRICS, METRICS, softmax
from crossent.experiments.losses import KD_TEMPERATURE
from crossent.experiments.runner import (
    ARMS,
    RunResult,
    StudyResult,
    aggregate,
    clearly_different,
    config_dict,
)

__all__ = [
    "automatic_reading",
    "markdown_tables",
    "mukhoti_table",
    "plot_ece_bars",
    "plot_loss_gradient_pt",
    "plot_reliability",
    "plot_theory",
    "rich_tables",
    "write_run_folder",
]

#: Metrics shown in percent.
PERCENT = {"acc", "balanced_acc", "macro_f1", "tail_recall", "ece", "adaece", "cw_ece",
           "train_acc", "bound_holds"}
NAMES = {
    "acc": "Acc %",
    "balanced_acc": "Bal. acc %",
    "macro_f1": "Macro-F1 %",
    "tail_recall": "Tail recall %",
    "nll": "NLL",
    "brier": "Brier",
    "ece": "ECE %",
    "adaece": "AdaECE %",
    "cw_ece": "cw-ECE %",
    "entropy": "H (nats)",
    "temperature": "T",
}
#: T within this distance of 1 counts as "no rescaling needed".
T_TOLERANCE = 0.05


def _t_side(t: tuple[float, ...]) -> int:
    """+1 where a mean T (with its 95% half-width) says overconfident, -1 underconfident, 0
    neither: beyond :data:`T_TOLERANCE` of 1, and with the interval excluding 1 where there
    is one (with one seed the half-width is NaN and the mean decides)."""
    mean, half = t[0], t[2] if len(t) > 2 else math.nan
    side = 1 if mean > 1 + T_TOLERANCE else -1 if mean < 1 - T_TOLERANCE else 0
    return 0 if side and math.isfinite(half) and abs(mean - 1) <= half else side
#: Mukhoti et al. 2020, Table 1 / Table 3: ResNet-50 on CIFAR-10, test ECE-15 (%) before ->
#: after temperature scaling (their T fitted on validation ECE by grid search).
MUKHOTI_CIFAR10: dict[str, tuple[float, float]] = {
    "ce": (4.35, 1.35), "ls-0.05": (2.96, 1.67), "focal-3": (1.48, 1.42), "flsd-53": (1.55, 0.95),
}
#: the number of equal-width bins of Mukhoti et al.'s ECE (and of their ECE grid search for T)
MUKHOTI_N_BINS = 15
STATISTICS_NOTE = (
    "Each cell is the mean over seeds ± the half-width h of a 95% interval, "
    "h = √(h_seed² + h_boot²): h_seed = t(0.975, n−1)·s/√n from the n seeds (sample std s; "
    "seeds vary the data split, the initialisation and the batch order), h_boot = "
    "1.96·√(Σσᵢ²)/n from a bootstrap over test points (200 resamples per run; accuracy, "
    "balanced accuracy, tail recall, NLL and ECE; the other metrics carry h_seed only). "
    "**Clearly** different means: |m_A − m_B| > √(h_A² + h_B²), the 95% half-width of the "
    "difference; anything closer is called within noise."
)
#: added to :data:`STATISTICS_NOTE` when the study ran one seed
ONE_SEED_NOTE = (
    "With one seed the spread between seeds is unknown: such cells give the mean alone, without "
    "an interval, and nothing involving them is called clearly different (run more --seeds)."
)


def _fmt(ms: Sequence[float], metric: str, *, digits: int | None = None) -> str:
    """``mean ± h`` (``h`` the 95% half-width, the third entry; the std if there is none)."""
    mean = ms[0]
    h = ms[2] if len(ms) > 2 else ms[1]
    if mean is None or (isinstance(mean, float) and math.isnan(mean)):
        return "n/a"
    scale = 100.0 if metric in PERCENT else 1.0
    d = digits if digits is not None else (
        1 if metric in ("acc", "balanced_acc", "macro_f1", "tail_recall", "train_acc")
        else 2 if metric in PERCENT or metric in ("temperature", "entropy") else 3)
    if math.isnan(h):  # one seed: no interval (ONE_SEED_NOTE)
        return f"{mean * scale:.{d}f}"
    return f"{mean * scale:.{d}f} ± {h * scale:.{d}f}"


def _cell(ms: Sequence[float], metric: str, digits: int) -> str:
    """Compact ``mean±h`` for the terminal, ``h`` dimmed."""
    mean = ms[0]
    h = ms[2] if len(ms) > 2 else ms[1]
    if mean is None or (isinstance(mean, float) and math.isnan(mean)):
        return "n/a"
    scale = 100.0 if metric in PERCENT else 1.0
    if math.isnan(h):
        return f"{mean * scale:.{digits}f}"
    return f"{mean * scale:.{digits}f}[dim]±{h * scale:.{digits}f}[/]"


def _is_imbalanced(result: StudyResult, task: str) -> bool:
    return bool(result.tasks[task].imbalanced)


def _md_table(head: list[str], body: list[list[str]]) -> list[str]:
    out = ["| " + " | ".join(head) + " |", "|" + "|".join(["---"] + ["---:"] * (len(head) - 1)) + "|"]
    out += ["| " + " | ".join(cells) + " |" for cells in body]
    return out


def _nan_high(x: float) -> float:
    return math.inf if x is None or math.isnan(x) else x


def _num(x: float, metric: str, d: int = 2) -> str:
    return f"{x * (100.0 if metric in PERCENT else 1.0):.{d}f}"


def _change(a: float, b: float, metric: str, d: int = 2) -> str:
    """``a → b``, with digits added (up to 6) until a change shows: a rise lost to rounding
    read as 0.628 → 0.628."""
    while d < 6 and a != b and _num(a, metric, d) == _num(b, metric, d):
        d += 1
    return f"{_num(a, metric, d)} → {_num(b, metric, d)}"


# --------------------------------------------------------------------------- tables


def _task_rows(rows: list[dict[str, Any]], task: str) -> list[dict[str, Any]]:
    return [r for r in rows if r["task"] == task]


def _by_loss(trows: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {r["loss"]: r for r in trows}


def theory_pairs(trows: list[dict[str, Any]]) -> list[tuple[float, str | None, str | None]]:
    """``(strength, focal loss, confidence-penalty loss)`` for every gamma / beta present."""
    strengths: dict[float, list[str | None]] = {}
    for r in trows:
        m = re.fullmatch(r"(focal|cp)-([\d.]+)", r["loss"])
        if m:
            slot = strengths.setdefault(float(m.group(2)), [None, None])
            slot[0 if m.group(1) == "focal" else 1] = r["loss"]
    return [(g, f, c) for g, (f, c) in sorted(strengths.items())]


def markdown_tables(result: StudyResult, rows: list[dict[str, Any]]) -> str:
    """Per task: before scaling (with T and the predictive entropy), after scaling (NLL- and
    ECE-fitted T), post-hoc logit adjustment on imbalanced tasks, and the focal-loss bound."""
    out: list[str] = []
    for task, data in result.tasks.items():
        trows = _task_rows(rows, task)
        if not trows:
            continue
        n_seeds = trows[0]["n_seeds"]
        models = sorted({r["model"] for r in trows})
        out.append(f"### {task}\n\n{data.summary()}. {data.description}. Model: "
                   f"{', '.join(models)}.\n")
        acc = ["acc", "balanced_acc", "macro_f1", "tail_recall"] if data.imbalanced else ["acc"]
        cols = [*acc, "nll", "brier", "ece", "adaece", "cw_ece", "entropy"]
        spread = f"mean ± 95% half-width, {n_seeds} seeds" if n_seeds > 1 else "one seed, no interval"
        out.append(f"Before temperature scaling (test set, {spread}):\n")
        out += _md_table(
            ["Loss", *[NAMES[c] for c in cols], "T (NLL)", "Train acc %"],
            [[r["loss_label"], *[_fmt(r[c], c) for c in cols], _fmt(r["temperature"], "temperature"),
              _fmt(r["train_acc"], "train_acc")] for r in trows],
        )
        out.append("\nAfter temperature scaling: T fitted on validation NLL (Guo et al.), and "
                   "T fitted by grid search on validation ECE (Mukhoti et al.'s protocol); "
                   "accuracy is unchanged:\n")
        out += _md_table(
            ["Loss", "ECE % (T: NLL)", "NLL", "Brier", "AdaECE %", "cw-ECE %", "T (ECE)",
             "ECE % (T: ECE)", "ECE % before → after (NLL)"],
            [[r["loss_label"], _fmt(r["ece_ts"], "ece"), _fmt(r["nll_ts"], "nll"),
              _fmt(r["brier_ts"], "brier"), _fmt(r["adaece_ts"], "adaece"),
              _fmt(r["cw_ece_ts"], "cw_ece"), _fmt(r["temperature_ece"], "temperature"),
              _fmt(r["ece_tsece"], "ece"), f"{_num(r['ece'][0], 'ece')} → {_num(r['ece_ts'][0], 'ece')}"]
             for r in trows],
        )
        if data.label_shift and "balanced_acc_la" in trows[0]:
            out.append("\nPost-hoc logit adjustment (Menon et al. 2021): LA = z − log π_train; "
                       "LA + T = z/T − log π_train with T fitted on the balanced validation set "
                       "(the prior-corrected temperature):\n")
            out += _md_table(
                ["Loss", "Bal. acc % raw", "Bal. acc % LA", "Bal. acc % LA + T", "Tail recall % raw",
                 "Tail recall % LA", "Tail recall % LA + T", "ECE % TS", "ECE % LA + T", "T (LA)"],
                [[r["loss_label"], _fmt(r["balanced_acc"], "acc"), _fmt(r["balanced_acc_la"], "acc"),
                  _fmt(r["balanced_acc_lats"], "acc"), _fmt(r["tail_recall"], "acc"),
                  _fmt(r["tail_recall_la"], "acc"), _fmt(r["tail_recall_lats"], "acc"),
                  _fmt(r["ece_ts"], "ece"), _fmt(r["ece_lats"], "ece"),
                  _fmt(r["temperature_la"], "temperature")] for r in trows],
            )
        out.append(_theory_table(trows))
        out.append("")
    return "\n".join(out)


def _theory_table(trows: list[dict[str, Any]]) -> str:
    """Focal gamma beside CE - beta H with beta = gamma, and the bound on the test samples."""
    pairs = theory_pairs(trows)
    if not any(f and c for _, f, c in pairs):
        return ""
    by = _by_loss(trows)
    body = []
    for g, f, c in pairs:
        for name in (f, c):
            if name is None:
                continue
            r = by[name]
            bound = ("holds on " + _fmt(r["bound_holds"], "bound_holds", digits=1) + "%, gap "
                     + _fmt(r["bound_gap"], "nll") + f" nats ({100 * r['bound_gap_rel'][0]:.0f}% of γH)"
                     if "bound_holds" in r else "")
            body.append([f"{g:g}", r["loss_label"], _fmt(r["acc"], "acc"), _fmt(r["ece"], "ece"),
                         _fmt(r["temperature"], "temperature"), _fmt(r["entropy"], "entropy"),
                         _fmt(r["ece_ts"], "ece"), bound])
    lines = ["", "Focal loss γ beside its lower bound CE − γH (confidence penalty β = γ); the "
             "bound FL ≥ CE − γH checked per test sample on each focal model's own logits:", ""]
    lines += _md_table(["γ = β", "Loss", "Acc %", "ECE %", "T", "H (nats)", "ECE % after TS",
                        "FL ≥ CE − γH on test samples"], body)
    return "\n".join(lines)


def mukhoti_table(result: StudyResult, rows: list[dict[str, Any]], task: str = "mnist1d") -> str:
    """This run's ECE before -> after scaling (both T fits) beside Mukhoti et al.'s CIFAR-10.

    Their ECE has :data:`MUKHOTI_N_BINS` bins; a run with another ``n_bins`` says so under the
    table, since the number of bins moves the ECE."""
    by = _by_loss(_task_rows(rows, task))
    present = [k for k in MUKHOTI_CIFAR10 if k in by]
    if not present:
        return ""
    model = by[present[0]]["model"]
    lines = _md_table(
        ["Loss", "Mukhoti et al., CIFAR-10 ResNet-50", f"This run, {task} {model}: before → "
         "after (T: NLL)", "after (T: ECE, their protocol)", "T (NLL)", "T (ECE)"],
        [[by[k]["loss_label"], f"{a:.2f} → {b:.2f}",
          f"{_fmt(by[k]['ece'], 'ece')} → {_fmt(by[k]['ece_ts'], 'ece')}",
          _fmt(by[k]["ece_tsece"], "ece"), _fmt(by[k]["temperature"], "temperature"),
          _fmt(by[k]["temperature_ece"], "temperature")]
         for k, (a, b) in ((k, MUKHOTI_CIFAR10[k]) for k in present)],
    )
    n_bins = result.config.n_bins
    if n_bins != MUKHOTI_N_BINS:
        lines += ["", f"Mukhoti et al.'s ECE (and their grid search for T) uses {MUKHOTI_N_BINS} "
                  f"equal-width bins, this run's {n_bins}: the number of bins changes the ECE, so "
                  f"the two sides are not on one scale (--n-bins {MUKHOTI_N_BINS} compares them)."]
    return "\n".join(lines)


def rich_tables(result: StudyResult, rows: list[dict[str, Any]]) -> list[Any]:
    """One :class:`rich.table.Table` per task, for the terminal (report.md has every column)."""
    from crossent._extras import require

    rich_table = require("rich.table", "the terminal tables of crossent run")
    tables = []
    for task, data in result.tasks.items():
        trows = _task_rows(rows, task)
        if not trows:
            continue
        acc_cols = ["acc", "balanced_acc", "tail_recall"] if data.imbalanced else ["acc"]
        table = rich_table.Table(
            title=f"[bold]{task}[/] ({trows[0]['model']}): test set, "
                  + (f"mean ± 95% half-width over {trows[0]['n_seeds']} seeds" if trows[0]["n_seeds"] > 1
                     else "one seed (no interval)"),
            caption=f"ECE in % ({result.config.n_bins} bins); H = mean predictive entropy (nats); "
                    "T fitted on validation NLL, T(ECE) on validation ECE; TS = after scaling; "
                    "best ECE in green"
                    + ("; LA = post-hoc logit adjustment" if data.label_shift else ""),
            header_style="bold",
            pad_edge=False,
        )
        table.add_column("Loss", no_wrap=True)
        heads = {"acc": "Acc %", "balanced_acc": "BalAcc %", "tail_recall": "Tail %"}
        for c in acc_cols:
            table.add_column(heads[c], justify="right", no_wrap=True)
        extra = ("BalAcc % LA", "Tail % LA") if data.label_shift else ()
        for name in ("Train %", "NLL", "ECE %", "H", "T", "ECE % TS", "NLL TS", "T(ECE)",
                     "ECE % TS(ECE)", *extra):
            table.add_column(name, justify="right", no_wrap=True,
                             style="cyan" if "TS" in name or "LA" in name else None)
        best_ece = min(trows, key=lambda r: _nan_high(r["ece"][0]))["loss"]
        best_ts = min(trows, key=lambda r: _nan_high(r["ece_ts"][0]))["loss"]
        for r in trows:
            ece = _cell(r["ece"], "ece", 2)
            ece_ts = _cell(r["ece_ts"], "ece", 2)
            cells = [
                r["loss_label"],
                *[_cell(r[c], c, 1) for c in acc_cols],
                f"{100 * r['train_acc'][0]:.1f}",
                _cell(r["nll"], "nll", 3),
                f"[bold green]{ece}[/]" if r["loss"] == best_ece else ece,
                f"{r['entropy'][0]:.2f}",
                _cell(r["temperature"], "temperature", 2),
                f"[bold green]{ece_ts}[/]" if r["loss"] == best_ts else ece_ts,
                _cell(r["nll_ts"], "nll", 3),
                f"{r['temperature_ece'][0]:.2f}",
                _cell(r["ece_tsece"], "ece", 2),
            ]
            if data.label_shift:
                cells += [_cell(r["balanced_acc_la"], "acc", 1), _cell(r["tail_recall_la"], "acc", 1)]
            table.add_row(*cells)
        tables.append(table)
    return tables


# --------------------------------------------------------------------------- reading


def _clearly_lower(a: Sequence[float], b: Sequence[float]) -> bool:
    """``a`` clearly below ``b`` (:func:`~crossent.experiments.runner.clearly_different`)."""
    return a[0] < b[0] and clearly_different(a, b)


def _regime(r: dict[str, Any], fell: int = 0, runs: int = 0) -> str:
    """The CE row's regime; ``fell`` of its ``runs`` NLL temperature fits fell back to T = 1,
    which says nothing about its calibration (a T of 1 from a fallback is no measurement).
    From one seed T has no interval, so over- or underconfidence rests on its point estimate
    alone, and the sentence says so."""
    t = r["temperature"][0]
    side = _t_side(r["temperature"])
    conf = "overconfident" if side > 0 else "underconfident" if side < 0 else "close to calibrated"
    if not side and abs(t - 1) > T_TOLERANCE:  # the interval includes 1
        conf = "not clearly over- or underconfident (the interval of T includes 1)"
    elif side and _one_seed(r["temperature"]):
        conf += " going by one seed's point estimate of T"
    if fell and fell == runs:
        conf = ("of unmeasured calibration: every NLL temperature fit fell back to T = 1 "
                "(see below)")
    elif fell:
        conf += f" ({fell} of {runs} NLL temperature fits fell back to T = 1, in this mean)"
    fit = "interpolates the training set" if r["train_acc"][0] >= 0.995 else "does not interpolate"
    return (f"{r['model']}, {100 * r['train_acc'][0]:.1f}% train / {_fmt(r['acc'], 'acc')}% test "
            f"accuracy, T = {_fmt(r['temperature'], 'temperature')}: it {fit} and is {conf}")


def _one_seed_rows(trows: list[dict[str, Any]]) -> bool:
    """Whether every row of a task comes from one seed: no interval, nothing to judge."""
    return all(r.get("n_seeds") == 1 for r in trows)


def _one_seed(cell: Sequence[float]) -> bool:
    """Whether a ``[mean, std, h]`` cell comes from one seed: a mean without an interval."""
    return math.isfinite(cell[0]) and not math.isfinite(cell[2])


def _fell_back(result: StudyResult, task: str) -> tuple[list[dict[str, Any]], int]:
    """The records of ``task`` whose NLL temperature fit fell back to T = 1, and the number
    of its runs."""
    recs = [run.record for run in result.runs if run.record["task"] == task]
    return [rec for rec in recs if _ts_fell_back(rec)], len(recs)


def _ts_fell_back(record: dict[str, Any]) -> bool:
    """Whether the run's NLL temperature fit ("ts") fell back to T = 1."""
    return "ts" in record.get("fallback", {})


def _fallback_reading(fell: list[dict[str, Any]], n_runs: int) -> str:
    """The reading's sentence on the NLL temperature fits that fell back to T = 1: how many,
    which (loss and seed), and why, with the guard's numbers; runs that share a reason are
    listed together."""
    by_reason: dict[str, list[str]] = {}
    for rec in fell:
        by_reason.setdefault(rec["fallback"]["ts"], []).append(
            f"{rec.get('loss_label', rec['loss'])} seed {rec['seed']}")
    reasons = "; ".join(f"{', '.join(runs)}: {reason}" for reason, runs in by_reason.items())
    return (f"Temperature scaling (T on validation NLL) fell back to T = 1 (the identity) in "
            f"{len(fell)} of {n_runs} runs, so their TS columns are the unscaled model's. Why: "
            f"{reasons}.")


def automatic_reading(result: StudyResult, rows: list[dict[str, Any]]) -> dict[str, list[str]]:
    """Short sentences per task, derived from the numbers only, with the rule of
    :func:`~crossent.experiments.runner.clearly_different` behind every "clearly"."""
    reading: dict[str, list[str]] = {}
    for task, data in result.tasks.items():
        trows = _task_rows(rows, task)
        if not trows:
            continue
        lines: list[str] = []
        by = _by_loss(trows)
        ce = by.get("ce")
        valid = [r for r in trows if not math.isnan(r["ece"][0])]
        if not valid:
            reading[task] = ["every run diverged; nothing to read."]
            continue
        if data.teacher_task is not None:
            reading[task] = _distill_reading(result, rows, task)
            continue
        fell, n_runs = _fell_back(result, task)
        if ce is not None:
            ce_fell = sum(rec["loss"] == "ce" for rec in fell)
            ce_runs = sum(run.record["loss"] == "ce" for run in result.runs_for(task, "ce"))
            lines.append(f"Regime: CE ({_regime(ce, ce_fell, ce_runs)}).")
        if fell:  # before any sentence on the TS columns, which hold unscaled numbers for these
            lines.append(_fallback_reading(fell, n_runs))
        one_seed = _one_seed_rows(trows)
        if one_seed:
            lines.append("One seed: no interval, so no difference between losses is called clear or"
                         " within noise, and a T below or above 1 is a point estimate (run more"
                         " --seeds).")
        b0 = min(valid, key=lambda r: r["ece"][0])
        b1 = min(valid, key=lambda r: _nan_high(r["ece_ts"][0]))
        worst0 = max(valid, key=lambda r: r["ece"][0])
        lines.append(
            f"Lowest ECE before scaling: **{b0['loss_label']}** ({_fmt(b0['ece'], 'ece')}%, "
            f"T = {b0['temperature'][0]:.2f}); highest: {worst0['loss_label']} "
            f"({_fmt(worst0['ece'], 'ece')}%)."
        )
        under = [r["loss_label"] for r in valid if _t_side(r["temperature"]) < 0]
        over = [r["loss_label"] for r in valid if _t_side(r["temperature"]) > 0]
        point = ", point estimates of one seed" if one_seed else ""
        if under:
            side = "" if point else " beyond its interval"
            lines.append(f"T < 1{side} (underconfident before scaling){point}: {', '.join(under)}.")
        if over:
            side = "" if point else " beyond its interval"
            lines.append(f"T > 1{side} (overconfident before scaling){point}: {', '.join(over)}.")
        if ce is not None and not one_seed:
            beat_before = [r["loss_label"] for r in valid
                           if r["loss"] != "ce" and _clearly_lower(r["ece"], ce["ece"])]
            worse_before = [r["loss_label"] for r in valid
                            if r["loss"] != "ce" and _clearly_lower(ce["ece"], r["ece"])]
            beat_after = [r["loss_label"] for r in valid
                          if r["loss"] != "ce" and _clearly_lower(r["ece_ts"], ce["ece_ts"])]
            worse_after = [r["loss_label"] for r in valid
                           if r["loss"] != "ce" and _clearly_lower(ce["ece_ts"], r["ece_ts"])]
            lines.append(
                "Before scaling, clearly lower ECE than CE: "
                + (", ".join(beat_before) or "none")
                + ("; clearly higher: " + ", ".join(worse_before) if worse_before else "") + "."
            )
            lowest = (f"CE + TS itself ({_fmt(b1['ece_ts'], 'ece')}%)" if b1["loss"] == "ce" else
                      f"{b1['loss_label']} ({_fmt(b1['ece_ts'], 'ece')}%); clearly below CE + TS "
                      f"({_fmt(ce['ece_ts'], 'ece')}%): " + (", ".join(beat_after) or "none"))
            lines.append(
                f"After temperature scaling (T on validation NLL), lowest ECE {lowest}"
                + ("; clearly above: " + ", ".join(worse_after) if worse_after else "")
                + ". Every other loss is within noise of CE + TS."
            )
            accs = [r for r in valid if r["loss"] != "ce" and clearly_different(r["acc"], ce["acc"])]
            lines.append(
                "Test accuracy clearly different from CE's " + f"({_fmt(ce['acc'], 'acc')}%): "
                + (", ".join(f"{r['loss_label']} {_fmt(r['acc'], 'acc')}%" for r in accs)
                   if accs else "none; every loss is within noise of CE")
                + "."
            )
        # a loss whose every fit fell back was not scaled: scaling neither helped nor hurt it
        unscaled = {loss for loss in by if sum(rec["loss"] == loss for rec in fell)
                    == len(result.runs_for(task, loss))}
        scaled = [r for r in valid if r["loss"] not in unscaled]
        if scaled:
            effect = _scaling_effect(_scaling_hurt(scaled), one_seed=one_seed)
            if unscaled and effect.endswith("every loss."):
                effect = effect[:-1] + " it was applied to."
            lines.append(effect)
        lines += _theory_reading(trows, judge=not one_seed)
        if data.imbalanced:
            lines += _long_tail_reading(trows, label_shift=data.label_shift, judge=not one_seed)
        reading[task] = lines
    return reading


#: the temperature fits of a run (keys of its record's "fallback", the NLL fit, and
#: "kept_degenerate", the ECE fit, kept whatever the guard found)
FIT_NAMES = {"ts": "T on validation NLL, fell back to T = 1", "tsece": "T on validation ECE, kept"}


#: the guard's finding (a recalibrator's ``diagnostic_kind``), in words
REASON_KINDS = {"separable": "separable validation set", "bound": "a bound of T reached",
                "nll": "validation NLL worse than at T = 1"}


def _reason_kind(record: dict[str, Any], fit: str) -> str:
    """What the guard found in the temperature fit ``fit`` (a key of :data:`FIT_NAMES`) of a
    run, in words; the reason itself where the record holds no kind."""
    kind = _guard_found(record, "_kind").get(fit, "")
    return REASON_KINDS.get(kind, _guard_found(record)[fit])


def _guard_found(record: dict[str, Any], suffix: str = "") -> dict[str, str]:
    """What the guard found in a run's temperature fits, per fit (the reasons, or with
    ``suffix="_kind"`` their kinds): those that fell back and the kept ECE fit alike."""
    return {**record.get("fallback" + suffix, {}), **record.get("kept_degenerate" + suffix, {})}


def terminal_notes(result: StudyResult, rows: list[dict[str, Any]]) -> list[str]:
    """One line per finding the terminal must not hide, per task: temperature fits that fell
    back to T = 1 (how many, for which losses, why), and losses whose test ECE or NLL
    temperature scaling raised. report.md gives the details."""
    notes = []
    for task in result.tasks:
        trows = _task_rows(rows, task)
        if not trows:
            continue
        labels = {r["loss"]: r["loss_label"] for r in trows}
        fell, n_runs = _fell_back(result, task)
        if fell:
            losses = ", ".join(dict.fromkeys(labels.get(rec["loss"], rec["loss"]) for rec in fell))
            kinds = ", ".join(sorted({_reason_kind(rec, "ts") for rec in fell}))
            notes.append(f"{task}: temperature scaling (T on validation NLL) fell back to T = 1 in"
                         f" {len(fell)} of {n_runs} runs ({losses}; {kinds}); their TS columns"
                         " are the unscaled model's")
        hurt = _scaling_hurt([r for r in trows if not math.isnan(r["ece"][0])])
        if hurt:
            notes.append(f"{task}: {_scaling_effect(hurt, one_seed=_one_seed_rows(trows))}")
    return notes


def _scaling_hurt(valid: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The losses temperature scaling (T on validation NLL) left worse off on the test set: a
    higher mean test ECE or NLL over the seeds than before scaling. A fit on a small or
    separable validation set can move T far from the test set's optimum."""
    return [r for r in valid if r["ece_ts"][0] > r["ece"][0] or r["nll_ts"][0] > r["nll"][0]]


def _scaling_effect(hurt: list[dict[str, Any]], *, one_seed: bool = False) -> str:
    """The sentence of the reading on :func:`_scaling_hurt`'s losses (none: scaling helped)."""
    over = "one seed" if one_seed else "means over seeds"
    if not hurt:
        return ("Temperature scaling (T on validation NLL) lowered (or kept) both the test ECE and NLL"
                f" ({over}) of every loss.")
    parts = [
        f"{r['loss_label']} (ECE {_change(r['ece'][0], r['ece_ts'][0], 'ece')}%, "
        f"NLL {_change(r['nll'][0], r['nll_ts'][0], 'nll', 3)})"
        for r in hurt
    ]
    return (f"Temperature scaling (T on validation NLL) raised the test ECE or NLL ({over}) of: "
            + "; ".join(parts) + ". Its T comes from the validation set only.")


def _theory_reading(trows: list[dict[str, Any]], *, judge: bool = True) -> list[str]:
    """The sentences on the bound FL >= CE - gamma H and on each focal / confidence-penalty
    pair; ``judge=False`` (one seed) leaves out whether a pair differs clearly."""
    by = _by_loss(trows)
    lines = []
    bounds = [r for r in trows if "bound_holds" in r]
    if bounds:
        worst = min(r["bound_holds"][0] for r in bounds)
        lines.append(
            f"The bound FL ≥ CE − γH holds on {100 * worst:.1f}% of the test samples for the "
            "worst focal model (" + ", ".join(
                f"{r['loss_label']}: gap {r['bound_gap'][0]:.3f} nats, "
                f"{100 * r['bound_gap_rel'][0]:.0f}% of γH" for r in bounds) + ")."
        )
    for g, f, c in theory_pairs(trows):
        if not (f and c):
            continue
        a, b = by[f], by[c]
        same = [m for m, key in (("ECE", "ece"), ("T", "temperature"), ("H", "entropy"))
                if not clearly_different(a[key], b[key])]
        lines.append(
            f"γ = β = {g:g}: {a['loss_label']} has ECE {_fmt(a['ece'], 'ece')}%, T "
            f"{a['temperature'][0]:.2f}, H {a['entropy'][0]:.2f}; {b['loss_label']} has ECE "
            f"{_fmt(b['ece'], 'ece')}%, T {b['temperature'][0]:.2f}, H {b['entropy'][0]:.2f}"
            + ("" if not judge else f" (within noise in {', '.join(same)})" if same
               else " (clearly different in all three)")
            + "."
        )
    return lines


def _long_tail_reading(
    trows: list[dict[str, Any]], *, label_shift: bool = True, judge: bool = True
) -> list[str]:
    """The sentences on an imbalanced task: its priors, balanced accuracy and tail recall, and
    with a label shift the post-hoc logit adjustment. ``label_shift=False`` (a stratified split,
    as of user data) says that validation and test keep the training prior; the adjustment,
    which targets a balanced test prior, is not run there. ``judge=False`` (one seed) leaves
    out which losses or arms differ clearly."""
    by = _by_loss(trows)
    ce = by.get("ce")
    if ce is None:
        return []
    if label_shift:
        lines = ["Label shift: the training prior is long-tailed, the validation and test sets are "
                 "balanced, so T is fitted under the test prior."]
    else:
        lines = ["Imbalanced classes: the split is stratified, so the validation and test sets keep "
                 "the training prior and T is fitted under it; balanced accuracy and tail recall "
                 "weigh every class equally. No post-hoc logit adjustment: it targets a balanced "
                 "test prior, which this test set does not have."]
    moved = [r for r in trows if r["loss"] != "ce"
             and clearly_different(r["balanced_acc"], ce["balanced_acc"])]
    lines.append(
        f"Balanced accuracy of CE {_fmt(ce['balanced_acc'], 'acc')}% (tail recall "
        f"{_fmt(ce['tail_recall'], 'acc')}%)"
        + ("; clearly different: " + (", ".join(
            f"{r['loss_label']} {_fmt(r['balanced_acc'], 'acc')}% (tail "
            f"{_fmt(r['tail_recall'], 'acc')}%)" for r in moved) or "none") if judge else "")
        + "."
    )
    if label_shift and "balanced_acc_la" in ce:
        helped = [r["loss_label"] for r in trows
                  if r["balanced_acc_la"][0] > r["balanced_acc"][0]
                  and clearly_different(r["balanced_acc_la"], r["balanced_acc"])]
        tail_up = [r["loss_label"] for r in trows if r["tail_recall_lats"][0] > r["tail_recall"][0]
                   and clearly_different(r["tail_recall_lats"], r["tail_recall"])]
        helped_t = [r["loss_label"] for r in trows
                    if r["balanced_acc_lats"][0] > r["balanced_acc"][0]
                    and clearly_different(r["balanced_acc_lats"], r["balanced_acc"])]
        raw = (f"Post-hoc logit adjustment on the raw logits moves CE to "
               f"{_fmt(ce['balanced_acc_la'], 'acc')}% balanced accuracy (tail "
               f"{_fmt(ce['tail_recall_la'], 'acc')}%)")
        lats = (f"After the prior-corrected temperature (z/T − log π, T = "
                f"{ce['temperature_la'][0]:.2f} for CE) CE reaches "
                f"{_fmt(ce['balanced_acc_lats'], 'acc')}% (tail {_fmt(ce['tail_recall_lats'], 'acc')}%)")
        if not judge:
            lines.append(f"{raw}. {lats}.")
            return lines
        lines.append(
            raw + "; the losses whose balanced accuracy it clearly raises: " + (", ".join(helped) or "none")
            + ". " + lats
            + "; clearly above the raw logits in balanced accuracy: " + (", ".join(helped_t) or "none")
            + "; in tail recall: " + (", ".join(tail_up) or "none") + "."
            + (" Where tail recall rises and balanced accuracy does not, the adjustment trades "
               "head-class recall for tail-class recall." if tail_up and not helped_t else "")
        )
    return lines


def _distill_reading(result: StudyResult, rows: list[dict[str, Any]], task: str) -> list[str]:
    by = _by_loss(_task_rows(rows, task))
    data = result.tasks[task]
    teachers = _by_loss(_task_rows(rows, data.teacher_task or ""))
    lines = []
    if "ce" in by:
        lines.append(f"Regime: the student model on the hard labels ({_regime(by['ce'])}); "
                     f"distillation temperature τ = {KD_TEMPERATURE:g}.")
    for name, r in by.items():
        if name.startswith("kd-"):
            t = teachers.get(name[3:])
            lines.append(
                f"{r['loss_label']} ({r['model']}): {_fmt(r['acc'], 'acc')}% test accuracy, ECE "
                f"{_fmt(r['ece'], 'ece')}%, T {r['temperature'][0]:.2f}"
                + (f"; its teacher ({t['model']}) {_fmt(t['acc'], 'acc')}%, teacher's H "
                   f"{t['entropy'][0]:.2f} nats" if t else "") + "."
            )
    a, b = by.get("kd-ce"), by.get("kd-ls-0.1")
    if a and b and (_one_seed(a["acc"]) or _one_seed(b["acc"])):
        lines.append(
            f"The student of the label-smoothed teacher reaches {_fmt(b['acc'], 'acc')}% test "
            f"accuracy, the student of the CE teacher {_fmt(a['acc'], 'acc')}% (one seed: no "
            "interval, so neither is called clearly better or within noise; run more --seeds)."
        )
    elif a and b:
        verdict = ("clearly worse" if _clearly_lower(b["acc"], a["acc"]) else
                   "clearly better" if _clearly_lower(a["acc"], b["acc"]) else "within noise of")
        lines.append(
            f"The student of the label-smoothed teacher is {verdict} the student of the CE "
            f"teacher in accuracy ({_fmt(b['acc'], 'acc')}% vs {_fmt(a['acc'], 'acc')}%)."
        )
    return lines


# --------------------------------------------------------------------------- figures


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name)


#: seeds up to which the reliability figure lists every seed's temperature
LISTED_TEMPERATURES = 5


def _temperatures(runs: list[RunResult]) -> str:
    """The temperatures of the seeds pooled in a reliability figure: each seed's own T (a T
    that fell back to 1 marked), or their range beyond :data:`LISTED_TEMPERATURES` seeds."""
    fell = [_ts_fell_back(r.record) for r in runs]
    if len(runs) <= LISTED_TEMPERATURES:
        return "T = " + ", ".join("1 (fell back)" if f else f"{r.temperature:.2f}"
                                  for r, f in zip(runs, fell, strict=True))
    ts = [r.temperature for r in runs]
    text = f"T = {min(ts):.2f} to {max(ts):.2f} over {len(runs)} seeds"
    return text + (f", {sum(fell)} fell back to 1" if any(fell) else "")


def plot_reliability(result: StudyResult, task: str, loss: str, *, n_bins: int = 15) -> Any:
    """Reliability diagrams of one (task, loss), before and after temperature scaling.

    The test predictions of all seeds are pooled (each seed scaled by its own T, each with
    its own test labels); drawn by :func:`crossent.calibration.compare_reliability_diagrams`.
    The "after" panel lists the seeds' temperatures (marking those whose fit fell back to
    T = 1), and the title says that the figure pools the seeds where the tables average them.
    """
    import textwrap

    from crossent.calibration import compare_reliability_diagrams

    runs = [r for r in result.runs_for(task, loss) if math.isfinite(r.temperature)]
    if not runs:
        return None
    data = result.tasks[task]
    labels = np.concatenate([data.y_test if r.test_labels is None else r.test_labels for r in runs])
    probs = np.concatenate([softmax(r.test_logits.astype(np.float64)) for r in runs])
    probs_ts = np.concatenate(
        [softmax(r.test_logits.astype(np.float64) / r.temperature) for r in runs]
    )
    label = runs[0].record["loss_label"]
    fig = compare_reliability_diagrams(
        {"before scaling": probs, f"after scaling ({_temperatures(runs)})": probs_ts},
        labels,
        n_bins=n_bins,
    )
    model = runs[0].record.get("model", "")
    title = (f"{task} · {model} · {label} · test set, one seed (the ECE of the tables)" if len(runs) == 1
             else f"{task} · {model} · {label} · test set, {len(runs)} seeds pooled (the ECE of the pooled "
             "predictions; the tables give the mean over seeds)")
    width = int(fig.get_figwidth() * 9)  # characters per line at 11 pt: nothing runs off
    fig.suptitle(textwrap.fill(title, width), fontsize=11)
    return fig


def plot_ece_bars(
    result: StudyResult, rows: list[dict[str, Any]], task: str, *, n_bins: int = 15
) -> Any:
    """Grouped bars: ECE before and after temperature scaling, per loss (error bar: 95% h).
    ``n_bins`` is the number of bins the rows' ECE was computed with (the study's
    ``n_bins``), named on the y axis."""
    from crossent._extras import require

    figure = require("matplotlib.figure", "the figures of crossent run")
    trows = _task_rows(rows, task)
    x = np.arange(len(trows))
    fig = figure.Figure(figsize=(max(5.0, 0.75 * len(trows) + 2), 3.6), layout="constrained")
    ax = fig.subplots()
    w = 0.27
    for off, key, lab, color in ((-w, "ece", "before scaling", "#d62728"),
                                 (0.0, "ece_ts", "after scaling (T: NLL)", "#1f77b4"),
                                 (w, "ece_tsece", "after scaling (T: ECE)", "#2ca02c")):
        means = [100 * r[key][0] for r in trows]
        errs = [100 * r[key][2] for r in trows]
        ax.bar(x + off, means, w, yerr=_cut_at_zero(means, errs), capsize=3, label=lab, color=color,
               alpha=0.85)
    ax.set_xticks(x, [r["loss_label"] for r in trows], rotation=30, ha="right", fontsize=8)
    ax.set_ylabel(f"ECE-{n_bins} (%)")
    ax.set_title(f"{task}: test ECE before / after temperature scaling\n({_spread_words(trows)})",
                 fontsize=10)
    ax.legend(fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    return fig


def _cut_at_zero(means: list[float], half_widths: list[float]) -> list[list[float]]:
    """``yerr`` (below, above) of intervals ``mean +- h`` of a quantity that is never negative
    (an ECE, a temperature, an entropy): the lower end is drawn at 0 at most (two seeds give a
    t-interval wider than the mean)."""
    below = [min(h, m) if math.isfinite(m) else h for m, h in zip(means, half_widths, strict=True)]
    return [below, half_widths]


def plot_theory(rows: list[dict[str, Any]], task: str, *, n_bins: int = 15) -> Any:
    """Focal loss gamma against its lower bound CE - beta H (beta = gamma): ECE before scaling,
    the fitted T and the mean predictive entropy as functions of the strength, CE at 0.
    ``n_bins`` is the number of bins the rows' ECE was computed with (the study's ``n_bins``),
    named in the ECE panel's title."""
    from crossent._extras import require

    trows = _task_rows(rows, task)
    pairs = theory_pairs(trows)
    by = _by_loss(trows)
    # as the table (_theory_table): only a task with a focal loss and the confidence penalty of
    # the same strength answers the figure's question
    if not any(f and c for _, f, c in pairs) or "ce" not in by:
        return None
    figure = require("matplotlib.figure", "the figures of crossent run")
    fig = figure.Figure(figsize=(11, 3.4), layout="constrained")
    axes = fig.subplots(1, 3)
    for which, marker, color, label in ((1, "o", "#d62728", "focal loss, γ"),
                                        (2, "s", "#1f77b4", "CE − βH (conf. penalty), β")):
        names = [(g, (f, c)[which - 1]) for g, f, c in pairs]
        pts = [(0.0, by["ce"])] + [(g, by[name]) for g, name in names if name is not None]
        xs = [g for g, _ in pts]
        for ax, key, scale in zip(axes, ("ece", "temperature", "entropy"), (100.0, 1.0, 1.0),
                                  strict=True):
            ys = [scale * r[key][0] for _, r in pts]
            es = [scale * r[key][2] for _, r in pts]
            ax.errorbar(xs, ys, yerr=_cut_at_zero(ys, es), marker=marker, color=color, label=label,
                        capsize=3)
    for ax, title in zip(axes, (f"ECE-{n_bins} before scaling (%)", "fitted temperature T (NLL)",
                                "mean predictive entropy H (nats)"), strict=True):
        ax.set_xlabel("strength γ = β")
        ax.set_title(title, fontsize=9)
        ax.grid(alpha=0.3)
    axes[1].axhline(1.0, color="grey", lw=0.8, ls="--")
    axes[0].legend(fontsize=8)
    fig.suptitle(f"{task}: does focal loss γ behave like CE − γH? (test set, {_spread_words(trows)})",
                 fontsize=10)
    return fig


def _spread_words(trows: list[dict[str, Any]]) -> str:
    """What a figure's bars or points and their error bars are: one seed has no interval."""
    if _one_seed_rows(trows):
        return "one seed, no interval"
    return "mean ± 95% interval, cut at 0"


def pt_curves(
    p: np.ndarray, num_classes: int = 10
) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    r"""Per-sample loss and :math:`|\partial L / \partial z_y|` as functions of :math:`p_t`.

    Construction: ``num_classes`` classes, true class 0 with probability :math:`p_t` and the
    remaining mass spread uniformly over the other classes, i.e. logits
    :math:`z = (\log p_t, \log\frac{1-p_t}{K-1}, \dots)`. Loss and gradient come from
    :func:`crossent.cross_entropy` (``reduction="none"``) and autograd. With this
    construction CE and focal depend on :math:`p_t` only; label smoothing also depends on how
    the rest of the mass is spread (uniform here).
    """
    import crossent

    pt = torch.as_tensor(p, dtype=torch.float64)
    rest = torch.log((1 - pt) / (num_classes - 1))
    z = torch.stack([torch.log(pt), *[rest] * (num_classes - 1)], dim=1)
    target = torch.zeros(len(pt), dtype=torch.int64)
    specs: dict[str, dict[str, Any]] = {
        "CE": {},
        "LS ε=0.1": {"label_smoothing": 0.1},
        "focal γ=0.5": {"gamma": 0.5},
        "focal γ=1": {"gamma": 1.0},
        "focal γ=2": {"gamma": 2.0},
        "focal γ=5": {"gamma": 5.0},
    }
    out = {}
    for name, kw in specs.items():
        zz = z.clone().requires_grad_(True)
        loss = crossent.cross_entropy(zz, target, reduction="none", **kw)
        (grad,) = torch.autograd.grad(loss.sum(), zz)
        out[name] = (loss.detach().numpy(), grad[:, 0].abs().numpy())
    return out


def plot_loss_gradient_pt(num_classes: int = 10) -> Any:
    r"""Loss and gradient magnitude :math:`|\partial L/\partial z_y|` against :math:`p_t`."""
    from crossent._extras import require

    figure = require("matplotlib.figure", "the figures of crossent run")
    p = np.linspace(1e-3, 1 - 1e-3, 400)
    curves = pt_curves(p, num_classes)
    fig = figure.Figure(figsize=(10, 4), layout="constrained")
    axes = fig.subplots(1, 2)
    for name, (loss, grad) in curves.items():
        style = "--" if name.startswith("LS") else "-"
        axes[0].plot(p, loss, style, label=name)
        axes[1].plot(p, grad, style, label=name)
    axes[0].set_ylim(0, 5)
    axes[0].set_ylabel("per-sample loss")
    axes[1].set_ylabel(r"$|\partial L / \partial z_y|$")
    for ax in axes:
        ax.set_xlabel(r"true-class probability $p_t$")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle(
        f"Loss and gradient vs $p_t$ ({num_classes} classes, the other classes share "
        r"$1-p_t$ equally)", fontsize=10)
    return fig


# --------------------------------------------------------------------------- folder


def _environment() -> dict[str, Any]:
    import crossent

    return {
        "crossent": crossent.__version__,
        "torch": torch.__version__,
        "numpy": np.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "time_utc": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }


def _json_clean(x: Any) -> Any:
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, dict):
        return {k: _json_clean(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_json_clean(v) for v in x]
    if isinstance(x, np.generic):
        return _json_clean(x.item())
    return x


def _csv_rows(result: StudyResult) -> tuple[list[str], list[list[Any]]]:
    """results.csv: per run, every arm's metrics, then their bootstrap stds over test points
    (``<metric><arm>_boot_sd``), the temperatures and which fits fell back (``ts:separable``)
    or were kept degenerate (the ECE fit)."""
    records = result.records
    keys = [(arm, m) for arm in ARMS for m in (*METRICS, "entropy")
            if any(arm in r for r in records)]
    boot = [(arm, m) for arm in ARMS for m in BOOTSTRAP_METRICS
            if any(arm in r.get("boot", {}) for r in records)]
    temps = [t for t in ("temperature", "temperature_ece", "temperature_la") if any(t in r for r in records)]
    head = ["task", "loss", "seed", "model", "epochs", "train_acc", *temps, "fallback", "kept_degenerate",
            "time_s", "diverged", *[m + ARMS[arm] for arm, m in keys],
            *[m + ARMS[arm] + "_boot_sd" for arm, m in boot]]

    def findings(r: dict[str, Any], key: str) -> str:
        return ";".join(f"{arm}:{kind}" for arm, kind in r.get(key + "_kind", {}).items())

    body = []
    for r in records:
        body.append([r["task"], r["loss"], r["seed"], r.get("model", ""), r["epochs"], r["train_acc"],
                     *[r.get(t, "") for t in temps], findings(r, "fallback"), findings(r, "kept_degenerate"),
                     round(r["time_s"], 3), r["diverged"],
                     *[r[arm][m] if arm in r else "" for arm, m in keys],
                     *[r["boot"][arm][m] if arm in r.get("boot", {}) else "" for arm, m in boot]])
    return head, body


def write_run_folder(
    result: StudyResult,
    out_dir: str | Path,
    *,
    figures: bool = True,
    rows: list[dict[str, Any]] | None = None,
    command: str | None = None,
) -> dict[str, Path]:
    """Write every output file into ``out_dir`` (created if needed); return name -> path."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rows = aggregate(result) if rows is None else rows
    reading = automatic_reading(result, rows)
    written: dict[str, Path] = {}

    payload = {
        "command": command,
        "config": config_dict(result.config),
        "environment": _environment(),
        "wall_time_s": result.wall_time_s,
        "tasks": {
            name: {"description": d.description, "n_train": len(d.y_train),
                   "n_val": len(d.y_val), "n_test": len(d.y_test),
                   "num_classes": d.num_classes, "num_features": d.num_features,
                   "class_names": d.class_names, "imbalanced": d.imbalanced,
                   "label_shift": d.label_shift,
                   "train_counts": d.train_counts.tolist()}
            for name, d in result.tasks.items()
        },
        "runs": result.records,
        "summary": rows,
        "reading": reading,
    }
    p = out / "results.json"
    p.write_text(json.dumps(_json_clean(payload), indent=2, ensure_ascii=False) + "\n",
                 encoding="utf-8")
    written["results.json"] = p

    head, body = _csv_rows(result)
    p = out / "results.csv"
    with p.open("w", newline="", encoding="utf-8") as fh:
        w = csv.writer(fh)
        w.writerow(head)
        w.writerows(body)
    written["results.csv"] = p

    p = out / "summary.csv"
    keys = list(dict.fromkeys(k for r in rows for k, v in r.items() if isinstance(v, list)))
    with p.open("w", newline="", encoding="utf-8") as fh:
        w = csv.writer(fh)
        w.writerow(["task", "loss", "model", "n_seeds",
                    *[f"{k}_{s}" for k in keys for s in ("mean", "std", "ci95")]])
        for r in rows:
            w.writerow([r["task"], r["loss"], r["model"], r["n_seeds"],
                        *[v for k in keys for v in r.get(k, [""] * 3)]])
    written["summary.csv"] = p

    arrays: dict[str, np.ndarray] = {}
    # A task's own test labels only where some run has no labels of its own: a run whose seed
    # drew its own split has them beside its logits, and another seed's would not match them.
    shared = {run.record["task"] for run in result.runs if run.test_labels is None}
    for name, d in result.tasks.items():
        if name in shared:
            arrays[f"{name}/labels"] = d.y_test
    for run in result.runs:
        r = run.record
        key = f"{r['task']}/{r['loss']}/seed{r['seed']}"
        arrays[f"{key}/logits"] = run.test_logits
        if run.test_labels is not None:
            arrays[f"{key}/labels"] = run.test_labels
        arrays[f"{key}/temperature"] = np.asarray(run.temperature)
    p = out / "predictions.npz"
    np.savez_compressed(p, **arrays)  # type: ignore[arg-type]
    written["predictions.npz"] = p

    fig_paths: list[Path] = []
    if figures:
        fig_paths = _write_figures(result, rows, out / "figures", n_bins=result.config.n_bins)
        for f in fig_paths:
            written[f"figures/{f.name}"] = f

    p = out / "report.md"
    p.write_text(_report_md(result, rows, reading, fig_paths, out, command), encoding="utf-8")
    written["report.md"] = p
    return written


def _write_figures(
    result: StudyResult, rows: list[dict[str, Any]], fig_dir: Path, *, n_bins: int
) -> list[Path]:
    # Figures are built as matplotlib.figure.Figure objects (Agg canvas, no pyplot state),
    # so nothing here needs a display or changes the user's backend.
    fig_dir.mkdir(parents=True, exist_ok=True)
    paths: list[Path] = []

    def save(fig: Any, name: str) -> None:
        if fig is None:
            return
        path = fig_dir / name
        fig.savefig(path, dpi=90)
        paths.append(path)

    save(plot_loss_gradient_pt(), "loss_gradient_pt.png")
    for task in result.tasks:
        if not any(r["task"] == task for r in rows):
            continue
        save(plot_ece_bars(result, rows, task, n_bins=n_bins), f"ece_{_safe(task)}.png")
        save(plot_theory(rows, task, n_bins=n_bins), f"theory_{_safe(task)}.png")
        for loss in _reliability_losses(result, rows, task):
            save(plot_reliability(result, task, loss, n_bins=n_bins),
                 f"reliability_{_safe(task)}_{_safe(loss)}.png")
    return paths


def _reliability_losses(result: StudyResult, rows: list[dict[str, Any]], task: str) -> list[str]:
    """The losses of ``task`` whose reliability diagram is drawn: every loss, or with
    ``--quick`` one (each diagram takes ~0.5 s), CE's where CE was run and else the first
    loss's, so that no quick run is left without one."""
    losses = [r["loss"] for r in rows if r["task"] == task]
    if not result.config.quick or not losses:
        return losses
    return ["ce" if "ce" in losses else losses[0]]


def _report_md(
    result: StudyResult,
    rows: list[dict[str, Any]],
    reading: dict[str, list[str]],
    fig_paths: list[Path],
    out: Path,
    command: str | None,
) -> str:
    cfg = result.config
    n_runs = len(result.runs)
    models = ", ".join(f"{t} {cfg.model_for(t)} (lr {cfg.lr_for(cfg.model_for(t)):g}, "
                       f"{cfg.epochs_for(t)} epochs)" for t in result.tasks)
    lines = [
        "# crossent run: report",
        "",
        *([f"Command: `{command}`", ""] if command else []),
        f"{n_runs} runs ({len(result.tasks)} task(s) x losses x {len(cfg.seeds)} seed(s): "
        f"{', '.join(map(str, cfg.seeds))}); models: {models}; Adam, batch {cfg.batch_size}; "
        f"training and evaluation took {result.wall_time_s:.0f} s of wall time.",
        "",
        f"Metrics on the test set; ECE-{cfg.n_bins} with {cfg.n_bins} equal-width bins, AdaECE with "
        f"{cfg.n_bins} equal-mass bins, cw-ECE classwise with {cfg.n_bins} bins per class (all in "
        "%); Brier is the multiclass sum (0-2); H is the mean entropy "
        "of the predictions in nats. Temperature T is fitted on the validation set only, by NLL "
        "(Guo et al.) and, for the Mukhoti-comparable column, by grid search on ECE.",
        "",
        "**Statistics.** " + STATISTICS_NOTE
        + (" " + ONE_SEED_NOTE if len(cfg.seeds) == 1 else "")
        + (f" Seed s uses the data split of data seed {cfg.data_seed} + s." if cfg.split_per_seed
           else f" Every seed uses the split of data seed {cfg.data_seed}."),
        "",
    ]
    # one line per fit and reason, naming its runs: seeds that share a split share the reason
    fallbacks: dict[tuple[str, str], list[str]] = {}
    for r in result.runs:
        for k, v in _guard_found(r.record).items():
            run = f"{r.record['task']}/{r.record['loss']}/seed{r.record['seed']}"
            fallbacks.setdefault((k, v), []).append(run)
    if fallbacks:
        lines += ["Degenerate temperature fits (the NLL fit then falls back to T = 1; the ECE fit"
                  " of Mukhoti et al.'s protocol is kept):", ""]
        lines += [f"- {FIT_NAMES[k]} in {', '.join(runs)}: {v}." for (k, v), runs in fallbacks.items()]
        lines.append("")
    lines += ["## Automatic reading", ""]
    for task, items in reading.items():
        lines.append(f"**{task}**")
        lines.append("")
        lines += [f"- {s}" for s in items]
        lines.append("")
    muk = mukhoti_table(result, rows)
    if muk:
        lines += ["## Next to Mukhoti et al. 2020 (CIFAR-10, ResNet-50)", "", muk, ""]
    lines += ["## Tables", "", markdown_tables(result, rows), ""]
    if fig_paths:
        lines += ["## Figures", "", _figures_note(result, fig_paths), ""]
        for f in fig_paths:
            rel = f.relative_to(out).as_posix()
            lines.append(f"![{f.stem}]({rel})")
        lines.append("")
    return "\n".join(lines)


def _figures_note(result: StudyResult, fig_paths: list[Path]) -> str:
    """What the figures aggregate, where it differs from the tables (the reliability
    diagrams pool the seeds' predictions), and what their T = 1 (fell back) marks mean."""
    one_seed = len(result.config.seeds) == 1
    drawn = "ECE bars and the focal-loss figure" if any(f.stem.startswith("theory_") for f in fig_paths) \
        else "ECE bars"
    note = (f"{drawn}: one seed's values (no interval), as in the tables." if one_seed else
            f"{drawn}: mean over seeds ± 95% half-width, as in the tables.")
    if any(f.stem.startswith("reliability_") for f in fig_paths):
        note += (" Reliability diagrams: the seed's test predictions scaled by its T, the ECE of the tables."
                 if one_seed else
                 " Reliability diagrams: the test predictions of all seeds pooled, each seed "
                 "scaled by its own T (listed in the \"after\" panel); their ECE is that of "
                 "the pooled predictions, the tables' ECE the mean over seeds, so the two can "
                 "differ.")
        note += f" Bar numbers are samples per bin; faint bins hold fewer than {LOW_COUNT}."
        if any(_ts_fell_back(run.record) for run in result.runs):
            note += (" A seed marked \"1 (fell back)\" kept T = 1: its NLL temperature fit "
                     "fell back to the identity (the reasons are above).")
    return note
