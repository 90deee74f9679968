"""Layer discovery for the layer-wise structures (KFAC, EK-FAC, last layer).

A supported model is a chain of affine layers, dense (`s = W a + b`) or convolutional
(the same at every output location, on the image patch there), separated by elementwise
activations, pooling and reshapes. For each layer we describe

- where its parameters sit in the flat vector `θ = ravel(model)`: the layer's weight
  and bias together form the matrix `W̃ = [W | b]` of shape `(n_out, n_cols)` (a conv
  weight `(out, in, kh, kw)` is read as `(out, in·kh·kw)`), and `LayerSpec.index`
  gives the positions in `θ` of its entries;
- how to get, for one example, the layer inputs `a` (shape `(n_loc, n_cols)`: one row per
  output location, `1` appended for the bias; for a convolution the rows are the image
  patches from `jax.lax.conv_general_dilated_patches`) and the output gradients
  `g = Bᵀ ∂f/∂s` (shape `(c, n_loc, n_out)`), where `B` is the likelihood's output
  Hessian square root (`∇²_f ℓ = B Bᵀ`) and `s` the layer's pre-activation output.

The gradients come from one forward pass with zero "probes" added to every layer's
pre-activations (`∂f/∂probe = ∂f/∂s`) and one reverse pass per column of `B`, batched
with `vmap` over the cotangents. The per-example
GGN factor of the layer (a row of `Bᵀ J`) for output `k` is then
`Σ_loc g[k, loc] ⊗ a[loc]`, the flattened `∂(B_kᵀ f)/∂W̃`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal, NamedTuple

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

from .._custom_types import Array, Float
from .._models._base import AbstractModel, ravel
from .._models._cnn import CNNClassifier
from .._models._glm import LinearRegression, LogisticRegression, SoftmaxRegression
from .._models._mlp import MLPClassifier, MLPRegressor
from ._precision import JACOBIAN_BUDGET

_GLMS = (LinearRegression, LogisticRegression, SoftmaxRegression)
_MLPS = (MLPClassifier, MLPRegressor)

#: The models whose layers are known.
SUPPORTED = (*_GLMS, *_MLPS, CNNClassifier)


class LayerSpec(NamedTuple):
    """Where one affine layer's parameters sit in the flat `θ`, and its sizes.

    Attributes:
        kind: `"dense"` or `"conv"`.
        weight_offset: position in `θ` of the first weight entry (the weight leaf is
            contiguous, row-major).
        bias_offset: position of the first bias entry, or `None` without a bias.
        n_out: outputs (rows of `W̃`; output channels of a convolution).
        n_in: inputs per location (`in·kh·kw` for a convolution), without the bias.
        n_loc: output locations sharing the weights (`1` for a dense layer).
    """

    kind: Literal["dense", "conv"]
    weight_offset: int
    bias_offset: int | None
    n_out: int
    n_in: int
    n_loc: int

    @property
    def n_cols(self) -> int:
        """Columns of `W̃ = [W | b]`: `n_in`, plus one for the bias."""
        return self.n_in + (self.bias_offset is not None)

    @property
    def size(self) -> int:
        """Number of parameters of the layer."""
        return self.n_out * self.n_cols

    def index(self) -> np.ndarray:
        """Positions in `θ` of the entries of `W̃`, shape `(n_out, n_cols)` (static)."""
        idx = self.weight_offset + np.arange(self.n_out * self.n_in).reshape(self.n_out, -1)
        if self.bias_offset is not None:
            bias = self.bias_offset + np.arange(self.n_out)[:, None]
            idx = np.concatenate([idx, bias], axis=1)
        return idx


def _unsupported(model, where: str) -> ValueError:
    return ValueError(
        f"{where}: no layer structure is known for {type(model).__name__}; the layer-wise "
        f"structures ('kfac', 'ekfac', 'last_layer') support "
        f"{', '.join(cls.__name__ for cls in SUPPORTED)} "
        "(MLPs built without `scan=True`, convolutions with zero padding and one group). "
        "For other models use structure='diag', 'lowrank' or 'matrix_free'."
    )


def _is_param(x) -> bool:
    """A parameter: a floating array, or its shape (`jax.ShapeDtypeStruct`, as
    `eqx.filter_eval_shape` gives), so that layouts and memory estimates can be computed
    for a model that was never allocated. The same leaves, in the same order, as
    `ravel`'s partition."""
    if isinstance(x, jax.ShapeDtypeStruct):
        return jnp.issubdtype(x.dtype, jnp.inexact)
    return eqx.is_inexact_array(x)


def _partition(model):
    return eqx.partition(model, _is_param)


