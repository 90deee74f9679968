"""KFAC and EK-FAC precisions against dense GGNs built here from `jax.jacrev` (with the
likelihoods' output Hessians written out in numpy), Kronecker factors and image patches
built in numpy, numpy/scipy linear algebra, and rebuilding from the edited data.
Float64 (conftest enables x64). Everything heavy runs under one `jit` per check: most of
the time here is XLA compilation.
"""

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.linalg
from _helpers import _Quadratic
from scipy.special import softmax

import unlearnx as ux
from unlearnx._curvature._kfac import EKFACPrecision, KFACPrecision
from unlearnx._curvature._layers import find_layers, forward
from unlearnx._models._cnn import CNNClassifier

LAM = 0.7
N = 24
STRUCTURES = {"kfac": KFACPrecision, "ekfac": EKFACPrecision}

# --- oracles ----------------------------------------------------------------------------


def output_hessian(model, f):
    """`∇²_f ℓ` per example, in numpy, from the likelihood's definition."""
    f = np.asarray(f)
    lik = model.likelihood
    if isinstance(lik, ux.models.Gaussian):
        return np.full((f.shape[0], 1, 1), 1.0 / lik.noise_std**2)
    if isinstance(lik, ux.models.Categorical):
        p = softmax(f, axis=1)
        return np.einsum("ni,ij->nij", p, np.eye(p.shape[1])) - np.einsum("ni,nj->nij", p, p)
    p = 1.0 / (1.0 + np.exp(-f))
    return (p * (1 - p))[:, :, None]


@eqx.filter_jit
def _jacobians(model, X):
    theta, unravel = ux.models.ravel(model)
    J = jax.vmap(lambda x: jax.jacrev(lambda t: unravel(t)(x))(theta))(X)  # (n, c, d)
    return J, jax.vmap(model)(X)


def dense_ggn(model, X, w):
    """`Σ_i w_i J_iᵀ H_i J_i` with `J_i` from `jax.jacrev` of the flat parameters."""
    J, F = _jacobians(model, X)
    J, H = np.asarray(J), output_hessian(model, F)
    return np.einsum("n,nci,ncd,ndj->ij", np.asarray(w), J, H, J)


def patches(image, k):
    """The `k × k` patches of a `(C, H, W)` image with "SAME" zero padding, one row per
    output location, features ordered `(C, kh, kw)`."""
    c, h, w = image.shape
    p = k // 2
    padded = np.pad(image, ((0, 0), (p, p), (p, p)))
    return np.stack([padded[:, i : i + k, j : j + k].ravel() for i in range(h) for j in range(w)])


def _close(a, b, tol):
    a, b = np.asarray(a), np.asarray(b)
    np.testing.assert_allclose(a, b, rtol=tol, atol=tol * max(np.abs(b).max(), 1.0))


def _dataset(X, y, w):
    names = tuple(f"x{i}" for i in range(X.shape[1]))
    return ux.Dataset(jnp.asarray(X), jnp.asarray(y), jnp.asarray(w), {}, names)


def _weights(n, rng):
    w = rng.uniform(0.5, 2.0, n)
    w[[2, 7]] = 0.0  # deleted rows: padding
    return w


def _perturb(model, scale, seed=3):
    theta, unravel = ux.models.ravel(model)
    return unravel(theta + scale * jax.random.normal(jax.random.key(seed), theta.shape))


@eqx.filter_jit
def dense(P):
    """`P.to_dense()` and `P.logdet()`, compiled (eagerly, each small op compiles)."""
    return P.to_dense(), P.logdet()


def _rows(data, idx, scale=1.0):
    idx = np.asarray(idx)
    return (data.X[idx], data.y[idx], scale * data.weights[idx])


def _zero_rows(data, k):
    return (data.X[:k], data.y[:k], jnp.zeros(k))


# --- models, data and builds ----------------------------------------------------------------
# Models are built under jit (one compilation instead of one per initialiser op), with
# the parameters moved off their initialisation.


