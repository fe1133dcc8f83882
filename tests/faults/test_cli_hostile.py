"""The command line under hostile arguments and files (issue 16: items 4, 9 and 12).

Every subcommand and flag, with negative, zero, huge and non-numeric values, missing files,
folders instead of files, empty files, binary garbage, NaN / inf predictions, mismatched
lengths, an .npz without the expected key, labels of 1e30: each must give exit status 2, one
non-empty line on stderr, no traceback, and nothing written outside ``--out`` (the commands
run with the current directory at ``tmp_path``).

``crossent.cli.main`` runs in-process; the training, the bundled data and the benchmark's
measurements are replaced by functions that fail the test, so that every hostile command is
refused during validation, before anything slow. Only ``--threads 100000``, which crashed the
interpreter (SIGSEGV in ``torch.set_num_threads``), runs in a subprocess.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from _pytest.mark.structures import ParameterSet

from crossent.cli import CLIError, main

N, C = 40, 3
HUGE = "99999999999999999999"


def _listing(root: Path, out: Path) -> dict[str, int]:
    """Every path under ``root`` but those under ``out``, with the size of files."""
    found = {}
    for p in root.rglob("*"):
        if p == out or out in p.parents:
            continue
        found[str(p.relative_to(root))] = p.stat().st_size if p.is_file() else -1
    return found


def _make_inputs(d: Path) -> None:
    d.mkdir()
    rng = np.random.default_rng(0)
    z = rng.normal(size=(N, C))
    y = np.arange(N) % C
    np.save(d / "z.npy", z)
    np.save(d / "y.npy", y)
    np.save(d / "flat.npy", z[:, 0])
    np.save(d / "short.npy", y[:-1])
    for name, value in (("nan", np.nan), ("inf", np.inf), ("ninf", -np.inf)):
        bad = z.copy()
        bad[7, 1] = value
        if name == "ninf":  # a masked logit is probability 0; a row masked throughout is nothing
            bad[7] = value
        np.save(d / f"{name}.npy", bad)
    np.save(d / "y_1e30.npy", np.where(np.arange(N) == 5, 1e30, y).astype(float))
    np.save(d / "y_all_1e30.npy", np.full(N, 1e30))
    np.save(d / "y_half.npy", np.where(np.arange(N) == 3, 0.5, y).astype(float))
    np.save(d / "y_nan.npy", np.where(np.arange(N) == 3, np.nan, y).astype(float))
    np.save(d / "y_neg.npy", y - 1)
    np.save(d / "y_plus1.npy", y + 1)  # 1-based labels
    np.save(d / "y_multilabel.npy", (rng.random((N, C)) < 0.5).astype(np.int64))
    np.save(d / "y_names.npy", np.array(["cat", "dog", "emu"])[y])
    np.save(d / "sigmoid.npy", rng.random((N, C)))  # in [0, 1], rows not summing to 1
    np.save(d / "flat01.npy", rng.random(N))  # binary probabilities of class 1
    np.save(d / "y01.npy", y % 2)
    np.save(d / "y_uint_huge.npy", np.full(N, 2**64 - 1, dtype=np.uint64))
    np.save(d / "y_complex.npy", y.astype(complex))
    np.save(d / "z_complex.npy", z.astype(complex))
    np.save(d / "z_bool.npy", z > 0)
    np.save(d / "one_col.npy", z[:, :1])
    np.save(d / "one_row.npy", z[:1])
    np.savez(d / "nokey.npz", foo=z, bar=z)
    np.savez(d / "preds_only.npz", logits=z)
    np.savez(d / "labels_nokey.npz", a=y, b=y)
    (d / "y_1e30.csv").write_text("\n".join(["1e30"] * N) + "\n")
    (d / "y_text.csv").write_text("\n".join(["cat"] * N) + "\n")
    (d / "ragged.csv").write_text("1,2,3\n4,5\n")
    # an Excel export: byte-order mark, 39 data rows (one short of the predictions)
    (d / "bom_39.csv").write_text("\n".join(str(v) for v in y[:-1]) + "\n", encoding="utf-8-sig")
    np.save(d / "truncated.npy", z)
    (d / "truncated.npy").write_bytes((d / "truncated.npy").read_bytes()[:200])
    garbage = bytes(range(256)) * 8
    for name in ("garbage.npy", "garbage.npz", "garbage.pt", "garbage.csv", "garbage.toml"):
        (d / name).write_bytes(garbage)
    for name in ("empty.npy", "empty.npz", "empty.pt", "empty.csv"):
        (d / name).write_bytes(b"")
    (d / "dir.npy").mkdir()
    (d / "folder").mkdir()
    (d / "z.xlsx").write_bytes(b"PK")
    (d / "a_file").write_text("in the way\n")
    # --data tables for `run`
    (d / "t.csv").write_text("a,y\n" + "".join(f"{i},{i % 2}\n" for i in range(30)))
    (d / "t_1e30.csv").write_text("a,y\n" + "".join(f"{i},{1e30 * (1 + i % 2)}\n" for i in range(30)))
    (d / "t_float.csv").write_text("a,y\n" + "".join(f"{i},{i / 7}\n" for i in range(30)))
    # config files for `run`
    toml = {
        "unknown.toml": 'colour = "red"\n',
        "broken.toml": "epochs = = 3\n",
        "threads.toml": "threads = 100000\n",
        "seeds.toml": "seeds = -1\n",
        "seeds_huge.toml": "seeds = 9223372036854775807\n",
        "hidden.toml": "hidden = 100000000\n",
        "epochs_str.toml": 'epochs = "ten"\n',
        "lr.toml": "lr = nan\n",
    }
    for name, text in toml.items():
        (d / name).write_text(text)


# (argv with {in} for the inputs folder and {out} for --out, fragment the error must contain or
# None). `run`, `calibrate` and `bench` get `--out {out}` added unless the case gives its own.
P = ["{in}/z.npy", "--labels", "{in}/y.npy"]  # good calibrate inputs
CASES: list[tuple[list[str], str | None] | ParameterSet] = [
    # ---------------------------------------------------------------- the command itself
    ([], "give a command"),
    (["frobnicate"], "invalid choice"),
    (["--bogus"], "unrecognized arguments"),
    # ---------------------------------------------------------------- run: numbers
    (["run", "--threads", "100000"], "--threads"),  # in-process: refused before torch sees it
    (["run", "--threads", "0"], "--threads"),
    (["run", "--threads", "-1"], "--threads"),
    (["run", "--threads", "two"], "--threads"),
    (["run", "--seeds", HUGE], "--seeds"),
    (["run", "--seeds", "-1"], "--seeds"),
    (["run", "--seed", "-1"], "--seeds"),  # argparse takes the prefix --seed for --seeds
    (["run", "--seeds", "0"], "--seeds"),
    (["run", "--seeds", "0,-3"], "--seeds"),
    (["run", "--seeds", f"0,{HUGE}"], "--seeds"),
    (["run", "--seeds", ""], "--seeds"),
    (["run", "--seeds", ","], "--seeds"),
    (["run", "--seeds", "a,b"], "--seeds"),
    (["run", "--seeds", "1.5"], "--seeds"),
    (["run", "--hidden", "100000000"], "--hidden"),
    (["run", "--hidden", HUGE], "--hidden"),
    (["run", "--hidden", "0"], "--hidden"),
    (["run", "--hidden", "-5"], "--hidden"),
    (["run", "--hidden", "wide"], "--hidden"),
    (["run", "--epochs", "0"], "--epochs"),
    (["run", "--epochs", "-1"], "--epochs"),
    (["run", "--epochs", HUGE], "--epochs"),
    (["run", "--epochs", "1.5"], "--epochs"),
    (["run", "--batch-size", "0"], "--batch-size"),
    (["run", "--batch-size", "-8"], "--batch-size"),
    (["run", "--batch-size", HUGE], "--batch-size"),
    (["run", "--lr", "0"], "--lr"),
    (["run", "--lr", "-1"], "--lr"),
    (["run", "--lr", "nan"], "--lr"),
    (["run", "--lr", "inf"], "--lr"),
    (["run", "--lr", "fast"], "--lr"),
    (["run", "--weight-decay", "-1"], "--weight-decay"),
    (["run", "--weight-decay", "nan"], "--weight-decay"),
    (["run", "--weight-decay", "inf"], "--weight-decay"),
    (["run", "--data-seed", "-1"], "--data-seed"),
    (["run", "--data-seed", HUGE], "--data-seed"),
    (["run", "--n-bins", "0"], "--n-bins"),
    (["run", "--n-bins", "-3"], "--n-bins"),
    (["run", "--n-bins", HUGE], "--n-bins"),
    (["run", "--model", "resnet"], "--model"),
    (["run", "--tasks", "cifar10"], "unknown task"),
    (["run", "--tasks", ""], "no tasks"),
    (["run", "--losses", "mse"], "unknown loss"),
    (["run", "--losses", ","], "--losses"),
    (["run", "--device", "tpu"], "device"),
    (["run", "--device", ""], "device"),
    (["run", "--epochs"], "--epochs"),  # no value
    # ---------------------------------------------------------------- run: files
    (["run", "--data", "{in}/missing.csv", "--target", "y"], "missing.csv"),
    (["run", "--data", "{in}/folder", "--target", "y"], "folder"),
    (["run", "--data", "{in}/empty.csv", "--target", "y"], "empty.csv"),
    (["run", "--data", "{in}/garbage.csv", "--target", "y"], "garbage.csv"),
    (["run", "--data", "{in}/garbage.npz"], "garbage.npz"),
    (["run", "--data", "{in}/nokey.npz"], "nokey.npz"),
    (["run", "--data", "{in}/z.xlsx", "--target", "y"], "z.xlsx"),
    (["run", "--data", "{in}/t.csv", "--target", "nope"], "nope"),
    (["run", "--data", "{in}/t_float.csv", "--target", "y"], "non-integer"),
    (["run", "--data", "{in}/t_1e30.csv", "--target", "y"], "1e+30"),
    (["run", "--target", "y"], "--target"),
    (["run", "--config", "{in}/missing.toml"], "missing.toml"),
    (["run", "--config", "{in}/folder"], "folder"),
    (["run", "--config", "{in}/garbage.toml"], "garbage.toml"),
    (["run", "--config", "{in}/unknown.toml"], "colour"),
    (["run", "--config", "{in}/broken.toml"], "invalid TOML"),
    (["run", "--config", "{in}/threads.toml"], "threads"),
    (["run", "--config", "{in}/seeds.toml"], "seeds"),
    (["run", "--config", "{in}/seeds_huge.toml"], "seeds"),
    (["run", "--config", "{in}/hidden.toml"], "hidden"),
    (["run", "--config", "{in}/epochs_str.toml"], "epochs"),
    (["run", "--config", "{in}/lr.toml"], "lr"),
    (["run", "--out", ""], "--out"),
    (["run", "--out", "{in}/a_file"], "--out"),
    (["run", "--out", "{in}/a_file/sub"], "--out"),
    # ---------------------------------------------------------------- calibrate: predictions
    (["calibrate"], "PREDICTIONS"),
    (["calibrate", "{in}/missing.npy", "--labels", "{in}/y.npy"], "missing.npy"),
    (["calibrate", "{in}/dir.npy", "--labels", "{in}/y.npy"], "dir.npy"),
    (["calibrate", "{in}/empty.npy", "--labels", "{in}/y.npy"], "empty.npy"),
    (["calibrate", "{in}/empty.npz", "--labels", "{in}/y.npy"], "empty.npz"),
    (["calibrate", "{in}/empty.pt", "--labels", "{in}/y.npy"], "empty.pt"),
    (["calibrate", "{in}/empty.csv", "--labels", "{in}/y.npy"], "empty.csv"),
    (["calibrate", "{in}/garbage.npy", "--labels", "{in}/y.npy"], "garbage.npy"),
    (["calibrate", "{in}/garbage.npz", "--labels", "{in}/y.npy"], "garbage.npz"),
    (["calibrate", "{in}/garbage.pt", "--labels", "{in}/y.npy"], "garbage.pt"),
    (["calibrate", "{in}/garbage.csv", "--labels", "{in}/y.npy"], "garbage.csv"),
    (["calibrate", "{in}/truncated.npy", "--labels", "{in}/y.npy"], "truncated.npy"),
    (["calibrate", "{in}/ragged.csv", "--labels", "{in}/y.npy"], "columns"),
    (["calibrate", "{in}/z.xlsx", "--labels", "{in}/y.npy"], "--format"),
    (["calibrate", "{in}/nan.npy", "--labels", "{in}/y.npy"], "NaN"),
    (["calibrate", "{in}/inf.npy", "--labels", "{in}/y.npy"], "infinite"),
    (["calibrate", "{in}/ninf.npy", "--labels", "{in}/y.npy"], "infinite"),
    (["calibrate", "{in}/flat.npy", "--labels", "{in}/y.npy"], "(40,) are binary scores of class 1"),
    (["calibrate", "{in}/one_col.npy", "--labels", "{in}/y.npy"], "(40, 1) are binary scores of class 1"),
    (["calibrate", "{in}/one_row.npy", "--labels", "{in}/y.npy"], "2 rows"),
    (["calibrate", "{in}/z_complex.npy", "--labels", "{in}/y.npy"], "numeric"),
    (["calibrate", "{in}/z_bool.npy", "--labels", "{in}/y.npy"], "numeric"),
    (["calibrate", "{in}/nokey.npz", "--labels", "{in}/y.npy"], "logits"),
    (["calibrate", "{in}/preds_only.npz"], "no labels"),
    (["calibrate", "{in}/z.npy"], "no labels"),
    # ---------------------------------------------------------------- calibrate: labels
    (["calibrate", "{in}/z.npy", "--labels", "{in}/missing.npy"], "missing.npy"),
    (["calibrate", "{in}/z.npy", "--labels", "{in}/dir.npy"], "dir.npy"),
    (["calibrate", "{in}/z.npy", "--labels", "{in}/empty.npy"], "empty.npy"),
    (["calibrate", "{in}/z.npy", "--labels", "{in}/empty.csv"], "empty.csv"),
    (["calibrate", "{in}/z.npy", "--labels", "{in}/garbage.npy"], "garbage.npy"),
    (["calibrate", "{in}/z.npy", "--labels", "{in}/short.npy"], "40 rows but LABELS has 39"),
    (["calibrate", "{in}/z.npy", "--labels", "{in}/bom_39.csv"], "40 rows but LABELS has 39"),
    (["calibrate", "{in}/z.npy", "--labels", "{in}/y_1e30.npy"], "y_1e30.npy holds 1e+30"),
    (["calibrate", "{in}/z.npy", "--labels", "{in}/y_all_1e30.npy"], "y_all_1e30.npy holds 1e+30"),
    (["calibrate", "{in}/z.npy", "--labels", "{in}/y_1e30.csv"], "y_1e30.csv holds 1e+30"),
    (["calibrate", "{in}/z.npy", "--labels", "{in}/y_uint_huge.npy"], "18446744073709551615"),
    (["calibrate", "{in}/z.npy", "--labels", "{in}/y_half.npy"], "y_half.npy"),
    (["calibrate", "{in}/z.npy", "--labels", "{in}/y_nan.npy"], "y_nan.npy"),
    (["calibrate", "{in}/z.npy", "--labels", "{in}/y_neg.npy"], "holds -1"),
    (["calibrate", "{in}/z.npy", "--labels", "{in}/y_complex.npy"], "integer class indices"),
    (["calibrate", "{in}/z.npy", "--labels", "{in}/y_plus1.npy"], "subtract 1"),
    (["calibrate", "{in}/z.npy", "--labels", "{in}/y_multilabel.npy"], "multilabel_ece"),
    (["calibrate", "{in}/z.npy", "--labels", "{in}/y_names.npy"], "column order of PREDICTIONS"),
    (["calibrate", "{in}/sigmoid.npy", "--labels", "{in}/y.npy"], "--kind logits"),
    (["calibrate", "{in}/sigmoid.npy", "--labels", "{in}/y.npy", "--kind", "probs"], "--kind logits"),
    (["calibrate", "{in}/flat01.npy", "--labels", "{in}/y.npy"], "labels 0/1"),
    (["calibrate", "{in}/flat.npy", "--labels", "{in}/y01.npy", "--kind", "probs"], "--kind logits"),
    (["calibrate", "{in}/z.npy", "--labels", "{in}/y_text.csv"], "not numeric"),
    (["calibrate", "{in}/z.npy", "--labels", "{in}/labels_nokey.npz"], "labels"),
    (["calibrate", "{in}/z.npy", "--labels"], "--labels"),
    # ---------------------------------------------------------------- calibrate: options
    (["calibrate", *P, "--kind", "probs"], "--kind logits"),
    (["calibrate", *P, "--kind", "odds"], "--kind"),
    (["calibrate", *P, "--format", "xls"], "--format"),
    (["calibrate", "{in}/y_1e30.csv", "--labels", "{in}/y.npy", "--format", "npy"], "as npy"),
    (["calibrate", *P, "--val-fraction", "-0.1"], "--val-fraction"),
    (["calibrate", *P, "--val-fraction", "1"], "--val-fraction"),
    (["calibrate", *P, "--val-fraction", "nan"], "--val-fraction"),
    (["calibrate", *P, "--val-fraction", "inf"], "--val-fraction"),
    (["calibrate", *P, "--val-fraction", "half"], "--val-fraction"),
    (["calibrate", *P, "--val-fraction", "0.001"], "--val-fraction"),  # empty validation part
    (["calibrate", *P, "--seed", "-1"], "--seed"),
    (["calibrate", *P, "--seed", HUGE], "--seed"),
    (["calibrate", *P, "--seed", "x"], "--seed"),
    (["calibrate", *P, "--n-bins", "0"], "--n-bins"),
    (["calibrate", *P, "--n-bins", "-2"], "--n-bins"),
    (["calibrate", *P, "--n-bins", HUGE], "--n-bins"),
    (["calibrate", *P, "--n-bins", "many"], "--n-bins"),
    (["calibrate", *P, "--method", "spline"], "--method"),
    (["calibrate", *P, "--out", "{in}/a_file"], "--out"),
    (["calibrate", *P, "--out", "{in}/a_file/sub"], "--out"),
    (["calibrate", *P, "--out", ""], "--out"),
    # ---------------------------------------------------------------- bench
    (["bench", "--shapes", "0x0"], "--shapes"),
    (["bench", "--shapes", "99999999x99999999"], "--shapes"),
    (["bench", "--shapes", f"{HUGE}x{HUGE}"], "--shapes"),
    (["bench", "--shapes", "64x0"], "--shapes"),
    (["bench", "--shapes", "-1x10"], "--shapes"),
    (["bench", "--shapes", "64by10"], "--shapes"),
    (["bench", "--shapes", "1e3x10"], "--shapes"),
    (["bench", "--shapes", "64x10,"], "--shapes"),
    (["bench", "--shapes", "x"], "--shapes"),
    (["bench", "--dtypes", "fp8"], "--dtypes"),
    (["bench", "--dtypes", ""], "--dtypes"),
    (["bench", "--variants", "dice"], "--variants"),
    (["bench", "--providers", "jax"], "--providers"),
    (["bench", "--providers", ","], "--providers"),
    (["bench", "--repeats", "0"], "--repeats"),
    (["bench", "--repeats", "-1"], "--repeats"),
    (["bench", "--repeats", HUGE], "--repeats"),
    (["bench", "--repeats", "some"], "--repeats"),
    (["bench", "--device", "tpu"], "--device"),
    (["bench", "--no-memory", "--shapes", "0x5"], "--shapes"),
    (["bench", "--shapes", "64x10", "--out", "{in}/a_file"], "--out"),
    (["bench", "--shapes", "64x10", "--out", "{in}/a_file/sub"], "--out"),
    # ---------------------------------------------------------------- demo
    (["demo", "--classes", "1"], "--classes"),
    (["demo", "--classes", "0"], "--classes"),
    (["demo", "--classes", "-1"], "--classes"),
    (["demo", "--classes", "x"], "--classes"),
    (["demo", "--classes", "99999999999999"], "--classes"),
    (["demo", "--bogus"], "unrecognized"),
]


def _params() -> list[ParameterSet]:
    params = []
    for case in CASES:
        if isinstance(case, ParameterSet):
            params.append(case)
            continue
        argv, fragment = case
        name = " ".join(a.replace("{in}/", "") for a in argv) or "(nothing)"
        params.append(pytest.param(argv, fragment, id=name))
    return params


@pytest.fixture
def no_slow_work(monkeypatch: pytest.MonkeyPatch) -> None:
    """Training, the bundled data and the benchmark's timing fail the test if reached."""
    import crossent.bench
    import crossent.experiments.runner as runner

    def too_late(*args: object, **kwargs: object) -> None:
        raise AssertionError("a hostile command got past validation into slow work")

    monkeypatch.setattr(runner, "train_one", too_late)
    monkeypatch.setattr(runner, "load_task", too_late)
    monkeypatch.setattr(crossent.bench, "run_shape", too_late)


