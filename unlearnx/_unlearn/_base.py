"""The unlearning protocol: pure `init` / `update` pairs, composed with `chain`.

    unlearner = ux.chain(ux.second_order(), ux.refine(steps=2))
    state = unlearner.init(posterior, data)
    posterior, state, info = unlearner.update(request, state)

`update` checks the request against the current data (the boundary), then runs one
compiled function; `apply` is that pure function alone, for use under `jax.jit` and
`jax.vmap` with pre-resolved [`Edit`][unlearnx.Edit]s.
"""

from __future__ import annotations

import abc
from typing import Any, NamedTuple

import equinox as eqx
import jax.numpy as jnp

from .._custom_types import Array, Int, PyTree
from .._data._dataset import Dataset
from .._fit import check_model_data
from .._posterior._laplace import LaplacePosterior
from .._requests import Edit, Request, as_edit


class Ledger(eqx.Module):
    """What has been forgotten so far.

    Attributes:
        count: how many requests have been applied.
        last_request: per row, the 1-based number of the last request that edited it
            (0 if none); together with the data's weights this says which rows are gone.

    Example:
        ```python
        import unlearnx as ux
        data = ux.datasets.diabetes().train
        model, _ = ux.fit(ux.models.LogisticRegression(data.n_features), data)
        unlearner = ux.second_order()
        state = unlearner.init(ux.laplace(model, data), data)
        _, state, _ = unlearner.update(ux.forget_rows([1, 2]), state)
        _, state, _ = unlearner.update(ux.forget_rows([7]), state)
        print(int(state.ledger.count), state.ledger.last_request[:8])  # 2 [0 1 1 0 0 0 0 2]
        ```
    """

    count: Int[Array, ""]
    last_request: Int[Array, " n"]

    def record(self, edit: Edit) -> Ledger:
        count = self.count + 1
        i = jnp.where(edit.mask, edit.index, self.last_request.shape[0])
        return Ledger(count, self.last_request.at[i].set(count, mode="drop"))


class UnlearnState(eqx.Module):
    """The state threaded through `update`: current posterior, current (edited) data, the
    ledger of applied requests, and each transform's own state.

    Example:
        ```python
        import unlearnx as ux
        data = ux.datasets.diabetes().train
        model, _ = ux.fit(ux.models.LogisticRegression(data.n_features), data)
        state = ux.second_order().init(ux.laplace(model, data), data)
        print(state.data.n, int(state.ledger.count))
        ```
    """

    posterior: LaplacePosterior
    data: Dataset
    ledger: Ledger
    inner: PyTree


class Context(NamedTuple):
    """What a transform's step sees: the edit, the data before and after it, and the
    posterior before any transform of this update ran."""

    edit: Edit
    old: Dataset
    new: Dataset
    original: LaplacePosterior


class AbstractUnlearner(eqx.Module):
    """An unlearning transform. Subclasses implement `init_inner` and `step`; `init`,
    `update` and `apply` are shared and never overridden."""

    @abc.abstractmethod
    def init_inner(self, posterior: LaplacePosterior, data: Dataset) -> PyTree:
        """This transform's own state (often `None`)."""

    @abc.abstractmethod
    def step(
        self, ctx: Context, posterior: LaplacePosterior, inner: PyTree
    ) -> tuple[LaplacePosterior, PyTree, Any]:
        """Move `posterior` (the output of the previous transform in a chain) to account
        for `ctx.edit`. Returns `(posterior, inner, info)`."""

    @property
    def jittable(self) -> bool:
        """Whether `step` traces under `jax.jit` (exact retraining does not)."""
        return True

    def init(self, posterior: LaplacePosterior, data: Dataset) -> UnlearnState:
        """Start unlearning from `posterior`, fitted on `data`.

        Raises:
            ValueError: if `posterior` is not a LaplacePosterior or `data` does not match
                its model.
        """
        if not isinstance(posterior, LaplacePosterior):
            raise ValueError(
                f"init: `posterior` must be a ux.LaplacePosterior (from ux.laplace); got "
                f"{type(posterior).__name__}."
            )
        check_model_data(posterior.mean, data, "init")
        ledger = Ledger(jnp.array(0, jnp.int32), jnp.zeros(data.n, jnp.int32))
        return UnlearnState(posterior, data, ledger, self.init_inner(posterior, data))

    def apply(self, edit: Edit, state: UnlearnState, *, features: bool = True):
        """The pure update for an already-resolved `Edit`: no checks, jit/vmap-friendly.

        Args:
            edit: from `request.resolve(state.data)`.
            state: from `init` or a previous update.
            features: whether the edit may change `X` (see [`Edit.apply`][unlearnx.Edit.apply]);
                `False` is only correct for row deletions and relabels.

        Returns:
            `(posterior, state, info)`.
        """
        posterior, inner, info = _posterior_step(self, edit, state, features)
        new = edit.apply(state.data, features=features)
        state = UnlearnState(posterior, new, state.ledger.record(edit), inner)
        return posterior, state, info

    def update(self, request: Request | Edit, state: UnlearnState, *, throw: bool = True):
        """Forget `request`: check it against the current data, then update.

        Args:
            request: from [`forget_rows`][unlearnx.forget_rows],
                [`forget_features`][unlearnx.forget_features] or
                [`relabel`][unlearnx.relabel] (or a resolved `Edit`).
            state: from `init` or the previous `update`.
            throw: raise a `RuntimeError` if the result is not finite (otherwise the
                caller must inspect the result).

        Returns:
            `(posterior, state, info)`.

        Example:
            ```python
            import unlearnx as ux
            data = ux.datasets.diabetes().train
            model, _ = ux.fit(ux.models.LogisticRegression(data.n_features), data)
            post = ux.laplace(model, data)
            unlearner = ux.chain(ux.second_order(), ux.refine(steps=2))
            state = unlearner.init(post, data)
            post2, state, info = unlearner.update(ux.forget_rows([0, 1, 2]), state)
            ```
        """
        if not isinstance(state, UnlearnState):
            raise ValueError(
                f"update: `state` must come from `init` or a previous `update`; got "
                f"{type(state).__name__}."
            )
        edit = as_edit(request, state.data)
        if edit.X.shape[1:] != state.data.X.shape[1:]:
            raise ValueError(
                f"update: the edit has {edit.X.shape[1]} feature columns but the data has "
                f"{state.data.n_features}."
            )
        # Row deletions and relabels leave `X` alone: knowing it statically keeps the
        # compiled step from copying the feature matrix.
        features = not (isinstance(request, Request) and request.kind != "forget_features")
        run = _step_jit if self.jittable else _step_eager
        posterior, inner, info, finite = run(self, edit, state, features)
        # The new state is assembled outside the compiled step: returning the dataset from
        # `jit` would copy `X` (26 MB on Adult) even when it did not change.
        data = state.data
        X = _edit_features(edit, data.X) if features else data.X
        y, weights, ledger = _edit_rows(edit, data.y, data.weights, state.ledger)
        data = eqx.tree_at(lambda d: (d.X, d.y, d.weights), data, (X, y, weights))
        state = UnlearnState(posterior, data, ledger, inner)
        if throw and not bool(finite):
            raise RuntimeError(
                f"update: {type(self).__name__} produced non-finite parameters. Try "
                f"`second_order(damping=...)`, fewer refine steps, or `exact_retrain()`."
            )
        return posterior, state, info