@eqx.filter_jit
def _mlp():
    return _perturb(ux.models.MLPClassifier(5, 3, width=6, depth=2, key=jax.random.key(1)), 0.3)


@eqx.filter_jit
def _cnn():
    # Two convolutions (the second on the pooled 2×2 maps), two dense layers: d = 212.
    model = CNNClassifier((2, 4, 5), 3, channels=(3, 4), hidden=(5,), key=jax.random.key(2))
    return _perturb(model, 0.3)


@eqx.filter_jit
def _build(cls, model, data, basis=None, lam=LAM):
    if basis is None:
        return cls.from_data(model, data, lam, chunk=10)  # 3 chunks of rows under scan
    return cls.from_data(model, data, lam, chunk=10, basis=basis)


@pytest.fixture(scope="module")
def cases():
    rng = np.random.default_rng(0)
    out = {}
    for name, make in {"mlp": _mlp, "cnn": _cnn}.items():
        model = make()
        X = rng.normal(size=(N, model.n_inputs))
        y = rng.integers(0, 3, N).astype(np.int32)
        out[name] = (model, _dataset(X, y, _weights(N, rng)))
    return out


_BUILT = {}


def built(cases, structure, name):
    """The precision of `cases[name]`, built once per module."""
    if (structure, name) not in _BUILT:
        model, data = cases[name]
        P, ok = _build(STRUCTURES[structure], model, data)
        assert bool(ok)
        _BUILT[structure, name] = P
    return _BUILT[structure, name]


@pytest.fixture(scope="module")
def digits_model():
    """The default CNN for 8×8 digits, as shapes only (never allocated)."""
    return eqx.filter_eval_shape(lambda: CNNClassifier((1, 8, 8), 10, key=jax.random.key(0)))


# --- the CNN model ----------------------------------------------------------------------------


def test_cnn_classifier_digits_defaults(digits_model):
    model = digits_model
    params, static = eqx.partition(model, lambda x: isinstance(x, jax.ShapeDtypeStruct))
    assert sum(x.size for x in jax.tree_util.tree_leaves(params)) == 13_706
    x = jax.ShapeDtypeStruct((64,), jnp.float64)
    f, inputs, pre = jax.eval_shape(lambda p, x: forward(eqx.combine(p, static), x), params, x)
    assert f.shape == jax.eval_shape(lambda p, x: eqx.combine(p, static)(x), params, x).shape
    assert f.shape == (10,)
    specs = find_layers(model, "test")
    assert [s.kind for s in specs] == ["conv", "conv", "dense", "dense"]
    assert [s.n_loc for s in specs] == [64, 16, 1, 1]
    assert sum(s.size for s in specs) == 13_706
    assert [a.shape for a in inputs] == [(64, 10), (16, 145), (1, 129), (1, 65)]
    assert [p.shape for p in pre] == [(16, 8, 8), (32, 4, 4), (64,), (10,)]
    with pytest.raises(ValueError, match="image_shape"):
        CNNClassifier((8, 8), 10, key=jax.random.key(0))
    with pytest.raises(ValueError, match="pooling"):
        CNNClassifier((1, 2, 2), 10, channels=(4, 4), key=jax.random.key(0))


def test_forward_with_probes_is_the_model(cases):
    for model, data in cases.values():
        f = eqx.filter_jit(jax.vmap(lambda m, x: forward(m, x)[0], (None, 0)))(model, data.X)
        _close(f, eqx.filter_jit(jax.vmap(lambda m, x: m(x), (None, 0)))(model, data.X), 1e-14)


# --- exactness --------------------------------------------------------------------------------


