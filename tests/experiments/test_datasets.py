"""Data loading: bundled tasks, the long-tailed sampler's exact counts, user files, errors."""

from __future__ import annotations

import numpy as np
import pytest

from crossent.experiments.datasets import (
    DataError,
    load_digits_task,
    load_mnist1d_lt_task,
    load_mnist1d_task,
    load_user_data,
    long_tail_counts,
    stratified_split,
)


def test_long_tail_counts_exact() -> None:
    # n_c = floor(n_max * rho^(-c/(K-1)))
    assert long_tail_counts(300, 10, 50).tolist() == [300, 194, 125, 81, 52, 34, 22, 14, 9, 6]
    assert long_tail_counts(100, 10, 50).tolist() == [100, 64, 41, 27, 17, 11, 7, 4, 3, 2]
    assert long_tail_counts(500, 10, 100).tolist()[-1] == 5
    assert long_tail_counts(10, 3, 1).tolist() == [10, 10, 10]
    assert long_tail_counts(5, 4, 1000).min() == 1  # never empty
    with pytest.raises(ValueError):
        long_tail_counts(10, 1)
    with pytest.raises(ValueError):
        long_tail_counts(10, 3, rho=0.5)


def test_long_tailed_mnist1d_counts_and_disjoint_balanced_test() -> None:
    task = load_mnist1d_lt_task()
    assert task.imbalanced and task.label_shift
    expected = long_tail_counts(300, 10, 50).tolist()
    assert np.bincount(task.y_train, minlength=10).tolist() == expected
    # validation has the test set's (uniform) prior: T is fitted under the test distribution
    assert np.bincount(task.y_val, minlength=10).tolist() == [40] * 10
    assert np.bincount(task.y_test, minlength=10).tolist() == [100] * 10
    # the three sets are disjoint: no signal appears twice
    rows = np.concatenate([task.X_train, task.X_val, task.X_test])
    assert len(np.unique(rows, axis=0)) == len(rows)
    # standardised with training statistics
    np.testing.assert_allclose(task.X_train.mean(0), 0.0, atol=1e-5)
    np.testing.assert_allclose(task.X_train.std(0), 1.0, atol=1e-4)
    # a different data seed draws different examples with the same counts
    other = load_mnist1d_lt_task(data_seed=1)
    assert np.bincount(other.y_train).tolist() == np.bincount(task.y_train).tolist()
    assert not np.array_equal(other.X_train, task.X_train)


def test_mnist1d_split_and_determinism() -> None:
    a, b = load_mnist1d_task(), load_mnist1d_task()
    assert (len(a.y_train), len(a.y_val), len(a.y_test)) == (3200, 800, 1000)
    assert a.X_train.shape == (3200, 40) and a.X_train.dtype == np.float32
    assert a.num_classes == 10 and not a.imbalanced
    np.testing.assert_array_equal(a.X_train, b.X_train)
    np.testing.assert_array_equal(a.y_val, b.y_val)
    # stratified: validation class proportions match the training ones
    pv = np.bincount(a.y_val) / len(a.y_val)
    pt = np.bincount(a.y_train) / len(a.y_train)
    assert np.abs(pv - pt).max() < 0.005


def test_mnist1d_generation_leaves_global_rng_alone() -> None:
    from crossent.experiments import datasets

    datasets._mnist1d_raw.cache_clear()
    np.random.seed(123)  # noqa: NPY002
    expected = np.random.rand()  # noqa: NPY002
    np.random.seed(123)  # noqa: NPY002
    load_mnist1d_task()
    assert np.random.rand() == expected  # noqa: NPY002


def test_digits() -> None:
    t = load_digits_task()
    assert len(t.y_train) + len(t.y_val) + len(t.y_test) == 1797
    assert t.num_features == 64
    assert set(np.unique(t.y_test)) == set(range(10))


def test_stratified_split_every_class_everywhere() -> None:
    y = np.repeat(np.arange(4), [3, 10, 50, 7])
    parts = stratified_split(y, [0.6, 0.2, 0.2], seed=0)
    assert sum(len(p) for p in parts) == len(y)
    assert len(np.unique(np.concatenate(parts))) == len(y)
    for p in parts:
        assert set(y[p]) == {0, 1, 2, 3}
    with pytest.raises(DataError, match="at least 3"):
        stratified_split(np.array([0, 0, 0, 1, 1]), [0.6, 0.2, 0.2])


def _write_csv(path, text: str):
    path.write_text(text, encoding="utf-8")
    return path


