"""Many hosts on JAX's multi-controller runtime: one process per host, global arrays over every device.

    distributed.initialize(config.distributed)   # first thing of a job, before any other JAX call
    rows = mesh.process_rows(mesh, B)            # this process's rows of every global batch (utils/mesh.py)
    scores = distributed.gather_rows(local)      # [B_local, ...] on each process -> [B, ...] on every process
    texts = distributed.gather_objects(local)    # the same for JSON-able rows (responses, edits)
    stop = distributed.any_process(flag)         # a Ctrl-C on any host stops every host

Every process runs the same program on the same global batch order; host-side work (decoding, CI, rendering,
scoring) runs on the process's own rows, and collectives bring together what the next step needs. With one process
every helper here is the identity, so single-host runs take the same code path.

Failure: JAX's runtime ends every process once one is lost (its heartbeat, `heartbeat_timeout_s`), with a C++ fatal
log. To stop with a line that says what happened instead, a process that fails leaves its error line in the
coordinator's key-value store and exits at once, and a watcher thread in every other process reads it and exits
with `error: process N stopped: <its line>` within a second or two. A process that never joins ends the others
after `initialization_timeout_s` with one line naming the coordinator and the process count.
"""
import os
import sys
import threading
import time

import numpy as np

from diffchat_jax.errors import ConfigError, UserError

FAILED = "diffchat/failed/"  # + process id -> the error line of a process that stopped
SEEN = "diffchat/seen/"  # + process id -> set by a process that read a peer's failure
POLL_S = 0.5
_STATE = {"on": False, "client": None}


class PeerStopped(UserError):
    """Another process of the job stopped (its own line follows); this one stops too."""


def detected_cluster() -> str | None:
    """The cluster environment jax.distributed.initialize() would detect (SLURM, Open MPI, TPU, ...), or None."""
    try:
        from jax._src import clusters  # the detection jax.distributed.initialize() itself runs
        for env in clusters.ClusterEnv._cluster_types:
            if not getattr(env, "opt_in_only_method", False) and env.is_env_present():
                return env.__name__
    except Exception:  # a jax without this module: no detection
        return None
    return None


def settings(d) -> dict | None:
    """`config.distributed` -> keyword arguments of jax.distributed.initialize, or None for one process.

    Explicit fields (coordinator_address, num_processes > 1, process_id >= 0) are used as given; the empty ones are
    left to jax's cluster detection when `detect` is "auto" (only when a cluster is detected) or names a method."""
    if d.num_processes == 1 or d.detect == "off" and not d.coordinator_address:
        return None
    if d.num_processes < 0 or d.process_id < -1:
        raise ConfigError("config.distributed.num_processes must be >= 0 (0 = detect) and process_id >= -1 (-1 = "
                          f"detect), got {d.num_processes} and {d.process_id}")
    explicit = bool(d.coordinator_address) and d.num_processes > 1 and d.process_id >= 0
    if not explicit and d.detect == "auto" and detected_cluster() is None:
        if d.coordinator_address or d.num_processes or d.process_id >= 0:
            raise ConfigError("config.distributed: no cluster (SLURM, Open MPI, TPU pod) was detected to fill in "
                              "the missing fields; set all of coordinator_address (HOST:PORT of process 0), "
                              "num_processes and process_id")
        return None
    if explicit and d.process_id >= d.num_processes:
        raise ConfigError(f"config.distributed.process_id ({d.process_id}) must be < num_processes "
                          f"({d.num_processes})")
    return dict(coordinator_address=d.coordinator_address or None, num_processes=d.num_processes or None,
                process_id=None if d.process_id < 0 else d.process_id,
                cluster_detection_method=None if d.detect in ("auto", "off") else d.detect,
                initialization_timeout=int(d.initialization_timeout_s),
                heartbeat_timeout_seconds=int(d.heartbeat_timeout_s))


def initialize(d) -> bool:
    """Joins the job's processes as `config.distributed` says (see `settings`); True when there is more than one.

    Must run before any other JAX call. CPU devices reduce across processes over gloo. A process that has not
    joined within `initialization_timeout_s` ends this one with one line (jax's own timeout would abort)."""
    kwargs = settings(d)
    if kwargs is None:
        return False
    import jax
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    timeout = kwargs["initialization_timeout"]
    joined = threading.Event()

    def watchdog():
        if not joined.wait(timeout):
            where = kwargs["coordinator_address"] or "the detected coordinator"
            count = f"{kwargs['num_processes']} " if kwargs["num_processes"] else ""
            sys.stderr.write(f"error: distributed: not every process joined the coordinator at {where} within "
                             f"{timeout} s (config.distributed.initialization_timeout_s); start all {count}"
                             f"processes with the same coordinator_address and num_processes, each with its own "
                             f"process_id\n")
            sys.stderr.flush()
            os._exit(2)

    threading.Thread(target=watchdog, daemon=True).start()
    # jax's own deadline comes later, so the watchdog speaks first.
    jax.distributed.initialize(**{**kwargs, "initialization_timeout": timeout + 30})
    joined.set()
    if jax.process_count() == 1:
        return False
    from jax._src import distributed as jax_distributed
    _STATE.update(on=True, client=jax_distributed.global_state.client)
    threading.Thread(target=_watch_peers, daemon=True).start()
    if not d.log_all_processes and jax.process_index() != 0:
        sys.stdout = open(os.devnull, "w")  # only process 0 prints the run's story; errors still reach stderr
    return True


