"""Fine-tuning on the retained data: the gradient-descent baseline of approximate unlearning.

Starting from the current posterior mean, a fixed number of optax Adam steps on minibatches
of the retained rows minimises the training objective of the edited data, scaled per row:

    L(θ; D') / n' = (1/n') Σ_{i ∈ D'} w_i ℓ_i(θ) + (λ / 2n') ‖θ‖²,

where `n'` counts the retained rows (weight > 0). A minibatch of `b = min(batch_size, n')`
distinct retained rows, drawn uniformly, estimates it without bias by
`(1/b) Σ_{i ∈ batch} w_i ℓ_i(θ) + (λ / 2n') ‖θ‖²`.

Fine-tuning has no curvature: the precision is left as it was, so the posterior's
uncertainty still describes the data before the edit. Chain a curvature-aware transform
(e.g. `ux.chain(ux.second_order(), ux.fine_tune(...))`) when the precision matters.
"""

from __future__ import annotations

from typing import NamedTuple

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax

from .._custom_types import Array, Bool, Float, Int, PRNGKeyArray
from .._models._base import ravel
from .._objective import rows_loss
from .._posterior._laplace import LaplacePosterior
from ._base import AbstractUnlearner


class FineTuneInfo(NamedTuple):
    """Diagnostics of fine-tuning.

    Attributes:
        steps: Adam steps taken.
        loss: the per-row minibatch objective `(1/b) Σ_batch w_i ℓ_i + (λ/2n')‖θ‖²` of
            the last step (`b` retained rows of `n'`), evaluated at the parameters that
            step started from.

    Example:
        ```python
        import unlearnx as ux
        print(ux.FineTuneInfo._fields)  # ('steps', 'loss'); the info of ux.fine_tune
        ```
    """

    steps: Int[Array, ""]
    loss: Float[Array, ""]


def _minibatch(
    key: PRNGKeyArray, retained: Bool[Array, " n"], size: int
) -> tuple[Int[Array, " b"], Bool[Array, " b"]]:
    """`size` distinct rows drawn uniformly from the retained ones, and which of them are
    retained (all of them unless fewer than `size` rows are retained, in which case the
    batch is every retained row plus some deleted ones, masked out).

    Random scores with `-1` on deleted rows, then `top_k`: a uniform random subset of the
    retained rows of size `min(size, n')`, under `jit`, with `n'` traced. It costs one
    partial sort of `n` scores per step; for `size ≥ n'` the batch is the whole retained
    data (full-batch Adam).
    """
    scores = jnp.where(retained, jax.random.uniform(key, retained.shape), -1.0)
    _, rows = jax.lax.top_k(scores, size)
    return rows, retained[rows]


class FineTune(AbstractUnlearner):
    """Adam on minibatches of the retained rows. See [`fine_tune`][unlearnx.fine_tune].

    The transform's state (`inner`) is a PRNG key made from `seed` by `init`; each update
    splits it, so successive requests draw fresh minibatches and the whole sequence is
    reproducible from `seed`.
    """

    steps: int = eqx.field(static=True)
    learning_rate: float
    batch_size: int = eqx.field(static=True)
    seed: int = eqx.field(static=True)

    def init_inner(self, posterior, data):
        return jax.random.key(self.seed)

    def step(self, ctx, posterior, inner):
        key, sub = jax.random.split(inner)
        theta, unravel = ravel(posterior.mean)
        lam = posterior.prior_precision
        data = ctx.new
        retained = data.weights > 0
        n_kept = jnp.maximum(jnp.sum(retained), 1).astype(theta.dtype)
        size = min(self.batch_size, data.n)
        opt = optax.adam(self.learning_rate)

        def loss(t, rows, present):
            k = jnp.maximum(jnp.sum(present), 1).astype(t.dtype)
            # Deleted rows (weight 0) in a batch contribute nothing to `rows_loss`.
            w = data.weights[rows]
            data_term = rows_loss(unravel(t), data.X[rows], data.y[rows], w) / k
            # `t` is every parameter (`ravel` flattens the same leaves as `sq_norm`).
            return data_term + 0.5 * lam * jnp.sum(t**2) / n_kept

        def body(carry, k):
            t, opt_state = carry
            rows, present = _minibatch(k, retained, size)
            value, g = jax.value_and_grad(loss)(t, rows, present)
            updates, opt_state = opt.update(g, opt_state, t)
            return (optax.apply_updates(t, updates), opt_state), value

        keys = jax.random.split(sub, self.steps)
        (theta, _), values = jax.lax.scan(body, (theta, opt.init(theta)), keys)
        post = LaplacePosterior(unravel(theta), posterior.precision, lam, posterior.curvature)
        info = FineTuneInfo(jnp.array(self.steps, jnp.int32), values[-1])
        return post, key, info


