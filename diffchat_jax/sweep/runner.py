"""Running a sweep: each job's state on disk (sweep.json), one job in this process, several one process each,
--print-commands and --dry-run."""
import datetime
import json
import os
import shlex
import subprocess
import sys
import time
from typing import Sequence

from diffchat_jax import errors
from diffchat_jax.errors import UserError
from diffchat_jax.sweep.spec import Job, Sweep, eval_config, jobs, load_spec, train_config
from diffchat_jax.utils import files

STATUS_FILE = "sweep.json"
# ---------------------------------------------------------------------------------------------------------------
# State on disk.
# ---------------------------------------------------------------------------------------------------------------
def read_status(workdir: str) -> dict:
    """{"train": state, "eval": state, "error": ...}; state is "finished", "failed", "running" (or killed while
    running), "interrupted" (Ctrl-C) or absent (never started)."""
    path = os.path.join(workdir, STATUS_FILE)
    if not os.path.exists(path):
        return {}
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def write_status(workdir: str, **fields) -> None:
    status = {**read_status(workdir), **fields, "time": datetime.datetime.now().isoformat(timespec="seconds")}
    os.makedirs(workdir, exist_ok=True)
    files.write_atomic(os.path.join(workdir, STATUS_FILE), json.dumps(status, indent=2) + "\n")


def job_state(job: Job, root: str) -> str:
    """"finished" (training and, if asked, its eval), "failed", "unfinished" (started, not done) or "new"."""
    status = read_status(job.workdir(root))
    stages = ["train"] + (["eval"] if job.run.eval else [])
    states = [status.get(stage) for stage in stages]
    if all(s == "finished" for s in states):
        return "finished"
    if "failed" in states:
        return "failed"
    return "unfinished" if any(states) or os.path.isdir(os.path.join(job.workdir(root), "checkpoints")) else "new"


def command(spec_arg: str, root: str, job: Job) -> list[str]:
    """The one command that runs `job` (what a scheduler runs; what `run` runs for each job of a sweep)."""
    return [sys.executable, "-m", "diffchat_jax.sweep", "run", spec_arg, f"--root={root}", f"--only={job.id}"]


def absolute_spec(spec_arg: str) -> str:
    path, sep, arg = spec_arg.partition(":")
    return os.path.abspath(path) + sep + arg


# ---------------------------------------------------------------------------------------------------------------
# Running.
# ---------------------------------------------------------------------------------------------------------------
def unmet_needs(sweep: Sweep, job: Job, root: str) -> list[str]:
    return [j.id for need in job.run.needs for j in jobs(sweep, [need]) if job_state(j, root) != "finished"]


def execute(sweep: Sweep, job: Job, root: str) -> None:
    """Runs one job in this process: its training (resumed when interrupted), then its eval. Records the outcome
    in sweep.json; an error is recorded, then raised."""
    from diffchat_jax import main
    from diffchat_jax.train import loop
    workdir = job.workdir(root)
    unmet = unmet_needs(sweep, job, root)
    if unmet:
        raise UserError(f"run {job.id} needs {unmet} to finish first (run them, or the whole sweep, before it)")
    stages = [("train", lambda: train_config(job, root), workdir)]
    if job.run.eval:
        stages.append(("eval", lambda: eval_config(job, root), os.path.join(workdir, "eval")))
    for stage, make_config, stage_dir in stages:
        if read_status(workdir).get(stage) == "finished":
            continue
        write_status(workdir, **{stage: "running"}, error=None)
        try:
            main.run_job(make_config(), stage_dir)
        except (KeyboardInterrupt, loop.Interrupted):
            write_status(workdir, **{stage: "interrupted"})
            raise
        except BaseException as e:
            write_status(workdir, **{stage: "failed"}, error=f"{stage}: {errors.describe(e)}")
            raise
        write_status(workdir, **{stage: "finished"})


