"""Report files, CLI errors on bad input, config files, and an end-to-end ``--quick`` run."""

from __future__ import annotations

import csv
import json
import re
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from crossent.cli import main
from crossent.experiments.datasets import TaskData
from crossent.experiments.report import _scaling_effect, _scaling_hurt, pt_curves, write_run_folder
from crossent.experiments.runner import StudyConfig, run_study

TINY = ["--epochs", "3", "--hidden", "16", "--seeds", "1", "--no-figures"]


def _one_line_error(capsys: pytest.CaptureFixture[str], rc: int) -> str:
    err = capsys.readouterr().err.strip()
    assert rc == 2
    assert err.startswith("crossent run: error: ")
    assert "\n" not in err and "Traceback" not in err
    return err


def test_report_files_written_and_non_empty(tmp_path: Path, blobs: TaskData) -> None:
    cfg = StudyConfig(losses=["ce", "ls-0.1"], seeds=[0, 1], epochs=3, hidden=16)
    result = run_study(cfg, tasks={"blobs": blobs})
    written = write_run_folder(result, tmp_path / "run", command="crossent run --test")
    names = {"results.json", "results.csv", "summary.csv", "report.md", "predictions.npz",
             "figures/loss_gradient_pt.png", "figures/ece_blobs.png",
             "figures/reliability_blobs_ce.png", "figures/reliability_blobs_ls-0.1.png"}
    assert names <= set(written)
    for p in written.values():
        assert p.is_file() and p.stat().st_size > 0
    data = json.loads((tmp_path / "run" / "results.json").read_text())
    assert len(data["runs"]) == 4 and len(data["summary"]) == 2
    assert data["reading"]["blobs"]
    assert any(line.startswith("Temperature scaling ") for line in data["reading"]["blobs"])
    with (tmp_path / "run" / "results.csv").open() as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == 4 and {"ece", "ece_ts", "temperature"} <= set(rows[0])
    md = (tmp_path / "run" / "report.md").read_text()
    assert "Automatic reading" in md and "| CE |" in md and "![" in md
    assert "95% half-width" in md and "√(h_A² + h_B²)" in md  # the rule behind "clearly"
    with (tmp_path / "run" / "summary.csv").open() as fh:
        summary = list(csv.DictReader(fh))
    assert {"ece_mean", "ece_std", "ece_ci95", "ece_tsece_mean", "temperature_ece_mean"} <= set(summary[0])
    with np.load(tmp_path / "run" / "predictions.npz") as z:
        assert z["blobs/ce/seed1/logits"].shape == (len(blobs.y_test), 3)
        # each run's labels beside its logits (a seed may draw its own split), and no task-level
        # array that another seed's logits could be paired with by mistake
        assert z["blobs/ce/seed1/labels"].shape == (z["blobs/ce/seed1/logits"].shape[0],)
        assert "blobs/labels" not in z.files


@pytest.mark.parametrize(("losses", "drawn"), [(["ce", "focal-2"], False), (["ce", "focal-2", "cp-2"], True)])
def test_the_theory_figure_needs_a_focal_loss_and_its_penalty(
    tmp_path: Path, blobs: TaskData, losses: list[str], drawn: bool
) -> None:
    """The theory figure compares focal loss gamma with CE - gamma H: drawn (and linked) only
    where both of one strength were trained, as its table is written; and the reading's
    sentence after scaling speaks of differences from CE + TS, the only ones it judges."""
    result = run_study(StudyConfig(losses=losses, seeds=[0, 1], epochs=2, hidden=8), tasks={"blobs": blobs})
    written = write_run_folder(result, tmp_path / "run", command="crossent run --test")
    assert ("figures/theory_blobs.png" in written) == drawn
    md = (tmp_path / "run" / "report.md").read_text()
    assert ("theory_blobs.png" in md) == drawn
    after = [line for line in json.loads((tmp_path / "run" / "results.json").read_text())["reading"]["blobs"]
             if line.startswith("After temperature scaling")]
    assert after and all(line.endswith("Every other loss is within noise of CE + TS.") for line in after)


