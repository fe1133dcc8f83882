"""Input conversion and validation shared by the calibration toolkit (private).

Everything here works on CPU torch tensors that share memory with the caller's array where
possible, and walks over the rows in chunks of a few MiB so that a (10^6, 10^3) float32 matrix
never needs a second full-size copy. The per-chunk work is vectorised; the only Python loop
is over chunks of rows.
"""

from __future__ import annotations

import math
import sys
import warnings
from collections.abc import Iterator, Sequence
from typing import Literal, TypeAlias, TypeVar, cast, overload

import numpy as np
import torch

__all__ = [
    "ArrayLike",
    "OptionTypeError",
    "as_labels",
    "as_matrix",
    "check_bool",
    "check_choice",
    "check_ignore_index",
    "check_int",
    "check_real",
    "compute_dtype",
    "iter_chunks",
    "label_array",
    "looks_like_probs",
]

#: What the public functions accept: a NumPy array, a torch tensor (any device; it is moved
#: to the CPU) or a nested sequence of numbers.
ArrayLike: TypeAlias = "np.ndarray | torch.Tensor | Sequence[float] | Sequence[Sequence[float]]"

#: Entries of a probability matrix may leave [0, 1] by this much (float32 round-off).
RANGE_ATOL = 1e-5
#: Elements per chunk of rows (about 4 MiB of float32): fits in cache, bounds temporaries.
CHUNK_ELEMENTS = 1 << 20


def sum_atol(dtype: torch.dtype) -> float:
    """Tolerance on a probability row summing to one, by storage dtype."""
    return 1e-3 if dtype in (torch.float32, torch.float64) else 1e-2


def half_valued(block: torch.Tensor) -> bool:
    """Whether float32 or float64 scores hold only values of a half type: bfloat16 or float16
    (each value survives the round trip; for float32, bfloat16's test is that the low 16 bits
    are 0). Half-precision probabilities widened with ``.float()`` (NumPy has no bfloat16),
    ``.double()`` or ``.tolist()`` keep the rounding of their half type, rows off one by up to
    ~3e-3: they get that type's tolerance, not float32's or float64's."""
    if block.dtype not in (torch.float32, torch.float64) or block.numel() == 0:
        return False
    # by chunks of rows, each test stopping at the first chunk that fails it: the masks and
    # round trips are a chunk's, not copies of the whole input
    parts = [block[start:stop] for start, stop in iter_chunks(block)]
    if block.dtype == torch.float32:  # bfloat16's values by one integer test
        if all(bool(((p.contiguous().view(torch.int32) & 0xFFFF) == 0).all()) for p in parts):
            return True
        halves: tuple[torch.dtype, ...] = (torch.float16,)
    else:
        halves = (torch.bfloat16, torch.float16)
    return any(all(bool((p.to(h).to(p.dtype) == p).all()) for p in parts) for h in halves)


def row_sum_tolerance(block: torch.Tensor, storage: torch.dtype, rowsum: torch.Tensor) -> tuple[float, str]:
    """The tolerance on the row sums ``rowsum`` of probabilities ``block`` stored as
    ``storage`` (:func:`sum_atol`), and why where it is not the storage's: float32 rows off one
    by more, all of whose values are a half type's (:func:`half_valued`), get that type's, and
    so do float64 rows."""
    tol = sum_atol(storage)
    widened = storage in (torch.float32, torch.float64)
    if widened and bool(((rowsum - 1).abs() > tol).any()) and half_valued(block):
        return sum_atol(torch.bfloat16), ", that of half precision: every value is a bfloat16 or float16"
    return tol, ""


def compute_dtype(t: torch.Tensor) -> torch.dtype:
    """float64 for float64 input, float32 otherwise (half types are upcast per chunk)."""
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def check_real_scores(x: torch.Tensor | np.ndarray, name: str) -> None:
    """Raise TypeError unless the scores ``x`` hold real numbers (integers included): complex
    values, bools, strings and objects are refused, never cast."""
    if isinstance(x, torch.Tensor):
        if x.is_complex() or x.dtype == torch.bool:
            raise TypeError(f"{name} must hold real numbers, got a tensor of dtype {x.dtype}")
    elif x.dtype.kind not in "fiu":
        raise TypeError(
            f"{name} must be a numeric array or tensor, got dtype {x.dtype}"
            " (convert it with np.asarray(..., dtype=float))"
        )


