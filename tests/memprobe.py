"""Measure the peak resident memory of building a Laplace precision, beside its estimate.

Run as a fresh process (so that nothing else shares its heap):

    python tests/memprobe.py '{"structure": "full", "width": 32, "n": 4000}'

It builds an MLP classifier (64 inputs, 10 classes, two hidden layers of `width`) and
random data of `n` rows, compiles the structure's `from_data` ahead of time, resets the
kernel's high-water mark (`/proc/self/clear_refs`), runs the compiled build, and prints
JSON with the estimate (`memory_estimate`), the measured peak above the resident size
before the run (`VmHWM − VmRSS`), XLA's own accounting of the compiled program (its
temporaries plus outputs) and the bytes the result holds.
"""

import gc
import json
import sys

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
    compiled = jax.jit(build).lower(params, data, lam).compile()
    analysis = compiled.memory_analysis()
    xla = analysis.temp_size_in_bytes + analysis.output_size_in_bytes if analysis else -1
    gc.collect()
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    base = rss("VmRSS")
    out = compiled(params, data, lam)
    jax.block_until_ready(out)
    peak = rss("VmHWM") - base
    held = sum(x.nbytes for x in jax.tree_util.tree_leaves(out))
    d = sum(x.size for x in jax.tree_util.tree_leaves(params))
    return dict(structure=structure, d=d, n=n, estimate=estimate, peak=peak, xla=xla, held=held)


if __name__ == "__main__":
    print(json.dumps(main(json.loads(sys.argv[1]))))
