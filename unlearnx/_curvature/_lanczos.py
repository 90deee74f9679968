"""Lanczos with full reorthogonalisation: the top eigenpairs of a symmetric operator.

Written here rather than taken from a library: neither jax.scipy, lineax nor optimistix
offers a symmetric eigensolver for a matrix-free operator, and scipy's ARPACK
(`scipy.sparse.linalg.eigsh`) cannot run under `jit`. Each step is one product `A v`
plus two classical Gram-Schmidt passes against every earlier Lanczos vector ("twice is
enough"), which keeps the basis orthogonal to working precision, so no spurious copies
of converged eigenvalues appear (the failure of plain Lanczos). Cost: `m` products and
`O(m² d)` flops; memory `(m + 1) × d` numbers for the basis.

When the Krylov space becomes invariant (`β_j ≈ 0`: the operator has rank below `m`,
or `m = d`), the iteration restarts from a fresh random vector orthogonal to the basis
and records `β_j = 0`; the tridiagonal matrix then splits into blocks and the Ritz
values stay exact (zero eigenvalues of a rank-deficient GGN come out as zeros).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from .._custom_types import Array, Float, PRNGKeyArray


def default_iterations(d: int, k: int) -> int:
    """`min(d, 2k + 20)` Lanczos steps for `k` eigenpairs."""
    return min(d, 2 * k + 20)


def lanczos(
    matvec, d: int, k: int, key: PRNGKeyArray, dtype, iterations: int | None = None
) -> tuple[Float[Array, " k"], Float[Array, "d k"]]:
    """The `k` algebraically largest eigenpairs of a symmetric `d × d` operator.

    Args:
        matvec: `v ↦ A v` for a vector of length `d` (jit-traceable).
        d: the dimension.
        k: the number of eigenpairs, `1 ≤ k ≤ d`.
        key: PRNG key for the starting vector (and for restarts after a breakdown).
        dtype: the floating dtype of the vectors.
        iterations: Lanczos steps `m`, `k ≤ m ≤ d` (default `min(d, 2k + 20)`). With
            `m = d` the result is exact up to rounding; with fewer, the extreme eigenpairs
            converge first, at a rate set by the gaps in the spectrum.

    Returns:
        `(eigenvalues, eigenvectors)`: eigenvalues of shape `(k,)` in decreasing order,
        orthonormal Ritz vectors as the columns of a `(d, k)` matrix.

    Example:
        ```python
        import jax, jax.numpy as jnp, unlearnx as ux
        A = jnp.diag(jnp.arange(1.0, 11.0))
        vals, vecs = ux.lanczos(lambda v: A @ v, 10, 3, jax.random.key(0), A.dtype)
        print(vals)  # ≈ [10. 9. 8.]
        ```
    """
    m = default_iterations(d, k) if iterations is None else iterations
    if not (isinstance(k, int) and 1 <= k <= d):
        raise ValueError(f"lanczos: `k` must be an int with 1 ≤ k ≤ d = {d}; got {k!r}.")
    if not (isinstance(m, int) and k <= m <= d):
        raise ValueError(
            f"lanczos: `iterations` must be an int between k = {k} and d = {d}; got {m!r}. "
            "Pass iterations=None for the default min(d, 2k + 20)."
        )
    eps = jnp.finfo(dtype).eps

    def orthogonalise(w, V):
        # Rows of V not yet filled are zero and contribute nothing.
        w = w - (V @ w) @ V
        return w - (V @ w) @ V

    def unit(w):
        return w / jnp.maximum(jnp.linalg.norm(w), jnp.finfo(dtype).tiny)

    V = jnp.zeros((m + 1, d), dtype).at[0].set(unit(jax.random.normal(key, (d,), dtype)))

    def step(j, carry):
        V, alpha, beta, scale = carry
        w = matvec(V[j])
        scale = jnp.maximum(scale, jnp.linalg.norm(w))
        # α_j = v_jᵀ A v_j is the first Gram-Schmidt coefficient on v_j. (Computing it as
        # a separate `dot` with `V[j]` made XLA copy the whole basis: 2× the memory.)
        h = V @ w
        a = h[j]
        w = w - h @ V
        w = w - (V @ w) @ V
        b = jnp.linalg.norm(w)
        breakdown = b <= jnp.sqrt(d) * eps * scale

        def restart(_):
            r = jax.random.normal(jax.random.fold_in(key, j + 1), (d,), dtype)
            return unit(orthogonalise(unit(r), V)), jnp.zeros((), dtype)

        def proceed(_):
            return w / b, b

        v_next, b = jax.lax.cond(breakdown, restart, proceed, None)
        V = V.at[j + 1].set(v_next)
        return V, alpha.at[j].set(a), beta.at[j].set(b), scale

    zeros = jnp.zeros((m,), dtype)
    V, alpha, beta, _ = jax.lax.fori_loop(0, m, step, (V, zeros, zeros, jnp.zeros((), dtype)))
    off = beta[:-1]
    T = jnp.diag(alpha) + jnp.diag(off, 1) + jnp.diag(off, -1)
    ritz, S = jnp.linalg.eigh(T)  # increasing
    top = jnp.arange(m - 1, m - 1 - k, -1)
    # `Vᵀ [S; 0]` rather than `V[:m]ᵀ S`: the slice would copy the basis.
    Y = jnp.concatenate([S[:, top], jnp.zeros((1, k), dtype)])
    return ritz[top], V.T @ Y
