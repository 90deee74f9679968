"""Bad input fails at the boundary with a ValueError that names the problem.

The suite runs under jaxtyping's import hook with beartype, which rejects an argument that
violates its annotation (a string outside a `Literal`, a wrong class) with a TypeCheckError
before the library's own check runs. Users do not run that hook, so for those arguments the
tests switch runtime type checking off (`_unchecked`) to exercise the ValueError they see.
"""

import contextlib

import equinox as eqx
import jax
import jax.numpy as jnp
import jaxtyping
import numpy as np
import pytest

import unlearnx as ux

N = 20


@pytest.fixture(scope="module")
def small():
    data, _ = ux.datasets.synthetic_glm(jax.random.key(0), n=N, d=3)
    model, _ = ux.fit(ux.models.LogisticRegression(3), data, prior_precision=1.0)
    return data, model, ux.laplace(model, data, prior_precision=1.0)


def _update(small, request, transform=None):
    data, _, post = small
    u = transform or ux.identity()
    return u.update(request, u.init(post, data))


@contextlib.contextmanager
def _unchecked():
    """Without the runtime annotation checks of the test hook, as a user calls it."""
    before = jaxtyping.config.jaxtyping_disable
    jaxtyping.config.update("jaxtyping_disable", True)
    try:
        yield
    finally:
        jaxtyping.config.update("jaxtyping_disable", before)


def _with(data, **fields):
    names = tuple(fields)
    return eqx.tree_at(lambda d: tuple(getattr(d, k) for k in names), data, tuple(fields.values()))


# --- row indices --------------------------------------------------------------------------


def test_rows_out_of_range(small):
    with pytest.raises(ValueError, match=rf"\[{N}\] are out of range for {N} rows"):
        _update(small, ux.forget_rows([0, N]))


def test_rows_duplicated(small):
    with pytest.raises(ValueError, match=r"\[4\] appear more than once"):
        _update(small, ux.forget_rows([4, 2, 4]))


def test_rows_negative(small):
    with pytest.raises(ValueError, match=r"\[-1\] are out of range"):
        _update(small, ux.forget_rows([-1, 3]))


def test_rows_float_non_integer(small):
    with pytest.raises(ValueError, match="must be integer indices"):
        _update(small, ux.forget_rows(np.array([1.5, 2.0])))


def test_rows_two_dimensional(small):
    with pytest.raises(ValueError, match="must be 1-d"):
        _update(small, ux.forget_rows(np.array([[1, 2], [3, 4]])))


def test_rows_bad_boolean_mask(small):
    with pytest.raises(ValueError, match=rf"boolean row mask must have shape \({N},\)"):
        _update(small, ux.forget_rows(np.ones(N - 1, bool)))


def test_empty_request(small):
    with pytest.raises(ValueError, match="request is empty"):
        _update(small, ux.forget_rows([]))


def test_deleting_every_row(small):
    with pytest.raises(ValueError, match=f"deletes all {N} remaining rows"):
        _update(small, ux.forget_rows(np.arange(N)))


