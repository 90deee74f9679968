"""Influence-function unlearning: first-order (gradient) and second-order (Newton) steps.

With `G = Σ_new ∇ℓ(θ*) − Σ_old ∇ℓ(θ*)` the change of the objective's gradient caused by
the edit, the second-order step downdates the precision by the edited rows' curvature,
`Λ' = Λ − Σ_old ∇²ℓ + Σ_new ∇²ℓ`, and moves the mean to `θ* − Λ'⁻¹ G`. Only the `k`
edited rows are touched: the cost is O(k d² + d³) at most, never a pass over all rows
(unless the downdate fails and the fallback recomputes the precision, or the optional
line search evaluates the edited objective).
"""

from __future__ import annotations

from typing import NamedTuple

import equinox as eqx
import jax
import jax.numpy as jnp

from .._curvature._factors import ggn_factors, rows_hessian
from .._curvature._precision import DensePrecision, DiagonalPrecision, UpdateMethod
from .._custom_types import Array, Bool, Float
from .._models._base import ravel
from .._objective import objective, rows_loss
from .._posterior._laplace import LaplacePosterior
from ._base import AbstractUnlearner, Context
from ._linesearch import armijo


def gradient_change(ctx: Context, posterior: LaplacePosterior) -> Float[Array, " d"]:
    """`G = Σ_new w ∇ℓ(θ) − Σ_old w ∇ℓ(θ)` at the current mean, over the edited rows."""
    theta, unravel = ravel(posterior.mean)
    old = ctx.edit.old_rows(ctx.old)
    new = ctx.edit.new_rows()

    def g(rows):
        return jax.grad(lambda t: rows_loss(unravel(t), *rows))(theta)

    return g(new) - g(old)


class FirstOrderInfo(NamedTuple):
    """Diagnostics of a first-order step: the step size used and the step's norm."""

    tau: Float[Array, ""]
    step_norm: Float[Array, ""]


class FirstOrder(AbstractUnlearner):
    """`θ' = θ − τ G`; the precision is left unchanged. See
    [`first_order`][unlearnx.first_order]."""

    tau: float | None = None

    def init_inner(self, posterior, data):
        return None

    def step(self, ctx, posterior, inner):
        G = gradient_change(ctx, posterior)
        if self.tau is None:
            tau = 1.0 / _largest_eigenvalue(posterior.precision, G)
        else:
            tau = jnp.asarray(self.tau, G.dtype)
        theta, unravel = ravel(posterior.mean)
        mean = unravel(theta - tau * G)
        post = LaplacePosterior(
            mean, posterior.precision, posterior.prior_precision, posterior.curvature
        )
        return post, inner, FirstOrderInfo(tau, jnp.linalg.norm(tau * G))


def _largest_eigenvalue(precision, v0, iters: int = 30):
    v = v0 / jnp.maximum(jnp.linalg.norm(v0), jnp.finfo(v0.dtype).tiny) + 1e-3
    v = v / jnp.linalg.norm(v)

    def body(_, v):
        u = precision.mv(v)
        return u / jnp.linalg.norm(u)

    v = jax.lax.fori_loop(0, iters, body, v)
    return jnp.dot(v, precision.mv(v))


def first_order(tau: float | None = None) -> FirstOrder:
    """First-order (gradient) unlearning: `θ' = θ − τ G` (Warnecke et al. 2023).

    Args:
        tau: step size; by default `1/‖Λ‖₂` (the largest eigenvalue of the precision, by
            power iteration), the largest step that is stable for the quadratic model.

    The precision is not updated: a first-order step carries no curvature information.

    Example:
        ```python
        import unlearnx as ux
        unlearner = ux.first_order()
        ```
    """
    if tau is not None and not tau > 0:
        raise ValueError(f"first_order: `tau` must be positive; got {tau}.")
    return FirstOrder(tau)


class SecondOrderInfo(NamedTuple):
    """Diagnostics of a second-order step.

    Attributes:
        downdate_ok: whether the precision stayed positive definite after removing the
            edited rows' curvature.
        fallback: whether the precision was recomputed from all retained rows instead
            (when the downdate failed).
        step_norm: `‖a Λ'⁻¹ G‖`, the step taken.
        grad_change_norm: `‖G‖`.
        step_length: `a`, the fraction of the Newton step taken (`1.0` without the line
            search).
    """

    downdate_ok: Bool[Array, ""]
    fallback: Bool[Array, ""]
    step_norm: Float[Array, ""]
    grad_change_norm: Float[Array, ""]
    step_length: Float[Array, ""]


