"""Laplace posteriors `N(θ*, Λ⁻¹)` around a MAP fit: construction, sampling, predictive,
marginal likelihood and prior-precision tuning."""

from __future__ import annotations

import math
from typing import Literal

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import scipy.optimize

from .._curvature._factors import Curvature
from .._curvature._precision import AbstractPrecision, DensePrecision, DiagonalPrecision
from .._curvature._registry import available, structure_class
from .._custom_types import Array, Float, PRNGKeyArray, Scalar
from .._data._dataset import Dataset
from .._fit import check_model_data
from .._models._base import AbstractModel, ravel
from .._models._likelihood import Bernoulli, Categorical, Gaussian
from .._objective import objective

Structure = Literal["full", "diag", "kfac", "ekfac", "lowrank", "last_layer", "matrix_free"]
Predictive = Literal["probit", "linear_mc", "mc", "map"]

_GIB = 2**30


class LaplacePosterior(eqx.Module):
    """A Gaussian posterior `N(θ*, Λ⁻¹)` over a model's parameters.

    Attributes:
        mean: the model at the posterior mean `θ*` (an Equinox module).
        precision: the posterior precision `Λ = Σ_i w_i ∇²ℓ_i(θ*) + λ I`, as a structured
            matrix ([`DensePrecision`][unlearnx.DensePrecision] or
            [`DiagonalPrecision`][unlearnx.DiagonalPrecision]).
        prior_precision: `λ`.
        curvature: `"ggn"` (generalised Gauss-Newton) or `"hessian"` (exact).

    Example:
        ```python
        import jax, unlearnx as ux
        data = ux.datasets.diabetes().train
        model, _ = ux.fit(ux.models.LogisticRegression(data.n_features), data)
        post = ux.laplace(model, data, prior_precision=1.0)
        probs = post.predict(data.X[:5])
        ```
    """

    mean: AbstractModel
    precision: AbstractPrecision
    prior_precision: Float[Array, ""]
    curvature: str = eqx.field(static=True, default="ggn")

    @property
    def theta(self) -> Float[Array, " d"]:
        """The posterior mean as one flat vector."""
        return ravel(self.mean)[0]

    def sample(self, key: PRNGKeyArray, n: int) -> AbstractModel:
        """`n` parameter draws, as one model whose parameter arrays have a leading axis `n`
        (use with `jax.vmap`)."""
        theta, unravel = ravel(self.mean)
        draws = theta + self.precision.sample(key, n)
        return jax.vmap(unravel)(draws)

    def predict(
        self,
        X: Float[Array, "m p"],
        *,
        method: Predictive = "probit",
        n_samples: int = 100,
        key: PRNGKeyArray | None = None,
    ) -> Float[Array, "m c"]:
        """Posterior predictive mean of `y` at the rows of `X`.

        Args:
            X: inputs.
            method: `"probit"` (linearised model, closed-form probit approximation for
                binary and mean-field for multi-class; exact for regression),
                `"linear_mc"` (linearised model, Monte Carlo over the Gaussian logits),
                `"mc"` (Monte Carlo over parameter draws, no linearisation) or `"map"`
                (the point estimate).
            n_samples: draws for the Monte Carlo methods.
            key: PRNG key, required for the Monte Carlo methods.

        Returns:
            Class probabilities `(m, C)` (for a binary model, `(m, 1)` holding
            `p(y = 1)`), or predictive means `(m, 1)` for regression.
        """
        lik = self.mean.likelihood
        if method == "map":
            return self.mean.predict_proba(X)
        if method in ("linear_mc", "mc") and key is None:
            raise ValueError(f"LaplacePosterior.predict: method={method!r} needs a `key`.")
        if method == "mc":
            models = self.sample(key, n_samples)
            probs = jax.vmap(lambda m: m.predict_proba(X))(models)
            return jnp.mean(probs, axis=0)
        if method not in ("probit", "linear_mc"):
            raise ValueError(
                f"LaplacePosterior.predict: unknown method={method!r}; use 'probit', "
                f"'linear_mc', 'mc' or 'map'."
            )
        mu, cov = self.predictive_moments(X)
        if method == "linear_mc":
            c = mu.shape[-1]
            Lc = jnp.linalg.cholesky(cov + 1e-10 * jnp.eye(c, dtype=cov.dtype))
            eps = jax.random.normal(key, (n_samples,) + mu.shape, mu.dtype)
            f = mu + jnp.einsum("mij,smj->smi", Lc, eps)
            return jnp.mean(jax.vmap(jax.vmap(lik.mean))(f), axis=0)
        var = jnp.diagonal(cov, axis1=-2, axis2=-1)
        if isinstance(lik, Gaussian):
            return mu
        scaled = mu / jnp.sqrt(1.0 + math.pi / 8.0 * var)
        if isinstance(lik, (Bernoulli, Categorical)):
            return jax.vmap(lik.mean)(scaled)
        raise ValueError(f"probit predictive is not defined for {type(lik).__name__}.")

    def predictive_moments(
        self, X: Float[Array, "m p"]
    ) -> tuple[Float[Array, "m c"], Float[Array, "m c c"]]:
        """Mean `(m, c)` and covariance `(m, c, c)` of the linearised model's outputs
        `f(x; θ) ≈ f(x; θ*) + J(x)(θ − θ*)` under the posterior: `f(x; θ*)` and
        `J Λ⁻¹ Jᵀ`, by the precision's
        [`functional_covariance`][unlearnx.AbstractPrecision.functional_covariance]
        (compiled once per structure, model and shape of `X`)."""
        return _functional_covariance(self.precision, self.mean, X)

    def log_marginal_likelihood(self, data: Dataset) -> Scalar:
        """Laplace approximation of `log p(D) ≈ −L(θ*; D) + (d/2) log λ − ½ log det Λ`,
        with `L` the sum-form objective (negative log joint up to the Gaussian's 2π
        terms, which cancel). For a last-layer posterior the frozen parameters are
        hyperparameters: `d`, `‖θ‖²` and `log det Λ` are those of the last layer."""
        theta = self.theta
        d, sq = _active_size_and_norm(self.precision, theta)
        lam = self.prior_precision
        return (
            -objective(self.mean, data, 0.0)
            - 0.5 * lam * sq
            + 0.5 * d * jnp.log(lam)
            - 0.5 * self.precision.logdet()
        )


