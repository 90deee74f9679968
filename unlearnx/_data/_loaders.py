"""Loaders for the vendored real datasets: UCI Adult, Pima Indians Diabetes, German Credit
and the UCI optical handwritten digits.

The raw files ship gzip-compressed inside the package (`unlearnx/_data/files/`, with their
provenance and licences in the README there) and are read with `importlib.resources`, so
the loaders work offline from an installed wheel. Parsing and preprocessing use numpy;
the arrays are converted to JAX at the end.
"""

from __future__ import annotations

import csv
import gzip
import importlib.resources
import io
from collections.abc import Sequence

import jax.numpy as jnp
import numpy as np

from ._dataset import Dataset, DatasetSplit

_MISSING = "?"

_ADULT_COLUMNS = (
    ("age", "num"),
    ("workclass", "cat"),
    ("fnlwgt", "num"),
    ("education", "cat"),
    ("education-num", "num"),
    ("marital-status", "cat"),
    ("occupation", "cat"),
    ("relationship", "cat"),
    ("race", "cat"),
    ("sex", "cat"),
    ("capital-gain", "num"),
    ("capital-loss", "num"),
    ("hours-per-week", "num"),
    ("native-country", "cat"),
)
_ADULT_ATTRIBUTES = ("sex", "race", "marital-status", "relationship", "native-country")

_GERMAN_COLUMNS = (
    ("checking_status", "cat"),
    ("duration", "num"),
    ("credit_history", "cat"),
    ("purpose", "cat"),
    ("credit_amount", "num"),
    ("savings", "cat"),
    ("employment_since", "cat"),
    ("installment_rate", "num"),
    ("personal_status_sex", "cat"),
    ("other_debtors", "cat"),
    ("residence_since", "num"),
    ("property", "cat"),
    ("age", "num"),
    ("other_installment_plans", "cat"),
    ("housing", "cat"),
    ("existing_credits", "num"),
    ("job", "cat"),
    ("people_liable", "num"),
    ("telephone", "cat"),
    ("foreign_worker", "cat"),
)
_GERMAN_FEMALE = ("A92", "A95")  # A91, A93, A94 are male


def _read(name: str) -> str:
    """Text of a vendored file `files/<name>.gz`."""
    resource = importlib.resources.files("unlearnx._data").joinpath("files", f"{name}.gz")
    with resource.open("rb") as f:
        return gzip.decompress(f.read()).decode("utf-8")


def _rows(text: str, skip_comments: bool = False) -> list[list[str]]:
    """Non-empty rows of a comma-separated file, each field stripped of whitespace."""
    rows = []
    for row in csv.reader(io.StringIO(text), skipinitialspace=True):
        row = [field.strip() for field in row]
        if not any(row) or (skip_comments and row[0].startswith("|")):
            continue
        rows.append(row)
    return rows


def _float_dtype(dtype, where: str):
    """The requested floating dtype, or jnp's default float dtype for `None`."""
    dtype = jnp.result_type(float) if dtype is None else jnp.dtype(dtype)
    if not jnp.issubdtype(dtype, jnp.floating):
        raise ValueError(f"{where}: `dtype` must be a floating dtype; got {dtype}.")
    return dtype


def _split_indices(n: int, test_fraction: float, seed: int, where: str):
    """A deterministic random (train, test) partition of `range(n)`."""
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(
            f"{where}: `test_fraction` must lie strictly between 0 and 1; got {test_fraction}."
        )
    n_test = int(round(test_fraction * n))
    if not 0 < n_test < n:
        raise ValueError(
            f"{where}: `test_fraction={test_fraction}` leaves an empty train or test set "
            f"for {n} rows; choose a value nearer 0.5."
        )
    perm = np.random.default_rng(seed).permutation(n)
    return perm[n_test:], perm[:n_test]


def _stratified_split_indices(labels: np.ndarray, test_fraction: float, seed: int, where: str):
    """A deterministic stratified (train, test) partition of `range(len(labels))`.

    Each class contributes `round(test_fraction * n_class)` of its rows, chosen by a
    permutation from `np.random.default_rng(seed)`; both parts are returned sorted.
    """
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(
            f"{where}: `test_fraction` must lie strictly between 0 and 1; got {test_fraction}."
        )
    rng = np.random.default_rng(seed)
    train, test = [], []
    for c in np.unique(labels):
        rows = np.flatnonzero(labels == c)
        n_test = int(round(test_fraction * rows.size))
        if not 0 < n_test < rows.size:
            raise ValueError(
                f"{where}: `test_fraction={test_fraction}` leaves class {c} ({rows.size} rows) "
                f"without train or test rows; choose a value nearer 0.5."
            )
        rows = rng.permutation(rows)
        test.append(rows[:n_test])
        train.append(rows[n_test:])
    return np.sort(np.concatenate(train)), np.sort(np.concatenate(test))


