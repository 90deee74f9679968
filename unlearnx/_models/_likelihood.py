"""Likelihoods: per-example negative log-likelihood of a model output and its curvature.

A model maps one example `x` to an output vector `f` (logits or a mean); the likelihood
turns `f` and a label `y` into a negative log-likelihood and gives a square root `B` of the
output-space Hessian (`∇²_f nll = B Bᵀ`), from which the generalised Gauss-Newton (GGN)
curvature of every model follows: `J_iᵀ B_i B_iᵀ J_i` for example `i`.
"""

from __future__ import annotations

import abc
import math

import equinox as eqx
import jax
import jax.numpy as jnp

from .._custom_types import Array, Float, Scalar


class AbstractLikelihood(eqx.Module):
    """A per-example likelihood `p(y | f)` for a model output `f`."""

    @abc.abstractmethod
    def nll(self, f: Float[Array, " c"], y: Array) -> Scalar:
        """Negative log-likelihood of label `y` given output `f`."""

    @abc.abstractmethod
    def hessian_sqrt(self, f: Float[Array, " c"]) -> Float[Array, "c c"]:
        """A matrix `B` with `B Bᵀ = ∇²_f nll(f, y)` (independent of `y` here)."""

    @abc.abstractmethod
    def mean(self, f: Float[Array, " c"]) -> Float[Array, " c"]:
        """Predictive mean of `y` given `f`: class probabilities or the regression mean."""

    @abc.abstractmethod
    def predict(self, f: Float[Array, " c"]) -> Array:
        """Point prediction: a class id for classifiers, the mean for regression."""

    @abc.abstractmethod
    def check_labels(self, y, n_outputs: int) -> str | None:
        """Return a message if the (concrete) labels are invalid for this likelihood."""


class Bernoulli(AbstractLikelihood):
    """Binary labels `y ∈ {0, 1}` with one logit: `nll = softplus(f) − y f`."""

    def nll(self, f, y):
        f = f[0]
        return jax.nn.softplus(f) - y.astype(f.dtype) * f

    def hessian_sqrt(self, f):
        p = jax.nn.sigmoid(f)
        return jnp.sqrt(p * (1 - p))[:, None]

    def mean(self, f):
        return jax.nn.sigmoid(f)

    def predict(self, f):
        return (f[0] > 0).astype(jnp.int32)

    def check_labels(self, y, n_outputs):
        if not jnp.issubdtype(y.dtype, jnp.integer):
            return f"labels must be integers 0 or 1 for a binary classifier; got dtype {y.dtype}"
        bad = (y != 0) & (y != 1)
        if bool(jnp.any(bad)):
            return f"labels must be 0 or 1; found {sorted(set(map(int, y[bad][:5])))}"
        return None


class Categorical(AbstractLikelihood):
    """Class labels `y ∈ {0, …, C−1}` with `C` logits: `nll = logsumexp(f) − f_y`."""

    def nll(self, f, y):
        return jax.nn.logsumexp(f) - f[y]

    def hessian_sqrt(self, f):
        # diag(p) − p pᵀ = (diag(√p) − p √pᵀ)(diag(√p) − √p pᵀ), using Σ p = 1.
        p = jax.nn.softmax(f)
        sp = jnp.sqrt(p)
        return jnp.diag(sp) - jnp.outer(p, sp)

    def mean(self, f):
        return jax.nn.softmax(f)

    def predict(self, f):
        return jnp.argmax(f).astype(jnp.int32)

    def check_labels(self, y, n_outputs):
        if not jnp.issubdtype(y.dtype, jnp.integer):
            return f"labels must be integer class ids; got dtype {y.dtype}"
        bad = (y < 0) | (y >= n_outputs)
        if bool(jnp.any(bad)):
            return (
                f"labels must lie in 0..{n_outputs - 1} for a {n_outputs}-class model; "
                f"found {sorted(set(map(int, y[bad][:5])))}"
            )
        return None


class Gaussian(AbstractLikelihood):
    """Real labels with fixed noise: `nll = ½((y − f)/σ)² + log σ + ½ log 2π`."""

    noise_std: float = eqx.field(static=True, default=1.0)

    def __check_init__(self):
        if not self.noise_std > 0:
            raise ValueError(f"Gaussian: `noise_std` must be positive; got {self.noise_std}.")

    def nll(self, f, y):
        r = (y - f[0]) / self.noise_std
        return 0.5 * r**2 + math.log(self.noise_std) + 0.5 * math.log(2 * math.pi)

    def hessian_sqrt(self, f):
        return jnp.full((1, 1), 1.0 / self.noise_std, dtype=f.dtype)

    def mean(self, f):
        return f

    def predict(self, f):
        return f[0]

    def check_labels(self, y, n_outputs):
        if not jnp.issubdtype(y.dtype, jnp.floating):
            return f"regression targets must be floats; got dtype {y.dtype}"
        return None
