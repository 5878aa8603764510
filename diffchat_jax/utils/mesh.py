"""The one device mesh: axes `data` x `fsdp`; batches split over both, params replicated or sharded on `fsdp`.

A job makes its mesh once (`make_mesh(fsdp=config.mesh.fsdp)`) and passes it down to everything that places
arrays: the trainers' jitted steps, the rollout, the renderer and the scorers. Steps are `jax.jit` functions whose
inputs carry these shardings (explicit `in_shardings` / `out_shardings` at the jit boundary); XLA inserts the
gradient all-reduce (and, with fsdp > 1, the parameter all-gathers and gradient reduce-scatters: GSPMD), so a step
is written as if for one device and averages over the global batch by construction (no explicit pmean).

Many hosts (utils/distributed.py): the mesh spans every device of every process, and a global batch [B, ...] is
split so that each process's devices hold one contiguous block of rows, `process_rows(mesh, B)`. Every process
builds the same global batch order; `shard_global` places only its own rows, `shard_batch` takes the rows a process
already has (host stages run on those), and `local_rows` turns a global result back into them. `process_local`
is the mesh over this process's own devices, for the renderer and the scorers, which run per host.

fsdp = 1 (the default): every device holds all params (pure data parallelism). fsdp = F > 1: each param of two
or more dimensions is split F ways on its largest axis that F divides (optimizer state likewise), for models whose
replicated params and optimizer state do not fit one device (BLOOM-3b, 7b1).
"""
from typing import Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from diffchat_jax.utils.validate import ConfigError

DATA_AXIS = "data"
FSDP_AXIS = "fsdp"
BATCH_AXES = (DATA_AXIS, FSDP_AXIS)  # the batch dimension is split over every device