@eqx.filter_jit
def _functional_covariance(precision, model, X):
    return precision.functional_covariance(model, X)


def _active_size_and_norm(precision, theta):
    """`(d, ‖θ‖²)` over the parameters the posterior is over (all, or the last layer)."""
    from .._curvature._lastlayer import LastLayerPrecision

    if isinstance(precision, LastLayerPrecision):
        active = theta[precision.layer.index().ravel()]
        return precision.n_active, jnp.sum(active**2)
    return theta.shape[0], jnp.sum(theta**2)


def _fits(model, n_rows, budget, options, exclude):
    """`(name, bytes)` of the structures (other than `exclude`) whose default build fits in
    `budget` bytes, cheapest last."""
    out = []
    for name in available():
        if name == exclude:
            continue
        try:
            need = structure_class(name).memory_estimate(model, n_rows)
        except (NotImplementedError, ValueError):
            continue
        if need <= budget:
            out.append((name, need))
    return out


@eqx.filter_jit
def _build(cls, model, data, lam, curvature, options):
    # One compiled build per structure, model and data shapes: later calls reuse it.
    return cls.from_data(model, data, lam, curvature, **options)


def laplace(
    model: AbstractModel,
    data: Dataset,
    *,
    prior_precision: float = 1.0,
    structure: Structure = "full",
    curvature: Curvature = "ggn",
    max_memory_gb: float = 4.0,
    **options,
) -> LaplacePosterior:
    """The Laplace posterior `N(θ*, Λ⁻¹)` at a fitted model, `Λ = Σ w_i ∇²ℓ_i + λI`.

    Args:
        model: the MAP model `θ*` (e.g. from [`fit`][unlearnx.fit]).
        data: the data it was fitted on.
        prior_precision: `λ`, the same value used for fitting.
        structure: how `Λ` is stored and approximated: `"full"` (dense `d × d` with its
            Cholesky factor; GLMs and small networks), `"diag"` (diagonal), `"kfac"` and
            `"ekfac"` (Kronecker-factored per layer, for models of `eqx.nn.Linear` and
            `eqx.nn.Conv2d` layers), `"lowrank"` (Lanczos low rank plus diagonal),
            `"last_layer"` (full curvature of the last layer, the rest frozen) or
            `"matrix_free"` (never materialised: products by JVP/VJP, solves by CG).
        curvature: `"ggn"` (generalised Gauss-Newton, positive semi-definite; equal to the
            Hessian for GLMs with canonical links) or `"hessian"` (exact; `"full"`,
            `"diag"` and `"matrix_free"` only).
        max_memory_gb: refuse to build a structure whose estimated peak memory exceeds
            this; the error lists the structures that would fit.
        **options: passed to the structure's builder (e.g. `rank=` for `"lowrank"`).

    Raises:
        ValueError: on bad arguments, or when the structure would not fit in memory.
        RuntimeError: when the precision is not positive definite (e.g. an exact
            Hessian at a saddle point of a network; use `curvature="ggn"`).

    Example:
        ```python
        import unlearnx as ux
        data = ux.datasets.diabetes().train
        model, _ = ux.fit(ux.models.LogisticRegression(data.n_features), data)
        post = ux.laplace(model, data, prior_precision=1.0)
        ```
    """
    check_model_data(model, data, "laplace")
    try:
        cls = structure_class(structure)
    except ValueError as e:
        raise ValueError(f"laplace: {e}") from None
    if curvature not in ("ggn", "hessian"):
        raise ValueError(f"laplace: unknown `curvature={curvature!r}`; use 'ggn' or 'hessian'.")
    if not prior_precision > 0:
        raise ValueError(f"laplace: `prior_precision` must be positive; got {prior_precision}.")
    theta, _ = ravel(model)
    d = theta.shape[0]
    need = cls.memory_estimate(model, data.n, **options)
    budget = max_memory_gb * _GIB
    if need > budget:
        fits = _fits(model, data.n, budget, options, structure)
        hint = ", ".join(f"structure={name!r} (~{b / 2**20:,.1f} MiB)" for name, b in fits)
        raise ValueError(
            f"laplace: structure={structure!r} for {d:,} parameters and {data.n:,} rows "
            f"needs about {need / _GIB:,.2f} GiB, over `max_memory_gb={max_memory_gb}`. "
            + (f"These would fit: {hint}; " if fits else "No structure fits; ")
            + "or raise `max_memory_gb`."
        )
    lam = jnp.asarray(prior_precision, theta.dtype)
    precision, ok = _build(cls, model, data, lam, curvature, options)
    if structure == "matrix_free":
        # `jit` returns new buffers: hold the caller's data, not a copy of it.
        precision = eqx.tree_at(lambda P: P.data, precision, data)
    if not bool(ok):
        raise RuntimeError(
            "laplace: the posterior precision is not positive definite (the exact Hessian "
            "has negative curvature here). Use curvature='ggn' or a larger prior_precision."
        )
    return LaplacePosterior(model, precision, lam, curvature)


