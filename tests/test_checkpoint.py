"""Checkpoints: exact round trips, rebuilding without a template, clear errors for
corrupted or mismatched files, atomic writes."""

import dataclasses
import json
import os
import struct

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import unlearnx as ux
from unlearnx._checkpoint import MAGIC, _digest, read_header


def _same(a, b):
    la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
    assert len(la) == len(lb)
    for x, y in zip(la, lb, strict=True):
        if eqx.is_array(x):
            assert x.dtype == y.dtype and x.shape == y.shape
            np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    assert jax.tree.structure(a) == jax.tree.structure(b)


@pytest.fixture(scope="module")
def pima():
    data = ux.datasets.diabetes().train
    model, _ = ux.fit(ux.models.LogisticRegression(data.n_features), data, prior_precision=1.0)
    return data, ux.laplace(model, data, prior_precision=1.0)


def _models(key):
    k1, k2 = jax.random.split(key)
    return {
        "logistic": ux.models.LogisticRegression(8),
        "logistic_nobias": ux.models.LogisticRegression(8, use_bias=False),
        "softmax": ux.models.SoftmaxRegression(8, 3),
        "linear": ux.models.LinearRegression(8, noise_std=0.5),
        "mlp": ux.models.MLPClassifier(
            8, 2, width=5, depth=2, activation=jax.nn.relu, dtype=jnp.float64, key=k1
        ),
        "mlp_reg": ux.models.MLPRegressor(
            8, width=3, depth=1, noise_std=2.0, dtype=jnp.float64, key=k2
        ),
    }


@pytest.mark.parametrize("name", list(_models(jax.random.key(0))))
@pytest.mark.parametrize("structure", ["full", "diag"])
def test_posterior_round_trip_without_template(pima, tmp_path, key, name, structure):
    data, _ = pima
    model = _models(key)[name]
    if name == "softmax":
        data = dataclasses.replace(data, n_classes=3)
    elif name in ("linear", "mlp_reg"):
        data = dataclasses.replace(data, y=data.y.astype(jnp.float64), n_classes=None)
    post = ux.laplace(model, data, structure=structure, prior_precision=2.0)
    path = tmp_path / "post.ux"
    ux.save(path, post)
    again = ux.load(path)
    _same(again, post)
    assert type(again.mean) is type(model) and again.curvature == post.curvature
    np.testing.assert_array_equal(again.predict(data.X[:4]), post.predict(data.X[:4]))
    header = read_header(path)
    assert header["version"] == 1 and header["kind"] == "LaplacePosterior"
    assert header["skeleton"]["model"]["class"] == type(model).__name__


def test_state_round_trip_and_continue(pima, tmp_path):
    data, post = pima
    unlearner = ux.chain(ux.second_order(), ux.refine(steps=2))
    _, state, _ = unlearner.update(ux.forget_rows([1, 2, 3]), unlearner.init(post, data))
    ux.save(tmp_path / "state.ux", state)
    loaded = ux.load(tmp_path / "state.ux")
    _same(loaded, state)
    assert loaded.data.feature_names == data.feature_names
    assert loaded.data.n_classes == data.n_classes and loaded.inner == (None, None)
    # unlearning continues from the loaded state exactly as from the original
    a, sa, _ = unlearner.update(ux.forget_rows([10]), state)
    b, sb, _ = unlearner.update(ux.forget_rows([10]), loaded)
    np.testing.assert_array_equal(a.theta, b.theta)
    assert int(sb.ledger.count) == 2
    # and with an explicit template
    _same(ux.load(tmp_path / "state.ux", like=unlearner.init(post, data)), state)


class _Custom(ux.models.AbstractModel):
    """A model class unlearnx cannot rebuild from a header."""

    w: jax.Array
    likelihood: ux.models.Bernoulli

    def __init__(self, p):
        self.w = jnp.zeros(p)
        self.likelihood = ux.models.Bernoulli()

    @property
    def n_inputs(self):
        return self.w.shape[0]

    @property
    def n_outputs(self):
        return 1

    def __call__(self, x):
        return jnp.dot(self.w, x)[None]


