"""The study: train one model per (task, loss, seed), evaluate, temperature-scale, aggregate.

Protocol (the same for every loss, so only the loss differs):

1. Data: a stratified train / validation / test split fixed by ``data_seed``; features
   standardised with training statistics (:mod:`crossent.experiments.datasets`).
2. Model: a 2 x 256 ReLU MLP (or a linear model), initialised from ``torch.manual_seed(seed)``.
3. Training: Adam (lr 1e-3, no weight decay), minibatches of 128 reshuffled each epoch by a
   ``torch.Generator`` seeded with ``seed``, a fixed number of epochs chosen to overfit
   (MNIST-1D: 100% train accuracy with CE), no early stopping, the last epoch's weights.
4. Evaluation on the test set: accuracy family and calibration metrics
   (:mod:`crossent.experiments._metrics`); then temperature scaling (Guo et al. 2017), a
   single :math:`T > 0` fitted by minimising validation NLL with
   :class:`crossent.calibration.TemperatureScaler`, and the same metrics on ``logits / T``.
   The test set is never used for fitting.
5. Seeds: each (task, loss) is repeated over the seeds; tables show mean +- sample std
   (ddof = 1; 0 with a single seed).

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
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch

from crossent.experiments._metrics import (
    METRICS,
    accuracy_metrics,
    calibration_metrics,
)
from crossent.experiments.datasets import BUNDLED_TASKS, TaskData, load_task, load_user_data
from crossent.experiments.losses import LossSpec, default_losses, parse_losses
from crossent.experiments.models import ModelKind, build_model

__all__ = [
    "DEFAULT_EPOCHS",
    "QUICK_EPOCHS",
    "RunResult",
    "StudyConfig",
    "StudyResult",
    "aggregate",
    "config_dict",
    "deterministic",
    "evaluate",
    "fit_temperature",
    "load_tasks",
    "resolve_device",
    "run_study",
    "train_one",
]

#: Epochs per task in the default study (enough for CE to reach ~100% train accuracy).
DEFAULT_EPOCHS: dict[str, int] = {"mnist1d": 60, "digits": 40, "mnist1d-lt": 100, "user": 50}
#: Epochs per task with ``--quick``.
QUICK_EPOCHS: dict[str, int] = {"mnist1d": 20, "digits": 10, "mnist1d-lt": 30, "user": 20}
QUICK_SEEDS: tuple[int, ...] = (0, 1)


@dataclass
class StudyConfig:
    """Everything that defines a study; ``None`` fields take the per-task defaults."""

    tasks: list[str] = field(default_factory=lambda: list(BUNDLED_TASKS))
    losses: list[str] | None = None
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    epochs: int | None = None
    model: ModelKind = "mlp"
    hidden: int = 256
    batch_size: int = 128
    lr: float = 1e-3
    weight_decay: float = 0.0
    device: str = "cpu"
    n_bins: int = 15
    data_seed: int = 0
    threads: int | None = 1
    quick: bool = False
    data: str | None = None
    target: str | None = None

    def validate(self) -> None:
        if not self.seeds:
            raise ValueError("at least one seed is needed")
        if self.epochs is not None and self.epochs < 1:
            raise ValueError(f"epochs must be >= 1, got {self.epochs}")
        if self.batch_size < 1:
            raise ValueError(f"batch size must be >= 1, got {self.batch_size}")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise ValueError(f"learning rate must be > 0, got {self.lr}")
        if not (self.weight_decay >= 0 and math.isfinite(self.weight_decay)):
            raise ValueError(f"weight decay must be a finite number >= 0, got {self.weight_decay}")
        if self.model not in ("linear", "mlp"):
            raise ValueError(f"model must be 'linear' or 'mlp', got {self.model!r}")
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

    def losses_for(self, task: TaskData) -> list[LossSpec]:
        if self.losses is None:
            return default_losses(imbalanced=task.imbalanced, quick=self.quick)
        return parse_losses(self.losses)


@dataclass
class RunResult:
    """One trained model: its record (JSON-able) and its test / validation logits."""

    record: dict[str, Any]
    test_logits: np.ndarray
    val_logits: np.ndarray
    temperature: float


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


def fit_temperature(val_logits: np.ndarray, val_labels: np.ndarray) -> float:
    """Temperature fitted on the validation set by :class:`TemperatureScaler`."""
    from crossent.calibration import TemperatureScaler

    scaler = TemperatureScaler().fit(
        torch.as_tensor(val_logits, dtype=torch.float64), torch.as_tensor(val_labels)
    )
    t = scaler.temperature
    return float(t.item() if isinstance(t, torch.Tensor) else t)


def train_one(
    task: TaskData,
    spec: LossSpec,
    seed: int,
    config: StudyConfig,
    *,
    on_epoch: Callable[[int, float], None] | None = None,
) -> RunResult:
    """Train, evaluate and temperature-scale one model. Deterministic given ``seed``."""
    device = resolve_device(config.device)
    epochs = config.epochs_for(task.name)
    start = time.perf_counter()
    with deterministic(config.threads, device):
        torch.manual_seed(seed)
        model = build_model(config.model, task.num_features, task.num_classes,
                            hidden=config.hidden).to(device)
        loss_fn = spec.build(task.train_counts)
        opt = torch.optim.Adam(model.parameters(), lr=config.lr,
                               weight_decay=config.weight_decay)
        gen = torch.Generator().manual_seed(seed)
        x = torch.as_tensor(task.X_train, dtype=torch.float32, device=device)
        y = torch.as_tensor(task.y_train, dtype=torch.int64, device=device)
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
    counts = task.train_counts
    before = evaluate(test_logits, task.y_test, task.num_classes, counts, n_bins=config.n_bins)
    if diverged or not np.all(np.isfinite(val_logits)):
        temperature = float("nan")
        after = dict.fromkeys(before, float("nan"))
    else:
        temperature = fit_temperature(val_logits, task.y_val)
        after = evaluate(test_logits / temperature, task.y_test, task.num_classes, counts,
                         n_bins=config.n_bins)
    record: dict[str, Any] = {
        "task": task.name,
        "loss": spec.name,
        "loss_label": spec.label,
        "seed": seed,
        "epochs": epochs,
        "train_acc": train_acc,
        "final_train_loss": epoch_loss,
        "diverged": diverged,
        "temperature": temperature,
        "time_s": time.perf_counter() - start,
        "test": before,
        "test_ts": after,
    }
    return RunResult(record, test_logits.astype(np.float32), val_logits.astype(np.float32),
                     temperature)


# --------------------------------------------------------------------------- the study


def load_tasks(config: StudyConfig) -> dict[str, TaskData]:
    """The tasks of a study: the user's file, or the bundled tasks by name."""
    if config.data is not None:
        task = load_user_data(config.data, config.target, data_seed=config.data_seed)
        return {task.name: task}
    return {name: load_task(name, data_seed=config.data_seed) for name in config.tasks}


