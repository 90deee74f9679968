"""The `Dataset` pytree: features, labels, sample weights and named attributes."""

from __future__ import annotations

from typing import NamedTuple

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

from .._custom_types import Array, Float


class Dataset(eqx.Module):
    """A weighted supervised dataset, as a pytree.

    Rows are examples. A row with weight 0 is *absent*: this is how unlearnx deletes
    rows without changing shapes (so that jit and vmap never recompile).

    Attributes:
        X: features, shape `(n, p)`.
        y: labels, shape `(n,)`: integer class ids for classification, floats for
            regression.
        weights: per-row sample weights, shape `(n,)`; `0` marks a deleted row.
        attributes: named per-row attribute columns (sensitive attributes such as
            `"sex"` or `"race"` as integer codes, or numeric columns such as `"age"`),
            kept beside the features so that requests and fairness checks can address
            them by name even when they are not model inputs.
        feature_names: one name per column of `X`.
        groups: maps an original column name (e.g. `"sex"`) to the columns of `X` that
            encode it (its one-hot block), as a tuple of `(name, columns)` pairs.
        levels: the category names of each categorical attribute, as `(name, levels)`
            pairs; attribute code `j` means `levels[j]`.
        n_classes: number of classes, or `None` for regression.

    Example:
        ```python
        import unlearnx as ux
        data = ux.datasets.diabetes()
        train = data.train
        print(train.n, train.n_features, train.columns("BMI"))
        ```
    """

    X: Float[Array, "n p"]
    y: Array
    weights: Float[Array, " n"]
    attributes: dict[str, Array]
    feature_names: tuple[str, ...] = eqx.field(static=True)
    groups: tuple[tuple[str, tuple[int, ...]], ...] = eqx.field(static=True, default=())
    levels: tuple[tuple[str, tuple[str, ...]], ...] = eqx.field(static=True, default=())
    n_classes: int | None = eqx.field(static=True, default=None)

    def __check_init__(self):
        if self.X.ndim != 2:
            raise ValueError(
                f"Dataset: `X` must be a 2-d array of shape (n, p); got shape {self.X.shape}."
            )
        n = self.X.shape[0]
        if self.y.shape != (n,):
            raise ValueError(
                f"Dataset: `y` must have shape ({n},) to match `X` {self.X.shape}; "
                f"got {self.y.shape}. Pass one label per row."
            )
        if self.weights.shape != (n,):
            raise ValueError(
                f"Dataset: `weights` must have shape ({n},); got {self.weights.shape}."
            )
        if len(self.feature_names) != self.X.shape[1]:
            raise ValueError(
                f"Dataset: `feature_names` has {len(self.feature_names)} names for "
                f"{self.X.shape[1]} columns of `X`; give one name per column."
            )
        for name, col in self.attributes.items():
            if col.shape[:1] != (n,):
                raise ValueError(
                    f"Dataset: attribute {name!r} has shape {col.shape}; it must have "
                    f"one entry per row ({n})."
                )

    @property
    def n(self) -> int:
        """Number of rows (including deleted rows, which have weight 0)."""
        return self.X.shape[0]

    @property
    def n_features(self) -> int:
        """Number of feature columns."""
        return self.X.shape[1]

    def columns(self, name: str | int) -> tuple[int, ...]:
        """Column indices of a feature: an original column's one-hot block or one column.

        Args:
            name: a group name such as `"sex"` (its whole one-hot block), a feature name
                such as `"sex=Female"`, or a column index.

        Raises:
            ValueError: if no column has that name.
        """
        if isinstance(name, (int, np.integer)):
            if not 0 <= int(name) < self.n_features:
                raise ValueError(
                    f"Dataset.columns: column index {name} is out of range for "
                    f"{self.n_features} features."
                )
            return (int(name),)
        for group, cols in self.groups:
            if group == name:
                return cols
        if name in self.feature_names:
            return (self.feature_names.index(name),)
        known = sorted({g for g, _ in self.groups} | set(self.feature_names))
        raise ValueError(
            f"Dataset.columns: no feature named {name!r}. Known names: "
            f"{', '.join(known[:40])}{' ...' if len(known) > 40 else ''}."
        )

    def attribute(self, name: str) -> Array:
        """A named attribute column (e.g. `"sex"`), shape `(n,)`."""
        if name not in self.attributes:
            raise ValueError(
                f"Dataset.attribute: no attribute named {name!r}; this dataset has "
                f"{sorted(self.attributes)}."
            )
        return self.attributes[name]

    def attribute_levels(self, name: str) -> tuple[str, ...]:
        """Category names of a categorical attribute: code `j` means `levels[j]`."""
        for attr, lv in self.levels:
            if attr == name:
                return lv
        raise ValueError(
            f"Dataset.attribute_levels: attribute {name!r} has no category names "
            f"(it is numeric or absent); categorical ones: {[a for a, _ in self.levels]}."
        )

    def subset(self, rows) -> Dataset:
        """A new dataset with only the given rows (a boolean mask or index array)."""
        rows = np.asarray(rows)
        return jax.tree_util.tree_map(lambda a: a[rows], self)

    def retained(self) -> Array:
        """Boolean mask of rows that are present (weight > 0)."""
        return self.weights > 0

    def astype(self, dtype) -> Dataset:
        """Cast the floating-point arrays (features, weights, float labels) to `dtype`."""

        def cast(a):
            return a.astype(dtype) if jnp.issubdtype(a.dtype, jnp.floating) else a

        return eqx.tree_at(
            lambda d: (d.X, d.y, d.weights),
            self,
            (cast(self.X), cast(self.y), cast(self.weights)),
        )


class DatasetSplit(NamedTuple):
    """A train/test split of a dataset, with its provenance.

    Attributes:
        train: the training rows.
        test: the held-out rows.
        name: short dataset name.
        description: where the data comes from, how it was prepared, and its licence.
    """

    train: Dataset
    test: Dataset
    name: str
    description: str


def check_finite(data: Dataset, where: str) -> None:
    """Raise a ValueError if `data` holds NaN or Inf (only when the arrays are concrete)."""
    for field in ("X", "y", "weights"):
        arr = getattr(data, field)
        if isinstance(arr, jax.core.Tracer):
            return
        a = np.asarray(arr)
        if np.issubdtype(a.dtype, np.floating) and not np.all(np.isfinite(a)):
            bad = np.argwhere(~np.isfinite(a))[:3].tolist()
            raise ValueError(
                f"{where}: `data.{field}` contains NaN or Inf (first at {bad}). Impute or "
                f"drop those rows before fitting."
            )
    w = np.asarray(data.weights)
    if np.any(w < 0):
        raise ValueError(f"{where}: `data.weights` must be non-negative.")
    if not np.any(w > 0):
        raise ValueError(f"{where}: every row has weight 0; there is no data left.")
