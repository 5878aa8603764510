"""Batch helpers shared by the trainers."""
import jax


def split_microbatches(batch, n: int):
    """[B, ...] -> [n, B / n, ...], micro-batch k = rows k, k + n, k + 2n, ...

    Strided rather than contiguous so every micro-batch draws evenly from each device's shard of the batch.
    """
    return jax.tree.map(lambda x: x.reshape(-1, n, *x.shape[1:]).swapaxes(0, 1), batch)


def merge_microbatches(micro):
    """The inverse of `split_microbatches`: [n, B / n, ...] -> [B, ...] in the original row order."""
    return jax.tree.map(lambda x: x.swapaxes(0, 1).reshape(-1, *x.shape[2:]), micro)
