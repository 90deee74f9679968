"""Deletion requests and their one fixed-shape representation, the `Edit`.

A user states *what* to forget ([`forget_rows`][unlearnx.forget_rows],
[`forget_features`][unlearnx.forget_features], [`relabel`][unlearnx.relabel]); resolving
the request against the current data (checking it, filling in the replacement rows) gives
an [`Edit`][unlearnx.Edit]: row indices, replacement rows and a mask, padded to a bucket
size so that requests of similar sizes share one compiled update.
"""

from __future__ import annotations

from collections.abc import Sequence

import equinox as eqx
import jax.numpy as jnp
import numpy as np

from ._custom_types import Array, Bool, Float, Int
from ._data._dataset import Dataset


class Edit(eqx.Module):
    """A resolved, fixed-shape edit of `k` rows (padded entries have `mask=False`).

    Attributes:
        index: the edited rows; padded entries hold `n` (out of range, never written).
        mask: which entries are real.
        X: replacement features `(k, p)`.
        y: replacement labels `(k,)`.
        weights: replacement weights `(k,)`; `0` deletes the row.

    Example:
        ```python
        import unlearnx as ux
        train = ux.datasets.diabetes().train
        edit = ux.forget_rows([4, 8, 15]).resolve(train)
        print(edit.size, edit.mask.sum())   # 8 3: padded to the bucket size
        edited = edit.apply(train)          # rows 4, 8, 15 now have weight 0
        ```
    """

    index: Int[Array, " k"]
    mask: Bool[Array, " k"]
    X: Float[Array, "k p"]
    y: Array
    weights: Float[Array, " k"]

    @property
    def size(self) -> int:
        """The padded size `k` (the bucket)."""
        return self.index.shape[0]

    def old_rows(self, data: Dataset):
        """The rows being replaced, as `(X, y, w)`; padded entries get weight 0."""
        i = self.index
        X = data.X.at[i].get(mode="fill", fill_value=0)
        y = data.y.at[i].get(mode="fill", fill_value=0)
        w = jnp.where(self.mask, data.weights.at[i].get(mode="fill", fill_value=0), 0)
        return X, y, w

    def new_rows(self):
        """The replacement rows, as `(X, y, w)`; padded entries get weight 0."""
        return self.X, self.y, jnp.where(self.mask, self.weights, 0)

    def apply(self, data: Dataset, *, features: bool = True) -> Dataset:
        """The edited dataset (same shapes; padded entries are dropped by the scatter).

        Args:
            data: the data before the edit.
            features: whether the edit may change `X`. Pass `False` for row deletions and
                relabels (whose replacement rows carry the old features): `X` is then
                passed through instead of scattered into, which under `jit` saves a copy
                of the whole feature matrix.
        """
        X = self.scatter_features(data.X) if features else data.X
        y, weights = self.scatter_rows(data.y, data.weights)
        return eqx.tree_at(lambda d: (d.X, d.y, d.weights), data, (X, y, weights))

    def _targets(self, n: int) -> Int[Array, " k"]:
        # Padded entries point past the end, where a `mode="drop"` scatter ignores them.
        return jnp.where(self.mask, self.index, n)

    def scatter_rows(self, y: Array, weights: Float[Array, " n"]) -> tuple[Array, Array]:
        """The labels and weights after the edit."""
        i = self._targets(y.shape[0])
        return (
            y.at[i].set(self.y.astype(y.dtype), mode="drop"),
            weights.at[i].set(self.weights.astype(weights.dtype), mode="drop"),
        )

    def scatter_features(self, X: Float[Array, "n p"]) -> Float[Array, "n p"]:
        """The features after the edit."""
        return X.at[self._targets(X.shape[0])].set(self.X, mode="drop")


