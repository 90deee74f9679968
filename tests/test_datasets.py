"""Tests of the vendored real datasets and the synthetic generators.

Facts about the real data are checked against an independent parse of the vendored raw
files (csv module on the gzip archives), not against the loaders' own code.
"""

import csv
import gzip
import importlib.resources
import io

import jax

jax.config.update("jax_enable_x64", True)

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
from sklearn.linear_model import LogisticRegression  # noqa: E402

import unlearnx.datasets as ds  # noqa: E402

ADULT_NUMERIC = ("age", "fnlwgt", "education-num", "capital-gain", "capital-loss", "hours-per-week")
ADULT_HEADER = (
    "age workclass fnlwgt education education-num marital-status occupation relationship "
    "race sex capital-gain capital-loss hours-per-week native-country income"
).split()


def _raw(name):
    path = importlib.resources.files("unlearnx._data").joinpath("files", f"{name}.gz")
    with path.open("rb") as f:
        return gzip.decompress(f.read()).decode("utf-8")


def _raw_adult(name):
    rows = csv.reader(io.StringIO(_raw(name)), skipinitialspace=True)
    rows = [[v.strip() for v in r] for r in rows if len(r) == 15]
    return {col: np.array([r[j] for r in rows]) for j, col in enumerate(ADULT_HEADER)}


@pytest.fixture(scope="module")
def adult():
    return ds.adult()


@pytest.fixture(scope="module")
def raw_adult():
    return _raw_adult("adult.data"), _raw_adult("adult.test")


def test_adult_shapes_and_labels(adult, raw_adult):
    raw_train, raw_test = raw_adult
    assert adult.name == "adult"
    assert adult.train.X.shape == (32561, 105)
    assert adult.test.X.shape == (16281, 105)
    assert adult.train.X.dtype == jnp.float64 and adult.train.y.dtype == jnp.int32
    assert adult.train.n_classes == 2
    n_pos = int(np.sum(raw_train["income"] == ">50K"))
    assert n_pos == 7841
    assert int(adult.train.y.sum()) == n_pos
    assert float(adult.train.y.mean()) == pytest.approx(0.2408, abs=1e-4)
    assert int(adult.test.y.sum()) == int(np.sum(raw_test["income"] == ">50K."))
    np.testing.assert_array_equal(adult.train.weights, np.ones(32561))
    for word in ("CC BY 4.0", "Kohavi", "standardised"):
        assert word in adult.description


def test_adult_numeric_standardised(adult, raw_adult):
    X = np.asarray(adult.train.X)
    for name in ADULT_NUMERIC:
        (j,) = adult.train.columns(name)
        assert adult.train.feature_names[j] == name
        np.testing.assert_allclose(X[:, j].mean(), 0.0, atol=1e-10)
        np.testing.assert_allclose(X[:, j].std(), 1.0, atol=1e-10)
    # The test split uses the train statistics: recover raw test ages from them.
    age = raw_adult[0]["age"].astype(float)
    (j,) = adult.test.columns("age")
    recovered = np.asarray(adult.test.X[:, j]) * age.std() + age.mean()
    np.testing.assert_allclose(recovered, raw_adult[1]["age"].astype(float), atol=1e-8)


def test_adult_one_hot_blocks(adult, raw_adult):
    categorical = [c for c in ADULT_HEADER[:-1] if c not in ADULT_NUMERIC]
    assert len(adult.train.groups) == 14
    assert sum(len(adult.train.columns(c)) for c in categorical) == 99
    for split, raw in ((adult.train, raw_adult[0]), (adult.test, raw_adult[1])):
        X = np.asarray(split.X)
        for col in categorical:
            cats = sorted(set(raw_adult[0][col]) - {"?"})
            cols = split.columns(col)
            assert [split.feature_names[j] for j in cols] == [f"{col}={c}" for c in cats]
            block = X[:, cols]
            known = np.isin(raw[col], cats)
            np.testing.assert_array_equal(block.sum(axis=1), known.astype(float))
            hot = np.argmax(block[known], axis=1)
            np.testing.assert_array_equal(np.array(cats)[hot], raw[col][known])
    assert np.any(raw_adult[0]["workclass"] == "?")


