"""Placing a batch of requests on devices: a one-axis mesh over `"requests"`.

Independent requests need no communication, so data parallelism is all there is to it:
the stacked requests are split along their leading axis over the devices of a
`jax.sharding.Mesh` with one axis, `"requests"`; the posterior and the data are replicated.
`jax.jit` compiles one SPMD program from the input shardings, and its outputs come back
sharded the same way. Across hosts, each process takes its own slice of the requests
(`process_slice`) and runs on its local devices; the runtime is JAX's own
(`jax.distributed.initialize`), and the per-process results are merged afterwards.
"""

from __future__ import annotations

from collections.abc import Sequence

import equinox as eqx
import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

AXIS = "requests"


def request_mesh(devices: Sequence[jax.Device] | Mesh | None = None) -> Mesh:
    """A one-axis mesh named `"requests"` over `devices` (default: all local devices).

    Args:
        devices: a sequence of devices, or a ready `Mesh` (returned unchanged if it has an
            axis named `"requests"`).

    Raises:
        ValueError: if `devices` is empty, holds devices of another process, or is a mesh
            without a `"requests"` axis.

    Example:
        ```python
        import unlearnx as ux
        mesh = ux.batch.request_mesh()
        print(mesh.shape)   # e.g. {'requests': 1} on one CPU
        ```
    """
    if isinstance(devices, Mesh):
        if AXIS not in devices.axis_names:
            raise ValueError(
                f"batch: the mesh has axes {devices.axis_names}; requests are sharded over an "
                f"axis named {AXIS!r}. Build one with ux.batch.request_mesh(devices)."
            )
        return devices
    devs = list(jax.local_devices() if devices is None else devices)
    if not devs:
        raise ValueError("batch: `devices` is empty; pass at least one device.")
    here = jax.process_index()
    other = [d for d in devs if d.process_index != here]
    if other:
        raise ValueError(
            f"batch: devices {other[:3]} belong to another process; each process runs on its "
            f"local devices (jax.local_devices()) and takes its own slice of the requests."
        )
    return Mesh(np.array(devs), (AXIS,))


def mesh_size(mesh: Mesh) -> int:
    """Number of devices along the `"requests"` axis."""
    return int(mesh.shape[AXIS])


def _put(tree, where):
    """`jax.device_put` of the array leaves of `tree` (models also hold functions)."""
    arrays, static = eqx.partition(tree, eqx.is_array)
    return eqx.combine(jax.device_put(arrays, where), static)


def shard_requests(tree, mesh: Mesh):
    """Put a stack of requests (leading axis divisible by the mesh size) onto the mesh,
    split along the leading axis."""
    if mesh.size == 1:
        return _put(tree, mesh.devices.flat[0])
    return _put(tree, NamedSharding(mesh, PartitionSpec(AXIS)))


def replicate(tree, mesh: Mesh):
    """Put a pytree (posterior, data) on every device of the mesh."""
    if mesh.size == 1:
        return _put(tree, mesh.devices.flat[0])
    return _put(tree, NamedSharding(mesh, PartitionSpec()))


def process_slice(n: int, process_index: int | None = None, process_count: int | None = None):
    """The contiguous range of `n` requests that process `process_index` of
    `process_count` handles (defaults: this process, from `jax.process_index()` /
    `jax.process_count()`). Ranges differ in length by at most one and cover `0..n-1`.

    Example:
        ```python
        import unlearnx as ux
        print(ux.batch.process_slice(10, 0, 3), ux.batch.process_slice(10, 2, 3))
        # range(0, 4) range(7, 10)
        ```
    """
    p = jax.process_index() if process_index is None else process_index
    count = jax.process_count() if process_count is None else process_count
    if not 0 <= p < count:
        raise ValueError(
            f"process_slice: process_index={p} is outside 0..{count - 1} (process_count={count})."
        )
    base, extra = divmod(n, count)
    start = p * base + min(p, extra)
    return range(start, start + base + (p < extra))
