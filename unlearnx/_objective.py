"""The training objective in sum form: `L(θ; D) = Σ_i w_i ℓ(z_i, θ) + (λ/2)‖θ‖²`."""

from __future__ import annotations

import equinox as eqx
import jax
import jax.numpy as jnp

from ._custom_types import Array, Float, Scalar
from ._data._dataset import Dataset
from ._models._base import partition


def rows_loss(model, X: Float[Array, "k p"], y: Array, w: Float[Array, " k"]) -> Scalar:
    """Weighted sum of per-example losses over some rows; weight-0 rows contribute 0."""
    losses = jax.vmap(model.loss)(X, y)
    # `where` rather than `w * losses` so that an inf loss on a weight-0 row stays out.
    return jnp.sum(jnp.where(w > 0, w * losses, 0.0))


def sq_norm(model) -> Scalar:
    """‖θ‖² over all parameters."""
    params, _ = partition(model)
    return sum(jnp.sum(p**2) for p in jax.tree_util.tree_leaves(params))


def objective(model, data: Dataset, prior_precision) -> Scalar:
    """`L(θ; D) = Σ_i w_i ℓ(x_i, y_i; θ) + (λ/2)‖θ‖²` (sum form, as in scikit-learn with
    `C = 1/λ`).

    Example:
        ```python
        import unlearnx as ux
        data = ux.datasets.diabetes().train
        model = ux.models.LogisticRegression(data.n_features)
        print(ux.objective(model, data, 1.0))
        ```
    """
    return rows_loss(model, data.X, data.y, data.weights) + 0.5 * prior_precision * sq_norm(model)


@eqx.filter_jit
def objective_grad(model, data: Dataset, prior_precision):
    """Gradient of `objective` with respect to the parameters (a model-shaped pytree)."""
    params, static = partition(model)
    return jax.grad(lambda p: objective(eqx.combine(p, static), data, prior_precision))(params)
