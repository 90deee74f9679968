"""Curvature diagonals: the exact GGN diagonal and Hutchinson's estimate.

Oracles: the dense GGN built here from per-example `jax.jacrev` Jacobians and the
softmax output Hessian `diag p − p pᵀ` in numpy, numpy's `Xᵀ diag(w p(1−p)) X` for
logistic regression, and the closed-form mean squared error of Hutchinson's estimator
with Rademacher probes, `E‖d̂ − diag C‖² = (1/N) Σ_{i≠l} C_il²`. Float64 throughout.
"""

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy.special import expit

import unlearnx as ux
from unlearnx._curvature import _diagonal
from unlearnx._curvature._diagonal import ggn_diagonal, hutchinson, hutchinson_diagonal
from unlearnx._curvature._factors import data_curvature
from unlearnx._curvature._precision import DiagonalPrecision

LAM = 0.5


@eqx.filter_jit
def _jacobians(model, X):
    theta, unravel = ux.models.ravel(model)
    return jax.vmap(lambda x: jax.jacrev(lambda t: unravel(t)(x))(theta))(X)


@pytest.fixture(scope="module")
def mlp():
    kd, km = jax.random.split(jax.random.key(3))
    data, _ = ux.datasets.synthetic_glm(kd, n=80, d=3, family="softmax", n_classes=3, scale=2.0)
    model = ux.models.MLPClassifier(3, 3, width=8, depth=1, key=km)
    J = np.asarray(_jacobians(model, data.X))
    F = np.asarray(jax.vmap(model)(data.X))
    p = np.exp(F - F.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    H = np.einsum("nc,cd->ncd", p, np.eye(3)) - np.einsum("nc,nd->ncd", p, p)
    w = np.asarray(data.weights)
    G = np.einsum("n,nci,ncd,ndj->ij", w, J, H, J)
    return data, model, G


def test_exact_diagonal_is_diagonal_of_dense_ggn(mlp, monkeypatch):
    data, model, G = mlp
    ref = np.diag(G)
    np.testing.assert_allclose(ggn_diagonal(model, data), ref, rtol=1e-12)
    theta, unravel = ux.models.ravel(model)
    # the helper behind `data_curvature(diagonal=True)` takes the same route
    diag = data_curvature(theta, unravel, data, "ggn", diagonal=True, chunk=32)
    np.testing.assert_allclose(diag, ref, rtol=1e-12)
    # a budget of 7 rows' gradients: 12 chunks, the last one padded with weight-0 rows
    d = theta.shape[0]
    monkeypatch.setattr(_diagonal, "DIAGONAL_BUDGET", 7 * d * 8)
    assert _diagonal.diagonal_chunk(d, 8) == 7
    np.testing.assert_allclose(ggn_diagonal(model, data), ref, rtol=1e-12)


def test_exact_diagonal_of_logistic_regression_is_numpy_formula():
    data, _ = ux.datasets.synthetic_glm(jax.random.key(0), n=120, d=4)
    w = np.linspace(0.0, 2.0, data.n)  # weights, the first one 0 (a deleted row)
    data = eqx.tree_at(lambda s: s.weights, data, jnp.asarray(w))
    model = ux.models.LogisticRegression(4)
    model = eqx.tree_at(lambda m: m.weight, model, jnp.array([0.3, -0.2, 0.5, 0.1]))
    theta = np.asarray(ux.models.ravel(model)[0])
    X = np.hstack([np.asarray(data.X), np.ones((data.n, 1))])[:, : theta.size]
    p = expit(X @ theta)
    ref = np.sum(X**2 * (w * p * (1 - p))[:, None], axis=0)
    np.testing.assert_allclose(ggn_diagonal(model, data), ref, rtol=1e-12)


def test_diagonal_precision_methods(mlp):
    data, model, G = mlp
    exact = ux.laplace(model, data, prior_precision=LAM, structure="diag").precision
    assert isinstance(exact, DiagonalPrecision)
    np.testing.assert_allclose(exact.diag, np.diag(G) + LAM, rtol=1e-12)
    hutch = ux.laplace(
        model, data, prior_precision=LAM, structure="diag", method="hutchinson", n_probes=512
    ).precision
    rel = np.linalg.norm(hutch.diag - exact.diag) / np.linalg.norm(exact.diag)
    assert 0 < rel < 0.15
    same, _ = DiagonalPrecision.from_data(model, data, LAM, method="hutchinson", n_probes=512)
    np.testing.assert_array_equal(same.diag, hutch.diag)  # the default key is fixed
    other, _ = DiagonalPrecision.from_data(
        model, data, LAM, method="hutchinson", n_probes=8, key=jax.random.key(9)
    )
    assert np.all(np.asarray(other.diag) >= LAM)  # a GGN estimate is clipped at 0


def test_hutchinson_error_falls_as_one_over_sqrt_probes(mlp):
    """Root mean squared error over 16 keys, against the closed form `√(Σ_{i≠l} C_il²/N)`."""
    data, model, G = mlp
    ref = np.diag(G)
    off = np.sqrt(np.sum(G**2) - np.sum(ref**2))

    def rmse(n):
        keys = jax.random.split(jax.random.key(1), 16)
        est = jax.jit(jax.vmap(lambda k: hutchinson_diagonal(k, model, data, n_probes=n)))(keys)
        return np.sqrt(np.mean(np.sum((np.asarray(est) - ref) ** 2, axis=1)))

    errors = {n: rmse(n) for n in (4, 64)}
    for n, err in errors.items():
        assert 0.6 < err / (off / np.sqrt(n)) < 1.5, (n, err, off / np.sqrt(n))
    assert 2.5 < errors[4] / errors[64] < 6.5  # 4 = √(64/4)


def test_hutchinson_is_exact_for_a_diagonal_operator():
    a = jnp.linspace(1.0, 3.0, 7)
    est = hutchinson(jax.random.key(0), lambda v: a * v, 7, 3, a.dtype)
    np.testing.assert_allclose(est, a, rtol=1e-15)


def test_bad_options_raise(mlp):
    data, model, _ = mlp
    with pytest.raises(ValueError, match="unknown `method='lanczos'`"):
        DiagonalPrecision.from_data(model, data, LAM, method="lanczos")
    with pytest.raises(ValueError, match="`n_probes` must be a positive int"):
        DiagonalPrecision.from_data(model, data, LAM, method="hutchinson", n_probes=0)
    with pytest.raises(ValueError, match="hutchinson_diagonal: unknown `curvature"):
        hutchinson_diagonal(jax.random.key(0), model, data, curvature="fisher")


def test_memory_estimates_bound_what_is_held(mlp):
    data, model, _ = mlp
    d = ux.models.ravel(model)[0].shape[0]
    for method in ("exact", "hutchinson"):
        assert DiagonalPrecision.memory_estimate(model, data.n, method=method) >= d * 8