def _positions(model):
    """The model's parameter tree with each array replaced by its positions in `θ`
    (numpy integers, static)."""
    params, _ = _partition(model)
    leaves, treedef = jax.tree_util.tree_flatten(params)
    out, offset = [], 0
    for leaf in leaves:
        out.append(offset + np.arange(leaf.size).reshape(leaf.shape))
        offset += leaf.size
    return jax.tree_util.tree_unflatten(treedef, out)


def _first(pos) -> int | None:
    return None if pos is None else int(np.ravel(pos)[0])


def _model_layers(model):
    """`(kind, params_path)` pairs: the affine layers of a supported model, in order;
    `None` for an unsupported one. `params_path` maps the model (or its position tree) to
    the layer module."""
    if isinstance(model, _GLMS):
        return [("glm", lambda m: m)]
    if isinstance(model, _MLPS):
        mlp = model.mlp
        if not isinstance(mlp, eqx.nn.MLP) or mlp.scan:
            return None
        return [("dense", lambda m, i=i: m.mlp.layers[i]) for i in range(len(mlp.layers))]
    if isinstance(model, CNNClassifier):
        for conv in model.convs:
            if conv.padding_mode != "ZEROS" or conv.groups != 1:
                return None
        convs = [("conv", lambda m, i=i: m.convs[i]) for i in range(len(model.convs))]
        dense = [("dense", lambda m, i=i: m.linears[i]) for i in range(len(model.linears))]
        return convs + dense
    return None


def find_layers(model: AbstractModel, where: str) -> tuple[LayerSpec, ...]:
    """The affine layers of `model`, in forward order, with their positions in `θ`.

    Raises:
        ValueError: for a model whose layers are not known (naming `where`, the supported
            models and the structures that work for any model).
    """
    layers = _model_layers(model)
    if layers is None:
        raise _unsupported(model, where)
    pos = _positions(model)
    x = jax.ShapeDtypeStruct((model.n_inputs,), param_dtype(model))
    params, static = _partition(model)
    _, inputs, _ = jax.eval_shape(lambda p, x: forward(eqx.combine(p, static), x), params, x)
    specs = []
    for (kind, path), a in zip(layers, inputs, strict=True):
        layer, lpos = path(model), path(pos)
        n_out = 1 if layer.weight.ndim == 1 else layer.weight.shape[0]
        spec = LayerSpec(
            "conv" if kind == "conv" else "dense",
            _first(lpos.weight),
            _first(lpos.bias),
            n_out,
            layer.weight.size // n_out,
            a.shape[0],
        )
        specs.append(spec)
    return tuple(specs)


def param_dtype(model):
    """The parameters' floating dtype."""
    leaves = jax.tree_util.tree_leaves(_partition(model)[0])
    return leaves[0].dtype if leaves else jnp.result_type(float)


def uncovered(model: AbstractModel, layers: tuple[LayerSpec, ...]) -> np.ndarray:
    """Positions in `θ` of the parameters that belong to no layer (e.g. the weights of a
    learnt activation); usually empty."""
    d = sum(x.size for x in jax.tree_util.tree_leaves(_partition(model)[0]))
    mask = np.ones(d, bool)
    for spec in layers:
        mask[spec.index().ravel()] = False
    return np.flatnonzero(mask)


# --------------------------------------------------------------------------------------
# Forward passes with probes: `f, inputs, pre = forward(model, x, probes)`, where
# `probes[l]` (shaped like layer l's pre-activation output; None for no probes) is added
# to that output, `inputs[l]` is layer l's input as rows `(n_loc, n_cols)` and `pre[l]`
# its pre-activation output (with the probe).


def _homogeneous(a, bias):
    if bias is None:
        return a
    return jnp.concatenate([a, jnp.ones(a.shape[:-1] + (1,), a.dtype)], axis=-1)


def _probe(probes, i):
    return 0.0 if probes is None else probes[i]


def _glm_forward(model, x, probes):
    f = model(x) + _probe(probes, 0)
    return f, (_homogeneous(x, model.bias)[None],), (f,)


def _mlp_forward(model, x, probes):
    mlp = model.mlp
    inputs, pre = [], []
    h = x
    apply = eqx.filter_vmap(lambda act, v: act(v))
    for i, layer in enumerate(mlp.layers):
        inputs.append(_homogeneous(h, layer.bias)[None])
        h = layer(h) + _probe(probes, i)
        pre.append(h)
        if i < len(mlp.layers) - 1:
            act = jax.tree_util.tree_map(
                lambda a, i=i: a[i] if eqx.is_array(a) else a, mlp.activation
            )
            h = apply(act, h)
    h = apply(mlp.final_activation, h)
    return h, tuple(inputs), tuple(pre)