def _posterior_step(unlearner, edit, state, features):
    new = edit.apply(state.data, features=features)
    ctx = Context(edit, state.data, new, state.posterior)
    return unlearner.step(ctx, state.posterior, state.inner)


def _step_eager(unlearner, edit, state, features):
    """The posterior step, plus whether the new mean is finite (checked in the same call)."""
    posterior, inner, info = _posterior_step(unlearner, edit, state, features)
    return posterior, inner, info, jnp.all(jnp.isfinite(posterior.theta))


@eqx.filter_jit
def _step_jit(unlearner, edit, state, features):
    return _step_eager(unlearner, edit, state, features)


@eqx.filter_jit
def _edit_rows(edit, y, weights, ledger):
    return *edit.scatter_rows(y, weights), ledger.record(edit)


@eqx.filter_jit
def _edit_features(edit, X):
    return edit.scatter_features(X)


class Chain(AbstractUnlearner):
    """Transforms applied one after another to the same request (see
    [`chain`][unlearnx.chain]).

    Example:
        ```python
        import unlearnx as ux
        unlearner = ux.chain(ux.second_order(), ux.refine(steps=2))
        print(len(unlearner.transforms))
        ```
    """

    transforms: tuple[AbstractUnlearner, ...]

    def init_inner(self, posterior, data):
        return tuple(t.init_inner(posterior, data) for t in self.transforms)

    def step(self, ctx, posterior, inner):
        infos = []
        new_inner = []
        for t, s in zip(self.transforms, inner, strict=True):
            posterior, s, info = t.step(ctx, posterior, s)
            new_inner.append(s)
            infos.append(info)
        return posterior, tuple(new_inner), tuple(infos)

    @property
    def jittable(self) -> bool:
        return all(t.jittable for t in self.transforms)


def chain(*transforms: AbstractUnlearner) -> Chain:
    """Compose unlearning transforms: each refines the posterior the previous one produced.

    The info of a chain is the tuple of its transforms' infos.

    Example:
        ```python
        import unlearnx as ux
        unlearner = ux.chain(ux.second_order(), ux.refine(steps=3))
        ```
    """
    for t in transforms:
        if not isinstance(t, AbstractUnlearner):
            raise ValueError(
                f"chain: every argument must be an unlearning transform (ux.second_order(), "
                f"ux.refine(), ...); got {type(t).__name__}."
            )
    if not transforms:
        raise ValueError("chain: pass at least one transform.")
    return Chain(tuple(transforms))


class Identity(AbstractUnlearner):
    """Applies the edit to the data and leaves the posterior alone (the `none` baseline)."""

    def init_inner(self, posterior, data):
        return None

    def step(self, ctx, posterior, inner):
        return posterior, inner, None


def identity() -> Identity:
    """The do-nothing baseline: the data is edited, the posterior is not.

    Example:
        ```python
        import unlearnx as ux
        data = ux.datasets.diabetes().train
        model, _ = ux.fit(ux.models.LogisticRegression(data.n_features), data)
        post = ux.laplace(model, data)
        same, state, _ = ux.identity().update(ux.forget_rows([0]), ux.identity().init(post, data))
        assert float(ux.metrics.distance(same, post)) == 0.0
        ```
    """
    return Identity()