def active() -> bool:
    """True in a job of more than one process."""
    return _STATE["on"]


def _watch_peers() -> None:
    """Ends this process with the error line of a peer that stopped (read from the coordinator)."""
    import jax
    me, client = jax.process_index(), _STATE["client"]
    while True:
        time.sleep(POLL_S)
        try:
            failed = [(k, v) for k, v in client.key_value_dir_get(FAILED) if not k.endswith(f"/{me}")]
        except Exception:  # the coordinator is gone (process 0 ended): jax's heartbeat ends this process
            return
        if failed:
            key, line = failed[0]
            try:
                client.key_value_set(f"{SEEN}{me}", "1")
            except Exception:
                pass
            sys.stderr.write(f"error: process {key.rsplit('/', 1)[-1]} stopped ({line}); process {me} stops too\n")
            sys.stderr.flush()
            os._exit(2)


def report_failure(line: str, exit_code: int) -> None:
    """Called by a process that is stopping on an error: leaves `line` for the peers and exits now (jax's shutdown
    barrier would wait for peers that are still running). Process 0 holds the coordinator, so it first waits (a
    few seconds at most) until the peers have read it."""
    import jax
    client, me = _STATE["client"], jax.process_index()
    try:
        client.key_value_set(f"{FAILED}{me}", line)
        if me == 0:
            deadline = time.time() + 6 * POLL_S + 2
            while time.time() < deadline:
                seen = {k for k, _ in client.key_value_dir_get(SEEN)}
                failed = {k for k, _ in client.key_value_dir_get(FAILED)}
                if len(seen) + len(failed) >= jax.process_count():
                    break
                time.sleep(POLL_S / 2)
    except Exception:
        pass
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(exit_code)


# ---------------------------------------------------------------------------------------------------------------
# Collectives on host data (the identity with one process).
# ---------------------------------------------------------------------------------------------------------------
def gather_rows(local: np.ndarray) -> np.ndarray:
    """[B_local, ...] on every process (the same shape on each) -> [B, ...], process 0's rows first; any dtype,
    exactly (float64 too: the rows travel as bytes)."""
    local = np.ascontiguousarray(local)
    if not active():
        return local
    from jax.experimental import multihost_utils
    raw = local.reshape(len(local), -1).view(np.uint8)
    gathered = np.asarray(multihost_utils.process_allgather(raw, tiled=True))
    return gathered.view(local.dtype).reshape(-1, *local.shape[1:])


def gather_objects(local: list) -> list:
    """A list of JSON-able rows on every process (any lengths) -> the concatenated list, process 0's first."""
    if not active():
        return list(local)
    import json
    data = np.frombuffer(json.dumps(local).encode("utf-8"), np.uint8)
    sizes = gather_rows(np.array([len(data)], np.int64))
    padded = np.zeros(int(sizes.max()), np.uint8)
    padded[:len(data)] = data
    blobs = gather_rows(padded[None])
    return [row for blob, n in zip(blobs, sizes) for row in json.loads(bytes(blob[:n]).decode("utf-8"))]


def process_block(total: int) -> range:
    """This process's share of `total` items that are not a device batch (eval rows): contiguous blocks, the first
    `total % processes` of them one longer; everything with one process."""
    import jax
    count, me = jax.process_count(), jax.process_index()
    size, extra = divmod(total, count)
    start = me * size + min(me, extra)
    return range(start, start + size + (me < extra))


def barrier(name: str) -> None:
    """Waits until every process got here (nothing with one process)."""
    if active():
        from jax.experimental import multihost_utils
        multihost_utils.sync_global_devices(name)


def any_process(flag: bool) -> bool:
    """True on every process when `flag` is True on any."""
    if not active():
        return bool(flag)
    return bool(gather_rows(np.array([flag], np.int32)).any())


def to_host(tree):
    """A tree of jax arrays -> numpy with their whole values (gathered from every process where an array spans
    other hosts: a collective, so every process calls it)."""
    import jax
    if not active():
        return jax.device_get(tree)
    from jax.experimental import multihost_utils

    def leaf(x):
        if isinstance(x, jax.Array) and not x.is_fully_addressable and not x.is_fully_replicated:
            return np.asarray(multihost_utils.process_allgather(x, tiled=True))
        return np.asarray(x)

    return jax.tree.map(leaf, tree)