def run_study(
    config: StudyConfig,
    *,
    tasks: dict[str, TaskData] | None = None,
    progress: Any | None = None,
) -> StudyResult:
    """Run every (task, loss, seed) of ``config``.

    ``progress``: an optional :class:`rich.progress.Progress` (started by the caller); the
    study adds an overall bar and a per-run epoch bar to it.
    """
    config.validate()
    start = time.perf_counter()
    if tasks is None:
        tasks = load_tasks(config)
    plan = [(t, spec, seed) for t in tasks.values() for spec in config.losses_for(t)
            for seed in config.seeds]
    overall = run_bar = None
    if progress is not None:
        overall = progress.add_task("study", total=len(plan))
        run_bar = progress.add_task("run", total=1)
    runs: list[RunResult] = []
    for i, (task, spec, seed) in enumerate(plan):
        epochs = config.epochs_for(task.name)
        on_epoch = None
        if progress is not None:
            progress.update(
                overall, description=f"[bold]study[/] {i + 1}/{len(plan)}",
            )
            progress.reset(run_bar, total=epochs,
                           description=f"{task.name} · {spec.name} · seed {seed}")

            def on_epoch(ep: int, loss: float) -> None:
                progress.update(run_bar, completed=ep)

        runs.append(train_one(task, spec, seed, config, on_epoch=on_epoch))
        if progress is not None:
            progress.advance(overall)
    return StudyResult(config, tasks, runs, wall_time_s=time.perf_counter() - start)


# --------------------------------------------------------------------------- aggregation


def _mean_std(values: Sequence[float]) -> tuple[float, float]:
    a = np.asarray(values, dtype=np.float64)
    if a.size == 0 or np.all(np.isnan(a)):
        return float("nan"), float("nan")
    a = a[~np.isnan(a)]
    mean = float(a.mean())
    std = float(a.std(ddof=1)) if a.size > 1 else 0.0
    return mean, std


def aggregate(result: StudyResult) -> list[dict[str, Any]]:
    """One row per (task, loss): mean and std over seeds of every metric.

    Keys: ``task``, ``loss``, ``loss_label``, ``n_seeds``, and for each metric ``m`` of
    the test set ``m`` / ``m_ts`` (after temperature scaling) as ``[mean, std]``, plus
    ``temperature`` and ``train_acc``.
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
            "n_seeds": len(recs),
            "train_acc": list(_mean_std([r["train_acc"] for r in recs])),
            "temperature": list(_mean_std([r["temperature"] for r in recs])),
        }
        for m in METRICS:
            row[m] = list(_mean_std([r["test"][m] for r in recs]))
            row[f"{m}_ts"] = list(_mean_std([r["test_ts"][m] for r in recs]))
        rows.append(row)
    return rows


def config_dict(config: StudyConfig) -> dict[str, Any]:
    """The config as JSON-able data, with per-task epochs resolved."""
    d = asdict(config)
    d["tail_classes_rule"] = "floor(K/3) classes with the fewest training examples"
    return d

