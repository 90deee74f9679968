"""Shift scenarios: deletion requests that leave the retained data shifted.

Each builder returns a [`Scenario`][unlearnx.scenarios.Scenario]: the request, the
attribute along which the retained data is shifted (the one to check predictions against,
and to pass to `ux.independence` or `ux.reweight`), a short name and a description.
Requests are built on the host with NumPy from an explicit `seed`.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from ._data._dataset import Dataset, DatasetSplit
from ._requests import Request, forget_features, forget_rows


class Scenario(NamedTuple):
    """A deletion request whose retained data is shifted along an attribute.

    Attributes:
        name: a short name, e.g. `"adult: forget 80% of sex=Female"`.
        request: the deletion request (`forget_rows` or `forget_features`).
        attribute: the attribute along which the deletion is non-uniform, or that the
            removed feature encoded.
        description: what was removed, how many rows, and how the attribute's
            distribution changed (or which proxies of a removed feature remain).

    Example:
        ```python
        import unlearnx as ux
        s = ux.scenarios.feature_with_proxies(ux.datasets.german(), "personal_status_sex",
                                              attribute="sex")
        print(s.name, s.attribute)
        ```
    """

    name: str
    request: Request
    attribute: str
    description: str


def _train(split, who: str) -> tuple[Dataset, str]:
    if isinstance(split, DatasetSplit):
        return split.train, split.name
    if isinstance(split, Dataset):
        return split, "data"
    raise ValueError(
        f"scenarios.{who}: `split` must be a ux.datasets.DatasetSplit (e.g. "
        f"ux.datasets.adult()) or a Dataset; got {type(split).__name__}."
    )


def _attribute(data: Dataset, attribute: str, who: str) -> np.ndarray:
    if attribute not in data.attributes:
        raise ValueError(
            f"scenarios.{who}: the data has no attribute named {attribute!r}; its "
            f"attributes are {sorted(data.attributes)}."
        )
    return np.asarray(data.attributes[attribute])


def _code(data: Dataset, attribute: str, level, values: np.ndarray, who: str) -> tuple[int, str]:
    """The integer code of `level` (a category name or a code) and its display name."""
    names = dict(data.levels).get(attribute)
    if isinstance(level, str):
        if names is None or level not in names:
            raise ValueError(
                f"scenarios.{who}: attribute {attribute!r} has no level named {level!r}; "
                f"its levels are {list(names) if names else sorted(set(values.tolist()))}."
            )
        return names.index(level), level
    if isinstance(level, bool) or not isinstance(level, (int, np.integer)):
        raise ValueError(
            f"scenarios.{who}: `level` must be a category name or an integer code; got {level!r}."
        )
    if not np.any(values == level):
        raise ValueError(
            f"scenarios.{who}: no row has {attribute} == {level}; the codes present are "
            f"{sorted(set(values.tolist()))[:20]}."
        )
    label = names[int(level)] if names is not None and 0 <= level < len(names) else str(level)
    return int(level), label


def _check_fraction(fraction, who: str) -> float:
    if isinstance(fraction, bool) or not isinstance(fraction, (int, float, np.floating)):
        raise ValueError(
            f"scenarios.{who}: `fraction` must be a number in (0, 1]; got {fraction!r}."
        )
    if not 0 < fraction <= 1:
        raise ValueError(f"scenarios.{who}: `fraction` must be in (0, 1]; got {fraction}.")
    return float(fraction)


def _pick(rows: np.ndarray, fraction: float, seed: int, total_kept: int, who: str) -> np.ndarray:
    k = int(round(fraction * rows.size))
    if k < 1:
        raise ValueError(
            f"scenarios.{who}: {fraction:.3g} of {rows.size} rows rounds to none; raise `fraction`."
        )
    if k >= total_kept:
        raise ValueError(f"scenarios.{who}: the request would delete every remaining row.")
    rng = np.random.default_rng(seed)
    return np.sort(rng.choice(rows, size=k, replace=False))


def _shares(values: np.ndarray, weights: np.ndarray, code: int) -> float:
    keep = weights > 0
    return float(np.sum(weights[keep] * (values[keep] == code)) / np.sum(weights[keep]))


def group_deletion(split, attribute: str, level, fraction: float, *, seed: int = 0) -> Scenario:
    """Forget a random `fraction` of the rows of one group (`attribute == level`).

    Args:
        split: a `DatasetSplit` (its train rows are used) or a `Dataset`.
        attribute: a categorical attribute, e.g. `"sex"`.
        level: the group, as a category name (`"Female"`) or an integer code.
        fraction: the share of the group's retained rows to forget, in (0, 1].
        seed: seed of the random choice (`numpy.random.default_rng`).

    Example:
        ```python
        import unlearnx as ux
        s = ux.scenarios.group_deletion(ux.datasets.german(), "sex", "female", 0.8)
        print(s.name)
        print(s.description)
        ```
    """
    who = "group_deletion"
    data, name = _train(split, who)
    values = _attribute(data, attribute, who)
    code, label = _code(data, attribute, level, values, who)
    fraction = _check_fraction(fraction, who)
    w = np.asarray(data.weights)
    rows = np.flatnonzero((values == code) & (w > 0))
    chosen = _pick(rows, fraction, seed, int(np.sum(w > 0)), who)
    before = _shares(values, w, code)
    after_w = w.copy()
    after_w[chosen] = 0
    after = _shares(values, after_w, code)
    return Scenario(
        f"{name}: forget {fraction:.0%} of {attribute}={label}",
        forget_rows(chosen),
        attribute,
        f"Forget {chosen.size} of the {rows.size} rows with {attribute}={label} "
        f"(seed {seed}); their share of the data falls from {before:.1%} to {after:.1%}.",
    )


def label_group_deletion(
    split, attribute: str, level, label: int, fraction: float, *, seed: int = 0
) -> Scenario:
    """Forget a random `fraction` of the rows of one group that carry one label
    (`attribute == level` and `y == label`): the group's base rate shifts.

    Args:
        split: a `DatasetSplit` (its train rows are used) or a `Dataset`.
        attribute: a categorical attribute, e.g. `"sex"`.
        level: the group, as a category name or an integer code.
        label: the class label of the rows to forget.
        fraction: the share of those rows to forget, in (0, 1].
        seed: seed of the random choice.

    Example:
        ```python
        import unlearnx as ux
        s = ux.scenarios.label_group_deletion(ux.datasets.adult(), "sex", "Female", 1, 0.8)
        print(s.description)
        ```
    """
    who = "label_group_deletion"
    data, name = _train(split, who)
    values = _attribute(data, attribute, who)
    code, level_name = _code(data, attribute, level, values, who)
    fraction = _check_fraction(fraction, who)
    y = np.asarray(data.y)
    if (
        isinstance(label, bool)
        or not isinstance(label, (int, np.integer))
        or not np.any(y == label)
    ):
        raise ValueError(
            f"scenarios.{who}: `label` must be an integer class present in the data "
            f"({sorted(set(y.tolist()))[:10]}); got {label!r}."
        )
    w = np.asarray(data.weights)
    group = (values == code) & (w > 0)
    rows = np.flatnonzero(group & (y == label))
    chosen = _pick(rows, fraction, seed, int(np.sum(w > 0)), who)
    rate_before = float(np.mean(y[group] == label))
    keep = group.copy()
    keep[chosen] = False
    rate_after = float(np.mean(y[keep] == label))
    return Scenario(
        f"{name}: forget {fraction:.0%} of {attribute}={level_name}, y={label}",
        forget_rows(chosen),
        attribute,
        f"Forget {chosen.size} of the {rows.size} rows with {attribute}={level_name} and "
        f"y={label} (seed {seed}); the share of y={label} within the group falls from "
        f"{rate_before:.1%} to {rate_after:.1%}.",
    )


def _association(X: np.ndarray, v: np.ndarray, categorical: bool) -> np.ndarray:
    """Per column of `X`, the share of its variance explained by `v`: the correlation
    ratio η² for a categorical `v`, the squared correlation for a numeric one."""
    Xc = X - X.mean(axis=0)
    total = np.sum(Xc**2, axis=0)
    if categorical:
        between = np.zeros(X.shape[1])
        for c in np.unique(v):
            m = v == c
            between += m.sum() * (X[m].mean(axis=0) - X.mean(axis=0)) ** 2
        out = between
    else:
        vc = v - v.mean()
        out = (vc @ Xc) ** 2 / max(float(vc @ vc), 1e-300)
    return np.where(total > 0, out / np.where(total > 0, total, 1.0), 0.0)


def feature_with_proxies(
    split, feature: str, *, attribute: str | None = None, n_proxies: int = 3
) -> Scenario:
    """Remove a feature from every row (`forget_features`), keeping the features that
    are its proxies.

    The description names the `n_proxies` remaining features most associated with the
    attribute (by the share of their variance it explains: the correlation ratio for a
    categorical attribute), i.e. the channels through which the model can still learn it.

    Args:
        split: a `DatasetSplit` (its train rows are used) or a `Dataset`.
        feature: the feature to remove: a column group such as `"sex"` or a column name.
        attribute: the attribute the feature encodes (default: `feature`, which must then
            also be an attribute, as `"sex"` is on Adult).
        n_proxies: how many proxies to name.

    Example:
        ```python
        import unlearnx as ux
        s = ux.scenarios.feature_with_proxies(ux.datasets.adult(), "sex")
        print(s.description)   # names relationship, marital-status, ... as proxies
        ```
    """
    who = "feature_with_proxies"
    data, name = _train(split, who)
    attribute = feature if attribute is None else attribute
    values = _attribute(data, attribute, who)
    cols = set(data.columns(feature))
    keep = np.asarray(data.weights) > 0
    X = np.asarray(data.X)[keep]
    v = values[keep]
    categorical = np.issubdtype(v.dtype, np.integer)
    score = _association(X, v.astype(float) if not categorical else v, categorical)
    groups = data.groups or tuple((n, (j,)) for j, n in enumerate(data.feature_names))
    ranked = sorted(
        ((max(score[j] for j in c), g) for g, c in groups if not cols & set(c)), reverse=True
    )[: max(int(n_proxies), 0)]
    proxies = ", ".join(f"{g} (η² = {s:.2f})" for s, g in ranked)
    return Scenario(
        f"{name}: remove feature {feature}",
        forget_features(feature),
        attribute,
        f"Remove the feature {feature!r} ({len(cols)} columns) from every row; its "
        f"strongest remaining proxies for {attribute!r}: {proxies}.",
    )