def _patches(conv, h):
    """The image patches of `h` (channels, height, width) that `conv` sees, as rows
    `(locations, in·kh·kw)`, features ordered like the flattened weight `(in, kh, kw)`."""
    p = jax.lax.conv_general_dilated_patches(
        h[None], conv.kernel_size, conv.stride, conv.padding, rhs_dilation=conv.dilation
    )[0]
    return p.reshape(p.shape[0], -1).T


def _cnn_forward(model, x, probes):
    inputs, pre = [], []
    h = jnp.reshape(x, model.image_shape)
    for i, conv in enumerate(model.convs):
        inputs.append(_homogeneous(_patches(conv, h), conv.bias))
        h = conv(h) + _probe(probes, i)
        pre.append(h)
        h = model.activation(h)
        if model.pool is not None:
            h = model.pool(h)
    h = jnp.ravel(h)
    n = len(model.convs)
    for j, linear in enumerate(model.linears):
        inputs.append(_homogeneous(h, linear.bias)[None])
        h = linear(h) + _probe(probes, n + j)
        pre.append(h)
        if j < len(model.linears) - 1:
            h = model.activation(h)
    return h, tuple(inputs), tuple(pre)


def forward(model: AbstractModel, x: Float[Array, " p"], probes=None):
    """`(f, inputs, pre)`: the model output for one example with `probes[l]` added to
    layer `l`'s pre-activation output, each layer's input rows `(n_loc, n_cols)` and its
    pre-activation output."""
    if isinstance(model, _GLMS):
        return _glm_forward(model, x, probes)
    if isinstance(model, _MLPS):
        return _mlp_forward(model, x, probes)
    if isinstance(model, CNNClassifier):
        return _cnn_forward(model, x, probes)
    raise _unsupported(model, "forward")


def _identity(f):
    return jnp.eye(f.shape[0], dtype=f.dtype)


def layer_gradients(
    model: AbstractModel,
    x: Float[Array, " p"],
    which: tuple[int, ...] | None = None,
    cotangents: Callable[[Array], Array] | None = None,
) -> tuple[Array, tuple[Array, ...], tuple[Array, ...]]:
    """For one example: the output `f`, and of the layers `which` (default: all) the input
    rows `a` `(n_loc, n_cols)` and output gradients `g = Cᵀ ∂f/∂s` `(k, n_loc, n_out)`,
    with `C = cotangents(f)` `(c, k)` (held constant; default the identity `I_c`), by one
    reverse pass per column of `C` (batched) from zero probes on those layers' outputs.
    With `C = I_c`, `Σ_loc g[k, loc] a[loc]ᵀ` is `∂f_k/∂W̃`, the layer's block of row `k`
    of the Jacobian; with `C = B` (`layer_statistics`) it is a row of the GGN factor."""
    shapes = eqx.filter_eval_shape(lambda m, x: forward(m, x)[2], model, x)
    which = tuple(range(len(shapes))) if which is None else tuple(which)

    def fn(sel):
        probes = [jnp.zeros(s.shape, s.dtype) for s in shapes]
        for i, p in zip(which, sel, strict=True):
            probes[i] = p
        f, inputs, _ = forward(model, x, tuple(probes))
        return f, tuple(inputs[i] for i in which)

    sel = tuple(jnp.zeros(shapes[i].shape, shapes[i].dtype) for i in which)
    f, vjp, inputs = jax.vjp(fn, sel, has_aux=True)
    C = _identity(f) if cotangents is None else jax.lax.stop_gradient(cotangents(f))
    (cots,) = jax.vmap(vjp, in_axes=1)(C)  # per layer (k, *pre-activation shape)
    gs = []
    for g in cots:
        g = g.reshape(g.shape[0], g.shape[1], -1)  # (k, out, loc); loc = 1 when dense
        gs.append(jnp.swapaxes(g, 1, 2))
    return f, inputs, tuple(gs)


def layer_statistics(
    model: AbstractModel, x: Float[Array, " p"], which: tuple[int, ...] | None = None
) -> tuple[tuple[Array, ...], tuple[Array, ...]]:
    """For one example: the input rows `a` `(n_loc, n_cols)` and output gradients
    `g = Bᵀ ∂f/∂s` `(c, n_loc, n_out)` of the layers `which` (default: all), `B` the
    likelihood's output Hessian square root (`∇²_f ℓ = B Bᵀ`); see `layer_gradients`."""
    _, inputs, gs = layer_gradients(model, x, which, model.likelihood.hessian_sqrt)
    return inputs, gs


# --------------------------------------------------------------------------------------
# The linearised predictive for covariances that are diagonal per layer in a Kronecker
# basis (KFAC, EK-FAC: the eigenbases of the factors; the diagonal: the identity).


