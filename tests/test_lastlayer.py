"""Last-layer Laplace against the dense GGN built here from `jax.jacrev` (with the
likelihoods' output Hessians written out in numpy), numpy/scipy linear algebra, and
rebuilding from the edited data. Float64 (conftest enables x64).
"""

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.linalg
from scipy.special import expit, softmax

import unlearnx as ux
from unlearnx._curvature._lastlayer import LastLayerPrecision
from unlearnx._models._cnn import CNNClassifier

LAM = 0.7
N = 24


def output_hessian(model, f):
    """`∇²_f ℓ` per example, in numpy, from the likelihood's definition."""
    f = np.asarray(f)
    if isinstance(model.likelihood, ux.models.Categorical):
        p = softmax(f, axis=1)
        return np.einsum("ni,ij->nij", p, np.eye(p.shape[1])) - np.einsum("ni,nj->nij", p, p)
    p = expit(f)  # Bernoulli
    return (p * (1 - p))[:, :, None]


@eqx.filter_jit
def _jacobians(model, X):
    theta, unravel = ux.models.ravel(model)
    J = jax.vmap(lambda x: jax.jacrev(lambda t: unravel(t)(x))(theta))(X)  # (n, c, d)
    return J, jax.vmap(model)(X)


def dense_ggn(model, X, w):
    """`Σ_i w_i J_iᵀ H_i J_i` over all parameters."""
    J, F = _jacobians(model, X)
    J, H = np.asarray(J), output_hessian(model, F)
    return np.einsum("n,nci,ncd,ndj->ij", np.asarray(w), J, H, J)


def last_layer(model):
    """Positions in `θ` of the last layer's weight and bias, `[W | b]` row-major, read
    off the model rebuilt with each parameter holding its own position."""
    index = ux.models.ravel(model)[1](jnp.arange(ux.models.n_params(model), dtype=float))
    if hasattr(index, "mlp"):
        layer = index.mlp.layers[-1]
    elif hasattr(index, "linears"):
        layer = index.linears[-1]
    else:  # a GLM: the whole model
        layer = index
    W = np.asarray(layer.weight).astype(int).reshape(-1, layer.weight.shape[-1])
    b = np.asarray(layer.bias).astype(int).reshape(-1, 1)
    return np.hstack([W, b]).ravel()


def _close(a, b, tol):
    a, b = np.asarray(a), np.asarray(b)
    np.testing.assert_allclose(a, b, rtol=tol, atol=tol * max(np.abs(b).max(), 1.0))


def _dataset(X, y, w):
    names = tuple(f"x{i}" for i in range(X.shape[1]))
    return ux.Dataset(jnp.asarray(X), jnp.asarray(y), jnp.asarray(w), {}, names)


def _perturb(model, scale, seed=3):
    theta, unravel = ux.models.ravel(model)
    return unravel(theta + scale * jax.random.normal(jax.random.key(seed), theta.shape))


@eqx.filter_jit
def _make(name):
    if name == "glm":
        return _perturb(ux.models.LogisticRegression(5), 1.0)
    if name == "mlp":
        return _perturb(ux.models.MLPClassifier(5, 3, width=6, depth=2, key=jax.random.key(1)), 0.3)
    model = CNNClassifier((2, 4, 5), 3, channels=(3, 4), hidden=(5,), key=jax.random.key(2))
    return _perturb(model, 0.3)


@pytest.fixture(scope="module")
def cases():
    rng = np.random.default_rng(0)
    out = {}
    for name in ("glm", "mlp", "cnn"):
        model = _make(name)
        X = rng.normal(size=(N, model.n_inputs))
        y = rng.integers(0, 2 if name == "glm" else 3, N).astype(np.int32)
        w = rng.uniform(0.5, 2.0, N)
        w[[2, 7]] = 0.0
        out[name] = (model, _dataset(X, y, w))
    return out


@eqx.filter_jit
def _build(model, data):
    return LastLayerPrecision.from_data(model, data, LAM, chunk=10)  # 3 chunks under scan


_BUILT = {}


def built(cases, name):
    if name not in _BUILT:
        P, ok = _build(*cases[name])
        assert bool(ok)
        _BUILT[name] = P
    return _BUILT[name]


@eqx.filter_jit
def dense(P):
    return P.to_dense(), P.logdet()


