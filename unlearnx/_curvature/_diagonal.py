"""The diagonal of a model's curvature: exact (memory-safe) and Hutchinson's estimate.

**Exact.** The GGN diagonal is `Σ_i w_i Σ_k (B_iᵀ J_i)_k²`, row `k` of the per-example
factor `B_iᵀ J_i` squared. Materialising the `c × d` Jacobians of a chunk of rows
(`rows × c × d` numbers) is what `ggn_factors` does; here each row `k` is instead one
vector-Jacobian product with the cotangent `B_i[:, k]`, applied to one forward pass per
example, taken with respect to the model's parameter arrays and squared into running
sums leaf by leaf: a chunk's temporaries are about `rows × d` numbers whatever `c`
(flattening the per-example gradients into one vector would hold them twice). Rows are
taken in chunks whose per-example gradients fit in `DIAGONAL_BUDGET` bytes.

Measured (float64, jit, 2-core CPU shared with other jobs, JAX 0.10.2, best of 5) on
2,000 rows in 128- and 512-row chunks, time in ms / XLA temporaries in MiB, for the
Jacobians | VJPs on the flat vector | VJPs per parameter array (used here):

- MLP 20-64-64-10, `d = 6,154`: 534, 834 / 120, 481 | 103, 196 / 18, 74 | 30, 64 / 7, 26;
- MLP 20-32-32-3, `d = 1,827`: 14, 26 / 11, 43 | 17, 20 / 6, 22 | 10, 6 / 2, 8;
- MLP 20-64-64-2, `d = 5,634`: 34, 92 / 22, 88 | 39, 96 / 17, 67 | 9, 12 / 6, 24;

and on Adult's logistic regression (`d = 106`, 32,561 rows, 4,096-row chunks) 3.2 ms
for the Jacobians against 2.4 ms. Small chunks lose nothing, hence the small budget.

**Hutchinson.** `diag C ≈ (1/N) Σ_j z_j ∘ (C z_j)` with Rademacher probes `z_j`, each
product `C z_j` matrix-free (`data_ggn_vp`: one JVP and one VJP per chunk of rows). It is
unbiased with variance `Σ_{l≠i} C_il²` per entry and per probe, so the relative error
falls as `1/√N`; it needs no per-example gradients at all and works for the exact
Hessian as well as the GGN.
"""

from __future__ import annotations

import equinox as eqx
import jax
import jax.numpy as jnp

from .._custom_types import Array, Float, PRNGKeyArray
from ._factors import _chunked, data_ggn_vp

#: The per-example gradients of one chunk of rows (`rows × d` numbers) may take at most
#: this many bytes when computing the exact GGN diagonal (see the module docstring).
DIAGONAL_BUDGET = 8 * 2**20


def forward_numbers(model) -> int:
    """Numbers in the intermediate values of one example's forward pass (from a trace,
    nothing is computed): what a chunk of matrix-free products keeps per row."""
    import math

    from .._models._base import ravel

    theta, _ = ravel(model)
    x = jax.ShapeDtypeStruct((int(model.n_inputs),), theta.dtype)
    jaxpr = jax.make_jaxpr(lambda x: model(x))(x)
    return sum(math.prod(v.aval.shape) for e in jaxpr.jaxpr.eqns for v in e.outvars)


def diagonal_row_bytes(model) -> int:
    """Bytes per row of the exact diagonal's chunk: the per-example gradient and the
    hidden activations its VJPs keep (the forward pass's intermediate values beyond the
    output's few `c`-sized steps; none for a GLM). Within 15% of XLA's memory analysis
    on MLPs of 10³-3·10⁵ parameters."""
    from .._models._base import ravel

    theta, _ = ravel(model)
    hidden = max(0, forward_numbers(model) - 3 * int(model.n_outputs))
    return (theta.shape[0] + hidden) * theta.dtype.itemsize


def products_bytes(model, rows: int) -> int:
    """Bytes of one chunk of `rows` rows of `data_ggn_vp`: the inputs, outputs and
    tangents, and the forward pass's intermediate values (measured by XLA's memory
    analysis within about 20% on MLPs of 10³-3·10⁵ parameters)."""
    from .._models._base import ravel

    theta, _ = ravel(model)
    c, p = int(model.n_outputs), int(model.n_inputs)
    return rows * (p + 4 * c + forward_numbers(model)) * theta.dtype.itemsize


