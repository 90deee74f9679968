"""MAP fitting against independent oracles: scikit-learn, closed-form ridge, scipy.

Every exactness check runs in float64 (conftest enables x64). The oracles never call
unlearnx: scikit-learn's `newton-cholesky` logistic regression, the ridge normal equations
solved with numpy, and scipy's L-BFGS-B on a numpy implementation of the objective.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.optimize
from scipy.special import expit, log_expit, logsumexp
from sklearn.linear_model import LogisticRegression as SkLogistic

import unlearnx as ux


def _sklearn_theta(X, y, lam, *, bias):
    """scikit-learn's MAP for `Σ ℓ + λ/2‖θ‖²` (C = 1/λ); the bias is a column of ones so
    that it is penalised like the weights, as in unlearnx."""
    X = np.asarray(X)
    if bias:
        X = np.hstack([X, np.ones((X.shape[0], 1))])
    sk = SkLogistic(solver="newton-cholesky", fit_intercept=False, C=1.0 / lam, tol=1e-12)
    sk.set_params(max_iter=1000)
    return sk.fit(X, np.asarray(y)).coef_.ravel()


def _theta(model):
    """Weights followed by the bias (if any), read from the module's fields."""
    w = np.asarray(model.weight).ravel()
    if model.bias is None:
        return w
    return np.concatenate([w, np.asarray(model.bias).ravel()])


def _rel(a, b):
    return np.linalg.norm(np.asarray(a) - np.asarray(b)) / np.linalg.norm(np.asarray(b))


def _np_logistic(theta, X, y, lam):
    """Objective and gradient of `Σ softplus(f) − y f + λ/2‖θ‖²` in numpy."""
    f = X @ theta
    value = np.sum(-log_expit(f) + (1 - y) * f) + 0.5 * lam * theta @ theta
    grad = X.T @ (expit(f) - y) + lam * theta
    return value, grad


# --- logistic regression against scikit-learn -------------------------------------------


def test_logistic_matches_sklearn_on_adult(adult):
    """The must-show: Adult (32,561 × 105), float64, λ = 1, to 1e-8 relative."""
    train = adult.train
    lam = 1.0
    model, info = ux.fit(
        ux.models.LogisticRegression(train.n_features, use_bias=False),
        train,
        prior_precision=lam,
    )
    ref = _sklearn_theta(train.X, train.y, lam, bias=False)
    rel = _rel(_theta(model), ref)
    print(f"adult: {info.iterations} Newton steps, relative difference to sklearn {rel:.2e}")
    assert info.converged
    assert rel <= 1e-8


@pytest.mark.parametrize("lam", [0.1, 1.0, 10.0])
def test_logistic_matches_sklearn_on_pima(diabetes, lam):
    train = diabetes.train
    model, info = ux.fit(
        ux.models.LogisticRegression(train.n_features, use_bias=False),
        train,
        prior_precision=lam,
    )
    assert info.converged
    assert _rel(_theta(model), _sklearn_theta(train.X, train.y, lam, bias=False)) <= 1e-8


def test_logistic_with_bias_matches_sklearn_with_ones_column(diabetes):
    train = diabetes.train
    model, info = ux.fit(
        ux.models.LogisticRegression(train.n_features, use_bias=True), train, prior_precision=1.0
    )
    assert info.converged
    assert model.bias is not None
    assert _rel(_theta(model), _sklearn_theta(train.X, train.y, 1.0, bias=True)) <= 1e-8


def test_logistic_respects_sample_weights(diabetes, rng):
    """Weighted rows (0 = deleted, 2 = counted twice) match sklearn with sample_weight."""
    train = diabetes.train
    w = rng.choice([0.0, 1.0, 2.0], size=train.n)
    data = ux.Dataset(
        X=train.X,
        y=train.y,
        weights=jnp.asarray(w),
        attributes={},
        feature_names=train.feature_names,
        n_classes=2,
    )
    model, info = ux.fit(
        ux.models.LogisticRegression(data.n_features, use_bias=False), data, prior_precision=1.0
    )
    sk = SkLogistic(solver="newton-cholesky", fit_intercept=False, C=1.0, tol=1e-12)
    sk.set_params(max_iter=1000)
    ref = sk.fit(np.asarray(train.X), np.asarray(train.y), sample_weight=w).coef_.ravel()
    assert info.converged
    assert _rel(_theta(model), ref) <= 1e-8


# --- linear regression against the closed-form ridge solution ---------------------------


@pytest.mark.parametrize("use_bias", [False, True])
@pytest.mark.parametrize("sigma", [0.5, 2.0])
def test_linear_regression_is_closed_form_ridge(key, use_bias, sigma):
    data, _ = ux.datasets.synthetic_glm(key, n=120, d=5, family="gaussian", noise_std=sigma)
    lam = 3.0
    model, info = ux.fit(
        ux.models.LinearRegression(data.n_features, use_bias=use_bias, noise_std=sigma),
        data,
        prior_precision=lam,
    )
    X, y = np.asarray(data.X), np.asarray(data.y)
    if use_bias:
        X = np.hstack([X, np.ones((X.shape[0], 1))])
    # argmin Σ ½((y − Xθ)/σ)² + λ/2‖θ‖²  ⇔  (XᵀX/σ² + λI) θ = Xᵀy/σ²
    A = X.T @ X / sigma**2 + lam * np.eye(X.shape[1])
    ref = np.linalg.solve(A, X.T @ y / sigma**2)
    assert info.converged
    assert _rel(_theta(model), ref) <= 1e-10


# --- softmax regression against scipy L-BFGS-B on a numpy objective ----------------------