@pytest.mark.parametrize("case", ["linear_regression", "softmax_at_zero"])
def test_kfac_is_the_exact_ggn_of_a_linear_layer(case):
    """With the same output Hessian for every row, `Σ_i a_i a_iᵀ ⊗ H = A ⊗ G / N`."""
    rng = np.random.default_rng(1)
    X, w = rng.normal(size=(30, 4)), _weights(30, rng)
    if case == "linear_regression":
        model = _perturb(ux.models.LinearRegression(4, noise_std=0.6), 1.0)
        data = _dataset(X, rng.normal(size=30), w)
    else:
        # Softmax regression (3 outputs) at θ = 0: p = 1/3 for every row, H is fixed.
        model = ux.models.SoftmaxRegression(4, 3)
        data = _dataset(X, rng.integers(0, 3, 30).astype(np.int32), w)
    P, ok = _build(KFACPrecision, model, data)
    assert bool(ok)
    expected = dense_ggn(model, data.X, data.weights) + LAM * np.eye(P.dim)
    D, logdet = dense(P)
    _close(D, expected, 1e-10)
    assert abs(float(logdet) - np.linalg.slogdet(expected)[1]) < 1e-10


def test_kfac_factors_match_numpy(cases):
    """The factors of the first (input) layer and the last (output) layer, in numpy, and
    the block `(G ⊗ A) / (N L) + λI` in the row-major order of `[W | b]`."""
    for name in ("mlp", "cnn"):
        model, data = cases[name]
        P = built(cases, "kfac", name)
        X, w = np.asarray(data.X), np.asarray(data.weights)
        if name == "mlp":
            a = np.hstack([X, np.ones((N, 1))])[:, None]  # (n, 1 location, p + 1)
        else:
            a = np.stack([patches(x.reshape(2, 4, 5), 3) for x in X])  # (n, 20, 18)
            a = np.concatenate([a, np.ones(a.shape[:2] + (1,))], axis=2)
        _close(P.blocks[0].A, np.einsum("n,nli,nlj->ij", w, a, a), 1e-12)
        # The last layer's pre-activation is the output: g = Bᵀ and Σ_k g_k g_kᵀ = H.
        H = output_hessian(model, _jacobians(model, data.X)[1])
        _close(P.blocks[-1].G, np.einsum("n,nij->ij", w, H), 1e-12)
        _close(P.count, w.sum(), 1e-14)
        D = np.asarray(dense(P)[0])
        for spec, blk in zip(P.layers, P.blocks, strict=True):
            idx = spec.index().ravel()
            block = np.kron(blk.G, blk.A) / (w.sum() * spec.n_loc) + LAM * np.eye(idx.size)
            _close(D[np.ix_(idx, idx)], block, 1e-10)
        assert [s.n_loc for s in P.layers] == ([1, 1, 1] if name == "mlp" else [20, 4, 1, 1])


@pytest.mark.parametrize("name", ["mlp", "cnn"])
def test_ekfac_eigenvalues_are_the_ggn_diagonal_in_the_kfac_basis(cases, name):
    model, data = cases[name]
    E, K = built(cases, "ekfac", name), built(cases, "kfac", name)
    ggn = dense_ggn(model, data.X, data.weights)
    for spec, e, k in zip(E.layers, E.blocks, K.blocks, strict=True):
        _close(e.QA, k.QA, 1e-12)  # EK-FAC keeps KFAC's eigenbasis
        _close(e.QG, k.QG, 1e-12)
        idx = spec.index().ravel()
        Q = np.kron(np.asarray(e.QG), np.asarray(e.QA))
        expected = np.diag(Q.T @ ggn[np.ix_(idx, idx)] @ Q).reshape(e.eig.shape)
        _close(e.eig, expected, 1e-10)
    assert E.rest.shape == (0,)  # every parameter belongs to a layer