def test_the_reading_names_each_loss_that_scaling_made_worse() -> None:
    def row(label: str, ece: float, ece_ts: float, nll: float, nll_ts: float) -> dict[str, object]:
        return {"loss_label": label, "ece": (ece, 0.0, 0.0), "ece_ts": (ece_ts, 0.0, 0.0),
                "nll": (nll, 0.0, 0.0), "nll_ts": (nll_ts, 0.0, 0.0)}

    better = row("CE", 0.05, 0.02, 0.30, 0.25)
    assert _scaling_effect(_scaling_hurt([better])) == (
        "Temperature scaling (T on validation NLL) lowered (or kept) both the test ECE and NLL"
        " (means over seeds) of every loss.")
    ece_up = row("LS 0.1", 0.0252, 0.0321, 0.062, 0.060)
    nll_up = row("focal γ=3", 0.08, 0.03, 0.141, 1.438)
    diverged = row("cp", float("nan"), float("nan"), float("nan"), float("nan"))
    assert _scaling_effect(_scaling_hurt([better, ece_up, nll_up, diverged])) == (
        "Temperature scaling (T on validation NLL) raised the test ECE or NLL (means over seeds) of: "
        "LS 0.1 (ECE 2.52 → 3.21%, NLL 0.062 → 0.060); focal γ=3 (ECE 8.00 → 3.00%, "
        "NLL 0.141 → 1.438). Its T comes from the validation set only.")
    lost = row("WCE", 0.0673, 0.0859, 0.62812, 0.62849)  # a rise lost to rounding at 3 digits
    assert "WCE (ECE 6.73 → 8.59%, NLL 0.6281 → 0.6285)" in _scaling_effect(_scaling_hurt([lost]))


def test_pt_curves_closed_forms() -> None:
    p = np.array([0.1, 0.5, 0.9])
    c = pt_curves(p, num_classes=10)
    np.testing.assert_allclose(c["CE"][0], -np.log(p), rtol=1e-6)
    np.testing.assert_allclose(c["CE"][1], 1 - p, rtol=1e-6)  # |p_t - 1|
    np.testing.assert_allclose(c["focal γ=2"][0], -((1 - p) ** 2) * np.log(p), rtol=1e-6)
    # label smoothing: gradient p_t - (1 - eps + eps/K) changes sign near the target
    np.testing.assert_allclose(c["LS ε=0.1"][1], np.abs(p - 0.91), rtol=1e-6)


@pytest.mark.parametrize(
    ("argv", "match"),
    [
        (["--data", "{tmp}/nope.csv", "--target", "y"], "no such file"),
        (["--data", "{tmp}/t.csv", "--target", "nope"], "no column 'nope'"),
        (["--data", "{tmp}/t.csv"], "--target COLUMN is required"),
        (["--data", "{tmp}/t.txt2", "--target", "y"], "unsupported file type"),
        (["--target", "y"], "--target needs --data"),
        (["--losses", "ce,mse"], "unknown loss 'mse'"),
        (["--seeds", "x"], "bad --seeds"),
        (["--seeds", "0"], "the number of seeds must be >= 1, got 0 (seed 0 alone is the list 0,)"),
        (["--tasks", "cifar10"], "unknown task"),
        (["--epochs", "0"], "epochs must be >= 1"),
        (["--device", "cuda:7"], "device"),
        (["--config", "{tmp}/bad.toml"], "unknown key 'colour'"),
        (["--config", "{tmp}/broken.toml"], "invalid TOML"),
    ],
)
def test_cli_bad_input_one_line_exit_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], argv: list[str], match: str
) -> None:
    (tmp_path / "t.csv").write_text("a,y\n1,0\n2,1\n3,0\n4,1\n5,0\n6,1\n")
    (tmp_path / "t.txt2").write_text("a,y\n")
    (tmp_path / "bad.toml").write_text('colour = "red"\n')
    (tmp_path / "broken.toml").write_text("epochs = = 3\n")
    args = [a.replace("{tmp}", str(tmp_path)) for a in argv]
    rc = main(["run", *args, "--out", str(tmp_path / "out")])
    assert match in _one_line_error(capsys, rc)
    assert not (tmp_path / "out").exists()


