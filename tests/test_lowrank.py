"""Lanczos and the low rank plus diagonal precision against independent oracles.

The oracle GGN is built here from per-example `jax.jacrev` Jacobians and the softmax's
output Hessian `diag p − p pᵀ` written in numpy (none of unlearnx's factor, product or
likelihood code); eigenpairs come from `numpy.linalg.eigh`, solves, log-determinants and
inverses from numpy on `to_dense()`. Float64 throughout (conftest enables x64).
"""

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import unlearnx as ux
from unlearnx._curvature._factors import data_ggn_vp
from unlearnx._curvature._lanczos import lanczos
from unlearnx._curvature._lowrank import LowRankPrecision

LAM = 0.5
RANK = 10


@eqx.filter_jit
def _jacobians(model, X):
    theta, unravel = ux.models.ravel(model)
    return jax.vmap(lambda x: jax.jacrev(lambda t: unravel(t)(x))(theta))(X)


def _softmax_factors(model, X, w):
    """Per-row GGN factors `√w (diag √p − √p pᵀ)ᵀ J` in numpy, `(n·c, d)`."""
    J = np.asarray(_jacobians(model, X))
    F = np.asarray(jax.vmap(model)(X))
    p = np.exp(F - F.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    c = p.shape[1]
    H = np.einsum("nc,cd->ncd", p, np.eye(c)) - np.einsum("nc,nd->ncd", p, p)
    # a symmetric square root of each (PSD) output Hessian
    vals, vecs = np.linalg.eigh(H)
    B = np.einsum("nij,nj,nkj->nik", vecs, np.sqrt(np.maximum(vals, 0)), vecs)
    U = np.sqrt(np.asarray(w))[:, None, None] * np.einsum("nck,nkd->ncd", B, J)
    return U.reshape(-1, J.shape[-1])


@pytest.fixture(scope="module")
def mlp():
    kd, km = jax.random.split(jax.random.key(3))
    data, _ = ux.datasets.synthetic_glm(kd, n=80, d=3, family="softmax", n_classes=3, scale=2.0)
    model = ux.models.MLPClassifier(3, 3, width=8, depth=1, key=km)
    U = _softmax_factors(model, data.X, data.weights)
    return data, model, U.T @ U  # d = 59


@pytest.fixture(scope="module")
def lowrank(mlp):
    """Built eagerly; `lowrank_post` is the same through `laplace`, under `jit`."""
    data, model, _ = mlp
    P, ok = LowRankPrecision.from_data(model, data, LAM, rank=RANK, slots=24)
    assert bool(ok)
    return P


@pytest.fixture(scope="module")
def lowrank_post(mlp):
    data, model, _ = mlp
    return ux.laplace(model, data, prior_precision=LAM, structure="lowrank", rank=RANK, slots=24)


@eqx.filter_jit
def _edit(P, model, add, remove):
    return P.edit_examples(model, add, remove)


def _rows(data, idx, weight=1.0):
    return data.X[idx], data.y[idx], weight * data.weights[idx]


# --- Lanczos -------------------------------------------------------------------------------


def test_lanczos_matches_eigh_of_explicit_ggn(mlp):
    """Default iterations (`min(d, 2k + 20) = 32` of `d = 59`): converged to rounding."""
    data, model, G = mlp
    theta, unravel = ux.models.ravel(model)
    d, k = theta.shape[0], 6

    @jax.jit
    def top(t):
        matvec = lambda v: data_ggn_vp(t, unravel, data, v)  # noqa: E731
        return lanczos(matvec, d, k, jax.random.key(1), t.dtype)

    vals, vecs = top(theta)
    ev, U = np.linalg.eigh(G)
    ev, U = ev[::-1][:k], U[:, ::-1][:, :k]
    assert np.min(-np.diff(ev)) > 0.1  # distinct eigenvalues: the eigenvectors are defined
    np.testing.assert_allclose(vals, ev, rtol=1e-8)
    np.testing.assert_allclose(np.abs(np.sum(np.asarray(vecs) * U, axis=0)), 1.0, atol=1e-8)
    np.testing.assert_allclose(vecs.T @ vecs, np.eye(k), atol=1e-10)


def test_lanczos_restarts_on_rank_deficient_operator(rng):
    """Rank 3 < k: the Krylov space breaks down and restarts; zeros come out as zeros."""
    d, r, k = 30, 3, 6
    G = rng.normal(size=(r, d))
    A = jnp.asarray(G.T @ G)
    vals, vecs = lanczos(lambda v: A @ v, d, k, jax.random.key(0), A.dtype, iterations=d)
    ev = np.linalg.eigvalsh(np.asarray(A))[::-1][:k]
    np.testing.assert_allclose(vals, ev, atol=1e-10 * ev[0])
    np.testing.assert_allclose(vecs.T @ vecs, np.eye(k), atol=1e-10)
    assert np.all(np.isfinite(vecs))


def test_lanczos_rejects_bad_sizes():
    A = jnp.eye(4)
    with pytest.raises(ValueError, match="lanczos: `k`"):
        lanczos(lambda v: A @ v, 4, 5, jax.random.key(0), A.dtype)
    with pytest.raises(ValueError, match="lanczos: `iterations`"):
        lanczos(lambda v: A @ v, 4, 3, jax.random.key(0), A.dtype, iterations=2)


# --- the structure -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def full_rank(mlp):
    data, model, _ = mlp
    return ux.laplace(model, data, prior_precision=LAM, structure="lowrank", rank=59)


def test_full_rank_is_dense_ggn_plus_prior(mlp, full_rank):
    data, model, G = mlp
    d = G.shape[0]
    P = full_rank.precision
    assert P.capacity == d and P.rank == d
    np.testing.assert_allclose(P.to_dense(), G + LAM * np.eye(d), rtol=0, atol=1e-10 * G.max())
    np.testing.assert_allclose(P.logdet(), np.linalg.slogdet(G + LAM * np.eye(d))[1], rtol=1e-10)


def test_structure_is_top_eigenpairs_plus_residual_diagonal(mlp, lowrank):
    _, _, G = mlp
    P = lowrank
    A = np.asarray(P.to_dense())
    ev, U = np.linalg.eigh(G)
    V, s = U[:, ::-1][:, :RANK], ev[::-1][:RANK]
    low = (V * s) @ V.T
    D = LAM + np.maximum(np.diag(G) - np.diag(low), 0.0)
    np.testing.assert_allclose(A, np.diag(D) + low, rtol=0, atol=1e-9 * G.max())
    np.testing.assert_allclose(np.asarray(P.diag), D, rtol=1e-9)


def test_operations_match_dense(lowrank, rng):
    P = lowrank
    A = np.asarray(P.to_dense())
    d = A.shape[0]
    v, M = rng.normal(size=d), rng.normal(size=(d, 4))
    np.testing.assert_allclose(P.mv(jnp.asarray(v)), A @ v, rtol=1e-12)
    np.testing.assert_allclose(P.mv(jnp.asarray(M)), A @ M, rtol=1e-12)
    np.testing.assert_allclose(P.solve(jnp.asarray(v)), np.linalg.solve(A, v), rtol=1e-10)
    np.testing.assert_allclose(P.solve(jnp.asarray(M)), np.linalg.solve(A, M), rtol=1e-10)
    np.testing.assert_allclose(P.logdet(), np.linalg.slogdet(A)[1], rtol=1e-12)
    np.testing.assert_allclose(P.variance(), np.diag(np.linalg.inv(A)), rtol=1e-10)
    x, info = P.solve_info(jnp.asarray(v))
    assert bool(info.converged) and float(info.residual) < 1e-12
    np.testing.assert_allclose(P.shift(0.3).to_dense(), A + 0.3 * np.eye(d), atol=1e-12 * A.max())
    assert P.memory_bytes() == (d * (P.capacity + 1) + P.capacity) * 8


def test_samples_have_covariance_inverse_precision(lowrank):
    P = lowrank
    A = np.asarray(P.to_dense())
    n = 20_000
    draws = np.asarray(P.sample(jax.random.key(5), n))
    assert draws.shape == (n, P.dim)
    # whitened by Λ^{1/2} the draws must have identity covariance
    L = np.linalg.cholesky(A)
    white = draws @ L
    cov = white.T @ white / n
    np.testing.assert_allclose(cov, np.eye(P.dim), atol=6 / np.sqrt(n))


def test_edits_are_exact_and_reversible(mlp, lowrank):
    data, model, G = mlp
    P = lowrank
    A = np.asarray(P.to_dense())
    rows, none = _rows(data, slice(0, 5)), _rows(data, slice(0, 5), 0.0)  # weight 0: nothing
    U = _softmax_factors(model, data.X[:5], data.weights[:5])
    added, ok = _edit(P, model, rows, none)
    assert bool(ok)
    np.testing.assert_allclose(added.to_dense(), A + U.T @ U, rtol=0, atol=1e-10 * A.max())
    back, ok = _edit(added, model, none, rows)
    assert bool(ok)
    np.testing.assert_allclose(back.to_dense(), A, rtol=0, atol=1e-8 * A.max())
    np.testing.assert_allclose(back.logdet(), P.logdet(), rtol=1e-10)
    # both at once: replace rows 0-4 by rows 5-9
    V = _softmax_factors(model, data.X[5:10], data.weights[5:10])
    both, ok = _edit(P, model, _rows(data, slice(5, 10)), rows)
    assert bool(ok)
    ref = A + V.T @ V - U.T @ U
    np.testing.assert_allclose(both.to_dense(), ref, rtol=0, atol=1e-10 * A.max())
    np.testing.assert_allclose(both.solve(jnp.ones(P.dim)), np.linalg.solve(ref, np.ones(P.dim)))


def test_indefinite_downdate_reports_not_ok(mlp, lowrank):
    """Removing five rows' curvature 10⁴ times over leaves `Λ'` indefinite: `ok` says so."""
    data, model, _ = mlp
    A = np.asarray(lowrank.to_dense())
    U = _softmax_factors(model, data.X[:5], 1e4 * data.weights[:5])
    assert np.linalg.eigvalsh(A - U.T @ U).min() < 0
    bad, ok = _edit(lowrank, model, _rows(data, slice(0, 5), 0.0), _rows(data, slice(0, 5), 1e4))
    assert not bool(ok)
    assert np.all(np.isfinite(bad.eigvals))


def test_jit_and_eager_agree_and_edits_do_not_recompile(mlp, lowrank, lowrank_post):
    data, model, _ = mlp
    assert isinstance(lowrank_post.precision, LowRankPrecision)
    jitted = lowrank_post.precision
    np.testing.assert_allclose(jitted.to_dense(), lowrank.to_dense(), rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(jitted.variance(), lowrank.variance(), rtol=1e-12)
    traces = []

    @eqx.filter_jit
    def remove(P, m, rows):
        traces.append(1)
        return P.remove_examples(m, rows)

    once, _ = remove(lowrank, model, _rows(data, slice(0, 4)))
    plain, _ = lowrank.remove_examples(model, _rows(data, slice(0, 4)))
    np.testing.assert_allclose(once.to_dense(), plain.to_dense(), rtol=1e-12, atol=1e-12)
    again, _ = remove(once, model, _rows(data, slice(4, 8)))
    assert len(traces) == 1 and again.basis.shape == lowrank.basis.shape


def test_second_order_with_lowrank_is_newton_step_on_downdated_precision(mlp, lowrank_post):
    """`θ' = θ − Λ'⁻¹ G` with `Λ' = Λ − Σ_old UᵀU`, checked in numpy."""
    data, model, _ = mlp
    post = lowrank_post
    u = ux.second_order()
    rows = np.array([1, 5, 9])
    new, _, info = u.update(ux.forget_rows(rows), u.init(post, data))
    assert bool(info.downdate_ok) and not bool(info.fallback)
    assert np.all(np.isfinite(new.theta)) and np.all(np.isfinite(new.precision.to_dense()))
    U = _softmax_factors(model, data.X[rows], data.weights[rows])
    ref = np.asarray(post.precision.to_dense()) - U.T @ U
    np.testing.assert_allclose(new.precision.to_dense(), ref, rtol=0, atol=1e-10 * ref.max())
    theta, unravel = ux.models.ravel(model)

    def loss(t):  # the removed rows' summed cross-entropy, written here
        F = jax.vmap(unravel(t))(data.X[rows])
        return jnp.sum(jax.nn.logsumexp(F, axis=1) - F[jnp.arange(3), data.y[rows]])

    G = -np.asarray(jax.grad(loss)(theta))
    np.testing.assert_allclose(new.theta, theta - np.linalg.solve(ref, G), rtol=1e-9)


def test_rejects_hessian_and_bad_options(mlp):
    data, model, _ = mlp
    with pytest.raises(ValueError, match="curvature='hessian'"):
        LowRankPrecision.from_data(model, data, LAM, "hessian")
    with pytest.raises(ValueError, match="`rank`"):
        LowRankPrecision.memory_estimate(model, data.n, rank=0)
    with pytest.raises(ValueError, match="`iterations`"):
        LowRankPrecision.memory_estimate(model, data.n, rank=5, iterations=3)


def test_memory_estimate_bounds_what_is_held(mlp, lowrank):
    data, model, _ = mlp
    est = LowRankPrecision.memory_estimate(model, data.n, rank=RANK, slots=24)
    assert lowrank.memory_bytes() <= est


def test_default_slots_keep_a_16_row_deletion_exact():
    """By default `slots = 16·c`: deleting 16 rows of a 10-class model (160 directions,
    one request in the 16-row bucket) is exact, with no rebuild; 32 slots truncate it."""
    kd, km = jax.random.split(jax.random.key(4))
    data, _ = ux.datasets.synthetic_glm(kd, n=300, d=6, family="softmax", n_classes=10, scale=2.0)
    model = ux.models.MLPClassifier(6, 10, width=12, depth=1, key=km)  # d = 214
    post = ux.laplace(model, data, prior_precision=LAM, structure="lowrank", rank=RANK)
    P = post.precision
    assert P.slots == 160 and P.capacity == RANK + 160 < P.dim
    assert LowRankPrecision.memory_estimate(model, data.n, rank=RANK) == (
        LowRankPrecision.memory_estimate(model, data.n, rank=RANK, slots=160)
    )
    rows = np.arange(16)
    U = _softmax_factors(model, data.X[rows], data.weights[rows])
    ref = np.asarray(P.to_dense()) - U.T @ U
    assert np.linalg.eigvalsh(ref).min() > 0  # the exact downdate is positive definite
    u = ux.second_order()
    new, _, info = u.update(ux.forget_rows(rows), u.init(post, data))
    assert bool(info.downdate_ok) and not bool(info.fallback)
    np.testing.assert_allclose(new.precision.to_dense(), ref, rtol=0, atol=1e-10 * ref.max())
    # With 32 slots the same downdate is still positive definite (`ok`), but truncated to
    # `rank + 32` columns: 128 of the 160 directions beyond `rank` are lost.
    small = ux.laplace(model, data, prior_precision=LAM, structure="lowrank", rank=RANK, slots=32)
    cut, ok = _edit(small.precision, model, _rows(data, rows, 0.0), _rows(data, rows))
    assert bool(ok)
    exact = np.asarray(small.precision.to_dense()) - U.T @ U
    assert np.abs(np.asarray(cut.to_dense()) - exact).max() > 1e-3 * np.abs(exact).max()
