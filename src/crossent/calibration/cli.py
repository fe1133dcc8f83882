"""``crossent calibrate``: calibration metrics and temperature scaling of saved predictions.

A .csv file may start with a header row (``--csv-header``). In the default ``auto`` mode the
first row is a header when it is not numeric, or when it is exactly the column indices
``0,1,...,W-1`` written as integers (the header pandas writes for an unnamed frame,
``DataFrame(arr).to_csv(path, index=False)``, or series) and either W >= 3 (never a row of
probabilities, not a plausible row of logits) or the rows below are not all integers. A first
row ``0`` or ``0,1`` above integer rows is also a valid label or one-hot row, so ``auto``
reads it as data; when the two files then differ by that one row the error says so, and
``--csv-header yes`` drops it (``no`` keeps any first row).

The file's content is checked against the format asked for (``--format`` or the extension) by
its magic bytes, so that an .npy read as .npz (or a torch file read as an .npy) gets a
one-line error naming the format it is.
"""

from __future__ import annotations

import argparse
import codecs
import difflib
import json
import math
import pickle
import re
import sys
import warnings
import zipfile
from pathlib import Path
from typing import Any, Literal, NamedTuple

import numpy as np

from crossent._extras import require
from crossent.calibration._inputs import first_non_integer, position, shown_label

__all__ = ["add_arguments", "main"]

#: --method choices; the binary ones need two classes
METHODS = (
    "temperature",
    "vector",
    "matrix",
    "dirichlet",
    "histogram",
    "isotonic",
    "ensemble_temperature",
    "platt",
    "beta",
)
BINARY_METHODS = ("platt", "beta")
#: the comparison skips matrix and Dirichlet scaling (C x C parameters) above this many classes
MAX_MATRIX_CLASSES = 100

PRED_KEYS = ("logits", "probs", "probabilities", "predictions", "preds", "scores", "outputs")
LABEL_KEYS = ("labels", "label", "targets", "target", "y")
FORMATS = ("npy", "npz", "pt", "csv")
CSV_HEADERS = ("auto", "yes", "no")
MAX_BINS = 10_000
MAX_SEED = 2**63 - 1

EPILOG = """\
input files
  PREDICTIONS  an (N, C) array of logits or probabilities in a .npy, .npz, .pt (torch tensor
               or dict of tensors, loaded with weights_only=True) or .csv file (comma
               separated, optional header row: see below). An .npz/.pt dict is searched for
               the keys logits, probs, probabilities, predictions, preds, scores, outputs; if
               it also holds labels (labels, label, targets, target, y) --labels can be omitted.
               (N,) or (N, 1) scores are binary scores of class 1 (logits s or probabilities p,
               read as the columns 0, s or 1 - p, p), with labels 0/1.
  LABELS       N integer class indices in 0..C-1 (booleans are 0/1, one-hot (N, C) rows their
               argmax), in any of the same formats.
  Files are read without unpickling (np.load(allow_pickle=False)). With many arrays (the
  predictions.npz of crossent run) pick one with --key; its labels are the array "labels"
  next to it or in a parent group (--labels-key overrides). --key and --labels-key name
  arrays inside .npz/.pt files: a .npy, .csv or one-tensor .pt file holds a single unnamed
  array. A file whose content is another format than the one asked for (--format, else the
  extension) is refused, naming the format it is.

csv header row (--csv-header, for PREDICTIONS and LABELS alike)
  auto (default): the first row is a header when it is not numeric, or when it is exactly
  the column indices 0,1,...,W-1 written as integers (pandas' header of an unnamed frame or
  series) with W >= 3 or above rows that are not all integers. A first row 0 or 0,1 above
  integer rows is a valid label or one-hot row, so auto reads it as data: pass
  --csv-header yes if it is a header. yes: the first row is always a header. no: never.

what it does
  Logits or probabilities are detected from the values (rows in [0, 1] summing to 1 are
  probabilities; rows in [0, 1] summing to 1 within 0.05, such as rounded probabilities, are
  renormalised with a warning; other rows in [0, 1] need --kind logits; override with
  --kind); probabilities are scaled through their logs. Exact zeros of probabilities all
  written with d decimals are read as half the last digit (5e-07 for 6 decimals), the most
  that rounds to 0, with a warning. A stratified random split (--seed)
  puts --val-fraction of every class in a validation part on which the --method (default:
  temperature scaling, T minimising the --objective) is fitted; all metrics are reported on
  the rest (the held-out part) before and after. Then every method (temperature, vector,
  matrix, Dirichlet, histogram binning, isotonic, ensemble temperature; Platt and beta for
  two classes) is fitted on the same part and compared on the held-out part, ranked by
  --objective. Of the methods that give no held-out label probability 0, and "none" (no
  recalibration), the one with the fewest fitted parameters whose score is within one standard
  error of the difference from the lowest is recommended (the one-standard-error rule; the
  ECE's error from 200 bootstrap resamples of the held-out part, drawn with --seed), with a
  warning if, ranked by ECE, it makes the held-out NLL worse. A degenerate fit (bound reached,
  separable fit part, NLL worse than no scaling) falls back to the identity and says so; the
  classes that histogram binning and isotonic regression leave uncalibrated (identity), those
  with no sample in the fit part and those it separates from the others, are named in a
  note. Masked logits (-inf) are probability 0; matrix and Dirichlet scaling, whose maps mix
  the classes, are skipped for them. --val-fraction 0 fits and evaluates on
  everything (optimistic; a warning is printed). A fit part of fewer than 100 samples gives a
  warning.

metrics
  accuracy, NLL (nats), Brier (summed over classes, range 0-2), ECE (--n-bins M equal-width
  bins ((m-1)/M, m/M], 15 by default), AdaECE (equal-mass bins), classwise ECE, MCE (max bin gap), smooth ECE
  (Blasiok & Nakkiran 2023).

outputs (with --out DIR)
  DIR/report.md, DIR/metrics.json, DIR/reliability_before.png, DIR/reliability_after.png
  and DIR/reliability_comparison.png (before and after side by side).

examples
  crossent calibrate val_logits.npy --labels val_labels.npy --out calib/
  crossent calibrate runs/study/predictions.npz --key mnist1d/ce/seed0/logits
"""


#: the part of each class the method is fitted on; the rest is held out for the metrics
VAL_FRACTION_DEFAULT = 0.2


def _error(message: str) -> Exception:
    from crossent.cli import CLIError

    return CLIError(message)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Register the ``calibrate`` arguments on ``parser``."""
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.epilog = EPILOG
    parser.add_argument(
        "predictions",
        metavar="PREDICTIONS",
        help="file of (N, C) logits or probabilities: .npy, .npz, .pt or .csv; per-position"
        " scores (B, T, C) of a sequence model or (N, C, H, W) of a segmentation one, with labels"
        " of the positions' shape, are flattened to one row per position",
    )
    parser.add_argument(
        "--labels",
        metavar="LABELS",
        default=None,
        help="file of N integer labels (.npy, .npz, .pt, .csv); optional when PREDICTIONS is"
        " an .npz/.pt holding a 'labels' array",
    )
    parser.add_argument(
        "--kind",
        choices=("auto", "logits", "probs"),
        default="auto",
        help="what PREDICTIONS holds (default: auto-detect from the values)",
    )
    parser.add_argument(
        "--format",
        choices=("auto", *FORMATS),
        default="auto",
        dest="file_format",
        help="file format of PREDICTIONS and LABELS (default: from the file extension)",
    )
    parser.add_argument(
        "--csv-header",
        choices=CSV_HEADERS,
        default="auto",
        help="whether the first row of a .csv PREDICTIONS or LABELS file is a header: auto"
        " (default) takes a non-numeric row, or the column indices 0,1,...,W-1 written as"
        " integers (pandas' header) with W >= 3 or above non-integer rows, as one; yes: always;"
        " no: never",
    )
    parser.add_argument(
        "--val-fraction",
        type=float,
        default=VAL_FRACTION_DEFAULT,
        metavar="F",
        help=f"fraction of each class used to fit T, in [0, 1) (default: {VAL_FRACTION_DEFAULT}; 0 = fit and"
        " evaluate on everything, in-sample: the comparison then recommends no method)",
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the split (default: 0)")
    parser.add_argument(
        "--ignore-index",
        type=int,
        default=None,
        metavar="N",
        help="leave out the samples whose label is N (e.g. -100, the padding or void label of"
        " PyTorch's losses) before anything else",
    )
    parser.add_argument(
        "--n-bins",
        type=int,
        default=15,
        metavar="M",
        help="bins of the binned metrics (default: 15)",
    )
    parser.add_argument(
        "--key",
        metavar="NAME",
        default=None,
        help="the predictions array inside an .npz/.pt PREDICTIONS file (e.g."
        " mnist1d/ce/seed0/logits of a crossent run); its labels are found next to it",
    )
    parser.add_argument(
        "--labels-key",
        metavar="NAME",
        default=None,
        help="the labels array inside the .npz/.pt LABELS file, or inside PREDICTIONS without"
        " --labels (default: found next to --key)",
    )
    parser.add_argument(
        "--method",
        choices=METHODS,
        default="temperature",
        metavar="METHOD",
        help="the recalibration method of the before/after table: " + ", ".join(METHODS)
        + " (platt and beta: two classes; default: temperature)",
    )
    parser.add_argument(
        "--objective",
        choices=("nll", "ece"),
        default="nll",
        help="what temperature scaling minimises on the fit part, and what the comparison"
        " of all methods ranks by (default: nll; ece is the convention of Mukhoti et al. 2020)."
        " ece takes --method temperature only; a degenerate ECE fit falls back to T = 1 here, as"
        " every method's does, where crossent run keeps it",
    )
    parser.add_argument(
        "--no-compare",
        action="store_true",
        help="skip the comparison of every method on the held-out part",
    )
    parser.add_argument(
        "--out",
        metavar="DIR",
        default=None,
        help="write report.md, metrics.json and reliability diagrams (PNG) to DIR",
    )
    parser.add_argument(
        "--no-figures",
        dest="figures",
        action="store_false",
        help="with --out, skip the reliability diagrams (no matplotlib needed; as crossent run)",
    )


# --------------------------------------------------------------------------- loading
def _extension_format(path: Path) -> str:
    """The format the extension of ``path`` names (``.pth`` is ``pt``), lower case, without the
    dot; not checked against :data:`FORMATS`."""
    ext = path.suffix.lower().lstrip(".")
    return "pt" if ext == "pth" else ext


def _format_of(path: Path, file_format: str) -> str:
    if file_format != "auto":
        return file_format
    ext = _extension_format(path)
    if ext not in FORMATS:
        raise _error(
            f"{path}: cannot tell the format from the extension {path.suffix!r};"
            " use .npy, .npz, .pt or .csv, or pass --format"
        )
    return ext


def _csv_lines(path: Path) -> list[str]:
    """The rows of a CSV file: its stripped lines, less blank and ``#`` comment lines."""
    # utf-8-sig: a byte-order mark (Excel's "CSV UTF-8") is not part of the first row
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as err:
        raise ValueError(
            f"it is not UTF-8 text (byte {err.start} is {err.object[err.start:err.start + 1]!r}):"
            " save it as CSV UTF-8, uncompressed"
        ) from None
    lines = (ln.strip() for ln in text.splitlines())
    return [ln for ln in lines if ln and not ln.startswith("#")]


