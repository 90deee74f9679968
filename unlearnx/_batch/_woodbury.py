"""A dense precision changed by a few rows, kept in Sherman-Morrison-Woodbury form.

For one request with GGN factors `U_a` (rows added, `m_a × d`) and `U_r` (rows removed,
`m_r × d`), stacked as `U` with signs `S = diag(+1…, −1…)`,

    Λ' = Λ + U_aᵀ U_a − U_rᵀ U_r = L (I + V S Vᵀ) Lᵀ,      V = L⁻¹ Uᵀ   (d × m)

with `Λ = L Lᵀ` the *shared* Cholesky factor. Woodbury's identity gives

    Λ'⁻¹ b = L⁻ᵀ (g − V C⁻¹ Vᵀ g),   g = L⁻¹ b,   C = S + Vᵀ V   (m × m, the capacitance)

so a request costs two triangular solves against the shared factor (`O(m d²)`; once
requests are vmapped, matrix-matrix products over the whole chunk) and an `m × m`
factorisation; no `d³`.

The shared factor is applied as its explicit inverse `L⁻¹`, computed once per batch by one
triangular solve against the identity, so that the per-request solves are matrix products
that XLA runs itself. Measured on the 2-core development machine (JAX 0.10, CPU): a
`solve_triangular` of the 106 × 106 Adult factor takes 14 µs with up to 8 right-hand
sides but 7 ms from 16 on, whatever their number (it calls LAPACK's `dtrsm` in OpenBLAS,
whose threads then compete with XLA's; `OPENBLAS_NUM_THREADS=1` removes the cliff), which
made a vmapped chunk cost 24 ms whether it held 16 requests or 1,024. The product with
`L⁻¹` is backward stable to `κ(L) = √κ(Λ)` times rounding, as the substitution is in
practice for these well-conditioned factors; the tests compare both paths to 1e-10.

`C` is indefinite whenever rows are removed, so it is factorised in two blocks:
`C₁₁ = I + V_aᵀ V_a` (always positive definite) and the Schur complement
`Ĉ = C₂₂ − C₂₁ C₁₁⁻¹ C₁₂`. By Haynsworth's inertia additivity applied to
`[[S, V], [Vᵀ, −I]]`, `Λ'` is positive definite if and only if `C` has the inertia of `S`,
that is, if and only if `−Ĉ` is positive definite: its Cholesky factorisation failing
(NaN) is the test for an indefinite downdate, in `O(m³)`.
"""

from __future__ import annotations

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.scipy.linalg as jsl

from .._curvature._precision import (
    AbstractPrecision,
    DensePrecision,
    direct_solve_info,
    jacobian_covariance,
)
from .._custom_types import Array, Bool, Float

# Capacitance matrices up to this size are factorised and solved with unrolled jnp code
# rather than LAPACK, whose batched custom calls loop over the requests one tiny matrix
# at a time. Measured (JAX 0.10, 2-core CPU, Adult, m = 1): a chunk of 4,096 single-row
# requests took 12 ms with LAPACK and 5 ms unrolled; the unrolled form is a few
# element-wise operations vectorised over the whole chunk (`O(m³)` of them, unrolled, so
# only for small `m`).
_SMALL = 16


def _cholesky(A: Float[Array, "m m"]) -> Float[Array, "m m"]:
    """Lower Cholesky factor; NaN (as `jnp.linalg.cholesky`) if `A` is not positive
    definite."""
    m = A.shape[-1]
    if m > _SMALL:
        return jnp.linalg.cholesky(A)
    L = jnp.zeros_like(A)
    for j in range(m):
        s = A[j, j] - jnp.dot(L[j, :j], L[j, :j])
        dj = jnp.sqrt(jnp.where(s > 0, s, jnp.nan))
        col = (A[j + 1 :, j] - L[j + 1 :, :j] @ L[j, :j]) / dj
        L = L.at[j, j].set(dj).at[j + 1 :, j].set(col)
    return L


def _tri_solve(R: Float[Array, "m m"], b: Float[Array, " m *k"], trans: bool):
    """`R⁻¹ b` (or `R⁻ᵀ b`) for lower-triangular `R`."""
    m = R.shape[0]
    if m > _SMALL:
        return jsl.solve_triangular(R, b, lower=True, trans="T" if trans else "N")
    x: list = [None] * m
    order = range(m - 1, -1, -1) if trans else range(m)
    for i in order:
        acc = b[i]
        others = range(i + 1, m) if trans else range(i)
        for j in others:
            acc = acc - (R[j, i] if trans else R[i, j]) * x[j]
        x[i] = acc / R[i, i]
    return jnp.stack(x) if m else b


