"""Armijo backtracking along a given direction, shared by `second_order(line_search=True)`
and `refine`."""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp

from .._custom_types import Array, Float, Scalar


def armijo(
    f: Callable[[Float[Array, " d"]], Scalar],
    theta: Float[Array, " d"],
    value: Scalar,
    grad: Float[Array, " d"],
    direction: Float[Array, " d"],
) -> Scalar:
    """The step length `a ∈ {1, ½, ¼, …}` (at least 1e-10) of `θ − a·direction`: the first
    with `f(θ − a d) ≤ f(θ) − 1e-4 a ∇fᵀd`.

    Decreases within rounding of `f` count as sufficient, so that an iteration near
    convergence does not stall. optax's `scale_by_backtracking_linesearch` is an optimiser
    transformation with state (and a step length that grows between calls); here one
    search per step is wanted, from the full step every time.
    """
    slope = -jnp.dot(grad, direction)
    eps = jnp.finfo(theta.dtype).eps
    noise = 100 * eps * jnp.maximum(jnp.abs(value), 1.0)

    def cond(c):
        a, v = c
        return (v > value + 1e-4 * a * slope + noise) & (a > 1e-10)

    def body(c):
        a, _ = c
        a = 0.5 * a
        return a, f(theta - a * direction)

    a, _ = jax.lax.while_loop(cond, body, (jnp.ones_like(value), f(theta - direction)))
    return a