def _is_numeric_row(line: str) -> bool:
    try:
        [float(v) for v in line.split(",")]
    except ValueError:
        return False
    return True


def _is_index_row(line: str) -> bool:
    """Whether ``line`` is exactly the column indices ``0,1,...,W-1`` written as integers."""
    cells = [v.strip() for v in line.split(",")]
    return cells == [str(i) for i in range(len(cells))]


#: a CSV row of integers only
_INTEGER_ROW = re.compile(r"\s*[-+]?\d+\s*(,\s*[-+]?\d+\s*)*")


def _is_header(line: str, rest: list[str], csv_header: str) -> bool:
    """Whether ``line``, the first row of a CSV file, is a header by the ``--csv-header`` rule;
    ``rest`` are the rows below it.

    ``auto``: a non-numeric row, or the column indices ``0,1,...,W-1`` written as integers (the
    header pandas writes for an unnamed frame or series) when W >= 3 (as data an exact integer
    ramp of logits, never probabilities) or when the rows below (the first 100 of them, so that
    a long file of integer labels is not scanned twice) are not all written as integers (pandas
    writes floats as ``0.0``, ``0.25``). ``0`` and ``0,1`` above integer rows are a
    valid label and a valid one-hot row, so ``auto`` reads them as data."""
    if csv_header != "auto":
        return csv_header == "yes"
    if not _is_numeric_row(line):
        return True
    if not _is_index_row(line):
        return False
    return line.count(",") >= 2 or any(not _INTEGER_ROW.fullmatch(r) for r in rest[:100])


def _read_csv(path: Path, csv_header: str = "auto") -> np.ndarray:
    """The numbers of a comma-separated file: (N, W), or (N,) for one column. The first row
    is dropped when it is a header (see :func:`_is_header`)."""
    lines = _csv_lines(path)
    if not lines:
        raise ValueError("the file has no data rows")
    if all(ln.endswith(",") for ln in lines):  # a comma ending every row: an empty last column
        lines = [ln[:-1].rstrip() for ln in lines]
    first = lines[0]
    header = _is_header(first, lines[1:], csv_header)
    if header:
        lines = lines[1:]
        if not lines:
            raise ValueError(f"the file has a header row ({first[:60]!r}) and no data rows")
    rows: list[list[float]] = []
    for i, line in enumerate(lines):
        try:
            rows.append([float(v) for v in line.split(",")])
        except ValueError:
            fix = "; if it is a header, drop --csv-header no" if i == 0 and csv_header == "no" else ""
            raise ValueError(f"data row {i + 1} is not numeric: {line[:60]!r}{fix}") from None
    widths = {len(r) for r in rows}
    if len(widths) != 1:
        raise ValueError(f"rows have different numbers of columns: {sorted(widths)}")
    arr = np.asarray(rows, dtype=np.float64)
    # pandas' to_csv writes its row index as a first column named "" unless index=False
    if (header and first.split(",")[0].strip() in ("", '""') and arr.shape[1] >= 2
            and np.array_equal(arr[:, 0], np.arange(arr.shape[0]))):
        raise ValueError(
            "its first column is an unnamed row index 0..N-1 (pandas' to_csv without"
            " index=False): drop that column"
        )
    return arr[:, 0] if arr.shape[1] == 1 else arr


NPY_MAGIC = b"\x93NUMPY"
ZIP_MAGICS = (b"PK\x03\x04", b"PK\x05\x06")  # a zip with members; an empty zip
#: torch.save's legacy (non-zip) format: pickle protocol 2, then torch's magic number
TORCH_LEGACY_MAGIC = b"\x80\x02\x8a\x0al\xfc\x9cF\xf9 j\xa8P\x19"


def _sniff(path: Path) -> tuple[str, str] | None:
    """What the content of ``path`` is, by its first bytes: (format, a few words saying so),
    or ``None`` when it cannot tell (the reader of the format asked for then has its say).
    .npz and torch .pt files are both zips: an .npz holds only ``*.npy`` members, a torch
    file a ``data.pkl``."""
    with path.open("rb") as f:
        head = f.read(4096)
    if head.startswith(NPY_MAGIC):
        return "npy", r"an .npy file (it starts with \x93NUMPY)"
    if head.startswith(TORCH_LEGACY_MAGIC):
        return "pt", "a torch file (legacy format)"
    if head.startswith(ZIP_MAGICS):
        try:
            with zipfile.ZipFile(path) as zf:
                names = zf.namelist()
        except (zipfile.BadZipFile, OSError, ValueError):
            return None
        if names and all(n.endswith(".npy") for n in names):
            return "npz", "an .npz file (a zip of .npy arrays)"
        if any(n == "data.pkl" or n.endswith("/data.pkl") for n in names):
            return "pt", "a torch file (a zip holding data.pkl)"
        return None
    if head and b"\x00" not in head:
        try:  # final=False: the 4096 bytes may end inside a character
            codecs.getincrementaldecoder("utf-8")().decode(head, final=False)
        except UnicodeDecodeError:
            return None
        return "csv", "text"
    return None


def _format_mismatch(what: str, path: Path, fmt: str, file_format: str, seen: tuple[str, str]) -> str:
    """The one-line error for a file whose content is ``seen`` but was asked for as ``fmt``."""
    kind, desc = seen
    if file_format == "auto":  # the extension chose fmt
        asked, fix = f"{fmt} (its extension)", f"rename it .{kind} or pass --format {kind}"
    elif _extension_format(path) == kind:
        # --format serves both files: the extensions already tell each file's format
        asked, fix = fmt, "drop --format (its extension says what it is)"
    else:
        asked, fix = fmt, f"use --format {kind}"
    if kind == "csv":
        fix = f"if it is CSV, {fix}"
    return f"cannot read {what} file {path} as {asked}: it is {desc}; {fix}"


def _load(
    path_str: str, file_format: str, what: str, csv_header: str = "auto"
) -> dict[str, np.ndarray]:
    """The arrays in a file, by key ('' for a file holding a single array)."""
    path = Path(path_str)
    if not path.exists():
        raise _error(f"{what} file {path} does not exist")
    if not path.is_file():
        raise _error(f"{what} file {path} is not a file")
    fmt = _format_of(path, file_format)
    try:
        if path.stat().st_size == 0:
            raise _error(f"{what} file {path} is empty")
        seen = _sniff(path)
        if seen is not None and seen[0] != fmt:
            raise _error(_format_mismatch(what, path, fmt, file_format, seen))
        if fmt == "npy":
            with path.open("rb") as f:
                magic = f.read(len(NPY_MAGIC))
            if not magic.startswith((NPY_MAGIC, *ZIP_MAGICS)):  # a zip: np.load tells it below
                raise ValueError(r"it is not an .npy file (it does not start with \x93NUMPY)")
            arr = np.load(path, allow_pickle=False)
            if not isinstance(arr, np.ndarray):  # np.load opens any zip as an NpzFile
                arr.close()
                raise ValueError("it is a zip archive, not an .npy file")
            return {"": arr}
        if fmt == "npz":
            data = np.load(path, allow_pickle=False)
            if not isinstance(data, np.lib.npyio.NpzFile):
                raise ValueError("it is not a zip of .npy arrays")
            with data:
                out: dict[str, np.ndarray] = {}
                for k in data.files:
                    value = data[k]
                    if not isinstance(value, np.ndarray):  # a member that is no .npy file
                        raise ValueError(f"its member {k!r} is not an .npy array")
                    out[k] = value
                return out
        if fmt == "csv":
            return {"": _read_csv(path, csv_header)}
        import torch

        with warnings.catch_warnings():  # torch warns of the pickle protocol before it refuses
            warnings.simplefilter("ignore")
            try:
                obj = torch.load(path, map_location="cpu", weights_only=True)
            except pickle.UnpicklingError:
                raise ValueError(
                    "it is not a file of tensors that torch.load(weights_only=True) reads, and a pickle of"
                    " other objects is not loaded (unpickling can run code): save the arrays with"
                    " torch.save(tensor) or np.save"
                ) from None
        if isinstance(obj, torch.Tensor):
            return {"": _tensor_to_numpy(obj)}
        if isinstance(obj, dict):
            tensors = {
                str(k): _tensor_to_numpy(v) for k, v in obj.items() if isinstance(v, torch.Tensor)
            }
            if tensors:
                return tensors
        raise ValueError("expected a tensor or a dict of tensors")
    except Exception as exc:  # any reader failure becomes one line, never a traceback
        if type(exc).__name__ == "CLIError":
            raise
        msg = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        if "allow_pickle" in msg or "pickled" in msg:  # NumPy's words for an array of Python objects
            msg = ("it holds Python objects (strings or mixed types?), which are not read without"
                   " unpickling: save numbers, e.g. class indices 0..C-1 as integers")
        raise _error(f"cannot read {what} file {path} as {fmt}: {msg}") from None


def _tensor_to_numpy(t: Any) -> np.ndarray:
    import torch

    t = t.detach().cpu()
    if t.is_floating_point() and t.dtype not in (torch.float32, torch.float64):
        t = t.float()
    return t.numpy()


def _pick(arrays: dict[str, np.ndarray], keys: tuple[str, ...]) -> tuple[str, np.ndarray] | None:
    lower = {k.lower(): k for k in arrays}
    for key in keys:
        if key in lower:
            return lower[key], arrays[lower[key]]
    return None


