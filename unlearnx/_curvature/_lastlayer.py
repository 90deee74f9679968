"""Last-layer Laplace: the full curvature of the last dense layer, every other parameter
frozen at its MAP value.

Only the last affine layer's weight and bias (`W̃ = [W | b]`, `n_active` numbers; for a
GLM the whole model) carry posterior uncertainty; the rest is held fixed, i.e. has zero
posterior variance (infinite precision). The block over the active coordinates is a
[`DensePrecision`][unlearnx.DensePrecision] of `Σ_i w_i J_iᵀ B_i B_iᵀ J_i + λ I` with
`J_i` the Jacobian of the outputs with respect to those coordinates only, so edits are
that structure's factor up/downdates.
"""

from __future__ import annotations

from typing import ClassVar

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.scipy.linalg as jsl

from .._custom_types import Array, Float
from .._models._base import ravel
from ._factors import Curvature, _chunked
from ._layers import LayerSpec, find_layers, layer_gradients, layer_statistics, param_dtype
from ._precision import JACOBIAN_BUDGET, AbstractPrecision, DensePrecision, direct_solve_info


def _last_layer(model, where: str) -> tuple[int, LayerSpec]:
    layers = find_layers(model, where)
    return len(layers) - 1, layers[-1]


def _active_factors(model, last: int, X, w) -> Float[Array, "m k"]:
    """Per-row GGN factors `√w Bᵀ J` restricted to the last layer's parameters, stacked
    over rows and outputs: `(rows · c, k)`. For a dense layer `∂(B_kᵀ f)/∂W̃ = g_k ãᵀ`,
    so the factors are outer products of the layer's output gradients and inputs (no
    Jacobian with respect to the other parameters is formed)."""

    def one(x, wi):
        (a,), (g,) = layer_statistics(model, x, (last,))  # (1, cols), (c, 1, out)
        U = jnp.einsum("ko,a->koa", g[:, 0], a[0])
        return jnp.sqrt(jnp.where(wi > 0, wi, 0.0)) * U.reshape(U.shape[0], -1)

    U = jax.vmap(one)(X, w)
    return U.reshape(-1, U.shape[-1])