def test_custom_model_needs_like(pima, tmp_path):
    data, _ = pima
    model, _ = ux.fit(_Custom(data.n_features), data, solver="lbfgs")
    post = ux.laplace(model, data)
    ux.save(tmp_path / "c.ux", post)
    with pytest.raises(ValueError, match="pass `like=`"):
        ux.load(tmp_path / "c.ux")
    _same(ux.load(tmp_path / "c.ux", like=ux.laplace(_Custom(data.n_features), data)), post)


def _corrupt(path, fn):
    blob = bytearray(path.read_bytes())
    fn(blob)
    path.write_bytes(bytes(blob))


def test_corrupted_and_mismatched_files(pima, tmp_path):
    data, post = pima
    path = tmp_path / "p.ux"
    ux.save(path, post)
    good = path.read_bytes()

    def flip_last(b):
        b[-3] ^= 0xFF

    _corrupt(path, flip_last)
    with pytest.raises(ValueError, match="checksum mismatch"):
        ux.load(path)
    path.write_bytes(good[:-10])
    with pytest.raises(ValueError, match="truncated"):
        ux.load(path)
    path.write_bytes(b"PK\x03\x04" + good)
    with pytest.raises(ValueError, match="not an unlearnx checkpoint"):
        ux.load(path)
    n = struct.unpack("<Q", good[len(MAGIC) : len(MAGIC) + 8])[0]
    path.write_bytes(good[: len(MAGIC) + 8] + b"{" * n + good[len(MAGIC) + 8 + n :])
    with pytest.raises(ValueError, match="header is corrupted"):
        ux.load(path)
    # a header edited consistently (checksum recomputed) but from a future format
    header = json.loads(good[len(MAGIC) + 8 : len(MAGIC) + 8 + n])
    payload = good[len(MAGIC) + 8 + n :]
    header["version"] = 99
    header["sha256"] = _digest(header, payload)
    text = json.dumps(header).encode()
    path.write_bytes(MAGIC + struct.pack("<Q", len(text)) + text + payload)
    with pytest.raises(ValueError, match="version 99 is not supported"):
        ux.load(path)
    with pytest.raises(ValueError, match="no such file"):
        ux.load(tmp_path / "missing.ux")
    # mismatched templates
    path.write_bytes(good)
    other = ux.laplace(ux.models.LogisticRegression(data.n_features, use_bias=False), data)
    with pytest.raises(ValueError, match="does not match `like`"):
        ux.load(path, like=other)
    with pytest.raises(ValueError, match="holds a LaplacePosterior but `like` is a"):
        ux.load(path, like=ux.second_order().init(post, data))
    with pytest.raises(ValueError, match="must be a ux.LaplacePosterior"):
        ux.save(path, post.mean)


def test_float64_checkpoint_refuses_32_bit_runtime(pima, tmp_path):
    _, post = pima
    ux.save(tmp_path / "p.ux", post)
    jax.config.update("jax_enable_x64", False)
    try:
        with pytest.raises(ValueError, match="jax_enable_x64 is off"):
            ux.load(tmp_path / "p.ux")
    finally:
        jax.config.update("jax_enable_x64", True)


def test_atomic_write_keeps_the_old_file(pima, tmp_path, monkeypatch):
    data, post = pima
    path = tmp_path / "p.ux"
    ux.save(path, post)
    before = path.read_bytes()
    other = ux.laplace(post.mean, data, prior_precision=3.0)

    def boom(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", boom)
    with pytest.raises(OSError, match="disk full"):
        ux.save(path, other)
    monkeypatch.undo()
    assert path.read_bytes() == before
    assert sorted(os.listdir(tmp_path)) == ["p.ux"]  # no temporary file left behind
    ux.save(path, other)
    assert float(ux.load(path).prior_precision) == 3.0
