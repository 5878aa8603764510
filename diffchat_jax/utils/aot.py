"""Ahead-of-time compilation of jitted steps on abstract arguments, and what XLA says they need in memory.

A `Step` is a jitted function plus the abstract arguments (jax.ShapeDtypeStructs with shardings) it will be called
with. `measure(step)` lowers and compiles it (nothing is allocated) and reads `compiled.memory_analysis()`: the
per-device bytes of its temporaries, arguments and outputs, and how many output bytes reuse donated arguments.
A compiled step stays in jax's cache: the real call with arrays of the same shapes and shardings does not compile
again, so a trainer that measures its steps at start-up pays no extra compilation.
"""
import dataclasses
from typing import Any, Callable

import jax
import numpy as np

GIB = 2 ** 30


@dataclasses.dataclass(frozen=True)
class Step:
    """fn(*args, **kwargs), abstractly. `resident`: the positions in `args` of trees that stay in memory through
    the whole job (params, optimizer state), counted once in the report's resident total, not per step."""
    name: str
    fn: Callable
    args: tuple
    kwargs: dict = dataclasses.field(default_factory=dict)
    resident: tuple[int, ...] = ()


@dataclasses.dataclass(frozen=True)
class StepMemory:
    """Per-device GiB of one compiled step. peak = temp + args + out - alias (donated buffers reused by outputs);
    transient = peak - resident_args: what the step adds on top of the job's resident trees."""
    name: str
    temp_gib: float
    args_gib: float
    out_gib: float
    alias_gib: float
    resident_args_gib: float

    @property
    def peak_gib(self) -> float:
        return self.temp_gib + self.args_gib + self.out_gib - self.alias_gib

    @property
    def transient_gib(self) -> float:
        return self.peak_gib - self.resident_args_gib


def tree_gib(tree) -> float:
    """Per-device GiB of a tree of arrays or ShapeDtypeStructs (the largest shard of each leaf; static leaves such
    as modules or Python numbers count 0)."""
    total = 0
    for x in jax.tree.leaves(tree):
        if not hasattr(x, "shape") or not hasattr(x, "dtype"):
            continue
        sharding = getattr(x, "sharding", None)
        shape = sharding.shard_shape(x.shape) if sharding is not None else x.shape
        total += int(np.prod(shape, dtype=np.int64)) * np.dtype(x.dtype).itemsize
    return total / GIB


def abstract(tree):
    """Arrays -> jax.ShapeDtypeStructs with the same shape, dtype and sharding (other leaves kept)."""
    def leaf(x):
        if isinstance(x, jax.Array):
            return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding)
        return x
    return jax.tree.map(leaf, tree)


def measure(step: Step) -> StepMemory:
    """Compiles `step` for its abstract arguments and reads XLA's memory analysis."""
    compiled = step.fn.lower(*step.args, **step.kwargs).compile()
    stats = compiled.memory_analysis()
    return StepMemory(step.name, stats.temp_size_in_bytes / GIB, stats.argument_size_in_bytes / GIB,
                      stats.output_size_in_bytes / GIB, stats.alias_size_in_bytes / GIB,
                      sum(tree_gib(step.args[i]) for i in step.resident))


@dataclasses.dataclass(frozen=True)
class Report:
    """Every step of a job and the trees that stay resident through it.

    peak_gib: the resident trees plus the largest transient of any step (steps run one after another)."""
    steps: tuple[StepMemory, ...]
    resident: dict[str, float]  # name -> per-device GiB

    @property
    def resident_gib(self) -> float:
        return sum(self.resident.values())

    @property
    def peak_gib(self) -> float:
        return self.resident_gib + max((s.transient_gib for s in self.steps), default=0.0)

    def largest(self) -> StepMemory:
        return max(self.steps, key=lambda s: s.transient_gib)

    def to_json(self) -> dict[str, Any]:
        return {"steps": {s.name: {"temp_gib": s.temp_gib, "args_gib": s.args_gib, "out_gib": s.out_gib,
                                   "peak_gib": s.peak_gib} for s in self.steps},
                "resident_gib": self.resident, "peak_gib": self.peak_gib}

    def lines(self) -> list[str]:
        rows = [f"{'step':<14} {'temp GiB':>9} {'args GiB':>9} {'out GiB':>9} {'peak GiB':>9}"]
        rows += [f"{s.name:<14} {s.temp_gib:>9.3f} {s.args_gib:>9.3f} {s.out_gib:>9.3f} {s.peak_gib:>9.3f}"
                 for s in self.steps]
        rows.append("resident: " + ", ".join(f"{k} {v:.3f}" for k, v in self.resident.items())
                    + f" = {self.resident_gib:.3f} GiB")
        rows.append(f"peak per device: {self.peak_gib:.3f} GiB")
        return rows


def report(steps: list[Step], resident: dict[str, Any]) -> Report:
    """Measures every step; `resident` maps names to the trees that stay in memory (params, optimizer state)."""
    return Report(tuple(measure(s) for s in steps), {k: tree_gib(v) for k, v in resident.items()})
