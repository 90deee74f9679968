"""Iterative solvers for symmetric positive-definite operators given as matvec functions.

`cg` (preconditioned, damped conjugate gradients) is what the matrix-free precision uses
for every solve; `lissa` (the stochastic Neumann-series estimator of Agarwal, Bullins &
Hazan 2017, as used for influence functions by Koh & Liang 2017) is here for
completeness and comparison; `default_damping` is the damping rule; `lanczos` is the
tridiagonalisation behind stochastic Lanczos quadrature and Krylov sampling.

Every solver returns `(x, SolveInfo)` and never returns NaN for finite input: a breakdown
(`pᵀAp ≤ 0`, a non-finite product) or a divergence stops the iteration, keeps the last
finite iterate, and reports `converged=False` with the true relative residual.

Why CG is written here rather than taken from `lineax.CG` (measured with lineax 0.1.1 and
JAX 0.10.2 on CPU): on `A = D Q diag(eig) Qᵀ D`, `d = 200`, float32, `eig` log-spaced over
ranges from `[0.1, 10]` to `[0.01, 1000]`, the scaling `D` over `[1, 1]` to `[0.01, 100]`
(condition numbers 1e2 … 2e10), `rtol` 1e-4 and 1e-5, with and without a Jacobi
preconditioner, 2 seeds (48 solves, at most 4,000 steps): `lineax.CG` returned NaN in 26
of them (already at condition number 100 with `rtol = 1e-5`, a tolerance near the float32
floor that this `cg` meets in about 60 steps), a solution with relative residual
3.6e18 in 2, hit `max_steps` with a finite solution in 16, and succeeded in 4. This `cg`
returned a finite solution in all 48 and reported `converged` in 13, each with a true
residual ≤ `tol`; where lineax hit `max_steps` it ended with the smaller residual in 14 of
16 (e.g. 1.4e-4 against 3.8e-3 at condition number 6e5). In float64 (condition numbers
6e5 and 4e6, `rtol = 1e-12`) lineax stopped at 20,000 steps, 1.6e-6 and 1.2e-10 away from
`numpy.linalg.solve`; this `cg` stopped after 3,080 and 6,260 steps, 4e-13 and 2e-13 away.
`tests/test_solvers.py` checks this `cg`'s half of the comparison.
The differences: breakdown checks on every step (`pᵀAp ≤ 0`, `rᵀM⁻¹r ≤ 0`, non-finite
values stop the iteration and keep the last finite iterate), and the true residual
`b − A x` is recomputed from scratch whenever the recursive one claims convergence, with
restarts from it while that still halves it (residual replacement).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp

from .._custom_types import Array, Float, PRNGKeyArray, Scalar
from ._precision import SolveInfo

Matvec = Callable[[Float[Array, " d"]], Float[Array, " d"]]

#: Restarts from the recomputed true residual allowed after the recursive residual claims
#: convergence; a restart that does not halve the true residual stops the solve anyway.
_MAX_RESTARTS = 8


def default_tol(dtype) -> float:
    """The relative-residual tolerance used when none is given: `1e-10` in float64,
    `1e-4` in float32. Float32 CG on a Laplace precision stagnates near `eps · cond`
    (`eps = 1.2e-7`): a small MLP's GGN precision (`d = 450`, Pima diabetes) stalls at
    3e-5, and the measurements above miss 1e-5 from condition number 1e3 on."""
    return 1e-10 if jnp.dtype(dtype) == jnp.float64 else 1e-4


def default_max_iters(d: int) -> int:
    """The iteration cap used when none is given: `2 d` (CG terminates in `d` steps in
    exact arithmetic; rounding costs up to about as many again), at least 10 and at most
    10,000."""
    return max(10, min(2 * d, 10_000))


def default_damping(diagonal: Float[Array, " d"], *, rel: float = 1e-3) -> Scalar:
    """The damping rule: `δ = rel · mean(diag A)` for a positive semi-definite `A`.

    `mean(diag A) = tr(A)/d` is the mean eigenvalue, so `λ_max(A) ≤ tr(A) = d · mean`
    and the damped operator has `cond(A + δI) ≤ (tr A + δ)/δ = 1 + d/rel`: the rule
    bounds the condition number (hence the CG iteration count, `O(√cond)`) whatever the
    curvature, while moving the solution by a relative `O(δ/λ_min)` only where `A` is
    nearly singular. For a Laplace precision `Λ = λI + C`, pass `diag Λ`; then
    `δ ≥ rel · λ`. Use the result as `cg(..., damping=δ)`, `lissa(..., damping=δ)` or
    [`second_order(damping=δ)`][unlearnx.second_order].

    Example:
        ```python
        import jax.numpy as jnp, unlearnx as ux
        print(float(ux.default_damping(jnp.array([1.0, 3.0]))))  # 0.002
        ```
    """
    return rel * jnp.mean(jnp.abs(diagonal))


def _check_rhs(name: str, b, x0) -> None:
    if b.ndim not in (1, 2):
        raise ValueError(
            f"{name}: `b` must have shape (d,) or (d, m); got {b.shape}. Pass one "
            f"right-hand side per column."
        )
    if x0 is not None and x0.shape != b.shape:
        raise ValueError(
            f"{name}: `x0` has shape {x0.shape} but `b` has shape {b.shape}; give one "
            f"starting point per right-hand side, or none."
        )


def _over_columns(solve_one, b, x0):
    """Apply a single-vector solver to a `(d,)` or `(d, m)` right-hand side, folding the
    per-column diagnostics into one `SolveInfo` (most iterations, largest residual, all
    converged)."""
    if b.ndim == 1:
        return solve_one(b, x0)
    x, info = jax.vmap(solve_one, in_axes=(1, 1), out_axes=(1, 0))(b, x0)
    return x, SolveInfo(jnp.max(info.iterations), jnp.max(info.residual), jnp.all(info.converged))


def cg(
    matvec: Matvec,
    b: Float[Array, " d *m"],
    *,
    preconditioner: Matvec | None = None,
    damping: float | Scalar = 0.0,
    tol: float | None = None,
    max_iters: int | None = None,
    x0: Float[Array, " d *m"] | None = None,
) -> tuple[Float[Array, " d *m"], SolveInfo]:
    """Solve `(A + δI) x = b` by preconditioned conjugate gradients, with breakdown checks.

    `A` is given by `matvec` (symmetric positive definite; it is never formed). A
    right-hand side with columns `(d, m)` is solved column by column under `vmap`.
    Jit-friendly: a `jax.lax.while_loop`, static shapes, no Python branching on values.

    Args:
        matvec: `v ↦ A v`.
        b: the right-hand side, `(d,)` or `(d, m)`.
        preconditioner: `v ↦ M⁻¹ v` for a symmetric positive-definite `M ≈ A + δI`
            (e.g. `lambda v: v / diag`), or `None`.
        damping: `δ ≥ 0`, added to `A` (see [`default_damping`][unlearnx.default_damping]).
        tol: stop when the relative residual `‖b − (A + δI) x‖ / ‖b‖ ≤ tol`; by default
            `1e-10` in float64 and `1e-4` in float32.
        max_iters: at most this many products with `A` (one more for the final
            residual check); by default `2 d` (at least 10, at most 10,000).
        x0: a starting point (zeros by default).

    Returns:
        `(x, info)`: `info.iterations` (products with `A`, the residual checks
        included: the most over columns), `info.residual` (the true relative residual,
        recomputed from scratch: the largest over columns) and `info.converged`
        (`residual ≤ tol` for every column and no breakdown). A
        breakdown (`pᵀAp ≤ 0`, e.g. an indefinite operator, or a non-finite product)
        stops the iteration with the last finite iterate and `converged=False`: the
        result is never NaN for finite `b`.

    Example:
        ```python
        import jax.numpy as jnp, unlearnx as ux
        A = jnp.array([[4.0, 1.0], [1.0, 3.0]])
        x, info = ux.cg(lambda v: A @ v, jnp.array([1.0, 2.0]), tol=1e-6)
        print(x, bool(info.converged))  # [0.0909 0.6364] True
        ```
    """
    _check_rhs("cg", b, x0)
    d = b.shape[0]
    tol = default_tol(b.dtype) if tol is None else float(tol)
    max_iters = default_max_iters(d) if max_iters is None else int(max_iters)
    if not tol >= 0:
        raise ValueError(f"cg: `tol` must be ≥ 0; got {tol}.")
    if max_iters < 0:
        raise ValueError(f"cg: `max_iters` must be ≥ 0; got {max_iters}.")
    M = (lambda v: v) if preconditioner is None else preconditioner
    delta = jnp.asarray(damping, b.dtype)

    def A(v):
        return matvec(v) + delta * v

    def one(b, x0):
        return _cg_one(A, M, b, x0, tol, max_iters)

    return _over_columns(one, b, jnp.zeros_like(b) if x0 is None else x0)


class _CGState(NamedTuple):
    x: Array
    r: Array  # the residual: recursive after a CG step, true after a check
    p: Array
    rz: Array  # rᵀ M⁻¹ r
    k: Array  # products with A so far
    restarts: Array
    broke: Array
    check: Array  # whether the next product is `A x` (a residual check) or `A p`
    done: Array
    res: Array  # the true residual norm at the last check


def _cg_one(A, M, b, x0, tol, max_iters):
    """One right-hand side. A single loop whose every iteration makes one product with
    `A` (so `A` is traced, and compiled, once): either a CG step `A p`, or a check `A x`
    that recomputes the true residual `b − A x` when the recursive one claims
    convergence, when a breakdown or the cap ends the iteration, and at the start. A
    check that does not meet `tol` restarts CG from the true residual, as long as the
    previous restart at least halved it."""
    dot = jnp.vdot
    bnorm = jnp.linalg.norm(b)
    thresh = tol * bnorm

    def body(s: _CGState) -> _CGState:
        Av = A(jnp.where(s.check, s.x, s.p))
        k = s.k + 1
        # As a CG step.
        pAp = dot(s.p, Av)
        ok = (pAp > 0) & jnp.isfinite(pAp) & (s.rz > 0) & jnp.isfinite(s.rz)
        alpha = jnp.where(ok, s.rz / jnp.where(ok, pAp, 1.0), 0.0)
        x_step = s.x + alpha * s.p
        # As a check.
        r_true = b - Av
        res_true = jnp.linalg.norm(r_true)
        # Either way, the new residual and its preconditioned version.
        r = jnp.where(s.check, r_true, s.r - alpha * Av)
        z = M(r)
        rz = dot(r, z)
        p_step = z + (rz / jnp.where(ok, s.rz, 1.0)) * s.p
        ok = ok & jnp.all(jnp.isfinite(x_step)) & jnp.all(jnp.isfinite(p_step))

        after_check = _CGState(
            x=s.x,
            r=r,
            p=z,
            rz=rz,
            k=k,
            restarts=s.restarts + 1,
            broke=s.broke | ~jnp.isfinite(res_true),
            check=jnp.array(False),
            done=(res_true <= thresh)
            | ~jnp.isfinite(res_true)
            | s.broke
            | (k >= max_iters)
            | (s.restarts >= _MAX_RESTARTS)
            | ~(res_true < 0.5 * s.res),
            res=res_true,
        )
        after_step = _CGState(
            x=jnp.where(ok, x_step, s.x),
            r=jnp.where(ok, r, s.r),
            p=jnp.where(ok, p_step, s.p),
            rz=jnp.where(ok, rz, s.rz),
            k=k,
            restarts=s.restarts,
            broke=~ok,
            check=~ok | (jnp.linalg.norm(r) <= thresh) | (k >= max_iters),
            done=jnp.array(False),
            res=s.res,
        )
        return jax.tree_util.tree_map(
            lambda a, b: jnp.where(s.check, a, b), after_check, after_step
        )

    zero = jnp.zeros((), b.dtype)
    init = _CGState(
        x=x0,
        r=jnp.zeros_like(b),
        p=jnp.zeros_like(b),
        rz=zero,
        k=jnp.array(0, jnp.int32),
        restarts=jnp.array(0, jnp.int32),
        broke=jnp.array(False),
        check=jnp.array(True),
        done=jnp.array(False),
        res=jnp.array(jnp.inf, b.dtype),
    )
    s = jax.lax.while_loop(lambda s: ~s.done, body, init)
    rel = s.res / jnp.maximum(bnorm, jnp.finfo(b.dtype).tiny)
    return s.x, SolveInfo(s.k, rel, (s.res <= thresh) & ~s.broke)


def largest_eigenvalue(matvec: Matvec, v0: Float[Array, " d"], *, iters: int = 20) -> Scalar:
    """The Rayleigh quotient after `iters` power iterations from `v0`: a lower bound of
    `λ_max` of a symmetric positive semi-definite operator, usually within a few percent
    after 20 iterations (unless `v0` is nearly orthogonal to the top eigenvector).

    Example:
        ```python
        import jax.numpy as jnp, unlearnx as ux
        A = jnp.diag(jnp.array([1.0, 2.0, 5.0]))
        print(float(ux.largest_eigenvalue(lambda v: A @ v, jnp.ones(3))))  # ≈ 5
        ```
    """
    tiny = jnp.finfo(v0.dtype).tiny
    v = v0 / jnp.maximum(jnp.linalg.norm(v0), tiny)

    def body(_, v):
        u = matvec(v)
        return u / jnp.maximum(jnp.linalg.norm(u), tiny)

    v = jax.lax.fori_loop(0, iters, body, v)
    return jnp.vdot(v, matvec(v))


def lissa(
    matvec: Matvec,
    b: Float[Array, " d *m"],
    *,
    scale: float | Scalar | None = None,
    damping: float | Scalar = 0.0,
    depth: int = 1000,
    tol: float | None = None,
    power_iters: int = 20,
    key: PRNGKeyArray | None = None,
) -> tuple[Float[Array, " d *m"], SolveInfo]:
    """Solve `(A + δI) x = b` by LiSSA, the truncated Neumann series of Agarwal, Bullins
    & Hazan (2017) that Koh & Liang (2017) use for influence functions.

    `h₀ = b`, `h_j = b + h_{j−1} − (A + δI) h_{j−1} / s`, `x_j = h_j / s`, which converges
    to `(A + δI)⁻¹ b` iff every eigenvalue of `(A + δI)/s` lies in `(0, 2)`, at the rate
    `max |1 − μ/s|` over the eigenvalues `μ`. It is here for completeness: with the full
    operator (no minibatch noise), [`cg`][unlearnx.cg] needs `O(√cond)` products where
    LiSSA needs `O(cond)`. The residual of `x_{j−1}` is `h_j − h_{j−1}`, so the
    diagnostics cost no extra product.

    The scale rule: convergence needs `s > μ_max/2`. When `scale` is not given it is
    `1.25 ×` the power-iteration estimate of `μ_max` (`largest_eigenvalue` after
    `power_iters` iterations from a fixed random start), which is safe as long as the
    estimate is above `0.4 μ_max`, and converges at rate `≈ 1 − μ_min/(1.25 μ_max)`.

    Args:
        matvec: `v ↦ A v` (symmetric positive semi-definite).
        b: the right-hand side, `(d,)` or `(d, m)`.
        scale: `s`; by default from power iteration (above).
        damping: `δ ≥ 0` (see [`default_damping`][unlearnx.default_damping]).
        depth: the most terms of the series.
        tol: stop once the relative residual is at most `tol` (default `1e-10` in float64,
            `1e-4` in float32).
        power_iters: power iterations for the default scale.
        key: the start of the power iteration; by default a fixed key, so that the result
            is deterministic.

    Returns:
        `(x, info)`, `x` the iterate with the smallest residual seen. Divergence (the
        residual grows 1,000-fold or stops being finite, e.g. `scale` too small) stops the
        series and reports `converged=False`; the returned `x` is still finite.

    Example:
        ```python
        import jax.numpy as jnp, unlearnx as ux
        A = jnp.array([[4.0, 1.0], [1.0, 3.0]])
        x, info = ux.lissa(lambda v: A @ v, jnp.array([1.0, 2.0]), depth=200, tol=1e-5)
        print(x, bool(info.converged))  # [0.0909 0.6364] True
        ```
    """
    _check_rhs("lissa", b, None)
    if depth < 1:
        raise ValueError(f"lissa: `depth` must be ≥ 1; got {depth}.")
    d = b.shape[0]
    tol = default_tol(b.dtype) if tol is None else float(tol)
    delta = jnp.asarray(damping, b.dtype)

    def A(v):
        return matvec(v) + delta * v

    if scale is None:
        key = jax.random.key(0) if key is None else key
        v0 = jax.random.normal(key, (d,), b.dtype)
        s = 1.25 * largest_eigenvalue(A, v0, iters=power_iters)
    else:
        s = jnp.asarray(scale, b.dtype)

    def one(b, _):
        return _lissa_one(A, b, s, depth, tol)

    return _over_columns(one, b, jnp.zeros_like(b))


def _lissa_one(A, b, s, depth, tol):
    tiny = jnp.finfo(b.dtype).tiny
    bnorm = jnp.linalg.norm(b)
    thresh = tol * bnorm
    valid = jnp.isfinite(s) & (s > 0)
    s = jnp.where(valid, s, 1.0)
    inf = jnp.array(jnp.inf, b.dtype)

    def cond(c):
        _, _, best_res, res0, last_res, k, _ = c
        diverged = ~jnp.isfinite(last_res) | (last_res > 1e3 * res0)
        return (k < depth) & (best_res > thresh) & ~diverged & valid

    def body(c):
        h, best_x, best_res, res0, _, k, _ = c
        h2 = b + h - A(h) / s
        res = jnp.linalg.norm(h2 - h)  # the residual of x = h / s
        better = jnp.isfinite(res) & (res < best_res)
        best_x = jnp.where(better, h / s, best_x)
        best_res = jnp.where(better, res, best_res)
        res0 = jnp.where(k == 0, res, res0)
        h2 = jnp.where(jnp.all(jnp.isfinite(h2)), h2, h)
        return h2, best_x, best_res, res0, res, k + 1, None

    init = (b, jnp.zeros_like(b), inf, inf, jnp.zeros((), b.dtype), jnp.array(0, jnp.int32), None)
    _, x, best, _, _, k, _ = jax.lax.while_loop(cond, body, init)
    rel = jnp.where(jnp.isfinite(best), best / jnp.maximum(bnorm, tiny), inf)
    return x, SolveInfo(k, rel, (best <= thresh) & valid)


def lanczos(
    matvec: Matvec, v0: Float[Array, " d"], steps: int
) -> tuple[Float[Array, " k"], Float[Array, " k"], Float[Array, "k d"]]:
    """`steps` Lanczos steps from `v0` with full reorthogonalisation: `(α, β, Q)` with
    `Q A Qᵀ ≈ T = tridiag(β[:-1], α, β[:-1])` and `Q[0] = v0/‖v0‖`.

    Written here because neither lineax nor jax.scipy offers a Lanczos iteration (the
    `matfree` package does, with stochastic Lanczos quadrature, but is not a dependency
    of unlearnx; these 40 lines are all that `logdet` and `sample` need). Memory is
    `steps × d`. When the Krylov space is exhausted early (`β_j ≈ 0`) the remaining rows
    of `Q` are zero and the remaining `α` are 1 with `β = 0`, decoupled eigenvalues whose
    eigenvectors have zero first component: they carry no weight in quadrature.
    """
    d = v0.shape[0]
    dtype = v0.dtype
    eps = jnp.finfo(dtype).eps
    q0 = v0 / jnp.maximum(jnp.linalg.norm(v0), jnp.finfo(dtype).tiny)
    Q = jnp.zeros((steps, d), dtype).at[0].set(q0)
    alphas = jnp.zeros(steps, dtype)
    betas = jnp.zeros(steps, dtype)

    def body(j, c):
        Q, alphas, betas, done, anorm = c
        q = Q[j]
        w = matvec(q)
        a = jnp.vdot(q, w)
        # Full reorthogonalisation, twice ("twice is enough", Parlett): against every
        # row of Q, including q itself and its predecessor (the three-term recurrence).
        w = w - Q.T @ (Q @ w)
        w = w - Q.T @ (Q @ w)
        beta = jnp.linalg.norm(w)
        anorm = jnp.maximum(anorm, jnp.abs(a) + beta)
        stop = done | (beta <= 100 * eps * anorm) | ~jnp.isfinite(beta)
        alphas = alphas.at[j].set(jnp.where(done | ~jnp.isfinite(a), 1.0, a))
        betas = betas.at[j].set(jnp.where(stop, 0.0, beta))
        q_next = jnp.where(stop, 0.0, w / jnp.where(stop, 1.0, beta))
        Q = Q.at[j + 1].set(q_next, mode="drop")
        return Q, alphas, betas, stop, anorm

    init = (Q, alphas, betas, jnp.array(False), jnp.zeros((), dtype))
    Q, alphas, betas, _, _ = jax.lax.fori_loop(0, steps, body, init)
    return alphas, betas, Q


def tridiagonal_eigh(alphas, betas):
    """Eigenvalues and eigenvectors of `tridiag(β[:-1], α, β[:-1])`."""
    T = jnp.diag(alphas) + jnp.diag(betas[:-1], 1) + jnp.diag(betas[:-1], -1)
    return jnp.linalg.eigh(T)
