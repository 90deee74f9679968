"""A small convolutional classifier for flattened images (e.g. scikit-learn's digits)."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import equinox as eqx
import jax
import jax.numpy as jnp

from .._custom_types import Array, Float, PRNGKeyArray
from ._base import AbstractModel
from ._likelihood import Categorical


class CNNClassifier(AbstractModel):
    """A convolutional network with `n_classes` logits and a categorical likelihood.

    Each example is one image flattened to a vector of `channels·height·width` numbers
    (row-major `(channels, height, width)`, as `image.ravel()` gives). The network is
    `len(channels)` blocks of `eqx.nn.Conv2d` (stride 1, "SAME" zero padding, so the
    spatial size is kept), the activation and, with `pool=True`, a 2×2 average pooling
    (`eqx.nn.AvgPool2d`, stride 2, halving each side, rounding down); then the feature
    maps are flattened and passed through `eqx.nn.Linear` layers of widths `hidden`
    (each followed by the activation) and a final `eqx.nn.Linear` to the logits.

    With the defaults on 1×8×8 digits (scikit-learn's `load_digits`): 16 channels at 8×8,
    32 channels at 4×4, pooled to 2×2, a hidden layer of 64 and 10 logits: 13,706
    parameters.

    Args:
        image_shape: `(channels, height, width)` of one image.
        n_classes: number of classes (≥ 2).
        channels: output channels of each convolution.
        kernel_size: side of the (square) convolution kernels; odd sizes keep the
            padding symmetric.
        hidden: widths of the dense layers between the convolutions and the logits.
        pool: whether to average-pool 2×2 after each convolution.
        activation: elementwise nonlinearity.
        key: PRNG key for the initial weights.
        dtype: parameter dtype (default: JAX's default float).

    Example:
        ```python
        import jax, unlearnx as ux
        model = ux.models.CNNClassifier((1, 8, 8), 10, key=jax.random.key(0))
        print(ux.models.n_params(model))  # 13706
        ```
    """

    convs: tuple[eqx.nn.Conv2d, ...]
    linears: tuple[eqx.nn.Linear, ...]
    pool: eqx.nn.AvgPool2d | None
    activation: Callable
    likelihood: Categorical
    image_shape: tuple[int, int, int] = eqx.field(static=True)

    def __init__(
        self,
        image_shape: Sequence[int],
        n_classes: int,
        *,
        channels: Sequence[int] = (16, 32),
        kernel_size: int = 3,
        hidden: int | Sequence[int] = 64,
        pool: bool = True,
        activation: Callable = jax.nn.tanh,
        key: PRNGKeyArray,
        dtype=None,
    ):
        shape = tuple(image_shape)
        if len(shape) != 3 or not all(isinstance(s, int) and s >= 1 for s in shape):
            raise ValueError(
                "CNNClassifier: `image_shape` must be three positive integers "
                f"(channels, height, width); got {image_shape!r}. For 8×8 grey digits "
                "pass (1, 8, 8)."
            )
        if not isinstance(n_classes, int) or n_classes < 2:
            raise ValueError(
                f"CNNClassifier: `n_classes` must be an integer ≥ 2; got {n_classes!r}."
            )
        channels = tuple(channels)
        hidden = (hidden,) if isinstance(hidden, int) else tuple(hidden)
        for arg, sizes in (("channels", channels), ("hidden", hidden)):
            if not all(isinstance(s, int) and s >= 1 for s in sizes):
                raise ValueError(
                    f"CNNClassifier: `{arg}` must be positive integers; got {sizes!r}."
                )
        if not isinstance(kernel_size, int) or kernel_size < 1:
            raise ValueError(
                f"CNNClassifier: `kernel_size` must be a positive integer; got {kernel_size!r}."
            )
        c, h, w = shape
        if pool and (h >> len(channels) < 1 or w >> len(channels) < 1):
            raise ValueError(
                f"CNNClassifier: {len(channels)} rounds of 2×2 pooling shrink a {h}×{w} "
                "image to nothing; use fewer `channels` or `pool=False`."
            )
        keys = jax.random.split(key, len(channels) + len(hidden) + 1)
        convs = []
        for i, cout in enumerate(channels):
            convs.append(
                eqx.nn.Conv2d(c, cout, kernel_size, padding="SAME", dtype=dtype, key=keys[i])
            )
            c = cout
            if pool:
                h, w = h // 2, w // 2
        sizes = (c * h * w, *hidden, n_classes)
        linears = [
            eqx.nn.Linear(a, b, dtype=dtype, key=k)
            for a, b, k in zip(sizes[:-1], sizes[1:], keys[len(channels) :], strict=False)
        ]
        self.convs = tuple(convs)
        self.linears = tuple(linears)
        self.pool = eqx.nn.AvgPool2d(2, stride=2) if pool else None
        self.activation = activation
        self.likelihood = Categorical()
        self.image_shape = shape

    @property
    def n_inputs(self) -> int:
        c, h, w = self.image_shape
        return c * h * w

    @property
    def n_outputs(self) -> int:
        return self.linears[-1].out_features

    def __call__(self, x: Float[Array, " p"]) -> Float[Array, " c"]:
        h = jnp.reshape(x, self.image_shape)
        for conv in self.convs:
            h = self.activation(conv(h))
            if self.pool is not None:
                h = self.pool(h)
        h = jnp.ravel(h)
        for linear in self.linears[:-1]:
            h = self.activation(linear(h))
        return self.linears[-1](h)
