"""Many requests in one call: `jax.vmap` over padded requests, grouped by bucket size.

`unlearn` applies `N` *independent* requests, each to the same starting posterior. The
requests are resolved and padded on the host, grouped by `(bucket, edits features,
adds rows)`, and each group is cut into chunks of a fixed size: one compiled function per
group shape, reused by every chunk (and by later calls with the same shapes). Each chunk
is vmapped over its requests and, with several devices, sharded over them.

Second-order steps on a dense GGN precision do not refactorise per request: with the
shared Cholesky factor `Λ = L Lᵀ` (and its inverse, computed once per call), the solve
`Λ'⁻¹ G` for request `i` goes through Woodbury's identity (`_woodbury.LowRankUpdate`),
and under `vmap` the products with `L⁻¹` become matrix-matrix products over the chunk. A
request whose downdate is indefinite (detected from the small capacitance matrix) is
redone by the plain single-request update afterwards, which recomputes the precision
from the retained rows, exactly as `update` does.

The second-order step is re-implemented here (`_second_order`) rather than vmapping
`SecondOrder.step`: the latter's fallback is a `lax.cond`, which `vmap` turns into a
`select` that computes the fallback (the curvature of every retained row) for every
request of the batch.

`unlearn_sequential` is the other mode: a queue of requests applied one after another
(each sees the data left by the previous ones), with the ledger.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Sequence
from typing import Any, Literal, NamedTuple

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

from .._curvature._factors import ggn_factors, rows_hessian
from .._curvature._precision import AbstractPrecision, DensePrecision, DiagonalPrecision
from .._custom_types import Array, Float, PyTree
from .._data._dataset import Dataset
from .._fit import check_model_data
from .._models._base import Unravel, ravel
from .._objective import rows_loss
from .._posterior._laplace import LaplacePosterior
from .._requests import Edit, Request
from .._unlearn._base import (
    AbstractUnlearner,
    Chain,
    Context,
    Ledger,
    UnlearnState,
)
from .._unlearn._influence import (
    SecondOrder,
    SecondOrderInfo,
    gradient_change,
    second_order,
    step_length,
)
from ._sharding import mesh_size, replicate, request_mesh, shard_requests
from ._woodbury import LowRankUpdate, inverse_factor

Solver = Literal["auto", "woodbury", "plain"]
PredictMethod = Literal["map", "probit"]


# --------------------------------------------------------------------------------------
# Results


class BatchResult(eqx.Module):
    """Results of [`unlearn`][unlearnx.batch.unlearn], one row per request, in the order
    the requests were given. Arrays are NumPy arrays on the host.

    Attributes:
        theta: the unlearned posterior means, flat, `(N, d)`.
        info: the transform's diagnostics (e.g. `SecondOrderInfo`, or a tuple for a chain),
            each leaf stacked with a leading axis `N`.
        finite: whether each result is finite.
        plain: whether the request was recomputed by the plain single-request update (its
            downdate was indefinite in the batched path, or `solver="plain"` was not the
            cause: see `info` for the fallback flags of the plain path).
        bucket: the padded size of each request.
        seconds: wall time of each request's chunk divided by its number of requests
            (the first chunk of each shape includes compilation).
        precision: only with `return_precision=True`: the updated precision per request,
            `(N, d, d)` for a dense posterior or `(N, d)` for a diagonal one (memory
            `N d²`: ask for it only when needed).
        predictions: only with `query=`: the predictive mean of each unlearned posterior at
            the query rows, `(N, q, c)`.
        unravel: rebuilds a model from a row of `theta`.
        prior_precision: `λ`, unchanged.
        curvature: the posterior's curvature kind.

    Example:
        ```python
        import unlearnx as ux
        data = ux.datasets.diabetes().train
        model, _ = ux.fit(ux.models.LogisticRegression(data.n_features), data)
        post = ux.laplace(model, data)
        result = ux.batch.unlearn(post, data, [ux.forget_rows([i]) for i in range(4)])
        print(result.theta.shape, result.model(2).weight.shape)   # (4, 9) (8,)
        ```
    """

    theta: np.ndarray
    info: PyTree
    finite: np.ndarray
    plain: np.ndarray
    bucket: np.ndarray
    seconds: np.ndarray
    precision: np.ndarray | None
    predictions: np.ndarray | None
    unravel: Unravel
    prior_precision: Array
    curvature: str = eqx.field(static=True)

    def __len__(self) -> int:
        return self.theta.shape[0]

    def model(self, i: int):
        """The unlearned model (posterior mean) of request `i`."""
        return self.unravel(jnp.asarray(self.theta[i]))

    def posterior(self, i: int) -> LaplacePosterior:
        """The unlearned posterior of request `i` (needs `return_precision=True`)."""
        if self.precision is None:
            raise ValueError(
                "BatchResult.posterior: the per-request precisions were not kept; call "
                "ux.batch.unlearn(..., return_precision=True) (memory N d²)."
            )
        P = jnp.asarray(self.precision[i])
        if P.ndim == 1:
            precision: AbstractPrecision = DiagonalPrecision(P)
        else:
            precision = DensePrecision.from_matrix(P)[0]
        return LaplacePosterior(self.model(i), precision, self.prior_precision, self.curvature)


class SequentialResult(NamedTuple):
    """Results of [`unlearn_sequential`][unlearnx.batch.unlearn_sequential].

    Attributes:
        posterior: the posterior after the last request.
        state: the final unlearning state (data, ledger), to continue with `update`.
        theta: the posterior mean after each request, `(N, d)`.
        info: each request's diagnostics, stacked with a leading axis `N`.
        seconds: wall time of each request (including the check and any compilation).
    """

    posterior: LaplacePosterior
    state: UnlearnState
    theta: np.ndarray
    info: PyTree
    seconds: np.ndarray


# --------------------------------------------------------------------------------------
# Resolution and grouping (host side)


def batch_bucket(k: int, n: int) -> int:
    """The padded size of a `k`-row request in a batch: the next power of two (from 1),
    capped at `n`. Smaller than [`bucket_size`][unlearnx.bucket_size]'s minimum of 8,
    because padding costs `vmap` work in every request of the batch.

    Example:
        ```python
        import unlearnx as ux
        print(ux.batch.batch_bucket(1, 100), ux.batch.batch_bucket(5, 100))  # 1 8
        ```
    """
    b = 1 << (max(k, 1) - 1).bit_length()
    return max(k, min(b, n))


class _Host(NamedTuple):
    """A resolved request: its padded size, how it edits the data, and its arrays
    `(index, mask, X, y, weights)`. Requests resolved together share stacked arrays (a
    leading request axis), this one being row `row`, so that a chunk is gathered with one
    indexing operation per array instead of being stacked from 5 × N small pieces."""

    bucket: int
    edits_x: bool
    adds: bool
    block: tuple
    row: int = 0


def _resolve(request, data: Dataset, host) -> _Host:
    Xh, yh, _ = host
    if isinstance(request, Request):
        # (unbound: equinox wraps bound methods of a Module in a new object per access)
        arrays = Request.resolve_host(request, data, host=host)
        k = int(arrays[1].sum())
        b = batch_bucket(k, data.n)
        arrays = [a[:b] for a in arrays]
    elif isinstance(request, Edit):
        if request.X.shape[1:] != Xh.shape[1:]:
            raise ValueError(
                f"an Edit with {request.X.shape[1]} feature columns; the data has {Xh.shape[1]}."
            )
        arrays = [np.asarray(a) for a in (request.index, request.mask, request.X, request.y)]
        arrays.append(np.asarray(request.weights))
    else:
        raise ValueError(
            f"got a {type(request).__name__}; pass requests from ux.forget_rows / "
            f"ux.forget_features / ux.relabel (or resolved ux.Edit objects)."
        )
    index, mask, X, y, w = arrays
    real = mask.astype(bool)
    rows = index[real]
    adds = bool(np.any(w[real] > 0))
    edits_x = bool(np.any(X[real] != Xh[rows]))
    block = (index[None].astype(np.int32), real[None], X[None], y[None].astype(yh.dtype), w[None])
    return _Host(index.shape[0], edits_x, adds, block)


class _Config(NamedTuple):
    """Static settings of one compiled chunk function."""

    edits_x: bool
    adds: bool
    solver: str
    return_precision: bool
    predict: str | None


# --------------------------------------------------------------------------------------
# The batched step (traced; one request, vmapped by the caller)


def _edited(edit: Edit, data: Dataset, edits_x: bool) -> Dataset:
    """`edit.apply(data)`, but leaving `X` shared when the edit does not change it (row
    deletions, relabelling): under `vmap` only weights and labels are then per request."""
    i = jnp.where(edit.mask, edit.index, data.n)
    weights = data.weights.at[i].set(edit.weights.astype(data.weights.dtype), mode="drop")
    y = data.y.at[i].set(edit.y.astype(data.y.dtype), mode="drop")
    X = data.X.at[i].set(edit.X, mode="drop") if edits_x else data.X
    return eqx.tree_at(lambda d: (d.X, d.y, d.weights), data, (X, y, weights))


def _use_woodbury(P, curvature: str, m: int, solver: str) -> bool:
    if solver == "plain" or curvature != "ggn" or not isinstance(P, DensePrecision):
        return False
    # Woodbury costs O(m d² + m² d + m³) against O(m d² + d³) for refactorising: it wins
    # while the edit has fewer factor rows than parameters.
    return solver == "woodbury" or m < P.dim


class _Here(NamedTuple):
    """`_Shared` plus the batch's own precision object, to recognise it while tracing."""

    base: AbstractPrecision
    inverse: Array | None
    damped: dict


