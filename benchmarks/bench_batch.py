"""Throughput of batched unlearning: `ux.batch.unlearn` against a Python loop.

    .venv/bin/python benchmarks/bench_batch.py [--quick] [--json PATH]

N independent single-row deletions, each applied to the same posterior, for
N = 10, 100, 1,000, 10,000:

1. Adult logistic regression (32,561 × 105 + intercept, float64, λ = 1), `second_order()`.
2. A small MLP (`MLPClassifier(64, 10, width=16, depth=1)`, d = 1,210) on scikit-learn's
   digits (1,797 × 64, float64, λ = 1), `second_order(damping=1.0)`.

Paths compared (requests are resolved beforehand for the loops; "end to end" includes
resolving the `Request` objects):

- `vmapped (woodbury)`: `ux.batch.unlearn`, the default: one compiled call per chunk,
  Woodbury solves against the shared Cholesky factor.
- `vmapped (plain)`: `ux.batch.unlearn(solver="plain")`: the same vmap, but forming and
  refactorising each request's precision (the naive batch).
- `loop (apply)`: a Python loop over the jitted single-request update (`unlearner.apply`
  returning the new posterior), one request per call, each edit padded to one row.
- `loop (same fn)`: a Python loop over the batched path's own per-request function
  compiled for a chunk of one request (identical arithmetic, so the ratio measures what
  batching saves: dispatch, and matrix-vector work turned into matrix-matrix work).

Loops are timed for N ≤ 1,000 (Adult) and N ≤ 100 (MLP, whose plain update factorises a
1,210 × 1,210 matrix twice per request), and `update` for N ≤ 100 and 10; larger N are
extrapolated linearly from the largest N timed, and marked so. The naive vmap is run on
Adult only (see the note at the MLP call). Every timing is the best of `--repeats` runs after a
warm-up call that compiles. Achieved FLOP/s uses XLA's cost analysis of the compiled
chunk function (flops per chunk / chunk size) and is compared with this machine's
measured float64 matmul rate (`jnp.dot` of 2,048 × 2,048 matrices, best of 5).
The machine may be shared: the load average is printed with the results.
"""

from __future__ import annotations

import argparse
import inspect
import json
import os
import platform
import sys
import time

import jax

jax.config.update("jax_enable_x64", True)

import equinox as eqx  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

import unlearnx as ux  # noqa: E402
from unlearnx._batch._vmap import (  # noqa: E402
    _Config,
    _run_chunk,
    _shared_factors,
    _stack,
    resolve_all,
)
from unlearnx._unlearn._base import Ledger, UnlearnState  # noqa: E402

NS = (10, 100, 1_000, 10_000)


# --------------------------------------------------------------------------------------
# Timing helpers


def best_of(fn, repeats: int) -> float:
    """Best wall time of `fn()` over `repeats` runs after one warm-up run."""
    jax.block_until_ready(fn())
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - t0)
    return min(times)


def matmul_peak(n: int = 2048, repeats: int = 5) -> float:
    """Measured float64 matmul rate (FLOP/s) of `jnp.dot` on this machine."""
    a = jax.random.normal(jax.random.key(0), (n, n), jnp.float64)
    b = jax.random.normal(jax.random.key(1), (n, n), jnp.float64)
    f = jax.jit(jnp.dot)
    return 2 * n**3 / best_of(lambda: f(a, b), repeats)


_FEATURES = "features" in inspect.signature(ux.AbstractUnlearner.apply).parameters


@eqx.filter_jit
def apply_one(unlearner, edit, state):
    """The single-request update (`apply`, with its in-graph fallback), posterior only.
    Row deletions pass `features=False` where `apply` has it (the fastest variant: the
    feature matrix is then not rewritten inside the call)."""
    kw = {"features": False} if _FEATURES else {}
    posterior, _, info = unlearner.apply(edit, state, **kw)
    return posterior.theta, info


def analytic_flops(d: int, m: int, damped: bool) -> float:
    """Matrix-product flops of one Woodbury request: `V = L⁻¹Uᵀ` (2d²m), `L⁻¹G` and
    `L⁻ᵀ(...)` (2d² each), and the same again against the damped factor."""
    one = 2 * d * d * m + 4 * d * d
    return one + (2 * d * d * m + 4 * d * d if damped else 0)


