"""Kronecker-factored precisions: KFAC (Martens & Grosse 2015) and EK-FAC (George et al.
2018), for models built of dense and convolutional layers.

For a layer with parameters `W̃ = [W | b]` (`n_out × n_cols`, flattened row-major in the
flat `θ`; see `_layers.py`), inputs `a` (with a homogeneous 1 for the bias) and output
gradients `g = Bᵀ ∂f/∂s` pushed through the output Hessian square root, the per-example
GGN block is `Σ_k (g_k ⊗ a)(g_k ⊗ a)ᵀ` in that ordering. The factors are *sums* over the
rows (weights `w_i`, weight-0 rows contributing nothing):

    A = Σ_i w_i Σ_l a_il a_ilᵀ,    G = Σ_i w_i Σ_k Σ_l g_ikl g_iklᵀ,    N = Σ_i w_i,

with `l` the output locations of a convolution (one for a dense layer, `L` in all), and
the layer's block is `(G ⊗ A) / (N L)` (row-major `W̃`), plus the prior `λ I`.

For a dense layer this is KFAC's expectation approximation `E[a aᵀ ⊗ g gᵀ] ≈
E[a aᵀ] ⊗ E[g gᵀ]` for a sum of `N` per-example terms, exact when `g g ᵀ` does not vary
across rows (a linear model with a Gaussian likelihood). For a convolution it is
KFAC-expand (Eschenhagen et al. 2023, "Kronecker-Factored Approximate Curvature for
Modern Neural Network Architectures"), equivalently KFC (Grosse & Martens 2016): the `L`
locations are treated as extra examples sharing the weights, the cross-location terms
are dropped (spatially uncorrelated derivatives) and the location statistics are taken
homogeneous, so `Σ_i Σ_{l,l'} a_il a_il'ᵀ ⊗ g_il g_il'ᵀ ≈ L · (A/(NL)) ⊗ (G/(NL)) · N`.

All products, solves, log-determinants, samples and variances go through the
eigendecompositions `A = Q_A diag(α) Q_Aᵀ` and `G = Q_G diag(γ) Q_Gᵀ`: in the basis
`Q_G ⊗ Q_A` the block is diagonal, with eigenvalues `γ_i α_j / (N L) + λ`. EK-FAC keeps
that basis and replaces the eigenvalues by the exact diagonal of the GGN block in it,
`s_ij = Σ_i w_i Σ_k ((Q_Gᵀ Σ_l g_ikl a_ilᵀ Q_A)_ij)²` (the per-example gradient sums over
locations before squaring). Parameters that belong to no layer (none for the supported
models, unless an activation has weights) get the diagonal GGN plus `λ`.
"""

from __future__ import annotations

from typing import ClassVar, NamedTuple

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

from .._custom_types import Array, Float
from .._models._base import ravel
from ._factors import _chunked
from ._layers import (
    LayerSpec,
    find_layers,
    layer_covariance,
    layer_statistics,
    param_dtype,
    uncovered,
)
from ._precision import JACOBIAN_BUDGET, AbstractPrecision, _fused_sums, direct_solve_info


class KroneckerBlock(eqx.Module):
    """One layer's factors and their eigendecompositions.

    Attributes:
        A: `Σ_i w_i Σ_l a_il a_ilᵀ`, `(n_cols, n_cols)`.
        G: `Σ_i w_i Σ_k Σ_l g_ikl g_iklᵀ`, `(n_out, n_out)`.
        QA: eigenvectors of `A` (columns).
        QG: eigenvectors of `G` (columns).
        eig: the data curvature's eigenvalues in the basis `QG ⊗ QA`, `(n_out, n_cols)`:
            `γ_i α_j / (N L)` for KFAC, the corrected `s_ij` for EK-FAC.
    """

    A: Float[Array, "k k"]
    G: Float[Array, "o o"]
    QA: Float[Array, "k k"]
    QG: Float[Array, "o o"]
    eig: Float[Array, "o k"]


class _Sums(NamedTuple):
    A: tuple[Array, ...]
    G: tuple[Array, ...]
    S: tuple[Array, ...] | None
    count: Array
    rest: Array


