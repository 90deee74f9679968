"""Independence correction: a Newton step on the HSIC-penalised objective.

After a non-uniform deletion (most of one group gone), or the removal of a feature whose
proxies stay in the data, the unlearned model's predictions can still depend on an
attribute `V`. The correction moves the posterior to the minimiser of

    L_hsic(θ) = L(θ; D') + γ · s · HSIC_w(f_θ(X'), V')

where `L` is the sum-form training objective on the edited data `D'`, `s = Σ_i w_i` the
retained weight (the retained row count for unit weights) and `HSIC_w` the biased HSIC
of the model outputs and the attribute over the retained rows, weighted by `w_i / Σ w`.
Because `L` is a sum over rows and HSIC an average-type statistic, the factor `s` makes
`γ` a per-row trade-off: the same `γ` means the same balance at any data size.

The pieces, all under `jit` with static shapes:

- *Rows.* Deleted rows are excluded by their weight, not by selection: with
  `p_i = w_i / Σ w`, `M = diag(p) − p pᵀ` and Gram matrices `K` (outputs), `L` (the
  attribute), `HSIC_w = tr(M K M L) = Σ_ij K_ij B_ij` with `B = M L M` (equivalently
  `B_ij = p_i p_j L̃_ij`, `L̃` centred with the weights `p`). A weight-0 row has a zero row
  and column in `B`; uniform weights on a subset give the biased HSIC of that subset.
  For more than `max_rows` rows the statistic is estimated on a systematic sample of at
  most `max_rows` retained rows (evenly spaced in row order), and still multiplied by the
  full retained weight `s`.
- *Kernels.* A Gaussian kernel on the outputs (logits, or class probabilities with
  `output="probs"`) whose bandwidth is the median of the positive pairwise distances of
  the outputs of the posterior *before the update* over the retained sample (gradient
  stopped), chosen once per update and then held fixed, so that the penalised objective
  is one smooth function that the transform and the retraining baseline both minimise.
  On the attribute, a categorical (delta) kernel for integer codes and a
  median-heuristic Gaussian kernel for numbers, unless one is given.
- *Curvature.* `B` does not depend on `θ`, so the Hessian of `Σ K_ij B_ij` in the outputs
  is a sum over pairs of the Gaussian kernel's second derivative; contracted with the
  output Jacobians `J` it is `Σ_ab 2 J_aᵀ (diag(C_ab 1) − C_ab) J_b`, with
  `C_ab = B ∘ K ∘ (U_a ∘ U_b / σ⁴ − δ_ab / σ²)` and `U_a` the pairwise differences of
  output `a`. That is the exact Hessian for models linear in their parameters (GLMs with
  `output="logits"`) and the Gauss-Newton form otherwise, at O(M² d + M d²) cost and
  O(M²) memory (`jax.hessian` of the penalty would hold `d` copies of the `M × M` Gram
  matrix). It is indefinite in general: when `Λ + γ s ∇²HSIC` is not positive definite,
  the penalty's curvature is projected onto the positive semi-definite cone (negative
  eigenvalues set to zero) and the info says so.
"""

from __future__ import annotations

from typing import Literal, NamedTuple

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax

from .._curvature._factors import data_curvature
from .._curvature._precision import DensePrecision, DiagonalPrecision
from .._custom_types import Array, ArrayLike, Bool, Float, Int
from .._data._dataset import Dataset
from .._fit import check_model_data
from .._hsic._kernels import (
    AbstractKernel,
    CategoricalKernel,
    GaussianKernel,
    as_rows,
    sq_distances,
)
from .._models._base import ravel
from .._objective import objective
from .._posterior._laplace import LaplacePosterior
from .._requests import Request, as_edit
from ._base import AbstractUnlearner

Output = Literal["logits", "probs"]

#: Above this many rows the penalty is estimated on a systematic sample of this size.
MAX_ROWS = 2000
#: For outputs (or attributes) with more than one column, the median heuristic looks at
#: most at this many rows (pairwise distances are sorted: O(rows²) memory and time).
MEDIAN_MAX_ROWS = 300


# --------------------------------------------------------------------------------------
# The retained sample and the attribute's side of the statistic.


def sample_rows(weights: Float[Array, " n"], max_rows: int):
    """At most `max_rows` retained rows, as `(index, valid)` of static length.

    Up to `max_rows` rows, every row (weight-0 rows are invalid). Above, a systematic
    sample: the retained rows of ranks `⌊j · n'/max_rows⌋`, `j < max_rows`, with `n'` the
    number of retained rows (all of them, once, when `n' ≤ max_rows`).
    """
    n = weights.shape[0]
    keep = weights > 0
    if n <= max_rows:
        return jnp.arange(n), keep
    count = jnp.sum(keep)
    csum = jnp.cumsum(keep)
    stride = jnp.maximum(count / max_rows, 1.0)
    rank = jnp.floor(jnp.arange(max_rows) * stride).astype(csum.dtype)
    valid = rank < count
    index = jnp.searchsorted(csum, rank + 1, side="left")
    return jnp.where(valid, index, 0), valid