def test_adult_attributes(adult, raw_adult):
    train = adult.train
    assert train.columns("sex") == (
        train.feature_names.index("sex=Female"),
        train.feature_names.index("sex=Male"),
    )
    assert train.attribute_levels("sex") == ("Female", "Male")
    for split, raw in ((adult.train, raw_adult[0]), (adult.test, raw_adult[1])):
        for attr in ("sex", "race", "marital-status", "relationship", "native-country"):
            codes = np.asarray(split.attribute(attr))
            assert codes.dtype == np.int32
            levels = np.array(split.attribute_levels(attr) + ("?",))
            np.testing.assert_array_equal(levels[codes], raw[attr])  # code -1 -> "?"
        np.testing.assert_array_equal(split.attribute("age"), raw["age"].astype(float))
    assert int(np.sum(np.asarray(train.attribute("native-country")) == -1)) == 583


def test_diabetes():
    data = ds.diabetes()
    assert (data.train.n, data.test.n) == (614, 154)
    assert data.train.feature_names == (
        "Pregnancies",
        "Glucose",
        "BloodPressure",
        "SkinThickness",
        "Insulin",
        "BMI",
        "DiabetesPedigreeFunction",
        "Age",
    )
    np.testing.assert_allclose(data.train.X.min(axis=0), 0.0)
    np.testing.assert_allclose(data.train.X.max(axis=0), 1.0)
    assert data.train.columns("BMI") == (5,)
    raw = np.array([r for r in csv.reader(io.StringIO(_raw("diabetes.csv")))][1:], float)
    assert raw.shape == (768, 9)
    assert int(data.train.y.sum() + data.test.y.sum()) == int(raw[:, -1].sum())
    # Attributes are raw values; the scaled BMI column maps back to them.
    bmi, lo, hi = data.train.attribute("BMI"), raw[:, 5].min(), raw[:, 5].max()
    assert float(data.train.attribute("Age").min()) >= 21.0
    np.testing.assert_allclose(data.train.X[:, 5] * (bmi.max() - bmi.min()) + bmi.min(), bmi)
    assert lo <= float(bmi.min()) and float(bmi.max()) <= hi
    # Deterministic in the seed.
    again, other = ds.diabetes(), ds.diabetes(seed=1)
    np.testing.assert_array_equal(data.train.X, again.train.X)
    assert not np.array_equal(np.asarray(data.train.y), np.asarray(other.train.y))
    assert ds.diabetes(test_fraction=0.5).test.n == 384


def test_german():
    data = ds.german()
    assert (data.train.n, data.test.n) == (800, 200)
    assert len(data.train.groups) == 20
    assert data.train.groups[0][0] == "checking_status"
    assert data.train.columns("checking_status") == (0, 1, 2, 3)
    rows = [line.split() for line in _raw("german.data").splitlines() if line.strip()]
    raw = np.array(rows)
    assert raw.shape == (1000, 21)
    n_good = int(np.sum(raw[:, -1] == "1"))
    assert int(data.train.y.sum() + data.test.y.sum()) == n_good == 700
    X = np.asarray(data.train.X)
    for name in ("duration", "credit_amount", "age", "people_liable"):
        (j,) = data.train.columns(name)
        np.testing.assert_allclose([X[:, j].mean(), X[:, j].std()], [0.0, 1.0], atol=1e-10)
    np.testing.assert_array_equal(X[:, data.train.columns("purpose")].sum(axis=1), 1.0)
    assert data.train.attribute_levels("sex") == ("male", "female")
    n_female = int(np.isin(raw[:, 8], ["A92", "A95"]).sum())
    total = int(data.train.attribute("sex").sum() + data.test.attribute("sex").sum())
    assert total == n_female
    ages = np.concatenate([data.train.attribute("age"), data.test.attribute("age")])
    assert sorted(ages.tolist()) == sorted(raw[:, 12].astype(float).tolist())


def test_dtypes():
    data = ds.diabetes(dtype=jnp.float32)
    assert data.train.X.dtype == jnp.float32
    assert data.train.weights.dtype == jnp.float32
    assert data.train.y.dtype == jnp.int32
    with jax.enable_x64(False):
        default = ds.german()
        glm, _ = ds.synthetic_glm(jax.random.key(0), n=10, d=2, family="gaussian")
    assert default.train.X.dtype == jnp.float32 and default.train.y.dtype == jnp.int32
    assert glm.X.dtype == jnp.float32 and glm.y.dtype == jnp.float32
    assert ds.german().train.X.dtype == jnp.float64


