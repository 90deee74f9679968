"""Posterior precision structures: dense (with its Cholesky factor) and diagonal.

Each exposes `mv`, `solve`, `logdet`, `sample`, and the up/downdates that unlearning needs:
adding or removing the curvature of a few examples, given as GGN factors `U` (rows of
`Uᵀ U`) or as a dense matrix. A downdate can leave the matrix indefinite (too much
curvature removed, or a stale precision); each update reports that through an `ok` flag
instead of returning NaN, and the caller decides how to recover.
"""

from __future__ import annotations

import abc
from typing import Literal

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.scipy.linalg as jsl

from .._custom_types import Array, Bool, Float, PRNGKeyArray, Scalar

UpdateMethod = Literal["auto", "rank_update", "refactor"]


class AbstractPrecision(eqx.Module):
    """A symmetric positive-definite posterior precision `Λ` over `d` parameters."""

    @property
    @abc.abstractmethod
    def dim(self) -> int:
        """The number of parameters `d`."""

    @abc.abstractmethod
    def mv(self, v: Float[Array, " d"]) -> Float[Array, " d"]:
        """`Λ v`."""

    @abc.abstractmethod
    def solve(self, v: Float[Array, " d *m"]) -> Float[Array, " d *m"]:
        """`Λ⁻¹ v` (for a vector or a matrix of columns)."""

    @abc.abstractmethod
    def logdet(self) -> Scalar:
        """`log det Λ`."""

    @abc.abstractmethod
    def sample(self, key: PRNGKeyArray, n: int) -> Float[Array, "n d"]:
        """`n` draws from `N(0, Λ⁻¹)`."""

    @abc.abstractmethod
    def variance(self) -> Float[Array, " d"]:
        """The diagonal of `Λ⁻¹`: marginal posterior variances."""

    @abc.abstractmethod
    def to_dense(self) -> Float[Array, "d d"]:
        """`Λ` as a dense matrix."""

    @abc.abstractmethod
    def factor_update(
        self,
        add: Float[Array, "m d"],
        remove: Float[Array, "m d"],
        method: UpdateMethod = "auto",
    ) -> tuple[AbstractPrecision, Bool[Array, ""]]:
        """`Λ + addᵀ add − removeᵀ remove`, and whether it stayed positive definite."""

    @abc.abstractmethod
    def dense_update(self, delta: Float[Array, "d d"]) -> tuple[AbstractPrecision, Bool[Array, ""]]:
        """`Λ + Δ` for a symmetric `Δ`, and whether it stayed positive definite."""

    def memory_bytes(self) -> int:
        """Bytes held by this structure's arrays."""
        return sum(x.nbytes for x in jax.tree_util.tree_leaves(self) if hasattr(x, "nbytes"))


def _chol_rank_one(L, x, sign):
    """Rank-one Cholesky update (`sign=+1`) or downdate (`sign=-1`) of lower `L`.

    Written here because neither jax.scipy, lineax nor scipy offers a Cholesky
    up/downdate; this is the classic O(d²) algorithm (Golub & Van Loan §6.5.4). Returns
    `(L', ok)`, where `ok` is False if a downdate would make the matrix indefinite.

    Column `k` of `L'` depends only on column `k` of `L` and the running vector `x`, so
    the sweep is a `scan` over the columns that emits the new ones. (Writing them back
    into a loop-carried `L` made XLA copy the whole factor on every step as soon as `ok`
    was used: O(d³) per update, 50× slower at `d = 400`.) A zero `x` (padding; the `add`
    half of a deletion) changes nothing and skips the sweep.
    """
    d = L.shape[0]
    idx = jnp.arange(d)

    def column(carry, inputs):
        x, ok = carry
        Lcol, k = inputs
        Lkk = Lcol[k]
        xk = x[k]
        r2 = Lkk**2 + sign * xk**2
        ok = ok & (r2 > 0)
        r = jnp.sqrt(jnp.where(r2 > 0, r2, Lkk**2))
        c = r / Lkk
        s = xk / Lkk
        below = idx > k
        col = jnp.where(below, (Lcol + sign * s * x) / c, Lcol).at[k].set(r)
        x = jnp.where(below, c * x - s * col, x)
        return (x, ok), col

    def sweep(L):
        (_, ok), cols = jax.lax.scan(column, (x, jnp.array(True)), (L.T, idx))
        return cols.T, ok

    return jax.lax.cond(jnp.any(x != 0), sweep, lambda L: (L, jnp.array(True)), L)


