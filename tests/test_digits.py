"""Tests of the vendored UCI optical digits (`ux.datasets.digits`).

The oracle is scikit-learn's own loader, `sklearn.datasets.load_digits()`, which reads the
file this package vendors: pixel values, labels and images are compared against it, not
against the loader's code.
"""

import jax

jax.config.update("jax_enable_x64", True)

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
from sklearn.datasets import load_digits  # noqa: E402

import unlearnx.datasets as ds  # noqa: E402


@pytest.fixture(scope="module")
def digits():
    return ds.digits()


@pytest.fixture(scope="module")
def sk():
    return load_digits()


def _rows(split):
    """`(pixel counts 0..16, label)` of each row, as one integer matrix."""
    X = np.asarray(split.X) * 16
    np.testing.assert_array_equal(X, np.round(X))  # the counts are exact after /16
    return np.column_stack([np.round(X).astype(np.int64), np.asarray(split.y)])


def _is_subsequence(rows, full):
    """Whether `rows` appear in `full` in order (greedy match), as the file order says."""
    j = 0
    for r in rows:
        while j < len(full) and not np.array_equal(full[j], r):
            j += 1
        if j == len(full):
            return False
        j += 1
    return True


def test_shapes_names_and_dtypes(digits):
    train, test = digits.train, digits.test
    assert digits.name == "digits"
    assert train.X.shape == (1438, 64) and test.X.shape == (359, 64)
    assert train.X.dtype == jnp.float64 and train.y.dtype == jnp.int32
    assert train.weights.dtype == jnp.float64 and bool(jnp.all(train.weights == 1))
    assert train.n_classes == test.n_classes == 10
    assert train.feature_names[:3] == ("pixel_0_0", "pixel_0_1", "pixel_0_2")
    assert train.feature_names[63] == "pixel_7_7"
    assert train.columns("pixel_3_5") == (29,)
    assert "CC BY 4.0" in digits.description and "10.24432/C50P49" in digits.description
    assert ds.digits(dtype=jnp.float32).train.X.dtype == jnp.float32


def test_values_in_unit_interval(digits):
    for split in (digits.train, digits.test):
        X = np.asarray(split.X)
        assert X.min() == 0.0 and X.max() == 1.0


def test_digit_attribute_is_the_label(digits):
    for split in (digits.train, digits.test):
        digit = split.attribute("digit")
        assert jnp.issubdtype(digit.dtype, jnp.integer)
        np.testing.assert_array_equal(digit, split.y)
    assert digits.train.attribute_levels("digit") == tuple("0123456789")


def test_agrees_with_sklearn(digits, sk):
    """Train and test partition scikit-learn's rows exactly, each in file order."""
    full = np.column_stack([sk.data.astype(np.int64), sk.target])
    train, test = _rows(digits.train), _rows(digits.test)
    both = np.concatenate([train, test])
    np.testing.assert_array_equal(both[np.lexsort(both.T)], full[np.lexsort(full.T)])
    assert _is_subsequence(train, full) and _is_subsequence(test, full)
    # pixel_<r>_<c> is row r, column c of the 8x8 image
    j = digits.train.feature_names.index("pixel_2_6")
    np.testing.assert_array_equal(sk.images[:, 2, 6], sk.data[:, j])


def test_split_is_stratified(digits, sk):
    counts = np.bincount(sk.target, minlength=10)
    n_test = np.bincount(np.asarray(digits.test.y), minlength=10)
    n_train = np.bincount(np.asarray(digits.train.y), minlength=10)
    np.testing.assert_array_equal(n_train + n_test, counts)
    np.testing.assert_array_equal(n_test, np.round(0.2 * counts).astype(int))
    half = ds.digits(test_fraction=0.5, seed=3)
    n_test = np.bincount(np.asarray(half.test.y), minlength=10)
    assert np.all(np.abs(n_test - counts / 2) <= 0.5)


def test_split_is_deterministic(digits):
    again = ds.digits()
    np.testing.assert_array_equal(again.train.X, digits.train.X)
    np.testing.assert_array_equal(again.test.y, digits.test.y)
    other = ds.digits(seed=1)
    assert other.train.n == digits.train.n
    assert not np.array_equal(other.train.X, digits.train.X)


@pytest.mark.parametrize("fraction", [0.0, 1.0, -0.1, 0.001])
def test_bad_test_fraction(fraction):
    with pytest.raises(ValueError, match="digits: `test_fraction"):
        ds.digits(test_fraction=fraction)


def test_bad_dtype():
    with pytest.raises(ValueError, match="digits: `dtype` must be a floating dtype"):
        ds.digits(dtype=jnp.int32)