def _chunk(model, n_active: int, chunk: int) -> int:
    item = jnp.dtype(param_dtype(model)).itemsize
    per_row = max(int(model.n_outputs) * n_active * item, 1)
    return max(1, min(chunk, JACOBIAN_BUDGET // per_row))


def _check_curvature(curvature, where):
    if curvature != "ggn":
        raise ValueError(
            f"{where}: `curvature={curvature!r}` is not supported; the last-layer "
            "precision is the GGN of the last layer. Use curvature='ggn' (when the last "
            "layer produces the outputs directly, as by default, that is the exact "
            "Hessian in its parameters), or structure='full' or 'diag' for the exact "
            "Hessian of all parameters."
        )


class LastLayerPrecision(AbstractPrecision):
    """Last-layer Laplace: a dense precision over the last dense layer's weight and bias,
    every other parameter frozen (zero posterior variance).

    `dim` is the full number of parameters `d`. On the frozen coordinates `solve`,
    `variance` and `sample` return zeros (no uncertainty, no movement), and `mv` and
    `to_dense` return zeros too: `to_dense()` is the active block embedded in a `d × d`
    zero matrix, and `solve` is its pseudo-inverse. `logdet` is that of the active
    block. `n_active` is the number of active parameters: a Laplace marginal likelihood
    of this posterior integrates only those (the frozen ones are point estimates).

    Works for the models of `kfac` (GLMs, where the last layer is the whole model, MLPs
    and CNNs), with `curvature="ggn"`. Build with
    `ux.laplace(model, data, structure="last_layer", chunk=...)`.

    Example:
        ```python
        import jax, unlearnx as ux
        data, _ = ux.datasets.synthetic_glm(jax.random.key(0), n=64, d=4)
        model = ux.models.MLPClassifier(4, 2, width=8, depth=1, key=jax.random.key(1))
        post = ux.laplace(model, data, structure="last_layer")
        print(post.precision.n_active, post.precision.dim)  # 18 58
        ```
    """

    structure: ClassVar[str] = "last_layer"
    block: DensePrecision
    layer: LayerSpec = eqx.field(static=True)
    n_params: int = eqx.field(static=True)
    chunk: int = eqx.field(static=True, default=4096)

    @property
    def dim(self) -> int:
        return self.n_params

    @property
    def n_active(self) -> int:
        """The number of parameters with posterior uncertainty (the last layer's)."""
        return self.layer.size

    def _active(self):
        return self.layer.index().ravel()

    @classmethod
    def from_data(cls, model, data, prior_precision, curvature="ggn", chunk=4096):
        _check_curvature(curvature, "LastLayerPrecision.from_data")
        last, layer = _last_layer(model, "LastLayerPrecision.from_data")
        theta, _ = ravel(model)
        k = layer.size
        rows = max(1, min(_chunk(model, k, chunk), data.n))
        Xs, _, ws = _chunked(data.X, data.y, data.weights, rows)

        def body(acc, r):
            U = _active_factors(model, last, *r)
            return acc + U.T @ U, None

        C, _ = jax.lax.scan(body, jnp.zeros((k, k), theta.dtype), (Xs, ws))
        lam = jnp.asarray(prior_precision, theta.dtype)
        block, ok = DensePrecision.from_matrix(C + lam * jnp.eye(k, dtype=theta.dtype))
        return cls(block, layer, theta.shape[0], chunk), ok

    @classmethod
    def memory_estimate(cls, model, n_rows, chunk=4096):
        _, layer = _last_layer(model, "LastLayerPrecision.memory_estimate")
        k = layer.size
        item = jnp.dtype(param_dtype(model)).itemsize
        rows = min(_chunk(model, k, chunk), max(n_rows, 1))
        # The matrix, its factor and one temporary, plus a chunk's factors. Measured
        # against the peak resident memory of the compiled build (tests/test_memory.py;
        # MLPs 64-w-w-10): +10% to +13% for k = 2,010 and 3,010 with 500-2,000 rows.
        return 3 * k * k * item + rows * int(model.n_outputs) * k * item

    def _embed(self, u, v):
        """`v` with the active coordinates replaced by `u` and the others zeroed."""
        out = jnp.zeros_like(v)
        return out.at[self._active()].set(u)

    def mv(self, v):
        return self._embed(self.block.mv(v[self._active()]), v)

    def solve(self, v):
        return self._embed(self.block.solve(v[self._active()]), v)

    def solve_info(self, v):
        return direct_solve_info(self, v)

    def logdet(self):
        return self.block.logdet()

    def sample(self, key, n):
        draws = self.block.sample(key, n)  # (n, k)
        out = jnp.zeros((n, self.n_params), draws.dtype)
        return out.at[:, self._active()].set(draws)

    def variance(self):
        out = jnp.zeros(self.n_params, self.block.matrix.dtype)
        return out.at[self._active()].set(self.block.variance())

    def to_dense(self):
        a = self._active()
        out = jnp.zeros((self.n_params, self.n_params), self.block.matrix.dtype)
        return out.at[a[:, None], a[None, :]].set(self.block.matrix)

    def functional_covariance(self, model, X):
        """`(f, J Λ⁺ Jᵀ)` per row of `X` (see `AbstractPrecision`; the frozen parameters
        have no variance): with `J_a` the last layer's block of the Jacobian,
        `∂f_k/∂W̃ = Σ_l g_kl a_lᵀ` from the layer's inputs and output gradients (no
        Jacobian with respect to the other parameters is formed), the covariance is
        `Zᵀ Z` with `Z = L⁻¹ J_aᵀ`, one triangular solve with the block's Cholesky
        factor `L`."""
        last, _ = _last_layer(model, "LastLayerPrecision.functional_covariance")

        def one(x):
            f, (a,), (g,) = layer_gradients(model, x, (last,))  # (loc, cols), (c, loc, out)
            J = jnp.einsum("klo,la->koa", g, a).reshape(g.shape[0], -1)  # (c, k)
            Z = jsl.solve_triangular(self.block.chol, J.T, lower=True)
            return f, Z.T @ Z

        # A batch holds two `rows × c × k` arrays (`J` and `Z`).
        rows = min(X.shape[0], _chunk(model, 2 * self.n_active, self.chunk))
        return jax.lax.map(one, X, batch_size=rows)

    def shift(self, delta):
        return LastLayerPrecision(self.block.shift(delta), self.layer, self.n_params, self.chunk)

    def edit_examples(self, model, add, remove, curvature: Curvature = "ggn"):
        _check_curvature(curvature, "LastLayerPrecision.edit_examples")
        last, _ = _last_layer(model, "LastLayerPrecision.edit_examples")
        k = self.n_active
        parts = [rows for rows in (add, remove) if rows is not None]
        if parts:
            # The factors of both sets of rows in one pass, then split.
            X = jnp.concatenate([rows[0] for rows in parts])
            w = jnp.concatenate([rows[2] for rows in parts])
            U = _active_factors(model, last, X, w).reshape(X.shape[0], -1, k)
            Us = iter(jnp.split(U, [parts[0][0].shape[0]])[: len(parts)])
        zero = jnp.zeros((1, k), self.block.matrix.dtype)
        Uadd = zero if add is None else next(Us).reshape(-1, k)
        Uremove = zero if remove is None else next(Us).reshape(-1, k)
        block, ok = self.block.factor_update(Uadd, Uremove)
        return LastLayerPrecision(block, self.layer, self.n_params, self.chunk), ok

    def rebuild(self, model, data, prior_precision, curvature="ggn"):
        return LastLayerPrecision.from_data(model, data, prior_precision, curvature, self.chunk)