def _covariance_numbers(model: AbstractModel, layers: tuple[LayerSpec, ...]) -> int:
    """Numbers held per row by `layer_covariance`: each layer's inputs and output
    gradients and their rotated copies (with the backward passes' temporaries), and for
    a convolution the rotated per-output Jacobian blocks and their scaled copy."""
    c = int(model.n_outputs)
    total = 0
    for s in layers:
        total += 2 * s.n_loc * s.n_cols + 3 * c * s.n_loc * s.n_out
        if s.n_loc > 1:
            total += 2 * c * s.n_out * s.n_cols
    return total


def covariance_rows(model: AbstractModel, layers: tuple[LayerSpec, ...], n_rows: int) -> int:
    """Rows per batch of `layer_covariance`: all `n_rows`, or few enough that a batch's
    per-row temporaries fit in `JACOBIAN_BUDGET`."""
    item = jnp.dtype(param_dtype(model)).itemsize
    per_row = max(_covariance_numbers(model, layers) * item, 1)
    return max(1, min(n_rows, JACOBIAN_BUDGET // per_row))


def layer_covariance(
    model: AbstractModel,
    X: Float[Array, "m p"],
    layers: tuple[LayerSpec, ...],
    scales: tuple[Array, ...],
    bases: tuple[tuple[Array, Array], ...] | None = None,
    rest: tuple[np.ndarray, Array] | None = None,
    rows: int | None = None,
) -> tuple[Float[Array, "m c"], Float[Array, "m c c"]]:
    """`(f, J Σ Jᵀ)` at each row of `X`: the outputs and the covariance of the outputs
    of the model linearised in its parameters, `J = ∂f/∂θ`, under a parameter
    covariance `Σ` that is block diagonal over the layers, each block diagonal in the
    basis `Q_G ⊗ Q_A` of the layer's `W̃` (row-major):
    `Σ_l = (Q_G ⊗ Q_A) diag(vec S_l) (Q_G ⊗ Q_A)ᵀ`.

    Layer `l`'s block of row `k` of `J`, read as the matrix `∂f_k/∂W̃ = Σ_loc g_k,loc
    a_locᵀ` (`g = ∂f/∂s` from `layer_gradients` with `C = I_c`), is rotated to
    `M_k = Q_Gᵀ (∂f_k/∂W̃) Q_A`, and `cov_kk' = Σ_l Σ_ij S_l,ij M_k,ij M_k',ij`. For a
    dense layer `M_k = (Q_Gᵀ g_k)(Q_Aᵀ a)ᵀ` is rank one, so
    `cov_kk' = Σ_i g̃_ki g̃_k'i Σ_j S_ij ã_j²` and no `(c, n_out, n_cols)` array is
    formed. Neither `J` (`c × d`) nor a solve with it ever is: a row costs the forward
    pass, `c` reverse passes and the rotations, done as matrix products over a batch.

    Args:
        model: the model at the linearisation point (one of `SUPPORTED`).
        X: the rows.
        layers: `find_layers(model, ...)`.
        scales: per layer, `S_l` `(n_out, n_cols)`: the eigenvalues of `Σ_l`.
        bases: per layer `(Q_A, Q_G)` (orthogonal, `(n_cols, n_cols)` and
            `(n_out, n_out)`), or `None` for the identity (`Σ` diagonal).
        rest: `(index, scale)`: the positions in `θ` of the parameters outside every
            layer (static) and `Σ`'s diagonal there; their part of `J` is a Jacobian
            over those parameters only. `None` (or an empty index) when there are none.
        rows: rows per batch (default `covariance_rows`).

    Returns:
        The outputs `(m, c)` and covariances `(m, c, c)`.
    """
    rows = covariance_rows(model, layers, X.shape[0]) if rows is None else rows
    rest_idx, rest_scale = (np.zeros(0, int), None) if rest is None else rest

    def one(x):
        f, inputs, grads = layer_gradients(model, x)
        cov = jnp.zeros((f.shape[0], f.shape[0]), f.dtype)
        for i, (a, g, S) in enumerate(zip(inputs, grads, scales, strict=True)):
            if bases is not None:
                QA, QG = bases[i]
                a, g = a @ QA, g @ QG  # (loc, cols), (c, loc, out)
            if a.shape[0] == 1:
                u = S @ a[0] ** 2  # (out,)
                cov = cov + (g[:, 0] * u) @ g[:, 0].T
            else:
                M = jnp.einsum("klo,la->koa", g, a)
                cov = cov + jnp.einsum("koa,joa->kj", M * S, M)
        if rest_idx.size:
            theta, unravel = ravel(model)
            fn = lambda u: unravel(theta.at[rest_idx].set(u))(x)  # noqa: E731
            J = jax.jacrev(fn)(theta[rest_idx])  # (c, r)
            cov = cov + (J * rest_scale) @ J.T
        return f, cov

    return jax.lax.map(one, X, batch_size=rows)
