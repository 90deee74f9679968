"""Unlearning one deletion request on Adult, against exact retraining (JAX and scikit-learn).

    .venv/bin/python benchmarks/bench_adult.py [--repeats N] [--json PATH]

Float64 throughout. Every timing is the median of `--repeats` runs after one warm-up call
(which compiles), each run ending in `jax.block_until_ready`. See benchmarks/README.md for
what each figure means. Sections:

1. The Adult request (half of the female positives, ~589 rows): second-order unlearning
   (`update`, jitted `apply`, and the jitted posterior step alone) against warm-started
   exact retraining in JAX and a scikit-learn `newton-cholesky` refit; refinement steps
   and their distance to exact retraining.
2. Cost of one request as the number of edited rows k grows (rank-one Cholesky updates
   against refactorisation), and as the number of rows n grows at fixed k.
3. The crossover between rank-one updates and refactorisation on synthetic precisions,
   which sets the cost rule of `second_order(method="auto")`.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from typing import Any

import jax

jax.config.update("jax_enable_x64", True)

import equinox as eqx  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import sklearn  # noqa: E402
from sklearn.linear_model import LogisticRegression as SkLogisticRegression  # noqa: E402
from threadpoolctl import threadpool_limits  # noqa: E402

import unlearnx as ux  # noqa: E402
from unlearnx._curvature._precision import _use_rank_updates  # noqa: E402
from unlearnx._fit import _newton  # noqa: E402  (the jitted Newton loop that `fit` runs)
from unlearnx._models._base import ravel  # noqa: E402
from unlearnx._unlearn._base import Context  # noqa: E402

LAM = 1.0  # prior precision λ (sum form); scikit-learn's C = 1/λ
METHODS = ("auto", "rank_update", "refactor")


# ---------------------------------------------------------------------------------------
# Timing


def timeit(fn: Callable[..., Any], *args: Any, repeats: int, **kwargs: Any) -> dict:
    """Median, min and max wall time (seconds) of `fn(*args, **kwargs)` over `repeats`
    runs after one warm-up call (which compiles and fills caches); every run blocks until
    all of its results are ready."""

    def once():
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args, **kwargs))
        return time.perf_counter() - t0

    once()
    runs = [once() for _ in range(repeats)]
    return {
        "median_s": statistics.median(runs),
        "min_s": min(runs),
        "max_s": max(runs),
        "repeats": repeats,
    }


def ms(t: dict) -> str:
    return f"{1e3 * t['median_s']:10.3f}"


def rule(width: int = 96) -> None:
    print("-" * width)


# ---------------------------------------------------------------------------------------
# Jitted pieces. The unlearner is an argument (its settings are static under filter_jit),
# so one function serves every transform and compiles once per transform and shape.


@eqx.filter_jit
def apply_jit(unlearner, edit, state):
    """`unlearner.apply` on a pre-resolved row deletion (`features=False`): the posterior
    update plus the new weights and ledger. The new state's `X` is not returned: returning
    the 26 MB feature matrix from `jit` copies it, which `update` also avoids."""
    posterior, new_state, _ = unlearner.apply(edit, state, features=False)
    return posterior, new_state.data.weights, new_state.ledger


@eqx.filter_jit
def step_jit(unlearner, edit, old, new, posterior, inner):
    """The posterior step alone, the edited dataset `new` being built beforehand."""
    return unlearner.step(Context(edit, old, new, posterior), posterior, inner)[0]


@eqx.filter_jit
def factor_update_jit(precision, add, remove, method):
    return precision.factor_update(add, remove, method)


# ---------------------------------------------------------------------------------------
# Set-up


def machine_info() -> dict:
    cpu_model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu_model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:
        usable = os.cpu_count()
    return {
        "cpu_count": os.cpu_count(),
        "cpus_usable": usable,
        "cpu_model": cpu_model,
        "platform": platform.platform(),
        "python": sys.version.split()[0],
        "jax": jax.__version__,
        "jaxlib": getattr(jax.lib, "__version__", None) or _version("jaxlib"),
        "equinox": eqx.__version__,
        "numpy": np.__version__,
        "scikit_learn": sklearn.__version__,
        "unlearnx": ux.__version__,
        "backend": jax.default_backend(),
        "devices": [str(d) for d in jax.devices()],
        "x64": bool(jax.config.jax_enable_x64),
        "loadavg_start": _loadavg(),
    }


def _version(pkg: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(pkg)
    except PackageNotFoundError:
        return None


def _loadavg() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def fit_posterior(data: ux.Dataset) -> ux.LaplacePosterior:
    model = ux.models.LogisticRegression(data.n_features)
    model, info = ux.fit(model, data, prior_precision=LAM)
    if not info.converged:
        raise RuntimeError(f"bench_adult: the MAP fit did not converge: {info}")
    return ux.laplace(model, data, prior_precision=LAM)


def concat_rows(data: ux.Dataset, times: int) -> ux.Dataset:
    """`data` with its rows repeated `times` times (a larger dataset of the same kind)."""
    return jax.tree_util.tree_map(lambda a: jnp.concatenate([a] * times), data)


def exactly_retrained_theta(post: ux.LaplacePosterior) -> np.ndarray:
    return np.asarray(ravel(post.mean)[0])


# ---------------------------------------------------------------------------------------
# Section 1: the Adult request


def section_adult(train: ux.Dataset, post: ux.LaplacePosterior, repeats: int) -> dict:
    sex = np.asarray(train.attribute("sex"))
    female = train.attribute_levels("sex").index("Female")
    y = np.asarray(train.y)
    candidates = np.flatnonzero((sex == female) & (y == 1))
    rows = np.sort(np.random.default_rng(0).choice(candidates, len(candidates) // 2, replace=False))
    request = ux.forget_rows(rows)
    edit = request.resolve(train)
    new = edit.apply(train)
    k = len(rows)
    print(
        f"Request: forget {k} of the {len(candidates)} rows with sex == Female and y == 1 "
        f"(seed 0); padded to a bucket of {edit.size}."
    )

    out: dict[str, Any] = {"k": k, "bucket": edit.size, "candidates": len(candidates)}
    t: dict[str, dict] = {}

    # Exact retraining in JAX (warm start from the current mean): the whole public call,
    # then its two parts (Newton refit, Laplace precision) alone.
    exact = ux.retrain(post, train, request)
    t["retrain"] = timeit(ux.retrain, post, train, request, repeats=repeats)
    theta0, unravel = ravel(post.mean)
    lam = jnp.asarray(LAM, theta0.dtype)
    tol = 1e-10  # fit's float64 default
    newton = _newton(theta0, unravel, new, lam, tol, 100)
    out["newton_iterations"] = int(newton[3])
    t["newton_refit"] = timeit(_newton, theta0, unravel, new, lam, tol, 100, repeats=repeats)
    t["laplace_refit"] = timeit(ux.laplace, exact.mean, new, prior_precision=LAM, repeats=repeats)
    theta_exact = exactly_retrained_theta(exact)

    # scikit-learn refit from scratch on the retained rows, intercept as a penalised
    # column of ones so that its objective is ours (newton-cholesky has no warm start).
    keep = np.asarray(new.weights) > 0
    X_keep = np.hstack([np.asarray(train.X)[keep], np.ones((int(keep.sum()), 1))])
    y_keep = y[keep]
    w_keep = np.asarray(train.weights)[keep]

    def sk_fit():
        clf = SkLogisticRegression(
            solver="newton-cholesky", C=1.0 / LAM, fit_intercept=False, tol=1e-8, max_iter=100
        )
        return clf.fit(X_keep, y_keep, sample_weight=w_keep)

    clf = sk_fit()
    t["sklearn_refit_default_threads"] = timeit(sk_fit, repeats=repeats)
    # OpenBLAS' threads spin-wait: on a busy machine one thread is often faster and
    # always steadier. The better of the two is the baseline.
    with threadpool_limits(1):
        t["sklearn_refit_1_thread"] = timeit(sk_fit, repeats=repeats)
    t["sklearn_refit"] = min(
        t["sklearn_refit_default_threads"], t["sklearn_refit_1_thread"], key=lambda x: x["median_s"]
    )
    sk_theta = clf.coef_[0]
    out["sklearn_n_iter"] = int(clf.n_iter_[0])
    out["sklearn_vs_exact_rel_distance"] = float(
        np.linalg.norm(sk_theta - theta_exact) / np.linalg.norm(theta_exact)
    )

    # Second-order unlearning: full update, jitted apply on the pre-resolved edit, and the
    # posterior step alone.
    so = ux.second_order()
    state = so.init(post, train)
    t["update"] = timeit(so.update, request, state, repeats=repeats)
    t["apply"] = timeit(apply_jit, so, edit, state, repeats=repeats)
    t["step"] = timeit(step_jit, so, edit, train, new, post, state.inner, repeats=repeats)

    # Refinement: chord steps after the Newton step.
    dist: dict[str, dict] = {}
    dist["none"] = {
        "rel_distance": float(ux.metrics.distance(post, exact)),
        "closed": 0.0,
    }
    variants = {"second_order": so}
    for steps in (1, 2, 4, 8):
        variants[f"second_order+refine({steps})"] = ux.chain(so, ux.refine(steps=steps))
    for name, u in variants.items():
        st = u.init(post, train)
        p2 = apply_jit(u, edit, st)[0]
        dist[name] = {
            "rel_distance": float(ux.metrics.distance(p2, exact)),
            "closed": float(ux.metrics.distance_closed(post, p2, exact)),
        }
        if name != "second_order":
            t[f"apply:{name}"] = timeit(apply_jit, u, edit, st, repeats=repeats)
    t["apply:second_order"] = t["apply"]
    out["timings"] = t
    out["distance_to_exact"] = dist

    # Ratios: retraining time over unlearning time.
    ratios = {}
    for unl in ("update", "apply", "step"):
        for base in ("retrain", "newton_refit", "sklearn_refit"):
            ratios[f"{base}/{unl}"] = t[base]["median_s"] / t[unl]["median_s"]
    out["ratios"] = ratios

    # Print.
    rule()
    print(f"{'1. Adult request':<52}{'median ms':>10}{'min ms':>10}  {'rel. dist. to exact':>20}")
    rule()
    rows_out = [
        ("unlearn: second_order update (resolve + checks)", "update", "second_order"),
        ("unlearn: second_order apply (jit, pre-resolved)", "apply", "second_order"),
        ("unlearn: second_order step only (jit)", "step", "second_order"),
    ]
    for steps in (1, 2, 4, 8):
        name = f"second_order+refine({steps})"
        rows_out.append((f"unlearn: {name} apply (jit)", f"apply:{name}", name))
    rows_out += [
        ("retrain: ux.retrain (warm Newton + Laplace)", "retrain", None),
        (
            f"retrain:   Newton refit only (jit, {out['newton_iterations']} it.)",
            "newton_refit",
            None,
        ),  # noqa: E501
        ("retrain:   Laplace precision only", "laplace_refit", None),
        (
            f"retrain: sklearn newton-cholesky, cold ({out['sklearn_n_iter']} it.)",
            "sklearn_refit_default_threads",
            None,
        ),
        ("retrain:   the same, BLAS limited to 1 thread", "sklearn_refit_1_thread", None),
    ]
    for label, key, dkey in rows_out:
        d = f"{dist[dkey]['rel_distance']:20.2e}" if dkey else " " * 20
        print(f"{label:<52}{ms(t[key])}{1e3 * t[key]['min_s']:10.3f}  {d}")
    print(f"{'no update (the original posterior)':<72}  {dist['none']['rel_distance']:20.2e}")
    print(
        f"scikit-learn's solution vs ux.retrain: relative distance "
        f"{out['sklearn_vs_exact_rel_distance']:.1e}"
    )
    rule()
    print("Speed-up (retraining median / unlearning median); target ≥ 100×:")
    print(f"{'':<26}{'ux.retrain':>14}{'Newton only':>14}{'sklearn (best)':>15}")
    for unl, label in (("update", "update"), ("apply", "apply (jit)"), ("step", "step only")):
        r = [ratios[f"{b}/{unl}"] for b in ("retrain", "newton_refit", "sklearn_refit")]
        print(f"  {label:<24}" + "".join(f"{x:13.0f}×" for x in r))
    print("Refinement: share of the distance to exact retraining that each closes:")
    for name in variants:
        print(f"  {name:<30}{100 * dist[name]['closed']:7.2f} %")
    return out


# ---------------------------------------------------------------------------------------
# Section 2: cost as k and n grow


def section_scaling(train: ux.Dataset, post: ux.LaplacePosterior, repeats: int) -> dict:
    d = ravel(post.mean)[0].shape[0]
    out: dict[str, Any] = {"d": d, "k": {}, "n": {}}
    unlearners = {m: ux.second_order(method=m) for m in METHODS}
    state = unlearners["auto"].init(post, train)

    rule()
    print(f"2a. Cost of one request as k grows (n = {train.n:,}, d = {d}; jitted apply, ms)")
    rule()
    header = f"{'k':>6}{'bucket':>8}{'m=2·bucket':>12}"
    header += "".join(f"{m:>13}" for m in METHODS) + f"{'auto picks':>13}{'faster':>13}"
    print(header)
    for k in (10, 100, 1000):
        rows = np.random.default_rng(0).choice(train.n, k, replace=False)
        edit = ux.forget_rows(rows).resolve(train)
        m = 2 * edit.size
        times = {
            meth: timeit(apply_jit, u, edit, state, repeats=repeats)
            for meth, u in unlearners.items()
        }
        picks = "rank_update" if _use_rank_updates(m, d, "auto") else "refactor"
        faster = min(("rank_update", "refactor"), key=lambda x: times[x]["median_s"])
        out["k"][str(k)] = {"bucket": edit.size, "m": m, "picks": picks, "faster": faster}
        out["k"][str(k)].update({meth: times[meth] for meth in METHODS})
        line = f"{k:>6}{edit.size:>8}{m:>12}" + "".join(
            f"{1e3 * times[meth]['median_s']:13.3f}" for meth in METHODS
        )
        print(line + f"{picks:>13}{faster:>13}")

    rule()
    print("2b. Cost of one request (k = 100, method auto) as n grows (ms)")
    rule()
    print(f"{'n':>8}{'apply (jit)':>14}{'step only':>14}{'ux.retrain':>14}")
    datasets = {
        train.n // 2: train.subset(np.arange(train.n // 2)),
        train.n: train,
        2 * train.n: concat_rows(train, 2),
    }
    so = unlearners["auto"]
    for n, data in datasets.items():
        p = post if data is train else fit_posterior(data)
        st = so.init(p, data)
        rows = np.random.default_rng(0).choice(n, 100, replace=False)
        request = ux.forget_rows(rows)
        edit = request.resolve(data)
        new = edit.apply(data)
        t_apply = timeit(apply_jit, so, edit, st, repeats=repeats)
        t_step = timeit(step_jit, so, edit, data, new, p, None, repeats=repeats)
        t_retrain = timeit(ux.retrain, p, data, request, repeats=repeats)
        out["n"][str(n)] = {"apply": t_apply, "step": t_step, "retrain": t_retrain}
        print(f"{n:>8,}{ms(t_apply):>14}{ms(t_step):>14}{ms(t_retrain):>14}")
    return out


# ---------------------------------------------------------------------------------------
# Section 3: where rank-one updates beat refactorisation


def section_crossover(dims: tuple[int, ...], ms_: tuple[int, ...], repeats: int) -> dict:
    """`factor_update` with `m` non-zero downdates of a `d × d` factor, by rank-one
    updates and by refactorisation.

    JAX's CPU Cholesky calls LAPACK from scipy's OpenBLAS, whose threads spin-wait: on a
    shared machine its timings scatter by 10-100× (a steady 230 ms for a 1 ms
    factorisation at d = 400 was seen), so this section limits BLAS to one thread, the
    steady cost. "faster" compares the best runs, the cost without interference."""
    rule()
    print(
        "3. Rank-one updates vs refactorisation: m non-zero downdates of a d × d factor "
        "(factor_update, jit, BLAS on 1 thread, ms)"
    )
    rule()
    print(
        f"{'d':>6}{'m':>6}{'rank_update':>14}{'refactor':>14}{'rank min':>10}{'ref. min':>10}"
        f"{'faster':>13}{'auto picks':>13}"
    )
    out: dict[str, Any] = {}
    for d in dims:
        rng = np.random.default_rng(0)
        A = rng.normal(size=(2 * d, d))
        P, _ = ux.DensePrecision.from_matrix(jnp.asarray(A.T @ A + d * np.eye(d)))
        add = jnp.zeros((0, d))
        crossover = 0
        out[str(d)] = {}
        for m in ms_:
            remove = jnp.asarray(0.1 * rng.normal(size=(m, d)))
            with threadpool_limits(1):
                tr = timeit(factor_update_jit, P, add, remove, "rank_update", repeats=repeats)
                tf = timeit(factor_update_jit, P, add, remove, "refactor", repeats=repeats)
            faster = "rank_update" if tr["min_s"] < tf["min_s"] else "refactor"
            picks = "rank_update" if _use_rank_updates(m, d, "auto") else "refactor"
            if faster == "rank_update":
                crossover = m
            out[str(d)][str(m)] = {"rank_update": tr, "refactor": tf}
            out[str(d)][str(m)].update(faster=faster, picks=picks)
            mins = f"{1e3 * tr['min_s']:10.3f}{1e3 * tf['min_s']:10.3f}"
            print(f"{d:>6}{m:>6}{ms(tr):>14}{ms(tf):>14}{mins}{faster:>13}{picks:>13}")
            if tr["min_s"] > 3 * tf["min_s"]:
                break  # rank updates only get slower with m: stop here
        out[str(d)]["largest_m_rank_faster"] = crossover
        print(f"{'':>6}largest m with rank updates faster at d = {d}: {crossover}")
    return out


# ---------------------------------------------------------------------------------------


def write_json(path: str, payload: dict) -> None:
    """Write `payload` to `path` atomically (a temporary file in the same folder, then a
    rename), so a reader never sees half a file."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".bench_adult.", suffix=".json", dir=folder)
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(payload, f, indent=2, sort_keys=True)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--repeats", type=int, default=9, help="timed runs per figure (after a warm-up); ≥ 7"
    )
    parser.add_argument("--json", metavar="PATH", help="also write every figure to PATH")
    parser.add_argument(
        "--crossover-dims",
        type=int,
        nargs="+",
        default=[106, 400, 1000, 2000],
        help="precision sizes d for section 3",
    )
    args = parser.parse_args(argv)
    if args.repeats < 1:
        parser.error("--repeats must be ≥ 1 (use ≥ 7 for figures worth quoting)")

    start = time.perf_counter()
    info = machine_info()
    print(
        f"unlearnx {info['unlearnx']} benchmark on Adult — float64, medians of {args.repeats} "
        f"runs after a warm-up"
    )
    print(
        f"machine: {info['cpu_count']} CPUs ({info['cpus_usable']} usable), {info['cpu_model']}; "
        f"{info['platform']}"
    )
    print(
        f"jax {info['jax']} (jaxlib {info['jaxlib']}), backend {info['backend']}, devices "
        f"{', '.join(info['devices'])}; numpy {info['numpy']}, scikit-learn "
        f"{info['scikit_learn']}, python {info['python']}; load average {info['loadavg_start']}"
    )

    t0 = time.perf_counter()
    train = ux.datasets.adult().train
    post = fit_posterior(train)
    d = ravel(post.mean)[0].shape[0]
    setup_s = time.perf_counter() - t0
    print(
        f"Adult train: n = {train.n:,} rows, p = {train.n_features} features, d = {d} "
        f"parameters (with intercept), λ = {LAM:g}; load + fit + Laplace {setup_s:.1f} s "
        f"(including compilation)"
    )

    results: dict[str, Any] = {"machine": info, "lambda": LAM, "n": train.n, "d": d}
    sections = {
        "adult_request": lambda: section_adult(train, post, args.repeats),
        "scaling": lambda: section_scaling(train, post, args.repeats),
        "crossover": lambda: section_crossover(
            tuple(args.crossover_dims), (1, 2, 4, 8, 16, 32, 64), args.repeats
        ),
    }
    results["section_s"] = {}
    for name, run in sections.items():
        t0 = time.perf_counter()
        results[name] = run()
        results["section_s"][name] = time.perf_counter() - t0
        print(f"({name}: {results['section_s'][name]:.0f} s)")
    results["machine"]["loadavg_end"] = _loadavg()
    results["total_s"] = time.perf_counter() - start
    rule()
    print(f"total {results['total_s']:.0f} s; load average at the end {_loadavg()}")
    if args.json:
        write_json(args.json, results)
        print(f"wrote {args.json}")
    return results


if __name__ == "__main__":
    main()