class SecondOrder(AbstractUnlearner):
    """Precision downdate and Newton step. See [`second_order`][unlearnx.second_order]."""

    damping: float = 0.0
    method: UpdateMethod = eqx.field(static=True, default="auto")
    line_search: bool = eqx.field(static=True, default=False)

    def init_inner(self, posterior, data):
        return None

    def step(self, ctx, posterior, inner):
        theta, unravel = ravel(posterior.mean)
        P = posterior.precision
        old = ctx.edit.old_rows(ctx.old)
        new = ctx.edit.new_rows()
        explicit = isinstance(P, (DensePrecision, DiagonalPrecision))
        if explicit and posterior.curvature == "hessian":
            delta = rows_hessian(theta, unravel, *new) - rows_hessian(theta, unravel, *old)
            P2, ok = P.dense_update(delta)
        elif explicit:
            d = theta.shape[0]
            Uo = ggn_factors(theta, unravel, *old).reshape(-1, d)
            Un = ggn_factors(theta, unravel, *new).reshape(-1, d)
            P2, ok = P.factor_update(Un, Uo, self.method)
        else:
            P2, ok = P.edit_examples(posterior.mean, new, old, posterior.curvature)

        def refactor(_):
            # Fallback: the curvature of every retained row at the current mean.
            lam = posterior.prior_precision
            return P.rebuild(posterior.mean, ctx.new, lam, posterior.curvature)[0]

        P2 = jax.lax.cond(ok, lambda _: P2, refactor, None)
        Pstep = P2
        if self.damping:
            Pstep = P2.shift(jnp.asarray(self.damping, theta.dtype))
        G = gradient_change(ctx, posterior)
        step = Pstep.solve(G)
        a = step_length(ctx, posterior, step) if self.line_search else jnp.ones((), G.dtype)
        step = a * step
        mean = unravel(theta - step)
        post = LaplacePosterior(mean, P2, posterior.prior_precision, posterior.curvature)
        info = SecondOrderInfo(ok, ~ok, jnp.linalg.norm(step), jnp.linalg.norm(G), a)
        return post, inner, info


def step_length(ctx: Context, posterior: LaplacePosterior, step: Float[Array, " d"]):
    """Armijo backtracking of `θ − a·step` on the edited data's objective `L(θ; D')`
    (one pass over the data per trial)."""
    theta, unravel = ravel(posterior.mean)
    lam = posterior.prior_precision
    f = lambda t: objective(unravel(t), ctx.new, lam)  # noqa: E731
    value, grad = jax.value_and_grad(f)(theta)
    return armijo(f, theta, value, grad, step)


def second_order(
    damping: float = 0.0, method: UpdateMethod = "auto", *, line_search: bool = False
) -> SecondOrder:
    """Second-order (influence / Newton) unlearning with a precision downdate.

    `Λ' = Λ − Σ_old ∇²ℓ + Σ_new ∇²ℓ` and `θ' = θ − Λ'⁻¹ G`, touching only the edited
    rows. If the downdate leaves `Λ'` indefinite (too much curvature removed, or a stale
    precision), the precision is recomputed from all retained rows and
    `info.fallback` is set; the result is never NaN.

    Args:
        damping: `δ ≥ 0` added to the precision for the step only (`(Λ' + δI)⁻¹ G`); for
            non-convex models.
        method: `"rank_update"` (k rank-one Cholesky up/downdates, O(k d²)),
            `"refactor"` (form `Λ − Xₖᵀ S Xₖ + X̃ₖᵀ S̃ X̃ₖ` and refactorise, O(k d² + d³)),
            or `"auto"` (chosen by cost from the shapes).
        line_search: shorten the step by Armijo backtracking on the edited data's
            objective `L(θ; D')`, `θ' = θ − a Λ'⁻¹ G` with `a ∈ {1, ½, ¼, …}`. Each trial
            is one pass over the data, so the update no longer costs only the request's
            size. Use it with an approximate curvature (`"diag"`, `"kfac"`, `"ekfac"`,
            `"lowrank"`) when the edit moves the model far, such as relabelling rows a
            network has memorised: the approximation underestimates the curvature along
            the step, and the full step overshoots. On the 112,810-parameter digits MLP,
            repairing 29 swapped labels, the full KFAC step lost 22× the test accuracy
            the corruption had cost; with the line search it restored all of it
            (`docs/networks.md`). For a small deletion from a well-fitted model the full
            step is usually the better one: leave it off.

    Example:
        ```python
        import unlearnx as ux
        unlearner = ux.second_order()
        ```
    """
    if not damping >= 0:
        raise ValueError(f"second_order: `damping` must be ≥ 0; got {damping}.")
    if method not in ("auto", "rank_update", "refactor"):
        raise ValueError(
            f"second_order: unknown `method={method!r}`; use 'auto', 'rank_update' or 'refactor'."
        )
    return SecondOrder(float(damping), method, bool(line_search))
