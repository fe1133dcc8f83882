"""The benchmark harness of ``crossent bench`` and benchmarks/: warm-up, interleaved shuffled
rounds, medians with their spread, warnings when the load or the spread makes a ratio unreliable,
columns never cut. Nothing here asserts a time."""

from __future__ import annotations

import importlib.util
import itertools
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from crossent import bench
from crossent.bench import MachineLoad, interleaved_times, reliability_warnings, summarize, text_table
from crossent.cli import main

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("n,seed", list(itertools.product([1, 2, 3, 4, 7, 10, 31], [0, 1, 2])))
def test_summarize_matches_numpy_percentiles(n, seed):
    xs = np.random.default_rng(seed).lognormal(size=n)
    t = summarize(list(xs))
    assert t.median_ms == pytest.approx(np.median(xs))
    q1, q3 = (np.median(xs),) * 2 if n < 2 else np.percentile(xs, [25, 75])  # numpy's linear = inclusive
    assert (t.q1_ms, t.q3_ms) == (pytest.approx(q1), pytest.approx(q3))
    assert (t.min_ms, t.max_ms, t.rounds) == (xs.min(), xs.max(), n)
    assert t.spread == pytest.approx((q3 - q1) / np.median(xs))


def test_summarize_rejects_nothing_to_summarize():
    with pytest.raises(ValueError, match="at least one"):
        summarize([])


def _recording_steps(names, calls):
    return {name: (lambda name=name: calls.append(name)) for name in names}


@pytest.mark.parametrize("n_steps,repeats,warmup", [(1, 1, 0), (2, 5, 1), (5, 8, 2), (9, 3, 0)])
def test_interleaved_rounds_warm_up_then_every_step_once_per_round_shuffled(n_steps, repeats, warmup):
    names = [f"s{i}" for i in range(n_steps)]
    calls: list[str] = []
    times = interleaved_times(_recording_steps(names, calls), repeats, warmup=warmup)
    assert calls[: warmup * n_steps] == [n for n in names for _ in range(warmup)]
    rounds = [calls[warmup * n_steps + r * n_steps:][:n_steps] for r in range(repeats)]
    assert all(sorted(r) == names for r in rounds)
    assert len(calls) == (warmup + repeats) * n_steps
    assert {k: len(v) for k, v in times.items()} == dict.fromkeys(names, repeats)
    assert all(t >= 0 for v in times.values() for t in v)
    if n_steps >= 5 and repeats >= 3:
        assert len({tuple(r) for r in rounds}) > 1, "the order must change between rounds"


def test_cpu_clock_counts_work_not_waiting():
    """clock="cpu" times the process's CPU time: a step that sleeps 60 ms costs next to nothing,
    one that computes for 60 ms about that much; the wall clock sees both."""
    def sleep() -> None:
        time.sleep(0.06)

    def spin() -> None:
        end = time.process_time() + 0.06
        while time.process_time() < end:
            pass

    steps = {"sleep": sleep, "spin": spin}
    cpu = interleaved_times(steps, 3, warmup=0, clock="cpu")
    wall = interleaved_times(steps, 3, warmup=0)
    assert max(cpu["sleep"]) < 20 and min(cpu["spin"]) >= 55
    assert min(wall["sleep"]) >= 55 and min(wall["spin"]) >= 55
    with pytest.raises(ValueError, match="clock must be 'wall' or 'cpu'"):
        interleaved_times(steps, 1, clock="gpu")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="CUDA events"):
        interleaved_times(steps, 1, device="cuda", clock="cpu")


def test_interleaved_times_rejects_zero_rounds():
    with pytest.raises(ValueError, match="repeats must be >= 1"):
        interleaved_times({"a": lambda: None}, 0)


def test_benchmark_scripts_share_the_harness(monkeypatch):
    """benchmarks/_shared.interleaved_times runs crossent.bench's harness: the same calls in the
    same order for the same steps."""
    spec = importlib.util.spec_from_file_location("_shared", ROOT / "benchmarks" / "_shared.py")
    assert spec is not None and spec.loader is not None
    shared = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(shared)
    names = [f"s{i}" for i in range(6)]
    via_scripts: list[str] = []
    via_harness: list[str] = []
    shared.interleaved_times(_recording_steps(names, via_scripts), 4)
    interleaved_times(_recording_steps(names, via_harness), 4, warmup=1)
    assert via_scripts == via_harness


def _load_script(name: str):
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / f"{name}.py")
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module  # dataclasses look their module up there
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
    return module


@pytest.mark.parametrize("warmup", [0, 2])
def test_before_runs_untimed_before_every_call(warmup):
    calls: list[str] = []
    steps = {name: (lambda name=name: calls.append(name)) for name in ("a", "b", "c")}
    interleaved_times(steps, 4, warmup=warmup, before=lambda name: calls.append(f"before {name}"))
    assert len(calls) == 2 * 3 * (warmup + 4)
    assert all(calls[i] == f"before {calls[i + 1]}" for i in range(0, len(calls), 2))


