"""`crossent calibrate` end to end, on good and on bad files."""

from __future__ import annotations

import json
import sys
import warnings
from pathlib import Path
from typing import Any, cast

import numpy as np
import pytest
import torch

from crossent import calibration as cal
from crossent.calibration import ece, nll
from crossent.cli import main


def make(n: int = 3000, c: int = 6, t_true: float = 2.5, seed: int = 0) -> tuple[np.ndarray, ...]:
    rng = np.random.default_rng(seed)
    z = rng.normal(size=(n, c)) * 2
    p = torch.softmax(torch.from_numpy(z), 1).numpy()
    y = np.minimum((p.cumsum(1) > rng.random((n, 1))).argmax(1), c - 1)
    return (z * t_true).astype(np.float32), y


def run(
    args: list[str], capsys: pytest.CaptureFixture[str], compare: bool = False, figures: bool = False
) -> tuple[int, str, str]:
    """``crossent calibrate ARGS``: the comparison and the figures (three PNGs, most of a
    small run's time) only where a test asks for them."""
    extra = ([] if compare else ["--no-compare"]) + ([] if figures else ["--no-figures"])
    rc = main(["calibrate", *args, *extra])
    out, err = capsys.readouterr()
    return rc, out, err


def test_end_to_end_npy(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    z, y = make()
    np.save(tmp_path / "logits.npy", z)
    np.save(tmp_path / "labels.npy", y)
    out_dir = tmp_path / "report"
    rc, out, err = run(
        [
            str(tmp_path / "logits.npy"),
            "--labels",
            str(tmp_path / "labels.npy"),
            "--out",
            str(out_dir),
        ],
        capsys,
        figures=True,
    )
    assert rc == 0, err
    for name in (
        "accuracy",
        "NLL",
        "Brier",
        "ECE",
        "AdaECE",
        "classwise ECE",
        "MCE",
        "smooth ECE",
        "T =",
    ):
        assert name in out
    metrics = json.loads((out_dir / "metrics.json").read_text())
    assert metrics["kind"] == "logits"
    assert metrics["temperature"] == pytest.approx(2.5, rel=0.1)
    assert metrics["n_val"] + metrics["n_test"] == 3000
    assert metrics["n_val"] == pytest.approx(600, abs=6)
    assert metrics["after"]["accuracy"] == metrics["before"]["accuracy"]
    assert metrics["after"]["ece"] < metrics["before"]["ece"]
    assert metrics["after"]["nll"] < metrics["before"]["nll"]
    report = (out_dir / "report.md").read_text()
    assert "| ECE |" in report and "reliability_comparison.png" in report
    for png in ("reliability_before.png", "reliability_after.png", "reliability_comparison.png"):
        raw = (out_dir / png).read_bytes()
        assert raw[:4] == b"\x89PNG" and len(raw) > 10_000


def test_no_figures_writes_the_report_without_them(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """--no-figures: report.md and metrics.json as with figures, no PNG and no link to one, and
    matplotlib not needed; without it, a missing matplotlib is one line naming the option,
    before any work."""
    z, y = make(n=500)
    np.save(tmp_path / "logits.npy", z)
    np.save(tmp_path / "labels.npy", y)
    args = [str(tmp_path / "logits.npy"), "--labels", str(tmp_path / "labels.npy")]
    rc, out, err = run([*args, "--out", str(tmp_path / "a")], capsys, figures=True)
    assert rc == 0, err
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib raises ImportError
    rc, out, err = run([*args, "--out", str(tmp_path / "b")], capsys)
    assert rc == 0, err
    assert "wrote report.md and metrics.json to" in out
    assert sorted(p.name for p in (tmp_path / "b").iterdir()) == ["metrics.json", "report.md"]
    assert ".png" not in (tmp_path / "b" / "report.md").read_text()
    with_figs = json.loads((tmp_path / "a" / "metrics.json").read_text())
    assert json.loads((tmp_path / "b" / "metrics.json").read_text()) == with_figs
    rc, out, err = run([*args, "--out", str(tmp_path / "c")], capsys, figures=True)
    one_line_error(rc, err, "matplotlib")
    assert "--no-figures" in err and not (tmp_path / "c" / "metrics.json").exists()


def test_npz_with_labels_probs_and_val_fraction_zero(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    z, y = make(n=1000)
    p = torch.softmax(torch.from_numpy(z).double(), 1).numpy()
    np.savez(tmp_path / "preds.npz", probs=p, labels=y)
    rc, _out, err = run(
        [str(tmp_path / "preds.npz"), "--val-fraction", "0", "--out", str(tmp_path / "o")], capsys
    )
    assert rc == 0, err
    assert "warning" in err and "--val-fraction 0" in err
    metrics = json.loads((tmp_path / "o" / "metrics.json").read_text())
    assert metrics["kind"] == "probs" and metrics["n_test"] == 1000
    assert metrics["temperature"] == pytest.approx(2.5, rel=0.15)


def test_pt_and_csv_inputs(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    z, y = make(n=600)
    torch.save({"logits": torch.from_numpy(z), "labels": torch.from_numpy(y)}, tmp_path / "a.pt")
    rc, _out, err = run([str(tmp_path / "a.pt")], capsys)
    assert rc == 0, err
    torch.save(torch.from_numpy(z), tmp_path / "b.pt")
    header = ",".join(f"c{k}" for k in range(z.shape[1]))
    np.savetxt(tmp_path / "y.csv", y, fmt="%d", header="label", comments="")
    np.savetxt(tmp_path / "z.csv", z, delimiter=",", header=header, comments="")
    rc, _out_pt, err = run([str(tmp_path / "b.pt"), "--labels", str(tmp_path / "y.csv")], capsys)
    assert rc == 0, err
    rc, out_csv, err = run([str(tmp_path / "z.csv"), "--labels", str(tmp_path / "y.csv")], capsys)
    assert rc == 0, err
    assert "T =" in out_csv
    rc, _, err = run(
        [str(tmp_path / "z.csv"), "--labels", str(tmp_path / "y.csv"), "--kind", "probs"], capsys
    )
    assert rc == 2 and "--kind logits" in err


def one_line_error(rc: int, err: str, *fragments: str) -> None:
    assert rc == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("crossent calibrate: error:")
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    assert "Traceback" not in err


def test_bad_files(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    z, y = make(n=200)
    good_y = tmp_path / "y.npy"
    np.save(good_y, y)

    np.save(tmp_path / "flat.npy", z[:, 0])
    one_line_error(*run([str(tmp_path / "flat.npy"), "--labels", str(good_y)], capsys)[::2], "2-D")
    nan = z.copy()
    nan[[3, 50]] = np.nan
    np.save(tmp_path / "nan.npy", nan)
    one_line_error(
        *run([str(tmp_path / "nan.npy"), "--labels", str(good_y)], capsys)[::2], "2 row(s) with NaN"
    )
    np.save(tmp_path / "short.npy", y[:-1])
    np.save(tmp_path / "z.npy", z)
    one_line_error(
        *run([str(tmp_path / "z.npy"), "--labels", str(tmp_path / "short.npy")], capsys)[::2],
        "200 rows but LABELS has 199",
    )
    np.save(tmp_path / "big.npy", y + 10)
    one_line_error(
        *run([str(tmp_path / "z.npy"), "--labels", str(tmp_path / "big.npy")], capsys)[::2],
        "LABELS must lie in 0..5",
    )
    np.save(tmp_path / "obj.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)
    one_line_error(
        *run([str(tmp_path / "obj.npy"), "--labels", str(good_y)], capsys)[::2],
        "cannot read PREDICTIONS",
    )
    (tmp_path / "junk.pt").write_bytes(b"not a torch file at all")
    one_line_error(
        *run([str(tmp_path / "junk.pt"), "--labels", str(good_y)], capsys)[::2],
        "cannot read PREDICTIONS",
    )
    torch.save({"f": Path("x")}, tmp_path / "pickled.pt")  # arbitrary object: refused
    one_line_error(
        *run([str(tmp_path / "pickled.pt"), "--labels", str(good_y)], capsys)[::2],
        "cannot read PREDICTIONS",
    )
    one_line_error(
        *run([str(tmp_path / "missing.npy"), "--labels", str(good_y)], capsys)[::2],
        "does not exist",
    )
    (tmp_path / "z.txt").write_text("1,2\n")
    one_line_error(
        *run([str(tmp_path / "z.txt"), "--labels", str(good_y)], capsys)[::2], "--format"
    )
    one_line_error(*run([str(tmp_path / "z.npy")], capsys)[::2], "no labels")
    one_line_error(
        *run([str(tmp_path / "z.npy"), "--labels", str(good_y), "--val-fraction", "1.5"], capsys)[
            ::2
        ],
        "--val-fraction",
    )
    (tmp_path / "bad.csv").write_text("a,b\n1,x\n")
    one_line_error(
        *run([str(tmp_path / "bad.csv"), "--labels", str(good_y)], capsys)[::2], "not numeric"
    )


def test_split_errors_name_a_fraction_that_works(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """An empty part of the split names the --val-fraction that fills it (validation holds
    round(fraction x N) samples); classes of one sample each split too (they were refused:
    each class was rounded on its own); object labels say what to save instead of NumPy's
    allow_pickle."""
    z = np.random.default_rng(0).normal(size=(8, 2))
    np.save(tmp_path / "z.npy", z)
    np.save(tmp_path / "y.npy", np.array([0, 0, 0, 1, 1, 1, 1, 1]))
    args = [str(tmp_path / "z.npy"), "--labels", str(tmp_path / "y.npy"), "--no-compare"]
    one_line_error(*run([*args, "--val-fraction", "0.05"], capsys)[::2],
                   "leaves the validation part empty", "--val-fraction 0.0635 or more")
    one_line_error(*run([*args, "--val-fraction", "0.95"], capsys)[::2],
                   "leaves the test part empty", "--val-fraction 0.936 or less")
    for works in ("0.0635", "0.936"):
        code, _, _ = run([*args, "--val-fraction", works], capsys)
        assert code == 0
    np.save(tmp_path / "z5.npy", np.random.default_rng(1).normal(size=(5, 5)))
    np.save(tmp_path / "y5.npy", np.arange(5))
    code, _, err = run([str(tmp_path / "z5.npy"), "--labels", str(tmp_path / "y5.npy"),
                        "--val-fraction", "0.4", "--out", str(tmp_path / "o5")], capsys)
    assert code == 0, err
    assert json.loads((tmp_path / "o5" / "metrics.json").read_text())["n_val"] == 2
    np.save(tmp_path / "names.npy", np.array(["a", "b", "c", "d", "e"], dtype=object), allow_pickle=True)
    one_line_error(*run([str(tmp_path / "z5.npy"), "--labels", str(tmp_path / "names.npy")], capsys)[::2],
                   "holds Python objects", "class indices 0..C-1 as integers")


def test_help_documents_inputs(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["calibrate", "--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    for fragment in ("--val-fraction", "--labels", "--kind", "allow_pickle=False", "report.md"):
        assert fragment in out
    flat = " ".join(out.split())  # argparse wraps the help
    assert "ece takes --method temperature only" in flat
    assert ("a degenerate ECE fit falls back to T = 1 here, as every method's does, where crossent run"
            " keeps it") in flat


def test_split_is_stratified_and_seeded() -> None:
    from crossent.calibration.cli import stratified_split

    y = np.repeat(np.arange(4), [100, 50, 10, 1])
    val, test = stratified_split(y, 0.2, seed=0)
    assert np.bincount(y[val], minlength=4).tolist() == [20, 10, 2, 0]
    # a vocabulary's classes of one or two samples: a fifth of the samples all the same, each
    # class within one of its share (it gave 0 of every class: 2 of 2,000)
    vocab = np.repeat(np.arange(1500), np.where(np.arange(1500) < 500, 2, 1))
    fit, _ = stratified_split(vocab, 0.2, seed=0)
    assert len(fit) == 400 and np.bincount(vocab[fit], minlength=1500).max() == 1
    assert len(np.intersect1d(val, test)) == 0 and len(val) + len(test) == len(y)
    val2, _ = stratified_split(y, 0.2, seed=0)
    val3, _ = stratified_split(y, 0.2, seed=1)
    assert np.array_equal(val, val2) and not np.array_equal(val, val3)


def runner_npz(path: Path, n: int = 400) -> None:
    """A file laid out like ``crossent run``'s predictions.npz: many groups of arrays."""
    arrays: dict[str, np.ndarray] = {}
    for task in ("breast_cancer", "mnist1d"):
        z, y = make(n=n, c=2 if task == "breast_cancer" else 4, seed=len(task))
        arrays[f"{task}/labels"] = y
        for loss in ("ce", "focal_3", "ls_0.1", "flsd53"):
            for seed in range(3):
                arrays[f"{task}/{loss}/seed{seed}/logits"] = z + seed
                arrays[f"{task}/{loss}/seed{seed}/temperature"] = np.asarray(1.0)
    np.savez(path, **arrays)  # type: ignore[arg-type]


def test_key_picks_an_array_of_a_run(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    runner_npz(tmp_path / "predictions.npz")
    rc, _, err = run([str(tmp_path / "predictions.npz")], capsys)
    one_line_error(rc, err, "holds 50 arrays, 24 of them 2-D: breast_cancer/ce/seed0/logits (400, 2)")
    short = len(str(tmp_path)) + 340  # the path, then a short line
    assert len(err) < short and "--key" in err and "(21 more 2-D)" in err
    rc, _, err = run([str(tmp_path / "predictions.npz"), "--key", "nope"], capsys)
    one_line_error(rc, err, "--key 'nope' is not in PREDICTIONS")
    assert len(err) < short and "did you mean" not in err
    # a key mistyped in case or by a letter is named; one naming the labels points at the predictions
    for typed, meant in (("MNIST1D/ce/seed0/logits", "mnist1d/ce/seed0/logits"),
                         ("mnist1d/ce/seed0/logit", "mnist1d/ce/seed0/logits")):
        rc, _, err = run([str(tmp_path / "predictions.npz"), "--key", typed], capsys)
        one_line_error(rc, err, f"--key {typed!r} is not in PREDICTIONS",
                       f"(did you mean {meant!r}?); it holds")
    rc, _, err = run([str(tmp_path / "predictions.npz"), "--key", "mnist1d/labels"], capsys)
    one_line_error(rc, err, "--key 'mnist1d/labels' names labels: --key picks the predictions")
    rc, _, err = run([str(tmp_path / "predictions.npz"), "--labels-key", "mnist1d/Labels", "--key",
                      "mnist1d/ce/seed0/logits"], capsys)
    one_line_error(rc, err, "did you mean 'mnist1d/labels'?")
    rc, _, err = run(
        [str(tmp_path / "predictions.npz"), "--key", "mnist1d/ce/seed1/logits", "--out", str(tmp_path / "o")],
        capsys,
    )
    assert rc == 0, err
    metrics = json.loads((tmp_path / "o" / "metrics.json").read_text())
    assert metrics["key"] == "mnist1d/ce/seed1/logits" and metrics["n_classes"] == 4
    assert metrics["kind"] == "logits"  # from the key's name
    assert metrics["temperature"] == pytest.approx(2.5, rel=0.2)


@pytest.mark.filterwarnings("ignore::crossent.calibration.CalibrationWarning")
def test_compare_every_method_and_recommend(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    z, y = make(n=1500, c=2, seed=3)
    np.save(tmp_path / "z.npy", z)
    np.save(tmp_path / "y.npy", y)
    rc, out, err = run(
        [str(tmp_path / "z.npy"), "--labels", str(tmp_path / "y.npy"), "--out", str(tmp_path / "o")],
        capsys,
        compare=True,
    )
    assert rc == 0, err
    metrics = json.loads((tmp_path / "o" / "metrics.json").read_text())
    rows = metrics["comparison"]["rows"]
    assert set(rows) == {"none", "temperature", "vector", "matrix", "dirichlet", "histogram",
                         "isotonic", "ensemble_temperature", "platt", "beta"}
    best = metrics["comparison"]["recommended"]
    assert rows[best]["nll"] == min(r["nll"] for r in rows.values())
    assert rows[best]["nll"] < rows["none"]["nll"]  # over-confident by 2.5: something helps
    assert f"recommended: {best} (held-out NLL" in out
    for name in rows:  # every method's name whole in the table, however narrow the terminal
        assert f"│ {name}" in out
    # the comparison's temperature row is the before/after table's fit
    assert rows["temperature"]["nll"] == pytest.approx(metrics["after"]["nll"], rel=1e-9)
    report = (tmp_path / "o" / "report.md").read_text()
    assert "## Every method" in report and "recommended:" in report
    for key in ("nll", "ece", "brier", "accuracy"):  # "none" is the "before" column
        assert rows["none"][key] == metrics["before"][key]


@pytest.mark.filterwarnings("ignore::crossent.calibration.CalibrationWarning")
def test_the_comparison_shows_each_fits_warnings_and_its_zero_probabilities(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Ten classes and about 80 samples to fit: matrix and Dirichlet scaling (110 parameters) warn,
    and their warnings are printed under the table and written in the report; histogram
    binning gives some held-out labels probability 0, which its note counts (as a refit on the
    same split finds)."""
    from crossent.calibration.cli import stratified_split

    z, y = make(n=400, c=10, seed=7)
    np.save(tmp_path / "z.npy", z)
    np.save(tmp_path / "y.npy", y)
    rc, out, err = run([str(tmp_path / "z.npy"), "--labels", str(tmp_path / "y.npy"), "--out",
                        str(tmp_path / "o")], capsys, compare=True)
    assert rc == 0, err
    flat = " ".join(out.split())
    metrics = json.loads((tmp_path / "o" / "metrics.json").read_text())
    rows, n_fit = metrics["comparison"]["rows"], metrics["n_val"]
    for name, cls in (("matrix", "MatrixScaler"), ("dirichlet", "DirichletCalibrator")):
        assert rows[name]["short_note"].startswith("warned: see below")
        assert f"{name}: warning: {cls}: 110 parameters (C = 10) fitted on {n_fit} validation samples" in flat
    assert rows["temperature"]["warnings"] == [] and rows["temperature"]["short_note"] == ""
    for name, row in rows.items():  # every note the table points at is printed under it
        if row.get("note"):
            assert f"{name}: note: {' '.join(row['note'].split())}" in flat
    val, test = stratified_split(y, 0.2, 0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        p = cal.HistogramBinning().fit(z[val].astype(np.float64), y[val]).transform(z[test].astype(float))
    zeros = int(np.count_nonzero(p[np.arange(test.size), y[test]] == 0))
    assert zeros > 0 and rows["histogram"]["zero_probability_labels"] == zeros
    assert f"p = 0 for {zeros} held-out labels" in rows["histogram"]["short_note"]
    report = (tmp_path / "o" / "report.md").read_text()
    assert f"p = 0 for {zeros} held-out labels (an NLL of at least 708 each)" in report
    assert "warning: MatrixScaler: 110 parameters" in report


@pytest.mark.filterwarnings("ignore::crossent.calibration.CalibrationWarning")
def test_a_method_that_fell_back_scores_as_the_predictions_as_given(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Probabilities truncated to 4 decimals (rows summing to 1 - 1e-4, used as given) whose
    validation part is separable: every method falls back to the identity, so its row and the
    "after" column are the predictions as given, equal to "none" and "before", and "none" is
    recommended (scored through log p, the renormalised rows would seem a hair better)."""
    rng = np.random.default_rng(0)
    y = rng.integers(0, 3, 600)
    z = rng.normal(size=(600, 3))
    z[np.arange(600), y] += 4.0
    p = np.floor(torch.softmax(torch.from_numpy(z), 1).numpy() * 1e4) / 1e4
    np.savez(tmp_path / "trunc.npz", probs=p, labels=y)
    rc, out, err = run([str(tmp_path / "trunc.npz"), "--out", str(tmp_path / "o")], capsys, compare=True)
    assert rc == 0, err
    metrics = json.loads((tmp_path / "o" / "metrics.json").read_text())
    assert metrics["fallback"] is not None and metrics["after"] == metrics["before"]
    rows = metrics["comparison"]["rows"]
    fell = [name for name, row in rows.items() if row.get("fallback")]
    assert "temperature" in fell and len(fell) >= 5
    for name in fell:
        assert {k: rows[name][k] for k in ("nll", "ece", "brier", "accuracy")} == {
            k: rows["none"][k] for k in ("nll", "ece", "brier", "accuracy")}
    assert metrics["comparison"]["recommended"] == "none"
    assert "recommended: none" in out
    flat = " ".join(out.split())
    for name in fell:  # why, under the table (not only in report.md)
        assert f"{name}: fell back to the identity: {' '.join(rows[name]['fallback'].split())}" in flat


@pytest.mark.filterwarnings("ignore::crossent.calibration.CalibrationWarning")
def test_a_fallen_back_row_counts_no_zero_probabilities_of_its_own(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Logits x 500, a class with no sample in the fit part: the methods with per-class or
    bounded parameters fall back to the identity, whose softmax gives many held-out labels
    probability 0 (an NLL of 747 to 4,291 each from the logits): their rows are the "none"
    row, with no zero count of their own, and the report's count says at least 708 nats."""
    rng = np.random.default_rng(1)
    z = rng.normal(size=(1000, 4)) * 2
    p = torch.softmax(torch.from_numpy(z), 1).numpy()
    y = np.array([rng.choice(4, p=r) for r in p])
    y[:2] = 3
    y[2:] = np.where(y[2:] == 3, 0, y[2:])
    np.save(tmp_path / "z.npy", 500 * z)
    np.save(tmp_path / "y.npy", y)
    rc, out, err = run([str(tmp_path / "z.npy"), "--labels", str(tmp_path / "y.npy"), "--out",
                        str(tmp_path / "o")], capsys, compare=True)
    assert rc == 0, err
    rows = json.loads((tmp_path / "o" / "metrics.json").read_text())["comparison"]["rows"]
    fell = [name for name, row in rows.items() if row.get("fallback")]
    assert "vector" in fell
    for name in fell:
        assert rows[name]["zero_probability_labels"] == 0 and "p = 0" not in rows[name]["short_note"]
        assert rows[name]["nll"] == rows["none"]["nll"]
    assert "vector: fell back to the identity: the validation set is separable" in " ".join(out.split())
    report = (tmp_path / "o" / "report.md").read_text()
    assert "about 708" not in report


def test_a_kept_fit_of_the_comparison_prints_its_note(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Binary scores 0.1 / 0.5 / 0.9 whose classes mix only at 0.5: Platt and beta calibration
    diverge but keep the fit; their rows point at a note, which is printed under the table in
    the scores' own units."""
    rng = np.random.default_rng(3)
    s = rng.choice([0.1, 0.5, 0.9], 1000, p=[0.4, 0.2, 0.4])
    y = np.where(s == 0.9, 1, np.where(s == 0.1, 0, rng.integers(0, 2, 1000)))
    np.savez(tmp_path / "ties.npz", probs=s, labels=y)
    rc, out, err = run([str(tmp_path / "ties.npz"), "--out", str(tmp_path / "o")], capsys, compare=True)
    assert rc == 0, err
    rows = json.loads((tmp_path / "o" / "metrics.json").read_text())["comparison"]["rows"]
    flat = " ".join(out.split())
    for name in ("platt", "beta"):
        assert rows[name]["short_note"] == "see note" and rows[name]["fallback"] is None
        assert (f"{name}: note: the validation set is separable but for ties (a threshold at the logit 0"
                " (probability 0.5) splits the two classes") in flat


@pytest.mark.filterwarnings("ignore::crossent.calibration.CalibrationWarning")
def test_val_fraction_zero_scores_in_sample_and_recommends_nothing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """With --val-fraction 0 every method is fitted and scored on the same samples, where the
    most parameters win: nothing is called held-out, and no method is recommended."""
    z, y = make(n=400, c=4, t_true=1.0, seed=5)
    np.save(tmp_path / "z.npy", z)
    np.save(tmp_path / "y.npy", y)
    rc, out, err = run([str(tmp_path / "z.npy"), "--labels", str(tmp_path / "y.npy"), "--val-fraction", "0",
                        "--out", str(tmp_path / "o")], capsys, compare=True)
    assert rc == 0, err
    metrics = json.loads((tmp_path / "o" / "metrics.json").read_text())
    assert metrics["comparison"]["recommended"] is None
    assert "held-out samples" not in out and "in-sample samples" in out
    assert "no recommendation: with --val-fraction 0" in out and "recommended:" not in out
    assert " * " not in out and "*│" not in out
    report = (tmp_path / "o" / "report.md").read_text()
    assert "held-out samples" not in report and "split: none (val-fraction 0)" in report
    assert "ranked by in-sample NLL" in report and "no recommendation" in report


def _rows_in_table(out: str, rows: dict[str, Any]) -> list[str]:
    """The methods of the terminal's comparison table, in the order it prints them."""
    at = {name: out.index(f"│ {name} ") for name in rows}
    return sorted(rows, key=at.__getitem__)


def _compared_by_ece(
    z: np.ndarray, y: np.ndarray, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> tuple[str, dict[str, Any]]:
    """``crossent calibrate`` of ``z`` and ``y`` ranked by ECE: its output and metrics.json's
    comparison."""
    np.save(tmp_path / "z.npy", z)
    np.save(tmp_path / "y.npy", y)
    rc, out, err = run([str(tmp_path / "z.npy"), "--labels", str(tmp_path / "y.npy"), "--objective", "ece",
                        "--out", str(tmp_path / "o")], capsys, compare=True)
    assert rc == 0, err
    return out, json.loads((tmp_path / "o" / "metrics.json").read_text())["comparison"]


@pytest.mark.filterwarnings("ignore::crossent.calibration.CalibrationWarning")
def test_ranked_by_ece_a_map_giving_labels_probability_0_is_not_recommended(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Ten classes, 80 samples to fit, ranked by ECE: histogram binning has the lowest held-out
    ECE but gives 47 held-out labels probability 0 (a held-out NLL of about 105 against 1.92).
    It is not recommended and the line says why. Of the maps without zeros vector scaling (20
    parameters) scores lowest, 8.73%, but temperature scaling (1) is within one standard error
    of the difference (2.57%) at 9.29%: temperature scaling is recommended, and the line under
    it says so. As its NLL is better than none's, no warning follows. The rows are ranked by
    ECE, skipped ones last."""
    z, y = make(n=400, c=10, seed=28)
    out, cmp = _compared_by_ece(z, y, tmp_path, capsys)
    rows = cmp["rows"]
    scored = [name for name, row in rows.items() if "skipped" not in row]
    assert scored[0] == "histogram" and rows["histogram"]["zero_probability_labels"] == 47
    assert rows["histogram"]["nll"] > 50 * rows["none"]["nll"]
    assert cmp["recommended"] == "temperature" and cmp["lowest"] == "vector"
    assert cmp["excluded"] == ["histogram"]
    assert [rows[k]["ece"] for k in scored] == sorted(rows[k]["ece"] for k in scored)
    assert list(rows)[-2:] == ["platt", "beta"]  # skipped: binary only
    assert _rows_in_table(out, rows) == list(rows)
    best, low, se = rows["temperature"], rows["vector"], cmp["standard_errors"]["temperature"]
    assert (best["parameters"], low["parameters"]) == (1, 20)
    assert 0 < best["ece"] - low["ece"] <= se == pytest.approx(0.0257, abs=5e-4)
    line = (f"recommended: temperature (held-out ECE {100 * best['ece']:.2f}% against"
            f" {100 * rows['none']['ece']:.2f}% without recalibration)")
    simpler = (f"vector scored lower ({100 * low['ece']:.2f}%), but by less than one standard error of the"
               f" difference ({100 * se:.2f}%), with 20 fitted parameters against 1: the simpler map is"
               " recommended")
    excluded = "not recommended: histogram (lower held-out ECE, but p = 0 for some held-out labels)"
    flat = " ".join(out.split())
    assert f"{line} {simpler} {excluded}" in flat and "histogram *" not in out and "temperature *" in out
    assert best["nll"] < rows["none"]["nll"] and "held-out NLL worse" not in flat
    report = (tmp_path / "o" / "report.md").read_text()
    assert f"\n\n{line}\n\n{simpler}\n\n{excluded}\n" in report
    assert "## Every method (ranked by held-out ECE)" in report
    table = report.split("| method |", 1)[1].splitlines()[2:2 + len(rows)]
    assert [ln.split(" | ")[0][2:] for ln in table] == list(rows)


@pytest.mark.filterwarnings("ignore::crossent.calibration.CalibrationWarning")
@pytest.mark.parametrize(
    ("args", "objective", "lowest", "recommended", "params"),
    [
        # two classes by NLL: beta calibration lowest by 7e-4 nats, within the 8.5e-4 error
        ({"n": 1500, "c": 2, "seed": 2}, "nll", "beta", "temperature", (3, 1)),
        # three calibrated classes, 60 to fit, by ECE: Dirichlet's 8.48% against none's 9.27%,
        # 2.66% of standard error: no recalibration
        ({"n": 300, "c": 3, "t_true": 1.0, "seed": 3}, "ece", "dirichlet", "none", (12, 0)),
    ],
)
def test_a_lower_score_within_one_standard_error_recommends_the_simpler_map(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], args: dict[str, Any], objective: str, lowest: str,
    recommended: str, params: tuple[int, int],
) -> None:
    """The method that scores lowest on the held-out part is not recommended where one with
    fewer fitted parameters (or the predictions as they are) scores within one standard error
    of the difference: the line under the table names both, with the numbers."""
    z, y = make(**args)
    np.save(tmp_path / "z.npy", z)
    np.save(tmp_path / "y.npy", y)
    rc, out, err = run([str(tmp_path / "z.npy"), "--labels", str(tmp_path / "y.npy"), "--objective",
                        objective, "--out", str(tmp_path / "o")], capsys, compare=True)
    assert rc == 0, err
    cmp = json.loads((tmp_path / "o" / "metrics.json").read_text())["comparison"]
    rows, se = cmp["rows"], cmp["standard_errors"][recommended]
    assert (cmp["lowest"], cmp["recommended"]) == (lowest, recommended)
    assert (rows[lowest]["parameters"], rows[recommended]["parameters"]) == params
    assert 0 < rows[recommended][objective] - rows[lowest][objective] <= se
    pct = objective == "ece"

    def fmt(v: float) -> str:
        return f"{100 * v:.2f}%" if pct else f"{v:.4f}"

    simpler = "no recalibration" if recommended == "none" else "the simpler map"
    line = (f"{lowest} scored lower ({fmt(rows[lowest][objective])}), but by less than one standard error of"
            f" the difference ({fmt(se)}), with {params[0]} fitted parameters against {params[1]}: {simpler}"
            " is recommended")
    assert line in " ".join(out.split()) and line in cmp["recommendation"]
    assert f"{recommended} *" in out and f"{lowest} *" not in out


def test_simplest_within_error_takes_the_fewest_parameters_within_the_error() -> None:
    """The rule itself, on hand-made rows: within the error (the bound itself included) the fewest
    parameters win, then the lower score; a simpler method just beyond its error does not."""
    from crossent.calibration.cli import simplest_within_error

    def rows(**scores: tuple[float, int]) -> dict[str, dict[str, Any]]:
        return {k: {"nll": v, "parameters": n} for k, (v, n) in scores.items()}

    r = rows(vector=(1.00, 20), temperature=(1.25, 1), none=(1.51, 0), ensemble=(1.10, 3))
    errors = {"vector": 0.0, "temperature": 0.25, "none": 0.5, "ensemble": 0.2}
    assert simplest_within_error(r, "vector", errors, "nll") == "temperature"  # 0.25 <= 0.25
    assert simplest_within_error(r, "vector", {**errors, "none": 0.51}, "nll") == "none"
    assert simplest_within_error(r, "vector", {**errors, "temperature": 0.24}, "nll") == "ensemble"
    assert simplest_within_error(r, "vector", {k: 0.0 for k in r} | {"vector": 0.0}, "nll") == "vector"
    tie = rows(vector=(1.0, 20), platt=(1.05, 2), other=(1.02, 2))
    assert simplest_within_error(tie, "vector", {"vector": 0.0, "platt": 0.1, "other": 0.1}, "nll") == "other"


def test_the_recommendation_on_one_held_out_sample_says_there_is_no_standard_error() -> None:
    """With one held-out sample no standard error can be measured (it is infinite, so every
    method is within it and the simplest, "none", is recommended): the line says so in words."""
    from crossent.calibration.cli import recommendation_text

    rows = {"none": {"nll": 0.9, "parameters": 0}, "vector": {"nll": 0.5, "parameters": 8}}
    result = {"objective": "nll", "val_fraction": 0.2,
              "comparison": {"rows": rows, "recommended": "none", "lowest": "vector",
                             "standard_errors": {"vector": 0.0, "none": float("inf")}, "excluded": []}}
    assert recommendation_text(result).splitlines() == [
        "recommended: none (no recalibration: held-out NLL 0.9000)",
        "vector scored lower (0.5000), but on one held-out sample, which gives no standard error, with 8"
        " fitted parameters against 0: no recalibration is recommended",
    ]


def test_difference_errors_by_hand() -> None:
    """NLL: the standard error of the mean per-row difference, sd(d) / sqrt(n). ECE: the
    standard deviation over the bootstrap resamples of the difference of the two ECEs, each
    resample drawn as indices with the seed and its ECE taken from the resampled rows by
    ``table_from_scores``; the same for every method, so the lowest's own error is 0."""
    from crossent.calibration import cli as calcli
    from crossent.calibration.metrics import table_from_scores

    rng = np.random.default_rng(5)
    n = 257
    per_row = {
        k: calcli.RowScores(rng.exponential(size=n), rng.uniform(0.3, 1.0, n), (rng.random(n) < 0.7) * 1.0)
        for k in ("a", "b", "c")
    }
    got = calcli.difference_errors(per_row, ["a", "b", "c"], "b", "nll", 10, seed=0)
    d = per_row["a"].nll - per_row["b"].nll
    assert got["b"] == 0.0
    assert got["a"] == pytest.approx(np.sqrt(((d - d.mean()) ** 2).sum() / (n - 1) / n), rel=1e-12)
    got = calcli.difference_errors(per_row, ["a", "b", "c"], "b", "ece", 10, seed=7)
    draws = np.random.default_rng(7)
    diffs: dict[str, list[float]] = {"a": [], "c": []}
    for _ in range(calcli.BOOTSTRAP_RESAMPLES):
        idx = draws.integers(0, n, n)
        e = {k: table_from_scores(r.conf[idx], r.correct[idx], n_bins=10).calibration_error()
             for k, r in per_row.items()}
        for k in diffs:
            diffs[k].append(e[k] - e["b"])
    for k in diffs:
        assert got[k] == pytest.approx(np.std(diffs[k], ddof=1), rel=1e-9)
    assert got["a"] > 0.01  # independent rows: a real spread
    one = {k: calcli.RowScores(*(v[:1] for v in r)) for k, r in per_row.items()}
    assert calcli.difference_errors(one, ["a", "b"], "b", "nll", 10, seed=0) == {"b": 0.0, "a": np.inf}
    assert calcli.difference_errors(per_row, ["b"], "b", "ece", 10, seed=0) == {"b": 0.0}


@pytest.mark.filterwarnings("ignore::crossent.calibration.CalibrationWarning")
def test_n_parameters_counts_what_each_method_learnt() -> None:
    """The counts the one-standard-error rule compares, by hand for C = 4 classes: T 1, the
    ensemble 3 (T and three weights summing to one), vector 2C, matrix and Dirichlet C (C + 1),
    Platt 2, beta 3, histogram binning its bins of the classes it calibrates, isotonic
    regression the steps of its maps; a map that fell back 0."""
    from crossent.calibration.cli import n_parameters

    z, y = make(n=800, c=4, seed=1)
    c = 4
    fits = {
        cal.TemperatureScaler: 1, cal.EnsembleTemperatureScaler: 3, cal.VectorScaler: 2 * c,
        cal.MatrixScaler: c * (c + 1), cal.DirichletCalibrator: c * (c + 1),
    }
    for method, count in fits.items():
        assert n_parameters(method().fit(z, y)) == count, method.__name__
    hist = cal.HistogramBinning(n_bins=7).fit(z, np.where(y == 3, 2, y))  # class 3 absent: identity
    assert hist.identity_classes == [3] and n_parameters(hist) == 3 * 7
    iso = cal.IsotonicCalibrator().fit(z, y)
    assert iso.knots is not None and n_parameters(iso) == sum(k[1].size for k in iso.knots) > 4
    s = z[:, 1] - z[:, 0]
    yb = (y % 2).astype(np.int64)
    assert n_parameters(cal.PlattScaler().fit(s, yb)) == 2
    assert n_parameters(cal.BetaCalibrator(from_logits=True).fit(s, yb)) == 3
    fell = cal.TemperatureScaler().fit(z, np.zeros_like(y))  # one class: falls back
    assert fell.fallback is not None and n_parameters(fell) == 0


@pytest.mark.filterwarnings("ignore::crossent.calibration.CalibrationWarning")
def test_ranked_by_ece_a_recommendation_that_worsens_the_nll_is_warned_of(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Calibrated predictions of three classes, 200 samples to fit: vector scaling has the
    lowest held-out ECE (2.13% against 3.48%, more than a standard error below every simpler
    map) and no zero, but a held-out NLL of 0.616 against 0.607 as given. Ranked by ECE it is
    recommended with a warning, in the terminal and the report; ranked by NLL, nothing beats the
    predictions as given ("none", with no warning), and the rows are in the order of their NLL."""
    z, y = make(n=1000, c=3, t_true=1.0, seed=1)
    out, cmp = _compared_by_ece(z, y, tmp_path, capsys)
    rows = cmp["rows"]
    assert cmp["recommended"] == "vector" == cmp["lowest"] and rows["vector"]["zero_probability_labels"] == 0
    assert rows["vector"]["nll"] == pytest.approx(0.6164, abs=1e-3)
    assert rows["none"]["nll"] == pytest.approx(0.6070, abs=1e-3)
    for k in ("none", "ensemble_temperature"):  # simpler, and more than a standard error above
        assert rows[k]["ece"] - rows["vector"]["ece"] > cmp["standard_errors"][k] > 0
    warning = (f"warning: vector makes the held-out NLL worse ({rows['none']['nll']:.4f} ->"
               f" {rows['vector']['nll']:.4f}); --objective nll ranks by it")
    assert warning in " ".join(out.split())
    assert f"\n\n{warning}\n" in (tmp_path / "o" / "report.md").read_text()
    assert cmp["recommendation"][-1] == warning  # metrics.json keeps the lines under the table
    assert cmp["recommendation"][0].startswith("recommended: vector (held-out ECE")
    rc, out, err = run([str(tmp_path / "z.npy"), "--labels", str(tmp_path / "y.npy"), "--out",
                        str(tmp_path / "n")], capsys, compare=True)
    assert rc == 0, err
    cmp = json.loads((tmp_path / "n" / "metrics.json").read_text())["comparison"]
    rows = cmp["rows"]
    assert cmp["recommended"] == "none" == cmp["lowest"] == next(iter(rows)) and cmp["excluded"] == []
    none_line = f"recommended: none (no recalibration: held-out NLL {rows['none']['nll']:.4f})"
    assert cmp["recommendation"] == [none_line]
    scored = [name for name, row in rows.items() if "skipped" not in row]
    assert [rows[k]["nll"] for k in scored] == sorted(rows[k]["nll"] for k in scored)
    assert _rows_in_table(out, rows) == list(rows)
    assert "worse" not in out and "not recommended" not in out


def test_the_none_row_is_the_before_column_for_rows_summing_to_one_within_tolerance(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Probability rows that sum to 1.0009 (within the metrics' tolerance) are scored as
    given in the "before" column; the comparison's "none" row gives the same numbers, which
    the recommendation quotes, not those of the renormalised rows."""
    z, y = make(n=1200, c=6, seed=2)
    p = torch.softmax(torch.from_numpy(z).double(), 1).numpy()
    keep = p.max(1) < 0.99  # every entry stays below 1 once scaled
    p, y = p[keep] * 1.0009, y[keep]
    np.save(tmp_path / "p.npy", p)
    np.save(tmp_path / "y.npy", y)
    rc, out, err = run([str(tmp_path / "p.npy"), "--labels", str(tmp_path / "y.npy"), "--out",
                        str(tmp_path / "o")], capsys, compare=True)
    assert rc == 0, err
    metrics = json.loads((tmp_path / "o" / "metrics.json").read_text())
    none, before = metrics["comparison"]["rows"]["none"], metrics["before"]
    for key in ("nll", "ece", "brier", "accuracy"):
        assert none[key] == before[key]
    assert f"against {before['nll']:.4f} without recalibration" in " ".join(out.split())


def test_binary_scores_say_which_ece_the_table_gives(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """(N,) scores of class 1: the table's ECE is the top label's, its classwise ECE the ECE of
    p that cal.ece(p, labels) gives; the note under PREDICTIONS says so, and the numbers agree."""
    rng = np.random.default_rng(0)
    p = rng.random(3000)
    y = (rng.random(3000) < p**2).astype(int)  # p badly calibrated, its top label much less so
    np.save(tmp_path / "p.npy", p)
    np.save(tmp_path / "y.npy", y)
    rc, out, err = run([str(tmp_path / "p.npy"), "--labels", str(tmp_path / "y.npy"), "--val-fraction", "0",
                        "--out", str(tmp_path / "o")], capsys)
    assert rc == 0, err
    assert "ECE, AdaECE, MCE and smooth ECE are those of the top label, max(p, 1 - p)" in out
    before = json.loads((tmp_path / "o" / "metrics.json").read_text())["before"]
    assert before["classwise_ece"] == pytest.approx(ece(p, y), rel=1e-9)
    assert before["ece"] == pytest.approx(ece(np.stack([1 - p, p], 1), y), rel=1e-9)
    assert before["ece"] < 0.5 * before["classwise_ece"]


def test_separable_fit_part_falls_back_and_says_so(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    rng = np.random.default_rng(5)
    y = rng.integers(0, 2, 300)
    z = np.stack([-(2 * y - 1) * 4.0, (2 * y - 1) * 4.0], 1) + rng.normal(size=(300, 2))
    np.savez(tmp_path / "p.npz", logits=z, labels=y)
    rc, out, err = run([str(tmp_path / "p.npz"), "--out", str(tmp_path / "o")], capsys)
    assert rc == 0, err
    assert "warning: TemperatureScaler: the validation set is separable" in err
    assert "fell back to the identity map" in out
    # the reason once above the comparison, under the table (the caption only names the fallback)
    above = " ".join(out.split("every method")[0].split())
    assert above.count("the validation set is separable") == 1, above
    assert "temperature: fell back to the identity, fitted on" in above
    metrics = json.loads((tmp_path / "o" / "metrics.json").read_text())
    assert metrics["temperature"] == 1.0 and "separable" in metrics["fallback"]
    assert metrics["after"]["nll"] == pytest.approx(metrics["before"]["nll"], rel=1e-9)
    assert "warning: TemperatureScaler" in (tmp_path / "o" / "report.md").read_text()


def _split_apart(hard_test: bool) -> tuple[np.ndarray, np.ndarray]:
    """Two-class logits of margin 2 whose fit part (the CLI's own split) is right 95% of the
    time, so the fitted T sharpens them, and whose held-out part is right 95% of the time as
    well, or only 60% (``hard_test``: overconfident already, so sharpening hurts it)."""
    from crossent.calibration.cli import stratified_split

    rng = np.random.default_rng(11)
    y = rng.integers(0, 2, 1000)
    val_idx, test_idx = stratified_split(y, 0.2, 0)
    right = np.empty(y.shape[0], bool)
    right[val_idx] = rng.random(val_idx.size) < 0.95
    right[test_idx] = rng.random(test_idx.size) < (0.6 if hard_test else 0.95)
    pred = np.where(right, y, 1 - y)
    z = np.zeros((y.shape[0], 2))
    z[np.arange(y.shape[0]), pred] = 2.0
    return z, y


@pytest.mark.parametrize("objective", ["nll", "ece"])
@pytest.mark.parametrize("hard_test", [True, False])
@pytest.mark.parametrize("compare", [True, False])
def test_a_fit_that_hurts_the_held_out_part_says_so(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], objective: str, hard_test: bool, compare: bool
) -> None:
    z, y = _split_apart(hard_test)
    np.savez(tmp_path / "p.npz", logits=z, labels=y)
    rc, out, err = run([str(tmp_path / "p.npz"), "--objective", objective, "--out", str(tmp_path / "o")],
                       capsys, compare=compare)
    assert rc == 0, err
    assert ("recommended:" in out) == compare
    metrics = json.loads((tmp_path / "o" / "metrics.json").read_text())
    assert metrics["temperature"] < 0.9  # sharpened on the fit part, in both cases
    before, after = metrics["before"][objective], metrics["after"][objective]
    report = (tmp_path / "o" / "report.md").read_text()
    if not hard_test:
        assert after < before
        assert "worse" not in err and "worse" not in report
        assert not any("worse" in w for w in metrics["warnings"])
        return
    assert after > before
    pct = objective == "ece"
    shown = (f"{100 * before:.2f}%", f"{100 * after:.2f}%") if pct else (f"{before:.4f}", f"{after:.4f}")
    want = (f"temperature made the held-out {objective.upper()} worse ({shown[0]} -> {shown[1]} on"
            f" {metrics['n_test']} samples, fitted on {metrics['n_val']})")
    assert f"crossent calibrate: warning: {want}" in err
    assert ("compare the methods below" in err) == compare
    assert any(w.startswith(want) for w in metrics["warnings"])
    assert f"- warning: {want}" in report


def test_method_and_objective_options(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    z, y = make(n=800, c=3, seed=6)
    np.save(tmp_path / "z.npy", z)
    np.save(tmp_path / "y.npy", y)
    base = [str(tmp_path / "z.npy"), "--labels", str(tmp_path / "y.npy")]
    rc, out, err = run([*base, "--objective", "ece"], capsys)
    assert rc == 0, err
    assert "T =" in out
    rc, out, err = run([*base, "--method", "histogram"], capsys)
    assert rc == 0 and "histogram" in out, err
    one_line_error(*run([*base, "--method", "platt"], capsys)[::2], "two classes")
    one_line_error(*run([*base, "--method", "vector", "--objective", "ece"], capsys)[::2],
                   "--objective ece")


@pytest.mark.parametrize(("n", "fraction", "want"), [
    (400, "0.2", "the fit part holds only 80 samples (--val-fraction 0.2 of 400); fits on so few, and"
                 " the comparison of methods, are noisy: raise --val-fraction or give more samples"),
    (150, "0.6", "the fit part holds only 90 samples (--val-fraction 0.6 of 150); fits on so few, and"
                 " the comparison of methods, are noisy: give more samples"),
    (60, "0", "the fit uses only 60 samples; fits on so few are noisy"),
    (500, "0.2", None),
    (3000, "0", None),
])
def test_a_small_fit_part_is_named(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], n: int, fraction: str, want: str | None
) -> None:
    z, y = make(n=n, c=2, seed=4)
    np.savez(tmp_path / "p.npz", logits=z, labels=y)
    rc, _, err = run([str(tmp_path / "p.npz"), "--val-fraction", fraction, "--out", str(tmp_path / "o")],
                     capsys)
    assert rc == 0, err
    metrics = json.loads((tmp_path / "o" / "metrics.json").read_text())
    report = (tmp_path / "o" / "report.md").read_text()
    if want is None:
        assert metrics["n_val"] >= 100 and "fits on so few" not in err + report
        return
    assert metrics["n_val"] < 100
    assert f"crossent calibrate: warning: {want}\n" in err
    assert metrics["warnings"][0] == want and f"- warning: {want}" in report


def test_an_identity_fallback_keeps_a_huge_nll(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Logits so large that p_y underflows: every table scores calibrated logits, so a fit that
    falls back to the identity shows the NLL it had (an NLL from clipped probabilities would
    seem to halve it)."""
    rng = np.random.default_rng(0)
    np.save(tmp_path / "z.npy", rng.normal(size=(300, 4)) * 900)
    np.save(tmp_path / "y.npy", rng.integers(0, 4, 300))
    args = [str(tmp_path / "z.npy"), "--labels", str(tmp_path / "y.npy"), "--out", str(tmp_path / "o")]
    rc, _, err = run(args, capsys, compare=True)
    assert rc == 0, err
    metrics = json.loads((tmp_path / "o" / "metrics.json").read_text())
    assert metrics["before"]["nll"] > 800  # about 900 |z| per wrong sample, not clipped at 708
    assert metrics["after"]["nll"] == pytest.approx(metrics["before"]["nll"], rel=1e-12)
    rows = metrics["comparison"]["rows"]
    for name in ("temperature", "ensemble_temperature"):
        assert rows[name]["fallback"] is not None
        assert rows[name]["nll"] == pytest.approx(rows["none"]["nll"], rel=1e-12)
    assert rows["none"]["nll"] == pytest.approx(metrics["before"]["nll"], rel=1e-12)


# --------------------------------------------------------------------------- csv header rows
def write_csv(path: Path, values: np.ndarray, header: str | None = None) -> Path:
    """``values`` written as pandas' ``DataFrame(values).to_csv(path, index=False)`` writes
    them (pandas is not a dependency): a header of the column indices ``0,1,...`` for an
    unnamed frame, floats in their shortest round-trip form, integers as integers."""
    lines = [] if header is None else [header]
    if values.ndim == 1:
        lines += [str(v.item()) for v in values]
    else:
        lines += [",".join(str(v.item()) for v in row) for row in values]
    path.write_text("\n".join(lines) + "\n")
    return path


def metrics_of(out_dir: Path) -> dict[str, Any]:
    return cast(dict[str, Any], json.loads((out_dir / "metrics.json").read_text()))


@pytest.mark.parametrize("kind", ["logits", "probs"])
@pytest.mark.parametrize("csv_header", [None, "auto", "yes"])
def test_csv_header_of_column_indices_is_a_header(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], kind: str, csv_header: str | None
) -> None:
    """The header ``0,1,2,3`` of an unnamed pandas frame was read as a row of data: 301
    samples for 300, the header scored as logits or probabilities."""
    z, y = make(n=300, c=4, seed=7)
    values = z.astype(np.float64)
    if kind == "probs":
        values = torch.softmax(torch.from_numpy(values), 1).numpy()
    write_csv(tmp_path / "p.csv", values, header="0,1,2,3")
    np.save(tmp_path / "y.npy", y)
    args = [str(tmp_path / "p.csv"), "--labels", str(tmp_path / "y.npy"), "--val-fraction", "0",
            "--out", str(tmp_path / "o")]
    rc, _, err = run([*args, *([] if csv_header is None else ["--csv-header", csv_header])], capsys)
    assert rc == 0, err
    metrics = metrics_of(tmp_path / "o")
    assert metrics["n_samples"] == 300 and metrics["n_classes"] == 4 and metrics["kind"] == kind
    assert metrics["before"]["ece"] == pytest.approx(
        ece(values, y, n_bins=15, from_logits=kind == "logits"), rel=1e-12
    )
    assert metrics["before"]["nll"] == pytest.approx(nll(values, y, from_logits=kind == "logits"), rel=1e-12)


def test_csv_header_no_keeps_the_first_row_and_auto_keeps_float_rows(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    z, y = make(n=300, c=4, seed=8)
    np.save(tmp_path / "y.npy", y)
    write_csv(tmp_path / "p.csv", z, header="0,1,2,3")
    one_line_error(
        *run([str(tmp_path / "p.csv"), "--labels", str(tmp_path / "y.npy"), "--csv-header", "no"],
             capsys)[::2],
        "PREDICTIONS has 301 rows but LABELS has 300 entries",
    )
    # a first data row 0.0,1.0,2.0,3.0 is written as floats: data, not pandas' header
    ramp = z.astype(np.float64)
    ramp[0] = np.arange(4)
    write_csv(tmp_path / "ramp.csv", ramp)
    assert (tmp_path / "ramp.csv").read_text().startswith("0.0,1.0,2.0,3.0\n")
    rc, _, err = run([str(tmp_path / "ramp.csv"), "--labels", str(tmp_path / "y.npy"), "--val-fraction",
                      "0", "--out", str(tmp_path / "o")], capsys)
    assert rc == 0, err
    metrics = metrics_of(tmp_path / "o")
    assert metrics["n_samples"] == 300
    assert metrics["before"]["ece"] == pytest.approx(ece(ramp, y, from_logits=True), rel=1e-12)


def test_csv_headers_0_and_0_1_above_floats_or_integers(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """``0,1`` above rows of floats is pandas' header of two columns; ``0`` above integer labels
    (pandas' header of an unnamed series) is a valid label, so auto reads it as data and the
    row-count error names the fix."""
    rng = np.random.default_rng(9)
    y = rng.integers(0, 2, 300)
    probs = np.eye(2)[np.where(rng.random(300) < 0.8, y, 1 - y)] * 0.9 + 0.05
    probs_csv = write_csv(tmp_path / "p.csv", probs, header="0,1")
    labels_csv = write_csv(tmp_path / "y.csv", y, header="0")
    np.save(tmp_path / "y.npy", y)
    np.save(tmp_path / "p.npy", probs)

    out = tmp_path / "auto"
    rc, _, err = run([str(probs_csv), "--labels", str(tmp_path / "y.npy"), "--val-fraction", "0",
                      "--out", str(out)], capsys)
    assert rc == 0, err
    assert metrics_of(out)["n_samples"] == 300
    assert metrics_of(out)["before"]["ece"] == pytest.approx(ece(probs, y), rel=1e-12)

    fix = (f"; if the first row of LABELS {labels_csv} is a header, delete it or pass --csv-header yes"
           " (which drops the first row of every .csv input)")
    for preds in (tmp_path / "p.npy", probs_csv):
        rc, _, err = run([str(preds), "--labels", str(labels_csv)], capsys)
        one_line_error(rc, err, "PREDICTIONS has 300 rows but LABELS has 301 entries; they must match" + fix)

    for preds, labels in ((probs_csv, tmp_path / "y.npy"), (tmp_path / "p.npy", labels_csv),
                          (probs_csv, labels_csv)):
        out = tmp_path / f"o_{preds.suffix}_{labels.suffix}"
        rc, _, err = run([str(preds), "--labels", str(labels), "--csv-header", "yes", "--val-fraction",
                          "0", "--out", str(out)], capsys)
        assert rc == 0, err
        metrics = metrics_of(out)
        assert metrics["n_samples"] == 300 and metrics["kind"] == "probs"
        assert metrics["before"]["ece"] == pytest.approx(ece(probs, y), rel=1e-12)

    # one-hot rows written as integers: 0,1 is a valid first row of them, kept by auto
    hard = np.eye(2, dtype=np.int64)[y]
    write_csv(tmp_path / "hard.csv", hard)
    out = tmp_path / "hard"
    rc, _, err = run([str(tmp_path / "hard.csv"), "--labels", str(tmp_path / "y.npy"), "--val-fraction", "0",
                      "--out", str(out)], capsys)
    assert rc == 0, err
    assert metrics_of(out)["n_samples"] == 300


@pytest.mark.parametrize(("text", "option"), [
    ("a,b,c\n", []),
    ("0,1,2\n", []),
    ("# written by hand\n0,1,2,3\n\n", []),
    ("0,1\n", ["--csv-header", "yes"]),
])
def test_csv_with_only_a_header_has_no_data_rows(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], text: str, option: list[str]
) -> None:
    """It said "rows have different numbers of columns: []"."""
    (tmp_path / "h.csv").write_text(text)
    np.save(tmp_path / "y.npy", np.arange(3))
    rc, _, err = run([str(tmp_path / "h.csv"), "--labels", str(tmp_path / "y.npy"), *option], capsys)
    one_line_error(rc, err, f"cannot read PREDICTIONS file {tmp_path / 'h.csv'} as csv: the file has a"
                   " header row")
    assert err.rstrip().endswith("and no data rows") and "columns" not in err
    rc, _, err = run([str(tmp_path / "y.npy"), "--labels", str(tmp_path / "h.csv"), *option], capsys)
    one_line_error(rc, err, f"LABELS file {tmp_path / 'h.csv'}")
    assert "no data rows" in err


def test_csv_header_option_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    z, y = make(n=100, c=3)
    np.save(tmp_path / "z.npy", z)
    np.save(tmp_path / "y.npy", y)
    write_csv(tmp_path / "named.csv", z, header="a,b,c")
    one_line_error(
        *run([str(tmp_path / "named.csv"), "--labels", str(tmp_path / "y.npy"), "--csv-header", "no"],
             capsys)[::2],
        "data row 1 is not numeric: 'a,b,c'; if it is a header, drop --csv-header no",
    )
    one_line_error(
        *run([str(tmp_path / "z.npy"), "--labels", str(tmp_path / "y.npy"), "--csv-header", "yes"],
             capsys)[::2],
        "--csv-header yes applies to .csv files and no input is one: drop it",
    )
    # pandas' to_csv with its default index=True: an unnamed first column 0..N-1
    (tmp_path / "indexed.csv").write_text(
        ",0,1,2\n" + "".join(f"{i}," + ",".join(map(repr, map(float, r))) + "\n" for i, r in enumerate(z))
    )
    one_line_error(
        *run([str(tmp_path / "indexed.csv"), "--labels", str(tmp_path / "y.npy")], capsys)[::2],
        "its first column is an unnamed row index 0..N-1 (pandas' to_csv without index=False)",
    )


def test_help_documents_csv_header(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["calibrate", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert "--csv-header {auto,yes,no}" in out
    assert "0,1,...,W-1 written as integers" in out and "pass --csv-header yes" in out


# --------------------------------------------------------------------------- file formats
def _format_cases(d: Path) -> list[tuple[str, list[str], str]]:
    """(PREDICTIONS, extra arguments, the error's ending) for files read as another format."""
    z, y = make(n=100, c=3)
    np.save(d / "z.npy", z)
    np.save(d / "y.npy", y)
    np.savez(d / "p.npz", logits=z, labels=y)
    torch.save({"logits": torch.from_numpy(z), "labels": torch.from_numpy(y)}, d / "p.pt")
    torch.save(torch.from_numpy(z), d / "legacy.pt", _use_new_zipfile_serialization=False)
    write_csv(d / "z.csv", z)
    (d / "npz_named.npy").write_bytes((d / "p.npz").read_bytes())
    npy = r"it is an .npy file (it starts with \x93NUMPY)"
    npz = "it is an .npz file (a zip of .npy arrays)"
    pt = "it is a torch file (a zip holding data.pkl)"
    drop = "drop --format (its extension says what it is)"  # both files' extensions say their formats
    return [
        ("z.npy", ["--format", "npz"], f"as npz: {npy}; {drop}"),
        ("z.npy", ["--format", "pt"], f"as pt: {npy}; {drop}"),
        ("z.npy", ["--format", "csv"], f"as csv: {npy}; {drop}"),
        ("p.npz", ["--format", "npy"], f"as npy: {npz}; {drop}"),
        ("p.npz", ["--format", "pt"], f"as pt: {npz}; {drop}"),
        ("p.pt", ["--format", "npz"], f"as npz: {pt}; {drop}"),
        ("p.pt", ["--format", "npy"], f"as npy: {pt}; {drop}"),
        ("legacy.pt", ["--format", "npy"], f"as npy: it is a torch file (legacy format); {drop}"),
        ("z.csv", ["--format", "npy"], f"as npy: it is text; if it is CSV, {drop}"),
        ("npz_named.npy", [], f"as npy (its extension): {npz}; rename it .npz or pass --format npz"),
        ("npz_named.npy", ["--format", "pt"], f"as pt: {npz}; use --format npz"),
    ]


def test_a_file_read_as_another_format_says_what_it_is(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """``--format npz`` of an .npy said "'numpy.ndarray' object does not support the context
    manager protocol", ``--format pt`` torch's long weights_only text, ``--format npy`` of a
    torch file gave a traceback."""
    for name, extra, want in _format_cases(tmp_path):
        path = tmp_path / name
        rc, _, err = run([str(path), "--labels", str(tmp_path / "y.npy"), *extra], capsys)
        one_line_error(rc, err, f"cannot read PREDICTIONS file {path} {want}")
        assert err.strip().endswith(want), err
        assert len(err.strip()) - len(str(path)) < 160, err
    # the labels file is checked alike; --format applies to both files
    rc, _, err = run([str(tmp_path / "p.npz"), "--labels", str(tmp_path / "y.npy"), "--format", "npz"],
                     capsys)
    one_line_error(rc, err, f"cannot read LABELS file {tmp_path / 'y.npy'} as npz: it is an .npy file")


def test_odd_zip_and_empty_files(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import zipfile

    np.save(tmp_path / "y.npy", np.arange(3))
    np.savez(tmp_path / "y.npz", labels=np.arange(3))
    with zipfile.ZipFile(tmp_path / "odd.npz", "w") as zf:  # a zip, but no .npz
        zf.writestr("notes.txt", "hello")
    for fmt in ("npz", "npy"):  # the labels file is good, as --format reads it
        labels = str(tmp_path / f"y.{fmt}")
        rc, _, err = run([str(tmp_path / "odd.npz"), "--labels", labels, "--format", fmt], capsys)
        one_line_error(rc, err, f"cannot read PREDICTIONS file {tmp_path / 'odd.npz'} as {fmt}")
    (tmp_path / "empty.npy").write_bytes(b"")
    one_line_error(*run([str(tmp_path / "empty.npy"), "--labels", str(tmp_path / "y.npy")], capsys)[::2],
                   f"PREDICTIONS file {tmp_path / 'empty.npy'} is empty")


# --------------------------------------------------------------------------- --key, --labels-key
def test_key_options_on_a_file_of_one_array(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """--labels-key with an .npy LABELS file listed "1 arrays, 0 of them 2-D:  (300,)", an
    empty name."""
    z, y = make(n=100, c=3)
    np.save(tmp_path / "z.npy", z)
    np.save(tmp_path / "y.npy", y)
    write_csv(tmp_path / "y.csv", y, header="label")
    torch.save(torch.from_numpy(z), tmp_path / "z.pt")
    np.savez(tmp_path / "p.npz", logits=z)
    for labels in ("y.npy", "y.csv"):
        rc, _, err = run([str(tmp_path / "p.npz"), "--labels", str(tmp_path / labels), "--labels-key",
                          "labels"], capsys)
        one_line_error(rc, err, f"--labels-key names an array inside an .npz/.pt file; LABELS"
                       f" {tmp_path / labels} holds a single unnamed array: drop --labels-key")
        assert "arrays" not in err
    for preds in ("z.npy", "z.pt"):
        rc, _, err = run([str(tmp_path / preds), "--labels", str(tmp_path / "y.npy"), "--key", "logits"],
                         capsys)
        one_line_error(rc, err, f"--key names an array inside an .npz/.pt file; PREDICTIONS"
                       f" {tmp_path / preds} holds a single unnamed array: drop --key")
        rc, _, err = run([str(tmp_path / preds), "--labels-key", "labels"], capsys)
        one_line_error(rc, err, f"--labels-key names an array inside PREDICTIONS, but {tmp_path / preds}"
                       " holds a single unnamed array (the predictions): pass --labels LABELS")
        assert "arrays" not in err
    # an .npz keeps its listing
    rc, _, err = run([str(tmp_path / "p.npz"), "--labels-key", "labels"], capsys)
    one_line_error(rc, err, "--labels-key 'labels' is not in PREDICTIONS")
    assert "it holds one array: logits (100, 3)" in err


def test_csv_trailing_commas_format_hints_and_empty_npz(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A comma ending every row is an empty last column, not a header; --format given for both
    files where the extensions already say each one's format names that fix; a row lost to
    --csv-header yes is named; an .npz without arrays says so."""
    z, y = make(n=200, c=3, seed=11)
    np.save(tmp_path / "y.npy", y)
    (tmp_path / "t.csv").write_text("".join(",".join(str(float(v)) for v in row) + ",\n" for row in z))
    out = tmp_path / "o"
    rc, _, err = run([str(tmp_path / "t.csv"), "--labels", str(tmp_path / "y.npy"), "--val-fraction", "0",
                      "--out", str(out)], capsys)
    assert rc == 0, err
    metrics = metrics_of(out)
    assert metrics["n_samples"] == 200 and metrics["n_classes"] == 3
    want = ece(z.astype(np.float64), y, from_logits=True)
    assert metrics["before"]["ece"] == pytest.approx(want, rel=1e-12)

    write_csv(tmp_path / "z.csv", z)
    rc, _, err = run([str(tmp_path / "z.csv"), "--labels", str(tmp_path / "y.npy"), "--format", "csv"],
                     capsys)
    one_line_error(rc, err, f"cannot read LABELS file {tmp_path / 'y.npy'} as csv: it is an .npy file")
    assert err.strip().endswith("drop --format (its extension says what it is)")

    write_csv(tmp_path / "y.csv", y)
    rc, _, err = run([str(tmp_path / "z.csv"), "--labels", str(tmp_path / "y.npy"), "--csv-header", "yes"],
                     capsys)
    one_line_error(rc, err, f"PREDICTIONS has 199 rows but LABELS has 200 entries; they must match;"
                   f" --csv-header yes dropped the first row of {tmp_path / 'z.csv'}")

    np.savez(tmp_path / "empty.npz")
    rc, _, err = run([str(tmp_path / "empty.npz"), "--labels", str(tmp_path / "y.npy")], capsys)
    one_line_error(rc, err, f"PREDICTIONS {tmp_path / 'empty.npz'} holds no arrays")
    assert err.strip().endswith("holds no arrays")

    # Excel's "Unicode text" (UTF-16 with a byte-order mark), and a CSV of one column
    (tmp_path / "u16.csv").write_bytes("0.2,0.8\n0.6,0.4\n".encode("utf-16"))
    rc, _, err = run([str(tmp_path / "u16.csv"), "--labels", str(tmp_path / "y.npy")], capsys)
    one_line_error(rc, err, "it is not UTF-8 text (byte 0 is b'\\xff'): save it as CSV UTF-8, uncompressed")
    write_csv(tmp_path / "one.csv", z[:, 0])
    rc, _, err = run([str(tmp_path / "one.csv"), "--labels", str(tmp_path / "y.npy")], capsys)
    one_line_error(rc, err, "PREDICTIONS of shape (200,) (a .csv file of one column) are binary scores")


class _NoFigure:
    def savefig(self, *args: object, **kwargs: object) -> None:
        pass


@pytest.fixture
def no_figures(monkeypatch: pytest.MonkeyPatch) -> None:
    """--out writes its report.md and metrics.json, and no slow PNG figure."""
    import crossent.calibration.plots as plots

    for name in ("reliability_diagram", "compare_reliability_diagrams"):
        monkeypatch.setattr(plots, name, lambda *a, **k: _NoFigure())


def _rare_class(n: int = 400, c: int = 4) -> tuple[np.ndarray, np.ndarray]:
    """Logits and labels whose last class has 2 samples: the 0.2 split puts none of them in
    the fit part (round(0.4) = 0), both in the held-out part."""
    z, y = make(n=n, c=c, seed=7)
    y = np.where(y == c - 1, 0, y)
    y[:2] = c - 1
    return z, y


def _note_cell(out: str, method: str) -> str:
    """The comparison table's note for ``method``, its wrapped lines joined."""
    lines = out.splitlines()
    start = next(i for i, ln in enumerate(lines) if ln.startswith(f"│ {method} "))
    cells = [lines[start].split("│")[-2].strip()]
    for ln in lines[start + 1:]:
        if not ln.startswith("│  "):  # the next method's row, or the end of the table
            break
        cells.append(ln.split("│")[-2].strip())
    return " ".join(cells)


@pytest.mark.filterwarnings("ignore::crossent.calibration.CalibrationWarning")
@pytest.mark.usefixtures("no_figures")
def test_classes_absent_from_the_fit_part_are_named_in_the_output(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Histogram binning and isotonic regression keep the identity for the classes with no
    sample in the fit part (``identity_classes``): the notes under the table, the comparison's
    note column, report.md and metrics.json say so (only a Python warning did)."""
    import crossent.calibration.cli as cli

    monkeypatch.setattr(cli, "METHODS", ("temperature", "histogram", "isotonic"))  # fast
    z, y = _rare_class()
    np.savez(tmp_path / "p.npz", logits=z, labels=y)
    note = "class 3 (1 of 4 classes) has no sample in the fit part: left uncalibrated (identity)"
    outs = {}
    for method, compare in (("histogram", True), ("isotonic", False)):
        out_dir = tmp_path / method
        rc, out, err = run([str(tmp_path / "p.npz"), "--method", method, "--out", str(out_dir)],
                           capsys, compare=compare)
        assert rc == 0, err
        outs[method] = out
        assert f"{method}: note: {note}" in " ".join(out.split())  # rich wraps long lines
        metrics = metrics_of(out_dir)
        assert metrics["note"] == note and metrics["identity_classes"] == [3]
        assert f"- note: {note}" in (out_dir / "report.md").read_text()
    rows = metrics_of(tmp_path / "histogram")["comparison"]["rows"]
    for method in ("histogram", "isotonic"):
        assert rows[method]["note"] == note
        assert "identity for class 3 (see note)" in _note_cell(outs["histogram"], method)
    assert rows["temperature"]["note"] is None


def _softmax(z: np.ndarray) -> np.ndarray:
    return cast(np.ndarray, torch.softmax(torch.from_numpy(z.astype(np.float64)), 1).numpy())


@pytest.mark.usefixtures("no_figures")
def test_rounded_probabilities_are_not_taken_for_logits(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Probabilities written with two decimals (rows sum to 0.97..1.03) were taken for logits
    (T = 0.385 on log-probabilities read as logits); they are renormalised, with a warning.
    Values in [0, 1] that are no probability rows (sigmoid outputs) are refused, naming --kind."""
    z, y = make(n=300, c=4, t_true=1.0, seed=2)
    p = np.round(_softmax(z), 2)
    assert np.abs(p.sum(1) - 1).max() > 1e-3  # rounded: auto-detection said "logits"
    np.save(tmp_path / "y.npy", y)
    np.savetxt(tmp_path / "p.csv", p, fmt="%.2f", delimiter=",")
    out = tmp_path / "o"
    rc, _, err = run([str(tmp_path / "p.csv"), "--labels", str(tmp_path / "y.npy"), "--out", str(out)],
                     capsys)
    assert rc == 0, err
    assert "renormalised" in err and "--kind logits" in err
    zeros = int((p == 0).sum())
    assert zeros and f"{zeros} entries of PREDICTIONS are 0" in err and "read as 0.005" in err
    metrics = metrics_of(out)
    assert metrics["kind"] == "probs"
    from crossent.calibration.cli import stratified_split

    _, test = stratified_split(y, 0.2, 0)
    q = np.maximum(p / p.sum(1, keepdims=True), 0.005)  # the zeros read as half a step
    q /= q.sum(1, keepdims=True)
    assert metrics["before"]["nll"] == pytest.approx(nll(q[test], y[test]), rel=1e-9)
    assert metrics["temperature"] == pytest.approx(1.0, abs=0.3)  # calibrated: T near 1

    s = np.random.default_rng(0).random((300, 4))  # independent sigmoid outputs
    np.save(tmp_path / "s.npy", s)
    for kind in ([], ["--kind", "probs"]):
        rc, _, err = run([str(tmp_path / "s.npy"), "--labels", str(tmp_path / "y.npy"), *kind], capsys)
        one_line_error(rc, err, "--kind logits")
        assert "sums to" in err


@pytest.mark.filterwarnings("ignore::crossent.calibration.CalibrationWarning")
@pytest.mark.usefixtures("no_figures")
@pytest.mark.parametrize("shape", ["(N,)", "(N, 1)"])
@pytest.mark.parametrize("kind", ["logits", "probs"])
def test_binary_scores_of_the_positive_class(
    shape: str, kind: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Binary (N,) or (N, 1) scores of class 1 (a sigmoid's logits or probabilities, what
    Platt and beta scaling take) were refused as "must be 2-D" with no way on; they are the
    two columns [0, s] (logits) or [1 - p, p] (probabilities)."""
    rng = np.random.default_rng(4)
    s = rng.normal(size=400) * 3
    y = (rng.random(400) < 1 / (1 + np.exp(-s / 2))).astype(np.int64)
    values = s if kind == "logits" else 1 / (1 + np.exp(-s))
    np.save(tmp_path / "s.npy", values if shape == "(N,)" else values[:, None])
    np.save(tmp_path / "y.npy", y)
    out = tmp_path / "o"
    rc, stdout, err = run([str(tmp_path / "s.npy"), "--labels", str(tmp_path / "y.npy"), "--method",
                           "platt", "--out", str(out)], capsys)
    assert rc == 0, err
    assert "binary scores of class 1" in stdout
    metrics = metrics_of(out)
    assert metrics["n_classes"] == 2 and metrics["kind"] == kind
    from crossent.calibration.cli import stratified_split

    _, test = stratified_split(y, 0.2, 0)
    z2 = np.stack([np.zeros_like(s), s], 1)[test]
    assert metrics["before"]["nll"] == pytest.approx(nll(z2, y[test], from_logits=True), rel=1e-6)
    assert metrics["after"]["nll"] < metrics["before"]["nll"]  # over-confident by 2


def test_binary_scores_need_0_1_labels(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    z, y = make(n=100, c=3)
    np.save(tmp_path / "s.npy", z[:, 0])
    np.save(tmp_path / "y.npy", y)
    rc, _, err = run([str(tmp_path / "s.npy"), "--labels", str(tmp_path / "y.npy")], capsys)
    one_line_error(rc, err, "PREDICTIONS of shape (100,) are binary scores of class 1, which need labels 0/1",
                   "holds 2 at entry 0: for C classes pass (N, C) PREDICTIONS, a 2-D array")
    assert "must be a 2-D array" not in err  # (N,) scores are accepted, as binary ones


@pytest.mark.usefixtures("no_figures")
def test_label_forms(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Boolean labels are 0/1; one-hot labels are their argmax; 1-based labels, class names
    and multi-label rows are refused with the fix."""
    z, y = make(n=200, c=2, seed=5)
    np.save(tmp_path / "z.npy", z)
    zp = str(tmp_path / "z.npy")
    out = tmp_path / "o"
    np.save(tmp_path / "yb.npy", y.astype(bool))
    rc, _, err = run([zp, "--labels", str(tmp_path / "yb.npy"), "--out", str(out)], capsys)
    assert rc == 0, err
    reference = metrics_of(out)["before"]
    np.save(tmp_path / "yoh.npy", np.eye(2, dtype=np.float32)[y])
    rc, _, err = run([zp, "--labels", str(tmp_path / "yoh.npy"), "--out", str(out)], capsys)
    assert rc == 0, err
    assert metrics_of(out)["before"] == reference

    np.save(tmp_path / "y1.npy", y + 1)
    rc, _, err = run([zp, "--labels", str(tmp_path / "y1.npy")], capsys)
    one_line_error(rc, err, "LABELS must lie in 0..1")
    assert "1-based" in err and "subtract 1" in err
    np.save(tmp_path / "ys.npy", np.where(y == 1, "cat", "dog"))
    rc, _, err = run([zp, "--labels", str(tmp_path / "ys.npy")], capsys)
    one_line_error(rc, err, "integer class indices")
    assert "column order of PREDICTIONS" in err
    np.save(tmp_path / "yml.npy", np.ones((200, 2)))
    rc, _, err = run([zp, "--labels", str(tmp_path / "yml.npy")], capsys)
    one_line_error(rc, err, "LABELS must be a 1-D array of class indices, got shape (200, 2)")
    assert "multilabel_ece" in err


@pytest.mark.parametrize("decimals", [1, 2, 3, 6, 9])
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_rounding_step_finds_the_decimals_a_file_was_written_with(decimals: int, dtype: type) -> None:
    from crossent.calibration.cli import rounding_step

    z, _ = make(n=500, c=5, seed=4)
    p = _softmax(z)
    rounded = np.round(p, decimals).astype(dtype)
    if dtype is np.float32 and decimals > 6:  # float32 holds about 7 digits: not told apart
        assert rounding_step(rounded) is None
    else:
        assert rounding_step(rounded) == pytest.approx(10.0**-decimals)
    assert rounding_step(p.astype(dtype)) is None  # full precision
    assert rounding_step(np.eye(5)[np.arange(500) % 5].astype(dtype)) is None  # hard 0/1 predictions


def test_zeros_of_rounded_probabilities_are_read_as_half_a_step(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Probabilities written with 6 decimals hold exact zeros (here 0.3 % of the entries). Read
    as log(tiny), about -708, they wrecked the matrix and Dirichlet fits (held-out NLL 2.8
    against 1.9 uncalibrated on this data); read as 5e-7, the most that rounds to 0, those fits
    land near temperature scaling. Every table sees the same reading, and the output says so.
    Full-precision probabilities with exact zeros (float underflow) keep log(tiny)."""
    from crossent.calibration import cli as calibrate_cli

    rng = np.random.default_rng(1)
    z = rng.normal(size=(3000, 10)) * 3
    y = (_softmax(z / 2).cumsum(1) > rng.random((3000, 1))).argmax(1)
    p = np.round(_softmax(z), 6)
    assert (p == 0).any()
    np.savetxt(tmp_path / "p.csv", p, fmt="%.6f", delimiter=",")
    np.save(tmp_path / "y.npy", y)
    args = [str(tmp_path / "p.csv"), "--labels", str(tmp_path / "y.npy")]

    rc, _, err = run([*args, "--out", str(tmp_path / "o")], capsys, compare=True)
    assert rc == 0, err
    assert f"{int((p == 0).sum())} entries of PREDICTIONS are 0" in err and "read as 5e-07" in err
    rows = metrics_of(tmp_path / "o")["comparison"]["rows"]
    for name in ("matrix", "dirichlet"):
        assert rows[name]["nll"] < min(rows["none"]["nll"], 1.2 * rows["temperature"]["nll"])
    _, test = calibrate_cli.stratified_split(y, 0.2, 0)
    q = np.maximum(p / p.sum(1, keepdims=True), 5e-7)
    q /= q.sum(1, keepdims=True)
    assert rows["none"]["nll"] == pytest.approx(nll(q[test], y[test]), rel=1e-9)
    assert metrics_of(tmp_path / "o")["before"]["nll"] == pytest.approx(rows["none"]["nll"], rel=1e-12)

    monkeypatch.setattr(calibrate_cli, "rounding_step", lambda preds: None)  # zeros as log(tiny)
    rc, _, err = run([*args, "--out", str(tmp_path / "o2")], capsys, compare=True)
    assert rc == 0 and "read as 2.22507e-308, the smallest normal float64" in err
    tiny_rows = metrics_of(tmp_path / "o2")["comparison"]["rows"]
    assert tiny_rows["matrix"]["nll"] > rows["none"]["nll"]  # what the floor fixes


def test_zeros_of_full_precision_probabilities_are_read_alike_in_every_table(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Zeros of float32 probabilities that are not rounded (a softmax that underflowed) are read
    as the smallest normal float32, log about -87, by the methods and by the numbers before
    recalibration alike, and the output says so: the NLL before once read them as the smallest
    float64 (-708), so that an identity map (a fallback) showed an NLL 88 lower than before."""
    from crossent.calibration.cli import stratified_split

    rng = np.random.default_rng(1)
    z = rng.normal(size=(3000, 10)) * 3
    y = (_softmax(z / 2).cumsum(1) > rng.random((3000, 1))).argmax(1)
    full = _softmax(z * 30).astype(np.float32)
    zeros = int((full == 0).sum())
    assert zeros and (full[np.arange(3000), y] == 0).any()
    np.save(tmp_path / "f.npy", full)
    np.save(tmp_path / "y.npy", y)
    rc, _, err = run([str(tmp_path / "f.npy"), "--labels", str(tmp_path / "y.npy"),
                      "--out", str(tmp_path / "o")], capsys, compare=True)
    assert rc == 0, err
    assert f"{zeros} entries of PREDICTIONS are 0: read as 1.17549e-38, the smallest normal float32" in err
    report = metrics_of(tmp_path / "o")
    none = report["comparison"]["rows"]["none"]["nll"]
    assert report["before"]["nll"] == pytest.approx(none, rel=1e-12)
    _, test = stratified_split(y, 0.2, 0)
    q = np.maximum(full.astype(np.float64), float(np.finfo(np.float32).tiny))
    want = -np.log(q[test, y[test]] / q[test].sum(1)).mean()
    assert none == pytest.approx(want, rel=1e-9)


def test_the_comparison_runs_over_many_chunks(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Inputs whose validation part passes ``CHUNK_ELEMENTS`` entries (about 2^20: 20,000 x
    1,000 logits at the default split) are fitted in chunks. Vector scaling's fit over several
    chunks once ended the comparison with a traceback ("Trying to backward through the graph a
    second time"); over chunks of 40 entries every method gives what it gives over one."""
    from crossent.calibration import _inputs

    z, y = make(n=600, c=4, seed=6)
    np.save(tmp_path / "z.npy", z)
    np.save(tmp_path / "y.npy", y)
    args = [str(tmp_path / "z.npy"), "--labels", str(tmp_path / "y.npy")]
    rc, _, err = run([*args, "--out", str(tmp_path / "one")], capsys, compare=True)
    assert rc == 0, err
    monkeypatch.setattr(_inputs, "CHUNK_ELEMENTS", 40)  # 10 rows per chunk
    rc, _, err = run([*args, "--out", str(tmp_path / "many")], capsys, compare=True)
    assert rc == 0, err
    one = metrics_of(tmp_path / "one")["comparison"]["rows"]
    many = metrics_of(tmp_path / "many")["comparison"]["rows"]
    assert one.keys() == many.keys()
    for name, row in one.items():
        if "skipped" not in row:
            assert many[name]["nll"] == pytest.approx(row["nll"], rel=1e-6), name


@pytest.mark.parametrize("binary", [False, True], ids=["multiclass", "binary"])
def test_ignore_index_leaves_out_those_samples(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], binary: bool
) -> None:
    """Labels of -100 (PyTorch's padding or void label): refused with the option that takes
    them; with --ignore-index -100 the run is the run on the files without those samples, and
    says how many it left out."""
    z, y = make(n=900, c=2 if binary else 4, seed=8)
    preds = z[:, 1] - z[:, 0] if binary else z
    yi = y.copy()
    yi[::6] = -100
    keep = yi != -100
    np.save(tmp_path / "z.npy", preds)
    np.save(tmp_path / "y.npy", yi)
    np.save(tmp_path / "zk.npy", preds[keep])
    np.save(tmp_path / "yk.npy", y[keep])
    args = [str(tmp_path / "z.npy"), "--labels", str(tmp_path / "y.npy")]
    rc, _, err = run([*args, "--out", str(tmp_path / "o")], capsys)
    one_line_error(rc, err, "holds -100 at entry 0", "pass --ignore-index -100")

    rc, out, err = run([*args, "--ignore-index", "-100", "--out", str(tmp_path / "o")], capsys, compare=True)
    assert rc == 0, err
    assert f"left out {int((~keep).sum())} samples whose label is -100" in out
    rc, _, err = run([str(tmp_path / "zk.npy"), "--labels", str(tmp_path / "yk.npy"),
                      "--out", str(tmp_path / "k")], capsys, compare=True)
    assert rc == 0, err
    got, want = metrics_of(tmp_path / "o"), metrics_of(tmp_path / "k")
    assert got["n_samples"] == want["n_samples"] == int(keep.sum()) and got["n_ignored"] == int((~keep).sum())
    for key in ("before", "after", "state"):
        assert got[key] == want[key]
    assert got["comparison"] == want["comparison"]
    assert "samples left out, their label -100" in (tmp_path / "o" / "report.md").read_text()

    np.save(tmp_path / "all.npy", np.full_like(y, -100))
    rc, _, err = run([str(tmp_path / "z.npy"), "--labels", str(tmp_path / "all.npy"),
                      "--ignore-index", "-100"], capsys)
    one_line_error(rc, err, "every label equals --ignore-index -100")


@pytest.mark.parametrize("layout", ["classes_last", "classes_in_dim_1", "flat_labels"])
def test_per_position_scores_are_calibrated_as_their_rows(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], layout: str
) -> None:
    """A sequence model's (B, T, C) logits with (B, T) labels and -100 padding (the README's
    token example), a segmentation model's (N, C, T) with (N, T) labels, and (B, T, C) with
    flat labels are calibrated as the (positions, C) rows they hold (they were refused as "must
    be 1-D or 2-D"); labels of another shape are refused in one line naming both shapes."""
    z, y = make(n=1200, c=5, seed=9)
    yi = y.copy()
    yi[::7] = -100
    np.save(tmp_path / "zk.npy", z[yi != -100])
    np.save(tmp_path / "yk.npy", y[yi != -100])
    tokens, labels = z.reshape(8, 150, 5), yi.reshape(8, 150)
    if layout == "classes_in_dim_1":
        tokens = np.ascontiguousarray(np.moveaxis(tokens, 2, 1))
    if layout == "flat_labels":
        labels = labels.reshape(-1)
    np.save(tmp_path / "z.npy", tokens)
    np.save(tmp_path / "y.npy", labels)
    rc, out, err = run([str(tmp_path / "z.npy"), "--labels", str(tmp_path / "y.npy"),
                        "--ignore-index", "-100", "--out", str(tmp_path / "o")], capsys)
    assert rc == 0, err
    assert f"left out {int((yi == -100).sum())} samples whose label is -100" in out
    rc, _, err = run([str(tmp_path / "zk.npy"), "--labels", str(tmp_path / "yk.npy"),
                      "--out", str(tmp_path / "k")], capsys)
    assert rc == 0, err
    got, want = metrics_of(tmp_path / "o"), metrics_of(tmp_path / "k")
    assert got["n_samples"] == want["n_samples"] and got["n_ignored"] == int((yi == -100).sum())
    for key in ("before", "after", "state"):
        assert got[key] == want[key]
    short = labels.reshape(-1)[:-1] if layout == "flat_labels" else yi.reshape(8, 150)[:, :9]
    np.save(tmp_path / "short.npy", short)
    rc, _, err = run([str(tmp_path / "z.npy"), "--labels", str(tmp_path / "short.npy")], capsys)
    one_line_error(rc, err, f"PREDICTIONS of shape {tokens.shape} hold a score vector per position",
                   "got shape")


def test_a_pickle_that_is_not_tensors_is_refused_in_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A .pt file that torch.load(weights_only=True) refuses (a plain pickle of a NumPy array)
    gives one short line, without torch's warning about the pickle protocol and without its
    advice to load with weights_only=False, which a command-line user cannot take."""
    import pickle

    with open(tmp_path / "p.pt", "wb") as f:
        pickle.dump(np.zeros((10, 3)), f, protocol=4)
    np.save(tmp_path / "y.npy", np.zeros(10, dtype=int))
    rc, out, err = run([str(tmp_path / "p.pt"), "--labels", str(tmp_path / "y.npy")], capsys)
    assert rc == 2 and out == ""
    assert err.count("\n") == 1 and err.startswith("crossent calibrate: error: cannot read PREDICTIONS")
    assert "weights_only=False" not in err and "torch.save(tensor) or np.save" in err


@pytest.mark.parametrize(
    ("objective", "before", "after", "warned"),
    [
        ("nll", 3.11460, 3.114604, False),  # worse by 4e-6 nats: the same number as printed
        ("nll", 3.1146, 3.1151, True),
        ("nll", 3.1151, 3.1146, False),
        ("ece", 0.012341, 0.012344, False),  # 1.23 % both
        ("ece", 0.0123, 0.0151, True),
    ],
)
def test_the_held_out_warning_needs_a_difference_that_shows(
    objective: str, before: float, after: float, warned: bool
) -> None:
    """The warning that the method made the held-out objective worse fires where the numbers
    it prints differ, not for a difference below their last digit."""
    from crossent.calibration.cli import held_out_warning

    result = {"objective": objective, "before": {objective: before}, "after": {objective: after},
              "method": "temperature", "n_test": 600, "n_val": 2400, "val_fraction": 0.8}
    message = held_out_warning(result, compare=True)
    assert (message is not None) == warned
    if message is not None:
        assert "worse" in message


def test_a_scalar_array_is_refused_by_its_shape(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A 0-d array (a run's ``.../temperature`` picked by a wrong --key) is refused by its
    shape in one line, not with Python's "len() of unsized object"."""
    np.save(tmp_path / "s.npy", np.float64(3.0))
    np.save(tmp_path / "y.npy", np.arange(4) % 2)
    rc, _, err = run([str(tmp_path / "s.npy"), "--labels", str(tmp_path / "y.npy")], capsys)
    one_line_error(rc, err, "shape ()")
    assert "unsized" not in err
    arrays = {"t/ce/seed0/logits": np.zeros((4, 2)), "t/ce/seed0/temperature": np.asarray(1.5),
              "t/ce/seed0/labels": np.arange(4) % 2}
    np.savez(tmp_path / "p.npz", **arrays)  # type: ignore[arg-type]
    rc, _, err = run([str(tmp_path / "p.npz"), "--key", "t/ce/seed0/temperature"], capsys)
    one_line_error(rc, err, "PREDICTIONS must be a 1-D (binary scores) or 2-D array (samples x classes),"
                   " got shape ()")


def test_the_ece_objective_fits_the_ece_of_n_bins(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """--objective ece --n-bins 5 fits T by the 5-bin ECE, the ECE the report shows and ranks
    by: T is TemperatureScaler's with n_bins=5 on the same fit part."""
    from crossent.calibration import TemperatureScaler
    from crossent.calibration.cli import stratified_split

    z, y = make(n=1200, c=4, seed=9)
    np.save(tmp_path / "z.npy", z)
    np.save(tmp_path / "y.npy", y)
    rc, _, err = run([str(tmp_path / "z.npy"), "--labels", str(tmp_path / "y.npy"), "--objective", "ece",
                      "--n-bins", "5", "--out", str(tmp_path / "o")], capsys)
    assert rc == 0, err
    fit, _ = stratified_split(y, 0.2, 0)
    zf = z[fit].astype(np.float64)
    want = TemperatureScaler().fit(zf, y[fit], objective="ece", n_bins=5).temperature
    other = TemperatureScaler().fit(zf, y[fit], objective="ece", n_bins=15).temperature
    got = metrics_of(tmp_path / "o")["temperature"]
    assert got == pytest.approx(float(want), rel=1e-12)
    assert float(want) != pytest.approx(float(other), rel=1e-6)  # the bins make a difference here


def test_probabilities_below_zero_by_round_off_are_counted_with_the_zeros(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Entries a hair below 0 (within the round-off a probability may carry) are read as the
    zeros are, and the note counts them with the zeros and says how many are negative."""
    rng = np.random.default_rng(12)
    z = rng.normal(size=(1500, 5)) * 3
    y = (_softmax(z).cumsum(1) > rng.random((1500, 1))).argmax(1)
    p = _softmax(z * 4)
    p[p < 1e-4] = 0
    p /= p.sum(1, keepdims=True)
    zeros = int((p == 0).sum())
    neg = p.copy()
    neg[neg == 0] = -1e-12
    np.save(tmp_path / "y.npy", y)
    np.save(tmp_path / "p0.npy", p)
    np.save(tmp_path / "pn.npy", neg)
    rc0, out0, err0 = run([str(tmp_path / "p0.npy"), "--labels", str(tmp_path / "y.npy")], capsys)
    rcn, outn, errn = run([str(tmp_path / "pn.npy"), "--labels", str(tmp_path / "y.npy")], capsys)
    assert rc0 == rcn == 0, (err0, errn)
    assert f"{zeros} entries of PREDICTIONS are 0:" in err0
    assert f"{zeros} entries of PREDICTIONS are 0 ({zeros} of them below 0 by round-off):" in errn
    assert out0 == outn


def test_python_dash_m_crossent_runs_the_command() -> None:
    """``python -m crossent`` is the ``crossent`` command."""
    import subprocess

    res = subprocess.run([sys.executable, "-m", "crossent", "calibrate", "--help"], capture_output=True,
                         text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert "--objective" in res.stdout


def test_platt_on_logits_whose_gap_lies_in_0_1_gives_no_probability_warning(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The binary methods are fitted on the logit gap z1 - z0, which may lie in [0, 1] for
    logits far from it: the command reads logits as logits, without the library's "these look
    like probabilities" warning (which it has no option to act on)."""
    rng = np.random.default_rng(13)
    z = np.stack([3 + np.zeros(400), 3 + rng.uniform(0, 1, 400)], 1)
    y = (rng.random(400) < 0.5).astype(int)
    np.save(tmp_path / "z.npy", z)
    np.save(tmp_path / "y.npy", y)
    for method in ("platt", "beta"):
        rc, _, err = run([str(tmp_path / "z.npy"), "--labels", str(tmp_path / "y.npy"), "--method", method],
                         capsys)
        assert rc == 0, err
        assert "lies in [0, 1]" not in err, err


@pytest.mark.parametrize("bad", ["NaN row", "label out of range", "binary label not 0/1"])
def test_ignore_index_errors_name_the_files_own_row(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], bad: str
) -> None:
    """With --ignore-index, a bad row or label is named by its place in the files, not among
    the samples left after the ignored ones (the first 50 here) were dropped."""
    z, y = make(n=400, c=2 if bad.startswith("binary") else 4, seed=9)
    preds = z[:, 1] - z[:, 0] if bad.startswith("binary") else z
    y[:50] = -100
    if bad == "NaN row":
        preds[120, 1] = np.nan
        want = "(first: row 120)"
    else:
        y[130] = 7
        want = "holds 7 at entry 130"
    np.save(tmp_path / "z.npy", preds)
    np.save(tmp_path / "y.npy", y)
    rc, _, err = run([str(tmp_path / "z.npy"), "--labels", str(tmp_path / "y.npy"), "--ignore-index", "-100"],
                     capsys)
    one_line_error(rc, err, want)
    if bad.startswith("binary"):  # the (N,) scores are accepted: the message does not say otherwise
        assert "must be a 2-D array" not in err and "binary scores of class 1, which need labels 0/1" in err


def test_a_file_that_is_not_npy_is_named_so(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Bytes that are no .npy file, named .npy: the error says so, not NumPy's advice to load a
    pickle unsafely (there is no such option here); an array of Python objects says what it is."""
    (tmp_path / "junk.npy").write_bytes(b"hello world\0\1")
    np.save(tmp_path / "y.npy", np.arange(10) % 2)
    rc, _, err = run([str(tmp_path / "junk.npy"), "--labels", str(tmp_path / "y.npy")], capsys)
    one_line_error(rc, err, "junk.npy as npy: it is not an .npy file (it does not start with \\x93NUMPY)")
    assert "pickle" not in err
    np.save(tmp_path / "obj.npy", np.array(["a", 1], dtype=object), allow_pickle=True)
    rc, _, err = run([str(tmp_path / "obj.npy"), "--labels", str(tmp_path / "y.npy")], capsys)
    one_line_error(rc, err, "it holds Python objects")


def test_huge_nlls_are_printed_in_scientific_notation(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Logits of order 1e30 give NLLs of order 1e29: a table cell and report.md show them as
    6.632e+29, not as thirty digits cut off by the column."""
    z, y = make(n=600, c=4, seed=10)
    np.save(tmp_path / "z.npy", z * 1e30)
    np.save(tmp_path / "y.npy", y)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", cal.CalibrationWarning)
        rc, out, err = run([str(tmp_path / "z.npy"), "--labels", str(tmp_path / "y.npy"), "--out",
                            str(tmp_path / "o")], capsys)
    assert rc == 0, err
    nll_row = next(line for line in out.splitlines() if line.lstrip("│ ").startswith("NLL"))
    assert "e+29" in nll_row or "e+30" in nll_row, nll_row
    assert "…" not in nll_row
    report = (tmp_path / "o" / "report.md").read_text()
    assert not any(len(cell.strip()) > 20 for line in report.splitlines() if line.startswith("| NLL")
                   for cell in line.split("|")), report


def test_masked_logits_are_calibrated_and_the_mixing_maps_skipped(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """-inf logits (masked classes) are probability 0: the command fits and compares the
    methods that take them, skips matrix and Dirichlet scaling by name in the comparison, and
    refuses them as --method in one line; a row with NaN or one masked throughout is refused."""
    rng = np.random.default_rng(1)
    n = 600
    y = rng.integers(0, 4, n)
    z = rng.normal(size=(n, 6)) * 2
    z[np.arange(n), y] += 2
    z[:, 4:] = -np.inf
    z[::5, 1] = -np.inf
    z[np.arange(n), y] = np.maximum(z[np.arange(n), y], 0.0)
    np.savez(tmp_path / "p.npz", logits=z, labels=y)
    rc, _, err = run([str(tmp_path / "p.npz"), "--out", str(tmp_path / "o")], capsys, compare=True)
    assert rc == 0, err
    rows = json.loads((tmp_path / "o" / "metrics.json").read_text())["comparison"]["rows"]
    assert rows["matrix"] == rows["dirichlet"] == {"skipped": "masked logits (-inf)"}
    assert rows["temperature"]["nll"] < rows["none"]["nll"] and rows["vector"]["fallback"] is None
    rc, _, err = run([str(tmp_path / "p.npz"), "--method", "dirichlet"], capsys)
    assert rc == 2 and err.strip() == (
        "crossent calibrate: error: --method dirichlet cannot take masked logits (-inf in PREDICTIONS): its"
        " linear map mixes every class's logit; --method temperature or vector can")
    for row, value in ((3, np.nan), (3, -np.inf)):
        bad = z.copy()
        bad[row] = value if np.isnan(value) else -np.inf
        np.savez(tmp_path / "b.npz", logits=bad, labels=y)
        rc, _, err = run([str(tmp_path / "b.npz")], capsys)
        assert rc == 2 and "PREDICTIONS has 1 row(s) with NaN or infinite values (first: row 3)" in err
    bad = z.copy()
    bad[[9, 12], y[[9, 12]]] = -np.inf
    np.savez(tmp_path / "b.npz", logits=bad, labels=y)
    rc, _, err = run([str(tmp_path / "b.npz")], capsys)
    assert rc == 2 and err.strip() == (
        f"crossent calibrate: error: PREDICTIONS row 9 masks its label (class {y[9]} has logit -inf; 2 row(s)"
        " so): no method gives it a probability above 0; drop those rows")


def test_the_listing_of_arrays_counts_the_kind_it_lists(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The error listing a file's arrays shows the 2-D ones where there are any and counts the
    2-D ones it leaves out; a file of no 2-D array lists and counts all. A 3-D array (scores
    per position) whose labels do not have the positions' shape is refused naming that shape."""
    arrays = {f"run{i}/logits": np.zeros((4, 3)) for i in range(5)}
    arrays |= {f"run{i}/{name}": np.zeros(4) for i in range(5) for name in ("ids", "weights")}
    np.savez(tmp_path / "a.npz", **arrays)  # type: ignore[arg-type]
    rc, _, err = run([str(tmp_path / "a.npz")], capsys)
    one_line_error(rc, err, "holds 15 arrays, 5 of them 2-D: run0/logits (4, 3), run1/logits (4, 3),"
                   " run2/logits (4, 3), ... (2 more 2-D); pick the predictions with --key")
    np.savez(tmp_path / "b.npz", **{k: np.zeros(4) for k in "abcde"})  # type: ignore[arg-type]
    rc, _, err = run([str(tmp_path / "b.npz")], capsys)
    one_line_error(rc, err, "holds 5 arrays, 0 of them 2-D: a (4,), b (4,), c (4,), ... (2 more);")
    np.save(tmp_path / "c.npy", np.zeros((4, 2, 2)))
    np.save(tmp_path / "y.npy", np.arange(4) % 2)
    rc, _, err = run([str(tmp_path / "c.npy"), "--labels", str(tmp_path / "y.npy")], capsys)
    one_line_error(rc, err, "PREDICTIONS of shape (4, 2, 2) hold a score vector per position, so",
                   "y.npy must have the positions' shape: (4, 2); got shape (4,)")


def test_the_report_names_the_arrays_analysed(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """report.md names the predictions array and the labels array (found beside it, or by
    --labels-key) of an .npz; metrics.json records the labels' file and array."""
    runner_npz(tmp_path / "predictions.npz")
    npz = str(tmp_path / "predictions.npz")
    rc, _, err = run([npz, "--key", "mnist1d/ce/seed1/logits", "--out", str(tmp_path / "o")], capsys)
    assert rc == 0, err
    report = (tmp_path / "o" / "report.md").read_text()
    line = f"- predictions: `{npz}`, array `mnist1d/ce/seed1/logits` (logits, 400 samples, 4 classes)"
    assert line in report
    assert f"- labels: `{npz}`, array `mnist1d/labels`\n" in report
    metrics = metrics_of(tmp_path / "o")
    assert (metrics["key"], metrics["labels"], metrics["labels_key"]) == (
        "mnist1d/ce/seed1/logits", npz, "mnist1d/labels")
    np.savez(tmp_path / "y.npz", targets=np.load(npz)["mnist1d/labels"])
    rc, _, err = run([npz, "--key", "mnist1d/ce/seed1/logits", "--labels", str(tmp_path / "y.npz"),
                      "--out", str(tmp_path / "o2")], capsys)
    assert rc == 0, err
    report = (tmp_path / "o2" / "report.md").read_text()
    assert f"- labels: `{tmp_path / 'y.npz'}`, array `targets`\n" in report
    assert metrics_of(tmp_path / "o2")["labels_key"] == "targets"
    z, y = make(n=300, c=3)
    np.save(tmp_path / "z.npy", z)
    np.save(tmp_path / "y.npy", y)
    rc, _, err = run([str(tmp_path / "z.npy"), "--labels", str(tmp_path / "y.npy"), "--out",
                      str(tmp_path / "o3")], capsys)
    assert rc == 0, err
    report = (tmp_path / "o3" / "report.md").read_text()
    assert f"- predictions: `{tmp_path / 'z.npy'}` (logits" in report
    assert f"- labels: `{tmp_path / 'y.npy'}`\n" in report
    metrics = metrics_of(tmp_path / "o3")
    assert (metrics["key"], metrics["labels"], metrics["labels_key"]) == (None, str(tmp_path / "y.npy"), None)


@pytest.mark.parametrize(("labels_key", "warning"), [
    ("t/ce/seed1/labels", "(seed 1, not 0)"),
    ("u/ce/seed0/labels", "(task 'u', not 't')"),
    ("u/labels", "(task 'u', not 't')"),
    ("t/ce/seed0/labels", None),
    ("t/focal/seed0/labels", None),  # the same seed draws the same split for every loss
    ("t/labels", None),
])
def test_labels_of_another_run_are_warned_of(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], labels_key: str, warning: str | None
) -> None:
    """--labels-key naming another task's or seed's labels of crossent run's layout (which
    pass every check and give a near-chance accuracy) gives a one-line warning, which the
    report repeats."""
    z, y = make(n=300, c=3)
    other = np.roll(y, 1)
    arrays = {"t/ce/seed0/logits": z, "t/ce/seed0/labels": y, "t/focal/seed0/labels": y, "t/labels": y,
              "t/ce/seed1/labels": other, "u/ce/seed0/labels": other, "u/labels": other}
    np.savez(tmp_path / "p.npz", **arrays)  # type: ignore[arg-type]
    rc, _, err = run([str(tmp_path / "p.npz"), "--key", "t/ce/seed0/logits", "--labels-key", labels_key,
                      "--out", str(tmp_path / "o")], capsys)
    assert rc == 0, err
    report = (tmp_path / "o" / "report.md").read_text()
    if warning is None:
        assert "another run" not in err and "another run" not in report
        return
    text = f"the labels {labels_key!r} come from another run than --key 't/ce/seed0/logits' {warning}"
    assert [ln for ln in err.splitlines() if "another run" in ln] == [f"crossent calibrate: warning: {text}"]
    assert f"- warning: {text}\n" in report


@pytest.mark.filterwarnings("ignore::crossent.calibration.CalibrationWarning")
@pytest.mark.usefixtures("no_figures")
def test_a_class_separated_in_the_fit_part_is_named_as_such(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A class the fit part separates keeps the identity in histogram binning as an absent one
    does, and the note says why: separated, not "no sample" (it said every such class had no
    sample in the fit part)."""
    rng = np.random.default_rng(0)
    n = 2000
    y = rng.integers(0, 4, n)
    z = rng.normal(size=(n, 4))
    z[np.arange(n), y] += 0.8
    z[y == 0, 0] += 8.0  # class 0 apart from the others
    z[y != 0, 0] -= 4.0
    np.savez(tmp_path / "p.npz", logits=z, labels=y)
    rc, _, err = run([str(tmp_path / "p.npz"), "--method", "histogram", "--out", str(tmp_path / "o")],
                     capsys)
    assert rc == 0, err
    metrics = metrics_of(tmp_path / "o")
    assert metrics["identity_classes"] == [0]
    assert metrics["note"] == ("class 0 (1 of 4 classes) is separated from the others in it (a map of 0s and"
                               " 1s): left uncalibrated (identity)")


def test_the_library_fixes_the_command_has_no_option_for_are_worded_as_the_python_classes() -> None:
    """The command fits the classes with their defaults: a warning's fix that is an option of
    the Python class says so, so that a user does not look for --max-iter or --t-max."""
    from crossent.calibration.cli import command_advice

    assert command_advice("x; pass fallback_to_identity=False to keep the fit") == (
        "x; the Python class keeps the fit with fallback_to_identity=False")
    assert command_advice("far from its optimum; raise max_iter (e.g. max_iter=1000)") == (
        "far from its optimum; the Python class's max_iter=1000 allows more steps")
    assert command_advice("a larger bound fits class 3 (VectorScaler(t_max=1000), or more); no") == (
        "a larger bound fits class 3 (the Python class's t_max=1000, or more); no")
    assert command_advice("a smaller bound fits it (TemperatureScaler(t_min=0.001), or less: small)") == (
        "a smaller bound fits it (the Python class's t_min=0.001, or less: small)")
    assert command_advice("prefer it, or check it on held-out data (crossent calibrate does)") == (
        "prefer it, or check it on held-out data")
