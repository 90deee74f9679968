"""HSIC estimators: biased, unbiased, blocked (tiled) and random Fourier features.

With Gram matrices `K = [k(x_i, x_j)]`, `L = [l(y_i, y_j)]` and the centring matrix
`H = I − 11ᵀ/n`, the biased statistic is `HSIC_b = tr(KHLH) / n²` (Gretton et al., 2005).
It is computed here without forming `H`: with the row means `r` and grand mean `g` of `K`,
the doubly-centred matrix is `K̃_ij = K_ij − r_i − r_j + g` and `HSIC_b = Σ_ij K̃_ij L̃_ij / n²`.
Centring before multiplying (rather than expanding into `mean(K∘L) − 2 mean(r∘s) + g h`)
avoids a cancellation between large terms that costs float32 most of its digits at large n.
"""

from __future__ import annotations

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

from .._custom_types import Array, ArrayLike, Float, PRNGKeyArray, Scalar
from ._kernels import AbstractKernel, GaussianKernel, LinearKernel, SumKernel, as_rows

ESTIMATORS = ("biased", "unbiased", "blocked", "rff")


def centre(K: Float[Array, "n n"]) -> Float[Array, "n n"]:
    """`HKH` for a symmetric `K`, from its row means (no `H` is formed)."""
    r = jnp.mean(K, axis=1)
    return K - r[:, None] - r[None, :] + jnp.mean(r)


def _biased(kx, ky, X, Y, normalised):
    n2 = float(X.shape[0]) ** 2
    Kc, Lc = centre(kx.gram(X, X)), centre(ky.gram(Y, Y))
    xy = jnp.sum(Kc * Lc) / n2
    if not normalised:
        return xy, None, None
    return xy, jnp.sum(Kc * Kc) / n2, jnp.sum(Lc * Lc) / n2


def _song(K, L):
    # Song et al. (2012), eq. (5): U-statistic with the diagonals zeroed.
    n = float(K.shape[0])
    K = K * (1.0 - jnp.eye(K.shape[0], dtype=K.dtype))
    L = L * (1.0 - jnp.eye(L.shape[0], dtype=L.dtype))
    Kr, Lr = jnp.sum(K, axis=1), jnp.sum(L, axis=1)
    trace = jnp.sum(K * L)
    total = jnp.sum(Kr) * jnp.sum(Lr) / ((n - 1.0) * (n - 2.0))
    cross = 2.0 / (n - 2.0) * jnp.dot(Kr, Lr)
    return (trace + total - cross) / (n * (n - 3.0))


def _unbiased(kx, ky, X, Y, normalised):
    K, L = kx.gram(X, X), ky.gram(Y, Y)
    xy = _song(K, L)
    if not normalised:
        return xy, None, None
    return xy, _song(K, K), _song(L, L)


