r"""The native CPU kernels: build on first use, load with ctypes, call.

The softmax and sigmoid families are memory-bound: their floor is one read of the logits and one
write of the gradient. The torch-op path (:mod:`crossent.backends.torch_ops.softmax`,
:mod:`crossent.backends.torch_ops.binary`) gets within a few passes of that by working on cache-sized blocks,
but ATen has no op that fuses a softmax with a row sum, or a sigmoid with a log, so each extra
term is another pass. ``_kernels.c`` is the same formulation as one loop per row (softmax: one
read from memory, two more from L2, one write) or per element (sigmoid: one read, one write).

Build: the first call compiles ``_kernels.c`` with the system C compiler (``$CC``, else ``cc``,
``gcc`` or ``clang``) as ``-O3 -march=native`` into a shared library cached under
``$CROSSENT_CACHE_DIR`` (default ``$XDG_CACHE_HOME/crossent``, else ``~/.cache/crossent``,
else, with no home directory, ``<tempdir>/crossent-<uid>``), keyed by the source, the compiler,
its flags and the CPU's feature flags; it needs no Python or torch headers and takes 10-20
seconds of CPU time (the loops are instantiated per option set so that each one vectorises).
The library is written atomically (a private temporary file, fsync, rename) with its SHA-256
appended, and checked before it is loaded: the directory and the file must be this user's (or
root's) and not writable by group or others, and the checksum must match. A cached file that fails is
rebuilt over; a directory that fails (or cannot be written) is left alone and the kernels are
built into a private temporary directory for the process; each with one ``RuntimeWarning``.
Built with ``-fopenmp``, its threads are those of the OpenMP runtime torch already loaded (see
``parallel_for`` in ``_kernels.c``); without OpenMP it starts pthreads. Set
``CROSSENT_NATIVE=0`` to turn it off. Without a compiler (or when the build fails, with one
warning) every call takes the torch-op path, which computes the same values.

Scope: CPU tensors of fp32, bf16, fp16 (where the compiler has ``_Float16``) and fp64 (a
vectorised exp within 1 ulp, libm's log and pow), outside ``torch.compile``:

- softmax family: 1-D or 2-D logits with contiguous rows, and contiguous (N, C, d1, ...)
  logits with index targets (tiles of positions: vectorised across positions for few classes,
  else transposed into rows in cache); index targets and probability targets (1-D/2-D) with
  every option. A step schedule of gamma (:class:`crossent._options.StepGamma`, e.g.
  ``crossent.flsd53``) is evaluated per row inside the pass, from q_y (or sum_k t_k q_k) once
  the row's log-sum-exp is known; any other schedule takes a first pass for those. The
  statistics of ``return_aux`` (lse, entropy, argmax hit) come from the same passes. A focal
  term with label smoothing or with probability targets needs the focal factor of every class:
  the kernel's dense pass computes it at one exp per element for a gamma that is a multiple of
  1/2 in 1..5 (the exponential the softmax takes anyway, then multiplications and, for a
  half-integer, one square root), two more (one log, one exp) for another gamma. Probability
  targets are read once, in the pass that takes the exponentials, which also checks that none
  is negative (raising ``ValueError``: the front door leaves that check to the kernel where it
  runs). Other cases take the torch-op path.
- sigmoid family: contiguous logits and targets (any dtype); every option; ``weight`` and
  ``pos_weight`` that broadcast by repetition (a scalar, a per-class (C,), a per-sample (N, 1),
  a full tensor, ...).
- calibration statistics (:func:`calibration_rows`, for :mod:`crossent.calibration`): per row
  of (N, C) logits or probabilities with contiguous rows, the top-label confidence and
  prediction, the NLL and Brier score of the label and the classwise width-bin sums, in one
  read of the row.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import hashlib
import math
import os
import platform
import shutil
import stat
import subprocess
import tempfile
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import NamedTuple, TypeVar

import numpy as np
import torch
from torch import Tensor

from crossent._options import (
    BINARY_ALL,
    SOFTMAX_ALL,
    BinaryCall,
    BinaryOptions,
    RowGamma,
    SoftmaxCall,
    SoftmaxOptions,
    StepGamma,
    covers,
)
from crossent.backends.torch_ops._memory import empty_hugepage

__all__ = [
    "CalibrationRows",
    "available",
    "binary_cross_entropy",
    "calibration_rows",
    "describe",
    "disabled",
    "softmax_cross_entropy",
    "supports_binary",
    "supports_calibration",
    "supports_softmax",
    "true_class_prob",
]

_SOURCES = ("_kernels.c", "_kernels_body.h")
_FLAGS = ("-O3", "-fopenmp-simd", "-fno-math-errno", "-fno-trapping-math", "-shared", "-fPIC", "-pthread")
# Tried in order: vectorised for the build machine and on torch's OpenMP pool (see
# parallel_for in _kernels.c), then without what the compiler does not support.
_ARCH_FLAGS = (("-march=native", "-fopenmp"), ("-march=native",), ())

_DT = {torch.float32: 0, torch.float64: 1, torch.bfloat16: 2, torch.float16: 3, torch.uint8: 4,
       torch.bool: 4, torch.int64: 5}

_enabled = os.environ.get("CROSSENT_NATIVE", "1") != "0"


class _SoftmaxArgs(ctypes.Structure):
    """``sm_args`` of _kernels.c, field for field."""

    _fields_ = [
        ("n_rows", ctypes.c_int64), ("n_cols", ctypes.c_int64),
        ("x_row_stride", ctypes.c_int64), ("g_row_stride", ctypes.c_int64),
        ("x", ctypes.c_void_p), ("grad", ctypes.c_void_p), ("y", ctypes.c_void_p),
        ("t", ctypes.c_void_p), ("t_row_stride", ctypes.c_int64),
        ("w", ctypes.c_void_p), ("gamma_rows", ctypes.c_void_p),
        ("loss", ctypes.c_void_p), ("ell", ctypes.c_void_p),
        ("x_dtype", ctypes.c_int32), ("g_dtype", ctypes.c_int32),
        ("ignore_index", ctypes.c_int64),
        ("w_sum", ctypes.c_double), ("eps", ctypes.c_double), ("gamma", ctypes.c_double),
        ("z_loss", ctypes.c_double), ("softcap", ctypes.c_double), ("conf", ctypes.c_double),
        ("poly1", ctypes.c_double), ("scale", ctypes.c_double),
        ("n_threads", ctypes.c_int32), ("mean", ctypes.c_int32),
        ("total", ctypes.c_double), ("denom", ctypes.c_double), ("spatial", ctypes.c_int64),
        ("stats", ctypes.c_void_p), ("has_step", ctypes.c_int32), ("step_threshold", ctypes.c_double),
        ("step_below", ctypes.c_double), ("step_above", ctypes.c_double), ("t_negative", ctypes.c_int32),
    ]


class _BinaryArgs(ctypes.Structure):
    """``bce_args`` of _kernels.c, field for field."""

    _fields_ = [
        ("n", ctypes.c_int64),
        ("x", ctypes.c_void_p), ("grad", ctypes.c_void_p), ("t", ctypes.c_void_p),
        ("w", ctypes.c_void_p), ("pw", ctypes.c_void_p),
        ("w_inner", ctypes.c_int64), ("w_period", ctypes.c_int64),
        ("pw_inner", ctypes.c_int64), ("pw_period", ctypes.c_int64),
        ("loss", ctypes.c_void_p),
        ("x_dtype", ctypes.c_int32), ("g_dtype", ctypes.c_int32), ("t_dtype", ctypes.c_int32),
        ("has_ignore", ctypes.c_int32),
        ("ignore_value", ctypes.c_double), ("eps", ctypes.c_double),
        ("gamma_pos", ctypes.c_double), ("gamma_neg", ctypes.c_double),
        ("alpha", ctypes.c_double), ("clip", ctypes.c_double), ("scale", ctypes.c_double),
        ("n_threads", ctypes.c_int32), ("mean", ctypes.c_int32),
        ("total", ctypes.c_double), ("denom", ctypes.c_double),
    ]


class _CalibrationArgs(ctypes.Structure):
    """``cal_args`` of _kernels.c, field for field."""

    _fields_ = [
        ("n_rows", ctypes.c_int64), ("n_cols", ctypes.c_int64), ("x_row_stride", ctypes.c_int64),
        ("x", ctypes.c_void_p), ("x_dtype", ctypes.c_int32), ("from_logits", ctypes.c_int32),
        ("y", ctypes.c_void_p), ("n_threads", ctypes.c_int32), ("n_bins", ctypes.c_int32),
        ("conf", ctypes.c_void_p), ("pred", ctypes.c_void_p), ("nll", ctypes.c_void_p),
        ("brier", ctypes.c_void_p), ("rowsum", ctypes.c_void_p), ("rowmin", ctypes.c_void_p),
        ("cw_p", ctypes.c_void_p), ("cw_y", ctypes.c_void_p), ("scale", ctypes.c_double),
        ("dmean", ctypes.c_void_p), ("dvar", ctypes.c_void_p), ("top", ctypes.c_void_p),
        ("range_lo", ctypes.c_double), ("range_hi", ctypes.c_double), ("sum_tol", ctypes.c_double),
        ("suspects", ctypes.c_int64),
    ]


# --------------------------------------------------------------------------------------------
# build and load
#
# The cache is trusted only as far as it is checked: a library is loaded from a directory owned
# by this user (or root) that no one else can write to, and only when the file is a regular file
# of this user's (or root's), not writable by others, that ends with the SHA-256 of its contents
# (the seal, appended at build time; the dynamic loader ignores bytes past the ELF image). The
# check reads the file before dlopen, and dlopen opens the very file read (/proc/self/fd): a
# truncated library would load and then SIGBUS, a foreign one would run its constructors. A file
# that fails is rebuilt (atomically, over it); a directory that fails is not written to: the
# library is built into a private temporary directory instead. Either way one RuntimeWarning
# says what happened.

#: Appended to every library built: this tag, then the SHA-256 of the bytes before it.
_SEAL_TAG = b"\0crossent-sha256"
_SEAL_LEN = len(_SEAL_TAG) + 32
#: Part of the cache key: a library of another layout (an unsealed one from an older version) is
#: never looked up, so it is never taken for a damaged one.
_CACHE_FORMAT = "sealed-sha256-1"


class _Unwritable(OSError):
    """The cache directory cannot take a new file (read-only, full, not ours to write)."""


def _seal(data: bytes) -> bytes:
    return data + _SEAL_TAG + hashlib.sha256(data).digest()


def _seal_problem(data: bytes) -> str | None:
    """Why ``data`` is not a whole sealed library, or None when it is."""
    if len(data) <= _SEAL_LEN or data[-_SEAL_LEN:-32] != _SEAL_TAG:
        return f"is truncated or not a crossent build ({len(data)} bytes, no checksum)"
    if hashlib.sha256(data[:-_SEAL_LEN]).digest() != data[-32:]:
        return "is damaged (checksum mismatch)"
    return None


def _euid() -> int | None:
    return os.geteuid() if hasattr(os, "geteuid") else None


def _ownership_problem(st: os.stat_result) -> str | None:
    """Why a file or directory with this stat could have been written by another user."""
    euid = _euid()
    if euid is not None and st.st_uid not in (euid, 0):  # root could replace anything anyway
        return f"is owned by uid {st.st_uid}, neither this user (uid {euid}) nor root"
    if st.st_mode & 0o022:
        return f"is writable by group or others (mode {stat.S_IMODE(st.st_mode):o})"
    return None


def _dir_problem(path: Path) -> str | None:
    """Create ``path`` (mode 0o700) if needed; why it is not a safe cache, or None."""
    try:
        path.mkdir(mode=0o700, parents=True, exist_ok=True)
        st = path.stat()
    except OSError as err:
        return f"cannot be created ({err})"
    return _ownership_problem(st)


def _open_checked(path: Path) -> tuple[int | None, str | None]:
    """Open the cached library at ``path`` (not through a symbolic link) and check it: ``(fd,
    None)`` when it may be loaded (the caller owns ``fd``), ``(None, why)`` when it may not;
    FileNotFoundError when there is none."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0))
    except OSError as err:
        if isinstance(err, FileNotFoundError):
            raise
        return None, f"cannot be opened ({err})"  # a symbolic link (ELOOP), not readable, ...
    try:
        st = os.fstat(fd)
        problem = "is not a regular file" if not stat.S_ISREG(st.st_mode) else _ownership_problem(st)
        if problem is None:
            with open(fd, "rb", closefd=False) as f:
                problem = _seal_problem(f.read())
    except OSError as err:
        problem = f"cannot be read ({err})"
    if problem is not None:
        os.close(fd)
        return None, problem
    return fd, None