def _encode(train: np.ndarray, test: np.ndarray, columns: Sequence[tuple[str, str]]):
    """Standardise numeric columns and one-hot encode categorical ones.

    `train` and `test` are string arrays with one column per entry of `columns`. Numeric
    columns are standardised with the train mean and (population) std; categorical ones
    are one-hot encoded over the sorted train categories, with the missing marker `?` (and
    any category unseen in train) encoded as an all-zero block.

    Returns:
        `(X_train, X_test, feature_names, groups, categories)`, where `categories` maps
        each categorical column to its sorted train categories.
    """
    blocks_train, blocks_test, names, groups, categories = [], [], [], [], {}
    for j, (name, kind) in enumerate(columns):
        start = len(names)
        if kind == "num":
            a, b = train[:, j].astype(np.float64), test[:, j].astype(np.float64)
            mean, std = a.mean(), a.std()
            std = std if std > 0 else 1.0
            blocks_train.append(((a - mean) / std)[:, None])
            blocks_test.append(((b - mean) / std)[:, None])
            names.append(name)
        else:
            cats = sorted(set(train[:, j].tolist()) - {_MISSING})
            categories[name] = tuple(cats)
            blocks_train.append(train[:, j][:, None] == np.array(cats)[None, :])
            blocks_test.append(test[:, j][:, None] == np.array(cats)[None, :])
            names.extend(f"{name}={c}" for c in cats)
        groups.append((name, tuple(range(start, len(names)))))
    X_train = np.concatenate(blocks_train, axis=1).astype(np.float64)
    X_test = np.concatenate(blocks_test, axis=1).astype(np.float64)
    return X_train, X_test, tuple(names), tuple(groups), categories


def _codes(values: np.ndarray, cats: Sequence[str]) -> np.ndarray:
    """Integer codes of `values` into `cats`; `-1` for missing or unknown values."""
    index = {c: i for i, c in enumerate(cats)}
    return np.array([index.get(v, -1) for v in values.tolist()], dtype=np.int32)


def _dataset(X, y, attributes, names, groups, levels, dtype, n_classes=2) -> Dataset:
    return Dataset(
        X=jnp.asarray(X, dtype=dtype),
        y=jnp.asarray(y, dtype=jnp.int32),
        weights=jnp.ones(X.shape[0], dtype=dtype),
        attributes={k: jnp.asarray(v) for k, v in attributes.items()},
        feature_names=names,
        groups=groups,
        levels=levels,
        n_classes=n_classes,
    )


def adult(*, dtype=None) -> DatasetSplit:
    """The UCI Adult (census income) dataset, with its original train/test split.

    Predict whether income exceeds 50K. The six numeric columns are standardised with the
    train mean and std; the eight categorical columns are one-hot encoded over the sorted
    train categories, a missing value (`?`) being an all-zero block. This gives 105
    feature columns. Every row is kept, including those with missing values.

    Args:
        dtype: floating dtype of `X` and `weights`; `None` means JAX's default float
            dtype (float64 when `jax_enable_x64` is on, else float32).

    Returns:
        A `DatasetSplit` with 32,561 train and 16,281 test rows. `y` is 1 for `>50K`.
        Attributes: integer codes for `"sex"`, `"race"`, `"marital-status"`,
        `"relationship"` and `"native-country"` (`-1` for missing; names in `levels`),
        and the raw `"age"` in years.

    Example:
        ```python
        import unlearnx as ux
        data = ux.datasets.adult()
        print(data.train.X.shape, data.train.columns("sex"))  # (32561, 105) (59, 60)
        ```
    """
    dtype = _float_dtype(dtype, "adult")
    train = np.array(_rows(_read("adult.data")), dtype=object)
    test = np.array(_rows(_read("adult.test"), skip_comments=True), dtype=object)
    if train.shape != (32561, 15) or test.shape != (16281, 15):
        raise RuntimeError(
            f"adult: corrupt vendored files; raw shapes {train.shape}, {test.shape}."
        )
    X_train, X_test, names, groups, cats = _encode(train[:, :-1], test[:, :-1], _ADULT_COLUMNS)
    levels = tuple((a, cats[a]) for a in _ADULT_ATTRIBUTES)
    col = {name: j for j, (name, _) in enumerate(_ADULT_COLUMNS)}
    splits = []
    for raw, X in ((train, X_train), (test, X_test)):
        y = np.array([label.rstrip(".") == ">50K" for label in raw[:, -1]], dtype=np.int32)
        attributes = {a: _codes(raw[:, col[a]], cats[a]) for a in _ADULT_ATTRIBUTES}
        attributes["age"] = jnp.asarray(raw[:, col["age"]].astype(np.float64), dtype=dtype)
        splits.append(_dataset(X, y, attributes, names, groups, levels, dtype))
    description = (
        "UCI Adult (census income): predict income >50K from the 1994 US Census "
        "(Becker & Kohavi 1996, UCI Machine Learning Repository, "
        "https://doi.org/10.24432/C5XW20). Licence: CC BY 4.0. Original split: "
        "adult.data (32,561 rows) for train, adult.test (16,281 rows) for test; all rows "
        "kept. Preprocessing: 6 numeric columns standardised with train mean/std; 8 "
        "categorical columns one-hot over sorted train categories, missing '?' as an "
        "all-zero block (105 features). y = 1 iff income >50K."
    )
    return DatasetSplit(splits[0], splits[1], "adult", description)