def run_sweep(spec_arg: str, root: str, only: Sequence[str] = (), dry_run: bool = False,
              print_commands: bool = False, parallel: int = 1) -> int:
    """`sweep run`; returns the exit code. `parallel` > 1 runs that many jobs at once whose needs have finished
    (each sees every device: for CPU studies, or set device visibility yourself), their output in
    <workdir>/sweep.log."""
    spec_arg, root = absolute_spec(spec_arg), os.path.abspath(root)
    sweep = load_spec(spec_arg)
    selected = jobs(sweep, only)
    if print_commands:
        for job in selected:
            if job.run.needs:
                print(f"# {job.id} needs: {', '.join(job.run.needs)}")
            print(shlex.join(command(spec_arg, root, job)))
        return 0
    if dry_run:
        for job in selected:
            print_dry_run(sweep, job, root, spec_arg)
        return 0
    if sweep.prepare is not None:
        sweep.prepare(root)
    if len(selected) == 1:
        execute(sweep, selected[0], root)
        return 0
    return run_many(sweep, selected, spec_arg, root, max(1, parallel))


def run_many(sweep: Sweep, selected: list[Job], spec_arg: str, root: str, parallel: int) -> int:
    """Each job in its own process, in spec order, up to `parallel` at once; a job waits for its needs and is not
    started when one of them failed."""
    label = {job.id: f"[{n}/{len(selected)}] {job.id}" for n, job in enumerate(selected, 1)}
    pending, running, failed, blocked = list(selected), {}, [], []
    while pending or running:
        for job in list(pending):
            if len(running) >= parallel:
                break
            state = job_state(job, root)
            if state == "finished":
                print(f"{label[job.id]}: finished, skipped")
                pending.remove(job)
                continue
            unmet = unmet_needs(sweep, job, root)
            waiting = [u for u in unmet if u in {j.id for j in pending + list(running.values())}]
            if unmet and len(waiting) < len(unmet) or any(u in failed + blocked for u in unmet):
                print(f"{label[job.id]}: not started, it needs {unmet}")
                blocked.append(job.id)
                pending.remove(job)
                continue
            if waiting:
                continue
            print(f"{label[job.id]}: {'resuming' if state != 'new' else 'starting'} in {job.workdir(root)}",
                  flush=True)
            log = None
            if parallel > 1:
                os.makedirs(job.workdir(root), exist_ok=True)
                log = open(os.path.join(job.workdir(root), "sweep.log"), "a", encoding="utf-8")
            running[subprocess.Popen(command(spec_arg, root, job), stdout=log, stderr=log)] = job
            pending.remove(job)
            if log is not None:
                log.close()  # the child holds its own descriptor
        if not running:
            continue
        done = wait_any(list(running))
        job, code = running.pop(done), done.returncode
        if code == 130:  # Ctrl-C: the run saved a checkpoint; stop the sweep too
            for proc in running:
                proc.wait()
            print(f"stopped at {job.id}; the same command resumes the sweep", file=sys.stderr)
            return 130
        if code != 0:
            error = read_status(job.workdir(root)).get("error") or f"exit code {code}"
            print(f"{label[job.id]}: failed ({error}); going on", file=sys.stderr)
            failed.append(job.id)
        elif parallel > 1:
            print(f"{label[job.id]}: finished")
    if failed or blocked:
        print(f"sweep: {len(failed)} run(s) failed {failed}, {len(blocked)} not started {blocked}; rerun the same "
              f"command to retry them", file=sys.stderr)
        return 1
    print(f"sweep: all {len(selected)} run(s) finished in {root}")
    return 0


def wait_any(procs: list[subprocess.Popen]) -> subprocess.Popen:
    while True:
        for proc in procs:
            if proc.poll() is not None:
                return proc
        time.sleep(0.2)


def print_dry_run(sweep: Sweep, job: Job, root: str, spec_arg: str) -> None:
    from diffchat_jax import cli
    state = job_state(job, root)
    action = {"finished": "skip (finished)", "failed": "retry (failed)", "unfinished": "resume",
              "new": "start"}[state]
    print(f"== {job.id}: {action}; workdir {job.workdir(root)}")
    if job.run.needs:
        print(f"   needs: {', '.join(job.run.needs)}")
    print(f"   command: {shlex.join(command(spec_arg, root, job))}")
    stages = [("train", job.run.config, train_config(job, root))]
    if job.run.eval:
        stages.append(("eval", job.run.eval.config, eval_config(job, root)))
    for stage, base, config in stages:
        defaults = cli.flat_fields(cli.load_config(cli.resolve_config_arg(base)))
        fields = cli.flat_fields(config)
        changed = {k: v for k, v in fields.items() if defaults.get(k, object()) != v}
        print(f"   {stage}: {base} with " + (", ".join(f"{k}={v!r}" for k, v in changed.items()) or "no changes"))


