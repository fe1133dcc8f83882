r"""The study: train one model per (task, loss, seed), evaluate, recalibrate, aggregate.

Protocol (the same for every loss, so only the loss differs):

1. Data: seed ``s`` gets the train / validation / test split drawn from ``data_seed + s``
   (:mod:`crossent.experiments.datasets`); features standardised with training statistics.
2. Model, per task (``--model`` overrides): MNIST-1D's 1-D CNN on ``mnist1d`` and
   ``mnist1d-lt``, a 2 x 256 ReLU MLP on ``digits``, user data and the distillation
   students; initialised from ``torch.manual_seed(seed)``.
3. Training: Adam (lr 1e-2 for the CNN, 1e-3 otherwise, cosine decay to 0 over the run, no
   weight decay), minibatches of 128 reshuffled each epoch by a ``torch.Generator`` seeded
   with ``seed``, a fixed number of epochs chosen to reach ~100% train accuracy with CE, no
   early stopping, the last weights.
4. Evaluation on the test set, in arms: the raw logits; temperature scaling (Guo et al. 2017)
   with :math:`T` fitted on validation NLL (``_ts``); :math:`T` fitted by grid search on
   validation ECE, the protocol of Mukhoti et al. 2020 (``_tsece``); on tasks with a label
   shift (:attr:`~crossent.experiments.datasets.TaskData.label_shift`: a long-tailed
   training set, balanced validation and test sets) post-hoc logit adjustment
   :math:`z - \log \pi_{\text{train}}` (Menon et al. 2021, ``_la``) and the
   prior-corrected temperature :math:`z/T - \log \pi_{\text{train}}` with :math:`T`
   fitted on the balanced validation set (``_lats``, :func:`fit_prior_corrected_temperature`).
   The test set is never used for fitting. Each arm records the bootstrap std of its main
   metrics over test points, the mean predictive entropy, and for focal models the per-sample
   check of :math:`\mathrm{FL}_\gamma \ge \mathrm{CE} - \gamma H`.
5. Distillation (task ``distill``): the ``mnist1d`` models trained with CE and with label
   smoothing are the teachers; a student (the MLP) is trained on each teacher's softened
   training-set outputs, next to the same MLP trained on the hard labels (``ce``).
6. Aggregation: mean, sample std (ddof = 1) and a 95% interval half-width
   :math:`h = \sqrt{h_{\text{seed}}^2 + h_{\text{boot}}^2}` per cell, where
   :math:`h_{\text{seed}} = t_{0.975,\,n-1}\, s/\sqrt n` over the :math:`n` seeds and
   :math:`h_{\text{boot}} = 1.96 \sqrt{\sum_i \sigma_i^2}/n` from the per-seed bootstrap
   stds :math:`\sigma_i` (metrics without a bootstrap use :math:`h_{\text{seed}}`). Two cells
   differ *clearly* when :math:`|m_A - m_B| > \sqrt{h_A^2 + h_B^2}`.

Determinism: every run sets ``torch.manual_seed(seed)``, uses its own shuffling generator,
runs with a fixed number of CPU threads (``threads``, default 1) and, on CUDA,
``torch.use_deterministic_algorithms(True)``, so the same seed gives bit-identical numbers
on the same machine.
"""

from __future__ import annotations

import contextlib
import math
import os
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import numpy as np
import torch

from crossent.experiments._metrics import (
    BOOTSTRAP_METRICS,
    METRICS,
    accuracy_metrics,
    bootstrap_sd,
    calibration_metrics,
    focal_bound,
    mean_entropy,
)
from crossent.experiments.datasets import BUNDLED_TASKS, TaskData, load_task, load_user_data
from crossent.experiments.losses import KD_TEMPERATURE, LossSpec, default_losses, parse_losses
from crossent.experiments.models import MODELS, ModelKind, build_model, default_lr