def bucket_size(k: int, n: int) -> int:
    """The padded size for `k` edited rows, capped at `n`: 8 for up to 8 rows, then four
    sizes per power of two (multiples of an eighth of the next power of two), so that a
    stream of requests compiles for a handful of sizes only and padding wastes at most a
    quarter of the work (plain powers of two would waste up to half).

    Example:
        ```python
        import unlearnx as ux
        print(ux.bucket_size(3, 1000), ux.bucket_size(100, 1000), ux.bucket_size(900, 1000))
        # 8 112 1000
        ```
    """
    k = max(k, 1)
    b = max(8, 1 << (k - 1).bit_length())
    step = max(8, b // 8)
    return max(k, min(-(-k // step) * step, n))


class Request(eqx.Module):
    """A deletion request, before it is checked against data. Build one with
    [`forget_rows`][unlearnx.forget_rows], [`forget_features`][unlearnx.forget_features]
    or [`relabel`][unlearnx.relabel]; unlearning transforms resolve it into an
    [`Edit`][unlearnx.Edit].

    Example:
        ```python
        import unlearnx as ux
        request = ux.relabel([0, 1], [1, 0])
        edit = request.resolve(ux.datasets.diabetes().train)
        ```
    """

    kind: str = eqx.field(static=True)
    rows: np.ndarray | None
    columns: tuple = eqx.field(static=True, default=())
    fill: float | str = eqx.field(static=True, default="mean")
    labels: np.ndarray | None = None

    def resolve(self, data: Dataset, *, bucket: int | None = None) -> Edit:
        """Check this request against `data` and build its fixed-shape `Edit`.

        Args:
            data: the current data (rows already forgotten have weight 0).
            bucket: pad to this many rows (default: [`bucket_size`][unlearnx.bucket_size]).

        Raises:
            ValueError: out-of-range, duplicated or already-forgotten rows, an empty
                request, a request that deletes every remaining row, unknown columns,
                labels outside the model's classes.
        """
        index, mask, X, y, w = self.resolve_host(data, bucket=bucket)
        return Edit(
            index=jnp.asarray(index),
            mask=jnp.asarray(mask),
            X=jnp.asarray(X),
            y=jnp.asarray(y),
            weights=jnp.asarray(w),
        )

    def resolve_host(self, data: Dataset, *, bucket: int | None = None, host=None):
        """[`resolve`][unlearnx.Request.resolve] on the host: the `Edit`'s arrays as NumPy
        arrays `(index, mask, X, y, weights)`, with the same checks. For resolving many
        requests at once (`ux.batch`), `host=(X, y, weights)` passes NumPy views of the
        data's arrays so that they are not fetched again for every request.
        """
        n = data.n
        if host is None:
            host = (np.asarray(data.X), np.asarray(data.y), np.asarray(data.weights))
        X_all, y_all, weights = host
        where = f"{self.kind}"
        if self.rows is None:
            rows = np.flatnonzero(weights > 0)
        else:
            rows = _check_rows(self.rows, n, where)
            gone = rows[weights[rows] <= 0]
            if gone.size:
                raise ValueError(
                    f"{where}: rows {gone[:5].tolist()} were already forgotten (weight 0); "
                    f"remove them from the request."
                )
        k = rows.size
        # `np.asarray` of a CPU jax array is a zero-copy view; numpy fancy indexing then
        # gathers the k rows without dispatching (and compiling) a jax gather per size.
        X = X_all[rows]
        y = y_all[rows]
        w = weights[rows].copy()
        if self.kind == "forget_rows":
            remaining = int(np.sum(weights > 0)) - k
            if remaining <= 0:
                raise ValueError(
                    f"forget_rows: the request deletes all {k} remaining rows; nothing would "
                    f"be left to model. Retrain from the prior instead, or keep some rows."
                )
            w[:] = 0
        elif self.kind == "forget_features":
            cols: list[int] = []
            for c in self.columns:
                cols.extend(data.columns(c))
            cols = sorted(set(cols))
            if self.fill == "mean":
                keep = weights > 0
                Xc = X_all[keep][:, cols]
                fill = (Xc * weights[keep, None]).sum(0) / weights[keep].sum()
            else:
                fill = np.full(len(cols), float(self.fill))
            X = X.copy()
            X[:, cols] = fill
        elif self.kind == "relabel":
            labels = np.asarray(self.labels)
            if labels.shape != (k,):
                raise ValueError(
                    f"relabel: `labels` has shape {labels.shape} but {k} rows were given; "
                    f"pass one new label per row."
                )
            if np.issubdtype(y_all.dtype, np.integer):
                if not np.issubdtype(labels.dtype, np.integer):
                    if not np.all(np.mod(labels, 1) == 0):
                        raise ValueError("relabel: `labels` must be integer class ids.")
                n_classes = data.n_classes
                if n_classes is not None and np.any((labels < 0) | (labels >= n_classes)):
                    bad = labels[(labels < 0) | (labels >= n_classes)][:5].tolist()
                    raise ValueError(
                        f"relabel: labels {bad} are outside the classes 0..{n_classes - 1}."
                    )
            elif not np.all(np.isfinite(labels)):
                raise ValueError("relabel: `labels` contains NaN or Inf.")
            y = labels.astype(y_all.dtype)
        size = bucket_size(k, n) if bucket is None else bucket
        if size < k:
            raise ValueError(f"{where}: `bucket={bucket}` is smaller than the request ({k} rows).")
        pad = size - k
        return (
            np.concatenate([rows, np.full(pad, n)]).astype(np.int32),
            np.concatenate([np.ones(k, bool), np.zeros(pad, bool)]),
            np.concatenate([X, np.zeros((pad, X.shape[1]), X.dtype)]),
            np.concatenate([y, np.zeros(pad, y.dtype)]),
            np.concatenate([w, np.zeros(pad, w.dtype)]),
        )


def _check_rows(rows, n: int, where: str) -> np.ndarray:
    arr = np.asarray(rows)
    if arr.dtype == bool:
        if arr.shape != (n,):
            raise ValueError(
                f"{where}: a boolean row mask must have shape ({n},); got {arr.shape}."
            )
        arr = np.flatnonzero(arr)
    arr = np.atleast_1d(arr)
    if arr.ndim != 1:
        raise ValueError(f"{where}: `rows` must be 1-d; got shape {arr.shape}.")
    if arr.size == 0:
        raise ValueError(f"{where}: the request is empty (no rows); pass at least one row.")
    if not np.issubdtype(arr.dtype, np.integer):
        if np.issubdtype(arr.dtype, np.floating) and np.all(np.mod(arr, 1) == 0):
            arr = arr.astype(np.int64)
        else:
            raise ValueError(f"{where}: `rows` must be integer indices; got dtype {arr.dtype}.")
    bad = arr[(arr < 0) | (arr >= n)]
    if bad.size:
        raise ValueError(
            f"{where}: row indices {bad[:5].tolist()} are out of range for {n} rows "
            f"(valid: 0..{n - 1})."
        )
    uniq, counts = np.unique(arr, return_counts=True)
    if np.any(counts > 1):
        raise ValueError(
            f"{where}: row indices {uniq[counts > 1][:5].tolist()} appear more than once; "
            f"pass each row once."
        )
    return arr.astype(np.int64)


def forget_rows(rows: Sequence[int] | Array | np.ndarray) -> Request:
    """Forget whole rows (a GDPR deletion, poisoned data).

    Args:
        rows: row indices, or a boolean mask over the rows.

    Example:
        ```python
        import unlearnx as ux
        request = ux.forget_rows([3, 17, 42])
        ```
    """
    return Request("forget_rows", np.asarray(rows))


def forget_features(
    columns: str | int | Sequence[str | int],
    rows: Sequence[int] | Array | np.ndarray | None = None,
    *,
    fill: float | str = "mean",
) -> Request:
    """Blank out feature columns, in all rows (`rows=None`) or some.

    Args:
        columns: feature names (a group name such as `"sex"` removes its whole one-hot
            block), single feature names, or column indices.
        rows: the rows to edit; `None` edits every remaining row.
        fill: the value written into the columns, or `"mean"` (the default) for each
            column's weighted mean over the remaining rows. The mean makes the column
            constant without shifting it, so that its removal is not also a change of the
            intercept: `0` is the mean of a standardised column but the minimum of a
            min-max scaled one (on Pima, filling with 0 makes the one-step update far
            less accurate).

    Example:
        ```python
        import unlearnx as ux
        request = ux.forget_features(["Pregnancies", "BMI", "Age"])
        ```
    """
    if isinstance(columns, (str, int, np.integer)):
        columns = (columns,)
    columns = tuple(c if isinstance(c, str) else int(c) for c in columns)
    if not columns:
        raise ValueError("forget_features: `columns` is empty; name at least one feature.")
    if isinstance(fill, str) and fill != "mean":
        raise ValueError(f"forget_features: `fill` must be a number or 'mean'; got {fill!r}.")
    if not isinstance(fill, str) and not np.isfinite(fill):
        raise ValueError(f"forget_features: `fill` must be finite; got {fill}.")
    return Request("forget_features", None if rows is None else np.asarray(rows), columns, fill)


def relabel(rows: Sequence[int] | Array | np.ndarray, labels) -> Request:
    """Change the labels of some rows (mislabelled or poisoned labels).

    Args:
        rows: row indices.
        labels: the new label of each row.

    Example:
        ```python
        import unlearnx as ux
        request = ux.relabel([0, 5], [1, 0])
        ```
    """
    return Request("relabel", np.asarray(rows), labels=np.asarray(labels))


def as_edit(request: Request | Edit, data: Dataset) -> Edit:
    """Resolve a request (or pass an `Edit` through) with the boundary checks."""
    if isinstance(request, Edit):
        return request
    if not isinstance(request, Request):
        raise ValueError(
            f"expected a request from ux.forget_rows / ux.forget_features / ux.relabel, or "
            f"an ux.Edit; got {type(request).__name__}."
        )
    return request.resolve(data)
