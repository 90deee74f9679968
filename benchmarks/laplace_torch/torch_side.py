"""laplace-torch side of the side-by-side Laplace benchmark (runs in `.venv-torch`).

    .venv-torch/bin/python benchmarks/laplace_torch/torch_side.py in.npz out.json \
        [--dtype float64|float32] [--structures full,diag,kron] [--repeats 3]
        [--batch-size N] [--threads T] [--max-full-params 8000] [--arrays out_arrays.npz]

Reads an MLP and data written by `make_npz.py` (weights `W{i}` (out, in), `b{i}`; tanh
between layers, none after the last, the same network as `eqx.nn.MLP`), rebuilds it as a
`torch.nn.Sequential` of `Linear`/`Tanh`, and for each Hessian structure runs
`Laplace(model, "classification", subset_of_weights="all", hessian_structure=...,
prior_precision=λ)` with laplace-torch's default backend (`CurvlinopsGGN`, the exact
GGN). It times `la.fit(train_loader)` and the predictive
`la(X_test, pred_type="glm", link_approx="probit")`, each as the median of `--repeats`
runs after one warm-up run, and writes JSON with the timings, the predictive
probabilities, the precision's diagonal and (kron) the raw Kronecker factors.

laplace-torch's conventions, as read from laplace-torch 0.3 / curvlinops 3.0.1 and
checked numerically by `check_conventions` below (the JSON repeats them):

- Loss: `CrossEntropyLoss(reduction="sum")`: a sum over rows, as unlearnx's objective;
  `prior_precision=λ` is the precision of `N(0, λ⁻¹ I)`, i.e. the `(λ/2)‖θ‖²` term.
  Temperature 1, so the Hessian factor `1/(σ² T)` is 1 for classification.
- Parameter order: `parameters_to_vector(model.parameters())`: per layer the weight
  (out, in) row-major, then the bias; the same as unlearnx's `ravel` of `eqx.nn.MLP`.
- full: `la.posterior_precision = GGN + λ I` (dense, exact GGN).
- diag: `la.posterior_precision = diag(GGN) + λ` (exact GGN diagonal), a vector.
- kron: one group per parameter tensor. Weight of layer l: factors `[B_l, A_l]` with the
  GGN block `≈ kron(B_l, A_l)` (torch.kron, matching the row-major (out, in) vector);
  `A_l = (1/N) Σ_n a_n a_nᵀ` is the *mean* input covariance (in × in, no bias column)
  and `B_l = Σ_n Jₙᵀ Λₙ Jₙ` the *summed* output-side factor (out × out, w.r.t. the
  layer's pre-activations; `Λₙ = diag(pₙ) − pₙpₙᵀ`): the factor `N` sits in `B`. KFAC
  "expand" type-2 (exact GGN factors), computed per batch: with several batches laplace
  rescales each batch's `A` by `M/N` and *adds* the factors over batches (not the
  Kronecker products), which equals the one-batch factors only for full-batch loading.
  Bias of layer l: a single factor `[B_l]` (the same `B_l`). The prior is not in the
  factors: the posterior precision adds `λ` to the *Kronecker product*'s eigenvalues,
  `Q (Λ_B ⊗ Λ_A + λ) Qᵀ` (no damping by default), so `precision_diag` includes it.
- predictive (glm, probit): `f ~ N(f_MAP, J Σ Jᵀ)`, probabilities
  `softmax(f_MAP / sqrt(1 + π/8 · diag(J Σ Jᵀ)))` per class.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from importlib.metadata import version

import numpy as np
import torch
from laplace import Laplace
from torch import nn
from torch.nn.utils import parameters_to_vector
from torch.utils.data import DataLoader, TensorDataset

STRUCTURES = ("full", "diag", "kron")

CONVENTIONS = {
    "loss": "CrossEntropyLoss(reduction='sum'); prior N(0, 1/prior_precision I)",
    "param_order": "per Linear layer: weight (out, in) row-major, then bias "
    "(parameters_to_vector order; equals ravel of eqx.nn.MLP)",
    "full.precision": "GGN + prior_precision * I (exact GGN, dense)",
    "diag.precision_diag": "diag(GGN) + prior_precision (exact GGN diagonal)",
    "kron.factors": "one group per parameter tensor: weight -> [B, A] with GGN block "
    "~ kron(B, A); A = (1/N) sum_n a a^T (mean input covariance, in x in, no bias "
    "column); B = sum_n J^T Lambda J (summed, out x out, w.r.t. the layer's "
    "pre-activations); bias -> [B]. Likelihood only: no prior in the factors. Multi-batch "
    "loaders add per-batch factors (A rescaled by M/N), so only full-batch loading gives "
    "the exact KFAC-expand factors.",
    "kron.precision_diag": "diag of Q (Lambda_B (x) Lambda_A + prior_precision) Q^T, "
    "i.e. the prior is added to the Kronecker product, not to the factors (no damping)",
    "predictive": "glm + probit: softmax(f_map / sqrt(1 + pi/8 * diag(J Sigma J^T)))",
}


def load(path: str, dtype: torch.dtype):
    f = np.load(path)
    n_layers = sum(1 for k in f.files if k.startswith("W"))
    if n_layers == 0 or any(
        f"W{i}" not in f.files or f"b{i}" not in f.files for i in range(n_layers)
    ):
        raise ValueError(f"{path}: expected arrays W0, b0, ..., W{{L-1}}, b{{L-1}}; got {f.files}.")
    layers = [(f[f"W{i}"], f[f"b{i}"]) for i in range(n_layers)]
    t = lambda a: torch.as_tensor(np.asarray(a), dtype=dtype)  # noqa: E731
    data = {
        "X_train": t(f["X_train"]),
        "y_train": torch.as_tensor(f["y_train"], dtype=torch.long),
        "X_test": t(f["X_test"]),
        "prior_precision": float(f["prior_precision"]),
    }
    if "y_test" in f.files:
        data["y_test"] = torch.as_tensor(f["y_test"], dtype=torch.long)
    return layers, data


def build_mlp(layers, dtype: torch.dtype) -> nn.Sequential:
    """`Linear`, `Tanh`, ..., `Linear` with the given weights (no final activation)."""
    modules = []
    for i, (W, b) in enumerate(layers):
        linear = nn.Linear(W.shape[1], W.shape[0], dtype=dtype)
        with torch.no_grad():
            linear.weight.copy_(torch.as_tensor(W, dtype=dtype))
            linear.bias.copy_(torch.as_tensor(b, dtype=dtype))
        modules.append(linear)
        if i < len(layers) - 1:
            modules.append(nn.Tanh())
    return nn.Sequential(*modules).eval()


def median_time(fn, repeats: int):
    """Median wall time of `repeats` calls after one warm-up call; also each time and the
    last result."""
    out = fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times), times, out


def kron_factors(la, model: nn.Module) -> list[dict]:
    """The raw (likelihood-only, pre-decomposition) Kronecker factors, one group per
    parameter tensor, in parameter order."""
    groups = []
    names = [name for name, _ in model.named_parameters()]
    for name, F in zip(names, la.H_facs.kfacs, strict=True):
        module, kind = name.rsplit(".", 1)
        groups.append(
            {
                "param": name,
                "layer": [
                    m for m, mod in model.named_children() if isinstance(mod, nn.Linear)
                ].index(module),
                "kind": kind,
                "shape": list(dict(model.named_parameters())[name].shape),
                "factors": [Fi.detach().cpu().tolist() for Fi in F],
            }
        )
    return groups


def run(structure: str, model, loader, X_test, prior: float, repeats: int, arrays: dict):
    la = Laplace(
        model,
        "classification",
        subset_of_weights="all",
        hessian_structure=structure,
        prior_precision=prior,
    )
    fit_s, fit_all, _ = median_time(lambda: la.fit(loader), repeats)

    def predict():
        with torch.no_grad():
            return la(X_test, pred_type="glm", link_approx="probit")

    pred_s, pred_all, probs = median_time(predict, repeats)
    P = la.posterior_precision
    out = {
        "fit_s": fit_s,
        "fit_all_s": fit_all,
        "predict_s": pred_s,
        "predict_all_s": pred_all,
        "loss": float(la.loss),
        "probs": probs.detach().cpu().tolist(),
    }
    if structure == "full":
        out["precision_diag"] = torch.diagonal(P).tolist()
        arrays["full_precision"] = P.detach().cpu().numpy()
    elif structure == "diag":
        out["precision_diag"] = P.tolist()
        out["ggn_diag"] = la.H.tolist()
    else:
        out["precision_diag"] = P.diag().tolist()
        out["factors"] = kron_factors(la, model)
        for g in out["factors"]:
            for j, Fi in enumerate(g["factors"]):
                arrays[f"kron_{g['param']}_{'BA'[j]}"] = np.asarray(Fi)
    arrays[f"{structure}_precision_diag"] = np.asarray(out["precision_diag"])
    arrays[f"{structure}_probs"] = np.asarray(out["probs"])
    return out, la


def check_conventions(model, X, y, prior: float, las: dict) -> dict:
    """Numerical checks of the documented conventions on this input (full-batch only):
    returns max abs deviations, all ~1e-12 in float64."""
    checks = {}
    params = list(model.parameters())
    if "kron" in las:
        la = las["kron"]
        # A of the first layer is the mean input covariance; the bias group shares B.
        A0 = la.H_facs.kfacs[0][1]
        checks["kron_A0_minus_mean_xxT"] = float((A0 - X.T @ X / len(X)).abs().max())
        # B of the last layer (pre-activations = logits) is the *sum* of Λ_n over rows.
        with torch.no_grad():
            p = torch.softmax(model(X), -1)
        sum_lam = (torch.diag_embed(p) - p[:, :, None] * p[:, None, :]).sum(0)
        checks["kron_B_last_minus_sum_Lambda"] = float(
            (la.H_facs.kfacs[-1][0] - sum_lam).abs().max()
        )
        B0w, B0b = la.H_facs.kfacs[0][0], la.H_facs.kfacs[1][0]
        checks["kron_B_weight_minus_B_bias"] = float((B0w - B0b).abs().max())
        # The prior is added to the Kronecker product's eigenvalues.
        dense = la.posterior_precision.to_matrix()
        raw = la.H_facs.to_matrix()
        eye = torch.eye(len(dense), dtype=dense.dtype)
        checks["kron_precision_minus_(kron+prior)"] = float((dense - raw - prior * eye).abs().max())
    if "full" in las and "diag" in las:
        full = las["full"].posterior_precision
        checks["full_diag_minus_diag_precision"] = float(
            (torch.diagonal(full) - las["diag"].posterior_precision).abs().max()
        )
    if "full" in las:
        # The GGN of the summed cross-entropy, by autograd (Jacobian of the logits).
        theta = parameters_to_vector(params).detach()
        shapes = [p.shape for p in params]

        def logits(t):
            tensors, i = {}, 0
            for (name, _), s in zip(model.named_parameters(), shapes, strict=True):
                k = int(np.prod(s))
                tensors[name] = t[i : i + k].reshape(s)
                i += k
            return torch.func.functional_call(model, tensors, (X,))

        J = torch.autograd.functional.jacobian(logits, theta)  # (n, c, d)
        p = torch.softmax(logits(theta), -1)
        Lam = torch.diag_embed(p) - p[:, :, None] * p[:, None, :]
        G = torch.einsum("ncd,nck,nke->de", J, Lam, J)
        full = las["full"].posterior_precision
        checks["full_minus_(autograd GGN+prior)"] = float(
            (full - G - prior * torch.eye(len(G), dtype=G.dtype)).abs().max()
        )
    return checks


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("input", help=".npz written by make_npz.py")
    parser.add_argument("output", help="JSON to write")
    parser.add_argument("--dtype", choices=("float64", "float32"), default="float64")
    parser.add_argument("--structures", default=",".join(STRUCTURES))
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument(
        "--batch-size", type=int, default=None, help="rows per batch (default: all, one batch)"
    )
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    parser.add_argument(
        "--max-full-params",
        type=int,
        default=8000,
        help="skip hessian_structure='full' above this many parameters",
    )
    parser.add_argument("--arrays", default=None, help="also save the arrays to this .npz")
    parser.add_argument("--no-checks", action="store_true", help="skip check_conventions")
    args = parser.parse_args(argv)

    structures = [s for s in args.structures.split(",") if s]
    unknown = set(structures) - set(STRUCTURES)
    if unknown:
        parser.error(f"unknown structures {sorted(unknown)}; choose from {STRUCTURES}")
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    torch.set_default_dtype(dtype)

    layers, data = load(args.input, dtype)
    model = build_mlp(layers, dtype)
    X, y, X_test = data["X_train"], data["y_train"], data["X_test"]
    prior = data["prior_precision"]
    batch_size = args.batch_size or len(X)
    loader = DataLoader(TensorDataset(X, y), batch_size=batch_size, shuffle=False)
    n_params = sum(p.numel() for p in model.parameters())

    with torch.no_grad():
        logits_test = model(X_test)
    result = {
        "meta": {
            "input": args.input,
            "torch": torch.__version__,
            "laplace_torch": version("laplace-torch"),
            "curvlinops": version("curvlinops-for-pytorch"),
            "python": sys.version.split()[0],
            "machine": platform.machine(),
            "dtype": args.dtype,
            "threads": torch.get_num_threads(),
            "n_train": len(X),
            "n_test": len(X_test),
            "n_params": n_params,
            "layer_shapes": [list(W.shape) for W, _ in layers],
            "batch_size": batch_size,
            "repeats": args.repeats,
            "prior_precision": prior,
            "backend": "CurvlinopsGGN (laplace-torch default)",
        },
        "conventions": CONVENTIONS,
        "map": {"logits_test": logits_test.tolist()},
    }
    arrays: dict[str, np.ndarray] = {}
    las = {}
    for structure in structures:
        if structure == "full" and n_params > args.max_full_params:
            result[structure] = {"skipped": f"{n_params} parameters > --max-full-params"}
            continue
        result[structure], las[structure] = run(
            structure, model, loader, X_test, prior, args.repeats, arrays
        )
        print(
            f"{structure:>4}: fit {result[structure]['fit_s'] * 1e3:8.2f} ms   "
            f"predict {result[structure]['predict_s'] * 1e3:8.2f} ms",
            file=sys.stderr,
        )
    if not args.no_checks and batch_size == len(X):
        result["checks"] = check_conventions(model, X, y, prior, las)
    with open(args.output, "w") as f:
        json.dump(result, f)
    if args.arrays:
        np.savez(args.arrays, **arrays)


if __name__ == "__main__":
    main()
