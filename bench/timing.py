"""Timing shared by the benchmarks: calls/s with results forced ready, and PyTorch at a chosen thread count."""
import time

import jax
import torch


def timed(fn, steps):
    """(calls/s over `steps` calls, seconds of the first call) with results forced to be ready."""
    start = time.perf_counter()
    jax.block_until_ready(fn())
    first = time.perf_counter() - start
    jax.block_until_ready(fn())
    start = time.perf_counter()
    for _ in range(steps):
        jax.block_until_ready(fn())
    return steps / (time.perf_counter() - start), first


def torch_rate(fn, steps, threads):
    torch.set_num_threads(threads)
    return timed(fn, steps)[0]