def _dense(t: torch.Tensor, name: str) -> torch.Tensor:
    """``t`` (detached), refusing by ``name`` a sparse or other non-strided tensor, and a
    tensor on the meta device, which has a shape but no values to measure."""
    if t.layout != torch.strided:
        raise TypeError(f"{name} is a {str(t.layout).removeprefix('torch.')} tensor; pass {name}.to_dense()")
    if t.device.type == "meta":
        raise ValueError(f"{name} is a tensor on the meta device, which holds no values; pass one with data")
    return t.detach()


def _to_tensor(x: object, name: str) -> torch.Tensor:
    if isinstance(x, torch.Tensor):
        t = _dense(x, name)
        if t.device.type != "cpu":
            t = t.cpu()
        check_real_scores(t, name)
        if not t.is_floating_point():
            t = t.to(torch.float64)
        elif t.element_size() == 1:  # float8: few operations take it (isfinite, min); exact in float32
            t = t.float()
        return t
    if isinstance(x, (tuple, list)) and x and all(len(getattr(a, "shape", ())) >= 2 for a in x):
        # a model's outputs as a tuple, such as Hugging Face's EvalPrediction.predictions: no
        # input here is a stack of 2-D arrays
        raise ValueError(
            f"{name} is a {type(x).__name__} of {len(x)} arrays, the first of shape {tuple(x[0].shape)}:"
            " pass the scores array itself (a model's output tuple holds the logits first)"
        )
    try:
        arr = x if isinstance(x, np.ndarray) else np.asarray(x)
    except ValueError:  # ragged nested lists
        raise ValueError(
            f"{name} is ragged (its rows differ in length); give an array or tensor of shape (N, C), (N,)"
            " or (N, L)"
        ) from None
    check_real_scores(arr, name)
    # float16 stays float16 (its own row-sum tolerance, as for a float16 tensor)
    if arr.dtype.kind in "iu" or arr.dtype.itemsize > 8:
        arr = arr.astype(np.float64)
    if not arr.dtype.isnative:  # big-endian data (from a file, say): torch takes native order only
        arr = arr.astype(arr.dtype.newbyteorder("="))
    if any(s < 0 for s in arr.strides):  # np.flip and [::-1] views: torch takes no negative strides
        arr = arr.copy()  # not ascontiguousarray: NumPy calls a view with a size-1 axis contiguous
    with warnings.catch_warnings():
        # Read-only arrays (np.load with mmap, broadcast views) are fine: we never write.
        warnings.simplefilter("ignore", UserWarning)
        return torch.from_numpy(arr)


def as_matrix(
    x: object, name: str = "probs", *, metrics: bool = False, empty_ok: bool = False
) -> torch.Tensor:
    """``x`` as a CPU tensor of shape (n_samples, n_classes), sharing memory where possible.
    The errors say which other shapes are taken: a binary problem's (N,) scores by the
    metrics (``metrics``), its stacked [1 - p, p] by the recalibrators. No rows are refused
    unless ``empty_ok`` (a transform's batch may be empty; a fit or a metric needs rows)."""
    t = _to_tensor(x, name)
    binary = ("; for a binary problem pass two columns of logits, np.stack([-z, z], axis=1) / 2"
              " for a positive-class logit z or np.log(np.stack([1 - p, p], axis=1)) for probabilities p"
              " (PlattScaler and BetaCalibrator take the (N,) scores themselves)")
    if t.ndim != 2:
        # one label per position: a sequence model's (B, T, C) scores, or (N, C, H, W) ones
        # with PyTorch's class dim 1 (a segmentation model's)
        rows = (f"; for (B, T, ..., C) scores with one label per position pass"
                f" {name}.reshape(-1, {t.shape[-1]}) and labels.reshape(-1); for (N, C, d1, ...) scores"
                f" (class dim 1) move it last first: torch.movedim({name}, 1, -1) or"
                f" np.moveaxis({name}, 1, -1), then reshape(-1, {t.shape[1]})" if t.ndim > 2 else "")
        raise ValueError(
            f"{name} must be (N, C) with labels (N,), (N,) or (N, 1) scores of a binary problem,"
            f" or (N, L) scores of a multi-label one with 0/1 labels (N, L); got shape {tuple(t.shape)}"
            + rows
            if metrics else
            f"{name} must be 2-D (n_samples, n_classes), got shape {tuple(t.shape)}" + (rows or binary)
        )
    if t.shape[0] == 0 and not empty_ok:
        raise ValueError(f"{name} is empty: it needs at least one row (sample)")
    if t.shape[1] < 2:  # the metrics take an (N, 1) column as binary scores before this
        raise ValueError(f"{name} needs at least 2 columns (classes), got shape {tuple(t.shape)}"
                         + ("" if metrics else binary))
    return t


