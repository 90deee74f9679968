"""Tests of the HSIC kernels, estimators, independence tests and penalty.

Oracles are independent of the package's code: `dcor` (distance covariance), explicit
O(n³) centring with numpy, the U-statistic definition of the unbiased estimator as an
average over distinct 4-tuples, scipy's gamma distribution, and central finite
differences.
"""

import inspect
import re
import subprocess
import sys
import textwrap

import chex
import dcor
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.stats

import unlearnx.hsic as H

jax.config.update("jax_enable_x64", True)


# ---------------------------------------------------------------------------- oracles


def _gauss_np(X, sigma):
    X = X.reshape(len(X), -1)
    D2 = ((X[:, None, :] - X[None, :, :]) ** 2).sum(-1)
    return np.exp(-D2 / (2 * sigma**2))


def _biased_np(K, L):
    n = len(K)
    Hm = np.eye(n) - np.ones((n, n)) / n
    return np.trace(K @ Hm @ L @ Hm) / n**2


def _song_np(K, L):
    # Song et al. (2012), eq. (5), written out directly.
    n = len(K)
    Kt, Lt = K.copy(), L.copy()
    np.fill_diagonal(Kt, 0.0)
    np.fill_diagonal(Lt, 0.0)
    one = np.ones(n)
    return (
        np.trace(Kt @ Lt)
        + (one @ Kt @ one) * (one @ Lt @ one) / ((n - 1) * (n - 2))
        - 2.0 / (n - 2) * (one @ Kt @ Lt @ one)
    ) / (n * (n - 3))


def _ustat_np(K, L):
    # The U-statistic definition: the mean over distinct (i, j, q, r) of
    # k_ij l_ij + k_ij l_qr − 2 k_ij l_iq.
    n = len(K)
    i, j, q, r = np.meshgrid(*[np.arange(n)] * 4, indexing="ij")
    distinct = (i != j) & (i != q) & (i != r) & (j != q) & (j != r) & (q != r)
    h = K[i, j] * L[i, j] + K[i, j] * L[q, r] - 2 * K[i, j] * L[i, q]
    return h[distinct].mean()


def _median_np(X):
    X = X.reshape(len(X), -1)
    D = np.sqrt(((X[:, None, :] - X[None, :, :]) ** 2).sum(-1))
    d = D[np.triu_indices(len(X), 1)]
    return np.median(d[d > 0])


@pytest.fixture
def xy(rng):
    x = rng.normal(size=(137, 3))
    y = np.sin(x[:, :1]) + 0.5 * rng.normal(size=(137, 2))
    return x, y


# ---------------------------------------------------------------------------- kernels


