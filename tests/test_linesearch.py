"""`second_order(line_search=True)`: Armijo backtracking of the Newton step on the edited
objective.

Oracle: the logistic-regression objective and gradient written in numpy, on the edited
data built in numpy; the chosen step length must be the first power of ½ that satisfies
the Armijo condition there. Float64 (conftest).
"""

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy.special import expit

import unlearnx as ux

LAM = 1.0


def _objective(theta, X, y, w):
    z = X @ theta
    loss = np.logaddexp(0.0, z) - y * z
    return float(np.sum(w * loss) + 0.5 * LAM * theta @ theta)


def _gradient(theta, X, y, w):
    return X.T @ (w * (expit(X @ theta) - y)) + LAM * theta


@pytest.fixture(scope="module")
def relabelled():
    """A correlated-feature logistic regression, its diagonal Laplace posterior, and a
    request relabelling a quarter of the rows: the diagonal precision underestimates the
    curvature along the step, so the full Newton step overshoots."""
    data, _ = ux.datasets.synthetic_glm(jax.random.key(3), n=400, d=5, scale=1.0)
    X = np.array(data.X)
    X[:, 1:4] = X[:, :1] + 0.05 * X[:, 1:4]  # four nearly collinear columns
    data = eqx.tree_at(lambda d: d.X, data, jnp.asarray(X))
    model, info = ux.fit(ux.models.LogisticRegression(5, use_bias=False), data, prior_precision=LAM)
    assert info.converged
    post = ux.laplace(model, data, prior_precision=LAM, structure="diag")
    y = np.asarray(data.y).astype(float)
    rows = np.arange(0, 400, 4)
    y2 = y.copy()
    y2[rows] = 1 - y[rows]
    return data, post, ux.relabel(rows, y2[rows].astype(int)), (X, y2, np.ones(400))


def test_step_length_is_the_first_armijo_point(relabelled):
    data, post, request, (X, y2, w) = relabelled
    theta = np.asarray(post.theta)
    full = ux.second_order()
    searched = ux.second_order(line_search=True)
    p_full, _, info_full = full.update(request, full.init(post, data))
    p_ls, _, info = searched.update(request, searched.init(post, data))
    a = float(info.step_length)
    assert float(info_full.step_length) == 1.0
    step = theta - np.asarray(p_full.theta)  # the full Newton step Λ'⁻¹G
    np.testing.assert_allclose(np.asarray(p_ls.theta), theta - a * step, rtol=1e-12, atol=1e-12)
    f0, g0 = _objective(theta, X, y2, w), _gradient(theta, X, y2, w)

    def armijo_holds(b):
        return _objective(theta - b * step, X, y2, w) <= f0 - 1e-4 * b * g0 @ step

    # the full step overshoots here (the case the option is for) ...
    assert not armijo_holds(1.0)
    # ... and `a` is the first of 1, ½, ¼, … that decreases the objective enough
    assert a < 1.0 and armijo_holds(a) and not armijo_holds(2 * a)
    assert np.log2(a) == np.round(np.log2(a))
    assert _objective(np.asarray(p_ls.theta), X, y2, w) < _objective(
        np.asarray(p_full.theta), X, y2, w
    )


def test_exact_curvature_takes_the_full_step():
    """With the exact (full) precision and a small deletion, the Newton step already
    decreases the objective enough: the line search changes nothing."""
    data = ux.datasets.diabetes().train
    model, _ = ux.fit(ux.models.LogisticRegression(data.n_features), data, prior_precision=LAM)
    post = ux.laplace(model, data, prior_precision=LAM)
    request = ux.forget_rows([1, 5, 9])
    plain, searched = ux.second_order(), ux.second_order(line_search=True)
    p0 = plain.update(request, plain.init(post, data))[0]
    p1, _, info = searched.update(request, searched.init(post, data))
    assert float(info.step_length) == 1.0
    np.testing.assert_allclose(np.asarray(p1.theta), np.asarray(p0.theta), rtol=0, atol=1e-14)


def test_batch_path_applies_the_line_search(relabelled):
    data, post, request, _ = relabelled
    u = ux.second_order(line_search=True)
    single, _, info = u.update(request, u.init(post, data))
    result = ux.batch.unlearn(post, data, [request], unlearner=u)
    np.testing.assert_allclose(result.theta[0], np.asarray(single.theta), rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(result.info.step_length[0], float(info.step_length))
