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
