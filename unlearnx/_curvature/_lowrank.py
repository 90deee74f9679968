"""Low rank plus diagonal precision: the top GGN eigenpairs by Lanczos, and a diagonal.

`Λ ≈ D + V diag(s) Vᵀ`: `(s, V)` are the `rank` largest eigenpairs of the data GGN
`C = Σ_i w_i J_iᵀ B_i B_iᵀ J_i`, found by Lanczos with full reorthogonalisation on the
matrix-free product `data_ggn_vp`, and `D = λ + max(diag C − diag(V diag(s) Vᵀ), 0)` puts
back on the diagonal the curvature the low-rank part misses. The diagonal of `Λ` is thus
exact, `diag C + λ`, unless the low-rank part overshoots an entry (it cannot when
`rank = d`; then `D = λ` and `Λ = C + λI` exactly). Adding the residual diagonal instead
of `λ` alone ("low rank plus diagonal") keeps the marginal variances of the directions
Lanczos did not reach close to the diagonal Laplace ones rather than to the prior's.

**Storage: whitened eigen-form.** The structure keeps
`Λ = D^{1/2} (I + Q diag(μ) Qᵀ) D^{1/2}` with `Q` a `d × K` matrix of orthonormal
columns, `K = rank + slots` (the slots no edit has used yet are zero columns with
`μ = 0`). Every operation follows in `O(d K)`: by Woodbury, the capacitance matrix of
`I + Q M Qᵀ` in its own eigenbasis is the diagonal `I + M`, so
`Λ⁻¹ = D^{-1/2} (I − Q diag(μ / (1 + μ)) Qᵀ) D^{-1/2}`, `log det Λ = Σ log D + Σ log(1 + μ)`
(the matrix determinant lemma), exact samples are `D^{-1/2} (I + Q diag((1 + μ)^{-1/2} − 1)
Qᵀ) ε`, and `Λ` is positive definite iff every `1 + μ > 0` (Sylvester's law of inertia:
the capacitance's "Cholesky factor" is `√(1 + μ)`, which exists iff that holds).

**Edits are exact and reversible**: `Λ' = Λ + UₐᵀUₐ − UᵣᵀUᵣ` with the per-example GGN
factors `U` (evaluated at the model given), kept in the low-rank part with signs `±1`:
the whitened columns `[Q, D^{-1/2}Uₐᵀ, D^{-1/2}Uᵣᵀ]` are QR-factorised and the small
signed core `R diag(μ, +1, −1) Rᵀ` is eigendecomposed (`O(d (K + m)²)`), which gives
`Λ'` in the same form with no approximation. `D` never changes. To keep the shapes
static under `jit` across repeated edits, the result is **re-compressed** to `K`
columns, dropping the eigenpairs with the smallest `|μ|`: exact while the low-rank part
has rank at most `K`, that is while the edited rows add at most `slots` directions
(`c` per row for `c` outputs) beyond `rank`; past that, the dropped directions are those
closest to `D` (the best rank-`K` approximation in the `D`-whitened metric). The default
`slots = 16·c` holds one deletion request of up to 16 rows (the bucket a request of 9-16
rows is padded to, see `bucket_size`). Removing rows that were added restores the
original to rounding. `ok` is decided on the full spectrum, before truncation, and
truncation cannot break positive definiteness.
"""

from __future__ import annotations

from typing import ClassVar

import equinox as eqx
import jax
import jax.numpy as jnp

from .._custom_types import Array, Bool, Float, PRNGKeyArray
from ._diagonal import (
    diagonal_chunk,
    diagonal_row_bytes,
    exact_ggn_diagonal,
    padded_rows_bytes,
    products_bytes,
)
from ._factors import data_ggn_vp, ggn_factors
from ._lanczos import default_iterations, lanczos
from ._precision import AbstractPrecision, direct_solve_info, jacobian_covariance


def _check_curvature(curvature, where):
    if curvature == "hessian":
        raise ValueError(
            f"{where}: `curvature='hessian'` is not supported by structure='lowrank' (per-example "
            "Hessians have no low-rank factors to add or remove); use curvature='ggn', or "
            "structure='full' or 'diag' for the exact Hessian."
        )
    if curvature != "ggn":
        raise ValueError(f"{where}: unknown `curvature={curvature!r}`; use 'ggn'.")


#: Rows per unlearning request that the default `slots` keeps exact: the bucket that a
#: request of 9-16 rows is padded to (`bucket_size`), each row adding `c` directions.
SLOT_ROWS = 16


