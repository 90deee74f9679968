"""The model protocol: an Equinox module with an output per example and a likelihood."""

from __future__ import annotations

import abc
import itertools
import math
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp

from .._custom_types import Array, Float, Scalar
from ._likelihood import AbstractLikelihood


class AbstractModel(eqx.Module):
    """A model: `model(x)` maps one example to an output vector, `model.loss(x, y)` is
    the per-example negative log-likelihood.

    Every floating-point array in the module is a parameter; everything else (sizes,
    activation functions, the likelihood) is configuration. The prior over parameters is
    an isotropic Gaussian `N(0, λ⁻¹ I)` on *all* parameters, intercepts included: a
    proper prior is what makes the Laplace posterior and its marginal likelihood
    well-defined, and it matches scikit-learn's `fit_intercept=False` with a column of
    ones.
    """

    likelihood: eqx.AbstractVar[AbstractLikelihood]

    @property
    @abc.abstractmethod
    def n_inputs(self) -> int:
        """Number of input features."""

    @property
    @abc.abstractmethod
    def n_outputs(self) -> int:
        """Size of the output vector (1 for binary or regression, C for C classes)."""

    @abc.abstractmethod
    def __call__(self, x: Float[Array, " p"]) -> Float[Array, " c"]:
        """The output (logits or mean) for one example."""

    def loss(self, x: Float[Array, " p"], y: Array) -> Scalar:
        """Per-example negative log-likelihood `ℓ(x, y; θ)`."""
        return self.likelihood.nll(self(x), y)

    def predict(self, X: Float[Array, "n p"]) -> Array:
        """Point predictions: class ids for classifiers, means for regressors."""
        return jax.vmap(lambda x: self.likelihood.predict(self(x)))(X)

    def predict_proba(self, X: Float[Array, "n p"]) -> Float[Array, "n c"]:
        """Predictive mean at the point estimate: class probabilities, or means."""
        return jax.vmap(lambda x: self.likelihood.mean(self(x)))(X)


def partition(model):
    """Split a model into (parameters, static) with `eqx.partition` on inexact arrays."""
    return eqx.partition(model, eqx.is_inexact_array)


class Unravel(eqx.Module):
    """Rebuilds a model from a flat parameter vector: `unravel(theta) -> model`.

    Unlike `jax.flatten_util.ravel_pytree`'s closure, this is a hashable pytree with no
    array leaves, so passing it to `eqx.filter_jit` does not recompile on every call.
    """

    static: Any
    treedef: Any = eqx.field(static=True)
    shapes: tuple[tuple[int, ...], ...] = eqx.field(static=True)

    def __call__(self, theta: Float[Array, " d"]):
        sizes = [math.prod(s) for s in self.shapes]
        offsets = list(itertools.accumulate(sizes))[:-1]
        parts = jnp.split(theta, offsets) if offsets else [theta]
        leaves = [p.reshape(s) for p, s in zip(parts, self.shapes, strict=True)]
        return eqx.combine(jax.tree_util.tree_unflatten(self.treedef, leaves), self.static)


def ravel(model) -> tuple[Float[Array, " d"], Unravel]:
    """Flatten a model's parameters into one vector.

    Returns:
        `(theta, unravel)` where `unravel(theta)` rebuilds the full model.
    """
    params, static = partition(model)
    leaves, treedef = jax.tree_util.tree_flatten(params)
    theta = jnp.concatenate([jnp.ravel(x) for x in leaves]) if leaves else jnp.zeros(0)
    return theta, Unravel(static, treedef, tuple(x.shape for x in leaves))


def n_params(model) -> int:
    """Number of scalar parameters."""
    params, _ = partition(model)
    return sum(x.size for x in jax.tree_util.tree_leaves(params))