#: Descriptors of cached libraries loaded through /proc/self/fd, open for the life of the
#: process: a later dlopen of the same name would be given the earlier library.
_PINNED_FDS: list[int] = []


def _dlopen_checked(fd: int, path: Path) -> ctypes.CDLL:
    """Load the file :func:`_open_checked` checked: through ``/proc/self/fd`` where there is one
    (the very file read, whatever happens to ``path`` meanwhile), else by ``path`` (in a folder
    no one else can write to). Takes ``fd`` over."""
    proc = f"/proc/self/fd/{fd}"
    try:
        lib = ctypes.CDLL(proc if os.path.exists(proc) else str(path))
    except OSError:
        os.close(fd)
        raise
    _PINNED_FDS.append(fd)
    return lib


def _cache_dir() -> Path:
    env = os.environ.get("CROSSENT_CACHE_DIR")
    if env:
        return Path(env)
    if os.environ.get("XDG_CACHE_HOME"):
        return Path(os.environ["XDG_CACHE_HOME"]) / "crossent"
    try:
        return Path.home() / ".cache" / "crossent"
    except (RuntimeError, KeyError, OSError):
        # no $HOME and a uid without a passwd entry (common in containers): a per-user folder
        # of the temporary directory, checked like any other cache before use
        uid = _euid()
        return Path(tempfile.gettempdir()) / f"crossent-{'user' if uid is None else uid}"


