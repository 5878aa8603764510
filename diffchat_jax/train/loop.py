"""The one training loop of SFT and PPO: resume, steps under a progress bar, metrics, periodic actions and
checkpoints; the memory check both trainers run at start-up; and the export both end with.

    state, host = loop.run(loop.Loop(desc="ppo", unit="iteration", ...), state, host, step_fn, writer)

`step_fn(state, host, i, log) -> (state, host, metrics)` runs step i (0-based; i + 1 steps are then done). When
`log` is True its metrics (a dict of numbers) are written at step i + 1; otherwise they may be None. A run that
finds a checkpoint in `workdir/checkpoints` continues after it: the device state and the host state (a JSON dict)
are restored, what the interrupted run wrote after that checkpoint is rewound (metrics rows, and whatever
`Loop.rewind` names: samples, image folders), and step_fn is asked for the same steps an uninterrupted run would
have run next, so the workdir ends as an uninterrupted run's.

Ctrl-C (SIGINT) finishes the current step, saves a checkpoint and raises `Interrupted` (one line, exit 130); a
second Ctrl-C exits at once. With several processes, a Ctrl-C on any of them stops all after the same step.
"""
import contextlib
import dataclasses
import os
import shutil
import signal
import sys
from typing import Callable

import jax
import tqdm

from diffchat_jax.models import bloom
from diffchat_jax.errors import ConfigError, UserError
from diffchat_jax.utils import aot, checkpoint, distributed


@dataclasses.dataclass(frozen=True)
class Periodic:
    """fn(done, state) after every `every` completed steps and after the last step (done = completed steps);
    at_start: also before the first step of a fresh run (done = 0)."""
    every: int
    fn: Callable[[int, object], None]
    at_start: bool = False


@dataclasses.dataclass(frozen=True)
class Loop:
    desc: str  # the progress bar's label
    unit: str  # "step" or "iteration", as the messages say it
    workdir: str
    total_steps: int
    log_every: int
    checkpoint_every: int
    keep_checkpoints: int
    periodic: tuple[Periodic, ...] = ()
    rewind: tuple[Callable[[int], None], ...] = ()  # fn(done) on resume: drop outputs written after step `done`


class Interrupted(UserError):
    """Ctrl-C: the run saved a checkpoint and stopped; the same command resumes it."""
    exit_code = 130
    label = "stopped"
    on_every_process = True


@contextlib.contextmanager
def stop_on_sigint(unit: str):
    """Yields a dict whose "stop" turns True at the first Ctrl-C (the loop then checkpoints and stops); the second
    Ctrl-C exits at once. The handler is the default again outside the block (and off the main thread: none)."""
    flag = {"stop": False}

    def handler(signum, frame):
        del signum, frame
        if flag["stop"]:
            sys.stderr.write("\nsecond Ctrl-C: exiting without a checkpoint\n")
            os._exit(130)
        flag["stop"] = True
        sys.stderr.write(f"\nCtrl-C: finishing this {unit}, then saving a checkpoint (Ctrl-C again to exit at once)\n")

    try:
        previous = signal.signal(signal.SIGINT, handler)
    except ValueError:  # not the main thread
        yield flag
        return
    try:
        yield flag
    finally:
        signal.signal(signal.SIGINT, previous)


def run(spec: Loop, state, host: dict, step_fn, writer=None):
    """Runs (or resumes) the loop; returns the final (state, host). `writer`: a MetricWriter on the main process,
    None elsewhere."""
    is_main = jax.process_index() == 0
    ckpt = checkpoint.manager(os.path.join(spec.workdir, "checkpoints"))  # pruned by `prune`
    state, host, start = checkpoint.restore_latest(ckpt, state, host)
    if start:
        print(f"resumed from checkpoint at {spec.unit} {start}")
        if is_main:
            for rewind in ((writer.rewind,) if writer is not None else ()) + spec.rewind:
                rewind(start)
    else:
        for action in spec.periodic:
            if action.at_start:
                action.fn(0, state)
    due = lambda every, done: done % every == 0 or done == spec.total_steps
    with tqdm.tqdm(total=spec.total_steps, initial=start, desc=spec.desc, disable=not is_main) as bar, \
            stop_on_sigint(spec.unit) as sigint:
        for i in range(start, spec.total_steps):
            done = i + 1
            log = due(spec.log_every, done)
            state, host, metrics = step_fn(state, host, i, log)
            bar.update(1)
            if log and writer is not None:
                writer.write(done, metrics)
            for action in spec.periodic:
                if due(action.every, done):
                    action.fn(done, state)
            stop = distributed.any_process(sigint["stop"])  # a Ctrl-C on any host stops them all at this step
            if due(spec.checkpoint_every, done) or stop:
                checkpoint.save(ckpt, done, state, host)
                if due(spec.checkpoint_every, done):
                    ckpt.wait_until_finished()
                    prune(ckpt, spec.keep_checkpoints, lambda step: due(spec.checkpoint_every, step))
            if stop and done < spec.total_steps:
                ckpt.wait_until_finished()
                raise Interrupted(f"interrupted at {spec.unit} {done} of {spec.total_steps}: checkpoint saved in "
                                  f"{os.path.join(spec.workdir, 'checkpoints')}; rerun the same command to resume")
    ckpt.wait_until_finished()
    return state, host


def prune(ckpt, keep: int, periodic: Callable[[int], bool]) -> None:
    """After a periodic save: the workdir holds the newest `keep` periodic checkpoints, as an uninterrupted run's
    would; a Ctrl-C checkpoint (off the schedule) is dropped once a newer one is on disk, and never counts."""
    steps = sorted(ckpt.all_steps())
    kept = [step for step in steps if periodic(step)][-keep:]
    for step in steps:
        if step not in kept:
            ckpt.delete(step)


def rewind_step_folders(folder: str, done: int) -> None:
    """Removes the subfolders of `folder` named by a step after `done` (e.g. images/000007)."""
    if os.path.isdir(folder):
        for name in os.listdir(folder):
            if name.isdigit() and int(name) > done:
                shutil.rmtree(os.path.join(folder, name))


def check_memory(report: aot.Report, limit_gib: float) -> None:
    """Prints the memory report; raises ConfigError when its peak exceeds `limit_gib` (0 = no limit)."""
    print("memory per device (XLA's estimate of every jitted step):\n  " + "\n  ".join(report.lines()))
    if limit_gib and report.peak_gib > limit_gib:
        largest = report.largest()
        raise ConfigError(
            f"config.memory_limit_gib: the job needs about {report.peak_gib:.3g} GiB per device "
            f"({report.resident_gib:.3g} resident + {largest.transient_gib:.3g} for its largest step, {largest.name}) "
            f"but the limit is {limit_gib:g} GiB; lower the batch sizes of that step, set model.remat=True, or "
            f"shard the params with mesh.fsdp")


def export_bloom(workdir: str, config: bloom.BloomConfig, params, tokenizer) -> str:
    """The model in transformers format (with its value head, if any) and its tokenizer in workdir/export, written
    by process 0; every process calls it (params split over hosts are gathered)."""
    export_dir = os.path.join(workdir, "export")
    params = distributed.to_host(params)
    if jax.process_index() == 0:
        bloom.save_pretrained(config, params, export_dir)
        tokenizer.save_pretrained(export_dir)
    return export_dir
