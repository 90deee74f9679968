"""Refinement by chord steps, and exact retraining as the baseline."""

from __future__ import annotations

from typing import Literal, NamedTuple

import equinox as eqx
import jax
import jax.numpy as jnp

from .._custom_types import Array, Float, Int
from .._data._dataset import Dataset
from .._fit import FitInfo, fit
from .._models._base import ravel
from .._objective import objective
from .._posterior._laplace import LaplacePosterior, laplace
from .._requests import Request, as_edit
from ._base import AbstractUnlearner
from ._linesearch import armijo


class RefineInfo(NamedTuple):
    """Diagnostics of refinement: chord steps taken and the final gradient norm
    `‖∇L(θ; D')‖` on the edited data."""

    steps: Int[Array, ""]
    grad_norm: Float[Array, ""]


class Refine(AbstractUnlearner):
    """Chord steps `θ ← θ − Λ'⁻¹ ∇L(θ; D')`. See [`refine`][unlearnx.refine]."""

    steps: int = eqx.field(static=True, default=2)
    tol: float | None = None

    def init_inner(self, posterior, data):
        return None

    def step(self, ctx, posterior, inner):
        theta, unravel = ravel(posterior.mean)
        lam = posterior.prior_precision
        f = lambda t: objective(unravel(t), ctx.new, lam)
        value_and_grad = jax.value_and_grad(f)
        P = posterior.precision
        tol = -1.0 if self.tol is None else self.tol

        def cond(c):
            _, _, g, i = c
            return (i < self.steps) & (jnp.linalg.norm(g) > tol)

        def body(c):
            # A chord step with a fixed precision can overshoot, or oscillate without
            # converging, far from the retrained optimum (e.g. a feature blanked in every
            # row). Armijo backtracking on L(θ; D') keeps each step a descent step; near
            # the optimum the full step is accepted. Decreases within rounding of L count
            # as sufficient, so that the iteration does not stall at convergence.
            t, val, g, i = c
            d = P.solve(g)
            a = armijo(f, t, val, g, d)
            t = t - a * d
            val, g = value_and_grad(t)
            return t, val, g, i + 1

        val0, g0 = value_and_grad(theta)
        t, _, g, i = jax.lax.while_loop(cond, body, (theta, val0, g0, jnp.array(0)))
        post = LaplacePosterior(unravel(t), P, lam, posterior.curvature)
        return post, inner, RefineInfo(i, jnp.linalg.norm(g))


def refine(steps: int | None = None, tol: float | None = None) -> Refine:
    """Refine the mean by chord (simplified Newton) steps on the edited data's objective,
    reusing the current precision's factor: `θ ← θ − Λ'⁻¹ ∇L(θ; D')`.

    Each step costs one gradient pass over the data and one triangular solve (plus an
    objective evaluation for its Armijo backtracking, which only shortens steps far from
    the optimum); near the optimum the error shrinks geometrically towards exact
    retraining. The precision is not recomputed.

    Args:
        steps: the maximum number of steps (default 2, or 100 when `tol` is given).
        tol: stop early once `‖∇L(θ; D')‖₂ ≤ tol`.

    Example:
        ```python
        import unlearnx as ux
        unlearner = ux.chain(ux.second_order(), ux.refine(steps=5, tol=1e-8))
        ```
    """
    if steps is None:
        steps = 2 if tol is None else 100
    if not isinstance(steps, int) or steps < 0:
        raise ValueError(f"refine: `steps` must be a non-negative int; got {steps!r}.")
    if tol is not None and not tol > 0:
        raise ValueError(f"refine: `tol` must be positive; got {tol}.")
    return Refine(steps, tol)


def _cold_start(model):
    theta, unravel = ravel(model)
    return unravel(jnp.zeros_like(theta))


def retrain(
    posterior: LaplacePosterior,
    data: Dataset,
    request: Request,
    *,
    warm: bool = True,
    solver: Literal["auto", "newton", "lbfgs", "adam"] = "auto",
    structure: str | None = None,
    **fit_kwargs,
) -> LaplacePosterior:
    """Exact retraining on the edited data: the baseline every approximation is measured
    against. Refits the MAP (warm-started from the posterior mean, or cold from zeros)
    and rebuilds the Laplace posterior with the same prior, structure and curvature.

    Example:
        ```python
        import unlearnx as ux
        data = ux.datasets.diabetes().train
        model, _ = ux.fit(ux.models.LogisticRegression(data.n_features), data)
        post = ux.laplace(model, data)
        exact = ux.retrain(post, data, ux.forget_rows([0, 1]))
        ```
    """
    new = as_edit(request, data).apply(data)
    return _refit(posterior, new, warm, solver, structure, fit_kwargs)[0]


def _refit(
    posterior, data, warm, solver, structure, fit_kwargs
) -> tuple[LaplacePosterior, FitInfo]:
    start = posterior.mean if warm else _cold_start(posterior.mean)
    lam = float(posterior.prior_precision)
    model, info = fit(start, data, prior_precision=lam, solver=solver, **fit_kwargs)
    if structure is not None:
        post = laplace(
            model, data, prior_precision=lam, structure=structure, curvature=posterior.curvature
        )
        return post, info
    # The same structure with the same options (rank, damping, ...), rebuilt at the new mean.
    rebuild = eqx.filter_jit(
        lambda P, m, d, l: P.rebuild(m, d, l, posterior.curvature)  # noqa: E741
    )
    P, ok = rebuild(posterior.precision, model, data, posterior.prior_precision)
    if not bool(ok):
        raise RuntimeError("retrain: the rebuilt precision is not positive definite.")
    return LaplacePosterior(model, P, posterior.prior_precision, posterior.curvature), info


class ExactRetrain(AbstractUnlearner):
    """Exact retraining as a transform. See [`exact_retrain`][unlearnx.exact_retrain]."""

    warm: bool = eqx.field(static=True, default=True)
    solver: str = eqx.field(static=True, default="auto")

    @property
    def jittable(self) -> bool:
        return False

    def init_inner(self, posterior, data):
        return None

    def step(self, ctx, posterior, inner):
        post, info = _refit(posterior, ctx.new, self.warm, self.solver, None, {})
        return post, inner, info


def exact_retrain(warm: bool = True, solver: str = "auto") -> ExactRetrain:
    """Exact retraining as an unlearning transform (runs eagerly, not under jit).

    Args:
        warm: start from the current mean (`True`) or from zeros.
        solver: passed to [`fit`][unlearnx.fit].

    Example:
        ```python
        import unlearnx as ux
        baseline = ux.exact_retrain(warm=True)
        ```
    """
    return ExactRetrain(warm, solver)
