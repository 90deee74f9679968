"""The shift corrections: `independence` (HSIC penalty), `reweight`, their baseline
`retrain_independent`, and the shift scenarios.

Must-show figures (UCI Adult, the feature `sex` removed, its proxies kept):
`test_must_show_adult_sex_with_proxies`. Everything runs in float64 (conftest).
"""

import logging

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import unlearnx as ux
from unlearnx._unlearn import _independence as ind
from unlearnx._unlearn._reweight import _features
from unlearnx.hsic import CategoricalKernel, GaussianKernel, hsic


def _rel(a, b):
    return float(jnp.linalg.norm(a - b) / jnp.linalg.norm(b))


@pytest.fixture(scope="module")
def groups():
    """400 rows, two groups, two proxies of the group, the group's one-hot block."""
    data = ux.datasets.synthetic_groups(jax.random.key(3), n=400, proxy_strength=2.0)
    model, _ = ux.fit(ux.models.LogisticRegression(data.n_features), data)
    return data, ux.laplace(model, data)


def _problem(post, data, request, strength, **kw):
    new = ux.forget_rows([0]).resolve(data).apply(data) if request is None else request
    cfg = ind._config(
        "group",
        strength,
        0,
        None,
        kw.get("kernel"),
        kw.get("output", "logits"),
        kw.get("max_rows", 2000),
        kw.get("bandwidth"),
    )
    return ind._make_problem(post, new, cfg, post.theta.dtype)


# --- the weighted estimator ----------------------------------------------------------------


@pytest.mark.parametrize("numeric", [False, True])
@pytest.mark.parametrize("bandwidth", [None, 0.7])
def test_weighted_hsic_with_zero_weights_is_hsic_of_the_subset(rng, numeric, bandwidth):
    n = 300
    V = rng.integers(0, 3, n) if not numeric else rng.normal(size=n)
    F = (
        np.stack([V + rng.normal(size=n), rng.normal(size=n)], 1)
        if numeric
        else ((V == 1) + 0.5 * rng.normal(size=n))
    )
    w = (rng.uniform(size=n) > 0.4).astype(float)
    keep = w > 0
    got = ind.weighted_hsic(jnp.asarray(F), jnp.asarray(V), jnp.asarray(w), bandwidth=bandwidth)
    kx = None if bandwidth is None else GaussianKernel(bandwidth)
    ky = None if numeric else CategoricalKernel()
    want = hsic(F[keep], V[keep], kernel_x=kx, kernel_y=ky)
    assert abs(float(got) - float(want)) <= 1e-12 * max(1.0, abs(float(want)))
    assert float(want) > 1e-3  # a dependent pair: the comparison is not of two zeros
    # equal positive weights are the same as unit weights
    got3 = ind.weighted_hsic(
        jnp.asarray(F), jnp.asarray(V), 3.0 * jnp.asarray(w), bandwidth=bandwidth
    )
    assert abs(float(got3) - float(want)) <= 1e-12


def test_median_distance_is_the_masked_median(rng):
    z = rng.normal(size=500)
    z[:20] = z[20]  # ties: zero distances are left out, as in the median heuristic
    valid = rng.uniform(size=500) > 0.3
    got = ind.median_distance(jnp.asarray(z)[:, None], jnp.asarray(valid))
    want = ux.hsic.median_heuristic(z[valid])
    assert float(got) == pytest.approx(float(want), rel=1e-15)
    Z = rng.normal(size=(100, 2))
    got = ind.median_distance(jnp.asarray(Z), jnp.ones(100, bool))
    assert float(got) == pytest.approx(float(ux.hsic.median_heuristic(Z)), rel=1e-15)


def test_systematic_sample_of_retained_rows(rng):
    w = (rng.uniform(size=5000) > 0.5).astype(float)
    index, valid = ind.sample_rows(jnp.asarray(w), 1000)
    index, valid = np.asarray(index), np.asarray(valid)
    assert valid.all() and np.all(w[index] > 0) and len(set(index.tolist())) == 1000
    w[:4500] = 0  # fewer retained rows than the cap: each is taken once
    index, valid = ind.sample_rows(jnp.asarray(w), 1000)
    assert sorted(np.asarray(index)[np.asarray(valid)].tolist()) == np.flatnonzero(w).tolist()


# --- the penalised objective --------------------------------------------------------------