def test_user_csv_numeric_string_target_and_one_hot(tmp_path) -> None:
    rng = np.random.default_rng(0)
    lines = ["a,colour,b,label"]
    for i in range(60):
        lab = ["cat", "dog", "eel"][i % 3]
        lines.append(f"{rng.normal():.3f},{['red', 'blue'][i % 2]},{i},{lab}")
    p = _write_csv(tmp_path / "pets.csv", "\n".join(lines) + "\n")
    t = load_user_data(p, "label")
    assert t.class_names == ["cat", "dog", "eel"]
    assert t.num_features == 4  # a, colour one-hot (2), b
    assert len(t.y_train) + len(t.y_val) + len(t.y_test) == 60
    assert (len(t.y_train), len(t.y_val), len(t.y_test)) == (36, 12, 12)
    assert t.name == "pets" and not t.imbalanced


def test_imbalanced_user_data_keeps_the_training_prior_in_validation_and_test(tmp_path) -> None:
    """The stratified split gives every part the training prior: imbalanced classes, but no
    label shift between training and test (unlike mnist1d-lt, whose test set is balanced)."""
    rng = np.random.default_rng(0)
    lines = ["f,label"] + [f"{rng.normal(k):.3f},{name}"
                           for k, (name, n) in enumerate((("a", 150), ("b", 50), ("c", 20)))
                           for _ in range(n)]
    t = load_user_data(_write_csv(tmp_path / "lt.csv", "\n".join(lines) + "\n"), "label")
    assert np.bincount(t.y_train).tolist() == [90, 30, 12]
    assert np.bincount(t.y_val).tolist() == [30, 10, 4]
    assert np.bincount(t.y_test).tolist() == [30, 10, 4]
    assert t.imbalanced and not t.label_shift


def test_user_npz(tmp_path) -> None:
    rng = np.random.default_rng(0)
    x = rng.normal(size=(50, 2, 3))
    y = np.repeat([3, 7], 25)
    np.savez(tmp_path / "d.npz", X=x, y=y)
    t = load_user_data(tmp_path / "d.npz")
    assert t.num_features == 6 and t.class_names == ["3", "7"]


@pytest.mark.parametrize(
    ("content", "target", "match"),
    [
        ("a,b\n1,x\n", "label", r"no column 'label' \(columns: a, b\)$"),
        ("0.12,-0.3,1\n0.5,0.2,0\n", "2", "the first row holds numbers, not column names: the file needs a"),
        ("", "label", "empty"),
        ("a,label\n1.5,0.3\n2,0.7\n3,0.1\n", "label", "non-integer"),
        ("a,label\n1,0\n,1\n3,1\n", "label", "missing value"),
        ("a,label\n1,0\n2\n", "label", "row 3 has 1 fields"),
        ("a,label\n1,0\n2,0\n3,0\n", "label", "single class"),
        ("a,label\n1,0\n2,0\n3,0\n4,1\n", "label", "at least 3"),
    ],
)
def test_user_csv_errors(tmp_path, content: str, target: str, match: str) -> None:
    p = _write_csv(tmp_path / "bad.csv", content)
    with pytest.raises(DataError, match=match) as info:
        load_user_data(p, target)
    assert "\n" not in str(info.value)


def test_user_file_errors(tmp_path) -> None:
    with pytest.raises(DataError, match="no such file"):
        load_user_data(tmp_path / "missing.csv", "y")
    (tmp_path / "x.xlsx").write_bytes(b"PK")
    with pytest.raises(DataError, match="unsupported file type"):
        load_user_data(tmp_path / "x.xlsx", "y")
    np.savez(tmp_path / "noy.npz", X=np.zeros((4, 2)))
    with pytest.raises(DataError, match="needs arrays 'X' and 'y'"):
        load_user_data(tmp_path / "noy.npz")
    (tmp_path / "junk.npz").write_bytes(b"not a zip")
    with pytest.raises(DataError, match="cannot read"):
        load_user_data(tmp_path / "junk.npz")


def test_parquet(tmp_path) -> None:
    p = tmp_path / "t.parquet"
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError:
        p.write_bytes(b"PAR1")
        with pytest.raises(DataError, match="needs pyarrow"):
            load_user_data(p, "label")
        return
    pq.write_table(pa.table({"a": list(range(30)), "label": ["x", "y", "z"] * 10}), p)
    t = load_user_data(p, "label")
    assert t.num_classes == 3
