"""Multi-layer perceptrons for classification and regression."""

from __future__ import annotations

from collections.abc import Callable

import equinox as eqx
import jax

from .._custom_types import PRNGKeyArray
from ._base import AbstractModel
from ._likelihood import Categorical, Gaussian


class MLPClassifier(AbstractModel):
    """An MLP with `n_classes` logits and a categorical likelihood.

    Example:
        ```python
        import jax, unlearnx as ux
        model = ux.models.MLPClassifier(8, 3, width=16, depth=2, key=jax.random.key(0))
        ```
    """

    mlp: eqx.nn.MLP
    likelihood: Categorical

    def __init__(
        self,
        n_features: int,
        n_classes: int,
        *,
        width: int = 64,
        depth: int = 2,
        activation: Callable = jax.nn.tanh,
        dtype=None,
        key: PRNGKeyArray,
    ):
        if n_classes < 2:
            raise ValueError(f"MLPClassifier: `n_classes` must be ≥ 2; got {n_classes}.")
        self.mlp = eqx.nn.MLP(
            n_features, n_classes, width, depth, activation=activation, dtype=dtype, key=key
        )
        self.likelihood = Categorical()

    @property
    def n_inputs(self) -> int:
        return self.mlp.in_size

    @property
    def n_outputs(self) -> int:
        return self.mlp.out_size

    def __call__(self, x):
        return self.mlp(x)


class MLPRegressor(AbstractModel):
    """An MLP with one output and a Gaussian likelihood of fixed `noise_std`.

    Example:
        ```python
        import jax, unlearnx as ux
        model = ux.models.MLPRegressor(8, width=16, key=jax.random.key(0))
        ```
    """

    mlp: eqx.nn.MLP
    likelihood: Gaussian

    def __init__(
        self,
        n_features: int,
        *,
        width: int = 64,
        depth: int = 2,
        activation: Callable = jax.nn.tanh,
        noise_std: float = 1.0,
        dtype=None,
        key: PRNGKeyArray,
    ):
        self.mlp = eqx.nn.MLP(
            n_features, 1, width, depth, activation=activation, dtype=dtype, key=key
        )
        self.likelihood = Gaussian(noise_std)

    @property
    def n_inputs(self) -> int:
        return self.mlp.in_size

    @property
    def n_outputs(self) -> int:
        return 1

    def __call__(self, x):
        return self.mlp(x)
