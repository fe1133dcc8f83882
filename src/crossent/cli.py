"""The ``crossent`` command.

Each subcommand lives in the module that owns its work and exposes two functions::

    add_arguments(parser: argparse.ArgumentParser) -> None
    main(args: argparse.Namespace) -> int

Modules are imported when the parser is built, so they keep optional imports (matplotlib, rich,
scikit-learn, triton) inside their ``main``, through :func:`crossent._extras.require`. Bad input
never shows a traceback: argparse's errors, any :class:`CLIError`, ``ValueError``,
``TypeError``, ``OSError``, ``OverflowError`` or ``MemoryError`` raised by a subcommand (and
torch's allocation failures) are printed as one line on stderr with exit status 2; so is a
missing optional dependency (:class:`~crossent._extras.MissingExtraError`, or any
``ImportError`` of a module that an extra provides), naming the extra that installs it.
``CROSSENT_DEBUG=1`` lets them propagate with their traceback, to debug crossent itself.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import os
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import NoReturn

from crossent._extras import EXTRA_OF, MissingExtraError

__all__ = ["CLIError", "available_memory", "check_out_dir", "format_bytes", "main"]

#: The environment variable that turns the one-line errors back into tracebacks.
DEBUG_ENV = "CROSSENT_DEBUG"


class CLIError(Exception):
    """A user-facing error: printed as one line, exit status 2."""


def one_line(text: object) -> str:
    """``text`` on a single line: its non-blank lines joined by spaces."""
    return " ".join(line.strip() for line in str(text).splitlines() if line.strip())


class ArgumentParser(argparse.ArgumentParser):
    """argparse with its usage errors on one line (``crossent run: error: ...``), exit 2."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {one_line(message)} (see {self.prog} --help)\n")


def format_bytes(n: float) -> str:
    """``n`` bytes as a short human-readable size (``1.5 GiB``)."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.3g} PiB"


def available_memory(device: object = "cpu") -> int | None:
    """Bytes a command may still allocate on ``device`` (``None`` where unknown).

    CPU: ``MemAvailable`` of /proc/meminfo, else the physical memory; CUDA: the free memory
    of the device.
    """
    kind = str(getattr(device, "type", device)).split(":")[0]
    if kind == "cuda":
        try:
            import torch

            return int(torch.cuda.mem_get_info(str(device))[0])
        except Exception:  # no CUDA, a bad index: the caller's own checks say so
            return None
    if kind != "cpu":
        return None
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return int(os.sysconf("SC_PHYS_PAGES")) * int(os.sysconf("SC_PAGE_SIZE"))
    except (OSError, ValueError, AttributeError):
        return None


def check_out_dir(path: str | os.PathLike[str], flag: str = "--out") -> Path:
    """``path`` as an output folder that can be created (or exists): raise ``CLIError``
    naming ``flag`` before any work if it is a file, lies under a file, or cannot be written."""
    out = Path(path)
    if str(path) == "":
        raise CLIError(f"{flag}: empty path")
    if out.exists():
        if not out.is_dir():
            raise CLIError(f"{flag} {out}: exists and is not a directory")
        if not os.access(out, os.W_OK | os.X_OK):
            raise CLIError(f"{flag} {out}: the directory is not writable")
        _probe_out_dir(out, flag)
        return out
    parent = out.absolute().parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise CLIError(f"{flag} {out}: {parent} is not a directory")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise CLIError(f"{flag} {out}: cannot create it, {parent} is not writable")
    _probe_out_dir(out, flag)
    return out


def _probe_out_dir(out: Path, flag: str) -> None:
    """Create the folders of ``out`` that are missing and a file in it, then remove what was
    made: what the permission bits do not tell (a read-only file system, ``/proc``, a user
    such as root for whom every ``os.access`` succeeds) fails here, before any work, not when
    the results are written."""
    made: list[Path] = []
    try:
        missing = []
        p = out.absolute()
        while not p.exists():
            missing.append(p)
            p = p.parent
        for d in reversed(missing):
            d.mkdir()
            made.append(d)
        with tempfile.TemporaryFile(dir=out):
            pass
    except OSError as err:
        raise CLIError(f"{flag} {out}: cannot write there ({err.strerror or err})") from None
    finally:
        for d in reversed(made):
            with contextlib.suppress(OSError):
                d.rmdir()


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

    parser = ArgumentParser(
        prog="crossent", description="The cross-entropy family of classification losses."
    )
    parser.add_argument("--version", action="version", version=f"crossent {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=ArgumentParser)
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


def _is_allocation_failure(exc: BaseException) -> bool:
    """A torch ``RuntimeError`` that only says an allocation failed (a size from the user)."""
    text = str(exc).lower()
    return isinstance(exc, RuntimeError) and (
        "can't allocate memory" in text or "out of memory" in text
    )


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "_main", None) is None:
        choices = ", ".join(SUBCOMMANDS)
        print(f"crossent: error: give a command: {choices} (see crossent --help)", file=sys.stderr)
        return 2
    debug = os.environ.get(DEBUG_ENV, "").strip() not in ("", "0")
    try:
        return int(args._main(args) or 0)
    except KeyboardInterrupt:
        print(f"crossent {args.command}: interrupted", file=sys.stderr)
        return 130
    except MissingExtraError as exc:  # an optional dependency: the message names the extra
        if debug:
            raise
        print(f"crossent {args.command}: error: {one_line(exc)}", file=sys.stderr)
        return 2
    except ImportError as exc:  # an optional dependency imported without require(): name its extra
        top = (exc.name or "").split(".")[0]
        if debug or top not in EXTRA_OF:
            raise
        install = f"pip install 'crossent[{EXTRA_OF[top]}]'"
        print(f"crossent {args.command}: error: {top} is not installed: {install}", file=sys.stderr)
        return 2
    except (CLIError, ValueError, TypeError, OSError, OverflowError, MemoryError, RuntimeError) as exc:
        if debug or (isinstance(exc, RuntimeError) and not _is_allocation_failure(exc)):
            raise  # a bug of crossent's own: keep its traceback
        message = one_line(exc) or type(exc).__name__
        if isinstance(exc, MemoryError) or _is_allocation_failure(exc):
            # torch's "[enforce fail at alloc_cpu.cpp:127] err == 0. DefaultCPUAllocator: can't
            # allocate memory: you tried to allocate N bytes ...": keep what the user can act on
            detail = message.partition("can't allocate memory:")[2].strip() or message
            message = "out of memory" if detail == "MemoryError" else f"out of memory: {detail}"
        print(f"crossent {args.command}: error: {message}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    # ``python -m crossent.cli``: run the imported module's main, so that the exception classes
    # the subcommands raise (crossent.cli.CLIError) are the ones main catches
    from crossent.cli import main as _main

    sys.exit(_main())