class _Shared(NamedTuple):
    """Factors shared by every request of a batch, computed once per call.

    Attributes:
        inverse: `L⁻¹` for the posterior's dense precision `Λ = L Lᵀ` (or `None`).
        damped: for each damping `δ` of a second-order step, `(Λ + δI, its L⁻¹)`.
    """

    inverse: Array | None
    damped: dict


def _dampings(t: AbstractUnlearner) -> set[float]:
    if isinstance(t, Chain):
        return set().union(*(_dampings(tt) for tt in t.transforms))
    if isinstance(t, SecondOrder) and t.damping:
        return {t.damping}
    return set()


@eqx.filter_jit
def _shared_factors(unlearner, posterior: LaplacePosterior) -> _Shared:
    P = posterior.precision
    if not isinstance(P, DensePrecision) or posterior.curvature != "ggn":
        return _Shared(None, {})
    eye = jnp.eye(P.dim, dtype=P.matrix.dtype)
    damped = {}
    for delta in sorted(_dampings(unlearner)):
        Pd = DensePrecision.from_matrix(P.matrix + delta * eye)[0]
        damped[delta] = (Pd, inverse_factor(Pd))
    return _Shared(inverse_factor(P), damped)


def _second_order(t: SecondOrder, ctx: Context, posterior: LaplacePosterior, cfg: _Config, shared):
    """`SecondOrder.step` without its in-graph fallback (a `lax.cond` that `vmap` turns
    into computing the fallback for every request); `ok` is returned instead and failed
    requests are redone by the plain update on the host side."""
    theta, unravel = ravel(posterior.mean)
    d = theta.shape[0]
    P = posterior.precision
    old = ctx.edit.old_rows(ctx.old)
    new = ctx.edit.new_rows()
    if posterior.curvature == "hessian":
        delta = rows_hessian(theta, unravel, *new) - rows_hessian(theta, unravel, *old)
        P2, ok = P.dense_update(delta)
        add = remove = None
    else:
        remove = ggn_factors(theta, unravel, *old).reshape(-1, d)
        if cfg.adds:
            add = ggn_factors(theta, unravel, *new).reshape(-1, d)
        else:  # row deletions: the new rows have weight 0, their factors are zero
            add = jnp.zeros((0, d), theta.dtype)
        m = add.shape[0] + remove.shape[0]
        if _use_woodbury(P, posterior.curvature, m, cfg.solver):
            # The batch's own precision (not one a previous transform made): its factor
            # inverse was computed once for the whole call.
            base = P is shared.base and shared.inverse is not None
            P2 = LowRankUpdate.build(P, add, remove, shared.inverse if base else None)
            ok = P2.ok
        else:
            P2, ok = P.factor_update(add, remove, t.method)
    Pstep = P2
    if t.damping:
        eye = jnp.eye(d, dtype=theta.dtype)
        if isinstance(P2, LowRankUpdate):
            # The damped shared factor: `P` is the same for every request, so under vmap
            # this Cholesky runs once per chunk.
            if P2.base is shared.base and t.damping in shared.damped:
                damped, inverse = shared.damped[t.damping]
            else:
                damped = DensePrecision.from_matrix(P.matrix + t.damping * eye)[0]
                inverse = None
            Pstep = LowRankUpdate.build(damped, add, remove, inverse)
        else:
            Pstep, _ = P2.dense_update(t.damping * eye)
    if cfg.adds:
        G = gradient_change(ctx, posterior)
    else:  # the new rows have weight 0: their gradient is exactly zero, skip it
        G = -jax.grad(lambda t: rows_loss(unravel(t), *old))(theta)
    step = Pstep.solve(G)
    a = step_length(ctx, posterior, step) if t.line_search else jnp.ones((), G.dtype)
    step = a * step
    post = LaplacePosterior(
        unravel(theta - step), P2, posterior.prior_precision, posterior.curvature
    )
    info = SecondOrderInfo(ok, ~ok, jnp.linalg.norm(step), jnp.linalg.norm(G), a)
    return post, info, ok


