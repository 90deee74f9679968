"""Posterior precision structures: dense (with its Cholesky factor) and diagonal.

Each exposes `mv`, `solve`, `logdet`, `sample`, and the up/downdates that unlearning needs:
adding or removing the curvature of a few examples, given as GGN factors `U` (rows of
`Uᵀ U`) or as a dense matrix. A downdate can leave the matrix indefinite (too much
curvature removed, or a stale precision); each update reports that through an `ok` flag
instead of returning NaN, and the caller decides how to recover.
"""

from __future__ import annotations

import abc
from typing import Any, ClassVar, Literal, NamedTuple

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.scipy.linalg as jsl

from .._custom_types import Array, Bool, Float, Int, PRNGKeyArray, Scalar
from ._factors import Curvature, data_curvature, data_ggn_vp, ggn_factors, rows_hessian

UpdateMethod = Literal["auto", "rank_update", "refactor"]

#: Rows of a dataset as `(X, y, w)`: inputs, labels and weights (weight-0 rows are
#: padding and contribute nothing), e.g. `edit.old_rows(data)` or `edit.new_rows()`.
Rows = tuple[Array, Array, Array]


class SolveInfo(NamedTuple):
    """Diagnostics of a linear solve `Λ x = b`.

    Attributes:
        iterations: iterations taken (0 for a direct solve).
        residual: the relative residual `‖Λ x − b‖ / ‖b‖` (the largest over columns).
        converged: whether `residual` reached the solver's tolerance.
    """

    iterations: Int[Array, ""]
    residual: Float[Array, ""]
    converged: Bool[Array, ""]


def relative_residual(precision, x, b):
    """`max_columns ‖Λ x − b‖ / ‖b‖`."""
    r = precision.mv(x) - b
    num = jnp.linalg.norm(r.reshape(r.shape[0], -1), axis=0)
    den = jnp.maximum(jnp.linalg.norm(b.reshape(b.shape[0], -1), axis=0), jnp.finfo(b.dtype).tiny)
    return jnp.max(num / den)