def first_non_integer(arr: np.ndarray) -> int | None:
    """The index of the first entry of a float array that is not a finite integer (NaN, inf,
    2.5), or None; integer arrays have none."""
    if arr.dtype.kind != "f":
        return None
    with np.errstate(invalid="ignore"):
        bad = ~np.isfinite(arr) | (arr != np.round(arr))
    return int(np.flatnonzero(bad)[0]) if bad.any() else None


def label_array(labels: object) -> np.ndarray:
    """``labels`` as a NumPy array (a view of a CPU tensor where possible), unvalidated.

    bfloat16 has no NumPy type: such a tensor (0/1 targets cast to the model's dtype) is
    widened to float32 first, which holds every bfloat16 value exactly."""
    if isinstance(labels, torch.Tensor):
        t = _dense(labels, "labels").cpu()
        return (t.float() if t.dtype == torch.bfloat16 else t).numpy()
    try:
        return np.asarray(labels)
    except ValueError:  # ragged nested lists
        raise ValueError(
            "labels are ragged (their rows differ in length); give an array or tensor of N class"
            " labels, or (N, L) 0/1 labels"
        ) from None


def shown_label(value: object) -> object:
    """A label value as the errors show it: a float that is an exact integer as that integer."""
    return int(value) if isinstance(value, float) and abs(value) < 2**53 else value


def as_labels(
    labels: object, n_samples: int, n_classes: int, name: str = "labels", rows: np.ndarray | None = None
) -> np.ndarray:
    """Integer class labels as int64 NumPy, checked against the predictions' shape. ``rows``:
    the input's number of each label, where ``ignore_index`` dropped some (for the errors)."""
    arr = label_array(labels)
    if arr.ndim == 2 and 1 in arr.shape:
        arr = arr.reshape(-1)
    if arr.ndim != 1:
        raise ValueError(f"{name} must be 1-D integer class indices, got shape {arr.shape}")
    if arr.dtype.kind == "b":  # True / False: classes 1 and 0, which only a binary problem has
        if n_classes != 2:
            raise TypeError(
                f"{name} hold booleans (classes 0 and 1) but the predictions have {n_classes} classes;"
                f" pass integer class indices in [0, {n_classes - 1}]"
            )
        arr = arr.astype(np.int64)
    if arr.dtype.kind not in "iuf":
        hint = ("map them to indices first, np.unique(labels, return_inverse=True)[1]"
                if arr.dtype.kind in "USO"
                else "convert them with labels.long() or np.asarray(labels, dtype=np.int64)")
        raise TypeError(f"{name} must hold integer class indices, got dtype {arr.dtype} ({hint})")
    i = first_non_integer(arr)
    if i is not None:
        raise ValueError(
            f"{name} must hold integer class indices, got non-integer values"
            f" (entry {position(i, rows)} is {arr[i].item()!r})"
        )
    if arr.shape[0] != n_samples:
        raise ValueError(
            f"{name} has {arr.shape[0]} entries but the predictions have {n_samples} rows;"
            " they must match one to one"
        )
    # check the range before the cast: 1e30 or a uint64 beyond int64 must not wrap around. Two
    # reductions (the ufuncs' own, without np.min's wrapper) find whether any entry is out; only
    # then is the first one looked for.
    if arr.size and (np.minimum.reduce(arr) < 0 or np.maximum.reduce(arr) >= n_classes):
        out_of_range = (arr < 0) | (arr >= n_classes)
        value = arr[int(np.flatnonzero(out_of_range)[0])].item()
        shown = shown_label(value)
        pad = ""
        if value < 0 and bool((arr[out_of_range] == value).all()):  # one negative value: padding?
            pad = (f"; if {shown} marks samples to leave out (padding), pass ignore_index={shown} to the"
                   f" metrics and CalibrationMeter, or drop those rows before a fit:"
                   f" logits[labels != {shown}], labels[labels != {shown}]")
        raise ValueError(
            f"{name} must lie in [0, {n_classes - 1}] for {n_classes} classes, found {shown}{pad}"
        )
    out = np.ascontiguousarray(arr, dtype=np.int64)
    # for torch.from_numpy, no negative strides (a size-1 view counts as contiguous to NumPy)
    return out.copy() if any(s < 0 for s in out.strides) else out


