"""Shift corrections after non-uniform deletions: quality, independence and time.

For each scenario (UCI Adult, German credit and the synthetic group generator; most of
one group forgotten, most of one group's positives forgotten, a feature removed while its
proxies stay) it compares

    none | second order | second order + independence (the Newton step alone, and with
    refine steps) | second order + reweight | retrain | retrain with the HSIC penalty

on the original test distribution: accuracy and NLL; HSIC(predicted probability, V) on
(at most 2,000 rows of) the test set with its gamma-approximation p-value
(`ux.hsic_test`); the accuracy of a probe (scikit-learn `LogisticRegression`, 5-fold CV on
the test set) predicting the attribute V from the model's output, beside the majority
rate; the relative parameter distance to the penalised retrain; and the wall time of the
update (median of `--repeats` warm runs: compilation excluded, reported separately).
Then it sweeps γ on the Adult feature-removal scenario and plots HSIC and accuracy
against γ (`--out`, default shift_tradeoff.png).

    .venv/bin/python benchmarks/bench_shift.py                 # about 3 minutes on 2 cores
    .venv/bin/python benchmarks/bench_shift.py --json results/shift.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time

import jax

jax.config.update("jax_enable_x64", True)

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

import unlearnx as ux  # noqa: E402
from unlearnx.hsic import CategoricalKernel  # noqa: E402

TEST_ROWS = 2000


def synthetic_split(seed: int = 0, n_train: int = 6000, n_test: int = 3000):
    """Train/test rows of `ux.datasets.synthetic_groups` (two groups, two proxies)."""
    data = ux.datasets.synthetic_groups(
        jax.random.key(seed), n=n_train + n_test, proxy_strength=1.5, shift=1.0
    )
    idx = np.arange(data.n)
    return ux.DatasetSplit(
        data.subset(idx < n_train),
        data.subset(idx >= n_train),
        "synthetic",
        "ux.datasets.synthetic_groups(n=9000, proxy_strength=1.5), first 6,000 rows train",
    )


def scenarios(name, split):
    S = ux.scenarios
    if name == "adult":
        return [
            S.group_deletion(split, "sex", "Female", 0.8),
            S.label_group_deletion(split, "sex", "Female", 1, 0.8),
            S.feature_with_proxies(split, "sex"),
        ]
    if name == "german":
        return [
            S.group_deletion(split, "sex", "female", 0.8),
            S.label_group_deletion(split, "sex", "female", 1, 0.8),
            S.feature_with_proxies(split, "personal_status_sex", attribute="sex"),
        ]
    return [
        S.group_deletion(split, "group", "g1", 0.8),
        S.label_group_deletion(split, "group", "g1", 1, 0.8),
        S.feature_with_proxies(split, "group"),
    ]


def _timed(fn, repeats):
    """(result, compile+first run seconds, median warm seconds)."""
    t = time.perf_counter()
    out = jax.block_until_ready(fn())
    first = time.perf_counter() - t
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        out = jax.block_until_ready(fn())
        times.append(time.perf_counter() - t)
    return out, first, statistics.median(times)


def evaluate(post, test, attribute, key):
    """Test metrics of a posterior's mean model."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import cross_val_score

    model = post.mean
    idx = np.linspace(0, test.n - 1, min(TEST_ROWS, test.n)).astype(int)
    V = np.asarray(test.attribute(attribute))
    logits = np.asarray(jax.vmap(model)(test.X)[:, 0])
    probs = jax.nn.sigmoid(jnp.asarray(logits[idx]))
    res = ux.hsic_test(probs, V[idx], kernel_y=CategoricalKernel(), method="gamma")
    probe = cross_val_score(LogisticRegression(), logits[:, None], V, cv=5).mean()
    return {
        "accuracy": float(ux.metrics.accuracy(model, test)),
        "nll": float(ux.metrics.nll(model, test)),
        "hsic": float(res.statistic),
        "p_value": float(res.p_value),
        "probe": float(probe),
        "chance": float(np.max(np.bincount(V[V >= 0])) / np.sum(V >= 0)),
    }


def run_scenario(split, scenario, gamma, refine_steps, repeats, key, lbfgs=False):
    train, test = split.train, split.test
    model, _ = ux.fit(ux.models.LogisticRegression(train.n_features), train)
    post = ux.laplace(model, train)
    a, request = scenario.attribute, scenario.request
    methods = {
        "none": ux.identity(),
        "second order": ux.second_order(),
        f"+ independence (γ={gamma:g}, Newton step)": ux.chain(
            ux.second_order(), ux.independence(a, gamma)
        ),
        f"+ independence (γ={gamma:g}, {refine_steps} refine)": ux.chain(
            ux.second_order(), ux.independence(a, gamma, refine_steps=refine_steps)
        ),
        f"+ reweight ({refine_steps} refine)": ux.chain(
            ux.second_order(), ux.reweight(a, refine_steps=refine_steps)
        ),
    }
    rows = {}
    for label, unlearner in methods.items():
        state = unlearner.init(post, train)
        out, first, warm = _timed(lambda u=unlearner, s=state: u.update(request, s)[0], repeats)
        rows[label] = (out, first, warm)
    rows["retrain"] = _timed(lambda: ux.retrain(post, train, request), repeats)
    rows[f"retrain with penalty (γ={gamma:g})"] = _timed(
        lambda: ux.retrain_independent(post, train, request, a, gamma), repeats
    )
    exact = rows[f"retrain with penalty (γ={gamma:g})"][0]
    rows["  the same, Newton from zeros"] = _timed(
        lambda: ux.retrain_independent(post, train, request, a, gamma, warm=False), repeats
    )
    if lbfgs:
        # What a generic training loop would run: L-BFGS from scratch (one timed run).
        rows["  the same, L-BFGS from zeros"] = _timed(
            lambda: ux.retrain_independent(
                post, train, request, a, gamma, warm=False, solver="lbfgs"
            ),
            1,
        )
    table = []
    for label, (out, first, warm) in rows.items():
        m = evaluate(out, test, a, key)
        m.update(
            method=label,
            distance_to_penalised=float(ux.metrics.distance(out, exact)),
            first_s=first,
            warm_s=warm,
        )
        table.append(m)
    return table


