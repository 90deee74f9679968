"""A posterior precision that is never materialised: products by JVP/VJP, solves by CG.

`Λ = λI + Σ_data w_i ∇²ℓ_i(θ) + Σ_added w_j ∇²ℓ_j(θ) − Σ_removed w_k ∇²ℓ_k(θ)`, all at the
precision's own linearisation point `θ` (the parameters it was built at). Memory is a few
`d`-vectors, one chunk of activations, the edit buffer, and (for `logdet` and some
samples) a Lanczos basis. The data are a field of the pytree: the caller's arrays when
built eagerly (a `jit` that returns the precision returns copies of them).
"""

from __future__ import annotations

from typing import Any, ClassVar

import equinox as eqx
import jax
import jax.numpy as jnp

from .._custom_types import Array, Float, Int, PRNGKeyArray, Scalar
from .._data._dataset import Dataset
from .._models._base import Unravel, ravel
from ._factors import (
    Curvature,
    _chunked,
    data_curvature,
    data_ggn_vp,
    ggn_factors,
)
from ._precision import AbstractPrecision, Rows, SolveInfo, _chunk, _shape, jacobian_covariance
from ._solvers import cg, lanczos, tridiagonal_eigh

#: Rows per block of the edit buffer: a product skips the blocks past the last edit.
_EDIT_BLOCK = 32


class _Options(eqx.Module):
    """The static settings of a `MatrixFreePrecision` (see `from_data` for each)."""

    # Loosely typed on purpose: `__check_init__` turns a bad value into a ValueError.
    tol: float | None = None
    max_iters: int | None = None
    preconditioner: str | None = "diag"
    chunk: int = 4096
    edit_capacity: int = 256
    hutchinson_probes: int = 16
    logdet_probes: int = 30
    logdet_steps: int = 50
    sample_steps: int = 100
    variance_probes: int = 64
    exact_variance_dim: int = 512

    def __check_init__(self):
        where = "laplace(structure='matrix_free')"
        if self.preconditioner not in ("diag", "hutchinson", None):
            raise ValueError(
                f"{where}: unknown `preconditioner={self.preconditioner!r}`; use 'diag' "
                f"(exact GGN diagonal), 'hutchinson' (its stochastic estimate) or None."
            )
        if self.tol is not None and not self.tol > 0:
            raise ValueError(f"{where}: `tol` must be positive (or None); got {self.tol}.")
        for name in (
            "chunk",
            "edit_capacity",
            "hutchinson_probes",
            "logdet_probes",
            "logdet_steps",
            "sample_steps",
            "variance_probes",
        ):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{where}: `{name}` must be a positive int; got {value!r}.")
        if self.max_iters is not None and (
            not isinstance(self.max_iters, int) or self.max_iters < 1
        ):
            raise ValueError(
                f"{where}: `max_iters` must be a positive int (or None); got {self.max_iters!r}."
            )
        if not isinstance(self.exact_variance_dim, int) or self.exact_variance_dim < 0:
            raise ValueError(
                f"{where}: `exact_variance_dim` must be a non-negative int; got "
                f"{self.exact_variance_dim!r}."
            )


def _options(options: dict[str, Any]) -> _Options:
    known = set(_Options.__dataclass_fields__)
    unknown = sorted(set(options) - known)
    if unknown:
        raise ValueError(
            f"laplace(structure='matrix_free'): unknown option(s) {unknown}; the options "
            f"are {sorted(known)}."
        )
    return _Options(**options)


