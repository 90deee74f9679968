"""Independence tests based on HSIC: permutation test and gamma approximation.

The test statistic is the biased HSIC, `HSIC_b = tr(KHLH) / n²`. Both tests form the two
`n × n` Gram matrices (O(n²) memory); for very large n subsample first, or use
[`hsic`][unlearnx.hsic.hsic] with `estimator="blocked"` for the statistic alone.
"""

from __future__ import annotations

from typing import NamedTuple

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.scipy.stats as jstats

from .._custom_types import Array, ArrayLike, Float, Int, PRNGKeyArray, Scalar
from ._estimators import _check_int, centre, check_kernel, check_pair
from ._kernels import AbstractKernel

#: Default permutation batch: at most this many Gram-matrix entries per batch (128 MB in
#: float64).
_BATCH_ENTRIES = 2**24


class HSICTestResult(NamedTuple):
    """Result of [`hsic_test`][unlearnx.hsic.hsic_test].

    Attributes:
        statistic: the biased HSIC, `tr(KHLH) / n²`.
        p_value: the probability, under independence, of a statistic at least this large.
        null_mean: mean of the statistic under independence (the gamma approximation's
            mean, or the mean over the permutations).
        null_std: its standard deviation (the variance is `null_std**2`).
        shape: shape `α = mean² / variance` of the gamma distribution fitted to the null
            (for the permutation test: moment-matched to the permutations).
        scale: scale `β = variance / mean` of that gamma distribution.
        n_permutations: number of permutations (0 for the gamma approximation).

    Example:
        ```python
        import jax
        from unlearnx.hsic import hsic_test
        x = jax.random.normal(jax.random.key(0), (200,))
        res = hsic_test(x, x**2, method="gamma")
        print(res.p_value < 0.05, res.null_mean, res.null_std**2)
        ```
    """

    statistic: Float[Array, ""]
    p_value: Float[Array, ""]
    null_mean: Float[Array, ""]
    null_std: Float[Array, ""]
    shape: Float[Array, ""]
    scale: Float[Array, ""]
    n_permutations: Int[Array, ""]


def _statistic(Kc: Float[Array, "n n"], Lc: Float[Array, "n n"]) -> Scalar:
    return jnp.sum(Kc * Lc) / float(Kc.shape[0]) ** 2


def _gamma_null(K, L, Kc, Lc):
    # Gretton et al. (2008), "A kernel statistical test of independence", section 3, as in
    # the authors' reference code (hsicTestGamma.m). The mean is written for any kernel:
    # E[HSIC_b] ≈ (E k(x, x) − E k(x, x'))(E l(y, y) − E l(y, y')) / n, which is
    # (1 + μx μy − μx − μy) / n for kernels with k(x, x) = 1.
    n = float(K.shape[0])
    off = 1.0 - jnp.eye(K.shape[0], dtype=K.dtype)
    mu_x = jnp.sum(K * off) / (n * (n - 1.0))
    mu_y = jnp.sum(L * off) / (n * (n - 1.0))
    mean = (jnp.mean(jnp.diag(K)) - mu_x) * (jnp.mean(jnp.diag(L)) - mu_y) / n
    B = (Kc * Lc / 6.0) ** 2 * off
    var = jnp.sum(B) / (n * (n - 1.0))
    var = 72.0 * (n - 4.0) * (n - 5.0) / (n * (n - 1.0) * (n - 2.0) * (n - 3.0)) * var
    return mean, var


@eqx.filter_jit
def _test(kx, ky, X, Y, method, key, n_permutations, batch_size):
    kx, ky = kx.fit(X), ky.fit(Y)
    K, L = kx.gram(X, X), ky.gram(Y, Y)
    Kc, Lc = centre(K), centre(L)
    stat = _statistic(Kc, Lc)
    if method == "gamma":
        mean, var = _gamma_null(K, L, Kc, Lc)
        shape, scale = mean**2 / var, var / mean
        p = jstats.gamma.sf(stat, shape, scale=scale)
        return HSICTestResult(
            stat, p, mean, jnp.sqrt(var), shape, scale, jnp.asarray(0, dtype=jnp.int32)
        )

    n = X.shape[0]

    def permuted(k):
        p = jax.random.permutation(k, n)
        return _statistic(Kc, Lc[p][:, p])

    null = jax.lax.map(permuted, jax.random.split(key, n_permutations), batch_size=batch_size)
    p = (1.0 + jnp.sum(null >= stat)) / (1.0 + n_permutations)
    mean, var = jnp.mean(null), jnp.var(null, ddof=1)
    return HSICTestResult(
        stat,
        p.astype(stat.dtype),
        mean,
        jnp.sqrt(var),
        mean**2 / var,
        var / mean,
        jnp.asarray(n_permutations, dtype=jnp.int32),
    )