def _use_rank_updates(m: int, d: int, method: UpdateMethod) -> bool:
    """Whether `factor_update` should apply `m` rank-one Cholesky up/downdates to the
    `d × d` factor (`True`) or form the new matrix and refactorise it (`False`).

    Cost model: the rank-one updates are `m·d` *dependent* loop steps of O(d) work each,
    about `m·d·(0.5 µs + 2.5 ns·d)` on a CPU; a refactorisation is one blocked LAPACK
    Cholesky, about `d³ · 10 ps` (the `m×d×d` product that forms the matrix is paid on
    both paths). So rank updates win only while `m` is a small fraction of `d`.

    Measured by section 3 of `benchmarks/bench_adult.py` (the same `factor_update`
    call; float64, jit, BLAS on one thread, 2-core AMD EPYC, JAX 0.10.2; best of 9 runs),
    one rank-one update against one refactorisation: 0.13 vs 0.10 ms at `d = 106`,
    0.5 vs 1.1 ms at `d = 400`, 3.4-4.6 vs 12 ms at `d = 1,000`, 20-26 vs 95-120 ms at
    `d = 2,000`. The largest `m` for which rank updates are faster: 0 at `d = 106`, 2 at
    400, 2 at 1,000 and 4 at 2,000 (3 and 6 at 1,000 and 2,000 with BLAS threaded on a
    quiet machine): `m* ≈ d/300` within a factor of 2, hence `300·m ≤ d`.

    The rule leans towards refactorising on purpose: a wrong "refactor" costs at most
    one Cholesky, a wrong "rank_update" grows with `m` (65 ms against 2.6 ms for a
    1,000-row deletion on Adult), more cores speed up only the refactorisation, and on
    a GPU each sequential step is a kernel launch. `m` counts padded and all-zero rows,
    which the rank path skips at run time, so for deletions (whose `add` rows are all
    zero) the rule is conservative. A GLM edit of `k` rows has `m = 2·bucket ≥ 16`, so
    rank updates are chosen only from `d = 4,800`; on Adult (`d = 106`) "auto" always
    refactorises, which section 2 of the benchmark confirms is the faster choice.
    """
    if method == "rank_update":
        return True
    if method == "refactor":
        return False
    return 300 * m <= d


def _gram_if_nonzero(U: Float[Array, "m d"]) -> Float[Array, "d d"]:
    """`Uᵀ U`, skipping the product at run time when `U` is all zeros (the `add` factors
    of a row deletion, whose new rows have weight 0): that halves the `O(m d²)` work of
    a deletion. Under `vmap` the `cond` becomes a `select` and both sides run, as before."""
    d = U.shape[1]
    return jax.lax.cond(jnp.any(U != 0), lambda U: U.T @ U, lambda U: jnp.zeros((d, d), U.dtype), U)


class DensePrecision(AbstractPrecision):
    """A dense precision matrix with its lower Cholesky factor `Λ = L Lᵀ`."""

    matrix: Float[Array, "d d"]
    chol: Float[Array, "d d"]

    @staticmethod
    def from_matrix(matrix: Float[Array, "d d"]) -> tuple[DensePrecision, Bool[Array, ""]]:
        """Factorise `matrix`; `ok` is False if it is not positive definite."""
        matrix = 0.5 * (matrix + matrix.T)
        L = jnp.linalg.cholesky(matrix)
        ok = jnp.all(jnp.isfinite(L))
        return DensePrecision(matrix, L), ok

    @property
    def dim(self) -> int:
        return self.matrix.shape[0]

    def mv(self, v):
        return self.matrix @ v

    def solve(self, v):
        return jsl.cho_solve((self.chol, True), v)

    def logdet(self):
        return 2.0 * jnp.sum(jnp.log(jnp.diag(self.chol)))

    def sample(self, key, n):
        eps = jax.random.normal(key, (self.dim, n), self.matrix.dtype)
        return jsl.solve_triangular(self.chol.T, eps, lower=False).T

    def variance(self):
        Linv = jsl.solve_triangular(self.chol, jnp.eye(self.dim, dtype=self.chol.dtype), lower=True)
        return jnp.sum(Linv**2, axis=0)

    def to_dense(self):
        return self.matrix

    def factor_update(self, add, remove, method="auto"):
        matrix = self.matrix + _gram_if_nonzero(add) - _gram_if_nonzero(remove)
        m = add.shape[0] + remove.shape[0]
        if not _use_rank_updates(m, self.dim, method):
            new, ok = DensePrecision.from_matrix(matrix)
            return new, ok

        def step(sign):
            def f(carry, u):
                L, ok = carry
                L, ok_u = _chol_rank_one(L, u, sign)
                return (L, ok & ok_u), None

            return f

        # Updates first, then downdates: adding curvature first keeps the intermediate
        # factor as well conditioned as possible.
        (L, ok), _ = jax.lax.scan(step(1.0), (self.chol, jnp.array(True)), add)
        (L, ok), _ = jax.lax.scan(step(-1.0), (L, ok), remove)
        return DensePrecision(matrix, L), ok

    def dense_update(self, delta):
        return DensePrecision.from_matrix(self.matrix + delta)


class DiagonalPrecision(AbstractPrecision):
    """A diagonal precision `Λ = diag(λ_1, …, λ_d)`."""

    diag: Float[Array, " d"]

    @property
    def dim(self) -> int:
        return self.diag.shape[0]

    def mv(self, v):
        return self.diag.reshape((-1,) + (1,) * (v.ndim - 1)) * v

    def solve(self, v):
        return v / self.diag.reshape((-1,) + (1,) * (v.ndim - 1))

    def logdet(self):
        return jnp.sum(jnp.log(self.diag))

    def sample(self, key, n):
        eps = jax.random.normal(key, (n, self.dim), self.diag.dtype)
        return eps / jnp.sqrt(self.diag)

    def variance(self):
        return 1.0 / self.diag

    def to_dense(self):
        return jnp.diag(self.diag)

    def factor_update(self, add, remove, method="auto"):
        del method
        diag = self.diag + jnp.sum(add**2, axis=0) - jnp.sum(remove**2, axis=0)
        return DiagonalPrecision(diag), jnp.all(diag > 0)

    def dense_update(self, delta):
        diag = self.diag + jnp.diag(delta)
        return DiagonalPrecision(diag), jnp.all(diag > 0)