def _rotate(blk: KroneckerBlock, V):
    """`Q_Gᵀ V Q_A` for `V` of shape `(n_out, n_cols, m)`."""
    return jnp.einsum("oi,oam,ab->ibm", blk.QG, V, blk.QA)


def _unrotate(blk: KroneckerBlock, V):
    """`Q_G V Q_Aᵀ` for `V` of shape `(n_out, n_cols, m)`."""
    return jnp.einsum("oi,ibm,ab->oam", blk.QG, V, blk.QA)


class AbstractKroneckerPrecision(AbstractPrecision):
    """Shared by [`KFACPrecision`][unlearnx.KFACPrecision] and
    [`EKFACPrecision`][unlearnx.EKFACPrecision]: per layer, a block diagonal in the
    eigenbasis `Q_G ⊗ Q_A`, plus `λ I`; the diagonal GGN plus `λ` on parameters outside
    every layer."""

    blocks: eqx.AbstractVar[tuple[KroneckerBlock, ...]]
    count: eqx.AbstractVar[Float[Array, ""]]
    rest: eqx.AbstractVar[Float[Array, " r"]]
    prior: eqx.AbstractVar[Float[Array, ""]]
    layers: eqx.AbstractVar[tuple[LayerSpec, ...]]
    n_params: eqx.AbstractVar[int]
    chunk: eqx.AbstractVar[int]

    @property
    def dim(self) -> int:
        return self.n_params

    def _rest_index(self) -> np.ndarray:
        mask = np.ones(self.n_params, bool)
        for spec in self.layers:
            mask[spec.index().ravel()] = False
        return np.flatnonzero(mask)

    def _apply(self, v, block_fn, rest_fn):
        """Apply `block_fn(block, V)` to each layer's `(n_out, n_cols, m)` slice of `v`
        and `rest_fn(r)` to the uncovered coordinates `(r, m)`."""
        v2 = v.reshape(self.n_params, -1)
        out = jnp.zeros_like(v2)
        for spec, blk in zip(self.layers, self.blocks, strict=True):
            idx = spec.index()
            out = out.at[idx].set(block_fn(blk, v2[idx]))
        rest = self._rest_index()
        if rest.size:
            out = out.at[rest].set(rest_fn(v2[rest]))
        return out.reshape(v.shape)

    def mv(self, v):
        return self._apply(
            v,
            lambda b, V: _unrotate(b, (b.eig + self.prior)[..., None] * _rotate(b, V)),
            lambda r: (self.rest + self.prior)[:, None] * r,
        )

    def solve(self, v):
        return self._apply(
            v,
            lambda b, V: _unrotate(b, _rotate(b, V) / (b.eig + self.prior)[..., None]),
            lambda r: r / (self.rest + self.prior)[:, None],
        )

    def solve_info(self, v):
        return direct_solve_info(self, v)

    def logdet(self):
        total = jnp.sum(jnp.log(self.rest + self.prior))
        for blk in self.blocks:
            total = total + jnp.sum(jnp.log(blk.eig + self.prior))
        return total

    def sample(self, key, n):
        eps = jax.random.normal(key, (self.n_params, n), self.prior.dtype)
        x = self._apply(
            eps,
            lambda b, E: _unrotate(b, E / jnp.sqrt(b.eig + self.prior)[..., None]),
            lambda r: r / jnp.sqrt(self.rest + self.prior)[:, None],
        )
        return x.T

    def variance(self):
        out = jnp.zeros(self.n_params, self.prior.dtype)
        for spec, blk in zip(self.layers, self.blocks, strict=True):
            var = (blk.QG**2) @ (1.0 / (blk.eig + self.prior)) @ (blk.QA**2).T
            out = out.at[spec.index()].set(var)
        rest = self._rest_index()
        if rest.size:
            out = out.at[rest].set(1.0 / (self.rest + self.prior))
        return out

    def to_dense(self):
        d = self.n_params
        M = jnp.zeros((d, d), self.prior.dtype)
        for spec, blk in zip(self.layers, self.blocks, strict=True):
            Q = jnp.kron(blk.QG, blk.QA)
            block = (Q * (blk.eig.ravel() + self.prior)) @ Q.T
            idx = spec.index().ravel()
            M = M.at[np.ix_(idx, idx)].set(block)
        rest = self._rest_index()
        if rest.size:
            M = M.at[rest, rest].set(self.rest + self.prior)
        return M

    def shift(self, delta):
        return eqx.tree_at(lambda p: p.prior, self, self.prior + delta)

    def functional_covariance(self, model, X):
        """`(f, J Λ⁻¹ Jᵀ)` per row of `X` (see `AbstractPrecision`), without forming
        `J`: each layer's Jacobian block `∂f_k/∂W̃ = Σ_l g_kl a_lᵀ` is rotated into the
        eigenbasis, `M_k = Q_Gᵀ (∂f_k/∂W̃) Q_A`, where `Λ⁻¹` is diagonal, so
        `cov_kk' = Σ_layers Σ_ij M_k,ij M_k',ij / (eig_ij + λ)`; for a dense layer
        `M_k = (Q_Gᵀ g_k)(Q_Aᵀ a)ᵀ` is rank one (see `layer_covariance`). The parameters
        outside every layer (usually none) go through their own Jacobian."""
        scales = tuple(1.0 / (blk.eig + self.prior) for blk in self.blocks)
        bases = tuple((blk.QA, blk.QG) for blk in self.blocks)
        rest = (self._rest_index(), 1.0 / (self.rest + self.prior))
        return layer_covariance(model, X, self.layers, scales, bases, rest)