def hsic_test(
    x: ArrayLike,
    y: ArrayLike,
    *,
    method: str = "permutation",
    key: PRNGKeyArray | None = None,
    kernel_x: AbstractKernel | None = None,
    kernel_y: AbstractKernel | None = None,
    n_permutations: int = 500,
    batch_size: int | None = None,
) -> HSICTestResult:
    """Test the independence of paired samples `x` and `y` with HSIC.

    The statistic is the biased HSIC with the given kernels (default: Gaussian kernels
    with the median-heuristic bandwidth). Its null distribution comes from either

    - `method="permutation"`: the statistic recomputed on `n_permutations` random
      re-pairings of `y` (the centred Gram matrix's rows and columns permuted, all
      permutations as one batched computation); p-value `(1 + #{null ≥ stat}) / (1 + P)`,
      which is a valid (never anti-conservative) p-value. Needs `key`.
    - `method="gamma"`: the gamma distribution with the null mean and variance of the
      statistic (Gretton et al., 2008); no randomness, one pass, but an approximation
      that is best in the upper tail at moderate to large n. Needs n ≥ 6.

    Everything is traceable: the test can be `jax.vmap`-ped over many datasets of the
    same shape (and keys).

    Args:
        x: samples of shape `(n,)` or `(n, dx)`.
        y: samples of shape `(n,)` or `(n, dy)`, paired with `x`.
        method: `"permutation"` or `"gamma"`.
        key: PRNG key for the permutations.
        kernel_x: kernel on `x`; default a median-heuristic Gaussian kernel.
        kernel_y: kernel on `y`; same default.
        n_permutations: number of permutations `P`.
        batch_size: permutations computed at once (each holds an `n × n` matrix);
            default as many as fit in 2²⁴ matrix entries. Under `jax.vmap` over `B`
            datasets the memory is `B` times that: pass a smaller batch.

    Returns:
        An [`HSICTestResult`][unlearnx.hsic.HSICTestResult].

    Raises:
        ValueError: for mismatched numbers of rows, an unknown method, a missing key for
            the permutation test, or fewer than 6 samples for the gamma approximation.

    Example:
        ```python
        import jax
        from unlearnx.hsic import hsic_test
        kx, ky, kt = jax.random.split(jax.random.key(0), 3)
        x = jax.random.normal(kx, (200,))
        y = x + jax.random.normal(ky, (200,))
        res = hsic_test(x, y, key=kt)
        print(res.statistic, res.p_value)                # p = 1/501: dependent
        print(hsic_test(x, y, method="gamma").p_value)
        ```
    """
    X, Y = check_pair(x, y, "hsic_test")
    kx = check_kernel(kernel_x, "kernel_x", "hsic_test")
    ky = check_kernel(kernel_y, "kernel_y", "hsic_test")
    n = X.shape[0]
    if method == "permutation":
        if key is None:
            raise ValueError(
                "hsic_test: method='permutation' draws random permutations and needs an "
                "explicit `key` (e.g. key=jax.random.key(0)); or use method='gamma'."
            )
        _check_int(n_permutations, "n_permutations", 1, "hsic_test")
        if batch_size is None:
            batch_size = max(1, min(n_permutations, _BATCH_ENTRIES // (n * n)))
        _check_int(batch_size, "batch_size", 1, "hsic_test")
    elif method == "gamma":
        if n < 6:
            raise ValueError(
                f"hsic_test: method='gamma' needs at least 6 samples (its null variance "
                f"has the factor (n-4)(n-5)); got {n}. Use method='permutation'."
            )
    else:
        raise ValueError(f"hsic_test: `method` must be 'permutation' or 'gamma'; got {method!r}.")
    return _test(kx, ky, X, Y, method, key, n_permutations, batch_size)