def test_cli_user_csv_and_config(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rng = np.random.default_rng(0)
    lines = ["f1,f2,kind,target"]
    for i in range(90):
        c = i % 3
        lines.append(f"{rng.normal() + c:.4f},{rng.normal() - c:.4f},{'ab'[i % 2]},k{c}")
    (tmp_path / "mine.csv").write_text("\n".join(lines) + "\n")
    (tmp_path / "study.toml").write_text(
        '[run]\nlosses = ["ce", "focal-2"]\nseeds = [5]\nepochs = 50\nmodel = "linear"\n'
    )
    out = tmp_path / "out"
    rc = main(["run", "--data", str(tmp_path / "mine.csv"), "--target", "target",
               "--config", str(tmp_path / "study.toml"), "--epochs", "4", "--no-figures",
               "--out", str(out)])
    assert rc == 0, capsys.readouterr().err
    data = json.loads((out / "results.json").read_text())
    assert data["config"]["model"] == "linear"
    assert data["config"]["epochs"] == 4  # the command line wins over the file
    assert [(r["loss"], r["seed"]) for r in data["runs"]] == [("ce", 5), ("focal-2", 5)]
    assert data["tasks"]["mine"]["class_names"] == ["k0", "k1", "k2"]
    assert "mine" in capsys.readouterr().out


def test_cli_says_when_temperature_scaling_fell_back(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Separable user data: every validation prediction is right, so the NLL fit falls back
    to T = 1 and the ECE fit is kept; the terminal and report.md both say so."""
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 300)
    x = rng.normal(size=(300, 3))
    x[:, 0] += np.where(y == 1, 8.0, -8.0)
    rows = ["a,b,c,label", *(f"{a:.4f},{b:.4f},{c:.4f},{t}" for (a, b, c), t in zip(x, y, strict=True))]
    (tmp_path / "sep.csv").write_text("\n".join(rows) + "\n")
    out = tmp_path / "out"
    rc = main(["run", "--data", str(tmp_path / "sep.csv"), "--target", "label", "--losses", "ce,ls-0.1",
               "--epochs", "20", "--lr", "0.05", "--hidden", "16", "--seeds", "1", "--no-figures",
               "--out", str(out)])
    stdout, err = capsys.readouterr()
    assert rc == 0, err
    assert ("sep: temperature scaling (T on validation NLL) fell back to T = 1 in 2 of 2 runs"
            " (CE, LS 0.1; separable validation set)") in stdout
    # two times, said apart: the whole command's, and the training's that report.md gives
    assert re.search(r"2 runs in \d+ s \(data, training, report and figures\)\. Wrote", stdout)
    assert re.search(r"training and evaluation took \d+ s of wall time\.", (out / "report.md").read_text())
    data = json.loads((out / "results.json").read_text())
    for run in data["runs"]:
        assert run["temperature"] == 1.0
        # the NLL fit fell back; the ECE fit was kept, so its finding is not called a fallback
        assert set(run["fallback"]) == {"ts"} and "separable" in run["fallback"]["ts"]
        assert set(run["kept_degenerate"]) == {"tsece"} and "separable" in run["kept_degenerate"]["tsece"]
        assert run["fallback_kind"] == {"ts": "separable"}
        assert run["kept_degenerate_kind"] == {"tsece": "separable"}
        assert run["temperature_ece"] < 1.0
    with (out / "results.csv").open() as fh:
        rows = list(csv.DictReader(fh))
    assert [(r["fallback"], r["kept_degenerate"]) for r in rows] == [("ts:separable", "tsece:separable")] * 2
    md = (out / "report.md").read_text()
    items = [line for line in md.splitlines() if line.startswith("- T on validation")]
    for fit in ("NLL, fell back to T = 1", "ECE, kept"):
        for run_name in ("sep/ce/seed0", "sep/ls-0.1/seed0"):
            assert any(
                line.startswith(f"- T on validation {fit} in ") and run_name in line.split(":")[0]
                and "the validation set is separable" in line for line in items
            ), (fit, run_name, items)


def test_cli_same_seed_same_results(tmp_path: Path) -> None:
    outs = []
    for name in ("a", "b"):
        rc = main(["run", "--tasks", "digits", "--losses", "ce,focal-1", *TINY,
                   "--out", str(tmp_path / name)])
        assert rc == 0
        runs = json.loads((tmp_path / name / "results.json").read_text())["runs"]
        outs.append([{k: v for k, v in r.items() if k != "time_s"} for r in runs])
    assert outs[0] == outs[1]


def test_quick_end_to_end(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "quick"
    assert main(["run", "--quick", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    for task in ("mnist1d", "digits", "mnist1d-lt", "distill"):
        assert task in printed
    data = json.loads((out / "results.json").read_text())
    assert {r["task"] for r in data["runs"]} == {"mnist1d", "digits", "mnist1d-lt", "distill"}
    assert len(data["runs"]) == (4 + 4 + 4 + 3) * 2
    assert {r["model"] for r in data["runs"] if r["task"] == "mnist1d"} == {"cnn"}
    for name in ("results.csv", "report.md", "figures/ece_mnist1d.png", "figures/theory_mnist1d.png",
                 "figures/reliability_mnist1d-lt_ce.png", "figures/loss_gradient_pt.png"):
        assert (out / name).stat().st_size > 0
    md = (out / "report.md").read_text()
    for needle in ("Clearly", "Mukhoti et al.", "FL ≥ CE − γH", "Post-hoc logit adjustment",
                   "student of LS 0.1", "Label shift"):
        assert needle in md, needle


def test_results_csv_holds_every_temperature_and_bootstrap_sd(
    tmp_path: Path, blobs_imbalanced: TaskData
) -> None:
    """results.csv carries what results.json records per run: the three temperatures (the
    prior-corrected one on an imbalanced task) and each arm's bootstrap stds."""
    cfg = StudyConfig(losses=["ce"], seeds=[0], epochs=3, hidden=16)
    result = run_study(cfg, tasks={"lt": blobs_imbalanced})
    write_run_folder(result, tmp_path / "run", figures=False)
    run = json.loads((tmp_path / "run" / "results.json").read_text())["runs"][0]
    with (tmp_path / "run" / "results.csv").open() as fh:
        (row,) = list(csv.DictReader(fh))
    for key in ("temperature", "temperature_ece", "temperature_la"):
        assert float(row[key]) == pytest.approx(run[key], rel=1e-12), key
    assert set(run["boot"]) == {"test", "test_ts", "test_tsece", "test_la", "test_lats"}
    for arm, suffix in (("test", ""), ("test_ts", "_ts"), ("test_la", "_la"), ("test_lats", "_lats")):
        for metric in ("acc", "balanced_acc", "tail_recall", "nll", "ece"):
            want = run["boot"][arm][metric]
            assert float(row[f"{metric}{suffix}_boot_sd"]) == pytest.approx(want, rel=1e-12)
    assert float(row["ece_boot_sd"]) > 0 and row["fallback"] == ""


def test_one_seed_gives_means_without_an_interval(tmp_path: Path, blobs: TaskData) -> None:
    """From one seed the spread between seeds is unknown: the cells give the mean alone (not
    "± 0.00", which claimed certainty), the statistics note says why, and the reading calls no
    difference clear or within noise."""
    from crossent.experiments.report import ONE_SEED_NOTE, _figures_note, rich_tables
    from crossent.experiments.runner import _mean_std, aggregate, clearly_different

    one = _mean_std([0.25], boot_sds=[0.01])
    assert one[0] == 0.25 and np.isnan(one[1]) and np.isnan(one[2])
    assert not clearly_different([0.0, np.nan, np.nan], [1.0, np.nan, np.nan])
    cfg = StudyConfig(losses=["ce", "focal-3", "cp-3"], seeds=[0], epochs=3, hidden=16)
    result = run_study(cfg, tasks={"blobs": blobs})
    write_run_folder(result, tmp_path / "run", command="crossent run --test", figures=False)
    md = (tmp_path / "run" / "report.md").read_text()
    assert ONE_SEED_NOTE in md
    reading = [line for line in md.splitlines() if line.startswith("- ")]
    verdicts = [line for line in reading if not line.startswith("- One seed: no interval")]
    assert len(verdicts) == len(reading) - 1
    assert not any("within noise" in line or "clearly" in line for line in verdicts)
    table_rows = [line for line in md.splitlines() if line.startswith("| ")]
    assert table_rows and not any("±" in line for line in table_rows)
    assert "Before temperature scaling (test set, one seed, no interval):" in md
    (table,) = rich_tables(result, aggregate(result))[:1]
    assert str(table.title).endswith("test set, one seed (no interval)")
    assert _figures_note(result, []).startswith("ECE bars: one seed's values (no interval)")
    with (tmp_path / "run" / "summary.csv").open() as fh:
        summary = list(csv.DictReader(fh))
    assert summary[0]["temperature_ci95"] == "nan" and summary[0]["temperature_mean"] != "nan"


def test_a_class_too_small_to_split_is_named_by_its_label(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    lines = ["f,species"] + [f"{i},setosa" for i in range(6)] + ["7,virginica", "8,virginica"]
    (tmp_path / "t.csv").write_text("\n".join(lines) + "\n")
    rc = main(["run", "--data", str(tmp_path / "t.csv"), "--target", "species", *TINY,
               "--out", str(tmp_path / "out")])
    err = _one_line_error(capsys, rc)
    assert "class 'virginica' has only 2 example(s)" in err and "np.int64" not in err


def test_an_out_that_cannot_be_written_fails_before_any_training(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """What the permission bits do not tell (here /proc, where every os.access succeeds for
    root but nothing can be created) is found by creating the folder and a file before the
    study, not after it; a probe of a new nested folder leaves nothing behind."""
    from crossent.cli import CLIError, check_out_dir

    if not Path("/proc/self").is_dir():
        pytest.skip("needs /proc")
    rc = main(["run", "--quick", "--out", "/proc/crossent-out"])
    assert "--out /proc/crossent-out: cannot write there" in _one_line_error(capsys, rc)
    assert capsys.readouterr().out == ""  # nothing trained
    check_out_dir(tmp_path / "a" / "b" / "c")
    assert not (tmp_path / "a").exists()
    with pytest.raises(CLIError, match="--out /proc"):  # an existing folder is probed too
        check_out_dir("/proc")


def test_n_bins_is_named_wherever_the_ece_is(
    tmp_path: Path, blobs: TaskData, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The ECE is computed with --n-bins bins, and every label says so: report.md, the terminal
    caption, the figures' axes; beside Mukhoti et al. (15 bins) a note says the scales differ."""
    from crossent.experiments import report
    from crossent.experiments.runner import aggregate

    figures: dict[str, Any] = {}

    def keep(name: str) -> Any:
        plot = getattr(report, name)

        def wrapped(*args: Any, **kwargs: Any) -> Any:
            figures[name] = plot(*args, **kwargs)
            return figures[name]
        return wrapped

    for name in ("plot_ece_bars", "plot_theory"):
        monkeypatch.setattr(report, name, keep(name))
    cfg = StudyConfig(losses=["ce", "focal-3", "cp-3"], seeds=[0, 1], epochs=3, hidden=16,
                      model="mlp", n_bins=10)
    result = run_study(cfg, tasks={"mnist1d": blobs})
    rows = aggregate(result)
    write_run_folder(result, tmp_path / "run", rows=rows)
    md = (tmp_path / "run" / "report.md").read_text()
    assert "ECE-10 with 10 equal-width bins, AdaECE with 10 equal-mass bins" in md
    assert "ECE-15" not in md and "15 bins" not in md
    assert ("Mukhoti et al.'s ECE (and their grid search for T) uses 15 equal-width bins, this "
            "run's 10") in md
    assert figures["plot_ece_bars"].axes[0].get_ylabel() == "ECE-10 (%)"
    assert figures["plot_theory"].axes[0].get_title() == "ECE-10 before scaling (%)"
    (table,) = report.rich_tables(result, rows)
    assert str(table.caption).startswith("ECE in % (10 bins);")
    result.config.n_bins = 15  # Mukhoti et al.'s: no note
    assert "not on one scale" not in report.mukhoti_table(result, rows)


def test_imbalanced_user_data_gets_tail_metrics_but_no_label_shift(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """User data is split stratified, so its test set keeps the training prior: imbalanced
    classes get balanced accuracy and tail recall, but the report claims no label shift and
    scores no logit-adjustment arm, which targets a balanced test prior."""
    rng = np.random.default_rng(0)
    lines = ["f1,f2,label"] + [f"{rng.normal(2 * k):.3f},{rng.normal(-k):.3f},{name}"
                               for k, (name, n) in enumerate((("a", 150), ("b", 50), ("c", 20)))
                               for _ in range(n)]
    (tmp_path / "lt.csv").write_text("\n".join(lines) + "\n")
    out = tmp_path / "out"
    assert main(["run", "--data", str(tmp_path / "lt.csv"), "--target", "label",
                 "--losses", "ce,la-ce", *TINY, "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "BalAcc %" in printed and "LA" not in printed
    md = (out / "report.md").read_text()
    assert "Label shift" not in md and "Post-hoc logit adjustment" not in md
    assert ("Imbalanced classes: the split is stratified, so the validation and test sets keep the "
            "training prior") in md
    data = json.loads((out / "results.json").read_text())
    assert data["tasks"]["lt"]["imbalanced"] is True and data["tasks"]["lt"]["label_shift"] is False
    for run in data["runs"]:
        assert set(run["boot"]) == {"test", "test_ts", "test_tsece"}
        assert "test_la" not in run and "temperature_la" not in run
        assert 0.0 <= run["test"]["tail_recall"] <= 1.0 and 0.0 <= run["test"]["balanced_acc"] <= 1.0


@pytest.mark.parametrize(("losses", "drawn"), [(["focal-3", "cp-3"], "focal-3"), (["focal-3", "ce"], "ce")])
def test_quick_draws_one_reliability_diagram_per_task(
    tmp_path: Path, blobs: TaskData, losses: list[str], drawn: str
) -> None:
    """--quick draws one reliability diagram per task: CE's, or the first loss's where CE is not
    run (before, a quick run without CE had none)."""
    cfg = StudyConfig(losses=losses, seeds=[0], epochs=3, hidden=16, quick=True)
    written = write_run_folder(run_study(cfg, tasks={"blobs": blobs}), tmp_path / "run")
    assert [n for n in written if "reliability_" in n] == [f"figures/reliability_blobs_{drawn}.png"]