@pytest.mark.parametrize("output", ["logits", "probs"])
def test_penalised_gradient_matches_finite_differences(groups, rng, output):
    data, post = groups
    problem = _problem(post, data, None, 2.0, output=output)
    theta = post.theta + 0.1 * jnp.asarray(rng.normal(size=post.theta.shape))
    _, grad, _ = problem.evaluate(theta)
    for _ in range(3):
        v = jnp.asarray(rng.normal(size=theta.shape))
        eps = 1e-5
        fd = (problem.value(theta + eps * v) - problem.value(theta - eps * v)) / (2 * eps)
        assert float(jnp.dot(grad, v)) == pytest.approx(float(fd), rel=1e-7, abs=1e-7)
    # ...and the value agrees with the evaluation used by the steps
    assert float(problem.evaluate(theta)[0]) == pytest.approx(float(problem.value(theta)), 1e-12)


def test_penalty_curvature_is_the_hessian(groups):
    data, post = groups
    problem = _problem(post, data, None, 1.0)
    theta = post.theta

    def penalty(t):
        return (problem.value(t) - ux.objective(problem.unravel(t), problem.data, problem.lam)) / (
            problem.gs
        )

    H = problem.penalty_curvature(theta)
    np.testing.assert_allclose(H, jax.hessian(penalty)(theta), rtol=1e-8, atol=1e-10)
    np.testing.assert_allclose(problem.penalty_curvature(theta, True), jnp.diag(H), atol=1e-12)


# --- independence = penalised retraining when converged ------------------------------------


@pytest.mark.parametrize("kind, strength", [("features", 1.0), ("features", 10.0), ("rows", 3.0)])
def test_independence_refined_is_penalised_retraining(groups, kind, strength):
    data, post = groups
    if kind == "features":
        request = ux.forget_features("group")
    else:  # most of group 1's positives
        g, y = np.asarray(data.attribute("group")), np.asarray(data.y)
        request = ux.forget_rows(np.flatnonzero((g == 1) & (y == 1))[:60])
    u = ux.chain(ux.second_order(), ux.independence("group", strength, refine_steps=40, tol=1e-12))
    got, state, (_, info) = u.update(request, u.init(post, data))
    exact = ux.retrain_independent(post, data, request, "group", strength)
    assert _rel(got.theta, exact.theta) <= 1e-8
    assert float(info.hsic_after) < float(info.hsic_before)
    assert float(info.grad_norm) <= 1e-10
    # the precision: the incoming data precision plus the penalty's curvature
    assert bool(jnp.all(jnp.linalg.eigvalsh(got.precision.to_dense()) > 0))
    # strength 0 is the plain objective: refine to convergence is plain retraining
    u0 = ux.chain(ux.second_order(), ux.independence("group", 0.0, refine_steps=40, tol=1e-12))
    plain, _, _ = u0.update(request, u0.init(post, data))
    assert _rel(plain.theta, ux.retrain(post, data, request).theta) <= 1e-8


def test_penalised_retrain_lbfgs_agrees_with_newton(groups):
    # Two different optimisers of the same objective, from zeros: the same minimiser.
    data, post = groups
    request = ux.forget_features("group")
    newton = ux.retrain_independent(post, data, request, "group", 3.0, warm=False)
    lbfgs = ux.retrain_independent(post, data, request, "group", 3.0, warm=False, solver="lbfgs")
    assert _rel(lbfgs.theta, newton.theta) <= 1e-6
    with pytest.raises(ValueError, match="solver"):
        ux.retrain_independent(post, data, request, "group", 3.0, solver="adam")


def test_independence_jit_no_retrace_over_strengths(groups, caplog):
    data, post = groups

    def traced(strength, request):
        u = ux.chain(ux.second_order(), ux.independence("group", strength, refine_steps=1))
        caplog.clear()
        with caplog.at_level(logging.WARNING), jax.log_compiles():
            p, _, _ = u.update(request, u.init(post, data))
        return p, any("_step_jit" in r.getMessage() for r in caplog.records)

    traced(1.0, ux.forget_rows([1, 2, 3]))
    p2, again = traced(2.0, ux.forget_rows([4, 5, 6]))  # another γ, same bucket: no trace
    assert not again
    assert bool(jnp.all(jnp.isfinite(p2.theta)))