def test_parameters_outside_layers_get_the_diagonal_ggn():
    """A learnt activation (PReLU slopes, one per neuron) belongs to no layer: those
    coordinates get the diagonal of the GGN plus λ, uncoupled from the rest."""
    model = ux.models.MLPClassifier(
        3, 2, width=4, depth=2, activation=eqx.nn.PReLU(), key=jax.random.key(0)
    )
    model = _perturb(model, 0.3)
    rng = np.random.default_rng(0)
    data = _dataset(rng.normal(size=(N, 3)), rng.integers(0, 2, N).astype(np.int32), np.ones(N))
    P, ok = _build(KFACPrecision, model, data)
    assert bool(ok)
    rest = np.setdiff1d(np.arange(P.dim), np.concatenate([s.index().ravel() for s in P.layers]))
    assert rest.size == 8 and P.rest.shape == (8,)  # 2 hidden layers × 4 slopes
    D = np.asarray(dense(P)[0])
    ggn = dense_ggn(model, data.X, data.weights)
    _close(D[np.ix_(rest, rest)], np.diag(np.diag(ggn)[rest] + LAM), 1e-12)
    assert np.all(D[np.ix_(rest, np.setdiff1d(np.arange(P.dim), rest))] == 0)
    # The layers see the learnt activations: the probed forward pass is the model's.
    probed = eqx.filter_jit(jax.vmap(lambda m, x: forward(m, x)[0], (None, 0)))(model, data.X)
    _close(probed, _jacobians(model, data.X)[1], 1e-14)


# --- edits ------------------------------------------------------------------------------------


@eqx.filter_jit
def _edit_checks(P, model, adds, removes):
    # Three edits of P at once (vmapped over the rows), then one more of the first result.
    Ps, oks = jax.vmap(lambda a, r: P.edit_examples(model, a, r))(adds, removes)
    first = lambda tree: jax.tree_util.tree_map(lambda x: x[0], tree)  # noqa: E731
    P2, ok2 = first(Ps).edit_examples(model, first(removes), first(adds))
    dense = jax.vmap(lambda Q: Q.to_dense())(Ps)
    logdet = jax.vmap(lambda Q: Q.logdet())(Ps)
    return (P.to_dense(), dense[0], P2.to_dense(), dense[1]), logdet[1], (*oks, ok2)


@pytest.mark.parametrize("structure", ["kfac", "ekfac"])
def test_edits_roundtrip_and_equal_rebuild(cases, structure):
    model, data = cases["mlp"]
    P = built(cases, structure, "mlp")
    rng = np.random.default_rng(5)
    new = (jnp.asarray(rng.normal(size=(6, model.n_inputs))), data.y[:6], jnp.full(6, 1.5))
    gone = np.array([0, 3, 4, 11, 19, 23])
    zeros = _zero_rows(data, 6)
    # Edits: add `new`; remove rows `gone` of the data; remove 40× the curvature of
    # those rows (an indefinite factor: not ok); then remove `new` from the first.
    stack = lambda *rows: jax.tree_util.tree_map(lambda *x: jnp.stack(x), *rows)  # noqa: E731
    adds = stack(new, zeros, zeros)
    removes = stack(zeros, _rows(data, gone), _rows(data, gone, 40.0))
    (D, D1, D2, D3), logdet3, oks = _edit_checks(P, model, adds, removes)
    assert [bool(ok) for ok in oks] == [True, True, False, True]
    # Add rows then remove the same rows: the original precision.
    assert np.abs(np.asarray(D1 - D)).max() > 1e-3
    _close(D2, D, 1e-8)
    # Remove rows of the data: the structure rebuilt without them (EK-FAC in the basis
    # of the fit, which edits keep).
    kept = eqx.tree_at(lambda d: d.weights, data, data.weights.at[gone].set(0.0))
    R, _ = _build(STRUCTURES[structure], model, kept, P if structure == "ekfac" else None)
    R_dense, R_logdet = dense(R)
    _close(D3, R_dense, 1e-8)
    _close(logdet3, R_logdet, 1e-10)


# --- the protocol against the dense matrix ---------------------------------------------------