__all__ = [
    "ARMS",
    "DEFAULT_EPOCHS",
    "DEFAULT_MODELS",
    "QUICK_EPOCHS",
    "RunResult",
    "StudyConfig",
    "StudyResult",
    "aggregate",
    "clearly_different",
    "config_dict",
    "deterministic",
    "evaluate",
    "fit_prior_corrected_temperature",
    "fit_temperature",
    "load_tasks",
    "resolve_device",
    "run_study",
    "train_one",
]

#: Epochs per task in the default study (enough for CE to reach ~100% train accuracy).
DEFAULT_EPOCHS: dict[str, int] = {
    "mnist1d": 40, "digits": 40, "mnist1d-lt": 60, "distill": 40, "user": 50,
}
#: Epochs per task with ``--quick``.
QUICK_EPOCHS: dict[str, int] = {
    "mnist1d": 8, "digits": 10, "mnist1d-lt": 15, "distill": 10, "user": 20,
}
QUICK_SEEDS: tuple[int, ...] = (0, 1)
#: The model of each task when ``--model`` is not given.
DEFAULT_MODELS: dict[str, ModelKind] = {
    "mnist1d": "cnn", "mnist1d-lt": "cnn", "digits": "mlp", "distill": "mlp", "user": "mlp",
}
#: Evaluation arms: record key -> metric suffix in the aggregated rows.
ARMS: dict[str, str] = {
    "test": "", "test_ts": "_ts", "test_tsece": "_tsece", "test_la": "_la", "test_lats": "_lats",
}
#: Bootstrap resamples of the test set per run and arm.
N_BOOT = 200


@dataclass
class StudyConfig:
    """Everything that defines a study; ``None`` fields take the per-task defaults."""

    tasks: list[str] = field(default_factory=lambda: list(BUNDLED_TASKS))
    losses: list[str] | None = None
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    epochs: int | None = None
    model: ModelKind | None = None
    hidden: int = 256
    batch_size: int = 128
    lr: float | None = None
    weight_decay: float = 0.0
    device: str = "cpu"
    n_bins: int = 15
    data_seed: int = 0
    threads: int | None = 1
    quick: bool = False
    data: str | None = None
    target: str | None = None
    #: seed s trains on the split of data_seed + s (False: every seed on data_seed's split)
    split_per_seed: bool = True

    def validate(self) -> None:
        if not self.seeds:
            raise ValueError("at least one seed is needed")
        if self.epochs is not None and self.epochs < 1:
            raise ValueError(f"epochs must be >= 1, got {self.epochs}")
        if self.batch_size < 1:
            raise ValueError(f"batch size must be >= 1, got {self.batch_size}")
        if self.lr is not None and not (self.lr > 0 and math.isfinite(self.lr)):
            raise ValueError(f"learning rate must be > 0, got {self.lr}")
        if not (self.weight_decay >= 0 and math.isfinite(self.weight_decay)):
            raise ValueError(f"weight decay must be a finite number >= 0, got {self.weight_decay}")
        if self.model is not None and self.model not in MODELS:
            raise ValueError(f"model must be one of {', '.join(MODELS)}, got {self.model!r}")
        if self.n_bins < 1:
            raise ValueError(f"n_bins must be >= 1, got {self.n_bins}")
        if self.threads is not None and not 1 <= self.threads <= 1024:
            # torch itself crashes (SIGSEGV) on set_num_threads(100000)
            raise ValueError(f"threads must lie in 1..1024, got {self.threads}")
        if self.data is None:
            for t in self.tasks:
                if t not in BUNDLED_TASKS:
                    raise ValueError(
                        f"unknown task {t!r} (choose from {', '.join(BUNDLED_TASKS)})"
                    )
            if not self.tasks:
                raise ValueError("no tasks given")
        if self.losses is not None:
            parse_losses(self.losses)  # raises on an unknown name

    def epochs_for(self, task: str) -> int:
        if self.epochs is not None:
            return self.epochs
        table = QUICK_EPOCHS if self.quick else DEFAULT_EPOCHS
        return table["user"] if self.data is not None else table.get(task, table["user"])

    def model_for(self, task: str) -> ModelKind:
        """``--model``, or the task's default (:data:`DEFAULT_MODELS`)."""
        if self.model is not None:
            return self.model
        return DEFAULT_MODELS["user"] if self.data is not None else DEFAULT_MODELS.get(task, "mlp")

    def lr_for(self, model: str) -> float:
        """``--lr``, or the model's default (:func:`~crossent.experiments.models.default_lr`)."""
        return self.lr if self.lr is not None else default_lr(model)

    def losses_for(self, task: TaskData) -> list[LossSpec]:
        if task.teacher_task is not None:
            # the students named in --losses (and CE on the hard labels), else the default
            named = [] if self.losses is None else parse_losses(self.losses)
            students = [s for s in named if s.teacher is not None]
            if not students:
                return default_losses(imbalanced=False, distill=True)
            return [s for s in named if s.teacher is not None or s.name == "ce"]
        if self.losses is None:
            return default_losses(imbalanced=task.imbalanced, quick=self.quick)
        return [s for s in parse_losses(self.losses) if s.teacher is None]