def test_independence_under_vmap_matches_update(groups):
    data, post = groups
    u = ux.chain(ux.second_order(), ux.independence("group", 2.0, refine_steps=2))
    state = u.init(post, data)
    requests = [ux.forget_rows([1, 2, 3]), ux.forget_rows([10, 11, 12, 13])]
    edits = [r.resolve(data, bucket=8) for r in requests]
    stacked = jax.tree_util.tree_map(lambda *a: jnp.stack(a), *edits)
    batched, _, _ = jax.jit(jax.vmap(u.apply, in_axes=(0, None)))(stacked, state)
    for i, r in enumerate(requests):
        one, _, _ = u.update(r, state)
        np.testing.assert_allclose(batched.mean.weight[i], one.mean.weight, rtol=1e-9, atol=1e-11)
        np.testing.assert_allclose(batched.mean.bias[i], one.mean.bias, rtol=1e-9, atol=1e-11)


def test_independence_diagonal_precision(groups):
    data, _ = groups
    model, _ = ux.fit(ux.models.LogisticRegression(data.n_features), data)
    post = ux.laplace(model, data, structure="diag")
    u = ux.chain(ux.second_order(), ux.independence("group", 3.0, refine_steps=3))
    got, _, (_, info) = u.update(ux.forget_features("group"), u.init(post, data))
    assert isinstance(got.precision, ux.DiagonalPrecision)
    assert bool(jnp.all(got.precision.diag > 0)) and bool(jnp.all(jnp.isfinite(got.theta)))
    assert float(info.hsic_after) < float(info.hsic_before)


# --- reweight ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def german():
    split = ux.datasets.german()
    model, _ = ux.fit(ux.models.LogisticRegression(split.train.n_features), split.train)
    return split, ux.laplace(model, split.train)


def test_reweight_restores_group_proportions_exactly(german):
    split, post = german
    data = split.train
    scenario = ux.scenarios.group_deletion(split, "sex", "female", 0.6, seed=1)
    u = ux.chain(ux.second_order(), ux.reweight("sex", refine_steps=30, tol=1e-11))
    state = u.init(post, data)
    stored = state.inner[1]
    # the state holds aggregates only: one count per level (+ one for other codes)
    leaves = jax.tree_util.tree_leaves(stored)
    assert all(leaf.size <= 3 for leaf in leaves) and stored.reference is None
    hist = np.asarray(stored.histogram)
    np.testing.assert_allclose(hist[:2], np.bincount(np.asarray(data.attribute("sex"))))

    got, state2, (_, info) = u.update(scenario.request, state)
    assert state2.inner[1] is stored or all(
        np.array_equal(a, b)
        for a, b in zip(leaves, jax.tree_util.tree_leaves(state2.inner[1]), strict=True)
    )
    bw = np.asarray(info.weights) * np.asarray(state2.data.weights)
    sex = np.asarray(data.attribute("sex"))
    achieved = np.array([bw[sex == 0].sum(), bw[sex == 1].sum()])
    np.testing.assert_allclose(achieved / achieved.sum(), hist[:2] / hist.sum(), atol=1e-12)
    assert float(info.mismatch) <= 1e-12 and not bool(info.clipped)
    assert np.all(np.asarray(info.weights)[np.asarray(state2.data.weights) == 0] == 0)
    assert bw.sum() == pytest.approx(float(state2.data.weights.sum()), rel=1e-12)
    # refined to convergence: the fit on the reweighted data
    reweighted = eqx.tree_at(lambda d: d.weights, state2.data, jnp.asarray(bw))
    model, _ = ux.fit(post.mean, reweighted)
    assert _rel(got.theta, ux.models.ravel(model)[0]) <= 1e-8


def test_reweight_numeric_attribute_matches_the_embedding(german):
    split, post = german
    data = split.train
    age = np.asarray(data.attribute("age"))
    old = np.flatnonzero(age > 40)
    u = ux.chain(ux.second_order(), ux.reweight("age", max_weight=50.0))
    state = u.init(post, data)
    stored = state.inner[1]
    assert stored.histogram is None
    assert all(leaf.size <= 32 for leaf in jax.tree_util.tree_leaves(stored))
    _, state2, (_, info) = u.update(ux.forget_rows(old[: int(0.7 * len(old))]), state)
    q = state2.data.weights / state2.data.weights.sum()
    phi = _features(jnp.asarray(age, float), stored.reference, stored.bandwidth)
    before = float(jnp.max(jnp.abs(q @ phi - stored.embedding)))
    assert float(info.mismatch) < 0.05 * before
    assert bool(jnp.all(jnp.isfinite(info.weights)))


# --- the must-show figures on Adult --------------------------------------------------------

GAMMA = 3.0  # the strength chosen for the Adult must-show (see docs/shift.md)


