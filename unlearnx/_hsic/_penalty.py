"""A differentiable HSIC penalty between a model's predictions and an attribute."""

from __future__ import annotations

from collections.abc import Callable

from .._custom_types import ArrayLike, PRNGKeyArray, Scalar
from ._estimators import hsic
from ._kernels import AbstractKernel


def hsic_penalty(
    predict_fn: Callable[[ArrayLike], ArrayLike],
    X: ArrayLike,
    V: ArrayLike,
    *,
    kernel_x: AbstractKernel | None = None,
    kernel_v: AbstractKernel | None = None,
    estimator: str = "biased",
    block: int = 1000,
    n_features: int = 1024,
    key: PRNGKeyArray | None = None,
) -> Scalar:
    """`HSIC(predict_fn(X), V)`: how much the predictions depend on the attribute `V`.

    Differentiable in whatever `predict_fn` closes over (a model's parameters), so
    `L(θ) + γ · hsic_penalty(lambda X: f_θ(X), X, V)` is an objective that discourages
    the predictions from carrying information about `V` (a group, or a removed feature).

    With the default kernels (Gaussian, median-heuristic bandwidth) the bandwidth on the
    predictions is recomputed from `predict_fn(X)` at every call but treated as a
    constant by `jax.grad` (it passes through `jax.lax.stop_gradient`): the gradient is
    that of HSIC at a fixed bandwidth, the one chosen at the current parameters. (The
    median's own gradient flows through a single pair of predictions and mostly rewards
    rescaling them: a tuning choice, not something to optimise.) Pass a kernel with an
    explicit bandwidth to fix it across calls as well.

    Args:
        predict_fn: maps `X` to the predictions, shape `(n,)` or `(n, c)` (logits,
            probabilities or means).
        X: the inputs, passed to `predict_fn` as they are.
        V: the attribute, shape `(n,)` or `(n, dv)`; for group labels pass
            `kernel_v=CategoricalKernel()`.
        kernel_x: kernel on the predictions; default a median-heuristic Gaussian kernel.
        kernel_v: kernel on `V`; same default.
        estimator: as in [`hsic`][unlearnx.hsic.hsic]; `"blocked"` keeps the memory (of
            the value and of the gradient) at O(n + block²).
        block: rows per tile for `"blocked"` and `"rff"`.
        n_features: random features for `"rff"`.
        key: PRNG key for `"rff"`.

    Returns:
        The scalar HSIC estimate.

    Example:
        ```python
        import jax
        import jax.numpy as jnp
        from unlearnx.hsic import CategoricalKernel, hsic_penalty
        X = jax.random.normal(jax.random.key(0), (100, 3))
        V = (X[:, 0] > 0).astype(jnp.int32)          # a group that X[:, 0] reveals
        w = jnp.array([1.0, 0.5, -0.5])
        pen = lambda w: hsic_penalty(lambda X: X @ w, X, V, kernel_v=CategoricalKernel())
        print(pen(w), jax.grad(pen)(w))
        ```
    """
    F = predict_fn(X)
    return hsic(
        F,
        V,
        kernel_x=kernel_x,
        kernel_y=kernel_v,
        estimator=estimator,
        block=block,
        n_features=n_features,
        key=key,
    )