def _cpu_flags() -> str:
    """The CPU's feature flags: a library built with -march=native runs only where they match."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return line
    except OSError:
        pass
    return platform.processor()


def _compiler() -> str | None:
    for name in (os.environ.get("CC"), "cc", "gcc", "clang"):
        if name and shutil.which(name):
            return name
    return None


_KERNELS = ("ce_softmax_f32", "ce_softmax_f64", "ce_binary_f32", "ce_binary_f64", "ce_calibration_f32",
            "ce_calibration_f64", "ce_has_f16", "ce_openmp", "ce_exp_log_f32", "ce_exp_f64")


def _bind(lib: ctypes.CDLL) -> ctypes.CDLL:
    """Declare the kernels' return types; AttributeError when the library lacks one."""
    for name in _KERNELS:
        getattr(lib, name).restype = ctypes.c_int
    return lib


def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _build_into(
    cache: Path, out: Path, cmd_head: list[str], source: Path, errors: list[str]
) -> ctypes.CDLL | None:
    """Compile into a private temporary file of ``cache``, seal it, fsync it, load it from there
    and rename it to ``out`` (loading before the rename: a racing process that replaces ``out``
    cannot swap the file under this one). None (with the reason in ``errors``) when the build or
    the load fails; :class:`_Unwritable` when ``cache`` cannot take the file."""
    try:
        fd, tmp = tempfile.mkstemp(prefix=".build-", suffix=".so", dir=cache)
        os.close(fd)
    except OSError as err:
        raise _Unwritable(str(err)) from err
    try:
        cmd = [*cmd_head, "-o", tmp, str(source)]
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
        if res.returncode != 0:
            errors.append(f"{' '.join(cmd)}\n{res.stderr.strip()[-2000:]}")
            return None
        try:
            with open(tmp, "r+b") as f:
                data = f.read()
                if not data:
                    errors.append(f"{' '.join(cmd)}: the compiler wrote an empty file")
                    return None
                f.write(_seal(data)[len(data):])
                f.flush()
                os.fsync(f.fileno())
                os.fchmod(f.fileno(), 0o644)  # not the umask's: a group-writable file would be refused
        except OSError as err:
            raise _Unwritable(str(err)) from err
        try:
            lib = ctypes.CDLL(tmp)
        except OSError as err:  # say, an OpenMP runtime that is not there: the next flags
            errors.append(f"loading {out}: {err}")
            lib = None
        try:
            os.replace(tmp, out)
        except OSError as err:
            if lib is None:
                raise _Unwritable(str(err)) from err
            return _bind(lib)  # built and loaded, only not cached
        _fsync_dir(cache)
        return None if lib is None else _bind(lib)
    finally:
        with contextlib.suppress(OSError):
            os.unlink(tmp)