# --------------------------------------------------------------------------------------
# Statistics over rows.


def _row_sums(model, layers, rest_idx, X, w, sign, *, factors: bool, basis):
    """Sums over one chunk of rows: the factors `A`, `G` (if `factors`), the corrected
    eigenvalues `S` in `basis` (a tuple of blocks, if given), `Σ w` and the diagonal GGN
    of the uncovered parameters. Row `i` counts with weight `sign_i · max(w_i, 0)`, so
    that one pass adds some rows and removes others."""
    w = (sign * jnp.where(w > 0, w, 0.0)).astype(param_dtype(model))
    a, g = jax.vmap(lambda x: layer_statistics(model, x))(X)
    A = G = S = ()
    if factors:
        A = tuple(jnp.einsum("n,nla,nlb->ab", w, al, al) for al in a)
        G = tuple(jnp.einsum("n,nklo,nklp->op", w, gl, gl) for gl in g)
    if basis is not None:
        S = []
        for al, gl, blk in zip(a, g, basis, strict=True):
            at = al @ blk.QA  # (n, loc, cols)
            gt = gl @ blk.QG  # (n, c, loc, out)
            if al.shape[1] == 1:
                # Dense: the rotated per-example gradient g̃_k ã ᵀ is rank one, so its
                # square is g̃_k² ã²ᵀ and no (n, c, out, cols) array is formed.
                S.append(
                    jnp.einsum("nko,na->oa", w[:, None, None] * gt[:, :, 0] ** 2, at[:, 0] ** 2)
                )
            else:
                S.append(_conv_corrected(at, gt, w))
        S = tuple(S)
    rest = jnp.zeros(rest_idx.size, w.dtype)
    if rest_idx.size:
        theta, unravel = ravel(model)

        def one(x):
            fn = lambda u: unravel(theta.at[rest_idx].set(u))(x)  # noqa: E731
            f = fn(theta[rest_idx])
            B = model.likelihood.hessian_sqrt(f)
            return jnp.sum((B.T @ jax.jacrev(fn)(theta[rest_idx])) ** 2, axis=0)

        rest = jnp.einsum("n,nr->r", w, jax.vmap(one)(X))
    return _Sums(A, G, S if basis is not None else None, jnp.sum(w), rest)


#: Rows per step when EK-FAC squares the per-example gradients of a convolution.
CONV_BATCH = 8


