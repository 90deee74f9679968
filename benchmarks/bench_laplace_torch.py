"""Side by side with laplace-torch: fitting and predicting full, diagonal and Kronecker
Laplace approximations of the same MLP on the same data, on the CPU.

The MLPs are trained on the vendored digits data (`ux.datasets.digits()`, 1,438 training
and 359 test rows, 64 inputs, 10 classes; tanh, `eqx.nn.MLP`), exported to an `.npz`
and rebuilt in PyTorch by `benchmarks/laplace_torch/torch_side.py`, which runs in a
separate environment (`.venv-torch`, created by `benchmarks/laplace_torch/setup_env.sh`
on the first run: CPU torch and laplace-torch 0.3). Two sizes: a small MLP (one hidden
layer of 50: 3,760 parameters; `full` is feasible) and the benchmark MLP (two hidden
layers of 300: 112,810 parameters; `diag` and `kfac`/`kron` only).

For each structure (ours: `laplace(structure=...)` with `full`, `diag`, `kfac`; theirs:
`Laplace(hessian_structure=...)` with `full`, `diag`, `kron`, both on the exact GGN of
the categorical likelihood, the same prior) it reports:

- fit time: ours compiled (median of warm runs), and the first call with compilation;
  theirs `la.fit(loader)` with one full batch (median of warm runs);
- predictive time: the probit (linearised, mean-field) predictive on the test rows;
- agreement: of the precision diagonals (`full`, `diag`), of the Kronecker factors
  (theirs `A = (1/N) Σ aaᵀ` without the bias column, `B = Σ JᵀΛJ`; ours the sums `A`,
  `G` of `[a; 1]` and the count `N`), and of the predictive probabilities.

Both libraries use every core of this machine (XLA's and PyTorch's intra-op threads).

    .venv/bin/python benchmarks/bench_laplace_torch.py             # about 3 minutes here
    .venv/bin/python benchmarks/bench_laplace_torch.py --dtype float32 --json out.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile

import jax

jax.config.update("jax_enable_x64", True)

import equinox as eqx  # noqa: E402
import numpy as np  # noqa: E402
from _timing import timed  # noqa: E402

import unlearnx as ux  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, os.path.join(HERE, "laplace_torch"))
from make_npz import layers_from_mlp, write_npz  # noqa: E402

TORCH_PYTHON = os.path.join(ROOT, ".venv-torch", "bin", "python")
OURS = {"full": "full", "diag": "diag", "kron": "kfac"}
PRIOR = 1.0


def ensure_env():
    if os.path.exists(TORCH_PYTHON):
        return
    print("creating .venv-torch (CPU torch + laplace-torch) ...", flush=True)
    subprocess.run(["bash", os.path.join(HERE, "laplace_torch", "setup_env.sh")], check=True)


def rel(a, b):
    a, b = np.asarray(a, float), np.asarray(b, float)
    return float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-300))


def kron_agreement(post, theirs):
    """Max relative differences of the Kronecker factors, per layer: theirs `A` against
    our `A[:in, :in] / N` (the mean, without the bias column) and theirs `B` against our
    `G` (both sums)."""
    P = post.precision
    out = []
    weights = [g for g in theirs["factors"] if g["kind"] == "weight"]
    for blk, g in zip(P.blocks, weights, strict=True):
        B, A = (np.asarray(f) for f in g["factors"])
        k = A.shape[0]
        ours_A = np.asarray(blk.A)[:k, :k] / float(P.count)
        out.append({"A": rel(ours_A, A), "B": rel(np.asarray(blk.G), B)})
    return out


def run_size(name, width, depth, structures, split, args, workdir, batch_size=None):
    dtype = np.float64 if args.dtype == "float64" else np.float32
    key = jax.random.key(0)
    init = ux.models.MLPClassifier(64, 10, width=width, depth=depth, key=key, dtype=dtype)
    model, _ = ux.fit(init, split.train, prior_precision=PRIOR, solver="lbfgs", max_steps=300)
    d = ux.models.n_params(model)
    npz = os.path.join(workdir, f"{name}.npz")
    write_npz(
        npz,
        layers_from_mlp(model),
        np.asarray(split.train.X),
        np.asarray(split.train.y),
        np.asarray(split.test.X),
        prior_precision=PRIOR,
    )
    out_json = os.path.join(workdir, f"{name}.json")
    cmd = [TORCH_PYTHON, os.path.join(HERE, "laplace_torch", "torch_side.py"), npz, out_json]
    cmd += ["--dtype", args.dtype, "--repeats", str(args.repeats)]
    cmd += ["--structures", ",".join(structures), "--max-full-params", "10000"]
    if batch_size is not None:
        cmd += ["--batch-size", str(batch_size)]
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    with open(out_json) as f:
        theirs = json.load(f)

    X_test = split.test.X
    predict = eqx.filter_jit(lambda p, X: p.predict(X, method="probit"))
    rows = []
    print(f"\n## {name}: {d:,} parameters, {split.train.n:,} rows, {args.dtype}")
    head = (
        f"{'structure':<12} {'ours fit ms':>11} {'(1st s)':>8} {'theirs ms':>10} {'ratio':>6} "
        f"{'ours pred ms':>12} {'theirs ms':>10} {'ratio':>6}  agreement"
    )
    print(head)
    print("-" * len(head))
    for structure in structures:
        t = theirs[structure]
        if "skipped" in t:
            continue
        s = OURS[structure]
        post, first, warm = timed(
            lambda s=s: ux.laplace(model, split.train, structure=s, prior_precision=PRIOR),
            args.repeats,
        )
        probs, pfirst, pwarm = timed(lambda post=post: predict(post, X_test), args.repeats)
        agree = {"probs": rel(probs, np.asarray(t["probs"]))}
        if structure == "full":
            agree["precision_diag"] = rel(np.diag(post.precision.matrix), t["precision_diag"])
        elif structure == "diag":
            agree["precision_diag"] = rel(post.precision.diag, t["precision_diag"])
        elif batch_size is None:
            # With several batches laplace-torch adds per-batch factors (not one-batch
            # KFAC), so the factors are compared on one full batch only.
            agree["factors"] = kron_agreement(post, t)
        r = {
            "structure": structure,
            "ours": s,
            "ours_fit_s": warm,
            "ours_fit_first_s": first,
            "theirs_fit_s": t["fit_s"],
            "fit_ratio": t["fit_s"] / warm,
            "ours_predict_s": pwarm,
            "ours_predict_first_s": pfirst,
            "theirs_predict_s": t["predict_s"],
            "predict_ratio": t["predict_s"] / pwarm,
            "agreement": agree,
        }
        rows.append(r)
        worst = max(
            [agree["probs"], agree.get("precision_diag", 0.0)]
            + [max(f.values()) for f in agree.get("factors", [])]
        )
        print(
            f"{structure + ' / ' + s:<12} {warm * 1e3:11.1f} {first:8.2f} "
            f"{t['fit_s'] * 1e3:10.1f} {r['fit_ratio']:6.1f} {pwarm * 1e3:12.2f} "
            f"{t['predict_s'] * 1e3:10.2f} {r['predict_ratio']:6.1f}  max rel diff {worst:.1e}"
        )
    return {"name": name, "parameters": d, "rows": rows, "torch_meta": theirs["meta"]}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dtype", choices=["float32", "float64"], default="float64")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", metavar="PATH", help="also write every figure to PATH")
    args = parser.parse_args(argv)
    if args.dtype == "float32":
        jax.config.update("jax_enable_x64", False)
    ensure_env()
    print(
        f"# bench_laplace_torch: {os.cpu_count()} CPUs, "
        f"{platform.processor() or platform.machine()}, jax {jax.__version__}, {args.dtype}"
    )
    split = ux.datasets.digits()
    results = []
    with tempfile.TemporaryDirectory() as workdir:
        results.append(run_size("small MLP", 50, 1, ["full", "diag", "kron"], split, args, workdir))
        # One full batch of 1,438 rows makes laplace-torch's diagonal GGN allocate 49.6 GB
        # for this network (measured: "DefaultCPUAllocator: can't allocate memory: you
        # tried to allocate 49628256000 bytes"), so its data loader uses batches of 128.
        results.append(run_size("MLP 300×300", 300, 2, ["diag", "kron"], split, args, workdir, 128))
    print("\nratio = laplace-torch time / unlearnx time (> 1: unlearnx is faster)")
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)
        print(f"wrote {args.json}")
    return results


if __name__ == "__main__":
    main()
