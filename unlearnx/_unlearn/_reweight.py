"""Reweighting the retained rows back to the pre-deletion distribution of an attribute.

A non-uniform deletion (most of one group gone) shifts the distribution of an attribute
`V` among the retained rows. Importance weights `β_i` on the retained rows that restore
the pre-deletion distribution of `V` (kernel mean matching, Huang et al. 2007) undo the
shift for everything that depends on the data only through `V`; the posterior then moves
by a Newton step on the reweighted objective `Σ_i β_i w_i ℓ_i(θ) + (λ/2)‖θ‖²`.

Only aggregate statistics of the data before deletion are kept, never rows: for a
categorical `V` its weighted histogram, for a numeric `V` its kernel mean embedding at a
fixed grid of reference points.
"""

from __future__ import annotations

from typing import NamedTuple

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax

from .._curvature._factors import data_curvature
from .._curvature._precision import DensePrecision, DiagonalPrecision
from .._custom_types import Array, Bool, Float, Int
from .._data._dataset import Dataset
from .._hsic._kernels import AbstractKernel, CategoricalKernel, GaussianKernel
from .._models._base import ravel
from .._posterior._laplace import LaplacePosterior
from ._base import AbstractUnlearner
from ._independence import check_attribute
from ._refine import Refine


class ReweightState(eqx.Module):
    """What `reweight` keeps from the data before any deletion: aggregates of the
    attribute only, no per-row data.

    Attributes:
        histogram: for a categorical attribute, the weighted count of each level (codes
            `0..G−1`), and last the count of any other code (e.g. `-1` for missing);
            `None` for a numeric attribute.
        reference: for a numeric attribute, the reference points `z_r`: an evenly spaced
            grid over mean ± 3 standard deviations; else `None`.
        embedding: the kernel mean embedding `μ(z_r) = Σ_i w_i k(v_i, z_r) / Σ_i w_i` at
            the reference points; else `None`.
        bandwidth: the Gaussian kernel's bandwidth for the embedding; else `None`.
    """

    histogram: Float[Array, " g"] | None
    reference: Float[Array, " r"] | None
    embedding: Float[Array, " r"] | None
    bandwidth: Float[Array, ""] | None


class ReweightInfo(NamedTuple):
    """Diagnostics of a reweighting step.

    Attributes:
        weights: the importance weights `β_i` of all rows (0 for deleted rows), scaled
            so that `Σ β_i w_i = Σ w_i`.
        effective_size: Kish's effective sample size `(Σ β w)² / Σ (β w)²`.
        mismatch: how far the reweighted attribute is from the stored pre-deletion
            distribution: the total variation distance of the histograms (categorical)
            or the largest difference of the embeddings at the reference points.
        clipped: whether some weight was capped at `max_weight`.
        fallback: whether the reweighted precision was not positive definite and the
            incoming precision was used for the step instead.
        steps: Newton plus refine steps taken.
        grad_norm: `‖∇L_β(θ)‖` of the reweighted objective at the result.
    """

    weights: Float[Array, " n"]
    effective_size: Float[Array, ""]
    mismatch: Float[Array, ""]
    clipped: Bool[Array, ""]
    fallback: Bool[Array, ""]
    steps: Int[Array, ""]
    grad_norm: Float[Array, ""]


def _bins(V, n_levels):
    """Histogram bin of each row: its code for codes `0..G−1`, `G` for anything else."""
    return jnp.where((V >= 0) & (V < n_levels), V, n_levels).astype(jnp.int32)


def _features(V, reference, bandwidth):
    return jnp.exp(-((V[:, None] - reference[None, :]) ** 2) / (2.0 * bandwidth**2))


