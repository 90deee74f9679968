"""Checkpoints of posteriors and unlearning states: `save` and `load`.

One file holds

    b"UNLEARNX-CKPT\\n" · 8-byte little-endian header length · header (JSON) · payload

where the payload is `eqx.tree_serialise_leaves` of the object and the header records the
format version, what the object is, the shape and dtype of every array leaf, a
*skeleton* (the model class and constructor arguments, the precision structure, the
dataset's static description) from which `load` rebuilds the object without a template,
and a SHA-256 checksum of the header and payload together. Writes are atomic (a
temporary file in the same directory, fsynced, then `os.replace`), so a crash never
leaves half a checkpoint under the final name.

Models that are not one of unlearnx's own classes, and transform states that hold
arrays, have no skeleton: `load` then needs `like=`, an object of the same structure
(for example `ux.laplace(model, data)` for the model's class, or `unlearner.init(...)`).
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import struct
import tempfile
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

from ._curvature._precision import DensePrecision, DiagonalPrecision
from ._data._dataset import Dataset
from ._models import _glm, _mlp
from ._posterior._laplace import LaplacePosterior
from ._unlearn._base import Ledger, UnlearnState

MAGIC = b"UNLEARNX-CKPT\n"
FORMAT = "unlearnx.checkpoint"
VERSION = 1

# --------------------------------------------------------------------------------------
# Skeletons: enough to rebuild an object of the right structure, filled with zeros.


def _activation_name(fn) -> str | None:
    for name, obj in vars(jax.nn).items():
        if obj is fn and not name.startswith("_"):
            return name
    return None


def _dtype(a) -> str:
    return str(np.dtype(a.dtype))


def _describe_model(model) -> dict | None:
    cls = type(model).__name__
    if isinstance(model, (_glm.LinearRegression, _glm.LogisticRegression)):
        args: dict[str, Any] = {
            "n_features": int(model.weight.shape[0]),
            "use_bias": model.bias is not None,
            "dtype": _dtype(model.weight),
        }
        if isinstance(model, _glm.LinearRegression):
            args["noise_std"] = float(model.likelihood.noise_std)
        return {"class": cls, "args": args}
    if isinstance(model, _glm.SoftmaxRegression):
        c, p = model.weight.shape
        args = {"n_features": int(p), "n_classes": int(c), "use_bias": model.bias is not None}
        args["dtype"] = _dtype(model.weight)
        return {"class": cls, "args": args}
    if isinstance(model, (_mlp.MLPClassifier, _mlp.MLPRegressor)):
        mlp = model.mlp
        act = _activation_name(mlp.activation)
        if act is None:
            return None
        args = {
            "n_features": int(mlp.in_size),
            "width": int(mlp.width_size),
            "depth": int(mlp.depth),
            "activation": act,
            "dtype": _dtype(mlp.layers[0].weight),
        }
        if isinstance(model, _mlp.MLPClassifier):
            args["n_classes"] = int(mlp.out_size)
        else:
            args["noise_std"] = float(model.likelihood.noise_std)
        return {"class": cls, "args": args}
    return None


_MODELS = {
    "LinearRegression": _glm.LinearRegression,
    "LogisticRegression": _glm.LogisticRegression,
    "SoftmaxRegression": _glm.SoftmaxRegression,
    "MLPClassifier": _mlp.MLPClassifier,
    "MLPRegressor": _mlp.MLPRegressor,
}


def _build_model(desc: dict):
    cls = _MODELS[desc["class"]]
    args = dict(desc["args"])
    args["dtype"] = jnp.dtype(args["dtype"])
    if "activation" in args:
        args["activation"] = getattr(jax.nn, args["activation"])
        args["key"] = jax.random.key(0)  # the values are overwritten by the payload
        n_features = args.pop("n_features")
        if cls is _mlp.MLPClassifier:
            return cls(n_features, args.pop("n_classes"), **args)
        return cls(n_features, **args)
    n_features = args.pop("n_features")
    if cls is _glm.SoftmaxRegression:
        return cls(n_features, args.pop("n_classes"), **args)
    return cls(n_features, **args)


def _describe_posterior(post: LaplacePosterior) -> dict | None:
    model = _describe_model(post.mean)
    if model is None:
        return None
    P = post.precision
    if isinstance(P, DensePrecision):
        structure = "dense"
    elif isinstance(P, DiagonalPrecision):
        structure = "diag"
    else:
        return None
    return {
        "model": model,
        "precision": structure,
        "dim": int(P.dim),
        "dtype": _dtype(post.prior_precision),
        "curvature": post.curvature,
    }


def _build_posterior(desc: dict) -> LaplacePosterior:
    model = _build_model(desc["model"])
    d, dtype = desc["dim"], jnp.dtype(desc["dtype"])
    if desc["precision"] == "dense":
        z = jnp.zeros((d, d), dtype)
        precision = DensePrecision(z, z)
    else:
        precision = DiagonalPrecision(jnp.zeros(d, dtype))
    return LaplacePosterior(model, precision, jnp.zeros((), dtype), desc["curvature"])


def _array_spec(a) -> list:
    return [list(a.shape), _dtype(a)]


def _describe_dataset(data: Dataset) -> dict:
    return {
        "X": _array_spec(data.X),
        "y": _array_spec(data.y),
        "weights": _array_spec(data.weights),
        "attributes": {k: _array_spec(v) for k, v in data.attributes.items()},
        "feature_names": list(data.feature_names),
        "groups": [[g, list(cols)] for g, cols in data.groups],
        "levels": [[a, list(lv)] for a, lv in data.levels],
        "n_classes": data.n_classes,
    }


def _zeros(spec) -> jax.Array:
    shape, dtype = spec
    return jnp.zeros(tuple(shape), jnp.dtype(dtype))


def _build_dataset(desc: dict) -> Dataset:
    return Dataset(
        _zeros(desc["X"]),
        _zeros(desc["y"]),
        _zeros(desc["weights"]),
        {k: _zeros(v) for k, v in desc["attributes"].items()},
        tuple(desc["feature_names"]),
        tuple((g, tuple(cols)) for g, cols in desc["groups"]),
        tuple((a, tuple(lv)) for a, lv in desc["levels"]),
        desc["n_classes"],
    )


def _inner_ok(inner) -> bool:
    """Whether a transform state holds no arrays (`None`, or tuples of them)."""
    if inner is None:
        return True
    return isinstance(inner, tuple) and all(_inner_ok(x) for x in inner)


def _describe_inner(inner):
    return None if inner is None else [_describe_inner(x) for x in inner]


def _build_inner(desc):
    return None if desc is None else tuple(_build_inner(x) for x in desc)


def _describe(obj) -> tuple[str, dict | None]:
    if isinstance(obj, LaplacePosterior):
        return "LaplacePosterior", _describe_posterior(obj)
    if isinstance(obj, UnlearnState):
        post = _describe_posterior(obj.posterior)
        if post is None or not _inner_ok(obj.inner):
            return "UnlearnState", None
        return "UnlearnState", {
            "posterior": post,
            "data": _describe_dataset(obj.data),
            "inner": _describe_inner(obj.inner),
        }
    raise ValueError(
        f"save: `obj` must be a ux.LaplacePosterior or an unlearning state "
        f"(ux.UnlearnState); got {type(obj).__name__}."
    )


def _build(kind: str, desc: dict):
    if kind == "LaplacePosterior":
        return _build_posterior(desc)
    n = desc["data"]["X"][0][0]
    ledger = Ledger(jnp.zeros((), jnp.int32), jnp.zeros(n, jnp.int32))
    return UnlearnState(
        _build_posterior(desc["posterior"]),
        _build_dataset(desc["data"]),
        ledger,
        _build_inner(desc["inner"]),
    )


# --------------------------------------------------------------------------------------
# The file


def _leaves(obj) -> list:
    return [_array_spec(x) for x in jax.tree_util.tree_leaves(obj) if eqx.is_array(x)]


def _digest(header: dict, payload: bytes) -> str:
    h = {k: v for k, v in header.items() if k != "sha256"}
    text = json.dumps(h, sort_keys=True, separators=(",", ":")).encode()
    return hashlib.sha256(text + payload).hexdigest()


def _atomic_write(path: str, data: bytes) -> None:
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=f".{os.path.basename(path)}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def save(path: str | os.PathLike, obj) -> None:
    """Save a posterior (or an unlearning state) to `path`, atomically.

    The file carries a JSON header (format version, the object's skeleton so that
    [`load`][unlearnx.load] can rebuild it without a template, the shape and dtype of every
    array, and a SHA-256 checksum) followed by `eqx.tree_serialise_leaves` of the object.

    Args:
        path: the file to write (its directory must exist).
        obj: a [`LaplacePosterior`][unlearnx.LaplacePosterior] or an
            [`UnlearnState`][unlearnx.UnlearnState].

    Raises:
        ValueError: if `obj` is neither, or the directory does not exist.

    Example:
        ```python
        import os, tempfile
        import unlearnx as ux
        data = ux.datasets.diabetes().train
        model, _ = ux.fit(ux.models.LogisticRegression(data.n_features), data)
        post = ux.laplace(model, data)
        path = os.path.join(tempfile.mkdtemp(), "pima.ux")
        ux.save(path, post)
        again = ux.load(path)
        assert float(ux.metrics.distance(again, post)) == 0.0
        ```
    """
    path = os.fspath(path)
    kind, skeleton = _describe(obj)
    directory = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(directory):
        raise ValueError(f"save: directory {directory} does not exist.")
    buf = io.BytesIO()
    eqx.tree_serialise_leaves(buf, obj)
    payload = buf.getvalue()
    from . import __version__

    header = {
        "format": FORMAT,
        "version": VERSION,
        "kind": kind,
        "unlearnx_version": __version__,
        "jax_version": jax.__version__,
        "skeleton": skeleton,
        "leaves": _leaves(obj),
        "payload_bytes": len(payload),
    }
    header["sha256"] = _digest(header, payload)
    text = json.dumps(header, sort_keys=True).encode()
    _atomic_write(path, MAGIC + struct.pack("<Q", len(text)) + text + payload)


def read_header(path: str | os.PathLike) -> dict:
    """The JSON header of a checkpoint (checked for format and integrity, not loaded).

    Raises:
        ValueError: if the file is not an unlearnx checkpoint, is truncated or corrupted.
    """
    header, _ = _read(os.fspath(path))
    return header


def _read(path: str) -> tuple[dict, bytes]:
    where = f"load: {path}"
    try:
        with open(path, "rb") as f:
            blob = f.read()
    except FileNotFoundError:
        raise ValueError(f"{where}: no such file.") from None
    if not blob.startswith(MAGIC):
        raise ValueError(f"{where} is not an unlearnx checkpoint (bad magic bytes).")
    start = len(MAGIC) + 8
    if len(blob) < start:
        raise ValueError(f"{where}: the file is truncated.")
    (n,) = struct.unpack("<Q", blob[len(MAGIC) : start])
    try:
        header = json.loads(blob[start : start + n].decode())
        if not isinstance(header, dict):
            raise TypeError
    except (UnicodeDecodeError, json.JSONDecodeError, TypeError):
        raise ValueError(f"{where}: the header is corrupted (not valid JSON).") from None
    if header.get("format") != FORMAT:
        raise ValueError(f"{where}: unknown format {header.get('format')!r}.")
    if header.get("version") != VERSION:
        raise ValueError(
            f"{where}: checkpoint format version {header.get('version')} is not supported "
            f"by this unlearnx (reads version {VERSION}); upgrade unlearnx."
        )
    payload = blob[start + n :]
    if len(payload) != header.get("payload_bytes"):
        raise ValueError(
            f"{where}: the payload has {len(payload)} bytes, the header says "
            f"{header.get('payload_bytes')}: the file is truncated or corrupted."
        )
    if _digest(header, payload) != header.get("sha256"):
        raise ValueError(f"{where}: SHA-256 checksum mismatch: the file is corrupted.")
    return header, payload


def load(path: str | os.PathLike, like: Any = None):
    """Load a posterior or unlearning state saved by [`save`][unlearnx.save].

    Args:
        path: the checkpoint file.
        like: an object of the same structure to fill (needed for models that are not
            unlearnx's own classes and for transform states that hold arrays; optional
            otherwise). Its array shapes and dtypes must match the file's.

    Returns:
        The saved object.

    Raises:
        ValueError: if the file is missing, not a checkpoint, truncated or corrupted
            (checksum), of an unsupported version, saved in float64 while
            `jax_enable_x64` is off, needs `like` and none was given, or does not
            match `like`.

    Example:
        ```python
        import os, tempfile
        import unlearnx as ux
        data = ux.datasets.diabetes().train
        model, _ = ux.fit(ux.models.LogisticRegression(data.n_features), data)
        unlearner = ux.second_order()
        state = unlearner.init(ux.laplace(model, data), data)
        _, state, _ = unlearner.update(ux.forget_rows([3]), state)
        path = os.path.join(tempfile.mkdtemp(), "state.ux")
        ux.save(path, state)
        state = ux.load(path)
        print(int(state.ledger.count))   # 1
        ```
    """
    path = os.fspath(path)
    where = f"load: {path}"
    header, payload = _read(path)
    kind = header["kind"]
    wide = [dt for _, dt in header["leaves"] if dt in ("float64", "int64", "uint64", "complex128")]
    if wide and not jax.config.jax_enable_x64:
        raise ValueError(
            f"{where}: the checkpoint holds {wide[0]} arrays but jax_enable_x64 is off, so "
            f"they would silently become 32-bit. Run "
            f"jax.config.update('jax_enable_x64', True) first."
        )
    if like is None:
        if header["skeleton"] is None:
            raise ValueError(
                f"{where}: this {kind} cannot be rebuilt from the file alone (its model is "
                f"not an unlearnx model class, or its transform state holds arrays); pass "
                f"`like=`, an object of the same structure."
            )
        like = _build(kind, header["skeleton"])
    else:
        expected = {"LaplacePosterior": LaplacePosterior, "UnlearnState": UnlearnState}[kind]
        if not isinstance(like, expected):
            raise ValueError(
                f"{where}: the file holds a {kind} but `like` is a {type(like).__name__}."
            )
    got = _leaves(like)
    if got != header["leaves"]:
        if len(got) != len(header["leaves"]):
            detail = f"{len(header['leaves'])} arrays in the file, {len(got)} in `like`"
        else:
            i = next(
                i for i, (a, b) in enumerate(zip(got, header["leaves"], strict=True)) if a != b
            )
            detail = f"array {i} is {header['leaves'][i]} in the file but {got[i]} in `like`"
        raise ValueError(f"{where}: the checkpoint does not match `like` ({detail}).")
    return eqx.tree_deserialise_leaves(io.BytesIO(payload), like)