def test_deleting_every_row_across_two_requests(small):
    data, _, post = small
    u = ux.second_order()
    _, state, _ = u.update(ux.forget_rows(np.arange(N // 2)), u.init(post, data))
    with pytest.raises(ValueError, match=f"deletes all {N // 2} remaining rows"):
        u.update(ux.forget_rows(np.arange(N // 2, N)), state)


def test_forgetting_an_already_forgotten_row(small):
    data, _, post = small
    u = ux.identity()
    _, state, _ = u.update(ux.forget_rows([0, 1]), u.init(post, data))
    with pytest.raises(ValueError, match=r"rows \[1\] were already forgotten"):
        u.update(ux.forget_rows([1, 2]), state)


# --- data ---------------------------------------------------------------------------------


@pytest.mark.parametrize("bad", [np.nan, np.inf])
@pytest.mark.parametrize("where", ["fit", "laplace", "init"])
def test_non_finite_features(small, bad, where):
    data, model, post = small
    X = np.array(data.X)
    X[3, 1] = bad
    broken = _with(data, X=jnp.asarray(X))
    with pytest.raises(
        ValueError, match=rf"{where}: `data.X` contains NaN or Inf \(first at \[\[3, 1\]\]\)"
    ):
        if where == "fit":
            ux.fit(model, broken)
        elif where == "laplace":
            ux.laplace(model, broken)
        else:
            ux.second_order().init(post, broken)


def test_wrong_feature_count(small):
    data, _, _ = small
    with pytest.raises(ValueError, match="model expects 5 features but `data.X` has 3 columns"):
        ux.fit(ux.models.LogisticRegression(5), data)


def test_wrong_y_shape():
    X = jnp.zeros((4, 2))
    with pytest.raises(ValueError, match=r"`y` must have shape \(4,\)"):
        ux.Dataset(
            X=X,
            y=jnp.zeros((4, 1), jnp.int32),
            weights=jnp.ones(4),
            attributes={},
            feature_names=("a", "b"),
        )


def test_fit_labels_outside_classes(small):
    data, model, _ = small
    y = np.array(data.y)
    y[0] = 2
    with pytest.raises(ValueError, match=r"labels must be 0 or 1; found \[2\]"):
        ux.fit(model, _with(data, y=jnp.asarray(y)))


def test_relabel_outside_classes(small):
    with pytest.raises(ValueError, match=r"labels \[5\] are outside the classes 0..1"):
        _update(small, ux.relabel([0, 1], [1, 5]))


def test_relabel_non_integer_labels(small):
    with pytest.raises(ValueError, match="must be integer class ids"):
        _update(small, ux.relabel([0, 1], [0.5, 1.0]))


def test_relabel_wrong_number_of_labels(small):
    with pytest.raises(ValueError, match="one new label per row"):
        _update(small, ux.relabel([0, 1, 2], [1, 0]))


def test_unknown_feature_name(small):
    with pytest.raises(ValueError, match="no feature named 'height'"):
        _update(small, ux.forget_features(["x0", "height"]))


@pytest.mark.parametrize(
    ("fill", "message"), [("median", "must be a number or 'mean'"), (np.nan, "must be finite")]
)
def test_bad_fill(fill, message):
    with pytest.raises(ValueError, match=message):
        ux.forget_features("x0", fill=fill)


# --- configuration ------------------------------------------------------------------------


@pytest.mark.parametrize("lam", [0.0, -1.0])
def test_bad_prior_precision(small, lam):
    data, model, _ = small
    with pytest.raises(ValueError, match="fit: `prior_precision` must be positive"):
        ux.fit(model, data, prior_precision=lam)
    with pytest.raises(ValueError, match="laplace: `prior_precision` must be positive"):
        ux.laplace(model, data, prior_precision=lam)


def test_unknown_solver(small):
    data, model, _ = small
    with _unchecked(), pytest.raises(ValueError, match="unknown `solver='sgd'`"):
        ux.fit(model, data, solver="sgd")


def test_adam_needs_a_key(small):
    data, model, _ = small
    with pytest.raises(ValueError, match="`key` is required for solver='adam'"):
        ux.fit(model, data, solver="adam")


def test_unknown_structure(small):
    data, model, _ = small
    with _unchecked(), pytest.raises(ValueError, match="unknown `structure='kron'`"):
        ux.laplace(model, data, structure="kron")


def test_unknown_curvature(small):
    data, model, _ = small
    with _unchecked(), pytest.raises(ValueError, match="unknown `curvature='fisher'`"):
        ux.laplace(model, data, curvature="fisher")


def test_unknown_update_method():
    with _unchecked(), pytest.raises(ValueError, match="unknown `method='qr'`"):
        ux.second_order(method="qr")


def test_chain_of_non_transforms():
    with _unchecked(), pytest.raises(ValueError, match="must be an unlearning transform.*got str"):
        ux.chain(ux.second_order(), "refine")
    with _unchecked(), pytest.raises(ValueError, match="at least one transform"):
        ux.chain()


def test_update_with_wrong_state_type(small):
    data, _, post = small
    with _unchecked(), pytest.raises(ValueError, match="`state` must come from `init`.*got tuple"):
        ux.second_order().update(ux.forget_rows([0]), (post, data))


def test_update_with_a_non_request(small):
    data, _, post = small
    u = ux.identity()
    with _unchecked(), pytest.raises(ValueError, match="expected a request.*got list"):
        u.update([0, 1], u.init(post, data))


def test_init_with_a_model_instead_of_a_posterior(small):
    data, model, _ = small
    with _unchecked(), pytest.raises(ValueError, match="`posterior` must be a ux.LaplacePosterior"):
        ux.second_order().init(model, data)


@pytest.mark.parametrize("steps", [-1, -5])
def test_refine_negative_steps(steps):
    with pytest.raises(ValueError, match=rf"`steps` must be a non-negative int; got {steps}"):
        ux.refine(steps=steps)