def default_slots(model) -> int:
    """`16·c` for a model with `c` outputs: the directions that deleting one request of
    up to 16 rows adds to the low-rank part."""
    return SLOT_ROWS * int(model.n_outputs)


def _sizes(d, rank, slots, iterations, where):
    """Validated `(k, K, m)`: rank (clipped to `d`), capacity and Lanczos steps."""
    if not (isinstance(rank, int) and rank >= 1):
        raise ValueError(f"{where}: `rank` must be a positive int; got {rank!r}.")
    if not (isinstance(slots, int) and slots >= 0):
        raise ValueError(f"{where}: `slots` must be an int ≥ 0; got {slots!r}.")
    k = min(rank, d)
    m = default_iterations(d, k) if iterations is None else iterations
    if not (isinstance(m, int) and k <= m <= d):
        raise ValueError(
            f"{where}: `iterations` must be an int between rank = {k} and d = {d}; got "
            f"{iterations!r}. Pass iterations=None for the default min(d, 2·rank + 20)."
        )
    return k, min(k + slots, d), m


def _compress(W: Float[Array, "d n"], signs: Float[Array, " n"], K: int):
    """`I + W diag(signs) Wᵀ = I + Q diag(μ) Qᵀ` with `Q` orthonormal (`d × K`), keeping
    the `K` eigenpairs of largest `|μ|`, and whether the untruncated matrix is positive
    definite. Requires `K ≤ min(d, n)`."""
    Q, R = jnp.linalg.qr(W)  # reduced: Q (d, min(d, n))
    core = (R * signs) @ R.T
    mu, E = jnp.linalg.eigh(0.5 * (core + core.T))
    ok = jnp.all(1.0 + mu > 0) & jnp.all(jnp.isfinite(mu))
    keep = jnp.argsort(-jnp.abs(mu))[:K]
    return Q @ E[:, keep], mu[keep], ok


def _col(x, v):
    """`x` shaped to broadcast against `v`'s leading axis (a vector or columns)."""
    return x.reshape((-1,) + (1,) * (v.ndim - 1))


