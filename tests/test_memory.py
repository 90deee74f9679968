"""Every structure's `memory_estimate` against the measured peak resident memory.

Each case runs `tests/memprobe.py` in a fresh process (nothing else shares its heap): an
MLP classifier (64 inputs, 10 classes, two hidden layers of `width`) on `n` random rows,
the structure's `from_data` compiled ahead of time, the kernel's high-water mark reset,
the build run, and the peak resident memory above the size before it compared with the
estimate: they must agree within 25% of the peak. `matrix_free` is measured building
AND solving once (`"then": "solve"`), the unit its estimate covers (a Newton step).

The sizes keep every peak at 100 MB or more, so that the 10-20 MB by which the
resident memory of the same run varies does not dominate, and each process short
(a few seconds of work besides importing JAX; the 14 cases take 1.5-3 minutes on a
2-core CPU, hence `slow`). The measurement needs Linux (`/proc/self/clear_refs`,
`VmHWM`).
"""

import json
import subprocess
import sys
from pathlib import Path

import pytest

PROBE = Path(__file__).with_name("memprobe.py")
TOLERANCE = 0.25


def _can_reset_peak() -> bool:
    """Whether this kernel lets a process reset its resident-memory high-water mark."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        return False
    return True


pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        not _can_reset_peak(),
        reason="measuring the peak resident memory needs a writable /proc/self/clear_refs (Linux)",
    ),
]

# (structure, width, rows, options, then): peaks 107-490 MB.
CASES = [
    ("full", 40, 100, {}, None),
    ("full", 16, 2000, {}, None),
    ("diag", 2048, 50, {}, None),
    ("diag", 1792, 50, {}, None),
    ("kfac", 1024, 2000, {}, None),
    ("kfac", 768, 1000, {}, None),
    ("ekfac", 768, 1000, {}, None),
    ("ekfac", 512, 2000, {}, None),
    ("lowrank", 1024, 50, {"rank": 2, "slots": 8}, None),
    ("lowrank", 512, 100, {"rank": 5}, None),
    ("last_layer", 200, 1000, {}, None),
    ("last_layer", 300, 500, {}, None),
    # Two CG iterations: a solve's memory does not depend on how many it takes.
    ("matrix_free", 1024, 100, {"max_iters": 2}, "solve"),
    ("matrix_free", 1024, 2000, {"max_iters": 2, "preconditioner": None}, "solve"),
]


def _id(case):
    structure, width, n, options, _ = case
    extra = "".join(f"-{k}{v}" for k, v in options.items() if k != "max_iters")
    return f"{structure}-w{width}-n{n}{extra}"


@pytest.mark.parametrize("case", CASES, ids=[_id(c) for c in CASES])
def test_estimate_matches_peak_resident_memory(case):
    structure, width, n, options, then = case
    config = {"structure": structure, "width": width, "n": n, "options": options}
    if then is not None:
        config["then"] = then
    proc = subprocess.run(
        [sys.executable, str(PROBE), json.dumps(config)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    estimate, peak = result["estimate"], result["peak"]
    assert peak >= 50 * 2**20, f"peak {peak / 1e6:.0f} MB: too small to measure reliably"
    assert abs(estimate - peak) <= TOLERANCE * peak, (
        f"{structure} (width {width}, {n} rows, {options}): estimate "
        f"{estimate / 1e6:,.0f} MB vs peak {peak / 1e6:,.0f} MB "
        f"({100 * (estimate / peak - 1):+.0f}%); XLA's accounting {result['xla'] / 1e6:,.0f} MB"
    )