def _cho_solve(R, b):
    return _tri_solve(R, _tri_solve(R, b, False), True)


def inverse_factor(base: DensePrecision) -> Float[Array, "d d"]:
    """`L⁻¹` for the Cholesky factor `L` of `base`: triangular solves against the identity.

    Up to `d = 512` the identity is solved 8 columns at a time: LAPACK's `dtrsm` (OpenBLAS)
    goes multi-threaded from 16 right-hand sides, and on a loaded machine each such call
    then waits a scheduler time slice (measured 7-8 ms for the 106 × 106 Adult factor,
    whatever the number of columns, against 0.13 ms for the 14 single-threaded 8-column
    solves). Larger factors are solved in one call, where the threads pay off.
    """
    L = base.chol
    d = L.shape[0]
    eye = jnp.eye(d, dtype=L.dtype)
    if d > 512:
        return jsl.solve_triangular(L, eye, lower=True)
    nb = -(-d // 8)
    blocks = jnp.pad(eye, ((0, 0), (0, 8 * nb - d))).reshape(d, nb, 8).transpose(1, 0, 2)
    solved = jax.lax.map(lambda B: jsl.solve_triangular(L, B, lower=True), blocks)
    return solved.transpose(1, 0, 2).reshape(d, 8 * nb)[:, :d]


class LowRankUpdate(AbstractPrecision):
    """`Λ' = Λ + U_aᵀ U_a − U_rᵀ U_r` with `Λ` dense and shared, solved by Woodbury.

    Attributes:
        base: the shared precision `Λ = L Lᵀ`.
        Linv: `L⁻¹`, shared.
        V: `L⁻¹ Uᵀ` (`d × m`), the added rows' columns first.
        R1: lower Cholesky factor of `C₁₁ = I + V_aᵀ V_a` (`m_a × m_a`).
        C12: `V_aᵀ V_r` (`m_a × m_r`).
        R2: lower Cholesky factor of `−Ĉ` (`m_r × m_r`); NaN if `Λ'` is indefinite.
        n_add: `m_a`, the number of added rows (static).
    """

    base: DensePrecision
    Linv: Float[Array, "d d"]
    V: Float[Array, "d m"]
    R1: Float[Array, "ma ma"]
    C12: Float[Array, "ma mr"]
    R2: Float[Array, "mr mr"]
    n_add: int = eqx.field(static=True)

    @staticmethod
    def build(
        base: DensePrecision,
        add: Float[Array, "ma d"],
        remove: Float[Array, "mr d"],
        Linv: Float[Array, "d d"] | None = None,
    ) -> LowRankUpdate:
        """Woodbury form of `base + addᵀ add − removeᵀ remove` (see the module docstring).
        Pass `Linv = inverse_factor(base)` when it is shared by many requests."""
        if Linv is None:
            Linv = inverse_factor(base)
        U = jnp.concatenate([add, remove], axis=0)
        V = Linv @ U.T  # (d, m)
        ma = add.shape[0]
        Va, Vr = V[:, :ma], V[:, ma:]
        K11 = Va.T @ Va
        C12 = Va.T @ Vr
        K22 = Vr.T @ Vr
        R1 = _cholesky(jnp.eye(ma, dtype=V.dtype) + K11)
        # −Ĉ = I − V_rᵀ V_r + C₂₁ C₁₁⁻¹ C₁₂
        neg_schur = jnp.eye(K22.shape[0], dtype=V.dtype) - K22 + C12.T @ _cho_solve(R1, C12)
        R2 = _cholesky(0.5 * (neg_schur + neg_schur.T))
        return LowRankUpdate(base, Linv, V, R1, C12, R2, ma)

    @property
    def ok(self) -> Bool[Array, ""]:
        """Whether `Λ'` is positive definite (the capacitance has the inertia of `S`)."""
        return jnp.all(jnp.isfinite(self.R2)) & jnp.all(jnp.isfinite(self.R1))

    def _capacitance_solve(self, b: Float[Array, " m *k"]) -> Float[Array, " m *k"]:
        """`C⁻¹ b` by block LDLᵀ: `C₁₁ = R₁R₁ᵀ`, Schur complement `Ĉ = −R₂R₂ᵀ`."""
        ma = self.n_add
        b1, b2 = b[:ma], b[ma:]
        if ma == 0:
            return -_cho_solve(self.R2, b2)
        z1 = _cho_solve(self.R1, b1)
        if b2.shape[0] == 0:
            return z1
        y2 = -_cho_solve(self.R2, b2 - self.C12.T @ z1)
        x1 = z1 - _cho_solve(self.R1, self.C12 @ y2)
        return jnp.concatenate([x1, y2], axis=0)

    @property
    def dim(self) -> int:
        return self.base.dim

    def _signs(self, dtype):
        m = self.V.shape[1]
        return jnp.where(jnp.arange(m) < self.n_add, 1.0, -1.0).astype(dtype)

    def mv(self, v):
        L = self.base.chol
        u = self.V.T @ (L.T @ v)  # U v
        u = self._signs(v.dtype).reshape((-1,) + (1,) * (v.ndim - 1)) * u
        return self.base.matrix @ v + L @ (self.V @ u)

    def solve(self, v):
        g = self.Linv @ v
        g = g - self.V @ self._capacitance_solve(self.V.T @ g)
        return self.Linv.T @ g

    def logdet(self):
        # det(I + V S Vᵀ) = det(S) det(C) = det(R₁)² det(R₂)²
        return (
            self.base.logdet()
            + 2.0 * jnp.sum(jnp.log(jnp.diag(self.R1)))
            + 2.0 * jnp.sum(jnp.log(jnp.diag(self.R2)))
        )

    def functional_covariance(self, model, X):
        return jacobian_covariance(self, model, X)

    def to_dense(self):
        W = self.base.chol @ self.V  # Uᵀ
        return self.base.matrix + (W * self._signs(W.dtype)) @ W.T

    def _dense(self) -> DensePrecision:
        return DensePrecision.from_matrix(self.to_dense())[0]

    def sample(self, key, n):
        return self._dense().sample(key, n)

    def variance(self):
        # diag(Λ'⁻¹) = diag(Λ⁻¹) − diag(W C⁻¹ Wᵀ), W = L⁻ᵀ V
        W = self.Linv.T @ self.V
        return jnp.sum(self.Linv**2, axis=0) - jnp.sum(W * self._capacitance_solve(W.T).T, axis=1)

    def factor_update(self, add, remove, method="auto"):
        return self._dense().factor_update(add, remove, method)

    def dense_update(self, delta):
        return DensePrecision.from_matrix(self.to_dense() + delta)

    # The rest of the protocol goes through the dense matrix: a batch result that is
    # edited again, shifted or rebuilt becomes a `DensePrecision`.
    def solve_info(self, v):
        return direct_solve_info(self, v)

    def shift(self, delta):
        return self._dense().shift(delta)

    def edit_examples(self, model, add, remove, curvature="ggn"):
        return self._dense().edit_examples(model, add, remove, curvature)

    def rebuild(self, model, data, prior_precision, curvature="ggn"):
        return DensePrecision.from_data(model, data, prior_precision, curvature)

    @classmethod
    def from_data(cls, model, data, prior_precision, curvature="ggn"):
        return DensePrecision.from_data(model, data, prior_precision, curvature)

    @classmethod
    def memory_estimate(cls, model, n_rows):
        return DensePrecision.memory_estimate(model, n_rows)


def woodbury_solve(
    base: DensePrecision,
    add: Float[Array, "ma d"],
    remove: Float[Array, "mr d"],
    b: Float[Array, " d"],
) -> tuple[Float[Array, " d"], Bool[Array, ""]]:
    """`(Λ + addᵀ add − removeᵀ remove)⁻¹ b` against the shared factor of `base`, and
    whether the updated matrix is positive definite.

    Example:
        ```python
        import jax, jax.numpy as jnp
        from unlearnx import DensePrecision
        from unlearnx._batch._woodbury import woodbury_solve
        A = jax.random.normal(jax.random.key(0), (20, 5))
        base, _ = DensePrecision.from_matrix(A.T @ A + jnp.eye(5))
        x, ok = woodbury_solve(base, jnp.zeros((0, 5)), A[:2], jnp.ones(5))
        ```
    """
    P = LowRankUpdate.build(base, add, remove)
    return P.solve(b), P.ok