def print_table(title, description, table):
    print(f"\n## {title}\n{description}")
    head = (
        f"{'method':<40} {'acc':>6} {'nll':>6} {'HSIC':>9} {'p':>7} {'probe':>6} "
        f"{'dist':>8} {'warm ms':>9} {'1st s':>6}"
    )
    print(head)
    print("-" * len(head))
    for r in table:
        print(
            f"{r['method']:<40} {r['accuracy']:6.4f} {r['nll']:6.3f} {r['hsic']:9.2e} "
            f"{r['p_value']:7.1e} {r['probe']:6.3f} {r['distance_to_penalised']:8.1e} "
            f"{r['warm_s'] * 1e3:9.1f} {r['first_s']:6.2f}"
        )
    print(f"(probe chance level: {table[0]['chance']:.3f})")


def sweep(split, scenario, gammas, refine_steps):
    """HSIC and accuracy against γ: independence (refined) and the penalised retrain."""
    train, test = split.train, split.test
    model, _ = ux.fit(ux.models.LogisticRegression(train.n_features), train)
    post = ux.laplace(model, train)
    a = scenario.attribute
    out = {"gamma": list(gammas), "independence": [], "retrain": []}
    for g in gammas:
        u = ux.chain(ux.second_order(), ux.independence(a, g, refine_steps=refine_steps))
        fast = u.update(scenario.request, u.init(post, train))[0]
        exact = ux.retrain_independent(post, train, scenario.request, a, g)
        for name, p in (("independence", fast), ("retrain", exact)):
            m = evaluate(p, test, a, None)
            out[name].append({"hsic": m["hsic"], "accuracy": m["accuracy"]})
        print(
            f"γ = {g:6g}: HSIC {out['independence'][-1]['hsic']:.2e} (retrain "
            f"{out['retrain'][-1]['hsic']:.2e}), accuracy "
            f"{out['independence'][-1]['accuracy']:.4f} (retrain "
            f"{out['retrain'][-1]['accuracy']:.4f})"
        )
    return out


def plot(curve, title, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    g = np.asarray(curve["gamma"], float)
    x = np.where(g > 0, g, np.min(g[g > 0]) / 3)  # γ = 0 drawn at the left edge
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    for name, style in (("independence", "o-"), ("retrain", "s--")):
        ax1.plot(x, [r["hsic"] for r in curve[name]], style, label=name)
        ax2.plot(x, [100 * r["accuracy"] for r in curve[name]], style, label=name)
    for ax in (ax1, ax2):
        ax.set_xscale("log")
        ax.set_xlabel("γ (0 at the left edge)")
        ax.grid(alpha=0.3)
        ax.legend()
    ax1.set_yscale("log")
    ax1.set_ylabel("HSIC(prediction, attribute), test")
    ax2.set_ylabel("test accuracy (%)")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"wrote {path}")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--gamma", type=float, default=3.0, help="γ of the independence rows")
    parser.add_argument("--refine", type=int, default=10, help="refine steps of the corrections")
    parser.add_argument("--repeats", type=int, default=3, help="warm runs per timing")
    parser.add_argument("--out", default="shift_tradeoff.png", help="where to save the plot")
    parser.add_argument("--json", metavar="PATH", help="also write every figure to PATH")
    parser.add_argument(
        "--datasets", nargs="+", default=["adult", "german", "synthetic"], help="which data"
    )
    parser.add_argument("--no-sweep", action="store_true", help="skip the γ sweep and plot")
    args = parser.parse_args(argv)

    t0 = time.perf_counter()
    print(
        f"# bench_shift: {os.cpu_count()} CPUs, {platform.processor() or platform.machine()}, "
        f"jax {jax.__version__} ({jax.default_backend()}), float64"
    )
    loaders = {
        "adult": ux.datasets.adult,
        "german": ux.datasets.german,
        "synthetic": synthetic_split,
    }
    results = {"gamma": args.gamma, "refine_steps": args.refine, "scenarios": []}
    key = jax.random.key(0)
    for name in args.datasets:
        split = loaders[name]()
        listed = scenarios(name, split)
        for i, scenario in enumerate(listed):
            # The feature-with-proxies scenario (listed last) on Adult is the must-show.
            lbfgs = name == "adult" and i == len(listed) - 1
            table = run_scenario(split, scenario, args.gamma, args.refine, args.repeats, key, lbfgs)
            print_table(scenario.name, scenario.description, table)
            results["scenarios"].append({"name": scenario.name, "rows": table})
    if not args.no_sweep:
        split = ux.datasets.adult()
        scenario = ux.scenarios.feature_with_proxies(split, "sex")
        print(f"\n## γ sweep: {scenario.name}")
        curve = sweep(split, scenario, [0.0, 0.3, 1.0, 3.0, 10.0, 30.0], args.refine)
        results["sweep"] = curve
        plot(curve, scenario.name, args.out)
    print(f"\ntotal {time.perf_counter() - t0:.0f} s")
    if args.json:
        folder = os.path.dirname(os.path.abspath(args.json))
        os.makedirs(folder, exist_ok=True)
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)
        print(f"wrote {args.json}")
    return results


if __name__ == "__main__":
    main()
