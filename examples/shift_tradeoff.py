"""Remove `sex` from UCI Adult while its proxies stay, and trade accuracy for independence.

Blanking the feature `sex` (`forget_features`) does not make the model's predictions
independent of sex: relationship (Husband/Wife), marital status and occupation still carry
it. The independence correction, a Newton step on `L(θ; D') + γ·n'·HSIC(f_θ(X'), sex)`
after the second-order update, trades test accuracy for less dependence as `γ` grows.
The script prints HSIC(predicted probability, sex) on the test set, its p-value and the
test accuracy for a range of `γ`, for the refined correction and for exact retraining on
the penalised objective, and plots both against `γ` to `--out`.

    python examples/shift_tradeoff.py --out shift_tradeoff.png
    python examples/shift_tradeoff.py --small   # a 4,000-row subset, for tests
"""

from __future__ import annotations

import argparse
import time

import jax
import numpy as np

jax.config.update("jax_enable_x64", True)

import unlearnx as ux  # noqa: E402
from unlearnx.hsic import CategoricalKernel  # noqa: E402


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="shift_tradeoff.png", help="where to save the plot")
    parser.add_argument("--refine", type=int, default=10, help="refine steps of the correction")
    parser.add_argument("--small", action="store_true", help="tiny and fast (for tests)")
    args = parser.parse_args(argv)

    split = ux.datasets.adult()
    train, test = split.train, split.test
    gammas = [0.0, 0.3, 1.0, 3.0, 10.0, 30.0]
    if args.small:
        train = train.subset(np.arange(4000))
        test = test.subset(np.arange(2000))
        gammas = [0.0, 1.0, 10.0]
    scenario = ux.scenarios.feature_with_proxies(train, "sex")
    print(scenario.description)

    model, _ = ux.fit(ux.models.LogisticRegression(train.n_features), train)
    post = ux.laplace(model, train)
    idx = np.linspace(0, test.n - 1, min(2000, test.n)).astype(int)
    X, sex = test.X[idx], test.attribute("sex")[idx]

    def score(p):
        probs = jax.nn.sigmoid(jax.vmap(p.mean)(X)[:, 0])
        res = ux.hsic_test(probs, sex, kernel_y=CategoricalKernel(), method="gamma")
        return float(res.statistic), float(res.p_value), float(ux.metrics.accuracy(p.mean, test))

    rows = {"independence": [], "retrain": []}
    print(f"{'γ':>6}  {'method':<13} {'HSIC':>9} {'p-value':>8} {'accuracy':>8} {'time':>7}")
    for g in gammas:
        u = ux.chain(ux.second_order(), ux.independence("sex", g, refine_steps=args.refine))
        state = u.init(post, train)
        t0 = time.perf_counter()
        fast = jax.block_until_ready(u.update(scenario.request, state)[0])
        t1 = time.perf_counter()
        exact = ux.retrain_independent(post, train, scenario.request, "sex", g)
        t2 = time.perf_counter()
        for name, p, t in (("independence", fast, t1 - t0), ("retrain", exact, t2 - t1)):
            h, pv, acc = score(p)
            rows[name].append((h, acc))
            print(f"{g:6g}  {name:<13} {h:9.2e} {pv:8.1e} {acc:8.4f} {t:6.2f}s")
        print(
            f"{'':6}  relative distance to the penalised retrain: "
            f"{float(ux.metrics.distance(fast, exact)):.1e}"
        )

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    g = np.asarray(gammas, float)
    x = np.where(g > 0, g, g[g > 0].min() / 3)  # γ = 0 at the left edge of the log axis
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    for name, style in (("independence", "o-"), ("retrain", "s--")):
        ax1.plot(x, [h for h, _ in rows[name]], style, label=name)
        ax2.plot(x, [100 * a for _, a in rows[name]], style, label=name)
    for ax in (ax1, ax2):
        ax.set_xscale("log")
        ax.set_xlabel("γ (γ = 0 at the left edge)")
        ax.grid(alpha=0.3)
        ax.legend()
    ax1.set_yscale("log")
    ax1.set_ylabel("HSIC(predicted probability, sex), test")
    ax2.set_ylabel("test accuracy (%)")
    fig.suptitle(scenario.name)
    fig.tight_layout()
    fig.savefig(args.out, dpi=120)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
