"""HSIC: kernel independence measures, tests and a differentiable penalty.

The Hilbert-Schmidt independence criterion (Gretton et al., 2005) between paired samples
`x` and `y` is zero (in the population) exactly when they are independent, for
characteristic kernels such as the Gaussian. unlearnx uses it to check, and to correct,
dependence of a model's predictions on an attribute after non-uniform deletions.

- Kernels: [`GaussianKernel`][unlearnx.hsic.GaussianKernel] (bandwidth by the median
  heuristic or given), [`LinearKernel`][unlearnx.hsic.LinearKernel],
  [`DistanceKernel`][unlearnx.hsic.DistanceKernel] (HSIC = distance covariance / 4),
  [`CategoricalKernel`][unlearnx.hsic.CategoricalKernel] for group labels, and their
  [`ProductKernel`][unlearnx.hsic.ProductKernel] / [`SumKernel`][unlearnx.hsic.SumKernel].
- [`hsic`][unlearnx.hsic.hsic]: biased, unbiased, blocked (O(n·block) memory) and random
  Fourier feature estimates, optionally normalised.
- [`hsic_test`][unlearnx.hsic.hsic_test]: permutation and gamma-approximation tests.
- [`hsic_penalty`][unlearnx.hsic.hsic_penalty]: `HSIC(predict_fn(X), V)`, differentiable.

Example:
    ```python
    import jax
    import unlearnx as ux
    x = jax.random.normal(jax.random.key(0), (200,))
    y = x**2 + 0.5 * jax.random.normal(jax.random.key(1), (200,))
    print(ux.hsic.hsic(x, y), ux.hsic.hsic_test(x, y, key=jax.random.key(2)).p_value)
    ```
"""

from ._hsic._estimators import hsic as hsic
from ._hsic._kernels import (
    AbstractKernel as AbstractKernel,
    CategoricalKernel as CategoricalKernel,
    DistanceKernel as DistanceKernel,
    GaussianKernel as GaussianKernel,
    LinearKernel as LinearKernel,
    ProductKernel as ProductKernel,
    SumKernel as SumKernel,
    median_heuristic as median_heuristic,
)
from ._hsic._penalty import hsic_penalty as hsic_penalty
from ._hsic._tests import HSICTestResult as HSICTestResult, hsic_test as hsic_test
