"""Shared fixtures: a tiny synthetic task that trains in well under a second."""

from __future__ import annotations

import numpy as np
import pytest

from crossent.experiments.datasets import TaskData, standardize


def make_blobs_task(
    n_per_class: tuple[int, ...] = (60, 60, 60), *, dim: int = 8, seed: int = 0
) -> TaskData:
    rng = np.random.default_rng(seed)
    k = len(n_per_class)
    centers = rng.normal(0.0, 1.5, size=(k, dim))

    def draw(counts: tuple[int, ...] | list[int]) -> tuple[np.ndarray, np.ndarray]:
        xs = [centers[c] + rng.normal(size=(n, dim)) for c, n in enumerate(counts)]
        ys = [np.full(n, c, dtype=np.int64) for c, n in enumerate(counts)]
        return np.concatenate(xs), np.concatenate(ys)

    x_tr, y_tr = draw(n_per_class)
    x_va, y_va = draw([max(2, n // 3) for n in n_per_class])
    x_te, y_te = draw([30] * k)
    task = TaskData(
        name="blobs",
        description="gaussian blobs",
        X_train=x_tr, y_train=y_tr, X_val=x_va, y_val=y_va, X_test=x_te, y_test=y_te,
        num_classes=k,
        imbalanced=max(n_per_class) / min(n_per_class) >= 3,
        # the test set is balanced: an imbalanced training set makes a label shift
        label_shift=max(n_per_class) / min(n_per_class) >= 3,
    )
    return standardize(task)


@pytest.fixture
def blobs() -> TaskData:
    return make_blobs_task()


@pytest.fixture
def blobs_imbalanced() -> TaskData:
    return make_blobs_task((90, 30, 9))