def _load_from(cache: Path, cc: str, notes: list[str]) -> ctypes.CDLL:
    """Load the library from ``cache`` (a directory already checked), building what is missing
    or bad. The flag sets of ``_ARCH_FLAGS`` are tried in order; a set whose build fails, or
    whose library fails to load (say, an OpenMP runtime that is not there), gives way to the next."""
    here = Path(__file__).parent
    sources = b"".join((here / name).read_bytes() for name in _SOURCES)
    errors: list[str] = []
    for arch in _ARCH_FLAGS:
        key = "\0".join((cc, *arch, *_FLAGS, platform.machine(), _cpu_flags(), _CACHE_FORMAT)).encode()
        out = cache / f"kernels-{hashlib.sha256(sources + key).hexdigest()[:20]}.so"
        try:
            fd, problem = _open_checked(out)
        except FileNotFoundError:
            pass
        else:
            if fd is not None:
                try:
                    return _bind(_dlopen_checked(fd, out))
                except AttributeError as err:
                    problem = f"lacks the kernels' symbols ({err})"
                except OSError as err:
                    errors.append(f"loading {out}: {err}")
                    continue
            notes.append(f"the cached kernel library {out} {problem}: not loaded, rebuilt")
        lib = _build_into(cache, out, [cc, *arch, *_FLAGS], here / "_kernels.c", errors)
        if lib is not None:
            return lib
    raise OSError("building the native kernels failed:\n" + "\n".join(errors))


def _load(notes: list[str] | None = None) -> ctypes.CDLL:
    """Build (once per source, compiler, flags and CPU, into the cache) and load the library.

    What went wrong on the way without stopping it (a bad cached file, a refused cache
    directory) is appended to ``notes``, for the caller's one warning.
    """
    notes = [] if notes is None else notes
    cc = _compiler()
    if cc is None:
        raise OSError("no C compiler found (set $CC, or install gcc or clang)")
    cache = _cache_dir()
    problem = _dir_problem(cache)
    if problem is None:
        try:
            return _load_from(cache, cc, notes)
        except _Unwritable as err:
            problem = f"is not writable ({err})"
    notes.append(
        f"the kernel cache {cache} {problem}: not used, the kernels are built into a private "
        "temporary directory for this process (set CROSSENT_CACHE_DIR to a directory of your own)"
    )
    private = Path(tempfile.mkdtemp(prefix="crossent-"))
    try:
        return _load_from(private, cc, notes)  # a loaded library needs no file on disk
    finally:
        shutil.rmtree(private, ignore_errors=True)


@functools.cache
def _library() -> ctypes.CDLL | None:
    notes: list[str] = []
    try:
        lib = _load(notes)
    except (OSError, subprocess.SubprocessError, RuntimeError, AttributeError) as err:
        warnings.warn(
            f"crossent: the native CPU kernels are unavailable ({'; '.join([*notes, str(err)])}); "
            "using the torch-op path, which is slower on the CPU. Set CROSSENT_NATIVE=0 to silence this.",
            RuntimeWarning,
            stacklevel=3,
        )
        return None
    if notes:
        warnings.warn("crossent: " + "; ".join(notes) + ".", RuntimeWarning, stacklevel=3)
    return lib


_F = TypeVar("_F", bound=Callable[..., object])


def _assume_constant_result(fn: _F) -> _F:
    """``torch.compiler.assume_constant_result`` without importing ``torch._dynamo``.

    The public decorator imports ``torch._dynamo`` (about 1.4 s, more than the rest of crossent's
    import) only to set this marker, which dynamo reads when it meets the call while tracing.
    tests/test_native.py checks that the public decorator sets exactly this, and the fullgraph
    compile tests fail if dynamo stops honouring it.
    """
    fn._dynamo_marked_constant = True  # type: ignore[attr-defined]
    return fn


