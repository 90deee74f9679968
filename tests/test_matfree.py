"""The matrix-free precision against dense oracles built independently here.

Oracles: the GGN `Σ_i w_i J_iᵀ H_i J_i` from per-example `jax.jacrev` Jacobians and the
output Hessian `jax.hessian` of the likelihood; the exact Hessian by `jax.hessian` of
the weighted loss; `numpy.linalg.solve`, `inv` and `slogdet` of that dense matrix; the
dense (`structure="full"`) posterior for unlearning. Everything runs in float64.
"""

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import unlearnx as ux
from unlearnx._curvature._factors import data_ggn_vp
from unlearnx._curvature._matfree import MatrixFreePrecision
from unlearnx._models._base import ravel

LAM = 0.7
#: Every precision here is built with the same options, so that each operation compiles
#: once per model: chunks of 16 rows (40 rows: three chunks, one padded), room for 16
#: edited rows, and fewer Lanczos steps than parameters (d = 31) so that `logdet` is
#: stochastic, not exact.
OPTIONS = dict(chunk=16, edit_capacity=16, logdet_steps=16)


def _data(rng, n, p, classes):
    X = rng.standard_normal((n, p))
    y = rng.integers(0, classes, n).astype(np.int32)
    w = rng.uniform(0.5, 2.0, n)
    w[:3] = 0.0  # padding rows contribute nothing
    names = tuple(f"x{i}" for i in range(p))
    return ux.Dataset(jnp.asarray(X), jnp.asarray(y), jnp.asarray(w), {}, names, n_classes=classes)


@pytest.fixture(scope="module")
def mlp():
    rng = np.random.default_rng(1)
    data = _data(rng, 40, 3, 3)
    model = ux.models.MLPClassifier(
        3, 3, width=4, depth=1, dtype=jnp.float64, key=jax.random.key(2)
    )
    return data, model  # d = 31


@pytest.fixture(scope="module")
def logistic():
    rng = np.random.default_rng(2)
    data = _data(rng, 50, 4, 2)
    model = ux.models.LogisticRegression(4, dtype=jnp.float64)
    theta, unravel = ravel(model)
    return data, unravel(jnp.asarray(rng.standard_normal(theta.shape[0])))  # d = 5


@eqx.filter_jit
def _build(model, data, curvature="ggn", **options):
    """`from_data` under jit, as `laplace` builds it."""
    return MatrixFreePrecision.from_data(model, data, LAM, curvature, **{**OPTIONS, **options})


@eqx.filter_jit
def _edit(P, model, add, remove):
    return P.edit_examples(model, add, remove)


def _reweighted(data, weights):
    return eqx.tree_at(lambda d: d.weights, data, weights)


@eqx.filter_jit
def _dense_ggn(model, data):
    """`Σ_i w_i J_iᵀ H_i J_i`, with `J_i` by `jax.jacrev` and `H_i = ∇²_f nll` by
    `jax.hessian`: no GGN factors, no JVPs."""
    theta, unravel = ravel(model)
    lik = model.likelihood

    def one(x, y):
        f = lambda t: unravel(t)(x)  # noqa: E731
        J = jax.jacrev(f)(theta)
        H = jax.hessian(lambda out: lik.nll(out, y))(f(theta))
        return J.T @ H @ J

    G = jax.vmap(one)(data.X, data.y)
    return jnp.einsum("i,ijk->jk", data.weights, G)


@eqx.filter_jit
def _dense_hessian(model, data):
    theta, unravel = ravel(model)

    def loss(t):
        return jnp.sum(data.weights * jax.vmap(unravel(t).loss)(data.X, data.y))

    return jax.hessian(loss)(theta)


def _close(a, b, tol):
    a, b = np.asarray(a), np.asarray(b)
    assert np.max(np.abs(a - b)) <= tol * max(1.0, np.max(np.abs(b))), np.max(np.abs(a - b))


