"""Write the `.npz` that `torch_side.py` reads: an MLP's weights plus train/test data.

Numpy only, so it runs from either environment (`.venv` or `.venv-torch`).

Format (all arrays; `L` = number of `Linear` layers, tanh between them, none after the
last, as `eqx.nn.MLP(..., activation=jax.nn.tanh)`):

    W0, b0, ..., W{L-1}, b{L-1}   weight (out, in) and bias (out,) of layer i
    X_train (n, p), y_train (n,)  integer class labels 0..c-1
    X_test (m, p)[, y_test (m,)]
    prior_precision ()            the λ of `Σ ℓ + (λ/2)‖θ‖²` (a scalar)

From unlearnx (in `.venv`):

    from benchmarks.laplace_torch.make_npz import layers_from_mlp, write_npz
    write_npz("in.npz", layers_from_mlp(model), Xtr, ytr, Xte, prior_precision=1.0)

A tiny random one, for a smoke test:

    python benchmarks/laplace_torch/make_npz.py tiny.npz --sizes 4,8,3
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence

import numpy as np


def layers_from_mlp(model) -> list[tuple[np.ndarray, np.ndarray]]:
    """`(W, b)` of every `Linear` of an `eqx.nn.MLP`, or of a model holding one as `.mlp`
    (`ux.models.MLPClassifier`), as float64 numpy arrays."""
    mlp = getattr(model, "mlp", model)
    return [
        (np.asarray(layer.weight, np.float64), np.asarray(layer.bias, np.float64))
        for layer in mlp.layers
    ]


def write_npz(
    path,
    layers: Sequence[tuple[np.ndarray, np.ndarray]],
    X_train,
    y_train,
    X_test,
    *,
    prior_precision: float,
    y_test=None,
) -> None:
    """Write the benchmark input; checks that the layer shapes chain up."""
    arrays = {}
    width = np.asarray(X_train).shape[1]
    for i, (W, b) in enumerate(layers):
        W, b = np.asarray(W, np.float64), np.asarray(b, np.float64)
        if W.ndim != 2 or W.shape[1] != width or b.shape != (W.shape[0],):
            raise ValueError(
                f"write_npz: layer {i} has W {W.shape}, b {b.shape}; expected W (out, "
                f"{width}) and b (out,)."
            )
        arrays[f"W{i}"], arrays[f"b{i}"] = W, b
        width = W.shape[0]
    y_train = np.asarray(y_train, np.int64)
    if y_train.min() < 0 or y_train.max() >= width:
        raise ValueError(f"write_npz: labels must lie in 0..{width - 1} (the output width).")
    arrays.update(
        X_train=np.asarray(X_train, np.float64),
        y_train=y_train,
        X_test=np.asarray(X_test, np.float64),
        prior_precision=np.asarray(prior_precision, np.float64),
    )
    if y_test is not None:
        arrays["y_test"] = np.asarray(y_test, np.int64)
    np.savez(path, **arrays)


def random_mlp(rng: np.random.Generator, sizes: Sequence[int]):
    """Layers with PyTorch's default `Linear` initialisation scale, `U(±1/√in)`."""
    layers = []
    for n_in, n_out in zip(sizes[:-1], sizes[1:], strict=True):
        bound = 1 / np.sqrt(n_in)
        layers.append(
            (rng.uniform(-bound, bound, (n_out, n_in)), rng.uniform(-bound, bound, n_out))
        )
    return layers


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", help="path of the .npz to write")
    parser.add_argument("--sizes", default="4,8,3", help="layer widths, input to output")
    parser.add_argument("--n-train", type=int, default=64)
    parser.add_argument("--n-test", type=int, default=16)
    parser.add_argument("--prior-precision", type=float, default=1.0)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    sizes = [int(s) for s in args.sizes.split(",")]
    rng = np.random.default_rng(args.seed)
    layers = random_mlp(rng, sizes)
    X = rng.normal(size=(args.n_train + args.n_test, sizes[0]))
    y = rng.integers(0, sizes[-1], size=len(X))
    n = args.n_train
    write_npz(
        args.out,
        layers,
        X[:n],
        y[:n],
        X[n:],
        prior_precision=args.prior_precision,
        y_test=y[n:],
    )


if __name__ == "__main__":
    main()
