"""Laplace posteriors against independent oracles.

The precision is checked against numpy formulas and finite differences of a numpy gradient,
the exact Hessian against `jax.hessian` of an MLP objective written here from the weight
matrices, the marginal likelihood against the closed-form evidence of Bayesian linear
regression (where Laplace is exact), sampling against `Λ⁻¹` within Monte Carlo error and
the predictives against Gauss-Hermite quadrature of the logistic-Gaussian integral.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.optimize
import scipy.stats
from scipy.special import expit, logsumexp

import unlearnx as ux


def _aug(X):
    """Features with a trailing ones column: the bias is the last parameter."""
    X = np.asarray(X)
    return np.hstack([X, np.ones((X.shape[0], 1))])


def _theta(model):
    w = np.asarray(model.weight).ravel()
    return w if model.bias is None else np.concatenate([w, np.asarray(model.bias).ravel()])


def _logistic_precision(theta, Xa, w, lam):
    """`Xᵀ diag(w p(1−p)) X + λI`."""
    p = expit(Xa @ theta)
    return Xa.T @ (Xa * (w * p * (1 - p))[:, None]) + lam * np.eye(Xa.shape[1])


@pytest.fixture(scope="module")
def pima_post():
    train = ux.datasets.diabetes().train
    model, _ = ux.fit(ux.models.LogisticRegression(train.n_features), train, prior_precision=1.0)
    return train, model, ux.laplace(model, train, prior_precision=1.0)


# --- the precision -----------------------------------------------------------------------


def test_logistic_ggn_is_numpy_hessian(pima_post):
    train, model, post = pima_post
    ref = _logistic_precision(_theta(model), _aug(train.X), np.asarray(train.weights), 1.0)
    P = post.precision
    assert isinstance(P, ux.DensePrecision)
    np.testing.assert_allclose(P.to_dense(), ref, rtol=1e-10, atol=1e-10 * np.abs(ref).max())
    L = np.asarray(P.chol)
    np.testing.assert_allclose(L @ L.T, ref, rtol=1e-10, atol=1e-10 * np.abs(ref).max())
    np.testing.assert_allclose(P.logdet(), np.linalg.slogdet(ref)[1], rtol=1e-12)
    v = np.linspace(-1, 1, ref.shape[0])
    np.testing.assert_allclose(P.solve(jnp.asarray(v)), np.linalg.solve(ref, v), rtol=1e-10)
    np.testing.assert_allclose(P.mv(jnp.asarray(v)), ref @ v, rtol=1e-12)


def _np_softmax_grad(theta, X, y, lam, C):
    p = X.shape[1]
    W, b = theta[: C * p].reshape(C, p), theta[C * p :]
    F = X @ W.T + b
    P = np.exp(F - logsumexp(F, axis=1, keepdims=True))
    P[np.arange(len(y)), y] -= 1.0
    return np.concatenate([(P.T @ X).ravel(), P.sum(0)]) + lam * theta


def test_softmax_precision_is_finite_difference_hessian(key):
    """Central differences of a numpy gradient with one Richardson extrapolation
    (truncation O(h⁴)) against the GGN, which is the Hessian for the canonical link."""
    C, p, lam = 3, 3, 0.7
    kd, kf = jax.random.split(key)
    data, _ = ux.datasets.synthetic_glm(kd, n=150, d=p, family="softmax", n_classes=C)
    model, _ = ux.fit(ux.models.SoftmaxRegression(p, C), data, prior_precision=lam)
    # evaluate at a point away from the optimum too: the GGN equals the Hessian anywhere
    theta_opt = np.concatenate([np.asarray(model.weight).ravel(), np.asarray(model.bias)])
    theta = theta_opt + 0.3 * np.asarray(jax.random.normal(kf, theta_opt.shape))
    _, unravel = ux.models.ravel(model)
    assert np.allclose(ux.models.ravel(model)[0], theta_opt)  # flat order: W row-major, b
    moved = unravel(jnp.asarray(theta))
    X, y = np.asarray(data.X), np.asarray(data.y)

    def fd(h):
        d = theta.size
        H = np.empty((d, d))
        for j in range(d):
            e = np.zeros(d)
            e[j] = h
            H[:, j] = (
                _np_softmax_grad(theta + e, X, y, lam, C)
                - _np_softmax_grad(theta - e, X, y, lam, C)
            ) / (2 * h)
        return H

    h = 1e-3
    H = (4 * fd(h / 2) - fd(h)) / 3
    H = 0.5 * (H + H.T)
    for curvature in ("ggn", "hessian"):
        P = ux.laplace(moved, data, prior_precision=lam, curvature=curvature).precision.to_dense()
        err = np.abs(np.asarray(P) - H).max() / np.abs(H).max()
        assert err <= 1e-8, (curvature, err)


def _mlp_parts(model):
    return [(layer.weight, layer.bias) for layer in model.mlp.layers]


def _flat_mlp(model):
    return jnp.concatenate([jnp.concatenate([W.ravel(), b]) for W, b in _mlp_parts(model)])


def _mlp_forward(theta, shapes, X):
    """A tanh MLP from a flat parameter vector laid out as [W0, b0, W1, b1, ...]."""
    i, h = 0, X
    for k, (out, inp) in enumerate(shapes):
        W = theta[i : i + out * inp].reshape(out, inp)
        i += out * inp
        b = theta[i : i + out]
        i += out
        h = h @ W.T + b
        if k < len(shapes) - 1:
            h = jnp.tanh(h)
    return h


def _mlp_objective(theta, shapes, X, y, lam):
    F = _mlp_forward(theta, shapes, X)
    nll = jnp.sum(jax.nn.logsumexp(F, axis=1) - F[jnp.arange(y.shape[0]), y])
    return nll + 0.5 * lam * jnp.sum(theta**2)


# jitted (eagerly, jax.hessian of this small net takes ~10 s of op dispatch)
_mlp_hessian = jax.jit(jax.hessian(_mlp_objective), static_argnums=1)


@pytest.fixture(scope="module")
def mlp_setup():
    key = jax.random.key(3)
    kd, km = jax.random.split(key)
    data, _ = ux.datasets.synthetic_glm(kd, n=60, d=3, family="softmax", n_classes=2, scale=2.0)
    model = ux.models.MLPClassifier(3, 2, width=4, depth=1, key=km)
    shapes = tuple(tuple(W.shape) for W, _ in _mlp_parts(model))
    theta = _flat_mlp(model)
    # the flat layout the test assumes is the one unlearnx uses
    np.testing.assert_array_equal(ux.models.ravel(model)[0], theta)
    return data, model, shapes, theta


def test_mlp_exact_hessian_is_jax_hessian_of_independent_objective(mlp_setup):
    data, model, shapes, theta = mlp_setup
    lam = 50.0  # the data Hessian of this untrained net has eigenvalues near −37
    H = np.asarray(_mlp_hessian(theta, shapes, data.X, data.y, lam))
    assert np.linalg.eigvalsh(H).min() > 0  # a valid Laplace precision at this λ
    P = ux.laplace(model, data, prior_precision=lam, curvature="hessian").precision.to_dense()
    np.testing.assert_allclose(P, H, rtol=1e-10, atol=1e-10 * np.abs(H).max())
    diag = ux.laplace(model, data, prior_precision=lam, curvature="hessian", structure="diag")
    np.testing.assert_allclose(diag.precision.diag, np.diag(H), rtol=1e-10)


def test_mlp_ggn_is_jacobian_sandwich(mlp_setup):
    """GGN = Σ_i J_iᵀ (diag p_i − p_i p_iᵀ) J_i + λI with J_i from jax.jacfwd."""
    data, model, shapes, theta = mlp_setup
    lam = 0.1
    J = jax.vmap(lambda x: jax.jacfwd(lambda t: _mlp_forward(t, shapes, x[None])[0])(theta))(data.X)
    F = np.asarray(_mlp_forward(theta, shapes, data.X))
    p = np.exp(F - logsumexp(F, axis=1, keepdims=True))
    Hf = np.einsum("nc,cd->ncd", p, np.eye(2)) - np.einsum("nc,nd->ncd", p, p)
    J = np.asarray(J)
    ref = np.einsum("nci,ncd,ndj->ij", J, Hf, J) + lam * np.eye(theta.size)
    P = ux.laplace(model, data, prior_precision=lam).precision.to_dense()
    np.testing.assert_allclose(P, ref, rtol=1e-10, atol=1e-12 * np.abs(ref).max())
    diag = ux.laplace(model, data, prior_precision=lam, structure="diag").precision
    assert isinstance(diag, ux.DiagonalPrecision)
    np.testing.assert_allclose(diag.diag, np.diag(ref), rtol=1e-10)


def test_diag_structure_is_diagonal_of_dense(pima_post):
    train, model, post = pima_post
    diag = ux.laplace(model, train, prior_precision=1.0, structure="diag")
    assert isinstance(diag.precision, ux.DiagonalPrecision)
    np.testing.assert_allclose(diag.precision.diag, np.diag(post.precision.to_dense()), rtol=1e-12)
    np.testing.assert_allclose(
        diag.precision.variance(), 1.0 / np.diag(post.precision.to_dense()), rtol=1e-12
    )


# --- marginal likelihood and prior tuning (exact for Bayesian linear regression) ----------


def _evidence(X, y, sigma, lam):
    """log N(y | 0, σ²I + λ⁻¹ X Xᵀ)."""
    cov = sigma**2 * np.eye(len(y)) + X @ X.T / lam
    return scipy.stats.multivariate_normal(np.zeros(len(y)), cov).logpdf(y)


@pytest.fixture(scope="module")
def blr_data():
    data, _ = ux.datasets.synthetic_glm(
        jax.random.key(7), n=60, d=4, family="gaussian", noise_std=0.7, scale=1.5
    )
    return data


@pytest.mark.parametrize("use_bias", [False, True])
@pytest.mark.parametrize("lam", [0.3, 2.0])
def test_log_marginal_likelihood_is_exact_evidence_for_linear_regression(blr_data, use_bias, lam):
    sigma = 0.7
    model, _ = ux.fit(
        ux.models.LinearRegression(4, use_bias=use_bias, noise_std=sigma),
        blr_data,
        prior_precision=lam,
    )
    post = ux.laplace(model, blr_data, prior_precision=lam)
    X = _aug(blr_data.X) if use_bias else np.asarray(blr_data.X)
    ref = _evidence(X, np.asarray(blr_data.y), sigma, lam)
    np.testing.assert_allclose(post.log_marginal_likelihood(blr_data), ref, rtol=1e-10)


def test_tune_prior_precision_finds_the_evidence_maximiser(blr_data):
    """Post-hoc tuning keeps θ* fixed, so alternate it with refitting (MacKay's fixed-point
    scheme); at the fixed point ∇L(θ*) = 0, so the stationarity condition is that of the
    exact evidence, whose maximiser scipy finds from the closed form."""
    sigma = 0.7
    X, y = np.asarray(blr_data.X), np.asarray(blr_data.y)
    res = scipy.optimize.minimize_scalar(
        lambda s: -_evidence(X, y, sigma, math.exp(s)),
        bounds=(math.log(1e-4), math.log(1e4)),
        method="bounded",
        options={"xatol": 1e-10},
    )
    lam_star = math.exp(res.x)
    assert 1e-3 < lam_star < 1e3  # an interior optimum

    lam = 1.0
    model = ux.models.LinearRegression(4, use_bias=False, noise_std=sigma)
    for _ in range(100):
        model, _ = ux.fit(model, blr_data, prior_precision=lam)
        post = ux.tune_prior_precision(ux.laplace(model, blr_data, prior_precision=lam), blr_data)
        new = float(post.prior_precision)
        if abs(new - lam) <= 1e-8 * lam:
            break
        lam = new
    assert abs(new - lam_star) / lam_star <= 1e-4
    # the returned precision is the data curvature plus the new λ
    ref = X.T @ X / sigma**2 + new * np.eye(4)
    np.testing.assert_allclose(post.precision.to_dense(), ref, rtol=1e-10)


# --- sampling -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def small_logistic():
    data, _ = ux.datasets.synthetic_glm(jax.random.key(11), n=60, d=2, scale=2.0)
    model, _ = ux.fit(ux.models.LogisticRegression(2), data, prior_precision=1.0)
    return data, model, ux.laplace(model, data, prior_precision=1.0)


@pytest.mark.parametrize("structure", ["full", "diag"])
def test_sample_covariance_matches_inverse_precision(small_logistic, key, structure):
    data, model, _ = small_logistic
    post = ux.laplace(model, data, prior_precision=1.0, structure=structure)
    N = 20_000
    draws = post.sample(key, N)
    T = np.hstack([np.asarray(draws.weight), np.asarray(draws.bias)[:, None]])
    assert T.shape == (N, 3)
    Lam = _logistic_precision(_theta(model), _aug(data.X), np.ones(data.n), 1.0)
    if structure == "diag":
        Lam = np.diag(np.diag(Lam))
    Sigma = np.linalg.inv(Lam)
    S = np.cov(T, rowvar=False)
    # standard error of a sample covariance entry of a Gaussian
    se = np.sqrt((np.outer(np.diag(Sigma), np.diag(Sigma)) + Sigma**2) / N)
    assert np.all(np.abs(S - Sigma) <= 5 * se), (S, Sigma)
    assert np.all(np.abs(T.mean(0) - _theta(model)) <= 5 * np.sqrt(np.diag(Sigma) / N))


# --- predictive ---------------------------------------------------------------------------


def _gauss_hermite_sigmoid(mu, var, deg=80):
    """E[σ(f)], f ~ N(mu, var), by Gauss-Hermite quadrature."""
    x, w = np.polynomial.hermite_e.hermegauss(deg)
    return (expit(mu[:, None] + np.sqrt(var)[:, None] * x[None]) @ w) / w.sum()


def test_logistic_predictives_agree(small_logistic, key):
    data, model, post = small_logistic
    Xt = np.linspace(-3, 3, 15)[:, None] * np.array([[1.0, -0.5]])
    Xa = _aug(Xt)
    theta = _theta(model)
    Lam = _logistic_precision(theta, _aug(data.X), np.ones(data.n), 1.0)
    mu = Xa @ theta
    var = np.einsum("mi,ij,mj->m", Xa, np.linalg.inv(Lam), Xa)
    exact = _gauss_hermite_sigmoid(mu, var)
    X = jnp.asarray(Xt)

    m, cov = post.predictive_moments(X)
    np.testing.assert_allclose(m[:, 0], mu, rtol=1e-10)
    np.testing.assert_allclose(cov[:, 0, 0], var, rtol=1e-10)

    probit = np.asarray(post.predict(X, method="probit"))[:, 0]
    np.testing.assert_allclose(probit, expit(mu / np.sqrt(1 + np.pi / 8 * var)), rtol=1e-10)
    assert np.abs(probit - exact).max() <= 0.02  # the probit approximation's own error

    N = 20_000
    k1, k2 = jax.random.split(key)
    se = 5 * np.sqrt(exact * (1 - exact) / N) + 1e-12
    lin = np.asarray(post.predict(X, method="linear_mc", n_samples=N, key=k1))[:, 0]
    mc = np.asarray(post.predict(X, method="mc", n_samples=N, key=k2))[:, 0]
    assert np.all(np.abs(lin - exact) <= se)
    assert np.all(np.abs(mc - exact) <= se)
    assert np.abs(lin - probit).max() <= 0.02 and np.abs(mc - probit).max() <= 0.02

    mapped = post.predict(X, method="map")
    np.testing.assert_array_equal(mapped, model.predict_proba(X))
    np.testing.assert_allclose(np.asarray(mapped)[:, 0], expit(mu), rtol=1e-12)


def test_linear_regression_predict_is_exact_posterior_predictive(blr_data):
    sigma, lam = 0.7, 1.3
    model, _ = ux.fit(ux.models.LinearRegression(4, noise_std=sigma), blr_data, prior_precision=lam)
    post = ux.laplace(model, blr_data, prior_precision=lam)
    Xa = _aug(blr_data.X)
    A = Xa.T @ Xa / sigma**2 + lam * np.eye(5)
    m_post = np.linalg.solve(A, Xa.T @ np.asarray(blr_data.y) / sigma**2)
    Xt = np.random.default_rng(1).normal(size=(10, 4))
    Xta = _aug(Xt)
    pred = np.asarray(post.predict(jnp.asarray(Xt)))
    assert pred.shape == (10, 1)
    np.testing.assert_allclose(pred[:, 0], Xta @ m_post, rtol=1e-10)
    _, cov = post.predictive_moments(jnp.asarray(Xt))
    ref_var = np.einsum("mi,ij,mj->m", Xta, np.linalg.inv(A), Xta)
    np.testing.assert_allclose(cov[:, 0, 0], ref_var, rtol=1e-10)


# --- refusals -----------------------------------------------------------------------------


def test_memory_refusal_names_diag(pima_post):
    train, model, _ = pima_post
    d = train.n_features + 1
    # more than the diagonal needs (4·d numbers and one chunk's n·d Jacobians), less than
    # the dense structure (3·d² numbers and the same Jacobians)
    budget = (4 * d + train.n * d + d * d) * 8 / 2**30
    with pytest.raises(ValueError, match="diag"):
        ux.laplace(model, train, prior_precision=1.0, max_memory_gb=budget)
    post = ux.laplace(model, train, prior_precision=1.0, structure="diag", max_memory_gb=budget)
    assert post.precision.diag.shape == (d,)


def test_indefinite_exact_hessian_raises(mlp_setup):
    data, model, shapes, theta = mlp_setup
    lam = 1e-6
    H = np.asarray(_mlp_hessian(theta, shapes, data.X, data.y, lam))
    assert np.linalg.eigvalsh(H).min() < 0  # untrained network, tiny prior: indefinite
    with pytest.raises(RuntimeError, match="not positive definite"):
        ux.laplace(model, data, prior_precision=lam, curvature="hessian")
    # the GGN is positive semi-definite at any point, so it still works there
    post = ux.laplace(model, data, prior_precision=lam, curvature="ggn")
    assert np.linalg.eigvalsh(np.asarray(post.precision.to_dense())).min() > 0