def test_median_heuristic(rng):
    x = rng.normal(size=(300, 2))
    assert np.isclose(float(H.median_heuristic(x)), _median_np(x), rtol=1e-12)
    # Ties (distance 0) are left out; all-equal data gives 1.
    g = np.array([0.0, 0.0, 0.0, 1.0, 3.0])
    assert np.isclose(float(H.median_heuristic(g)), _median_np(g))
    assert float(H.median_heuristic(np.zeros(10))) == 1.0
    # Large n: 1,000 evenly spaced rows.
    big = rng.normal(size=2500)
    sub = big[np.arange(1000) * 2500 // 1000]
    assert np.isclose(float(H.median_heuristic(big)), _median_np(sub), rtol=1e-12)


@pytest.mark.parametrize(
    "kernel",
    [
        H.GaussianKernel(0.7),
        H.LinearKernel(),
        H.DistanceKernel(),
        H.GaussianKernel(1.3) * H.LinearKernel(),
        H.SumKernel(H.GaussianKernel(0.5), H.DistanceKernel(), H.LinearKernel()),
    ],
)
def test_gram_matches_call(kernel, rng):
    X, Y = rng.normal(size=(7, 3)), rng.normal(size=(5, 3))
    expected = jax.vmap(lambda x: jax.vmap(lambda y: kernel(x, y))(Y))(X)
    np.testing.assert_allclose(kernel.gram(X, Y), expected, rtol=1e-12, atol=1e-14)
    assert kernel.gram(X, Y).shape == (7, 5)


def test_kernel_values(rng):
    x = rng.normal(size=(20, 2))
    np.testing.assert_allclose(H.GaussianKernel(0.8).gram(x, x), _gauss_np(x, 0.8), rtol=1e-12)
    D = np.sqrt(((x[:, None] - x[None]) ** 2).sum(-1))
    np.testing.assert_allclose(H.DistanceKernel().gram(x, x), -D / 2, atol=1e-14)
    np.testing.assert_allclose(H.LinearKernel().gram(x, x), x @ x.T, rtol=1e-12)
    # Shape (n,) is one feature; many features take the expansion path.
    v = rng.normal(size=9)
    np.testing.assert_allclose(
        H.GaussianKernel(1.0).gram(v, v), H.GaussianKernel(1.0).gram(v[:, None], v[:, None])
    )
    w = rng.normal(size=(15, 40))
    np.testing.assert_allclose(H.GaussianKernel(5.0).gram(w, w), _gauss_np(w, 5.0), rtol=1e-10)
    # Composition.
    k1, k2 = H.GaussianKernel(0.5), H.LinearKernel()
    np.testing.assert_allclose((k1 * k2).gram(x, x), k1.gram(x, x) * k2.gram(x, x))
    np.testing.assert_allclose((k1 + k2).gram(x, x), k1.gram(x, x) + k2.gram(x, x))


def test_categorical_kernel_is_delta(rng):
    g = rng.integers(0, 4, size=30)
    K = H.CategoricalKernel().gram(g, g)
    np.testing.assert_array_equal(K, (g[:, None] == g[None, :]).astype(float))
    assert jnp.issubdtype(K.dtype, jnp.floating)
    G = rng.integers(0, 2, size=(25, 2))
    np.testing.assert_array_equal(
        H.CategoricalKernel().gram(G, G), (G[:, None] == G[None]).all(-1).astype(float)
    )
    assert float(H.CategoricalKernel()(jnp.array(2), jnp.array(2))) == 1.0


def test_gaussian_fit_and_bad_bandwidth(rng):
    x = rng.normal(size=50)
    k = H.GaussianKernel().fit(x)
    assert np.isclose(float(k.bandwidth), _median_np(x))
    assert H.GaussianKernel(2.0).fit(x).bandwidth == 2.0  # a given bandwidth is kept
    fitted = (H.GaussianKernel() * H.LinearKernel()).fit(x)
    assert np.isclose(float(fitted.kernels[0].bandwidth), _median_np(x))
    with pytest.raises(ValueError, match="bandwidth"):
        H.GaussianKernel(-1.0)
    with pytest.raises(ValueError, match="fit"):
        H.GaussianKernel().gram(x, x)


# ---------------------------------------------------------------------------- estimators


@pytest.mark.parametrize("shape", [(120,), (120, 3)])
def test_distance_kernel_equals_dcor(shape, rng):
    x = rng.normal(size=shape)
    y = x**2 + rng.normal(size=shape)
    k = H.DistanceKernel()
    b = H.hsic(x, y, kernel_x=k, kernel_y=k)
    assert abs(float(b) - dcor.distance_covariance_sqr(x, y) / 4) < 1e-10
    u = H.hsic(x, y, kernel_x=k, kernel_y=k, estimator="unbiased")
    assert abs(float(u) - dcor.u_distance_covariance_sqr(x, y) / 4) < 1e-10
    blk = H.hsic(x, y, kernel_x=k, kernel_y=k, estimator="blocked", block=37)
    assert abs(float(blk) - float(b)) < 1e-10


def test_gaussian_biased_equals_trace_formula(xy):
    x, y = xy
    sx, sy = _median_np(x), _median_np(y)
    expected = _biased_np(_gauss_np(x, sx), _gauss_np(y, sy))
    assert abs(float(H.hsic(x, y)) - expected) < 1e-10
    # Explicit bandwidths, and a categorical y.
    g = (x[:, 0] > 0).astype(int)
    expected = _biased_np(_gauss_np(x, 0.9), (g[:, None] == g[None]).astype(float))
    got = H.hsic(x, g, kernel_x=H.GaussianKernel(0.9), kernel_y=H.CategoricalKernel())
    assert abs(float(got) - expected) < 1e-10


def test_unbiased_equals_song(xy, rng):
    x, y = xy
    K, L = _gauss_np(x, _median_np(x)), _gauss_np(y, _median_np(y))
    assert abs(float(H.hsic(x, y, estimator="unbiased")) - _song_np(K, L)) < 1e-10
    # The closed form against the U-statistic definition (an independent oracle).
    xs, ys = x[:11], y[:11]
    K, L = _gauss_np(xs, 1.0), _gauss_np(ys, 1.0)
    got = H.hsic(
        xs,
        ys,
        kernel_x=H.GaussianKernel(1.0),
        kernel_y=H.GaussianKernel(1.0),
        estimator="unbiased",
    )
    assert abs(float(got) - _ustat_np(K, L)) < 1e-10


@pytest.mark.parametrize("block", [1, 16, 50, 137, 1000])
def test_blocked_equals_biased(block, xy):
    x, y = xy  # n = 137: not a multiple of 16 or 50
    for normalised in (False, True):
        b = H.hsic(x, y, normalised=normalised)
        blk = H.hsic(x, y, estimator="blocked", block=block, normalised=normalised)
        assert abs(float(blk) - float(b)) < 1e-10


# Peak memory is read from /proc/self/status (VmHWM, the high-water mark of this process's
# own address space). `getrusage(...).ru_maxrss` would be wrong here: Linux carries the
# parent's peak across fork/vfork + exec, so under a large pytest process it reports the
# parent's memory, not the estimator's.
_MEMORY_SCRIPT = """
import numpy as np
from unlearnx.hsic import hsic
x = np.random.default_rng(0).normal(size=20_000).astype(np.float32)
hsic(x, x**2, estimator="blocked").block_until_ready()
hwm = [l for l in open("/proc/self/status") if l.startswith("VmHWM:")][0]
print(int(hwm.split()[1]) / 1024)
"""


def test_blocked_memory_is_not_quadratic():
    # Two dense 20,000² float32 Gram matrices would take 3.2 GB; blocked needs ~0.35 GB,
    # most of it Python and JAX themselves. (benchmarks/bench_hsic.py: n = 50,000.)
    out = subprocess.run(
        [sys.executable, "-c", _MEMORY_SCRIPT], capture_output=True, text=True, check=True
    )
    assert float(out.stdout.strip().splitlines()[-1]) < 1000


def test_rff_close_to_exact(rng):
    x = rng.normal(size=(2000, 2))
    y = x[:, :1] ** 2 + 0.5 * rng.normal(size=(2000, 1))
    exact = float(H.hsic(x, y))
    approx = float(H.hsic(x, y, estimator="rff", n_features=2048, key=jax.random.key(1)))
    assert abs(approx / exact - 1) < 0.02
    # Linear kernels use the data as features: exact, in O(n), at n = 50,000 (n² would
    # overflow int32 if computed with Python ints inside jit).
    n = 50_000
    a, b = rng.normal(size=(n, 2)), rng.normal(size=(n, 3))
    b[:, 0] += a[:, 0]
    lin = H.LinearKernel()
    got = H.hsic(a, b, kernel_x=lin, kernel_y=lin, estimator="rff", key=jax.random.key(0))
    C = (a - a.mean(0)).T @ (b - b.mean(0)) / n
    assert np.isclose(float(got), np.sum(C**2), rtol=1e-10)


def test_normalised(xy, rng):
    x, y = xy
    for est in ("biased", "blocked"):
        v = float(H.hsic(x, y, estimator=est, normalised=True, block=40))
        assert 0.0 < v < 1.0
        assert np.isclose(float(H.hsic(x, x, estimator=est, normalised=True, block=40)), 1.0)
    assert 0.0 <= float(H.hsic(x, rng.normal(size=137), normalised=True)) < 0.05
    r = H.hsic(x, x, estimator="rff", normalised=True, key=jax.random.key(0))
    assert np.isclose(float(r), 1.0, rtol=0.01)
    u = H.hsic(x, x, estimator="unbiased", normalised=True)
    assert np.isclose(float(u), 1.0)


def test_jit_vmap_and_no_retrace(rng):
    xs = jnp.asarray(rng.normal(size=(4, 60)))
    ys = xs**2 + jnp.asarray(rng.normal(size=(4, 60)))

    @jax.jit
    @chex.assert_max_traces(n=1)
    def f(x, y):
        return H.hsic(x, y, estimator="blocked", block=25)

    loop = jnp.stack([H.hsic(x, y) for x, y in zip(xs, ys, strict=True)])
    jitted = jnp.stack([f(x, y) for x, y in zip(xs, ys, strict=True)])
    np.testing.assert_allclose(jitted, loop, rtol=1e-12)
    np.testing.assert_allclose(jax.vmap(H.hsic)(xs, ys), loop, rtol=1e-12)


# ---------------------------------------------------------------------------- tests


def _pvalues(key, n, n_draws, dependent, **kw):
    kx, ky, kt = jax.random.split(key, 3)
    x = jax.random.normal(kx, (n_draws, n))
    y = jax.random.normal(ky, (n_draws, n))
    if dependent:
        y = x**2 + 2.5 * y  # correlation 0; noise sd 2.5 against the signal's sd 1.4
    keys = jax.random.split(kt, n_draws)
    # Under vmap each dataset holds its own batch of permuted matrices: keep it small.
    test = lambda x, y, k: H.hsic_test(x, y, key=k, batch_size=50, **kw)
    return jax.vmap(test)(x, y, keys)


def test_permutation_false_positive_rate():
    res = _pvalues(jax.random.key(10), 50, 300, dependent=False)
    rate = float(jnp.mean(res.p_value <= 0.05))
    assert 0.02 <= rate <= 0.08
    assert res.p_value.shape == (300,) and int(res.n_permutations[0]) == 500
    # p-values are (1 + count) / (1 + P).
    counts = res.p_value * 501 - 1
    np.testing.assert_allclose(counts, np.round(counts), atol=1e-9)


def test_permutation_power():
    res = _pvalues(jax.random.key(11), 200, 40, dependent=True, n_permutations=200)
    assert float(jnp.mean(res.p_value <= 0.05)) >= 0.9


def test_gamma_agrees_with_permutation():
    perm = _pvalues(jax.random.key(12), 100, 40, dependent=False, n_permutations=1000)
    kx, ky, _ = jax.random.split(jax.random.key(12), 3)
    x, y = jax.random.normal(kx, (40, 100)), jax.random.normal(ky, (40, 100))
    gam = jax.vmap(lambda x, y: H.hsic_test(x, y, method="gamma"))(x, y)
    np.testing.assert_allclose(gam.statistic, perm.statistic, rtol=1e-12)
    assert float(jnp.mean(jnp.abs(gam.p_value - perm.p_value))) < 0.03
    assert float(jnp.max(jnp.abs(gam.p_value - perm.p_value))) < 0.1
    assert abs(float(jnp.mean(gam.null_mean / perm.null_mean)) - 1) < 0.05
    assert abs(float(jnp.mean(gam.null_std / perm.null_std)) - 1) < 0.15
    # The p-value is scipy's gamma survival function at the returned parameters.
    expected = scipy.stats.gamma.sf(gam.statistic, gam.shape, scale=gam.scale)
    np.testing.assert_allclose(gam.p_value, expected, rtol=1e-8)
    np.testing.assert_allclose(gam.shape * gam.scale, gam.null_mean, rtol=1e-12)
    np.testing.assert_allclose(gam.shape * gam.scale**2, gam.null_std**2, rtol=1e-12)


# ---------------------------------------------------------------------------- penalty


def _fd_grad(f, w, eps=1e-6):
    g = np.zeros_like(w)
    for i in range(len(w)):
        e = np.zeros_like(w)
        e[i] = eps
        g[i] = (f(w + e) - f(w - e)) / (2 * eps)
    return g


@pytest.mark.parametrize("estimator", ["biased", "unbiased", "blocked"])
def test_penalty_gradient_matches_finite_differences(estimator, rng):
    X = jnp.asarray(rng.normal(size=(60, 3)))
    V = X[:, 0] + 0.3 * jnp.asarray(rng.normal(size=60))
    w0 = np.array([0.8, -0.4, 0.3])
    kx, kv = H.GaussianKernel(1.1), H.GaussianKernel(0.9)

    def pen(w):
        pred = lambda X: jnp.tanh(X @ w)[:, None] * jnp.array([1.0, -2.0])
        return H.hsic_penalty(pred, X, V, kernel_x=kx, kernel_v=kv, estimator=estimator, block=16)

    g = np.asarray(jax.grad(pen)(jnp.asarray(w0)))
    fd = _fd_grad(lambda w: float(pen(jnp.asarray(w))), w0)
    np.testing.assert_allclose(g, fd, rtol=1e-6, atol=1e-12)


def test_penalty_median_bandwidth_is_held_fixed(rng):
    X = jnp.asarray(rng.normal(size=(50, 2)))
    g = (X[:, 1] > 0).astype(jnp.int32)
    w = jnp.array([0.5, 1.0])
    cat = H.CategoricalKernel()

    grad = jax.grad(lambda w: H.hsic_penalty(lambda X: X @ w, X, g, kernel_v=cat))(w)
    sigma = H.median_heuristic(X @ w)
    fixed = jax.grad(
        lambda w: H.hsic_penalty(
            lambda X: X @ w, X, g, kernel_x=H.GaussianKernel(sigma), kernel_v=cat
        )
    )(w)
    np.testing.assert_allclose(grad, fixed, rtol=1e-12)
    # A distance kernel has a finite gradient although k(x, x) sits at the kink.
    dist = jax.grad(
        lambda w: H.hsic_penalty(lambda X: X @ w, X, g, kernel_x=H.DistanceKernel(), kernel_v=cat)
    )(w)
    assert np.all(np.isfinite(dist))


# ---------------------------------------------------------------------------- errors


def test_bad_input_raises(rng):
    x, y = rng.normal(size=20), rng.normal(size=20)
    with pytest.raises(ValueError, match="same number of rows"):
        H.hsic(x, y[:19])
    with pytest.raises(ValueError, match="same number of rows"):
        H.hsic_test(x, y[:19], key=jax.random.key(0))
    with pytest.raises(ValueError, match="at least 4"):
        H.hsic(x[:3], y[:3], estimator="unbiased")
    with pytest.raises(ValueError, match="`estimator` must be one of"):
        H.hsic(x, y, estimator="fast")
    with pytest.raises(ValueError, match="`key`"):
        H.hsic(x, y, estimator="rff")
    with pytest.raises(ValueError, match="`key`"):
        H.hsic_test(x, y)
    with pytest.raises(ValueError, match="`method`"):
        H.hsic_test(x, y, method="exact", key=jax.random.key(0))
    with pytest.raises(ValueError, match="at least 6"):
        H.hsic_test(x[:5], y[:5], method="gamma")
    with pytest.raises(ValueError, match="`n_features` must be even"):
        H.hsic(x, y, estimator="rff", n_features=3, key=jax.random.key(0))
    with pytest.raises(ValueError, match="`block`"):
        H.hsic(x, y, estimator="blocked", block=0)
    # A non-kernel is refused by the annotation (TypeError under the test suite's
    # jaxtyping hook), or by the function's own check (ValueError) without it.
    with pytest.raises((ValueError, TypeError), match="kernel_x"):
        H.hsic(x, y, kernel_x="gaussian")
    with pytest.raises(ValueError, match="shape"):
        H.hsic(np.zeros((20, 2, 2)), y)
    with pytest.raises(ValueError, match="kernel_y"):
        H.hsic(x, y, kernel_y=H.DistanceKernel(), estimator="rff", key=jax.random.key(0))


def test_every_public_symbol_has_an_example():
    names = [n for n in dir(H) if not n.startswith("_") and n != "jaxtyping"]
    assert {"hsic", "hsic_test", "HSICTestResult", "hsic_penalty", "GaussianKernel"} <= set(names)
    for name in names:
        assert "Example" in (getattr(H, name).__doc__ or ""), name


def test_docstring_examples_run(capsys):
    objects = [H] + [getattr(H, n) for n in dir(H) if not n.startswith("_") and n != "jaxtyping"]
    for obj in objects:
        for code in re.findall(r"```python\n(.*?)```", inspect.getdoc(obj) or "", re.S):
            code = textwrap.dedent(code)
            exec(compile(code, f"<example of {getattr(obj, '__name__', obj)}>", "exec"), {})
    assert capsys.readouterr().out.strip()