def _median_scalar(z: Float[Array, " m"], valid: Bool[Array, " m"]):
    """Median of the positive pairwise distances `|z_i − z_j|` over the valid entries.

    Exact (equal to `jnp.median` of those distances: the mean of the two middle ones for
    an even count), by bisection on the distance with pair counts from a sorted copy:
    O(m log m) per count, no O(m²) array. Sorting all m(m−1)/2 distances of 1,000 points
    measured 150 ms on CPU; this takes 5 ms for 2,000.
    """
    m_all = z.shape[0]
    xs = jnp.sort(jnp.where(valid, z, jnp.inf))
    m = jnp.sum(valid)
    i = jnp.arange(m_all)
    rows = i < m

    def count(t):  # pairs i < j with xs_j − xs_i ≤ t
        pos = jnp.searchsorted(xs, xs + t, side="right", method="scan_unrolled")
        return jnp.sum(jnp.where(rows, pos - i - 1, 0))

    # After `iters` halvings the bracket is narrower than the rounding of the distances,
    # and the largest distance ≤ its upper end is the order statistic itself.
    iters = jnp.finfo(z.dtype).nmant + 12
    zeros = count(jnp.zeros((), z.dtype))
    npos = m * (m - 1) // 2 - zeros
    targets = zeros + jnp.stack([(npos - 1) // 2, npos // 2]) + 1
    span = jnp.where(m > 1, xs[jnp.maximum(m - 1, 0)] - xs[0], 1.0)

    def select(target):
        def body(_, lh):
            lo, hi = lh
            mid = 0.5 * (lo + hi)
            ok = count(mid) >= target
            return jnp.where(ok, lo, mid), jnp.where(ok, mid, hi)

        _, hi = jax.lax.fori_loop(0, iters, body, (jnp.zeros_like(span), span))
        pos = jnp.searchsorted(xs, xs + hi, side="right", method="scan_unrolled") - 1
        d = jnp.where(rows & (pos > i), xs[jnp.clip(pos, 0, m_all - 1)] - xs, -jnp.inf)
        return jnp.max(d)

    med = jnp.mean(jax.vmap(select)(targets))
    return jnp.where((npos > 0) & jnp.isfinite(med), med, 1.0)


def median_distance(Z: Float[Array, "m c"], valid: Bool[Array, " m"]):
    """The median heuristic over the valid rows of `Z` (gradient stopped): the median of
    the positive pairwise distances, 1 if there are none. Exact over all valid rows for
    one column; for several, over at most `MEDIAN_MAX_ROWS` of them (a systematic sample).
    """
    Z = jax.lax.stop_gradient(Z)
    if Z.shape[1] == 1:
        return jax.lax.stop_gradient(_median_scalar(Z[:, 0], valid))
    index, ok = sample_rows(valid.astype(Z.dtype), MEDIAN_MAX_ROWS)
    ok = ok & valid[index]
    Zs = Z[index]
    iu, ju = np.triu_indices(Zs.shape[0], k=1)
    d = jnp.sqrt(jnp.sum((Zs[iu] - Zs[ju]) ** 2, axis=-1))
    d = jnp.where(ok[iu] & ok[ju] & (d > 0), d, jnp.nan)
    med = jnp.nanmedian(d)
    return jax.lax.stop_gradient(jnp.where(jnp.isfinite(med), med, 1.0))


def _attribute_kernel(kernel: AbstractKernel | None, V: Array, valid):
    """The kernel on the attribute, with a median-heuristic Gaussian bandwidth chosen
    from the retained rows only."""
    if kernel is None:
        if jnp.issubdtype(V.dtype, jnp.integer) or V.dtype == jnp.bool_:
            return CategoricalKernel()
        kernel = GaussianKernel()
    if isinstance(kernel, GaussianKernel) and kernel.bandwidth is None:
        Vf = as_rows(V).astype(jnp.result_type(float))
        return GaussianKernel(median_distance(Vf, valid))
    return kernel.fit(V)


def coupling(L: Float[Array, "m m"], p: Float[Array, " m"]) -> Float[Array, "m m"]:
    """`B = M L M` with `M = diag(p) − p pᵀ`, i.e. `B_ij = p_i p_j L̃_ij` where `L̃` is `L`
    centred with the weights `p` (summing to one). `HSIC_w = Σ_ij K_ij B_ij`."""
    r = L @ p
    g = jnp.dot(p, r)
    return p[:, None] * p[None, :] * (L - r[:, None] - r[None, :] + g)


class PenaltySample(eqx.Module):
    """The rows the penalty is estimated on, and everything about them that does not
    depend on the parameters: inputs `X`, normalised weights `p` (zero for deleted or
    padding rows), the coupling `B` from the attribute's Gram matrix, and the retained
    weight `scale = Σ_i w_i` over all rows."""

    X: Float[Array, "m p"]
    p: Float[Array, " m"]
    B: Float[Array, "m m"]
    scale: Float[Array, ""]


def penalty_sample(
    data: Dataset, V: Array, kernel: AbstractKernel | None, max_rows: int
) -> PenaltySample:
    """Build the `PenaltySample` of `data` for attribute values `V` (one per row)."""
    index, valid = sample_rows(data.weights, max_rows)
    w = jnp.where(valid, data.weights[index], 0.0)
    p = w / jnp.sum(w)
    Vs = V[index]
    kv = _attribute_kernel(kernel, Vs, p > 0)
    L = kv.gram(Vs, Vs).astype(p.dtype)
    return PenaltySample(data.X[index], p, coupling(L, p), jnp.sum(data.weights))


# --------------------------------------------------------------------------------------
# The output side: value, gradient and curvature of Σ K_ij B_ij.


def outputs(model, X: Float[Array, "m p"], output: Output) -> Float[Array, "m c"]:
    """The model outputs the penalty sees: logits (or means), or predictive means."""
    f = jax.vmap(model)(X)
    if output == "probs":
        f = jax.vmap(model.likelihood.mean)(f)
    return f


def _gram(F, sigma):
    return jnp.exp(-sq_distances(F, F) / (2.0 * sigma**2))


def weighted_value(K: Float[Array, "m m"], B: Float[Array, "m m"], p: Float[Array, " m"]):
    """`Σ_ij K̃_ij B_ij` with `K̃` the `p`-centred `K` (the same number as `Σ K ∘ B`, since
    `B`'s rows sum to zero, but centring first keeps float32's digits)."""
    r = K @ p
    g = jnp.dot(p, r)
    return jnp.sum((K - r[:, None] - r[None, :] + g) * B)


def weighted_hsic(
    F: Array,
    V: Array,
    weights: Float[Array, " n"],
    *,
    kernel_v: AbstractKernel | None = None,
    bandwidth: float | None = None,
):
    """The weighted biased HSIC of outputs `F` and attribute `V` (no sampling): rows with
    weight 0 are left out, so it equals `ux.hsic.hsic(F[keep], V[keep])` with the same
    kernels when the retained weights are equal."""
    F = as_rows(F)
    p = weights / jnp.sum(weights)
    kv = _attribute_kernel(kernel_v, V, p > 0)
    B = coupling(kv.gram(V, V).astype(p.dtype), p)
    sigma = median_distance(F, p > 0) if bandwidth is None else jnp.asarray(bandwidth, F.dtype)
    return weighted_value(_gram(F, sigma), B, p)


def _pair_terms(F, J, B, K, sigma, diagonal):
    """`Σ_ab 2 J_aᵀ (diag(C_ab 1) − C_ab) J_b` (or its diagonal): the curvature of
    `Σ_ij B_ij K_ij` through the output Jacobians `J` `(m, c, d)`."""
    c, d = J.shape[1], J.shape[2]
    W = B * K
    pairs = jnp.asarray([(a, b) for a in range(c) for b in range(c)], jnp.int32)

    def term(acc, ab):
        a, b = ab[0], ab[1]
        Ua = F[:, a][:, None] - F[None, :, a]
        Ub = F[:, b][:, None] - F[None, :, b]
        C = W * (Ua * Ub / sigma**4 - jnp.where(a == b, 1.0, 0.0) / sigma**2)
        Ja, Jb = J[:, a, :], J[:, b, :]
        r = jnp.sum(C, axis=1)
        CJb = C @ Jb
        if diagonal:
            out = jnp.sum(Ja * (r[:, None] * Jb - CJb), axis=0)
        else:
            out = Ja.T @ (r[:, None] * Jb - CJb)
        return acc + 2.0 * out, None

    init = jnp.zeros((d,) if diagonal else (d, d), J.dtype)
    H, _ = jax.lax.scan(term, init, pairs)
    return H if diagonal else 0.5 * (H + H.T)


class _Problem(eqx.Module):
    """`L(θ; D') + γ s HSIC_w(f_θ(X_S), V_S)` on flat parameters, at a fixed bandwidth."""

    unravel: object
    data: Dataset
    lam: Float[Array, ""]
    sample: PenaltySample
    strength: Float[Array, ""]
    bandwidth: Float[Array, ""]
    output: str = eqx.field(static=True)

    @property
    def gs(self):
        return self.strength * self.sample.scale

    def F(self, theta):
        return outputs(self.unravel(theta), self.sample.X, self.output)

    def evaluate(self, theta):
        """`(L_hsic, ∇L_hsic, HSIC_w)` at `theta`.

        One pass builds `W = B ∘ K` and one matrix product `W [F, 1]` gives both the
        value (`Σ W`) and the output gradient `−(2/σ²) Σ_j W_ij (F_i − F_j)`; written as
        separate reductions over `W`, XLA:CPU recomputed the kernel in each and the
        evaluation took twice as long.
        """
        Lval, Lgrad = jax.value_and_grad(lambda t: objective(self.unravel(t), self.data, self.lam))(
            theta
        )
        F, vjp = jax.vjp(self.F, theta)
        sigma = self.bandwidth
        W = self.sample.B * _gram(F, sigma)
        R = W @ jnp.concatenate([F, jnp.ones((F.shape[0], 1), F.dtype)], axis=1)
        rows = R[:, -1:]
        h = jnp.sum(rows)
        (g_pen,) = vjp(-(2.0 / sigma**2) * (rows * F - R[:, :-1]))
        return Lval + self.gs * h, Lgrad + self.gs * g_pen, h

    def value(self, theta):
        """The objective, with the HSIC term in its centred form (for tests)."""
        K = _gram(self.F(theta), self.bandwidth)
        h = weighted_value(K, self.sample.B, self.sample.p)
        return objective(self.unravel(theta), self.data, self.lam) + self.gs * h

    def penalty_curvature(self, theta, diagonal=False):
        """`∇²_θ HSIC_w` (Gauss-Newton form; exact for outputs linear in θ), unscaled."""
        X = self.sample.X

        def one(t, x):
            return outputs(self.unravel(t), x[None], self.output)[0]

        F = self.F(theta)
        J = jax.vmap(lambda x: jax.jacrev(one)(theta, x))(X)
        K = _gram(F, self.bandwidth)
        return _pair_terms(F, J, self.sample.B, K, self.bandwidth, diagonal)


def _add_penalty(P, H, gs):
    """`P + gs·H`, with `H` projected onto the PSD cone if the sum is not positive
    definite. Returns `(precision, projected)`."""
    if isinstance(P, DiagonalPrecision):
        neg = jnp.any(P.diag + gs * H <= 0)
        Hp = jnp.where(neg, jnp.maximum(H, 0.0), H)
        return DiagonalPrecision(P.diag + gs * Hp), neg
    A, ok = P.dense_update(gs * H)

    def project(_):
        # Measured on Adult: flooring the eigenvalues of the whitened sum
        # `I + γs L⁻¹HL⁻ᵀ` at 0.01-1 instead converged no faster, often slower.
        evals, evecs = jnp.linalg.eigh(H)
        Hp = (evecs * jnp.maximum(evals, 0.0)) @ evecs.T
        return P.dense_update(gs * Hp)[0]

    A = jax.lax.cond(ok, lambda _: A, project, None)
    return A, ~ok


def _chord_loop(problem: _Problem, theta, direction, A0, steps: int, tol, start=None, fresh=False):
    """Up to `steps` steps `θ ← θ − a A⁻¹ ∇` with `A = direction(θ)` (or `A0` when
    `direction` is None, and at the first step when `fresh`: `A0` is `direction(theta)`),
    `a` by Armijo backtracking (the full step near the optimum); stops once `‖∇‖ ≤ tol`.
    `start` is `problem.evaluate(theta)` if already known.
    Returns `(θ, (value, gradient, HSIC) at θ, HSIC at the start, last A, steps)`."""
    eps = jnp.finfo(theta.dtype).eps
    val0, g0, h0 = problem.evaluate(theta) if start is None else start

    def cond(c):
        _, _, g, _, _, i = c
        return (i < steps) & (jnp.linalg.norm(g) > tol)

    def body(c):
        t, val, g, h, A, i = c
        if direction is not None:
            A = jax.lax.cond(fresh & (i == 0), lambda _: A, lambda _: direction(t), None)
        d = A.solve(g)
        slope = -jnp.dot(g, d)
        noise = 100 * eps * jnp.maximum(jnp.abs(val), 1.0)

        def ls_cond(ls):
            a, ev = ls
            return (ev[0] > val + 1e-4 * a * slope + noise) & (a > 1e-10)

        def ls_body(ls):
            a, _ = ls
            a = 0.5 * a
            return a, problem.evaluate(t - a * d)

        a, ev = jax.lax.while_loop(ls_cond, ls_body, (jnp.ones_like(val), problem.evaluate(t - d)))
        val, g, h = ev
        return t - a * d, val, g, h, A, i + 1

    init = (theta, val0, g0, h0, A0, jnp.array(0))
    t, val, g, h, A, i = jax.lax.while_loop(cond, body, init)
    return t, (val, g, h), h0, A, i


# --------------------------------------------------------------------------------------
# The transform.


class IndependenceInfo(NamedTuple):
    """Diagnostics of an independence step.

    Attributes:
        hsic_before: the weighted HSIC of outputs and attribute on the retained sample,
            at the incoming mean (unscaled, not multiplied by `γ s`).
        hsic_after: the same at the result.
        steps: Newton plus refine steps taken.
        grad_norm: `‖∇L_hsic‖` at the result.
        step_norm: `‖θ' − θ‖`, the distance the mean moved.
        projected: whether the penalty's curvature was projected onto the PSD cone at
            the Newton step (the exact `Λ + γ s ∇²HSIC` was not positive definite).
        bandwidth: the output kernel's bandwidth (chosen once per update).
        scale: `s`, the retained weight the HSIC term is multiplied by (with `γ`).
    """

    hsic_before: Float[Array, ""]
    hsic_after: Float[Array, ""]
    steps: Int[Array, ""]
    grad_norm: Float[Array, ""]
    step_norm: Float[Array, ""]
    projected: Bool[Array, ""]
    bandwidth: Float[Array, ""]
    scale: Float[Array, ""]


def check_attribute(data: Dataset, attribute: str, who: str) -> None:
    """A clear ValueError for a missing or badly shaped attribute."""
    if not isinstance(attribute, str):
        raise ValueError(f"{who}: `attribute` must be a name (str); got {attribute!r}.")
    if attribute not in data.attributes:
        raise ValueError(
            f"{who}: the data has no attribute named {attribute!r}; its attributes are "
            f"{sorted(data.attributes)}. Name the attribute along which the deletion was "
            f"non-uniform or that the removed feature encoded (e.g. 'sex')."
        )
    V = data.attributes[attribute]
    if V.ndim not in (1, 2):
        raise ValueError(
            f"{who}: attribute {attribute!r} must have shape (n,) or (n, k); got {V.shape}."
        )


def _check_common(who, strength, steps, tol, output, max_rows, bandwidth, kernel):
    if isinstance(strength, bool) or not isinstance(strength, (int, float, np.number)):
        raise ValueError(f"{who}: `strength` must be a number ≥ 0; got {strength!r}.")
    if not (np.isfinite(strength) and strength >= 0):
        raise ValueError(
            f"{who}: `strength` (γ) must be finite and ≥ 0; got {strength}. It weighs the "
            f"HSIC penalty against the data term; 0 means no penalty."
        )
    if not isinstance(steps, (int, np.integer)) or isinstance(steps, bool) or steps < 0:
        raise ValueError(f"{who}: the number of steps must be a non-negative int; got {steps!r}.")
    if tol is not None and not tol > 0:
        raise ValueError(f"{who}: `tol` must be positive; got {tol}.")
    if output not in ("logits", "probs"):
        raise ValueError(f"{who}: `output` must be 'logits' or 'probs'; got {output!r}.")
    if isinstance(max_rows, bool) or not isinstance(max_rows, (int, np.integer)) or max_rows < 4:
        raise ValueError(f"{who}: `max_rows` must be an integer ≥ 4; got {max_rows!r}.")
    if bandwidth is not None and not bandwidth > 0:
        raise ValueError(f"{who}: `bandwidth` must be positive or None; got {bandwidth}.")
    if kernel is not None and not isinstance(kernel, AbstractKernel):
        raise ValueError(
            f"{who}: `kernel` (on the attribute) must be a ux.hsic kernel or None; got "
            f"{type(kernel).__name__}."
        )


class Independence(AbstractUnlearner):
    """Newton step (and chord refine steps) on the HSIC-penalised objective. See
    [`independence`][unlearnx.independence]."""

    attribute: str = eqx.field(static=True)
    # A NumPy scalar, so that `jit` traces it: a sweep over γ compiles once.
    strength: Float[ArrayLike, ""]
    refine_steps: int = eqx.field(static=True, default=0)
    tol: float | None = None
    kernel: AbstractKernel | None = None
    output: str = eqx.field(static=True, default="logits")
    max_rows: int = eqx.field(static=True, default=MAX_ROWS)
    bandwidth: float | None = None
    refresh: bool = eqx.field(static=True, default=True)

    def init_inner(self, posterior, data):
        check_attribute(data, self.attribute, "independence")
        return None

    def step(self, ctx, posterior, inner):
        theta, unravel = ravel(posterior.mean)
        problem = _make_problem(ctx.original, ctx.new, self, theta.dtype)
        P = posterior.precision
        diagonal = isinstance(P, DiagonalPrecision)

        def matrix(t):
            return _add_penalty(P, problem.penalty_curvature(t, diagonal), problem.gs)

        A, projected = matrix(theta)
        tol = -1.0 if self.tol is None else self.tol
        # The Newton step uses `A`; refine steps reuse it, or rebuild the penalty's part.
        first, ev, h0, A, i1 = _chord_loop(problem, theta, None, A, 1, tol)
        refresh = (lambda t: matrix(t)[0]) if self.refresh else None
        t, (_, g, h), _, A, i = _chord_loop(
            problem, first, refresh, A, self.refine_steps, tol, start=ev
        )
        post = LaplacePosterior(unravel(t), A, posterior.prior_precision, posterior.curvature)
        info = IndependenceInfo(
            h0,
            h,
            i1 + i,
            jnp.linalg.norm(g),
            jnp.linalg.norm(t - theta),
            projected,
            problem.bandwidth,
            problem.sample.scale,
        )
        return post, inner, info


def _make_problem(original: LaplacePosterior, data: Dataset, cfg, dtype) -> _Problem:
    """The penalised objective on `data`. Its output bandwidth (unless given) is the
    median heuristic of the `original` posterior mean's outputs on the retained sample:
    chosen once per update, then fixed, so that the objective is one smooth function."""
    V = data.attributes[cfg.attribute]
    sample = penalty_sample(data, V, cfg.kernel, cfg.max_rows)
    if cfg.bandwidth is None:
        F0 = outputs(original.mean, sample.X, cfg.output)
        bw = median_distance(F0, sample.p > 0).astype(dtype)
    else:
        bw = jnp.asarray(cfg.bandwidth, dtype)
    _, unravel = ravel(original.mean)
    lam = original.prior_precision
    return _Problem(unravel, data, lam, sample, jnp.asarray(cfg.strength, dtype), bw, cfg.output)


def independence(
    attribute: str,
    strength: float,
    *,
    refine_steps: int = 0,
    refresh: bool = True,
    tol: float | None = None,
    kernel: AbstractKernel | None = None,
    output: str = "logits",
    max_rows: int = MAX_ROWS,
    bandwidth: float | None = None,
) -> Independence:
    """Make the predictions independent of an attribute: a Newton step on
    `L_hsic(θ) = L(θ; D') + γ · s · HSIC(f_θ(X'), V')`, from the current posterior.

    `V'` is the attribute `attribute` of the retained rows (weight > 0): the group that
    a deletion removed most of, or the attribute that a removed feature encoded while
    its proxies stay in the data. `s = Σ w` is the retained weight (the retained row
    count for unit weights): `L` is a sum over rows and HSIC an average, so with the
    factor `s` the same `γ` strikes the same balance at any data size.

    The step, with `Λ` the incoming precision and `θ` the incoming mean:

        A  = Λ + γ s ∇²HSIC(θ)
        θ' = θ − A⁻¹ (∇L(θ; D') + γ s ∇HSIC(θ))

    `∇L(θ; D')` is one gradient pass over the edited data. After
    [`second_order`][unlearnx.second_order], `Λ` is the precision of `D'` (downdated
    at the pre-deletion mean), so this is the Newton step on `L_hsic` up to the change
    of the data curvature between the two means. The penalty's curvature is exact for
    models linear in their parameters (GLM logits) and of Gauss-Newton form otherwise;
    if `A` is not positive definite it is projected onto the PSD cone (`info.projected`).
    For a diagonal precision, its diagonal is added (clipped at 0 if needed).

    `refine_steps` more steps `θ ← θ − A⁻¹ ∇L_hsic(θ)` follow, each one gradient pass
    over the data plus one HSIC evaluation; with `refresh=True` (the default) the
    penalty's part of `A` is rebuilt at each step (O(max_rows² d + d³) more, no pass over
    the data), with `refresh=False` the factor of the Newton step is reused (pure chord
    steps). The HSIC penalty's curvature changes quickly along the path, and on UCI
    Adult (γ = 3) chord steps stalled at a relative distance of 4·10⁻² from the
    penalised retrain after 8 steps, where refreshed steps reached 10⁻³. Every step
    backtracks (Armijo) if it would not decrease `L_hsic`, and the steps stop early once
    `‖∇L_hsic‖ ≤ tol`. Converged, the result is
    [`retrain_independent`][unlearnx.retrain_independent]'s minimiser. The result's
    precision is the `A` of the last step.

    The HSIC is the biased statistic with weights `w_i/Σw` (deleted rows drop out),
    estimated on all retained rows or, above `max_rows`, on a systematic sample of
    `max_rows` of them (multiplied by the full `s`). Its kernels: on the outputs a
    Gaussian kernel whose bandwidth (unless `bandwidth` is given) is the median
    heuristic of the outputs of the posterior *before this update* on the retained
    sample, chosen once and then fixed (so that `L_hsic` is one smooth function: with
    the median recomputed at every iterate the steps chased a moving, non-smooth
    target); on the attribute a categorical kernel for integer codes and a
    median-heuristic Gaussian kernel for numbers.

    Args:
        attribute: the name of the attribute in `data.attributes`, e.g. `"sex"`.
        strength: `γ ≥ 0`, the weight of the penalty per retained row.
        refine_steps: steps after the Newton step.
        refresh: rebuild the penalty's curvature at each refine step.
        tol: stop early once `‖∇L_hsic‖₂ ≤ tol`.
        kernel: the kernel on the attribute (default: categorical for integers,
            median-heuristic Gaussian for floats).
        output: penalise the dependence of the `"logits"` (the model outputs) or of the
            predicted `"probs"`.
        max_rows: the largest sample the HSIC is estimated on: each evaluation costs
            O(max_rows²) time and memory, the curvature O(max_rows² d).
        bandwidth: a fixed bandwidth for the output kernel.

    Raises:
        ValueError: for a negative or non-finite `strength` or other bad arguments here,
            and at `init` for an attribute the data does not have.

    Example:
        ```python
        import jax, unlearnx as ux
        data = ux.datasets.synthetic_groups(jax.random.key(0), n=400, proxy_strength=2.0)
        model, _ = ux.fit(ux.models.LogisticRegression(data.n_features), data)
        post = ux.laplace(model, data)
        unlearner = ux.chain(ux.second_order(), ux.independence("group", 1.0, refine_steps=3))
        state = unlearner.init(post, data)
        post2, state, (_, info) = unlearner.update(ux.forget_features("group"), state)
        print(info.hsic_before, info.hsic_after)   # the dependence on the group drops
        ```
    """
    _check_common("independence", strength, refine_steps, tol, output, max_rows, bandwidth, kernel)
    return _config(
        attribute, strength, refine_steps, tol, kernel, output, max_rows, bandwidth, refresh
    )


def _config(attribute, strength, steps, tol, kernel, output, max_rows, bandwidth, refresh=True):
    return Independence(
        attribute,
        np.asarray(float(strength), dtype=np.float64),
        int(steps),
        None if tol is None else float(tol),
        kernel,
        output,
        int(max_rows),
        None if bandwidth is None else float(bandwidth),
        bool(refresh),
    )


# --------------------------------------------------------------------------------------
# The baseline: exact retraining on the penalised objective.


@eqx.filter_jit
def _newton_penalised(theta0, original, data, cfg, curvature, tol, max_steps):
    problem = _make_problem(original, data, cfg, theta0.dtype)
    unravel, lam = problem.unravel, problem.lam
    d = theta0.shape[0]

    def matrix(t):
        C = data_curvature(t, unravel, data, curvature)
        P, _ = DensePrecision.from_matrix(C + lam * jnp.eye(d, dtype=t.dtype))
        return _add_penalty(P, problem.penalty_curvature(t), problem.gs)

    start = problem.evaluate(theta0)
    scaled_tol = tol * jnp.maximum(jnp.linalg.norm(start[1]), 1.0)
    A0, _ = matrix(theta0)
    t, (_, g, _), _, _, i = _chord_loop(
        problem, theta0, lambda t: matrix(t)[0], A0, max_steps, scaled_tol, start, fresh=True
    )
    A, _ = matrix(t)
    gnorm = jnp.linalg.norm(g)
    return t, A, gnorm, i, gnorm <= scaled_tol


@eqx.filter_jit
def _lbfgs_penalised(theta0, original, data, cfg, curvature, tol, max_steps):
    """The same objective minimised by optax L-BFGS (zoom line search): what a generic
    training loop would run, with no curvature of the penalty needed."""
    problem = _make_problem(original, data, cfg, theta0.dtype)
    unravel, lam = problem.unravel, problem.lam
    d = theta0.shape[0]
    opt = optax.lbfgs()

    def value(t):
        return problem.evaluate(t)[0]

    _, g0, _ = problem.evaluate(theta0)
    scaled_tol = tol * jnp.maximum(jnp.linalg.norm(g0), 1.0)

    def cond(c):
        _, _, g, i = c
        return (i < max_steps) & (jnp.linalg.norm(g) > scaled_tol)

    def body(c):
        t, state, g, i = c
        val, g = problem.evaluate(t)[:2]
        updates, state = opt.update(g, state, t, value=val, grad=g, value_fn=value)
        t = optax.apply_updates(t, updates)
        return t, state, problem.evaluate(t)[1], i + 1

    t, _, g, i = jax.lax.while_loop(cond, body, (theta0, opt.init(theta0), g0, jnp.array(0)))
    C = data_curvature(t, unravel, data, curvature)
    P, _ = DensePrecision.from_matrix(C + lam * jnp.eye(d, dtype=t.dtype))
    A, _ = _add_penalty(P, problem.penalty_curvature(t), problem.gs)
    gnorm = jnp.linalg.norm(g)
    return t, A, gnorm, i, gnorm <= scaled_tol


def retrain_independent(
    posterior: LaplacePosterior,
    data: Dataset,
    request: Request,
    attribute: str,
    strength: float,
    *,
    kernel: AbstractKernel | None = None,
    output: str = "logits",
    max_rows: int = MAX_ROWS,
    bandwidth: float | None = None,
    warm: bool = True,
    tol: float | None = None,
    max_steps: int | None = None,
    solver: str = "newton",
) -> LaplacePosterior:
    """Exact retraining on the HSIC-penalised objective: the baseline for
    [`independence`][unlearnx.independence].

    Minimises `L(θ; D') + γ · s · HSIC(f_θ(X'), V')` on the edited data `D'` (the same
    objective, sample, kernels and bandwidth rule as `independence`) by Newton's method on
    the flat parameters: each step builds the dense Hessian of `L` (a pass over all rows)
    plus the penalty's curvature, and backtracks (Armijo). The Laplace precision at the
    solution is `∇²L + γ s ∇²HSIC` (projected as in `independence`). Dense precisions
    only: `d × d` must fit in memory.

    Args:
        posterior: the posterior before the request (its mean is the warm start).
        data: the data it was fitted on.
        request: what to forget.
        attribute: the attribute to make the predictions independent of.
        strength: `γ ≥ 0`.
        kernel: the kernel on the attribute (see `independence`).
        output: `"logits"` or `"probs"`.
        max_rows: the largest sample the HSIC is estimated on.
        bandwidth: a fixed output bandwidth instead of the median heuristic.
        warm: start from the posterior mean (`True`) or from zeros.
        tol: stop once `‖∇L_hsic‖ ≤ tol · max(‖∇L_hsic(θ₀)‖, 1)` (default 1e-10 in
            float64, 1e-5 in float32).
        max_steps: the most iterations (default 100 for Newton, 5,000 for L-BFGS).
        solver: `"newton"` (the default: the fastest and most accurate here, and the
            oracle the transform is tested against) or `"lbfgs"` (optax L-BFGS: what a
            generic training loop runs, needing no curvature of the penalty).

    Raises:
        ValueError: for an unknown attribute, a negative strength or other bad input.
        RuntimeError: if Newton's method did not converge.

    Example:
        ```python
        import jax, unlearnx as ux
        data = ux.datasets.synthetic_groups(jax.random.key(0), n=400, proxy_strength=2.0)
        model, _ = ux.fit(ux.models.LogisticRegression(data.n_features), data)
        post = ux.laplace(model, data)
        exact = ux.retrain_independent(post, data, ux.forget_features("group"), "group", 1.0)
        ```
    """
    who = "retrain_independent"
    if not isinstance(posterior, LaplacePosterior):
        raise ValueError(
            f"{who}: `posterior` must be a ux.LaplacePosterior; got {type(posterior).__name__}."
        )
    check_model_data(posterior.mean, data, who)
    check_attribute(data, attribute, who)
    if solver not in ("newton", "lbfgs"):
        raise ValueError(f"{who}: unknown `solver={solver!r}`; use 'newton' or 'lbfgs'.")
    if max_steps is None:
        max_steps = 100 if solver == "newton" else 5000
    _check_common(who, strength, max_steps, tol, output, max_rows, bandwidth, kernel)
    if isinstance(posterior.precision, DiagonalPrecision):
        raise ValueError(
            f"{who}: needs a dense precision (structure='full'); Newton's method on the "
            f"penalised objective builds the d × d Hessian."
        )
    new = as_edit(request, data).apply(data)
    theta, unravel = ravel(posterior.mean)
    if not warm:
        theta = jnp.zeros_like(theta)
    cfg = _config(attribute, strength, 0, None, kernel, output, max_rows, bandwidth)
    if tol is None:
        tol = 1e-10 if theta.dtype == jnp.float64 else 1e-5
    run = _newton_penalised if solver == "newton" else _lbfgs_penalised
    t, A, gnorm, steps, converged = run(
        theta, posterior, new, cfg, posterior.curvature, float(tol), int(max_steps)
    )
    if not bool(converged):
        raise RuntimeError(
            f"{who}: {solver} stopped after {int(steps)} steps with "
            f"‖∇L_hsic‖ = {float(gnorm):.3g}; try a smaller `strength` or more `max_steps`."
        )
    return LaplacePosterior(unravel(t), A, posterior.prior_precision, posterior.curvature)
