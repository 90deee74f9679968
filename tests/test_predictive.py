"""The linearised predictive `J Λ⁻¹ Jᵀ` of every structure's `functional_covariance`
against the oracle built here: per-row Jacobians from `jax.jacrev` of the flat-parameter
function and `numpy.linalg.inv` of `to_dense()` (on the active block for the last
layer, whose frozen parameters have no variance). Float64 (conftest enables x64).
"""

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _helpers import _Quadratic
from scipy.special import expit, softmax

import unlearnx as ux
from unlearnx._curvature import _precision
from unlearnx._curvature._layers import find_layers, layer_covariance
from unlearnx._models._cnn import CNNClassifier

LAM = 0.7
N = 20  # rows the precisions are built from
M = 7  # rows the predictive is evaluated at
FAST = ["kfac", "ekfac", "diag", "last_layer"]
# EK-FAC shares KFAC's code (only the eigenvalues differ): its convolutions are left out
# to keep the compilations few.
CASES = [(n, s) for n in ("mlp", "logistic", "cnn") for s in FAST if (n, s) != ("cnn", "ekfac")]


def _random(make, rng):
    """The model `make()` builds, with standard normal parameters scaled by 0.5: its
    structure is traced (`eval_shape`), never compiled, which keeps the tests fast."""
    shapes = eqx.filter_eval_shape(make)
    is_shape = lambda x: isinstance(x, jax.ShapeDtypeStruct)  # noqa: E731
    params, static = eqx.partition(shapes, is_shape)
    fill = lambda s: jnp.asarray(0.5 * rng.normal(size=s.shape), s.dtype)  # noqa: E731
    return eqx.combine(jax.tree_util.tree_map(fill, params, is_leaf=is_shape), static)


MAKERS = {
    "mlp": lambda: ux.models.MLPClassifier(5, 3, width=6, depth=2, key=jax.random.key(1)),
    "logistic": lambda: ux.models.LogisticRegression(5),
    # Two convolutions (the second on the pooled 2×2 maps), two dense layers: d = 185.
    "cnn": lambda: CNNClassifier((1, 4, 5), 3, channels=(3, 4), hidden=(5,), key=jax.random.key(4)),
    # Learnt activations (PReLU slopes) belong to no layer: the `rest` coordinates.
    "prelu": lambda: ux.models.MLPClassifier(
        5, 3, width=4, depth=2, activation=eqx.nn.PReLU(), key=jax.random.key(5)
    ),
}


@pytest.fixture(scope="module")
def cases():
    rng = np.random.default_rng(0)
    out = {}
    for name, make in MAKERS.items():
        model = _random(make, rng)
        X = rng.normal(size=(N + M, model.n_inputs))
        y = rng.integers(0, max(int(model.n_outputs), 2), N).astype(np.int32)
        names = tuple(f"x{i}" for i in range(X.shape[1]))
        data = ux.Dataset(
            jnp.asarray(X[:N]), jnp.asarray(y), jnp.asarray(rng.uniform(0.5, 2, N)), {}, names
        )
        out[name] = (model, data, jnp.asarray(X[N:]))
    return out


@eqx.filter_jit
def _jacobians(model, X):
    theta, unravel = ux.models.ravel(model)
    J = jax.vmap(lambda x: jax.jacrev(lambda t: unravel(t)(x))(theta))(X)  # (m, c, d)
    return J, jax.vmap(model)(X)


dense = eqx.filter_jit(lambda P: P.to_dense())


def oracle(model, P, X):
    """`(f, J Λ⁺ Jᵀ)`: `Λ⁺` the inverse of `to_dense()` on its nonzero rows and columns
    (all of them, except the frozen parameters of the last layer's structure)."""
    J, f = (np.asarray(x) for x in _jacobians(model, X))
    D = np.asarray(dense(P))
    a = np.flatnonzero(np.any(D != 0, axis=1))
    Ja = J[:, :, a]
    return f, np.einsum("mkd,de,mje->mkj", Ja, np.linalg.inv(D[np.ix_(a, a)]), Ja)


def _close(a, b, tol=1e-10):
    a, b = np.asarray(a), np.asarray(b)
    np.testing.assert_allclose(a, b, rtol=tol, atol=tol * np.abs(b).max())


_POSTS = {}


def posterior(cases, name, structure):
    if (name, structure) not in _POSTS:
        model, data, _ = cases[name]
        _POSTS[name, structure] = ux.laplace(model, data, prior_precision=LAM, structure=structure)
    return _POSTS[name, structure]


# --- exactness -------------------------------------------------------------------------------


@pytest.mark.parametrize("name, structure", CASES)
def test_fast_covariance_is_the_oracle(cases, name, structure):
    model, _, X = cases[name]
    post = posterior(cases, name, structure)
    f, cov = post.predictive_moments(X)
    c = int(model.n_outputs)
    assert f.shape == (M, c) and cov.shape == (M, c, c)
    f_ref, cov_ref = oracle(model, post.precision, X)
    _close(f, f_ref, 1e-12)
    _close(cov, cov_ref)


