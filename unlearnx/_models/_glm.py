"""Generalised linear models: linear (Gaussian), logistic and softmax regression."""

from __future__ import annotations

import jax.numpy as jnp

from .._custom_types import Array, Float, PRNGKeyArray
from ._base import AbstractModel
from ._likelihood import Bernoulli, Categorical, Gaussian


def _check_sizes(name: str, **sizes: int) -> None:
    for arg, value in sizes.items():
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"{name}: `{arg}` must be a positive integer; got {value!r}.")


class LinearRegression(AbstractModel):
    """Linear regression `y ~ N(wᵀx + b, σ²)` with fixed noise `σ` (`noise_std`).

    Parameters start at zero: the problem is convex, so `key` is accepted for a uniform
    constructor signature but not used.

    Example:
        ```python
        import unlearnx as ux
        model = ux.models.LinearRegression(3)
        ```
    """

    weight: Float[Array, " p"]
    bias: Float[Array, ""] | None
    likelihood: Gaussian

    def __init__(
        self,
        n_features: int,
        *,
        use_bias: bool = True,
        noise_std: float = 1.0,
        dtype=None,
        key: PRNGKeyArray | None = None,
    ):
        del key
        _check_sizes("LinearRegression", n_features=n_features)
        self.weight = jnp.zeros(n_features, dtype)
        self.bias = jnp.zeros((), dtype) if use_bias else None
        self.likelihood = Gaussian(noise_std)

    @property
    def n_inputs(self) -> int:
        return self.weight.shape[0]

    @property
    def n_outputs(self) -> int:
        return 1

    def __call__(self, x):
        f = jnp.dot(self.weight, x)
        return (f if self.bias is None else f + self.bias)[None]


class LogisticRegression(AbstractModel):
    """Binary logistic regression `p(y = 1 | x) = σ(wᵀx + b)`, labels in `{0, 1}`.

    The intercept `b` (when `use_bias=True`) is penalised by the same Gaussian prior as
    the weights. For scikit-learn's parametrisation, fit with `use_bias=False` on features
    with a column of ones, or compare with `fit_intercept=False`.

    Example:
        ```python
        import jax, unlearnx as ux
        model = ux.models.LogisticRegression(5, key=jax.random.key(0))
        ```
    """

    weight: Float[Array, " p"]
    bias: Float[Array, ""] | None
    likelihood: Bernoulli

    def __init__(
        self,
        n_features: int,
        *,
        use_bias: bool = True,
        dtype=None,
        key: PRNGKeyArray | None = None,
    ):
        del key
        _check_sizes("LogisticRegression", n_features=n_features)
        self.weight = jnp.zeros(n_features, dtype)
        self.bias = jnp.zeros((), dtype) if use_bias else None
        self.likelihood = Bernoulli()

    @property
    def n_inputs(self) -> int:
        return self.weight.shape[0]

    @property
    def n_outputs(self) -> int:
        return 1

    def __call__(self, x):
        f = jnp.dot(self.weight, x)
        return (f if self.bias is None else f + self.bias)[None]


class SoftmaxRegression(AbstractModel):
    """Multinomial logistic regression with `n_classes` logits `W x + b`.

    Example:
        ```python
        import unlearnx as ux
        model = ux.models.SoftmaxRegression(4, n_classes=3)
        ```
    """

    weight: Float[Array, "c p"]
    bias: Float[Array, " c"] | None
    likelihood: Categorical

    def __init__(
        self,
        n_features: int,
        n_classes: int,
        *,
        use_bias: bool = True,
        dtype=None,
        key: PRNGKeyArray | None = None,
    ):
        del key
        _check_sizes("SoftmaxRegression", n_features=n_features, n_classes=n_classes)
        if n_classes < 2:
            raise ValueError(f"SoftmaxRegression: `n_classes` must be ≥ 2; got {n_classes}.")
        self.weight = jnp.zeros((n_classes, n_features), dtype)
        self.bias = jnp.zeros(n_classes, dtype) if use_bias else None
        self.likelihood = Categorical()

    @property
    def n_inputs(self) -> int:
        return self.weight.shape[1]

    @property
    def n_outputs(self) -> int:
        return self.weight.shape[0]

    def __call__(self, x):
        f = self.weight @ x
        return f if self.bias is None else f + self.bias