@dataclass
class RunResult:
    """One trained model: its record (JSON-able) and its test / validation logits."""

    record: dict[str, Any]
    test_logits: np.ndarray
    val_logits: np.ndarray
    temperature: float
    #: the run's own test labels (seeds have different splits)
    test_labels: np.ndarray | None = None
    #: logits on the training set (the teachers' soft targets for distillation)
    train_logits: np.ndarray | None = None


@dataclass
class StudyResult:
    """All runs of a study, with the data they used."""

    config: StudyConfig
    tasks: dict[str, TaskData]
    runs: list[RunResult]
    wall_time_s: float = 0.0

    @property
    def records(self) -> list[dict[str, Any]]:
        return [r.record for r in self.runs]

    def runs_for(self, task: str, loss: str) -> list[RunResult]:
        return [r for r in self.runs if r.record["task"] == task and r.record["loss"] == loss]


# --------------------------------------------------------------------------- one run


def resolve_device(device: str) -> torch.device:
    """``"auto"`` -> CUDA if available, else CPU; otherwise ``torch.device(device)``."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError as exc:
        raise ValueError(f"bad device {device!r}: {exc}") from exc
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} requested but CUDA is not available")
    if dev.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"device {device!r} requested but MPS is not available")
    return dev


@contextlib.contextmanager
def deterministic(threads: int | None, device: torch.device | None = None) -> Iterator[None]:
    """A fixed CPU thread count and, on accelerators, deterministic algorithms; restored on
    exit.

    Every op of the training loop (linear layers, ReLU, gather / index, Adam) is already
    deterministic on the CPU for a fixed thread count; ``torch.use_deterministic_algorithms``
    is switched on for CUDA / MPS only (it matters there for scatter-type kernels and
    cuBLAS, and on the CPU it would cost a multi-second one-time import).
    """
    prev_threads = torch.get_num_threads()
    accel = device is not None and device.type != "cpu"
    if accel:
        prev_det = torch.are_deterministic_algorithms_enabled()
        prev_warn = torch.is_deterministic_algorithms_warn_only_enabled()
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    try:
        if threads is not None:
            torch.set_num_threads(threads)
        if accel:
            torch.use_deterministic_algorithms(True, warn_only=True)
        yield
    finally:
        if accel:
            torch.use_deterministic_algorithms(prev_det, warn_only=prev_warn)
        torch.set_num_threads(prev_threads)


def _predict(model: torch.nn.Module, x: torch.Tensor, chunk: int = 8192) -> np.ndarray:
    model.eval()
    with torch.no_grad():
        out = [model(x[i : i + chunk]) for i in range(0, len(x), chunk)]
    return torch.cat(out).double().cpu().numpy()


def evaluate(
    logits: np.ndarray,
    labels: np.ndarray,
    num_classes: int,
    train_counts: np.ndarray,
    *,
    n_bins: int = 15,
) -> dict[str, float]:
    """All metrics of :data:`~crossent.experiments._metrics.METRICS` for test logits."""
    m = accuracy_metrics(np.argmax(logits, axis=1), labels, num_classes, train_counts)
    m.update(calibration_metrics(logits, labels, num_classes, n_bins=n_bins))
    return {k: m[k] for k in METRICS}


def fit_temperature(
    val_logits: np.ndarray, val_labels: np.ndarray, *, objective: str = "nll", n_bins: int = 15
) -> tuple[float, str | None, str | None]:
    """Temperature fitted on the validation set by :class:`TemperatureScaler`, the guard's
    reason (``None`` when the fit is sound) and its kind (the scaler's ``diagnostic_kind``:
    ``"separable"``, ``"bound"`` or ``"nll"``): why the NLL fit fell back to :math:`T = 1`,
    or what made the ECE fit that was kept degenerate.

    The NLL fit falls back to :math:`T = 1` on a degenerate fit (a bound reached, a separable
    validation set, a validation NLL worse than at :math:`T = 1`). The ECE fit (Mukhoti et
    al.'s protocol) keeps its grid-search optimum; a separable validation set or a bound is
    recorded for it, a validation NLL worse than at :math:`T = 1` is not: that is expected of
    a temperature that minimises another objective. The reasons are listed in report.md and
    the scaler's warnings are not printed.
    """
    from crossent.calibration import TemperatureScaler

    scaler = TemperatureScaler(fallback_to_identity=objective == "nll")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        scaler.fit(torch.as_tensor(val_logits, dtype=torch.float64), torch.as_tensor(val_labels),
                   objective=objective, n_bins=n_bins)  # type: ignore[arg-type]
    t = scaler.temperature
    reason, kind = scaler.diagnostic, scaler.diagnostic_kind
    if objective == "ece" and kind == "nll":  # an NLL above T = 1's is no fault of an ECE fit
        reason = kind = None
    return float(t.item() if isinstance(t, torch.Tensor) else t), reason, kind


def fit_prior_corrected_temperature(
    val_logits: np.ndarray,
    val_labels: np.ndarray,
    log_prior: np.ndarray,
    *,
    t_min: float = 1e-2,
    t_max: float = 1e2,
) -> float:
    r"""Temperature of the prior-corrected logits :math:`z/T - \log \pi` on a validation set
    drawn with the test prior.

    :math:`p(y \mid x) / \pi_y` is the balanced-prior posterior only when :math:`p` is
    calibrated, and an interpolating model's logits are far too large for the
    :math:`\log \pi` offset to matter. Fitting :math:`T` by the validation NLL of
    :math:`\mathrm{softmax}(s z - \log \pi)`, which is convex in :math:`s = 1/T` (a
    log-sum-exp of functions affine in :math:`s`, minus a linear term), puts both on one
    scale. Golden-section search on :math:`\log s` within :math:`[1/T_{\max}, 1/T_{\min}]`.
    """
    z = np.asarray(val_logits, dtype=np.float64)
    y = np.asarray(val_labels, dtype=np.int64)
    rows = np.arange(len(y))

    def nll(log_s: float) -> float:
        u = math.exp(log_s) * z - log_prior
        m = u.max(axis=1, keepdims=True)
        lse = m[:, 0] + np.log(np.exp(u - m).sum(axis=1))
        return float(np.mean(lse - u[rows, y]))

    from crossent.calibration.temperature import golden_section

    lo, hi = golden_section(nll, math.log(1.0 / t_max), math.log(1.0 / t_min), max_iter=80)
    return float(math.exp(-(lo + hi) / 2.0))


def _arm(
    logits: np.ndarray, task: TaskData, labels: np.ndarray, config: StudyConfig, seed: int
) -> tuple[dict[str, float], dict[str, float]]:
    """Metrics of one evaluation arm and their bootstrap stds over test points."""
    counts = task.train_counts
    metrics = evaluate(logits, labels, task.num_classes, counts, n_bins=config.n_bins)
    metrics["entropy"] = mean_entropy(logits)
    boot = bootstrap_sd(logits, labels, counts, n_boot=N_BOOT, n_bins=config.n_bins, seed=seed)
    return metrics, boot


def _evaluate_arms(
    record: dict[str, Any],
    spec: LossSpec,
    task: TaskData,
    config: StudyConfig,
    seed: int,
    val_logits: np.ndarray,
    test_logits: np.ndarray,
) -> float:
    """Fit the temperatures, evaluate every arm into ``record``; returns the NLL temperature."""
    y_test = task.y_test
    diverged = bool(record["diverged"])
    arms: dict[str, np.ndarray] = {"test": test_logits}
    temps: dict[str, float] = {}
    fallbacks: dict[str, str | None] = {}
    kinds: dict[str, str | None] = {}
    finite = not diverged and bool(np.all(np.isfinite(val_logits)))
    if finite:
        temps["temperature"], fallbacks["ts"], kinds["ts"] = fit_temperature(val_logits,
                                                                             task.y_val)
        temps["temperature_ece"], fallbacks["tsece"], kinds["tsece"] = fit_temperature(
            val_logits, task.y_val, objective="ece", n_bins=config.n_bins)
        arms["test_ts"] = test_logits / temps["temperature"]
        arms["test_tsece"] = test_logits / temps["temperature_ece"]
        if task.label_shift:
            # post-hoc logit adjustment: subtract log of the training prior (tau = 1)
            log_prior = np.log(np.maximum(task.train_counts, 0.5) / task.train_counts.sum())
            arms["test_la"] = test_logits - log_prior
            temps["temperature_la"] = fit_prior_corrected_temperature(val_logits, task.y_val,
                                                                      log_prior)
            arms["test_lats"] = test_logits / temps["temperature_la"] - log_prior
    boot: dict[str, dict[str, float]] = {}
    for arm in ARMS:
        if arm not in ("test_la", "test_lats") or task.label_shift:
            if arm in arms:
                record[arm], boot[arm] = _arm(arms[arm], task, y_test, config, seed)
            else:
                record[arm] = dict.fromkeys((*METRICS, "entropy"), float("nan"))
                boot[arm] = dict.fromkeys(BOOTSTRAP_METRICS, float("nan"))
    for key in ("temperature", "temperature_ece", "temperature_la"):
        if key != "temperature_la" or task.label_shift:
            record[key] = temps.get(key, float("nan"))
    # the NLL fit falls back to T = 1 on the guard's finding; the ECE fit (Mukhoti et al.'s
    # protocol) is kept, and its finding goes under its own key: not a fallback
    record["fallback"] = {k: v for k, v in fallbacks.items() if v and k != "tsece"}
    record["fallback_kind"] = {k: v for k, v in kinds.items() if v and k != "tsece"}
    record["kept_degenerate"] = {k: v for k, v in fallbacks.items() if v and k == "tsece"}
    record["kept_degenerate_kind"] = {k: v for k, v in kinds.items() if v and k == "tsece"}
    record["boot"] = boot
    if spec.gamma and spec.weighting is None and spec.teacher is None and finite:
        record["bound"] = focal_bound(test_logits, y_test, spec.gamma)
    return temps.get("temperature", float("nan"))


def train_one(
    task: TaskData,
    spec: LossSpec,
    seed: int,
    config: StudyConfig,
    *,
    on_epoch: Callable[[int, float], None] | None = None,
    soft_targets: np.ndarray | None = None,
) -> RunResult:
    """Train, evaluate and recalibrate one model. Deterministic given ``seed``.

    ``soft_targets``: (n_train, K) probabilities to train on instead of the labels (a
    distillation student; ``spec`` is then a ``kd-`` loss).
    """
    if (spec.teacher is None) != (soft_targets is None):
        raise ValueError(f"loss {spec.name!r}: soft targets go with a kd- loss, and only with it")
    device = resolve_device(config.device)
    epochs = config.epochs_for(task.name)
    kind = config.model_for(task.name)
    start = time.perf_counter()
    with deterministic(config.threads, device):
        torch.manual_seed(seed)
        model = build_model(kind, task.num_features, task.num_classes,
                            hidden=config.hidden).to(device)
        loss_fn = spec.build(task.train_counts)
        opt = torch.optim.Adam(model.parameters(), lr=config.lr_for(kind),
                               weight_decay=config.weight_decay)
        # cosine decay of the learning rate to 0 over the run: the last epoch's weights are
        # a converged point rather than wherever the last large Adam step left them
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=epochs)
        gen = torch.Generator().manual_seed(seed)
        x = torch.as_tensor(task.X_train, dtype=torch.float32, device=device)
        y = (torch.as_tensor(task.y_train, dtype=torch.int64, device=device) if soft_targets is None
             else torch.as_tensor(soft_targets, dtype=torch.float32, device=device))
        n = len(y)
        diverged = False
        epoch_loss = float("nan")
        for epoch in range(epochs):
            model.train()
            perm = torch.randperm(n, generator=gen).to(device)
            total = 0.0
            for i in range(0, n, config.batch_size):
                idx = perm[i : i + config.batch_size]
                loss = loss_fn(model(x[idx]), y[idx])
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                total += float(loss.detach()) * len(idx)
            sched.step()
            epoch_loss = total / n
            if not math.isfinite(epoch_loss):
                diverged = True
                break
            if on_epoch is not None:
                on_epoch(epoch + 1, epoch_loss)
        train_logits = _predict(model, x)
        val_logits = _predict(model, torch.as_tensor(task.X_val, dtype=torch.float32,
                                                     device=device))
        test_logits = _predict(model, torch.as_tensor(task.X_test, dtype=torch.float32,
                                                      device=device))
    train_acc = float(np.mean(np.argmax(train_logits, axis=1) == task.y_train))
    y_test = task.y_test
    record: dict[str, Any] = {
        "task": task.name,
        "loss": spec.name,
        "loss_label": spec.label,
        "seed": seed,
        "model": kind,
        "epochs": epochs,
        "train_acc": train_acc,
        "final_train_loss": epoch_loss,
        "diverged": diverged,
    }
    with deterministic(config.threads, device):  # one thread for the evaluation too
        temperature = _evaluate_arms(record, spec, task, config, seed, val_logits, test_logits)
    record["time_s"] = time.perf_counter() - start
    return RunResult(record, test_logits.astype(np.float32), val_logits.astype(np.float32),
                     temperature, test_labels=y_test,
                     train_logits=train_logits.astype(np.float32))


# --------------------------------------------------------------------------- the study


def load_tasks(config: StudyConfig, *, data_seed: int | None = None) -> dict[str, TaskData]:
    """The tasks of a study: the user's file, or the bundled tasks by name, split with
    ``data_seed`` (default ``config.data_seed``)."""
    ds = config.data_seed if data_seed is None else data_seed
    if config.data is not None:
        task = load_user_data(config.data, config.target, data_seed=ds)
        return {task.name: task}
    return {name: load_task(name, data_seed=ds) for name in config.tasks}


def _tasks_for_seed(
    config: StudyConfig, base: dict[str, TaskData], seed: int, first: int
) -> dict[str, TaskData]:
    """Seed ``seed``'s split of every task: ``data_seed + seed`` for tasks the config can load
    again (bundled or ``--data``); tasks passed in by the caller keep their split."""
    if not config.split_per_seed or seed == first:
        return base
    loadable = config.data is not None or all(name in BUNDLED_TASKS for name in base)
    if not loadable:
        return base
    return load_tasks(config, data_seed=config.data_seed + seed - first)


def _soft_targets(teacher: RunResult) -> np.ndarray:
    """The teacher's training-set probabilities at the distillation temperature."""
    assert teacher.train_logits is not None
    z = teacher.train_logits.astype(np.float64) / KD_TEMPERATURE
    z -= z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def run_study(
    config: StudyConfig,
    *,
    tasks: dict[str, TaskData] | None = None,
    progress: Any | None = None,
) -> StudyResult:
    """Run every (task, loss, seed) of ``config``.

    Seeds vary the data split (``data_seed + seed``) when ``config.split_per_seed`` and the
    tasks can be loaded again by name; ``tasks`` given by the caller are their first seed's
    split. Distillation students use the teachers of the same seed (trained here if the
    teacher task is not part of the study, and then not reported as runs of their own).

    ``progress``: an optional :class:`rich.progress.Progress` (started by the caller); the
    study adds an overall bar and a per-run epoch bar to it.
    """
    config.validate()
    start = time.perf_counter()
    if tasks is None:
        tasks = load_tasks(config)
    first = config.seeds[0]
    # seeds outermost: one split per seed in memory at a time
    plan = [(seed, name, spec) for seed in config.seeds for name, t in tasks.items()
            for spec in config.losses_for(t)]
    if not plan:
        raise ValueError("no (task, loss) pair to run: kd- losses train students on the 'distill' "
                         "task only; add it to --tasks or give other losses")
    overall = run_bar = None
    if progress is not None:
        overall = progress.add_task("study", total=len(plan))
        run_bar = progress.add_task("run", total=1)
    runs: list[RunResult] = []
    teachers: dict[tuple[str, str, int], RunResult] = {}
    split: dict[str, TaskData] = tasks
    for i, (seed, name, spec) in enumerate(plan):
        if i == 0 or plan[i - 1][0] != seed:
            split = _tasks_for_seed(config, tasks, seed, first)
        task = split[name]
        epochs = config.epochs_for(task.name)
        on_epoch = None
        if progress is not None:
            progress.update(overall, description=f"[bold]study[/] {i + 1}/{len(plan)}")
            progress.reset(run_bar, total=epochs,
                           description=f"{task.name} · {spec.name} · seed {seed}")

            def on_epoch(ep: int, loss: float) -> None:
                progress.update(run_bar, completed=ep)

        soft = None
        if spec.teacher is not None:
            if task.teacher_task is None:
                raise ValueError(f"loss {spec.name!r} needs a distillation task (e.g. 'distill')")
            key = (task.teacher_task, spec.teacher, seed)
            if key not in teachers:
                teacher_data = split.get(task.teacher_task) or replace(
                    task, name=task.teacher_task, teacher_task=None)
                teachers[key] = train_one(teacher_data, parse_losses([spec.teacher])[0], seed,
                                          config)
            soft = _soft_targets(teachers[key])
        result = train_one(task, spec, seed, config, on_epoch=on_epoch, soft_targets=soft)
        if task.teacher_task is None:
            teachers[(task.name, spec.name, seed)] = result
        runs.append(result)
        if progress is not None:
            progress.advance(overall)
    for r in runs:  # the teachers' training logits are not needed beyond the study
        r.train_logits = None
    return StudyResult(config, tasks, runs, wall_time_s=time.perf_counter() - start)


# --------------------------------------------------------------------------- aggregation


#: two-sided 95% Student t quantiles t_{0.975, df}, df = 1..30 (scipy.stats.t.ppf)
_T975 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179,
         2.160, 2.145, 2.131, 2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064,
         2.060, 2.056, 2.052, 2.048, 2.045, 2.042)