def padded_rows_bytes(model, n_rows: int, rows: int) -> int:
    """Bytes of the copy of the data that chunking makes when `n_rows` is not a whole
    number of `rows`-row chunks (the features, labels and weights, padded)."""
    from .._models._base import ravel

    if n_rows % rows == 0:
        return 0
    item = ravel(model)[0].dtype.itemsize
    return -(-n_rows // rows) * rows * (int(model.n_inputs) + 2) * item


def diagonal_chunk(d: int, itemsize: int, chunk: int = 4096) -> int:
    """Rows per chunk for the exact diagonal: at most `chunk`, and few enough that the
    chunk's per-example gradients (`rows × d` numbers) fit in `DIAGONAL_BUDGET`."""
    return max(1, min(chunk, DIAGONAL_BUDGET // max(d * itemsize, 1)))


def rows_ggn_diagonal(theta, unravel, X: Float[Array, "k p"], w: Float[Array, " k"]):
    """`Σ_rows w Σ_k (Bᵀ J)_k²`, the diagonal of the rows' GGN, by one VJP per output.

    The VJPs are taken with respect to the model's parameter arrays, not the flat
    vector, and squared and summed over rows leaf by leaf: flattening per-example
    gradients would hold them twice (measured: 2 `rows × d` buffers instead of 1 on an
    MLP)."""
    from .._models._base import partition

    model = unravel(theta)
    params, static = partition(model)

    def one(x, wi):
        f, vjp = jax.vjp(lambda q: eqx.combine(q, static)(x), params)
        B = jnp.sqrt(jnp.where(wi > 0, wi, 0.0)) * model.likelihood.hessian_sqrt(f)
        if B.shape[1] == 1:  # one output: one VJP, no loop
            return jax.tree_util.tree_map(jnp.square, vjp(B[:, 0])[0])

        def body(acc, b):
            (g,) = vjp(b)
            return jax.tree_util.tree_map(lambda a, g: a + g**2, acc, g), None

        # row k of Bᵀ J is the VJP of column k of B
        acc, _ = jax.lax.scan(body, jax.tree_util.tree_map(jnp.zeros_like, params), B.T)
        return acc

    per_row = jax.vmap(one)(X, w)
    leaves = jax.tree_util.tree_leaves(per_row)
    return jnp.concatenate([jnp.sum(x, axis=0).ravel() for x in leaves])


def exact_ggn_diagonal(theta, unravel, data, *, chunk: int = 4096) -> Float[Array, " d"]:
    """The exact GGN diagonal `Σ_i w_i diag(J_iᵀ B_i B_iᵀ J_i)` of all rows of `data`,
    in chunks of at most `chunk` rows sized by `DIAGONAL_BUDGET`."""
    rows = min(diagonal_chunk(theta.shape[0], theta.dtype.itemsize, chunk), data.n)
    Xs, ys, ws = _chunked(data.X, data.y, data.weights, rows)

    def body(acc, chunk_rows):
        X, _, w = chunk_rows
        return acc + rows_ggn_diagonal(theta, unravel, X, w), None

    acc, _ = jax.lax.scan(body, jnp.zeros_like(theta), (Xs, ys, ws))
    return acc


def hutchinson(key: PRNGKeyArray, matvec, d: int, n_probes: int, dtype) -> Float[Array, " d"]:
    """`(1/N) Σ_j z_j ∘ (A z_j)` over `N = n_probes` Rademacher probes: an unbiased
    estimate of `diag A` from `N` products `matvec(v) = A v`, taken one at a time
    (memory O(d) besides the products)."""
    if not (isinstance(n_probes, int) and n_probes >= 1):
        raise ValueError(f"hutchinson: `n_probes` must be a positive int; got {n_probes!r}.")

    def body(acc, k):
        z = jax.random.rademacher(k, (d,), dtype)
        return acc + z * matvec(z), None

    acc, _ = jax.lax.scan(body, jnp.zeros((d,), dtype), jax.random.split(key, n_probes))
    return acc / n_probes


def _check_curvature(curvature, where):
    if curvature not in ("ggn", "hessian"):
        raise ValueError(f"{where}: unknown `curvature={curvature!r}`; use 'ggn' or 'hessian'.")


def ggn_diagonal(model, data, *, chunk: int = 4096) -> Float[Array, " d"]:
    """The exact diagonal of the data GGN `Σ_i w_i J_iᵀ B_i B_iᵀ J_i` at `model`.

    Memory-safe for large models: one VJP per output and example, over chunks of rows
    whose per-example gradients fit in `DIAGONAL_BUDGET` (8 MiB); the per-example
    Jacobians are never formed.

    Args:
        model: the model (its flat parameters follow [`ravel`][unlearnx.models.ravel]).
        data: the rows; weight-0 rows contribute nothing.
        chunk: at most this many rows at a time.

    Returns:
        The diagonal, a vector of length `d` (without the prior precision).

    Example:
        ```python
        import jax, unlearnx as ux
        key = jax.random.key(0)
        data, _ = ux.datasets.synthetic_glm(key, n=50, d=3, family="softmax", n_classes=3)
        model = ux.models.MLPClassifier(3, 3, width=4, depth=1, key=jax.random.key(1))
        diag = ux.ggn_diagonal(model, data)
        ```
    """
    from .._models._base import ravel

    theta, unravel = ravel(model)
    return exact_ggn_diagonal(theta, unravel, data, chunk=chunk)


def hutchinson_diagonal(
    key: PRNGKeyArray,
    model,
    data,
    *,
    n_probes: int = 64,
    curvature: str = "ggn",
    chunk: int = 4096,
) -> Float[Array, " d"]:
    """Hutchinson's estimate of the curvature diagonal, `(1/N) Σ_j z_j ∘ (C z_j)`.

    `C = Σ_i w_i ∇²ℓ_i` (GGN or exact Hessian) is never formed: each of the
    `N = n_probes` Rademacher probes costs one matrix-free product (a JVP and a VJP per
    chunk of rows). Unbiased; the relative error falls as `1/√n_probes`.

    Args:
        key: PRNG key for the probes.
        model: the model.
        data: the rows; weight-0 rows contribute nothing.
        n_probes: the number of probes `N`.
        curvature: `"ggn"` or `"hessian"`.
        chunk: rows per chunk of the products.

    Returns:
        The estimated diagonal, a vector of length `d` (without the prior precision).

    Example:
        ```python
        import jax, unlearnx as ux
        data, _ = ux.datasets.synthetic_glm(jax.random.key(0), n=50, d=3)
        model = ux.models.LogisticRegression(3)
        est = ux.hutchinson_diagonal(jax.random.key(1), model, data, n_probes=16)
        ```
    """
    from .._models._base import ravel

    _check_curvature(curvature, "hutchinson_diagonal")
    theta, unravel = ravel(model)

    def matvec(v):
        return data_ggn_vp(theta, unravel, data, v, curvature, chunk=chunk)

    return hutchinson(key, matvec, theta.shape[0], n_probes, theta.dtype)
