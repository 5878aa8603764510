"""Batch helpers shared by the trainers."""
import jax


def split_microbatches(batch, grad_accum: int):
    """[B, ...] -> [grad_accum, B / grad_accum, ...], micro-batch k = rows k, k + A, k + 2A, ...

    Strided rather than contiguous so every micro-batch draws evenly from each device's shard of the batch.
    """
    return jax.tree.map(lambda x: x.reshape(-1, grad_accum, *x.shape[1:]).swapaxes(0, 1), batch)