def test_bad_arguments():
    with pytest.raises(ValueError, match="test_fraction"):
        ds.diabetes(test_fraction=1.0)
    with pytest.raises(ValueError, match="test_fraction"):
        ds.german(test_fraction=0.0)
    with pytest.raises(ValueError, match="dtype"):
        ds.diabetes(dtype=jnp.int32)
    key = jax.random.key(0)
    with pytest.raises(ValueError, match="family"):
        ds.synthetic_glm(key, family="poisson")
    with pytest.raises(ValueError, match="n_classes"):
        ds.synthetic_glm(key, family="softmax", n_classes=1)
    with pytest.raises(ValueError, match="n_groups"):
        ds.synthetic_groups(key, n_groups=1)
    with pytest.raises(ValueError, match="proxy_strength"):
        ds.synthetic_groups(key, proxy_strength=-1.0)


@pytest.mark.parametrize("family", ["logistic", "gaussian", "softmax"])
def test_glm_deterministic(family):
    a, wa = ds.synthetic_glm(jax.random.key(1), n=200, d=4, family=family, n_classes=4)
    b, wb = ds.synthetic_glm(jax.random.key(1), n=200, d=4, family=family, n_classes=4)
    c, _ = ds.synthetic_glm(jax.random.key(2), n=200, d=4, family=family, n_classes=4)
    for x, y in ((a.X, b.X), (a.y, b.y), (wa, wb)):
        np.testing.assert_array_equal(x, y)
    assert not np.array_equal(np.asarray(a.X), np.asarray(c.X))
    assert a.feature_names == ("x0", "x1", "x2", "x3")
    expected = {"logistic": ((4,), 2), "gaussian": ((4,), None), "softmax": ((4, 4), 4)}
    assert (wa.shape, a.n_classes) == expected[family]
    if family == "gaussian":
        assert a.y.dtype == jnp.float64
    else:
        assert a.y.dtype == jnp.int32
        assert set(np.unique(a.y).tolist()) <= set(range(a.n_classes))


def test_glm_recovers_true_params():
    data, w = ds.synthetic_glm(jax.random.key(0), n=5000, d=10)
    fit = LogisticRegression(C=1e6, fit_intercept=False, max_iter=1000)
    fit.fit(np.asarray(data.X), np.asarray(data.y))
    assert np.corrcoef(fit.coef_[0], np.asarray(w))[0, 1] > 0.9
    gauss, wg = ds.synthetic_glm(jax.random.key(0), n=5000, d=10, family="gaussian")
    w_ls = np.linalg.lstsq(np.asarray(gauss.X), np.asarray(gauss.y), rcond=None)[0]
    assert np.corrcoef(w_ls, np.asarray(wg))[0, 1] > 0.9


def test_groups():
    key = jax.random.key(3)
    data = ds.synthetic_groups(key, n=4000, d=3, n_groups=3, shift=1.5, proxy_strength=2.0)
    again = ds.synthetic_groups(key, n=4000, d=3, n_groups=3, shift=1.5, proxy_strength=2.0)
    np.testing.assert_array_equal(data.X, again.X)
    np.testing.assert_array_equal(data.y, again.y)
    assert data.feature_names == (
        "x0",
        "x1",
        "x2",
        "proxy0",
        "proxy1",
        "group=g0",
        "group=g1",
        "group=g2",
    )
    assert data.columns("group") == (5, 6, 7)
    assert data.attribute_levels("group") == ("g0", "g1", "g2")
    g = np.asarray(data.attribute("group"))
    assert g.dtype == np.int32 and data.y.dtype == jnp.int32 and data.n_classes == 2
    X = np.asarray(data.X)
    np.testing.assert_array_equal(np.argmax(X[:, 5:], axis=1), g)
    assert np.corrcoef(X[:, 3], g)[0, 1] > 0.7  # the proxies leak the group
    means = [X[g == k, 0].mean() for k in range(3)]
    assert means[0] < means[1] < means[2]
    rates = [np.asarray(data.y)[g == k].mean() for k in range(3)]
    assert rates[2] - rates[0] > 0.2
    plain = ds.synthetic_groups(key, n=100, d=3)
    assert plain.feature_names == ("x0", "x1", "x2", "group=g0", "group=g1")