@eqx.filter_jit
def _operations(P, v, V, key):
    x, info = P.solve_info(v)
    return dict(
        dense=P.to_dense(),
        mv=P.mv(v),
        mvV=P.mv(V),
        solve=P.solve(v),
        solveV=P.solve(V),
        info=info,
        logdet=P.logdet(),
        variance=P.variance(),
        shifted=P.shift(0.25).to_dense(),
        sample=P.sample(key, 4000),
    )


@pytest.mark.parametrize(
    ("structure", "name"), [("kfac", "mlp"), ("kfac", "cnn"), ("ekfac", "cnn")]
)
def test_operations_match_dense(cases, structure, name):
    P = built(cases, structure, name)
    d = P.dim
    rng = np.random.default_rng(7)
    v, V = rng.normal(size=d), rng.normal(size=(d, 3))
    out = _operations(P, v, V, jax.random.key(0))
    D = np.asarray(out["dense"])
    assert D.shape == (d, d)
    np.testing.assert_allclose(D, D.T, atol=1e-12 * np.abs(D).max())
    _close(out["mv"], D @ v, 1e-10)
    _close(out["mvV"], D @ V, 1e-10)
    _close(out["solve"], scipy.linalg.solve(D, v, assume_a="pos"), 1e-10)
    _close(out["solveV"], scipy.linalg.solve(D, V, assume_a="pos"), 1e-10)
    assert bool(out["info"].converged) and float(out["info"].residual) < 1e-10
    _close(out["logdet"], np.linalg.slogdet(D)[1], 1e-12)
    _close(out["variance"], np.diag(np.linalg.inv(D)), 1e-10)
    _close(out["shifted"], D + 0.25 * np.eye(d), 1e-12)
    # Draws are N(0, Λ⁻¹): whitened by Λ = L Lᵀ they are standard normal.
    S = np.asarray(out["sample"])
    assert S.shape == (4000, d)
    Z = S @ np.linalg.cholesky(D)
    assert np.abs(Z.mean(0)).max() < 0.1
    assert np.abs(np.cov(Z.T) - np.eye(d)).max() < 0.15


@eqx.filter_jit
def _batched(P, V, deltas):
    Ps = jax.vmap(P.shift)(deltas)  # a batch of precisions (e.g. one per job)
    solved = jax.vmap(lambda Q, v: Q.solve(v))(Ps, V[: deltas.shape[0]])
    return jax.vmap(P.solve)(V), solved, jax.vmap(lambda Q: Q.logdet())(Ps), P.to_dense()


def test_jit_and_vmap_match_eager(cases):
    P = built(cases, "kfac", "mlp")
    V = jax.random.normal(jax.random.key(3), (4, P.dim))
    eager = P.solve(V.T).T
    _close(jax.jit(lambda P, v: P.solve(v))(P, V[0]), eager[0], 1e-13)
    deltas = jnp.array([0.0, 0.1, 1.0])
    vmapped, solved, logdets, D = _batched(P, V, deltas)
    _close(vmapped, eager, 1e-13)
    shifted = [np.asarray(D) + s * np.eye(P.dim) for s in deltas]
    _close(solved, [np.linalg.solve(S, V[i]) for i, S in enumerate(shifted)], 1e-10)
    _close(logdets, [np.linalg.slogdet(S)[1] for S in shifted], 1e-12)


# --- end to end ---------------------------------------------------------------------------------


def test_laplace_and_second_order_unlearning(cases):
    model, data = cases["mlp"]
    post = ux.laplace(model, data, structure="kfac", prior_precision=LAM)
    assert isinstance(post.precision, KFACPrecision)
    u = ux.chain(ux.second_order(), ux.refine(steps=2))
    rows = [3, 17, 18, 20]
    new, _, info = u.update(ux.forget_rows(rows), u.init(post, data))
    assert np.all(np.isfinite(new.theta))
    assert bool(info[0].downdate_ok) and not bool(info[0].fallback)
    assert np.isfinite(float(info[0].step_norm)) and float(info[0].step_norm) > 0
    # The downdate (at the old mean; refine keeps it) equals KFAC rebuilt without them.
    kept = eqx.tree_at(lambda d: d.weights, data, data.weights.at[np.array(rows)].set(0.0))
    R, _ = _build(KFACPrecision, model, kept)
    _close(dense(new.precision)[0], dense(R)[0], 1e-8)