def test_must_show_adult_sex_with_proxies(adult):
    train, test = adult.train, adult.test
    model, _ = ux.fit(ux.models.LogisticRegression(train.n_features), train)
    post = ux.laplace(model, train)
    scenario = ux.scenarios.feature_with_proxies(adult, "sex")
    assert "relationship" in scenario.description
    idx = np.linspace(0, test.n - 1, 3000).astype(int)
    X, sex = test.X[idx], test.attribute("sex")[idx]

    def score(p):
        probs = jax.nn.sigmoid(jax.vmap(p.mean)(X)[:, 0])
        return float(ux.metrics.accuracy(p.mean, test)), float(
            hsic(probs, sex, kernel_y=CategoricalKernel())
        )

    so = ux.second_order()
    plain, _, _ = so.update(scenario.request, so.init(post, train))
    u = ux.chain(ux.second_order(), ux.independence("sex", GAMMA, refine_steps=10))
    fixed, _, _ = u.update(scenario.request, u.init(post, train))
    exact = ux.retrain_independent(post, train, scenario.request, "sex", GAMMA)
    acc0, h0 = score(plain)
    acc1, h1 = score(fixed)
    assert h1 <= 0.5 * h0  # HSIC(prediction, sex) at least halved
    assert acc0 - acc1 <= 0.015  # for at most 1.5 points of test accuracy
    assert _rel(fixed.theta, exact.theta) <= 1e-3


# --- scenarios -----------------------------------------------------------------------------


def test_scenarios(german):
    split, _ = german
    sex = np.asarray(split.train.attribute("sex"))
    y = np.asarray(split.train.y)
    s = ux.scenarios.group_deletion(split, "sex", "female", 0.5, seed=2)
    assert s.attribute == "sex" and s.request.kind == "forget_rows"
    rows = np.asarray(s.request.rows)
    assert len(rows) == round(0.5 * np.sum(sex == 1)) and np.all(sex[rows] == 1)
    s2 = ux.scenarios.label_group_deletion(split, "sex", 1, 0, 1.0)
    rows = np.asarray(s2.request.rows)
    assert np.all((sex[rows] == 1) & (y[rows] == 0)) and len(rows) == np.sum((sex == 1) & (y == 0))
    s3 = ux.scenarios.feature_with_proxies(split, "personal_status_sex", attribute="sex")
    assert s3.request.kind == "forget_features" and s3.attribute == "sex"
    syn = ux.datasets.synthetic_groups(jax.random.key(0), n=500, proxy_strength=2.0)
    s4 = ux.scenarios.feature_with_proxies(syn, "group")
    assert "proxy0" in s4.description and "proxy1" in s4.description
    # same seed, same request
    again = ux.scenarios.group_deletion(split, "sex", "female", 0.5, seed=2)
    np.testing.assert_array_equal(again.request.rows, s.request.rows)


# --- bad input -----------------------------------------------------------------------------


def test_bad_input(groups, german):
    data, post = groups
    with pytest.raises(ValueError, match="no attribute named 'colour'"):
        ux.independence("colour", 1.0).init(post, data)
    with pytest.raises(ValueError, match="no attribute named 'colour'"):
        ux.retrain_independent(post, data, ux.forget_rows([0]), "colour", 1.0)
    with pytest.raises(ValueError, match="no attribute named 'colour'"):
        ux.reweight("colour").init(post, data)
    with pytest.raises(ValueError, match=r"`strength` \(γ\) must be finite and ≥ 0; got -1"):
        ux.independence("group", -1.0)
    with pytest.raises(ValueError, match="strength"):
        ux.retrain_independent(post, data, ux.forget_rows([0]), "group", -0.5)
    with pytest.raises(ValueError, match="strength"):
        ux.independence("group", float("nan"))
    with pytest.raises(ValueError, match="output"):
        ux.independence("group", 1.0, output="labels")
    with pytest.raises(ValueError, match="max_rows"):
        ux.independence("group", 1.0, max_rows=1)
    with pytest.raises(ValueError, match="max_weight"):
        ux.reweight("group", max_weight=0.5)
    with pytest.raises(ValueError, match="kernel"):
        ux.reweight("group", kernel=GaussianKernel()).init(post, data)
    split, _ = german
    with pytest.raises(ValueError, match="no level named 'other'"):
        ux.scenarios.group_deletion(split, "sex", "other", 0.5)
    with pytest.raises(ValueError, match="no attribute named 'colour'"):
        ux.scenarios.feature_with_proxies(split, "purpose", attribute="colour")
    with pytest.raises(ValueError, match="fraction"):
        ux.scenarios.group_deletion(split, "sex", "female", 1.5)