def diabetes(*, test_fraction: float = 0.2, seed: int = 0, dtype=None) -> DatasetSplit:
    """The Pima Indians Diabetes dataset, split at random into train and test.

    Eight numeric features, each min-max scaled to `[0, 1]` with the train minimum and
    maximum (test values may fall outside). The split is a deterministic permutation
    from `np.random.default_rng(seed)`.

    Args:
        test_fraction: fraction of the 768 rows held out for testing, in `(0, 1)`.
        seed: seed of the split.
        dtype: floating dtype of `X` and `weights`; `None` means JAX's default float
            dtype.

    Returns:
        A `DatasetSplit` (614 train and 154 test rows at the defaults). `y` is
        `Outcome` (1 = diabetes). Attributes: the raw `"Pregnancies"`, `"BMI"` and
        `"Age"`.

    Example:
        ```python
        import unlearnx as ux
        data = ux.datasets.diabetes(seed=1)
        print(data.train.n, data.test.n, data.train.feature_names[:2])
        ```
    """
    dtype = _float_dtype(dtype, "diabetes")
    rows = _rows(_read("diabetes.csv"))
    header, values = rows[0], np.array(rows[1:], dtype=np.float64)
    train_idx, test_idx = _split_indices(len(values), test_fraction, seed, "diabetes")
    features = values[:, :-1]
    lo, hi = features[train_idx].min(axis=0), features[train_idx].max(axis=0)
    span = np.where(hi > lo, hi - lo, 1.0)
    names = tuple(header[:-1])
    groups = tuple((name, (j,)) for j, name in enumerate(names))
    splits = []
    for idx in (train_idx, test_idx):
        X = (features[idx] - lo) / span
        y = values[idx, -1].astype(np.int32)
        attributes = {
            a: jnp.asarray(features[idx, names.index(a)], dtype=dtype)
            for a in ("Pregnancies", "BMI", "Age")
        }
        splits.append(_dataset(X, y, attributes, names, groups, (), dtype))
    description = (
        "Pima Indians Diabetes (National Institute of Diabetes and Digestive and Kidney "
        "Diseases, via the UCI Machine Learning Repository; Smith et al. 1988, "
        "'Using the ADAP learning algorithm to forecast the onset of diabetes mellitus'). "
        "Licence: public domain (CC0 as redistributed). 768 rows, 8 numeric features; "
        f"random {1 - test_fraction:.0%}/{test_fraction:.0%} split (seed {seed}); features "
        "min-max scaled with train min/max. y = Outcome (1 = diabetes)."
    )
    return DatasetSplit(splits[0], splits[1], "diabetes", description)


