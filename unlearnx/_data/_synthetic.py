"""Synthetic datasets with known ground truth: generalised linear models and groups.

Both generators draw every random number from the explicit `key` with `jax.random`, so a
key fixes the dataset exactly.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from .._custom_types import Array, Float, PRNGKeyArray
from ._dataset import Dataset

_FAMILIES = ("logistic", "gaussian", "softmax")


def _float_dtype(dtype, where: str):
    """The requested floating dtype, or jnp's default float dtype for `None`."""
    dtype = jnp.result_type(float) if dtype is None else jnp.dtype(dtype)
    if not jnp.issubdtype(dtype, jnp.floating):
        raise ValueError(f"{where}: `dtype` must be a floating dtype; got {dtype}.")
    return dtype


def _check_size(n: int, d: int, where: str) -> None:
    if int(n) != n or n < 1:
        raise ValueError(f"{where}: `n` must be a positive integer; got {n!r}.")
    if int(d) != d or d < 1:
        raise ValueError(f"{where}: `d` must be a positive integer; got {d!r}.")


def glm(
    key: PRNGKeyArray,
    n: int = 1000,
    d: int = 10,
    *,
    family: str = "logistic",
    n_classes: int = 3,
    noise_std: float = 1.0,
    scale: float = 1.0,
    dtype=None,
) -> tuple[Dataset, Float[Array, "*c d"]]:
    """A dataset sampled from a generalised linear model with known parameters.

    Features are `X ~ N(0, I)`. The true parameters are `scale * N(0, I / d)`: a vector
    of shape `(d,)`, or a matrix of shape `(n_classes, d)` for `"softmax"`, so that the
    linear predictor `X @ w` has variance about `scale**2`. There is no intercept.
    Labels are sampled from the model:

    - `"logistic"`: `y ~ Bernoulli(sigmoid(X @ w))`, int32 in `{0, 1}`, `n_classes=2`;
    - `"gaussian"`: `y = X @ w + noise_std * N(0, 1)`, float, `n_classes=None`;
    - `"softmax"`: `y ~ Categorical(softmax(X @ W.T))`, int32 in `{0, ..., C - 1}`.

    Args:
        key: a JAX PRNG key; it fixes the dataset.
        n: number of rows.
        d: number of features (named `"x0"`, `"x1"`, ...).
        family: `"logistic"`, `"gaussian"` or `"softmax"`.
        n_classes: number of classes for `"softmax"` (at least 2); ignored otherwise.
        noise_std: standard deviation of the noise for `"gaussian"`; ignored otherwise.
        scale: scale of the true parameters (the signal strength).
        dtype: floating dtype of `X`, `weights` and float labels; `None` means JAX's
            default float dtype.

    Returns:
        `(data, true_params)`: the dataset (all weights 1) and the true parameters.

    Example:
        ```python
        import jax
        import unlearnx as ux
        data, w = ux.datasets.synthetic_glm(jax.random.key(0), n=500, d=5)
        print(data.X.shape, data.y[:5], w.shape)  # (500, 5) [...] (5,)
        ```
    """
    _check_size(n, d, "synthetic_glm")
    dtype = _float_dtype(dtype, "synthetic_glm")
    if family not in _FAMILIES:
        raise ValueError(f"synthetic_glm: unknown `family={family!r}`; choose one of {_FAMILIES}.")
    if family == "softmax" and (int(n_classes) != n_classes or n_classes < 2):
        raise ValueError(
            f"synthetic_glm: `n_classes` must be an integer >= 2 for the softmax family; "
            f"got {n_classes!r}."
        )
    if family == "gaussian" and not noise_std >= 0:
        raise ValueError(f"synthetic_glm: `noise_std` must be >= 0; got {noise_std}.")
    if not math.isfinite(scale):
        raise ValueError(f"synthetic_glm: `scale` must be finite; got {scale}.")
    kx, kw, ky = jax.random.split(key, 3)
    X = jax.random.normal(kx, (n, d), dtype)
    w_shape = (int(n_classes), d) if family == "softmax" else (d,)
    w = scale * jax.random.normal(kw, w_shape, dtype) / math.sqrt(d)
    if family == "logistic":
        y = jax.random.bernoulli(ky, jax.nn.sigmoid(X @ w)).astype(jnp.int32)
        classes = 2
    elif family == "softmax":
        y = jax.random.categorical(ky, X @ w.T, axis=-1).astype(jnp.int32)
        classes = int(n_classes)
    else:
        y = X @ w + noise_std * jax.random.normal(ky, (n,), dtype)
        classes = None
    data = Dataset(
        X=X,
        y=y,
        weights=jnp.ones(n, dtype),
        attributes={},
        feature_names=tuple(f"x{j}" for j in range(d)),
        groups=tuple((f"x{j}", (j,)) for j in range(d)),
        n_classes=classes,
    )
    return data, w


