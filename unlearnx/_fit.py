"""MAP fitting: Newton (convex models), L-BFGS (optax) and Adam (optax, networks)."""

from __future__ import annotations

from typing import Literal, NamedTuple

import equinox as eqx
import jax
import jax.numpy as jnp
import optax

from ._custom_types import PRNGKeyArray
from ._data._dataset import Dataset, check_finite
from ._models._base import AbstractModel, ravel
from ._models._glm import LinearRegression, LogisticRegression, SoftmaxRegression
from ._objective import objective

_CONVEX = (LinearRegression, LogisticRegression, SoftmaxRegression)


class FitInfo(NamedTuple):
    """Diagnostics of a MAP fit.

    Attributes:
        solver: the solver used.
        iterations: steps taken.
        objective: final value of `L(θ; D)`.
        grad_norm: final `‖∇L(θ; D)‖₂`.
        converged: whether the stopping tolerance was met.

    Example:
        ```python
        import unlearnx as ux
        data = ux.datasets.diabetes().train
        _, info = ux.fit(ux.models.LogisticRegression(data.n_features), data)
        assert info.converged and info.grad_norm < 1e-4
        ```
    """

    solver: str
    iterations: int
    objective: float
    grad_norm: float
    converged: bool


def _default_tol(dtype) -> float:
    return 1e-10 if dtype == jnp.float64 else 1e-5


def check_model_data(model: AbstractModel, data: Dataset, where: str) -> None:
    """Boundary checks shared by fit/laplace/unlearning: shapes, finiteness, labels."""
    if not isinstance(model, AbstractModel):
        raise ValueError(
            f"{where}: `model` must be an unlearnx model (ux.models.*); got {type(model).__name__}."
        )
    if not isinstance(data, Dataset):
        raise ValueError(
            f"{where}: `data` must be a ux.datasets.Dataset; got {type(data).__name__}."
        )
    if data.n_features != model.n_inputs:
        raise ValueError(
            f"{where}: the model expects {model.n_inputs} features but `data.X` has "
            f"{data.n_features} columns. Build the model with `n_features=data.n_features`."
        )
    check_finite(data, where)
    msg = model.likelihood.check_labels(data.y, model.n_outputs)
    if msg is not None:
        raise ValueError(f"{where}: invalid labels in `data.y`: {msg}.")


@eqx.filter_jit
def _newton(theta0, unravel, data, prior_precision, tol, max_steps):
    """Damped Newton with Armijo backtracking on the flat parameters.

    Written here because optax has no Newton solver; for GLMs the Hessian is cheap
    (O(n d²)) and Newton reaches machine precision in a handful of steps, which is what
    exactness against scikit-learn and against retraining needs.
    """

    def f(t):
        return objective(unravel(t), data, prior_precision)

    value_and_grad = jax.value_and_grad(f)
    hess = jax.hessian(f)
    g0 = jax.grad(f)(theta0)
    g0norm = jnp.linalg.norm(g0)

    def cond(carry):
        _, _, g, i = carry
        return (i < max_steps) & (jnp.linalg.norm(g) > tol * jnp.maximum(g0norm, 1.0))

    def body(carry):
        t, val, g, i = carry
        H = hess(t)
        step = jax.scipy.linalg.cho_solve(jax.scipy.linalg.cho_factor(H, lower=True), g)
        slope = -jnp.dot(g, step)

        def ls_cond(c):
            a, v = c
            return (v > val + 1e-4 * a * slope) & (a > 1e-10)

        def ls_body(c):
            a, _ = c
            a = 0.5 * a
            return a, f(t - a * step)

        a, _ = jax.lax.while_loop(ls_cond, ls_body, (1.0, f(t - step)))
        t = t - a * step
        val, g = value_and_grad(t)
        return t, val, g, i + 1

    val0 = f(theta0)
    t, val, g, i = jax.lax.while_loop(cond, body, (theta0, val0, g0, 0))
    return t, val, jnp.linalg.norm(g), i, jnp.linalg.norm(g) <= tol * jnp.maximum(g0norm, 1.0)


@eqx.filter_jit
def _lbfgs(theta0, unravel, data, prior_precision, tol, max_steps):
    def f(t):
        return objective(unravel(t), data, prior_precision)

    opt = optax.lbfgs()
    value_and_grad = optax.value_and_grad_from_state(f)
    g0norm = jnp.linalg.norm(jax.grad(f)(theta0))

    def cond(carry):
        _, state, i = carry
        g = optax.tree.get(state, "grad")
        return (i == 0) | ((i < max_steps) & (jnp.linalg.norm(g) > tol * jnp.maximum(g0norm, 1.0)))

    def body(carry):
        t, state, i = carry
        val, g = value_and_grad(t, state=state)
        updates, state = opt.update(g, state, t, value=val, grad=g, value_fn=f)
        return optax.apply_updates(t, updates), state, i + 1

    t, _, i = jax.lax.while_loop(cond, body, (theta0, opt.init(theta0), 0))
    val, g = jax.value_and_grad(f)(t)
    gn = jnp.linalg.norm(g)
    return t, val, gn, i, gn <= tol * jnp.maximum(g0norm, 1.0)


