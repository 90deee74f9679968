"""Timing shared by the benchmarks: the first call (with compilation) and warm runs."""

from __future__ import annotations

import statistics
import time

import jax


def timed(fn, repeats: int):
    """`(result, first call seconds, median warm seconds)`; every result is waited for
    (`block_until_ready`), so asynchronous dispatch does not hide the work."""
    t = time.perf_counter()
    out = fn()
    jax.block_until_ready(jax.tree_util.tree_leaves(out))
    first = time.perf_counter() - t
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        out = fn()
        jax.block_until_ready(jax.tree_util.tree_leaves(out))
        times.append(time.perf_counter() - t)
    return out, first, statistics.median(times) if times else first