def _call(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, int]:
    """(exit status, stderr, warnings raised) of ``crossent argv`` run in-process."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            rc = main(argv)
        except SystemExit as exc:  # argparse
            rc = exc.code if isinstance(exc.code, int) else 1
    return rc, capsys.readouterr().err, len(caught)


def _assert_one_line_error(rc: int, err: str, n_warnings: int, fragment: str | None) -> None:
    assert rc == 2, err
    assert "Traceback" not in err
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].strip(), err
    assert n_warnings == 0, f"{n_warnings} warning(s) besides the error line"
    assert ": error: " in lines[0]
    if fragment is not None:
        assert fragment in lines[0], lines[0]


@pytest.mark.usefixtures("no_slow_work")
@pytest.mark.parametrize(("template", "fragment"), _params())
def test_hostile_input_gives_one_line_and_exit_2(
    template: list[str],
    fragment: str | None,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    if "--device" in template and any(a.startswith("cuda") for a in template):
        pytest.skip("device-dependent")
    inputs, out = tmp_path / "in", tmp_path / "out"
    _make_inputs(inputs)
    argv = [a.replace("{in}", str(inputs)).replace("{out}", str(out)) for a in template]
    if argv and argv[0] in ("run", "calibrate", "bench") and "--out" not in argv:
        argv += ["--out", str(out)]
    monkeypatch.chdir(tmp_path)
    before = _listing(tmp_path, out)
    rc, err, n_warnings = _call(argv, capsys)
    _assert_one_line_error(rc, err, n_warnings, fragment)
    assert _listing(tmp_path, out) == before, "something was written outside --out"


def test_threads_100000_is_refused_not_a_segfault(tmp_path: Path) -> None:
    """torch crashes (SIGSEGV) on set_num_threads(100000): the value must never reach it."""
    res = subprocess.run(
        [sys.executable, "-m", "crossent.cli", "run", "--threads", "100000", "--out",
         str(tmp_path / "out")],
        cwd=tmp_path, capture_output=True, text=True, timeout=120,
        env={**os.environ, "CROSSENT_DEBUG": ""},
    )
    assert res.returncode == 2, (res.returncode, res.stderr[-2000:])
    lines = res.stderr.splitlines()
    assert len(lines) == 1 and "--threads" in lines[0] and "1024" in lines[0], res.stderr
    assert list(tmp_path.iterdir()) == []


def test_debug_env_keeps_the_traceback(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """CROSSENT_DEBUG=1 lets an error propagate (to debug crossent itself)."""
    monkeypatch.setenv("CROSSENT_DEBUG", "1")
    with pytest.raises(CLIError, match="does not exist"):
        main(["calibrate", str(tmp_path / "missing.npy")])
    monkeypatch.setenv("CROSSENT_DEBUG", "0")
    assert main(["calibrate", str(tmp_path / "missing.npy")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_a_genuine_bug_is_not_hidden(monkeypatch: pytest.MonkeyPatch) -> None:
    """Only input errors become one line: a RuntimeError that is not an allocation failure
    (a bug of crossent's own) keeps its traceback."""
    import crossent.demo

    def broken(args: object) -> int:
        raise RuntimeError("an internal invariant failed")

    monkeypatch.setattr(crossent.demo, "main", broken)
    with pytest.raises(RuntimeError, match="internal invariant"):
        main(["demo"])


def _write_bom_csv(path: Path, rows: list[str], header: str | None) -> None:
    lines = ([header] if header else []) + rows
    path.write_text("\n".join(lines) + "\n", encoding="utf-8-sig")  # Excel's "CSV UTF-8"
    assert path.read_bytes().startswith(b"\xef\xbb\xbf")


@pytest.mark.parametrize("header", [None, "a,b,c"], ids=["no-header", "header"])
def test_bom_csv_keeps_every_row(tmp_path: Path, header: str | None) -> None:
    """Issue 16 item 9: the byte-order mark made the first data row look like a header,
    which was dropped: 39 of 40 samples, silently."""
    from crossent.calibration.cli import _read_csv

    z = np.random.default_rng(1).normal(size=(N, C)).round(4)
    _write_bom_csv(tmp_path / "z.csv", [",".join(map(str, r)) for r in z], header)
    got = _read_csv(tmp_path / "z.csv")
    assert got.shape == (N, C)
    np.testing.assert_allclose(got, z)


def test_calibrate_uses_all_40_rows_of_bom_csvs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.chdir(tmp_path)
    rng = np.random.default_rng(2)
    y = np.arange(N) % C
    z = rng.normal(size=(N, C)) + 2 * np.eye(C)[y]
    _write_bom_csv(tmp_path / "z.csv", [",".join(f"{v:.5f}" for v in r) for r in z], None)
    _write_bom_csv(tmp_path / "y.csv", [str(v) for v in y], "label")
    out = tmp_path / "out"
    rc = main(["calibrate", "z.csv", "--labels", "y.csv", "--out", str(out)])
    assert rc == 0, capsys.readouterr().err
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["n_samples"] == N
    assert metrics["n_val"] + metrics["n_test"] == N


def test_labels_of_1e30_name_the_file_and_value_in_the_library_too() -> None:
    from crossent.calibration import _inputs

    with pytest.raises(ValueError, match=r"found 1e\+30"):
        _inputs.as_labels(np.array([0.0, 1e30]), 2, 2)
    with pytest.raises(ValueError, match="18446744073709551615"):
        _inputs.as_labels(np.array([0, 2**64 - 1], dtype=np.uint64), 2, 2)
    with pytest.raises(ValueError, match=r"entry 1 is 0\.5"):
        _inputs.as_labels(np.array([0.0, 0.5]), 2, 2)
    assert _inputs.as_labels(torch.tensor([1, 0]), 2, 2).tolist() == [1, 0]


def test_argparse_errors_are_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["run", "--epochs", "x"])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert err.startswith("crossent run: error: argument --epochs: invalid int value: 'x'")
    assert "usage:" not in err