@pytest.mark.parametrize("problem", ["mlp", "logistic"])
@pytest.mark.parametrize("kind", ["ggn", "hessian"])
def test_products_match_dense_oracles(problem, kind, request):
    data, model = request.getfixturevalue(problem)
    theta, unravel = ravel(model)
    C = np.asarray(_dense_ggn(model, data) if kind == "ggn" else _dense_hessian(model, data))
    d = theta.shape[0]
    V = jnp.asarray(np.random.default_rng(3).standard_normal((d, 2)))
    vp = jax.jit(jax.vmap(lambda v: data_ggn_vp(theta, unravel, data, v, kind, chunk=16), 1, 1))
    _close(vp(V), C @ np.asarray(V), 1e-10)
    P, ok = _build(model, data, kind)
    assert bool(ok)
    Lam = C + LAM * np.eye(d)
    _close(P.to_dense(), Lam, 1e-10)  # `d` products `Λ e_j`
    if kind == "ggn":  # the exact diagonal preconditioner is diag Λ
        _close(P.diagonal, np.diag(Lam), 1e-10)


@pytest.fixture(scope="module")
def mlp_precision(mlp):
    data, model = mlp
    P, ok = _build(model, data)
    assert bool(ok)
    Lam = np.asarray(_dense_ggn(model, data)) + LAM * np.eye(P.dim)
    return data, model, P, Lam


def test_solves_match_numpy(mlp_precision):
    data, model, P, Lam = mlp_precision
    B = np.random.default_rng(4).standard_normal((P.dim, 3))
    _close(P.mv(jnp.asarray(B)), Lam @ B, 1e-10)
    for preconditioner in ("diag", "hutchinson"):
        Q = P if preconditioner == "diag" else _build(model, data, preconditioner=preconditioner)[0]
        X, info = Q.solve_info(jnp.asarray(B))
        assert bool(info.converged) and float(info.residual) <= 1e-10
        np.testing.assert_allclose(X, np.linalg.solve(Lam, B), rtol=1e-8, atol=1e-10)
    np.testing.assert_allclose(P.solve(jnp.asarray(B)), X, rtol=1e-8, atol=1e-10)
    # shift (damping, a new prior precision) moves λ and the preconditioner together.
    S = P.shift(0.5)
    _close(S.to_dense(), Lam + 0.5 * np.eye(P.dim), 1e-10)
    _close(S.diagonal, np.diag(Lam) + 0.5, 1e-10)


def test_edits_add_remove_and_rebuild(mlp_precision):
    data, model, P, Lam = mlp_precision
    rows = (data.X[5:12], data.y[5:12], data.weights[5:12])
    # Remove rows: the operator built without them (same θ), diagonal included.
    P1, ok = _edit(P, model, None, rows)
    assert bool(ok) and int(P1.edit_count) == 7
    without = _reweighted(data, data.weights.at[5:12].set(0.0))
    R, _ = _build(model, without)
    _close(P1.to_dense(), R.to_dense(), 1e-12)
    _close(P1.diagonal, R.diagonal, 1e-12)
    # Add them back: the original operator.
    P2, ok = _edit(P1, model, rows, None)
    assert bool(ok) and int(P2.edit_count) == 14
    _close(P2.to_dense(), Lam, 1e-12)
    # A relabel in one call (add the new rows, remove the old); weight-0 rows take no room.
    new_rows = (rows[0], (rows[1] + 1) % 3, rows[2].at[:2].set(0.0))
    P3, ok = _edit(P, model, new_rows, rows)
    assert bool(ok) and int(P3.edit_count) == 12
    relabelled = _reweighted(data, data.weights.at[5:7].set(0.0))
    relabelled = eqx.tree_at(lambda d: d.y, relabelled, data.y.at[5:12].set(new_rows[1]))
    _close(P3.to_dense(), _build(model, relabelled)[0].to_dense(), 1e-12)
    # Overflowing the 16-row edit buffer is reported (the caller rebuilds) ...
    _, ok = _edit(P3, model, new_rows, rows)
    assert not bool(ok)
    # ... and so is removing more curvature than there is, by the diagonal check.
    _, ok = _edit(P, model, None, (rows[0], rows[1], 1e3 * rows[2]))
    assert not bool(ok)
    # rebuild keeps the options and empties the buffer.
    B, ok = P1.rebuild(model, without, LAM)
    assert bool(ok) and int(B.edit_count) == 0 and B.options == P1.options
    with pytest.raises(ValueError, match="curvature='hessian'"):
        P.edit_examples(model, rows, None, "hessian")


