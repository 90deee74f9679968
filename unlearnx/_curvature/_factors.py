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
from .._objective import rows_loss

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
    """Diagonal of the curvature of the given rows. The GGN's comes from one VJP per
    output and row (`rows × d` temporaries, never the `rows × c × d` Jacobians; see
    `_diagonal.py` for the measurements)."""
    from ._diagonal import rows_ggn_diagonal

    if kind == "hessian":
        return jnp.diag(rows_hessian(theta, unravel, X, y, w))
    return rows_ggn_diagonal(theta, unravel, X, w)


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


def rows_ggn_vp(theta, unravel, X, y, w, v, kind: Curvature = "ggn") -> Float[Array, " d"]:
    """`(Σ_rows w ∇²ℓ) v` without forming any matrix: a JVP, the output Hessian, a VJP
    (GGN), or forward-over-reverse on the weighted loss (exact Hessian)."""
    if kind == "hessian":

        def g(t):
            return jax.grad(lambda s: rows_loss(unravel(s), X, y, w))(t)

        return jax.jvp(g, (theta,), (v,))[1]

    def outputs(t):
        return jax.vmap(lambda x: unravel(t)(x))(X)

    F, Jv = jax.jvp(outputs, (theta,), (v,))
    lik = unravel(theta).likelihood

    def out_hvp(f, jv, wi):
        B = lik.hessian_sqrt(f)
        return jnp.where(wi > 0, wi, 0.0) * (B @ (B.T @ jv))

    HJv = jax.vmap(out_hvp)(F, Jv, w)
    _, vjp = jax.vjp(outputs, theta)
    return vjp(HJv)[0]


def data_ggn_vp(theta, unravel, data, v, kind: Curvature = "ggn", *, chunk=4096):
    """`(Σ_i w_i ∇²ℓ_i) v` over all rows of `data` (GGN or exact Hessian), matrix-free,
    accumulated over chunks of `chunk` rows (memory O(chunk · (p + c)) besides the
    model's own activations)."""
    chunk = min(chunk, data.n)
    Xs, ys, ws = _chunked(data.X, data.y, data.weights, chunk)

    def body(acc, rows):
        return acc + rows_ggn_vp(theta, unravel, *rows, v, kind), None

    acc, _ = jax.lax.scan(body, jnp.zeros_like(v), (Xs, ys, ws))
    return acc