def _step(t: AbstractUnlearner, ctx, posterior, inner, cfg: _Config, shared):
    """One transform (or a chain, recursively); returns `(posterior, inner, info, ok)`."""
    if isinstance(t, Chain):
        infos, inners, ok = [], [], jnp.array(True)
        for tt, s in zip(t.transforms, inner, strict=True):
            posterior, s, info, ok_t = _step(tt, ctx, posterior, s, cfg, shared)
            infos.append(info)
            inners.append(s)
            ok = ok & ok_t
        return posterior, tuple(inners), tuple(infos), ok
    if isinstance(t, SecondOrder):
        posterior, info, ok = _second_order(t, ctx, posterior, cfg, shared)
        return posterior, inner, info, ok
    posterior, inner, info = t.step(ctx, posterior, inner)
    return posterior, inner, info, jnp.array(True)


def _dense(P: AbstractPrecision) -> Array:
    if isinstance(P, DiagonalPrecision):
        return P.diag
    return P.to_dense()


def _outputs(post: LaplacePosterior, info, ok, query, cfg: _Config) -> dict:
    theta = post.theta
    out = {"theta": theta, "info": info, "ok": ok, "finite": jnp.all(jnp.isfinite(theta))}
    if cfg.return_precision:
        out["precision"] = _dense(post.precision)
    if query is not None:
        out["predictions"] = post.predict(query, method=cfg.predict)
    return out