def iter_chunks(t: torch.Tensor) -> Iterator[tuple[int, int]]:
    """(start, stop) row ranges of about :data:`CHUNK_ELEMENTS` elements each."""
    n, c = t.shape
    step = max(1, CHUNK_ELEMENTS // max(c, 1))
    for start in range(0, n, step):
        yield start, min(n, start + step)


def _chunk(t: torch.Tensor, start: int, stop: int) -> torch.Tensor:
    block = t[start:stop]
    dtype = compute_dtype(t)
    return block if block.dtype == dtype else block.to(dtype)


def _first(mask: torch.Tensor) -> int:
    return int(torch.nonzero(mask)[0, 0])


def entry_name(i: int, rows: np.ndarray | None, shape: Sequence[int]) -> str:
    """Entry ``i`` of flattened binary or multi-label scores of ``shape`` (after
    ``ignore_index``: see :func:`position`) as the user indexes them: ``7`` of (N,) scores,
    ``(3, 2)`` (row, label) of (N, L) ones."""
    pos = position(i, rows)
    return f"({pos // shape[1]}, {pos % shape[1]})" if len(shape) == 2 and shape[1] > 1 else str(pos)


def position(i: int, rows: np.ndarray | None) -> int:
    """The input's number of row (or entry) ``i`` of what is left after ``ignore_index``
    dropped some (``rows``, from :func:`select`; None where nothing was dropped): errors name
    the row the user can find."""
    return i if rows is None else int(rows[i])


def check_chunk(
    block: torch.Tensor, start: int, *, from_logits: bool, name: str, storage: torch.dtype,
    rows: np.ndarray | None = None,
) -> None:
    """Raise ``ValueError`` naming the first bad row of ``block`` (rows start at ``start``)."""
    rowsum = block.sum(1)  # float32 is ample for a 1e-3 tolerance, and fast
    lo, hi = (None, None) if from_logits else (block.amin(1), block.amax(1))
    check_rows(block, rowsum, lo, hi, from_logits=from_logits, name=name, start=start, storage=storage,
               rows=rows)


def check_rows(
    block: torch.Tensor,
    rowsum: torch.Tensor,
    rowmin: torch.Tensor | None,
    rowmax: torch.Tensor | None,
    *,
    from_logits: bool,
    name: str,
    start: int,
    storage: torch.dtype,
    rows: np.ndarray | None = None,
) -> None:
    """Raise ``ValueError`` naming the first bad one of ``block`` (the first of them row ``start``
    of the input, stored as ``storage``; with ``rows``, see :func:`position`) from their sums
    and, for probabilities, their minima and maxima: NaN or infinity; for probabilities also
    entries outside [0, 1] and sums off one. Logits may hold -inf (a masked class, probability
    0, as ``F.cross_entropy`` takes it) where the row has a finite entry."""
    finite = torch.isfinite(rowsum)
    if not bool(finite.all()):
        suspects = torch.nonzero(~finite)[:, 0]
        # a sum may overflow for large finite entries, and -inf is a masked logit: look at
        # those rows themselves
        rows_in = block[suspects]
        ok = torch.isfinite(rows_in) | (rows_in == -math.inf) if from_logits else torch.isfinite(rows_in)
        bad = suspects[~ok.all(1)]
        if bad.numel():
            i = position(start + int(bad[0]), rows)
            row = block[int(bad[0])]
            only_neg_inf = not from_logits and not bool((torch.isnan(row) | (row == math.inf)).any())
            hint = ("; pass from_logits=True if these are logits (-inf: a masked class)"
                    if only_neg_inf else "")
            raise ValueError(f"{name}: row {i} contains NaN or infinite values{hint}")
        if from_logits:
            masked = suspects[~torch.isfinite(rows_in).any(1)]
            if masked.numel():
                i = position(start + int(masked[0]), rows)
                raise ValueError(f"{name}: row {i} has no finite logit (every entry is -inf)")
    if from_logits:
        return
    assert rowmin is not None and rowmax is not None
    bad = (rowmin < -RANGE_ATOL) | (rowmax > 1 + RANGE_ATOL)
    if bool(bad.any()):
        i = _first(bad)
        raise ValueError(
            f"{name}: row {position(start + i, rows)} has values outside [0, 1] (min {float(rowmin[i]):.4g},"
            f" max {float(rowmax[i]):.4g}); pass from_logits=True if these are logits"
        )
    tol, why = row_sum_tolerance(block, storage, rowsum)
    bad = (rowsum - 1).abs() > tol
    if bool(bad.any()):
        i = _first(bad)
        raise ValueError(
            f"{name}: row {position(start + i, rows)} sums to {float(rowsum[i]):.6g}, not 1"
            f" (tolerance {tol:g}{why});"
            " normalise the rows, or pass from_logits=True if these are logits"
        )


def chunks(
    t: torch.Tensor, *, from_logits: bool, name: str, rows: np.ndarray | None = None
) -> Iterator[tuple[int, int, torch.Tensor]]:
    """Validated row chunks ``(start, stop, block)`` in the compute dtype (``rows``: see
    :func:`position`)."""
    for start, stop in iter_chunks(t):
        block = _chunk(t, start, stop)
        check_chunk(block, start, from_logits=from_logits, name=name, storage=t.dtype, rows=rows)
        yield start, stop, block


def looks_like_probs(x: object, name: str = "predictions") -> bool:
    """True if every row lies in [0, 1] and sums to one within tolerance (and is finite)."""
    t = as_matrix(x, name)
    for start, stop in iter_chunks(t):
        block = _chunk(t, start, stop)
        rowsum = block.sum(1)
        if not bool(torch.isfinite(rowsum).all()):
            return False
        if float(block.min()) < -RANGE_ATOL or float(block.max()) > 1 + RANGE_ATOL:
            return False
        tol, _ = row_sum_tolerance(block, t.dtype, rowsum)
        if float((rowsum - 1).abs().max()) > tol:
            return False
    return True


def warn_if_unnormalised(t: torch.Tensor, name: str) -> None:
    """Warn (:class:`~crossent.calibration.CalibrationWarning`) when rows that the detection
    reads as logits, since they do not sum to one, have every entry in [0, 1]: scores like
    that are rarely logits and often per-class probabilities that were never normalised
    (one-vs-rest sigmoids), whose softmax is not what they mean."""
    if t.numel() == 0:
        return
    lo, hi = torch.aminmax(t)
    # one read, no mask: NaN makes both NaN and the test false, and an infinite entry is
    # outside [0, 1] (real logits leave the range at their first negative entry)
    if not (float(lo) >= -RANGE_ATOL and float(hi) <= 1 + RANGE_ATOL):
        return
    from crossent.calibration._base import CalibrationWarning

    sums = t.sum(1, dtype=torch.float64)
    i = int((sums - 1).abs().argmax())
    warnings.warn(
        f"{name}: every entry lies in [0, 1] but a row sums to {float(sums[i]):.6g}, not 1, so the rows"
        " are read as logits and softmaxed. If they are per-class probabilities (one-vs-rest"
        " sigmoids, say), normalise the rows, or measure them as multi-label scores with (N, L)"
        " 0/1 labels; pass from_logits=True to read them as logits without this warning",
        CalibrationWarning,
        stacklevel=_caller_level(),
    )


def logits_look_like_probs(t: torch.Tensor, name: str) -> bool:
    """:func:`looks_like_probs` of (N, C) scores given as logits, where that is rare: the first
    rows decide for real logits, and all of them are read only where those look like
    probabilities."""
    return t.shape[0] > 0 and looks_like_probs(t[:256], name) and looks_like_probs(t, name)


def warn_if_probs_as_logits(t: torch.Tensor, name: str) -> None:
    """Warn (:class:`~crossent.calibration.CalibrationWarning`) when (N, C) scores given as
    logits (``from_logits=True``) look like probabilities (:func:`logits_look_like_probs`):
    their softmax flattens them (p = [0.9, 0.1] reads as [0.69, 0.31]), a silently wrong ECE."""
    if not logits_look_like_probs(t, name):
        return
    from crossent.calibration._base import CalibrationWarning

    warnings.warn(
        f"{name}: every entry lies in [0, 1] and every row sums to 1: these look like probabilities,"
        " whose softmax (from_logits=True) is not what they mean; pass from_logits=False, or leave"
        " from_logits to its detection",
        CalibrationWarning,
        stacklevel=_caller_level(),
    )


def looks_like_binary_probs(t: torch.Tensor) -> bool:
    """True if every entry of binary or multi-label scores ``t`` lies in [0, 1], within the
    round-off that ``from_logits=False`` accepts (:data:`RANGE_ATOL`), as the rows of
    :func:`looks_like_probs` do; NaN and infinity are not probabilities."""
    if t.numel() == 0:
        return False
    return float(t.min()) >= -RANGE_ATOL and float(t.max()) <= 1 + RANGE_ATOL


def log_eps(dtype: torch.dtype) -> float:
    """Smallest positive normal number of ``dtype``, used to clip log(0)."""
    return float(torch.finfo(dtype).tiny)


def binary_nll_terms(scores: torch.Tensor, y: np.ndarray, *, from_logits: bool) -> torch.Tensor:
    r"""Per-sample binary cross-entropy, float64, of the kept entries ``scores`` (1-D: logits, or
    probabilities of the positive class) with 0/1 labels ``y``.

    From logits :math:`\operatorname{softplus}(z) - y z` (:math:`-\log\sigma(z) =
    \operatorname{softplus}(-z)` and :math:`-\log(1 - \sigma(z)) = \operatorname{softplus}(z)`,
    exact at any :math:`|z|`: no clipping of :math:`1 - \sigma(z)`, which is 0 in float64
    beyond :math:`z \approx 37`); from probabilities :math:`-\log p_y` with :math:`p_y` clipped
    to :func:`log_eps`.
    """
    yt = torch.from_numpy(np.asarray(y)).to(torch.float64)
    s = scores.reshape(-1).to(torch.float64)
    if from_logits:
        return torch.nn.functional.softplus(s) - yt * s
    p = s.clamp(0.0, 1.0)
    return -torch.log(torch.where(yt == 1, p, 1.0 - p).clamp_min(log_eps(torch.float64)))


# ----------------------------------------------------------------------------- input shapes
def _binary_labels(
    arr: np.ndarray, name: str, rows: np.ndarray | None = None, shape: Sequence[int] = ()
) -> np.ndarray:
    """0/1 labels as int64; an error names the entry (:func:`entry_name`, for scores of ``shape``)."""
    if arr.dtype.kind == "b":
        return arr.astype(np.int64)
    if arr.dtype.kind not in "iuf":
        raise TypeError(f"{name} must hold 0/1 outcomes, got dtype {arr.dtype}")
    bad = (arr != 0) & (arr != 1)  # NaN too; np.isin costs ten times more on a small batch
    if bad.any():
        i = int(np.flatnonzero(bad.reshape(-1))[0])
        raise ValueError(
            f"{name} of a binary or multi-label problem must be 0 or 1;"
            f" entry {entry_name(i, rows, shape)} is"
            f" {arr.reshape(-1)[i].item()!r}"
        )
    return arr.astype(np.int64)


def binary_shaped(shape: Sequence[int], label_shape: Sequence[int]) -> bool:
    """Whether scores of ``shape`` with labels of ``label_shape`` are binary problems (0/1
    labels, one per score): (N,) scores, an (N, 1) column of them (a one-logit head, as
    ``BCEWithLogitsLoss`` takes it), or multi-label (N, L) scores with labels of their shape.
    Anything else is (N, C) multiclass scores with (N,) class labels."""
    return len(shape) == 1 or (
        len(shape) == 2 and (shape[1] == 1 or tuple(label_shape) == tuple(shape))
    )


def _warn_if_one_hot_of_a_softmax(t: torch.Tensor, y: np.ndarray, name: str) -> None:
    """Warn when (N, C) multi-label input is more likely a multiclass problem given in one-hot
    form: every label row holds exactly one 1 and every row of ``t`` is a probability row
    summing to 1 (a softmax). Measured as multi-label, its C N entries are pooled binary
    problems, which is not the multiclass (top-label) ECE."""
    if not bool((y.sum(axis=1) == 1).all()) or not looks_like_probs(t, name):
        return
    from crossent.calibration._base import CalibrationWarning

    warnings.warn(
        f"the labels are one-hot rows and the {name} rows sum to 1 (a softmax): this is measured"
        " as multi-label input, every entry a binary problem; for the multiclass metrics pass"
        " the class indices, labels.argmax(1)",
        CalibrationWarning,
        stacklevel=_caller_level(),
    )


def _caller_level() -> int:
    """The ``stacklevel`` of :func:`warnings.warn`, called by this function's caller, that
    names the first frame outside crossent: the metrics reach :func:`select` at different
    depths, and the warning should point at the user's line. The frames of
    ``torch.compiler.disable``'s wrapper (around the meter's methods) are skipped too."""
    frame, level = sys._getframe(1), 1
    while frame.f_back is not None and str(frame.f_globals.get("__name__", "")).startswith(
        ("crossent.", "torch._dynamo.")
    ):
        frame, level = frame.f_back, level + 1
    return level


def check_binary_labels_shape(t: torch.Tensor, arr: np.ndarray, name: str) -> None:
    """Raise ValueError unless labels of ``arr``'s shape fit the binary or multi-label scores
    ``t`` (:func:`binary_shaped`): one 0/1 label per score."""
    n = t.shape[0]
    column = t.ndim == 1 or t.shape[1] == 1
    if arr.shape != tuple(t.shape) and not (column and arr.shape in ((n,), (n, 1), (1, n))):
        raise ValueError(
            f"labels have shape {arr.shape} but {name} have shape {tuple(t.shape)};"
            " a binary problem takes (N,) or (N, 1) scores and (N,) 0/1 labels, a"
            " multi-label one (N, L) scores and (N, L) 0/1 labels"
        )


def select(
    probs: object, labels: object, *, from_logits: bool, ignore_index: int | None, check_probs: bool = True
) -> tuple[str, torch.Tensor, np.ndarray, np.ndarray | None]:
    """The problem's kind, its validated inputs with the ignored entries dropped, and the
    input's number of each row (entry) kept: None where none was dropped (see
    :func:`position`; the errors of later checks pass it on).

    * ``"multiclass"``: ``probs`` (N, C) with labels (N,); returns the (N', C) matrix and the
      int64 labels.
    * ``"binary"``: ``probs`` (N,) or (N, 1) of the positive class (logits with
      ``from_logits``) with 0/1 labels (N,) (or (N, 1), (1, N)), or multi-label ``probs``
      (N, L) with 0/1 labels (N, L), pooled into N L binary problems; returns the float64
      positive-class probabilities (sigmoid of the logits) as a 1-D tensor and the 0/1 labels.

    Labels equal to ``ignore_index`` are dropped (rows for multiclass, entries otherwise).
    Multiclass logits that look like probabilities warn (:func:`warn_if_probs_as_logits`)
    unless ``check_probs`` is false.
    """
    name = "logits" if from_logits else "probs"
    t = _to_tensor(probs, name)
    arr = label_array(labels)
    if binary_shaped(t.shape, arr.shape):
        check_binary_labels_shape(t, arr, name)
        p = t.reshape(-1)
        y = arr.reshape(-1)
        rows = None
        if ignore_index is not None:
            keep = y != ignore_index
            if not keep.all():
                p, y, rows = p[torch.from_numpy(keep)], y[keep], np.flatnonzero(keep)
        if p.numel() == 0:
            raise ValueError(
                f"{name} is empty: it needs at least one sample"
                if arr.size == 0
                else f"{name} is empty after dropping the labels equal to ignore_index={ignore_index}"
            )
        y = _binary_labels(y, "labels", rows, tuple(t.shape))
        if t.ndim == 2 and t.shape[1] > 1 and not from_logits and y.size == t.numel():
            _warn_if_one_hot_of_a_softmax(t, y.reshape(t.shape), name)
        p = p.to(torch.float64)
        if not bool(torch.isfinite(p).all()):
            i = int(torch.nonzero(~torch.isfinite(p))[0, 0])
            raise ValueError(f"{name}: entry {entry_name(i, rows, tuple(t.shape))} is NaN or infinite")
        if from_logits:
            p = torch.sigmoid(p)
        elif float(p.min()) < -RANGE_ATOL or float(p.max()) > 1 + RANGE_ATOL:
            raise ValueError(
                f"{name} of a binary problem must lie in [0, 1] (got min {float(p.min()):.4g},"
                f" max {float(p.max()):.4g}); pass from_logits=True if these are logits"
            )
        return "binary", p.clamp(0.0, 1.0), y, rows
    t = as_matrix(t, name, metrics=True)
    rows = None
    if ignore_index is not None:
        flat = arr.reshape(-1) if arr.ndim == 2 and 1 in arr.shape else arr
        keep = flat != ignore_index
        if flat.ndim == 1 and flat.shape[0] == t.shape[0] and not keep.all():
            if not keep.any():
                raise ValueError("every label equals ignore_index: nothing to measure")
            t, arr, rows = t[torch.from_numpy(keep)], flat[keep], np.flatnonzero(keep)
    y = as_labels(arr, t.shape[0], t.shape[1], rows=rows)
    if from_logits and check_probs:
        warn_if_probs_as_logits(t, name)
    return "multiclass", t, y, rows


def drop_ignored(t: torch.Tensor, lab: np.ndarray, ignore_index: int | None) -> torch.Tensor:
    """``t`` without what ``ignore_index`` drops (rows of (N, C) scores with (N,) labels, else
    entries, flattened), before :func:`select` has validated anything: the probabilities-or-
    logits detection and the binary NLL from logits look only at what is measured."""
    if ignore_index is None:
        return t
    keep = torch.from_numpy(np.asarray(lab != ignore_index).reshape(-1))
    if t.ndim == 2 and lab.size == t.shape[0] and lab.size != t.numel():
        return t[keep]
    if lab.size == t.numel():
        return t.reshape(-1)[keep]
    return t  # shapes that do not match: select names the problem


# ----------------------------------------------------------------------------- options
# The checks of the options of every public function and constructor of the calibration
# toolkit: a value of the wrong type is refused, never coerced (``bool("no")`` is True,
# ``int(2.5)`` is 2), with a one-line message naming the option, what it takes and what it got.

S = TypeVar("S", bound=str)


class OptionTypeError(TypeError, ValueError):
    """An option of the wrong type (``from_logits="no"``, ``n_bins=2.5``). A :class:`TypeError`,
    and a :class:`ValueError` as well: ``n_bins``, ``num_classes`` and the string choices
    (``binning``, ``norm``, ...) refused a wrong type with a ``ValueError`` before, and code that
    catches that still catches it."""


def shown_option(value: object, width: int = 60) -> str:
    """``value`` as an option error shows it: its repr, cut to ``width`` characters."""
    r = repr(value)
    return r if len(r) <= width else r[: width - 3] + "..."


@overload
def check_bool(name: str, value: object, *, none: Literal[False] = ...) -> bool: ...
@overload
def check_bool(name: str, value: object, *, none: Literal[True]) -> bool | None: ...
def check_bool(name: str, value: object, *, none: bool = False) -> bool | None:
    """``value`` as a Python bool: ``True``, ``False`` or a NumPy bool (``None`` too with
    ``none``); anything else (``"no"``, 1, 0) raises :class:`OptionTypeError`."""
    if value is None and none:
        return None
    if not isinstance(value, (bool, np.bool_)):
        wanted = "True, False or None" if none else "True or False"
        raise OptionTypeError(f"{name} must be {wanted}, got {shown_option(value)}")
    return bool(value)


@overload
def check_int(name: str, value: object, *, low: int | None = ..., high: int | None = ...,
              what: str | None = ..., none: Literal[False] = ...) -> int: ...
@overload
def check_int(name: str, value: object, *, low: int | None = ..., high: int | None = ...,
              what: str | None = ..., none: Literal[True]) -> int | None: ...
def check_int(name: str, value: object, *, low: int | None = None, high: int | None = None,
              what: str | None = None, none: bool = False) -> int | None:
    """``value`` as a Python int: an ``int`` or NumPy integer, not a bool (``None`` too with
    ``none``), in ``[low, high]``. Another type (2.5, 10.0, ``"10"``, ``True``) raises
    :class:`OptionTypeError`, a value out of range :class:`ValueError`; the message says
    ``what`` the option takes (by default "an integer" and its range)."""
    if value is None and none:
        return None
    if what is None:
        what = "an integer" + (
            "" if low is None and high is None
            else f" >= {low}" if high is None
            else f" <= {high}" if low is None
            else f" in [{low}, {high}]"
        )
    wanted = f"{what} or None" if none else what
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise OptionTypeError(f"{name} must be {wanted}, got {shown_option(value)}")
    n = int(value)
    if (low is not None and n < low) or (high is not None and n > high):
        raise ValueError(f"{name} must be {wanted}, got {shown_option(value)}")
    return n


def check_ignore_index(value: object) -> int | None:
    """The ``ignore_index`` option: an integer label value, or ``None``."""
    return check_int("ignore_index", value, what="an integer (the label value to leave out)", none=True)


@overload
def check_real(name: str, value: object, *, what: str = ..., none: Literal[False] = ...) -> float: ...
@overload
def check_real(name: str, value: object, *, what: str = ..., none: Literal[True]) -> float | None: ...
def check_real(name: str, value: object, *, what: str = "a number", none: bool = False) -> float | None:
    """``value`` as a Python float: an ``int``, ``float`` or NumPy number, not a bool (``None``
    too with ``none``); another type (``"0.1"``, ``True``) raises :class:`OptionTypeError`
    saying ``what`` the option takes. The range is the caller's to check."""
    if value is None and none:
        return None
    wanted = f"{what} or None" if none else what
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise OptionTypeError(f"{name} must be {wanted}, got {shown_option(value)}")
    try:
        return float(value)
    except OverflowError:  # an int beyond the float range
        raise ValueError(f"{name} must be {wanted}, got {shown_option(value)}") from None


def check_choice(name: str, value: S, choices: tuple[str, ...]) -> S:
    """``value`` if it is one of the strings ``choices`` (a NumPy string as the plain one);
    another type raises :class:`OptionTypeError`, another string :class:`ValueError`."""
    quoted = [repr(c) for c in choices]
    listed = quoted[0] if len(quoted) == 1 else f"{', '.join(quoted[:-1])} or {quoted[-1]}"
    if not isinstance(value, str):
        raise OptionTypeError(f"{name} must be {listed}, got {shown_option(value)}")
    if value not in choices:
        raise ValueError(f"{name} must be {listed}, got {shown_option(value)}")
    return cast(S, str(value))
