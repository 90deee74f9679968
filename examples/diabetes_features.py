"""Remove three features (Pregnancies, BMI, Age) from a model of the Pima diabetes data.

The request replaces the three columns in every training row by their training mean
(the default `fill="mean"`: a constant column carries no information, and unlike a fill
of 0, which is the minimum of these min-max scaled columns, it does not also shift the
intercept). The script compares four answers by their gradient residual `‖∇L(θ; D')‖₂`
on the edited data, which is zero at the exact retrained optimum: no update
(`identity`), a first-order (gradient) step, a second-order (Newton) step with the
precision update, and the Newton step followed by ten chord (refine) steps. It also
prints the relative distance to exact retraining and the weights left on the removed
columns: as the columns are constant they act as part of the intercept, so their
weights need not be zero, but they no longer depend on any row's value.

    python examples/diabetes_features.py
    python examples/diabetes_features.py --small   # a 200-row subset, for tests
"""

from __future__ import annotations

import argparse

import jax
import numpy as np

jax.config.update("jax_enable_x64", True)

import unlearnx as ux  # noqa: E402

FEATURES = ["Pregnancies", "BMI", "Age"]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prior-precision", type=float, default=1.0)
    parser.add_argument("--small", action="store_true", help="tiny and fast (for tests)")
    args = parser.parse_args(argv)

    train = ux.datasets.diabetes().train
    if args.small:
        train = train.subset(np.arange(200))
    lam = args.prior_precision

    model, _ = ux.fit(ux.models.LogisticRegression(train.n_features), train, prior_precision=lam)
    post = ux.laplace(model, train, prior_precision=lam)
    request = ux.forget_features(FEATURES)
    exact = ux.retrain(post, train, request)
    columns = np.asarray([c for f in FEATURES for c in train.columns(f)])

    methods = {
        "none": ux.identity(),
        "first order": ux.first_order(),
        "second order": ux.second_order(),
        "second + 10 refine": ux.chain(ux.second_order(), ux.refine(steps=10)),
    }
    print(f"removing {', '.join(FEATURES)} from {train.n} rows")
    print(f"{'method':>18}  {'grad residual':>13}  {'rel. distance':>13}  removed weights")
    for name, unlearner in methods.items():
        new, state, _ = unlearner.update(request, unlearner.init(post, train))
        residual = float(ux.metrics.gradient_residual(new, state.data))
        dist = float(ux.metrics.distance(new, exact))
        weights = np.array2string(np.asarray(new.mean.weight)[columns], precision=3)
        print(f"{name:>18}  {residual:13.2e}  {dist:13.2e}  {weights}")
    residual = float(ux.metrics.gradient_residual(exact, state.data))
    print(f"{'exact retraining':>18}  {residual:13.2e}  {0.0:13.2e}")


if __name__ == "__main__":
    main()
