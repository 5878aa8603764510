"""Checkpoints with orbax: absolute paths, keep-last-N, atomic (a killed save leaves no half checkpoint behind).

A checkpoint holds two items: `state`, the device pytree (params, optimizer state), and `host`, a JSON dict of
host-side state (e.g. PPO's KL coefficient and reward moments: Python floats, restored exactly).
"""
import os

import jax
import orbax.checkpoint as ocp


def manager(directory: str, keep: int | None = None) -> ocp.CheckpointManager:
    """A manager over `directory` (made absolute, as orbax requires) keeping the newest `keep` steps (None: all;
    the training loop prunes them itself)."""
    options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True, cleanup_tmp_directories=True)
    return ocp.CheckpointManager(os.path.abspath(directory), options=options)


def save(mngr: ocp.CheckpointManager, step: int, state, host: dict) -> None:
    """Saves `state` (any pytree) and `host` (a JSON-able dict) at `step`, overwriting a checkpoint there."""
    mngr.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state), host=ocp.args.JsonSave(host)),
              force=True)


def restore_latest(mngr: ocp.CheckpointManager, state, host: dict):
    """Returns (state, host, step) of the newest checkpoint, or the arguments and 0 when there is none.

    `state` is a pytree of the right structure; its arrays' shapes, dtypes and shardings are reused so the
    restored state lands on the same devices as a freshly built one.
    """
    step = mngr.latest_step()
    if step is None:
        return state, host, 0
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, state)
    restored = mngr.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract),
                                                          host=ocp.args.JsonRestore()))
    return restored["state"], dict(restored["host"]), step
