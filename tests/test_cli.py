"""The `crossent` command: demo and bench subcommands, one-line errors."""

from __future__ import annotations

import csv

import pytest

from crossent.cli import main


def test_demo_prints_the_losses(capsys):
    assert main(["demo", "--classes", "4"]) == 0
    out = capsys.readouterr().out
    assert "focal gamma 2" in out and "label smoothing 0.1" in out


def test_bench_writes_csv_markdown_and_plot(tmp_path):
    rc = main(["bench", "--shapes", "64x10,32x50", "--dtypes", "fp32,bf16", "--variants", "ce,focal",
               "--repeats", "1", "--out", str(tmp_path)])
    assert rc == 0
    rows = list(csv.DictReader(open(tmp_path / "bench.csv")))
    providers = {r["provider"] for r in rows}
    assert {"crossent", "torch"} <= providers
    assert all(float(r["fwd_bwd_ms"]) > 0 for r in rows)
    crossent_rows = [r for r in rows if r["provider"] == "crossent"]
    assert len(crossent_rows) == 2 * 2 * 2  # shapes x dtypes x variants
    assert "| crossent | focal |" in (tmp_path / "bench.md").read_text()
    assert (tmp_path / "bench.png").stat().st_size > 1000


@pytest.mark.parametrize(
    "argv,message",
    [
        (["bench", "--shapes", "64by10"], "--shapes takes NxC pairs"),
        (["bench", "--dtypes", "fp8"], "unknown dtype"),
        (["demo", "--classes", "1"], "--classes must be >= 2"),
    ],
)
def test_bad_arguments_give_one_line_and_exit_2(argv, message, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and "\n" not in err and "Traceback" not in err