class AbstractPrecision(eqx.Module):
    """A symmetric positive-definite posterior precision `Λ` over `d` parameters.

    Every structure offers the same protocol: products `mv`, solves `solve` (with
    diagnostics from `solve_info`), `logdet`, `sample`, marginal `variance`, the
    up/downdate `edit_examples` (`add_examples` / `remove_examples`) that unlearning
    needs, `rebuild` from all rows (the fallback when a downdate fails), `shift` (adding
    `δI`, for damping and prior tuning), and `memory_estimate` (a class method, from shapes
    alone, before anything is allocated).
    """

    #: The `structure=` name [`laplace`][unlearnx.laplace] builds this class for.
    structure: ClassVar[str] = ""

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

    def memory_bytes(self) -> int:
        """Bytes held by this structure's arrays."""
        return sum(x.nbytes for x in jax.tree_util.tree_leaves(self) if hasattr(x, "nbytes"))

    @abc.abstractmethod
    def functional_covariance(
        self, model, X: Float[Array, "m p"]
    ) -> tuple[Float[Array, "m c"], Float[Array, "m c c"]]:
        """`(f, J Λ⁻¹ Jᵀ)` at each row of `X`: `model`'s outputs `(m, c)` and the
        covariance `(m, c, c)` of its outputs linearised in the parameters,
        `f(x; θ) ≈ f(x; θ*) + J(x)(θ − θ*)`, under `N(θ*, Λ⁻¹)`.

        Dense, low-rank and matrix-free precisions form the Jacobian `J` (`c × d`) of
        each row and `solve(Jᵀ)` (`jacobian_covariance`); the layer-wise structures
        (KFAC, EK-FAC, the diagonal of a model with known layers, the last layer)
        contract the layers' inputs and output gradients with their own factors, never
        forming `J`.
        """

    # ----------------------------------------------------------------------------------
    # The protocol that unlearning needs.

    @abc.abstractmethod
    def solve_info(self, v: Float[Array, " d *m"]) -> tuple[Float[Array, " d *m"], SolveInfo]:
        """`Λ⁻¹ v` with diagnostics (iterations, relative residual, convergence)."""

    @abc.abstractmethod
    def shift(self, delta: Float[Array, ""]) -> AbstractPrecision:
        """`Λ + δ I` (damping, or a change of the prior precision)."""

    @abc.abstractmethod
    def edit_examples(
        self, model, add: Rows | None, remove: Rows | None, curvature: Curvature = "ggn"
    ) -> tuple[AbstractPrecision, Bool[Array, ""]]:
        """`Λ + C(add) − C(remove)`: the curvature of the rows `add` joins the precision
        and that of `remove` leaves it, evaluated at `model`'s parameters in this
        structure's approximation. Returns `(precision, ok)`, `ok` False if the result is
        not positive definite (the caller recovers, e.g. with `rebuild`). Jit-friendly:
        rows have static shapes, weight-0 rows are padding."""

    def add_examples(self, model, rows: Rows, curvature: Curvature = "ggn"):
        """`Λ + C(rows)`; see `edit_examples`."""
        return self.edit_examples(model, rows, None, curvature)

    def remove_examples(self, model, rows: Rows, curvature: Curvature = "ggn"):
        """`Λ − C(rows)`; see `edit_examples`."""
        return self.edit_examples(model, None, rows, curvature)

    @abc.abstractmethod
    def rebuild(
        self, model, data, prior_precision, curvature: Curvature = "ggn"
    ) -> tuple[AbstractPrecision, Bool[Array, ""]]:
        """The same structure, with the same options, recomputed from all rows of `data`
        at `model`: `(precision, ok)`."""

    @classmethod
    @abc.abstractmethod
    def from_data(
        cls, model, data, prior_precision, curvature: Curvature = "ggn", **options: Any
    ) -> tuple[AbstractPrecision, Bool[Array, ""]]:
        """Build the precision `Σ_i w_i ∇²ℓ_i + λ I` of `data` at `model`:
        `(precision, ok)`, `ok` False if it is not positive definite."""

    @classmethod
    @abc.abstractmethod
    def memory_estimate(cls, model, n_rows: int, **options: Any) -> int:
        """Peak bytes that `from_data` will allocate for `model` and `n_rows` rows
        (the structure itself plus the largest temporary), from shapes alone, before
        anything is allocated."""