def chunk_flops(unlearner, post, data, hosts, cfg) -> float:
    """XLA's flop count of the compiled chunk function, per request."""
    edits = jax.tree.map(jnp.asarray, _stack(hosts))
    shared = _shared_factors(unlearner, post)
    compiled = _run_chunk.lower(unlearner, edits, post, data, None, shared, cfg).compile()
    cost = compiled.compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    return float(cost.get("flops", float("nan"))) / len(hosts)


# --------------------------------------------------------------------------------------
# One problem


def run_problem(name, post, data, unlearner, *, loop_max, plain_max, update_max, repeats, ns, peak):
    d = post.theta.shape[0]
    c = post.mean.n_outputs
    print(f"\n== {name}: n = {data.n:,}, d = {d:,}, {unlearner}")
    rng = np.random.default_rng(0)
    n_max = max(ns)
    # Requests are independent (each against the same posterior), so rows may repeat
    # across requests when there are fewer rows than requests (digits: 1,797).
    rows = rng.choice(data.n, size=n_max, replace=n_max > data.n)
    requests = [ux.forget_rows([int(r)]) for r in rows]
    hosts = resolve_all(requests, data, "bench")
    n_loop = min(n_max, loop_max)
    edits = [jax.tree.map(lambda a: jnp.asarray(a[0]), _stack([h])) for h in hosts[:n_loop]]
    single = [jax.tree.map(jnp.asarray, _stack([h])) for h in hosts[:n_loop]]
    ledger = Ledger(jnp.array(0, jnp.int32), jnp.zeros(data.n, jnp.int32))
    state = UnlearnState(post, data, ledger, unlearner.init_inner(post, data))
    cfg = _Config(False, False, "auto", False, None)
    shared = _shared_factors(unlearner, post)
    xla = chunk_flops(unlearner, post, data, hosts[:1024], cfg)
    damped = any(getattr(t, "damping", 0) for t in getattr(unlearner, "transforms", (unlearner,)))
    flops = analytic_flops(d, c, damped)
    print(
        f"  flops per request: {flops:,.0f} (matrix products, counted by hand); XLA's cost "
        f"analysis of the compiled chunk: {xla:,.0f}"
    )
    loops = {
        "loop_apply": (apply_one, lambda i: (unlearner, edits[i], state), loop_max),
        "loop_same_fn": (
            _run_chunk,
            lambda i: (unlearner, single[i], post, data, None, shared, cfg),
            loop_max,
        ),
        "loop_update": (
            lambda r: unlearner.update(r, state)[0].theta,
            lambda i: (requests[i],),
            update_max,
        ),
    }
    results, rate = [], {}
    for n in ns:
        row: dict = {"N": n}

        def vmapped(solver, n=n):
            return ux.batch.unlearn(post, data, requests[:n], unlearner=unlearner, solver=solver)

        row["vmapped_s"] = best_of(lambda: vmapped("woodbury").theta, repeats if n < 1000 else 1)
        res = vmapped("woodbury")
        row["vmapped_compute_s"] = float(res.seconds.sum())
        row["vmapped_rps"] = n / row["vmapped_s"]
        row["vmapped_compute_rps"] = n / row["vmapped_compute_s"]
        row["flops_per_s"] = flops * n / row["vmapped_compute_s"]
        row["peak_fraction"] = row["flops_per_s"] / peak
        if n <= plain_max:
            row["plain_vmapped_rps"] = n / best_of(lambda: vmapped("plain").theta, 1)
        for label, (fn, args, limit) in loops.items():
            if n <= limit:
                jax.block_until_ready(fn(*args(0)))  # compile

                def loop(n=n, fn=fn, args=args):
                    out = None
                    for i in range(n):
                        out = fn(*args(i))
                    return out

                rate[label] = n / best_of(loop, 1 if n >= 1000 else repeats)
                row[f"{label}_extrapolated"] = False
            else:
                row[f"{label}_extrapolated"] = True
            row[f"{label}_rps"] = rate[label]
            row[f"speedup_vs_{label}"] = row["vmapped_rps"] / rate[label]
            row[f"compute_speedup_vs_{label}"] = row["vmapped_compute_rps"] / rate[label]
        results.append(row)

        def star(label, row=row):
            return "*" if row[f"{label}_extrapolated"] else " "

        plain = f"{row['plain_vmapped_rps']:9,.0f}" if "plain_vmapped_rps" in row else " " * 9
        print(
            f"N={n:>6,} vmapped {row['vmapped_rps']:9,.0f} req/s (compute only "
            f"{row['vmapped_compute_rps']:9,.0f}) | plain vmap {plain} | loops: apply "
            f"{rate['loop_apply']:7,.0f}{star('loop_apply')} same fn "
            f"{rate['loop_same_fn']:7,.0f}{star('loop_same_fn')} update "
            f"{rate['loop_update']:6,.0f}{star('loop_update')} | "
            f"×{row['speedup_vs_loop_apply']:5,.0f} (compute "
            f"×{row['compute_speedup_vs_loop_apply']:5,.0f}) vs apply | "
            f"{row['flops_per_s'] / 1e9:5.1f} GFLOP/s = {100 * row['peak_fraction']:4.1f}% of peak"
        )
    print("  * extrapolated (linearly) from the largest N timed for that loop")
    return {"name": name, "d": d, "flops_per_request": flops, "xla_flops": xla, "rows": results}