def _tilt(phi, q, target, ridge, max_steps):
    """Kernel mean matching in its entropy-regularised dual (exponential tilting): the
    weights `β_i ∝ exp(φ_iᵀ α)` closest to uniform in KL divergence whose mean of the
    features `φ` under `q` matches `target`, with a ridge `ρ‖α‖²/2` that keeps `α`
    finite when the target is out of reach. Convex and smooth in the `r` numbers `α`;
    solved with optax's L-BFGS."""

    def f(a):
        z = phi @ a
        return jax.nn.logsumexp(z, b=q) - jnp.dot(a, target) + 0.5 * ridge * jnp.dot(a, a)

    opt = optax.lbfgs()
    value_and_grad = optax.value_and_grad_from_state(f)
    a0 = jnp.zeros(phi.shape[1], phi.dtype)
    tol = 10 * jnp.finfo(phi.dtype).eps ** 0.5

    def cond(carry):
        _, state, i = carry
        g = optax.tree.get(state, "grad")
        return (i == 0) | ((i < max_steps) & (jnp.linalg.norm(g) > tol))

    def body(carry):
        a, state, i = carry
        val, g = value_and_grad(a, state=state)
        updates, state = opt.update(g, state, a, value=val, grad=g, value_fn=f)
        return optax.apply_updates(a, updates), state, i + 1

    a, _, _ = jax.lax.while_loop(cond, body, (a0, opt.init(a0), 0))
    z = phi @ a
    return jnp.exp(z - jax.nn.logsumexp(z, b=q))  # mean 1 under q


class Reweight(AbstractUnlearner):
    """Importance weights toward the pre-deletion attribute distribution, then a Newton
    step on the reweighted objective. See [`reweight`][unlearnx.reweight]."""

    attribute: str = eqx.field(static=True)
    kernel: AbstractKernel | None = None
    max_weight: float = 10.0
    refine_steps: int = eqx.field(static=True, default=0)
    tol: float | None = None
    n_reference: int = eqx.field(static=True, default=32)
    ridge: float = 1e-4
    max_solver_steps: int = eqx.field(static=True, default=200)

    def init_inner(self, posterior, data: Dataset) -> ReweightState:
        check_attribute(data, self.attribute, "reweight")
        V = data.attributes[self.attribute]
        if V.ndim != 1:
            raise ValueError(
                f"reweight: attribute {self.attribute!r} must be one column (shape (n,)); "
                f"got {V.shape}."
            )
        w = data.weights
        categorical = jnp.issubdtype(V.dtype, jnp.integer) or V.dtype == jnp.bool_
        if categorical:
            if self.kernel is not None and not isinstance(self.kernel, CategoricalKernel):
                raise ValueError(
                    f"reweight: attribute {self.attribute!r} holds integer codes; its kernel "
                    f"must be CategoricalKernel() or None, not {type(self.kernel).__name__}."
                )
            G = _n_levels(data, self.attribute)
            hist = jax.ops.segment_sum(w, _bins(V.astype(jnp.int32), G), G + 1)
            return ReweightState(hist, None, None, None)
        if self.kernel is not None and not isinstance(self.kernel, GaussianKernel):
            raise ValueError(
                f"reweight: for the numeric attribute {self.attribute!r} the kernel must be a "
                f"GaussianKernel (or None); got {type(self.kernel).__name__}."
            )
        V = V.astype(w.dtype)
        q = w / jnp.sum(w)
        mean = jnp.dot(q, V)
        std = jnp.sqrt(jnp.dot(q, (V - mean) ** 2))
        std = jnp.where(std > 0, std, 1.0)
        reference = mean + std * jnp.linspace(-3.0, 3.0, self.n_reference, dtype=w.dtype)
        if self.kernel is not None and self.kernel.bandwidth is not None:
            bandwidth = jnp.asarray(self.kernel.bandwidth, w.dtype)
        else:
            bandwidth = 0.5 * std
        embedding = q @ _features(V, reference, bandwidth)
        return ReweightState(None, reference, embedding, bandwidth)

    def weights(self, data: Dataset, inner: ReweightState):
        """`(β, mismatch, clipped)` for the retained rows of `data`."""
        w = data.weights
        keep = w > 0
        V = data.attributes[self.attribute]
        if inner.histogram is not None:
            hist = inner.histogram
            G = hist.shape[0] - 1
            b = _bins(V.astype(jnp.int32), G)
            after = jax.ops.segment_sum(w, b, G + 1)
            before = hist / jnp.sum(hist)
            ratio = jnp.where(
                after > 0, before * jnp.sum(after) / jnp.where(after > 0, after, 1), 0
            )
            clipped = jnp.any(ratio > self.max_weight)
            beta = jnp.where(keep, jnp.minimum(ratio, self.max_weight)[b], 0.0)
            beta = beta * jnp.sum(w) / jnp.sum(beta * w)
            achieved = jax.ops.segment_sum(beta * w, b, G + 1)
            mismatch = 0.5 * jnp.sum(jnp.abs(achieved / jnp.sum(achieved) - before))
            return beta, mismatch, clipped
        V = V.astype(w.dtype)
        phi = _features(V, inner.reference, inner.bandwidth)
        q = w / jnp.sum(w)
        beta = _tilt(phi, q, inner.embedding, self.ridge, self.max_solver_steps)
        clipped = jnp.any(jnp.where(keep, beta, 0.0) > self.max_weight)
        beta = jnp.where(keep, jnp.minimum(beta, self.max_weight), 0.0)
        beta = beta * jnp.sum(w) / jnp.sum(beta * w)
        mismatch = jnp.max(jnp.abs((q * beta) @ phi - inner.embedding))
        return beta, mismatch, clipped

    def step(self, ctx, posterior, inner):
        data = ctx.new
        beta, mismatch, clipped = self.weights(data, inner)
        bw = beta * data.weights
        data_beta = eqx.tree_at(lambda d: d.weights, data, bw)
        theta, unravel = ravel(posterior.mean)
        lam = posterior.prior_precision
        P = posterior.precision
        # The weights of every retained row change, so does the curvature: one pass.
        if isinstance(P, DiagonalPrecision):
            C = data_curvature(theta, unravel, data_beta, posterior.curvature, diagonal=True)
            new = DiagonalPrecision(C + lam)
            ok = jnp.all(new.diag > 0)
            new = DiagonalPrecision(jnp.where(ok, new.diag, P.diag))
        else:
            C = data_curvature(theta, unravel, data_beta, posterior.curvature)
            new, ok = DensePrecision.from_matrix(C + lam * jnp.eye(C.shape[0], dtype=C.dtype))
            new = jax.lax.cond(ok, lambda _: new, lambda _: P, None)
        post = LaplacePosterior(posterior.mean, new, lam, posterior.curvature)
        # The Newton step is the first chord step with the reweighted precision.
        refine = Refine(1 + self.refine_steps, self.tol)
        post, _, rinfo = refine.step(ctx._replace(new=data_beta), post, None)
        ess = jnp.sum(bw) ** 2 / jnp.sum(bw**2)
        info = ReweightInfo(beta, ess, mismatch, clipped, ~ok, rinfo.steps, rinfo.grad_norm)
        return post, inner, info