def fine_tune(
    steps: int = 100,
    learning_rate: float = 1e-3,
    batch_size: int = 128,
    *,
    seed: int,
) -> FineTune:
    """Fine-tune the mean on the retained data: `steps` optax Adam steps, each on a
    minibatch of `batch_size` distinct retained rows (weight > 0; deleted rows are never
    drawn), from the current posterior mean.

    The loss is the training objective on the edited data `L(θ; D') = Σ w_i ℓ_i +
    (λ/2)‖θ‖²` (see [`objective`][unlearnx.objective]) divided by the number `n'` of
    retained rows, estimated without bias on each minibatch; its minimiser is the
    retrained MAP. With `batch_size ≥ n'` every step uses all retained rows (full-batch
    Adam). Fine-tuning has no curvature: the precision is left unchanged. The whole loop
    is one `lax.scan`, so the transform runs under `jit` inside `update` and under `vmap`
    in batch mode.

    This is the usual gradient-descent baseline: it forgets only as far as the steps
    move the mean towards the retrained optimum, with no guarantee.

    Args:
        steps: number of Adam steps per request (a positive int).
        learning_rate: Adam's learning rate (positive).
        batch_size: rows per minibatch (a positive int; capped at the number of rows).
        seed: seed of the minibatch sampling (keyword-only). `init` turns it into a PRNG
            key kept in the transform's state, and every update splits that key, so a
            sequence of requests is reproducible from `seed` alone (the pattern of
            `optax.add_noise`; no key is stored in the configuration).

    Returns:
        A transform; its info is a [`FineTuneInfo`][unlearnx.FineTuneInfo].

    Example:
        ```python
        import unlearnx as ux
        data = ux.datasets.diabetes().train
        model, _ = ux.fit(ux.models.LogisticRegression(data.n_features), data)
        post = ux.laplace(model, data)
        unlearner = ux.fine_tune(steps=50, learning_rate=1e-2, batch_size=64, seed=0)
        state = unlearner.init(post, data)
        post2, state, info = unlearner.update(ux.forget_rows([0, 1, 2]), state)
        print(int(info.steps), float(info.loss))
        ```
    """
    for name, value in (("steps", steps), ("batch_size", batch_size), ("seed", seed)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
            raise ValueError(
                f"fine_tune: `{name}` must be an int; got {value!r} ({type(value).__name__})."
            )
    if steps < 1:
        raise ValueError(f"fine_tune: `steps` must be at least 1; got {steps}.")
    if batch_size < 1:
        raise ValueError(f"fine_tune: `batch_size` must be at least 1; got {batch_size}.")
    if isinstance(learning_rate, bool) or not isinstance(learning_rate, (int, float, np.floating)):
        raise ValueError(
            f"fine_tune: `learning_rate` must be a positive number; got {learning_rate!r}."
        )
    if not (np.isfinite(learning_rate) and learning_rate > 0):
        raise ValueError(
            f"fine_tune: `learning_rate` must be positive and finite; got {learning_rate}."
        )
    return FineTune(int(steps), float(learning_rate), int(batch_size), int(seed))
