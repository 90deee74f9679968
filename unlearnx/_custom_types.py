"""Type aliases shared across unlearnx (jaxtyping shapes)."""

from typing import Any, TypeAlias

from jaxtyping import Array, ArrayLike, Bool, Float, Int, PRNGKeyArray, PyTree

Scalar: TypeAlias = Float[Array, ""]
Params: TypeAlias = Float[Array, " d"]
Features: TypeAlias = Float[Array, "n p"]
Labels: TypeAlias = Array  # int (classes) or float (regression), shape (n,)
Weights: TypeAlias = Float[Array, " n"]
Model: TypeAlias = Any  # an equinox Module with `loss`, `__call__`, `likelihood`

__all__ = [
    "Array",
    "ArrayLike",
    "Bool",
    "Float",
    "Int",
    "PRNGKeyArray",
    "PyTree",
    "Scalar",
    "Params",
    "Features",
    "Labels",
    "Weights",
    "Model",
]
