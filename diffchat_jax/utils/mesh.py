"""Data-parallel placement: one `data` mesh axis over the devices; batches split on it, state replicated.

Steps are plain `jax.jit` functions whose inputs carry these shardings; XLA inserts the gradient all-reduce, so
the step is written as if for one device and averages over the global batch by construction (no explicit pmean).
"""
from typing import Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

DATA_AXIS = "data"


def make_mesh(devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A 1-D mesh named `data` over `devices` (default: all devices of all hosts)."""
    devices = jax.devices() if devices is None else list(devices)
    return Mesh(np.asarray(devices), (DATA_AXIS,))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def data_sharded(mesh: Mesh) -> NamedSharding:
    """Splits the leading (batch) dimension across the `data` axis."""
    return NamedSharding(mesh, P(DATA_AXIS))


def shard_batch(batch, mesh: Mesh):
    """Host numpy arrays [B, ...] (this host's part of the global batch) -> global jax arrays split on `data`."""
    sharding = data_sharded(mesh)
    return jax.tree.map(lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x)), batch)


def replicate(tree, mesh: Mesh):
    return jax.device_put(tree, replicated(mesh))


def map_in_chunks(fn, arrays: Sequence[np.ndarray], batch_size: int, mesh: Mesh) -> np.ndarray:
    """fn(*chunks) -> [C, ...] over host arrays [N, ...] in chunks of C rows split on `data`; returns [N, ...].

    C is min(batch_size, N) rounded up to the mesh's device count, and the last chunk is padded by repeating its
    final row (its outputs dropped), so a jitted fn compiles one shape per run.
    """
    total = len(arrays[0])
    chunk = -(-min(batch_size, total) // mesh.devices.size) * mesh.devices.size
    outputs = []
    for start in range(0, total, chunk):
        part = [a[start:start + chunk] for a in arrays]
        real = len(part[0])
        part = [np.concatenate([p, np.repeat(p[-1:], chunk - real, axis=0)]) for p in part]
        outputs.append(np.asarray(fn(*shard_batch(part, mesh)))[:real])
    return np.concatenate(outputs)