def make_mesh(devices: Sequence[jax.Device] | None = None, fsdp: int = 1) -> Mesh:
    """A [devices / fsdp, fsdp] mesh named (`data`, `fsdp`) over `devices` (default: all devices of all hosts)."""
    devices = jax.devices() if devices is None else list(devices)
    if fsdp < 1 or len(devices) % fsdp:
        raise ValueError(f"mesh.fsdp ({fsdp}) must be >= 1 and divide the {len(devices)} devices")
    return Mesh(np.asarray(devices).reshape(len(devices) // fsdp, fsdp), BATCH_AXES)


def from_config(config, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """The job's mesh from `config.mesh` (fsdp); a value that cannot work raises ConfigError naming the field."""
    try:
        return make_mesh(devices, fsdp=config.mesh.fsdp)
    except ValueError as e:
        raise ConfigError(f"config.{e}") from e


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def data_sharded(mesh: Mesh) -> NamedSharding:
    """Splits the leading (batch) dimension across every device of the mesh."""
    return NamedSharding(mesh, P(BATCH_AXES))


def param_spec(shape: tuple[int, ...], fsdp: int) -> P:
    """Replicated, or (fsdp > 1, two or more dimensions) split on the largest axis that fsdp divides."""
    if fsdp == 1 or len(shape) < 2:
        return P()
    axes = [a for a in np.argsort(shape)[::-1] if shape[a] % fsdp == 0]
    if not axes:
        return P()
    spec = [None] * len(shape)
    spec[axes[0]] = FSDP_AXIS
    return P(*spec)


def param_shardings(tree, mesh: Mesh):
    """The sharding of every leaf (arrays or jax.ShapeDtypeStruct) of a param or optimizer-state tree."""
    fsdp = mesh.shape[FSDP_AXIS]
    return jax.tree.map(lambda x: NamedSharding(mesh, param_spec(np.shape(x), fsdp)), tree)


def place(tree, shardings):
    """Arrays -> device arrays with `shardings` (one sharding or a matching tree); jax.ShapeDtypeStruct leaves
    -> ShapeDtypeStructs with the sharding (abstract placement: the memory report lowers steps on them)."""
    if not isinstance(shardings, jax.sharding.Sharding):
        return jax.tree.map(_place_leaf, tree, shardings)
    return jax.tree.map(lambda x: _place_leaf(x, shardings), tree)


def _place_leaf(x, sharding):
    if isinstance(x, jax.ShapeDtypeStruct):
        return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding)
    return jax.device_put(x, sharding)


def is_abstract(tree) -> bool:
    """True when any leaf is a jax.ShapeDtypeStruct (a tree of shapes only, for the memory report)."""
    return any(isinstance(x, jax.ShapeDtypeStruct) for x in jax.tree.leaves(tree))


def shard_params(tree, mesh: Mesh):
    """Params (or optimizer state) onto the mesh: replicated, or split on `fsdp` (see `param_spec`)."""
    return place(tree, param_shardings(tree, mesh))


def process_rows(mesh: Mesh, global_size: int) -> slice:
    """The rows of a global batch [global_size, ...] split over the mesh that this process's devices hold (all of
    them with one process)."""
    spans = {(i[0].start or 0, global_size if i[0].stop is None else i[0].stop)
             for i in data_sharded(mesh).addressable_devices_indices_map((global_size,)).values()}
    start, stop = min(a for a, _ in spans), max(b for _, b in spans)
    if sum(b - a for a, b in spans) != stop - start:  # a mesh whose device order interleaves the processes
        raise ValueError(f"this process's devices do not hold one contiguous block of the {global_size} rows")
    return slice(start, stop)


def shard_global(batch, mesh: Mesh):
    """Host numpy arrays [B, ...], the whole global batch (the same on every process) -> global jax arrays; each
    process places its own rows (`process_rows`)."""
    rows = process_rows(mesh, len(jax.tree.leaves(batch)[0]))
    return shard_batch(jax.tree.map(lambda x: np.asarray(x)[rows], batch), mesh)


def local_rows(x: jax.Array) -> np.ndarray:
    """A global array split over the mesh on its first axis -> this process's rows [B_local, ...] as numpy."""
    if x.is_fully_addressable:
        return np.asarray(x)
    shards = {s.index[0].start or 0: s for s in x.addressable_shards}  # replicas of a block: one is enough
    return np.concatenate([np.asarray(shards[k].data) for k in sorted(shards)])


def process_local(mesh: Mesh) -> Mesh:
    """The mesh over this process's devices (`data` only): `mesh` itself when there is one process."""
    if jax.process_count() == 1:
        return mesh
    return make_mesh(jax.local_devices())


def shard_batch(batch, mesh: Mesh):
    """Host numpy arrays [B_local, ...] (this process's rows of the global batch: all of it with one process)
    -> global jax arrays split over the mesh; ShapeDtypeStruct leaves (global shapes) get the sharding."""
    sharding = data_sharded(mesh)

    def leaf(x):
        if isinstance(x, jax.ShapeDtypeStruct):
            return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding)
        return jax.make_array_from_process_local_data(sharding, np.asarray(x))

    return jax.tree.map(leaf, batch)


def replicate(tree, mesh: Mesh):
    return place(tree, replicated(mesh))


def chunk_size(batch_size: int, mesh: Mesh) -> int:
    """Rows per chunk of `map_in_chunks`: batch_size rounded up to the mesh's device count."""
    return -(-batch_size // mesh.devices.size) * mesh.devices.size


def map_in_chunks(fn, arrays: Sequence[np.ndarray], batch_size: int, mesh: Mesh) -> np.ndarray:
    """fn(*chunks) -> [C, ...] over host arrays [N, ...] in chunks of C rows split over the mesh; returns [N, ...].

    C is `chunk_size(batch_size, mesh)` whatever N is, and the last chunk is padded by repeating its final row (its
    outputs dropped): a jitted fn compiles one shape, and a row's result does not depend on how many rows come with
    it (the same numbers for 6 rows on each of 2 hosts as for 12 on one, or for the rows a resumed job has left).
    """
    total = len(arrays[0])
    chunk = chunk_size(batch_size, mesh)
    outputs = []
    for start in range(0, total, chunk):
        part = [a[start:start + chunk] for a in arrays]
        real = len(part[0])
        part = [np.concatenate([p, np.repeat(p[-1:], chunk - real, axis=0)]) for p in part]
        outputs.append(np.asarray(fn(*shard_batch(part, mesh)))[:real])
    return np.concatenate(outputs)
