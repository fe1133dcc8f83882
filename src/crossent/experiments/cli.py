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
import math
import shlex
import sys
import time
from datetime import datetime
from pathlib import Path
from typing import Any

__all__ = ["add_arguments", "build_config", "main"]

_MODELS = ("linear", "mlp", "cnn")
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
        "losses: ce, ls-E, focal-G, flsd-53, cp-B, weighted-ce, cb-focal[-G], la-ce[-T], kd-NAME "
        "(e.g. ls-0.05, focal-3, cp-1, kd-ls-0.1)\n"
        "tasks: mnist1d, digits, mnist1d-lt, distill (the bundled data; ignored with --data)\n"
        "models (default per task): cnn on mnist1d and mnist1d-lt, mlp on digits, the "
        "distillation students and --data"
    )
    g = parser.add_argument_group("study")
    g.add_argument("--quick", action="store_true", default=None,
                   help="reduced study: ce, ls-0.1, focal-3, cp-3 (imbalanced task: ce, focal-3, "
                        "weighted-ce, la-ce), 2 seeds, fewer epochs (< 60 s on 2 cores)")
    g.add_argument("--tasks", metavar="LIST",
                   help="comma-separated bundled tasks (default: mnist1d,digits,mnist1d-lt,distill)")
    g.add_argument("--data", metavar="FILE",
                   help="your data instead: .csv/.tsv (with --target), .npz (X, y), .parquet")
    g.add_argument("--target", metavar="COLUMN", help="label column of --data")
    g.add_argument("--losses", metavar="LIST",
                   help="comma-separated losses (default: the full grid of the task)")
    g.add_argument("--seeds", metavar="N|LIST",
                   help="number of seeds (3 -> 0,1,2) or a comma-separated list (default 3)")
    g.add_argument("--epochs", type=int, metavar="N", help="epochs for every task")
    g.add_argument("--model", choices=_MODELS,
                   help="linear, 2 x 256 MLP or MNIST-1D's 1-D CNN for every task (default: cnn on "
                        "the MNIST-1D tasks, mlp elsewhere)")
    g.add_argument("--hidden", type=int, metavar="N", help="MLP width (default 256)")
    g.add_argument("--batch-size", type=int, metavar="N", help="minibatch size (default 128)")
    g.add_argument("--lr", type=float, metavar="LR",
                   help="Adam learning rate (default 1e-2 for the CNN, 1e-3 otherwise)")
    g.add_argument("--weight-decay", type=float, metavar="WD", help="Adam weight decay (0)")
    g.add_argument("--data-seed", type=int, metavar="N",
                   help="seed s trains on the split of data seed N + s (default 0)")
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
    if not p.exists():
        raise ValueError(f"config file {path}: no such file")
    if not p.is_file():
        raise ValueError(f"config file {path}: not a file")
    try:
        with p.open("rb") as fh:
            raw = tomllib.load(fh)
    except tomllib.TOMLDecodeError as exc:
        raise ValueError(f"config file {path}: invalid TOML: {exc}") from exc
    except UnicodeDecodeError as exc:
        raise ValueError(f"config file {path}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
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


#: Bounds of the integer options (a value outside is an error naming the option). Threads:
#: torch itself crashes (SIGSEGV) on ``set_num_threads(100000)``.
MAX_SEED = 2**63 - 1
MAX_SEED_COUNT = 10_000
MAX_THREADS = 1024
_INT_BOUNDS: dict[str, tuple[int, int]] = {
    "epochs": (1, 1_000_000),
    "hidden": (1, 2**31 - 1),  # and what fits in memory: see _check_model_memory
    "batch_size": (1, 2**31 - 1),
    "threads": (1, MAX_THREADS),
    "data_seed": (0, MAX_SEED),
    "n_bins": (1, 10_000),
}
_WORDS = {"epochs": "epochs", "hidden": "the hidden width", "batch_size": "the batch size",
          "threads": "the number of threads", "data_seed": "the data seed",
          "n_bins": "the number of bins"}


def _parse_seeds(value: Any, flag: str = "--seeds") -> list[int]:
    """A count (3 -> 0, 1, 2) or a list of seeds; errors name ``flag``."""
    if isinstance(value, bool):
        raise ValueError(f"bad {flag} {value!r}: give a count or a list like 0,1,2")
    if isinstance(value, int):
        if value < 1:
            raise ValueError(f"{flag}: the number of seeds must be >= 1, got {value}"
                             + (" (seed 0 alone is the list 0,)" if value == 0 and flag == "--seeds" else ""))
        if value > MAX_SEED_COUNT:
            raise ValueError(
                f"{flag}: the number of seeds must be <= {MAX_SEED_COUNT}, got {value}"
            )
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
                    f"bad {flag} {value!r}: give a count or a list like 0,1,2"
                ) from None
            return _parse_seeds(count, flag)
        items = [s for s in text.split(",") if s.strip()]
    if any(isinstance(s, bool) for s in items):
        raise ValueError(f"bad {flag} {value!r}: give a count or a list like 0,1,2")
    try:
        seeds = [s if isinstance(s, int) else int(str(s).strip()) for s in items]
    except (TypeError, ValueError):
        raise ValueError(f"bad {flag} {value!r}: give a count or a list like 0,1,2") from None
    if not seeds:
        raise ValueError(f"{flag}: no seeds given")
    bad = [s for s in seeds if not 0 <= s <= MAX_SEED]
    if bad:
        raise ValueError(f"{flag}: seeds must lie in 0..{MAX_SEED}, got {bad[0]}")
    return list(dict.fromkeys(seeds))