@eqx.filter_jit
def _adam_epoch(theta, opt_state, unravel, data, prior_precision, key, batch_size, steps, lr):
    n = data.n
    scale = n / batch_size
    opt = optax.adam(lr)

    def minibatch_objective(t, rows):
        model = unravel(t)
        X, y, w = data.X[rows], data.y[rows], data.weights[rows]
        losses = jax.vmap(model.loss)(X, y)
        return scale * jnp.sum(w * losses) + 0.5 * prior_precision * jnp.sum(t**2)

    def step(carry, k):
        t, s = carry
        rows = jax.random.choice(k, n, (batch_size,), replace=False)
        g = jax.grad(minibatch_objective)(t, rows)
        updates, s = opt.update(g, s, t)
        return (optax.apply_updates(t, updates), s), None

    (theta, opt_state), _ = jax.lax.scan(step, (theta, opt_state), jax.random.split(key, steps))
    return theta, opt_state


def fit(
    model: AbstractModel,
    data: Dataset,
    *,
    prior_precision: float = 1.0,
    solver: Literal["auto", "newton", "lbfgs", "adam"] = "auto",
    max_steps: int | None = None,
    tol: float | None = None,
    learning_rate: float = 1e-3,
    batch_size: int | None = None,
    key: PRNGKeyArray | None = None,
    progress: bool = False,
) -> tuple[AbstractModel, FitInfo]:
    """Fit the MAP parameters `θ* = argmin Σ_i w_i ℓ(z_i, θ) + (λ/2)‖θ‖²`.

    Args:
        model: the initial model (its parameters are the starting point).
        data: the training data; rows with weight 0 are ignored.
        prior_precision: `λ`, the Gaussian prior precision (L2 penalty in sum form).
        solver: `"newton"` (convex models; exact Hessian and backtracking line search),
            `"lbfgs"` (optax L-BFGS with zoom line search), `"adam"` (optax Adam on
            minibatches, for networks) or `"auto"` (Newton for GLMs, Adam otherwise).
        max_steps: iteration cap (Newton 100, L-BFGS 1,000, Adam 2,000 by default).
        tol: stop when `‖∇L‖ ≤ tol · max(1, ‖∇L(θ₀)‖)`; `1e-10` in float64 and `1e-5`
            in float32 by default. Adam runs `max_steps` steps.
        learning_rate: Adam's learning rate.
        batch_size: Adam's minibatch size (default `min(n, 256)`).
        key: PRNG key for Adam's minibatches (required for `"adam"`).
        progress: show a progress bar for Adam.

    Returns:
        `(model, info)`: the fitted model and a [`FitInfo`][unlearnx.FitInfo].

    Example:
        ```python
        import unlearnx as ux
        data = ux.datasets.diabetes().train
        model, info = ux.fit(ux.models.LogisticRegression(data.n_features), data)
        print(info.converged, info.grad_norm)
        ```
    """
    check_model_data(model, data, "fit")
    if not prior_precision > 0:
        raise ValueError(
            f"fit: `prior_precision` must be positive (it is the L2 penalty λ); got "
            f"{prior_precision}."
        )
    if solver == "auto":
        solver = "newton" if isinstance(model, _CONVEX) else "adam"
    if solver not in ("newton", "lbfgs", "adam"):
        raise ValueError(
            f"fit: unknown `solver={solver!r}`; use 'auto', 'newton', 'lbfgs' or 'adam'."
        )
    theta0, unravel = ravel(model)
    lam = jnp.asarray(prior_precision, theta0.dtype)
    if tol is None:
        tol = _default_tol(theta0.dtype)
    if solver in ("newton", "lbfgs"):
        run = _newton if solver == "newton" else _lbfgs
        steps = max_steps if max_steps is not None else (100 if solver == "newton" else 1000)
        t, val, gn, i, ok = run(theta0, unravel, data, lam, tol, steps)
    else:
        if key is None:
            raise ValueError("fit: `key` is required for solver='adam' (minibatch sampling).")
        steps = max_steps if max_steps is not None else 2000
        bs = min(data.n, batch_size or 256)
        g0 = jax.grad(lambda s: objective(unravel(s), data, lam))(theta0)
        g0norm = float(jnp.linalg.norm(g0))
        opt_state = optax.adam(learning_rate).init(theta0)
        chunk = max(1, min(steps, 200))
        t = theta0
        done = 0
        bar = _progress(progress, steps)
        while done < steps:
            m = min(chunk, steps - done)
            key, sub = jax.random.split(key)
            t, opt_state = _adam_epoch(t, opt_state, unravel, data, lam, sub, bs, m, learning_rate)
            done += m
            bar.advance(m)
        bar.close()
        val, g = jax.value_and_grad(lambda s: objective(unravel(s), data, lam))(t)
        gn = jnp.linalg.norm(g)
        i, ok = steps, gn <= tol * max(1.0, g0norm)
    if not bool(jnp.all(jnp.isfinite(t))):
        raise RuntimeError(
            f"fit: the {solver} solver produced non-finite parameters. Increase "
            f"`prior_precision`, lower `learning_rate`, or standardise the features."
        )
    info = FitInfo(solver, int(i), float(val), float(gn), bool(ok))
    return unravel(t), info


class _progress:
    """A minimal rich progress bar, or nothing."""

    def __init__(self, enabled: bool, total: int):
        self._p = None
        if enabled:
            from rich.progress import Progress

            self._p = Progress(transient=True)
            self._p.start()
            self._task = self._p.add_task("fitting", total=total)

    def advance(self, m: int) -> None:
        if self._p is not None:
            self._p.advance(self._task, m)

    def close(self) -> None:
        if self._p is not None:
            self._p.stop()