# --- the block ---------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["glm", "mlp", "cnn"])
def test_block_is_the_dense_ggn_of_the_last_layer(cases, name):
    model, data = cases[name]
    P = built(cases, name)
    d = ux.models.n_params(model)
    active = last_layer(model)
    assert P.dim == d and P.n_active == active.size
    np.testing.assert_array_equal(np.sort(P.layer.index().ravel()), np.sort(active))
    ggn = dense_ggn(model, data.X, data.weights)
    expected = np.zeros((d, d))
    expected[np.ix_(active, active)] = ggn[np.ix_(active, active)] + LAM * np.eye(active.size)
    D, logdet = dense(P)
    _close(D, expected, 1e-10)
    block = expected[np.ix_(active, active)]
    _close(logdet, np.linalg.slogdet(block)[1], 1e-12)
    if name == "glm":  # the last layer is the whole model
        full, _ = eqx.filter_jit(ux.DensePrecision.from_data)(model, data, LAM)
        _close(D, full.matrix, 1e-10)


@eqx.filter_jit
def _operations(P, v, V, key):
    x, info = P.solve_info(v)
    return dict(
        mv=P.mv(v),
        solve=P.solve(v),
        solveV=P.solve(V),
        info=info,
        variance=P.variance(),
        shifted=P.shift(0.25).to_dense(),
        sample=P.sample(key, 4000),
    )


@pytest.mark.parametrize("name", ["mlp", "cnn"])
def test_operations_match_dense(cases, name):
    """Frozen coordinates: zeros from `mv`, `solve`, `variance`, `sample`; `solve` is the
    pseudo-inverse of `to_dense()`."""
    model, _ = cases[name]
    P = built(cases, name)
    d, active = P.dim, last_layer(model)
    frozen = np.setdiff1d(np.arange(d), active)
    D = np.asarray(dense(P)[0])
    block = D[np.ix_(active, active)]
    rng = np.random.default_rng(7)
    v, V = rng.normal(size=d), rng.normal(size=(d, 3))
    out = _operations(P, v, V, jax.random.key(0))
    _close(out["mv"], D @ v, 1e-10)
    pinv = np.linalg.pinv(D, hermitian=True)
    _close(out["solve"], pinv @ v, 1e-10)
    _close(out["solveV"], pinv @ V, 1e-10)
    assert np.all(np.asarray(out["solve"])[frozen] == 0)
    _close(out["variance"], np.diag(pinv), 1e-10)
    assert np.all(np.asarray(out["variance"])[frozen] == 0)
    expected = D.copy()
    expected[active, active] += 0.25
    _close(out["shifted"], expected, 1e-12)
    # Draws: exactly zero on frozen coordinates, N(0, block⁻¹) on the active ones.
    S = np.asarray(out["sample"])
    assert S.shape == (4000, d) and np.all(S[:, frozen] == 0)
    Z = S[:, active] @ scipy.linalg.cholesky(block, lower=True)
    assert np.abs(Z.mean(0)).max() < 0.1
    assert np.abs(np.cov(Z.T) - np.eye(active.size)).max() < 0.15


# --- edits --------------------------------------------------------------------------------------


@eqx.filter_jit
def _edit_checks(P, model, adds, removes):
    Ps, oks = jax.vmap(lambda a, r: P.edit_examples(model, a, r))(adds, removes)
    first = lambda tree: jax.tree_util.tree_map(lambda x: x[0], tree)  # noqa: E731
    P2, ok2 = first(Ps).edit_examples(model, first(removes), first(adds))
    dense = jax.vmap(lambda Q: Q.to_dense())(Ps)
    logdet = jax.vmap(lambda Q: Q.logdet())(Ps)
    return (P.to_dense(), dense[0], P2.to_dense(), dense[1]), logdet[1], (*oks, ok2)


@pytest.mark.parametrize("name", ["glm", "mlp"])
def test_edits_roundtrip_and_equal_rebuild(cases, name):
    model, data = cases[name]
    P = built(cases, name)
    rng = np.random.default_rng(5)
    new = (jnp.asarray(rng.normal(size=(6, model.n_inputs))), data.y[:6], jnp.full(6, 1.5))
    gone = np.array([0, 3, 4, 11, 19, 23])
    zeros = (data.X[:6], data.y[:6], jnp.zeros(6))
    rows = (data.X[gone], data.y[gone], data.weights[gone])
    bad = (data.X[gone], data.y[gone], 1e4 * data.weights[gone])
    stack = lambda *r: jax.tree_util.tree_map(lambda *x: jnp.stack(x), *r)  # noqa: E731
    (D, D1, D2, D3), logdet3, oks = _edit_checks(
        P, model, stack(new, zeros, zeros), stack(zeros, rows, bad)
    )
    assert [bool(ok) for ok in oks] == [True, True, False, True]
    assert np.abs(np.asarray(D1 - D)).max() > 1e-3
    _close(D2, D, 1e-8)
    kept = eqx.tree_at(lambda d: d.weights, data, data.weights.at[gone].set(0.0))
    R, _ = _build(model, kept)
    R_dense, R_logdet = dense(R)
    _close(D3, R_dense, 1e-8)
    _close(logdet3, R_logdet, 1e-10)