def german(*, test_fraction: float = 0.2, seed: int = 0, dtype=None) -> DatasetSplit:
    """The Statlog German Credit dataset, split at random into train and test.

    Predict good versus bad credit risk. The seven numeric attributes are standardised
    with the train mean and std; the thirteen coded categorical attributes (`A11`, ...)
    are one-hot encoded over the sorted train categories, with feature names such as
    `"purpose=A43"`. The 20 groups carry human-readable names (`"checking_status"`,
    `"duration"`, ..., `"foreign_worker"`).

    Args:
        test_fraction: fraction of the 1,000 rows held out for testing, in `(0, 1)`.
        seed: seed of the split (a permutation from `np.random.default_rng(seed)`).
        dtype: floating dtype of `X` and `weights`; `None` means JAX's default float
            dtype.

    Returns:
        A `DatasetSplit` (800 train and 200 test rows at the defaults). `y` is 1 for
        good and 0 for bad credit. Attributes: `"sex"` (0 = male for A91/A93/A94,
        1 = female for A92/A95) and the raw `"age"` in years.

    Example:
        ```python
        import unlearnx as ux
        data = ux.datasets.german()
        print(data.train.n, len(data.train.groups), data.train.columns("age"))
        ```
    """
    dtype = _float_dtype(dtype, "german")
    lines = _read("german.data").splitlines()
    raw = np.array([line.split() for line in lines if line.strip()], dtype=object)
    if raw.shape != (1000, 21):
        raise RuntimeError(f"german: corrupt vendored file; unexpected raw shape {raw.shape}.")
    train_idx, test_idx = _split_indices(len(raw), test_fraction, seed, "german")
    X_train, X_test, names, groups, _ = _encode(
        raw[train_idx, :-1], raw[test_idx, :-1], _GERMAN_COLUMNS
    )
    col = {name: j for j, (name, _) in enumerate(_GERMAN_COLUMNS)}
    levels = (("sex", ("male", "female")),)
    splits = []
    for idx, X in ((train_idx, X_train), (test_idx, X_test)):
        y = (raw[idx, -1] == "1").astype(np.int32)
        status = raw[idx, col["personal_status_sex"]]
        attributes = {
            "sex": np.isin(status, _GERMAN_FEMALE).astype(np.int32),
            "age": jnp.asarray(raw[idx, col["age"]].astype(np.float64), dtype=dtype),
        }
        splits.append(_dataset(X, y, attributes, names, groups, levels, dtype))
    description = (
        "Statlog German Credit: predict good vs bad credit risk (Hofmann 1994, UCI "
        "Machine Learning Repository, https://doi.org/10.24432/C5NC77). Licence: CC BY "
        f"4.0. 1,000 rows; random {1 - test_fraction:.0%}/{test_fraction:.0%} split (seed "
        f"{seed}). Preprocessing: 7 numeric attributes standardised with train mean/std; "
        "13 categorical attributes one-hot over sorted train categories. y = 1 for good, "
        "0 for bad; attribute sex from A9 (A92/A95 female)."
    )
    return DatasetSplit(splits[0], splits[1], "german", description)


def digits(*, test_fraction: float = 0.2, seed: int = 0, dtype=None) -> DatasetSplit:
    """The UCI optical handwritten digits (8×8 images, 10 classes), split by class.

    The 1,797 images of the UCI "Optical Recognition of Handwritten Digits" test set, as
    bundled with scikit-learn (`sklearn.datasets.load_digits`). Each image is 8×8 pixels
    of integer ink counts `0..16`, flattened row by row into 64 features named
    `"pixel_<row>_<col>"` and scaled to `[0, 1]` by dividing by 16. The split is
    stratified: each digit contributes `round(test_fraction * n_digit)` test rows, chosen
    by a permutation from `np.random.default_rng(seed)`; rows keep their file order.

    Args:
        test_fraction: fraction of each digit's rows held out for testing, in `(0, 1)`.
        seed: seed of the split.
        dtype: floating dtype of `X` and `weights`; `None` means JAX's default float
            dtype.

    Returns:
        A `DatasetSplit` (1,438 train and 359 test rows at the defaults), with
        `n_classes=10` and `y` the digit. Attribute `"digit"`: the label again as an
        integer code (levels `"0"` ... `"9"`), so that scenarios can address a digit as
        a group.

    Example:
        ```python
        import unlearnx as ux
        data = ux.datasets.digits()
        print(data.train.X.shape, data.test.n, data.train.n_classes)  # (1438, 64) 359 10
        ```
    """
    dtype = _float_dtype(dtype, "digits")
    values = np.loadtxt(io.StringIO(_read("digits.csv")), delimiter=",", dtype=np.int64)
    if values.shape != (1797, 65):
        raise RuntimeError(f"digits: corrupt vendored file; unexpected raw shape {values.shape}.")
    pixels, labels = values[:, :-1], values[:, -1].astype(np.int32)
    train_idx, test_idx = _stratified_split_indices(labels, test_fraction, seed, "digits")
    names = tuple(f"pixel_{r}_{c}" for r in range(8) for c in range(8))
    groups = tuple((name, (j,)) for j, name in enumerate(names))
    levels = (("digit", tuple(str(d) for d in range(10))),)
    splits = []
    for idx in (train_idx, test_idx):
        X = pixels[idx].astype(np.float64) / 16.0
        attributes = {"digit": labels[idx]}
        splits.append(_dataset(X, labels[idx], attributes, names, groups, levels, dtype, 10))
    description = (
        "UCI Optical Recognition of Handwritten Digits, test set (Alpaydin & Kaynak 1998, "
        "UCI Machine Learning Repository, https://doi.org/10.24432/C50P49), as bundled "
        "with scikit-learn. Licence: CC BY 4.0. 1,797 8x8 images, 64 pixel counts 0..16 "
        "scaled to [0, 1] by /16; stratified "
        f"{1 - test_fraction:.0%}/{test_fraction:.0%} split (seed {seed}). y = digit 0-9."
    )
    return DatasetSplit(splits[0], splits[1], "digits", description)