def _listing(arrays: dict[str, np.ndarray], limit: int = 3) -> str:
    """A short listing of the arrays in a file: the 2-D (prediction-like) ones where there are
    any, else all; the count of those not shown is of the same kind as those shown."""
    if "" in arrays:  # .npy, .csv, a .pt of one tensor
        return f"a single unnamed array of shape {tuple(arrays[''].shape)}"
    if not arrays:
        return "no arrays"
    names = sorted(arrays)
    if len(names) == 1:
        return f"one array: {names[0]} {tuple(arrays[names[0]].shape)}"
    two_d = [k for k in names if arrays[k].ndim == 2]
    listed, kind = (two_d, " 2-D") if two_d else (names, "")
    shown = ", ".join(f"{k} {tuple(arrays[k].shape)}" for k in listed[:limit])
    more = f", ... ({len(listed) - limit} more{kind})" if len(listed) > limit else ""
    return f"{len(names)} arrays, {len(two_d)} of them 2-D: {shown}{more}"


def _did_you_mean(key: str, arrays: dict[str, np.ndarray]) -> str:
    """`` (did you mean 'x'?)`` for a mistyped array name: one that differs only in case, else
    the closest name (difflib), else nothing."""
    close = [k for k in arrays if k.lower() == key.lower()] or difflib.get_close_matches(
        key, list(arrays), n=1, cutoff=0.8)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _labels_next_to(arrays: dict[str, np.ndarray], key: str) -> tuple[str, np.ndarray] | None:
    """The labels array beside ``key``: ``a/b/labels`` for ``a/b/logits``, else ``a/labels``."""
    parts = key.split("/")[:-1]
    lower = {k.lower(): k for k in arrays}
    while True:
        for name in LABEL_KEYS:
            cand = "/".join([*parts, name]).lower()
            if cand in lower and lower[cand] != key:
                return lower[cand], arrays[lower[cand]]
        if not parts:
            return None
        parts = parts[:-1]


def _predictions_and_labels(
    args: argparse.Namespace,
) -> tuple[np.ndarray, np.ndarray, str | None, str | None, str | None]:
    """The predictions, the labels, the kind the predictions' name hints at, and the names of
    the predictions and labels arrays inside their files (``None`` for a file of one unnamed
    array): the report says which arrays were analysed."""
    arrays = _load(args.predictions, args.file_format, "PREDICTIONS", args.csv_header)
    hint: str | None = None
    key: str | None = None
    if args.key is not None:
        if "" in arrays:
            raise _error(
                f"--key names an array inside an .npz/.pt file; PREDICTIONS {args.predictions}"
                " holds a single unnamed array: drop --key"
            )
        if args.key not in arrays:
            raise _error(
                f"--key {args.key!r} is not in PREDICTIONS {args.predictions}"
                f"{_did_you_mean(args.key, arrays)}; it holds {_listing(arrays)}"
            )
        if args.key.split("/")[-1].lower() in LABEL_KEYS:
            siblings = [k for k in arrays if k.rsplit("/", 1)[0] == args.key.rsplit("/", 1)[0]
                        and k.split("/")[-1].lower() in PRED_KEYS]
            instead = f" (here {siblings[0]!r})" if siblings else ""
            raise _error(
                f"--key {args.key!r} names labels: --key picks the predictions{instead}, and the labels"
                " beside them are found (or named by --labels-key)"
            )
        key, preds = args.key, arrays[args.key]
    elif "" in arrays:
        preds = arrays[""]
    else:
        found = _pick(arrays, PRED_KEYS)
        rest = [k for k in arrays if k.lower() not in LABEL_KEYS]
        if found is None and len(rest) == 1:
            found = (rest[0], arrays[rest[0]])
        if found is None and not arrays:
            raise _error(f"PREDICTIONS {args.predictions} holds no arrays")
        if found is None:
            raise _error(
                f"PREDICTIONS {args.predictions} holds {_listing(arrays)}; pick the predictions"
                " with --key NAME (or store them as 'logits' or 'probs')"
            )
        key, preds = found
    if key is not None:
        last = key.split("/")[-1].lower()
        if last == "logits":
            hint = "logits"
        elif last in ("probs", "probabilities"):
            hint = "probs"
    if args.labels is not None:
        larrays = _load(args.labels, args.file_format, "LABELS", args.csv_header)
        if args.labels_key is not None:
            if "" in larrays:
                raise _error(
                    f"--labels-key names an array inside an .npz/.pt file; LABELS {args.labels}"
                    " holds a single unnamed array: drop --labels-key"
                )
            if args.labels_key not in larrays:
                raise _error(f"--labels-key {args.labels_key!r} is not in LABELS {args.labels}"
                             f"{_did_you_mean(args.labels_key, larrays)}; it holds {_listing(larrays)}")
            return preds, larrays[args.labels_key], hint, key, args.labels_key
        labels_key: str | None = None
        if "" in larrays:
            labels = larrays[""]
        else:
            found = _pick(larrays, LABEL_KEYS)
            if found is None and len(larrays) == 1:
                found = next(iter(larrays.items()))
            if found is None:
                raise _error(
                    f"LABELS {args.labels} holds {_listing(larrays)}; pick the labels with"
                    " --labels-key NAME"
                )
            labels_key, labels = found
    else:
        if args.labels_key is not None:
            if "" in arrays:
                raise _error(
                    f"--labels-key names an array inside PREDICTIONS, but {args.predictions}"
                    " holds a single unnamed array (the predictions): pass --labels LABELS"
                )
            if args.labels_key not in arrays:
                raise _error(f"--labels-key {args.labels_key!r} is not in PREDICTIONS"
                             f" {args.predictions}{_did_you_mean(args.labels_key, arrays)};"
                             f" it holds {_listing(arrays)}")
            return preds, arrays[args.labels_key], hint, key, args.labels_key
        found = None if "" in arrays else (
            _labels_next_to(arrays, key) if key is not None else None
        ) or _pick(arrays, LABEL_KEYS)
        if found is None:
            raise _error(
                "no labels: pass --labels LABELS (or --labels-key NAME), or store a 'labels'"
                " array next to the predictions in an .npz/.pt file"
            )
        labels_key, labels = found
    return preds, labels, hint, key, labels_key


#: the arrays of crossent run's predictions.npz: ``<task>/<loss>/seed<k>/<name>``, and
#: ``<task>/<name>`` for a task's shared test labels
_RUN_KEY = re.compile(r"(?P<task>[^/]+)/(?:[^/]+/seed(?P<seed>\d+)/)?[^/]+")


def mixed_runs_warning(key: str | None, labels_key: str | None) -> str | None:
    """The warning when the predictions ``key`` and the ``labels_key`` both follow crossent
    run's layout and belong to other tasks or seeds: each seed draws its own split, so another
    seed's labels do not belong to these predictions, yet they pass every shape check and give
    a near-chance accuracy without an error. ``None`` otherwise."""
    if key is None or labels_key is None:
        return None
    pred, lab = _RUN_KEY.fullmatch(key), _RUN_KEY.fullmatch(labels_key)
    if pred is None or lab is None or pred["seed"] is None:
        return None
    if pred["task"] != lab["task"]:
        other = f"task {lab['task']!r}, not {pred['task']!r}"
    elif lab["seed"] is not None and lab["seed"] != pred["seed"]:
        other = f"seed {lab['seed']}, not {pred['seed']}"
    else:
        return None
    return f"the labels {labels_key!r} come from another run than --key {key!r} ({other})"


def _csv_header_hint(args: argparse.Namespace, preds: np.ndarray, labels: np.ndarray) -> str:
    """The fix to add to the row-count mismatch of PREDICTIONS and LABELS when the file with
    one row more is a CSV read with ``--csv-header auto`` (its first row may be pandas' ``0``
    header, which auto reads as a label); ``""`` otherwise."""
    if args.csv_header == "no" or args.labels is None or preds.ndim != 2:
        return ""
    n_labels = labels.size if labels.ndim == 1 or (labels.ndim == 2 and 1 in labels.shape) else -1
    if n_labels == preds.shape[0] + 1:
        what, longer = "LABELS", args.labels
    elif n_labels == preds.shape[0] - 1:
        what, longer = "PREDICTIONS", args.predictions
    else:
        return ""
    shorter = args.predictions if what == "LABELS" else args.labels
    if args.csv_header == "yes":  # the first row dropped from a file that had no header?
        if _format_of(Path(shorter), args.file_format) != "csv":
            return ""
        return (f"; --csv-header yes dropped the first row of {shorter}: if it has no header row,"
                " drop --csv-header yes and delete the other file's header row instead")
    if _format_of(Path(longer), args.file_format) != "csv":
        return ""
    return (f"; if the first row of {what} {longer} is a header, delete it or pass --csv-header yes"
            " (which drops the first row of every .csv input)")