@eqx.filter_jit
def _run_chunk(unlearner, edits: Edit, posterior, data, query, shared: _Shared, cfg: _Config):
    inner = unlearner.init_inner(posterior, data)

    def one(edit):
        new = _edited(edit, data, cfg.edits_x)
        ctx = Context(edit, data, new, posterior)
        here = _Here(posterior.precision, shared.inverse, shared.damped)
        post, _, info, ok = _step(unlearner, ctx, posterior, inner, cfg, here)
        return _outputs(post, info, ok, query, cfg)

    return jax.vmap(one)(edits)


@eqx.filter_jit
def _run_plain(unlearner, edit: Edit, posterior, data, query, cfg: _Config):
    """The plain single-request update (`AbstractUnlearner.apply`, with its fallback)."""
    ledger = Ledger(jnp.array(0, jnp.int32), jnp.zeros(data.n, jnp.int32))
    state = UnlearnState(posterior, data, ledger, unlearner.init_inner(posterior, data))
    post, _, info = unlearner.apply(edit, state)
    return _outputs(post, info, jnp.array(True), query, cfg)


# --------------------------------------------------------------------------------------
# The driver


def _check_unlearner(unlearner, where: str) -> AbstractUnlearner:
    if unlearner is None:
        return second_order()
    if not isinstance(unlearner, AbstractUnlearner):
        raise ValueError(
            f"{where}: `unlearner` must be an unlearning transform (ux.second_order(), "
            f"ux.chain(...)); got {type(unlearner).__name__}."
        )
    if not unlearner.jittable:
        raise ValueError(
            f"{where}: {type(unlearner).__name__} does not trace under jax.jit (exact "
            f"retraining), so it cannot be vmapped; use ux.batch.unlearn_sequential or a loop."
        )
    return unlearner


def _request_bytes(h: _Host, data: Dataset, d: int, c: int, cfg: _Config, q: int) -> int:
    """A rough per-request memory estimate of the vmapped update, to size chunks."""
    n, p = data.X.shape
    m = h.bucket * c * (2 if h.adds else 1)
    words = 4 * n + 8 * m * d + 4 * n * c + q * c * 4
    if h.edits_x:
        words += n * p
    if cfg.solver == "plain" or m >= d:
        words += 3 * d * d
    if cfg.return_precision:
        words += d * d
    return 8 * words


def _next_pow2(x: int) -> int:
    return 1 << (max(x, 1) - 1).bit_length()