# Under torch.compile these two are evaluated once while tracing, not traced: the kernels run
# inside the registered operators (crossent._ops), which check again on the real tensors.
@_assume_constant_result
def available() -> bool:
    """True when the native kernels are enabled and built (building them on the first call)."""
    return _enabled and _library() is not None


def describe() -> str:
    """One line for benchmark reports: whether the native kernels run, built how."""
    if not _enabled:
        return "off (CROSSENT_NATIVE=0)"
    lib = _library()
    if lib is None:
        return "unavailable (build failed)"
    cc = _compiler() or "cc"
    try:
        version = subprocess.run([cc, "--version"], capture_output=True, text=True, timeout=30)
        cc = version.stdout.splitlines()[0]
    except (OSError, subprocess.SubprocessError, IndexError):
        pass
    return f"{cc}, {'OpenMP (torch pool)' if lib.ce_openmp() else 'pthreads'}"


@contextlib.contextmanager
def disabled() -> Iterator[None]:
    """Within the block every CPU call takes the torch-op path (used by the tests and benchmarks)."""
    global _enabled
    before = _enabled
    _enabled = False
    try:
        yield
    finally:
        _enabled = before


def _dtype_ok(dtype: torch.dtype) -> bool:
    if dtype in (torch.float32, torch.float64, torch.bfloat16):
        return True
    return dtype == torch.float16 and _has_f16()


@_assume_constant_result
def _has_f16() -> bool:
    lib = _library()
    return lib is not None and bool(lib.ce_has_f16())


def _threads() -> int:
    return max(1, torch.get_num_threads())