def _t975(df: int) -> float:
    return _T975[df - 1] if df <= len(_T975) else 1.96


def _mean_std(values: Sequence[float], boot_sds: Sequence[float] | None = None) -> list[float]:
    """``[mean, std, h]`` over seeds: sample std (ddof = 1) and the 95% half-width ``h``
    (seed part from Student's t, bootstrap part from the per-seed bootstrap stds). From one
    seed the spread between seeds is unknown, and so are ``std`` and ``h`` (NaN): the report
    then gives the mean alone and calls nothing clearly different."""
    a = np.asarray(values, dtype=np.float64)
    keep = ~np.isnan(a)
    if not keep.any():
        return [float("nan")] * 3
    a = a[keep]
    n = a.size
    mean = float(a.mean())
    if n == 1:
        return [mean, float("nan"), float("nan")]
    std = float(a.std(ddof=1))
    h_seed = _t975(n - 1) * std / math.sqrt(n)
    h_boot = 0.0
    if boot_sds is not None:
        b = np.asarray(boot_sds, dtype=np.float64)[keep]
        b = b[~np.isnan(b)]
        if b.size:
            h_boot = 1.96 * float(np.sqrt(np.sum(b**2))) / b.size
    return [mean, std, float(math.hypot(h_seed, h_boot))]