def _chunk_size(count: int, chunk_size: int, n_dev: int, per_request: int, max_bytes: float):
    size = min(chunk_size, _next_pow2(count))
    fits = max(1, int(max_bytes // max(per_request, 1)))
    if fits < size:
        size = 1 << (fits.bit_length() - 1)
    return -(-size // n_dev) * n_dev


def _stack(hosts: list[_Host]) -> Edit:
    """The requests as one `Edit` whose arrays have a leading request axis (built from the
    pytree structure: `Edit`'s constructor checks the shapes of a single edit)."""
    block = hosts[0].block
    if all(h.block is block for h in hosts):
        rows = np.fromiter((h.row for h in hosts), np.int64, len(hosts))
        leaves = [a[rows] for a in block]
    else:
        leaves = [np.concatenate([h.block[i][h.row : h.row + 1] for h in hosts]) for i in range(5)]
    return jax.tree_util.tree_unflatten(_edit_treedef(), leaves)


@functools.cache
def _edit_treedef():
    z = jnp.zeros(1)
    return jax.tree_util.tree_structure(Edit(z.astype(jnp.int32), z > 0, z[:, None], z, z))


def groups(hosts: Sequence[_Host]) -> dict[tuple[int, bool, bool], list[int]]:
    """Request positions grouped by `(bucket, edits_x, adds)`, in first-seen order."""
    out: dict[tuple[int, bool, bool], list[int]] = {}
    for i, h in enumerate(hosts):
        out.setdefault((h.bucket, h.edits_x, h.adds), []).append(i)
    return out


class _Assembler:
    """Collects per-chunk outputs into arrays with one row per request."""

    def __init__(self, n: int):
        self.n = n
        self.arrays: dict[str, Any] = {}
        self.treedef = None

    def put(self, rows: np.ndarray, out: dict, take: int):
        flat = {k: jax.tree_util.tree_flatten(v) for k, v in out.items()}
        for k, (leaves, treedef) in flat.items():
            if k not in self.arrays:
                self.arrays[k] = (
                    [np.zeros((self.n,) + np.shape(x)[1:], np.asarray(x).dtype) for x in leaves],
                    treedef,
                )
            dest, _ = self.arrays[k]
            for a, x in zip(dest, leaves, strict=True):
                a[rows] = np.asarray(x)[:take]

    def get(self, k: str):
        if k not in self.arrays:
            return None
        leaves, treedef = self.arrays[k]
        return jax.tree_util.tree_unflatten(treedef, leaves)


def unlearn(
    posterior: LaplacePosterior,
    data: Dataset,
    requests: Sequence,
    *,
    unlearner: AbstractUnlearner | None = None,
    solver: Solver = "auto",
    return_precision: bool = False,
    query: Float[Array, "q p"] | np.ndarray | None = None,
    predict: PredictMethod = "map",
    chunk_size: int = 4096,
    devices: Sequence[jax.Device] | jax.sharding.Mesh | None = None,
    max_memory_gb: float = 2.0,
    throw: bool = True,
) -> BatchResult:
    """Apply `N` independent requests, each to the same starting `posterior`, in a few
    vmapped calls.

    The requests are resolved against `data` and padded to a bucket
    ([`batch_bucket`][unlearnx.batch.batch_bucket]: the next power of two), grouped by
    bucket and by how they edit the data (rows removed only, or rows also added back with
    new labels or features), and each group runs in fixed-size chunks: one compiled
    function per group shape, reused by every chunk and by later calls. Each chunk is
    split over `devices` along a `"requests"` mesh axis.

    For [`second_order`][unlearnx.second_order] on a dense GGN precision the batched path
    does not refactorise per request: it solves against the shared Cholesky factor with
    Woodbury's identity, `O(m d²)` per request for `m` edited factor rows (see
    `unlearnx/_batch/_woodbury.py`). Requests whose downdate leaves the precision
    indefinite (found from the `m × m` capacitance matrix) are redone afterwards by the
    plain single-request update, which falls back to recomputing the precision from the
    retained rows; `result.plain` marks them. Results equal the single-request
    `update` to rounding (1e-10 in float64 on Adult).

    Args:
        posterior: the starting posterior (every request is applied to it).
        data: the data it was fitted on.
        requests: from [`forget_rows`][unlearnx.forget_rows],
            [`forget_features`][unlearnx.forget_features], [`relabel`][unlearnx.relabel],
            or resolved [`Edit`][unlearnx.Edit]s.
        unlearner: the transform (default `ux.second_order()`); any jittable transform or
            chain, e.g. `ux.chain(ux.second_order(), ux.refine(steps=2))`.
        solver: for second-order steps: `"woodbury"` (shared factor), `"plain"` (per
            request: form `Λ'` and refactorise, `O(d³)` each; for comparison), or
            `"auto"` (Woodbury for a dense GGN precision whenever the edit has fewer
            factor rows than parameters).
        return_precision: also return each request's updated precision (`N d²` memory).
        query: rows at which to return each unlearned posterior's predictive mean.
        predict: `"map"` (at the mean) or `"probit"` (linearised, uses the updated
            precision).
        chunk_size: the most requests per compiled call (rounded to a power of two, and
            down to fit `max_memory_gb`, then up to a multiple of the device count).
        devices: devices or a `Mesh` with a `"requests"` axis (default: all local devices).
        max_memory_gb: rough memory budget of one chunk.
        throw: raise a `RuntimeError` if any result is not finite (otherwise inspect
            `result.finite`).

    Returns:
        A [`BatchResult`][unlearnx.batch.BatchResult], one row per request.

    Raises:
        ValueError: on bad arguments or an invalid request (naming its position).

    Example:
        ```python
        import unlearnx as ux
        data = ux.datasets.diabetes().train
        model, _ = ux.fit(ux.models.LogisticRegression(data.n_features), data)
        post = ux.laplace(model, data)
        requests = [ux.forget_rows([i]) for i in range(100)] + [ux.relabel([7], [0])]
        result = ux.batch.unlearn(post, data, requests)
        print(result.theta.shape, result.info.downdate_ok.all())   # (101, 9) True
        ```
    """
    where = "batch.unlearn"
    engine = make_engine(
        posterior,
        data,
        unlearner=unlearner,
        solver=solver,
        return_precision=return_precision,
        query=query,
        predict=predict,
        chunk_size=chunk_size,
        devices=devices,
        max_memory_gb=max_memory_gb,
        where=where,
    )
    requests = list(requests)
    if not requests:
        raise ValueError(f"{where}: `requests` is empty; pass at least one request.")
    hosts = resolve_all(requests, data, where)
    out = run(engine, hosts)
    finite = out["finite"]
    if throw and not finite.all():
        bad = np.flatnonzero(~finite)
        raise RuntimeError(
            f"{where}: requests {bad[:10].tolist()} gave non-finite parameters. Try "
            f"`second_order(damping=...)`, or pass throw=False and inspect `result.finite`."
        )
    return BatchResult(
        theta=out["theta"],
        info=out["info"],
        finite=finite,
        plain=out["plain"],
        bucket=out["bucket"],
        seconds=out["seconds"],
        precision=out.get("precision"),
        predictions=out.get("predictions"),
        unravel=engine.unravel,
        prior_precision=posterior.prior_precision,
        curvature=posterior.curvature,
    )


class Engine(NamedTuple):
    """Everything a batch run needs besides the requests, placed on the devices once."""

    unlearner: AbstractUnlearner
    posterior: LaplacePosterior  # replicated over the mesh
    data: Dataset
    query: Array | None
    host_posterior: LaplacePosterior  # as given (for the plain per-request path)
    host_data: Dataset
    host_query: Array | None
    mesh: jax.sharding.Mesh
    solver: str
    return_precision: bool
    predict: str | None
    chunk_size: int
    max_bytes: float
    unravel: Unravel
    d: int
    c: int
    shared: _Shared  # replicated


def make_engine(
    posterior,
    data,
    *,
    unlearner=None,
    solver="auto",
    return_precision=False,
    query=None,
    predict="map",
    chunk_size=4096,
    devices=None,
    max_memory_gb=2.0,
    where="batch.unlearn",
) -> Engine:
    """Check the settings of a batch run and place the posterior and data on the devices."""
    unlearner = _check_unlearner(unlearner, where)
    if not isinstance(posterior, LaplacePosterior):
        raise ValueError(
            f"{where}: `posterior` must be a ux.LaplacePosterior; got {type(posterior).__name__}."
        )
    check_model_data(posterior.mean, data, where)
    if solver not in ("auto", "woodbury", "plain"):
        raise ValueError(
            f"{where}: unknown `solver={solver!r}`; use 'auto', 'woodbury' or 'plain'."
        )
    if predict not in ("map", "probit"):
        raise ValueError(f"{where}: unknown `predict={predict!r}`; use 'map' or 'probit'.")
    if not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"{where}: `chunk_size` must be a positive int; got {chunk_size!r}.")
    if not max_memory_gb > 0:
        raise ValueError(f"{where}: `max_memory_gb` must be positive; got {max_memory_gb}.")
    if query is not None:
        query = jnp.asarray(query, data.X.dtype)
        if query.ndim != 2 or query.shape[1] != data.n_features:
            raise ValueError(
                f"{where}: `query` must have shape (q, {data.n_features}); got {query.shape}."
            )
    mesh = request_mesh(devices)
    theta0, unravel = ravel(posterior.mean)
    shared = _shared_factors(unlearner, posterior)
    posterior_d, data_d, query_d, shared_d = replicate((posterior, data, query, shared), mesh)
    return Engine(
        unlearner,
        posterior_d,
        data_d,
        query_d,
        posterior,
        data,
        query,
        mesh,
        solver,
        return_precision,
        None if query is None else predict,
        chunk_size,
        max_memory_gb * 2**30,
        unravel,
        theta0.shape[0],
        posterior.mean.n_outputs,
        shared_d,
    )


def resolve_all(
    requests: Sequence, data: Dataset, where: str, labels: Sequence[str] | None = None
) -> list[_Host]:
    """Resolve every request against `data` (the boundary checks), naming the bad one by
    its position (or by `labels[i]`)."""
    host = (np.asarray(data.X), np.asarray(data.y), np.asarray(data.weights))
    hosts: list[_Host | None] = list(_resolve_row_deletions(requests, data, host))
    for i, r in enumerate(requests):
        if hosts[i] is not None:
            continue
        try:
            hosts[i] = _resolve(r, data, host)
        except ValueError as e:
            name = f"requests[{i}]" if labels is None else labels[i]
            raise ValueError(f"{where}: {name}: {e}") from None
    return hosts  # type: ignore[return-value]


def _resolve_row_deletions(requests: Sequence, data: Dataset, host) -> list[_Host | None]:
    """`forget_rows` requests with integer row lists, resolved together with array
    operations (Python work per request dominated the batch otherwise: ~70 µs each
    through `Request.resolve_host`, against a few µs of compiled work on Adult).

    Only requests that pass every check of `resolve_host` are resolved here; anything
    else (or anything suspicious) is left `None` for `resolve_host`, which raises the
    one error message."""
    Xh, yh, wh = host
    n = data.n
    alive = int(np.sum(wh > 0))
    out: list[_Host | None] = [None] * len(requests)
    by_k: dict[int, list[tuple[int, np.ndarray]]] = {}
    for i, r in enumerate(requests):
        if type(r) is not Request or r.kind != "forget_rows":
            continue
        rows = r.rows
        if (
            not isinstance(rows, np.ndarray)
            or rows.ndim != 1
            or rows.size == 0
            or rows.dtype.kind not in "iu"
        ):
            continue
        by_k.setdefault(rows.size, []).append((i, rows))
    for k, items in by_k.items():
        if alive - k <= 0:
            continue
        R = np.stack([rows for _, rows in items]).astype(np.int64)  # (M, k)
        ok = np.all((R >= 0) & (R < n), axis=1)
        safe = np.where(ok[:, None], R, 0)
        ok &= np.all(wh[safe] > 0, axis=1)
        if k > 1:
            srt = np.sort(safe, axis=1)
            ok &= np.all(np.diff(srt, axis=1) != 0, axis=1)
        b = batch_bucket(k, n)
        pad = b - k
        index = np.concatenate([safe, np.full((len(items), pad), n)], axis=1).astype(np.int32)
        mask = np.concatenate(
            [np.ones((len(items), k), bool), np.zeros((len(items), pad), bool)], 1
        )
        X = np.zeros((len(items), b, Xh.shape[1]), Xh.dtype)
        X[:, :k] = Xh[safe]
        y = np.zeros((len(items), b), yh.dtype)
        y[:, :k] = yh[safe]
        w = np.zeros((len(items), b), wh.dtype)
        block = (index, mask, X, y, w)
        for j, (i, _) in enumerate(items):
            if ok[j]:
                out[i] = _Host(b, False, False, block, j)
    return out


def run(engine: Engine, hosts: Sequence[_Host]) -> dict:
    """Run resolved requests: vmapped chunks per group, then the plain update for the
    requests whose batched downdate was indefinite. Returns arrays with one row per host."""
    n_dev = mesh_size(engine.mesh)
    q = 0 if engine.query is None else engine.query.shape[0]
    N = len(hosts)
    out = _Assembler(N)
    seconds = np.zeros(N)
    for (_, edits_x, adds), rows in groups(hosts).items():
        cfg = _Config(edits_x, adds, engine.solver, engine.return_precision, engine.predict)
        per = _request_bytes(hosts[rows[0]], engine.host_data, engine.d, engine.c, cfg, q)
        size = _chunk_size(len(rows), engine.chunk_size, n_dev, per, engine.max_bytes)
        for start in range(0, len(rows), size):
            part = rows[start : start + size]
            padded = part + [part[-1]] * (size - len(part))
            edits = shard_requests(_stack([hosts[j] for j in padded]), engine.mesh)
            t0 = time.perf_counter()
            res = _run_chunk(
                engine.unlearner,
                edits,
                engine.posterior,
                engine.data,
                engine.query,
                engine.shared,
                cfg,
            )
            res = jax.block_until_ready(res)
            seconds[part] = (time.perf_counter() - t0) / len(part)
            out.put(np.asarray(part), res, len(part))

    plain = ~out.get("ok")
    for j in np.flatnonzero(plain):
        h = hosts[j]
        cfg = _Config(h.edits_x, h.adds, engine.solver, engine.return_precision, engine.predict)
        edit = jax.tree.map(lambda a: jnp.asarray(a[0]), _stack([h]))
        t0 = time.perf_counter()
        res = _run_plain(
            engine.unlearner, edit, engine.host_posterior, engine.host_data, engine.host_query, cfg
        )
        res = jax.block_until_ready(res)
        seconds[j] += time.perf_counter() - t0
        out.put(np.array([j]), jax.tree.map(lambda a: np.asarray(a)[None], res), 1)
    result = {k: out.get(k) for k in out.arrays}
    result.pop("ok")
    result["plain"] = plain
    result["seconds"] = seconds
    result["bucket"] = np.array([h.bucket for h in hosts])
    return result


def unlearn_sequential(
    posterior: LaplacePosterior,
    data: Dataset,
    requests: Sequence,
    *,
    unlearner: AbstractUnlearner | None = None,
    throw: bool = True,
) -> SequentialResult:
    """Apply a queue of requests in order: each request sees the posterior and the data
    left by the ones before it, and the state's ledger records them all.

    This is `unlearner.update` in a loop (requests are checked against the current data,
    so a row cannot be forgotten twice); each step reuses the compiled update of its
    bucket size.

    Args:
        posterior: the starting posterior.
        data: the data it was fitted on.
        requests: the queue, applied first to last.
        unlearner: the transform (default `ux.second_order()`); exact retraining works here.
        throw: raise if a step produces non-finite parameters.

    Returns:
        A [`SequentialResult`][unlearnx.batch.SequentialResult].

    Example:
        ```python
        import unlearnx as ux
        data = ux.datasets.diabetes().train
        model, _ = ux.fit(ux.models.LogisticRegression(data.n_features), data)
        post = ux.laplace(model, data)
        queue = [ux.forget_rows([1, 2]), ux.relabel([5], [1]), ux.forget_rows([9])]
        res = ux.batch.unlearn_sequential(post, data, queue)
        print(int(res.state.ledger.count), res.theta.shape)   # 3 (3, 9)
        ```
    """
    where = "batch.unlearn_sequential"
    if unlearner is None:
        unlearner = second_order()
    if not isinstance(unlearner, AbstractUnlearner):
        raise ValueError(
            f"{where}: `unlearner` must be an unlearning transform; got {type(unlearner).__name__}."
        )
    requests = list(requests)
    if not requests:
        raise ValueError(f"{where}: `requests` is empty; pass at least one request.")
    state = unlearner.init(posterior, data)
    thetas, infos, seconds = [], [], []
    post = posterior
    for i, r in enumerate(requests):
        t0 = time.perf_counter()
        try:
            post, state, info = unlearner.update(r, state, throw=throw)
        except ValueError as e:
            raise ValueError(f"{where}: requests[{i}]: {e}") from None
        except RuntimeError as e:
            raise RuntimeError(f"{where}: requests[{i}]: {e}") from None
        thetas.append(np.asarray(post.theta))
        infos.append(jax.tree.map(np.asarray, info))
        seconds.append(time.perf_counter() - t0)
    info = jax.tree.map(lambda *xs: np.stack(xs), *infos)
    return SequentialResult(post, state, np.stack(thetas), info, np.array(seconds))
