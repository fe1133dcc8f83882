"""``crossent run``: the experiment runner, the project's main job.

It trains the same model with each loss of the cross-entropy family on bundled data
(MNIST-1D generated locally, scikit-learn's digits, a long-tailed MNIST-1D) or on the user's
table, and reports accuracy and calibration before and after temperature scaling.

Modules: :mod:`~crossent.experiments.datasets` (tasks, long-tailed sampler, user data),
:mod:`~crossent.experiments.models`, :mod:`~crossent.experiments.losses` (the named grid),
:mod:`~crossent.experiments.runner` (training, evaluation, seeds, aggregation),
:mod:`~crossent.experiments.report` (results files, report.md, figures) and
:mod:`~crossent.experiments.cli`.

From Python::

    from crossent.experiments import StudyConfig, run_study, write_run_folder
    result = run_study(StudyConfig(tasks=["digits"], losses=["ce", "focal-3"], seeds=[0]))
    write_run_folder(result, "runs/digits")
"""

from __future__ import annotations

from crossent.experiments.datasets import TaskData, load_task, load_user_data, long_tail_counts
from crossent.experiments.losses import LossSpec, parse_loss, parse_losses
from crossent.experiments.models import build_model
from crossent.experiments.runner import StudyConfig, StudyResult, aggregate, run_study, train_one

__all__ = [
    "LossSpec",
    "StudyConfig",
    "StudyResult",
    "TaskData",
    "aggregate",
    "build_model",
    "load_task",
    "load_user_data",
    "long_tail_counts",
    "parse_loss",
    "parse_losses",
    "run_study",
    "train_one",
    "write_run_folder",
]


def __getattr__(name: str) -> object:
    if name == "write_run_folder":  # report pulls matplotlib lazily; keep import light
        from crossent.experiments.report import write_run_folder

        return write_run_folder
    raise AttributeError(f"module 'crossent.experiments' has no attribute {name!r}")