def _n_levels(data: Dataset, attribute: str) -> int:
    for name, levels in data.levels:
        if name == attribute:
            return len(levels)
    codes = np.asarray(data.attributes[attribute])
    return int(codes.max()) + 1 if codes.size and codes.max() >= 0 else 1


def reweight(
    attribute: str,
    *,
    kernel: AbstractKernel | None = None,
    max_weight: float = 10.0,
    refine_steps: int = 0,
    tol: float | None = None,
    n_reference: int = 32,
    ridge: float = 1e-4,
) -> Reweight:
    """Reweight the retained rows back to the pre-deletion distribution of an attribute,
    then take a Newton step on the reweighted objective.

    At `init` the transform stores aggregates of the attribute `V` over the data before
    any deletion, and nothing else (see [`ReweightState`][unlearnx.ReweightState]):

    - categorical `V` (integer codes): its weighted histogram. After a deletion, each
      retained row of level `g` gets the weight `β_g = p_before(g) / p_after(g)`,
      capped at `max_weight`: the reweighted histogram of the retained rows then equals
      the stored one (exactly, unless a level was deleted entirely or a weight capped).
    - numeric `V`: its kernel mean embedding `μ(z_r) = mean_i k(v_i, z_r)` at
      `n_reference` points `z_r` evenly spaced over mean ± 3 standard deviations, with a
      Gaussian kernel (bandwidth: the kernel's, or half the standard deviation). After a
      deletion the weights match the retained rows' embedding to it: kernel mean
      matching (Huang et al. 2007) in its entropy-regularised dual, `β_i ∝ exp(φ_iᵀ α)`
      with `φ_i = k(v_i, z_·)`, the weights closest to uniform (in KL divergence) that
      match the embedding, a ridge `ρ‖α‖²/2` keeping them finite when the target is out
      of reach; the `r`-dimensional dual is solved with optax's L-BFGS under `jit`.

    The weights are scaled so that `Σ β_i w_i = Σ w_i` (the retained weight; the
    posterior's concentration does not change), and the mean moves by the Newton step on
    `L_β(θ) = Σ_i β_i w_i ℓ_i(θ) + (λ/2)‖θ‖²`: `θ' = θ − ∇²L_β(θ)⁻¹ ∇L_β(θ)`, then
    `refine_steps` chord steps with the same factor. Because the weights of every retained
    row change, so does the curvature: the step recomputes it with one pass over the
    retained rows (O(n d²)), and each refine step costs a gradient pass. The result's
    precision is `∇²L_β` at the incoming mean.

    Put refinement inside (`refine_steps`) rather than chaining `ux.refine()` after this
    transform: `refine` sees the unweighted data and would walk back to its optimum.

    Args:
        attribute: the attribute in `data.attributes`, e.g. `"sex"`.
        kernel: `CategoricalKernel()` (or `None`) for codes; a `GaussianKernel` (or
            `None`) for numbers, its bandwidth fixing the embedding's.
        max_weight: the largest weight `β` (before the total is rescaled).
        refine_steps: chord steps after the Newton step.
        tol: stop the steps early once `‖∇L_β‖₂ ≤ tol`.
        n_reference: the number of reference points of a numeric attribute.
        ridge: `ρ`, the ridge of the numeric dual problem.

    Example:
        ```python
        import numpy as np, unlearnx as ux
        data = ux.datasets.german().train
        model, _ = ux.fit(ux.models.LogisticRegression(data.n_features), data)
        post = ux.laplace(model, data)
        women = np.flatnonzero(np.asarray(data.attribute("sex")) == 1)
        unlearner = ux.chain(ux.second_order(), ux.reweight("sex", refine_steps=2))
        state = unlearner.init(post, data)
        post2, state, (_, info) = unlearner.update(ux.forget_rows(women[:150]), state)
        print(info.mismatch, info.effective_size)   # 0.0: proportions restored
        ```
    """
    if not isinstance(attribute, str):
        raise ValueError(f"reweight: `attribute` must be a name (str); got {attribute!r}.")
    if kernel is not None and not isinstance(kernel, AbstractKernel):
        raise ValueError(
            f"reweight: `kernel` must be a ux.hsic kernel or None; got {type(kernel).__name__}."
        )
    if not (np.isfinite(max_weight) and max_weight >= 1):
        raise ValueError(f"reweight: `max_weight` must be finite and ≥ 1; got {max_weight}.")
    if isinstance(refine_steps, bool) or not isinstance(refine_steps, (int, np.integer)):
        raise ValueError(
            f"reweight: `refine_steps` must be a non-negative int; got {refine_steps!r}."
        )
    if refine_steps < 0:
        raise ValueError(
            f"reweight: `refine_steps` must be a non-negative int; got {refine_steps!r}."
        )
    if tol is not None and not tol > 0:
        raise ValueError(f"reweight: `tol` must be positive; got {tol}.")
    if isinstance(n_reference, bool) or not isinstance(n_reference, (int, np.integer)):
        raise ValueError(f"reweight: `n_reference` must be an int ≥ 2; got {n_reference!r}.")
    if n_reference < 2:
        raise ValueError(f"reweight: `n_reference` must be an int ≥ 2; got {n_reference!r}.")
    if not (np.isfinite(ridge) and ridge > 0):
        raise ValueError(f"reweight: `ridge` must be positive; got {ridge}.")
    return Reweight(
        attribute,
        kernel,
        float(max_weight),
        int(refine_steps),
        None if tol is None else float(tol),
        int(n_reference),
        float(ridge),
    )
