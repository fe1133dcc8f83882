r"""The grid of losses that ``crossent run`` compares, by name, built on crossent's API.

Every loss is :func:`crossent.cross_entropy` with options; its per-sample value is

.. math::

    \ell(z, y) = \sum_k w_k \tilde t_k (1 - q_k)^{\gamma} (-\log q_k) - \beta H(q),
    \qquad q = \mathrm{softmax}(z),

with :math:`\tilde t` the (smoothed) target, :math:`w` class weights, :math:`\gamma` the
focal exponent and :math:`\beta` the confidence penalty.

Names (``--losses`` takes a comma-separated list of them):

============== =================================================================
``ce``          cross-entropy
``ls-E``        label smoothing with :math:`\varepsilon = E` (Szegedy et al. 2016),
                e.g. ``ls-0.05``, ``ls-0.1``
``focal-G``     focal loss with :math:`\gamma = G` (Lin et al. 2017), e.g. ``focal-3``
``flsd-53``     sample-dependent focal loss of Mukhoti et al. 2020: :math:`\gamma = 5`
                when :math:`p_t < 0.2`, else 3
``cp-B``        confidence penalty :math:`-\beta H(q)` with :math:`\beta = B`
                (Pereyra et al. 2017, who tune :math:`\beta` per task); the default grid
                uses the mild ``cp-0.1``, which leaves accuracy unchanged on the bundled
                tasks
``weighted-ce`` CE with inverse-frequency class weights
                (``crossent.class_weights(method="inverse")``)
``cb-focal``    class-balanced focal loss (Cui et al. 2019): effective-number weights
                :math:`(1-\beta)/(1-\beta^{n_c})`, :math:`\beta = 0.999`, and
                :math:`\gamma = 1`; ``cb-focal-G`` sets :math:`\gamma = G`
``la-ce``       logit-adjusted CE (Menon et al. 2021): CE of :math:`z + \tau \log \pi`
                with the training prior :math:`\pi` and :math:`\tau = 1`; ``la-ce-T`` sets
                :math:`\tau = T`. Predictions use :math:`z` alone, which undoes the prior
``kd-NAME``     a student distilled from the teacher trained with loss ``NAME``
                (e.g. ``kd-ce``, ``kd-ls-0.1``): CE against the teacher's softened
                probabilities :math:`\mathrm{softmax}(z^{t}/\tau)`, on :math:`z/\tau`, times
                :math:`\tau^2` (Hinton et al. 2015), :math:`\tau = 4`; the student sees no
                hard labels. Only on the ``distill`` task
============== =================================================================

``weighted-ce``, ``cb-focal`` and ``la-ce`` use the training-set class counts and are added
to the grid of imbalanced tasks only (on balanced data they equal ``ce`` / ``focal-1`` up to
scale, or ``ce`` exactly).

The confidence penalty :math:`\mathrm{CE} - \beta H(q)` with :math:`\beta = \gamma` is the
lower bound of focal loss, :math:`\mathrm{FL}_\gamma \ge \mathrm{CE} - \gamma H(q)`
(Mukhoti et al. 2020), so the balanced grid runs ``cp-1`` and ``cp-3`` beside ``focal-1``
and ``focal-3``. For :math:`\beta > 1` the penalty outweighs the likelihood near the uniform
distribution: the per-sample minimiser keeps the true class on top but pushes every
probability towards :math:`1/K`, so training stays finite but the model is underconfident.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

__all__ = [
    "BALANCED_LOSSES",
    "DISTILL_LOSSES",
    "IMBALANCED_LOSSES",
    "KD_TEMPERATURE",
    "QUICK_BALANCED_LOSSES",
    "QUICK_IMBALANCED_LOSSES",
    "LossFn",
    "LossSpec",
    "default_losses",
    "parse_loss",
    "parse_losses",
]

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]

#: The default grid on balanced tasks: focal gamma in {1, 2, 3} beside the confidence
#: penalty beta in {0.1, 1, 3} (the bound FL_gamma >= CE - gamma H), and label smoothing.
BALANCED_LOSSES: tuple[str, ...] = (
    "ce", "ls-0.05", "ls-0.1", "focal-1", "focal-2", "focal-3", "flsd-53", "cp-0.1", "cp-1",
    "cp-3",
)
#: The default grid on imbalanced tasks: CE, one representative of each calibration family,
#: the re-weighted losses and the logit-adjusted loss.
IMBALANCED_LOSSES: tuple[str, ...] = (
    "ce", "ls-0.1", "focal-3", "weighted-ce", "cb-focal", "la-ce",
)
#: The distillation task: a student of each teacher, and the same model on the hard labels.
DISTILL_LOSSES: tuple[str, ...] = ("ce", "kd-ce", "kd-ls-0.1")
#: ``--quick``'s reduced grids.
QUICK_BALANCED_LOSSES: tuple[str, ...] = ("ce", "ls-0.1", "focal-3", "cp-3")
QUICK_IMBALANCED_LOSSES: tuple[str, ...] = ("ce", "focal-3", "weighted-ce", "la-ce")

#: Distillation temperature (Hinton et al. 2015 use 1..20; 4 is a common middle).
KD_TEMPERATURE = 4.0

#: Effective-number beta of ``cb-focal`` (Cui et al. 2019 search {0.9, 0.99, 0.999, 0.9999}).
CB_BETA = 0.999

_NUM = r"(\d+(?:\.\d*)?|\.\d+)"


@dataclass(frozen=True)
class LossSpec:
    """One named loss of the grid: its options for :func:`crossent.cross_entropy`."""

    name: str
    label: str
    label_smoothing: float = 0.0
    gamma: float | str = 0.0  # a number, or "flsd53"
    confidence_penalty: float = 0.0
    weighting: str | None = None  # None, "inverse" or "effective_number"
    logit_adjust: float = 0.0  # tau of the logit-adjusted loss (0: off)
    teacher: str | None = None  # kd-NAME: the teacher's loss name
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def needs_counts(self) -> bool:
        """Whether the loss uses the training-set class counts."""
        return self.weighting is not None or self.logit_adjust != 0.0

    def build(self, train_counts: Sequence[int] | np.ndarray | None = None) -> LossFn:
        """The loss as ``fn(logits, target) -> scalar`` (mean over the batch).

        A ``kd-`` loss takes the teacher's softened probabilities as ``target``.
        """
        import crossent

        if self.teacher is not None:
            tau = KD_TEMPERATURE

            def kd_fn(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
                # tau^2 keeps the gradient's scale independent of tau (Hinton et al. 2015)
                return tau * tau * crossent.cross_entropy(logits / tau, target)

            return kd_fn
        kwargs: dict[str, Any] = {}
        if self.label_smoothing:
            kwargs["label_smoothing"] = self.label_smoothing
        if self.gamma == "flsd53":
            kwargs["gamma"] = crossent.flsd53
        elif self.gamma:
            kwargs["gamma"] = float(self.gamma)
        if self.confidence_penalty:
            kwargs["confidence_penalty"] = self.confidence_penalty
        if self.weighting is not None:
            if train_counts is None:
                raise ValueError(f"loss {self.name!r} needs the training class counts")
            kwargs["weight"] = crossent.class_weights(
                np.asarray(train_counts), method=self.weighting, beta=CB_BETA  # type: ignore[arg-type]
            )
        offset: torch.Tensor | None = None
        if self.logit_adjust:
            if train_counts is None:
                raise ValueError(f"loss {self.name!r} needs the training class counts")
            offset = crossent.logit_adjustment(np.asarray(train_counts), tau=self.logit_adjust)
        kwargs.update(self.extra)
        weight = kwargs.pop("weight", None)

        def loss_fn(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
            w = None if weight is None else weight.to(logits.device)
            if offset is not None:  # Menon et al.: the loss sees z + tau log(prior)
                logits = logits + offset.to(device=logits.device, dtype=logits.dtype)
            return crossent.cross_entropy(logits, target, weight=w, **kwargs)

        return loss_fn


def _fmt(x: float) -> str:
    return f"{x:g}"


def parse_loss(name: str) -> LossSpec:
    """The :class:`LossSpec` of a loss name (see the module docstring for the names)."""
    n = name.strip().lower()
    if n == "ce":
        return LossSpec("ce", "CE")
    if n == "flsd-53":
        return LossSpec("flsd-53", "FLSD-53", gamma="flsd53")
    if n == "weighted-ce":
        return LossSpec("weighted-ce", "weighted CE (1/n)", weighting="inverse")
    if m := re.fullmatch(rf"ls-{_NUM}", n):
        eps = float(m.group(1))
        if not 0.0 < eps < 1.0:
            raise ValueError(f"label smoothing must lie in (0, 1), got {name!r}")
        return LossSpec(f"ls-{_fmt(eps)}", f"LS {_fmt(eps)}", label_smoothing=eps)
    if m := re.fullmatch(rf"focal-{_NUM}", n):
        g = float(m.group(1))
        return LossSpec(f"focal-{_fmt(g)}", f"focal γ={_fmt(g)}", gamma=g)
    if m := re.fullmatch(rf"cp-{_NUM}", n):
        b = float(m.group(1))
        return LossSpec(f"cp-{_fmt(b)}", f"conf. penalty {_fmt(b)}", confidence_penalty=b)
    if m := re.fullmatch(rf"cb-focal(?:-{_NUM})?", n):
        g = float(m.group(1)) if m.group(1) else 1.0
        nm = "cb-focal" if g == 1.0 else f"cb-focal-{_fmt(g)}"
        return LossSpec(nm, f"CB focal γ={_fmt(g)}", gamma=g, weighting="effective_number")
    if m := re.fullmatch(rf"la-ce(?:-{_NUM})?", n):
        tau = float(m.group(1)) if m.group(1) else 1.0
        if tau <= 0:
            raise ValueError(f"the logit adjustment tau must be > 0, got {name!r}")
        nm = "la-ce" if tau == 1.0 else f"la-ce-{_fmt(tau)}"
        return LossSpec(nm, f"logit-adj. CE τ={_fmt(tau)}", logit_adjust=tau)
    if n.startswith("kd-"):
        teacher = parse_loss(n[3:])
        if teacher.teacher is not None:
            raise ValueError(f"a teacher cannot itself be a student: {name!r}")
        return LossSpec(f"kd-{teacher.name}", f"student of {teacher.label}", teacher=teacher.name)
    raise ValueError(
        f"unknown loss {name!r} (use ce, ls-E, focal-G, flsd-53, cp-B, weighted-ce, "
        "cb-focal, cb-focal-G, la-ce, la-ce-T or kd-NAME; e.g. ls-0.1, focal-3, kd-ls-0.1)"
    )


def parse_losses(names: str | Sequence[str]) -> list[LossSpec]:
    """Parse a comma-separated string or a list of names; duplicates are dropped."""
    items = names.split(",") if isinstance(names, str) else list(names)
    specs: list[LossSpec] = []
    seen: set[str] = set()
    for item in items:
        if not str(item).strip():
            continue
        spec = parse_loss(str(item))
        if spec.name not in seen:
            seen.add(spec.name)
            specs.append(spec)
    if not specs:
        raise ValueError("no losses given")
    return specs


def default_losses(*, imbalanced: bool, quick: bool = False, distill: bool = False) -> list[LossSpec]:
    """The default grid for a task."""
    if distill:
        return parse_losses(DISTILL_LOSSES)
    if quick:
        names = QUICK_IMBALANCED_LOSSES if imbalanced else QUICK_BALANCED_LOSSES
    else:
        names = IMBALANCED_LOSSES if imbalanced else BALANCED_LOSSES
    return parse_losses(names)