def clearly_different(a: Sequence[float], b: Sequence[float]) -> bool:
    """The rule behind every "clearly" of the report: two cells ``[mean, std, h]`` differ
    clearly when their means differ by more than :math:`\\sqrt{h_A^2 + h_B^2}`, the 95%
    half-width of the difference of two independent estimates."""
    if any(math.isnan(x) for x in (a[0], b[0], a[2], b[2])):
        return False
    return abs(a[0] - b[0]) > math.hypot(a[2], b[2])


def aggregate(result: StudyResult) -> list[dict[str, Any]]:
    """One row per (task, loss): ``[mean, std, h]`` over seeds of every metric (``h`` the 95%
    interval half-width, see the module docstring).

    Keys: ``task``, ``loss``, ``loss_label``, ``model``, ``n_seeds``; for each metric ``m`` and
    arm suffix ``s`` of :data:`ARMS` present in the runs, ``m + s`` (``ece``, ``ece_ts``,
    ``ece_tsece``, ``balanced_acc_la``, ...), including ``entropy + s``; ``temperature``,
    ``temperature_ece``, ``temperature_la`` (tasks with a label shift), ``train_acc``; and for focal
    models ``bound_holds``, ``bound_gap``, ``bound_gap_rel``.
    """
    rows: list[dict[str, Any]] = []
    seen: list[tuple[str, str]] = []
    for r in result.records:
        key = (r["task"], r["loss"])
        if key not in seen:
            seen.append(key)
    for task, loss in seen:
        recs = [r.record for r in result.runs_for(task, loss)]
        row: dict[str, Any] = {
            "task": task,
            "loss": loss,
            "loss_label": recs[0]["loss_label"],
            "model": recs[0].get("model", ""),
            "n_seeds": len(recs),
            "train_acc": _mean_std([r["train_acc"] for r in recs]),
        }
        for t_key in ("temperature", "temperature_ece", "temperature_la"):
            if t_key in recs[0]:
                row[t_key] = _mean_std([r[t_key] for r in recs])
        for arm, suffix in ARMS.items():
            if arm not in recs[0]:
                continue
            for m in (*METRICS, "entropy"):
                boot = ([r["boot"][arm].get(m, float("nan")) for r in recs]
                        if m in BOOTSTRAP_METRICS and "boot" in recs[0] else None)
                row[m + suffix] = _mean_std([r[arm][m] for r in recs], boot)
        if all("bound" in r for r in recs):
            for k in ("holds", "gap", "gap_rel"):
                row[f"bound_{k}"] = _mean_std([r["bound"][k] for r in recs])
        rows.append(row)
    return rows


def config_dict(config: StudyConfig) -> dict[str, Any]:
    """The config as JSON-able data, with per-task epochs resolved."""
    d = asdict(config)
    d["tail_classes_rule"] = "floor(K/3) classes with the fewest training examples"
    d["clearly_rule"] = "|m_A - m_B| > sqrt(h_A^2 + h_B^2), h the 95% interval half-width"
    d["kd_temperature"] = KD_TEMPERATURE
    return d

