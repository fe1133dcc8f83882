"""The run folder of ``crossent run``: results.json / .csv, report.md and figures.

Files written by :func:`write_run_folder`:

``results.json``   config, environment, per-run records and the aggregated rows
``results.csv``    one row per (task, loss, seed): every metric before and after scaling
``summary.csv``    one row per (task, loss): mean and std over seeds
``predictions.npz`` test logits of every run (``<task>/<loss>/seed<k>/logits``), test labels
                   (``<task>/labels``) and fitted temperatures, for ``crossent calibrate``
``report.md``      tables (mean +- std) per task and the automatic reading
``figures/``       ``reliability_<task>_<loss>.png`` (before / after temperature scaling,
                   the seeds' test predictions pooled), ``ece_<task>.png`` (ECE before /
                   after scaling per loss) and ``loss_gradient_pt.png`` (loss and gradient
                   magnitude against the true-class probability :math:`p_t`)
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

from crossent.experiments._metrics import METRICS, softmax
from crossent.experiments.runner import StudyResult, aggregate, config_dict

__all__ = [
    "automatic_reading",
    "markdown_tables",
    "plot_ece_bars",
    "plot_loss_gradient_pt",
    "plot_reliability",
    "rich_tables",
    "write_run_folder",
]

#: Metrics shown in percent.
PERCENT = {"acc", "balanced_acc", "macro_f1", "tail_recall", "ece", "adaece", "cw_ece"}
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
    "temperature": "T",
}
#: T within this distance of 1 counts as "no rescaling needed".
T_TOLERANCE = 0.05


def _fmt(ms: Sequence[float], metric: str, *, digits: int | None = None) -> str:
    mean, std = ms
    if mean is None or (isinstance(mean, float) and math.isnan(mean)):
        return "n/a"
    scale = 100.0 if metric in PERCENT else 1.0
    d = digits if digits is not None else (2 if metric in PERCENT or metric == "temperature"
                                           else 3)
    return f"{mean * scale:.{d}f} ± {std * scale:.{d}f}"


def _cell(ms: Sequence[float], metric: str, digits: int) -> str:
    """Compact ``mean±std`` for the terminal, the std dimmed."""
    mean, std = ms
    if mean is None or (isinstance(mean, float) and math.isnan(mean)):
        return "n/a"
    scale = 100.0 if metric in PERCENT else 1.0
    return f"{mean * scale:.{digits}f}[dim]±{std * scale:.{digits}f}[/]"


def _task_columns(imbalanced: bool) -> list[str]:
    acc = ["acc", "balanced_acc", "macro_f1", "tail_recall"] if imbalanced else ["acc"]
    return [*acc, "nll", "brier", "ece", "adaece", "cw_ece"]


def _is_imbalanced(result: StudyResult, task: str) -> bool:
    return bool(result.tasks[task].imbalanced)


# --------------------------------------------------------------------------- tables


def markdown_tables(result: StudyResult, rows: list[dict[str, Any]]) -> str:
    """Per task: a table before scaling (with T) and a table after temperature scaling."""
    out: list[str] = []
    for task, data in result.tasks.items():
        trows = [r for r in rows if r["task"] == task]
        if not trows:
            continue
        cols = _task_columns(data.imbalanced)
        out.append(f"### {task}\n\n{data.summary()}. {data.description}.\n")
        head = ["Loss", *[NAMES[c] for c in cols], "T", "Train acc %"]
        out.append("Before temperature scaling (test set, mean ± std over "
                   f"{trows[0]['n_seeds']} seed(s)):\n")
        out.append("| " + " | ".join(head) + " |")
        out.append("|" + "|".join(["---"] + ["---:"] * (len(head) - 1)) + "|")
        for r in trows:
            cells = [r["loss_label"], *[_fmt(r[c], c) for c in cols],
                     _fmt(r["temperature"], "temperature"), _fmt(r["train_acc"], "acc", digits=1)]
            out.append("| " + " | ".join(cells) + " |")
        cal_cols = ["nll", "brier", "ece", "adaece", "cw_ece"]
        head_ts = ["Loss", *[NAMES[c] for c in cal_cols], "ECE % before → after"]
        out.append("\nAfter temperature scaling (T fitted on the validation set; accuracy "
                   "is unchanged):\n")
        out.append("| " + " | ".join(head_ts) + " |")
        out.append("|" + "|".join(["---"] + ["---:"] * (len(head_ts) - 1)) + "|")
        for r in trows:
            arrow = f"{100 * r['ece'][0]:.2f} → {100 * r['ece_ts'][0]:.2f}"
            cells = [r["loss_label"], *[_fmt(r[f"{c}_ts"], c) for c in cal_cols], arrow]
            out.append("| " + " | ".join(cells) + " |")
        out.append("")
    return "\n".join(out)


def rich_tables(result: StudyResult, rows: list[dict[str, Any]]) -> list[Any]:
    """One :class:`rich.table.Table` per task, for the terminal (report.md has every column)."""
    from rich.table import Table

    tables = []
    for task, data in result.tasks.items():
        trows = [r for r in rows if r["task"] == task]
        if not trows:
            continue
        acc_cols = ["acc", "balanced_acc", "tail_recall"] if data.imbalanced else ["acc"]
        table = Table(
            title=f"[bold]{task}[/]: test set, mean ± std over {trows[0]['n_seeds']} seed(s)",
            caption="ECE, AdaECE, cw-ECE in % (15 bins); T fitted on validation; "
                    "TS = after temperature scaling; best ECE in green",
            header_style="bold",
            pad_edge=False,
        )
        table.add_column("Loss", no_wrap=True)
        heads = {"acc": "Acc %", "balanced_acc": "BalAcc %", "tail_recall": "Tail %"}
        for c in acc_cols:
            table.add_column(heads[c], justify="right", no_wrap=True)
        for name in ("NLL", "Brier", "ECE %", "AdaECE %", "cwECE %", "T", "ECE % TS",
                     "AdaECE % TS", "NLL TS"):
            table.add_column(name, justify="right", no_wrap=True,
                             style="cyan" if "TS" in name else None)
        best_ece = min(trows, key=lambda r: _nan_high(r["ece"][0]))["loss"]
        best_ts = min(trows, key=lambda r: _nan_high(r["ece_ts"][0]))["loss"]
        for r in trows:
            ece = _cell(r["ece"], "ece", 2)
            ece_ts = _cell(r["ece_ts"], "ece", 2)
            table.add_row(
                r["loss_label"],
                *[_cell(r[c], c, 1) for c in acc_cols],
                _cell(r["nll"], "nll", 3),
                _cell(r["brier"], "brier", 3),
                f"[bold green]{ece}[/]" if r["loss"] == best_ece else ece,
                _cell(r["adaece"], "adaece", 2),
                _cell(r["cw_ece"], "cw_ece", 2),
                _cell(r["temperature"], "temperature", 2),
                f"[bold green]{ece_ts}[/]" if r["loss"] == best_ts else ece_ts,
                _cell(r["adaece_ts"], "adaece", 2),
                _cell(r["nll_ts"], "nll", 3),
            )
        tables.append(table)
    return tables


def _nan_high(x: float) -> float:
    return math.inf if x is None or math.isnan(x) else x


# --------------------------------------------------------------------------- reading


def _clearly_lower(a: Sequence[float], b: Sequence[float]) -> bool:
    """``a`` below ``b`` by more than the sum of their seed stds (a deliberately crude rule)."""
    return a[0] + a[1] < b[0] - b[1]


def automatic_reading(result: StudyResult, rows: list[dict[str, Any]]) -> dict[str, list[str]]:
    """Short sentences per task, derived from the numbers only.

    A difference is called *clear* when the two means differ by more than the sum of their
    standard deviations over seeds; otherwise it is *within seed noise*.
    """
    reading: dict[str, list[str]] = {}
    for task, data in result.tasks.items():
        trows = [r for r in rows if r["task"] == task]
        if not trows:
            continue
        lines: list[str] = []
        by = {r["loss"]: r for r in trows}
        ce = by.get("ce")
        valid = [r for r in trows if not math.isnan(r["ece"][0])]
        if not valid:
            reading[task] = ["every run diverged; nothing to read."]
            continue
        if ce is not None:
            lines.append(
                f"CE reaches {100 * ce['train_acc'][0]:.1f}% train accuracy and "
                f"{100 * ce['acc'][0]:.1f}% test accuracy"
                + (" (it overfits: train accuracy ~100%)." if ce["train_acc"][0] >= 0.995
                   else " (it does not reach 100% train accuracy in this budget).")
            )
        b0 = min(valid, key=lambda r: r["ece"][0])
        b1 = min(valid, key=lambda r: _nan_high(r["ece_ts"][0]))
        worst0 = max(valid, key=lambda r: r["ece"][0])
        lines.append(
            f"Lowest ECE before scaling: **{b0['loss_label']}** "
            f"({_fmt(b0['ece'], 'ece')}%); highest: {worst0['loss_label']} "
            f"({_fmt(worst0['ece'], 'ece')}%)."
        )
        lines.append(
            f"Lowest ECE after temperature scaling: **{b1['loss_label']}** "
            f"({_fmt(b1['ece_ts'], 'ece')}%)."
        )
        ada0 = min(valid, key=lambda r: r["adaece"][0])
        if ada0["loss"] != b0["loss"]:
            lines.append(
                f"AdaECE (equal-mass bins) ranks a different loss first before scaling: "
                f"{ada0['loss_label']} ({_fmt(ada0['adaece'], 'adaece')}%)."
            )
        if ce is not None and not math.isnan(ce["temperature"][0]):
            t, s = ce["temperature"]
            if t > 1 + T_TOLERANCE:
                verdict = "T > 1: CE is overconfident, and scaling softens its predictions"
            elif t < 1 - T_TOLERANCE:
                verdict = "T < 1: CE is underconfident, and scaling sharpens its predictions"
            else:
                verdict = f"T ≈ 1 (within {T_TOLERANCE}): CE is already close to calibrated"
            lines.append(
                f"CE's fitted temperature is {t:.2f} ± {s:.2f}; {verdict}. Scaling moves CE's "
                f"ECE from {100 * ce['ece'][0]:.2f}% to {100 * ce['ece_ts'][0]:.2f}% and its "
                f"NLL from {ce['nll'][0]:.3f} to {ce['nll_ts'][0]:.3f}."
            )
        under = [r["loss_label"] for r in valid if r["temperature"][0] < 1 - T_TOLERANCE]
        over = [r["loss_label"] for r in valid if r["temperature"][0] > 1 + T_TOLERANCE]
        if under:
            lines.append(f"T < 1 (underconfident before scaling): {', '.join(under)}.")
        if over:
            lines.append(f"T > 1 (overconfident before scaling): {', '.join(over)}.")
        helped = [r for r in valid if r["ece_ts"][0] < r["ece"][0]]
        lines.append(
            f"Temperature scaling lowers ECE for {len(helped)} of {len(valid)} losses."
        )
        if ce is not None:
            beat_before = [r["loss_label"] for r in valid
                           if r["loss"] != "ce" and _clearly_lower(r["ece"], ce["ece"])]
            beat_after = [r["loss_label"] for r in valid
                          if r["loss"] != "ce" and _clearly_lower(r["ece_ts"], ce["ece_ts"])]
            worse_after = [r["loss_label"] for r in valid
                           if r["loss"] != "ce" and _clearly_lower(ce["ece_ts"], r["ece_ts"])]
            lines.append(
                "Clearly lower ECE than CE before scaling: "
                + (", ".join(beat_before) if beat_before else "none") + ". "
                "After scaling both: "
                + (", ".join(beat_after) if beat_after else "none (within seed noise or worse)")
                + (f"; clearly higher than CE + TS: {', '.join(worse_after)}" if worse_after
                   else "") + "."
            )
            best_acc = max(valid, key=lambda r: r["acc"][0])
            if best_acc["loss"] != "ce":
                rel = ("clearly" if _clearly_lower(ce["acc"], best_acc["acc"])
                       else "within seed noise")
                lines.append(
                    f"Highest test accuracy: {best_acc['loss_label']} "
                    f"({_fmt(best_acc['acc'], 'acc')}%), {rel} above CE "
                    f"({_fmt(ce['acc'], 'acc')}%)."
                )
            else:
                lines.append(f"CE has the highest test accuracy ({_fmt(ce['acc'], 'acc')}%).")
        if data.imbalanced:
            bb = max(valid, key=lambda r: r["balanced_acc"][0])
            bt = max(valid, key=lambda r: r["tail_recall"][0])
            lines.append(
                f"Imbalanced task: highest balanced accuracy {bb['loss_label']} "
                f"({_fmt(bb['balanced_acc'], 'acc')}%), highest tail-class recall "
                f"{bt['loss_label']} ({_fmt(bt['tail_recall'], 'acc')}%)"
                + (f"; CE's tail recall is {_fmt(ce['tail_recall'], 'acc')}%" if ce else "")
                + "."
            )
            if len(helped) < len(valid) / 2:
                lines.append(
                    "Here the validation set follows the long-tailed training distribution "
                    "while the test set is balanced: a temperature fitted under one label "
                    "distribution need not calibrate another (label shift), and on this task "
                    "it mostly does not."
                )
        reading[task] = lines
    return reading


# --------------------------------------------------------------------------- figures


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name)


def plot_reliability(result: StudyResult, task: str, loss: str, *, n_bins: int = 15) -> Any:
    """Reliability diagrams of one (task, loss), before and after temperature scaling.

    The test predictions of all seeds are pooled (each seed scaled by its own T); drawn by
    :func:`crossent.calibration.compare_reliability_diagrams`.
    """
    from crossent.calibration import compare_reliability_diagrams

    runs = [r for r in result.runs_for(task, loss) if math.isfinite(r.temperature)]
    if not runs:
        return None
    data = result.tasks[task]
    labels = np.concatenate([data.y_test for _ in runs])
    probs = np.concatenate([softmax(r.test_logits.astype(np.float64)) for r in runs])
    probs_ts = np.concatenate(
        [softmax(r.test_logits.astype(np.float64) / r.temperature) for r in runs]
    )
    label = runs[0].record["loss_label"]
    t_mean = float(np.mean([r.temperature for r in runs]))
    fig = compare_reliability_diagrams(
        {"before scaling": probs, f"after scaling (T={t_mean:.2f})": probs_ts},
        labels,
        n_bins=n_bins,
    )
    fig.set_size_inches(10.0, 5.0)
    fig.suptitle(f"{task} · {label} · test set, {len(runs)} seed(s) pooled", fontsize=11)
    return fig


def plot_ece_bars(result: StudyResult, rows: list[dict[str, Any]], task: str) -> Any:
    """Grouped bars: ECE before and after temperature scaling, per loss (error bar: std)."""
    from matplotlib.figure import Figure

    trows = [r for r in rows if r["task"] == task]
    x = np.arange(len(trows))
    fig = Figure(figsize=(max(5.0, 0.75 * len(trows) + 2), 3.6), layout="constrained")
    ax = fig.subplots()
    w = 0.38
    for off, key, lab, color in ((-w / 2, "ece", "before scaling", "#d62728"),
                                 (w / 2, "ece_ts", "after scaling", "#1f77b4")):
        means = [100 * r[key][0] for r in trows]
        stds = [100 * r[key][1] for r in trows]
        ax.bar(x + off, means, w, yerr=stds, capsize=3, label=lab, color=color, alpha=0.85)
    ax.set_xticks(x, [r["loss_label"] for r in trows], rotation=30, ha="right", fontsize=8)
    ax.set_ylabel("ECE-15 (%)")
    ax.set_title(f"{task}: test ECE before / after temperature scaling (mean ± std)",
                 fontsize=10)
    ax.legend(fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    return fig


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
    from matplotlib.figure import Figure

    p = np.linspace(1e-3, 1 - 1e-3, 400)
    curves = pt_curves(p, num_classes)
    fig = Figure(figsize=(10, 4), layout="constrained")
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
    head = ["task", "loss", "seed", "epochs", "train_acc", "temperature", "time_s", "diverged",
            *METRICS, *[f"{m}_ts" for m in METRICS]]
    body = []
    for r in result.records:
        body.append([r["task"], r["loss"], r["seed"], r["epochs"], r["train_acc"],
                     r["temperature"], round(r["time_s"], 3), r["diverged"],
                     *[r["test"][m] for m in METRICS], *[r["test_ts"][m] for m in METRICS]])
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
    keys = ["train_acc", "temperature", *METRICS, *[f"{m}_ts" for m in METRICS]]
    with p.open("w", newline="", encoding="utf-8") as fh:
        w = csv.writer(fh)
        w.writerow(["task", "loss", "n_seeds",
                    *[f"{k}_{s}" for k in keys for s in ("mean", "std")]])
        for r in rows:
            w.writerow([r["task"], r["loss"], r["n_seeds"], *[v for k in keys for v in r[k]]])
    written["summary.csv"] = p

    arrays: dict[str, np.ndarray] = {}
    for name, d in result.tasks.items():
        arrays[f"{name}/labels"] = d.y_test
    for run in result.runs:
        r = run.record
        key = f"{r['task']}/{r['loss']}/seed{r['seed']}"
        arrays[f"{key}/logits"] = run.test_logits
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
        save(plot_ece_bars(result, rows, task), f"ece_{_safe(task)}.png")
        for r in rows:
            if r["task"] == task:
                save(plot_reliability(result, task, r["loss"], n_bins=n_bins),
                     f"reliability_{_safe(task)}_{_safe(r['loss'])}.png")
    return paths


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
    lines = [
        "# crossent run: report",
        "",
        *([f"Command: `{command}`", ""] if command else []),
        f"{n_runs} runs ({len(result.tasks)} task(s) x losses x {len(cfg.seeds)} seed(s): "
        f"{', '.join(map(str, cfg.seeds))}), model `{cfg.model}`, Adam lr {cfg.lr:g}, "
        f"batch {cfg.batch_size}, epochs "
        + ", ".join(f"{t} {cfg.epochs_for(t)}" for t in result.tasks)
        + f"; wall time {result.wall_time_s:.0f} s.",
        "",
        "Metrics on the test set; ECE-15 with equal-width bins, AdaECE with equal-mass bins, "
        "cw-ECE classwise (all in %); Brier is the multiclass sum (0-2). Temperature T is "
        "fitted on the validation set only. Mean ± sample std over seeds.",
        "",
        "## Automatic reading",
        "",
    ]
    for task, items in reading.items():
        lines.append(f"**{task}**")
        lines.append("")
        lines += [f"- {s}" for s in items]
        lines.append("")
    lines += ["## Tables", "", markdown_tables(result, rows), ""]
    if fig_paths:
        lines += ["## Figures", ""]
        for f in fig_paths:
            rel = f.relative_to(out).as_posix()
            lines.append(f"![{f.stem}]({rel})")
        lines.append("")
    return "\n".join(lines)