def test_bench_triton_measure_restores_the_logits_of_an_inplace_backward():
    """bench_triton.measure on the CPU (the GPU script's bookkeeping, not its times): every case
    sees the original logits, though one provider's backward overwrites them."""
    torch = pytest.importorskip("torch")
    bt = _load_script("bench_triton")
    x0 = torch.randn(8, 5, dtype=torch.float64)
    y = torch.randint(0, 5, (8,))
    seen: list[bool] = []

    def clobbering(x, t):
        seen.append(bool(torch.equal(x.detach(), x0)))
        loss = torch.nn.functional.cross_entropy(x, t)
        if x.requires_grad:
            def clobber(g):
                x.data.zero_()  # as an in-place backward writes the gradient into the logits
                return g

            x.register_hook(clobber)
        return loss

    rows = bt.measure({("torch", "ce"): torch.nn.functional.cross_entropy, ("inplace", "ce"): clobbering},
                      x0, y, repeats=3)
    names = [(r.provider, r.variant) for r in rows]
    assert names == [("torch", "ce"), ("inplace", "ce"), ("copy (floor)", "-")]
    assert seen and all(seen)
    assert all(r.fwd_bwd_ms is not None and r.fwd_bwd_ms > 0 and r.peak_mib is None for r in rows)
    assert rows[-1].x_floor == 1.0


QUIET = MachineLoad(cpus=4, loadavg=0.2, others_busy=0.1, threads=4)


@pytest.mark.parametrize(
    "load,spreads,expect",
    [
        (QUIET, {"a": 0.02, "b": 0.10}, []),
        (None, {"a": 0.05}, []),
        (QUIET, {"a": 0.02, "b": 0.25}, ["spread more than 10%", "b (IQR 25%"]),
        (QUIET, {"a": float("nan")}, ["spread more than 10%"]),
        (MachineLoad(cpus=4, loadavg=0.2, others_busy=1.5, threads=4), {"a": 0.0},
         ["kept 1.5 of 4 CPUs busy"]),
        (MachineLoad(cpus=2, loadavg=1.5, others_busy=0.0, threads=2), {"a": 0.0},
         ["load average 1.50 on 2"]),
        (MachineLoad(cpus=2, loadavg=None, others_busy=None, threads=2), {"a": 0.0}, []),
        (MachineLoad(cpus=2, loadavg=4.0, others_busy=2.0, threads=2), {"a": 0.5},
         ["kept 2.0 of 2", "load average 4.00", "spread more than 10%"]),
        (MachineLoad(cpus=2, loadavg=0.1, others_busy=0.0, threads=2, stolen=0.8), {"a": 0.0},
         ["the hypervisor took 0.8 of 2 CPUs during the run (steal time)"]),
        (MachineLoad(cpus=2, loadavg=0.1, others_busy=0.0, threads=2, stolen=0.1), {"a": 0.0}, []),
    ],
)
def test_reliability_warnings(load, spreads, expect):
    got = reliability_warnings(spreads, load)
    for fragment in expect:
        assert any(fragment in line for line in got), (fragment, got)
    if expect:
        assert "--threads 1" in got[-1]  # what to do about it
    else:
        assert got == []


def test_reliability_advice_names_a_way_the_caller_has():
    """The advice names how the caller runs on one thread: crossent bench's option by default,
    what the caller passes otherwise; and every benchmark script that names ``--threads 1``
    has that option (the others are told ``OMP_NUM_THREADS=1``, which torch reads)."""
    busy = MachineLoad(cpus=2, loadavg=4.0, others_busy=2.0, threads=2)
    assert "or --threads 1 on a shared one" in reliability_warnings({"a": 0.5}, busy)[-1]
    got = reliability_warnings({"a": 0.5}, busy, one_thread="OMP_NUM_THREADS=1")
    assert "or OMP_NUM_THREADS=1 on a shared one" in got[-1] and "--threads" not in got[-1]
    scripts = sorted((Path(__file__).parents[1] / "benchmarks").glob("*.py"))
    naming = [p for p in scripts if 'one_thread="--threads 1"' in p.read_text()]
    assert naming, "no script names --threads 1"
    for p in naming:
        assert re.search(r'add_argument\(\s*"--threads"', p.read_text()), p.name


def test_parse_proc_stat_keeps_steal_apart():
    """Busy time is user + nice + system + irq + softirq; steal (a hypervisor running other
    guests) is its own figure, not "other processes"; a kernel without the steal column gives 0."""
    hz = os.sysconf("SC_CLK_TCK")
    got = bench.parse_proc_stat("cpu  100 2 30 5000 7 1 4 250 0 0")
    assert got == pytest.approx(((100 + 2 + 30 + 1 + 4) / hz, 250 / hz))
    assert bench.parse_proc_stat("cpu  100 2 30 5000 7 1 4") == pytest.approx((137 / hz, 0.0))
    assert bench.parse_proc_stat("cpu0 1 2 3 4 5 6 7 8") is None
    assert bench.parse_proc_stat("") is None