def adult_problem():
    data = ux.datasets.adult().train
    model, info = ux.fit(ux.models.LogisticRegression(data.n_features), data, prior_precision=1.0)
    assert info.converged
    return data, ux.laplace(model, data, prior_precision=1.0)


def mlp_problem():
    from sklearn.datasets import load_digits

    X, y = load_digits(return_X_y=True)
    X = X / 16.0
    data = ux.Dataset(
        jnp.asarray(X),
        jnp.asarray(y, jnp.int32),
        jnp.ones(len(y)),
        {},
        tuple(f"px{i}" for i in range(64)),
        n_classes=10,
    )
    model = ux.models.MLPClassifier(64, 10, width=16, depth=1, key=jax.random.key(0))
    model, _ = ux.fit(model, data, prior_precision=1.0, solver="lbfgs", max_steps=300)
    return data, ux.laplace(model, data, prior_precision=1.0)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="N up to 1,000 only")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", metavar="PATH")
    args = parser.parse_args(argv)
    ns = NS[:3] if args.quick else NS
    t0 = time.perf_counter()
    peak = matmul_peak()
    load = os.getloadavg()
    print(
        f"JAX {jax.__version__} on {jax.default_backend()} ({os.cpu_count()} CPUs, "
        f"{platform.processor() or platform.machine()}), float64; load average "
        f"{load[0]:.1f}; measured matmul peak {peak / 1e9:.1f} GFLOP/s"
    )
    out = {"peak_flops": peak, "load_average": load, "jax": jax.__version__, "problems": []}
    data, post = adult_problem()
    out["problems"].append(
        run_problem(
            "Adult logistic regression",
            post,
            data,
            ux.second_order(),
            loop_max=1_000,
            plain_max=10_000,
            update_max=100,
            repeats=args.repeats,
            ns=ns,
            peak=peak,
        )
    )
    data, post = mlp_problem()
    out["problems"].append(
        run_problem(
            "digits MLP",
            post,
            data,
            ux.second_order(damping=1.0),
            loop_max=100,
            # The naive vmap (solver="plain") is not run here: vmapped LAPACK Cholesky
            # factorisations of 1,210 × 1,210 matrices deadlocked inside XLA on this
            # machine with multi-threaded OpenBLAS (they ran with OPENBLAS_NUM_THREADS=1).
            plain_max=0,
            update_max=10,
            repeats=args.repeats,
            ns=ns,
            peak=peak,
        )
    )
    out["total_seconds"] = time.perf_counter() - t0
    out["load_average_end"] = os.getloadavg()
    print(f"\nTotal {out['total_seconds']:.0f} s; load average at the end {os.getloadavg()[0]:.1f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