def _acc(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _suffix(acc: torch.dtype) -> str:
    return "f64" if acc == torch.float64 else "f32"


def _ptr(t: Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


def _check(status: int) -> None:
    if status != 0:
        raise MemoryError("crossent native kernel: could not allocate its scratch rows")


# --------------------------------------------------------------------------------------------
# softmax family


#: What the native softmax kernel computes (an allow-list, see :func:`crossent._options.covers`):
#: every option together, for class indices and for probability targets (a focal term with
#: label smoothing or with probability targets takes the kernel's dense pass, a focal factor
#: per class).
SOFTMAX_CAPABILITIES = {
    "index": (SOFTMAX_ALL,),
    "prob": (SOFTMAX_ALL,),
}
#: The native sigmoid kernel: every option of the family but the Poly-1 term and the detached
#: focal weight (those calls run on the torch-op path).
BINARY_CAPABILITIES = (BINARY_ALL - {"poly1", "detach_focal_weight"},)


def supports_softmax(
    logits: Tensor, target: Tensor, opts: SoftmaxOptions, weight: Tensor | None = None
) -> bool:
    """Whether :func:`softmax_cross_entropy` covers this call (else the torch-op path runs):
    its options (:data:`SOFTMAX_CAPABILITIES`), dtypes and layouts."""
    if logits.device.type != "cpu" or not available() or not _dtype_ok(logits.dtype):
        return False
    index = not target.is_floating_point()
    used = opts.active() | ({"weight"} if weight is not None else set())
    if not covers(SOFTMAX_CAPABILITIES["index" if index else "prob"], used):
        return False
    if logits.ndim > 2 and not (logits.is_contiguous() and index):
        return False  # (N, C, d1, ...): contiguous, with class indices
    if logits.numel() and logits.stride(-1) != 1:
        return False  # rows must be contiguous
    if not index:  # probability targets: the accumulation dtype, contiguous rows
        if target.dtype != _acc(logits.dtype):
            return False
        return target.numel() == 0 or target.stride(-1) == 1
    return True


def softmax_cross_entropy(call: SoftmaxCall) -> tuple[Tensor, Tensor | None]:
    """:func:`crossent.backends.torch_ops.softmax.softmax_cross_entropy` by the native kernel (same contract).

    The kernel also finds the mean's denominator and sums the row losses, so a call costs a
    handful of torch ops however small the batch.
    """
    logits, target, weight, opts = call.logits, call.target, call.weight, call.opts
    reduction, need_grad, inplace_backward = call.reduction, call.need_grad, call.inplace_backward
    from crossent._formula import gamma_for_rows

    acc = _acc(logits.dtype)
    squeeze = logits.ndim == 1
    x = logits.unsqueeze(0) if squeeze else logits
    index = not target.is_floating_point()
    t = target.reshape(1, -1) if squeeze and not index else target
    y = target.reshape(-1) if index else None
    if y is not None and not y.is_contiguous():
        y = y.contiguous()
    C = x.shape[1]
    S = 1  # positions per sample of (N, C, d1, ...) logits
    for d in x.shape[2:]:
        S *= d
    R = x.shape[0] * S  # rows: one per (sample, position)
    grad = None
    if need_grad:
        grad = x if inplace_backward else empty_hugepage(*x.shape, dtype=x.dtype)
    losses = torch.empty(R, dtype=acc) if reduction == "none" else None
    w = weight if weight is None or weight.is_contiguous() else weight.contiguous()
    args = _SoftmaxArgs(
        n_rows=R, n_cols=C, spatial=S if x.ndim > 2 else 0,
        x_row_stride=x.stride(0) if R and x.ndim == 2 else C,
        g_row_stride=grad.stride(0) if grad is not None and R and x.ndim == 2 else C,
        x=x.data_ptr(), grad=_ptr(grad), y=_ptr(y),
        t=None if index else t.data_ptr(), t_row_stride=0 if index or not R else t.stride(0),
        w=_ptr(w), gamma_rows=None, loss=_ptr(losses), ell=None,
        x_dtype=_DT[x.dtype], g_dtype=_DT[x.dtype], ignore_index=opts.ignore_index,
        w_sum=float(C) if w is None else float(w.sum()),
        eps=float(opts.label_smoothing), gamma=0.0 if callable(opts.gamma) else float(opts.gamma),
        z_loss=float(opts.z_loss), softcap=float(opts.softcap or 0.0),
        conf=float(opts.confidence_penalty), poly1=float(opts.poly1),
        scale=1.0, n_threads=_threads(), mean=int(reduction == "mean"),
    )
    stats = call.stats
    if stats is not None and R:
        if not (stats.is_contiguous() and stats.dtype == acc and tuple(stats.shape) == (R, 3)):
            raise ValueError(f"stats must be a contiguous ({R}, 3) tensor of {acc}")
        args.stats = stats.data_ptr()
    kernel = getattr(_library(), f"ce_softmax_{_suffix(acc)}")
    gamma_rows = None
    if isinstance(opts.gamma, StepGamma):  # evaluated per row inside the kernel, after pass 2
        args.has_step = 1
        args.step_threshold = opts.gamma.threshold
        args.step_below, args.step_above = opts.gamma.below, opts.gamma.above
    elif isinstance(opts.gamma, RowGamma):
        gamma_rows = opts.gamma.rows.to(acc).reshape(-1).expand(R).contiguous()
        args.gamma_rows = gamma_rows.data_ptr()
    elif callable(opts.gamma) and R:
        # A schedule needs every row's q_y before its gradient: a first, forward-only pass.
        p = _true_class_prob(kernel, args, R, acc)
        scheduled = gamma_for_rows(opts, p.unsqueeze(1))
        gamma_rows = torch.as_tensor(scheduled, dtype=acc).reshape(-1).expand(R).contiguous()
        args.gamma_rows = gamma_rows.data_ptr()
    _check(kernel(ctypes.byref(args)))
    if args.t_negative:  # checked in the kernel's one read of the targets, not a pass of its own
        raise ValueError("target probabilities must be >= 0 (got a negative entry)")

    if losses is not None:  # reduction "none"
        loss = losses.reshape(()) if squeeze else losses.reshape(x.shape[:1] + x.shape[2:])
    else:
        loss = torch.tensor(args.total, dtype=acc)
    if grad is not None and squeeze:
        grad = grad.squeeze(0)
    return loss, grad


def _true_class_prob(kernel: Callable[..., int], args: _SoftmaxArgs, R: int, acc: torch.dtype) -> Tensor:
    """q_y (or sum_k t_k q_k) per row: the kernel's forward-only pass with ``ell`` set writes
    -log of it."""
    ell = torch.empty(R, dtype=acc)
    first = _SoftmaxArgs.from_buffer_copy(args)
    first.grad, first.ell, first.gamma, first.gamma_rows = None, ell.data_ptr(), 0.0, None
    first.stats = None
    _check(kernel(ctypes.byref(first)))
    return ell.neg_().exp_()


def true_class_prob(logits: Tensor, target: Tensor, opts: SoftmaxOptions) -> Tensor:
    """The probability a focal schedule is evaluated at, per row (see
    :func:`crossent._ops.true_class_prob`), by the kernel's forward-only pass."""
    plain = SoftmaxOptions(ignore_index=opts.ignore_index, softcap=opts.softcap)
    acc = _acc(logits.dtype)
    squeeze = logits.ndim == 1
    x = logits.unsqueeze(0) if squeeze else logits
    index = not target.is_floating_point()
    t = target.reshape(1, -1) if squeeze and not index else target
    y = target.reshape(-1).contiguous() if index else None
    C = x.shape[1]
    S = 1
    for d in x.shape[2:]:
        S *= d
    R = x.shape[0] * S
    if R == 0:
        return torch.empty(0, dtype=acc)
    args = _SoftmaxArgs(
        n_rows=R, n_cols=C, spatial=S if x.ndim > 2 else 0,
        x_row_stride=x.stride(0) if x.ndim == 2 else C, g_row_stride=C,
        x=x.data_ptr(), grad=None, y=_ptr(y),
        t=None if index else t.data_ptr(), t_row_stride=0 if index else t.stride(0),
        w=None, gamma_rows=None, loss=None, ell=None,
        x_dtype=_DT[x.dtype], g_dtype=_DT[x.dtype], ignore_index=plain.ignore_index,
        w_sum=float(C), eps=0.0, gamma=0.0, z_loss=0.0, softcap=float(plain.softcap or 0.0),
        conf=0.0, poly1=0.0, scale=1.0, n_threads=_threads(), mean=0,
    )
    return _true_class_prob(getattr(_library(), f"ce_softmax_{_suffix(acc)}"), args, R, acc)


# --------------------------------------------------------------------------------------------
# sigmoid family


def _repeat_pattern(weight: Tensor, shape: tuple[int, ...]) -> tuple[Tensor, int, int] | None:
    """``(base, inner, period)`` such that ``weight.expand(shape).reshape(-1)[i]`` is
    ``base[(i // inner) % period]``, or None when the broadcast is not such a repetition (the
    dims where the weight varies must be adjacent)."""
    nd = len(shape)
    wshape = (1,) * (nd - weight.ndim) + tuple(weight.shape)
    varying = [d for d in range(nd) if wshape[d] != 1]
    numel = 1
    for s in shape:
        numel *= s
    if not varying:
        return weight.reshape(1), max(1, numel), 1
    a, b = varying[0], varying[-1] + 1
    if any(wshape[d] == 1 and shape[d] != 1 for d in range(a, b)):
        return None
    period = inner = 1
    for d in range(a, b):
        period *= shape[d]
    for d in range(b, nd):
        inner *= shape[d]
    return weight.reshape(-1).contiguous(), inner, period


def supports_binary(
    logits: Tensor, target: Tensor, weight: Tensor | None, pos_weight: Tensor | None,
    opts: BinaryOptions | None = None,
) -> bool:
    """Whether :func:`binary_cross_entropy` covers this call (else the torch-op path runs)."""
    if logits.device.type != "cpu" or not available() or not _dtype_ok(logits.dtype):
        return False
    used = (opts.active() if opts is not None else frozenset()) | {
        name for name, t in (("weight", weight), ("pos_weight", pos_weight)) if t is not None
    }
    if not covers(BINARY_CAPABILITIES, used):
        return False
    if not (logits.is_contiguous() and target.is_contiguous()):
        return False
    if target.dtype not in _DT or (target.dtype == torch.float16 and not _dtype_ok(torch.float16)):
        return False
    shape = tuple(logits.shape)
    return all(w is None or _repeat_pattern(w, shape) is not None for w in (weight, pos_weight))


def binary_cross_entropy(call: BinaryCall) -> tuple[Tensor, Tensor | None]:
    """:func:`crossent.backends.torch_ops.binary.binary_cross_entropy` by the native kernel
    (same contract)."""
    logits, target, weight, pos_weight = call.logits, call.target, call.weight, call.pos_weight
    opts, reduction, need_grad = call.opts, call.reduction, call.need_grad
    acc = _acc(logits.dtype)
    shape = tuple(logits.shape)
    t = target.view(torch.uint8) if target.dtype == torch.bool else target
    has_ignore = opts.ignore_index is not None
    grad = empty_hugepage(*shape, dtype=logits.dtype) if need_grad else None
    out = torch.empty(shape, dtype=acc) if reduction == "none" else None
    w_pat = None if weight is None else _repeat_pattern(weight, shape)
    pw_pat = None if pos_weight is None else _repeat_pattern(pos_weight, shape)
    args = _BinaryArgs(
        n=logits.numel(), x=logits.data_ptr(), grad=_ptr(grad), t=t.data_ptr(),
        w=None if w_pat is None else w_pat[0].data_ptr(),
        pw=None if pw_pat is None else pw_pat[0].data_ptr(),
        w_inner=1 if w_pat is None else w_pat[1], w_period=1 if w_pat is None else w_pat[2],
        pw_inner=1 if pw_pat is None else pw_pat[1], pw_period=1 if pw_pat is None else pw_pat[2],
        loss=_ptr(out), x_dtype=_DT[logits.dtype], g_dtype=_DT[logits.dtype], t_dtype=_DT[t.dtype],
        has_ignore=int(has_ignore),
        ignore_value=0.0 if opts.ignore_index is None else float(opts.ignore_index),
        eps=float(opts.label_smoothing), gamma_pos=float(opts.gamma_pos),
        gamma_neg=float(opts.gamma_neg), alpha=-1.0 if opts.alpha is None else float(opts.alpha),
        clip=float(opts.clip), scale=1.0, n_threads=_threads(), mean=int(reduction == "mean"),
    )
    _check(getattr(_library(), f"ce_binary_{_suffix(acc)}")(ctypes.byref(args)))
    if out is not None:
        return out, grad
    return torch.tensor(args.total, dtype=acc), grad


# --------------------------------------------------------------------------------------------
# calibration statistics


class CalibrationRows(NamedTuple):
    """Outputs of :func:`calibration_rows`: per-row NumPy arrays (float64 unless noted), the
    classwise sums as tensors (views of one buffer with ``top``)."""

    conf: np.ndarray  #: top-label confidence
    pred: np.ndarray  #: first argmax (int64)
    nll: np.ndarray | None  #: -log p_y
    brier: np.ndarray | None  #: sum_k (p_k - [y = k])^2
    rowsum: np.ndarray  #: sum of the row's entries: finite iff every entry is
    rowmin: np.ndarray | None  #: smallest entry (probabilities)
    cw_p: Tensor | None  #: (M C) classwise sums of p per (bin b, class k) at b C + k
    cw_y: Tensor | None  #: (M C) classwise label counts per (bin, class)
    dmean: np.ndarray | None  #: E_p[x] - x_y, p = softmax(scale x) (``moments``)
    dvar: np.ndarray | None  #: Var_p[x] (``moments``)
    top: np.ndarray | None  #: (3 M + 2): per width bin of the confidence the count, the sum of
    #: confidences and the number correct; then the sums of the NLL and the Brier score (``top``)
    suspects: int  #: rows that fail (or, for a sum of logits that overflowed, may fail) the checks


def supports_calibration(x: Tensor) -> bool:
    """Whether :func:`calibration_rows` takes ``x`` (a CPU (N, C) tensor with contiguous rows)."""
    return (
        x.device.type == "cpu" and x.ndim == 2 and available() and _dtype_ok(x.dtype)
        and (x.shape[1] == 1 or x.stride(1) == 1)
    )


def calibration_rows(
    x: Tensor, y: Tensor, *, from_logits: bool, n_bins: int = 0, classwise: bool = True,
    top: bool = False, scores: bool = True, scale: float = 1.0, moments: bool = False,
    limits: tuple[float, float, float] = (-math.inf, math.inf, math.inf), library: ctypes.CDLL | None = None,
    cw_into: tuple[Tensor, Tensor] | None = None,
) -> CalibrationRows:
    """The calibration statistics of every row of ``x`` (N, C) with labels ``y`` (N,) (int64,
    in range) in one read of the rows: see ``ce_calibration`` in ``_kernels_body.h``. With
    ``n_bins`` > 0 also the classwise width-bin sums (unless ``classwise=False``) and, with
    ``top``, the sums of the top-label width bins and of the scores; ``scores=False`` skips the
    per-row NLL and Brier outputs. Logits only: ``scale`` (> 0) is the inverse temperature b of
    p = softmax(b x), and ``moments`` adds the mean and variance of x under p. Nothing is
    validated here: ``suspects`` counts the rows whose sum is not finite and, for probabilities,
    whose min is below ``limits[0]``, max above ``limits[1]`` or sum off one by more than
    ``limits[2]``; the caller checks the per-row outputs where there are any. ``library``:
    another build of ``_kernels.c`` (the tests' portable one). ``cw_into``: two contiguous
    float64 CPU tensors of C ``n_bins`` entries to which the classwise sums are added (whatever
    the rows: validate them first), returned as ``cw_p`` and ``cw_y``; a streaming meter's own
    sums, which a small batch would otherwise cost zeroing and adding in full."""
    n, c = x.shape
    y = y.to(torch.int64).contiguous()
    cw = n_bins > 0 and classwise
    if top and n_bins <= 0:
        raise ValueError("top needs n_bins > 0")
    # two NumPy allocations, the pointers into them by offset (a call on a small batch is mostly
    # this function's own time: slicing a tensor costs several times what NumPy's does): the
    # per-row outputs, one row each, and the sums, zeroed
    n_out = 3 + 2 * scores + (not from_logits) + 2 * moments
    rows = np.empty((n_out, n))
    n_cw = c * n_bins if cw else 0
    if cw_into is not None:
        if not cw or any(a.dtype != torch.float64 or a.device.type != "cpu" or not a.is_contiguous()
                         or a.numel() != n_cw for a in cw_into):
            raise ValueError(f"cw_into must be two contiguous float64 CPU tensors of {n_cw} entries"
                             " (classes times n_bins), with classwise sums asked for")
        n_cw = 0  # the sums array holds top only
    sums = np.zeros(2 * n_cw + (3 * n_bins + 2 if top else 0))
    rp, sp = rows.__array_interface__["data"][0], sums.__array_interface__["data"][0]
    cw_p_ptr, cw_y_ptr = ((cw_into[0].data_ptr(), cw_into[1].data_ptr()) if cw_into is not None
                          else (sp, sp + 8 * n_cw) if cw else (None, None))

    def at(i: int, on: bool = True) -> int | None:
        return rp + 8 * n * i if on else None

    args = _CalibrationArgs(
        n_rows=n, n_cols=c, x_row_stride=x.stride(0) if n > 1 else c, x=x.data_ptr(),
        x_dtype=_DT[x.dtype], from_logits=int(from_logits), y=y.data_ptr(), n_threads=_threads(),
        n_bins=n_bins, conf=at(0), pred=at(1), nll=at(3, scores), brier=at(4, scores), rowsum=at(2),
        rowmin=at(3 + 2 * scores, not from_logits), cw_p=cw_p_ptr, cw_y=cw_y_ptr, scale=scale,
        dmean=at(n_out - 2, moments), dvar=at(n_out - 1, moments), top=sp + 16 * n_cw if top else None,
        range_lo=limits[0], range_hi=limits[1], sum_tol=limits[2],
    )
    lib = library if library is not None else _library()
    _check(getattr(lib, f"ce_calibration_{_suffix(_acc(x.dtype))}")(ctypes.byref(args)))
    return CalibrationRows(
        conf=rows[0], pred=rows[1].view(np.int64), nll=rows[3] if scores else None,
        brier=rows[4] if scores else None, rowsum=rows[2],
        rowmin=None if from_logits else rows[3 + 2 * scores],
        cw_p=cw_into[0] if cw_into is not None else torch.from_numpy(sums[:n_cw]) if cw else None,
        cw_y=cw_into[1] if cw_into is not None else torch.from_numpy(sums[n_cw : 2 * n_cw]) if cw else None,
        dmean=rows[-2] if moments else None, dvar=rows[-1] if moments else None,
        top=sums[2 * n_cw :] if top else None, suspects=int(args.suspects),
    )
