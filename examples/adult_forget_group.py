"""Forget most of one group on UCI Adult, and watch chord steps close the gap to retraining.

The request removes 80% of the positive-label women from the training data: a strongly
non-uniform deletion, so the retained data is shifted and one Newton (influence) step
closes only part of the distance to exact retraining. Chord steps
`θ ← θ − Λ'⁻¹ ∇L(θ; D')` reuse the downdated precision's factor and shrink the rest
geometrically. The script prints the relative parameter distance to retraining after
0, 1, 2, ... refine steps and plots it (log scale) to `--out`.

    python examples/adult_forget_group.py --out adult_refine.png
    python examples/adult_forget_group.py --small   # a 3,000-row subset, for tests
"""

from __future__ import annotations

import argparse
import time

import jax
import numpy as np

jax.config.update("jax_enable_x64", True)

import unlearnx as ux  # noqa: E402


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="adult_refine.png", help="where to save the plot")
    parser.add_argument("--fraction", type=float, default=0.8, help="share of the group forgotten")
    parser.add_argument("--max-steps", type=int, default=8, help="largest number of refine steps")
    parser.add_argument("--small", action="store_true", help="tiny and fast (for tests)")
    args = parser.parse_args(argv)

    data = ux.datasets.adult()
    train = data.train
    max_steps = args.max_steps
    if args.small:
        train = train.subset(np.arange(3000))
        max_steps = min(max_steps, 3)

    model, _ = ux.fit(ux.models.LogisticRegression(train.n_features), train, prior_precision=1.0)
    post = ux.laplace(model, train, prior_precision=1.0)

    # The request: most of the women with income >50K.
    sex, y = np.asarray(train.attribute("sex")), np.asarray(train.y)
    female = train.attribute_levels("sex").index("Female")
    group = np.flatnonzero((sex == female) & (y == 1))
    rng = np.random.default_rng(0)
    rows = rng.choice(group, size=int(args.fraction * len(group)), replace=False)
    request = ux.forget_rows(rows)
    print(f"forgetting {len(rows)} of {len(group)} positive-label women ({train.n} rows)")

    t0 = time.perf_counter()
    exact = ux.retrain(post, train, request)
    print(f"exact retraining: {time.perf_counter() - t0:.2f} s")

    before = float(ux.metrics.distance(post, exact))
    print(f"{'refine steps':>12}  {'rel. distance':>13}  {'gap closed':>10}")
    print(f"{'(none)':>12}  {before:13.2e}  {0.0:10.1%}")
    steps, distances = [], []
    for s in range(max_steps + 1):
        unlearner = ux.second_order() if s == 0 else ux.chain(ux.second_order(), ux.refine(steps=s))
        new, _, _ = unlearner.update(request, unlearner.init(post, train))
        dist = float(ux.metrics.distance(new, exact))
        closed = float(ux.metrics.distance_closed(post, new, exact))
        steps.append(s)
        distances.append(dist)
        print(f"{s:12d}  {dist:13.2e}  {closed:10.1%}")

    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.5))
    ax.semilogy(steps, distances, "o-", label="Newton step + refine")
    ax.axhline(before, color="grey", ls="--", label="no update")
    ax.set_xlabel("refine (chord) steps")
    ax.set_ylabel("‖θ − θ_retrain‖ / ‖θ_retrain‖")
    ax.set_title(f"Adult: forget {args.fraction:.0%} of positive-label women")
    ax.legend()
    fig.tight_layout()
    fig.savefig(args.out, dpi=120)
    print(f"saved {args.out}")


if __name__ == "__main__":
    main()