def test_jit_and_vmap_match_eager(cases):
    P = built(cases, "mlp")
    V = jax.random.normal(jax.random.key(3), (4, P.dim))
    eager = P.solve(V.T).T
    _close(jax.jit(lambda P, v: P.solve(v))(P, V[0]), eager[0], 1e-13)
    _close(jax.jit(jax.vmap(P.solve))(V), eager, 1e-13)
    deltas = jnp.array([0.0, 0.5])
    logdets = jax.jit(jax.vmap(lambda s: P.shift(s).logdet()))(deltas)
    _close(logdets, [P.logdet(), P.shift(0.5).logdet()], 1e-13)


# --- end to end, memory and errors ------------------------------------------------------------


def test_laplace_and_second_order_unlearning(cases):
    model, data = cases["mlp"]
    post = ux.laplace(model, data, structure="last_layer", prior_precision=LAM)
    assert isinstance(post.precision, LastLayerPrecision)
    u = ux.chain(ux.second_order(), ux.refine(steps=2))
    rows = [3, 17, 18, 20]
    new, _, info = u.update(ux.forget_rows(rows), u.init(post, data))
    assert np.all(np.isfinite(new.theta))
    assert bool(info[0].downdate_ok) and not bool(info[0].fallback)
    # Only the last layer moves.
    frozen = np.setdiff1d(np.arange(post.precision.dim), last_layer(model))
    np.testing.assert_array_equal(np.asarray(new.theta)[frozen], np.asarray(post.theta)[frozen])
    kept = eqx.tree_at(lambda d: d.weights, data, data.weights.at[np.array(rows)].set(0.0))
    R, _ = _build(model, kept)
    _close(dense(new.precision)[0], dense(R)[0], 1e-8)


def test_memory_estimate(cases):
    for name, P in _BUILT.items():
        model, _ = cases[name]
        assert P.memory_bytes() < LastLayerPrecision.memory_estimate(model, N, chunk=10)
    # Against XLA's compiled peak for the digits CNN (shapes only, never allocated).
    model = eqx.filter_eval_shape(lambda: CNNClassifier((1, 8, 8), 10, key=jax.random.key(0)))
    params, static = eqx.partition(model, lambda x: isinstance(x, jax.ShapeDtypeStruct))
    rng = np.random.default_rng(0)
    n = 1000
    data = _dataset(rng.normal(size=(n, 64)), rng.integers(0, 10, n).astype(np.int32), np.ones(n))
    fn = jax.jit(lambda p, d: LastLayerPrecision.from_data(eqx.combine(p, static), d, 1.0))
    mem = fn.lower(params, data).compile().memory_analysis()
    peak = mem.temp_size_in_bytes + mem.output_size_in_bytes
    est = LastLayerPrecision.memory_estimate(model, n)
    assert 0.75 <= est / peak <= 1.25, (est, peak)


def test_errors(cases):
    model, data = cases["mlp"]
    with pytest.raises(ValueError, match="curvature='hessian'.*curvature='ggn'"):
        LastLayerPrecision.from_data(model, data, 1.0, "hessian")
    with pytest.raises(ValueError, match="curvature='hessian'"):
        built(cases, "mlp").edit_examples(model, None, None, "hessian")

    class Odd(ux.models.AbstractModel):
        weight: jax.Array
        likelihood: ux.models.Gaussian

        n_inputs = property(lambda self: 2)
        n_outputs = property(lambda self: 1)

        def __call__(self, x):
            return jnp.sin(self.weight @ x) * jnp.ones(1)

    with pytest.raises(ValueError, match=r"Odd.*MLPClassifier.*'matrix_free'"):
        LastLayerPrecision.memory_estimate(Odd(jnp.ones(2), ux.models.Gaussian()), 10)