def _conv_corrected(at, gt, w):
    """`Σ_n w_n Σ_k (Σ_l g̃_nkl ã_nlᵀ)²` for a convolution (the per-example gradient sums
    over locations before squaring), `CONV_BATCH` rows at a time so that the rotated
    per-example gradients `(rows, c, n_out, n_cols)` of a whole chunk are never held."""
    n = at.shape[0]
    b = min(CONV_BATCH, n)
    m = -(-n // b) * b
    pad = lambda x: jnp.concatenate([x, jnp.zeros((m - n,) + x.shape[1:], x.dtype)])  # noqa: E731
    at, gt, w = (pad(x).reshape((m // b, b) + x.shape[1:]) for x in (at, gt, w))

    def body(acc, rows):
        a, g, wb = rows
        M = jnp.einsum("nklo,nla->nkoa", g, a)
        return acc + jnp.einsum("n,nkoa->oa", wb, M**2), None

    init = jnp.zeros((gt.shape[-1], at.shape[-1]), at.dtype)
    return jax.lax.scan(body, init, (at, gt, w))[0]


def _sums(model, layers, rest_idx, X, w, chunk, *, sign=None, factors=True, basis=None):
    """`_row_sums` over all rows (with signs `sign`, default all `+1`), in chunks of
    `chunk` rows under `lax.scan` (memory does not grow with the number of rows)."""
    n = X.shape[0]
    chunk = max(1, min(chunk, n))
    sign = jnp.ones(n, w.dtype) if sign is None else sign
    Xs, signs, ws = _chunked(X, sign, w, chunk)  # padding rows: weight 0, sign 0

    def rows_sums(X, w, sign):
        return _row_sums(model, layers, rest_idx, X, w, sign, factors=factors, basis=basis)

    if Xs.shape[0] == 1:
        return rows_sums(Xs[0], ws[0], signs[0])
    shapes = jax.eval_shape(rows_sums, Xs[0], ws[0], signs[0])
    init = jax.tree_util.tree_map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)

    def body(acc, rows):
        return jax.tree_util.tree_map(jnp.add, acc, rows_sums(*rows)), None

    acc, _ = jax.lax.scan(body, init, (Xs, ws, signs))
    return acc


def _eigh(M):
    """Eigendecomposition of a symmetric PSD factor; eigenvalues clipped at 0, and
    whether none was negative beyond rounding."""
    e, Q = jnp.linalg.eigh(0.5 * (M + M.T))
    return jnp.maximum(e, 0.0), Q, _psd(e, M)


def _psd(e, M):
    tol = 64 * jnp.finfo(M.dtype).eps * M.shape[0] * jnp.maximum(jnp.trace(M), 0.0)
    return jnp.all(e >= -tol) & jnp.all(jnp.isfinite(e))


def _kfac_blocks(layers, A, G, count):
    """Blocks with KFAC eigenvalues `γ α / (N L)`, and whether the factors are PSD."""
    blocks, ok = [], jnp.array(True)
    n = jnp.where(count > 0, count, 1.0)
    for spec, Al, Gl in zip(layers, A, G, strict=True):
        ea, QA, oka = _eigh(Al)
        eg, QG, okg = _eigh(Gl)
        eig = jnp.outer(eg, ea) / (n * spec.n_loc)
        blocks.append(KroneckerBlock(Al, Gl, QA, QG, eig))
        ok = ok & oka & okg
    return tuple(blocks), ok & (count > 0)


def _per_row_numbers(model, layers) -> int:
    """Numbers held per row of a chunk: the inputs and output gradients and their
    temporaries (the backward pass, EK-FAC's rotated copies). The factors 2 and 1.5 are
    calibrated against XLA's compiled memory analysis on CPU (float64, JAX 0.10): the
    estimate is within 0.8-1.3× of the compiled peak for MLPs (widths 16-128) and the
    digits CNN at 100-1,000 rows."""
    c = int(model.n_outputs)
    return sum(2 * s.n_loc * s.n_cols + (3 * c * s.n_loc * s.n_out) // 2 for s in layers)


def _conv_numbers(model, layers) -> int:
    """EK-FAC's rotated per-example gradients of the convolutions (and their squares)
    for `CONV_BATCH` rows."""
    c = int(model.n_outputs)
    return 2 * CONV_BATCH * c * sum(s.n_out * s.n_cols for s in layers if s.n_loc > 1)


def _chunk(model, layers, chunk: int) -> int:
    """Rows per chunk: at most `chunk`, and few enough that a chunk's per-example
    statistics fit in `JACOBIAN_BUDGET`."""
    item = jnp.dtype(param_dtype(model)).itemsize
    per_row = max(_per_row_numbers(model, layers) * item, 1)
    return max(1, min(chunk, JACOBIAN_BUDGET // per_row))


def _memory(model, n_rows, chunk, corrected, where):
    """Peak bytes of `from_data`: XLA's buffers (the blocks, one chunk's statistics) plus
    two allocations outside them, which the peak resident memory shows and XLA's memory
    analysis does not (tests/test_memory.py): LAPACK's eigensolver workspace, and for
    EK-FAC the fused YNNPACK kernels of the second pass."""
    layers = find_layers(model, where)
    item = jnp.dtype(param_dtype(model)).itemsize
    d = sum(s.size for s in layers) + uncovered(model, layers).size
    held = sum(2 * s.n_cols**2 + 2 * s.n_out**2 + s.size for s in layers)
    held += d - sum(s.size for s in layers) + 2
    per_chunk = _chunk(model, layers, chunk)
    rows = min(per_chunk, max(n_rows, 1))
    temp = rows * _per_row_numbers(model, layers)
    # LAPACK's symmetric eigensolver (syevd) needs a workspace of about 2n² numbers for
    # the largest factor, outside XLA's buffers. Measured (peak resident memory minus
    # XLA's temporaries and outputs) for KFAC: +24 MB at width 1,024 (2n² = 17 MB) and
    # +76 MB at width 2,048 (2n² = 67 MB).
    held += 2 * max(max(s.n_cols, s.n_out) for s in layers) ** 2
    if corrected:
        # With one chunk, EK-FAC's two passes share the rows' statistics (XLA computes
        # them once), which then stay alive beside the rotated copies (measured with
        # everything below: +10% against the peak resident memory at width 1,024 with
        # 200 and 250 rows, against -3% with 1,000-4,000 rows in 256-row chunks).
        if n_rows <= per_chunk:
            temp = (3 * temp) // 2
        temp += _conv_numbers(model, layers)
        # The second pass's `Σ_k (g Q_G)²` of a dense layer (`rows × c × n_out` numbers
        # summed over `k`) runs as one fused YNNPACK kernel, product, square and sum, whose
        # memory XLA does not count (see `_fused_sums` for the measurements).
        c = int(model.n_outputs)
        temp += _fused_sums([rows * c * s.n_out for s in layers if s.n_loc == 1])
    return (held + temp) * item


def _check_curvature(curvature, where):
    if curvature != "ggn":
        raise ValueError(
            f"{where}: `curvature={curvature!r}` is not supported; Kronecker factors "
            "approximate the GGN only. Use curvature='ggn', or structure='full', 'diag' "
            "or 'matrix_free' for the exact Hessian."
        )


class KFACPrecision(AbstractKroneckerPrecision):
    """KFAC: per layer `(G ⊗ A) / (N L) + λ I`, from sums over the rows (see the module
    notes for the factors and the convolution normalisation).

    `mv`, `solve`, `logdet`, `sample` and `variance` are exact for this structure, by the
    eigendecompositions of `A` and `G`. `edit_examples` adds and subtracts the rows'
    contributions to `A`, `G` and `N` and re-eigendecomposes; `ok` is False if a factor
    lost positive semi-definiteness beyond rounding (rows removed that were never
    added). Only the GGN is supported (`curvature="ggn"`).

    Build with `ux.laplace(model, data, structure="kfac", chunk=...)` (rows per chunk,
    default 256, capped so a chunk's statistics fit in 256 MiB).

    Example:
        ```python
        import jax, unlearnx as ux
        data, _ = ux.datasets.synthetic_glm(jax.random.key(0), n=64, d=4)
        model = ux.models.MLPClassifier(4, 2, width=8, depth=1, key=jax.random.key(1))
        post = ux.laplace(model, data, structure="kfac")
        print(post.precision.logdet())
        ```
    """

    structure: ClassVar[str] = "kfac"
    blocks: tuple[KroneckerBlock, ...]
    count: Float[Array, ""]
    rest: Float[Array, " r"]
    prior: Float[Array, ""]
    layers: tuple[LayerSpec, ...] = eqx.field(static=True)
    n_params: int = eqx.field(static=True)
    chunk: int = eqx.field(static=True, default=256)

    @classmethod
    def from_data(cls, model, data, prior_precision, curvature="ggn", chunk=256):
        _check_curvature(curvature, "KFACPrecision.from_data")
        layers = find_layers(model, "KFACPrecision.from_data")
        rest_idx = uncovered(model, layers)
        sums = _sums(model, layers, rest_idx, data.X, data.weights, _chunk(model, layers, chunk))
        theta, _ = ravel(model)
        blocks, ok = _kfac_blocks(layers, sums.A, sums.G, sums.count)
        prior = jnp.asarray(prior_precision, theta.dtype)
        P = cls(blocks, sums.count, sums.rest, prior, layers, theta.shape[0], chunk)
        return P, ok & jnp.all(sums.rest >= 0) & (prior > 0)

    @classmethod
    def memory_estimate(cls, model, n_rows, chunk=256):
        return _memory(model, n_rows, chunk, False, "KFACPrecision.memory_estimate")

    def edit_examples(self, model, add, remove, curvature="ggn"):
        _check_curvature(curvature, "KFACPrecision.edit_examples")
        delta = _edit_sums(self, model, add, remove, basis=None)
        A = tuple(b.A + dA for b, dA in zip(self.blocks, delta.A, strict=True))
        G = tuple(b.G + dG for b, dG in zip(self.blocks, delta.G, strict=True))
        count = self.count + delta.count
        rest = self.rest + delta.rest
        blocks, ok = _kfac_blocks(self.layers, A, G, count)
        new = KFACPrecision(
            blocks,
            count,
            jnp.maximum(rest, 0.0),
            self.prior,
            self.layers,
            self.n_params,
            self.chunk,
        )
        return new, ok & _nonnegative(rest, self.rest)

    def rebuild(self, model, data, prior_precision, curvature="ggn"):
        return KFACPrecision.from_data(model, data, prior_precision, curvature, self.chunk)


def _nonnegative(new, old):
    """Whether `new` (a downdate of the nonnegative `old`) is nonnegative up to rounding."""
    tol = 64 * jnp.finfo(old.dtype).eps * jnp.maximum(jnp.max(old, initial=0.0), 1.0)
    return jnp.all(new >= -tol)


def _edit_sums(P, model, add, remove, basis) -> _Sums:
    """The rows' contributions: those of `add` minus those of `remove`, in one pass over
    both sets of rows (signed weights)."""
    parts = [(rows, s) for rows, s in ((add, 1.0), (remove, -1.0)) if rows is not None]
    if not parts:
        return _Sums(
            tuple(jnp.zeros_like(b.A) for b in P.blocks),
            tuple(jnp.zeros_like(b.G) for b in P.blocks),
            tuple(jnp.zeros_like(b.eig) for b in P.blocks) if basis is not None else None,
            jnp.zeros((), P.prior.dtype),
            jnp.zeros_like(P.rest),
        )
    X = jnp.concatenate([rows[0] for rows, _ in parts])
    w = jnp.concatenate([rows[2] for rows, _ in parts])
    sign = jnp.concatenate([jnp.full(rows[2].shape, s, w.dtype) for rows, s in parts])
    chunk = _chunk(model, P.layers, P.chunk)
    return _sums(model, P.layers, P._rest_index(), X, w, chunk, sign=sign, basis=basis)


class EKFACPrecision(AbstractKroneckerPrecision):
    """EK-FAC: KFAC's eigenbasis `Q_G ⊗ Q_A` per layer with the eigenvalues replaced by
    the exact diagonal of the GGN block in that basis (George et al. 2018), plus `λ I`.

    The corrected eigenvalues `s = Σ_i w_i Σ_k (Q_Gᵀ (Σ_l g_ikl a_ilᵀ) Q_A)²` are a
    second pass over the rows, once the basis is known. `edit_examples` adds and
    subtracts the rows' contributions to `s` in the SAME basis, the one from the fit
    (`A` and `G` are updated too, but not re-eigendecomposed, since `s` of the remaining
    rows in a new basis would need all of them): removing rows then equals EK-FAC of the
    remaining rows with the basis held fixed, and `rebuild` recomputes the basis. `ok`
    is False if an eigenvalue became negative beyond rounding. Only the GGN is supported.

    Build with `ux.laplace(model, data, structure="ekfac", chunk=...)`; `basis=` (an
    `EKFACPrecision`) reuses that precision's eigenbasis instead of fitting one.

    Example:
        ```python
        import jax, unlearnx as ux
        data, _ = ux.datasets.synthetic_glm(jax.random.key(0), n=64, d=4)
        model = ux.models.MLPClassifier(4, 2, width=8, depth=1, key=jax.random.key(1))
        post = ux.laplace(model, data, structure="ekfac")
        print(post.precision.logdet())
        ```
    """

    structure: ClassVar[str] = "ekfac"
    blocks: tuple[KroneckerBlock, ...]
    count: Float[Array, ""]
    rest: Float[Array, " r"]
    prior: Float[Array, ""]
    layers: tuple[LayerSpec, ...] = eqx.field(static=True)
    n_params: int = eqx.field(static=True)
    chunk: int = eqx.field(static=True, default=256)

    @classmethod
    def from_data(
        cls,
        model,
        data,
        prior_precision,
        curvature="ggn",
        chunk=256,
        basis: EKFACPrecision | None = None,
    ):
        _check_curvature(curvature, "EKFACPrecision.from_data")
        layers = find_layers(model, "EKFACPrecision.from_data")
        if basis is not None and basis.layers != layers:
            raise ValueError(
                "EKFACPrecision.from_data: `basis` was built for a different model "
                "(its layers differ); pass an EKFACPrecision of this model or basis=None."
            )
        rest_idx = uncovered(model, layers)
        X, w = data.X, data.weights
        sums = _sums(model, layers, rest_idx, X, w, _chunk(model, layers, chunk))
        if basis is None:
            blocks, ok = _kfac_blocks(layers, sums.A, sums.G, sums.count)
        else:
            blocks, ok = basis.blocks, jnp.array(True)
        # The second pass: the corrected eigenvalues in that basis.
        S = _sums(
            model,
            layers,
            np.zeros(0, int),
            X,
            w,
            _chunk(model, layers, chunk),
            factors=False,
            basis=blocks,
        ).S
        blocks = tuple(
            KroneckerBlock(Al, Gl, b.QA, b.QG, s)
            for Al, Gl, b, s in zip(sums.A, sums.G, blocks, S, strict=True)
        )
        theta, _ = ravel(model)
        prior = jnp.asarray(prior_precision, theta.dtype)
        P = cls(blocks, sums.count, sums.rest, prior, layers, theta.shape[0], chunk)
        return P, ok & jnp.all(jnp.isfinite(P.logdet())) & (prior > 0)

    @classmethod
    def memory_estimate(cls, model, n_rows, chunk=256, basis=None):
        del basis
        return _memory(model, n_rows, chunk, True, "EKFACPrecision.memory_estimate")

    def edit_examples(self, model, add, remove, curvature="ggn"):
        _check_curvature(curvature, "EKFACPrecision.edit_examples")
        delta = _edit_sums(self, model, add, remove, basis=self.blocks)
        blocks, ok = [], jnp.array(True)
        for b, dA, dG, dS in zip(self.blocks, delta.A, delta.G, delta.S, strict=True):
            s = b.eig + dS
            ok = ok & _nonnegative(s, b.eig)
            blocks.append(KroneckerBlock(b.A + dA, b.G + dG, b.QA, b.QG, jnp.maximum(s, 0.0)))
        rest = self.rest + delta.rest
        count = self.count + delta.count
        new = EKFACPrecision(
            tuple(blocks),
            count,
            jnp.maximum(rest, 0.0),
            self.prior,
            self.layers,
            self.n_params,
            self.chunk,
        )
        return new, ok & _nonnegative(rest, self.rest) & (count > 0)

    def rebuild(self, model, data, prior_precision, curvature="ggn"):
        return EKFACPrecision.from_data(model, data, prior_precision, curvature, self.chunk)