def _tiles(X, block):
    # Rows of X in (n_blocks, block, d) tiles, the last one padded with copies of row 0.
    n, d = X.shape
    n_blocks = -(-n // block)
    pad = n_blocks * block - n
    Xp = jnp.concatenate([X, jnp.broadcast_to(X[:1], (pad, d))]) if pad else X
    return Xp.reshape(n_blocks, block, d)


def _blocked(kx, ky, X, Y, block, normalised):
    # Square `block × block` tiles, each one fused elementwise-and-reduce loop over a tile
    # that stays in cache: O(n + block²) memory. Measured on CPU at n = 50,000, these
    # choices matter (4-60×): tiles of `block × n` (long reductions), several reductions
    # in one loop body, and a mask multiplied into a tile before a row reduction are all
    # slow in XLA:CPU. So the padding rows (copies of row 0) are subtracted after the row
    # sums, not masked. Under reverse-mode differentiation each scan step is recomputed
    # (`jax.checkpoint`) rather than storing its tile, so the gradient keeps that memory.
    n = X.shape[0]
    block = min(block, n)
    Xb, Yb = _tiles(X, block), _tiles(Y, block)
    n_blocks = Xb.shape[0]
    pad = n_blocks * block - n
    dtype = jax.eval_shape(kx.gram, Xb[0], Xb[0]).dtype

    # Pass 1: row means (= column means: the Gram matrices are symmetric).
    def row_means(kernel, Z, Zb):
        def outer(zi):
            @jax.checkpoint
            def inner(acc, zj):
                return acc + jnp.sum(kernel.gram(zj, zi), axis=0), None

            sums = jax.lax.scan(inner, jnp.zeros(block, dtype), Zb)[0]
            if pad:
                sums = sums - pad * kernel.gram(Z[:1], zi)[0]
            return sums / n

        return jax.lax.map(outer, Zb)

    rb, sb = row_means(kx, X, Xb), row_means(ky, Y, Yb)
    mask = jnp.asarray((np.arange(n_blocks * block) < n).reshape(n_blocks, block), dtype)
    g, h = jnp.sum(rb * mask) / n, jnp.sum(sb * mask) / n

    # Pass 2: Σ_ij f(K̃_ij, L̃_ij) over the centred tiles (i, j ≤ i), off-diagonal tiles
    # counted twice; one pass per sum.
    iu, ju = np.tril_indices(n_blocks)
    pairs = (jnp.asarray(iu), jnp.asarray(ju), jnp.asarray(np.where(iu == ju, 1.0, 2.0), dtype))

    def centred_sum(f, use_x, use_y):
        @jax.checkpoint
        def step(acc, pair):
            i, j, weight = pair
            w = mask[j][:, None] * mask[i][None, :]
            Kc = Lc = None
            if use_x:
                Kc = kx.gram(Xb[j], Xb[i]) - rb[j][:, None] - rb[i][None, :] + g
            if use_y:
                Lc = ky.gram(Yb[j], Yb[i]) - sb[j][:, None] - sb[i][None, :] + h
            return acc + weight * jnp.sum(w * f(Kc, Lc)), None

        total = jax.lax.scan(step, jnp.zeros((), dtype), pairs)[0]
        return total / float(n) ** 2

    xy = centred_sum(lambda K, L: K * L, True, True)
    if not normalised:
        return xy, None, None
    xx = centred_sum(lambda K, L: K * K, True, False)
    yy = centred_sum(lambda K, L: L * L, False, True)
    return xy, xx, yy


def _rd_sequence(half: int, d: int) -> np.ndarray:
    """The first `half` points of Roberts' R_d low-discrepancy sequence in [0, 1)^d:
    `frac(k · α)` with `α_j = φ_d^(−j)`, `φ_d` the root of `x^(d+1) = x + 1`."""
    phi = 2.0
    for _ in range(64):
        phi = (1.0 + phi) ** (1.0 / (d + 1))
    alpha = (1.0 / phi) ** np.arange(1, d + 1)
    return (np.arange(1, half + 1)[:, None] * alpha) % 1.0


def _features(kernel, X, key, n_features, which):
    """Explicit features `Z` with `Z Zᵀ ≈ K`: random Fourier features for a Gaussian
    kernel, the data itself for a linear kernel, and concatenation for a sum of those.

    The `n_features / 2` frequencies of a Gaussian kernel are randomised quasi-Monte Carlo
    (Avron et al., 2016): the R_d sequence shifted by one uniform vector drawn from `key`
    (so each frequency is still exactly N(0, σ⁻² I) and the kernel estimate unbiased),
    mapped through the normal quantile function; each gives a cos/sin pair. Measured at
    n = 2,000, D = 2,048, the relative error of HSIC fell from 3%, 5% and 7% (RMS over
    keys, i.i.d. Gaussian frequencies) to 0.1%, 0.4% and 1% for 1, 2 and 5 features.
    """
    if isinstance(kernel, GaussianKernel):
        half, d = n_features // 2, X.shape[1]
        shift = jax.random.uniform(key, (d,), dtype=X.dtype)
        u = (jnp.asarray(_rd_sequence(half, d), X.dtype) + shift) % 1.0
        eps = jnp.finfo(X.dtype).eps
        W = jax.scipy.special.ndtri(jnp.clip(u, eps, 1.0 - eps)).T / kernel.bandwidth
        P = X @ W
        return jnp.concatenate([jnp.cos(P), jnp.sin(P)], axis=1) / jnp.sqrt(float(half))
    if isinstance(kernel, LinearKernel):
        return X
    if isinstance(kernel, SumKernel):
        keys = jax.random.split(key, len(kernel.kernels))
        parts = zip(kernel.kernels, keys, strict=True)
        return jnp.concatenate([_features(k, X, kk, n_features, which) for k, kk in parts], 1)
    raise ValueError(
        f"hsic: estimator='rff' needs explicit features for `{which}`: a GaussianKernel, a "
        f"LinearKernel or a SumKernel of those; got {type(kernel).__name__}. Use "
        "estimator='blocked' for other kernels."
    )


def _rff(kx, ky, X, Y, block, key, n_features, normalised):
    # HSIC_b(Zx Zxᵀ, Zy Zyᵀ) = ‖Z̃xᵀ Z̃y‖²_F / n² with column-centred features Z̃;
    # accumulated over row tiles, so memory is O(block·D + D²), not O(n·D).
    n = X.shape[0]
    block = min(block, n)
    kx_key, ky_key = jax.random.split(key)
    Xb, Yb = _tiles(X, block), _tiles(Y, block)
    n_blocks = Xb.shape[0]
    mask = jnp.asarray((np.arange(n_blocks * block) < n).reshape(n_blocks, block, 1))

    def zx(xb):
        return _features(kx, xb, kx_key, n_features, "kernel_x")

    def zy(yb):
        return _features(ky, yb, ky_key, n_features, "kernel_y")

    @jax.checkpoint
    def col_sums(carry, tile):
        xb, yb, mt = tile
        return (carry[0] + jnp.sum(zx(xb) * mt, 0), carry[1] + jnp.sum(zy(yb) * mt, 0)), None

    Dx = jax.eval_shape(zx, Xb[0]).shape[1]
    Dy = jax.eval_shape(zy, Yb[0]).shape[1]
    init = (jnp.zeros(Dx, X.dtype), jnp.zeros(Dy, Y.dtype))
    (mx, my), _ = jax.lax.scan(col_sums, init, (Xb, Yb, mask))
    mx, my = mx / n, my / n

    @jax.checkpoint
    def cov(carry, tile):
        xb, yb, mt = tile
        a, b = (zx(xb) - mx) * mt, (zy(yb) - my) * mt
        out = (carry[0] + a.T @ b,)
        if normalised:
            out = out + (carry[1] + a.T @ a, carry[2] + b.T @ b)
        return out, None

    init = (jnp.zeros((Dx, Dy), X.dtype),)
    if normalised:
        init = init + (jnp.zeros((Dx, Dx), X.dtype), jnp.zeros((Dy, Dy), Y.dtype))
    covs, _ = jax.lax.scan(cov, init, (Xb, Yb, mask))
    n2 = float(n) ** 2
    out = [jnp.sum(C**2) / n2 for C in covs]
    return (out[0], None, None) if not normalised else tuple(out)


@eqx.filter_jit
def _hsic(kx, ky, X, Y, estimator, block, n_features, key, normalised):
    kx, ky = kx.fit(X), ky.fit(Y)
    if estimator == "biased":
        xy, xx, yy = _biased(kx, ky, X, Y, normalised)
    elif estimator == "unbiased":
        xy, xx, yy = _unbiased(kx, ky, X, Y, normalised)
    elif estimator == "blocked":
        xy, xx, yy = _blocked(kx, ky, X, Y, block, normalised)
    else:
        xy, xx, yy = _rff(kx, ky, X, Y, block, key, n_features, normalised)
    if normalised:
        return xy / jnp.sqrt(xx * yy)
    return xy


def _check_int(value, name, minimum, who="hsic"):
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise ValueError(f"{who}: `{name}` must be an integer ≥ {minimum}; got {value!r}.")


def check_pair(x: ArrayLike, y: ArrayLike, who: str) -> tuple[Array, Array]:
    """Validate and reshape a pair of samples to `(n, dx)`, `(n, dy)` rows."""
    X, Y = as_rows(x, f"{who}: x"), as_rows(y, f"{who}: y")
    if X.shape[0] != Y.shape[0]:
        raise ValueError(
            f"{who}: x and y must have the same number of rows (paired samples); got "
            f"x with {X.shape[0]} and y with {Y.shape[0]}."
        )
    if X.shape[0] < 2:
        raise ValueError(f"{who}: need at least 2 paired samples; got {X.shape[0]}.")
    return X, Y


def check_kernel(kernel, name: str, who: str) -> AbstractKernel:
    """`None` becomes a median-heuristic Gaussian kernel; anything else must be a kernel."""
    if kernel is None:
        return GaussianKernel()
    if not isinstance(kernel, AbstractKernel):
        raise ValueError(
            f"{who}: `{name}` must be a kernel (e.g. ux.hsic.GaussianKernel()) or None; got "
            f"{type(kernel).__name__}."
        )
    return kernel


def hsic(
    x: ArrayLike,
    y: ArrayLike,
    *,
    kernel_x: AbstractKernel | None = None,
    kernel_y: AbstractKernel | None = None,
    estimator: str = "biased",
    block: int = 1000,
    n_features: int = 1024,
    key: PRNGKeyArray | None = None,
    normalised: bool = False,
) -> Scalar:
    """The Hilbert-Schmidt independence criterion between paired samples `x` and `y`.

    HSIC is zero (in the population) if and only if `x` and `y` are independent, for
    characteristic kernels such as the Gaussian. Inputs of shape `(n,)` are one feature.

    Args:
        x: samples of shape `(n,)` or `(n, dx)`.
        y: samples of shape `(n,)` or `(n, dy)`, paired with `x` row by row.
        kernel_x: kernel on `x`; default a Gaussian kernel with the median-heuristic
            bandwidth (the median pairwise distance, from at most 1,000 rows).
        kernel_y: kernel on `y`; same default.
        estimator: which estimate to compute:

            - `"biased"`: `tr(KHLH)/n²` (the V-statistic), O(n²) time and memory.
            - `"unbiased"`: the U-statistic of Song et al. (2012), O(n²) time and memory;
              needs n ≥ 4 and can be slightly negative under independence.
            - `"blocked"`: the biased statistic, computed in `block × block` tiles of the
              Gram matrices: O(n²) time, O(n + block²) memory, also under `jax.grad`
              (two passes: the row means, then the sum of products of the centred tiles,
              of which only the lower triangle is visited). Use it for large n: 3 s at
              n = 50,000 on 2 CPU cores in float32.
            - `"rff"`: the biased statistic on random Fourier features (`n_features`
              features per Gaussian kernel, frequencies by randomised quasi-Monte Carlo;
              linear kernels use the data itself): O(n D²) time, O(block·D + D²)
              memory. Needs `key`.
        block: rows per tile for `"blocked"` and `"rff"`.
        n_features: number of random features `D` (even) per Gaussian kernel for `"rff"`.
        key: PRNG key for `"rff"`.
        normalised: return `HSIC(x, y) / sqrt(HSIC(x, x) · HSIC(y, y))` (the same
            estimator throughout), which lies in [0, 1] for the biased estimators and is
            1 when `y = x` (≈ 1 for `"rff"`, whose two sides use different features).

    Returns:
        The statistic, a scalar array.

    Raises:
        ValueError: for mismatched numbers of rows, an unknown estimator, too few rows
            for the unbiased estimator, or a missing key for `"rff"`.

    Example:
        ```python
        import jax
        from unlearnx.hsic import hsic
        x = jax.random.normal(jax.random.key(0), (200,))
        y = x**2 + 0.1 * jax.random.normal(jax.random.key(1), (200,))
        print(hsic(x, y), hsic(x, y, estimator="blocked", block=128))
        ```
    """
    X, Y = check_pair(x, y, "hsic")
    kx = check_kernel(kernel_x, "kernel_x", "hsic")
    ky = check_kernel(kernel_y, "kernel_y", "hsic")
    if estimator not in ESTIMATORS:
        raise ValueError(f"hsic: `estimator` must be one of {ESTIMATORS}; got {estimator!r}.")
    if estimator == "unbiased" and X.shape[0] < 4:
        raise ValueError(
            f"hsic: estimator='unbiased' needs at least 4 samples; got {X.shape[0]}. Use "
            "estimator='biased'."
        )
    _check_int(block, "block", 1)
    if estimator == "rff":
        if key is None:
            raise ValueError(
                "hsic: estimator='rff' draws random features and needs an explicit `key` "
                "(e.g. key=jax.random.key(0))."
            )
        _check_int(n_features, "n_features", 2)
        if n_features % 2:
            raise ValueError(f"hsic: `n_features` must be even (cos/sin pairs); got {n_features}.")
    return _hsic(kx, ky, X, Y, estimator, block, n_features, key, bool(normalised))
