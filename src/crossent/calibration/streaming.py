r"""Streaming, rank-aware calibration metrics: :class:`CalibrationMeter`.

The meter keeps sufficient statistics, so that a loop over batches (and over ranks) gives the
numbers of the one-shot functions on all the data without gathering the predictions:

* width bins: per bin the count :math:`n_b`, :math:`\sum_{i \in B_b} \hat p_i` and
  :math:`\sum_{i \in B_b} a_i`, from which :math:`\mathrm{ECE} = \sum_b |\sum \hat p - \sum a|
  / N`;
* classwise width bins: the same two sums for every (class, bin);
* sums of the per-sample NLL and Brier score, the number correct and the number of samples.

:meth:`CalibrationMeter.sync` all-reduces these (one ``torch.distributed.all_reduce`` of a
flat float64 vector; counts stay exact integers below :math:`2^{53}`), after one of two numbers
with the classwise sums, by which the ranks agree on the number of classes those hold (a rank
that measured nothing takes the others'). The statistics live on the CPU; the collectives run
where the group's backend takes tensors: on the CPU for gloo or MPI, on the current GPU for a
group that is NCCL only.

Equal-mass bins cannot be formed from fixed-size statistics: a bin edge is a quantile of all
confidences, which per-batch histograms cannot recover exactly. With ``binning="mass"`` the
meter therefore keeps every (confidence, correct) pair (9 bytes per sample: float64 and
uint8) and :meth:`~CalibrationMeter.sync` all-gathers them in rank order, so the AdaECE is
exactly :func:`~crossent.calibration.ece` with ``binning="mass"`` on the concatenated data.

Exactness. Counts and the number correct are exact. The confidences, bins and per-sample terms
come from the pass the one-shot functions make (:func:`crossent.calibration._rows.row_statistics`:
the native kernel on the CPU, else the same formulas as torch ops), so every sample lands in the
same bin; the float64 per-bin sums are added in a different order (per batch,
then across ranks), so the sums, and the ECE, agree with the one-shot value to float64
round-off (relative 1e-12 in the tests), and exactly when the sums are exact (dyadic values).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Literal

import numpy as np
import torch

from crossent.calibration._inputs import (
    RANGE_ATOL,
    ArrayLike,
    _to_tensor,
    as_matrix,
    binary_nll_terms,
    binary_shaped,
    check_binary_labels_shape,
    check_bool,
    check_ignore_index,
    drop_ignored,
    iter_chunks,
    label_array,
    looks_like_binary_probs,
    looks_like_probs,
    select,
    warn_if_unnormalised,
)
from crossent.calibration._rows import RowStatistics, row_statistics, top_sums
from crossent.calibration.metrics import (
    _check_binning,
    _check_n_bins,
    _check_num_classes,
    table_from_scores,
    table_from_sums,
)

__all__ = ["CalibrationMeter"]


def _collective_device(group: object | None = None) -> torch.device:
    """Where the tensors of a collective over ``group`` must be: the CPU when the group's
    backend takes CPU tensors (gloo, MPI, or a group made with ``backend=None``, which is
    ``cpu:gloo,cuda:nccl``), else the current device of the backend's first device type
    (``init_process_group("nccl")`` is ``cuda:nccl`` only: NCCL takes no CPU tensor)."""
    import torch.distributed as dist

    config = str(dist.get_backend_config(group))  # type: ignore[arg-type]  # "cpu:gloo,cuda:nccl"
    kinds = [part.split(":", 1)[0].strip() for part in config.split(",") if ":" in part]
    if not kinds or "cpu" in kinds:
        return torch.device("cpu")
    module = getattr(torch, kinds[0], None)
    current = getattr(module, "current_device", None)
    return torch.device(kinds[0], current() if callable(current) else 0)


#: order of the scalar statistics in the flat vector
_SCALARS = ("n", "correct", "nll", "brier")
#: the keys of CalibrationMeter.state_dict()
_STATE_KEYS = ("n_bins", "binning", "num_classes", "ignore_index", "classwise", "from_logits", "kind", "k",
               "labels_seen", "statistics", "conf", "correct")


def _not_statistics(f: np.ndarray, m: int, classwise: bool) -> str | None:
    """Why the flat vector ``f`` cannot be a sum of statistics of meters with ``m`` width bins,
    or None. Every entry of a sum is finite, the counts are non-negative whole numbers, the
    sums of probabilities and NLLs no more negative than the entries' tolerance allows (an
    update takes probabilities down to ``-RANGE_ATOL`` and up to ``1 + RANGE_ATOL``, whose
    NLL is below 0, so a meter's own sums may be slightly negative), the bins' counts add up
    to the samples and, with classwise sums, so do the label counts (one per sample): which
    also catches another meter's statistics of the same length read with other bins or
    classes."""
    if not np.isfinite(f).all():
        return f"entry {int(np.flatnonzero(~np.isfinite(f))[0])} is NaN or infinite"
    counts = [f[:m], f[3 * m : 3 * m + 2]]
    n = f[3 * m]
    cw_y = f[3 * m + 4 + (f.shape[0] - 3 * m - 4) // 2 :] if classwise else np.empty(0)
    low = np.full(f.shape, -RANGE_ATOL * max(float(n), 1.0))
    low[:m] = low[3 * m : 3 * m + 2] = 0.0  # counts
    if classwise:
        low[f.shape[0] - cw_y.shape[0] :] = 0.0
    if (f < low).any():
        i = int(np.flatnonzero(f < low)[0])
        return f"entry {i} is negative ({f[i]:.6g})"
    if any((c != np.round(c)).any() for c in (*counts, cw_y)):
        return "a count (samples, correct, per bin or per class and bin) is not a whole number"
    if f[:m].sum() != n:
        return f"its bins count {f[:m].sum():.17g} samples, its total {n:.17g}"
    if classwise and cw_y.sum() != n:
        return f"its classwise bins count {cw_y.sum():.17g} labels, its total {n:.17g} samples"
    return None


class CalibrationMeter:
    """Accumulate ECE, classwise ECE, Brier, NLL and accuracy over batches and ranks.

    Parameters
    ----------
    n_bins, binning:
        Bins of the top-label ECE, as in :func:`~crossent.calibration.ece` (``"mass"``
        keeps the per-sample pairs; see the module docstring).
    num_classes:
        Number of classes; optional (taken from the first batch), checked on every batch.
        Binary and multi-label batches have the two classes [1 - p, p]: 2 or ``None``.
    ignore_index:
        Labels equal to it are left out.
    from_logits:
        ``True`` for logits, ``False`` for probabilities, ``None`` to detect it on the first
        batch (rows in [0, 1] summing to one are probabilities; binary and multi-label scores
        all in [0, 1]; both within the round-off ``from_logits=False`` accepts) and keep it until
        :meth:`reset`.
    classwise:
        Also accumulate the classwise ECE (K M bins). It adds every one of the N K
        probabilities to a float64 column total: on the CPU about 10 % more than the rest of an
        update from probabilities and 30-45 % more from logits (BENCHMARKS.md); ``False`` skips
        it.

    Notes
    -----
    Binary (N,) or (N, 1) and multi-label (N, L) inputs with 0/1 labels of the same shape are
    pooled binary problems, as in :func:`~crossent.calibration.ece`.

    Examples
    --------
    >>> m = CalibrationMeter(n_bins=15)
    >>> for logits, labels in loader:            # doctest: +SKIP
    ...     m.update(logits, labels)
    >>> m.sync(); m.compute()["ece"]             # doctest: +SKIP
    """

    def __init__(
        self,
        n_bins: int = 15,
        binning: Literal["width", "mass"] = "width",
        *,
        num_classes: int | None = None,
        ignore_index: int | None = None,
        from_logits: bool | None = None,
        classwise: bool = True,
    ) -> None:
        self.n_bins = _check_n_bins(n_bins)
        self.binning = _check_binning(binning)
        self.num_classes = _check_num_classes(num_classes)
        self.ignore_index = check_ignore_index(ignore_index)
        self._from_logits_option = check_bool("from_logits", from_logits, none=True)
        self.classwise = check_bool("classwise", classwise)
        self.reset()

    def reset(self) -> None:
        """Forget every update (the options stay; ``from_logits=None`` detects afresh)."""
        self.from_logits: bool | None = self._from_logits_option
        self._kind: str | None = None
        self._k: int | None = self.num_classes
        self._bins = np.zeros((3, self.n_bins))  # count, sum of confidence, sum correct
        self._scalars = np.zeros(len(_SCALARS))
        self._cw_p: np.ndarray | None = None  # float64, bin-major as RowStatistics.cw_p
        self._cw_y: np.ndarray | None = None
        self._conf: list[np.ndarray] = []
        self._correct: list[np.ndarray] = []
        self._synced: dict[str, object] | None = None
        self._labels_seen = 0  # labels of accepted updates, ignored ones included

    # ------------------------------------------------------------------ update
    @torch.compiler.disable  # a Python accumulator: traced, it recompiles on every batch
    def update(self, logits_or_probs: ArrayLike, labels: ArrayLike) -> None:
        """Add a batch: (N, C) with labels (N,), or binary (N,) or (N, 1) / multi-label (N, L)
        with 0/1 labels of the same shape (so (N, C) softmax logits with one-hot labels are
        measured as multi-label: pass ``labels.argmax(1)``). A batch whose labels all equal
        ``ignore_index`` adds nothing."""
        lab = label_array(labels)
        before = (self.from_logits, self._kind, self._k)
        try:
            if lab.size == 0 or (self.ignore_index is not None and bool((lab == self.ignore_index).all())):
                self._check_unmeasured(logits_or_probs, lab)  # nothing to add: shapes checked only
            else:
                self._update(logits_or_probs, labels, lab)
        except BaseException as e:  # a rejected batch leaves the meter as it was, detection included
            self.from_logits, self._kind, self._k = before
            why = self._read_as_probabilities(e) if isinstance(e, ValueError) else e
            if why is not e:
                raise why from None
            raise
        self._labels_seen += lab.size

    def _check_unmeasured(self, logits_or_probs: ArrayLike, lab: np.ndarray) -> None:
        """The checks of a batch with no label to measure (empty, or every label ignored): its
        scores' type and shape, against its labels and the meter's other batches, which it then
        fixes as a measured batch does (the values, which nothing reads, are not checked: the
        ignored rows of padding may hold anything). An empty 1-D batch fixes nothing."""
        name = "logits_or_probs"
        t = _to_tensor(logits_or_probs, name)
        if binary_shaped(t.shape, lab.shape):
            check_binary_labels_shape(t, lab, name)
            if t.ndim > 1 or t.numel() > 0:
                # an empty 1-D batch ((0,) scores, np.array([]) say) may come from any problem:
                # it fixes no kind, so that the (N, C) batches after it are taken
                self._note_shape("binary", 2)
            return
        if t.ndim != 2:
            as_matrix(t, name, metrics=True)  # raises, with the reshape that fixes (B, T, C) scores
        flat = lab.reshape(-1) if lab.ndim == 2 and 1 in lab.shape else lab
        if flat.ndim != 1 or flat.shape[0] != t.shape[0]:
            raise ValueError(
                f"labels have shape {lab.shape} but {name} has {t.shape[0]} rows;"
                " (N, C) scores take N class labels, one per row"
            )
        self._note_shape("multiclass", t.shape[1])

    def _note_shape(self, kind: str, k: int) -> None:
        """Check a batch's kind and number of classes against the meter's; the first batch
        sets them."""
        if self._kind is None:
            self._kind = kind
        elif kind != self._kind:
            raise ValueError(f"this batch is {kind} but the meter holds {self._kind} batches")
        if kind == "binary":
            if self.num_classes not in (None, 2):
                raise ValueError(
                    f"num_classes={self.num_classes}, but binary and multi-label batches are measured"
                    " as the two classes [1 - p, p]: pass num_classes=2 or leave it out"
                )
            if self._k not in (None, 2):
                raise ValueError(
                    f"this batch is binary (the two classes [1 - p, p]), the meter holds {self._k} classes"
                )
            return
        if self._k is None:
            self._k = k
        elif k != self._k:
            raise ValueError(f"this batch has {k} classes, the meter {self._k}; keep them equal")

    def _update(self, logits_or_probs: ArrayLike, labels: ArrayLike, lab: np.ndarray) -> None:
        detecting = self.from_logits is None  # until this batch has told: "logits_or_probs" in errors
        if detecting:
            x = logits_or_probs
            t = drop_ignored(_to_tensor(x, "logits_or_probs"), lab, self.ignore_index)
            if t.ndim == 2 and t.shape[0] > 0 and not binary_shaped(t.shape, lab.shape):
                # Rows of probabilities are told apart from logits on the first chunk of rows;
                # if it holds probabilities, the rest is checked by the update's own pass
                # (_update_multiclass), which validates every row as probabilities: no extra
                # read of the batch.
                start, stop = next(iter_chunks(t))
                if not looks_like_probs(t[start:stop], "logits_or_probs"):
                    self.from_logits = True
                    warn_if_unnormalised(t[start:stop], "logits_or_probs")
            elif t.numel() > 0:  # binary and multi-label: every score in [0, 1]
                self.from_logits = not looks_like_binary_probs(t)
        kind, t, y, rows = select(  # the labels as read above
            logits_or_probs, lab, from_logits=bool(self.from_logits), ignore_index=self.ignore_index,
            # logits given as such that look like probabilities warn, on the first samples only
            check_probs=not detecting and self._scalars[0] == 0,
        )
        self._note_shape(kind, 2 if kind == "binary" else t.shape[1])
        if kind == "binary":  # positive-class probabilities; classwise on [1 - p, p]
            p = t  # float64 in [0, 1]; NumPy below: on a small batch a torch op costs several times more
            conf, correct = p.numpy(), y.astype(np.float64)
            # from logits the logits themselves, as nll: 1 - sigmoid(z) is 0 at large z
            scores = (drop_ignored(_to_tensor(logits_or_probs, "logits_or_probs"), lab, self.ignore_index)
                      if self.from_logits else p)
            nll_sum = float(binary_nll_terms(scores, y, from_logits=bool(self.from_logits)).sum())
            r = None
            if self.classwise:  # the two columns, as classwise_ece
                r = row_statistics(torch.stack([1.0 - p, p], 1), torch.from_numpy(y), from_logits=False,
                                   name="probs", n_bins=self.n_bins, scores=False)
                assert r.cw_p is not None and r.cw_y is not None
            # every statistic of the batch is computed: only now is any of it added
            self._add_scores(conf, correct)
            self._add_scalars(conf.shape[0], int(np.count_nonzero((conf > 0.5) == (y == 1))), nll_sum,
                              float(np.square(conf - correct).sum()))
            if r is not None and r.cw_p is not None and r.cw_y is not None:
                self._add_classwise_sums(r.cw_p, r.cw_y)
            return
        if t.shape[0] == 0:
            return
        name = "logits_or_probs" if detecting else "logits" if self.from_logits else "probs"
        self._update_multiclass(t, torch.from_numpy(y), rows, name)

    def _read_as_probabilities(self, error: ValueError) -> ValueError:
        """``error`` of a batch refused as probabilities, with why where the meter's detection
        chose them on an earlier batch (binary scores all in [0, 1], or rows summing to one) and
        the error asks for ``from_logits=True``: the fix is the meter's option, not the call's."""
        detected_probs = self.from_logits is False and self._from_logits_option is None
        if not detected_probs or "from_logits=True" not in str(error):
            return error
        return ValueError(f"{error} (this meter read its first batch as probabilities; if the scores are"
                          " logits, make it with CalibrationMeter(from_logits=True))")

    def _update_multiclass(
        self, t: torch.Tensor, y: torch.Tensor, rows: np.ndarray | None, name: str
    ) -> None:
        """One read of the batch (:func:`~crossent.calibration._rows.row_statistics`, the pass of
        the one-shot functions): for width bins the sums of the top-label bins and of the NLL
        and Brier score taken in that pass (the per-row values for mass bins), and the classwise
        bin sums, added to the statistics only once the whole batch is validated. ``rows``: the
        input's number of each row of ``t`` (for the errors), ``name`` the input's in them."""
        n = t.shape[0]
        width = self.binning == "width"  # the bins and scores summed in the pass itself
        m = self.n_bins
        # A batch of fewer rows than 2 M adds its classwise sums into the meter's own by a
        # second pass over its validated rows: 2 K M sums of its own, zeroed and added in full,
        # would cost more than the batch.
        in_place = self.classwise and n < 2 * m

        def statistics(from_logits: bool) -> RowStatistics:
            return row_statistics(t, y, from_logits=from_logits, name=name, n_bins=m,
                                  classwise=self.classwise and not in_place, top=width, scores=not width,
                                  rows=rows)

        r = None
        if self.from_logits is None:  # the first batch's first rows are probabilities: are all?
            try:
                r = statistics(False)
            except ValueError:
                # a row is not: logits, as looks_like_probs on the whole batch says, with its
                # warning where every entry lies in [0, 1] (the rows' sums are off one)
                self.from_logits = True
                warn_if_unnormalised(t, name)
            else:
                self.from_logits = False
        if r is None:
            r = statistics(self.from_logits)
        if in_place:  # the rows are valid: the second pass cannot refuse them
            k = t.shape[1]
            if self._cw_p is None or self._cw_y is None:
                self._cw_p, self._cw_y = np.zeros(k * m), np.zeros(k * m)
            row_statistics(t, y, from_logits=bool(self.from_logits), name=name, n_bins=m, scores=False,
                           rows=rows, cw_into=(torch.from_numpy(self._cw_p), torch.from_numpy(self._cw_y)))
            self._synced = None
        if r.top is not None:
            top = r.top
            self._bins += top[: 3 * m].reshape(3, m)
            self._add_scalars(n, float(top[2 * m : 3 * m].sum()), float(top[3 * m]), float(top[3 * m + 1]))
            self._synced = None
        else:
            assert r.nll is not None and r.brier is not None
            correct = (r.pred == y.numpy()).astype(np.float64)
            self._add_scores(r.conf, correct)
            self._add_scalars(n, float(correct.sum()), float(r.nll.sum()), float(r.brier.sum()))
        if r.cw_p is not None and r.cw_y is not None:
            self._add_classwise_sums(r.cw_p, r.cw_y)

    def _add_scalars(self, n: int, correct: float, nll: float, brier: float) -> None:
        s = self._scalars  # item by item: a list made into an array costs more on a small batch
        s[0] += n
        s[1] += correct
        s[2] += nll
        s[3] += brier

    def _add_scores(self, conf: np.ndarray, correct: np.ndarray) -> None:
        if self.binning == "mass":
            self._conf.append(conf.astype(np.float64, copy=True))
            self._correct.append(correct.astype(np.uint8))
        m = self.n_bins
        self._bins += top_sums(conf, correct, None, None, m)[: 3 * m].reshape(3, m)
        self._synced = None

    def _add_classwise_sums(self, cw_p: torch.Tensor, cw_y: torch.Tensor) -> None:
        if self._cw_p is None or self._cw_y is None:  # NumPy: a small batch's adds cost less
            self._cw_p, self._cw_y = cw_p.numpy().copy(), cw_y.numpy().copy()
        else:
            self._cw_p += cw_p.numpy()
            self._cw_y += cw_y.numpy()
        self._synced = None

    # ------------------------------------------------------------------ ranks
    def _flat(self) -> torch.Tensor:
        parts = [torch.from_numpy(self._bins.reshape(-1)), torch.from_numpy(self._scalars)]
        if self.classwise:
            k = 2 if self._kind == "binary" else self._k
            if self._cw_p is None or self._cw_y is None:
                size = (k or 0) * self.n_bins
                parts += [torch.zeros(size, dtype=torch.float64)] * 2
            else:
                parts += [torch.from_numpy(self._cw_p), torch.from_numpy(self._cw_y)]
        return torch.cat(parts)

    def statistics(self) -> torch.Tensor:
        """The sufficient statistics as one flat float64 tensor (a copy): what :meth:`sync`
        all-reduces. Sum them across meters with the same options and give the sum to
        :meth:`load_statistics` to combine them another way (e.g. a torchmetrics state)."""
        if self.binning == "mass":
            raise ValueError("mass bins keep per-sample pairs, not fixed statistics; use sync()")
        return self._flat().clone()

    def load_statistics(self, flat: torch.Tensor) -> None:
        """Replace the meter's statistics with ``flat`` (a sum of :meth:`statistics`): then
        :meth:`compute` reports on it, :meth:`statistics` returns it and later updates add to
        it. A meter that has not yet seen its number of classes (no ``num_classes``, no update)
        reads it off the length of ``flat``. What detection decided (``from_logits``) is not in
        ``flat``: :meth:`state_dict` keeps it, and the per-sample pairs of mass bins."""
        if self.binning == "mass":
            raise ValueError(
                "mass bins keep per-sample pairs, not fixed statistics; use sync(), or state_dict()"
                " and load_state_dict() to save and resume a meter"
            )
        self._set_statistics(flat, "flat")

    def _set_statistics(self, flat: object, name: str) -> None:
        """Validate ``flat`` as a sum of statistics of this meter's options and make it the
        meter's own; K is read off its length where the meter does not know it yet."""
        if not isinstance(flat, torch.Tensor | np.ndarray):
            raise TypeError(
                f"{name} must be a tensor (CalibrationMeter.statistics()), got {type(flat).__name__}"
            )
        flat = torch.as_tensor(flat, dtype=torch.float64).detach().cpu()
        m = self.n_bins
        extra = flat.shape[0] - (3 * m + 4) if flat.ndim == 1 else -1
        free = self.classwise and self._k is None and self._kind is None  # K still unknown
        if not (free and extra >= 4 * m and extra % (2 * m) == 0) and flat.shape != self._flat().shape:
            raise ValueError(
                f"{name} has shape {tuple(flat.shape)}, the meter's statistics {tuple(self._flat().shape)};"
                " use meters with the same n_bins, num_classes and classwise"
            )
        f = flat.numpy().copy()
        problem = _not_statistics(f, m, self.classwise)
        if problem:
            raise ValueError(
                f"{name} is not a sum of CalibrationMeter.statistics() with n_bins={m}"
                f" (classwise={self.classwise}): {problem}"
            )
        self._bins = f[: 3 * m].reshape(3, m)
        self._scalars = f[3 * m : 3 * m + 4]
        if self.classwise:
            rest = f[3 * m + 4 :]
            half = rest.shape[0] // 2
            if free and half:
                self._k = half // m
            self._cw_p, self._cw_y = (rest[:half], rest[half:]) if half else (None, None)
        self._synced = None

    def state_dict(self) -> dict[str, object]:
        """What the meter has accumulated, to save mid-stream (``torch.save``) and resume with
        :meth:`load_state_dict`: the options (which the loading meter must share), what the
        first batch decided (``from_logits``, the kind of input, the number of classes), the
        statistics and, for mass bins, the per-sample (confidence, correct) pairs. Tensors
        are copies. After :meth:`sync` it is still this rank's own data (what a resumed rank
        goes on adding to), not the all-reduced numbers :meth:`compute` gives."""
        mass = self.binning == "mass"
        conf = np.concatenate(self._conf) if mass and self._conf else np.empty(0)
        correct = np.concatenate(self._correct) if mass and self._correct else np.empty(0, np.uint8)
        return {
            "n_bins": self.n_bins,
            "binning": self.binning,
            "num_classes": self.num_classes,
            "ignore_index": self.ignore_index,
            "classwise": self.classwise,
            "from_logits": self.from_logits,
            "kind": self._kind,
            "k": self._k,
            "labels_seen": self._labels_seen,
            "statistics": self._flat().clone(),
            "conf": torch.from_numpy(conf.astype(np.float64)),
            "correct": torch.from_numpy(correct.astype(np.uint8)),
        }

    def load_state_dict(self, state: Mapping[str, object]) -> None:
        """Resume from :meth:`state_dict`: the meter then holds exactly what the saved one did,
        and further updates add to it. The options must match (``n_bins``, ``binning``,
        ``num_classes``, ``ignore_index``, ``classwise``, and ``from_logits`` where both fix
        it); a state that no meter makes is refused with the reason, and leaves this meter as
        it was."""
        if not isinstance(state, Mapping):
            raise TypeError(
                f"state must be a dict from CalibrationMeter.state_dict(), got {type(state).__name__}"
            )
        missing = [key for key in _STATE_KEYS if key not in state]
        if missing:
            raise ValueError(
                f"state lacks {', '.join(map(repr, missing))}: it is not from CalibrationMeter.state_dict()"
            )
        def whole(x: object) -> bool:  # an int of Python or NumPy, not a bool (True == 1)
            return isinstance(x, (int, np.integer)) and not isinstance(x, (bool, np.bool_))

        for key in ("n_bins", "binning", "num_classes", "ignore_index", "classwise"):
            ours = getattr(self, key)
            same_type = type(state[key]) is type(ours) or (whole(state[key]) and whole(ours))
            if state[key] != ours or not same_type:
                raise ValueError(
                    f"state has {key}={state[key]!r}, this meter {key}={getattr(self, key)!r};"
                    f" make the meter with {key}={state[key]!r} to load it"
                )
        fl, kind, k, seen = state["from_logits"], state["kind"], state["k"], state["labels_seen"]
        fixed = self._from_logits_option
        if not (fl is None or isinstance(fl, bool)) or (fixed is not None and fl is not None and fl != fixed):
            raise ValueError(
                f"state has from_logits={fl!r}, this meter from_logits={self._from_logits_option!r};"
                " make the meter with from_logits=None or the state's value"
            )
        if kind not in (None, "binary", "multiclass"):
            raise ValueError(f"state has kind={kind!r}; a meter's is None, 'binary' or 'multiclass'")
        if k is not None and (not isinstance(k, int) or isinstance(k, bool) or k < 1
                              or (self.num_classes is not None and k != self.num_classes)):
            raise ValueError(
                f"state has k={k!r}; a meter's is None or its number of classes (a positive int)"
            )
        if not isinstance(seen, int) or isinstance(seen, bool) or seen < 0:
            raise ValueError(f"state has labels_seen={seen!r}; a meter's is a non-negative int")
        conf, correct = state["conf"], state["correct"]
        if not (isinstance(conf, torch.Tensor) and isinstance(correct, torch.Tensor)):
            raise TypeError("state's conf and correct must be tensors, as state_dict() gives them")
        conf_np = conf.detach().cpu().to(torch.float64).numpy().reshape(-1)
        correct_np = correct.detach().cpu().to(torch.float64).numpy().reshape(-1)
        saved = (self.from_logits, self._kind, self._k, self._bins, self._scalars, self._cw_p, self._cw_y,
                 self._synced)
        # the state's K and kind, not what this meter held, size its statistics
        self.from_logits = fl if fl is not None else fixed
        self._kind, self._k, self._cw_p, self._cw_y = kind, k, None, None
        try:
            self._set_statistics(state["statistics"], "state['statistics']")
            n = int(self._scalars[0])
            if self.binning == "mass":
                if conf_np.shape[0] != n or correct_np.shape[0] != n:
                    raise ValueError(
                        f"state holds {conf_np.shape[0]} confidences and {correct_np.shape[0]} correct flags"
                        f" for {n} samples; mass bins keep one pair per sample"
                    )
                # the confidences an update takes: within RANGE_ATOL of [0, 1]
                if not (np.isfinite(conf_np).all() and (conf_np >= -RANGE_ATOL).all()
                        and (conf_np <= 1 + RANGE_ATOL).all()):
                    raise ValueError("state's conf must hold confidences in [0, 1]")
                if not np.isin(correct_np, (0.0, 1.0)).all():
                    raise ValueError("state's correct must hold 0 or 1 per sample")
            elif conf_np.shape[0] or correct_np.shape[0]:
                raise ValueError("state holds per-sample pairs, which only mass bins keep")
        except BaseException:
            (self.from_logits, self._kind, self._k, self._bins, self._scalars, self._cw_p, self._cw_y,
             self._synced) = saved
            raise
        self._conf = [conf_np.copy()] if conf_np.shape[0] else []
        self._correct = [correct_np.astype(np.uint8)] if correct_np.shape[0] else []
        self._labels_seen = seen

    @torch.compiler.disable
    def sync(self, group: object | None = None) -> None:
        """All-reduce the statistics over the ranks of ``group`` (default: the world); no-op
        without an initialised process group. Every rank must call it; afterwards
        :meth:`compute` gives the numbers over all ranks' data, until the next update. A rank
        with no data (no update, or only padding) takes part with empty statistics. The ranks
        must agree, as one meter's batches must: the same options (``n_bins``, ``binning``,
        ``classwise``, ``ignore_index``), and among the ranks that measured a batch the same
        kind of input (binary or multiclass), number of classes and reading of the scores
        (``from_logits``). Where they do not, or where no rank knows the number of classes
        that the classwise sums need, every rank raises the same error: none is left waiting
        in a collective, and no statistics change."""
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized()):
            return
        device = _collective_device(group)
        self._agree(group, device)
        flat = self._flat().to(device, copy=True)
        dist.all_reduce(flat, group=group)  # type: ignore[arg-type]
        synced: dict[str, object] = {"flat": flat.cpu()}
        if self.binning == "mass":
            conf = np.concatenate(self._conf) if self._conf else np.empty(0)
            correct = np.concatenate(self._correct) if self._correct else np.empty(0, np.uint8)
            world = dist.get_world_size(group)  # type: ignore[arg-type]
            size = torch.tensor([conf.shape[0]], dtype=torch.int64, device=device)
            sizes = [torch.zeros(1, dtype=torch.int64, device=device) for _ in range(world)]
            dist.all_gather(sizes, size, group=group)  # type: ignore[arg-type]
            most = max(int(s) for s in sizes)
            pairs = torch.zeros((2, most), dtype=torch.float64)
            pairs[0, : conf.shape[0]] = torch.from_numpy(conf)
            pairs[1, : conf.shape[0]] = torch.from_numpy(correct.astype(np.float64))
            pairs = pairs.to(device)
            gathered = [torch.empty_like(pairs) for _ in range(world)]
            dist.all_gather(gathered, pairs, group=group)  # type: ignore[arg-type]
            parts = [g[:, : int(s)].cpu().numpy() for g, s in zip(gathered, sizes, strict=True)]
            synced["conf"] = np.concatenate([q[0] for q in parts])
            synced["correct"] = np.concatenate([q[1] for q in parts])
        self._synced = synced

    def _agree(self, group: object | None, device: torch.device) -> None:
        """Check that the ranks' meters can be summed: one all-reduce (a maximum) of each value
        v below sent as the pair (v, -v), which gives every rank the largest and the smallest;
        a rank that does not know a value (it measured no batch yet) sends (-2^53, -2^53),
        which changes neither. So every rank raises the same error or none does, never one
        rank alone while the others wait in a collective. The number of classes K, which sizes
        the classwise sums, comes from the ranks that know it (a rank that measured nothing
        yet, such as one whose batches were all padding, takes theirs)."""
        import torch.distributed as dist

        unknown = -float(2**53)
        k = 2 if self._kind == "binary" else self._k
        named: list[tuple[str, float | None]] = [
            ("n_bins", float(self.n_bins)),
            ("binning", float(self.binning == "mass")),
            ("classwise", float(self.classwise)),
            ("ignore_index", float(self.ignore_index) if self.ignore_index is not None else None),
            ("ignore_index", float(self.ignore_index is None)),
            ("kind", None if self._kind is None else float(self._kind == "binary")),
            ("classes", None if k is None else float(k)),
            ("from_logits", None if self._kind is None or self.from_logits is None
             else float(self.from_logits)),
        ]
        head = torch.tensor([(unknown, unknown) if v is None else (v, -v) for _, v in named],
                            dtype=torch.float64, device=device)
        dist.all_reduce(head, op=dist.ReduceOp.MAX, group=group)  # type: ignore[arg-type]
        spans = [(name, None if hi == unknown else (-neg_lo, hi))
                 for (name, _), (hi, neg_lo) in zip(named, head.cpu().tolist(), strict=True)]

        def differ(name: str) -> bool:
            return any(span is not None and span[0] != span[1] for n, span in spans if n == name)

        for name in ("n_bins", "binning", "classwise", "ignore_index"):
            if differ(name):
                raise ValueError(
                    f"sync: the ranks' meters differ in {name}; make every rank's CalibrationMeter with"
                    " the same options"
                )
        if differ("kind"):
            raise ValueError(
                "sync: some ranks' meters hold binary batches and others multiclass ones; every rank"
                " must measure the same kind of input"
            )
        classes = dict(spans)["classes"]
        if classes is not None and classes[0] != classes[1]:
            raise ValueError(
                f"sync: the ranks' meters hold {int(classes[0])} to {int(classes[1])} classes; every rank"
                " must measure the same classes (pass the same num_classes= everywhere)"
            )
        if differ("from_logits"):
            raise ValueError(
                "sync: some ranks read their scores as logits and others as probabilities (each meter"
                " decides on its first batch); pass the same from_logits= to every rank's meter"
            )
        if self.classwise and classes is None:
            raise RuntimeError(
                "sync: no rank has measured a batch, so the number of classes of the classwise sums is"
                " unknown; pass num_classes= to CalibrationMeter, or classwise=False"
            )
        if k is None and classes is not None:
            self._k = int(classes[1])

    # ------------------------------------------------------------------ result
    @torch.compiler.disable
    def compute(self) -> dict[str, float]:
        """``ece`` (AdaECE for mass bins), ``classwise_ece`` (NaN if not accumulated),
        ``brier``, ``nll``, ``accuracy`` and ``count``, over every update (and every rank
        after :meth:`sync`)."""
        flat = (self._synced["flat"] if self._synced is not None else self._flat())
        assert isinstance(flat, torch.Tensor)
        f = flat.numpy()
        m = self.n_bins
        bins = f[: 3 * m].reshape(3, m)
        n_, correct, nll, brier = f[3 * m : 3 * m + 4]
        n = int(n_)
        if n == 0:
            if self._labels_seen and self.ignore_index is not None:
                raise RuntimeError(
                    f"the meter holds no samples: all {self._labels_seen} labels of its updates equal"
                    f" ignore_index={self.ignore_index}"
                )
            if self._kind is not None:  # updated, with empty batches only
                raise RuntimeError("the meter holds no samples: its updates held none (empty batches)")
            raise RuntimeError("the meter holds no samples: call update(logits, labels) first")
        if self.binning == "mass":
            if self._synced is not None and "conf" in self._synced:
                conf = np.asarray(self._synced["conf"])
                acc = np.asarray(self._synced["correct"])
            else:
                conf, acc = np.concatenate(self._conf), np.concatenate(self._correct).astype(np.float64)
            ece = table_from_scores(conf, acc, n_bins=m, binning="mass").calibration_error("l1")
        else:
            ece = table_from_sums(bins[0], bins[1], bins[2]).calibration_error("l1")
        cw = math.nan
        if self.classwise:
            rest = f[3 * m + 4 :]
            half = rest.shape[0] // 2
            k = half // m
            if k:
                cw = float(np.abs(rest[:half] - rest[half:]).sum() / (n * k))
        return {
            "ece": ece,
            "classwise_ece": cw,
            "brier": float(brier / n),
            "nll": float(nll / n),
            "accuracy": float(correct / n),
            "count": float(n),
        }