def _np_softmax_objective(theta, X, y, lam, n_classes):
    p = X.shape[1]
    W = theta[: n_classes * p].reshape(n_classes, p)
    b = theta[n_classes * p :]
    F = X @ W.T + b
    value = np.sum(logsumexp(F, axis=1) - F[np.arange(len(y)), y]) + 0.5 * lam * theta @ theta
    P = np.exp(F - logsumexp(F, axis=1, keepdims=True))
    P[np.arange(len(y)), y] -= 1.0
    grad = np.concatenate([(P.T @ X).ravel(), P.sum(0)]) + lam * theta
    return value, grad


def test_softmax_matches_scipy_lbfgsb(key):
    C, p, lam = 3, 4, 0.5
    data, _ = ux.datasets.synthetic_glm(key, n=300, d=p, family="softmax", n_classes=C, scale=2.0)
    model, info = ux.fit(
        ux.models.SoftmaxRegression(p, C, use_bias=True), data, prior_precision=lam
    )
    X, y = np.asarray(data.X), np.asarray(data.y)
    res = scipy.optimize.minimize(
        _np_softmax_objective,
        np.zeros(C * p + C),
        args=(X, y, lam, C),
        jac=True,
        method="L-BFGS-B",
        options={"maxiter": 20_000, "maxcor": 50, "gtol": 1e-12, "ftol": 1e-15},
    )
    ref = res.x
    ours = np.concatenate([np.asarray(model.weight).ravel(), np.asarray(model.bias)])
    assert info.converged
    assert np.linalg.norm(res.jac) < 1e-6
    assert _rel(ours, ref) <= 1e-6
    np.testing.assert_allclose(info.objective, res.fun, rtol=1e-10)


# --- solvers agree; Adam on a network; float32; FitInfo ----------------------------------


def test_lbfgs_agrees_with_newton(key):
    data, _ = ux.datasets.synthetic_glm(key, n=300, d=6, scale=2.0)
    start = ux.models.LogisticRegression(data.n_features)
    newton, info_n = ux.fit(start, data, prior_precision=0.3, solver="newton")
    lbfgs, info_l = ux.fit(start, data, prior_precision=0.3, solver="lbfgs")
    assert (info_n.solver, info_l.solver) == ("newton", "lbfgs")
    assert info_n.converged and info_l.converged
    assert _rel(_theta(lbfgs), _theta(newton)) <= 1e-8
    np.testing.assert_allclose(info_l.objective, info_n.objective, rtol=1e-12)


def _np_mlp_objective(model, X, y, lam):
    """The MLP classifier's objective from its weight matrices, in numpy."""
    layers = model.mlp.layers
    h = np.asarray(X)
    params = []
    for i, layer in enumerate(layers):
        W, b = np.asarray(layer.weight), np.asarray(layer.bias)
        params += [W.ravel(), b]
        h = h @ W.T + b
        if i < len(layers) - 1:
            h = np.tanh(h)
    nll = np.sum(logsumexp(h, axis=1) - h[np.arange(len(y)), np.asarray(y)])
    theta = np.concatenate(params)
    return nll + 0.5 * lam * theta @ theta


def test_adam_reduces_mlp_objective_and_reports(key):
    kd, km, kf = jax.random.split(key, 3)
    data, _ = ux.datasets.synthetic_glm(kd, n=200, d=4, family="softmax", n_classes=3, scale=3.0)
    model = ux.models.MLPClassifier(4, 3, width=8, depth=1, key=km)
    lam = 1e-2
    before = _np_mlp_objective(model, data.X, data.y, lam)
    fitted, info = ux.fit(
        model, data, prior_precision=lam, solver="auto", max_steps=400, learning_rate=1e-2, key=kf
    )
    after = _np_mlp_objective(fitted, data.X, data.y, lam)
    assert info.solver == "adam"  # auto picks Adam for a network
    assert info.iterations == 400
    assert after < 0.8 * before
    np.testing.assert_allclose(info.objective, after, rtol=1e-10)
    assert np.isfinite(info.grad_norm) and info.grad_norm > 0
    assert isinstance(info.converged, bool)


def test_float32_fit_returns_float32(key):
    data64, _ = ux.datasets.synthetic_glm(key, n=400, d=5, scale=2.0)
    data32 = data64.astype(jnp.float32)
    assert data32.X.dtype == jnp.float32
    model, info = ux.fit(
        ux.models.LogisticRegression(5, dtype=jnp.float32), data32, prior_precision=1.0
    )
    leaves = jax.tree_util.tree_leaves(model)
    assert leaves and all(leaf.dtype == jnp.float32 for leaf in leaves)
    assert info.converged
    ref = _sklearn_theta(data64.X, data64.y, 1.0, bias=True)
    assert _rel(_theta(model), ref) <= 1e-4


def test_fit_info_is_sensible(diabetes):
    train = diabetes.train
    lam = 1.0
    model, info = ux.fit(
        ux.models.LogisticRegression(train.n_features, use_bias=False), train, prior_precision=lam
    )
    X, y = np.asarray(train.X), np.asarray(train.y).astype(float)
    value, grad = _np_logistic(_theta(model), X, y, lam)
    _, grad0 = _np_logistic(np.zeros(X.shape[1]), X, y, lam)
    assert info.solver == "newton"
    assert info.converged is True
    assert 1 <= info.iterations < 100
    assert info.grad_norm <= 1e-10 * max(1.0, np.linalg.norm(grad0))
    assert abs(info.grad_norm - np.linalg.norm(grad)) <= 1e-9
    np.testing.assert_allclose(info.objective, value, rtol=1e-12)

    # one step from zero cannot reach the optimum: reported, not hidden
    _, short = ux.fit(
        ux.models.LogisticRegression(train.n_features, use_bias=False),
        train,
        prior_precision=lam,
        max_steps=1,
    )
    assert short.iterations == 1
    assert short.converged is False
    assert short.grad_norm > info.grad_norm