def _check(
    preds: np.ndarray, labels: np.ndarray, labels_file: str = "LABELS", mismatch_hint: str = "",
    csv_input: bool = False, ignore_index: int | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """PREDICTIONS and LABELS checked, as float (N, C) or (N,) and int64 (N,). (N,) and (N, 1)
    PREDICTIONS are binary scores of class 1 (returned (N,)), which need labels 0/1. Samples
    whose label is ``ignore_index`` are left out first."""
    if preds.dtype.kind not in "fiu":
        raise _error(f"PREDICTIONS must be numeric, got dtype {preds.dtype}")
    if preds.ndim > 2:
        preds, labels = _per_position(preds, np.asarray(labels), labels_file)
    given = preds.shape
    if preds.ndim == 2 and preds.shape[1] == 1:  # a column of binary scores
        shape_error = f"PREDICTIONS needs at least 2 columns (classes), got shape {preds.shape}"
        preds = preds[:, 0]
    else:
        shape_error = (f"PREDICTIONS must be a 1-D (binary scores) or 2-D array (samples x classes),"
                       f" got shape {preds.shape}")
    if preds.ndim not in (1, 2):
        raise _error(shape_error)
    n, c = preds.shape[0], (2 if preds.ndim == 1 else preds.shape[1])
    if c < 2:
        raise _error(f"PREDICTIONS needs at least 2 columns (classes), got shape {preds.shape}")
    rows = None  # the files' row of each one kept, where --ignore-index dropped some: the errors name it
    if ignore_index is not None:
        labels = _label_indices(np.asarray(labels), n, c, labels_file)
        if labels.shape[0] == n:
            keep = labels != ignore_index
            if not keep.any():
                raise _error(f"every label equals --ignore-index {ignore_index}: nothing to calibrate")
            if not keep.all():
                preds, labels, n, rows = preds[keep], labels[keep], int(keep.sum()), np.flatnonzero(keep)
    if n < 2:
        raise _error(f"PREDICTIONS needs at least 2 rows (samples), got {n}")
    if preds.dtype not in (np.float32, np.float64):
        preds = preds.astype(np.float64)
    flat = preds.reshape(n, -1)
    # -inf is a masked logit (probability 0) where the row has a finite one
    bad = ~(np.isfinite(flat) | np.isneginf(flat)).all(axis=1) | ~np.isfinite(flat).any(axis=1)
    if bad.any():
        first = position(int(np.flatnonzero(bad)[0]), rows)
        raise _error(
            f"PREDICTIONS has {int(bad.sum())} row(s) with NaN or infinite values"
            f" (first: row {first}); drop or fix them"
        )
    labels = _label_indices(np.asarray(labels), n, c, labels_file)
    if labels.shape[0] != n:
        raise _error(
            f"PREDICTIONS has {n} rows but LABELS has {labels.shape[0]} entries; they must match"
            + mismatch_hint
        )
    if preds.ndim == 1:
        not01 = (labels != 0) & (labels != 1)
        if not01.any():
            i = int(np.flatnonzero(not01)[0])
            raise _error(
                f"PREDICTIONS of shape {given}{' (a .csv file of one column)' if csv_input else ''} are"
                " binary scores of class 1, which need labels 0/1,"
                f" and {labels_file} holds {shown_label(labels[i].item())!r} at entry {position(i, rows)}:"
                " for C classes pass (N, C) PREDICTIONS, a 2-D array with a column per class"
                + _ignore_hint(labels[not01], ignore_index)
            )
    # compare before any cast: 1e30 or a uint64 beyond int64 must not wrap around
    out_of_range = (labels < 0) | (labels >= c)
    if out_of_range.any():
        i = int(np.flatnonzero(out_of_range)[0])
        one_based = ("; they look 1-based (1..C): subtract 1"
                     if labels.min() >= 1 and labels.max() == c else "")
        one_based = one_based or _ignore_hint(labels[out_of_range], ignore_index)
        raise _error(
            f"LABELS must lie in 0..{c - 1} for {c} classes; {labels_file} holds"
            f" {shown_label(labels[i].item())!r} at entry {position(i, rows)} ({int(out_of_range.sum())}"
            " value(s) out of"
            f" range){one_based}"
        )
    labels = labels.astype(np.int64)
    if preds.ndim == 2:
        at_y = np.isneginf(preds[np.arange(n), labels])
        if at_y.any():
            i = int(np.flatnonzero(at_y)[0])
            raise _error(
                f"PREDICTIONS row {position(i, rows)} masks its label (class {int(labels[i])} has logit -inf;"
                f" {int(at_y.sum())} row(s) so): no method gives it a probability above 0; drop those rows"
            )
    return preds, labels


def _per_position(preds: np.ndarray, labels: np.ndarray, labels_file: str) -> tuple[np.ndarray, np.ndarray]:
    """Scores of one label per position flattened to (positions, C) and their labels to 1-D:
    a sequence model's (B, T, ..., C) with labels (B, T, ...) (classes last, as Hugging Face
    writes them), or a segmentation model's (N, C, d1, ...) with labels (N, d1, ...) (classes
    in dim 1, PyTorch's layout); classes last where both shapes fit. Labels already flat, one
    per position, go with the classes-last reading."""
    last, first = preds.shape[:-1], preds.shape[:1] + preds.shape[2:]
    if labels.shape == last or (labels.ndim == 1 and labels.size == math.prod(last)):
        return preds.reshape(-1, preds.shape[-1]), labels.reshape(-1)
    if labels.shape == first:
        return np.moveaxis(preds, 1, -1).reshape(-1, preds.shape[1]), labels.reshape(-1)
    shapes = (f"{last}" if last == first else f"{last} (classes last, as a sequence model writes them)"
              f" or {first} (classes in dim 1, as a segmentation model does)")
    raise _error(
        f"PREDICTIONS of shape {preds.shape} hold a score vector per position, so {labels_file} must have"
        f" the positions' shape: {shapes}; got shape {labels.shape}"
    )


def _ignore_hint(bad: np.ndarray, ignore_index: int | None) -> str:
    """The option to name when every out-of-range label is one negative integer (-100, a
    padding or void label): nothing once ``--ignore-index`` is given, or for other values."""
    values = np.unique(bad)
    if ignore_index is not None or values.size != 1 or not values[0] < 0 or not float(values[0]).is_integer():
        return ""
    v = int(values[0])
    return f"; if {v} marks samples to leave out, pass --ignore-index {v}"


def _label_indices(labels: np.ndarray, n: int, c: int, labels_file: str) -> np.ndarray:
    """LABELS as a 1-D array of integer values (not yet range-checked): (N, 1) and (1, N)
    flattened, booleans as 0/1, one-hot rows (N, C) as their argmax."""
    if labels.ndim == 2 and 1 in labels.shape:
        labels = labels.reshape(-1)
    if labels.dtype.kind == "b":
        labels = labels.astype(np.int64)
    if labels.ndim == 2 and labels.dtype.kind in "iuf" and labels.shape == (n, c):
        ones = (labels == 1).sum(1)
        if ((labels == 0) | (labels == 1)).all() and (ones == 1).all():  # one-hot
            return np.asarray(labels.argmax(1))
        if ((labels == 0) | (labels == 1)).all():
            row = int(np.flatnonzero(ones != 1)[0])
            raise _error(
                f"LABELS must be a 1-D array of class indices, got shape {labels.shape} with"
                f" {int(ones[row])} ones in row {row} (multi-label): calibrate takes one class per"
                " sample; for multi-label predictions use crossent.calibration.multilabel_ece"
            )
    if labels.ndim != 1:
        raise _error(
            f"LABELS must be a 1-D array of class indices, got shape {labels.shape}; pass"
            f" {n} class indices (or one-hot rows of {c} columns)"
        )
    if labels.dtype.kind not in "iuf":
        names = " (class names?)" if labels.dtype.kind in "USO" else ""
        raise _error(
            f"LABELS ({labels_file}) must hold integer class indices, got dtype"
            f" {labels.dtype}{names}: map them to 0..{c - 1} in the column order of PREDICTIONS"
        )
    i = first_non_integer(labels)
    if i is not None:
        raise _error(
            f"LABELS ({labels_file}) must hold integer class indices; entry {i} is"
            f" {labels[i].item()!r} (non-integer or NaN)"
        )
    return labels


#: --kind probs (or auto) renormalises rows in [0, 1] whose sums are off 1 by at most this
#: (probabilities written with few decimals); rows further off are refused
RENORM_ATOL = 0.05


def read_kind(
    preds: np.ndarray, kind: str
) -> tuple[Literal["logits", "probs"], np.ndarray, str | None]:
    """What PREDICTIONS hold (``kind``: ``auto``, ``logits`` or ``probs``, asked for or hinted
    by the array's name), the (N, C) predictions to use, and the warning when they were
    renormalised. (N,) binary scores of class 1 are probabilities when all lie in [0, 1] (for
    ``auto``), the columns ``1 - p, p``; logits ``s`` are the columns ``0, s``. (N, C) rows
    in [0, 1] summing to 1 within :data:`RENORM_ATOL` (but not within the metrics' 1e-3) are
    rounded probabilities, renormalised with a warning; other rows in [0, 1] are refused
    unless ``kind`` is ``logits`` (as logits they would be read silently as log-probabilities
    of nearly uniform predictions)."""
    from crossent.calibration._inputs import RANGE_ATOL, looks_like_probs

    if preds.ndim == 1:
        outside = (preds < 0) | (preds > 1)
        if kind == "auto":
            kind = "logits" if outside.any() else "probs"
        if kind == "logits":
            return "logits", np.stack([np.zeros_like(preds), preds], axis=1), None
        if outside.any():
            i = int(np.flatnonzero(outside)[0])
            raise _error(f"PREDICTIONS are not probabilities: entry {i} is {preds[i]:.4g}, outside"
                         " [0, 1]; pass --kind logits if they are logits")
        return "probs", np.stack([1 - preds, preds], axis=1), None
    if kind == "logits":
        return "logits", preds, None
    if looks_like_probs(preds, "PREDICTIONS"):
        return "probs", preds, None
    bad_rows = ((preds < -RANGE_ATOL) | (preds > 1 + RANGE_ATOL)).any(axis=1)
    if bad_rows.any():
        if kind == "auto":
            return "logits", preds, None
        raise _error(f"PREDICTIONS are not probabilities: row {int(np.flatnonzero(bad_rows)[0])} has"
                     " values outside [0, 1]; pass --kind logits if they are logits")
    sums = preds.sum(axis=1, dtype=np.float64)
    worst = int(np.argmax(np.abs(sums - 1)))
    if abs(sums[worst] - 1) > RENORM_ATOL:
        raise _error(
            f"PREDICTIONS are not probabilities of one class per sample: every value lies in"
            f" [0, 1] but row {worst} sums to {sums[worst]:.4g}, not 1 (independent sigmoid"
            " outputs are not supported); pass --kind logits if they are logits"
        )
    q = np.clip(preds.astype(np.float64), 0.0, 1.0) / sums[:, None]
    fix = "; pass --kind logits if they are logits" if kind == "auto" else ""
    return "probs", q, (f"the rows of PREDICTIONS sum to {sums.min():.4g}..{sums.max():.4g}, not 1"
                        f" (rounded probabilities?): read as probabilities and renormalised{fix}")


def rounding_step(preds: np.ndarray) -> float | None:
    """The step :math:`10^{-d}`, d = 1..9, of which every entry of ``preds`` is a multiple: the
    predictions were written with d decimals. None if there is none, and for integers (hard 0/1
    predictions). An entry passes within a hundredth of a step plus twice its dtype's rounding
    error (float32 keeps about 7 digits: d <= 6 there); a full-precision value passes with
    probability below 1/2, so a sample of 4,096 entries is tried first."""
    x = np.asarray(preds)
    eps = float(np.finfo(x.dtype).eps) if x.dtype.kind == "f" else 0.0
    x = x.astype(np.float64, copy=False).ravel()
    for d in range(10):
        scale = 10.0**d
        if 2 * eps * scale > 0.25:  # the dtype's rounding error would pass any value
            break
        if all(bool(np.all(np.abs(v * scale - np.rint(v * scale)) <= 0.01 + 2 * eps * scale * np.abs(v)))
               for v in (x[:4096], x)):
            return 1.0 / scale if d else None  # integers: hard 0/1 predictions, not rounded ones
    return None


def stratified_split(
    labels: np.ndarray, val_fraction: float, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """Indices (validation, test): ``round(val_fraction * N)`` random samples go to validation,
    the rest to test, stratified: every class ``c`` gives ``floor(val_fraction * n_c)`` of
    them, and the classes of the largest remainders one more each (ties in random order), as
    scikit-learn's stratified splits do; deterministic given ``seed``. Rounding each class on
    its own would give a vocabulary's classes of one or two samples none (2 of 2,000 samples
    to fit, where the fraction asks for 400)."""
    rng = np.random.default_rng(seed)
    perm = rng.permutation(labels.shape[0])
    grouped = perm[np.argsort(labels[perm], kind="stable")]
    _, starts, counts = np.unique(labels[grouped], return_index=True, return_counts=True)
    rank = np.arange(grouped.shape[0]) - np.repeat(starts, counts)
    share = val_fraction * counts
    n_val = np.floor(share).astype(np.int64)
    extra = int(np.floor(val_fraction * labels.shape[0] + 0.5)) - int(n_val.sum())
    if extra > 0:
        remainder = share - n_val
        order = np.lexsort((rng.random(counts.shape[0]), -remainder))  # largest first, ties random
        n_val[order[:extra]] += 1
    n_val = np.minimum(n_val, counts)
    in_val = rank < np.repeat(n_val, counts)
    return np.sort(grouped[in_val]), np.sort(grouped[~in_val])


def _empty_split_message(labels: np.ndarray, val_fraction: float, val_empty: bool) -> str:
    """Why :func:`stratified_split` left a part empty, and the --val-fraction that does not:
    validation holds round(fraction x N) samples."""
    n = labels.shape[0]
    part = "validation" if val_empty else "test"
    head = (f"the split of {n} samples with --val-fraction {val_fraction} leaves the {part}"
            " part empty (validation holds round(fraction x N) samples)")
    if val_empty:
        return f"{head}; pass --val-fraction {0.5 / n + 1e-3:.3g} or more, or give more samples"
    return f"{head}; pass --val-fraction {1 - 0.5 / n - 1e-3:.3g} or less, or give more samples"


# --------------------------------------------------------------------------- metrics
METRICS: tuple[tuple[str, str, bool], ...] = (
    # key, label, shown as percent
    ("accuracy", "accuracy", True),
    ("nll", "NLL", False),
    ("brier", "Brier (0-2)", False),
    ("ece", "ECE", True),
    ("adaece", "AdaECE", True),
    ("classwise_ece", "classwise ECE", True),
    ("mce", "MCE", True),
    ("smooth_ece", "smooth ECE", True),
)


def compute_metrics(
    values: np.ndarray, labels: np.ndarray, *, from_logits: bool, n_bins: int
) -> dict[str, float]:
    """The table's metrics for one set of predictions."""
    from crossent.calibration.metrics import (
        brier,
        classwise_ece,
        nll,
        smooth_ece_from_scores,
        table_from_scores,
        top_scores,
    )

    conf, correct = top_scores(values, labels, from_logits)
    width = table_from_scores(conf, correct, n_bins=n_bins, binning="width")
    mass = table_from_scores(conf, correct, n_bins=n_bins, binning="mass")
    return {
        "accuracy": float(correct.mean()),
        "nll": nll(values, labels, from_logits=from_logits),
        "brier": brier(values, labels, from_logits=from_logits),
        "ece": width.calibration_error("l1"),
        "adaece": mass.calibration_error("l1"),
        "classwise_ece": classwise_ece(values, labels, n_bins=n_bins, from_logits=from_logits),
        "mce": width.calibration_error("max"),
        "smooth_ece": smooth_ece_from_scores(conf, correct)[0],
    }


def _fmt(value: float, percent: bool) -> str:
    if percent:
        return f"{100 * value:.2f}%"
    # an NLL of logits near 1e30 has 30 digits before the point: as 6.632e+29 it fits a cell
    return f"{value:.4g}" if math.isfinite(value) and abs(value) >= 1e6 else f"{value:.4f}"


def describe(cal: Any) -> str:
    """One line: the fitted parameters of a recalibrator, and its fallback."""
    from crossent.calibration import (
        BetaCalibrator,
        EnsembleTemperatureScaler,
        HistogramBinning,
        MatrixScaler,
        PlattScaler,
        TemperatureScaler,
    )

    if isinstance(cal, TemperatureScaler):
        t = cal.temperature
        text = (
            f"T = {t:.4f}" if not isinstance(t, np.ndarray)
            else f"T_k in [{t.min():.3f}, {t.max():.3f}] (geometric mean {math.exp(np.log(t).mean()):.4f})"
        )
    elif isinstance(cal, EnsembleTemperatureScaler):
        w = cal.weights if cal.weights is not None else np.zeros(3)
        text = f"T = {cal.temperature:.4f}, weights {w[0]:.3f}/{w[1]:.3f}/{w[2]:.3f}"
    elif isinstance(cal, MatrixScaler):
        size = 0 if cal.weight is None or cal.bias is None else cal.weight.size + cal.bias.size
        text = f"{cal.name} scaling, {size} parameters"
    elif isinstance(cal, (PlattScaler, BetaCalibrator)):
        text = "coef " + ", ".join(f"{c:.4f}" for c in (cal.coef if cal.coef is not None else []))
    elif isinstance(cal, HistogramBinning):
        text = f"{cal.n_bins} bins per class"
    elif cal.name == "isotonic":
        text = "one isotonic map per class"
    else:
        text = cal.name
    if cal.fallback is not None:
        text = f"identity (fell back: {cal.fallback})"
    return text


def fit_note(cal: Any, n_classes: int, labels: np.ndarray) -> str | None:
    """What the guard found in a fit that was kept (``fallback`` is ``None``), in words;
    ``None`` when it found nothing. Histogram binning and isotonic regression keep the
    identity (``identity_classes``) for the classes with no sample in the fit part (whose
    ``labels`` are given) and for those whose one-vs-rest problem the fit part separates
    (their maps would be 0 or 1), which only a Python warning named."""
    from crossent.calibration._base import absent_how

    if cal.fallback is not None:
        return None
    identity = np.asarray(getattr(cal, "identity_classes", None) or [], dtype=np.int64)
    if identity.size:
        absent = np.setdiff1d(identity, labels)
        separated = np.setdiff1d(identity, absent)
        parts = []
        if absent.size:
            parts.append(f"{absent_how(absent, n_classes)} no sample in the fit part")
        if separated.size:
            how = absent_how(separated, n_classes).rsplit(" ", 1)[0]  # without "has"/"have"
            verb = "is" if separated.size == 1 else "are"
            parts.append(f"{how} {verb} separated from the others in it (a map of 0s and 1s)")
        return f"{'; '.join(parts)}: left uncalibrated (identity)"
    return None if cal.diagnostic is None else f"{cal.diagnostic} (the fit is kept)"


def short_note(cal: Any) -> str:
    """The comparison table's note: the fallback, or the identity classes, in a few words."""
    if cal.fallback is not None:
        return "fell back to the identity"
    identity = getattr(cal, "identity_classes", None)
    if identity:
        listed = ", ".join(str(k) for k in identity[:4]) + (", ..." if len(identity) > 4 else "")
        which = "class" if len(identity) == 1 else "classes"
        return f"identity for {which} {listed} (see note)"
    return "" if cal.diagnostic is None else "see note"


#: below this many samples in the fit part, :func:`small_fit_warning` speaks
MIN_FIT_SAMPLES = 100


def small_fit_warning(n_fit: int, n: int, val_fraction: float) -> str | None:
    """The warning when the part the method is fitted on holds fewer than
    :data:`MIN_FIT_SAMPLES` samples: fits on so few, and the comparison of methods with many
    parameters fitted on them, are noisy."""
    if n_fit >= MIN_FIT_SAMPLES:
        return None
    if val_fraction == 0:
        return f"the fit uses only {n_fit} samples; fits on so few are noisy"
    fix = "give more samples" if val_fraction >= 0.5 else "raise --val-fraction or give more samples"
    return (f"the fit part holds only {n_fit} samples (--val-fraction {val_fraction:g} of {n});"
            f" fits on so few, and the comparison of methods, are noisy: {fix}")


def command_advice(message: str) -> str:
    """A library warning as the command prints it. Its fixes that are options of the Python
    classes (``max_iter``, ``fallback_to_identity``, ``t_min`` and ``t_max``), which the command
    fits with their defaults, say so: a user of the command would look for a ``--max-iter``
    that is not there."""
    message = message.replace(" (crossent calibrate does)", "")
    # "(VectorScaler(t_max=1000), or more)": a bound of the Python class
    message = re.sub(r"\((\w+)\((t_m(?:in|ax))=([^)]*)\), or (more|less)",
                     r"(the Python class's \2=\3, or \4", message)
    message = message.replace("pass fallback_to_identity=False to keep the fit",
                              "the Python class keeps the fit with fallback_to_identity=False")
    return re.sub(r"raise max_iter(?: \(e\.g\. (max_iter=\d+)\))?",
                  lambda m: f"the Python class's {m.group(1) or 'max_iter'} allows more steps", message)


def fit_method(
    name: str, logits: np.ndarray, labels: np.ndarray, objective: str, n_bins: int = 15
) -> tuple[Any, list[str]]:
    """Fit one method; returns it and the messages of the warnings it gave, worded for the
    command (:func:`command_advice`). Temperature scaling by the ECE objective minimises the
    ECE of ``n_bins`` width bins, the ECE reported."""
    from crossent.calibration import _base

    cls = _base.REGISTRY[name]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", _base.CalibrationWarning)
        if name == "temperature":
            cal = cls().fit(logits, labels, objective=objective, n_bins=n_bins)  # type: ignore[call-arg]
        elif name in BINARY_METHODS:
            cal = cls(from_logits=True).fit(logits[:, 1] - logits[:, 0], labels)  # type: ignore[call-arg]
        else:
            cal = cls().fit(logits, labels)  # type: ignore[attr-defined]
    return cal, [command_advice(str(w.message)) for w in caught
                 if issubclass(w.category, _base.CalibrationWarning)]


def method_probs(cal: Any, logits: np.ndarray) -> np.ndarray:
    """(N, C) calibrated probabilities of a fitted method."""
    if cal.name in BINARY_METHODS:
        p = np.asarray(cal.predict_proba(logits[:, 1] - logits[:, 0]), dtype=np.float64)
        return np.stack([1.0 - p, p], axis=1)
    return np.asarray(cal.predict_proba(logits), dtype=np.float64)


def method_logits(cal: Any, logits: np.ndarray) -> np.ndarray:
    """(N, C) calibrated logits of a fitted method (their softmax is :func:`method_probs`).
    The tables score these, as they score the uncalibrated logits: an NLL from probabilities
    clips each p_y at the smallest float64 (about 708 nats), one from logits does not, so an
    identity map scored from its probabilities would seem to lower a very large NLL. A fit
    that fell back is the identity: the logits themselves."""
    if cal.fallback is not None:
        return np.asarray(logits, dtype=np.float64)
    if cal.name in BINARY_METHODS:  # softmax([0, s]) = [1 - sigmoid(s), sigmoid(s)]
        s = np.asarray(cal.transform_logits(logits[:, 1] - logits[:, 0]), dtype=np.float64)
        return np.stack([np.zeros_like(s), s], axis=1)
    return np.asarray(cal.transform_logits(logits), dtype=np.float64)


def _print_table(result: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(
        title=f"calibration on {result['n_test']} {scored_on(result)} samples",
        # a fallback's reason is printed in full under the table
        caption=(f"{result['method']}: "
                 f"{'fell back to the identity' if result['fallback'] else result['fitted']},"
                 f" fitted on {result['n_val']} samples"),
        title_justify="left",
        caption_justify="left",
    )
    table.add_column("metric")
    table.add_column("before", justify="right")
    table.add_column("after", justify="right")
    table.add_column("change", justify="right")
    for key, label, percent in METRICS:
        b, a = result["before"][key], result["after"][key]
        delta = a - b
        sign = "+" if delta >= 0 else "-"
        change = f"{sign}{100 * abs(delta):.2f} pt" if percent else f"{sign}{_fmt(abs(delta), False)}"
        table.add_row(label, _fmt(b, percent), _fmt(a, percent), change)
    Console(file=sys.stdout).print(table)


COMPARE_COLUMNS = (("nll", "NLL", False), ("ece", "ECE", True), ("brier", "Brier", False),
                   ("accuracy", "accuracy", True))


def _print_comparison(result: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    cmp = result["comparison"]
    table = Table(
        title=(f"every method, fitted on {result['n_val']} samples, scored on {result['n_test']}"
               f" {scored_on(result)} samples (ranked by {result['objective'].upper()})"),
        title_justify="left",
    )
    # the method names and the figures are never cut or wrapped; the note wraps instead
    table.add_column("method", no_wrap=True, min_width=max(len(name) for name in cmp["rows"]) + 2)
    for _, label, _ in COMPARE_COLUMNS:
        table.add_column(label, justify="right", no_wrap=True, min_width=len(label))
    table.add_column("note", overflow="fold")
    for name, row in cmp["rows"].items():
        if "skipped" in row:
            table.add_row(name, *[""] * len(COMPARE_COLUMNS), f"skipped: {row['skipped']}")
            continue
        note = row.get("short_note", "")
        mark = " *" if name == cmp["recommended"] else ""
        table.add_row(f"{name}{mark}", *[_fmt(row[k], pct) for k, _, pct in COMPARE_COLUMNS], note)
    console = Console(file=sys.stdout)
    console.print(table)
    for name, row in cmp["rows"].items():  # what the table's note column only points at
        if row.get("fallback"):
            console.print(f"{name}: fell back to the identity: {row['fallback']}", markup=False,
                          highlight=False)
        if row.get("note"):
            console.print(f"{name}: note: {row['note']}", markup=False, highlight=False)
        for message in row.get("warnings", []):
            console.print(f"{name}: warning: {message}", markup=False, highlight=False)
    console.print(recommendation_text(result))


def scored_on(result: dict[str, Any]) -> str:
    """How the samples the metrics are taken on relate to the fit: "held-out", or "in-sample"
    with --val-fraction 0 (the fit and the metrics on the same samples)."""
    return "in-sample" if result["val_fraction"] == 0 else "held-out"


def recommendation_text(result: dict[str, Any]) -> str:
    """The lines under the comparison: the recommended method with the numbers; none with
    --val-fraction 0, where every method is scored on the samples it was fitted on and the ones
    with the most parameters would win. The methods that scored better but gave held-out labels
    probability 0 are named as not recommended; the method that scored lowest, where the
    recommended one is simpler and within one standard error of it, is named with the numbers;
    ranked by ECE, a recommendation that makes the held-out NLL worse is warned of (ECE sees
    only the top label's confidence, not how the probability of the true label fares)."""
    cmp = result["comparison"]
    best = cmp["recommended"]
    key = result["objective"]
    if best is None:
        return (f"no recommendation: with --val-fraction 0 every method is scored on the samples it"
                f" was fitted on, where the most parameters fit best; a held-out split (the default"
                f" --val-fraction {VAL_FRACTION_DEFAULT}) compares them")
    row, none = cmp["rows"][best], cmp["rows"]["none"]
    percent = key == "ece"
    lines = [f"recommended: none (no recalibration: held-out {key.upper()} {_fmt(none[key], percent)})"
             if best == "none" else
             f"recommended: {best} (held-out {key.upper()} {_fmt(row[key], percent)} against"
             f" {_fmt(none[key], percent)} without recalibration)"]
    lowest = cmp.get("lowest", best)
    if lowest != best:
        low = cmp["rows"][lowest]
        simpler = "no recalibration" if best == "none" else "the simpler map"
        se = cmp["standard_errors"][best]
        error = (f"by less than one standard error of the difference ({_fmt(se, percent)})"
                 if math.isfinite(se) else "on one held-out sample, which gives no standard error")
        lines.append(f"{lowest} scored lower ({_fmt(low[key], percent)}), but {error}, with"
                     f" {low['parameters']} fitted parameters against {row['parameters']}: {simpler} is"
                     " recommended")
    excluded = cmp.get("excluded", [])
    if excluded:
        lines.append(f"not recommended: {', '.join(excluded)} (lower held-out {key.upper()}, but p = 0 for"
                     " some held-out labels)")
    if key == "ece" and row["nll"] > none["nll"] and _fmt(row["nll"], False) != _fmt(none["nll"], False):
        lines.append(f"warning: {best} makes the held-out NLL worse ({_fmt(none['nll'], False)} ->"
                     f" {_fmt(row['nll'], False)}); --objective nll ranks by it")
    return "\n".join(lines)


def held_out_warning(result: dict[str, Any], *, compare: bool) -> str | None:
    """The warning when the fitted method makes the held-out ``objective`` (NLL or ECE) worse
    than the predictions as they are; ``None`` otherwise. The fit's own guard sees only the
    fit part, on which a fitted temperature is never worse than T = 1; a small fit part can
    still give a T that hurts on new data, and the user is told, with the numbers."""
    key = result["objective"]
    before, after = result["before"][key], result["after"][key]
    percent = key == "ece"
    if not after > before or _fmt(after, percent) == _fmt(before, percent):  # worse where it shows
        return None
    advice = ("compare the methods below" if compare
              else "keep the predictions as they are, or compare the methods (without --no-compare)")
    return (
        f"{result['method']} made the {scored_on(result)} {key.upper()} worse ({_fmt(before, percent)} ->"
        f" {_fmt(after, percent)} on {result['n_test']} samples, fitted on {result['n_val']});"
        f" {advice}"
    )


def zero_labels_note(zeros: int, part: str) -> str:
    """The note on the ``zeros`` labels of the scored ``part`` ("held-out", "in-sample") that a
    method gives probability 0; empty for none."""
    return f"p = 0 for {zeros} {part} label{'s' if zeros > 1 else ''}" if zeros else ""


def compare_methods(
    logits: np.ndarray, labels: np.ndarray, val_idx: np.ndarray, test_idx: np.ndarray,
    *, objective: str, n_bins: int, before: dict[str, float] | None = None, in_sample: bool = False,
    seed: int = 0,
) -> dict[str, Any]:
    """Fit every applicable method on ``val_idx`` and score it on ``test_idx``. The rows are
    ranked by the held-out ``objective`` (NLL or ECE), the skipped methods last. Of the methods
    that give no held-out label probability 0, the one with the lowest score is ``lowest``; the
    ones with zeros that scored better are listed as ``excluded``. The recommendation follows the
    one-standard-error rule (Hastie, Tibshirani and Friedman, *The Elements of Statistical
    Learning*, 2nd ed., 7.10): of ``lowest`` and the methods (with "none", the uncalibrated
    predictions) that score above it by at most one standard error of the difference
    (:func:`difference_errors`; the bootstrap of the ECE draws with ``seed``), the one with the
    fewest fitted parameters (:func:`n_parameters`; "none" has 0), so that a difference the
    held-out part cannot tell from noise does not buy parameters. ``standard_errors`` holds
    those errors for ``lowest`` and the methods with fewer parameters than it, the only ones
    that can be recommended over it. No method is recommended where
    ``in_sample``, the methods scored on the samples they were fitted on, as with
    --val-fraction 0. ``before``, the metrics of the predictions as given, is the "none" row
    where given (the same numbers as the table above it; probabilities whose rows sum to 1
    within the tolerance would give slightly other ones through their logarithms)."""
    import importlib.util

    c = logits.shape[1]
    y_test = labels[test_idx]
    keys = ("nll", "ece", "brier", "accuracy")
    # the per-row scores are kept for the standard errors of the differences (a method that
    # fell back is "none"'s)
    none, none_rows = held_out_scores(logits[test_idx], y_test, n_bins)
    none = none if before is None else {k: before[k] for k in keys}
    rows: dict[str, dict[str, Any]] = {"none": {**none, "fallback": None, "parameters": 0}}
    per_row = {"none": none_rows}
    masked = bool(np.isneginf(logits).any())  # one read, for the two methods that refuse -inf
    for name in METHODS:
        if name in BINARY_METHODS and c != 2:
            rows[name] = {"skipped": "binary only"}
            continue
        if name in ("matrix", "dirichlet") and masked:
            rows[name] = {"skipped": "masked logits (-inf)"}
            continue
        if name in ("matrix", "dirichlet") and c > MAX_MATRIX_CLASSES:
            rows[name] = {"skipped": f"{c} x {c} parameters"}
            continue
        if name == "isotonic" and importlib.util.find_spec("sklearn") is None:
            rows[name] = {"skipped": "needs scikit-learn (pip install 'crossent[run]')"}
            continue
        cal, messages = fit_method(name, logits[val_idx], labels[val_idx], objective, n_bins)
        # the guard's own warning is in the note already; the others (too few samples for the
        # parameters, an optimiser stopped early) are printed under the table
        others = [m for m in messages if cal.diagnostic is None or cal.diagnostic not in m]
        # a held-out label the map gives probability 0 costs at least 708 nats of NLL alone (a
        # map that fell back is the predictions as given, whose own zeros no row counts)
        zeros = 0
        if cal.fallback is None:
            p_y = method_probs(cal, logits[test_idx])[np.arange(y_test.shape[0]), y_test]
            zeros = int(np.count_nonzero(p_y == 0))
        zero_note = zero_labels_note(zeros, "in-sample" if in_sample else "held-out")
        note = short_note(cal) or ("warned: see below" if others else "")
        if cal.fallback is None:
            scores, per_row[name] = held_out_scores(method_logits(cal, logits[test_idx]), y_test, n_bins)
        else:
            scores = none
        rows[name] = {**scores, "fallback": cal.fallback, "parameters": n_parameters(cal),
                      "fitted": describe(cal), "note": fit_note(cal, c, labels[val_idx]),
                      "short_note": "; ".join(n for n in (note, zero_note) if n),
                      "warnings": others, "zero_probability_labels": zeros}
    def rank(k: str) -> tuple[float, bool]:  # a tie goes to "none", then to the order of METHODS
        return rows[k][objective], k != "none"

    scored = sorted((k for k, r in rows.items() if "skipped" not in r), key=rank)
    # A map that gives held-out labels probability 0 will give new ones 0 too, each an NLL of
    # 708 nats or more, which a low ECE hides: it is never recommended.
    eligible = [k for k in scored if not rows[k].get("zero_probability_labels")]
    lowest = None if in_sample else eligible[0]
    excluded = [] if lowest is None else [k for k in scored if k not in eligible and rank(k) < rank(lowest)]
    best, errors = lowest, {}
    if lowest is not None and lowest != "none":
        # "none" and the maps fitted (one that fell back is the predictions as given: "none")
        # with fewer parameters than the lowest: only they can be recommended over it
        simpler = [k for k in eligible if k in per_row
                   and (k == lowest or rows[k]["parameters"] < rows[lowest]["parameters"])]
        errors = difference_errors(per_row, simpler, lowest, objective, n_bins, seed)
        best = simplest_within_error({k: rows[k] for k in simpler}, lowest, errors, objective)
    order = [*scored, *(k for k in rows if k not in scored)]  # the skipped methods last
    return {"rows": {k: rows[k] for k in order}, "recommended": best, "lowest": lowest,
            "standard_errors": errors, "excluded": excluded}


def simplest_within_error(
    rows: dict[str, dict[str, Any]], lowest: str, errors: dict[str, float], objective: str
) -> str:
    """The one-standard-error rule: of the ``rows`` (a method's held-out ``objective`` and its
    ``parameters``) whose score exceeds ``lowest``'s by at most ``errors`` (the standard error
    of their difference), the one with the fewest parameters; of those with as few, the lower
    score, then the first. ``lowest`` itself always qualifies."""
    top = rows[lowest][objective]
    close = [k for k, row in rows.items() if k == lowest or row[objective] - top <= errors[k]]
    return min(close, key=lambda k: (rows[k]["parameters"], rows[k][objective]))


def n_parameters(cal: Any) -> int:
    """The number of parameters a fitted recalibrator learnt from its fit part (0 for one that
    fell back to the identity): the comparison's measure of how simple a map is. Temperature
    scaling 1 (C with one per class); the ensemble's T and its three weights, which sum to one,
    3; vector scaling 2C; matrix and Dirichlet scaling C (C + 1); Platt 2 and beta 3; histogram
    binning a value per bin and isotonic regression one per step of its map, for each class it
    calibrates (not those it leaves as the identity)."""
    if cal.fallback is not None:
        return 0
    if cal.name == "ensemble_temperature":
        return 3
    if cal.name == "histogram":
        values = cal.bin_values
        return 0 if values is None else (values.shape[0] - len(cal.identity_classes)) * values.shape[1]
    if cal.name == "isotonic":
        skip = set(cal.identity_classes)
        return sum(y.size for k, (_, y) in enumerate(cal.knots or []) if k not in skip)
    if cal.name in BINARY_METHODS:
        return 0 if cal.coef is None else int(cal.coef.size)
    if cal.name in ("matrix", "dirichlet"):
        return int(cal.weight.size + cal.bias.size)
    bias = getattr(cal, "bias", None)  # temperature (and vector) scaling
    return int(np.size(cal.temperature) + (0 if bias is None else np.size(bias)))


class RowScores(NamedTuple):
    """Per-row scores of calibrated logits on the held-out part: the NLL, and the top-label
    confidence and its correctness from which the width-bin ECE is taken."""

    nll: np.ndarray
    conf: np.ndarray
    correct: np.ndarray


def held_out_scores(z: np.ndarray, y: np.ndarray, n_bins: int) -> tuple[dict[str, float], RowScores]:
    """The comparison's metrics of calibrated logits ``z`` (N, C) (see :func:`method_logits`)
    on labels ``y``, NLL, ECE of ``n_bins`` width bins, Brier score and accuracy, as
    :func:`~crossent.calibration.nll`, :func:`~crossent.calibration.ece` and
    :func:`~crossent.calibration.brier` give them, and their :class:`RowScores`: all from one
    pass of the calibration rows (its per-row values and its width-bin sums)."""
    import torch

    from crossent.calibration._rows import row_statistics
    from crossent.calibration.metrics import table_from_sums

    r = row_statistics(torch.from_numpy(np.ascontiguousarray(z)), torch.from_numpy(y), from_logits=True,
                       name="logits", n_bins=n_bins, classwise=False, top=True)
    assert r.nll is not None and r.brier is not None and r.top is not None
    n, m = y.shape[0], n_bins
    correct = (r.pred == y).astype(np.float64)
    scores = {
        "nll": float(r.nll.sum()) / n,
        "ece": table_from_sums(r.top[:m], r.top[m : 2 * m], r.top[2 * m : 3 * m]).calibration_error("l1"),
        "brier": float(r.brier.sum()) / n,
        "accuracy": float(correct.mean()),
    }
    return scores, RowScores(r.nll, r.conf, correct)


#: bootstrap resamples of the held-out part for the standard error of a difference of ECEs
BOOTSTRAP_RESAMPLES = 200


def difference_errors(
    per_row: dict[str, RowScores], names: list[str], lowest: str, objective: str, n_bins: int, seed: int
) -> dict[str, float]:
    r"""The standard error of each method's held-out ``objective`` minus that of ``lowest``,
    paired over the held-out rows (0 for ``lowest`` itself). The NLL is a mean over rows: the
    standard error of the mean of the per-row differences, :math:`\mathrm{sd}(d) / \sqrt n`.
    The ECE is not, so its differences are taken on :data:`BOOTSTRAP_RESAMPLES` resamples of
    the rows with replacement (the same ones for every method, drawn with ``seed``; a resample
    is a count per row, and the ECE of ``n_bins`` width bins with those counts as weights), and
    the standard error is their standard deviation."""
    from crossent.calibration._rows import width_bin_index

    base = per_row[lowest]
    n = base.nll.shape[0]
    others = [k for k in names if k != lowest]
    errors = {lowest: 0.0}
    if n < 2 or not others:
        return {**errors, **{k: math.inf for k in others}}
    if objective == "nll":
        for k in others:
            errors[k] = float(np.std(per_row[k].nll - base.nll, ddof=1) / math.sqrt(n))
        return errors
    parts = [lowest, *others]
    bins = {k: width_bin_index(per_row[k].conf, n_bins) for k in parts}
    gaps = {k: per_row[k].conf - per_row[k].correct for k in parts}
    rng = np.random.default_rng(seed)
    draws = {k: np.empty(BOOTSTRAP_RESAMPLES) for k in parts}
    for r in range(BOOTSTRAP_RESAMPLES):
        weight = np.bincount(rng.integers(0, n, n), minlength=n)
        for k in parts:
            draws[k][r] = np.abs(np.bincount(bins[k], weights=weight * gaps[k], minlength=n_bins)).sum() / n
    for k in others:
        errors[k] = float(np.std(draws[k] - draws[lowest], ddof=1))
    return errors


def _array_name(file: str, key: str | None) -> str:
    """An input array in the report: its file, and its name inside the file where it has one."""
    return f"`{file}`" + ("" if key is None else f", array `{key}`")


def _write_report(out: Path, result: dict[str, Any], *, figures: bool = True) -> None:
    lines = [
        "# Calibration report",
        "",
        f"- predictions: {_array_name(result['predictions'], result['key'])} ({result['kind']},"
        f" {result['n_samples']} samples, {result['n_classes']} classes)"
        + (f"; {result['n_ignored']} samples left out, their label {result['ignore_index']}"
           " (--ignore-index)" if result.get("n_ignored") else ""),
        f"- labels: {_array_name(result['labels'], result['labels_key'])}",
        f"- method: {result['method']}, {result['fitted']}",
        (f"- split: {result['n_val']} samples to fit, {result['n_test']} held-out samples"
         f" (metrics), val-fraction {result['val_fraction']}, seed {result['seed']}"
         if result["val_fraction"] > 0 else
         f"- split: none (val-fraction 0): the fit and the metrics on the same {result['n_val']}"
         " samples, so the 'after' numbers are optimistic"),
        f"- binned metrics use {result['n_bins']} bins; Brier is summed over classes"
        " (range 0-2); NLL in nats",
    ]
    if result["input_note"] is not None:
        lines.append(f"- {result['input_note']}")
    if result["note"] is not None:
        lines.append(f"- note: {result['note']}")
    for message in result["warnings"]:
        lines.append(f"- warning: {message}")
    lines += ["", "| metric | before | after |", "|---|---:|---:|"]
    for key, label, percent in METRICS:
        lines.append(
            f"| {label} | {_fmt(result['before'][key], percent)} |"
            f" {_fmt(result['after'][key], percent)} |"
        )
    if "comparison" in result:
        lines += ["", f"## Every method (ranked by {scored_on(result)} {result['objective'].upper()})", "",
                  "| method | " + " | ".join(label for _, label, _ in COMPARE_COLUMNS) + " | note |",
                  "|---|" + "---:|" * len(COMPARE_COLUMNS) + "---|"]
        for name, row in result["comparison"]["rows"].items():
            if "skipped" in row:
                lines.append(f"| {name} |" + " |" * len(COMPARE_COLUMNS) + f" skipped: {row['skipped']} |")
                continue
            cells = " | ".join(_fmt(row[k], pct) for k, _, pct in COMPARE_COLUMNS)
            note = f"fell back: {row['fallback']}" if row["fallback"] else row.get("fitted", "")
            if row.get("note"):
                note = f"{note}; {row['note']}"
            zeros = row.get("zero_probability_labels", 0)
            if zeros:
                note = f"{note}; {zero_labels_note(zeros, scored_on(result))} (an NLL of at least 708 each)"
            for message in row.get("warnings", []):
                note = f"{note}; warning: {message}"
            lines.append(f"| {name} | {cells} | {note} |")
        for line in recommendation_text(result).splitlines():
            lines += ["", line]
    if figures:
        lines += ["", "![reliability before and after](reliability_comparison.png)"]
    lines += [
        "",
        "Conventions: ECE/MCE use equal-width bins ((m-1)/M, m/M] (Guo et al. 2017), AdaECE"
        " equal-mass bins (Mukhoti et al. 2020), classwise ECE averages per-class marginal"
        " ECEs over all classes (Kull et al. 2019), smooth ECE is the kernel-smoothed ECE at"
        " its fixed-point bandwidth (Blasiok and Nakkiran 2023).",
        "",
    ]
    (out / "report.md").write_text("\n".join(lines))


def main(args: argparse.Namespace) -> int:
    """Run ``crossent calibrate``; returns the exit status."""
    from crossent.cli import check_out_dir

    if not (0.0 <= args.val_fraction < 1.0) or math.isnan(args.val_fraction):
        raise _error(f"--val-fraction must lie in [0, 1), got {args.val_fraction}")
    if args.n_bins < 1:
        raise _error(f"--n-bins must be >= 1, got {args.n_bins}")
    if args.n_bins > MAX_BINS:
        raise _error(f"--n-bins must be <= {MAX_BINS}, got {args.n_bins}")
    if not 0 <= args.seed <= MAX_SEED:
        raise _error(f"--seed must lie in 0..{MAX_SEED}, got {args.seed}")
    if args.out is not None:
        check_out_dir(args.out)  # before any work: a file in the way fails now, not at the end
        if args.figures:  # as early: a missing extra names the option that does without it
            require("matplotlib", "the reliability diagrams of --out (--no-figures skips them)")
    preds, labels, hint, key, labels_key = _predictions_and_labels(args)
    mixed = mixed_runs_warning(key, labels_key)
    if mixed is not None:
        print(f"crossent calibrate: warning: {mixed}", file=sys.stderr)
    if args.csv_header != "auto":
        files = [args.predictions] if args.labels is None else [args.predictions, args.labels]
        if all(_format_of(Path(f), args.file_format) != "csv" for f in files):
            raise _error(f"--csv-header {args.csv_header} applies to .csv files and no input is one: drop it")
    labels_file = args.labels if args.labels is not None else args.predictions
    csv_input = _format_of(Path(args.predictions), args.file_format) == "csv"
    # samples given: rows, or positions of per-position scores, whose labels _check requires to
    # have one entry each (a 0-d array is refused by _check, by its shape)
    n_given = np.asarray(labels).size if preds.ndim > 2 else len(preds) if preds.ndim else 0
    preds, labels = _check(preds, labels, labels_file, _csv_header_hint(args, preds, labels), csv_input,
                           args.ignore_index)
    binary_scores = preds.ndim == 1
    c = 2 if binary_scores else preds.shape[1]
    if args.method in ("matrix", "dirichlet") and np.isneginf(preds).any():
        raise _error(f"--method {args.method} cannot take masked logits (-inf in PREDICTIONS): its linear map"
                     " mixes every class's logit; --method temperature or vector can")
    if args.method in BINARY_METHODS and c != 2:
        raise _error(f"--method {args.method} is for two classes; PREDICTIONS has {c} columns")
    if args.objective == "ece" and args.method != "temperature":
        raise _error(f"--objective ece applies to --method temperature only, not {args.method}")

    kind_asked = args.kind if args.kind != "auto" else (hint or "auto")
    raw = preds  # as written: read_kind renormalises rounded rows
    kind, preds, renormalised = read_kind(preds, kind_asked)
    n = preds.shape[0]
    zero_note = None
    if kind == "probs":
        floor = np.finfo(preds.dtype).tiny
        zeros = int(np.count_nonzero(preds <= 0))  # exact zeros and round-off below them
        below = int(np.count_nonzero(preds < 0))
        below_note = f" ({below} of them below 0 by round-off)" if below else ""
        step = rounding_step(raw) if zeros else None
        if step is not None:
            # A probability written with d decimals and read back as 0 was below half a step:
            # as log(tiny) (about -708), one such entry outweighs every other logit of a
            # matrix or Dirichlet fit.
            floor = step / 2
            zero_note = (f"{zeros} entries of PREDICTIONS are 0{below_note} and every entry is a multiple of"
                         f" {step:g} (probabilities rounded to {round(-math.log10(step))} decimals?):"
                         f" the zeros are read as {floor:g}, the most that rounds to 0")
        elif zeros:
            zero_note = (f"{zeros} entries of PREDICTIONS are 0{below_note}: read as {floor:g}, the smallest"
                         f" normal {preds.dtype} (every NLL, the one before recalibration too)")
        logits = np.maximum(preds, floor, dtype=np.float64)  # the log in float64, as the methods compute
        np.log(logits, out=logits)
    else:
        logits = preds
    # the methods compute in their input's dtype: float64, so that float32 input loses no tiny
    # probability of the tables to 0
    logits = np.asarray(logits, dtype=np.float64)
    input_note = None if not binary_scores else (
        f"PREDICTIONS: {n} binary scores of class 1, read as {kind}"
        f" (the columns {'1 - p, p' if kind == 'probs' else '0, s'}; --kind to override); ECE,"
        " AdaECE, MCE and smooth ECE are those of the top label, max(p, 1 - p), and classwise ECE"
        " that of p itself, which cal.ece(p, labels) gives (up to scores on bin edges)"
    )

    if args.val_fraction == 0:
        print(
            "crossent calibrate: warning: --val-fraction 0 fits and evaluates on the same"
            " samples; the 'after' numbers are optimistic",
            file=sys.stderr,
        )
        val_idx = test_idx = np.arange(n)
    else:
        val_idx, test_idx = stratified_split(labels, args.val_fraction, args.seed)
        if val_idx.size == 0 or test_idx.size == 0:
            raise _error(_empty_split_message(labels, args.val_fraction, val_idx.size == 0))

    cal, messages = fit_method(args.method, logits[val_idx], labels[val_idx], args.objective, args.n_bins)
    small = small_fit_warning(int(val_idx.size), n, args.val_fraction)
    if small is not None:
        messages.insert(0, small)
    if renormalised is not None:
        messages.insert(0, renormalised)
    if zero_note is not None:
        messages.insert(0, zero_note)
    for message in messages:
        print(f"crossent calibrate: warning: {message}", file=sys.stderr)
    if mixed is not None:  # printed before the checks, which it may explain
        messages.insert(0, mixed)
    y_test = labels[test_idx]
    before = compute_metrics(  # with zeros read as a floor: the probabilities the methods see
        logits[test_idx] if zero_note is not None else preds[test_idx], y_test,
        from_logits=kind == "logits" or zero_note is not None, n_bins=args.n_bins
    )
    calibrated = method_probs(cal, logits[test_idx])
    # a map that fell back is the identity: the predictions as they are, the "before" column
    # (scored through log p, probability rows summing to 1 within the tolerance would move)
    after = before if cal.fallback is not None else compute_metrics(
        method_logits(cal, logits[test_idx]), y_test, from_logits=True, n_bins=args.n_bins
    )
    temperature = getattr(cal, "_temperature", None) if args.method in ("temperature", "vector") else None
    result: dict[str, Any] = {
        "predictions": str(args.predictions),
        "key": key,
        "labels": str(labels_file),
        "labels_key": labels_key,
        "kind": kind,
        "binary_scores": binary_scores,
        "input_note": input_note,
        "method": args.method,
        "objective": args.objective,
        "fitted": describe(cal),
        "fallback": cal.fallback,
        "note": fit_note(cal, c, labels[val_idx]),
        "identity_classes": list(getattr(cal, "identity_classes", [])),
        "warnings": messages,
        "state": cal.state_dict(),
        "temperature": temperature.tolist() if isinstance(temperature, np.ndarray) else temperature,
        "bias": None if getattr(cal, "bias", None) is None else np.asarray(cal.bias).tolist(),
        "n_samples": int(n),
        "ignore_index": args.ignore_index,
        "n_ignored": int(n_given - n),
        "n_classes": int(c),
        "n_val": int(val_idx.size),
        "n_test": int(test_idx.size),
        "val_fraction": args.val_fraction,
        "seed": args.seed,
        "n_bins": args.n_bins,
        "brier_range": "0-2 (squared error summed over classes)",
        "before": before,
        "after": after,
    }
    worse = held_out_warning(result, compare=not args.no_compare)
    if worse is not None:
        result["warnings"].append(worse)
    if input_note is not None:
        print(input_note)
    if n_given > n:
        print(f"left out {n_given - n} samples whose label is {args.ignore_index} (--ignore-index)")
    _print_table(result)
    if cal.fallback is not None:
        print(f"{args.method}: fell back to the identity map: {cal.fallback}")
    if result["note"] is not None:
        print(f"{args.method}: note: {result['note']}")
    if worse is not None:
        print(f"crossent calibrate: warning: {worse}", file=sys.stderr)
    if not args.no_compare:
        result["comparison"] = compare_methods(
            logits, labels, val_idx, test_idx, objective=args.objective, n_bins=args.n_bins,
            before=before, in_sample=args.val_fraction == 0, seed=args.seed,
        )
        # the lines under the comparison, warnings included, as printed and in report.md
        result["comparison"]["recommendation"] = recommendation_text(result).splitlines()
        _print_comparison(result)

    if args.out is not None:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "metrics.json").write_text(json.dumps(result, indent=2) + "\n")
        _write_report(out, result, figures=args.figures)
        if not args.figures:
            print(f"wrote report.md and metrics.json to {out}")
            return 0
        from crossent.calibration.plots import compare_reliability_diagrams, reliability_diagram

        test_before = preds[test_idx]
        from_logits = kind == "logits"
        fig = reliability_diagram(
            test_before, y_test, n_bins=args.n_bins, from_logits=from_logits, title="before"
        )
        fig.savefig(out / "reliability_before.png", dpi=110)
        fig = reliability_diagram(calibrated, y_test, n_bins=args.n_bins, title="after")
        fig.savefig(out / "reliability_after.png", dpi=110)
        before_probs = np.asarray(method_probs_identity(logits[test_idx]))
        label = f"after ({args.method}{'' if cal.fallback is None else ', fell back to identity'})"
        fig = compare_reliability_diagrams({"before": before_probs, label: calibrated}, y_test,
                                           n_bins=args.n_bins)
        fig.savefig(out / "reliability_comparison.png", dpi=110)
        print(f"wrote report.md, metrics.json and 3 reliability diagrams to {out}")
    return 0


def method_probs_identity(logits: np.ndarray) -> np.ndarray:
    """Softmax of the logits in float64: the predictions before recalibration."""
    from crossent.calibration._base import softmax_np

    return softmax_np(logits)
