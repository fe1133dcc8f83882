"""``crossent run``: train one model per loss on bundled (or your) data; report calibration.

Examples::

    crossent run                                   # the default study (< 10 min on 2 cores)
    crossent run --quick                           # a reduced study (< 60 s)
    crossent run --data table.csv --target label   # your data (.csv, .tsv, .npz, .parquet)
    crossent run --losses ce,ls-0.1,focal-3 --seeds 5 --epochs 30 --model linear
    crossent run --config study.toml --out runs/my-study

A TOML config file holds the same options as the command line (dashes or underscores),
either at the top level or under a ``[run]`` table; options given on the command line win::

    [run]
    tasks = ["mnist1d", "mnist1d-lt"]
    losses = ["ce", "focal-3", "flsd-53"]
    seeds = [0, 1, 2]      # or a count: seeds = 3
    epochs = 40
    model = "mlp"
"""

from __future__ import annotations

import argparse
import shlex
import sys
import time
from datetime import datetime
from pathlib import Path
from typing import Any

__all__ = ["add_arguments", "build_config", "main"]

_MODELS = ("linear", "mlp")
#: Config-file keys and their types (the CLI's options, in Python spelling).
_CONFIG_KEYS: dict[str, type | tuple[type, ...]] = {
    "quick": bool,
    "data": str,
    "target": str,
    "tasks": (list, str),
    "losses": (list, str),
    "seeds": (list, int, str),
    "epochs": int,
    "model": str,
    "hidden": int,
    "batch_size": int,
    "lr": (float, int),
    "weight_decay": (float, int),
    "device": str,
    "threads": int,
    "data_seed": int,
    "n_bins": int,
    "out": str,
    "figures": bool,
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of ``crossent run`` (every default is ``None``: the config file or the
    study's own default applies)."""
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.epilog = (
        "losses: ce, ls-E, focal-G, flsd-53, cp-B, weighted-ce, cb-focal[-G] "
        "(e.g. ls-0.05, focal-3, cp-0.1)\n"
        "tasks: mnist1d, digits, mnist1d-lt (the bundled data; ignored with --data)"
    )
    g = parser.add_argument_group("study")
    g.add_argument("--quick", action="store_true", default=None,
                   help="reduced study: ce, ls-0.1, focal-3 (imbalanced task: ce, focal-3, "
                        "weighted-ce, cb-focal), 2 seeds, fewer epochs (< 60 s on 2 cores)")
    g.add_argument("--tasks", metavar="LIST",
                   help="comma-separated bundled tasks (default: mnist1d,digits,mnist1d-lt)")
    g.add_argument("--data", metavar="FILE",
                   help="your data instead: .csv/.tsv (with --target), .npz (X, y), .parquet")
    g.add_argument("--target", metavar="COLUMN", help="label column of --data")
    g.add_argument("--losses", metavar="LIST",
                   help="comma-separated losses (default: the full grid of the task)")
    g.add_argument("--seeds", metavar="N|LIST",
                   help="number of seeds (3 -> 0,1,2) or a comma-separated list (default 3)")
    g.add_argument("--epochs", type=int, metavar="N", help="epochs for every task")
    g.add_argument("--model", choices=_MODELS, help="linear or 2 x 256 MLP (default mlp)")
    g.add_argument("--hidden", type=int, metavar="N", help="MLP width (default 256)")
    g.add_argument("--batch-size", type=int, metavar="N", help="minibatch size (default 128)")
    g.add_argument("--lr", type=float, metavar="LR", help="Adam learning rate (default 1e-3)")
    g.add_argument("--weight-decay", type=float, metavar="WD", help="Adam weight decay (0)")
    g.add_argument("--data-seed", type=int, metavar="N",
                   help="seed of the train/val/test split (default 0)")
    g.add_argument("--n-bins", type=int, metavar="N", help="calibration bins (default 15)")
    g.add_argument("--config", metavar="FILE.toml", help="TOML file with any of these options")
    r = parser.add_argument_group("execution and output")
    r.add_argument("--device", metavar="DEV", help="cpu (default), cuda, cuda:1, mps or auto")
    r.add_argument("--threads", type=int, metavar="N",
                   help="CPU threads for torch (default 1; fixed for reproducibility)")
    r.add_argument("--out", metavar="DIR", help="run folder (default runs/<timestamp>)")
    r.add_argument("--no-figures", dest="figures", action="store_false", default=None,
                   help="skip the PNG figures")


def _load_toml(path: str) -> dict[str, Any]:
    if sys.version_info >= (3, 11):
        import tomllib
    else:  # pragma: no cover - Python 3.10
        import tomli as tomllib
    p = Path(path)
    if not p.is_file():
        raise ValueError(f"config file {path}: no such file")
    try:
        with p.open("rb") as fh:
            raw = tomllib.load(fh)
    except tomllib.TOMLDecodeError as exc:
        raise ValueError(f"config file {path}: invalid TOML: {exc}") from exc
    if "run" in raw and isinstance(raw["run"], dict):
        raw = raw["run"]
    out: dict[str, Any] = {}
    for key, value in raw.items():
        k = key.replace("-", "_")
        if k not in _CONFIG_KEYS:
            raise ValueError(
                f"config file {path}: unknown key {key!r} (known: {', '.join(_CONFIG_KEYS)})"
            )
        types = _CONFIG_KEYS[k]
        types = types if isinstance(types, tuple) else (types,)
        if isinstance(value, bool) and bool not in types:
            raise ValueError(f"config file {path}: {key} must not be a boolean")
        if not isinstance(value, types):
            names = " or ".join(t.__name__ for t in types)
            raise ValueError(f"config file {path}: {key} must be {names}, got {value!r}")
        out[k] = value
    return out


def _parse_seeds(value: Any) -> list[int]:
    if isinstance(value, bool):
        raise ValueError(f"bad seeds {value!r}")
    if isinstance(value, int):
        if value < 1:
            raise ValueError(f"the number of seeds must be >= 1, got {value}")
        return list(range(value))
    if isinstance(value, list):
        items: list[Any] = value
    else:
        text = str(value).strip()
        if "," not in text:
            try:
                count = int(text)
            except ValueError:
                raise ValueError(
                    f"bad --seeds {value!r}: give a count or a list like 0,1,2"
                ) from None
            return _parse_seeds(count)
        items = [s for s in text.split(",") if s.strip()]
    try:
        seeds = [int(s) for s in items]
    except (TypeError, ValueError):
        raise ValueError(f"bad seeds {value!r}: give a count or a list like 0,1,2") from None
    if not seeds:
        raise ValueError("no seeds given")
    if any(s < 0 for s in seeds):
        raise ValueError(f"seeds must be >= 0, got {seeds}")
    return list(dict.fromkeys(seeds))


def _split_list(value: Any) -> list[str]:
    if isinstance(value, list):
        return [str(v).strip() for v in value if str(v).strip()]
    return [s.strip() for s in str(value).split(",") if s.strip()]


def build_config(args: argparse.Namespace) -> tuple[Any, dict[str, Any]]:
    """A :class:`StudyConfig` from the options (config file < command line), plus the
    output options ``{"out": ..., "figures": ...}``."""
    from crossent.experiments.runner import QUICK_SEEDS, StudyConfig

    opts: dict[str, Any] = {}
    if getattr(args, "config", None):
        opts.update(_load_toml(args.config))
    for k in _CONFIG_KEYS:
        v = getattr(args, k, None)
        if v is not None:
            opts[k] = v
    quick = bool(opts.get("quick", False))
    cfg = StudyConfig(quick=quick)
    if quick:
        cfg.seeds = list(QUICK_SEEDS)
    if "tasks" in opts:
        cfg.tasks = _split_list(opts["tasks"])
    if "losses" in opts:
        cfg.losses = _split_list(opts["losses"])
    if "seeds" in opts:
        cfg.seeds = _parse_seeds(opts["seeds"])
    for k in ("epochs", "model", "hidden", "batch_size", "device", "threads", "data_seed",
              "n_bins", "data", "target"):
        if k in opts:
            setattr(cfg, k, opts[k])
    for k in ("lr", "weight_decay"):
        if k in opts:
            setattr(cfg, k, float(opts[k]))
    if cfg.target is not None and cfg.data is None:
        raise ValueError("--target needs --data FILE")
    if cfg.hidden < 1:
        raise ValueError(f"hidden width must be >= 1, got {cfg.hidden}")
    cfg.validate()
    from crossent.experiments.runner import resolve_device

    resolve_device(cfg.device)  # fail early on an unavailable device
    return cfg, {"out": opts.get("out"), "figures": opts.get("figures", True)}


def _default_out() -> Path:
    base = Path("runs") / datetime.now().strftime("%Y%m%d-%H%M%S")
    out, i = base, 2
    while out.exists():
        out = base.with_name(f"{base.name}-{i}")
        i += 1
    return out


def main(args: argparse.Namespace) -> int:
    """Run the study, print the tables, write the run folder. Returns the exit status."""
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
    )

    from crossent.experiments.report import rich_tables, write_run_folder
    from crossent.experiments.runner import aggregate, load_tasks, run_study

    cfg, output = build_config(args)
    out = Path(output["out"]) if output["out"] else _default_out()
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out}: exists and is not a directory")
    console = Console()
    if not console.is_terminal:  # piped or captured: wide enough for the whole table
        console = Console(width=200)
    err = Console(stderr=True)
    t0 = time.perf_counter()
    tasks = load_tasks(cfg)  # bad data fails here, before any training
    for t in tasks.values():
        err.print(f"[dim]{t.summary()}[/]")
    with Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=err,
        transient=True,
    ) as progress:
        result = run_study(cfg, tasks=tasks, progress=progress)
    rows = aggregate(result)
    for table in rich_tables(result, rows):
        console.print(table)
    command = None
    if Path(sys.argv[0]).name == "crossent" and sys.argv[1:2] == ["run"]:
        command = "crossent " + shlex.join(sys.argv[1:])
    written = write_run_folder(result, out, figures=bool(output["figures"]), rows=rows,
                               command=command)
    n_fig = sum(1 for k in written if k.startswith("figures/"))
    console.print(
        f"{len(result.runs)} runs in {time.perf_counter() - t0:.0f} s. Wrote {out}/ "
        f"(results.json, results.csv, summary.csv, report.md, {n_fig} figures)"
    )
    return 0