def _finite(value: float) -> bool:
    try:
        return math.isfinite(value)
    except OverflowError:  # an int beyond float's range
        return False


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
    from_cli: set[str] = set()
    for k in _CONFIG_KEYS:
        v = getattr(args, k, None)
        if v is not None:
            opts[k] = v
            from_cli.add(k)

    def flag(k: str) -> str:
        """How the user gave option ``k``: ``--batch-size``, or the config file's key."""
        if k in from_cli or not getattr(args, "config", None):
            return "--" + k.replace("_", "-")
        return f"config file {args.config}: {k}"

    for k, (lo, hi) in _INT_BOUNDS.items():
        if k in opts and not lo <= opts[k] <= hi:
            bound = f">= {lo}" if opts[k] < lo else f"<= {hi}"
            why = " (torch crashes on more)" if k == "threads" and opts[k] > hi else ""
            raise ValueError(f"{flag(k)}: {_WORDS[k]} must be {bound}{why}, got {opts[k]}")
    if "lr" in opts and not (_finite(opts["lr"]) and opts["lr"] > 0):
        raise ValueError(f"{flag('lr')}: the learning rate must be a finite number > 0, got {opts['lr']}")
    if "weight_decay" in opts and not (_finite(opts["weight_decay"]) and opts["weight_decay"] >= 0):
        raise ValueError(
            f"{flag('weight_decay')}: weight decay must be a finite number >= 0, "
            f"got {opts['weight_decay']}"
        )
    quick = bool(opts.get("quick", False))
    cfg = StudyConfig(quick=quick)
    if quick:
        cfg.seeds = list(QUICK_SEEDS)
    if "tasks" in opts:
        cfg.tasks = _split_list(opts["tasks"])
    if "losses" in opts:
        cfg.losses = _split_list(opts["losses"])
        if not cfg.losses:
            raise ValueError(f"{flag('losses')}: no losses given")
    if "seeds" in opts:
        cfg.seeds = _parse_seeds(opts["seeds"], flag("seeds"))
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

    device = resolve_device(cfg.device)  # fail early on an unavailable device
    # the smallest data (1 feature, 2 classes, 1 row) already needs this much: refuse early
    _check_model_memory(cfg, device, in_features=1, n_classes=2, n_rows=1, flag=flag("hidden"))
    return cfg, {"out": opts.get("out"), "figures": opts.get("figures", True)}


def _model_bytes(cfg: Any, in_features: int, n_classes: int, n_rows: int) -> int:
    """About the bytes training needs beyond the data: the model's parameters, their
    gradients and Adam's two moments (4 float32 copies), plus the activations of a batch and of
    a prediction chunk (8192 rows)."""
    h = cfg.hidden
    if cfg.model in (None, "mlp", "cnn"):  # the CNN (~5k parameters) is far below the MLP
        params = in_features * h + h * h + h * n_classes + 2 * h + n_classes
        rows = max(min(cfg.batch_size, n_rows), min(8192, n_rows))
        activations = 6 * rows * h
    else:
        params = in_features * n_classes + n_classes
        activations = 0
    return 4 * (4 * params + activations)


def _check_model_memory(
    cfg: Any, device: Any, *, in_features: int, n_classes: int, n_rows: int, flag: str = "--hidden"
) -> None:
    from crossent.cli import available_memory, format_bytes

    if cfg.model not in (None, "mlp"):
        return
    need = _model_bytes(cfg, in_features, n_classes, n_rows)
    free = available_memory(device)
    if free is not None and need > free:
        raise ValueError(
            f"{flag}: an MLP of width {cfg.hidden} needs about {format_bytes(need)} (parameters,"
            f" gradients and Adam state), more than the {format_bytes(free)} available"
        )


def _default_out() -> Path:
    base = Path("runs") / datetime.now().strftime("%Y%m%d-%H%M%S")
    out, i = base, 2
    while out.exists():
        out = base.with_name(f"{base.name}-{i}")
        i += 1
    return out


def main(args: argparse.Namespace) -> int:
    """Run the study, print the tables, write the run folder. Returns the exit status."""
    from crossent._extras import require

    Console = require("rich.console", "crossent run's terminal output").Console
    rp = require("rich.progress", "crossent run's progress bars")
    BarColumn, MofNCompleteColumn, Progress = rp.BarColumn, rp.MofNCompleteColumn, rp.Progress
    TextColumn, TimeElapsedColumn = rp.TextColumn, rp.TimeElapsedColumn

    from crossent.cli import check_out_dir
    from crossent.experiments.report import rich_tables, terminal_notes, write_run_folder
    from crossent.experiments.runner import aggregate, load_tasks, resolve_device, run_study

    cfg, output = build_config(args)
    out = check_out_dir(output["out"] if output["out"] is not None else _default_out())
    console = Console()
    if not console.is_terminal:  # piped or captured: wide enough for the whole table
        console = Console(width=200)
    err = Console(stderr=True)
    t0 = time.perf_counter()
    tasks = load_tasks(cfg)  # bad data fails here, before any training
    for t in tasks.values():
        _check_model_memory(cfg, resolve_device(cfg.device), in_features=t.num_features,
                            n_classes=t.num_classes, n_rows=len(t.y_train))
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
    for note in terminal_notes(result, rows):
        console.print(note, markup=False, highlight=False, soft_wrap=True)
    command = None
    if Path(sys.argv[0]).name == "crossent" and sys.argv[1:2] == ["run"]:
        command = "crossent " + shlex.join(sys.argv[1:])
    written = write_run_folder(result, out, figures=bool(output["figures"]), rows=rows,
                               command=command)
    n_fig = sum(1 for k in written if k.startswith("figures/"))
    console.print(
        f"{len(result.runs)} runs in {time.perf_counter() - t0:.0f} s (data, training, report and figures)."
        f" Wrote {out}/ "
        f"(results.json, results.csv, summary.csv, report.md, {n_fig} figures)"
    )
    return 0
