"""Metrics of unlearning quality: distance to retraining, gradient residual, accuracy,
NLL, calibration and agreement."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from ._custom_types import Array, Float, Scalar
from ._data._dataset import Dataset
from ._models._base import AbstractModel, ravel
from ._objective import objective
from ._posterior._laplace import LaplacePosterior


def _model(x) -> AbstractModel:
    if isinstance(x, LaplacePosterior):
        return x.mean
    if isinstance(x, AbstractModel):
        return x
    raise ValueError(f"metrics: expected a ux.LaplacePosterior or a model; got {type(x).__name__}.")


def distance(a, b, *, relative: bool = True) -> Scalar:
    """Parameter distance `‖θ_a − θ_b‖₂`, divided by `‖θ_b‖₂` when `relative`.

    Pass the exact retrained posterior as `b`.

    Example:
        ```python
        import unlearnx as ux
        data = ux.datasets.diabetes().train
        model, _ = ux.fit(ux.models.LogisticRegression(data.n_features), data)
        print(ux.metrics.distance(model, model))
        ```
    """
    ta, tb = ravel(_model(a))[0], ravel(_model(b))[0]
    if ta.shape != tb.shape:
        raise ValueError(f"distance: parameter shapes differ: {ta.shape} vs {tb.shape}.")
    d = jnp.linalg.norm(ta - tb)
    return d / jnp.linalg.norm(tb) if relative else d


def distance_closed(before, after, exact) -> Scalar:
    """Fraction of the distance from `before` to `exact` that `after` closed:
    `1 − ‖θ_after − θ_exact‖ / ‖θ_before − θ_exact‖` (1 = exact, 0 = no progress).

    Example:
        ```python
        import unlearnx as ux
        data = ux.datasets.diabetes()
        model, _ = ux.fit(ux.models.LogisticRegression(data.train.n_features), data.train)
        post = ux.laplace(model, data.train)
        request = ux.forget_rows(list(range(50)))
        after, _, _ = ux.second_order().update(request, ux.second_order().init(post, data.train))
        exact = ux.retrain(post, data.train, request)
        print(ux.metrics.distance_closed(post, after, exact))   # close to 1
        ```
    """
    return 1.0 - distance(after, exact, relative=False) / distance(before, exact, relative=False)


def gradient_residual(model, data: Dataset, prior_precision=None) -> Scalar:
    """`‖∇L(θ; D)‖₂` of the sum-form objective on `data` (0 at the exact optimum).

    For a posterior, its own prior precision is used unless given.

    Example:
        ```python
        import unlearnx as ux
        data = ux.datasets.diabetes()
        model, _ = ux.fit(ux.models.LogisticRegression(data.train.n_features), data.train)
        post = ux.laplace(model, data.train)
        print(ux.metrics.gradient_residual(post, data.train))   # ~0 at the MAP
        ```
    """
    if prior_precision is None:
        if not isinstance(model, LaplacePosterior):
            raise ValueError("gradient_residual: pass `prior_precision` when giving a model.")
        prior_precision = model.prior_precision
    theta, unravel = ravel(_model(model))
    return jnp.linalg.norm(jax.grad(lambda t: objective(unravel(t), data, prior_precision))(theta))


def _weights(data: Dataset) -> Float[Array, " n"]:
    return data.weights / jnp.sum(data.weights)


def accuracy(model, data: Dataset) -> Scalar:
    """Weighted accuracy of the point predictions on `data` (deleted rows excluded).

    Example:
        ```python
        import unlearnx as ux
        data = ux.datasets.diabetes()
        model, _ = ux.fit(ux.models.LogisticRegression(data.train.n_features), data.train)
        post = ux.laplace(model, data.train)
        print(ux.metrics.accuracy(post, data.test), ux.metrics.nll(post, data.test))
        ```
    """
    pred = _model(model).predict(data.X)
    return jnp.sum(_weights(data) * (pred == data.y))


def nll(model, data: Dataset) -> Scalar:
    """Mean negative log-likelihood per (weighted) row at the point estimate.

    Example:
        ```python
        import unlearnx as ux
        data = ux.datasets.diabetes()
        model, _ = ux.fit(ux.models.LogisticRegression(data.train.n_features), data.train)
        post = ux.laplace(model, data.train)
        print(ux.metrics.nll(model, data.test))
        ```
    """
    m = _model(model)
    return jnp.sum(_weights(data) * jax.vmap(m.loss)(data.X, data.y))


def _class_probs(model, X) -> Float[Array, "n c"]:
    if isinstance(model, LaplacePosterior):
        p = model.predict(X, method="probit")
    else:
        p = _model(model).predict_proba(X)
    if p.shape[-1] == 1:
        p = jnp.concatenate([1 - p, p], axis=-1)
    return p


def ece(model, data: Dataset, *, bins: int = 10) -> Scalar:
    """Expected calibration error of the top-class probability, equal-width bins.

    For a posterior the probit predictive is used; for a model, its point estimate.

    Example:
        ```python
        import unlearnx as ux
        data = ux.datasets.diabetes()
        model, _ = ux.fit(ux.models.LogisticRegression(data.train.n_features), data.train)
        post = ux.laplace(model, data.train)
        print(ux.metrics.ece(post, data.test), ux.metrics.ece(model, data.test))
        ```
    """
    if bins < 1:
        raise ValueError(f"ece: `bins` must be ≥ 1; got {bins}.")
    p = _class_probs(model, data.X)
    conf = jnp.max(p, axis=-1)
    correct = (jnp.argmax(p, axis=-1) == data.y).astype(p.dtype)
    w = _weights(data)
    b = jnp.clip((conf * bins).astype(jnp.int32), 0, bins - 1)
    conf_sum = jax.ops.segment_sum(w * conf, b, bins)
    acc_sum = jax.ops.segment_sum(w * correct, b, bins)
    return jnp.sum(jnp.abs(acc_sum - conf_sum))  # Σ_b (w_b/W)|acc_b − conf_b|


def agreement(a, b, X: Float[Array, "n p"]) -> Scalar:
    """Fraction of rows of `X` where `a` and `b` predict the same class.

    Example:
        ```python
        import unlearnx as ux
        data = ux.datasets.diabetes()
        model, _ = ux.fit(ux.models.LogisticRegression(data.train.n_features), data.train)
        post = ux.laplace(model, data.train)
        exact = ux.retrain(post, data.train, ux.forget_rows([0, 1, 2]))
        print(ux.metrics.agreement(post, exact, data.test.X))
        ```
    """
    return jnp.mean(_model(a).predict(X) == _model(b).predict(X))
