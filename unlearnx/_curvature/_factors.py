"""Per-example curvature of a model: GGN factors, exact Hessians, and their sums.

For example `i` with output `f_i = f(x_i; θ)`, Jacobian `J_i = ∂f_i/∂θ` and output
Hessian square root `B_i` (`∇²_f ℓ = B_i B_iᵀ`), the GGN is `J_iᵀ B_i B_iᵀ J_i`. We keep
the factor `U_i = √w_i · B_iᵀ J_i` (shape `c × d`), so a sum over rows is `Uᵀ U`; for
GLMs with canonical links the GGN *is* the Hessian and `U_i` is `√(w_i s_i) x_i`.
"""

from __future__ import annotations

from typing import Literal

import jax
import jax.numpy as jnp

from .._custom_types import Array, Float

Curvature = Literal["ggn", "hessian"]


def ggn_factors(theta, unravel, X: Float[Array, "k p"], y: Array, w: Float[Array, " k"]):
    """Per-row GGN factors `U` of shape `(k, c, d)`, with weight-0 rows giving zeros."""

    def one(x, wi):
        model_fn = lambda t: unravel(t)(x)  # noqa: E731
        f = model_fn(theta)
        J = jax.jacrev(model_fn)(theta)  # (c, d)
        B = unravel(theta).likelihood.hessian_sqrt(f)  # (c, c)
        return jnp.sqrt(jnp.maximum(wi, 0.0)) * (B.T @ J)

    del y  # the output Hessian of these likelihoods does not depend on the label
    return jax.vmap(one)(X, w)


def rows_hessian(theta, unravel, X, y, w) -> Float[Array, "d d"]:
    """Exact Hessian of `Σ_rows w ℓ` (dense, `d × d`)."""

    def f(t):
        model = unravel(t)
        losses = jax.vmap(model.loss)(X, y)
        return jnp.sum(jnp.where(w > 0, w * losses, 0.0))

    return jax.hessian(f)(theta)


def rows_curvature(theta, unravel, X, y, w, kind: Curvature) -> Float[Array, "d d"]:
    """Dense curvature `Σ_rows w ∇²ℓ` of the given rows (GGN or exact Hessian)."""
    if kind == "hessian":
        return rows_hessian(theta, unravel, X, y, w)
    U = ggn_factors(theta, unravel, X, y, w)
    U = U.reshape(-1, U.shape[-1])
    return U.T @ U


def rows_diagonal(theta, unravel, X, y, w, kind: Curvature) -> Float[Array, " d"]:
    """Diagonal of the curvature of the given rows."""
    if kind == "hessian":
        return jnp.diag(rows_hessian(theta, unravel, X, y, w))
    U = ggn_factors(theta, unravel, X, y, w)
    return jnp.sum(U**2, axis=(0, 1))


def _chunked(X, y, w, chunk):
    n = X.shape[0]
    m = -(-n // chunk) * chunk
    pad = m - n
    Xp = jnp.concatenate([X, jnp.zeros((pad,) + X.shape[1:], X.dtype)])
    yp = jnp.concatenate([y, jnp.zeros((pad,), y.dtype)])
    wp = jnp.concatenate([w, jnp.zeros((pad,), w.dtype)])
    return (
        Xp.reshape(m // chunk, chunk, *X.shape[1:]),
        yp.reshape(m // chunk, chunk),
        wp.reshape(m // chunk, chunk),
    )


def data_curvature(theta, unravel, data, kind: Curvature, *, diagonal=False, chunk=4096):
    """Curvature summed over all rows of `data`, accumulated in chunks of rows so that the
    per-example Jacobians never exceed `chunk × c × d` numbers."""
    chunk = min(chunk, data.n)
    Xs, ys, ws = _chunked(data.X, data.y, data.weights, chunk)
    fn = rows_diagonal if diagonal else rows_curvature
    d = theta.shape[0]
    init = jnp.zeros((d,) if diagonal else (d, d), theta.dtype)

    def body(acc, rows):
        return acc + fn(theta, unravel, *rows, kind), None

    acc, _ = jax.lax.scan(body, init, (Xs, ys, ws))
    return acc
