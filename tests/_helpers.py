"""Models shared by several test modules (tests/ is on `sys.path` under pytest)."""

import jax
import jax.numpy as jnp

import unlearnx as ux


class _Quadratic(ux.models.AbstractModel):
    """A model whose layers are unknown to the layer-wise structures: `(w·x)²`."""

    weight: jax.Array
    likelihood: ux.models.Gaussian

    @property
    def n_inputs(self):
        return 2

    @property
    def n_outputs(self):
        return 1

    def __call__(self, x):
        return (self.weight @ x) ** 2 * jnp.ones(1)