def groups(
    key: PRNGKeyArray,
    n: int = 2000,
    d: int = 5,
    *,
    n_groups: int = 2,
    shift: float = 1.0,
    proxy_strength: float = 0.0,
    n_proxies: int = 2,
    dtype=None,
) -> Dataset:
    """A binary classification dataset whose features and labels depend on a group.

    Each row belongs to a group `g` drawn uniformly from `{0, ..., n_groups - 1}`. Its
    features are `x = shift * g + z` with `z ~ N(0, I)` (the group shifts every feature
    mean) and its label is `y ~ Bernoulli(sigmoid(z @ w + b_g))`, with `w ~ N(0, I / d)`
    and a group-specific intercept `b_g = shift * (g - (n_groups - 1) / 2)`, so the base
    rates rise with the group index. `shift=0` makes the group irrelevant.

    The columns of `X` are the features `"x0"`, ..., then (if `proxy_strength > 0`)
    `n_proxies` noisy proxies of the group, `"proxy0"`, ..., each `proxy_strength * g +
    N(0, 1)`, and last the group itself as a one-hot block named `"group"` (columns
    `"group=g0"`, ...), so that it can be removed with `forget_features("group")` while the
    proxies still leak it. The group code is also kept as the attribute `"group"`.

    Args:
        key: a JAX PRNG key; it fixes the dataset.
        n: number of rows.
        d: number of ordinary features.
        n_groups: number of groups (at least 2).
        shift: how strongly the group moves the feature means and the base rate.
        proxy_strength: signal of the group in each proxy column (0 for no proxies).
        n_proxies: number of proxy columns when `proxy_strength > 0`.
        dtype: floating dtype of `X` and `weights`; `None` means JAX's default float
            dtype.

    Returns:
        A `Dataset` with int32 labels, `n_classes=2`, attribute `"group"` (int32 codes)
        and its levels `("g0", "g1", ...)`.

    Example:
        ```python
        import jax
        import unlearnx as ux
        data = ux.datasets.synthetic_groups(jax.random.key(0), proxy_strength=2.0)
        print(data.feature_names, data.columns("group"))
        ```
    """
    _check_size(n, d, "synthetic_groups")
    dtype = _float_dtype(dtype, "synthetic_groups")
    if int(n_groups) != n_groups or n_groups < 2:
        raise ValueError(f"synthetic_groups: `n_groups` must be an integer >= 2; got {n_groups!r}.")
    if not math.isfinite(shift):
        raise ValueError(f"synthetic_groups: `shift` must be finite; got {shift}.")
    if not (math.isfinite(proxy_strength) and proxy_strength >= 0):
        raise ValueError(
            f"synthetic_groups: `proxy_strength` must be finite and >= 0; got {proxy_strength}."
        )
    if proxy_strength > 0 and (int(n_proxies) != n_proxies or n_proxies < 1):
        raise ValueError(
            f"synthetic_groups: `n_proxies` must be a positive integer when "
            f"`proxy_strength > 0`; got {n_proxies!r}."
        )
    n_groups = int(n_groups)
    kg, kx, kw, kp, ky = jax.random.split(key, 5)
    g = jax.random.randint(kg, (n,), 0, n_groups, dtype=jnp.int32)
    gf = g.astype(dtype)
    z = jax.random.normal(kx, (n, d), dtype)
    x = shift * gf[:, None] + z
    w = jax.random.normal(kw, (d,), dtype) / math.sqrt(d)
    intercept = shift * (gf - (n_groups - 1) / 2)
    y = jax.random.bernoulli(ky, jax.nn.sigmoid(z @ w + intercept)).astype(jnp.int32)

    blocks = [x]
    names = [f"x{j}" for j in range(d)]
    if proxy_strength > 0:
        noise = jax.random.normal(kp, (n, int(n_proxies)), dtype)
        blocks.append(proxy_strength * gf[:, None] + noise)
        names += [f"proxy{j}" for j in range(int(n_proxies))]
    blocks.append(jax.nn.one_hot(g, n_groups, dtype=dtype))
    levels = tuple(f"g{k}" for k in range(n_groups))
    group_cols = tuple(range(len(names), len(names) + n_groups))
    singles = tuple((name, (j,)) for j, name in enumerate(names))
    names += [f"group={lv}" for lv in levels]
    return Dataset(
        X=jnp.concatenate(blocks, axis=1),
        y=y,
        weights=jnp.ones(n, dtype),
        attributes={"group": g},
        feature_names=tuple(names),
        groups=(*singles, ("group", group_cols)),
        levels=(("group", levels),),
        n_classes=2,
    )
