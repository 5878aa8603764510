"""Checkpoints with orbax: absolute paths, keep-last-N, atomic (a killed save leaves no half checkpoint behind)."""
import os

import jax
import orbax.checkpoint as ocp


def manager(directory: str, keep: int) -> ocp.CheckpointManager:
    """A manager over `directory` (made absolute, as orbax requires) keeping the newest `keep` steps."""
    options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True, cleanup_tmp_directories=True)
    return ocp.CheckpointManager(os.path.abspath(directory), options=options)


def save(mngr: ocp.CheckpointManager, step: int, state) -> None:
    """Saves `state` (any pytree) at `step`, overwriting a checkpoint already there."""
    mngr.save(step, args=ocp.args.StandardSave(state), force=True)


def restore_latest(mngr: ocp.CheckpointManager, target):
    """Returns (state, step) of the newest checkpoint, or (target, 0) when there is none.

    `target` is a pytree of the right structure; its arrays' shapes, dtypes and shardings are reused so the
    restored state lands on the same devices as a freshly built one.
    """
    step = mngr.latest_step()
    if step is None:
        return target, 0
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, target)
    return mngr.restore(step, args=ocp.args.StandardRestore(abstract)), step