@pytest.mark.parametrize("structure", ["kfac", "diag"])
def test_parameters_outside_every_layer(cases, structure):
    """The PReLU slopes (8 of 67 parameters) go through their own Jacobian."""
    model, _, X = cases["prelu"]
    post = posterior(cases, "prelu", structure)
    _, cov = post.predictive_moments(X)
    _close(cov, oracle(model, post.precision, X)[1])


def test_the_layer_wise_paths_form_no_full_jacobian(cases, monkeypatch):
    """KFAC, EK-FAC, the diagonal of a known model and the last layer never call the
    generic path (traced only: nothing is compiled)."""

    def fail(*args):
        raise AssertionError("the generic Jacobian path was taken")

    monkeypatch.setattr(_precision, "jacobian_covariance", fail)
    for name, structure in CASES:
        model, _, X = cases[name]
        P = posterior(cases, name, structure).precision
        eqx.filter_eval_shape(P.functional_covariance, model, X)


def test_generic_path_for_other_structures_and_unknown_models(cases):
    model, data, X = cases["mlp"]
    post = ux.laplace(model, data, prior_precision=LAM, structure="full")
    _, cov = post.predictive_moments(X)
    _close(cov, oracle(model, post.precision, X)[1])

    quad = _Quadratic(weight=jnp.array([0.8, -1.3]), likelihood=ux.models.Gaussian())
    rng = np.random.default_rng(1)
    qdata = ux.Dataset(
        jnp.asarray(rng.normal(size=(N, 2))),
        jnp.asarray(rng.normal(size=N)),
        jnp.ones(N),
        {},
        ("a", "b"),
    )
    qpost = ux.laplace(quad, qdata, prior_precision=LAM, structure="diag")
    Xq = jnp.asarray(rng.normal(size=(M, 2)))
    _, cov = qpost.predictive_moments(Xq)
    _close(cov, oracle(quad, qpost.precision, Xq)[1])


def test_batches_of_rows_give_the_same_covariance(cases):
    """Batches of 3 rows (two full and a remainder of 1) against all 7 at once."""
    model, _, X = cases["mlp"]
    P = posterior(cases, "mlp", "kfac").precision
    layers = find_layers(model, "test")
    scales = tuple(1.0 / (b.eig + P.prior) for b in P.blocks)
    bases = tuple((b.QA, b.QG) for b in P.blocks)
    run = eqx.filter_jit(
        lambda m, X, rows: layer_covariance(m, X, layers, scales, bases, rows=rows)
    )
    _, whole = run(model, X, None)
    _, batched = run(model, X, 3)
    _close(batched, whole, 1e-13)


# --- the predictive ----------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["mlp", "logistic"])
def test_predict_goes_through_the_covariance(cases, name):
    """Probit predictive from the oracle's moments: softmax (mean-field) and sigmoid of
    `μ / √(1 + π/8 σ²)`."""
    model, _, X = cases[name]
    post = posterior(cases, name, "kfac")
    f, cov = oracle(model, post.precision, X)
    scaled = f / np.sqrt(1.0 + np.pi / 8.0 * np.diagonal(cov, axis1=1, axis2=2))
    expected = softmax(scaled, axis=1) if name == "mlp" else expit(scaled)
    _close(post.predict(X), expected)


# --- JAX behaviour -----------------------------------------------------------------------------


def test_jit_matches_eager_and_edits_do_not_recompile(cases):
    model, data, X = cases["mlp"]
    P = posterior(cases, "mlp", "kfac").precision
    traces = []

    @eqx.filter_jit
    def moments(P, model, X):
        traces.append(1)
        return P.functional_covariance(model, X)

    _, jitted = moments(P, model, X)
    _, eager = P.functional_covariance(model, X)
    _close(jitted, eager, 1e-13)
    edited, ok = eqx.filter_jit(lambda P, m, r: P.remove_examples(m, r))(
        P, model, (data.X[:3], data.y[:3], data.weights[:3])
    )
    assert bool(ok)
    _, after = moments(edited, model, X)
    assert len(traces) == 1
    _close(after, oracle(model, edited, X)[1])


def test_vmap_over_prior_precisions(cases):
    """`vmap` over shifted precisions (e.g. a grid of priors) equals a loop."""
    model, _, X = cases["mlp"]
    P = posterior(cases, "mlp", "ekfac").precision
    deltas = jnp.array([0.0, 0.5, 2.0])
    fn = eqx.filter_jit(
        lambda P, m, X, d: jax.vmap(lambda d: P.shift(d).functional_covariance(m, X)[1])(d)
    )
    covs = fn(P, model, X, deltas)
    for d, cov in zip(deltas, covs, strict=True):
        _close(cov, oracle(model, P.shift(d), X)[1])
