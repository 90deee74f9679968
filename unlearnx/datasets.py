"""Datasets for unlearning experiments: the `Dataset` pytree, real data, synthetic data.

Real tabular datasets ship with the package (gzip-compressed, with their provenance and
licences), so the loaders work offline: `adult` (UCI Adult, CC BY 4.0), `diabetes` (Pima
Indians Diabetes, CC0), `german` (Statlog German Credit, CC BY 4.0) and `digits` (UCI
optical handwritten digits, 10 classes, CC BY 4.0). Each returns a
`DatasetSplit(train, test, name, description)`.

The synthetic generators have known ground truth: `synthetic_glm` samples from a
logistic, Gaussian or softmax linear model and returns the true parameters;
`synthetic_groups` builds a dataset whose features and labels depend on a group, with
optional proxy columns that leak it.

Example:
    ```python
    import jax
    import unlearnx as ux
    adult = ux.datasets.adult()
    data, w = ux.datasets.synthetic_glm(jax.random.key(0), n=200, d=3)
    ```
"""

from ._data._dataset import Dataset as Dataset, DatasetSplit as DatasetSplit
from ._data._loaders import (
    adult as adult,
    diabetes as diabetes,
    digits as digits,
    german as german,
)
from ._data._synthetic import glm as synthetic_glm, groups as synthetic_groups

__all__ = [
    "Dataset",
    "DatasetSplit",
    "adult",
    "diabetes",
    "digits",
    "german",
    "synthetic_glm",
    "synthetic_groups",
]