class MatrixFreePrecision(AbstractPrecision):
    """The posterior precision `Λ = λI + Σ_i w_i ∇²ℓ_i(θ)` as an operator, never formed.

    Built by [`laplace`][unlearnx.laplace] with `structure="matrix_free"` (options below,
    passed as keyword arguments to `laplace`). It holds the linearisation point `θ`, the
    data (a [`Dataset`][unlearnx.Dataset]; nothing per example is stored besides it), `λ`,
    the curvature kind and a buffer of edited rows. Every operation goes through
    products `Λ v`: a JVP, the output Hessian and a VJP per chunk of rows (GGN), or
    forward-over-reverse (exact Hessian), at `O(n)` time and `O(chunk)` memory each.

    - `solve` / `solve_info`: [`cg`][unlearnx.cg], preconditioned by `diag Λ_GGN`.
    - `sample`: perturb-and-solve for the GGN (`z = Σ_i U_iᵀ ε_i + √λ ε₀` with
      `U_iᵀU_i` the row's GGN, so `Cov z = Λ` and `Λ⁻¹ z ~ N(0, Λ⁻¹)`); once rows have
      been removed (no square root of `−U_iᵀU_i` exists), or for the exact Hessian,
      `Λ^{-1/2} ε` by `sample_steps` Lanczos steps.
    - `logdet`: stochastic Lanczos quadrature (Ubaru, Chen & Saad 2017), deflated by
      the Ritz pairs that converge in one `logdet_steps`-step Lanczos run, with
      `logdet_probes` Rademacher probes on the rest, fixed key: exact when
      `d ≤ logdet_steps`; otherwise the probe noise is
      `√(2/probes) · ‖offdiag log Λ‖_F` restricted to the non-deflated directions.
    - `variance`: exact (`diag Λ⁻¹` column by column) when `d ≤ exact_variance_dim`,
      otherwise the estimator `mean_k z_k ⊙ Λ⁻¹ z_k` of Bekas, Kokiopoulou & Saad
      (2007) with `variance_probes` Rademacher probes.
    - `to_dense`: `d` products with the identity's columns (small `d` only).
    - `edit_examples`: appends the rows to a fixed-capacity buffer (`edit_capacity` rows;
      shapes stay static under `jit` and across repeated edits). Added rows enter with
      weight `+w`, removed rows with `−w`, at the precision's own `θ` (not `model`'s): so
      removing rows that were added or that are in the data cancels their curvature
      exactly, whatever the current mean. Positive definiteness is checked lazily: `ok`
      only reports buffer overflow, non-finite rows and (GGN with the exact diagonal) a
      non-positive diagonal; an indefinite result shows up as a CG breakdown
      (`solve_info(...).converged` False). On overflow the caller rebuilds (as
      [`second_order`][unlearnx.second_order] does), which empties the buffer.

    Options (keyword arguments of `laplace`/`from_data`):
        tol: CG relative-residual tolerance (default `1e-10` in float64, `1e-4` in float32).
        max_iters: CG iteration cap (default `2d`, at least 10, at most 10,000).
        preconditioner: `"diag"` (default: the exact GGN diagonal plus `λ`, computed at
            build time from per-example Jacobians in chunks, and updated exactly by
            edits), `"hutchinson"` (the GGN diagonal estimated from `hutchinson_probes`
            products, fixed key: no Jacobians) or `None`. For `curvature="hessian"` the
            GGN diagonal still serves: it is positive, as CG's preconditioner must be.
        chunk: rows per chunk of the products (default 4096).
        edit_capacity: rows the edit buffer holds (default 256; above 32 rounded up to a
            multiple of 32). Only rows of non-zero weight take room.
        logdet_probes, logdet_steps: stochastic Lanczos quadrature (default 30, 50).
        sample_steps: Lanczos steps for `Λ^{-1/2} ε` when perturb-and-solve cannot be
            used (default 100; exact when `≥ d`).
        variance_probes, exact_variance_dim: the variance estimator (default 64, 512).

    Example:
        ```python
        import unlearnx as ux
        data = ux.datasets.diabetes().train
        model, _ = ux.fit(ux.models.LogisticRegression(data.n_features), data)
        post = ux.laplace(model, data, structure="matrix_free")
        x, info = post.precision.solve_info(post.theta)
        print(bool(info.converged), int(info.iterations))
        ```
    """

    structure: ClassVar[str] = "matrix_free"

    theta: Float[Array, " d"]
    data: Dataset
    prior_precision: Float[Array, ""]
    edit_X: Float[Array, "K p"]
    edit_y: Array
    edit_w: Float[Array, " K"]
    edit_count: Int[Array, ""]
    diagonal: Float[Array, " d"] | None
    unravel: Unravel = eqx.field(static=True)
    curvature: str = eqx.field(static=True)
    options: _Options = eqx.field(static=True)

    # ----------------------------------------------------------------------------------
    # Construction.

    @classmethod
    def from_data(cls, model, data, prior_precision, curvature: Curvature = "ggn", **options):
        """Build `Λ = λI + Σ_i w_i ∇²ℓ_i` at `model` over `data`; see the class
        docstring for the options. `ok` is False only for non-finite parameters, a
        non-positive `λ`, or a non-finite preconditioner."""
        opts = _options(options)
        if curvature not in ("ggn", "hessian"):
            raise ValueError(
                f"MatrixFreePrecision.from_data: unknown `curvature={curvature!r}`; use "
                f"'ggn' or 'hessian'."
            )
        theta, unravel = ravel(model)
        lam = jnp.asarray(prior_precision, theta.dtype)
        B = min(_EDIT_BLOCK, opts.edit_capacity)
        K = -(-opts.edit_capacity // B) * B
        diagonal = None
        if opts.preconditioner == "diag":
            C = data_curvature(
                theta, unravel, data, "ggn", diagonal=True, chunk=_chunk(model, opts.chunk)
            )
            diagonal = C + lam
        elif opts.preconditioner == "hutchinson":
            diagonal = _hutchinson_diagonal(theta, unravel, data, opts) + lam
        P = cls(
            theta=theta,
            data=data,
            prior_precision=lam,
            edit_X=jnp.zeros((K, data.X.shape[1]), data.X.dtype),
            edit_y=jnp.zeros((K,), data.y.dtype),
            edit_w=jnp.zeros((K,), theta.dtype),
            edit_count=jnp.array(0, jnp.int32),
            diagonal=diagonal,
            unravel=unravel,
            curvature=curvature,
            options=opts,
        )
        ok = jnp.all(jnp.isfinite(theta)) & (lam > 0)
        if diagonal is not None:
            ok = ok & jnp.all(jnp.isfinite(diagonal))
        return P, ok

    @classmethod
    def memory_estimate(cls, model, n_rows, **options):
        """Peak bytes of building the precision AND one solve with it (`solve` /
        `solve_info`: the unit of use in unlearning, a Newton step), compiled apart as
        `laplace` and then `solve` run them: the structure (`θ`, the preconditioner's
        diagonal, the copy of the data a compiled build returns, the edit buffer), plus
        the larger of the build's temporaries (one chunk of per-example gradients for
        `preconditioner="diag"`, the probes and their products for `"hutchinson"`) and
        the solve's (CG's vectors, the solution and one chunk of products).

        Not included, as the build never allocates them: `logdet` needs, besides a
        product's memory, its first Lanczos basis and the probes,
        `(logdet_steps + logdet_probes) · d` numbers, plus the probes' own bases
        (batched within 64 MiB, or one basis); a Lanczos `sample` `sample_steps · d`
        numbers per draw (batched likewise) and perturb-and-solve `n` solves side by
        side; an estimated `variance` `variance_probes` solves side by side. Check
        those against the budget separately for a large `d`."""
        from ._diagonal import diagonal_row_bytes, padded_rows_bytes, products_bytes
        from ._precision import _fused_sums, _leaf_sizes

        opts = _options(options)
        d, _, item = _shape(model)
        p = int(model.n_inputs)
        B = min(_EDIT_BLOCK, opts.edit_capacity)
        K = -(-opts.edit_capacity // B) * B
        # What the precision holds: θ, the diagonal, the data (features, labels,
        # weights) and the edit buffer.
        precond = opts.preconditioner is not None
        held = ((1 + precond) * d + (n_rows + K) * (p + 2)) * item
        rows = min(opts.chunk, n_rows)
        # One chunk of products. The peak resident memory exceeds XLA's accounting by
        # about a quarter of `products_bytes` (24-27 MB for 16-32 MB of activations,
        # widths 512-1,536, 500-4,000 rows, no preconditioner), hence 5/4.
        products = 5 * products_bytes(model, rows) // 4 + padded_rows_bytes(model, n_rows, rows)
        # The solve: CG's temporaries (XLA's memory analysis: 8.0 d-vectors besides a
        # chunk of products, MLPs of width 512-2,048), the solution, one chunk of the
        # data's products and one block of the edit buffer's.
        solve = 9 * d * item + products + products_bytes(model, B)
        build, fused = 0, 0
        if opts.preconditioner == "diag":
            # A running sum and one chunk of per-example gradients (XLA: within 5% for
            # chunks of 1, 2 and 11 rows), chunks sized for `JACOBIAN_BUDGET`.
            jrows = min(_chunk(model, opts.chunk), n_rows)
            build = d * item + jrows * diagonal_row_bytes(model)
            build += padded_rows_bytes(model, n_rows, jrows)
            # Summing the chunk's squared gradients over its rows runs as fused YNNPACK
            # kernels (see `_fused_sums`), whose memory stays resident through the
            # solve: measured, the peak of build and solve at width 1,024 (2-row chunks)
            # is the solve's plus that memory (-0.2% to +1% with it, -28% without).
            if jrows > 1:
                fused = _fused_sums([jrows * s for s in _leaf_sizes(model)]) * item
        elif opts.preconditioner == "hutchinson":
            # The probes, their products and their random bits (XLA: 3·probes·d) and one
            # chunk of products at a time; the peak resident memory is 1.3-1.4·probes·d
            # above XLA's accounting (widths 512 and 1,024, 16 probes), hence 4·probes·d.
            build = 4 * opts.hutchinson_probes * d * item + products
        return held + fused + max(build, solve)

    def rebuild(self, model, data, prior_precision, curvature="ggn"):
        options = {f: getattr(self.options, f) for f in _Options.__dataclass_fields__}
        return MatrixFreePrecision.from_data(model, data, prior_precision, curvature, **options)

    # ----------------------------------------------------------------------------------
    # Products.

    @property
    def dim(self) -> int:
        return self.theta.shape[0]

    def mv(self, v):
        return _jit_mv(self, v)

    def _mv(self, v: Float[Array, " d"]) -> Float[Array, " d"]:
        """`Λ v` for one vector (traced; no jit of its own)."""
        out = data_ggn_vp(
            self.theta, self.unravel, self.data, v, self.curvature, chunk=self.options.chunk
        )
        return out + self._edits_vp(v) + self.prior_precision * v

    def _edit_blocks(self):
        K, p = self.edit_X.shape
        B = min(_EDIT_BLOCK, K)
        starts = jnp.arange(0, K, B)
        return (
            starts,
            self.edit_X.reshape(K // B, B, p),
            self.edit_y.reshape(K // B, B),
            self.edit_w.reshape(K // B, B),
        )

    def _edits_vp(self, v):
        """`(Σ_added − Σ_removed) ∇²ℓ v`, skipping the blocks past the last edit (the
        `cond` predicate is not batched under `vmap`, so the skip survives it)."""

        def body(acc, block):
            start, X, y, w = block

            def product(_):
                return _signed_rows_vp(self.theta, self.unravel, X, y, w, v, self.curvature)

            used = start < self.edit_count
            return acc + jax.lax.cond(used, product, lambda _: jnp.zeros_like(v), None), None

        acc, _ = jax.lax.scan(body, jnp.zeros_like(v), self._edit_blocks())
        return acc

    def _preconditioner(self):
        if self.diagonal is None:
            return None
        diag = jnp.maximum(self.diagonal, self.prior_precision)
        return lambda v: v / diag

    def functional_covariance(self, model, X):
        return jacobian_covariance(self, model, X)

    def to_dense(self):
        return _jit_to_dense(self)

    # ----------------------------------------------------------------------------------
    # Solves.

    def solve(self, v):
        return _jit_solve_info(self, v)[0]

    def solve_info(self, v):
        return _jit_solve_info(self, v)

    def _solve_info(self, v):
        return cg(
            self._mv,
            v,
            preconditioner=self._preconditioner(),
            tol=self.options.tol,
            max_iters=self.options.max_iters,
        )

    def shift(self, delta):
        delta = jnp.asarray(delta, self.theta.dtype)
        diagonal = None if self.diagonal is None else self.diagonal + delta
        return eqx.tree_at(
            lambda P: (P.prior_precision, P.diagonal),
            self,
            (self.prior_precision + delta, diagonal),
            is_leaf=lambda x: x is None,
        )

    # ----------------------------------------------------------------------------------
    # Log-determinant, samples, variances.

    def logdet(self, *, key: PRNGKeyArray | None = None) -> Scalar:
        """`log det Λ` by deflated stochastic Lanczos quadrature (NaN if a Ritz value
        with weight is non-positive: `Λ` is then not positive definite). `key` defaults
        to a fixed key, so that the estimate is deterministic."""
        return _jit_logdet(self, jax.random.key(0) if key is None else key)

    def _logdet(self, key):
        """Deflated SLQ: one Lanczos run of `logdet_steps` steps from a random start
        gives the converged Ritz pairs `(θ_i, v_i)` (the extreme eigenpairs, residual
        `≤ √eps · θ_max`), which contribute `Σ log θ_i` exactly; the trace of `log Λ` on
        their orthogonal complement is estimated from `logdet_probes` projected
        Rademacher probes `z ← (I − V Vᵀ) z`, each by Gauss quadrature
        `Σ_j τ_j² log θ_j ≈ zᵀ log Λ z / zᵀz` over its own Lanczos run (Ubaru, Chen &
        Saad 2017), combined as a ratio estimator (below).
        Deflating the large eigenvalues removes most of the probe variance (Hutchinson's
        variance is `2‖offdiag log Λ‖²_F`, which the deflated directions dominate), and
        for `d ≤ logdet_steps` the result is exact up to rounding."""
        d = self.dim
        dtype = self.theta.dtype
        steps = min(self.options.logdet_steps, d)
        k_start, k_probes = jax.random.split(key)

        def quadrature(alphas, betas):
            ritz, S = tridiagonal_eigh(alphas, betas)
            tau2 = S[0] ** 2
            weighted = tau2 > 0
            bad = jnp.any(weighted & (ritz <= 0))
            logs = jnp.log(jnp.where(weighted & (ritz > 0), ritz, 1.0))
            return jnp.where(bad, jnp.nan, jnp.sum(tau2 * logs))

        alphas, betas, Q = lanczos(self._mv, jax.random.normal(k_start, (d,), dtype), steps)
        ritz, S = tridiagonal_eigh(alphas, betas)
        residual = jnp.abs(betas[-1] * S[-1])
        converged = residual <= jnp.sqrt(jnp.finfo(dtype).eps) * jnp.max(jnp.abs(ritz))
        V = jnp.where(converged[:, None], (Q.T @ S).T, 0.0)
        bad = jnp.any(converged & (ritz <= 0))
        deflated = jnp.sum(jnp.log(jnp.where(converged & (ritz > 0), ritz, 1.0)))

        def one(z):
            z = z - V.T @ (V @ z)
            z = z - V.T @ (V @ z)
            alphas, betas, _ = lanczos(self._mv, z, steps)
            return jnp.vdot(z, z), quadrature(alphas, betas)

        Z = jax.random.rademacher(k_probes, (self.options.logdet_probes, d), dtype)
        batch = _batch_size(steps * d * Z.dtype.itemsize, Z.shape[0])
        weights, means = jax.lax.map(one, Z, batch_size=batch)
        # The ratio estimator `tr P · Σ zᵀ log Λ z / Σ zᵀz` over the projected probes: exact
        # when log Λ is constant on the complement (e.g. `λ` on the null space of the
        # GGN, which Lanczos from one start sees only once), and then unlike the plain
        # mean it carries no noise from the probes' lengths.
        rank = jnp.sum(V**2)  # the number of deflated directions
        total = jnp.sum(weights)
        rest = jnp.where(total > 0, (d - rank) * jnp.sum(weights * means) / total, 0.0)
        return jnp.where(bad, jnp.nan, deflated + rest)

    def sample(self, key, n):
        return _jit_sample(self, key, n)

    def _sample(self, key, n):
        if self.curvature == "hessian":
            return self._lanczos_sample(key, n)
        removed = jnp.any(self.edit_w < 0)
        return jax.lax.cond(
            removed, lambda k: self._lanczos_sample(k, n), lambda k: self._perturb_sample(k, n), key
        )

    def _perturb_sample(self, key, n):
        """Perturb-and-solve: `z = Σ_i U_iᵀ ε_i + √λ ε₀` has `Cov z = Λ` (no removed
        rows), so `Λ⁻¹ z ~ N(0, Λ⁻¹)`."""
        k_data, k_edit, k_prior = jax.random.split(key, 3)
        chunk = min(self.options.chunk, self.data.n)
        Xs, _, ws = _chunked(self.data.X, self.data.y, self.data.weights, chunk)
        d = self.dim
        dtype = self.theta.dtype

        def data_body(acc, block):
            i, X, w = block
            return acc + self._rows_noise(jax.random.fold_in(k_data, i), X, w, n), None

        idx = jnp.arange(Xs.shape[0])
        z, _ = jax.lax.scan(data_body, jnp.zeros((n, d), dtype), (idx, Xs, ws))

        def edit_body(acc, block):
            start, X, _, w = block
            noise = lambda _: self._rows_noise(  # noqa: E731
                jax.random.fold_in(k_edit, start), X, jnp.maximum(w, 0.0), n
            )
            zero = lambda _: jnp.zeros((n, d), dtype)  # noqa: E731
            return acc + jax.lax.cond(start < self.edit_count, noise, zero, None), None

        z, _ = jax.lax.scan(edit_body, z, self._edit_blocks())
        lam = jnp.maximum(self.prior_precision, 0.0)
        z = z + jnp.sqrt(lam) * jax.random.normal(k_prior, (n, d), dtype)
        return self._solve_info(z.T)[0].T

    def _rows_noise(self, key, X, w, n):
        """`n` draws of `Σ_rows U_iᵀ ε_i` (`U_iᵀU_i = w_i J_iᵀ H_i J_i`): one batched
        VJP with cotangents `√w_i B_i ε_i`, `B_i B_iᵀ = H_i`."""
        theta, unravel = self.theta, self.unravel

        def outputs(t):
            return jax.vmap(lambda x: unravel(t)(x))(X)

        F, vjp = jax.vjp(outputs, theta)
        B = jax.vmap(unravel(theta).likelihood.hessian_sqrt)(F)  # (k, c, c)
        eps = jax.random.normal(key, (n,) + F.shape, F.dtype)
        cot = jnp.sqrt(jnp.maximum(w, 0.0))[None, :, None] * jnp.einsum("kij,nkj->nki", B, eps)
        return jax.vmap(lambda c: vjp(c)[0])(cot)

    def _lanczos_sample(self, key, n):
        """`Λ^{-1/2} ε` with `ε ~ N(0, I)`, by Lanczos: `‖ε‖ Q S θ^{-1/2} Sᵀ e₁`."""
        d = self.dim
        steps = min(self.options.sample_steps, d)
        E = jax.random.normal(key, (n, d), self.theta.dtype)

        def one(eps):
            alphas, betas, Q = lanczos(self._mv, eps, steps)
            ritz, S = tridiagonal_eigh(alphas, betas)
            floor = jnp.finfo(ritz.dtype).eps * jnp.max(jnp.abs(ritz))
            f = S @ (S[0] / jnp.sqrt(jnp.maximum(ritz, floor)))
            return jnp.linalg.norm(eps) * (Q.T @ f)

        return jax.lax.map(one, E, batch_size=_batch_size(steps * d * E.dtype.itemsize, n))

    def variance(self, *, key: PRNGKeyArray | None = None):
        """`diag Λ⁻¹`: exact for `d ≤ exact_variance_dim`, otherwise the Rademacher
        estimate `mean_k z_k ⊙ Λ⁻¹ z_k` (`key` defaults to a fixed key)."""
        return _jit_variance(self, jax.random.key(0) if key is None else key)

    def _variance(self, key):
        d = self.dim
        dtype = self.theta.dtype
        if d <= self.options.exact_variance_dim:
            return jnp.diag(self._solve_info(jnp.eye(d, dtype=dtype))[0])
        Z = jax.random.rademacher(key, (d, self.options.variance_probes), dtype)
        return jnp.mean(Z * self._solve_info(Z)[0], axis=1)

    # ----------------------------------------------------------------------------------
    # Edits.

    def edit_examples(self, model, add: Rows | None, remove: Rows | None, curvature="ggn"):
        if curvature != self.curvature:
            raise ValueError(
                f"MatrixFreePrecision.edit_examples: `curvature={curvature!r}` but this "
                f"precision was built with curvature={self.curvature!r}; pass the same kind "
                f"(the posterior's `curvature`)."
            )
        d = ravel(model)[0].shape[0]
        if d != self.dim:
            raise ValueError(
                f"MatrixFreePrecision.edit_examples: `model` has {d} parameters but this "
                f"precision has {self.dim}; pass the posterior's model."
            )
        parts = [(r, 1.0) for r in (add,) if r is not None]
        parts += [(r, -1.0) for r in (remove,) if r is not None]
        if not parts:
            return self, jnp.array(True)
        X = jnp.concatenate([r[0].astype(self.edit_X.dtype) for r, _ in parts])
        y = jnp.concatenate([r[1].astype(self.edit_y.dtype) for r, _ in parts])
        w = jnp.concatenate([s * jnp.maximum(r[2].astype(self.theta.dtype), 0.0) for r, s in parts])
        K = self.edit_w.shape[0]
        nonzero = w != 0
        position = self.edit_count + jnp.cumsum(nonzero) - 1
        index = jnp.where(nonzero, position, K)  # out of range: dropped
        count = self.edit_count + jnp.sum(nonzero, dtype=jnp.int32)
        new = eqx.tree_at(
            lambda P: (P.edit_X, P.edit_y, P.edit_w, P.edit_count),
            self,
            (
                self.edit_X.at[index].set(X, mode="drop"),
                self.edit_y.at[index].set(y, mode="drop"),
                self.edit_w.at[index].set(w, mode="drop"),
                count,
            ),
        )
        ok = (count <= K) & jnp.all(jnp.isfinite(X)) & jnp.all(jnp.isfinite(w))
        if self.diagonal is not None:
            # The preconditioner follows exactly: ± the rows' GGN diagonals.
            U = ggn_factors(self.theta, self.unravel, X, y, jnp.abs(w))
            diagonal = self.diagonal + jnp.einsum("k,kcd->d", jnp.sign(w), U**2)
            new = eqx.tree_at(lambda P: P.diagonal, new, diagonal)
            if self.curvature == "ggn" and self.options.preconditioner == "diag":
                ok = ok & jnp.all(diagonal > 0)
        return new, ok


def _signed_rows_vp(theta, unravel, X, y, w, v, kind: Curvature) -> Float[Array, " d"]:
    """`(Σ_rows w ∇²ℓ) v` for signed weights (`+w` added rows, `−w` removed ones), in one
    pass: `rows_ggn_vp` of `_factors.py` drops non-positive weights, and two calls would
    trace the model twice."""
    if kind == "hessian":

        def g(t):
            model = unravel(t)
            return jnp.sum(jnp.where(w != 0, w * jax.vmap(model.loss)(X, y), 0.0))

        return jax.jvp(jax.grad(g), (theta,), (v,))[1]

    def outputs(t):
        return jax.vmap(lambda x: unravel(t)(x))(X)

    F, Jv = jax.jvp(outputs, (theta,), (v,))
    lik = unravel(theta).likelihood

    def out_hvp(f, jv, wi):
        B = lik.hessian_sqrt(f)
        return wi * (B @ (B.T @ jv))

    _, vjp = jax.vjp(outputs, theta)
    return vjp(jax.vmap(out_hvp)(F, Jv, w))[0]


#: Lanczos runs (logdet probes, samples) are batched so that their bases take at most this.
_KRYLOV_BUDGET = 64 * 2**20


def _batch_size(bytes_per_run: int, runs: int) -> int:
    """How many Lanczos runs to batch under `vmap` within `_KRYLOV_BUDGET`."""
    return max(1, min(runs, _KRYLOV_BUDGET // max(bytes_per_run, 1)))


def _hutchinson_diagonal(theta, unravel, data, opts: _Options) -> Float[Array, " d"]:
    """`E[z ⊙ C z]` over `hutchinson_probes` Rademacher probes (fixed key), clipped at 0:
    the GGN diagonal without per-example Jacobians."""
    d = theta.shape[0]
    Z = jax.random.rademacher(jax.random.key(0), (opts.hutchinson_probes, d), theta.dtype)
    # One probe at a time: a batch of probes would multiply the chunk's activations.
    CZ = jax.lax.map(lambda z: data_ggn_vp(theta, unravel, data, z, "ggn", chunk=opts.chunk), Z)
    return jnp.maximum(jnp.mean(Z * CZ, axis=0), 0.0)


# Each operation is compiled once per structure and shape (a Python-level call would
# otherwise retrace its while loops every time); under an outer `jit` they inline.


@eqx.filter_jit
def _jit_mv(P: MatrixFreePrecision, v):
    if v.ndim == 1:
        return P._mv(v)
    return jax.vmap(P._mv, in_axes=1, out_axes=1)(v)


@eqx.filter_jit
def _jit_to_dense(P: MatrixFreePrecision):
    eye = jnp.eye(P.dim, dtype=P.theta.dtype)
    return jax.vmap(P._mv)(eye).T


@eqx.filter_jit
def _jit_solve_info(P: MatrixFreePrecision, v) -> tuple[Array, SolveInfo]:
    return P._solve_info(v)


@eqx.filter_jit
def _jit_logdet(P: MatrixFreePrecision, key):
    return P._logdet(key)


@eqx.filter_jit
def _jit_sample(P: MatrixFreePrecision, key, n: int):
    return P._sample(key, n)


@eqx.filter_jit
def _jit_variance(P: MatrixFreePrecision, key):
    return P._variance(key)