def tune_prior_precision(
    posterior: LaplacePosterior,
    data: Dataset,
    *,
    bounds: tuple[float, float] = (1e-4, 1e4),
) -> LaplacePosterior:
    """Choose `λ` by maximising the Laplace marginal likelihood, post hoc.

    As in laplace-torch, the mean `θ*` and the data curvature `Λ − λI` stay fixed and only
    `λ` moves: `log det(Λ − λI + λ'I)` is evaluated from one eigendecomposition (dense),
    directly (diagonal), or by the structure's own `logdet` of `Λ.shift(λ' − λ)` (exact
    for Kronecker-factored and low-rank forms, a stochastic Lanczos estimate for the
    matrix-free one), and the one-dimensional problem in `log λ'` is solved with
    `scipy.optimize.minimize_scalar` (bounded). Refit the MAP with the new `λ` afterwards
    if the mean should follow.

    Returns:
        The posterior with the tuned prior precision (and precision `Λ − λI + λ'I`).

    Example:
        ```python
        import unlearnx as ux
        data = ux.datasets.diabetes().train
        model, _ = ux.fit(ux.models.LogisticRegression(data.n_features), data)
        post = ux.tune_prior_precision(ux.laplace(model, data), data)
        print(float(post.prior_precision))
        ```
    """
    lo, hi = bounds
    if not 0 < lo < hi:
        raise ValueError(f"tune_prior_precision: `bounds` must satisfy 0 < lo < hi; got {bounds}.")
    theta = posterior.theta
    lam0 = posterior.prior_precision
    data_loss = float(objective(posterior.mean, data, 0.0))
    d, sq = _active_size_and_norm(posterior.precision, theta)
    sq = float(sq)
    P = posterior.precision
    bounds = (math.log(lo), math.log(hi))
    if isinstance(P, (DensePrecision, DiagonalPrecision)):
        # One eigendecomposition (or the diagonal) gives every log det(C + λ'I) exactly.
        if isinstance(P, DensePrecision):
            eig = np.linalg.eigvalsh(np.asarray(P.matrix)) - float(lam0)
        else:
            eig = np.asarray(P.diag) - float(lam0)
        eig = np.maximum(eig, 0.0)

        def logdet(lam):
            return float(np.sum(np.log(eig + lam)))
    else:
        # Other structures: their own `logdet` of the shifted precision (Kronecker and
        # low-rank forms exactly, matrix-free by stochastic Lanczos quadrature).
        shifted = eqx.filter_jit(lambda P, delta: P.shift(delta).logdet())

        def logdet(lam):
            return float(shifted(P, jnp.asarray(lam - float(lam0), theta.dtype)))

    def neg_lml(log_lam):
        lam = math.exp(log_lam)
        return data_loss + 0.5 * lam * sq - 0.5 * d * log_lam + 0.5 * logdet(lam)

    res = scipy.optimize.minimize_scalar(neg_lml, bounds=bounds, method="bounded")
    lam = jnp.asarray(math.exp(res.x), theta.dtype)
    new = P.shift(lam - lam0)
    return LaplacePosterior(posterior.mean, new, lam, posterior.curvature)
