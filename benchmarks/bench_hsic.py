"""Time and peak memory of the HSIC estimators at n = 10,000 and 50,000.

Each measurement runs in its own subprocess, so that the peak resident set size
(VmHWM in `/proc/self/status`; not `ru_maxrss`, which Linux carries over from the parent
across fork + exec) belongs to that estimator alone. The data
are 1-d, `y = x² + noise`, Gaussian kernels with the median-heuristic bandwidth, float32
(pass `--x64` for float64). "first" includes compilation; "second" is a warm call. The
"baseline" row is the same process without any HSIC call (Python, JAX and the data).

Usage:
    python benchmarks/bench_hsic.py [--x64] [--sizes 10000 50000]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys

#: The O(n²)-memory estimator is not run at n = 50,000: its two 50,000² Gram matrices
#: alone take 20 GB in float32 (40 GB in float64), more than this machine's memory.
DENSE_MAX_N = 20_000


def _one(estimator: str, n: int, x64: bool) -> dict:
    import time

    import jax

    if x64:
        jax.config.update("jax_enable_x64", True)
    import numpy as np

    from unlearnx.hsic import hsic

    rng = np.random.default_rng(0)
    dtype = np.float64 if x64 else np.float32
    x = rng.normal(size=n).astype(dtype)
    y = (x**2 + rng.normal(size=n)).astype(dtype)
    out = {"estimator": estimator, "n": n}
    if estimator != "baseline":
        kw = {"estimator": estimator, "block": 1000, "n_features": 1024}
        if estimator == "rff":
            kw["key"] = jax.random.key(0)
        t = time.perf_counter()
        value = hsic(x, y, **kw).block_until_ready()
        out["first_s"] = time.perf_counter() - t
        t = time.perf_counter()
        value = hsic(x, y, **kw).block_until_ready()
        out["second_s"] = time.perf_counter() - t
        out["value"] = float(value)
    with open("/proc/self/status") as f:
        hwm = next(line for line in f if line.startswith("VmHWM:"))
    out["peak_mb"] = int(hwm.split()[1]) / 1024
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--x64", action="store_true", help="float64 instead of float32")
    parser.add_argument("--sizes", type=int, nargs="+", default=[10_000, 50_000])
    parser.add_argument("--one", nargs=2, metavar=("ESTIMATOR", "N"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(_one(args.one[0], int(args.one[1]), args.x64)))
        return

    print(f"HSIC, 1-d x and y, Gaussian kernels, {'float64' if args.x64 else 'float32'}")
    header = f"{'estimator':<10} {'n':>7} {'first (s)':>10} {'second (s)':>11} "
    header += f"{'peak RSS (MB)':>14} {'HSIC':>12}  note"
    print(header)
    print("-" * len(header))
    reference = {}
    for n in args.sizes:
        for estimator in ("baseline", "biased", "blocked", "rff"):
            if estimator == "biased" and n > DENSE_MAX_N:
                print(
                    f"{estimator:<10} {n:>7} {'skipped':>10}  (two {n:,}² Gram matrices: "
                    f"{2 * n * n * (8 if args.x64 else 4) / 1e9:.0f} GB; use 'blocked')"
                )
                continue
            cmd = [sys.executable, __file__, "--one", estimator, str(n)]
            cmd += ["--x64"] if args.x64 else []
            proc = subprocess.run(cmd, capture_output=True, text=True)
            if proc.returncode != 0:
                print(f"{estimator:<10} {n:>7} failed: {proc.stderr.strip().splitlines()[-1]}")
                continue
            r = json.loads(proc.stdout.strip().splitlines()[-1])
            if estimator == "baseline":
                print(f"{'baseline':<10} {n:>7} {'':>10} {'':>11} {r['peak_mb']:>14.0f}")
                continue
            note = ""
            if n not in reference and estimator in ("biased", "blocked"):
                reference[n] = r["value"]
                note = "reference"
            elif n in reference:
                note = f"rel. diff. {r['value'] / reference[n] - 1:+.1e}"
            print(
                f"{estimator:<10} {n:>7} {r['first_s']:>10.2f} {r['second_s']:>11.2f} "
                f"{r['peak_mb']:>14.0f} {r['value']:>12.6g}  {note}"
            )


if __name__ == "__main__":
    main()