class LowRankPrecision(AbstractPrecision):
    """Low rank plus diagonal: `Λ ≈ D + V diag(s) Vᵀ`, the top-`rank` GGN eigenpairs by
    Lanczos and the residual diagonal (see the module docstring), with exact edits.

    Stored as `Λ = D^{1/2} (I + Q diag(μ) Qᵀ) D^{1/2}` (`Q` orthonormal, `d × K`,
    `K = rank + slots`); products, solves (Woodbury), log-determinants (determinant
    lemma), exact samples and marginal variances all cost `O(d K)`. Added and removed
    rows join the low-rank part exactly, with signs; the result is re-compressed to `K`
    columns so that shapes stay static (exact while the edits add at most `slots`
    directions beyond `rank`).

    Attributes:
        diag: `D`, the prior precision plus the residual GGN diagonal.
        basis: `Q`, orthonormal columns in the `D`-whitened coordinates (zero
            columns, with `μ = 0`, for the slots that no edit has used yet).
        eigvals: `μ`, the whitened eigenvalues (`Λ` is positive definite iff all > −1).
        rank: the number of Lanczos eigenpairs (static).
        slots: the extra columns kept for edits (static; by default `16·c` for `c`
            outputs, one deletion request of up to 16 rows).
        iterations: the Lanczos steps (static).
        chunk: rows per chunk of the data passes (static).

    Example:
        ```python
        import jax, unlearnx as ux
        data, _ = ux.datasets.synthetic_glm(jax.random.key(0), n=100, d=5)
        model = ux.models.LogisticRegression(5)
        post = ux.laplace(model, data, structure="lowrank", rank=3)
        print(post.precision.logdet(), post.precision.variance()[:3])
        ```
    """

    structure: ClassVar[str] = "lowrank"
    diag: Float[Array, " d"]
    basis: Float[Array, "d K"]
    eigvals: Float[Array, " K"]
    rank: int = eqx.field(static=True)
    slots: int = eqx.field(static=True)
    iterations: int = eqx.field(static=True)
    chunk: int = eqx.field(static=True, default=4096)

    @classmethod
    def from_data(
        cls,
        model,
        data,
        prior_precision,
        curvature="ggn",
        *,
        rank: int = 20,
        slots: int | None = None,
        key: PRNGKeyArray | None = None,
        iterations: int | None = None,
        chunk: int = 4096,
    ) -> tuple[LowRankPrecision, Bool[Array, ""]]:
        """Build `Λ ≈ D + V diag(s) Vᵀ` from the rows of `data` at `model`.

        Args:
            model: the model at the posterior mean.
            data: the rows (weight-0 rows contribute nothing).
            prior_precision: `λ`.
            curvature: `"ggn"` only.
            rank: the number of top GGN eigenpairs (at most `d`).
            slots: extra low-rank columns kept for exact edits (`K = rank + slots`,
                at most `d`). Each edited row adds `c` directions (one per output of
                the model); past `slots` of them an edit is truncated to the `K`
                dominant ones and is no longer exact. Default `16·c`: deleting one
                request of up to 16 rows (the bucket that a request of 9-16 rows is
                padded to) stays exact; a request that also adds rows (e.g. relabelling
                16 rows, `32·c` directions) needs more.
            key: PRNG key for the Lanczos starting vector (default `jax.random.key(0)`;
                with enough iterations the result does not depend on it).
            iterations: Lanczos steps (default `min(d, 2·rank + 20)`; `d` is exact).
            chunk: rows per chunk of the matrix-free products and the diagonal.

        Returns:
            `(precision, ok)`, `ok` False if it is not positive definite.
        """
        from .._models._base import ravel

        where = "LowRankPrecision.from_data (laplace(structure='lowrank'))"
        _check_curvature(curvature, where)
        theta, unravel = ravel(model)
        d, dtype = theta.shape[0], theta.dtype
        slots = default_slots(model) if slots is None else slots
        k, K, m = _sizes(d, rank, slots, iterations, where)
        key = jax.random.key(0) if key is None else key

        def matvec(v):
            return data_ggn_vp(theta, unravel, data, v, "ggn", chunk=chunk)

        s, V = lanczos(matvec, d, k, key, dtype, m)
        s = jnp.maximum(s, 0.0)  # the GGN is positive semi-definite
        residual = exact_ggn_diagonal(theta, unravel, data, chunk=chunk) - (V**2) @ s
        D = jnp.asarray(prior_precision, dtype) + jnp.maximum(residual, 0.0)
        Z = V * jnp.sqrt(s) / jnp.sqrt(D)[:, None]
        Q, mu, ok = _compress(Z, jnp.ones((k,), dtype), k)
        # The `slots` start empty: zero columns with `μ = 0`, which change nothing. (A
        # QR of `Z` padded with them costs `O(d K²)`: 12 s against 0.3 s for `K` = 165
        # against 37 columns at d = 301,066 on a 2-core CPU.)
        Q = jnp.concatenate([Q, jnp.zeros((d, K - k), dtype)], axis=1)
        mu = jnp.concatenate([mu, jnp.zeros((K - k,), dtype)])
        new = cls(D, Q, mu, k, K - k, m, chunk)
        return new, ok & jnp.all(D > 0)

    @classmethod
    def memory_estimate(
        cls, model, n_rows, *, rank=20, slots=None, key=None, iterations=None, chunk=4096
    ) -> int:
        from .._models._base import ravel

        del key
        slots = default_slots(model) if slots is None else slots
        theta, _ = ravel(model)
        d, item = theta.shape[0], theta.dtype.itemsize
        k, K, m = _sizes(
            d, rank, slots, iterations, "LowRankPrecision (laplace(structure='lowrank'))"
        )
        # Measured against XLA's memory analysis (temporaries plus outputs) of the jitted
        # build; the phases run one after the other, the output counted as held
        # throughout, an upper bound. Against the peak resident memory (tests/memprobe.py;
        # MLPs 64-w-w-10, d = 3·10⁵-1.1·10⁶, ranks 2-50, 8-160 slots, 50-2,000 rows):
        # -4% to +53%, the excess where XLA does not keep the structure alive through
        # the Lanczos phase (rank 5 with 32 slots; 160 slots, the default for 10 classes).
        structure = (d * (K + 1) + K) * item
        # Lanczos: the basis, the Ritz vectors, a few vectors and a chunk of products.
        lanczos_tmp = ((m + 1 + k + 6) * d + 3 * m * m) * item
        rows = min(chunk, n_rows)
        products = products_bytes(model, rows)
        padded = padded_rows_bytes(model, n_rows, rows)
        # The exact diagonal: one chunk's per-example gradients and forward passes.
        rows = min(diagonal_chunk(d, item, chunk), n_rows)
        diag_tmp = rows * diagonal_row_bytes(model)
        # Each phase pads the data to whole chunks: two copies when both must pad.
        padded += padded_rows_bytes(model, n_rows, rows)
        # The whitening and compression: `Z` and its QR factor (`d × rank` each).
        compress = 2 * d * k * item
        phases = max(lanczos_tmp + products, diag_tmp + k * d * item, compress)
        return structure + padded + phases

    # ----------------------------------------------------------------------------------

    @property
    def dim(self) -> int:
        return self.diag.shape[0]

    @property
    def capacity(self) -> int:
        """`K = rank + slots`, the columns of the low-rank part."""
        return self.basis.shape[1]

    def _new(self, basis, eigvals, diag=None):
        diag = self.diag if diag is None else diag
        return LowRankPrecision(
            diag, basis, eigvals, self.rank, self.slots, self.iterations, self.chunk
        )

    def mv(self, v):
        r = jnp.sqrt(self.diag)
        x = _col(r, v) * v
        return _col(r, v) * (x + self.basis @ (_col(self.eigvals, x) * (self.basis.T @ x)))

    def solve(self, v):
        r = jnp.sqrt(self.diag)
        x = v / _col(r, v)
        g = self.eigvals / (1.0 + self.eigvals)
        return (x - self.basis @ (_col(g, x) * (self.basis.T @ x))) / _col(r, v)

    def logdet(self):
        return jnp.sum(jnp.log(self.diag)) + jnp.sum(jnp.log1p(self.eigvals))

    def sample(self, key, n):
        eps = jax.random.normal(key, (self.dim, n), self.diag.dtype)
        g = jax.lax.rsqrt(1.0 + self.eigvals) - 1.0
        x = eps + self.basis @ (g[:, None] * (self.basis.T @ eps))
        return (x / jnp.sqrt(self.diag)[:, None]).T

    def variance(self):
        g = self.eigvals / (1.0 + self.eigvals)
        return (1.0 - (self.basis**2) @ g) / self.diag

    def functional_covariance(self, model, X):
        return jacobian_covariance(self, model, X)

    def to_dense(self):
        W = self.basis * jnp.sqrt(self.diag)[:, None]
        return jnp.diag(self.diag) + (W * self.eigvals) @ W.T

    def solve_info(self, v):
        return direct_solve_info(self, v)

    def shift(self, delta):
        diag = self.diag + delta
        W = self.basis * jnp.sqrt(self.diag / diag)[:, None]
        basis, eigvals, _ = _compress(W, self.eigvals, self.capacity)
        return self._new(basis, eigvals, diag)

    def factor_update(
        self, add: Float[Array, "ma d"], remove: Float[Array, "mr d"]
    ) -> tuple[LowRankPrecision, Bool[Array, ""]]:
        """`Λ + addᵀ add − removeᵀ remove`, exactly, re-compressed to `K` columns (see
        the class docstring): `(precision, ok)`, `ok` False if not positive definite."""
        dtype = self.diag.dtype
        inv = jax.lax.rsqrt(self.diag)
        W = jnp.concatenate([self.basis, (add * inv).T, (remove * inv).T], axis=1)
        signs = jnp.concatenate(
            [
                self.eigvals,
                jnp.ones((add.shape[0],), dtype),
                -jnp.ones((remove.shape[0],), dtype),
            ]
        )
        basis, eigvals, ok = _compress(W, signs, self.capacity)
        return self._new(basis, eigvals), ok

    def edit_examples(self, model, add, remove, curvature="ggn"):
        from .._models._base import ravel

        _check_curvature(curvature, "LowRankPrecision.edit_examples")
        theta, unravel = ravel(model)
        d = theta.shape[0]

        def factors(rows):
            if rows is None:
                return jnp.zeros((0, d), theta.dtype)
            return ggn_factors(theta, unravel, *rows).reshape(-1, d)

        return self.factor_update(factors(add), factors(remove))

    def rebuild(self, model, data, prior_precision, curvature="ggn"):
        """Recompute from all rows of `data` with the same `rank`, `slots`, `iterations`
        and `chunk`, from the default Lanczos key."""
        return LowRankPrecision.from_data(
            model,
            data,
            prior_precision,
            curvature,
            rank=self.rank,
            slots=self.slots,
            iterations=self.iterations,
            chunk=self.chunk,
        )
