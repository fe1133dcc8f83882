"""The ``crossent`` command.

Each subcommand lives in the module that owns its work and exposes two functions::

    add_arguments(parser: argparse.ArgumentParser) -> None
    main(args: argparse.Namespace) -> int

Modules are imported when the parser is built, so they keep heavy imports (matplotlib,
scikit-learn, triton) inside their ``main``. Any :class:`CLIError`, ``ValueError`` or
``OSError`` raised by a subcommand is printed as one line on stderr with exit status 2:
a user never sees a traceback for bad input.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

__all__ = ["CLIError", "main"]


class CLIError(Exception):
    """A user-facing error: printed as one line, exit status 2."""


#: subcommand -> (module, one-line help)
SUBCOMMANDS: dict[str, tuple[str, str]] = {
    "run": ("crossent.experiments.cli", "train with each loss on bundled data; report calibration"),
    "calibrate": (
        "crossent.calibration.cli",
        "calibration metrics and temperature scaling of saved predictions",
    ),
    "bench": ("crossent.bench", "benchmark crossent against PyTorch and friends"),
    "demo": ("crossent.demo", "print CE / label-smoothing / focal losses and gradients on an example"),
}


def build_parser() -> argparse.ArgumentParser:
    from crossent import __version__

    parser = argparse.ArgumentParser(
        prog="crossent", description="The cross-entropy family of classification losses."
    )
    parser.add_argument("--version", action="version", version=f"crossent {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (module_name, help_text) in SUBCOMMANDS.items():
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as exc:  # a subcommand whose module is not built yet
            if exc.name != module_name:
                raise
            continue
        p = sub.add_parser(name, help=help_text, description=help_text)
        module.add_arguments(p)
        p.set_defaults(_main=module.main)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "_main", None) is None:
        parser.print_help()
        return 2
    try:
        return int(args._main(args) or 0)
    except (CLIError, ValueError, TypeError, OSError) as exc:
        print(f"crossent {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"crossent {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