def jacobian_covariance(
    precision: AbstractPrecision, model, X: Float[Array, "m p"]
) -> tuple[Float[Array, "m c"], Float[Array, "m c c"]]:
    """`(f, J Λ⁻¹ Jᵀ)` per row of `X` from the row's Jacobian `J = jax.jacrev(f)(θ)`
    (`c × d`) and `precision.solve(Jᵀ)`: any structure, `O(c d)` memory per row and
    one solve with `c` columns per row."""
    from .._models._base import ravel

    theta, unravel = ravel(model)

    def one(x):
        fn = lambda t: unravel(t)(x)  # noqa: E731
        J = jax.jacrev(fn)(theta)
        return fn(theta), J @ precision.solve(J.T)

    # Rows in batches whose Jacobians (`rows × c × d` numbers, and the solve's and the
    # product's temporaries) fit in `JACOBIAN_BUDGET`: a plain vmap over the 359 test
    # rows of a 112,810-parameter MLP grew past 9 GB.
    c, item = int(model.n_outputs), theta.dtype.itemsize
    batch = max(1, min(X.shape[0], JACOBIAN_BUDGET // max(4 * c * theta.shape[0] * item, 1)))
    return jax.lax.map(one, X, batch_size=batch)


# --------------------------------------------------------------------------------------
# Shared by the structures that hold an explicit matrix (dense, diagonal).


def direct_solve_info(precision, v):
    """`Λ⁻¹ v` by a direct solve, with 0 iterations and the measured relative residual."""
    x = precision.solve(v)
    res = relative_residual(precision, x, v)
    tol = jnp.maximum(1e3 * jnp.finfo(x.dtype).eps * jnp.sqrt(precision.dim), 1e-6)
    return x, SolveInfo(jnp.array(0), res, res <= tol)


def explicit_edit_examples(precision, model, add, remove, curvature):
    """`edit_examples` for explicit matrices: per-example GGN factors through
    `factor_update`, or exact Hessians through `dense_update`."""
    from .._models._base import ravel

    theta, unravel = ravel(model)
    d = theta.shape[0]
    if curvature == "hessian":
        delta = jnp.zeros((d, d), theta.dtype)
        if add is not None:
            delta = delta + rows_hessian(theta, unravel, *add)
        if remove is not None:
            delta = delta - rows_hessian(theta, unravel, *remove)
        return precision.dense_update(delta)

    def factors(rows):
        if rows is None:
            return jnp.zeros((1, d), theta.dtype)
        return ggn_factors(theta, unravel, *rows).reshape(-1, d)

    return precision.factor_update(factors(add), factors(remove))


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

    structure: ClassVar[str] = "full"
    matrix: Float[Array, "d d"]
    chol: Float[Array, "d d"]

    @classmethod
    def from_data(cls, model, data, prior_precision, curvature="ggn", chunk=4096):
        from .._models._base import ravel

        theta, unravel = ravel(model)
        C = data_curvature(theta, unravel, data, curvature, chunk=_chunk(model, chunk))
        lam = jnp.asarray(prior_precision, theta.dtype)
        return cls.from_matrix(C + lam * jnp.eye(theta.shape[0], dtype=theta.dtype))

    @classmethod
    def memory_estimate(cls, model, n_rows, chunk=4096):
        d, c, item = _shape(model)
        jacobians = min(_chunk(model, chunk), n_rows) * c * d
        # The matrix and its factor (the outputs), plus the larger of the two phases'
        # temporaries: the running sum and a chunk's per-example Jacobians twice (`J`
        # and `Bᵀ J`), or the sum and its shifted, symmetrised copy around the Cholesky
        # factorisation. Measured against the peak resident memory of the compiled
        # build (tests/test_memory.py; MLPs 64-w-w-10): -2% at d = 4,650 with 100 rows
        # (the factorisation's phase; `3d² + 2J`, without it, was 16% low), +2% to +10%
        # at d = 1,482-3,466 with 1,000-4,000 rows, +18% at d = 3,466 with 500 rows.
        return (2 * d * d + max(2 * d * d, d * d + 2 * jacobians)) * item

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

    def functional_covariance(self, model, X):
        return jacobian_covariance(self, model, X)

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

    def solve_info(self, v):
        return direct_solve_info(self, v)

    def shift(self, delta):
        return self.dense_update(delta * jnp.eye(self.dim, dtype=self.matrix.dtype))[0]

    def edit_examples(self, model, add, remove, curvature="ggn"):
        return explicit_edit_examples(self, model, add, remove, curvature)

    def rebuild(self, model, data, prior_precision, curvature="ggn"):
        return DensePrecision.from_data(model, data, prior_precision, curvature)


class DiagonalPrecision(AbstractPrecision):
    """A diagonal precision `Λ = diag(λ_1, …, λ_d)`."""

    structure: ClassVar[str] = "diag"
    diag: Float[Array, " d"]

    @classmethod
    def from_data(
        cls,
        model,
        data,
        prior_precision,
        curvature="ggn",
        chunk=4096,
        *,
        method: str = "exact",
        n_probes: int = 64,
        key: PRNGKeyArray | None = None,
    ):
        """`diag(Σ_i w_i ∇²ℓ_i) + λ` of `data` at `model`: `(precision, ok)`.

        Args:
            model: the model at the posterior mean.
            data: the rows (weight-0 rows contribute nothing).
            prior_precision: `λ`.
            curvature: `"ggn"` or `"hessian"`.
            chunk: at most this many rows at a time.
            method: `"exact"` (the default; for the GGN one VJP per output and example,
                in chunks whose per-example gradients fit in 8 MiB, see `ggn_diagonal`;
                for the Hessian, the diagonal of each chunk's dense Hessian) or
                `"hutchinson"` (Hutchinson's estimate from `n_probes` Rademacher probes
                on matrix-free products, see `hutchinson_diagonal`; a GGN estimate is
                clipped at 0, as the GGN diagonal cannot be negative).
            n_probes: probes for `method="hutchinson"`.
            key: PRNG key for the probes (default `jax.random.key(0)`).
        """
        from .._models._base import ravel
        from ._diagonal import exact_ggn_diagonal, hutchinson

        if method not in ("exact", "hutchinson"):
            raise ValueError(
                f"DiagonalPrecision.from_data: unknown `method={method!r}`; use 'exact' or "
                "'hutchinson' (e.g. laplace(..., structure='diag', method='hutchinson'))."
            )
        if not (isinstance(n_probes, int) and n_probes >= 1):
            raise ValueError(
                f"DiagonalPrecision.from_data: `n_probes` must be a positive int; got {n_probes!r}."
            )
        theta, unravel = ravel(model)
        if method == "hutchinson":
            key = jax.random.key(0) if key is None else key

            def matvec(v):
                return data_ggn_vp(theta, unravel, data, v, curvature, chunk=chunk)

            C = hutchinson(key, matvec, theta.shape[0], n_probes, theta.dtype)
            if curvature == "ggn":
                C = jnp.maximum(C, 0.0)
        elif curvature == "ggn":
            C = exact_ggn_diagonal(theta, unravel, data, chunk=chunk)
        else:
            C = data_curvature(
                theta, unravel, data, curvature, diagonal=True, chunk=_chunk(model, chunk)
            )
        diag = C + jnp.asarray(prior_precision, theta.dtype)
        return cls(diag), jnp.all(diag > 0)

    @classmethod
    def memory_estimate(cls, model, n_rows, chunk=4096, *, method="exact", n_probes=64, key=None):
        from ._diagonal import (
            diagonal_chunk,
            diagonal_row_bytes,
            padded_rows_bytes,
            products_bytes,
        )

        del n_probes, key
        d, _, item = _shape(model)
        if method == "hutchinson":
            # A few vectors and one chunk of the matrix-free products: measured 11% above
            # the peak resident memory for width 1,536, 500 rows and 4 probes (8·d of it).
            rows = min(chunk, n_rows)
            return (
                8 * d * item + products_bytes(model, rows) + padded_rows_bytes(model, n_rows, rows)
            )
        # The result and two `d`-vectors (the running sum and the chunk's), one chunk's
        # per-example gradients and forward passes, and the rows padded to whole chunks.
        # Measured against the peak resident memory (tests/test_memory.py; MLPs of width
        # 1,024-2,048, whose chunks are one row): 3·d is exact to 1%, 4·d was 25% high.
        rows = min(diagonal_chunk(d, item, chunk), n_rows)
        per_row = diagonal_row_bytes(model)
        # Summing a chunk's squared per-example gradients over its rows, leaf by leaf,
        # runs as fused YNNPACK kernels once there are several rows (see `_fused_sums`).
        fused = _fused_sums([rows * s for s in _leaf_sizes(model)]) if rows > 1 else 0
        return (3 * d + fused) * item + rows * per_row + padded_rows_bytes(model, n_rows, rows)

    def shift(self, delta):
        return DiagonalPrecision(self.diag + delta)

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

    def functional_covariance(self, model, X):
        """`(f, J Λ⁻¹ Jᵀ)` per row of `X` (see `AbstractPrecision`). For a model whose
        layers are known (see `find_layers`) the diagonal, read per layer as a matrix
        shaped like `W̃ = [W | b]`, is contracted with the layers' inputs and output
        gradients (`layer_covariance` with the identity basis), never forming `J`; for
        any other model, through `J` (`jacobian_covariance`)."""
        from ._layers import find_layers, layer_covariance, uncovered

        try:
            layers = find_layers(model, "DiagonalPrecision.functional_covariance")
        except ValueError:
            return jacobian_covariance(self, model, X)
        inv = 1.0 / self.diag
        rest = uncovered(model, layers)
        scales = tuple(inv[spec.index()] for spec in layers)
        return layer_covariance(model, X, layers, scales, rest=(rest, inv[rest]))

    def factor_update(self, add, remove, method="auto"):
        del method
        diag = self.diag + jnp.sum(add**2, axis=0) - jnp.sum(remove**2, axis=0)
        return DiagonalPrecision(diag), jnp.all(diag > 0)

    def dense_update(self, delta):
        diag = self.diag + jnp.diag(delta)
        return DiagonalPrecision(diag), jnp.all(diag > 0)

    def solve_info(self, v):
        return direct_solve_info(self, v)

    def edit_examples(self, model, add, remove, curvature="ggn"):
        return explicit_edit_examples(self, model, add, remove, curvature)

    def rebuild(self, model, data, prior_precision, curvature="ggn"):
        return DiagonalPrecision.from_data(model, data, prior_precision, curvature)


def _shape(model) -> tuple[int, int, int]:
    """`(d, c, itemsize)`: parameters, outputs per example and bytes per number."""
    from .._models._base import ravel

    theta, _ = ravel(model)
    return theta.shape[0], int(model.n_outputs), theta.dtype.itemsize


#: Per-example Jacobians of one chunk of rows may take at most this many bytes.
JACOBIAN_BUDGET = 256 * 2**20


def _leaf_sizes(model) -> tuple[int, ...]:
    """The sizes of the model's parameter arrays (the leaves of the flat `θ`)."""
    import math

    from .._models._base import ravel

    return tuple(math.prod(shape) for shape in ravel(model)[1].shapes)


#: XLA's CPU backend (JAX 0.10.2) hands a sum over at least this many numbers, with the
#: elementwise operations and products that feed it, to YNNPACK as one fused kernel
#: (`IsReduceOpOffloadedToYnn` in xla/backends/cpu/ynn_support.cc); smaller sums stay in
#: XLA's own code and buffers.
_YNN_SUM_MIN = 32 * 1024


def _fused_sums(sizes) -> int:
    """Numbers allocated outside XLA's buffers (so absent from its memory analysis) by
    the fused YNNPACK kernels of sums whose inputs have `sizes` numbers: such a kernel
    materialises its input and intermediate values itself, and glibc keeps what it
    frees resident for later allocations of the same threads.

    The factor 5/2 is measured: the peak resident memory minus XLA's temporaries and
    outputs (and minus LAPACK's workspace, for EK-FAC) over the sums' input sizes, on
    float64 MLP classifiers 64-w-w-10 on a 2-core CPU (tests/memprobe.py), is 2.3-2.4
    for EK-FAC's second pass at widths 512, 768 and 1,536 (1.4 at 2,048, 2.3-3.1 at
    1,024), 2.4-2.8 for the exact diagonal at widths 256 and 512 (2.1 and 4.1 on a
    logistic and a softmax regression with 2·10⁵ parameters), and 2.0-2.9 for the
    matrix-free preconditioner at widths 512 and 1,024. Disabling these fusions
    (`XLA_FLAGS=--xla_cpu_experimental_ynn_fusion_type=`) removed the excess of
    EK-FAC's second pass and of the matrix-free preconditioner."""
    return sum(5 * s // 2 for s in sizes if s >= _YNN_SUM_MIN)


def _chunk(model, chunk: int) -> int:
    """Rows per chunk: at most `chunk`, and few enough that the chunk's per-example
    Jacobians (`rows × c × d` numbers) fit in `JACOBIAN_BUDGET`."""
    d, c, item = _shape(model)
    return max(1, min(chunk, JACOBIAN_BUDGET // max(c * d * item, 1)))