@pytest.mark.parametrize("structure", ["kfac", "ekfac"])
def test_failed_downdate_falls_back_to_rebuild(cases, structure):
    """A stale precision that never saw the forgotten rows: the downdate is not ok, and
    `second_order` rebuilds the structure from the retained rows instead."""
    model, data = cases["mlp"]
    stale_data = eqx.tree_at(lambda d: d.weights, data, data.weights.at[:16].set(0.0))
    stale, _ = _build(STRUCTURES[structure], model, stale_data)
    post = ux.LaplacePosterior(model, stale, jnp.asarray(LAM))
    u = ux.second_order()
    rows = np.array([0, 1, 3, 4, 5, 6, 8, 9, 10, 11])  # rows 2 and 7 have weight 0
    new, _, info = u.update(ux.forget_rows(rows), u.init(post, data))
    assert not bool(info.downdate_ok) and bool(info.fallback)
    assert np.all(np.isfinite(new.theta))
    kept = eqx.tree_at(lambda d: d.weights, data, data.weights.at[rows].set(0.0))
    R, _ = _build(STRUCTURES[structure], model, kept)
    _close(dense(new.precision)[0], dense(R)[0], 1e-10)


# --- memory and errors --------------------------------------------------------------------------


def test_memory_estimate(cases, digits_model):
    # The structure itself is part of the estimate.
    for (structure, name), P in _BUILT.items():
        model, _ = cases[name]
        assert P.memory_bytes() < STRUCTURES[structure].memory_estimate(model, N, chunk=10)
    # Against XLA's compiled peak (temporaries + outputs) for the digits CNN.
    rng = np.random.default_rng(0)
    n = 300
    data = _dataset(rng.normal(size=(n, 64)), rng.integers(0, 10, n).astype(np.int32), np.ones(n))
    params, static = eqx.partition(digits_model, lambda x: isinstance(x, jax.ShapeDtypeStruct))
    fn = jax.jit(lambda p, d: KFACPrecision.from_data(eqx.combine(p, static), d, 1.0, chunk=128))
    mem = fn.lower(params, data).compile().memory_analysis()
    peak = mem.temp_size_in_bytes + mem.output_size_in_bytes
    est = KFACPrecision.memory_estimate(digits_model, n, chunk=128)
    assert 0.75 <= est / peak <= 1.25, (est, peak)


def test_errors(cases):
    model = _Quadratic(jnp.ones(2), ux.models.Gaussian())
    data = _dataset(np.ones((4, 2)), np.zeros(4), np.ones(4))
    with pytest.raises(ValueError, match=r"_Quadratic.*CNNClassifier.*structure='diag'"):
        KFACPrecision.from_data(model, data, 1.0)
    with pytest.raises(ValueError, match="_Quadratic"):
        EKFACPrecision.memory_estimate(model, 10)
    mlp, data = cases["mlp"]
    with pytest.raises(ValueError, match="GGN only.*curvature='ggn'"):
        KFACPrecision.from_data(mlp, data, 1.0, "hessian")
    with pytest.raises(ValueError, match="curvature='hessian'"):
        built(cases, "kfac", "mlp").edit_examples(mlp, None, None, "hessian")
    mlp_scan = eqx.filter_eval_shape(
        lambda: eqx.nn.MLP(5, 3, 6, 3, scan=True, key=jax.random.key(0))
    )
    scanned = eqx.tree_at(lambda m: m.mlp, mlp, mlp_scan)
    with pytest.raises(ValueError, match="scan=True"):
        KFACPrecision.memory_estimate(scanned, 10)
