"""The `fine_tune` baseline: Adam on minibatches of the retained rows.

Oracles: a hand-written optax Adam loop on `objective(model, D', λ) / n'` (full batch),
and exact retraining (`ux.retrain`) on the edited data. Runs in float64 (conftest).
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import unlearnx as ux
from unlearnx._models._base import ravel
from unlearnx._unlearn._finetune import FineTuneInfo, _minibatch, fine_tune

LAM = 1.0


@pytest.fixture(scope="module")
def problem():
    """Logistic regression on 200 synthetic rows, and a request that removes 50 of the
    positive rows (a non-uniform deletion that moves the optimum)."""
    data, _ = ux.datasets.synthetic_glm(jax.random.key(0), n=200, d=4)
    model, _ = ux.fit(ux.models.LogisticRegression(4), data, prior_precision=LAM)
    post = ux.laplace(model, data, prior_precision=LAM)
    rows = np.flatnonzero(np.asarray(data.y) == 1)[:50]
    return data, post, ux.forget_rows(rows)


def _run(unlearner, post, data, request):
    state = unlearner.init(post, data)
    return unlearner.update(request, state)


def test_full_batch_equals_optax_on_the_objective(problem):
    """With `batch_size ≥ n'` every step is Adam on `L(θ; D') / n'`, computed here from
    `ux.objective` on the edited data."""
    data, post, request = problem
    steps, lr = 40, 0.05
    new = request.resolve(data).apply(data)
    n_kept = float(jnp.sum(new.weights > 0))
    theta, unravel = ravel(post.mean)
    f = lambda t: ux.objective(unravel(t), new, LAM) / n_kept  # noqa: E731
    opt = optax.adam(lr)

    @jax.jit
    def adam_step(theta, s):
        value, g = jax.value_and_grad(f)(theta)
        updates, s = opt.update(g, s, theta)
        return optax.apply_updates(theta, updates), s, value

    s = opt.init(theta)
    for _ in range(steps):
        theta, s, value = adam_step(theta, s)
    got, _, info = _run(fine_tune(steps, lr, batch_size=10_000, seed=0), post, data, request)
    np.testing.assert_allclose(got.theta, theta, rtol=1e-9, atol=1e-12)
    assert isinstance(info, FineTuneInfo) and int(info.steps) == steps
    np.testing.assert_allclose(info.loss, value, rtol=1e-9)


def test_approaches_retraining(problem):
    """Many minibatch steps bring the mean, and the predictions, close to retraining."""
    data, post, request = problem
    exact = ux.retrain(post, data, request)
    tuned, _, _ = _run(
        fine_tune(steps=1500, learning_rate=1e-2, batch_size=32, seed=0), post, data, request
    )
    gap_before = float(jnp.linalg.norm(post.theta - exact.theta))
    gap_after = float(jnp.linalg.norm(tuned.theta - exact.theta))
    assert gap_after < 0.3 * gap_before
    # full batch converges to the retrained optimum itself
    full, _, _ = _run(
        fine_tune(steps=500, learning_rate=5e-2, batch_size=256, seed=0), post, data, request
    )
    np.testing.assert_allclose(full.theta, exact.theta, atol=1e-6)
    # prediction agreement with the retrained model on the data
    X = data.X
    p_exact = np.asarray(exact.predict(X)) > 0.5
    agree_before = np.mean((np.asarray(post.predict(X)) > 0.5) == p_exact)
    agree_after = np.mean((np.asarray(tuned.predict(X)) > 0.5) == p_exact)
    assert agree_after >= 0.95 and agree_after > agree_before + 0.15  # before: 0.755


def test_precision_and_prior_unchanged(problem):
    data, post, request = problem
    tuned, _, _ = _run(fine_tune(steps=5, seed=0), post, data, request)
    np.testing.assert_array_equal(tuned.precision.to_dense(), post.precision.to_dense())
    assert float(tuned.prior_precision) == float(post.prior_precision)
    assert tuned.curvature == post.curvature


def test_jit_equals_eager(problem):
    data, post, request = problem
    unlearner = fine_tune(steps=3, learning_rate=1e-2, batch_size=16, seed=3)
    jitted, _, info_jit = _run(unlearner, post, data, request)
    with jax.disable_jit():
        eager, _, info_eager = _run(unlearner, post, data, request)
    np.testing.assert_allclose(jitted.theta, eager.theta, rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(info_jit.loss, info_eager.loss, rtol=1e-12)


def test_seeded_and_fresh_per_request(problem):
    data, post, request = problem
    a, state_a, _ = _run(fine_tune(steps=3, batch_size=16, seed=1), post, data, request)
    b, _, _ = _run(fine_tune(steps=3, batch_size=16, seed=1), post, data, request)
    c, _, _ = _run(fine_tune(steps=3, batch_size=16, seed=2), post, data, request)
    np.testing.assert_array_equal(a.theta, b.theta)
    assert not np.array_equal(a.theta, c.theta)
    # the key in the state is split by each update: the next request draws new batches
    first = fine_tune(steps=3, batch_size=16, seed=1).init(post, data).inner
    assert not np.array_equal(jax.random.key_data(state_a.inner), jax.random.key_data(first))


def test_chain_and_vmap(problem):
    data, post, request = problem
    unlearner = ux.chain(ux.second_order(), fine_tune(steps=5, batch_size=16, seed=0))
    _, _, (_, info) = _run(unlearner, post, data, request)
    assert int(info.steps) == 5 and np.isfinite(float(info.loss))
    # batch mode vmaps the step over requests
    requests = [ux.forget_rows([0, 1]), ux.forget_rows([5, 6])]
    result = ux.batch.unlearn(post, data, requests, unlearner=fine_tune(steps=5, seed=0))
    assert result.theta.shape == (2, post.theta.shape[0]) and result.finite.all()
    for i, req in enumerate(requests):
        single, _, _ = _run(fine_tune(steps=5, seed=0), post, data, req)
        np.testing.assert_allclose(result.theta[i], single.theta, rtol=1e-9, atol=1e-12)


def test_minibatches_draw_only_retained_rows():
    retained = jnp.zeros(50, bool).at[jnp.arange(3, 50, 5)].set(True)  # 10 rows
    for i in range(5):
        rows, present = _minibatch(jax.random.key(i), retained, 4)
        assert bool(jnp.all(retained[rows])) and bool(jnp.all(present))
        assert len(set(np.asarray(rows).tolist())) == 4
    rows, present = _minibatch(jax.random.key(0), retained, 20)  # more than retained
    assert int(jnp.sum(present)) == 10
    assert set(np.asarray(rows)[np.asarray(present)].tolist()) == set(range(3, 50, 5))


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(steps=0), "`steps` must be at least 1"),
        (dict(steps=True), "`steps` must be an int"),
        (dict(batch_size=False), "`batch_size` must be an int"),
        (dict(batch_size=0), "`batch_size` must be at least 1"),
        (dict(learning_rate=0.0), "`learning_rate` must be positive"),
        (dict(learning_rate=float("nan")), "`learning_rate` must be positive"),
        (dict(learning_rate=-1e-3), "`learning_rate` must be positive"),
    ],
)
def test_bad_arguments(kwargs, match):
    # (values of the wrong type, e.g. `steps=2.5`, are caught by the jaxtyping/beartype
    # hook the suite runs under before they reach these checks)
    kwargs = {"seed": 0, **kwargs}
    with pytest.raises(ValueError, match=f"fine_tune: {match}"):
        fine_tune(**kwargs)
