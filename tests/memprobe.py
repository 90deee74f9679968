"""Measure the peak resident memory of building a Laplace precision, beside its estimate.

Run as a fresh process (so that nothing else shares its heap):

    python tests/memprobe.py '{"structure": "full", "width": 32, "n": 4000}'

It builds an MLP classifier (64 inputs, 10 classes, two hidden layers of `width`) and
random data of `n` rows, compiles the structure's `from_data` ahead of time, resets the
kernel's high-water mark (`/proc/self/clear_refs`), runs the compiled build, and prints
JSON with the estimate (`memory_estimate`), the measured peak above the resident size
before the run (`VmHWM − VmRSS`), XLA's own accounting of the compiled program (its
temporaries plus outputs) and the bytes the result holds.

With `"then": "solve"` the measured run is the build followed by one solve with the
result, `P.solve(b)` for a random `d`-vector `b`, compiled on its own as `laplace`
followed by `P.solve` runs it (the built precision stays alive during the solve): the
unit of use (a Newton step) of a structure whose `memory_estimate` covers a solve
(`matrix_free`, whose build alone allocates little). Options such as
`"options": {"max_iters": 2}` bound the iterations: a solve's memory does not depend on
them. `xla` is then the larger of the two programs' (the solve's plus the built
precision), and `seconds` the wall time of the measured run.
"""

import gc
import json
import sys
import time

import jax

jax.config.update("jax_enable_x64", True)

import equinox as eqx  # noqa: E402
import jax.numpy as jnp  # noqa: E402

import unlearnx as ux  # noqa: E402
from unlearnx._curvature._registry import structure_class  # noqa: E402


def rss(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


def main(config: dict) -> dict:
    structure = config["structure"]
    width, n, depth = config.get("width", 32), config["n"], config.get("depth", 2)
    options = config.get("options", {})
    then = config.get("then")
    if then not in (None, "solve"):
        raise ValueError(f"unknown `then={then!r}`; use 'solve' or leave it out")
    key = jax.random.key(0)
    X = jax.random.normal(key, (n, 64))
    y = jax.random.randint(key, (n,), 0, 10)
    names = tuple(f"x{i}" for i in range(64))
    data = ux.Dataset(X, y, jnp.ones(n), {}, names, n_classes=10)
    model = ux.models.MLPClassifier(64, 10, width=width, depth=depth, key=key, dtype=jnp.float64)
    cls = structure_class(structure)
    estimate = cls.memory_estimate(model, n, **options)
    params, static = eqx.partition(model, eqx.is_array)

    def build(p, d, lam):
        out = cls.from_data(eqx.combine(p, static), d, lam, "ggn", **options)
        return eqx.filter(out, eqx.is_array)

    lam = jnp.asarray(1.0)
    n_params = sum(x.size for x in jax.tree_util.tree_leaves(params))
    steps = [(jax.jit(build).lower(params, data, lam).compile(), lambda: (params, data, lam))]
    if then == "solve":
        # The solve is compiled on its own, as `laplace` followed by `P.solve` runs it.
        shapes = eqx.filter_eval_shape(cls.from_data, model, data, lam, "ggn", **options)[0]
        P_shapes, P_static = eqx.partition(shapes, lambda x: isinstance(x, jax.ShapeDtypeStruct))
        b = jax.random.normal(jax.random.key(1), (n_params,), jnp.float64)

        def solve(P, b):
            return eqx.combine(P, P_static).solve(b)

        solve_c = jax.jit(solve).lower(P_shapes, b).compile()
        steps.append((solve_c, lambda: (eqx.filter(results[0][0], eqx.is_array), b)))
    xla = 0  # the largest step: its temporaries and outputs, with what earlier steps hold
    for i, (c, _) in enumerate(steps):
        analysis = c.memory_analysis()
        if analysis is None:
            xla = -1
            break
        kept = sum(steps[j][0].memory_analysis().output_size_in_bytes for j in range(i))
        xla = max(xla, kept + analysis.temp_size_in_bytes + analysis.output_size_in_bytes)
    gc.collect()
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    base = rss("VmRSS")
    start = time.perf_counter()
    results = []
    for c, args in steps:
        results.append(jax.block_until_ready(c(*args())))
    seconds = time.perf_counter() - start
    peak = rss("VmHWM") - base
    held = sum(x.nbytes for x in jax.tree_util.tree_leaves(results))
    return dict(
        structure=structure,
        d=n_params,
        n=n,
        then=then,
        estimate=estimate,
        peak=peak,
        xla=xla,
        held=held,
        seconds=seconds,
    )


if __name__ == "__main__":
    print(json.dumps(main(json.loads(sys.argv[1]))))
