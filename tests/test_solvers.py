"""Iterative solvers (`cg`, `lissa`, `lanczos`, the damping rule) against numpy.

Oracles: `numpy.linalg.solve` and `numpy.linalg.eigvalsh` in float64; in float32 the
true residual recomputed in float64, which the reported `converged` flag must match.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jaxtyping import TypeCheckError

from unlearnx._curvature._solvers import (
    cg,
    default_damping,
    lanczos,
    largest_eigenvalue,
    lissa,
    tridiagonal_eigh,
)


def _spd(rng, d, emin, emax, smin=0.0, smax=0.0):
    """`D Q diag(eig) Qᵀ D`: eigenvalues log-spaced in `[10^emin, 10^emax]`, then scaled
    symmetrically by `D` (log-spaced in `[10^smin, 10^smax]`): badly scaled when
    `smin < smax`, which a Jacobi preconditioner undoes."""
    Q, _ = np.linalg.qr(rng.standard_normal((d, d)))
    A = Q @ np.diag(np.logspace(emin, emax, d)) @ Q.T
    D = np.diag(np.logspace(smin, smax, d)[rng.permutation(d)])
    A = D @ A @ D
    return 0.5 * (A + A.T)


def _rel(a, b):
    return np.linalg.norm(np.asarray(a) - np.asarray(b)) / np.linalg.norm(np.asarray(b))


@jax.jit
def _solve(A, b):
    """Plain and Jacobi-preconditioned CG (`A` an argument: one compilation per shape)."""
    plain = cg(lambda v: A @ v, b, tol=1e-12, max_iters=2000)
    jacobi = cg(lambda v: A @ v, b, preconditioner=lambda v: v / jnp.diag(A), tol=1e-12)
    return plain, jacobi


def test_cg_matches_numpy_solve(rng):
    A = _spd(rng, 40, -1, 1, -0.5, 0.5)  # condition number about 1e4
    B = rng.standard_normal((40, 3))
    for x, info in _solve(jnp.asarray(A), jnp.asarray(B[:, 0])):
        assert bool(info.converged) and float(info.residual) <= 1e-12
        assert _rel(x, np.linalg.solve(A, B[:, 0])) <= 1e-8
    # A matrix of right-hand sides: one solve per column (under vmap), the same answers.
    for (X, info), (x, _) in zip(
        _solve(jnp.asarray(A), jnp.asarray(B)),
        _solve(jnp.asarray(A), jnp.asarray(B[:, 0])),
        strict=True,
    ):
        assert X.shape == (40, 3) and bool(info.converged)
        np.testing.assert_allclose(X, np.linalg.solve(A, B), rtol=1e-8, atol=1e-10)
        np.testing.assert_allclose(X[:, 0], x, rtol=1e-9, atol=1e-12)  # batched rounding


@jax.jit
def _damped(A, b, x0):
    return cg(lambda v: A @ v, b, damping=0.5, tol=1e-12, x0=x0)


def test_cg_damping_and_start(rng):
    A = _spd(rng, 20, 0, 1)
    b = rng.standard_normal(20)
    x, info = _damped(jnp.asarray(A), jnp.asarray(b), jnp.zeros(20))
    assert bool(info.converged)
    assert _rel(x, np.linalg.solve(A + 0.5 * np.eye(20), b)) <= 1e-9
    # Starting at the solution: one residual check, nothing else.
    _, info2 = _damped(jnp.asarray(A), jnp.asarray(b), x)
    assert int(info2.iterations) == 1 and bool(info2.converged)
    # b = 0 gives x = 0, converged.
    x3, info3 = _damped(jnp.asarray(A), jnp.zeros(20), jnp.zeros(20))
    assert bool(info3.converged) and not np.any(np.asarray(x3))


@jax.jit
def _solve32(A, b):
    plain = cg(lambda v: A @ v, b, tol=1e-5, max_iters=1000)
    jacobi = cg(lambda v: A @ v, b, preconditioner=lambda v: v / jnp.diag(A), tol=1e-5)
    return plain, jacobi


def test_cg_float32_badly_scaled_is_finite_and_honest(rng):
    converged = 0
    for emin, emax, smin, smax in [(-1, 1, 0, 0), (-1, 2, -1, 1), (-2, 2, -1, 1), (-1, 3, -2, 2)]:
        A = _spd(rng, 100, emin, emax, smin, smax)
        b = rng.standard_normal(100)
        for x, info in _solve32(jnp.asarray(A, jnp.float32), jnp.asarray(b, jnp.float32)):
            x = np.asarray(x, np.float64)
            assert np.all(np.isfinite(x)) and np.isfinite(float(info.residual))
            true = np.linalg.norm(A @ x - b) / np.linalg.norm(b)
            # The reported residual is the true one (up to float32 rounding of A x) ...
            assert abs(float(info.residual) - true) <= 0.2 * true + 1e-6
            # ... and `converged` never claims more than it reached.
            if bool(info.converged):
                assert true <= 1.5e-5
            converged += bool(info.converged)
    assert 0 < converged < 8  # the easy problems converge, the hardest do not


def test_cg_reports_breakdown_on_indefinite_operator():
    A = jnp.diag(jnp.array([1.0, -2.0, 3.0]))
    x, info = cg(lambda v: A @ v, jnp.ones(3))
    assert not bool(info.converged)
    assert np.all(np.isfinite(np.asarray(x)))
    # A non-finite product is a breakdown too, not a NaN result.
    x, info = cg(lambda v: v * jnp.array([1.0, jnp.inf, 1.0]), jnp.ones(3))
    assert not bool(info.converged) and np.all(np.isfinite(np.asarray(x)))


def test_cg_checks_arguments():
    with pytest.raises(ValueError, match="cg: `b` must have shape"):
        cg(lambda v: v, jnp.ones((2, 2, 2)))
    with pytest.raises((ValueError, TypeCheckError)):  # the jaxtyping hook may get there first
        cg(lambda v: v, jnp.ones(3), x0=jnp.ones(2))


@jax.jit
def _lissa(A, B, b):
    auto = lissa(lambda v: A @ v, B, depth=2000, tol=1e-10)
    small = lissa(lambda v: A @ v, b, scale=2.0, depth=2000)
    return auto, small


def test_lissa_converges_and_reports_divergence(rng):
    A = _spd(rng, 20, 0, 1)  # eigenvalues in [1, 10]
    B = rng.standard_normal((20, 2))
    (X, info), (x, bad) = _lissa(jnp.asarray(A), jnp.asarray(B), jnp.asarray(B[:, 0]))
    # The default scale (power iteration) converges, on every column.
    assert bool(info.converged) and float(info.residual) <= 1e-10
    np.testing.assert_allclose(X, np.linalg.solve(A, B), rtol=1e-8, atol=1e-10)
    # A scale below λ_max / 2 diverges: reported, and the result stays finite.
    assert not bool(bad.converged)
    assert int(bad.iterations) < 2000  # stopped on divergence, not at the depth
    assert np.all(np.isfinite(np.asarray(x))) and np.isfinite(float(bad.residual))


def test_default_damping_bounds_the_condition_number(rng):
    d = 30
    Q, _ = np.linalg.qr(rng.standard_normal((d, d)))
    A = Q @ np.diag(np.r_[np.zeros(10), np.logspace(-3, 3, d - 10)]) @ Q.T  # singular
    delta = float(default_damping(jnp.diag(jnp.asarray(A))))
    np.testing.assert_allclose(delta, 1e-3 * np.trace(A) / d, rtol=1e-12)
    eig = np.linalg.eigvalsh(A + delta * np.eye(d))
    assert eig.max() / eig.min() <= 1 + d / 1e-3


@jax.jit
def _krylov(A, v0):
    return (
        lanczos(lambda v: A @ v, v0, 12),
        lanczos(lambda v: A @ v, v0, 16),
        largest_eigenvalue(lambda v: A @ v, v0, iters=200),
    )


def test_lanczos_and_power_iteration_match_eigenvalues(rng):
    A = _spd(rng, 12, -1, 1)
    exact = np.linalg.eigvalsh(A)
    (alphas, betas, Q), long, lam = _krylov(jnp.asarray(A), jnp.asarray(rng.standard_normal(12)))
    ritz, _ = tridiagonal_eigh(alphas, betas)
    np.testing.assert_allclose(ritz, exact, rtol=1e-10)
    np.testing.assert_allclose(Q @ Q.T, np.eye(12), atol=1e-12)
    # More steps than dimensions: the extra Ritz values carry no weight, nothing is NaN.
    alphas, betas, Q = long
    ritz, S = tridiagonal_eigh(alphas, betas)
    assert np.all(np.isfinite(np.asarray(ritz))) and np.all(np.isfinite(np.asarray(Q)))
    weighted = np.asarray(S[0]) ** 2 > 1e-20
    np.testing.assert_allclose(np.sort(np.asarray(ritz)[weighted]), exact, rtol=1e-8)
    np.testing.assert_allclose(float(lam), exact.max(), rtol=1e-6)