def test_text_table_never_cuts_a_cell():
    head = ["provider", "variant", "fwd+bwd ms"]
    rows = [["crossent-ops-with-a-very-long-name" * 3, "ce", "12.5"], ["torch", "focal", "0.25"]]
    lines = text_table(head, rows, left=2).splitlines()
    assert lines[2].startswith(rows[0][0]) and lines[2].endswith("12.5")
    assert len({len(line.rstrip()) for line in lines[1:]}) <= 2  # aligned columns
    for row, line in zip(rows, lines[2:], strict=True):
        assert line.split() == row


def _spinners(n: int) -> list[subprocess.Popen[bytes]]:
    return [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(n)]


def test_bench_warns_on_a_loaded_machine(tmp_path, capsys):
    """Background processes spinning on every CPU while ``crossent bench`` runs: its output says
    that the machine was busy, with the figure measured, and the table is complete."""
    spinners = _spinners(os.cpu_count() or 1)
    try:
        time.sleep(0.5)  # let them start spinning
        rc = main(["bench", "--shapes", "64x10", "--dtypes", "fp32", "--variants", "ce",
                   "--providers", "crossent,crossent-ops,torch", "--repeats", "5", "--no-memory",
                   "--out", str(tmp_path)])
    finally:
        for p in spinners:
            p.kill()
        for p in spinners:
            p.wait()
    assert rc == 0
    out = capsys.readouterr().out
    assert "warning: other processes kept" in out, out
    assert "the ratios unreliable" in out
    table = out[out.index("provider  "):]
    assert "crossent-ops" in table and "…" not in table  # the provider column is never cut
    assert "IQR %" in table
    assert "warning: other processes kept" in (tmp_path / "bench.md").read_text()


def test_load_monitor_sees_other_processes():
    spinners = _spinners(1)
    try:
        time.sleep(0.3)
        with bench.LoadMonitor() as monitor:
            time.sleep(1.0)  # idle here: the busy CPU time is the spinner's
    finally:
        spinners[0].kill()
        spinners[0].wait()
    load = monitor.result
    assert load is not None and load.cpus == os.cpu_count()
    if load.others_busy is None:
        pytest.skip("no /proc/stat on this system")
    assert load.others_busy >= 0.5  # one process spinning on a whole CPU (plus whatever else runs)


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="needs Linux's /proc/self/clear_refs")
def test_peak_extra_memory_inside_and_outside_a_frozen_heap():
    """The peak of a 64 MiB buffer written through, measured with and without the objects alive
    at the start frozen out of the collections; the freeze ends with the block, and garbage made
    inside it is still collected."""
    import gc
    import weakref

    import torch

    def step() -> None:
        torch.ones(16 << 20, dtype=torch.float32).add_(1.0)  # 64 MiB, every page touched

    outside = bench.peak_extra_memory(step, "cpu")
    before = gc.get_freeze_count()
    with bench.frozen_heap():
        assert gc.get_freeze_count() > before

        class Node:
            pass

        a, b = Node(), Node()
        a.other, b.other = b, a  # a cycle, only a collection frees it
        alive = weakref.ref(a)
        del a, b
        inside = bench.peak_extra_memory(step, "cpu")  # its gc.collect() frees the cycle
        assert alive() is None
    assert gc.get_freeze_count() == before
    for peak in (outside, inside):
        assert peak is not None and 60 * 2**20 <= peak <= 80 * 2**20, peak


def test_source_trees_are_compared_case_by_case_in_interleaved_rounds(capsys):
    """benchmarks/_shared.tree_table runs each case on this checkout and the other, round by
    round in that order, and prints their medians and the ratio of their times."""
    shared = _load_script("_shared")
    calls: list[tuple[str, str]] = []
    times = {"this": [3.0, 1.0, 2.0], "other": [8.0, 4.0, 6.0]}

    def run(src: str, case: str) -> dict[str, float]:
        tree = "other" if src.endswith("elsewhere") else "this"
        calls.append((tree, case))
        nth = sum(1 for t, c in calls if (t, c) == (tree, case)) - 1
        return {"seconds": times[tree][nth], "rss_mib": 7.0}

    shared.tree_table(["a", "b"], run, "/tmp/elsewhere", 3, "case")
    assert calls == [(t, c) for c in "ab" for _ in range(3) for t in ("this", "other")]
    lines = capsys.readouterr().out.splitlines()
    want = "| case | this tree: s / peak RSS rise MiB | other tree: s / MiB | this / other (time) |"
    assert lines[0] == want
    assert lines[2] == "| a | 2.000 / 7 | 6.000 / 7 | 0.33x |"


def test_a_case_runs_in_a_fresh_process_of_the_given_tree():
    """benchmarks/_shared.in_tree: a script's function in a new process with the given src
    first on its path, its numbers back as a dict."""
    shared = _load_script("_shared")
    got = shared.in_tree(shared.SRC, "bench_checks", "one('nll, from_logits=True', 40, 5, 2)", 1)
    assert set(got) == {"seconds", "rss_mib"} and got["seconds"] >= 0.0