def test_sample_covariance_logdet_and_variance(mlp_precision):
    data, model, P, Lam = mlp_precision
    n = 3000
    # Perturb-and-solve (no removed rows), then Lanczos (after removing rows): one
    # compiled function serves both.
    removed, _ = _edit(P, model, None, (data.X[5:12], data.y[5:12], data.weights[5:12]))
    for Q in (P, removed):
        L = np.asarray(Q.to_dense())
        S = np.asarray(Q.sample(jax.random.key(5), n))
        assert S.shape == (n, Q.dim) and np.all(np.isfinite(S))
        emp = S.T @ S / n
        # Whitened, the sample covariance is I up to Monte Carlo error ~ 2√(d/n) ≈ 0.2.
        W = np.linalg.cholesky(L)
        assert np.linalg.norm(W.T @ emp @ W - np.eye(Q.dim), 2) <= 0.35
        np.testing.assert_allclose(np.diag(emp), np.diag(np.linalg.inv(L)), rtol=0.15)
        # SLQ (16 Lanczos steps for d = 31) within a few percent of slogdet.
        sign, exact = np.linalg.slogdet(L)
        assert sign > 0 and abs(float(Q.logdet()) - exact) <= 0.03 * abs(exact)
    # Variances: exact for small d, the Rademacher estimator otherwise.
    var = np.diag(np.linalg.inv(Lam))
    np.testing.assert_allclose(P.variance(), var, rtol=1e-8)
    est = _build(model, data, exact_variance_dim=0, variance_probes=400)[0].variance()
    np.testing.assert_allclose(est, var, rtol=0.35)
    assert abs(np.mean(est) / np.mean(var) - 1) <= 0.1


def test_laplace_and_unlearning_match_the_dense_posterior(mlp):
    data, model = mlp
    full = ux.laplace(model, data, prior_precision=LAM, structure="full")
    free = ux.laplace(model, data, prior_precision=LAM, structure="matrix_free", **OPTIONS)
    assert isinstance(free.precision, MatrixFreePrecision)
    _close(free.precision.to_dense(), full.precision.matrix, 1e-10)
    np.testing.assert_allclose(
        free.log_marginal_likelihood(data), full.log_marginal_likelihood(data), rtol=0.02
    )
    X = data.X[:4]
    np.testing.assert_allclose(free.predict(X), full.predict(X), rtol=1e-8)
    u = ux.chain(ux.second_order(), ux.refine(steps=2))
    sf, sd = u.init(free, data), u.init(full, data)
    requests = (
        [3, 8, 20, 33, 35],
        [10, 12, 14, 16, 18],
        [21, 22, 23, 24, 25],
        [26, 27, 28, 29, 30],
    )
    for i, rows in enumerate(requests):
        previous = sf.posterior.mean
        pf, sf, (info, rinfo) = u.update(ux.forget_rows(rows), sf)
        pd, sd, _ = u.update(ux.forget_rows(rows), sd)
        assert int(rinfo.steps) == 2 and np.all(np.isfinite(pf.theta))
        if i == 0:  # an exact downdate: the same steps as the dense posterior's
            assert not bool(info.fallback)
            np.testing.assert_allclose(pf.theta, pd.theta, rtol=1e-7, atol=1e-9)
    # 15 removed rows fit the 16-row buffer; the fourth request's 5 more overflow it, and
    # `second_order` rebuilt the precision at the mean it started from, on the edited data.
    assert bool(info.fallback) and int(sf.posterior.precision.edit_count) == 0
    rebuilt = ux.laplace(previous, sf.data, prior_precision=LAM, structure="full")
    _close(sf.posterior.precision.to_dense(), rebuilt.precision.matrix, 1e-10)


def test_options_and_memory(mlp):
    data, model = mlp
    with pytest.raises(ValueError, match="unknown option"):
        ux.laplace(model, data, structure="matrix_free", rank=3)
    with pytest.raises(ValueError, match="preconditioner"):
        ux.laplace(model, data, structure="matrix_free", preconditioner="ilu")
    with pytest.raises(ValueError, match="edit_capacity"):
        ux.laplace(model, data, structure="matrix_free", edit_capacity=0)
    big = ux.models.MLPClassifier(50, 10, width=256, depth=2, key=jax.random.key(0))
    assert ravel(big)[0].shape[0] > 60_000
    need = MatrixFreePrecision.memory_estimate(big, 100_000, preconditioner="hutchinson")
    assert 0 < need < 200 * 2**20
    assert ux.DensePrecision.memory_estimate(big, 100_000) > 100 * need
